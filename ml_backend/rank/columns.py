"""Data Manager columns a physician can sort and filter by: where a task is in the review queue and why, and
every finding's probability.

Label Studio 1.23.2 shows every key of a task's ``data`` as a Data Manager column (``project.summary`` counts
the keys when a task is saved, a PATCH included) and orders and filters by ``tasks:data.<key>``; it shows no
column for ``task.meta``. So the ranking job writes, next to the image reference, ``review_rank`` (1 = first),
``review_priority``, ``review_reason``, ``top_finding``/``top_probability`` and one ``p_<finding>`` per
finding, merged into the task's stored data (read with ``resolve_uri=false`` so a cloud URL is never replaced
by its resolved form). Data columns sort as text unless the tab shows them as numbers: the "Review queue" tab
gets ``columnsDisplayType`` "Number" for the numeric ones (:func:`column_types`; in another tab, pick Number in
the column's header menu).

Tasks annotated since they were ranked lose ``review_rank``/``review_priority``/``review_reason`` (they are out
of the queue); the probabilities stay, as the model's opinion next to the physician's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ml_backend.io.label_studio import stored_task_data, update_task_data

log = logging.getLogger(__name__)

RANK = "review_rank"
PRIORITY = "review_priority"
REASON = "review_reason"
TOP_FINDING = "top_finding"
TOP_PROBABILITY = "top_probability"
QUEUE_COLUMNS = (RANK, PRIORITY, REASON)  # removed once a task is annotated


def probability_column(finding: str) -> str:
    """``p_<finding>`` with anything but letters, digits and ``_`` replaced (a Data Manager column id is
    ``tasks:data.<key>``, and Label Studio splits filter names on dots)."""
    return "p_" + re.sub(r"[^0-9A-Za-z_]", "_", finding)


def review_columns(item: Mapping[str, Any], labels: Sequence[str], probabilities: np.ndarray) -> dict[str, Any]:
    """The data fields of one ranked task: its place in the queue, the reason, and every probability."""
    top = int(np.argmax(probabilities))
    values: dict[str, Any] = {
        RANK: int(item["rank"]),
        PRIORITY: round(float(item["priority"]), 4),
        REASON: str(item["reason"]),
        TOP_FINDING: labels[top],
        TOP_PROBABILITY: round(float(probabilities[top]), 4),
    }
    values.update(
        {probability_column(label): round(float(p), 4) for label, p in zip(labels, probabilities, strict=True)}
    )
    return values


def column_types(labels: Sequence[str]) -> dict[str, str]:
    """``columnsDisplayType`` for a Data Manager tab: the numeric columns sort and filter as numbers."""
    numeric = [RANK, PRIORITY, TOP_PROBABILITY, *(probability_column(label) for label in labels)]
    return {f"tasks:data.{key}": "Number" for key in numeric}


def _stored_data(client: Any, project_id: int, ids: Sequence[int]) -> dict[int, dict[str, Any]] | None:
    """The tasks' data as stored; None when Label Studio cannot list them (logged: the columns wait for the
    next ranking, the ranking goes on)."""
    try:
        return stored_task_data(client, project_id, ids)
    except Exception as exc:  # columns are a view on the ranking: a failure must not stop the job
        log.warning("project %s: review columns not written, tasks not listed: %s", project_id, exc)
        return None


def _patch(client: Any, updates: Mapping[int, dict[str, Any]]) -> tuple[int, int]:
    """Write each task's data. Returns (written, failed); a failure is logged, never raised."""

    def one(task_id: int) -> bool:
        try:
            update_task_data(client, task_id, updates[task_id])
        except Exception as exc:  # columns are a view on the ranking: a failed one must not stop the job
            log.warning("task %s: review columns not written: %s", task_id, exc)
            return False
        return True

    if not updates:
        return 0, 0
    with ThreadPoolExecutor(max_workers=min(8, len(updates)), thread_name_prefix="rank-columns") as pool:
        done = list(pool.map(one, list(updates)))
    return sum(done), len(done) - sum(done)


def write_review_columns(client: Any, project_id: int, values: Mapping[int, dict[str, Any]]) -> tuple[int, int]:
    """Merge ``values[task]`` into each task's data; tasks whose data already holds them are not touched.
    Returns (written, failed)."""
    if not values:
        return 0, 0
    stored = _stored_data(client, project_id, list(values))
    if stored is None:
        return 0, len(values)
    updates = {
        task_id: {**data, **values[task_id]}
        for task_id, data in stored.items()
        if any(data.get(k) != v for k, v in values[task_id].items())
    }
    return _patch(client, updates)


def clear_queue_columns(client: Any, project_id: int, tasks: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Drop the queue columns from tasks (annotated ones: no longer in the queue) that still have them."""
    ids = [int(t["id"]) for t in tasks if any(k in (t.get("data") or {}) for k in QUEUE_COLUMNS)]
    if not ids:
        return 0, 0
    stored = _stored_data(client, project_id, ids)
    if stored is None:
        return 0, len(ids)
    updates = {
        task_id: {k: v for k, v in data.items() if k not in QUEUE_COLUMNS}
        for task_id, data in stored.items()
        if any(k in data for k in QUEUE_COLUMNS)
    }
    return _patch(client, updates)
