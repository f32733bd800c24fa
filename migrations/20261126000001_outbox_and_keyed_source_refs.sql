-- Uploads that are never lost and never stuck (issue 16).
--
-- 1. A transactional outbox. Every message the api sends (document jobs and
--    its audit events) is first a row here, written in the same transaction
--    as the state it announces; the api's relay publishes the rows with
--    publisher confirms and deletes them. A committed upload therefore always
--    has its job, whatever RabbitMQ does, and a request never waits on the
--    broker. Bodies are the exact JSON published: ids only, never PHI.
CREATE TABLE outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic      text NOT NULL CHECK (topic IN ('documents.live', 'documents.backfill', 'audit')),
    message_id text NOT NULL,
    body       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- UPDATE only because SELECT … FOR UPDATE SKIP LOCKED requires it.
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO clinflow_app;

-- 2. source_ref is the uploader's own name for a note (often a file path, and
--    a file name such as smith_john.txt is PHI): it is kept only as a keyed
--    hash (HMAC-SHA256 under CLINFLOW_INDEX_KEY), unique per uploading
--    account, never across accounts. Existing clear values cannot be hashed
--    here (the key is not in the database) and are dropped: their documents
--    stay, a re-upload of one of them is accepted as new.
ALTER TABLE documents DROP COLUMN source_ref;
ALTER TABLE documents ADD COLUMN source_ref_hmac bytea;
CREATE UNIQUE INDEX documents_uploader_source_ref_idx ON documents (uploaded_by, source_ref_hmac);

-- 3. The lane a document was uploaded on: single uploads are `live`, batch
--    uploads `backfill` (the worker serves live first).
ALTER TABLE documents ADD COLUMN lane text NOT NULL DEFAULT 'live' CHECK (lane IN ('live', 'backfill'));

-- 4. Idempotency-Key of single uploads: the first answer, replayed on retry.
--    The key is stored as a keyed hash, with a hash of the request so the
--    same key with another body is refused.
CREATE TABLE idempotency_keys (
    user_id      uuid NOT NULL REFERENCES users (id),
    key_hmac     bytea NOT NULL,
    request_hmac bytea NOT NULL,
    document_id  uuid NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key_hmac)
);
GRANT SELECT, INSERT ON idempotency_keys TO clinflow_app;
