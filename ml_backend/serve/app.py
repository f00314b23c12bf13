"""The HTTP side of Label Studio's ML backend protocol (compatible with label-studio-ml 2.x).

Routes: /health, /setup, /predict, /webhook, /versions, /metrics, /report. Every error is a JSON body
``{"error": ..., "detail": ...}`` with a 4xx status that says what was wrong with the request.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ml_backend import __version__
from ml_backend.config import Settings
from ml_backend.feedback.webhook import WebhookHandler
from ml_backend.io.label_config import LabelConfigError, ProjectSchema, parse_label_config
from ml_backend.models.registry import ModelRegistry
from ml_backend.models.store import VersionStore, project_key
from ml_backend.serve.predictor import Predictor

log = logging.getLogger(__name__)


class RequestError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def _error(status: int, error: str, detail: Any = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any]:
    return _parse_json(await request.body())


def _parse_json(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise RequestError(400, "request body is empty; expected a JSON object")
    try:
        # orjson: brush masks make bodies of megabytes of integers; the stdlib parser is ~2-3x slower
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, "request body is not valid JSON", str(exc)) from None
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _schema(config: Any) -> ProjectSchema:
    if not isinstance(config, str):
        raise RequestError(400, "label config missing: expected a string in 'label_config' (or 'schema' on /setup)")
    try:
        return parse_label_config(config)
    except LabelConfigError as exc:
        raise RequestError(422, f"label config unusable: {exc}") from None


def _project(value: Any) -> str:
    try:
        return project_key(value)
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None


def _basic_auth_ok(request: Request, settings: Settings) -> bool:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user, settings.basic_auth_user or "") and hmac.compare_digest(
        password, settings.basic_auth_pass or ""
    )


def _webhook_secret_ok(request: Request, settings: Settings) -> bool:
    if not settings.webhook_secret:
        return False
    given = request.headers.get("x-webhook-secret") or request.query_params.get("token") or ""
    return hmac.compare_digest(given, settings.webhook_secret)


def create_app(settings: Settings | None = None, webhook: WebhookHandler | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    store = VersionStore(settings.model_dir)
    registry = ModelRegistry(settings, store)
    predictor = Predictor(settings)
    webhook = webhook or WebhookHandler(settings)
    schemas: dict[str, ProjectSchema] = {}  # last label config seen per project (setup may precede predict)
    app = FastAPI(title="MEDebiaser ML backend", version=__version__)
    app.state.settings, app.state.registry, app.state.predictor, app.state.webhook = (
        settings,
        registry,
        predictor,
        webhook,
    )

    @app.middleware("http")
    async def auth(request: Request, call_next):  # noqa: ANN001, ANN202 - starlette's middleware signature
        if settings.basic_auth_user:
            allowed = _basic_auth_ok(request, settings) or (
                request.url.path == "/webhook" and _webhook_secret_ok(request, settings)
            )
            if not allowed:
                return JSONResponse(
                    {
                        "error": "authentication required",
                        "detail": "HTTP basic auth (or the webhook secret on /webhook)",
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="medebiaser"'},
                )
        elif settings.webhook_secret and request.url.path == "/webhook" and not _webhook_secret_ok(request, settings):
            return _error(401, "webhook secret missing or wrong", "send it as header X-Webhook-Secret or ?token=")
        try:
            return await call_next(request)
        except RequestError as exc:
            return _error(exc.status, exc.error, exc.detail)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.detail)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {exc.__class__.__name__}", str(exc))

    @app.get("/health")
    @app.get("/")
    async def health() -> dict[str, Any]:
        return {
            "status": "UP",
            "model_class": "MEDebiaser",
            "backbone": settings.backbone,
            "live_versions": {p: store.live_version(p) for p in store.projects()},
        }

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        project = _project(body.get("project"))
        schema = _schema(body.get("schema", body.get("label_config")))
        schemas[project] = schema
        version = await run_in_threadpool(registry.ensure_version, project, schema.findings)
        return {"model_version": version}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        body = await _json_body(request)
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise RequestError(400, "'tasks' must be a list of Label Studio task objects")
        project = _project(body.get("project"))
        config = body.get("label_config")
        schema = _schema(config) if config is not None or project not in schemas else schemas[project]
        schemas[project] = schema
        if not tasks:
            return JSONResponse({"results": []})
        loaded = await run_in_threadpool(registry.get, project, schema.findings)
        results = await run_in_threadpool(predictor.predict, tasks, schema, loaded)
        # orjson in the thread pool: a batch of full-size heatmaps is tens of MB of integers, which the stdlib
        # encoder (and FastAPI's) would serialise several times slower, on the event loop.
        payload = await run_in_threadpool(
            orjson.dumps, {"results": results, "model_version": loaded.version}, None, orjson.OPT_SERIALIZE_NUMPY
        )
        return Response(payload, media_type="application/json")

    @app.post("/webhook")
    async def webhook_route(request: Request) -> JSONResponse:
        received = time.perf_counter()
        raw = await request.body()

        def parse_and_handle() -> tuple[int, dict[str, Any]]:
            # Off the event loop: a webhook carrying full-size brush masks must not stall /health or /predict.
            return webhook.handle(_parse_json(raw))

        status, answer = await run_in_threadpool(parse_and_handle)
        answer["ack_ms"] = round((time.perf_counter() - received) * 1000, 3)
        return JSONResponse(answer, status_code=status)

    @app.get("/versions")
    async def versions(project: str | None = None) -> dict[str, Any]:
        projects = [_project(project)] if project else store.projects()
        detail = {
            p: {"live": store.live_version(p), "versions": [_version_summary(v.meta) for v in store.list_versions(p)]}
            for p in projects
        }
        names = sorted({v["version"] for d in detail.values() for v in d["versions"]}, key=lambda n: int(n[1:]))
        return {"versions": names, "projects": detail}

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        stats = predictor.stats
        return {
            "predict": {
                "requests": stats.requests,
                "tasks": stats.tasks,
                "failed_tasks": stats.failed_tasks,
                "seconds_total": round(stats.seconds_total, 3),
                "seconds_fetch": round(stats.seconds_fetch, 3),
                "seconds_model": round(stats.seconds_model, 3),
                "seconds_heatmaps": round(stats.seconds_heatmaps, 3),
                "tasks_per_second": round(stats.tasks / stats.seconds_total, 2) if stats.seconds_total else None,
                "last_errors": stats.last_errors,
            },
            "webhook": webhook.stats(),
            "live_versions": {p: store.live_version(p) for p in store.projects()},
        }

    @app.get("/report", response_class=HTMLResponse)
    async def report(project: str | None = None) -> HTMLResponse:
        from ml_backend.measure.project_report import render_project_report  # matplotlib loads only when asked

        key = _project(project) if project else (store.projects() or ["default"])[0]
        html = await run_in_threadpool(render_project_report, store, key)
        return HTMLResponse(html)

    return app


def _version_summary(meta: dict[str, Any]) -> dict[str, Any]:
    training = meta.get("training") or {}
    metrics = meta.get("metrics") or {}
    return {
        "version": meta.get("version"),
        "parent": meta.get("parent"),
        "created_at": meta.get("created_at"),
        "kind": meta.get("kind"),
        "annotations": training.get("annotations_used"),
        "macro_f1": metrics.get("macro_f1"),
        "macro_auroc": metrics.get("macro_auroc"),
    }
