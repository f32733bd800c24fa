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
# Every secret the stack needs: each must come from the environment as
# ${NAME:?message}. (docs/operations.md lists them.)
SECRETS = {
    "POSTGRES_PASSWORD", "CLINFLOW_API_DB_PASSWORD", "CLINFLOW_WORKER_DB_PASSWORD",
    "CLINFLOW_SINK_DB_PASSWORD", "CLINFLOW_AUDIT_READER_DB_PASSWORD", "RABBITMQ_PASSWORD",
    "CLINFLOW_MASTER_KEY", "JWT_SECRET", "CLINFLOW_INDEX_KEY",
    "GRAFANA_ADMIN_PASSWORD", "CLINFLOW_API_AMQP_PASSWORD", "CLINFLOW_WORKER_AMQP_PASSWORD",
    "CLINFLOW_SINK_AMQP_PASSWORD", "CLINFLOW_OPS_AMQP_PASSWORD",
}
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
        for target in ("postgres", "rabbitmq", "medcat"):
            if target != name and re.search(rf"(@|//|^|\s){target}:", env):
                if (depends_on(svc).get(target) or {}).get("condition") != "service_healthy":
                    problems.append(f"{name}: uses {target} but does not wait for it to be healthy")
    return problems


def check_no_hardcoded_secrets(doc: dict, text: str) -> list:
    problems = []
    for name, svc in services(doc).items():
        mounted = {m if isinstance(m, str) else m.get("source") for m in svc.get("secrets") or []}
        for key, value in environment(svc).items():
            # NAME_FILE pointing at a compose secret this service mounts:
            # the secret never enters the environment.
            if key.endswith("_FILE") and value.startswith("/run/secrets/"):
                if value.removeprefix("/run/secrets/") not in mounted:
                    problems.append(f"{name}: {key} names a secret the service does not mount")
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
        for needed in sorted(REQUIRED_ENV.get(key, set()) - set(env)):
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
    (`clinflow-api broker setup`)."""
    problems = []
    admin = environment(services(doc).get("rabbitmq", {})).get("RABBITMQ_DEFAULT_USER")
    for name, svc in services(doc).items():
        cmd = command(svc)
        url = environment(svc).get("AMQP_URL")
        if not cmd or cmd[0] not in BROKER_USERS or url is None:
            continue
        m = URL_USER.match(url)
        user = m.group(1) if m else None
        if cmd[1:2] == ["broker"]:
            continue
        if user == admin or user != BROKER_USERS[cmd[0]]:
            problems.append(f"{name}: AMQP_URL must log in as {BROKER_USERS[cmd[0]]}, not {user}")
    return problems


CHECKS = [
    check_healthchecks, check_depends_on, check_no_hardcoded_secrets, check_secret_interpolations,
    check_published_ports, check_non_root, check_read_only, check_private_network,
    check_worker_scales, check_env_names, check_metrics_ports, check_broker_users,
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

    def test_app_context_holds_the_build_inputs_and_nothing_local(self):
        files = context_files(ROOT)
        for needed in ["Cargo.toml", "Cargo.lock", ".cargo/config.toml", "clinflow/src/lib.rs",
                       "api/src/main.rs", "worker/src/main.rs", "audit-sink/src/main.rs",
                       "ingest/src/main.rs", "bench/Cargo.toml"]:
            self.assertIn(needed, files)
        self.assertTrue(any(f.startswith(".sqlx/") for f in files), "the offline query data .sqlx/")
        self.assertTrue(any(f.startswith("migrations/") for f in files), "migrations/ (sqlx::migrate!)")
        for f in files:
            self.assertFalse(f.startswith((".git/", "target/", ".dev/", "bench/results/", "dev/")), f)
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
        admin_url = services(self.doc)["broker-setup"]["environment"]["AMQP_URL"]
        r = self.broken(lambda s, d: s["audit-sink"]["environment"].update(AMQP_URL=admin_url))
        self.assertReports(r, check_broker_users, "audit-sink: AMQP_URL must log in as clinflow-audit-sink, not clinflow")
        api_url = services(self.doc)["api"]["environment"]["AMQP_URL"]
        r = self.broken(lambda s, d: s["worker"]["environment"].update(AMQP_URL=api_url))
        self.assertReports(r, check_broker_users, "worker: AMQP_URL must log in as clinflow-worker, not clinflow-api")

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
        r = self.broken(lambda s, d: s["api"]["environment"].update(JWT_SECRET="a-real-secret-written-here-0123456789"))
        self.assertReports(r, check_no_hardcoded_secrets, "api: JWT_SECRET must be exactly")

    def test_hardcoded_password_in_a_url(self):
        r = self.broken(lambda s, d: s["worker"]["environment"].update(
            DATABASE_URL="postgres://clinflow_worker:hunter2hunter2@postgres:5432/clinflow"))
        self.assertReports(r, check_no_hardcoded_secrets, "worker: DATABASE_URL has a password in its URL")

    def test_secret_with_a_default(self):
        text = self.text.replace("${JWT_SECRET:?", "${JWT_SECRET:-changeme-", 1)
        self.assertNotEqual(text, self.text)
        r = self.broken(text=text)
        self.assertReports(r, check_secret_interpolations, "${JWT_SECRET} is a secret")
        text = self.text.replace("${GRAFANA_ADMIN_PASSWORD:?set GRAFANA_ADMIN_PASSWORD (openssl rand -hex 24)}",
                                 "${GRAFANA_ADMIN_PASSWORD}")
        self.assertNotEqual(text, self.text)
        self.assertReports(self.broken(text=text), check_secret_interpolations, "${GRAFANA_ADMIN_PASSWORD} is a secret")

    def test_secret_never_asked_for(self):
        text = re.sub(r"\$\{CLINFLOW_INDEX_KEY:\?[^}]*\}", "literal", self.text)
        self.assertReports(self.broken(text=text), check_secret_interpolations, "secret CLINFLOW_INDEX_KEY is never asked for")

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
        r = self.broken(lambda s, d: s["migrate"]["environment"].pop("MIGRATION_DATABASE_URL"))
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
