"""The bias strategy's signals, each per image on a [0, 1] scale, and the greedy re-ranking for diversity."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ml_backend.rank.strategy.config import RankConfig
from ml_backend.rank.strategy.inputs import RankInputs, as_array

_EPS = 1e-12
# An imbalance of at least this ratio (most common / this finding) counts as fully rare; smaller ratios count
# proportionally on a log scale, so two findings with 100 and 90 positives are not called "rare".
_FULL_RARITY_RATIO = 10.0
_NEAR_MISS_PEAK = 0.61695  # max over p of H(p)(1 - p), at p ~ 0.3


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of Bernoulli(p), elementwise, in [0, 1]."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def bald_scores(mc_probabilities: np.ndarray) -> np.ndarray:
    """(T, N, K) MC samples -> (N, K) mutual information in bits: H(mean p) - mean H(p)."""
    mc = np.asarray(mc_probabilities, dtype=np.float64)
    return np.clip(binary_entropy(mc.mean(axis=0)) - binary_entropy(mc).mean(axis=0), 0.0, 1.0)


def default_body_mask(h: int, w: int) -> np.ndarray:
    """Where anatomy is expected in a chest X-ray: a central ellipse (most of the width, nearly the full height),
    with a soft edge so a heatmap one cell past the border is not judged like one in the corner."""
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    r = np.sqrt((x[None, :] / 0.42) ** 2 + (y[:, None] / 0.47) ** 2)
    return np.clip((1.15 - r) / 0.3, 0.0, 1.0)


def _resize_map(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim != 2:
        raise ValueError(f"a prior/body mask must be 2-D (h, w), got shape {mask.shape}")
    if mask.shape == (h, w):
        return mask
    t = torch.from_numpy(np.ascontiguousarray(mask))[None, None]
    mode = "area" if mask.shape[0] >= h and mask.shape[1] >= w else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=(h, w), mode=mode, **kwargs)[0, 0].numpy()


@dataclass
class Signal:
    """One signal: per-image value in [0, 1] and, per image, the finding (and partner) behind it."""

    value: np.ndarray  # (N,)
    finding: np.ndarray  # (N,) index of the finding that drives the value
    detail: dict[str, np.ndarray] = field(default_factory=dict)


def over_findings(per_finding: np.ndarray, w: np.ndarray) -> Signal:
    # Weighted mean over findings (a max over 14 findings is ~1 for nearly every image); the reason names the
    # finding contributing most.
    weighted = per_finding * w
    return Signal(weighted.sum(axis=1) / max(w.sum(), _EPS), np.argmax(weighted, axis=1))


def uncertainty_signal(p: np.ndarray, w: np.ndarray) -> Signal:
    return over_findings(binary_entropy(p), w)


def epistemic_signal(mc: np.ndarray, w: np.ndarray) -> Signal:
    # BALD per finding, weighted mean over findings. Mutual information under feature dropout is small in
    # absolute terms (typically < 0.05 bit), so it is scaled by the pool's 99th percentile: 1 = among the most
    # epistemically uncertain of the candidates, comparable with the [0, 1] scale of the other signals.
    sig = over_findings(bald_scores(mc), w)
    scale = float(np.percentile(sig.value, 99)) if len(sig.value) else 0.0
    scaled = np.clip(sig.value / scale, 0.0, 1.0) if scale > _EPS else np.zeros_like(sig.value)
    return Signal(scaled, sig.finding, {"bits": sig.value})


def rarity_per_finding(inputs: RankInputs, config: RankConfig, labels: Sequence[str]) -> np.ndarray | None:
    k = len(labels)
    counts = None if inputs.label_counts is None else as_array(inputs.label_counts, "label_counts", 1)
    if counts is not None and counts.shape != (k,):
        raise ValueError(f"label_counts must have shape ({k},), got {counts.shape}")
    if counts is not None and counts.sum() > 0:
        freq = counts.astype(np.float64) + 1.0  # +1: a finding nobody has marked yet is rare, not infinitely so
    elif config.prevalence:
        known = [config.prevalence[x] for x in labels if x in config.prevalence]
        fill = float(np.median(known)) if known else 0.05
        freq = np.array([config.prevalence.get(x, fill) for x in labels], dtype=np.float64)
    else:
        return None
    ratio = freq.max() / freq
    return np.log(ratio) / max(math.log(freq.max() / freq.min()), math.log(_FULL_RARITY_RATIO))


def rarity_signal(p: np.ndarray, rarity: np.ndarray, wn: np.ndarray) -> Signal:
    # "May contain": the probability itself; a rare finding at 0.5 is worth a look, a common one is not.
    score = p * rarity[None, :] * wn[None, :]
    return Signal(score.max(axis=1), score.argmax(axis=1))


def cooccurrence_signal(p: np.ndarray, inputs: RankInputs, wn: np.ndarray) -> Signal | None:
    if inputs.cooccurrence is None:
        return None
    k = p.shape[1]
    c = np.clip(as_array(inputs.cooccurrence, "cooccurrence", 2), 0.0, 1.0).astype(np.float64)
    if c.shape != (k, k):
        raise ValueError(f"cooccurrence must have shape ({k}, {k}), got {c.shape}")
    # Strength of "B is A's frequent partner": how far P(B|A) exceeds B's base rate (a common B, such as
    # Infiltration, co-occurs with everything without being a partner).
    base = np.zeros(k)
    if inputs.label_counts is not None and inputs.n_annotated > 0:
        base = np.clip(np.asarray(inputs.label_counts, dtype=np.float64) / inputs.n_annotated, 0.0, 0.999)
    strength = np.clip((c - base[None, :]) / (1.0 - base[None, :]), 0.0, 1.0)
    np.fill_diagonal(strength, 0.0)
    if not strength.any():
        return None
    p64 = p.astype(np.float64)
    # with partner: A predicted where B is present (the model may read B as evidence for A)
    with_partner = strength[None, :, :] * p64[:, None, :]  # (N, A, B)
    b_with = with_partner.argmax(axis=2)
    r_with = p64 * np.take_along_axis(with_partner, b_with[:, :, None], axis=2)[:, :, 0]
    # without partner: A just below the threshold where B is absent (the model may miss A when B is not there).
    # H(p)(1 - p) peaks near p = 0.3 and fades above 0.5, where A counts as predicted, not missed.
    near_miss = np.clip(binary_entropy(p64) * (1.0 - p64) / _NEAR_MISS_PEAK, 0.0, 1.0)
    without = strength[None, :, :] * (1.0 - p64)[:, None, :]
    b_without = without.argmax(axis=2)
    r_without = near_miss * np.take_along_axis(without, b_without[:, :, None], axis=2)[:, :, 0]
    missed = r_without > r_with
    per_finding = np.maximum(r_with, r_without) * wn[None, :]
    a = per_finding.argmax(axis=1)
    rows = np.arange(len(p))
    partner = np.where(missed, b_without, b_with)[rows, a]
    return Signal(per_finding[rows, a], a, {"partner": partner, "missed": missed[rows, a]})


def heatmap_signal(p: np.ndarray, inputs: RankInputs, config: RankConfig, wn: np.ndarray) -> Signal | None:
    if inputs.cams is None:
        return None
    cams = as_array(inputs.cams, "cams", 4)
    n, k = p.shape
    if cams.shape[:2] != (n, k):
        raise ValueError(f"cams must have shape ({n}, {k}, h, w), got {cams.shape}")
    h, w = cams.shape[2:]
    flat = np.clip(cams.reshape(n, k, h * w), 0.0, 1.0)
    sq = flat * flat  # squaring sharpens the map toward its peak: a diffuse map says little about where it looks
    sq_sum = sq.sum(axis=2) + _EPS
    peak = flat.max(axis=2) + _EPS
    parts: dict[str, np.ndarray] = {}
    weights = config.heatmap_parts

    def mass_on(region: np.ndarray) -> np.ndarray:
        # Geometric mean of "how hot the map is there, relative to its peak" and "share of its squared mass
        # there": high only when the map's hottest spot sits in the region, not when a broad map grazes it.
        r = region.reshape(1, 1, h * w)
        hot = (flat * r).max(axis=2) / peak
        share = (sq * r).sum(axis=2) / sq_sum
        return np.sqrt(np.clip(hot * share, 0.0, 1.0))

    if inputs.ignore_prior is not None and weights["ignore"] > 0:
        prior = np.clip(_resize_map(inputs.ignore_prior, h, w), 0.0, 1.0)
        if prior.max() > 0:
            parts["ignore"] = weights["ignore"] * mass_on(prior / prior.max())
    if weights["outside"] > 0:
        body = default_body_mask(h, w) if inputs.body_mask is None else _resize_map(inputs.body_mask, h, w)
        outside = 1.0 - np.clip(body, 0.0, 1.0)
        if outside.max() > 0:
            parts["outside"] = weights["outside"] * mass_on(outside)
    other = None
    if weights["overlap"] > 0 and k > 1:
        # Several findings looking at the same spot: cosine of the sharpened maps, counting a partner finding
        # only as much as it is predicted.
        unit = sq / np.sqrt((sq * sq).sum(axis=2, keepdims=True) + _EPS)
        cos = np.einsum("nah,nbh->nab", unit, unit, optimize=True)
        cos *= p[:, None, :]
        idx = np.arange(k)
        cos[:, idx, idx] = 0.0
        other = cos.argmax(axis=2)
        parts["overlap"] = weights["overlap"] * np.take_along_axis(cos, other[:, :, None], axis=2)[:, :, 0]
    if not parts:
        return None
    names = list(parts)
    stacked = np.stack([parts[x] for x in names])  # (P, N, K)
    which = stacked.argmax(axis=0)  # (N, K)
    # A finding's heatmap counts half even when it is not predicted: attention on a marker is a shortcut
    # whether or not it tips this image over the threshold.
    relevance = (0.5 + 0.5 * p) * wn[None, :]
    per_finding = stacked.max(axis=0) * relevance
    a = per_finding.argmax(axis=1)
    rows = np.arange(n)
    detail = {"part": which[rows, a]}
    for i, name in enumerate(names):
        detail[name] = (stacked[i] * relevance).max(axis=1)
    if other is not None:
        detail["other"] = other[rows, a]
    detail["names"] = np.array(names, dtype=object)
    return Signal(per_finding[rows, a], a, detail)


def diversity_order(
    priority: np.ndarray, features: np.ndarray, head: int, penalty: float
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy MMR for the first ``head`` places: pick argmax(priority - penalty * max similarity to picked).

    Returns (order of all items, max similarity to the items ranked above it). Exact, and fast at N=10,000:
    an item below the head-th priority minus the penalty can never enter the head (pruned), and the greedy
    is evaluated lazily -- an item's adjusted score only falls as the head grows, so a stale score is an
    upper bound and only the item on top of the heap needs its similarities brought up to date.
    """
    n = len(priority)
    feats = features.astype(np.float32)
    feats = feats - feats.mean(axis=0, keepdims=True)  # centred: X-rays all look alike before centring
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    unit = np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 1e-8)
    by_priority = np.lexsort((np.arange(n), -priority))
    head = min(head, n)
    if head == 0 or penalty <= 0:
        return by_priority, np.zeros(n)
    cutoff = priority[by_priority[head - 1]] - penalty
    pool = by_priority[priority[by_priority] >= cutoff]  # in priority order: heap ties go to higher priority
    pool_priority = priority[pool].astype(np.float64).tolist()
    heap = [(-pool_priority[j], j) for j in range(len(pool))]  # already a valid heap (sorted)
    max_sim = [0.0] * len(pool)
    seen = [0] * len(pool)  # how many picked items max_sim[j] accounts for
    picked_unit = np.empty((head, unit.shape[1]), dtype=np.float32)
    picked: list[int] = []
    sim_at_pick: list[float] = []
    while len(picked) < head:
        _, j = heapq.heappop(heap)
        if seen[j] < len(picked):
            sims = picked_unit[seen[j] : len(picked)] @ unit[pool[j]]
            max_sim[j] = max(max_sim[j], float(sims.max()))
            seen[j] = len(picked)
            heapq.heappush(heap, (-(pool_priority[j] - penalty * max_sim[j]), j))
            continue
        picked_unit[len(picked)] = unit[pool[j]]
        picked.append(j)
        sim_at_pick.append(max(0.0, max_sim[j]))
    head_items = pool[picked]
    chosen = np.zeros(n, dtype=bool)
    chosen[head_items] = True
    rest = by_priority[~chosen[by_priority]]
    order = np.concatenate([head_items, rest])
    redundancy = np.zeros(n)
    redundancy[head_items] = sim_at_pick
    if len(rest):
        # For the tail: similarity to the head, computed once (the reason can say "like a task ranked higher").
        head_t = torch.from_numpy(picked_unit)
        sims = np.empty(len(rest))
        for start in range(0, len(rest), 4096):
            block = torch.from_numpy(unit[rest[start : start + 4096]]) @ head_t.T
            sims[start : start + len(block)] = block.max(dim=1).values.numpy()
        redundancy[rest] = np.clip(sims, 0.0, 1.0)
    return order, redundancy
