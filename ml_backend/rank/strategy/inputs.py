"""What the ranking reads (``RankInputs``) and returns (``RankedItem``), and the checks on its inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_backend.rank.strategy.config import RankConfig


@dataclass
class RankInputs:
    """Everything the ranking looks at, for N candidate images and K findings."""

    probabilities: np.ndarray  # (N, K) model probabilities for the candidate (unlabelled) images
    labels: Sequence[str]  # K finding names
    cams: np.ndarray | None = None  # (N, K, h, w) heatmaps scaled to [0, 1]
    features: np.ndarray | None = None  # (N, C) pooled backbone features for diversity
    mc_probabilities: np.ndarray | None = None  # (T, N, K) MC-dropout samples for BALD
    label_counts: np.ndarray | None = None  # (K,) positives among annotated images (rarity)
    n_annotated: int = 0
    cooccurrence: np.ndarray | None = None  # (K, K) P(B | A) among annotated labels
    ignore_prior: np.ndarray | None = None  # (h, w) in [0, 1]: mean of resized "ignore" masks so far
    body_mask: np.ndarray | None = None  # (h, w) in [0, 1]: where anatomy is expected (None -> central ellipse)


@dataclass
class RankedItem:
    index: int  # row in RankInputs
    priority: float  # the strategy's score in [0, 1] before diversity re-ordering
    rank: int  # 0 = review first
    reason: str
    signals: dict[str, float]


@dataclass(frozen=True)
class Candidates:
    """Checked inputs handed to a strategy function: probabilities clipped to [0, 1], one weight per finding."""

    inputs: RankInputs
    config: RankConfig
    p: np.ndarray  # (N, K)
    labels: list[str]
    w: np.ndarray  # (K,) finding weights
    limit: int  # how many items to return
    top_k: int | None


def as_array(value: Any, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0)


def checked_probabilities(inputs: RankInputs) -> tuple[np.ndarray, list[str]]:
    p = as_array(inputs.probabilities, "probabilities", 2)
    labels = [str(x) for x in inputs.labels]
    if p.shape[1] != len(labels):
        raise ValueError(f"probabilities have {p.shape[1]} columns but {len(labels)} labels were given")
    if inputs.features is not None:
        feats = np.asarray(inputs.features)
        if feats.ndim != 2 or feats.shape[0] != p.shape[0]:
            raise ValueError(f"features must have shape ({p.shape[0]}, C), got {feats.shape}")
    return np.clip(p, 0.0, 1.0), labels


def checked_mc(inputs: RankInputs, p: np.ndarray) -> np.ndarray:
    mc = np.clip(as_array(inputs.mc_probabilities, "mc_probabilities", 3), 0.0, 1.0)
    if mc.shape[1:] != p.shape or mc.shape[0] < 2:
        raise ValueError(f"mc_probabilities must have shape (T>=2, {p.shape[0]}, {p.shape[1]}), got {mc.shape}")
    return mc


def ranked_items(
    priority: np.ndarray, order: np.ndarray, reasons: list[str], signals: list[dict[str, float]], limit: int
) -> list[RankedItem]:
    return [
        RankedItem(index=int(i), priority=float(priority[i]), rank=r, reason=reasons[i], signals=signals[i])
        for r, i in enumerate(order[:limit].tolist())
    ]
