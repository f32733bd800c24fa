-- Lawful basis and retention (issue 34): every document records why it is
-- held, research documents the consent they rest on, and `clinflow-api
-- purge` removes what is kept longer than its basis allows.

-- 1. The basis of each document. Rows from before this migration were
--    uploaded for direct care (the only purpose clinflow served): they are
--    recorded so; an operator who knows otherwise changes them with SQL.
ALTER TABLE documents
    ADD COLUMN lawful_basis text NOT NULL DEFAULT 'direct_care'
        CHECK (lawful_basis IN ('direct_care', 'research', 'legal_obligation')),
    -- HMAC of the consent's reference under the index key (domain
    -- `consents.ref`): research documents only, so a withdrawn consent
    -- finds its documents without the reference being stored.
    ADD COLUMN consent_index bytea,
    ADD CONSTRAINT documents_research_has_consent CHECK ((lawful_basis = 'research') = (consent_index IS NOT NULL));
ALTER TABLE documents ALTER COLUMN lawful_basis DROP DEFAULT;

-- The date retention counts from: the document's own date, else the day it
-- was uploaded (UTC). Immutable, so an index can hold it.
CREATE FUNCTION retention_date(document_date date, created_at timestamptz) RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(document_date, (created_at AT TIME ZONE 'UTC')::date);

CREATE INDEX documents_retention_idx ON documents (lawful_basis, retention_date(document_date, created_at));
CREATE INDEX documents_consent_idx ON documents (consent_index) WHERE consent_index IS NOT NULL;

-- 2. An account's default basis, used when its upload names none (a
--    service account feeding a clinical system: `direct_care`). Research
--    needs a consent per upload, so it is no default.
ALTER TABLE users
    ADD COLUMN default_lawful_basis text CHECK (default_lawful_basis IN ('direct_care', 'legal_obligation'));

-- 3. Purging documents: their concept rows, results, idempotency keys and
--    the documents themselves go; a patient left with no document and no
--    break-glass grant loses their data key too (crypto-shredding: what
--    backups hold of them no longer opens), announced as erasure does.
--    SECURITY DEFINER: the api's role cannot delete documents itself.
CREATE FUNCTION purge_documents(p_ids uuid[])
RETURNS TABLE (documents bigint, results bigint, concepts bigint, data_keys bigint, data_key_ids uuid[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    patients bytea[];
BEGIN
    SELECT coalesce(array_agg(DISTINCT patient_index), '{}') INTO patients
    FROM documents WHERE id = ANY (p_ids) AND patient_index IS NOT NULL;
    DELETE FROM document_concepts WHERE document_id = ANY (p_ids);
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
