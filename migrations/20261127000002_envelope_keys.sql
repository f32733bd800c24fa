-- Envelope encryption (issue 21): one data key per patient, stored only
-- wrapped under a key-encryption key (KEK) of CLINFLOW_MASTER_KEY, named by
-- its id. Erasing a patient deletes their row here (crypto-shredding: every
-- copy of their ciphertexts, in backups too, becomes unreadable); rotating a
-- KEK rewrites `kek_id` and `wrapped` only (`clinflow-api keys rotate`).
-- Format of `wrapped` and of the ciphertexts: clinflow/src/crypto.rs.
CREATE TABLE data_keys (
    id            uuid PRIMARY KEY,
    patient_index bytea NOT NULL UNIQUE,       -- the patient's blind index (patients.ref)
    kek_id        text NOT NULL CHECK (kek_id ~ '^[A-Za-z0-9._-]{1,32}$'),
    wrapped       bytea NOT NULL CHECK (length(wrapped) = 61),
    created_at    timestamptz NOT NULL DEFAULT now(),
    rotated_at    timestamptz
);
-- `keys rotate` selects the keys not yet under the primary KEK.
CREATE INDEX data_keys_kek_idx ON data_keys (kek_id);

-- The data key that sealed a document's patient_ref_ct and text_ct (and its
-- results' annotations_ct). NULL only for rows sealed directly under the
-- master key before this migration (format 1; `keys migrate-v1` moves them).
-- Deferrable so that `keys reencrypt` can replace a patient's key (delete
-- the old row, insert the new one under the same unique patient_index, point
-- the documents at it) in one transaction; checked at once otherwise.
ALTER TABLE documents ADD COLUMN data_key_id uuid
    CONSTRAINT documents_data_key_id_fkey REFERENCES data_keys (id) DEFERRABLE INITIALLY IMMEDIATE;
CREATE INDEX documents_data_key_idx ON documents (data_key_id);

-- The api creates a patient's key with their first upload or break-glass
-- grant; it destroys one only through erase_patient() (a later migration)
-- and never rewrites one.
-- The worker reads keys to open texts and seal results. `keys rotate`,
-- `keys reencrypt` and `keys migrate-v1` run as the schema owner
-- (MIGRATION_DATABASE_URL).
GRANT SELECT, INSERT ON data_keys TO clinflow_api;
-- Only so that uploads may lock their patient's key FOR KEY SHARE (which
-- asks for an UPDATE privilege): the one harmless column.
GRANT UPDATE (rotated_at) ON data_keys TO clinflow_api;
GRANT SELECT ON data_keys TO clinflow_worker;
