"""Label Studio webhook events: validate, record, enqueue, answer in milliseconds.

Label Studio sends webhooks synchronously inside the annotator's Submit (1 s timeout, no retry), so this
handler never trains, fetches or decodes: it records the annotation in Redis and coalesces a training job.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from ml_backend.config import Settings
from ml_backend.feedback.annotations import AnnotationError, parse_annotation
from ml_backend.feedback.queue import connect, schedule_training
from ml_backend.feedback.store import AnnotationStore
from ml_backend.io.label_config import LabelConfigError, parse_label_config
from ml_backend.models.store import project_key

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}
HANDLED = ANNOTATION_EVENTS | {"ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED"}


class WebhookHandler:
    def __init__(self, settings: Settings, conn: redis.Redis | None = None) -> None:
        self.settings = settings
        self._conn = conn
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"received": 0, "recorded": 0, "rejected": 0, "jobs_enqueued": 0, "ignored": 0}

    @property
    def conn(self) -> redis.Redis:
        if self._conn is None:
            self._conn = connect(self.settings)
        return self._conn

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def handle(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON answer) for one webhook body."""
        self._count("received")
        action = body.get("action")
        if not isinstance(action, str):
            self._count("rejected")
            return 400, {"error": "webhook body has no 'action'"}
        if action not in HANDLED:
            self._count("ignored")
            return 200, {"status": "ignored", "action": action}
        try:
            project = project_key(body.get("project"))
        except ValueError as exc:
            self._count("rejected")
            return 400, {"error": str(exc)}
        if project == "default":
            self._count("rejected")
            return 400, {"error": f"{action} webhook has no 'project'"}
        try:
            return self._dispatch(action, project, body)
        except (AnnotationError, LabelConfigError) as exc:
            self._count("rejected")
            log.warning("project %s: %s rejected: %s", project, action, exc)
            return 422, {"error": str(exc), "action": action}
        except redis.RedisError as exc:
            log.error("project %s: %s not recorded, Redis unavailable: %s", project, action, exc)
            return 503, {
                "error": f"Redis unavailable ({exc.__class__.__name__}); Label Studio remains the source "
                "of truth: START_TRAINING or `medebiaser train --reconcile` recovers it"
            }

    def _dispatch(self, action: str, project: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        store = AnnotationStore(self.conn, project)
        project_body = body.get("project") if isinstance(body.get("project"), dict) else {}
        config = project_body.get("label_config") or store.label_config()
        if action == "PROJECT_UPDATED":
            if config:
                parse_label_config(config)  # reject an unusable config now, not in the worker
                store.set_label_config(config)
            return 200, {"status": "recorded", "action": action}
        if action == "START_TRAINING":
            if config:
                store.set_label_config(config)
            job = schedule_training(self.conn, project, reason="START_TRAINING", reconcile=True)
            self._count("jobs_enqueued", job is not None)
            return 201, {"status": "queued", "job_id": job, "reconcile": True}
        if action == "ANNOTATIONS_DELETED":
            ids = [a.get("id") for a in body.get("annotations") or [] if isinstance(a, dict)]
            ids = [i for i in ids if isinstance(i, int)]
            if not ids:
                raise AnnotationError("ANNOTATIONS_DELETED lists no annotation ids")
            removed = store.delete(ids)
            job = schedule_training(self.conn, project, reason="annotations deleted") if removed else None
            self._count("jobs_enqueued", job is not None)
            return 200, {"status": "deleted", "removed": removed, "job_id": job}
        if not config:
            raise AnnotationError("no label config in the payload and none recorded for this project")
        schema = parse_label_config(config)
        store.set_label_config(config)
        if action in ANNOTATION_EVENTS:
            pairs = [(body.get("annotation"), body.get("task"))]
        else:  # ANNOTATIONS_CREATED (bulk): each annotation names its task id; tasks may come alongside
            tasks = {t.get("id"): t for t in body.get("tasks") or [] if isinstance(t, dict)}
            annotations = body.get("annotation") or body.get("annotations") or []
            if not isinstance(annotations, list):
                raise AnnotationError("ANNOTATIONS_CREATED needs a list of annotations")
            pairs = [(a, tasks.get(a.get("task")) if isinstance(a, dict) else None) for a in annotations]
        recorded, cancelled, errors = 0, [], []
        for annotation, task in pairs:
            try:
                record = parse_annotation(project, annotation, task, schema)
            except AnnotationError as exc:
                if len(pairs) == 1:
                    raise
                errors.append(str(exc))  # in a bulk event, a bad annotation does not sink the others
                continue
            if record is None:
                cancelled.append(annotation["id"])
            else:
                store.put(record)
                recorded += 1
        if cancelled:
            store.delete(cancelled)  # a cancelled (skipped) annotation is not training data
        self._count("recorded", recorded)
        job = schedule_training(self.conn, project, reason=action) if recorded or cancelled else None
        self._count("jobs_enqueued", job is not None)
        answer: dict[str, Any] = {
            "status": "recorded",
            "recorded": recorded,
            "cancelled": len(cancelled),
            "job_id": job,
        }
        if errors:
            answer["errors"] = errors
        return 200, answer
