-- The concept index (issue 21): what each current result found, by CUI,
-- so that "this patient's problem list" and "my patients with this
-- condition" are index scans that decrypt nothing. Patients appear only as
-- their blind index (documents.patient_index).

-- The model version whose result a document currently shows; set by the
-- worker with the result (a reprocess with another model moves it).
ALTER TABLE documents ADD COLUMN result_model text;

-- The vocabulary seen so far: CUI → preferred name and semantic types (the
-- model's concept database, not patient data).
CREATE TABLE concept_names (
    cui         text PRIMARY KEY,
    pretty_name text NOT NULL,
    type_ids    text[] NOT NULL DEFAULT '{}'
);

-- One row per (document, model version, CUI).
CREATE TABLE document_concepts (
    document_id   uuid NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    model_version text NOT NULL,
    cui           text NOT NULL,
    patient_index bytea NOT NULL,
    mentions      integer NOT NULL CHECK (mentions > 0),
    -- Mentions MetaCAT marked as negated or hypothetical (0 when the model
    -- has no meta-annotations).
    negated       integer NOT NULL DEFAULT 0 CHECK (negated >= 0 AND negated <= mentions),
    -- Offset (Unicode code points) of the first mention.
    first_offset  integer NOT NULL,
    PRIMARY KEY (document_id, model_version, cui)
);
CREATE INDEX document_concepts_cui_patient_idx ON document_concepts (cui, patient_index);
CREATE INDEX document_concepts_patient_idx ON document_concepts (patient_index, cui);

GRANT SELECT, INSERT, UPDATE ON concept_names TO clinflow_worker;
GRANT SELECT, INSERT ON document_concepts TO clinflow_worker;
GRANT SELECT ON concept_names, document_concepts TO clinflow_api;
-- Erasure of a patient (admin, audited): their documents, results, concept
-- rows, idempotency keys, team memberships and break-glass grants.
GRANT DELETE ON documents, document_results, document_concepts, idempotency_keys, care_team_patients,
    break_glass_grants TO clinflow_api;
