"""Decorrelating loss weights (train/reweighting.py) and their use by the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.measure.metrics import phi_coefficients
from ml_backend.models.classifier import build_classifier
from ml_backend.train.examples import ExampleTensors
from ml_backend.train.losses import LossConfig
from ml_backend.train.reweighting import DecorrelationConfig, decorrelating_weights
from ml_backend.train.trainer import TrainConfig, fine_tune


def _correlated_labels(n: int = 400, keep: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Three findings: A (0) nearly always with B (1), C (2) independent of both."""
    rng = np.random.default_rng(seed)
    b = rng.random(n) < 0.4
    a = np.where(b, rng.random(n) < 0.6, rng.random(n) < 0.6 * keep)
    c = rng.random(n) < 0.3
    return torch.from_numpy(np.stack([a, b, c], axis=1).astype(np.float32))


def _weighted_dependence(y: torch.Tensor, w: torch.Tensor, a: int, b: int) -> tuple[float, float]:
    """P_w(A | B) and P_w(A | not B) under the weights of A's column."""
    col, ya, yb = w[:, a].double(), y[:, a] > 0.5, y[:, b] > 0.5
    with_b = float((col * (ya & yb)).sum() / (col * yb).sum())
    without_b = float((col * (ya & ~yb)).sum() / (col * ~yb).sum())
    return with_b, without_b


def test_weights_make_a_finding_independent_of_its_partner() -> None:
    y = _correlated_labels()
    raw_with = float(y[y[:, 1] > 0, 0].mean())
    raw_without = float(y[y[:, 1] == 0, 0].mean())
    assert raw_with > 4 * raw_without  # the shortcut is there before weighting

    weights, pairs = decorrelating_weights(y, DecorrelationConfig(max_weight=100.0))
    with_b, without_b = _weighted_dependence(y, weights, 0, 1)
    assert with_b == pytest.approx(without_b, abs=1e-6)
    # reweighing keeps the finding's own rate (so the positive weights of the loss stay valid)
    assert float((weights[:, 0] * y[:, 0]).mean()) == pytest.approx(float(y[:, 0].mean()), abs=1e-6)
    assert torch.allclose(weights.mean(dim=0), torch.ones(3), atol=1e-5)
    by_finding = {p.finding: p for p in pairs}
    assert by_finding[0].partner == 1 and by_finding[0].partner_given_finding > 0.8
    assert 2 not in by_finding  # no partner for the independent finding: its column stays all ones
    assert torch.equal(weights[:, 2], torch.ones(len(y)))


def test_weights_are_clipped_and_skip_near_empty_cells() -> None:
    y = _correlated_labels(keep=0.1)
    weights, _ = decorrelating_weights(y, DecorrelationConfig(max_weight=3.0))
    # clipped to [1/3, 3] before the column is renormalised to mean 1
    assert float(weights[:, 0].max() / weights[:, 0].min()) <= 9.0 + 1e-4
    # a finding whose A-without-B cell is empty cannot be decorrelated: no pair, weights of one
    y_empty = y.clone()
    y_empty[(y_empty[:, 0] > 0) & (y_empty[:, 1] == 0), 0] = 0.0
    weights_empty, pairs = decorrelating_weights(y_empty, DecorrelationConfig(min_cell=3))
    assert 0 not in {p.finding for p in pairs}
    assert torch.equal(weights_empty[:, 0], torch.ones(len(y)))


def test_degenerate_label_sets_give_unit_weights() -> None:
    for y in (torch.zeros(0, 3), torch.zeros(10, 1), torch.zeros(10, 3), torch.ones(10, 3)):
        weights, pairs = decorrelating_weights(y)
        assert weights.shape == y.shape and not pairs and bool((weights == 1).all())
    assert bool((phi_coefficients(np.ones((5, 2), bool)) == 0).all())
    assert phi_coefficients(np.ones((1, 3), bool)).shape == (3, 3)  # one image: no association at all


def test_trainer_reports_the_decorrelated_pairs_and_trains() -> None:
    torch.manual_seed(0)
    y = _correlated_labels(n=96, keep=0.25)  # enough A-without-B images (min_cell) in a small set
    n, k, size = len(y), y.shape[1], 32
    data = ExampleTensors(
        torch.randn(n, 3, size, size),
        y,
        torch.zeros(n, 1, 2, 2),
        torch.zeros(n, dtype=torch.bool),
        torch.zeros(n, k, 2, 2),
        torch.zeros(n, k, dtype=torch.bool),
    )
    model = build_classifier("resnet10t", k)
    config = TrainConfig(epochs=1, batch_size=16, loss=LossConfig(decorrelate_cooccurrence=True), propagation=None)
    run = fine_tune(model, data, config)
    assert [(p.finding, p.partner) for p in run.decorrelated if p.finding == 0] == [(0, 1)]
    assert np.isfinite(run.history[0]["prediction"])
    described = run.decorrelated[0].describe(("Atelectasis", "Effusion", "Nodule"))
    assert described["finding"] in ("Atelectasis", "Effusion") and described["phi"] > 0.2
    # off by default: no column is reweighted
    plain = fine_tune(build_classifier("resnet10t", k), data, TrainConfig(epochs=1, batch_size=16, propagation=None))
    assert plain.decorrelated == []
