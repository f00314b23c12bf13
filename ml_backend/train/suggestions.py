"""Suggested ignore regions: the artefacts mask propagation's detector finds on tasks nobody masked, offered to the
physician as pre-annotated ignore regions they keep or delete.

- Where they come from: a training job whose propagation fitted a detector saves it with the version
  (``artefact_detector.npz``, plain arrays). The ranking job runs it on the unlabelled tasks it predicts (the
  hypercolumns of the images it already loaded: one extra backbone pass per batch) and records what it found per
  task in Redis (``SuggestionStore``: the cells on the stride-4 grid, the score, the region id).
- What the physician sees: one ignore region per artefact, labelled with the project's ignore label on a mask
  control (bitmask PNG or brush RLE) or, failing that, a rectangle, with the id ``suggested-ignore-<n>`` and
  ``meta.text`` "suggested ignore region: detector score 0.83 - keep or delete". Deleting the region is the one
  action that rejects it; submitting with it kept confirms it.
- What the webhook keeps: a region whose id starts with ``suggested-ignore-`` is recorded like a drawn one, with
  the id (``MaskRef.suggested``); so a kept suggestion trains as an ignore mask like a drawn one.
- Deleted: the next training job compares each annotated task's recorded suggestions with the ids its annotation
  kept; the missing ones are negatives for the detector's fit (``propagate_ignore_masks(rejected=...)``) and the
  task is never suggested again by that entry (the entry is dropped once the task is annotated).
The job's result and the version meta count both (``suggested_ignore``).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ml_backend.feedback.annotations import IGNORE, SUGGESTED_PREFIX, AnnotationRecord
from ml_backend.feedback.queue import key
from ml_backend.inference.results import HeatmapControl, heatmap_region
from ml_backend.io.label_config import ProjectSchema
from ml_backend.models.classifier import to_input_tensor
from ml_backend.train.mask_propagation import ArtefactDetector, PropagationConfig, _artefact_cells, hypercolumns

log = logging.getLogger(__name__)

PREFIX = SUGGESTED_PREFIX
DETECTOR_FILE = "artefact_detector.npz"
MAX_PER_TASK = 3  # artefact components suggested per task, the most probable first
MAX_STORED_TASKS = 100_000  # suggestion entries kept per project (a hash in Redis); oldest ranking overwritten


@dataclass(frozen=True)
class Suggestion:
    region_id: str
    score: float  # the detector's highest cell probability in the component
    cells: np.ndarray  # bool (h, w) on the detector's stride-4 grid

    def to_json(self) -> dict[str, Any]:
        packed = np.packbits(self.cells.astype(np.uint8).ravel())
        return {
            "id": self.region_id,
            "score": round(self.score, 4),
            "grid": list(self.cells.shape),
            "cells": base64.b64encode(packed.tobytes()).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Suggestion:
        h, w = (int(v) for v in data["grid"])
        bits = np.unpackbits(np.frombuffer(base64.b64decode(data["cells"]), dtype=np.uint8))[: h * w]
        return cls(str(data["id"]), float(data["score"]), bits.reshape(h, w).astype(bool))

    def mask(self, width: int, height: int) -> np.ndarray:
        """bool (height, width): the cells at the image's natural size (nearest neighbour)."""
        rows = np.minimum((np.arange(height) * self.cells.shape[0]) // height, self.cells.shape[0] - 1)
        cols = np.minimum((np.arange(width) * self.cells.shape[1]) // width, self.cells.shape[1] - 1)
        return self.cells[rows[:, None], cols[None, :]]


def find_suggestions(
    model: torch.nn.Module,
    images: torch.Tensor,
    detector: ArtefactDetector,
    config: PropagationConfig | None = None,
) -> list[list[Suggestion]]:
    """Per image of the normalised (B, 3, S, S) batch, the artefact components the detector finds (as propagation
    would mark them), at most ``MAX_PER_TASK``, the most probable first."""
    config = config or PropagationConfig()
    feats = hypercolumns(model, images, config.batch_size)
    n, c, h, w = feats.shape
    if detector.mean.shape[0] != c:
        # A detector fitted on other hypercolumns (a version saved before the stride-2 stem joined them, or
        # another backbone): its coefficients mean nothing here, so it suggests nothing rather than noise.
        log.warning(
            "artefact detector expects %d feature channels, the model gives %d: no suggestions",
            detector.mean.shape[0],
            c,
        )
        return [[] for _ in range(n)]
    prob = detector.probabilities(feats.permute(0, 2, 3, 1).reshape(-1, c).numpy().astype(np.float64))
    prob = prob.reshape(n, h, w)
    cells = _artefact_cells(prob, detector.threshold, config)
    out: list[list[Suggestion]] = []
    for j in range(n):
        components, count = ndimage.label(cells[j])
        found = []
        for k in range(1, count + 1):
            where = components == k
            found.append((float(prob[j][where].max()), where))
        found.sort(key=lambda f: -f[0])
        out.append([Suggestion(f"{PREFIX}{i}", score, where) for i, (score, where) in enumerate(found[:MAX_PER_TASK])])
    return out


def _ignore_target(schema: ProjectSchema) -> tuple[str, str, str] | None:
    """(control name, tag, ignore label) suggestions go to: a mask control first (bitmask, brush), else a
    rectangle control; None when no region control has an ignore label."""
    order = {"bitmasklabels": 0, "brushlabels": 1, "rectanglelabels": 2}
    options = [
        (order[c.tag], c.name, c.tag, label)
        for c in schema.region_controls
        if c.tag in order
        for label in c.labels
        if label in schema.ignore_labels
    ]
    if not options:
        return None
    _, name, tag, label = min(options, key=lambda o: o[0])
    return name, tag, label


def suggestion_regions(
    schema: ProjectSchema, suggestions: Sequence[Suggestion], width: int, height: int
) -> list[dict[str, Any]]:
    """Label Studio result items for the suggestions on an image of width x height, visibly marked."""
    target = _ignore_target(schema)
    if target is None:
        return []
    name, tag, label = target
    items = []
    for s in suggestions:
        text = [f"suggested ignore region: detector score {s.score:.2f} - keep it, or delete it if it is no artefact"]
        mask = s.mask(width, height)
        if tag == "rectanglelabels":
            rows, cols = np.nonzero(s.cells)
            gh, gw = s.cells.shape
            item: dict[str, Any] = {
                "id": s.region_id,
                "from_name": name,
                "to_name": schema.image_name,
                "type": tag,
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": {
                    "x": 100.0 * cols.min() / gw,
                    "y": 100.0 * rows.min() / gh,
                    "width": 100.0 * (cols.max() + 1 - cols.min()) / gw,
                    "height": 100.0 * (rows.max() + 1 - rows.min()) / gh,
                    "rotation": 0,
                    "rectanglelabels": [label],
                },
                "score": round(s.score, 6),
            }
        else:
            alpha = np.where(mask, 200, 0).astype(np.uint8)
            item = heatmap_region(
                HeatmapControl(name, tag, (label,)), schema.image_name, s.region_id, label, s.score, alpha
            )
        item["meta"] = {"text": text}
        items.append(item)
    return items


class SuggestionStore:
    """What was suggested on each task, in Redis: ``mdb:<project>:suggestions`` task id -> JSON."""

    def __init__(self, conn: Any, project: str) -> None:
        self.conn = conn
        self.key = key(project, "suggestions")

    def put(self, task_id: int, version: str, suggestions: Sequence[Suggestion]) -> None:
        if not suggestions:
            self.conn.hdel(self.key, str(task_id))
            return
        if self.conn.hlen(self.key) >= MAX_STORED_TASKS and not self.conn.hexists(self.key, str(task_id)):
            return  # bounded: a project this large keeps its first suggestions until they are annotated
        payload = {"version": version, "suggestions": [s.to_json() for s in suggestions]}
        self.conn.hset(self.key, str(task_id), json.dumps(payload))

    def get(self, task_id: int) -> list[Suggestion]:
        raw = self.conn.hget(self.key, str(task_id))
        if raw is None:
            return []
        try:
            return [Suggestion.from_json(s) for s in json.loads(raw)["suggestions"]]
        except (ValueError, KeyError, TypeError):
            return []

    def many(self, task_ids: Sequence[int]) -> dict[int, list[Suggestion]]:
        return {t: found for t in task_ids if (found := self.get(t))}


@dataclass
class SuggestionOutcomes:
    """Per annotated task, the suggestions its annotation kept (ids) and those it deleted."""

    kept: dict[int, list[str]]
    deleted: dict[int, list[Suggestion]]

    def summary(self, trained_tasks: set[int] | None = None) -> dict[str, int]:
        trained = set(self.kept) if trained_tasks is None else trained_tasks
        return {
            "confirmed": sum(len(v) for v in self.kept.values()),
            "confirmed_trained": sum(len(v) for t, v in self.kept.items() if t in trained),
            "deleted": sum(len(v) for v in self.deleted.values()),
            "deleted_tasks": len(self.deleted),
        }


def suggestion_outcomes(records: Sequence[AnnotationRecord], store: SuggestionStore) -> SuggestionOutcomes:
    """Kept: an ignore region of the annotation carries a suggested id. Deleted: a suggestion recorded for the task
    whose id no region of the annotation carries."""
    kept: dict[int, list[str]] = {}
    deleted: dict[int, list[Suggestion]] = {}
    for record in records:
        ids = sorted({m.suggested for k, m in record.masks.items() if k.split("#", 1)[0] == IGNORE and m.suggested})
        if ids:
            kept[record.task_id] = ids
        gone = [s for s in store.get(record.task_id) if s.region_id not in ids]
        if gone:
            deleted[record.task_id] = gone
    return SuggestionOutcomes(kept, deleted)


def rejected_tensors(
    deleted: dict[int, list[Suggestion]], keys: Sequence[str], images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, masks at the input size) of the training images with deleted suggestions, for the detector."""
    index, masks = [], []
    size = images.shape[-1]
    for i, k in enumerate(keys):
        found = deleted.get(int(k)) if k.isdigit() else None
        if found:
            union = np.logical_or.reduce([s.mask(size, size) for s in found])
            index.append(i)
            masks.append(torch.from_numpy(union.astype(np.float32))[None])
    if not index:
        return None
    return images[torch.tensor(index)], torch.stack(masks)


def load_detector(saved: bytes | None) -> ArtefactDetector | None:
    """The detector a version saved as ``DETECTOR_FILE``; None when it has none or the file is unreadable."""
    if saved is None:
        return None
    try:
        return ArtefactDetector.from_bytes(saved)
    except (ValueError, KeyError, OSError):
        return None


class Suggester:
    """The ranking job's side: runs the live version's detector (if it has one) on the images it predicts,
    records what it found per task, and adds the regions to the task's prediction."""

    def __init__(self, conn: Any, project: str, loaded: Any, detector_file: bytes | None) -> None:
        self.loaded = loaded
        self.detector = load_detector(detector_file) if conn is not None else None
        self.store = SuggestionStore(conn, project) if conn is not None else None
        self.found = 0

    def record(self, task_ids: Sequence[int], pixels: Sequence[np.ndarray]) -> None:
        if self.detector is None or self.store is None or not task_ids:
            return
        loaded = self.loaded
        batch = to_input_tensor(list(pixels), loaded.input_size, loaded.mean, loaded.std).to(loaded.device)
        with loaded.lock:
            found = find_suggestions(loaded.model, batch, self.detector)
        for task_id, suggestions in zip(task_ids, found, strict=True):
            self.store.put(task_id, loaded.version, suggestions)
            self.found += len(suggestions)

    def add(self, result: list[dict[str, Any]], schema: ProjectSchema, task_id: int, width: int, height: int) -> None:
        if self.store is None:
            return
        result.extend(suggestion_regions(schema, self.store.get(task_id), width, height))
