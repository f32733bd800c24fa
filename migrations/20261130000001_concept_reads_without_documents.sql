-- The concept endpoints answer from the concept index and the data keys,
-- without reading `documents` (issue 21, item 9).
--
-- `./bench/run full --only queries` (1 M notes): the first query of a
-- concept after the load spent 48 % of its time reading `documents` pages
-- from disk, one page per row of the page answered, only for each row's
-- sealed patient reference, upload time and date. `documents` holds the
-- sealed note inline (six rows a heap page, 1.3 GB), so every row joined
-- was a page, and cold pages are disk reads: p99 66–204 ms in the first
-- round against 10–24 ms in later ones.
--
-- 1. A patient's reference is sealed once more, beside their data key, under
--    that key (field `data_keys`/`patient_ref`/{key id}): the concept
--    endpoints open one per patient of the page, from the table they read
--    for the key anyway (a row of about 215 bytes a patient, where a
--    `documents` row carries the sealed note: 1.1 KB in the benchmark).
--    Keys created before this migration hold none until
--    `clinflow-api keys seal-refs`; until then the readers open the
--    reference of one of the patient's documents. Erasure and re-encryption
--    deal with it with the key (it is shredded with it).
ALTER TABLE data_keys ADD COLUMN patient_ref_ct bytea;

-- 2. The concept rows carry the document's own date (NULL when it has
--    none; it was the date else the upload day) and its upload time, so the
--    concept documents page answers every column from the index.
DELETE FROM document_concepts dc WHERE NOT EXISTS (SELECT FROM documents d WHERE d.id = dc.document_id);
ALTER TABLE document_concepts DROP CONSTRAINT document_concepts_pkey;
DROP INDEX document_concepts_cui_idx;
ALTER TABLE document_concepts ADD COLUMN created_at timestamptz;
ALTER TABLE document_concepts ALTER COLUMN document_date DROP NOT NULL;
UPDATE document_concepts dc SET created_at = d.created_at, document_date = d.document_date
FROM documents d WHERE d.id = dc.document_id;
ALTER TABLE document_concepts ALTER COLUMN created_at SET NOT NULL;
ALTER TABLE document_concepts
    ADD PRIMARY KEY (patient_index, document_id, cui)
    INCLUDE (mentions, negated, first_offset, document_date, created_at);
CREATE INDEX document_concepts_cui_idx ON document_concepts (cui, patient_index, document_id)
    INCLUDE (mentions, negated, first_offset, document_date, created_at);
