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
-- Erasure of a patient (GDPR, admin, audited): the api role may not delete
-- documents or results at all; it may call this, which deletes every row of
-- one patient (by blind index), then destroys their data key
-- (crypto-shredding: copies in backups can no longer be decrypted), and
-- returns how many of each went.
CREATE FUNCTION erase_patient(p_index bytea)
RETURNS TABLE (documents bigint, results bigint, concepts bigint, team_entries bigint, grants bigint,
               data_keys bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    ids uuid[];
BEGIN
    SELECT coalesce(array_agg(id), '{}') INTO ids FROM documents WHERE patient_index = p_index;
    DELETE FROM document_concepts WHERE document_id = ANY (ids);
    GET DIAGNOSTICS concepts = ROW_COUNT;
    DELETE FROM document_results WHERE document_id = ANY (ids);
    GET DIAGNOSTICS results = ROW_COUNT;
    DELETE FROM idempotency_keys WHERE document_id = ANY (ids);
    DELETE FROM documents WHERE id = ANY (ids);
    GET DIAGNOSTICS documents = ROW_COUNT;
    DELETE FROM care_team_patients WHERE patient_index = p_index;
    GET DIAGNOSTICS team_entries = ROW_COUNT;
    DELETE FROM break_glass_grants WHERE patient_index = p_index;
    GET DIAGNOSTICS grants = ROW_COUNT;
    DELETE FROM data_keys WHERE patient_index = p_index;
    GET DIAGNOSTICS data_keys = ROW_COUNT;
    RETURN NEXT;
END
$$;
REVOKE ALL ON FUNCTION erase_patient(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION erase_patient(bytea) TO clinflow_api;
