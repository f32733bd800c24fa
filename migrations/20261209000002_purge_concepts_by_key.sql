-- purge_documents() deleted a batch's concept rows by document_id alone,
-- which no index of document_concepts leads with: every batch of 500
-- scanned the whole table. Among a million documents (20 million concept
-- rows, `./bench/run full`) the purge ran at about 100 documents/s. Each
-- row is now found through the primary key, (patient_index, document_id,
-- cui), with the patient index read from the document (a document without
-- one has no concept rows). Otherwise the function is unchanged.
CREATE OR REPLACE FUNCTION purge_documents(p_ids uuid[])
RETURNS TABLE (documents bigint, results bigint, concepts bigint, data_keys bigint, data_key_ids uuid[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    patients bytea[];
BEGIN
    SELECT coalesce(array_agg(DISTINCT patient_index), '{}') INTO patients
    FROM documents WHERE id = ANY (p_ids) AND patient_index IS NOT NULL;
    DELETE FROM document_concepts dc USING documents d
    WHERE d.id = ANY (p_ids) AND dc.patient_index = d.patient_index AND dc.document_id = d.id;
    GET DIAGNOSTICS concepts = ROW_COUNT;
    DELETE FROM document_results WHERE document_id = ANY (p_ids);
    GET DIAGNOSTICS results = ROW_COUNT;
    DELETE FROM idempotency_keys WHERE document_id = ANY (p_ids);
    DELETE FROM documents WHERE id = ANY (p_ids);
    GET DIAGNOSTICS documents = ROW_COUNT;
    WITH gone AS (
        DELETE FROM data_keys k
        WHERE k.patient_index = ANY (patients)
          AND NOT EXISTS (SELECT 1 FROM documents d WHERE d.patient_index = k.patient_index)
          AND NOT EXISTS (SELECT 1 FROM break_glass_grants g WHERE g.patient_index = k.patient_index)
        RETURNING k.id
    )
    SELECT coalesce(array_agg(id), '{}') INTO data_key_ids FROM gone;
    data_keys := cardinality(data_key_ids);
    IF data_keys > 0 THEN
        PERFORM pg_notify('clinflow_data_keys_destroyed', array_to_string(data_key_ids, ','));
    END IF;
    RETURN NEXT;
END
$$;
REVOKE ALL ON FUNCTION purge_documents(uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION purge_documents(uuid[]) TO clinflow_api;
