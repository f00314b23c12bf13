"""The ``bias`` strategy: the signals combined into one priority, the diversity re-ordering and the reasons."""

from __future__ import annotations

from typing import Any

import numpy as np

from ml_backend.rank.strategy.inputs import Candidates, RankedItem, checked_mc
from ml_backend.rank.strategy.signals import (
    Signal,
    cooccurrence_signal,
    diversity_order,
    epistemic_signal,
    heatmap_signal,
    rarity_per_finding,
    rarity_signal,
    uncertainty_signal,
)

_DUPLICATE_SIMILARITY = 0.9  # reasons mention redundancy above this (centred cosine) similarity


def rank_bias(candidates: Candidates) -> list[RankedItem]:
    """The default strategy: a weighted mean of the signals plus a share of the strongest one, then the head of
    the queue chosen greedily for diversity when features are given."""
    inputs, config, p, labels, w = candidates.inputs, candidates.config, candidates.p, candidates.labels, candidates.w
    limit, top_k = candidates.limit, candidates.top_k
    n = p.shape[0]
    wn = w / w.max()  # finding weights relative to the most important finding
    sw = config.signal_weights
    signals: dict[str, Signal] = {}
    if sw["uncertainty"] > 0:
        signals["uncertainty"] = uncertainty_signal(p, w)
    if sw["epistemic"] > 0 and inputs.mc_probabilities is not None:
        signals["epistemic"] = epistemic_signal(checked_mc(inputs, p), w)
    rarity = rarity_per_finding(inputs, config, labels) if sw["rarity"] > 0 else None
    if rarity is not None:
        signals["rarity"] = rarity_signal(p, rarity, wn)
    if sw["cooccurrence"] > 0 and (sig := cooccurrence_signal(p, inputs, wn)) is not None:
        signals["cooccurrence"] = sig
    if sw["heatmap"] > 0 and (sig := heatmap_signal(p, inputs, config, wn)) is not None:
        signals["heatmap"] = sig
    if not signals:
        raise ValueError("no ranking signal is available: give probabilities with a non-zero signal weight")

    names = list(signals)
    weights = np.array([sw[s] for s in names])
    values = np.stack([signals[s].value for s in names])  # (S, N)
    mean = (weights[:, None] * values).sum(axis=0) / weights.sum()
    contributions = (weights / weights.max())[:, None] * values  # what each signal adds, comparable across signals
    priority = (1.0 - config.peak_share) * mean + config.peak_share * contributions.max(axis=0)

    penalty = config.diversity_lambda * sw["diversity"]
    head = config.diverse_top if top_k is None else max(int(top_k), 0)
    if inputs.features is not None and penalty > 0:
        order, redundancy = diversity_order(priority, np.asarray(inputs.features), head, penalty)
    else:
        order, redundancy = np.lexsort((np.arange(n), -priority)), None

    chosen = order[:limit]
    explain = _Explainer(names, contributions[:, chosen], signals, p, labels, chosen)
    columns = {s: signals[s].value[chosen].tolist() for s in names}
    if "heatmap" in signals:
        for part in signals["heatmap"].detail["names"]:
            columns[f"heatmap_{part}"] = signals["heatmap"].detail[part][chosen].tolist()
    if redundancy is not None:
        columns["diversity"] = (1.0 - redundancy[chosen]).tolist()
    redundant = None if redundancy is None else redundancy[chosen].tolist()
    prio = priority[chosen].tolist()
    items: list[RankedItem] = []
    for r, i in enumerate(chosen.tolist()):
        reason = explain.reason(r, prio[r], None if redundant is None else redundant[r])
        sig_values = {name: column[r] for name, column in columns.items()}
        items.append(RankedItem(index=i, priority=prio[r], rank=r, reason=reason, signals=sig_values))
    return items


class _Explainer:
    """Reasons in words for the selected rows: the strongest one to three signals, weaker ones left out.

    Everything is turned into Python lists once; formatting 10,000 reasons then takes a few tens of ms.
    """

    def __init__(
        self,
        names: list[str],
        contributions: np.ndarray,  # (S, M) for the selected rows
        signals: dict[str, Signal],
        p: np.ndarray,
        labels: list[str],
        rows: np.ndarray,
    ) -> None:
        self.names, self.labels = names, labels
        self.contrib = contributions.T.tolist()
        self.top = np.argsort(-contributions, axis=0, kind="stable")[:3].T.tolist()
        self.p = p[rows].tolist()
        self.finding = {s: signals[s].finding[rows].tolist() for s in names}
        self.detail: dict[str, list[Any]] = {}
        if "cooccurrence" in signals:
            detail = signals["cooccurrence"].detail
            self.detail["partner"] = detail["partner"][rows].tolist()
            self.detail["missed"] = detail["missed"][rows].tolist()
        if "heatmap" in signals:
            detail = signals["heatmap"].detail
            part_names = list(detail["names"])
            self.detail["part"] = [part_names[j] for j in detail["part"][rows].tolist()]
            if "other" in detail:
                self.detail["other"] = detail["other"][rows].tolist()

    def reason(self, r: int, priority: float, redundancy: float | None) -> str:
        contrib, labels, probs = self.contrib[r], self.labels, self.p[r]
        best = max(contrib)
        if best < 0.05:
            return f"no strong signal (priority {priority:.2f})"
        parts: list[str] = []
        for s in self.top[r]:
            if contrib[s] < 0.5 * best or contrib[s] < 0.05:
                break
            name = self.names[s]
            a = self.finding[name][r]
            finding, prob = labels[a], probs[a]
            if name == "uncertainty":
                parts.append(f"uncertain about {finding} (p={prob:.2f})")
            elif name == "epistemic":
                parts.append(f"the model's knowledge of {finding} is unsettled here (MC-dropout disagreement)")
            elif name == "rarity":
                parts.append(f"rare finding {finding} predicted at {prob:.2f}")
            elif name == "cooccurrence":
                b = self.detail["partner"][r]
                if self.detail["missed"][r]:
                    parts.append(
                        f"{finding} possibly missed (p={prob:.2f}) where its usual partner {labels[b]} is absent "
                        f"(p={probs[b]:.2f})"
                    )
                else:
                    parts.append(
                        f"{finding} predicted at {prob:.2f} alongside its frequent partner {labels[b]} "
                        f"(p={probs[b]:.2f})"
                    )
            else:
                part = self.detail["part"][r]
                if part == "ignore":
                    parts.append(f"heatmap of {finding} (p={prob:.2f}) on the ignore region")
                elif part == "outside":
                    parts.append(f"heatmap of {finding} (p={prob:.2f}) outside the body")
                else:
                    parts.append(f"heatmaps of {finding} and {labels[self.detail['other'][r]]} on the same spot")
        if redundancy is not None and redundancy >= _DUPLICATE_SIMILARITY:
            parts.append(f"looks like a task ranked higher (similarity {redundancy:.2f})")
        return "; ".join(parts)
