"""Decorrelating loss weights for findings that co-occur in the training labels.

Why: when finding A nearly always comes with B among the annotated images, the cheapest way to predict A is to
detect B ("effusion is present, so atelectasis too"), and masks cannot say where that shortcut lives because it
is in the anatomy, not on a marker. Reweighing (Kamiran & Calders 2012) gives each of the four (A, B) cells of
A's loss column the weight P(A) P(B) / P(A, B): under the weighted distribution A is independent of B, so B's
features stop carrying information about A, while A's and B's own marginal rates stay as they were (the
positive weights of the prediction loss remain valid).

One partner per finding, its strongest by the phi coefficient (``measure.metrics.strongest_partners``, the
partner the version report measures co-occurrence Equalized Odds against), and only A's column is weighted: a
column's weights never depend on pairs that do not involve its finding. AIF360's ``Reweighing`` does this for one
protected attribute on a dataframe, not for a column per finding on a tensor; the arithmetic is a few lines,
so it is written here rather than adding that dependency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ml_backend.measure.metrics import strongest_partners


@dataclass(frozen=True)
class DecorrelationConfig:
    min_phi: float = 0.2  # a partner must co-occur at least this strongly (phi coefficient of the label columns)
    min_cell: int = 3  # each of the four (A, B) cells needs this many images, else the column keeps weight 1
    max_weight: float = 10.0  # a handful of A-without-B images must not carry the whole column


@dataclass(frozen=True)
class DecorrelatedPair:
    """One finding's loss column reweighted against its partner, for the training report."""

    finding: int
    partner: int
    phi: float
    partner_given_finding: float  # P(B | A) in the training labels, before weighting
    max_weight: float  # the largest weight in the column after clipping

    def describe(self, labels: tuple[str, ...] | list[str]) -> dict[str, object]:
        return {
            "finding": labels[self.finding],
            "partner": labels[self.partner],
            "phi": round(self.phi, 3),
            "partner_given_finding": round(self.partner_given_finding, 3),
            "max_weight": round(self.max_weight, 2),
        }


def decorrelating_weights(
    targets: torch.Tensor, config: DecorrelationConfig = DecorrelationConfig()
) -> tuple[torch.Tensor, list[DecorrelatedPair]]:
    """Per-(image, finding) loss weights (N, K), mean 1 per column, and the pairs that were decorrelated.

    Columns without a partner above ``config.min_phi`` (or with a near-empty cell) are all ones.
    """
    n, k = targets.shape
    weights = torch.ones(n, k, dtype=torch.float32)
    pairs: list[DecorrelatedPair] = []
    if n == 0 or k < 2:
        return weights, pairs
    y = targets > 0.5
    partners = strongest_partners(y.cpu().numpy(), min_support=config.min_cell, min_phi=config.min_phi)
    for a, (b, strength) in sorted(partners.items()):
        column = torch.empty(n, dtype=torch.float64)
        cells = [(y[:, a] == bool(i)) & (y[:, b] == bool(j)) for i in (0, 1) for j in (0, 1)]
        counts = [int(c.sum()) for c in cells]
        if min(counts) < config.min_cell:
            continue
        p_a, p_b = float(y[:, a].double().mean()), float(y[:, b].double().mean())
        for (i, j), cell, count in zip(((0, 0), (0, 1), (1, 0), (1, 1)), cells, counts, strict=True):
            expected = (p_a if i else 1 - p_a) * (p_b if j else 1 - p_b) * n
            column[cell] = expected / count
        column = column.clamp(1.0 / config.max_weight, config.max_weight)
        column = column / column.mean()
        weights[:, a] = column.float()
        pairs.append(
            DecorrelatedPair(
                finding=a,
                partner=b,
                phi=strength,
                partner_given_finding=counts[3] / (counts[2] + counts[3]),
                max_weight=float(column.max()),
            )
        )
    return weights, pairs
