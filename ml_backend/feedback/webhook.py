"""Label Studio webhook events: validate, record, enqueue, answer in milliseconds.

Label Studio sends webhooks synchronously inside the annotator's Submit (1 s timeout, no retry), so this
handler never trains, fetches or decodes: it records the annotation in Redis and coalesces a training job.
Because nothing is retried, only an unusable payload is refused (4xx); a region, label or patient field that
cannot be used is skipped, counted and reported in the answer, and the rest of the annotation is recorded.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from typing import Any

import redis

from ml_backend.config import Settings
from ml_backend.feedback.annotations import AnnotationError, parse_annotation
from ml_backend.feedback.queue import connect, key, schedule_training
from ml_backend.feedback.retrain_policy import after_annotations, waiting_annotations
from ml_backend.feedback.store import AnnotationStore
from ml_backend.io.label_config import (
    LabelConfigError,
    ProjectSchema,
    format_label_mapping,
    ignore_labels_from_extra_params,
    parse_label_config,
)
from ml_backend.models.store import project_key

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}
HANDLED = ANNOTATION_EVENTS | {"ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED"}
MAX_SKIPS_IN_ANSWER = 50  # the answer lists this many skipped items; the counts cover all of them


def record_project_params(conn: redis.Redis, project: str, extra_params: Any) -> tuple[str, ...]:
    """Keep the ignore labels a project declares in Label Studio's "Extra params" (``{"ignore_labels": [...]}``,
    sent to /setup) so the webhook and the training job read its regions the same way; returns them."""
    labels = ignore_labels_from_extra_params(extra_params)
    conn.set(key(project, "ignore_labels"), json.dumps(list(labels)))
    return labels


def project_ignore_labels(conn: redis.Redis, project: str, settings: Settings) -> tuple[str, ...]:
    """Settings.ignore_labels plus those recorded from the project's extra params."""
    raw = conn.get(key(project, "ignore_labels"))
    stored = tuple(json.loads(raw)) if raw else ()
    return tuple(dict.fromkeys(settings.ignore_labels + stored))


def project_schema(conn: redis.Redis, project: str, config: str, settings: Settings) -> ProjectSchema:
    """The project's schema with its declared ignore labels (LabelConfigError when the config is unusable)."""
    return parse_label_config(config, ignore_labels=project_ignore_labels(conn, project, settings))


def setup_project(conn: redis.Redis, project: str, config: str, extra_params: Any, settings: Settings) -> ProjectSchema:
    """For /setup: record the project's declared ignore labels (extra params) and return its schema; log
    ``format_label_mapping(schema)`` to show how every label was read. LabelConfigError for an unusable config."""
    record_project_params(conn, project, extra_params)
    return project_schema(conn, project, config, settings)


def _names_int(item: Any, field: str) -> bool:
    return isinstance(item, dict) and isinstance(item.get(field), int) and not isinstance(item.get(field), bool)


def _int_ids(items: Any, what: str) -> list[int]:
    if not isinstance(items, list):
        raise AnnotationError(f"{what} must be a list of objects with an integer 'id'")
    ids = [item.get("id") for item in items if isinstance(item, dict)]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]


class WebhookHandler:
    def __init__(self, settings: Settings, conn: redis.Redis | None = None) -> None:
        self.settings = settings
        self._conn = conn
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {
            "received": 0,
            "recorded": 0,
            "rejected": 0,
            "jobs_enqueued": 0,
            "ignored": 0,
            "regions_skipped": 0,  # regions, labels and patient fields skipped inside recorded annotations
        }
        self.skip_reasons: Counter[str] = Counter()  # skip code -> count

    @property
    def conn(self) -> redis.Redis:
        if self._conn is None:
            self._conn = connect(self.settings)
        return self._conn

    def setup_project(self, project: str, config: str, extra_params: Any) -> ProjectSchema:
        """For /setup: keep the project's declared ignore labels, log how every label of its config was read, and
        return the schema (LabelConfigError for an unusable config; without Redis the labels apply to this call)."""
        try:
            schema = setup_project(self.conn, project, config, extra_params, self.settings)
        except (redis.RedisError, RuntimeError) as exc:  # RuntimeError: no REDIS_URL in this process
            log.warning("project %s: extra params not recorded, Redis unavailable: %s", project, exc)
            declared = self.settings.ignore_labels + ignore_labels_from_extra_params(extra_params)
            schema = parse_label_config(config, ignore_labels=declared)
        log.info("project %s: label config read as: %s", project, format_label_mapping(schema))
        return schema

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "skip_reasons": dict(self.skip_reasons)}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def handle(self, body: Any) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON answer) for one webhook body."""
        self._count("received")
        if not isinstance(body, dict):
            self._count("rejected")
            return 400, {"error": "webhook body must be a JSON object"}
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
        project_body: dict[str, Any] = body["project"] if isinstance(body.get("project"), dict) else {}
        sent_config = project_body.get("label_config")
        if sent_config is not None and not isinstance(sent_config, str):
            raise LabelConfigError("project.label_config must be a string")
        config = sent_config or store.label_config()
        if action in ("PROJECT_UPDATED", "START_TRAINING"):
            if sent_config:
                project_schema(self.conn, project, sent_config, self.settings)  # refuse an unusable config now
                store.set_label_config(sent_config)
            if action == "PROJECT_UPDATED":
                return 200, {"status": "recorded", "action": action}
            job = schedule_training(self.conn, project, reason="START_TRAINING", reconcile=True)
            self._count("jobs_enqueued", job is not None)
            return 201, {"status": "queued", "job_id": job, "reconcile": True}
        if action == "ANNOTATIONS_DELETED":
            ids = _int_ids(body.get("annotations"), "ANNOTATIONS_DELETED 'annotations'")
            if not ids:
                raise AnnotationError("ANNOTATIONS_DELETED lists no annotation ids")
            removed = store.delete(ids)
            job = (
                after_annotations(self.conn, project, self.settings, reason="annotations deleted") if removed else None
            )
            self._count("jobs_enqueued", job is not None)
            return 200, {"status": "deleted", "removed": removed, "job_id": job}
        if not config:
            raise AnnotationError("no label config in the payload and none recorded for this project")
        schema = project_schema(self.conn, project, config, self.settings)
        if sent_config:
            store.set_label_config(sent_config)
        pairs = self._pairs(action, body)
        recorded, cancelled, errors, skipped, without_task = 0, [], [], [], 0
        for annotation, task in pairs:
            try:
                record = parse_annotation(project, annotation, task, schema, settings=self.settings)
            except AnnotationError as exc:
                if len(pairs) == 1 and action in ANNOTATION_EVENTS:
                    raise
                errors.append(str(exc))  # in a bulk event, a bad annotation does not sink the others
                without_task += task is None and _names_int(annotation, "id") and _names_int(annotation, "task")
                continue
            if record is None:
                cancelled.append(annotation["id"])  # parse_annotation checked it is an int
                continue
            store.put(record)
            recorded += 1
            skipped += [{"annotation": record.annotation_id, **s} for s in record.skipped]
        if cancelled:
            store.delete(cancelled)  # a cancelled (skipped) annotation is not training data
        if without_task and self.settings.label_studio_url:
            # Label Studio's bulk event may name an annotation's task without sending it. Label Studio still has
            # both: the next job re-reads the project's annotations (reconcile) instead of losing these.
            job = schedule_training(self.conn, project, reason=f"{action}: tasks not in the payload", reconcile=True)
            self._count("jobs_enqueued", job is not None)
            if recorded == 0 and not cancelled and len(errors) == without_task:
                return 202, {"status": "reconcile", "recorded": 0, "from_label_studio": without_task, "job_id": job}
        if recorded == 0 and not cancelled and errors:
            raise AnnotationError(f"no annotation in {action} is usable: {'; '.join(errors[:5])}")
        self._count("recorded", recorded)
        if skipped:
            with self._lock:
                self.counts["regions_skipped"] += len(skipped)
                self.skip_reasons.update(str(s["code"]) for s in skipped)
            log.info("project %s: %d region(s)/field(s) skipped: %s", project, len(skipped), skipped[:5])
        # The retraining policy decides: enough waiting, or a worker starts it after a quiet period.
        job = after_annotations(self.conn, project, self.settings, reason=action) if recorded or cancelled else None
        self._count("jobs_enqueued", job is not None)
        answer: dict[str, Any] = {
            "status": "recorded",
            "recorded": recorded,
            "cancelled": len(cancelled),
            "job_id": job,
            "skipped_count": len(skipped),
        }
        if job is None and (recorded or cancelled):
            # Said in the answer Label Studio logs: why no job started yet.
            answer["waiting"] = waiting_annotations(self.conn, project)
            answer["training"] = (
                f"starts at {self.settings.retrain_min_annotations} waiting annotations, on START_TRAINING, or "
                f"{self.settings.retrain_quiet_s:.0f} s after the last one (unless a job is already queued)"
            )
        if without_task and self.settings.label_studio_url:
            answer["from_label_studio"] = without_task  # re-read by the next job (reconcile), not lost
        if skipped:
            answer["skipped"] = skipped[:MAX_SKIPS_IN_ANSWER]
        if errors:
            answer["errors"] = errors
        return 200, answer

    @staticmethod
    def _pairs(action: str, body: dict[str, Any]) -> list[tuple[Any, Any]]:
        """(annotation, task) pairs of an event; AnnotationError when the event's shape is unusable."""
        if action in ANNOTATION_EVENTS:
            return [(body.get("annotation"), body.get("task"))]
        # ANNOTATIONS_CREATED (bulk): each annotation names its task id; tasks may come alongside
        raw_tasks = body.get("tasks")
        if raw_tasks is None and isinstance(body.get("task"), list):
            raw_tasks = body["task"]
        if raw_tasks is not None and not isinstance(raw_tasks, list):
            raise AnnotationError("ANNOTATIONS_CREATED 'tasks' must be a list of task objects")
        tasks: dict[int, dict[str, Any]] = {}
        for task in raw_tasks or []:
            task_id = task.get("id") if isinstance(task, dict) else None
            if isinstance(task_id, int) and not isinstance(task_id, bool):
                tasks[task_id] = task
        annotations = body.get("annotation") or body.get("annotations") or []
        if isinstance(annotations, dict):
            annotations = [annotations]
        if not isinstance(annotations, list) or not annotations:
            raise AnnotationError("ANNOTATIONS_CREATED needs a list of annotations")
        pairs: list[tuple[Any, Any]] = []
        single_task = body.get("task") if isinstance(body.get("task"), dict) else None
        for annotation in annotations:
            task_id = annotation.get("task") if isinstance(annotation, dict) else None
            task = tasks.get(task_id) if isinstance(task_id, int) and not isinstance(task_id, bool) else None
            pairs.append((annotation, task or single_task))
        return pairs
