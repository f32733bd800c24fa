# TLS for the development stack and the tests (sourced by dev/lib.sh).
#
# One throwaway CA per machine, in /var/lib/clinflow-dev-tls and linked into
# each clone as .dev/tls: the machine's PostgreSQL and RabbitMQ, which every
# clone's ./dev/up and tests share, serve one certificate, so every clone
# must trust the same CA. Files:
#   ca.pem, ca.key          the CA (its key never leaves this directory)
#   server.pem, server.key  127.0.0.1 and localhost, signed by the CA
# ensure_postgres_tls and ensure_rabbitmq_tls give the machine's servers that
# certificate; the local MedCAT is started with it (ensure_medcat).

DEV_TLS_HOME="${CLINFLOW_DEV_TLS_HOME:-/var/lib/clinflow-dev-tls}"
TLS_DIR="$CLINFLOW_ROOT/.dev/tls"
CA_FILE="$TLS_DIR/ca.pem"

# ensure_tls_certs — the CA and the server certificate, made once.
ensure_tls_certs() {
  mkdir -p "$DEV_TLS_HOME" "$CLINFLOW_ROOT/.dev"
  (
    flock 9
    cd "$DEV_TLS_HOME" || exit 1
    if [ ! -s ca.pem ] || [ ! -s server.pem ]; then
      say "making the development CA and server certificate in $DEV_TLS_HOME"
      umask 077
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
        -subj "/CN=clinflow development CA" -keyout ca.key -out ca.pem \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
        -keyout server.key -out server.csr 2>/dev/null
      printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "extendedKeyUsage=serverAuth" \
        "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" > server.ext
      openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
        -extfile server.ext -out server.pem 2>/dev/null
      rm -f server.csr server.ext ca.srl
      chmod 644 ca.pem server.pem
    fi
  ) 9>"$CLINFLOW_ROOT/.dev/tls.lock" || die "could not make the development certificates"
  [ -L "$TLS_DIR" ] || { rm -rf "$TLS_DIR"; ln -s "$DEV_TLS_HOME" "$TLS_DIR"; }
}

# ensure_postgres_tls — the machine's PostgreSQL with ssl = on and the dev
# server certificate (copies in its data directory, owned by postgres); a
# reload, no restart. Plaintext stays possible for the admin scripts; the
# services are refused it by their own configuration check.
ensure_postgres_tls() {
  local data cert key
  data="$(psql -Atq "$PG_ADMIN_URL" -c "SHOW data_directory")" || die "cannot ask PostgreSQL for its data directory"
  cert="$data/clinflow-dev-server.pem" key="$data/clinflow-dev-server.key"
  if [ "$(psql -Atq "$PG_ADMIN_URL" -c "SHOW ssl")" = on ] && cmp -s "$DEV_TLS_HOME/server.pem" "$cert" \
     && [ "$(psql -Atq "$PG_ADMIN_URL" -c "SHOW ssl_cert_file")" = "$cert" ]; then
    return 0
  fi
  say "PostgreSQL: ssl = on with the development certificate"
  install -o postgres -g postgres -m 644 "$DEV_TLS_HOME/server.pem" "$cert"
  install -o postgres -g postgres -m 600 "$DEV_TLS_HOME/server.key" "$key"
  psql -q "$PG_ADMIN_URL" -c "ALTER SYSTEM SET ssl_cert_file = '$cert'" -c "ALTER SYSTEM SET ssl_key_file = '$key'" \
    -c "ALTER SYSTEM SET ssl_min_protocol_version = 'TLSv1.2'" -c "ALTER SYSTEM SET ssl = on" \
    -c "SELECT pg_reload_conf()" >/dev/null
  for _ in $(seq 1 20); do [ "$(psql -Atq "$PG_ADMIN_URL" -c "SHOW ssl")" = on ] && return 0; sleep 0.5; done
  die "PostgreSQL did not turn ssl on (see its log)"
}

# ensure_rabbitmq_tls — a TLS listener on 127.0.0.1:5671 of the machine's
# RabbitMQ node with the dev server certificate (its config file gains a
# marked block; the node restarts once for it).
RABBITMQ_TLS_PORT=5671
ensure_rabbitmq_tls() {
  local conf=/etc/rabbitmq/rabbitmq.conf dir=/etc/rabbitmq/clinflow-dev-tls
  if grep -q "^# clinflow-dev-tls" "$conf" 2>/dev/null && cmp -s "$DEV_TLS_HOME/server.pem" "$dir/server.pem" \
     && rabbitmq_tls_up; then
    return 0
  fi
  say "RabbitMQ: a TLS listener on 127.0.0.1:$RABBITMQ_TLS_PORT with the development certificate (restarts the node)"
  install -d -o rabbitmq -g rabbitmq -m 750 "$dir"
  install -o rabbitmq -g rabbitmq -m 644 "$DEV_TLS_HOME/ca.pem" "$dir/ca.pem"
  install -o rabbitmq -g rabbitmq -m 644 "$DEV_TLS_HOME/server.pem" "$dir/server.pem"
  install -o rabbitmq -g rabbitmq -m 600 "$DEV_TLS_HOME/server.key" "$dir/server.key"
  if ! grep -q "^# clinflow-dev-tls" "$conf" 2>/dev/null; then
    cat >> "$conf" <<CONF
# clinflow-dev-tls (dev/tls.sh): TLS listener for the development stack and tests
listeners.ssl.local = 127.0.0.1:$RABBITMQ_TLS_PORT
ssl_options.cacertfile = $dir/ca.pem
ssl_options.certfile = $dir/server.pem
ssl_options.keyfile = $dir/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
CONF
  fi
  rabbitmqctl -q stop >/dev/null 2>&1 || true
  rabbitmq-server -detached >&2
  # await_startup fails at once while the node is not yet known to epmd.
  local deadline=$((SECONDS + 180))
  until rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "RabbitMQ did not start within 180 s"
    sleep 1
  done
  for _ in $(seq 1 20); do rabbitmq_tls_up && return 0; sleep 0.5; done
  die "RabbitMQ's TLS listener on 127.0.0.1:$RABBITMQ_TLS_PORT does not answer (see /var/log/rabbitmq)"
}

rabbitmq_tls_up() {
  openssl s_client -connect "127.0.0.1:$RABBITMQ_TLS_PORT" -CAfile "$DEV_TLS_HOME/ca.pem" -verify_return_error \
    -verify_ip 127.0.0.1 </dev/null >/dev/null 2>&1
}

# URLs of the services' hops, as TLS, for the development stack and tests.
tls_pg_query() { echo "sslmode=verify-full&sslrootcert=$CA_FILE"; }
tls_amqp_url() { echo "amqps://${1:-guest}:${2:-guest}@127.0.0.1:$RABBITMQ_TLS_PORT/%2f?cacertfile=$CA_FILE"; }
