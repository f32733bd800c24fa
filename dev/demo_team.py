#!/usr/bin/env python3
"""Puts the sample notes' patients in the care team `demo-ward` with
demo-clinician and demo-ingest (bound, so its uploads may name it) in it,
through the admin API (idempotent), so that the quick
start's clinician can read the sample results. Stdlib only.

usage: demo_team.py API_URL NOTES_DIR   (password in CLINFLOW_PASSWORD; an
https:// API is verified against CLINFLOW_API_CA_FILE, else the system's CAs)
"""
import json
import os
import pathlib
import ssl
import sys
import urllib.error
import urllib.request

TEAM, CLINICIAN, UPLOADER, ADMIN = "demo-ward", "demo-clinician", "demo-ingest", "demo-admin"
TLS = ssl.create_default_context(cafile=os.environ.get("CLINFLOW_API_CA_FILE") or None)


def call(base, method, path, body=None, token=None, ok=(200, 201, 204)):
    req = urllib.request.Request(base + path, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(req, data, timeout=30, context=TLS) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    if status not in ok:
        sys.exit(f"demo_team: {method} {path} answered {status}: {raw[:200]!r}")
    return status, (json.loads(raw) if raw else None)


def patient_refs(notes):
    refs = set()
    for f in sorted(pathlib.Path(notes).glob("*.txt")):
        for line in f.read_text().splitlines()[1:]:
            if line.strip() == "---":
                break
            if line.startswith("patient_ref:"):
                refs.add(line.split(":", 1)[1].strip())
    return sorted(refs)


def main():
    base, notes = sys.argv[1].rstrip("/"), sys.argv[2]
    password = os.environ["CLINFLOW_PASSWORD"]
    _, login = call(base, "POST", "/v1/auth/login", {"username": ADMIN, "password": password})
    token = login["access_token"]
    call(base, "POST", "/v1/admin/teams", {"name": TEAM}, token, ok=(201, 409))
    _, teams = call(base, "GET", "/v1/admin/teams", token=token)
    team = next(t["id"] for t in teams if t["name"] == TEAM)
    _, users = call(base, "GET", "/v1/admin/users", token=token)
    # The clinician reads the team's patients; the ingest account is bound
    # to the team, so its uploads may name it (`--care-team`).
    for member in (CLINICIAN, UPLOADER):
        member_id = next(u["id"] for u in users if u["username"] == member)
        call(base, "PUT", f"/v1/admin/teams/{team}/members/{member_id}", token=token)
    refs = patient_refs(notes)
    for ref in refs:
        call(base, "POST", f"/v1/admin/teams/{team}/patients", {"patient_ref": ref}, token)
    call(base, "POST", "/v1/auth/logout", token=token)
    print(f"care team {TEAM}: {CLINICIAN} and {len(refs)} sample patients")


if __name__ == "__main__":
    main()
