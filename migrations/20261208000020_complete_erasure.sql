-- Erasure that reaches every row of the patient, and that every process
-- hears of at once (docs/encryption.md, "Erasure").
--
-- 1. A document without a patient index cannot be found by erasure (nor by
--    export): erase_patient() refuses, with SQLSTATE CF001, while any such
--    document remains, rather than leave one behind unseen. Format-1 rows
--    with an index are deleted row by row like the others; `keys migrate-v1`
--    fills the index of format-1 rows, `reindex-patients` that of any other.
--    The check probes documents_patient_index_idx (a btree keeps NULLs).
-- 2. It announces the data keys it destroyed on channel
--    `clinflow_data_keys_destroyed` (payload: their ids, comma-separated).
--    NOTIFY is delivered on commit only, to every session listening: each
--    api and worker drops the keys from its cache then (clinflow::keys::
--    watch_destroyed_keys), not when their time in the cache runs out.
-- 3. It returns the ids of the keys it destroyed (the erasure journal names
--    them, so a restored copy finds the patient by key even when the index
--    key changed since).
--
-- The result type changes, so the function is dropped and made again.

DROP FUNCTION erase_patient(bytea);

CREATE FUNCTION erase_patient(p_index bytea)
RETURNS TABLE (documents bigint, results bigint, concepts bigint, team_entries bigint, grants bigint,
               data_keys bigint, data_key_ids uuid[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    ids uuid[];
BEGIN
    IF EXISTS (SELECT 1 FROM documents WHERE patient_index IS NULL) THEN
        RAISE EXCEPTION 'erasure refused: documents without a patient index remain'
            USING ERRCODE = 'CF001',
                  HINT = 'run clinflow-api keys migrate-v1, then clinflow-api reindex-patients';
    END IF;
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
    WITH gone AS (DELETE FROM data_keys WHERE patient_index = p_index RETURNING id)
    SELECT coalesce(array_agg(id), '{}') INTO data_key_ids FROM gone;
    data_keys := cardinality(data_key_ids);
    IF data_keys > 0 THEN
        PERFORM pg_notify('clinflow_data_keys_destroyed', array_to_string(data_key_ids, ','));
    END IF;
    RETURN NEXT;
END
$$;
REVOKE ALL ON FUNCTION erase_patient(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION erase_patient(bytea) TO clinflow_api;
