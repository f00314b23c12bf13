"""What physicians' annotations so far say about the project: label counts, co-occurrence and where they
painted "ignore" -- the ranking's rarity, co-occurrence and heatmap-on-ignore signals come from here."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ml_backend.config import Settings
from ml_backend.feedback.annotations import IGNORE, AnnotationRecord, decode_region

DECODE_LIMITS = Settings()  # the default pixel and byte limits bound what a stored region may decode to

log = logging.getLogger(__name__)


@dataclass
class Priors:
    label_counts: np.ndarray  # (K,) positives per finding among annotated images
    n_annotated: int
    cooccurrence: np.ndarray  # (K, K): P(column | row) among annotated images (0 where the row has no positive)
    ignore_prior: np.ndarray | None  # (h, w): mean of the ignore masks, resized to the heatmap grid
    n_ignore_masks: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)  # masks that could not be decoded, with reasons

    def summary(self, labels: Sequence[str]) -> dict[str, Any]:
        return {
            "annotated": self.n_annotated,
            "ignore_masks": self.n_ignore_masks,
            "label_counts": {k: int(c) for k, c in zip(labels, self.label_counts, strict=True)},
            "skipped_masks": len(self.skipped),
        }


def label_statistics(positives: Iterable[Iterable[str]], labels: Sequence[str]) -> tuple[np.ndarray, int, np.ndarray]:
    """(counts (K,), images, P(B | A) (K, K)) from each annotated image's positive findings."""
    index = {name: k for k, name in enumerate(labels)}
    rows = [[index[x] for x in set(pos) if x in index] for pos in positives]
    y = np.zeros((len(rows), len(labels)), dtype=np.float64)
    for i, ks in enumerate(rows):
        y[i, ks] = 1.0
    counts = y.sum(axis=0)
    joint = y.T @ y
    cooccurrence = np.divide(joint, counts[:, None], out=np.zeros_like(joint), where=counts[:, None] > 0)
    return counts, len(rows), cooccurrence


def resize_mask(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A (H, W) mask -> the share of each heatmap cell it covers (area average), shape ``grid``."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(t, grid)[0, 0].numpy()


def priors_from_records(records: Sequence[AnnotationRecord], labels: Sequence[str], grid: tuple[int, int]) -> Priors:
    """Priors from annotation records (the backend's annotation store, or parsed from Label Studio)."""
    counts, n, cooccurrence = label_statistics((r.positives for r in records), labels)
    total = np.zeros(grid, dtype=np.float64)
    masked = 0
    skipped: list[dict[str, Any]] = []
    for record in records:
        ignore = None
        for key, mask in record.masks.items():
            if key.split("#", 1)[0] != IGNORE:
                continue
            try:
                # Any region kind (brush, rectangle, polygon, bitmask), at the size it was drawn on.
                marked = decode_region(mask, mask.width, mask.height, DECODE_LIMITS)
            except ValueError as exc:  # a corrupt mask must not stop the ranking; it is reported instead
                skipped.append({"task": record.task_id, "reason": f"ignore mask unreadable: {exc}"})
                continue
            ignore = marked if ignore is None else ignore | marked
        if ignore is not None and ignore.any():
            total += resize_mask(ignore, grid)
            masked += 1
    # Mean over the images that carry an ignore mask: an image without one says nothing about where to ignore.
    prior = (total / masked).astype(np.float32) if masked else None
    return Priors(counts, n, cooccurrence, prior, masked, skipped)
