-- Identity and access (issue 19): lockout, service accounts and API keys,
-- care teams, break-glass, and the patient blind index they are scoped by.

-- 1. Lockout state per account, and service accounts (API keys only: their
--    password hash is unusable, and they may only hold the ingest role).
ALTER TABLE users
    ADD COLUMN kind text NOT NULL DEFAULT 'person' CHECK (kind IN ('person', 'service')),
    -- Failed logins counted since failed_since (the window's start); an
    -- attempt is counted before its password is checked, so concurrent
    -- guesses cannot get past the threshold.
    ADD COLUMN failed_logins integer NOT NULL DEFAULT 0,
    ADD COLUMN failed_since timestamptz,
    ADD COLUMN locked_until timestamptz,
    -- Lockouts since the last successful login: each one lasts twice the last.
    ADD COLUMN lockouts integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT users_service_accounts_ingest_only CHECK (kind = 'person' OR role = 'ingest');

-- 2. The patient blind index: HMAC-SHA256 of the patient reference under
--    the index key (domain `patients.ref`), so "this patient's documents" and
--    care-team scope are index lookups and the reference is never in clear.
--    Rows from before this migration are filled by `clinflow-api reindex-patients`.
ALTER TABLE documents ADD COLUMN patient_index bytea;
CREATE INDEX documents_patient_index_idx ON documents (patient_index);

-- 3. Care teams: clinicians see the patients of their teams.
CREATE TABLE care_teams (
    id         uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9._@ -]{1,64}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE care_team_members (
    team_id  uuid NOT NULL REFERENCES care_teams (id) ON DELETE CASCADE,
    user_id  uuid NOT NULL REFERENCES users (id),
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX care_team_members_user_idx ON care_team_members (user_id);
CREATE TABLE care_team_patients (
    team_id       uuid NOT NULL REFERENCES care_teams (id) ON DELETE CASCADE,
    patient_index bytea NOT NULL,
    added_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, patient_index)
);
CREATE INDEX care_team_patients_patient_idx ON care_team_patients (patient_index);

-- 4. Break-glass: a clinician's time-limited access to one patient outside
--    their teams, with the reason they gave (encrypted: it is free text).
CREATE TABLE break_glass_grants (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users (id),
    patient_index bytea NOT NULL,
    reason_ct     bytea NOT NULL,
    granted_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX break_glass_grants_user_patient_idx ON break_glass_grants (user_id, patient_index, expires_at);

-- 5. API keys of service accounts: `cfk_<id>_<secret>`; only SHA-256 of the
--    256-bit secret is stored.
CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id),
    secret_hash  bytea NOT NULL,
    label        text CHECK (label ~ '^[A-Za-z0-9._@ -]{0,64}$'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id);

GRANT SELECT, INSERT, UPDATE, DELETE ON care_teams, care_team_members, care_team_patients TO clinflow_api;
GRANT SELECT, INSERT ON break_glass_grants TO clinflow_api;
GRANT SELECT, INSERT, UPDATE ON api_keys TO clinflow_api;
