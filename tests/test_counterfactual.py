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
