-- Privacy by design (issue 34): the privacy officer, one-time passwords,
-- the accounting of disclosures, two-person erasure.

-- 1. The privacy officer: performs a patient's GDPR export and erasure
--    (the admin no longer can).
ALTER TABLE users DROP CONSTRAINT users_role_check;
ALTER TABLE users ADD CONSTRAINT users_role_check
    CHECK (role IN ('admin', 'clinician', 'ingest', 'ops', 'auditor', 'privacy_officer'));

-- 2. A password an admin set is one-time: until its holder replaces it,
--    every call but the password change and logout is refused.
ALTER TABLE users ADD COLUMN password_change_required boolean NOT NULL DEFAULT false;

-- 3. The accounting of disclosures: the patients an event disclosed (blind
--    indexes, hex), part of the signed event and of its row hash; and, for
--    "every access to this patient", one row per (patient, event) beside the
--    chain. Written in the sink's transaction with the events, append-only
--    as they are. recorded_at is the event row's own (the same now()).
ALTER TABLE audit_events ADD COLUMN patients text[];

CREATE TABLE audit_disclosures (
    patient_index bytea NOT NULL,
    seq           bigint NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_index, seq)
);

CREATE FUNCTION audit_disclosures_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_disclosures is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_disclosures_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_disclosures
    FOR EACH STATEMENT EXECUTE FUNCTION audit_disclosures_refuse_change();
ALTER TABLE audit_disclosures ENABLE ALWAYS TRIGGER audit_disclosures_append_only;

GRANT SELECT, INSERT ON audit_disclosures TO clinflow_sink;
GRANT SELECT ON audit_disclosures TO clinflow_audit_reader;

-- 4. Erasure takes two privacy officers: one asks (with a reason code and
--    the case's reference), another approves, and only then is the patient
--    erased. The patient is named by blind index only.
CREATE TABLE erasure_requests (
    id            uuid PRIMARY KEY,
    patient_index bytea NOT NULL,
    reason        text NOT NULL,
    case_ref      text NOT NULL,
    requested_by  uuid NOT NULL REFERENCES users (id),
    requested_at  timestamptz NOT NULL DEFAULT now(),
    approved_by   uuid REFERENCES users (id),
    approved_at   timestamptz,
    CONSTRAINT erasure_requests_four_eyes CHECK (approved_by IS NULL OR approved_by <> requested_by),
    CONSTRAINT erasure_requests_approved_whole CHECK ((approved_by IS NULL) = (approved_at IS NULL))
);
-- At most one open request per patient.
CREATE UNIQUE INDEX erasure_requests_open_idx ON erasure_requests (patient_index) WHERE approved_at IS NULL;
GRANT SELECT, INSERT ON erasure_requests TO clinflow_api;
GRANT UPDATE (approved_by, approved_at) ON erasure_requests TO clinflow_api;

-- 5. Break-glass grants per clinician and day are capped: counted here.
CREATE INDEX break_glass_grants_user_day_idx ON break_glass_grants (user_id, granted_at);
