"""Counterfactual images from ignore masks: the region a physician marked "never look here" is, by that
statement, irrelevant to the labels, so its content may be removed from its image or copied onto others
without changing anyone's labels.

Per batch:
* removal: each masked image gets its marked region filled from another image of the batch (same pixels
  positions), so the prediction term no longer sees the artefact together with that image's labels;
* decorrelation: a share of the other images (``paste_rate``, by default all) get an artefact from the bank of
  every marked region in the training set, shifted by a random offset, keeping their own labels. The artefact
  then appears with and without each finding, whatever the physicians have not (yet) masked.

Why: the input-gradient term (losses.input_gradient_penalty) only flattens the model's local sensitivity inside
the masks it is given; fine-tuning from a model that already leans on an artefact, it barely moved the
dependence while the unmasked marked images kept teaching it (bench/results/mechanism.md). Counterexamples
attack the correlation itself: CAIPI's counterexamples (Teso & Kersting 2019) with the physician's mask as the
explanation, and artefact-based augmentation for skin-lesion shortcuts (Bissoto et al. 2020). No library does
this for brush masks, hence this module. Rows stay the same in number, so a step costs what it cost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ml_backend.train.examples import ExampleTensors


@dataclass(frozen=True)
class ArtefactBank:
    """Every ignore-marked region of a training set: the pixels (normalised input) and their masks."""

    images: torch.Tensor  # (M, C, S, S)
    masks: torch.Tensor  # (M, 1, S, S)

    @classmethod
    def from_examples(cls, data: ExampleTensors, max_area: float = 0.15) -> ArtefactBank | None:
        """Marked regions up to ``max_area`` of the image: a mask over half the film is not an artefact to
        paste elsewhere (it would hide the other image's anatomy while keeping its labels)."""
        area = data.ignore.mean(dim=(1, 2, 3))
        index = (data.has_ignore & (area <= max_area)).nonzero()[:, 0]
        if len(index) == 0:
            return None
        return cls(data.images[index], data.ignore[index])

    def __len__(self) -> int:
        return self.images.shape[0]


def _shifted(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each (C, H, W) image of ``x`` rolled by its own (dy, dx) row of ``shifts``, in one gather."""
    n, c, h, w = x.shape
    rows = (torch.arange(h) - shifts[:, :1]) % h  # (N, H): source row of each output row
    cols = (torch.arange(w) - shifts[:, 1:]) % w  # (N, W)
    return x[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def counterfactual_batch(
    batch: ExampleTensors,
    bank: ArtefactBank | None,
    generator: torch.Generator,
    paste_rate: float = 1.0,
    max_shift: float = 0.25,
) -> ExampleTensors:
    """``batch`` with artefacts removed from its masked images and pasted onto a share of the others."""
    n = len(batch)
    if bank is None or n < 2:
        return batch
    device = batch.images.device
    images = batch.images.clone()
    masked = batch.has_ignore.nonzero()[:, 0]
    if len(masked):
        # a partner other than the image itself: offset by 1..n-1 modulo n
        partners = (masked + torch.randint(1, n, (len(masked),), generator=generator).to(device)) % n
        mask = batch.ignore[masked]
        images[masked] = images[masked] * (1 - mask) + batch.images[partners] * mask

    unmasked = (~batch.has_ignore).nonzero()[:, 0]
    chosen = unmasked[(torch.rand(len(unmasked), generator=generator) < paste_rate).to(device)]
    if len(chosen):
        source = torch.randint(0, len(bank), (len(chosen),), generator=generator).to(bank.images.device)
        limit = max(1, int(batch.images.shape[-1] * max_shift))
        shifts = torch.randint(-limit, limit + 1, (len(chosen), 2), generator=generator)
        mask = _shifted(bank.masks[source], shifts).to(device)
        artefact = _shifted(bank.images[source], shifts).to(device)
        images[chosen] = images[chosen] * (1 - mask) + artefact * mask
    return replace(batch, images=images)
