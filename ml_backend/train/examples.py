"""Training examples as tensors: images at the model's input size, labels, and masks at two resolutions.

Ignore masks live at the input resolution (the input-gradient term acts on pixels); evidence masks are
area-averaged onto the backbone's heatmap grid (the alignment term acts on Grad-CAM cells).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ml_backend.models.classifier import to_input_tensor


@dataclass
class Example:
    image: np.ndarray  # float32 (H, W) grayscale in [0, 1], natural size
    targets: np.ndarray  # float32 (K,) 0/1
    ignore: np.ndarray | None = None  # bool (H, W): pixels the model must not depend on
    evidence: dict[int, np.ndarray] = field(default_factory=dict)  # finding index -> bool/float (H, W)
    key: str = ""  # task id or image name, for logs and splits
    group: str = ""  # e.g. patient id: splits never put one patient on both sides
    attributes: dict = field(default_factory=dict)  # patient_id, sex, age (years), site: for fairness metrics
    skipped: list[dict[str, str]] = field(default_factory=list)  # regions/fields left out: {"where", "code", "reason"}


@dataclass
class ExampleTensors:
    images: torch.Tensor  # (N, 3, S, S), normalised
    targets: torch.Tensor  # (N, K)
    ignore: torch.Tensor  # (N, 1, S, S) float in {0, 1}
    has_ignore: torch.Tensor  # (N,) bool
    evidence: torch.Tensor  # (N, K, h, w) float in [0, 1]
    has_evidence: torch.Tensor  # (N, K) bool

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> ExampleTensors:
        return ExampleTensors(
            *(
                t[index]
                for t in (self.images, self.targets, self.ignore, self.has_ignore, self.evidence, self.has_evidence)
            )
        )


def tensorise(
    examples: Sequence[Example],
    num_findings: int,
    input_size: int,
    grid: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> ExampleTensors:
    n = len(examples)
    images = (
        to_input_tensor([e.image for e in examples], input_size, mean, std)
        if n
        else torch.zeros(0, 3, input_size, input_size)
    )
    ignore = torch.zeros(n, 1, input_size, input_size)
    evidence = torch.zeros(n, num_findings, *grid)
    has_ignore = torch.zeros(n, dtype=torch.bool)
    has_evidence = torch.zeros(n, num_findings, dtype=torch.bool)
    for i, example in enumerate(examples):
        if example.ignore is not None and example.ignore.any():
            mask = torch.from_numpy(example.ignore.astype(np.float32))[None, None]
            # Any pixel of the marker counts: area-resize, then keep every touched input pixel.
            ignore[i] = (F.interpolate(mask, size=(input_size, input_size), mode="area") > 0).float()[0]
            has_ignore[i] = True
        for k, mask_k in example.evidence.items():
            if mask_k is None or not np.any(mask_k):
                continue
            mask = torch.from_numpy(np.asarray(mask_k, dtype=np.float32))[None, None]
            evidence[i, k] = F.adaptive_avg_pool2d(mask, grid)[0, 0]
            has_evidence[i, k] = True
    targets = (
        torch.from_numpy(np.stack([e.targets for e in examples]).astype(np.float32))
        if n
        else torch.zeros(0, num_findings)
    )
    return ExampleTensors(images, targets, ignore, has_ignore, evidence, has_evidence)


def holdout_split(examples: Sequence[Example], fraction: float, min_holdout: int = 4) -> tuple[list[int], list[int]]:
    """Deterministic split by group (hash of the patient id, or of the task when the task data has none): one
    patient's images are all on one side, and the same annotation stays on its side across rounds, so a version
    is never evaluated on images (or patients) its parent trained on... as far as possible."""
    if len(examples) < 2 * min_holdout:
        return list(range(len(examples))), []

    def bucket(group: str) -> float:
        return int(hashlib.sha1(group.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    members: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        members.setdefault(e.group or e.key, []).append(i)
    order = sorted(members, key=lambda g: (bucket(g), g))
    held_groups = {g for g in order if bucket(g) < fraction}
    if sum(len(members[g]) for g in held_groups) < min_holdout:  # whole groups, lowest buckets first
        held_groups, n = set(), 0
        for g in order:
            if n >= min_holdout:
                break
            held_groups.add(g)
            n += len(members[g])
    if len(held_groups) == len(members):  # one patient holds everything: nothing would be left to train on
        return list(range(len(examples))), []
    held = sorted(i for g in held_groups for i in members[g])
    held_set = set(held)
    return [i for i in range(len(examples)) if i not in held_set], held


def skipped_regions_summary(examples: Sequence[Example]) -> dict[str, Any]:
    """``{"count": n, "reasons": {reason: n}}`` over the regions and fields the examples left out, most frequent
    reason first: what the version report prints ("2 regions skipped: label 'Foo' is neither ...")."""
    reasons = Counter(s.get("reason", "") for e in examples for s in e.skipped)
    return {"count": sum(reasons.values()), "reasons": dict(reasons.most_common())}
