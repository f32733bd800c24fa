#!/usr/bin/env python3
"""Local stand-in for CogStack's medcat-service, serving a real MedCAT model.

Run with the venv's python (./run does this):
    .venv/bin/python service.py

It implements the medcat-service HTTP contract (README.md here, "HTTP
contract"; check_contract.py checks it): the same paths, JSON shapes and
status codes as the FastAPI version of cogstacksystems/medcat-service, so the clinflow workers can be
developed and tested against it unchanged. Every annotation comes from
MedCAT itself (CAT.get_entities on the loaded model pack).

Environment (names as in the real service where one exists):
    APP_MEDCAT_MODEL_PACK  model pack folder or .zip
                           (default: the pack built by build_model.py, found
                           via $MEDCAT_MODEL_DIR/build.json)
    APP_MODEL_NAME         reported as service_model (default: the build's
                           clinflow-dev-<hash> name, else MedCAT's model hash)
    APP_NAME               service_app_name (default "MedCAT")
    APP_MODEL_LANGUAGE     service_language (default "en")
    APP_BULK_NPROC         processes for /api/process_bulk (default 1 = in-process)
    ANNOTATIONS_ENTITY_OUTPUT_MODE  "dict" (default) or "list"
    SERVER_HOST            default 127.0.0.1
    SERVER_PORT            default 5000
    SERVER_TLS_CERT, SERVER_TLS_KEY  serve HTTPS with this certificate and key (PEM)
    SERVER_ACCESS_LOG      1 to log every request (default off)
    MEDCAT_MODEL_DIR       where build_model.py put the model (default ./model)
    MEDCAT_DEV_FAIL_MARKER dev/test only: any text containing this string
                           makes MedCAT processing raise, to exercise the
                           500 of /api/process and the silent failure of
                           /api/process_bulk (unset by default)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

HERE = Path(__file__).resolve().parent
log = logging.getLogger("medcat-dev-service")

# How long a request made while the model is still loading waits for it
# (the real service builds its processor lazily, so early requests block).
LOAD_WAIT_SECONDS = 300


# ---------------------------------------------------------------- settings

def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value if value else default


class Settings:
    def __init__(self) -> None:
        self.host = _env("SERVER_HOST", "127.0.0.1")
        self.port = int(_env("SERVER_PORT", "5000"))
        self.tls_cert = _env("SERVER_TLS_CERT", "") or None
        self.tls_key = _env("SERVER_TLS_KEY", "") or None
        self.access_log = _env("SERVER_ACCESS_LOG", "0").lower() in ("1", "true", "yes")
        self.app_name = _env("APP_NAME", "MedCAT")
        self.language = _env("APP_MODEL_LANGUAGE", "en")
        self.model_name_env = _env("APP_MODEL_NAME", "")
        self.bulk_nproc = max(1, int(_env("APP_BULK_NPROC", "1")))
        self.output_mode = _env("ANNOTATIONS_ENTITY_OUTPUT_MODE", "dict").lower()
        self.fail_marker = os.environ.get("MEDCAT_DEV_FAIL_MARKER") or None
        self.model_dir = Path(_env("MEDCAT_MODEL_DIR", str(HERE / "model"))).resolve()
        self.pack_env = _env("APP_MEDCAT_MODEL_PACK", "")

    def resolve_pack(self) -> Tuple[Path, Optional[str]]:
        """Return (pack path, model name from build.json if it describes this pack)."""
        stamp_file = self.model_dir / "build.json"
        stamp: dict = {}
        if stamp_file.is_file():
            stamp = json.loads(stamp_file.read_text())
        if self.pack_env:
            pack = Path(self.pack_env).resolve()
            # Our own pack passed explicitly (folder or zip): still use its name.
            built = {stamp.get("pack_dir"), stamp.get("pack_zip")} - {None}
            same_build = pack.parent == self.model_dir and pack.name in built
            name = stamp.get("model_name") if same_build else None
        elif stamp:
            pack = self.model_dir / stamp["pack_dir"]
            name = stamp["model_name"]
        else:
            raise RuntimeError(
                f"no model pack: {stamp_file} not found and APP_MEDCAT_MODEL_PACK unset "
                "(run dev/medcat/setup first)")
        if not pack.exists():
            raise RuntimeError(f"model pack not found: {pack}")
        return pack, name


# ------------------------------------------------------------ MedCAT state

class MedCat:
    """The loaded model plus everything /api/info reports about it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cat = None
        self.ready = threading.Event()  # model loaded and answering
        self.done = threading.Event()   # load finished, successfully or not
        self.failed: Optional[str] = None
        self.service_model = "unknown"
        self.model_card_info: Dict[str, Any] = {
            "ontologies": None, "meta_cat_model_names": [],
            "rel_cat_model_names": [], "model_last_modified_on": None}
        # One model, many request threads (FastAPI runs sync endpoints in a
        # threadpool). MedCAT's pipeline is not documented as thread-safe and
        # the work is pure Python under the GIL anyway, so serialise it.
        self.lock = threading.Lock()
        self.version = pkg_version("medcat")

    def load(self) -> None:
        from medcat.cat import CAT

        pack, built_name = self.settings.resolve_pack()
        t0 = time.monotonic()
        log.info("loading MedCAT %s model pack %s", self.version, pack)
        # NB: for a .zip, MedCAT unpacks next to it and silently reuses an
        # existing folder of the same name, even if stale. Our default
        # points at the folder, which build_model.py always replaces whole.
        cat = CAT.load_model_pack(str(pack))
        if self.settings.model_name_env.lower() not in ("", "unknown", "medmen"):
            self.service_model = self.settings.model_name_env
        elif built_name:
            self.service_model = built_name
        elif cat.config.meta.hash:
            self.service_model = cat.config.meta.hash  # what the real service reports
        meta = cat.config.meta
        addons = cat.config.components.addons
        self.model_card_info = {
            "ontologies": meta.ontology if isinstance(meta.ontology, list) else str(meta.ontology),
            "meta_cat_model_names": [getattr(getattr(a, "general", None), "category_name", None) or "None"
                                     for a in addons if type(a).__name__ == "ConfigMetaCAT"],
            "rel_cat_model_names": [],
            "model_last_modified_on": meta.last_saved.isoformat() if meta.last_saved else None,
        }
        # Same readiness probe as the real service: the model must annotate.
        cat.get_entities("MedCAT is ready and can get_entities")
        self.cat = cat
        self.ready.set()
        log.info("model %s ready in %.2fs", self.service_model, time.monotonic() - t0)

    def info(self) -> Dict[str, Any]:
        return {
            "service_app_name": self.settings.app_name,
            "service_language": self.settings.language,
            "service_version": self.version,
            "service_model": self.service_model,
            "model_card_info": self.model_card_info,
        }

    def _check_fail_marker(self, text: str) -> None:
        marker = self.settings.fail_marker
        if marker and marker in text:
            raise RuntimeError(f"MEDCAT_DEV_FAIL_MARKER {marker!r} found in text (injected failure)")

    def get_entities(self, text: str) -> dict:
        self._check_fail_marker(text)
        with self.lock:
            return self.cat.get_entities(text)

    def get_entities_bulk(self, indexed_texts: List[Tuple[int, str]]) -> Dict[int, dict]:
        for _, text in indexed_texts:
            self._check_fail_marker(text)
        with self.lock:
            if self.settings.bulk_nproc == 1 and not self.cat.config.components.addons:
                # Same result as get_entities_multi_texts(n_process=1), which
                # just calls get_entities per text, but without its fixed
                # ~4-40 ms per call: MedCAT 2.9.0 retries importing the
                # optional MetaCAT/RelCAT extras (torch, not installed) on
                # every batch.
                return {i: self.cat.get_entities(text) for i, text in indexed_texts}
            # n_process > 1 spawns n_process - 1 workers per call (~1 s).
            return dict(self.cat.get_entities_multi_texts(
                indexed_texts, n_process=self.settings.bulk_nproc))

    def shape(self, entities: Any) -> List[Any]:
        """medcat-service's `annotations`: a one-element list around either the
        {"<id>": entity} object (dict mode) or the list of entities (list mode)."""
        if isinstance(entities, dict):
            entities = entities.get("entities", entities)
            entities = {str(k): v for k, v in entities.items()}
            if self.settings.output_mode == "list":
                entities = list(entities.values())
        return [entities]


settings = Settings()
medcat = MedCat(settings)
_server = None  # the uvicorn.Server, so a failed model load can stop it


def _load_in_background() -> None:
    try:
        medcat.load()
    except BaseException as exc:  # noqa: BLE001 - any failure must stop the service
        medcat.failed = f"{type(exc).__name__}: {exc}"
        log.exception("loading the MedCAT model failed; shutting down")
        if _server is not None:
            _server.should_exit = True
    finally:
        medcat.done.set()


@asynccontextmanager
async def lifespan(_app: FastAPI):
    # Load off the event loop so /api/health/live answers and
    # /api/health/ready says DOWN (503) while the model loads.
    threading.Thread(target=_load_in_background, name="medcat-load", daemon=True).start()
    yield


# ------------------------------------------------------------ HTTP contract

class ProcessContent(BaseModel):
    # Newer medcat-service versions forbid unknown keys (e.g. "metadata") -> 422.
    model_config = ConfigDict(extra="forbid")
    text: str
    footer: Optional[Union[str, Dict[str, Any]]] = None


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: ProcessContent
    meta_anns_filters: Optional[List[Tuple[str, List[str]]]] = None


class BulkProcessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: List[ProcessContent]


def _timestamp() -> str:
    # e.g. 2026-11-22T21:48:37.665+00:00, as the real service
    return datetime.now(tz=timezone.utc).isoformat(timespec="milliseconds")


def _json_default(obj: Any) -> Any:
    # numpy scalars (a trained model's acc/context_similarity), sets, dates
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class MedcatJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":"), default=_json_default).encode("utf-8")


def _not_ready() -> Optional[JSONResponse]:
    medcat.done.wait(LOAD_WAIT_SECONDS)
    if medcat.ready.is_set():
        return None
    return MedcatJSONResponse(_health("DOWN"), status_code=503)


def _health(status: str) -> Dict[str, Any]:
    return {"status": status, "checks": [{"name": "MedCAT", "status": status}]}


app = FastAPI(title="MedCAT Service (clinflow dev)", lifespan=lifespan,
              default_response_class=MedcatJSONResponse)


@app.get("/api/health/live")
def liveness():
    return {"status": "UP", "checks": []}


@app.get("/api/health/ready")
def readiness():
    if medcat.ready.is_set():
        return _health("UP")
    return MedcatJSONResponse(_health("DOWN"), status_code=503)


@app.get("/api/info")
def info():
    return _not_ready() or medcat.info()


@app.post("/api/process")
def process(payload: ProcessRequest):
    if (resp := _not_ready()) is not None:
        return resp
    text = payload.content.text
    started = time.time_ns()
    # Blank text is a valid document that is not sent to MedCAT: -> [[]].
    entities: Any = medcat.get_entities(text) if text.strip() else []
    elapsed = (time.time_ns() - started) / 1e9
    if payload.meta_anns_filters:
        # As upstream: keep entities whose meta annotation values all match.
        # Like upstream this raises (-> 500) for blank text or for a model
        # without that MetaCAT task; becomes [[ent, ...]] in either mode.
        entities = [e for e in entities["entities"].values()
                    if all(e["meta_anns"][task]["value"] in values
                           for task, values in payload.meta_anns_filters)]
    result = {
        "text": text,
        "annotations": medcat.shape(entities),
        "success": True,
        "timestamp": _timestamp(),
        "elapsed_time": elapsed,
        "footer": payload.content.footer,
    }
    # Returned as a Response so FastAPI skips jsonable_encoder (hot path).
    return MedcatJSONResponse({"medcat_info": medcat.info(), "result": result})


@app.post("/api/process_bulk")
def process_bulk(payload: BulkProcessRequest):
    if (resp := _not_ready()) is not None:
        return resp
    docs = payload.content
    started = time.time_ns()
    # Blank documents are not annotated and get "annotations": [].
    valid = [(i, d.text) for i, d in enumerate(docs) if d.text.strip()]
    annotated: Dict[int, dict] = {}
    try:
        annotated = medcat.get_entities_bulk(valid)
    except Exception:  # noqa: BLE001
        # Faithful to the real service: a MedCAT failure in bulk is only
        # logged, and every document comes back "success": true with
        # "annotations": []. Clients must re-check empty results one by one.
        log.exception("Unable to process data (bulk); returning empty annotations")
    elapsed = (time.time_ns() - started) / 1e9
    results = []
    for i, doc in enumerate(docs):
        results.append({
            "text": doc.text,
            "annotations": medcat.shape(annotated[i]) if i in annotated else [],
            "success": True,
            "timestamp": _timestamp(),
            "elapsed_time": elapsed,  # whole-batch time, as upstream
            "footer": doc.footer,
        })
    return MedcatJSONResponse({"medcat_info": medcat.info(), "result": results})


# ------------------------------------------------------------------ main

def main() -> int:
    global _server
    import uvicorn

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("medcat").setLevel(logging.WARNING)
    if settings.output_mode not in ("dict", "list"):
        log.error("ANNOTATIONS_ENTITY_OUTPUT_MODE must be 'dict' or 'list', not %r", settings.output_mode)
        return 2
    try:
        pack, _ = settings.resolve_pack()  # fail fast, before binding the port
    except Exception as exc:  # noqa: BLE001
        log.error("%s", exc)
        return 1
    scheme = "https" if settings.tls_cert else "http"
    log.info("starting on %s://%s:%d (pack %s, bulk nproc %d, output mode %s)",
             scheme, settings.host, settings.port, pack, settings.bulk_nproc, settings.output_mode)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1,
                            access_log=settings.access_log, log_level="info",
                            timeout_keep_alive=30,
                            ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    _server = uvicorn.Server(config)
    _server.run()  # uvicorn exits the process with status 1 if it cannot bind
    if medcat.failed:
        log.error("exiting: model load failed: %s", medcat.failed)
        return 1
    return 0


# The guard matters: with APP_BULK_NPROC > 1 MedCAT spawns workers that
# re-import this module, and they must not start a server.
if __name__ == "__main__":
    sys.exit(main())
