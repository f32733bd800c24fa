-- Idempotency keys are kept for a retention period (IDEMPOTENCY_KEY_HOURS,
-- default 24) and then purged by the api, which needs DELETE for that; the
-- index serves the purge.
GRANT DELETE ON idempotency_keys TO clinflow_app;
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
