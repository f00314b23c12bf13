"""The Label Studio adapter: every call this backend makes to Label Studio's API goes through here.

One client factory (``make_client``, ``client_from_settings``: timeouts and retries), one error type
(``LabelStudioError``, whose message says what to do), and the calls the loop needs: tasks (with their
annotations and predictions), predictions written and updated in place, the project's model version, the
review tab of the Data Manager, and the project's extra params. ``connect.py`` (``medebiaser connect``) builds
on it; the ranking job and the reconcile step use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from ml_backend.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

REVIEW_VIEW_TITLE = "Review queue"
# Data Manager ordering keys are column ids without the "filter:" prefix; "-" sorts descending.
SCORE_ORDERING: list[str] = ["-tasks:predictions_score"]


class LabelStudioError(RuntimeError):
    """A Label Studio call failed; the message says what to do about it."""


class ProjectNotFound(LabelStudioError):
    """Label Studio has no project of that id (or the token cannot see it)."""


class ModelVersionNotInProject(LabelStudioError):
    """Label Studio accepts a project model_version only once predictions of that version (or an ML backend
    titled so) exist; until the first predictions are stored, the project keeps its previous version."""


def make_client(ls_url: str, api_key: str, *, timeout: float = 30.0, retries: int = 1) -> LabelStudio:
    """An SDK client for a legacy token or a personal access token (a JWT the SDK exchanges).

    Every call is bounded by ``timeout``; the SDK retries 5xx/409/429 ``retries`` times with backoff. One retry
    suits a person at a command line (more only delays a clear error); jobs use ``client_from_settings``."""
    if not api_key:
        raise LabelStudioError("no Label Studio API token given: pass --api-key or set LABEL_STUDIO_API_KEY")
    try:
        return LabelStudio(base_url=ls_url.rstrip("/"), api_key=api_key, timeout=timeout, max_retries=retries)
    except ApiError as exc:  # the SDK rejects an expired or malformed personal access token up front
        raise _token_error(ls_url, exc) from exc


def body_text(exc: ApiError) -> str:
    body = exc.body
    if isinstance(body, dict):
        for key in ("detail", "validation_errors", "message", "error"):
            if key in body:
                return str(body[key])
    return str(body)


def _token_error(ls_url: str, exc: ApiError) -> LabelStudioError:
    return LabelStudioError(
        f"Label Studio at {ls_url} rejected the API token ({exc.status_code}: {body_text(exc)}). Use the "
        "token from Account & Settings in Label Studio: a personal access token, or a legacy token (legacy "
        "tokens must be enabled in Organization > API Tokens Settings)."
    )


def call_sdk(client: LabelStudio, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one SDK call; turn transport errors and 401s into LabelStudioError, let other ApiErrors through."""
    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        if exc.status_code == 401:
            raise _token_error(base_url(client), exc) from exc
        raise
    except httpx.TimeoutException as exc:
        raise LabelStudioError(f"Label Studio at {base_url(client)} did not answer in time to {what}") from exc
    except httpx.HTTPError as exc:
        raise LabelStudioError(
            f"cannot reach Label Studio at {base_url(client)} ({exc.__class__.__name__}: {exc}); "
            "is it running, and is the URL right?"
        ) from exc


def base_url(client: LabelStudio) -> str:
    wrapper = getattr(client, "_client_wrapper", None)  # the SDK keeps it there; only used in messages
    return wrapper.get_base_url() if wrapper is not None else "(Label Studio)"


def ssrf_blocked(exc: ApiError) -> bool:
    text = body_text(exc).lower()
    return exc.status_code == 403 and ("not allowed" in text or "reserved network" in text or "ssrf" in text)


def refused(exc: ApiError, what: str) -> LabelStudioError:
    return LabelStudioError(f"Label Studio refused to {what} ({exc.status_code}: {body_text(exc)})")


def client_from_settings(settings: Settings, *, timeout: float = 60.0, retries: int = 3) -> LabelStudio:
    """The client a job uses (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY): patient with a busy Label Studio."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise LabelStudioError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are needed to talk to Label Studio")
    return make_client(settings.label_studio_url, settings.label_studio_api_key, timeout=timeout, retries=retries)


def rest(client: LabelStudio, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A documented REST call the SDK has no method for (the demo's task pages in a tab's order, the tests' own
    checks), sent through the SDK client's transport so it gets the same base URL, auth, timeout and retries.

    The SDK exposes that transport only as ``_client_wrapper.httpx_client`` (a Fern-generated client); this is
    the one place that reaches for it."""
    transport = client._client_wrapper.httpx_client
    return transport.request(path.lstrip("/"), method=method, **kwargs)


def as_dict(obj: Any) -> dict[str, Any]:
    """An SDK model (pydantic) or a plain dict as a dict."""
    if isinstance(obj, dict):
        return obj
    return obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)


def listed(client: LabelStudio, what: str, fn: Callable[..., Any], **kwargs: Any) -> list[dict[str, Any]]:
    """Every item of a paged SDK listing, as dicts. The pager fetches page 2 onwards while it is iterated, so
    the iteration runs inside ``call_sdk`` too: a timeout on page 3 is a LabelStudioError like one on page 1."""
    return call_sdk(client, what, lambda: [as_dict(item) for item in fn(**kwargs)])


def annotated_tasks(client: LabelStudio, project_id: int) -> list[dict[str, Any]]:
    """Every task of the project that has an annotation, with its annotations."""
    return listed(
        client, "list annotated tasks", client.tasks.list, project=project_id, fields="all", only_annotated=True
    )


# The task fields the ranking reads (the Data Manager's `include`): no annotations, predictions or heatmaps.
RANKING_TASK_FIELDS = "id,data,total_annotations,cancelled_annotations,total_predictions,predictions_model_versions"


def list_project_tasks(client: LabelStudio, project_id: int, ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Every task of the project (or the given ids) with only the fields the ranking needs."""
    query = None
    if ids is not None:
        query = json.dumps({"selectedItems": {"all": False, "included": [int(i) for i in ids]}})
    return listed(
        client,
        "list the project's tasks",
        client.tasks.list,
        project=project_id,
        include=RANKING_TASK_FIELDS,
        page_size=500,
        query=query,
    )


def update_version_predictions(
    client: LabelStudio, payload: Sequence[dict[str, Any]], version: str
) -> list[dict[str, Any]]:
    """Rewrite, in place, the newest prediction of ``version`` on each task that has one; returns the rest.

    In place (never delete and re-import): a task opened meanwhile holds a prediction Label Studio created
    through /predict, and between a delete and an import the task would have no prediction of the live
    version, so Label Studio would predict it again. Older duplicates and other versions stay as history.
    """

    def one(item: dict[str, Any]) -> dict[str, Any] | None:
        own = [p for p in client.predictions.list(task=int(item["task"])) if p.model_version == version]
        if not own:
            return item
        newest = max(own, key=lambda p: int(p.id))
        client.predictions.update(id=int(newest.id), result=item["result"], score=item["score"])
        return None

    if not payload:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(payload))) as pool:
        return [item for item in pool.map(one, payload) if item is not None]


def project_ranking_settings(client: LabelStudio, project_id: int) -> dict[str, Any] | None:
    """``{"ranking": {...}}`` from the project's ML backend "extra params" (Label Studio's connect-model dialog:
    "Any extra params to pass during model connection"), so a clinical lead can weight findings in the UI."""
    try:
        backends = client.ml.list(project=project_id)
    except Exception as exc:  # settings are optional: an old LS or a restricted token must not stop the ranking
        log.warning("project %s: cannot read ML backend settings: %s", project_id, exc)
        return None
    for backend in sorted(backends, key=lambda b: getattr(b, "id", 0) or 0):
        extra = getattr(backend, "extra_params", None)
        if isinstance(extra, str) and extra.strip():
            try:
                extra = json.loads(extra)
            except json.JSONDecodeError:
                log.warning("project %s: ML backend %s extra params are not JSON; ignored", project_id, backend.id)
                continue
        if isinstance(extra, dict) and isinstance(extra.get("ranking"), dict):
            return {"ranking": extra["ranking"]}
    return None


def read_project(client: LabelStudio, project_id: int) -> Any:
    """The project (label config, model version, ...); ProjectNotFound on a 404."""
    try:
        return call_sdk(client, "read the project", client.projects.get, id=project_id)
    except ApiError as exc:
        if exc.status_code == 404:
            raise ProjectNotFound(f"Label Studio has no project {project_id}") from exc
        raise


def project_label_config(client: LabelStudio, project_id: int) -> str:
    return str(read_project(client, project_id).label_config or "")


def task_annotations(client: LabelStudio, task_id: int) -> list[dict[str, Any]]:
    """One task's annotations (submitted, skipped and drafts' parents), oldest first as Label Studio lists them."""
    return listed(client, "list a task's annotations", client.annotations.list, id=task_id)


def import_predictions(client: LabelStudio, project_id: int, predictions: Sequence[dict[str, Any]]) -> None:
    """Bulk-create predictions (``{"task", "result", "score", "model_version"}`` each) in one call."""
    if predictions:
        call_sdk(
            client,
            "import predictions",
            client.projects.import_predictions,
            id=project_id,
            request=list(predictions),
        )


def stored_task_data(client: LabelStudio, project_id: int, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The tasks' ``data`` as stored: ``resolve_uri=false``, so an ``s3://`` reference is not replaced by its
    presigned form (writing that back would break the task once the URL expires)."""
    query = json.dumps({"selectedItems": {"all": False, "included": [int(i) for i in ids]}})
    tasks = listed(
        client,
        "list tasks' data",
        client.tasks.list,
        project=project_id,
        include="id,data",
        resolve_uri=False,
        page_size=500,
        query=query,
    )
    return {int(t["id"]): dict(t.get("data") or {}) for t in tasks}


def update_task_data(client: LabelStudio, task_id: int, data: dict[str, Any]) -> None:
    """Replace one task's ``data``; the response is cut down to the id (Label Studio answers a task PATCH with its
    predictions, heatmaps included, otherwise)."""
    call_sdk(
        client,
        "update a task's data",
        client.tasks.update,
        id=str(task_id),
        data=data,
        request_options={"additional_query_parameters": {"fields": "id"}},
    )


# -- project-level settings, reused by the ranking job after every new model version -------------------------
def set_project_model_version(client: LabelStudio, project_id: int, model_version: str) -> bool:
    """Point the project at ``model_version`` so "Prediction score" averages that version's scores.

    Returns True when it changed anything. Raises ModelVersionNotInProject while the project holds no
    prediction of that version: Label Studio 1.23 validates the field against predictions and backend titles.
    """
    project = read_project(client, project_id)
    if project.model_version == model_version:
        return False
    try:
        call_sdk(
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
                f"predictions of {model_version!r} exist ({body_text(exc)}); retrieve predictions first"
            ) from exc
        raise refused(exc, "set the project's model version") from exc
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
    column_types: dict[str, str] | None = None,
) -> tuple[int, bool]:
    """Create or fix the Data Manager tab ``title``, ordered by prediction score (highest first).

    Returns (view id, changed). Filters and columns a user set on that tab are kept; only the ordering and the
    display types in ``column_types`` (column id -> "Number", ...: data columns sort and filter as text
    otherwise) are enforced.
    """
    ordering = list(ordering or SCORE_ORDERING)
    types = dict(column_types or {})
    views = call_sdk(client, "list Data Manager tabs", client.views.list, project=project_id)
    existing = sorted((v for v in views if _view_title(v) == title), key=lambda v: v.id or 0)
    if existing:
        view = existing[0]
        data = dict(view.data) if isinstance(view.data, dict) else {}
        shown = dict(data.get("columnsDisplayType") or {})
        if data.get("ordering") == ordering and all(shown.get(k) == v for k, v in types.items()):
            return int(view.id), False
        # PATCH replaces the whole `data` (LS moves `ordering` out of it into its own column): send it all.
        data["ordering"] = ordering
        if types:
            data["columnsDisplayType"] = {**shown, **types}
        data.setdefault("filters", {"conjunction": "and", "items": []})
        call_sdk(
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
    if types:
        data["columnsDisplayType"] = types
    view = call_sdk(client, "create the review tab", client.views.create, project=project_id, data=data)
    return int(view.id), True
