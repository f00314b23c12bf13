"""Connect a Label Studio project to this backend: the code behind ``medebiaser connect``.

What a working connection needs, beyond what Label Studio's "Connect model" dialog does:

* the ML backend registered on the project (non-interactive, optional basic auth);
* the webhook that Label Studio creates for it (``<backend>/webhook``) carrying ``X-Webhook-Secret``, because
  Label Studio sends no auth on that webhook and the backend refuses unauthenticated events;
* the project's ``model_version`` set to the backend's version: the Data Manager's "Prediction score" column
  averages only predictions of that version (connecting sets it to the backend's *title* instead). Label
  Studio accepts it only once a prediction of that version exists, so on a fresh project this step waits for
  the next run (or for ``set_project_model_version`` after predictions are stored);
* a Data Manager tab "Review queue" ordered by prediction score, descending.

Every step reads first and writes only what differs, so running ``connect_project`` again changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Webhook-Secret"
REVIEW_VIEW_TITLE = "Review queue"
# Data Manager ordering keys are column ids without the "filter:" prefix; "-" sorts descending.
SCORE_ORDERING: list[str] = ["-tasks:predictions_score"]

SSRF_HINT = (
    "set ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false in the Label Studio server's environment "
    "and restart it (its SSRF protection refuses backend URLs on local or private networks, such as "
    "127.0.0.1 or a docker-compose service name)"
)

T = TypeVar("T")


class ConnectError(RuntimeError):
    """A connection step failed; the message says what to do about it."""


class ModelVersionNotInProject(ConnectError):
    """Label Studio accepts a project model_version only once predictions of that version (or an ML backend
    titled so) exist; until the first predictions are stored, the project keeps its previous version."""


@dataclass(frozen=True)
class ConnectResult:
    project_id: int
    ml_backend_id: int
    webhook_ids: tuple[int, ...]
    model_version: str
    view_id: int
    # False while no prediction of model_version exists yet (LS refuses the version until then): call
    # set_project_model_version again once predictions are stored, as the ranking job does.
    model_version_applied: bool = True
    changes: tuple[str, ...] = field(default=())  # what this run changed; empty when it was already connected

    @property
    def changed(self) -> bool:
        return bool(self.changes)


# -- plumbing ------------------------------------------------------------------------------------------------
def make_client(ls_url: str, api_key: str, *, timeout: float = 30.0) -> LabelStudio:
    """An SDK client for a legacy token or a personal access token (a JWT the SDK exchanges)."""
    if not api_key:
        raise ConnectError("no Label Studio API token given: pass --api-key or set LABEL_STUDIO_API_KEY")
    try:
        # max_retries=1: the SDK retries 5xx/409/429 with backoff, which only delays a clear error here.
        return LabelStudio(base_url=ls_url.rstrip("/"), api_key=api_key, timeout=timeout, max_retries=1)
    except ApiError as exc:  # the SDK rejects an expired or malformed personal access token up front
        raise _token_error(ls_url, exc) from exc


def _body_text(exc: ApiError) -> str:
    body = exc.body
    if isinstance(body, dict):
        for key in ("detail", "validation_errors", "message", "error"):
            if key in body:
                return str(body[key])
    return str(body)


def _token_error(ls_url: str, exc: ApiError) -> ConnectError:
    return ConnectError(
        f"Label Studio at {ls_url} rejected the API token ({exc.status_code}: {_body_text(exc)}). Use the "
        "token from Account & Settings in Label Studio: a personal access token, or a legacy token (legacy "
        "tokens must be enabled in Organization > API Tokens Settings)."
    )


def _call(client: LabelStudio, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one SDK call; turn transport errors and 401s into ConnectError, let other ApiErrors through."""
    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        if exc.status_code == 401:
            raise _token_error(_base_url(client), exc) from exc
        raise
    except httpx.TimeoutException as exc:
        raise ConnectError(f"Label Studio at {_base_url(client)} did not answer in time to {what}") from exc
    except httpx.HTTPError as exc:
        raise ConnectError(
            f"cannot reach Label Studio at {_base_url(client)} ({exc.__class__.__name__}: {exc}); "
            "is it running, and is the URL right?"
        ) from exc


def _base_url(client: LabelStudio) -> str:
    wrapper = getattr(client, "_client_wrapper", None)  # the SDK keeps it there; only used in messages
    return wrapper.get_base_url() if wrapper is not None else "(Label Studio)"


def _ssrf_blocked(exc: ApiError) -> bool:
    text = _body_text(exc).lower()
    return exc.status_code == 403 and ("not allowed" in text or "reserved network" in text or "ssrf" in text)


def _norm(url: str) -> str:
    return url.strip().rstrip("/")


# -- the backend itself --------------------------------------------------------------------------------------
def fetch_backend_version(
    backend_url: str,
    *,
    project_id: int,
    label_config: str,
    ls_url: str,
    project_created_ts: int = 0,
    basic_auth: tuple[str, str] | None = None,
    timeout: float = 30.0,
) -> str:
    """The backend's current version for a project: ``GET /health``'s ``model_version``, else ``POST /setup``.

    Also the reachability check: fails with a ConnectError that names the URL when the backend is down.
    """
    base = _norm(backend_url)
    try:
        with httpx.Client(timeout=timeout, auth=basic_auth) as http:
            health = http.get(f"{base}/health")
            _raise_for_backend(health, base, "/health")
            version = _json(health).get("model_version")
            if version:
                return str(version)
            # Same body Label Studio sends; the backend keys versions by project, so /setup is authoritative.
            setup = http.post(
                f"{base}/setup",
                json={
                    "project": f"{project_id}.{project_created_ts}",
                    "schema": label_config,
                    "hostname": ls_url,
                    "extra_params": None,
                },
            )
            _raise_for_backend(setup, base, "/setup")
            version = _json(setup).get("model_version")
    except httpx.HTTPError as exc:
        raise ConnectError(
            f"cannot reach the ML backend at {base} ({exc.__class__.__name__}: {exc}); start it with "
            "`medebiaser serve` and check the URL (it must be reachable from here and from Label Studio)"
        ) from exc
    if not version:
        raise ConnectError(f"the ML backend at {base} answered /setup without a model_version")
    return str(version)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _raise_for_backend(response: httpx.Response, base: str, path: str) -> None:
    if response.status_code == 401:
        raise ConnectError(
            f"the ML backend at {base} requires authentication ({path} answered 401): pass the same "
            "basic-auth user and password the backend was started with (BASIC_AUTH_USER / BASIC_AUTH_PASS)"
        )
    if response.status_code >= 400:
        raise ConnectError(
            f"the ML backend at {base} answered {path} with {response.status_code}: {response.text[:500]}"
        )


# -- project-level settings, reused by the ranking job after every new model version -------------------------
def set_project_model_version(client: LabelStudio, project_id: int, model_version: str) -> bool:
    """Point the project at ``model_version`` so "Prediction score" averages that version's scores.

    Returns True when it changed anything. Raises ModelVersionNotInProject while the project holds no
    prediction of that version: Label Studio 1.23 validates the field against predictions and backend titles.
    """
    project = _call(client, "read the project", client.projects.get, id=project_id)
    if project.model_version == model_version:
        return False
    try:
        _call(
            client,
            "set the project's model version",
            client.projects.update,
            id=project_id,
            model_version=model_version,
        )
    except ApiError as exc:
        if exc.status_code == 400 and "model_version" in str(exc.body):
            raise ModelVersionNotInProject(
                f"Label Studio keeps project {project_id} on model version {project.model_version!r} until "
                f"predictions of {model_version!r} exist ({_body_text(exc)}); retrieve predictions first"
            ) from exc
        raise _generic(exc, "set the project's model version") from exc
    return True


def _view_title(view: Any) -> str | None:
    data = view.data if isinstance(view.data, dict) else {}
    return data.get("title")


def set_review_view(
    client: LabelStudio,
    project_id: int,
    *,
    title: str = REVIEW_VIEW_TITLE,
    ordering: list[str] | None = None,
) -> tuple[int, bool]:
    """Create or fix the Data Manager tab ``title``, ordered by prediction score (highest first).

    Returns (view id, changed). Filters and columns a user set on that tab are kept; only the ordering is
    enforced.
    """
    ordering = list(ordering or SCORE_ORDERING)
    views = _call(client, "list Data Manager tabs", client.views.list, project=project_id)
    existing = sorted((v for v in views if _view_title(v) == title), key=lambda v: v.id or 0)
    if existing:
        view = existing[0]
        data = dict(view.data) if isinstance(view.data, dict) else {}
        if data.get("ordering") == ordering:
            return int(view.id), False
        # PATCH replaces the whole `data` (LS moves `ordering` out of it into its own column): send it all.
        data["ordering"] = ordering
        data.setdefault("filters", {"conjunction": "and", "items": []})
        _call(
            client,
            "update the review tab",
            client.views.update,
            id=str(view.id),
            data=data,
            project=project_id,
        )
        return int(view.id), True
    # The shape the Data Manager itself posts for a new tab, minus UI-only keys it fills in on first display.
    data = {
        "title": title,
        "type": "list",
        "target": "tasks",
        "ordering": ordering,
        "filters": {"conjunction": "and", "items": []},
    }
    view = _call(client, "create the review tab", client.views.create, project=project_id, data=data)
    return int(view.id), True


# -- the whole connection ------------------------------------------------------------------------------------
def connect_project(
    ls_url: str,
    api_key: str,
    project_id: int,
    backend_url: str,
    *,
    webhook_secret: str,
    model_version: str | None = None,
    title: str = "MEDebiaser",
    basic_auth: tuple[str, str] | None = None,
    backend_check_url: str | None = None,
    view_title: str = REVIEW_VIEW_TITLE,
    timeout: float = 30.0,
) -> ConnectResult:
    """Connect project ``project_id`` to the backend at ``backend_url`` (the URL *Label Studio* uses).

    ``backend_check_url`` is how this machine reaches the backend when that differs (e.g. the CLI runs on the
    host while Label Studio reaches the backend as ``http://backend:9090`` in docker compose).
    Idempotent: a second run with the same arguments changes nothing and reports no changes.
    """
    if not ls_url:
        raise ConnectError("no Label Studio URL given: pass --url or set LABEL_STUDIO_URL")
    if not webhook_secret:
        raise ConnectError("a webhook secret is required (WEBHOOK_SECRET): the backend refuses webhooks without it")
    backend_url = _norm(backend_url)
    client = make_client(ls_url, api_key, timeout=timeout)
    changes: list[str] = []

    try:
        project = _call(client, "read the project", client.projects.get, id=project_id)
    except ApiError as exc:
        if exc.status_code == 404:
            raise ConnectError(
                f"project {project_id} does not exist in Label Studio at {ls_url}, or this token's user "
                "cannot see it; check the id in the project's URL (/projects/<id>/...)"
            ) from exc
        raise _generic(exc, f"read project {project_id}") from exc

    if model_version is None:
        created = int(project.created_at.timestamp()) if project.created_at else 0
        model_version = fetch_backend_version(
            backend_check_url or backend_url,
            project_id=project_id,
            label_config=project.label_config or "",
            ls_url=ls_url,
            project_created_ts=created,
            basic_auth=basic_auth,
            timeout=timeout,
        )

    ml_id = _ensure_ml_backend(client, project_id, backend_url, title, basic_auth, changes)
    webhook_ids = _ensure_webhook_secret(client, project_id, backend_url, webhook_secret, changes)
    applied = True
    try:
        if set_project_model_version(client, project_id, model_version):
            changes.append(f"project model_version -> {model_version}")
    except ModelVersionNotInProject as exc:
        applied = False  # normal for a fresh project: the first predictions make it possible
        log.info("connect: %s", exc)
    try:
        view_id, view_changed = set_review_view(client, project_id, title=view_title)
    except ApiError as exc:
        raise _generic(exc, "create the review tab") from exc
    if view_changed:
        changes.append(f"Data Manager tab {view_title!r} ordered by prediction score")

    for change in changes:
        log.info("connect: %s", change)
    return ConnectResult(project_id, ml_id, webhook_ids, model_version, view_id, applied, tuple(changes))


def _generic(exc: ApiError, what: str) -> ConnectError:
    return ConnectError(f"Label Studio refused to {what} ({exc.status_code}: {_body_text(exc)})")


def _ensure_ml_backend(
    client: LabelStudio,
    project_id: int,
    backend_url: str,
    title: str,
    basic_auth: tuple[str, str] | None,
    changes: list[str],
) -> int:
    wanted: dict[str, Any] = {"is_interactive": False, "title": title}
    if basic_auth:
        wanted.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
    else:
        wanted["auth_method"] = "NONE"
    try:
        backends = _call(client, "list ML backends", client.ml.list, project=project_id)
        same = sorted((b for b in backends if _norm(b.url) == backend_url), key=lambda b: b.id or 0)
        if not same:
            add = client.ml.create
            created = _call(client, "add the ML backend", add, project=project_id, url=backend_url, **wanted)
            changes.append(f"ML backend {backend_url} added")
            return int(created.id)
        backend = same[0]
        # The password is write-only (only basic_auth_pass_is_set comes back), so it cannot be compared: a
        # re-run PATCHes only when a visible field differs (a PATCH makes LS re-run /health and /setup).
        diff = {k: v for k, v in wanted.items() if k != "basic_auth_pass" and getattr(backend, k, None) != v}
        if basic_auth and not backend.basic_auth_pass_is_set:
            diff["basic_auth_pass"] = "(set)"
        if diff:
            # LS re-validates a PATCH like a create (health check and /setup with the *submitted* fields):
            # without url and project it fails with a 500, without user and password basic auth is refused.
            full = {**wanted, "url": backend_url, "project": project_id}
            _call(client, "update the ML backend", client.ml.update, id=int(backend.id), **full)
            changes.append(f"ML backend {backend.id} updated: {sorted(diff)}")
        return int(backend.id)
    except ApiError as exc:
        raise _ml_error(exc, backend_url) from exc


def _ml_error(exc: ApiError, backend_url: str) -> ConnectError:
    text = _body_text(exc)
    if _ssrf_blocked(exc):
        return ConnectError(f"Label Studio refused the backend URL {backend_url} ({text}): {SSRF_HINT}")
    if exc.status_code == 403:
        return ConnectError(f"this token's user may not add ML backends to the project (403: {text})")
    if exc.status_code == 400:
        # LS health-checks and calls /setup itself before saving: this is its view of the backend.
        return ConnectError(
            f"Label Studio could not use the ML backend at {backend_url}: {text} -- the URL must be "
            "reachable from the Label Studio server (in docker compose, the service name: http://backend:9090)"
        )
    if "resolve hostname" in text:
        return ConnectError(f"Label Studio cannot resolve the backend's host name in {backend_url} ({text})")
    return _generic(exc, f"register the ML backend {backend_url}")


def _ensure_webhook_secret(
    client: LabelStudio, project_id: int, backend_url: str, secret: str, changes: list[str]
) -> tuple[int, ...]:
    # LS creates <backend>/webhook (send_payload, all actions, no headers) when the ML backend is created,
    # unless SSRF protection refused it or a webhook with that URL already existed.
    webhook_url = f"{backend_url}/webhook"
    try:
        hooks = _call(client, "list webhooks", client.webhooks.list, project=str(project_id))
        ours = [h for h in hooks if h.project == project_id and _norm(h.url) == webhook_url]
        if not ours:
            created = _call(
                client,
                "create the backend's webhook",
                client.webhooks.create,
                project=project_id,
                url=webhook_url,
                send_payload=True,
                send_for_all_actions=True,
                is_active=True,
                headers={SECRET_HEADER: secret},
            )
            changes.append(f"webhook {webhook_url} created with {SECRET_HEADER}")
            return (int(created.id),)
        for hook in ours:
            headers = dict(hook.headers) if isinstance(hook.headers, dict) else {}
            patch: dict[str, Any] = {}
            if headers.get(SECRET_HEADER) != secret:
                others = {k: v for k, v in headers.items() if k.lower() != SECRET_HEADER.lower()}
                patch["headers"] = {**others, SECRET_HEADER: secret}
            # The backend learns from the payload, and a disabled hook delivers nothing.
            if not hook.send_payload:
                patch["send_payload"] = True
            if hook.is_active is False:
                patch["is_active"] = True
            if patch:
                _call(client, "update the backend's webhook", client.webhooks.update, id=int(hook.id), **patch)
                changes.append(f"webhook {hook.id} updated: {sorted(patch)}")
        return tuple(int(h.id) for h in ours)
    except ApiError as exc:
        if _ssrf_blocked(exc) or (exc.status_code == 400 and "not allowed" in _body_text(exc).lower()):
            raise ConnectError(f"Label Studio refused the webhook URL {webhook_url}: {SSRF_HINT}") from exc
        raise _generic(exc, f"set up the webhook {webhook_url}") from exc
