-- One login role per service, each with only what it needs; none owns a
-- table (migrations run as the owner). Roles are cluster-wide: created once,
-- tolerated if they exist or are being created by a concurrent migration.
--
--   clinflow_api           users and sessions, documents (insert, read, and
--                          requeue for ops), results (read), the outbox,
--                          idempotency keys. Nothing of audit_events: it
--                          publishes events through its outbox.
--   clinflow_worker        documents (read, claim, finish), results (insert,
--                          read). Not users, not sessions, not audit_events.
--   clinflow_sink          audit_events: SELECT and INSERT, nothing else.
--   clinflow_audit_reader  audit_events: SELECT (the api's auditor endpoints,
--                          on a connection of their own).
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['clinflow_api', 'clinflow_worker', 'clinflow_sink', 'clinflow_audit_reader'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I LOGIN', r);
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA public TO clinflow_api, clinflow_worker, clinflow_sink, clinflow_audit_reader;

GRANT SELECT, INSERT, UPDATE ON users, sessions TO clinflow_api;
GRANT SELECT, INSERT, UPDATE ON documents TO clinflow_api;
GRANT SELECT ON document_results TO clinflow_api;
-- UPDATE only because SELECT … FOR UPDATE SKIP LOCKED (the relay) needs it.
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO clinflow_api;
GRANT SELECT, INSERT, DELETE ON idempotency_keys TO clinflow_api;

GRANT SELECT, UPDATE ON documents TO clinflow_worker;
GRANT SELECT, INSERT ON document_results TO clinflow_worker;

GRANT SELECT, INSERT ON audit_events TO clinflow_sink;

GRANT SELECT ON audit_events TO clinflow_audit_reader;

-- The single role of earlier versions keeps nothing in this database.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM clinflow_app;
