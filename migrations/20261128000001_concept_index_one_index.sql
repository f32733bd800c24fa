-- The concept index, cheaper to write: one index per row instead of three
-- and a foreign-key check. The worker writes about twenty rows per note; in
-- `./bench/run quick` this insert was the most expensive statement of the
-- pipeline (11 ms per batch of 50 notes, 220 MB of WAL for 368k rows).
--
-- 1. It holds the concepts of each document's current result only: the
--    worker replaces a document's rows when it stores a result of another
--    model version, in the same transaction that moves documents.result_model.
--    So no query compares model versions, and none needs the rows by document.
-- 2. One index, the primary key (patient_index, cui, document_id), serves
--    every reader: a patient's problem list (prefix patient_index); a concept
--    among the caller's patients (`patient_index = ANY (scope) AND cui = $`:
--    one ordered scan, patient by patient, that stops when the page is
--    full); erasure; and it makes a redelivered result a no-op. It carries
--    the counts, first offset and the document's date, so those readers
--    scan the index only and read `documents` just for the rows of the page
--    they answer (the table is some twenty rows per note: at a million notes
--    neither it nor its index is in shared buffers).
-- 3. No foreign key to documents: rows are written only for documents locked
--    in the writing transaction, and a document is deleted only by
--    erase_patient(), which deletes its rows first.

DELETE FROM document_concepts dc
USING documents d
WHERE d.id = dc.document_id AND d.result_model IS DISTINCT FROM dc.model_version;

ALTER TABLE document_concepts
    DROP CONSTRAINT document_concepts_document_id_fkey,
    DROP CONSTRAINT document_concepts_pkey;
DROP INDEX document_concepts_cui_patient_idx;
DROP INDEX document_concepts_patient_idx;
-- The document's date as the readers use it: its own, else its upload day.
ALTER TABLE document_concepts ADD COLUMN document_date date;
UPDATE document_concepts dc SET document_date = coalesce(d.document_date, d.created_at::date)
FROM documents d WHERE d.id = dc.document_id;
ALTER TABLE document_concepts ALTER COLUMN document_date SET NOT NULL;
ALTER TABLE document_concepts
    ADD PRIMARY KEY (patient_index, cui, document_id) INCLUDE (mentions, negated, first_offset, document_date);

-- The patients a user may read: those of their care teams, and those of
-- their live break-glass grants. (care::patient_grant asks the same of one
-- patient, and says which grant.)
CREATE FUNCTION patients_in_scope(p_user uuid) RETURNS TABLE (patient_index bytea)
LANGUAGE sql STABLE AS $$
    SELECT p.patient_index FROM care_team_members m JOIN care_team_patients p ON p.team_id = m.team_id
    WHERE m.user_id = p_user
    UNION
    SELECT g.patient_index FROM break_glass_grants g WHERE g.user_id = p_user AND g.expires_at > now()
$$;
GRANT EXECUTE ON FUNCTION patients_in_scope(uuid) TO clinflow_api;

GRANT DELETE ON document_concepts TO clinflow_worker;

-- As before, but the concept rows go by the patient's index (the table has
-- no index by document any more).
CREATE OR REPLACE FUNCTION erase_patient(p_index bytea)
RETURNS TABLE (documents bigint, results bigint, concepts bigint, team_entries bigint, grants bigint,
               data_keys bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    ids uuid[];
BEGIN
    SELECT coalesce(array_agg(id), '{}') INTO ids FROM documents WHERE patient_index = p_index;
    DELETE FROM document_concepts WHERE patient_index = p_index;
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
