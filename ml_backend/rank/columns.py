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

A task's data is the user's: a field of the same name that MEDebiaser did not write (say ``p_Effusion`` from
another reader, or a ``top_finding`` of their own) is never overwritten nor removed; that column is left out
for that task and counted (``user_fields_kept``). Which keys of which task MEDebiaser wrote is recorded in
``MODEL_DIR/projects/<p>/review_columns.json`` (:class:`ColumnOwnership`), written before the PATCH that uses
it, so a crash in between leaves a claim on a key the task did not have, never one on the user's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.io.label_studio import stored_task_data, update_task_data
from ml_backend.models.store import write_atomic

log = logging.getLogger(__name__)

RANK = "review_rank"
PRIORITY = "review_priority"
REASON = "review_reason"
TOP_FINDING = "top_finding"
TOP_PROBABILITY = "top_probability"
QUEUE_COLUMNS = (RANK, PRIORITY, REASON)  # removed once a task is annotated
# Written together by every ranking before the ownership record existed: a task holding all five and no record
# was ranked by an earlier MEDebiaser, so its columns are adopted (an upgrade does not freeze them).
SIGNATURE = (RANK, PRIORITY, REASON, TOP_FINDING, TOP_PROBABILITY)


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


@dataclass
class ColumnWrites:
    """What one write or clear did, for the job's summary."""

    written: int = 0  # tasks patched
    failed: int = 0  # tasks Label Studio did not list or patch (logged)
    user_fields_kept: int = 0  # (task, column) pairs left out: the task's data has a field of that name of its own


class ColumnOwnership:
    """Which data keys of which task this backend wrote, in one JSON file per project.

    Stored as ``{"keys": {key: [task ids]}, "journal": token}`` (the same few keys on every task: far smaller
    than per task). An unreadable file reads as empty: columns then exist without a record and are kept as the
    user's, so a lost file can freeze columns, never overwrite a user's field.

    The claims a ranking makes chunk by chunk are appended to ``<record>.journal`` (one fsynced line per
    :meth:`save`, tagged with the record's token) and folded into the record by :meth:`compact`, by any release
    or forgetting, and by the first save of a job that finds a journal. Rewriting the whole record before every
    chunk's PATCH made a first ranking quadratic: 100,000 tasks in chunks of 100 rewrote a record growing to 13 MB
    a thousand times (600 s on the benchmark machine). A journal line of another token (a crash between a
    record's rewrite and the journal's removal) is ignored, and so is a torn last line (a crash mid-append,
    before the PATCH it was written for).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal = path.with_name(path.name + ".journal")
        self._owned: dict[int, set[str]] = {}
        self._unsaved: dict[int, set[str]] = {}  # claims since the last save (the next journal line)
        self._token = ""  # the record's journal token; "" = no record yet: the first save writes one
        self._rewrite = False  # the next save rewrites the record (something was released, or a journal found)
        try:
            stored = json.loads(path.read_text())
            for key, task_ids in dict(stored.get("keys") or {}).items():
                for task_id in task_ids:
                    self._owned.setdefault(int(task_id), set()).add(str(key))
            self._token = str(stored.get("journal") or "")
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("%s unreadable (%s): existing review columns are treated as the user's", path, exc)
            self._owned, self._token = {}, ""
        self._replay_journal()

    def _replay_journal(self) -> None:
        try:
            lines = self.journal.read_bytes().splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("%s unreadable (%s): its claims are treated as the user's columns", self.journal, exc)
            lines = []
        self._rewrite = True  # fold it into the record at the first save: appends never follow a torn line
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not self._token or entry.get("journal") != self._token:
                    continue  # another record's journal, or one for a record that could not be read
                for key, task_ids in dict(entry["claim"]).items():
                    for task_id in task_ids:
                        self._owned.setdefault(int(task_id), set()).add(str(key))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue  # a torn line: its PATCH never ran

    def writable(self, task_id: int, data: Mapping[str, Any], keys: Sequence[str]) -> tuple[list[str], list[str]]:
        """``keys`` split into those this backend may write into the task's ``data`` and the user's own."""
        owned = self._owned.get(task_id, set())
        if not owned and all(k in data for k in SIGNATURE):
            owned = {k for k in data if k in SIGNATURE or k.startswith("p_")}  # ranked before the record existed
        mine = [k for k in keys if k not in data or k in owned]
        return mine, [k for k in keys if k in data and k not in owned]

    def claim(self, task_id: int, keys: Sequence[str]) -> None:
        new = set(keys) - self._owned.get(task_id, set())
        if new:
            self._owned.setdefault(task_id, set()).update(new)
            self._unsaved.setdefault(task_id, set()).update(new)

    def release(self, task_id: int, keys: Sequence[str]) -> None:
        owned = self._owned.get(task_id, set())
        if owned & set(keys):
            self._rewrite = True
            if owned - set(keys):
                self._owned[task_id] = owned - set(keys)
            else:
                del self._owned[task_id]

    def forget_absent(self, present: Iterable[int]) -> int:
        """Drop the claims on tasks not in ``present`` (the project's full listing): deleted tasks' entries
        would otherwise grow the record forever, and a claim must never outlive its task. Returns how many."""
        gone = set(self._owned) - {int(t) for t in present}
        for task_id in gone:
            del self._owned[task_id]
        self._rewrite = self._rewrite or bool(gone)
        return len(gone)

    def save(self) -> None:
        """Make the claims durable, before the PATCHes that use them: a journal line for new claims, the whole
        record after a release (a rerun that claims nothing new writes nothing)."""
        if self._rewrite or (self._unsaved and not self._token):
            self.compact()
        elif self._unsaved:
            # the leading newline ends a torn line a crash may have left (blank lines are skipped)
            line = "\n" + json.dumps({"journal": self._token, "claim": _by_key(self._unsaved)}) + "\n"
            try:
                with open(self.journal, "a", encoding="utf-8") as handle:
                    handle.write(line)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError:
                self._rewrite = True  # a part of the line may be on disk: the next save rewrites the record
                raise
            self._unsaved = {}

    def compact(self) -> None:
        """Write the whole record under a new token and drop the journal (its lines no longer count)."""
        if not (self._rewrite or self._unsaved or self.journal.exists()):
            return
        token = secrets.token_hex(8)
        write_atomic(self.path, json.dumps({"keys": _by_key(self._owned), "journal": token}).encode())
        self._token, self._rewrite, self._unsaved = token, False, {}
        try:
            self.journal.unlink(missing_ok=True)
        except OSError as exc:  # its lines carry the old token: ignored from now on, and new ones are appended
            log.warning("%s not removed (%s): its old lines are ignored", self.journal, exc)


def _by_key(owned: Mapping[int, set[str]]) -> dict[str, list[int]]:
    by_key: dict[str, list[int]] = {}
    for task_id, keys in sorted(owned.items()):
        for key in keys:
            by_key.setdefault(key, []).append(task_id)
    return dict(sorted(by_key.items()))


def _stored_data(client: Any, project_id: int, ids: Sequence[int]) -> dict[int, dict[str, Any]] | None:
    """The tasks' data as stored; None when Label Studio cannot list them (logged: the columns wait for the
    next ranking, the ranking goes on)."""
    try:
        return stored_task_data(client, project_id, ids)
    except Exception as exc:  # columns are a view on the ranking: a failure must not stop the job
        log.warning("project %s: review columns not written, tasks not listed: %s", project_id, exc)
        return None


def _patch(client: Any, updates: Mapping[int, dict[str, Any]]) -> tuple[set[int], int]:
    """Write each task's data. Returns (the tasks written, how many failed); a failure is logged, never raised."""

    def one(task_id: int) -> bool:
        try:
            update_task_data(client, task_id, updates[task_id])
        except Exception as exc:  # columns are a view on the ranking: a failed one must not stop the job
            log.warning("task %s: review columns not written: %s", task_id, exc)
            return False
        return True

    if not updates:
        return set(), 0
    with ThreadPoolExecutor(max_workers=min(8, len(updates)), thread_name_prefix="rank-columns") as pool:
        done = dict(zip(updates, pool.map(one, list(updates)), strict=True))
    written = {task_id for task_id, ok in done.items() if ok}
    return written, len(done) - len(written)


def write_review_columns(
    client: Any, project_id: int, values: Mapping[int, dict[str, Any]], ownership: ColumnOwnership
) -> ColumnWrites:
    """Merge ``values[task]`` into each task's data, but for fields of the task's own (see the module doc); tasks
    whose data already holds them are not touched."""
    if not values:
        return ColumnWrites()
    stored = _stored_data(client, project_id, list(values))
    if stored is None:
        return ColumnWrites(failed=len(values))
    updates: dict[int, dict[str, Any]] = {}
    kept: dict[str, int] = {}
    for task_id, data in stored.items():
        if task_id not in values:  # a listing answers for the ids asked; anything else is not ours to write
            continue
        mine, theirs = ownership.writable(task_id, data, list(values[task_id]))
        for key in theirs:
            kept[key] = kept.get(key, 0) + 1
        ownership.claim(task_id, mine)
        new = {k: values[task_id][k] for k in mine}
        if any(data.get(k) != v for k, v in new.items()):
            updates[task_id] = {**data, **new}
    if kept:
        log.warning(
            "project %s: task data already has fields of these names, kept as they are (columns left out): %s",
            project_id,
            ", ".join(f"{key} ({n} tasks)" for key, n in sorted(kept.items())),
        )
    try:
        ownership.save()  # before the PATCHes: see the module doc
    except OSError as exc:  # no record, no write: the next ranking tries again; the ranking goes on
        log.warning("project %s: review columns not written, %s not saved: %s", project_id, ownership.path, exc)
        return ColumnWrites(failed=len(updates), user_fields_kept=sum(kept.values()))
    written, failed = _patch(client, updates)
    return ColumnWrites(len(written), failed, sum(kept.values()))


def clear_queue_columns(
    client: Any, project_id: int, tasks: Sequence[dict[str, Any]], ownership: ColumnOwnership
) -> ColumnWrites:
    """Drop the queue columns this backend wrote from tasks (annotated ones: no longer in the queue) that still
    have them; a task's own fields of those names stay."""

    def ours(task_id: int, data: Mapping[str, Any]) -> list[str]:
        return ownership.writable(task_id, data, [k for k in QUEUE_COLUMNS if k in data])[0]

    ids = [int(t["id"]) for t in tasks if ours(int(t["id"]), t.get("data") or {})]
    if not ids:
        return ColumnWrites()
    stored = _stored_data(client, project_id, ids)
    if stored is None:
        return ColumnWrites(failed=len(ids))
    updates: dict[int, dict[str, Any]] = {}
    for task_id, data in stored.items():
        drop = ours(task_id, data)
        if drop:
            updates[task_id] = {k: v for k, v in data.items() if k not in drop}
    written, failed = _patch(client, updates)
    for task_id in written:  # after the PATCH: a failed one keeps its claim and is retried next time
        ownership.release(task_id, QUEUE_COLUMNS)
    try:
        ownership.save()
    except OSError as exc:  # a stale claim on a key the task no longer has: harmless, the key is absent
        log.warning("project %s: %s not saved after clearing: %s", project_id, ownership.path, exc)
    return ColumnWrites(len(written), failed)
