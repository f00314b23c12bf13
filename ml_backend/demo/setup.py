"""Label Studio side of the demo: project, local-files storage, task import, predictions, review tab.

Plain REST calls (``Authorization: Token <legacy token>``), the same ones the Label Studio UI makes:

* ``POST /api/projects`` ``{"title", "label_config"}``;
* ``POST /api/storages/localfiles`` ``{"project", "path", "use_blob_urls": true}``: Label Studio serves
  ``/data/local-files/?d=<path relative to LOCAL_FILES_DOCUMENT_ROOT>`` only below a storage's path;
* ``POST /api/projects/<id>/import`` with a list of task data objects;
* ``POST /api/dm/actions?id=retrieve_tasks_predictions&project=<id>`` ``{"selectedItems": {"all": false,
  "included": [task ids]}}``: the Data Manager's "Retrieve predictions" (one ``/predict`` call per request,
  which Label Studio gives 100 s, so large projects go in chunks);
* ``PATCH /api/projects/<id>`` ``{"model_version"}`` and the "Review queue" tab, via ``ml_backend.connect``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ml_backend.io.label_studio import make_client, rest

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DemoError(RuntimeError):
    """A Label Studio call the demo needs failed; the message has the status and body."""


class LabelStudioAPI:
    """The demo's REST calls, on the adapter's SDK client (``ml_backend.io.label_studio``: auth, timeouts,
    retries)."""

    def __init__(self, url: str, token: str, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.client = make_client(self.url, token, timeout=timeout)

    def close(self) -> None:
        """Nothing to release: the SDK client closes its connections when collected."""

    def __enter__(self) -> LabelStudioAPI:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = rest(self.client, method, path, **kwargs)
        if response.status_code >= 400:
            raise DemoError(f"Label Studio {method} {path} answered {response.status_code}: {response.text[:800]}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    # -- projects and tasks --------------------------------------------------------------------------------
    def find_project(self, title: str) -> dict[str, Any] | None:
        page = self.call("GET", "/api/projects", params={"title": title, "page_size": 100})
        matches = [p for p in page.get("results", []) if p.get("title") == title]
        return min(matches, key=lambda p: p["id"]) if matches else None

    def create_project(self, title: str, label_config: str, description: str = "") -> dict[str, Any]:
        body = {"title": title, "label_config": label_config, "description": description}
        return self.call("POST", "/api/projects", json=body)

    def project(self, project_id: int) -> dict[str, Any]:
        return self.call("GET", f"/api/projects/{project_id}")

    def ensure_local_storage(self, project_id: int, path: Path, title: str = "demo images") -> int:
        path = Path(path).resolve()
        existing = self.call("GET", "/api/storages/localfiles", params={"project": project_id})
        for storage in existing or []:
            if Path(storage.get("path", "")).resolve() == path:
                return int(storage["id"])
        body = {"project": project_id, "path": str(path), "title": title, "use_blob_urls": True}
        return int(self.call("POST", "/api/storages/localfiles", json=body)["id"])

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]], chunk: int = 500) -> int:
        done = 0
        for start in range(0, len(tasks), chunk):
            answer = self.call("POST", f"/api/projects/{project_id}/import", json=tasks[start : start + chunk])
            done += int(answer.get("task_count", 0))
        return done

    def tasks(self, project_id: int, view_id: int | None = None, page_size: int = 500) -> list[dict[str, Any]]:
        """All tasks of a project, in the order of Data Manager tab ``view_id`` when given."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            params: dict[str, Any] = {"project": project_id, "page": page, "page_size": page_size}
            if view_id is not None:
                params["view"] = view_id
            response = rest(self.client, "GET", "/api/tasks", params=params)
            if response.status_code == 404:  # past the last page
                break
            if response.status_code >= 400:
                raise DemoError(f"Label Studio GET /api/tasks answered {response.status_code}: {response.text[:500]}")
            batch = response.json().get("tasks", [])
            out.extend(batch)
            if len(batch) < page_size:
                break
            page += 1
        return out

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self.call("GET", "/api/predictions", params={"task": task_id})

    def retrieve_predictions(self, project_id: int, task_ids: Iterable[int], chunk: int = 40) -> int:
        """Ask Label Studio to fetch predictions from the backend for these tasks (it skips tasks that already
        have a prediction of the backend's current version). Returns how many tasks were sent."""
        ids = list(task_ids)
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            self.call(
                "POST",
                "/api/dm/actions",
                params={"id": "retrieve_tasks_predictions", "project": project_id},
                json={"selectedItems": {"all": False, "included": part}},
            )
            log.info("retrieved predictions for %d/%d tasks", min(start + chunk, len(ids)), len(ids))
        return len(ids)


# -- images -> tasks -----------------------------------------------------------------------------------------
def find_manifest(image_dir: Path) -> dict[str, dict[str, Any]]:
    """Per-image records from a manifest.json in the folder or its parent (the synthetic and NIH layouts),
    keyed by the image's resolved path; empty when there is none."""
    for candidate in (image_dir / "manifest.json", image_dir.parent / "manifest.json"):
        if not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text())
        except ValueError:
            continue
        records = data.get("records") if isinstance(data, dict) else data
        if not isinstance(records, list):
            continue
        out = {}
        for record in records:
            if isinstance(record, dict) and isinstance(record.get("image"), str):
                out[str((candidate.parent / record["image"]).resolve())] = record
        return out
    return {}


def local_file_ref(path: Path, document_root: Path) -> str:
    relative = Path(path).resolve().relative_to(Path(document_root).resolve()).as_posix()
    return "/data/local-files/?d=" + quote(relative)


def image_tasks(
    image_dir: Path, document_root: Path, *, limit: int | None = None, data_key: str = "image"
) -> list[dict[str, Any]]:
    """Task data for every image in ``image_dir`` (sorted, at most ``limit``), served as Label Studio local
    files; known findings and group attributes from a manifest are added as extra columns."""
    image_dir = Path(image_dir).resolve()
    files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if limit:
        files = files[:limit]
    manifest = find_manifest(image_dir)
    tasks = []
    for path in files:
        data: dict[str, Any] = {data_key: local_file_ref(path, document_root), "file": path.name}
        record = manifest.get(str(path.resolve()))
        if record:
            labels = record.get("labels") or []
            data["known_findings"] = ", ".join(labels) if labels else "No Finding"
            for key in ("patient_id", "sex", "age"):
                if record.get(key) is not None:
                    data[key] = record[key]
            if "marker" in record:
                data["side_marker"] = bool(record["marker"])
        tasks.append(data)
    return tasks


def latest_version(predictions: list[dict[str, Any]]) -> str | None:
    """The model_version of the newest prediction."""
    if not predictions:
        return None
    newest = max(predictions, key=lambda p: (p.get("created_at") or "", p.get("id") or 0))
    return newest.get("model_version")
