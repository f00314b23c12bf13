"""The HTTP side of Label Studio's ML backend protocol (compatible with label-studio-ml 2.x).

Routes: /health, /setup, /predict, /webhook, /versions, /metrics, /report. Every error is a JSON body
``{"error": ..., "detail": ...}`` with a 4xx status that says what was wrong with the request; a bad task in
/predict gets an empty result with its reason in ``error`` (a field Label Studio ignores), never a 5xx.
"""

from __future__ import annotations

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
from ml_backend.models.registry import LabelSetMismatch, ModelRegistry, ProjectQuotaExceeded
from ml_backend.models.store import StorageQuotaExceeded, VersionStore, project_key
from ml_backend.serve.metrics import AppMetrics
from ml_backend.serve.predictor import Predictor
from ml_backend.serve.security import BodySizeLimit, basic_auth_ok, webhook_secret_ok

log = logging.getLogger(__name__)


class RequestError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def _error(status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


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


async def _json_body(request: Request) -> dict[str, Any]:
    return _parse_json(await request.body())


def _schema(config: Any, settings: Settings) -> ProjectSchema:
    if not isinstance(config, str):
        raise RequestError(400, "label config missing: expected a string in 'label_config' (or 'schema' on /setup)")
    try:
        return parse_label_config(config, ignore_labels=settings.ignore_labels)
    except LabelConfigError as exc:
        raise RequestError(422, f"label config unusable: {exc}") from None


def _project(value: Any) -> str:
    try:
        return project_key(value)
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None


def _model_call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Registry calls with their refusals turned into answers that say what to do."""
    try:
        return function(*args, **kwargs)
    except LabelSetMismatch as exc:
        raise RequestError(422, str(exc)) from None
    except ProjectQuotaExceeded as exc:
        raise RequestError(403, str(exc), "raise MAX_PROJECTS or delete unused projects under MODEL_DIR") from None
    except StorageQuotaExceeded as exc:
        raise RequestError(507, str(exc)) from None


def _want_json(request: Request) -> bool:
    return request.query_params.get("format") == "json" or "application/json" in request.headers.get("accept", "")


class _Routes:
    """The route handlers, sharing the app's parts; ``create_app`` wires them to paths."""

    def __init__(self, settings: Settings, webhook: WebhookHandler) -> None:
        self.settings = settings
        self.store = VersionStore(settings.model_dir, settings.max_model_dir_bytes)
        self.registry = ModelRegistry(settings, self.store)
        self.predictor = Predictor(settings)
        self.webhook = webhook
        self.schemas: dict[str, ProjectSchema] = {}  # last label config seen per project (setup may precede predict)
        self.metrics = AppMetrics(lambda: self.predictor.stats, webhook.stats)

    async def health(self) -> dict[str, Any]:
        # Nothing about projects here: /health answers whoever asks when no auth is configured.
        return {"status": "UP", "model_class": "MEDebiaser", "version": __version__}

    async def setup(self, request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        project = _project(body.get("project"))
        config = body.get("schema", body.get("label_config"))
        _schema(config, self.settings)  # a 4xx for a missing or unusable config, before anything is recorded
        # Records the ignore labels the project declares in its extra params and logs how each label is read.
        schema = await run_in_threadpool(self.webhook.setup_project, project, str(config), body.get("extra_params"))
        version = await run_in_threadpool(_model_call, self.registry.ensure_version, project, schema.findings)
        self.schemas[project] = schema
        return {"model_version": version}

    async def predict(self, request: Request) -> Response:
        body = await _json_body(request)
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise RequestError(400, "'tasks' must be a list of Label Studio task objects")
        project = _project(body.get("project"))
        config = body.get("label_config")
        known = self.schemas.get(project)
        schema = known if config is None and known is not None else _schema(config, self.settings)
        if not tasks:
            return JSONResponse({"results": []})
        loaded = await run_in_threadpool(
            _model_call, self.registry.get, project, schema.findings, allow_label_change=False
        )
        self.schemas[project] = schema
        results = await run_in_threadpool(self.predictor.predict, tasks, schema, loaded)
        # orjson in the thread pool: a batch of full-size heatmaps is tens of MB of integers, which the stdlib
        # encoder (and FastAPI's) would serialise several times slower, on the event loop.
        payload = await run_in_threadpool(
            orjson.dumps, {"results": results, "model_version": loaded.version}, None, orjson.OPT_SERIALIZE_NUMPY
        )
        return Response(payload, media_type="application/json")

    async def webhook_route(self, request: Request) -> JSONResponse:
        received = time.perf_counter()
        raw = await request.body()

        def parse_and_handle() -> tuple[int, dict[str, Any]]:
            # Off the event loop: a webhook carrying full-size brush masks must not stall /health or /predict.
            body = _parse_json(raw)
            status, answer = self.webhook.handle(body)
            if status < 300 and body.get("action") == "PROJECT_UPDATED":
                answer.update(self._apply_project_update(body))
            return status, answer

        status, answer = await run_in_threadpool(parse_and_handle)
        answer["ack_ms"] = round((time.perf_counter() - received) * 1000, 3)
        return JSONResponse(answer, status_code=status)

    def _apply_project_update(self, body: dict[str, Any]) -> dict[str, Any]:
        """PROJECT_UPDATED is, with /setup, where a new label set reaches the model (never /predict)."""
        project_body = body.get("project")
        config = project_body.get("label_config") if isinstance(project_body, dict) else None
        if not isinstance(config, str):
            return {}
        try:
            project = project_key(project_body)
            schema = parse_label_config(config, ignore_labels=self.settings.ignore_labels)
            version = self.registry.ensure_version(project, schema.findings)
        except (ValueError, ProjectQuotaExceeded, StorageQuotaExceeded) as exc:  # recorded; the model stays
            return {"model_version_error": str(exc)[:300]}
        self.schemas[project] = schema
        return {"model_version": version}

    async def versions(self, project: str | None = None) -> dict[str, Any]:
        projects = [_project(project)] if project else self.store.projects()
        detail: dict[str, dict[str, Any]] = {
            p: {
                "live": self.store.live_version(p),
                "versions": [v.meta.summary() for v in self.store.list_versions(p)],
            }
            for p in projects
        }
        names = sorted({v["version"] for d in detail.values() for v in d["versions"]}, key=lambda n: int(n[1:]))
        return {"versions": names, "projects": detail}

    async def metrics_route(self, request: Request) -> Response:
        if not _want_json(request):
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
        stats = self.predictor.stats
        predict: dict[str, Any] = {
            "requests": stats.requests,
            "tasks": stats.tasks,
            "failed_tasks": stats.failed_tasks,
            "seconds_total": round(stats.seconds_total, 3),
            "seconds_fetch": round(stats.seconds_fetch, 3),
            "seconds_model": round(stats.seconds_model, 3),
            "seconds_heatmaps": round(stats.seconds_heatmaps, 3),
            "tasks_per_second": round(stats.tasks / stats.seconds_total, 2) if stats.seconds_total else None,
        }
        if self.settings.basic_auth_user:
            # Error texts name URLs and paths: only for a caller who passed basic auth. Without auth configured
            # each task's reason is still in its /predict answer and in the log.
            predict["last_errors"] = stats.last_errors
        return JSONResponse(
            {
                "predict": predict,
                "webhook": self.webhook.stats(),
                "live_versions": {p: self.store.live_version(p) for p in self.store.projects()}
                if self.settings.basic_auth_user
                else None,
            }
        )

    async def report(self, project: str | None = None) -> HTMLResponse:
        from ml_backend.measure.project_report import render_project_report  # matplotlib loads only when asked

        key = _project(project) if project else (self.store.projects() or ["default"])[0]
        html = await run_in_threadpool(render_project_report, self.store, key)
        return HTMLResponse(html)


def create_app(settings: Settings | None = None, webhook: WebhookHandler | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    routes = _Routes(settings, webhook or WebhookHandler(settings))
    app = FastAPI(title="MEDebiaser ML backend", version=__version__)
    app.state.settings, app.state.registry = settings, routes.registry
    app.state.predictor, app.state.webhook, app.state.routes = routes.predictor, routes.webhook, routes

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001, ANN202 - starlette's middleware signature
        started = time.perf_counter()
        refusal = _refusal(request, settings)
        if refusal is not None:
            response: Response = refusal
        else:
            try:
                response = await call_next(request)
            except RequestError as exc:
                response = _error(exc.status, exc.error, exc.detail)
        routes.metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.detail)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")  # a bug: the fuzz test (tests/test_fuzz_routes.py) hunts for these
        return _error(500, f"internal error: {exc.__class__.__name__}")

    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/", routes.health, methods=["GET"])
    app.add_api_route("/setup", routes.setup, methods=["POST"])
    app.add_api_route("/predict", routes.predict, methods=["POST"])
    app.add_api_route("/webhook", routes.webhook_route, methods=["POST"])
    app.add_api_route("/versions", routes.versions, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics_route, methods=["GET"])
    app.add_api_route("/report", routes.report, methods=["GET"], response_class=HTMLResponse)
    # Outermost: a declared Content-Length over the limit is refused before any route or auth check reads it.
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    return app


def _refusal(request: Request, settings: Settings) -> Response | None:
    """The 401 for a request without valid credentials, or None when it may proceed."""
    is_webhook = request.url.path == "/webhook"
    header = request.headers.get("x-webhook-secret")
    # Starlette decodes header values as latin-1: back to the bytes the client sent (UTF-8 for a non-ASCII secret)
    given_secret: str | bytes = header.encode("latin-1") if header else request.query_params.get("token") or ""
    if settings.basic_auth_user:
        if basic_auth_ok(request.headers.get("authorization", ""), settings):
            return None
        if is_webhook and webhook_secret_ok(given_secret, settings):
            return None
        return _error(
            401,
            "authentication required",
            "HTTP basic auth (or the webhook secret on /webhook)",
            headers={"WWW-Authenticate": 'Basic realm="medebiaser"'},
        )
    if settings.webhook_secret and is_webhook and not webhook_secret_ok(given_secret, settings):
        return _error(401, "webhook secret missing or wrong", "send it as header X-Webhook-Secret or ?token=")
    return None
