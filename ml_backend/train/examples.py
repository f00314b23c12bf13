"""Training examples as tensors: images at the model's input size, labels, and masks at two resolutions.

Ignore masks live at the input resolution (the input-gradient term acts on pixels); evidence masks are
area-averaged onto the backbone's heatmap grid (the alignment term acts on Grad-CAM cells).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
    attributes: dict = field(default_factory=dict)  # sex, age... for fairness metrics


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
    """Deterministic split by group (hash of patient or task): the same annotation stays on its side
    across rounds, so a version is never evaluated on images its parent trained on... as far as possible."""
    if len(examples) < 2 * min_holdout:
        return list(range(len(examples))), []
    import hashlib

    def bucket(e: Example) -> float:
        digest = hashlib.sha1((e.group or e.key).encode()).hexdigest()
        return int(digest[:8], 16) / 0xFFFFFFFF

    held = [i for i, e in enumerate(examples) if bucket(e) < fraction]
    if len(held) < min_holdout:
        held = sorted(range(len(examples)), key=lambda i: bucket(examples[i]))[:min_holdout]
    train = [i for i in range(len(examples)) if i not in set(held)]
    return train, held
