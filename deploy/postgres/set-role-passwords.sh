#!/bin/sh
# One-shot, run by docker-compose.yml's db-roles service after the
# migrations: gives each service's login role (created without a password by
# migrations/20261126000003_service_roles.sql) its password from the
# environment. Run on every `docker compose up`, so changing a password in
# the environment and running `up` again rotates it (restart the service that
# uses it afterwards).
#
# The passwords reach psql as variables and are quoted by psql (:'name'), so
# no value can inject SQL; nothing is echoed. Connection: PGHOST, PGUSER,
# PGPASSWORD, PGDATABASE (the schema owner).
set -eu

for var in CLINFLOW_API_DB_PASSWORD CLINFLOW_WORKER_DB_PASSWORD CLINFLOW_SINK_DB_PASSWORD \
           CLINFLOW_AUDIT_READER_DB_PASSWORD; do
  eval "value=\${$var:-}"
  # shellcheck disable=SC2154 # assigned by the eval above
  if [ "${#value}" -lt 16 ]; then
    echo "db-roles: $var must be at least 16 characters (openssl rand -hex 32)" >&2
    exit 1
  fi
done

psql -X -q -v ON_ERROR_STOP=1 \
  -v api="$CLINFLOW_API_DB_PASSWORD" \
  -v worker="$CLINFLOW_WORKER_DB_PASSWORD" \
  -v sink="$CLINFLOW_SINK_DB_PASSWORD" \
  -v reader="$CLINFLOW_AUDIT_READER_DB_PASSWORD" <<'SQL'
SET password_encryption = 'scram-sha-256';
ALTER ROLE clinflow_api LOGIN PASSWORD :'api';
ALTER ROLE clinflow_worker LOGIN PASSWORD :'worker';
ALTER ROLE clinflow_sink LOGIN PASSWORD :'sink';
ALTER ROLE clinflow_audit_reader LOGIN PASSWORD :'reader';
SQL
echo "db-roles: passwords set for clinflow_api, clinflow_worker, clinflow_sink, clinflow_audit_reader"
