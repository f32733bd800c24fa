#!/usr/bin/env python3
"""Check that a running service honours the medcat-service HTTP contract.

    .venv/bin/python check_contract.py [BASE_URL] [--fail-marker M] [--bench N]

BASE_URL defaults to http://127.0.0.1:5000. Standard library only, so it
also runs against the real cogstacksystems/medcat-service image.

Needs a model that knows "metformin" and the abbreviation "AF" (the
clinflow concept list does). With --fail-marker M (for a dev service
started with MEDCAT_DEV_FAIL_MARKER=M) it also checks the plain 500 of
/api/process and the silent empty results of /api/process_bulk when MedCAT
raises. --bench N times N single requests and N docs in bulk requests of 50.

Prints one line per check and "N passed, N failed"; exits 0 only if all pass.
"""

from __future__ import annotations

import argparse
import ssl
import http.client
import json
import sys
import time
import urllib.parse
from typing import Any, Callable, List, Optional, Tuple

ENTITY_KEYS = {
    "pretty_name": str, "cui": str, "type_ids": list, "source_value": str,
    "detected_name": str, "acc": (int, float), "context_similarity": (int, float),
    "start": int, "end": int, "id": int, "meta_anns": dict,
}
INFO_KEYS = ("service_app_name", "service_language", "service_version", "service_model", "model_card_info")
CARD_KEYS = ("ontologies", "meta_cat_model_names", "model_last_modified_on")
RESULT_KEYS = ("text", "annotations", "success", "timestamp", "elapsed_time")

METFORMIN_TEXT = "Patient started on metformin for T2DM"
AF_TEXT = "Known AF, now on metformin 500 mg twice daily."
NOTHING_TEXT = "The weather was unremarkable today."


class CheckFailed(Exception):
    pass


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


class Client:
    def __init__(self, base_url: str, timeout: float = 60.0, ca_file: Optional[str] = None) -> None:
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SystemExit(f"base URL must be http(s)://host[:port], got {base_url!r}")
        self.host, self.port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
        # https: the server is verified against ca_file (or the system's roots).
        self.tls = ssl.create_default_context(cafile=ca_file) if u.scheme == "https" else None
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self.conn: Optional[http.client.HTTPConnection] = None

    def request(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None
                ) -> Tuple[int, str, Any]:
        """Returns (status, content-type, parsed JSON or raw text)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (1, 2):  # one retry on a dropped keep-alive connection
            if self.conn is None:
                self.conn = (http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.tls)
                             if self.tls else http.client.HTTPConnection(self.host, self.port, timeout=self.timeout))
            try:
                self.conn.request(method, self.prefix + path, body=data, headers=headers)
                resp = self.conn.getresponse()
                payload = resp.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        ctype = resp.getheader("Content-Type", "")
        text = payload.decode("utf-8", "replace")
        if "json" in ctype:
            try:
                return resp.status, ctype, json.loads(text)
            except ValueError:
                pass
        return resp.status, ctype, text

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, raw: Optional[bytes] = None):
        return self.request("POST", path, body, raw)


def entities_of(annotations: Any) -> Tuple[str, List[dict]]:
    """Accept both output modes; return (mode, entities)."""
    expect(isinstance(annotations, list) and len(annotations) == 1,
           f"annotations must be a one-element list, got {json.dumps(annotations)[:200]}")
    inner = annotations[0]
    if isinstance(inner, dict):
        for key, ent in inner.items():
            expect(key.isdigit(), f"entity key {key!r} is not an id string")
            expect(isinstance(ent, dict) and ent.get("id") == int(key),
                   f"entity under key {key!r} has id {ent.get('id') if isinstance(ent, dict) else ent!r}")
        return "dict", list(inner.values())
    expect(isinstance(inner, list), f"annotations[0] must be an object or a list, got {type(inner).__name__}")
    return "list", inner


def check_entity(ent: dict, text: str) -> None:
    for key, typ in ENTITY_KEYS.items():
        expect(key in ent, f"entity lacks {key!r}: {ent}")
        expect(isinstance(ent[key], typ) and not isinstance(ent[key], bool),
               f"entity {key!r} has type {type(ent[key]).__name__}: {ent}")
    s, e = ent["start"], ent["end"]
    expect(0 <= s < e <= len(text), f"offsets {s}..{e} outside text of length {len(text)}")
    expect(text[s:e] == ent["source_value"],
           f"text[{s}:{e}] = {text[s:e]!r} but source_value = {ent['source_value']!r}")


def check_result(res: dict, text: str, footer: Any = None) -> None:
    for key in RESULT_KEYS:
        expect(key in res, f"result lacks {key!r}: {sorted(res)}")
    expect(res["success"] is True, f"success is {res['success']!r}")
    expect(res["text"] == text, f"text not echoed: {res['text']!r}")
    expect(isinstance(res["timestamp"], str) and "T" in res["timestamp"], f"bad timestamp {res['timestamp']!r}")
    expect(isinstance(res["elapsed_time"], (int, float)), f"elapsed_time is {res['elapsed_time']!r}")
    if footer is not None:
        expect(res.get("footer") == footer, f"footer not echoed: sent {footer!r}, got {res.get('footer')!r}")


def find(ents: List[dict], source: str) -> Optional[dict]:
    return next((e for e in ents if e["source_value"] == source), None)


def expect_422(client: Client, path: str, what: str, body: Any = None, raw: Optional[bytes] = None) -> None:
    status, _, data = client.post(path, body=body, raw=raw)
    expect(status == 422, f"{what}: expected 422, got {status}: {str(data)[:200]}")
    expect(isinstance(data, dict) and isinstance(data.get("detail"), list) and data["detail"],
           f"{what}: expected a FastAPI body {{'detail': [...]}}, got {str(data)[:200]}")


def run_checks(client: Client, ready_timeout: float, fail_marker: Optional[str]) -> List[Tuple[str, Callable]]:
    state: dict = {}

    def live():
        status, _, data = client.get("/api/health/live")
        expect(status == 200 and data == {"status": "UP", "checks": []}, f"got {status} {data}")

    def ready():
        deadline = time.monotonic() + ready_timeout
        while True:
            status, _, data = client.get("/api/health/ready")
            if status == 200:
                break
            expect(status == 503, f"not-ready status must be 503, got {status}")
            expect(isinstance(data, dict) and "DOWN" in json.dumps(data), f"503 body lacks DOWN: {data}")
            expect(time.monotonic() < deadline, f"not ready after {ready_timeout}s")
            time.sleep(0.2)
        expect(data == {"status": "UP", "checks": [{"name": "MedCAT", "status": "UP"}]}, f"got {data}")

    def info():
        status, _, data = client.get("/api/info")
        expect(status == 200, f"status {status}")
        for key in INFO_KEYS:
            expect(key in data, f"/api/info lacks {key!r}")
        for key in INFO_KEYS[:4]:
            expect(isinstance(data[key], str) and data[key], f"{key} must be a non-empty string: {data[key]!r}")
        for key in CARD_KEYS:
            expect(key in data["model_card_info"], f"model_card_info lacks {key!r}")
        state["info"] = data

    def process_one(text, name, span, footer=None):
        """/api/process on `text`: a valid result whose entities include `name` at `span`."""
        content = {"text": text} if footer is None else {"text": text, "footer": footer}
        status, _, data = client.post("/api/process", {"content": content})
        expect(status == 200, f"status {status}: {str(data)[:300]}")
        res = data["result"]
        check_result(res, text, footer=footer)
        mode, ents = entities_of(res["annotations"])
        for ent in ents:
            check_entity(ent, text)
        found = find(ents, name)
        expect(found is not None, f"{name} not linked; found {[e['source_value'] for e in ents]}")
        got = (found["start"], found["end"])
        expect(got == span, f"{name} at {got[0]}..{got[1]}, expected {span[0]}..{span[1]}")
        return data, mode

    def process_metformin():
        data, state["mode"] = process_one(METFORMIN_TEXT, "metformin", (19, 28), footer="doc-42")
        expect(data.get("medcat_info") == state.get("info"), "medcat_info differs from /api/info")

    def process_abbreviation():
        process_one(AF_TEXT, "AF", (6, 8))

    def footer_object():
        footer = {"doc_id": "doc-43", "n": 7}
        status, _, data = client.post("/api/process", {"content": {"text": METFORMIN_TEXT, "footer": footer}})
        expect(status == 200, f"status {status}")
        expect(data["result"].get("footer") == footer, f"object footer not echoed: {data['result'].get('footer')}")

    def nothing_found():
        status, _, data = client.post("/api/process", {"content": {"text": NOTHING_TEXT}})
        expect(status == 200, f"status {status}")
        want = [{}] if state.get("mode", "dict") == "dict" else [[]]
        expect(data["result"]["annotations"] == want, f"expected {want}, got {data['result']['annotations']}")

    def blank_text():
        for text in ("", "   \n\t "):
            status, _, data = client.post("/api/process", {"content": {"text": text, "footer": "blank"}})
            expect(status == 200, f"status {status} for {text!r}")
            check_result(data["result"], text, footer="blank")
            expect(data["result"]["annotations"] == [[]], f"blank {text!r}: expected [[]], got {data['result']['annotations']}")

    def errors_422():
        expect_422(client, "/api/process", "missing text", {"content": {"footer": "x"}})
        expect_422(client, "/api/process", "missing content", {"text": "metformin"})
        expect_422(client, "/api/process", "text not a string", {"content": {"text": 42}})
        expect_422(client, "/api/process", "bad JSON", raw=b'{"content": {"text": "unterminated')
        expect_422(client, "/api/process", "unknown top-level key",
                   {"content": {"text": "metformin"}, "metadata": {"doc": 1}})
        expect_422(client, "/api/process", "unknown content key", {"content": {"text": "metformin", "metadata": 1}})
        expect_422(client, "/api/process_bulk", "bulk doc missing text", {"content": [{"text": "a"}, {"footer": "b"}]})
        expect_422(client, "/api/process_bulk", "bulk content not a list", {"content": {"text": "a"}})

    def bulk():
        texts = [METFORMIN_TEXT, "", NOTHING_TEXT, AF_TEXT, "  ", "metformin"]
        docs = [{"text": t, "footer": f"doc-{i}"} for i, t in enumerate(texts)]
        status, _, data = client.post("/api/process_bulk", {"content": docs})
        expect(status == 200, f"status {status}: {str(data)[:300]}")
        expect(data.get("medcat_info") == state.get("info"), "medcat_info differs from /api/info")
        results = data["result"]
        expect(isinstance(results, list) and len(results) == len(texts), f"{len(results)} results for {len(texts)} docs")
        for i, (text, res) in enumerate(zip(texts, results)):
            check_result(res, text, footer=f"doc-{i}")  # text+footer per index = input order kept
            if not text.strip():
                expect(res["annotations"] == [], f"bulk blank doc {i}: expected [], got {res['annotations']}")
                continue
            _, ents = entities_of(res["annotations"])
            for ent in ents:
                check_entity(ent, text)
        _, ents = entities_of(results[0]["annotations"])
        met = find(ents, "metformin")
        expect(met is not None and (met["start"], met["end"]) == (19, 28), "bulk doc 0: metformin not at 19..28")
        _, ents = entities_of(results[2]["annotations"])
        expect(ents == [], f"bulk doc 2 should have no entities, got {ents}")
        _, ents = entities_of(results[5]["annotations"])
        expect(find(ents, "metformin") is not None, "bulk doc 5: metformin missing")
        status, _, data = client.post("/api/process_bulk", {"content": []})
        expect(status == 200 and data["result"] == [], f"empty bulk: {status} {str(data)[:200]}")

    def injected_failure():
        text = f"metformin {fail_marker}"
        status, ctype, data = client.post("/api/process", {"content": {"text": text}})
        expect(status == 500, f"/api/process with failure marker: expected 500, got {status}")
        expect("json" not in ctype, f"500 should be plain text, got {ctype}: {data}")
        status, _, data = client.post("/api/process_bulk", {"content": [{"text": METFORMIN_TEXT}, {"text": text}]})
        expect(status == 200, f"bulk with failure marker: expected the silent 200, got {status}")
        expect([r["annotations"] for r in data["result"]] == [[], []] and all(r["success"] for r in data["result"]),
               f"bulk failure should give success/[] for every doc, got {data['result']}")

    checks = [("GET /api/health/live", live), ("GET /api/health/ready (waits for UP)", ready),
              ("GET /api/info", info), ("POST /api/process metformin offsets + footer", process_metformin),
              ("POST /api/process abbreviation AF", process_abbreviation),
              ("POST /api/process object footer echoed", footer_object),
              ("POST /api/process nothing found", nothing_found),
              ("POST /api/process blank text -> [[]]", blank_text),
              ("422 for invalid requests", errors_422),
              ("POST /api/process_bulk order, blanks, footers", bulk)]
    if fail_marker:
        checks.append(("MedCAT failure: 500 single, silent bulk", injected_failure))
    return checks


def bench(client: Client, n: int) -> None:
    note = ("Patient is a 67 year old with HTN, T2DM on metformin and known AF on apixaban. "
            "Previous MI in 2019. Presents with chest pain and shortness of breath. ") * 6  # ~1 KB
    t0 = time.monotonic()
    for i in range(n):
        status, _, _ = client.post("/api/process", {"content": {"text": note, "footer": f"b-{i}"}})
        expect(status == 200, f"bench: status {status}")
    single = n / (time.monotonic() - t0)
    t0 = time.monotonic()
    done = 0
    while done < n:
        batch = min(50, n - done)
        status, _, _ = client.post("/api/process_bulk", {"content": [{"text": note}] * batch})
        expect(status == 200, f"bench bulk: status {status}")
        done += batch
    bulk = n / (time.monotonic() - t0)
    print(f"bench: {len(note)}-char notes: {single:.0f} docs/s via /api/process (sequential, keep-alive), "
          f"{bulk:.0f} docs/s via /api/process_bulk (batches of 50)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_url", nargs="?", default="http://127.0.0.1:5000")
    ap.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for /api/health/ready")
    ap.add_argument("--ca-file", help="the CA of an https:// service's certificate")
    ap.add_argument("--fail-marker", help="the service's MEDCAT_DEV_FAIL_MARKER, to test failure paths")
    ap.add_argument("--bench", type=int, metavar="N", help="also measure throughput with N documents")
    args = ap.parse_args()

    client = Client(args.base_url, ca_file=args.ca_file)
    passed = failed = 0
    for name, fn in run_checks(client, args.ready_timeout, args.fail_marker):
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except CheckFailed as exc:
            failed += 1
            print(f"FAIL {name}: {exc}")
        except (OSError, http.client.HTTPException) as exc:
            failed += 1
            print(f"FAIL {name}: cannot reach {args.base_url}: {exc}")
            if name.startswith("GET /api/health"):
                break  # nothing else can work
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            failed += 1
            print(f"FAIL {name}: unexpected response shape ({type(exc).__name__}: {exc})")
    print(f"{passed} passed, {failed} failed")
    if failed == 0 and args.bench:
        bench(client, args.bench)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
