#!/usr/bin/env python3
"""Check that the synthetic sample notes cover every concept in concepts.csv.

For every concept, counts how many notes mention at least one of its names:
names of 4+ characters match case-insensitively as whole words, shorter names
(abbreviations such as AF, MI) match case-sensitively as whole words.
Also validates the front matter of every note.

Exit status is non-zero if any concept is mentioned by no note or any note has
an invalid front matter. Standard library only.

Usage: python3 dev/sample-notes/coverage.py [--concepts PATH] [--notes DIR]
"""
import argparse
import csv
import datetime
import re
import sys
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CONCEPTS = HERE.parent / "medcat" / "concepts.csv"

FRONT_KEYS = ("patient_ref", "document_date", "document_type")
PATIENT_RE = re.compile(r"^PAT-1\d{5}$")
DOCTYPE_RE = re.compile(r"^[a-z][a-z_]*$")
MIN_WORDS, MAX_WORDS = 150, 600


def load_concepts(path):
    concepts = OrderedDict()  # cui -> {"pretty": str, "names": [str]}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        expected = ["cui", "name", "ontologies", "name_status", "type_ids"]
        if reader.fieldnames != expected:
            sys.exit(f"{path}: header must be {','.join(expected)}, got {reader.fieldnames}")
        for row in reader:
            cui, name = row["cui"].strip(), row["name"].strip()
            c = concepts.setdefault(cui, {"pretty": None, "names": []})
            c["names"].append(name)
            if row["name_status"].strip() == "P" and c["pretty"] is None:
                c["pretty"] = name
    for c in concepts.values():
        if c["pretty"] is None:
            c["pretty"] = c["names"][0]
    return concepts


def name_pattern(name):
    flags = 0 if len(name) < 4 else re.IGNORECASE
    return re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)", flags)


def parse_note(path):
    """Return (front_matter dict, body, errors)."""
    errors = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return {}, "", [f"not UTF-8: {e}"]
    lines = text.split("\n")
    if not lines or lines[0] != "---":
        return {}, "", ["first line must be '---'"]
    try:
        end = lines.index("---", 1)
    except ValueError:
        return {}, "", ["front matter is not closed by '---'"]
    front = {}
    for ln in lines[1:end]:
        if ":" not in ln:
            errors.append(f"bad front matter line: {ln!r}")
            continue
        k, v = ln.split(":", 1)
        front[k.strip()] = v.strip()
    for k in FRONT_KEYS:
        if k not in front or not front[k]:
            errors.append(f"missing {k}")
    extra = set(front) - set(FRONT_KEYS)
    if extra:
        errors.append(f"unexpected keys: {sorted(extra)}")
    if "patient_ref" in front and not PATIENT_RE.match(front["patient_ref"]):
        errors.append(f"bad patient_ref {front['patient_ref']!r}")
    if "document_date" in front:
        try:
            d = datetime.date.fromisoformat(front["document_date"])
            if not (2025 <= d.year <= 2026):
                errors.append(f"document_date outside 2025-2026: {d}")
        except ValueError:
            errors.append(f"bad document_date {front['document_date']!r}")
    if "document_type" in front and not DOCTYPE_RE.match(front["document_type"]):
        errors.append(f"bad document_type {front['document_type']!r}")
    body = "\n".join(lines[end + 1:])
    if not body.strip():
        errors.append("empty note text")
    return front, body, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", default=str(DEFAULT_CONCEPTS))
    ap.add_argument("--notes", default=str(HERE))
    args = ap.parse_args()

    concepts = load_concepts(args.concepts)
    patterns = {cui: [(n, name_pattern(n)) for n in c["names"]] for cui, c in concepts.items()}
    note_paths = sorted(Path(args.notes).glob("*.txt"))
    if not note_paths:
        sys.exit(f"no .txt notes in {args.notes}")

    failed = False
    notes_per_cui = {cui: 0 for cui in concepts}
    name_hits = {(cui, n): 0 for cui, c in concepts.items() for n in c["names"]}
    patients, doc_types, non_ascii = {}, {}, []
    for p in note_paths:
        front, body, errors = parse_note(p)
        if errors:
            failed = True
            for e in errors:
                print(f"FRONT MATTER ERROR {p.name}: {e}")
            continue
        patients.setdefault(front["patient_ref"], []).append(p.name)
        doc_types[front["document_type"]] = doc_types.get(front["document_type"], 0) + 1
        if any(ord(ch) > 127 for ch in body):
            non_ascii.append(p.name)
        words = len(body.split())
        if not (MIN_WORDS <= words <= MAX_WORDS):
            print(f"warning: {p.name} has {words} words (expected {MIN_WORDS}-{MAX_WORDS})")
        for cui, pats in patterns.items():
            hit = False
            for n, rx in pats:
                if rx.search(body):
                    name_hits[(cui, n)] += 1
                    hit = True
            if hit:
                notes_per_cui[cui] += 1

    print(f"{'cui':>10}  {'notes':>5}  concept")
    for cui, c in concepts.items():
        n = notes_per_cui[cui]
        flag = "  <-- NOT COVERED" if n == 0 else ""
        print(f"{cui:>10}  {n:>5}  {c['pretty']}{flag}")
        if n == 0:
            failed = True

    unused = [f"{n} ({concepts[cui]['pretty']})" for (cui, n), k in name_hits.items() if k == 0]
    n_names = sum(len(c["names"]) for c in concepts.values())
    counts = sorted(notes_per_cui.values())
    print()
    print(f"concepts: {len(concepts)}  names: {n_names}  notes: {len(note_paths)}  "
          f"patients: {len(patients)}")
    print(f"document types: {dict(sorted(doc_types.items()))}")
    print(f"patients with 2+ notes: {sum(1 for v in patients.values() if len(v) > 1)}")
    print(f"notes with non-ASCII text: {len(non_ascii)} {non_ascii}")
    print(f"notes per concept: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}; "
          f"uncovered: {sum(1 for v in counts if v == 0)}")
    print(f"names never used in any note: {len(unused)}/{n_names}")
    if unused:
        print("  " + "; ".join(unused))
    print("RESULT:", "FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
