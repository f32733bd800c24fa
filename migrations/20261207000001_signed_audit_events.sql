-- Audit events signed by their producers (Ed25519), and the chain's heads
-- signed by the sink: the chain is verified with public keys only.
-- Rows written before (format 1) keep NULL here and their HMAC row hash.
-- key_id/signature: the producer's key id and its signature of the event;
-- head_key_id/head_signature: on the last row of each appended batch, the
-- sink's key id and its signature of (seq, row_hash).
ALTER TABLE audit_events
    ADD COLUMN key_id text,
    ADD COLUMN signature bytea,
    ADD COLUMN head_key_id text,
    ADD COLUMN head_signature bytea,
    ADD CONSTRAINT audit_events_signed_whole CHECK ((key_id IS NULL) = (signature IS NULL)),
    ADD CONSTRAINT audit_events_head_whole CHECK ((head_key_id IS NULL) = (head_signature IS NULL));
