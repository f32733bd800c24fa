# Shared by dev/up, dev/down and dev/test. Source it; do not run it.
# Starts the machine's PostgreSQL and RabbitMQ when they are installed but
# stopped, and the local MedCAT service, and waits until each answers.

CLINFLOW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_ADMIN_URL="${CLINFLOW_TEST_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Prints "started" if it had to start PostgreSQL.
ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432; then return 0; fi
  command -v pg_ctlcluster >/dev/null || die "PostgreSQL is not running on 127.0.0.1:5432 and pg_ctlcluster is not installed"
  say "starting PostgreSQL"
  local version
  version="$(ls /etc/postgresql | sort -V | tail -n1)"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && { echo started; return 0; }; sleep 1; done
  die "PostgreSQL did not become ready within 60 s"
}

# Prints "started" if it had to start RabbitMQ. Enables the broker's own
# Prometheus exporter (rabbitmq_prometheus, :15692), which the dashboards and
# alerts read queue depths and consumers from.
ensure_rabbitmq() {
  local started=
  if ! rabbitmq_up; then
    command -v rabbitmq-server >/dev/null || die "RabbitMQ is not running on 127.0.0.1:5672 and rabbitmq-server is not installed"
    say "starting RabbitMQ"
    rabbitmq-server -detached >&2
    timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || die "RabbitMQ did not start within 120 s"
    started=1
  fi
  if ! curl -fsS -m 2 -o /dev/null http://127.0.0.1:15692/metrics 2>/dev/null; then
    say "enabling RabbitMQ's Prometheus exporter (rabbitmq_prometheus, :15692)"
    rabbitmq-plugins -q enable rabbitmq_prometheus >&2 || say "could not enable rabbitmq_prometheus: queue panels will be empty"
  fi
  if [ -n "$started" ]; then echo started; fi
}

rabbitmq_up() {
  (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && rabbitmqctl -q status >/dev/null 2>&1
}

medcat_ready() {
  curl -fsS -m 2 --cacert "$CA_FILE" "https://127.0.0.1:$1/api/health/ready" >/dev/null 2>&1
}

# ensure_medcat PORT LOGFILE PIDFILE — starts dev/medcat/run on PORT, over
# HTTPS with the development certificate, unless a MedCAT already answers
# there. The first start builds the venv (~1 minute).
ensure_medcat() {
  local port=$1 log=$2 pidfile=$3
  if medcat_ready "$port"; then return 0; fi
  ensure_tls_certs
  say "starting MedCAT on https://127.0.0.1:$port (the first start builds its venv, ~1 minute)"
  mkdir -p "$(dirname "$log")" "$(dirname "$pidfile")"
  SERVER_PORT="$port" SERVER_TLS_CERT="$TLS_DIR/server.pem" SERVER_TLS_KEY="$TLS_DIR/server.key" \
    setsid "$CLINFLOW_ROOT/dev/medcat/run" >"$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  for _ in $(seq 1 600); do
    medcat_ready "$port" && return 0
    kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -n 20 "$log" >&2; die "MedCAT exited during start-up (log: $log)"; }
    sleep 0.5
  done
  die "MedCAT did not become ready within 300 s (log: $log)"
}

# stop_pidfile FILE — TERM the process group, then KILL after 15 s.
stop_pidfile() {
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# Prints the path of openapi-spec-validator, installed (pinned) into a venv
# under .dev/ the first time: the api's tests validate /openapi.json with it.
OPENAPI_VALIDATOR_VERSION=0.9.0
ensure_openapi_validator() {
  local venv="$CLINFLOW_ROOT/.dev/openapi-validator"
  mkdir -p "$CLINFLOW_ROOT/.dev"
  (
    flock 9
    if [ "$(cat "$venv/.version" 2>/dev/null)" != "$OPENAPI_VALIDATOR_VERSION" ]; then
      say "installing openapi-spec-validator $OPENAPI_VALIDATOR_VERSION into $venv"
      rm -rf "$venv"
      python3 -m venv "$venv" >&2
      "$venv/bin/pip" install -q --disable-pip-version-check "openapi-spec-validator==$OPENAPI_VALIDATOR_VERSION" >&2
      echo "$OPENAPI_VALIDATOR_VERSION" > "$venv/.version"
    fi
  ) 9>"$CLINFLOW_ROOT/.dev/openapi-validator.lock"
  echo "$venv/bin/openapi-spec-validator"
}

# Prints the path of schemathesis, installed into a venv under .dev/ the
# first time (and again when api/tests/schemathesis/requirements.txt, its
# pins, changes): api/tests/it/schemathesis.rs runs it against the api.
ensure_schemathesis() {
  local venv="$CLINFLOW_ROOT/.dev/schemathesis" pins="$CLINFLOW_ROOT/api/tests/schemathesis/requirements.txt" digest
  digest="$(sha256sum "$pins" | cut -d' ' -f1)"
  mkdir -p "$CLINFLOW_ROOT/.dev"
  (
    flock 9
    if [ "$(cat "$venv/.digest" 2>/dev/null)" != "$digest" ]; then
      say "installing schemathesis ($(grep -o '^schemathesis==.*' "$pins")) into $venv"
      rm -rf "$venv"
      python3 -m venv "$venv" >&2
      "$venv/bin/pip" install -q --disable-pip-version-check -r "$pins" >&2
      echo "$digest" > "$venv/.digest"
    fi
  ) 9>"$CLINFLOW_ROOT/.dev/schemathesis.lock"
  echo "$venv/bin/schemathesis"
}

# Installs the Debian packages named that are missing (quietly; only when
# some are): the machine has none of them on a fresh start.
ensure_debian_packages() {
  local need=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
  done
  [ "${#need[@]}" -eq 0 ] && return 0
  say "apt-get install ${need[*]}"
  apt-get -qq update >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300 install -y --no-install-recommends \
    "${need[@]}" >/dev/null
}

# The console's browser test (api/tests/it/console.rs): Playwright's
# driver and axe-core from npm, as pinned in api/tests/console's lock file
# (playwright-core downloads no browser: the test drives Debian's chromium).
ensure_console_test_deps() {
  local dir="$CLINFLOW_ROOT/api/tests/console"
  if [ ! -f "$dir/node_modules/.package-lock.json" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    say "npm ci in api/tests/console (playwright-core, axe-core)"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
}

source "$CLINFLOW_ROOT/dev/tls.sh"

# One Ed25519 audit signing key per service in DIR (<service>.key, mode
# 600), made once, and its public key in DIR/public (<service>.pem).
ensure_audit_keys() {
  local dir=$1 service
  mkdir -p "$dir/public"
  chmod 700 "$dir"
  for service in api worker audit-sink; do
    if [ ! -s "$dir/$service.key" ]; then
      (umask 077; openssl genpkey -algorithm ed25519 -out "$dir/$service.key")
    fi
    openssl pkey -in "$dir/$service.key" -pubout -out "$dir/public/$service.pem"
  done
}
