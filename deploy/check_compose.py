#!/usr/bin/env python3
"""Checks docker-compose.yml, the Dockerfiles and .dockerignore against the
deployment's invariants, and proves each check can fail.

    python3 deploy/check_compose.py        # run from anywhere; exit 0 when all pass

Every invariant is a function `check_*(doc, text)` returning problems (empty
when it holds). The self-tests then break a copy of the real file in one way
per invariant and expect that check, and only what it guards, to complain.
Needs PyYAML (python3-yaml, a dependency of Debian's docker-compose) and, for
the `docker-compose config` tests, docker-compose itself (.ci/run installs it).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"

# The only published ports: service -> container port.
PUBLISHED = {"api": 8080, "grafana": 3000, "rabbitmq": 15672}
# The passwords the infrastructure containers (PostgreSQL, RabbitMQ, the
# db-roles and broker-users one-shots, Grafana) take from the environment:
# each must come from .env as ${NAME:?message}. (docs/operations.md lists
# them; scripts/compose-env writes them.) No clinflow service is given any.
SECRETS = {
    "POSTGRES_PASSWORD", "CLINFLOW_API_DB_PASSWORD", "CLINFLOW_WORKER_DB_PASSWORD",
    "CLINFLOW_SINK_DB_PASSWORD", "CLINFLOW_AUDIT_READER_DB_PASSWORD", "RABBITMQ_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD", "CLINFLOW_API_AMQP_PASSWORD", "CLINFLOW_WORKER_AMQP_PASSWORD",
    "CLINFLOW_SINK_AMQP_PASSWORD", "CLINFLOW_OPS_AMQP_PASSWORD",
}
# What a clinflow service reads that is secret (a URL carries its password):
# each arrives as NAME_FILE=/run/secrets/<a compose secret it mounts>, never
# as a value in the environment, which `docker inspect` shows.
CLINFLOW_SECRET_VARS = {
    "DATABASE_URL", "AUDIT_READER_DATABASE_URL", "MIGRATION_DATABASE_URL", "AMQP_URL",
    "CLINFLOW_MASTER_KEY", "JWT_SECRET", "CLINFLOW_INDEX_KEY", "AUDIT_SIGNING_KEY", "AUDIT_HMAC_KEY",
    "ERASURE_JOURNAL_KEY",
}
# Who may mount each compose secret (each service only what it uses):
# scripts/compose-env writes the first ones, scripts/compose-certs the TLS keys.
SECRET_HOLDERS = {
    "master_key": {"api", "worker"},
    "jwt_secret": {"api"},
    "index_key": {"api"},
    "erasure_journal_key": {"api"},
    "owner_database_url": {"migrate"},
    "api_database_url": {"api"},
    "worker_database_url": {"worker"},
    "sink_database_url": {"audit-sink"},
    "audit_reader_database_url": {"api", "audit-sink"},
    "admin_amqp_url": {"broker-setup"},
    "api_amqp_url": {"api"},
    "worker_amqp_url": {"worker"},
    "sink_amqp_url": {"audit-sink"},
    "audit_key_api": {"api"},
    "audit_key_worker": {"worker"},
    "audit_key_sink": {"audit-sink"},
    "postgres_tls_key": {"postgres"},
    "rabbitmq_tls_key": {"rabbitmq"},
    "medcat_tls_key": {"medcat"},
    "api_tls_key": {"api"},
}
# The broker user in each AMQP URL secret (scripts/broker-users' names).
AMQP_URL_USERS = {"admin_amqp_url": "clinflow", "api_amqp_url": "clinflow-api",
                  "worker_amqp_url": "clinflow-worker", "sink_amqp_url": "clinflow-audit-sink"}
# The deployment CA and the servers' certificates (scripts/compose-certs),
# mounted read-only where a client verifies a server.
TLS_MOUNT = "./secrets/tls/public:/etc/clinflow/tls:ro"
CA_FILE = "/etc/clinflow/tls/ca.pem"
# A name that looks like it holds a secret (environment keys and ${VARS}).
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|(^|_)KEY$|_KEY_|PASS$")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?msg}, ${NAME?msg}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)((?::?[-?])[^}]*)?\}")
REQUIRED_ONLY = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}$")
URL_PASSWORD = re.compile(r"://[^/:@\s]+:([^@\s]*)@")

# Which crate's sources hold the variables each clinflow binary reads (with
# the shared crate), and what each command cannot start without.
BINARY_SOURCES = {
    "clinflow-api": ["api/src", "clinflow/src"],
    "clinflow-worker": ["worker/src", "clinflow/src"],
    "clinflow-audit-sink": ["audit-sink/src", "clinflow/src"],
}
REQUIRED_ENV = {
    ("clinflow-api",): {
        "DATABASE_URL", "AMQP_URL", "CLINFLOW_MASTER_KEY", "JWT_SECRET", "CLINFLOW_INDEX_KEY", "AUDIT_SIGNING_KEY_FILE",
    },
    ("clinflow-api", "migrate"): {"MIGRATION_DATABASE_URL"},
    ("clinflow-api", "broker"): {"AMQP_URL"},
    ("clinflow-worker",): {"DATABASE_URL", "AMQP_URL", "MEDCAT_URL", "CLINFLOW_MASTER_KEY", "AUDIT_SIGNING_KEY_FILE"},
    ("clinflow-audit-sink",): {"DATABASE_URL", "AMQP_URL", "AUDIT_SIGNING_KEY_FILE", "AUDIT_PUBLIC_KEYS"},
}
# Read by the tracing set-up (tracing-subscriber's EnvFilter reads RUST_LOG).
ALWAYS_READ = {"RUST_LOG", "LOG_FORMAT"}


# ------------------------------------------------------------------ helpers

def load(text: str) -> dict:
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise ValueError("docker-compose.yml: no services")
    return doc


def services(doc: dict) -> dict:
    return doc["services"]


def environment(svc: dict) -> dict:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # ["A=b", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def depends_on(svc: dict) -> dict:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):  # the short form has no condition
        return {name: {} for name in deps}
    return deps


def mounted_secrets(svc: dict) -> set:
    return {m if isinstance(m, str) else m.get("source") for m in svc.get("secrets") or []}


def is_clinflow(svc: dict) -> bool:
    cmd = command(svc)
    return bool(cmd) and cmd[0] in BINARY_SOURCES


def one_shots(doc: dict) -> set:
    """Services others wait for with service_completed_successfully."""
    return {
        name
        for svc in services(doc).values()
        for name, spec in depends_on(svc).items()
        if (spec or {}).get("condition") == "service_completed_successfully"
    }


def command(svc: dict) -> list:
    cmd = svc.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def port_specs(svc: dict) -> list:
    """(host part, container port) of each published port."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            out.append((str(p.get("host_ip", "")) + ":" + str(p.get("published", "")), int(p["target"])))
            continue
        spec = str(p).split("/")[0]
        # Split on the last colon outside ${...}: host part, container port.
        host, _, container = spec.rpartition(":")
        out.append((host, int(container)))
    return out


def final_stage_user(dockerfile: Path) -> str | None:
    """The USER in force at the end of the last stage, or None."""
    user = None
    for line in dockerfile.read_text().splitlines():
        words = line.strip().split()
        if not words:
            continue
        if words[0].upper() == "FROM":
            user = None
        elif words[0].upper() == "USER" and len(words) > 1:
            user = words[1]
    return user


def is_root(user: str | None) -> bool:
    return user is None or user.split(":")[0] in ("", "0", "root")


# ------------------------------------------------------------------ checks

def check_healthchecks(doc: dict, text: str) -> list:
    shots = one_shots(doc)
    problems = []
    for name, svc in services(doc).items():
        hc = svc.get("healthcheck")
        if name in shots:
            if str(svc.get("restart", "no")) != "no":
                problems.append(f"{name}: a one-shot must not restart (restart: \"no\")")
            continue
        if not hc or hc.get("disable") or not hc.get("test") or hc.get("test") in (["NONE"], "NONE"):
            problems.append(f"{name}: no health check")
    return problems


def check_depends_on(doc: dict, text: str) -> list:
    svcs = services(doc)
    shots = one_shots(doc)
    problems = []
    for name, svc in svcs.items():
        for dep, spec in depends_on(svc).items():
            cond = (spec or {}).get("condition")
            if dep not in svcs:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif dep in shots:
                if cond != "service_completed_successfully":
                    problems.append(f"{name}: must wait for the one-shot {dep} with service_completed_successfully")
            elif cond != "service_healthy":
                problems.append(f"{name}: must wait for {dep} with condition service_healthy (has {cond})")
        # Whoever talks to a service by its name waits until it is healthy.
        env = " ".join(environment(svc).values())
        # A URL in a secret file names its server by the secret's name.
        env += " " + " ".join(
            "postgres:" if s.endswith("_database_url") else "rabbitmq:" if s.endswith("_amqp_url") else ""
            for s in mounted_secrets(svc))
        for target in ("postgres", "rabbitmq", "medcat"):
            if target != name and re.search(rf"(@|//|^|\s){target}:", env):
                if (depends_on(svc).get(target) or {}).get("condition") != "service_healthy":
                    problems.append(f"{name}: uses {target} but does not wait for it to be healthy")
    return problems


def check_no_hardcoded_secrets(doc: dict, text: str) -> list:
    """No secret is written in the file; a clinflow service gets every
    secret it reads as a mounted compose secret (NAME_FILE), never as an
    environment value; the infrastructure's passwords are ${VAR:?message}."""
    problems = []
    for name, svc in services(doc).items():
        mounted = mounted_secrets(svc)
        clinflow = is_clinflow(svc)
        for key, value in environment(svc).items():
            # A path under /run/secrets (NAME_FILE, or a key file such as
            # API_TLS_KEY) names a compose secret this service mounts: the
            # secret never enters the environment.
            if value.startswith("/run/secrets/"):
                if value.removeprefix("/run/secrets/") not in mounted:
                    problems.append(f"{name}: {key} names a secret the service does not mount")
                continue
            base = key.removesuffix("_FILE")
            if clinflow and (base in CLINFLOW_SECRET_VARS or SECRET_NAME.search(base)):
                problems.append(f"{name}: {key} is a secret: give it as {base}_FILE=/run/secrets/NAME, "
                                "a compose secret the service mounts")
                continue
            if clinflow and (URL_PASSWORD.search(value) or INTERPOLATION.search(value) and any(
                    v in SECRETS or SECRET_NAME.search(v) for v, _ in INTERPOLATION.findall(value))):
                problems.append(f"{name}: {key} carries a secret in the environment: use a compose secret")
                continue
            if SECRET_NAME.search(key) and not REQUIRED_ONLY.match(value):
                problems.append(f"{name}: {key} must be exactly ${{VAR:?message}}, not a value written here")
            for password in URL_PASSWORD.findall(value):
                if not REQUIRED_ONLY.match(password):
                    problems.append(f"{name}: {key} has a password in its URL that is not ${{VAR:?message}}")
    return problems


def check_secret_interpolations(doc: dict, text: str) -> list:
    """Every ${VAR} that is a secret is required (:?), never defaulted; and
    every secret of the stack is asked for."""
    problems = []
    seen = set()
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for m in INTERPOLATION.finditer(line):
            var, modifier = m.group(1), m.group(2) or ""
            if var in SECRETS or SECRET_NAME.search(var):
                seen.add(var)
                if not modifier.startswith(":?") or len(modifier) < 4:
                    problems.append(f"line {line_no}: ${{{var}}} is a secret: use ${{{var}:?message}}")
    for var in sorted(SECRETS - seen):
        problems.append(f"secret {var} is never asked for")
    return problems


def check_published_ports(doc: dict, text: str) -> list:
    problems = []
    for name, svc in services(doc).items():
        if svc.get("network_mode"):
            problems.append(f"{name}: network_mode {svc['network_mode']!r} bypasses the private network")
        for host, container in port_specs(svc):
            if PUBLISHED.get(name) != container:
                problems.append(f"{name}: publishes container port {container}; only {PUBLISHED} may be published")
            if not host or ":" not in host:
                problems.append(f"{name}: port {container} must name its host address (e.g. ${{CLINFLOW_PUBLISH_ADDR:-127.0.0.1}})")
    return problems


def check_non_root(doc: dict, text: str) -> list:
    problems = []
    for name, svc in services(doc).items():
        user = svc.get("user")
        if is_root(None if user is None else str(user)):
            problems.append(f"{name}: runs as root (set a non-root user:)")
        if svc.get("privileged"):
            problems.append(f"{name}: privileged")
        build = svc.get("build")
        if build:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = ROOT / context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: {os.path.relpath(dockerfile, ROOT)} not found")
            elif is_root(final_stage_user(dockerfile)):
                problems.append(f"{name}: {os.path.relpath(dockerfile, ROOT)} ends as root (no non-root USER)")
            elif user is not None and str(user) != final_stage_user(dockerfile):
                problems.append(f"{name}: user {user} differs from the image's USER {final_stage_user(dockerfile)}")
    return problems


def check_read_only(doc: dict, text: str) -> list:
    problems = []
    for name, svc in services(doc).items():
        if svc.get("read_only") is not True:
            problems.append(f"{name}: root filesystem not read_only")
        if "no-new-privileges:true" not in (svc.get("security_opt") or []):
            problems.append(f"{name}: no-new-privileges not set")
        if "ALL" not in (svc.get("cap_drop") or []):
            problems.append(f"{name}: capabilities not dropped (cap_drop: [ALL])")
    return problems


def check_private_network(doc: dict, text: str) -> list:
    problems = []
    nets = doc.get("networks") or {}
    if not (nets.get("backend") or {}).get("internal"):
        problems.append("network backend missing or not internal: true")
    for name, svc in services(doc).items():
        attached = svc.get("networks") or []
        attached = list(attached) if isinstance(attached, (list, dict)) else []
        if "backend" not in attached:
            problems.append(f"{name}: not on the private network backend")
        others = [n for n in attached if n != "backend"]
        if others and not svc.get("ports"):
            problems.append(f"{name}: on {others} but publishes nothing: backend only")
    return problems


def check_worker_scales(doc: dict, text: str) -> list:
    svc = services(doc).get("worker")
    if svc is None:
        return ["no worker service"]
    problems = []
    for name, s in services(doc).items():
        if "container_name" in s:
            problems.append(f"{name}: container_name prevents --scale and parallel stacks")
    if svc.get("ports"):
        problems.append("worker: a host port prevents --scale worker=N")
    if svc.get("hostname"):
        problems.append("worker: a fixed hostname makes replicas indistinguishable")
    return problems


def _crate_names(binary: str) -> set:
    names = set(ALWAYS_READ)
    for rel in BINARY_SOURCES[binary]:
        for path in (ROOT / rel).rglob("*.rs"):
            names |= set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', path.read_text()))
    # clinflow::config reads any variable from the file NAME_FILE names too.
    return names | {f"{n}_FILE" for n in names}


def check_env_names(doc: dict, text: str) -> list:
    """Every variable given to a clinflow binary is one it reads, and each
    command gets what it cannot start without."""
    problems = []
    read_cache: dict = {}
    for name, svc in services(doc).items():
        cmd = command(svc)
        if not cmd or cmd[0] not in BINARY_SOURCES:
            continue
        read = read_cache.setdefault(cmd[0], _crate_names(cmd[0]))
        env = environment(svc)
        for key in env:
            if key not in read:
                problems.append(f"{name}: {cmd[0]} never reads {key}")
        key = tuple(cmd[:2]) if tuple(cmd[:2]) in REQUIRED_ENV else tuple(cmd[:1])
        for needed in sorted(REQUIRED_ENV.get(key, set())):
            if needed not in env and f"{needed}_FILE" not in env:
                problems.append(f"{name}: {' '.join(cmd)} needs {needed}")
    return problems


def check_metrics_ports(doc: dict, text: str) -> list:
    """Each clinflow service serves metrics on every container address (so
    Prometheus on backend reaches it) and exposes the port, never publishes it."""
    problems = []
    for name, svc in services(doc).items():
        cmd = command(svc)
        if cmd[:1] not in (["clinflow-api"], ["clinflow-worker"], ["clinflow-audit-sink"]) or cmd[1:2] in (["migrate"], ["broker"]):
            continue
        addr = environment(svc).get("METRICS_ADDR", "")
        if not addr.startswith("0.0.0.0:"):
            problems.append(f"{name}: METRICS_ADDR must listen on 0.0.0.0 inside the container (has {addr!r})")
            continue
        port = addr.rsplit(":", 1)[1]
        if port not in [str(p) for p in svc.get("expose") or []]:
            problems.append(f"{name}: metrics port {port} not exposed on the private network")
        if int(port) in [c for _, c in port_specs(svc)]:
            problems.append(f"{name}: metrics port {port} is published")
    return problems


# Each clinflow service's broker user (scripts/broker-users).
BROKER_USERS = {"clinflow-api": "clinflow-api", "clinflow-worker": "clinflow-worker",
                "clinflow-audit-sink": "clinflow-audit-sink"}
URL_USER = re.compile(r"^amqps?://([^:@/]+)[:@]")


def check_broker_users(doc: dict, text: str) -> list:
    """Each service logs in to RabbitMQ as its own user (least privilege);
    the administrator (the management UI's user) only declares the topology
    (`clinflow-api broker setup`). The URL is a secret file: its user is
    the one AMQP_URL_USERS names for that secret (RealFile checks what
    scripts/compose-env writes into it)."""
    problems = []
    admin = environment(services(doc).get("rabbitmq", {})).get("RABBITMQ_DEFAULT_USER")
    for name, svc in services(doc).items():
        cmd = command(svc)
        env = environment(svc)
        if not cmd or cmd[0] not in BROKER_USERS:
            continue
        if "AMQP_URL" in env:
            m = URL_USER.match(env["AMQP_URL"])
            user = m.group(1) if m else None
        elif "AMQP_URL_FILE" in env:
            user = AMQP_URL_USERS.get(env["AMQP_URL_FILE"].removeprefix("/run/secrets/"))
        else:
            continue
        if cmd[1:2] == ["broker"]:
            continue
        if user == admin or user != BROKER_USERS[cmd[0]]:
            problems.append(f"{name}: AMQP_URL must log in as {BROKER_USERS[cmd[0]]}, not {user}")
    return problems


def check_secret_holders(doc: dict, text: str) -> list:
    """Each service mounts only the secrets it uses, and only those
    SECRET_HOLDERS lets it hold; every secret is a file under ./secrets/."""
    problems = []
    declared = doc.get("secrets") or {}
    for secret, spec in declared.items():
        if secret not in SECRET_HOLDERS:
            problems.append(f"secret {secret}: not in SECRET_HOLDERS (say which services may hold it)")
        if not str((spec or {}).get("file", "")).startswith("./secrets/"):
            problems.append(f"secret {secret}: must be a file under ./secrets/ (kept out of git)")
    for name, svc in services(doc).items():
        used = " ".join(environment(svc).values()) + " " + " ".join(command(svc))
        used += " ".join(_mounted_file_text(svc))
        for secret in sorted(mounted_secrets(svc)):
            if secret not in declared:
                problems.append(f"{name}: mounts secret {secret}, which is not declared")
            if name not in SECRET_HOLDERS.get(secret, set()):
                problems.append(f"{name}: may not hold secret {secret} (SECRET_HOLDERS)")
            if f"/run/secrets/{secret}" not in used:
                problems.append(f"{name}: mounts secret {secret} but never uses it: give each service only its own")
    return problems


def _mounted_file_text(svc: dict) -> list:
    """The text of the repository's files bind-mounted into a service (a
    configuration file may name a secret's path)."""
    out = []
    for v in svc.get("volumes") or []:
        source = str(v).split(":", 1)[0] if isinstance(v, str) else str(v.get("source", ""))
        path = ROOT / source
        if source.startswith("./") and path.is_file() and not source.startswith("./secrets/"):
            out.append(path.read_text())
    return out


PG_TLS = ("ssl=on", "ssl_cert_file=/etc/clinflow/tls/postgres.pem", "ssl_key_file=/run/secrets/postgres_tls_key")


def check_tls_hops(doc: dict, text: str) -> list:
    """Every hop is TLS with the server verified against the deployment CA:
    PostgreSQL with ssl=on and TLS-only client authentication, RabbitMQ's
    TLS listener alone, MedCAT and the api over HTTPS, every URL in the file
    TLS-verified, no CLINFLOW_ALLOW_PLAINTEXT; the clients mount the CA."""
    problems = []
    svcs = services(doc)
    for name, svc in svcs.items():
        env = environment(svc)
        if "CLINFLOW_ALLOW_PLAINTEXT" in env:
            problems.append(f"{name}: CLINFLOW_ALLOW_PLAINTEXT: every compose hop is TLS")
        for key, value in env.items():
            if value.startswith(("http://", "amqp://")) or (
                    value.startswith(("postgres://", "postgresql://")) and "sslmode=verify-full" not in value):
                problems.append(f"{name}: {key} is not a TLS-verified URL")
        uses_ca = any(CA_FILE in v for v in list(env.values()) + command(svc) + _hc(svc))
        if (is_clinflow(svc) or uses_ca) and TLS_MOUNT not in [str(v) for v in svc.get("volumes") or []]:
            problems.append(f"{name}: the CA is not mounted ({TLS_MOUNT})")
    pg = svcs.get("postgres", {})
    for setting in PG_TLS + ("hba_file=/etc/clinflow/postgres/pg_hba.conf",):
        if setting not in command(pg):
            problems.append(f"postgres: command lacks -c {setting}")
    hba = ROOT / "deploy/postgres/pg_hba.conf"
    rules = [line.split() for line in (hba.read_text().splitlines() if hba.is_file() else [])
             if line.strip() and not line.lstrip().startswith("#")]
    if any(r[0] == "host" for r in rules) or ["hostnossl", "all", "all", "all", "reject"] not in rules:
        problems.append("postgres: deploy/postgres/pg_hba.conf must allow TCP only as hostssl (hostnossl … reject)")
    rabbit = svcs.get("rabbitmq", {})
    conf = "\n".join(_mounted_file_text(rabbit))
    for line in ("listeners.tcp = none", "listeners.ssl.default = 5671",
                 "ssl_options.keyfile = /run/secrets/rabbitmq_tls_key"):
        if line not in conf:
            problems.append(f"rabbitmq: no mounted conf.d file sets `{line}`")
    if "5672" in [str(p) for p in rabbit.get("expose") or []]:
        problems.append("rabbitmq: exposes plain AMQP (5672)")
    medcat = environment(svcs.get("medcat", {}))
    if not medcat.get("SERVER_TLS_CERT") or not medcat.get("SERVER_TLS_KEY"):
        problems.append("medcat: no SERVER_TLS_CERT/SERVER_TLS_KEY (HTTPS)")
    for name, svc in svcs.items():
        if command(svc)[:1] == ["clinflow-worker"]:
            env = environment(svc)
            if not env.get("MEDCAT_URL", "").startswith("https://") or env.get("MEDCAT_CA_FILE") != CA_FILE:
                problems.append(f"{name}: MEDCAT_URL must be https:// with MEDCAT_CA_FILE={CA_FILE}")
        if command(svc) == ["clinflow-api"]:
            env = environment(svc)
            if not env.get("API_TLS_CERT") or not env.get("API_TLS_KEY"):
                problems.append(f"{name}: the api serves HTTPS itself (API_TLS_CERT, API_TLS_KEY)")
            hc = _hc(svc)
            if not any(h.startswith("https://") for h in hc) or "--cacert" not in hc:
                problems.append(f"{name}: the health check must use https:// with --cacert")
    for name in ("medcat",):
        if not any("https://" in h and CA_FILE in h for h in _hc(svcs.get(name, {}))):
            problems.append(f"{name}: the health check must use https:// verified against {CA_FILE}")
    return problems


def _hc(svc: dict) -> list:
    test = (svc.get("healthcheck") or {}).get("test") or []
    return test.split() if isinstance(test, str) else [str(t) for t in test]


CHECKS = [
    check_healthchecks, check_depends_on, check_no_hardcoded_secrets, check_secret_interpolations,
    check_published_ports, check_non_root, check_read_only, check_private_network,
    check_worker_scales, check_env_names, check_metrics_ports, check_broker_users,
    check_secret_holders, check_tls_hops,
]


def run_checks(doc: dict, text: str) -> dict:
    return {c.__name__: c(doc, text) for c in CHECKS}


# ------------------------------------------------------------------ build contexts

def context_files(context: Path) -> set:
    """The files `docker build` sends for `context`, by docker's own
    .dockerignore rules (docker-py, which docker-compose uses)."""
    from docker.utils.build import exclude_paths

    ignore = context / ".dockerignore"
    patterns = [
        line.strip() for line in (ignore.read_text().splitlines() if ignore.is_file() else [])
        if line.strip() and not line.strip().startswith("#")
    ]
    return {p.replace(os.sep, "/") for p in exclude_paths(str(context), patterns)}


# ------------------------------------------------------------------ self-tests

def dummy_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env.update({name: f"dummy-{name.lower()}" for name in SECRETS})
    return env


class RealFile(unittest.TestCase):
    def setUp(self):
        self.text = COMPOSE.read_text()
        self.doc = load(self.text)

    def test_every_invariant_holds(self):
        failed = {k: v for k, v in run_checks(self.doc, self.text).items() if v}
        self.assertEqual(failed, {}, "\n".join(p for ps in failed.values() for p in ps))

    def test_expected_services(self):
        self.assertTrue({"postgres", "rabbitmq", "medcat", "migrate", "db-roles", "api", "worker",
                         "audit-sink", "prometheus", "grafana"} <= set(services(self.doc)))
        self.assertEqual(one_shots(self.doc), {"migrate", "db-roles", "broker-users", "broker-setup"})

    def test_docker_compose_accepts_it(self):
        exe = shutil.which("docker-compose")
        self.assertIsNotNone(exe, "docker-compose is not installed (.ci/run installs the Debian package)")
        ok = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], env=dummy_env(),
                            capture_output=True, text=True)
        self.assertEqual(ok.returncode, 0, ok.stderr)
        # Resolved with the dummy values: scaling the worker is accepted too.
        scaled = subprocess.run([exe, "-f", str(COMPOSE), "config", "--services"], env=dummy_env(),
                                capture_output=True, text=True)
        self.assertIn("worker", scaled.stdout.split())

    def test_a_missing_secret_stops_docker_compose_with_its_message(self):
        exe = shutil.which("docker-compose")
        self.assertIsNotNone(exe, "docker-compose is not installed")
        for name in sorted(SECRETS):
            env = dummy_env()
            del env[name]
            out = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], env=env,
                                 capture_output=True, text=True)
            self.assertNotEqual(out.returncode, 0, f"config passed without {name}")
            self.assertIn(f"set {name}", out.stderr, f"the message for a missing {name}")

    def test_the_scripts_write_every_secret_and_certificate_compose_mounts(self):
        """scripts/compose-env and scripts/compose-certs, run in a scratch
        copy: each secret file the compose file names, mode 600 (owned by
        its holders' uid when run as root), URLs TLS-verified with the right
        users, certificates signed by the CA for their service names."""
        self.assertIsNotNone(shutil.which("openssl"), "openssl is needed")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shutil.copytree(ROOT / "scripts", tmp / "scripts")
            for script in ("compose-env", "compose-certs"):
                ran = subprocess.run([str(tmp / "scripts" / script)], capture_output=True, text=True)
                self.assertEqual(ran.returncode, 0, ran.stderr)
                again = subprocess.run([str(tmp / "scripts" / script)], capture_output=True, text=True)
                self.assertEqual(again.returncode, 1, f"{script} overwrote its files")
                self.assertIn("not overwriting", again.stderr)
            env = dict(line.split("=", 1) for line in (tmp / ".env").read_text().splitlines()
                       if line and not line.startswith("#"))
            self.assertEqual(set(env), SECRETS)
            svcs = services(self.doc)
            for secret, spec in self.doc["secrets"].items():
                path = tmp / spec["file"]
                self.assertTrue(path.is_file(), f"{secret}: {spec['file']} not written")
                self.assertEqual(path.stat().st_mode & 0o777, 0o600, secret)
                uids = {str(svcs[h]["user"]).split(":")[0] for h in SECRET_HOLDERS[secret]}
                self.assertEqual(len(uids), 1, f"{secret}: its holders run as different uids {uids}")
                if os.geteuid() == 0:
                    self.assertEqual(str(path.stat().st_uid), uids.pop(), f"{secret}: owner")
                value = path.read_text()
                if secret.endswith("_database_url"):
                    self.assertRegex(value, r"^postgres://clinflow_[a-z_]+:[0-9a-f]{64}@postgres:5432/clinflow"
                                            rf"\?sslmode=verify-full&sslrootcert={CA_FILE}$")
                elif secret.endswith("_amqp_url"):
                    self.assertRegex(value, rf"^amqps://{AMQP_URL_USERS[secret]}:[0-9a-f]{{64}}@rabbitmq:5671/%2f"
                                            rf"\?cacertfile={CA_FILE}$")
            # Directories mounted from secrets/ are read by the containers' uids.
            for svc in svcs.values():
                for v in svc.get("volumes") or []:
                    source = str(v).split(":", 1)[0]
                    if source.startswith("./secrets/"):
                        mode = (tmp / source).stat().st_mode
                        self.assertEqual(mode & 0o005, 0o005, f"{source} is not readable by the containers")
            public = tmp / "secrets/tls/public"
            for used in set(re.findall(r"/etc/clinflow/tls/([a-z.]+)", self.text)):
                self.assertTrue((public / used).is_file(), f"/etc/clinflow/tls/{used} not written")
            for server in ("postgres", "rabbitmq", "medcat", "api"):
                pem = str(public / f"{server}.pem")
                ok = subprocess.run(["openssl", "verify", "-CAfile", str(public / "ca.pem"), pem],
                                    capture_output=True, text=True)
                self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
                san = subprocess.run(["openssl", "x509", "-in", pem, "-noout", "-ext", "subjectAltName"],
                                     capture_output=True, text=True).stdout
                names = set(re.findall(r"(?:DNS|IP Address):([^,\s]+)", san))
                self.assertEqual(names, {server} | ({"localhost", "127.0.0.1"} if server == "api" else set()))

    def test_app_context_holds_the_build_inputs_and_nothing_local(self):
        # What compose-env and compose-certs write must never reach an image.
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(ROOT / ".dockerignore", tmp)
            for f in ("Cargo.toml", "secrets/clinflow/master_key", "secrets/tls/ca.key", ".env"):
                Path(tmp, f).parent.mkdir(parents=True, exist_ok=True)
                Path(tmp, f).write_text("x")
            sent = context_files(Path(tmp))
            self.assertIn("Cargo.toml", sent)
            self.assertEqual([f for f in sent if f.startswith("secrets") or f == ".env"], [])
        files = context_files(ROOT)
        for needed in ["Cargo.toml", "Cargo.lock", ".cargo/config.toml", "clinflow/src/lib.rs",
                       "api/src/main.rs", "worker/src/main.rs", "audit-sink/src/main.rs",
                       "ingest/src/main.rs", "bench/Cargo.toml"]:
            self.assertIn(needed, files)
        self.assertTrue(any(f.startswith(".sqlx/") for f in files), "the offline query data .sqlx/")
        self.assertTrue(any(f.startswith("migrations/") for f in files), "migrations/ (sqlx::migrate!)")
        for f in files:
            self.assertFalse(f.startswith((".git/", "target/", ".dev/", "bench/results/", "dev/", "secrets/")), f)
            self.assertFalse(f == ".env" or f.endswith((".dump.age", ".pyc")), f)

    def test_the_image_holds_every_service_binary_and_builds_offline(self):
        dockerfile = (ROOT / "Dockerfile").read_text()
        built = set(re.findall(r"--bin (clinflow-[a-z-]+)", dockerfile))
        copied = set(re.findall(r"target/release/(clinflow-[a-z-]+)", dockerfile))
        wanted = {"clinflow-api", "clinflow-worker", "clinflow-audit-sink", "clinflow-ingest"}
        self.assertEqual(built, wanted)
        self.assertEqual(copied, wanted)
        declared = set()
        for manifest in ROOT.glob("*/Cargo.toml"):
            declared |= set(re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', manifest.read_text()))
        self.assertTrue(wanted <= declared, f"binaries the workspace declares: {declared}")
        # Every command compose runs is one of them.
        for name, svc in services(load(COMPOSE.read_text())).items():
            if svc.get("build", {}).get("context") == ".":
                self.assertIn(command(svc)[0], wanted, name)
        self.assertIn("SQLX_OFFLINE=true", dockerfile)
        # cargo auditable: each binary carries its dependency list (docs/security.md).
        self.assertIn("cargo auditable build --release --locked", dockerfile)
        self.assertIn("cargo chef cook --release", dockerfile)

    def test_medcat_context_holds_its_sources_and_not_the_venv(self):
        context = ROOT / "dev/medcat"
        files = context_files(context)
        dockerfile = (context / "Dockerfile").read_text()
        copied = {w for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from" not in line
                  for w in line.split()[1:-1]}
        self.assertTrue(copied, "dev/medcat/Dockerfile copies its sources")
        for name in copied:
            self.assertIn(name, files)
        for f in files:
            self.assertFalse(f.startswith((".venv/", "model/")) or f.endswith(".pyc"), f)


class EachCheckCanFail(unittest.TestCase):
    """One break per invariant, on a copy of the real document."""

    def setUp(self):
        self.text = COMPOSE.read_text()
        self.doc = load(self.text)

    def broken(self, mutate=None, text=None):
        doc = copy.deepcopy(self.doc)
        if mutate:
            mutate(services(doc), doc)
        return run_checks(doc, self.text if text is None else text)

    def assertReports(self, results, check, fragment):
        self.assertTrue(any(fragment in p for p in results[check.__name__]),
                        f"{check.__name__} missed it: {results[check.__name__]}")

    def test_service_as_the_broker_administrator(self):
        def mutate(s, d):
            s["audit-sink"]["environment"]["AMQP_URL_FILE"] = "/run/secrets/admin_amqp_url"
            s["audit-sink"]["secrets"].append("admin_amqp_url")
        r = self.broken(mutate)
        self.assertReports(r, check_broker_users, "audit-sink: AMQP_URL must log in as clinflow-audit-sink, not clinflow")
        self.assertReports(r, check_secret_holders, "audit-sink: may not hold secret admin_amqp_url")
        r = self.broken(lambda s, d: s["worker"]["environment"].update(AMQP_URL_FILE="/run/secrets/api_amqp_url"))
        self.assertReports(r, check_broker_users, "worker: AMQP_URL must log in as clinflow-worker, not clinflow-api")

    def test_a_secret_the_service_does_not_use_or_may_not_hold(self):
        r = self.broken(lambda s, d: s["worker"]["secrets"].append("jwt_secret"))
        self.assertReports(r, check_secret_holders, "worker: may not hold secret jwt_secret")
        self.assertReports(r, check_secret_holders, "worker: mounts secret jwt_secret but never uses it")
        r = self.broken(lambda s, d: s["audit-sink"]["secrets"].remove("audit_reader_database_url"))
        self.assertReports(r, check_no_hardcoded_secrets,
                           "audit-sink: AUDIT_READER_DATABASE_URL_FILE names a secret the service does not mount")
        r = self.broken(lambda s, d: d["secrets"].update(extra_key={"file": "./extra.key"}))
        self.assertReports(r, check_secret_holders, "secret extra_key: not in SECRET_HOLDERS")
        self.assertReports(r, check_secret_holders, "secret extra_key: must be a file under ./secrets/")
        r = self.broken(lambda s, d: s["postgres"]["secrets"].append("undeclared"))
        self.assertReports(r, check_secret_holders, "postgres: mounts secret undeclared, which is not declared")

    def test_a_plaintext_hop(self):
        r = self.broken(lambda s, d: s["worker"]["environment"].update(CLINFLOW_ALLOW_PLAINTEXT="1"))
        self.assertReports(r, check_tls_hops, "worker: CLINFLOW_ALLOW_PLAINTEXT")
        r = self.broken(lambda s, d: s["worker"]["environment"].update(MEDCAT_URL="http://medcat:5000"))
        self.assertReports(r, check_tls_hops, "worker: MEDCAT_URL is not a TLS-verified URL")
        self.assertReports(r, check_tls_hops, "worker: MEDCAT_URL must be https://")
        r = self.broken(lambda s, d: s["worker"]["environment"].pop("MEDCAT_CA_FILE"))
        self.assertReports(r, check_tls_hops, "worker: MEDCAT_URL must be https:// with MEDCAT_CA_FILE")
        r = self.broken(lambda s, d: s["migrate"]["environment"].update(
            MIGRATION_DATABASE_URL="postgres://clinflow_owner@postgres:5432/clinflow?sslmode=require"))
        self.assertReports(r, check_tls_hops, "migrate: MIGRATION_DATABASE_URL is not a TLS-verified URL")
        r = self.broken(lambda s, d: s["audit-sink"].update(volumes=s["audit-sink"]["volumes"][:-1]))
        self.assertReports(r, check_tls_hops, "audit-sink: the CA is not mounted")
        r = self.broken(lambda s, d: s["db-roles"].update(volumes=s["db-roles"]["volumes"][:-1]))
        self.assertReports(r, check_tls_hops, "db-roles: the CA is not mounted")

    def test_a_server_without_tls(self):
        r = self.broken(lambda s, d: s["postgres"].update(command=["postgres"]))
        self.assertReports(r, check_tls_hops, "postgres: command lacks -c ssl=on")
        r = self.broken(lambda s, d: s["rabbitmq"].update(volumes=s["rabbitmq"]["volumes"][:2]))
        self.assertReports(r, check_tls_hops, "rabbitmq: no mounted conf.d file sets `listeners.tcp = none`")
        r = self.broken(lambda s, d: s["rabbitmq"]["expose"].append("5672"))
        self.assertReports(r, check_tls_hops, "rabbitmq: exposes plain AMQP (5672)")
        r = self.broken(lambda s, d: s["medcat"]["environment"].pop("SERVER_TLS_KEY"))
        self.assertReports(r, check_tls_hops, "medcat: no SERVER_TLS_CERT/SERVER_TLS_KEY")
        self.assertReports(r, check_secret_holders, "medcat: mounts secret medcat_tls_key but never uses it")
        r = self.broken(lambda s, d: s["medcat"]["healthcheck"].update(test=["CMD", "true"]))
        self.assertReports(r, check_tls_hops, "medcat: the health check must use https://")
        r = self.broken(lambda s, d: s["api"]["environment"].pop("API_TLS_CERT"))
        self.assertReports(r, check_tls_hops, "api: the api serves HTTPS itself")
        r = self.broken(lambda s, d: s["api"]["healthcheck"].update(
            test=["CMD", "curl", "-fsS", "http://127.0.0.1:8080/readyz"]))
        self.assertReports(r, check_tls_hops, "api: the health check must use https:// with --cacert")

    def test_missing_health_check(self):
        r = self.broken(lambda s, d: s["api"].pop("healthcheck"))
        self.assertReports(r, check_healthchecks, "api: no health check")
        r = self.broken(lambda s, d: s["worker"].update(healthcheck={"disable": True}))
        self.assertReports(r, check_healthchecks, "worker: no health check")

    def test_one_shot_that_restarts(self):
        r = self.broken(lambda s, d: s["migrate"].update(restart="on-failure"))
        self.assertReports(r, check_healthchecks, "migrate: a one-shot must not restart")

    def test_depends_on_without_condition(self):
        r = self.broken(lambda s, d: s["api"].update(depends_on=["postgres", "rabbitmq", "db-roles"]))
        self.assertReports(r, check_depends_on, "api: must wait for postgres with condition service_healthy")
        r = self.broken(lambda s, d: s["worker"]["depends_on"]["medcat"].update(condition="service_started"))
        self.assertReports(r, check_depends_on, "worker: must wait for medcat")

    def test_one_shot_waited_for_as_healthy(self):
        def mutate(s, d):
            s["api"]["depends_on"]["db-roles"] = {"condition": "service_healthy"}
            s["migrate"]["depends_on"]["postgres"] = {"condition": "service_started"}
        r = self.broken(mutate)
        self.assertReports(r, check_depends_on, "migrate: must wait for postgres")

    def test_using_a_service_without_waiting_for_it(self):
        r = self.broken(lambda s, d: s["worker"]["depends_on"].pop("medcat"))
        self.assertReports(r, check_depends_on, "worker: uses medcat but does not wait")

    def test_hardcoded_secret_in_environment(self):
        r = self.broken(lambda s, d: s["grafana"]["environment"].update(GF_SECURITY_ADMIN_PASSWORD="hunter2hunter2"))
        self.assertReports(r, check_no_hardcoded_secrets, "grafana: GF_SECURITY_ADMIN_PASSWORD must be exactly")
        r = self.broken(lambda s, d: s["api"]["environment"].update(JWT_SECRET="a-real-secret-written-here-0123456789"))
        self.assertReports(r, check_no_hardcoded_secrets, "api: JWT_SECRET is a secret: give it as JWT_SECRET_FILE")

    def test_clinflow_secret_as_an_environment_value(self):
        # Even interpolated from .env, `docker inspect` would show it.
        r = self.broken(lambda s, d: s["worker"]["environment"].update(
            CLINFLOW_MASTER_KEY="${CLINFLOW_MASTER_KEY:?set CLINFLOW_MASTER_KEY}"))
        self.assertReports(r, check_no_hardcoded_secrets, "worker: CLINFLOW_MASTER_KEY is a secret")
        r = self.broken(lambda s, d: s["api"]["environment"].update(DATABASE_URL_FILE="/etc/clinflow/db-url"))
        self.assertReports(r, check_no_hardcoded_secrets, "api: DATABASE_URL_FILE is a secret")
        r = self.broken(lambda s, d: s["api"]["environment"].update(
            SOME_OPTION="amqps://x:${CLINFLOW_API_AMQP_PASSWORD:?set it}@rabbitmq:5671/%2f"))
        self.assertReports(r, check_no_hardcoded_secrets, "api: SOME_OPTION carries a secret in the environment")

    def test_hardcoded_password_in_a_url(self):
        r = self.broken(lambda s, d: s["db-roles"]["environment"].update(
            PGSERVICEURL="postgres://clinflow_worker:hunter2hunter2@postgres:5432/clinflow"))
        self.assertReports(r, check_no_hardcoded_secrets, "db-roles: PGSERVICEURL has a password in its URL")
        r = self.broken(lambda s, d: s["worker"]["environment"].update(
            DATABASE_URL="postgres://clinflow_worker:hunter2hunter2@postgres:5432/clinflow"))
        self.assertReports(r, check_no_hardcoded_secrets, "worker: DATABASE_URL is a secret")

    def test_secret_with_a_default(self):
        text = self.text.replace("${POSTGRES_PASSWORD:?", "${POSTGRES_PASSWORD:-changeme-", 1)
        self.assertNotEqual(text, self.text)
        r = self.broken(text=text)
        self.assertReports(r, check_secret_interpolations, "${POSTGRES_PASSWORD} is a secret")
        text = self.text.replace("${GRAFANA_ADMIN_PASSWORD:?set GRAFANA_ADMIN_PASSWORD (openssl rand -hex 24)}",
                                 "${GRAFANA_ADMIN_PASSWORD}")
        self.assertNotEqual(text, self.text)
        self.assertReports(self.broken(text=text), check_secret_interpolations, "${GRAFANA_ADMIN_PASSWORD} is a secret")

    def test_secret_never_asked_for(self):
        text = re.sub(r"\$\{CLINFLOW_OPS_AMQP_PASSWORD:\?[^}]*\}", "literal", self.text)
        self.assertReports(self.broken(text=text), check_secret_interpolations,
                           "secret CLINFLOW_OPS_AMQP_PASSWORD is never asked for")

    def test_published_database_port(self):
        r = self.broken(lambda s, d: s["postgres"].update(ports=["127.0.0.1:5432:5432"]))
        self.assertReports(r, check_published_ports, "postgres: publishes container port 5432")
        r = self.broken(lambda s, d: s["rabbitmq"]["ports"].append("127.0.0.1:5672:5672"))
        self.assertReports(r, check_published_ports, "rabbitmq: publishes container port 5672")

    def test_port_on_every_interface(self):
        r = self.broken(lambda s, d: s["api"].update(ports=["8080:8080"]))
        self.assertReports(r, check_published_ports, "api: port 8080 must name its host address")

    def test_host_network(self):
        r = self.broken(lambda s, d: s["worker"].update(network_mode="host"))
        self.assertReports(r, check_published_ports, "worker: network_mode")

    def test_root_user(self):
        r = self.broken(lambda s, d: s["postgres"].pop("user"))
        self.assertReports(r, check_non_root, "postgres: runs as root")
        r = self.broken(lambda s, d: s["api"].update(user="0:0"))
        self.assertReports(r, check_non_root, "api: runs as root")
        r = self.broken(lambda s, d: s["grafana"].update(privileged=True))
        self.assertReports(r, check_non_root, "grafana: privileged")

    def test_dockerfile_ending_as_root(self):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "Dockerfile").write_text("FROM debian AS a\nUSER 10001\nFROM debian\nCMD [\"x\"]\n")
            r = self.broken(lambda s, d: s["api"].update(build={"context": tmp}))
        self.assertReports(r, check_non_root, "ends as root")

    def test_writable_root_filesystem(self):
        r = self.broken(lambda s, d: s["rabbitmq"].update(read_only=False))
        self.assertReports(r, check_read_only, "rabbitmq: root filesystem not read_only")
        r = self.broken(lambda s, d: s["worker"].update(cap_drop=[]))
        self.assertReports(r, check_read_only, "worker: capabilities not dropped")

    def test_public_network(self):
        r = self.broken(lambda s, d: d["networks"]["backend"].pop("internal"))
        self.assertReports(r, check_private_network, "not internal")
        r = self.broken(lambda s, d: s["medcat"].update(networks=["backend", "edge"]))
        self.assertReports(r, check_private_network, "medcat: on ['edge'] but publishes nothing")
        r = self.broken(lambda s, d: s["audit-sink"].update(networks=["edge"]))
        self.assertReports(r, check_private_network, "audit-sink: not on the private network")

    def test_worker_that_cannot_scale(self):
        r = self.broken(lambda s, d: s["worker"].update(container_name="clinflow-worker"))
        self.assertReports(r, check_worker_scales, "worker: container_name")
        r = self.broken(lambda s, d: s["worker"].update(ports=["127.0.0.1:9102:9102"]))
        self.assertReports(r, check_worker_scales, "worker: a host port")

    def test_env_name_no_binary_reads(self):
        r = self.broken(lambda s, d: s["worker"]["environment"].update(WORKER_BATCHSIZE="50"))
        self.assertReports(r, check_env_names, "worker: clinflow-worker never reads WORKER_BATCHSIZE")
        r = self.broken(lambda s, d: s["api"].pop("secrets"))
        self.assertReports(r, check_no_hardcoded_secrets, "api: AUDIT_SIGNING_KEY_FILE names a secret the service does not mount")
        r = self.broken(lambda s, d: s["audit-sink"]["environment"].pop("AUDIT_PUBLIC_KEYS"))
        self.assertReports(r, check_env_names, "audit-sink: clinflow-audit-sink needs AUDIT_PUBLIC_KEYS")
        r = self.broken(lambda s, d: s["migrate"]["environment"].pop("MIGRATION_DATABASE_URL_FILE"))
        self.assertReports(r, check_env_names, "migrate: clinflow-api migrate needs MIGRATION_DATABASE_URL")

    def test_metrics_only_on_loopback_or_published(self):
        r = self.broken(lambda s, d: s["worker"]["environment"].update(METRICS_ADDR="127.0.0.1:9102"))
        self.assertReports(r, check_metrics_ports, "worker: METRICS_ADDR must listen on 0.0.0.0")
        r = self.broken(lambda s, d: s["audit-sink"].update(expose=[]))
        self.assertReports(r, check_metrics_ports, "audit-sink: metrics port 9103 not exposed")


def main() -> int:
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=1 if os.environ.get("CI") else 2, ).run(suite)
    failed = len(result.failures) + len(result.errors)
    print(f"compose: {result.testsRun - failed} passed, {failed} failed")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
