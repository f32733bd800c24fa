-- The concept index read from both ends: by patient (a problem list,
-- erasure, the worker's replacement) and by concept ("which of my patients
-- have this concept").
--
-- With one index led by the patient, a concept among the caller's 1,000
-- patients was 1,000 probes, each into a different patient's leaf page of an
-- index of 2.5 GB at a million notes. A common concept fills its page after
-- a few dozen; a rare one (most of them) probes them all: 4,000 buffers,
-- 6 ms warm, 125 ms cold, and over capacity at 20 clients × 10 requests/s
-- (`./bench/run full --only queries`: p99 526 ms).
--
-- Led by the concept, the same probes (caller's patients in order, one
-- probe each, stopping when the page is full) land in that concept's part
-- of the index: a few pages for a rare concept, which stay cached, and for a
-- common one the page fills early. The readers' statements (api
-- patients.rs) take the caller's patients in order and probe this index
-- for each (a LATERAL join), so the cost follows the size of the caller's
-- scope, not the size of the table.
--
-- The primary key becomes (patient_index, document_id, cui): the same rows,
-- unique the same way, still led by the patient; a document's rows are now
-- adjacent (the worker writes and replaces them together), and the planner
-- never takes it for a (cui, patient) probe, which this index serves.

ALTER TABLE document_concepts DROP CONSTRAINT document_concepts_pkey;
ALTER TABLE document_concepts
    ADD PRIMARY KEY (patient_index, document_id, cui) INCLUDE (mentions, negated, first_offset, document_date);
CREATE INDEX document_concepts_cui_idx ON document_concepts (cui, patient_index, document_id)
    INCLUDE (mentions, negated, first_offset, document_date);
