#!/usr/bin/env python3
"""Build the dev MedCAT model pack from a concept CSV.

Usage (normally called by ./setup with the venv's python):
    .venv/bin/python build_model.py [--force]

Input:  $MEDCAT_CONCEPTS_CSV (default dev/medcat/concepts.csv) with columns
        cui,name,ontologies,name_status,type_ids  (name_status P/A, see README).
Output: $MEDCAT_MODEL_DIR (default dev/medcat/model/):
          <model_name>/       the model pack folder (what service.py loads)
          <model_name>.zip    the same pack zipped (usable by the real
                              cogstacksystems/medcat-service image)
          build.json          stamp + metadata, written last

The model is rebuilt only when the CSV, this script or the medcat version
changed (compared via build.json); otherwise this exits at once.

model_name is "clinflow-dev-<12 hex>" where the hex is the sha256 of the
CSV bytes, the MEDCAT_SETTINGS below and the medcat version: everything
that decides what the model annotates, and nothing else (editing comments
here rebuilds the pack but keeps the name). The service reports it as
`service_model`, which the pipeline stores as the model version.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE / "concepts.csv"
DEFAULT_MODEL_DIR = HERE / "model"
BUILD_JSON = "build.json"
REQUIRED_COLUMNS = ("cui", "name", "ontologies", "name_status", "type_ids")

# Config overrides applied on top of medcat.config.Config() defaults.
# Why each one (a dictionary-only model with an empty vocab, no training):
MEDCAT_SETTINGS = {
    # regex is MedCAT 2's default; pinned so no spaCy model is ever needed.
    "general.nlp.provider": "regex",
    # The spell checker needs a real word vocab; ours is empty.
    "general.spell_check": False,
    # Allow 2-letter names (AF, MI) to be recognised at all.
    "components.ner.min_name_len": 2,
    # Names shorter than this are only linked after context training, which
    # we don't do; 2 lets AF/MI/HTN/T2DM link on the name alone.
    "components.linking.disamb_length_limit": 2,
}


def log(msg: str) -> None:
    print(f"[medcat/build_model] {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> NoReturn:
    raise SystemExit(f"[medcat/build_model] ERROR: {msg}")


def sha256_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        # length-prefix each part so different splits never collide
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()


def validate_csv(path: Path) -> dict:
    """Fail early, with line numbers, on a CSV MedCAT would silently misread."""
    errors: list[str] = []
    cuis: set[str] = set()
    preferred: set[str] = set()
    ontologies: set[str] = set()
    rows = names = 0
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [c.strip().lower() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            fail(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        for lineno, raw in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            rows += 1
            names += len([n for n in row["name"].split("|") if n.strip()])
            if not row["cui"]:
                errors.append(f"line {lineno}: empty cui")
            if not row["name"]:
                errors.append(f"line {lineno}: empty name")
            status = row["name_status"].upper()
            # MedCAT maps anything unknown to 'A' without a word; we'd rather know.
            if status not in ("P", "A", "N"):
                errors.append(f"line {lineno}: name_status {row['name_status']!r} (expected P or A)")
            cuis.add(row["cui"].upper())
            if status == "P":
                preferred.add(row["cui"].upper())
            ontologies.update(o.strip().upper() for o in row["ontologies"].split("|") if o.strip())
    if rows == 0:
        errors.append("no data rows")
    if errors:
        shown = "\n  ".join(errors[:30])
        more = f"\n  ... and {len(errors) - 30} more" if len(errors) > 30 else ""
        fail(f"{path}: invalid concept CSV:\n  {shown}{more}")
    no_pref = sorted(cuis - preferred)
    if no_pref:
        log(f"warning: {len(no_pref)} CUI(s) have no preferred (P) name, e.g. {no_pref[:5]}")
    return {"rows": rows, "names": names, "cuis": len(cuis), "ontologies": sorted(ontologies)}


def apply_settings(config) -> None:
    for dotted, value in MEDCAT_SETTINGS.items():
        obj = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            obj = getattr(obj, p)
        if not hasattr(obj, leaf):
            fail(f"medcat config has no field {dotted!r} (medcat version changed?)")
        setattr(obj, leaf, value)


def self_check(cat, csv_path: Path, limit: int = 5000) -> None:
    """Annotate each CSV name on its own and warn about names that don't link.

    Not fatal: MedCAT has rules (names under 4 chars must be upper-case in
    the text, names under ner.min_name_len are ignored) that make some
    entries unreachable; the owner of concepts.csv should see which.
    """
    unlinked = []
    checked = 0
    with csv_path.open(newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            cui = row["cui"].upper()
            for name in (n.strip() for n in row["name"].split("|") if n.strip()):
                if checked >= limit:
                    break
                checked += 1
                ents = cat.get_entities(name).get("entities", {})
                if not any(e["cui"] == cui for e in ents.values()):
                    unlinked.append(f"{cui}:{name!r}")
    if unlinked:
        log(f"warning: {len(unlinked)}/{checked} CSV names do not link to their CUI when "
            f"annotated on their own: {', '.join(unlinked[:20])}"
            + (" ..." if len(unlinked) > 20 else ""))
    else:
        log(f"self-check: all {checked} CSV names link to their CUI")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = ap.parse_args()

    csv_path = Path(os.environ.get("MEDCAT_CONCEPTS_CSV") or DEFAULT_CSV).resolve()
    model_dir = Path(os.environ.get("MEDCAT_MODEL_DIR") or DEFAULT_MODEL_DIR).resolve()
    if not csv_path.is_file():
        fail(
            f"concept CSV not found: {csv_path}\n"
            "  (set MEDCAT_CONCEPTS_CSV to build from another file)")

    csv_bytes = csv_path.read_bytes()
    medcat_version = pkg_version("medcat")
    settings_json = json.dumps(MEDCAT_SETTINGS, sort_keys=True).encode()
    content_sha = sha256_bytes(csv_bytes, settings_json, medcat_version.encode())
    build_sha = sha256_bytes(csv_bytes, Path(__file__).read_bytes(), medcat_version.encode())
    model_name = f"clinflow-dev-{content_sha[:12]}"

    stamp_path = model_dir / BUILD_JSON
    if not args.force and stamp_path.is_file():
        try:
            stamp = json.loads(stamp_path.read_text())
        except ValueError:
            stamp = {}
        if stamp.get("build_sha256") == build_sha and (model_dir / stamp.get("pack_dir", "\0")).is_dir():
            log(f"model up to date: {stamp['model_name']} ({model_dir / stamp['pack_dir']})")
            return 0

    info = validate_csv(csv_path)
    log(f"building {model_name} from {csv_path} "
        f"({info['names']} names, {info['cuis']} concepts, medcat {medcat_version}) ...")
    t0 = time.monotonic()

    logging.getLogger("medcat").setLevel(logging.WARNING)
    from medcat.cat import CAT
    from medcat.config import Config
    from medcat.model_creation.cdb_maker import CDBMaker
    from medcat.vocab import Vocab

    config = Config()
    apply_settings(config)
    config.meta.ontology = info["ontologies"]  # shown as model_card_info.ontologies
    config.meta.description = (
        f"{model_name}: clinflow dev dictionary model built from {csv_path.name} "
        f"(sha256 {hashlib.sha256(csv_bytes).hexdigest()})")
    cdb = CDBMaker(config).prepare_csvs([str(csv_path)])
    cat = CAT(cdb, Vocab(), config)

    # Build in a scratch folder, then swap in: an interrupted build never
    # leaves a half-written pack behind a valid build.json.
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / ".build-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # add_hash_to_pack_name=False: we want our own stable name, not
    # "<name>_<medcat hash>". The target folder must already exist.
    pack_path = Path(cat.save_model_pack(str(tmp), pack_name=model_name, add_hash_to_pack_name=False))

    # Round-trip through the saved pack so the self-check tests what the
    # service will actually load.
    loaded = CAT.load_model_pack(str(pack_path))
    self_check(loaded, csv_path)

    # Swap: drop the stamp first, then our previous packs (only what this
    # script creates, in case MEDCAT_MODEL_DIR points somewhere shared).
    stamp_path.unlink(missing_ok=True)
    for old in model_dir.glob("clinflow-dev-*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    for item in tmp.iterdir():
        item.rename(model_dir / item.name)
    tmp.rmdir()

    stamp = {
        "model_name": model_name,
        "pack_dir": model_name,
        "pack_zip": f"{model_name}.zip",
        "build_sha256": build_sha,
        "content_sha256": content_sha,
        "csv_path": str(csv_path),
        "csv_sha256": hashlib.sha256(csv_bytes).hexdigest(),
        "medcat_version": medcat_version,
        "medcat_model_hash": loaded.config.meta.hash,
        "settings": MEDCAT_SETTINGS,
        "names": info["names"],
        "concepts": info["cuis"],
        "ontologies": info["ontologies"],
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp_stamp = stamp_path.with_suffix(".json.tmp")
    tmp_stamp.write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(tmp_stamp, stamp_path)
    log(f"model {model_name} built in {time.monotonic() - t0:.1f}s -> {model_dir / model_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
