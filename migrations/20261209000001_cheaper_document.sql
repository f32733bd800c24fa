-- A cheaper document (issue 35): the worker's two updates of a document
-- (to `processing`, then to `done`) become heap-only (HOT) updates, which
-- copy a row of about 300 bytes instead of 1.4 KB and add no index entry.
-- Measured on this schema's shape (500-document batches: insert, claim,
-- mark done): WAL 6,053 → 2,708 bytes per document, 0.60× the time, 97 %
-- of the updates HOT (BENCHMARKS.md, the 2026-12-07 16:38–18:00 entry).
--
-- 1. The sealed text in its own table, written once and never updated.
--    PostgreSQL moves a value out of line only when the row passes about
--    2 KB, so a 1 KB note stayed in the row and every update copied it.
CREATE TABLE document_texts (
    document_id uuid PRIMARY KEY REFERENCES documents (id) ON DELETE CASCADE,
    text_ct bytea NOT NULL
);
INSERT INTO document_texts (document_id, text_ct) SELECT id, text_ct FROM documents;
ALTER TABLE documents DROP COLUMN text_ct;

-- The api writes and reads it (and re-seals it: keys rotate,
-- migrate-v1); the worker reads it. Deleting goes through erase_patient()
-- and purge_documents() as for documents, by the cascade.
GRANT SELECT, INSERT, UPDATE ON document_texts TO clinflow_api;
GRANT SELECT ON document_texts TO clinflow_worker;

-- 2. No index names a column those updates change. `documents_status_idx`
--    (status, partial on status <> 'done') was read only by the
--    benchmark's waits, which follow the worker's counters instead; the
--    columns the updates set (status, attempts, updated_at, failure_code,
--    result_model) are in no other index.
DROP INDEX documents_status_idx;

-- 3. Room on each page for the new versions: the worker updates a batch
--    of documents written together, so every row of a page is updated at
--    once; at half full a page takes a new version of each (and pruning
--    frees the old ones for the next update). Applies to pages written
--    from now on.
ALTER TABLE documents SET (fillfactor = 50);

-- (audit_events keeps its recorded_at index: audit_events_recorded_at(),
-- the column's default, reads the newest row through it for every batch.)
