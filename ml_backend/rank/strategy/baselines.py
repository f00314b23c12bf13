"""The literature baselines the bias strategy is measured against: ``random``, ``entropy`` (mean binary entropy)
and ``bald`` (MC-dropout mutual information, the MONAI Label "epistemic" anchor)."""

from __future__ import annotations

import numpy as np

from ml_backend.rank.strategy.inputs import Candidates, RankedItem, checked_mc, ranked_items
from ml_backend.rank.strategy.signals import bald_scores, over_findings, uncertainty_signal


def _fmt(p: float) -> str:
    return f"{p:.2f}"


def rank_random(candidates: Candidates) -> list[RankedItem]:
    n, seed = candidates.p.shape[0], candidates.config.seed
    priority = np.random.default_rng(seed).random(n)
    reasons = [f"random baseline (seed {seed})"] * n
    order = np.lexsort((np.arange(n), -priority))
    return ranked_items(priority, order, reasons, [{"random": float(x)} for x in priority], candidates.limit)


def rank_entropy(candidates: Candidates) -> list[RankedItem]:
    p, labels = candidates.p, candidates.labels
    sig = uncertainty_signal(p, candidates.w)
    order = np.lexsort((np.arange(p.shape[0]), -sig.value))
    reasons = [
        f"entropy baseline: mean entropy {_fmt(v)}; most uncertain {labels[a]} (p={_fmt(p[i, a])})"
        for i, (v, a) in enumerate(zip(sig.value, sig.finding, strict=True))
    ]
    return ranked_items(sig.value, order, reasons, [{"uncertainty": float(v)} for v in sig.value], candidates.limit)


def rank_bald(candidates: Candidates) -> list[RankedItem]:
    p, labels = candidates.p, candidates.labels
    if candidates.inputs.mc_probabilities is None:
        raise ValueError("strategy 'bald' needs mc_probabilities (T, N, K): see mc_dropout_probabilities")
    mc = checked_mc(candidates.inputs, p)
    mi = bald_scores(mc)
    sig = over_findings(mi, candidates.w)
    order = np.lexsort((np.arange(p.shape[0]), -sig.value))
    reasons = [
        f"BALD baseline ({mc.shape[0]} MC-dropout passes): mutual information {v:.3f}; "
        f"highest on {labels[a]} ({mi[i, a]:.3f})"
        for i, (v, a) in enumerate(zip(sig.value, sig.finding, strict=True))
    ]
    return ranked_items(sig.value, order, reasons, [{"bald": float(v)} for v in sig.value], candidates.limit)
