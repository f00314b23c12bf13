"""Counterfactual images from ignore masks: the marked artefact leaves its image and lands on others."""

from __future__ import annotations

import torch

from ml_backend.train.counterfactual import ArtefactBank, counterfactual_batch
from ml_backend.train.examples import ExampleTensors

ARTEFACT = 9.0


def constant_batch(n: int = 8, size: int = 16, findings: int = 3) -> ExampleTensors:
    """Image i is the constant i, except image 0, which carries a marked artefact (value 9)."""
    images = torch.stack([torch.full((3, size, size), float(i)) for i in range(n)])
    targets = torch.eye(n, findings)
    ignore = torch.zeros(n, 1, size, size)
    ignore[0, :, 2:6, 3:8] = 1.0
    images[0, :, 2:6, 3:8] = ARTEFACT
    has_ignore = torch.tensor([True] + [False] * (n - 1))
    evidence = torch.zeros(n, findings, 2, 2)
    return ExampleTensors(images, targets, ignore, has_ignore, evidence, torch.zeros(n, findings, dtype=torch.bool))


def test_artefact_is_removed_from_its_image_and_pasted_onto_others() -> None:
    batch = constant_batch()
    bank = ArtefactBank.from_examples(batch)
    assert bank is not None and len(bank) == 1
    out = counterfactual_batch(batch, bank, torch.Generator().manual_seed(0), paste_rate=0.5)
    assert len(out) == len(batch)
    assert torch.equal(out.targets, batch.targets)  # nobody's labels change
    assert torch.equal(out.has_ignore, batch.has_ignore) and torch.equal(out.ignore, batch.ignore)
    region = batch.ignore[0, 0] > 0
    # image 0: outside the mask untouched, inside filled from another image: no artefact left
    assert torch.equal(out.images[0][:, ~region], batch.images[0][:, ~region])
    assert not (out.images[0] == ARTEFACT).any()
    assert set(out.images[0][:, region].unique().tolist()) <= set(range(1, 8))
    # the others: either untouched, or carrying the whole artefact (shifted) on their own pixels
    pasted = 0
    for i in range(1, 8):
        carried = int((out.images[i] == ARTEFACT).sum())
        if carried:
            pasted += 1
            assert carried == 3 * region.sum()
            assert set(out.images[i][out.images[i] != ARTEFACT].unique().tolist()) == {float(i)}
        else:
            assert torch.equal(out.images[i], batch.images[i])
    assert 1 <= pasted <= 6


def test_without_masks_nothing_changes() -> None:
    batch = constant_batch()
    batch.has_ignore[:] = False
    assert ArtefactBank.from_examples(batch) is None
    assert counterfactual_batch(batch, None, torch.Generator()) is batch


def test_input_gradient_term_can_be_kept_to_the_masks_physicians_painted() -> None:
    """``gradient_rows`` (LossConfig.input_gradient_on_propagated=False): a propagated mask still feeds the
    counterfactuals, but the input-gradient penalty counts only the painted ones."""
    from ml_backend.explain.cam import HeatmapExplainer
    from ml_backend.models.classifier import build_classifier
    from ml_backend.train.losses import LossConfig, input_gradient_penalty
    from ml_backend.train.trainer import train_step

    torch.manual_seed(0)
    model = build_classifier("resnet10t", 3).eval()  # frozen batch norm, as in fine-tuning: images independent
    batch = constant_batch(n=4, size=32)
    batch = ExampleTensors(
        torch.randn_like(batch.images),
        batch.targets,
        torch.ones_like(batch.ignore),
        torch.tensor([True, True, False, False]),  # image 0 painted, image 1 propagated
        torch.zeros(4, 3, 1, 1),
        batch.has_evidence,
    )
    explainer = HeatmapExplainer(model)
    config = LossConfig(prediction="bce", ignore_weight=0.1, evidence_weight=0.0)  # the term is off by default
    ones = torch.ones(3)
    _, both = train_step(explainer, batch, config, ones)
    _, painted = train_step(explainer, batch, config, ones, gradient_rows=torch.tensor([True, False, False, False]))

    def alone(i: int) -> float:
        x = batch.images[i : i + 1].clone().requires_grad_(True)
        return float(input_gradient_penalty(model(x), x, batch.ignore[i : i + 1]).detach())

    assert abs(painted["ignore_gradient"] - alone(0)) < 1e-4 * max(1.0, alone(0))
    assert abs(both["ignore_gradient"] - (alone(0) + alone(1)) / 2) < 1e-4 * max(1.0, alone(1))
    _, none = train_step(explainer, batch, config, ones, gradient_rows=torch.zeros(4, dtype=torch.bool))
    assert "ignore_gradient" not in none
