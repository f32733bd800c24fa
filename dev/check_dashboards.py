#!/usr/bin/env python3
"""Evaluates every Grafana panel expression and every alert expression of
this repository against a live Prometheus that scrapes a running clinflow
stack (dev/check-dashboards sets both up). Python standard library only.

It drives some load through the api first (single and batch uploads, a
failed login, a request without a token) so that counters move, waits until
Prometheus has scraped the result, then checks:

  * every expression parses (the query API answers success);
  * every core panel (CORE below) returns data: at least one series with a
    number (not NaN);
  * every metric name an expression names is in some service's /metrics
    (or RabbitMQ's), except `up`.

Exit status 0 only if all hold. Output: ids and counts, never note text.
"""

import argparse
import datetime
import glob
import json
import math
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Synthesised by Prometheus itself, not by a target.
SYNTHETIC = {"up"}

# (dashboard uid, panel title): panels that must return data after the load.
CORE = {
    ("clinflow-pipeline", "Services up"),
    ("clinflow-pipeline", "Documents accepted / s"),
    ("clinflow-pipeline", "Documents finished / s"),
    ("clinflow-pipeline", "Backlog (jobs queued)"),
    ("clinflow-pipeline", "Upload → done"),
    ("clinflow-pipeline", "Failures / s"),
    ("clinflow-pipeline", "Dead letters (parked now)"),
    ("clinflow-pipeline", "Outbox (api → RabbitMQ)"),
    ("clinflow-pipeline", "Consumers per queue"),
    ("clinflow-medcat", "MedCAT ready"),
    ("clinflow-medcat", "Worker paused"),
    ("clinflow-medcat", "Batches in flight"),
    ("clinflow-medcat", "MedCAT latency"),
    ("clinflow-medcat", "MedCAT calls / s"),
    ("clinflow-medcat", "Retries / s"),
    ("clinflow-medcat", "Batch size"),
    ("clinflow-medcat", "Where a batch's time goes"),
    ("clinflow-audit", "Chain verified"),
    ("clinflow-audit", "Since last verification"),
    ("clinflow-audit", "Audit lag"),
    ("clinflow-audit", "Audit queue"),
    ("clinflow-audit", "Events / s"),
    ("clinflow-audit", "Batch size"),
    ("clinflow-api", "Requests / s by route"),
    ("clinflow-api", "Requests / s by status class"),
    ("clinflow-api", "5xx ratio"),
    ("clinflow-api", "Latency by route (p95)"),
    ("clinflow-api", "Latency by route (p50)"),
    ("clinflow-api", "Uploads by outcome"),
    ("clinflow-api", "4xx by route"),
    ("clinflow-api", "Broker connections"),
    ("clinflow-security", "401s by reason"),
    ("clinflow-security", "401/403 by route"),
}

# What Grafana would put in place of its variables here.
VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "15s",
    "$__range": "1h",
    "${prefix}": "clinflow",
    "$prefix": "clinflow",
}

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
    "inf", "nan",
}


# The api serves HTTPS with the development certificate (./dev/up); its CA
# (--api-ca-file) verifies it. Prometheus and the metrics ports are plain HTTP.
TLS = ssl.create_default_context()


def http(method, url, body=None, token=None, content_type="application/json", timeout=10):
    headers = {"content-type": content_type}
    if token:
        headers["authorization"] = "Bearer " + token
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=TLS) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def deadline_loop(what, seconds, check, every=0.5):
    """Calls check() until it returns a truthy value or the deadline passes."""
    end = time.monotonic() + seconds
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            sys.exit(f"check-dashboards: timed out after {seconds} s waiting for {what}")
        time.sleep(every)


def substitute(expr):
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        raise ValueError(f"an unknown variable is left in: {expr}")
    return expr


def metric_names(expr):
    """Metric names an expression selects: strings, label matchers, ranges,
    grouping clauses, functions, keywords and numbers taken out."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if rest.startswith("("):
            continue  # a function or aggregation
        if word.lower() in KEYWORDS:
            continue
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue  # the tail of a number such as 1e3
        names.add(word)
    return names


def exported_names(urls):
    names = set()
    for url in urls:
        status, body = http("GET", url)
        if status != 200:
            sys.exit(f"check-dashboards: {url} answered {status}")
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def query(prom, expr):
    status, body = http("GET", f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    try:
        answer = json.loads(body)
    except ValueError:
        return False, f"HTTP {status}: not JSON", []
    if answer.get("status") != "success":
        return False, answer.get("error", f"HTTP {status}"), []
    data = answer["data"]
    if data["resultType"] == "scalar":
        return True, "", [data["result"][1]]
    return True, "", [r["value"][1] for r in data["result"]]


def scrape_time(rfc3339):
    """Unix time of a target's lastScrape (Prometheus gives nanoseconds)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", rfc3339)
    if not m:
        return 0.0
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    whole = datetime.datetime.fromisoformat(m.group(1) + zone).timestamp()
    return whole + float(m.group(2) or 0)


def has_number(values):
    return any(not math.isnan(float(v)) for v in values)


def panels(path):
    board = json.load(open(path))
    stack = list(board.get("panels", []))
    while stack:
        p = stack.pop(0)
        stack.extend(p.get("panels", []))  # rows
        yield board["uid"], p


def alert_exprs(path):
    text = open(path).read()
    # The rules file is YAML; its alert expressions are `expr:` scalars, plain
    # or `|` blocks. Parse just that much (no YAML library in the stdlib).
    lines = text.splitlines()
    name = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s*- alert:\s*(\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if m:
            indent, value = len(m.group(1)), m.group(2).strip()
            if value in ("|", ">", "|-", ">-"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                yield name, " ".join(b for b in block if b)
                continue
            yield name, value
        i += 1


def drive_load(api, password, uploads):
    """Single uploads (live lane), one batch (backfill lane), a failed login
    and a request without a token. Returns the ids of the uploaded documents."""
    run = f"{int(time.time())}-{os.getpid()}"
    status, body = http("POST", f"{api}/v1/auth/login", {"username": "demo-ingest", "password": "wrong password"})
    assert status == 401, f"a wrong password answered {status}"
    status, _ = http("GET", f"{api}/v1/documents/00000000-0000-0000-0000-000000000000")
    assert status == 401, f"a request without a token answered {status}"
    status, body = http("POST", f"{api}/v1/auth/login", {"username": "demo-ingest", "password": password})
    assert status == 200, f"login as demo-ingest answered {status}"
    token = json.loads(body)["access_token"]
    text = "Check-dashboards note {n}: known atrial fibrillation, started on metformin for type 2 diabetes."
    ids = []
    for n in range(uploads):
        doc = {"patient_ref": f"check-{run}-{n}", "text": text.format(n=n), "source_ref": f"check-{run}-{n}"}
        status, body = http("POST", f"{api}/v1/documents", doc, token)
        assert status == 202, f"upload answered {status}"
        ids.append(json.loads(body)["id"])
    lines = "".join(
        json.dumps({"patient_ref": f"check-{run}-b{n}", "text": text.format(n=n), "source_ref": f"check-{run}-b{n}"})
        + "\n"
        for n in range(uploads)
    )
    status, body = http("POST", f"{api}/v1/documents/batch", lines.encode(), token, "application/x-ndjson")
    assert status == 200, f"batch upload answered {status}"
    for outcome in json.loads(body)["outcomes"]:
        ids.append(outcome["id"])
    return token, ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--api", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--metrics", nargs="+", required=True, help="every /metrics URL Prometheus scrapes")
    ap.add_argument("--uploads", type=int, default=10)
    ap.add_argument("--api-ca-file", default=os.environ.get("CLINFLOW_API_CA_FILE"),
                    help="CA of an https:// api's certificate (default: $CLINFLOW_API_CA_FILE, else the system's)")
    args = ap.parse_args()
    global TLS
    if args.api_ca_file:
        TLS = ssl.create_default_context(cafile=args.api_ca_file)
    prom = args.prometheus.rstrip("/")

    # Every target up in Prometheus before the load, so rates see it.
    def all_up():
        status, body = http("GET", f"{prom}/api/v1/targets")
        if status != 200:
            return False
        active = json.loads(body)["data"]["activeTargets"]
        return active and all(t["health"] == "up" for t in active) and len(active) == len(args.metrics)
    deadline_loop("every target to be scraped", 60, all_up)

    token, ids = drive_load(args.api, args.password, args.uploads)
    print(f"load: {len(ids)} documents uploaded (single and batch), one failed login, one 401")

    def all_done():
        for doc in ids:
            status, body = http("GET", f"{args.api}/v1/documents/{doc}/status", token=token)
            if status != 200 or json.loads(body)["status"] not in ("done", "failed"):
                return False
        return True
    deadline_loop("the uploaded documents to be processed", 180, all_done)

    # Scraped after the last document was stored: Prometheus sees them all.
    def seen():
        ok, _, values = query(prom, f'sum(increase(clinflow_worker_documents_total{{outcome="done"}}[{VARIABLES["$__rate_interval"]}]))')
        return ok and values and float(values[0]) >= len(ids) * 0.9
    deadline_loop("Prometheus to scrape the finished documents", 60, seen)
    # The audit events of those reads and uploads reach the sink, too.
    deadline_loop("Prometheus to scrape stored audit events", 60,
                  lambda: has_number(query(prom, 'sum(rate(clinflow_audit_events_written_total[5m])) > 0')[2]))

    # Series created by the load (histograms appear with their first
    # observation) need two samples for rate(): let every target be scraped
    # twice more.
    since = time.time()

    def scraped_twice_since():
        status, body = http("GET", f"{prom}/api/v1/targets")
        active = json.loads(body)["data"]["activeTargets"] if status == 200 else []
        return active and all(scrape_time(t["lastScrape"]) > since + 2.2 for t in active)
    deadline_loop("two more scrapes of every target", 30, scraped_twice_since, every=0.2)

    exported = exported_names(args.metrics)
    failures = []
    empty = []
    evaluated = returning = core_seen = alerts = 0
    core_found = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "grafana", "dashboards", "*.json"))):
        for uid, panel in panels(path):
            for target in panel.get("targets", []):
                if "expr" not in target:
                    continue
                where = f"{uid} / {panel['title']} / {target.get('refId')}"
                expr = substitute(target["expr"])
                ok, error, values = query(prom, expr)
                evaluated += 1
                if not ok:
                    failures.append(f"{where}: does not evaluate: {error}")
                    continue
                data = has_number(values)
                returning += data
                if not data:
                    empty.append(where)
                if (uid, panel["title"]) in CORE:
                    core_found.add((uid, panel["title"]))
                    core_seen += 1
                    if not data:
                        failures.append(f"{where}: a core panel returned no data: {expr}")
                for name in sorted(metric_names(expr) - exported - SYNTHETIC):
                    failures.append(f"{where}: no service exports {name}")
    for missing in sorted(CORE - core_found):
        failures.append(f"core panel not found in the dashboards: {missing}")
    for path in sorted(glob.glob(os.path.join(ROOT, "prometheus", "rules", "*.yml"))):
        for name, expr in alert_exprs(path):
            ok, error, _ = query(prom, expr)
            alerts += 1
            if not ok:
                failures.append(f"alert {name}: does not evaluate: {error}")
            for metric in sorted(metric_names(expr) - exported - SYNTHETIC):
                failures.append(f"alert {name}: no service exports {metric}")

    print(f"dashboards: {evaluated} panel expressions evaluated, {returning} returned data; "
          f"{core_seen} core expressions ({len(core_found)} panels) checked")
    print(f"alerts: {alerts} expressions evaluated")
    for where in empty:
        print(f"no data now: {where}")
    for f in failures:
        print("FAIL " + f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
