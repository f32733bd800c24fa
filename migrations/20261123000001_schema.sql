-- clinflow schema, first version.
--
-- Migrations run as the owning role (whoever runs `clinflow-api migrate`);
-- the services log in as clinflow_app, which owns nothing and gets only the
-- privileges granted below. Roles are cluster-wide, so the role is created
-- once and tolerated if it exists (or is being created by a concurrent
-- migration of another database).
DO $$
BEGIN
    CREATE ROLE clinflow_app LOGIN;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    username      text NOT NULL UNIQUE CHECK (username ~ '^[A-Za-z0-9._@-]{1,64}$'),
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'clinician', 'ingest', 'ops', 'auditor')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    disabled_at   timestamptz
);

-- One row per login. The JWT's jti is the session id; every authenticated
-- request checks and touches its row, which is what makes logout, forced
-- logout and the idle timeout real for an otherwise stateless token.
CREATE TABLE sessions (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    source_ip    inet
);
CREATE INDEX sessions_user_id_idx ON sessions (user_id);

-- PHI columns (*_ct) hold the versioned AES-256-GCM envelope of
-- clinflow::crypto, bound to table, column and row id.
CREATE TABLE documents (
    id             uuid PRIMARY KEY,          -- UUIDv7: time-ordered
    status         text NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'processing', 'done', 'failed')),
    patient_ref_ct bytea NOT NULL,
    text_ct        bytea NOT NULL,
    source_ref     text UNIQUE,               -- the uploader's own id for the note; no PHI
    document_date  date,
    uploaded_by    uuid NOT NULL REFERENCES users (id),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    attempts       integer NOT NULL DEFAULT 0,
    failure_code   text                       -- a machine code, never text from the note
);
CREATE INDEX documents_status_idx ON documents (status) WHERE status <> 'done';

-- One result per (document, model version): reprocessing with a new model
-- adds a row instead of overwriting the old one.
CREATE TABLE document_results (
    document_id      uuid NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    model_version    text NOT NULL,
    annotations_ct   bytea NOT NULL,
    annotation_count integer NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (document_id, model_version)
);

-- Append-only audit trail, written only by clinflow-audit-sink.
-- seq is gap-free and row_hash = HMAC-SHA256(key, seq || prev_hash || event),
-- so a removed, reordered or edited row breaks the chain.
CREATE TABLE audit_events (
    seq           bigint PRIMARY KEY CHECK (seq > 0),
    event_id      uuid NOT NULL UNIQUE,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    actor_kind    text NOT NULL CHECK (actor_kind IN ('user', 'service', 'anonymous')),
    actor_id      uuid,
    actor_name    text,
    actor_role    text,
    source_ip     inet,
    request_id    text,
    action        text NOT NULL,
    resource_kind text,
    resource_id   text,
    outcome       text NOT NULL CHECK (outcome IN ('success', 'failure', 'denied')),
    reason        text,
    prev_hash     bytea NOT NULL,
    row_hash      bytea NOT NULL
);
CREATE INDEX audit_events_resource_idx ON audit_events (resource_kind, resource_id);
CREATE INDEX audit_events_actor_idx ON audit_events (actor_id, occurred_at);

-- Refuse, loudly, any change to the audit trail. Statement-level, so even an
-- UPDATE or DELETE that matches no row fails; ENABLE ALWAYS, so the triggers
-- also fire under session_replication_role = replica.
CREATE FUNCTION audit_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only;

-- Privileges of the services' role.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO clinflow_app;
GRANT SELECT, INSERT, UPDATE ON users, sessions TO clinflow_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON documents, document_results TO clinflow_app;
GRANT SELECT, INSERT ON audit_events TO clinflow_app;
