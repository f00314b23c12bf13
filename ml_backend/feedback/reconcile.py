"""Label Studio is the source of truth: re-read a project's annotations through its API.

Annotations made while the backend or Redis was down never reached the webhook; a reconciling job
(START_TRAINING, or ``medebiaser train --reconcile``) re-reads them with label-studio-sdk and brings the
store in line: missing annotations are added, deleted or cancelled ones removed.
"""

from __future__ import annotations

import logging
from typing import Any

from ml_backend.config import Settings
from ml_backend.feedback.annotations import AnnotationError, parse_annotation
from ml_backend.feedback.store import AnnotationStore
from ml_backend.feedback.webhook import project_ignore_labels
from ml_backend.io.label_config import parse_label_config
from ml_backend.io.label_studio import annotated_tasks, as_dict, client_from_settings, project_label_config

log = logging.getLogger(__name__)


def reconcile_with_label_studio(store: AnnotationStore, project: str, settings: Settings) -> dict[str, Any]:
    """Bring the store in line with Label Studio; returns counts (or the reason it could not)."""
    try:
        client = client_from_settings(settings)
        config = project_label_config(client, int(project))
        store.set_label_config(config)
        schema = parse_label_config(config, ignore_labels=project_ignore_labels(store.conn, project, settings))
        _, existing = store.snapshot()
        known = {r.annotation_id: r for r in existing}
        seen: set[int] = set()
        added = invalid = regions_skipped = 0
        for task_dict in annotated_tasks(client, int(project)):
            for annotation in task_dict.get("annotations") or []:
                annotation = as_dict(annotation)
                try:
                    record = parse_annotation(project, annotation, task_dict, schema, settings=settings)
                except AnnotationError as exc:
                    invalid += 1
                    log.warning(
                        "project %s: annotation %s skipped in reconcile: %s", project, annotation.get("id"), exc
                    )
                    continue
                if record is None:
                    continue
                seen.add(record.annotation_id)
                regions_skipped += len(record.skipped)
                old = known.get(record.annotation_id)
                if old is None or old.updated_at != record.updated_at:
                    store.put(record)
                    added += 1
        removed = store.delete([i for i in known if i not in seen])
        return {
            "added_or_updated": added,
            "removed": removed,
            "invalid": invalid,
            "regions_skipped": regions_skipped,
            "in_label_studio": len(seen),
        }
    except Exception as exc:  # an unreachable Label Studio must not fail the job: train on what we have
        log.warning("project %s: reconcile with Label Studio failed: %s", project, exc)
        return {"error": f"{exc.__class__.__name__}: {exc}"}
