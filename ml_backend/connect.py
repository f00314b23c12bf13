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
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from ml_backend.io.label_studio import (
    REVIEW_VIEW_TITLE,
    SCORE_ORDERING,
    LabelStudioError,
    ModelVersionNotInProject,
    body_text,
    call_sdk,
    make_client,
    refused,
    set_project_model_version,
    set_review_view,
    ssrf_blocked,
)

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Webhook-Secret"
# One error type for every Label Studio step; the name says where `medebiaser connect` users meet it.
ConnectError = LabelStudioError

__all__ = [
    "REVIEW_VIEW_TITLE",
    "SCORE_ORDERING",
    "ConnectError",
    "ConnectResult",
    "ModelVersionNotInProject",
    "connect_project",
    "fetch_backend_version",
    "make_client",
    "set_project_model_version",
    "set_review_view",
]

SSRF_HINT = (
    "set ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false in the Label Studio server's environment "
    "and restart it (its SSRF protection refuses backend URLs on local or private networks, such as "
    "127.0.0.1 or a docker-compose service name)"
)

T = TypeVar("T")


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
        project = call_sdk(client, "read the project", client.projects.get, id=project_id)
    except ApiError as exc:
        if exc.status_code == 404:
            raise ConnectError(
                f"project {project_id} does not exist in Label Studio at {ls_url}, or this token's user "
                "cannot see it; check the id in the project's URL (/projects/<id>/...)"
            ) from exc
        raise refused(exc, f"read project {project_id}") from exc

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
        raise refused(exc, "create the review tab") from exc
    if view_changed:
        changes.append(f"Data Manager tab {view_title!r} ordered by prediction score")

    for change in changes:
        log.info("connect: %s", change)
    return ConnectResult(project_id, ml_id, webhook_ids, model_version, view_id, applied, tuple(changes))


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
        backends = call_sdk(client, "list ML backends", client.ml.list, project=project_id)
        same = sorted((b for b in backends if _norm(b.url) == backend_url), key=lambda b: b.id or 0)
        if not same:
            add = client.ml.create
            created = call_sdk(client, "add the ML backend", add, project=project_id, url=backend_url, **wanted)
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
            call_sdk(client, "update the ML backend", client.ml.update, id=int(backend.id), **full)
            changes.append(f"ML backend {backend.id} updated: {sorted(diff)}")
        return int(backend.id)
    except ApiError as exc:
        raise _ml_error(exc, backend_url) from exc


def _ml_error(exc: ApiError, backend_url: str) -> ConnectError:
    text = body_text(exc)
    if ssrf_blocked(exc):
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
    return refused(exc, f"register the ML backend {backend_url}")


def _ensure_webhook_secret(
    client: LabelStudio, project_id: int, backend_url: str, secret: str, changes: list[str]
) -> tuple[int, ...]:
    # LS creates <backend>/webhook (send_payload, all actions, no headers) when the ML backend is created,
    # unless SSRF protection refused it or a webhook with that URL already existed.
    webhook_url = f"{backend_url}/webhook"
    try:
        hooks = call_sdk(client, "list webhooks", client.webhooks.list, project=str(project_id))
        ours = [h for h in hooks if h.project == project_id and _norm(h.url) == webhook_url]
        if not ours:
            created = call_sdk(
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
                call_sdk(client, "update the backend's webhook", client.webhooks.update, id=int(hook.id), **patch)
                changes.append(f"webhook {hook.id} updated: {sorted(patch)}")
        return tuple(int(h.id) for h in ours)
    except ApiError as exc:
        if ssrf_blocked(exc) or (exc.status_code == 400 and "not allowed" in body_text(exc).lower()):
            raise ConnectError(f"Label Studio refused the webhook URL {webhook_url}: {SSRF_HINT}") from exc
        raise refused(exc, f"set up the webhook {webhook_url}") from exc
