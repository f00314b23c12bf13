"""The training objective: an imbalance-aware prediction loss plus attention terms driven by brush masks.

* Ignore masks ("never look here") drive counterfactual images (train/counterfactual.py, applied by the
  trainer): the marked artefact removed from its image and pasted onto others. That acts on the model's
  *dependence* on those pixels; penalising heatmap mass there does not (measured in
  ../shared/docs/design-notes.md: the evidence moves to neighbouring cells). In fine-tuning from a model that
  already leans on an artefact, the counterfactuals removed most of the dependence.
* Optionally (``ignore_weight`` > 0, off by default), ignore masks also penalise the input gradient inside the
  mask (Right for the Right Reasons, Ross et al. 2017). Alone it barely moved the dependence
  (bench/results/mechanism.md); beside the counterfactuals it cost accuracy on every finding
  (bench/results/physician_ignore_weight_0.1/physician.md).
* Evidence masks for a finding penalise the share of that finding's Grad-CAM mass outside the mask, so the
  heatmaps physicians see move to where they said the evidence is.

Each attention term is rescaled every step to ``m x`` the prediction loss (the weight is a detached ratio),
so one relative weight works for any backbone: input gradients start near zero, which makes a fixed lambda
chosen from "equal losses at the start" explode (lambda ~ 1e8), and m = 0.1 worked where m = 1 collapsed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.loss import AsymmetricLossMultiLabel


@dataclass(frozen=True)
class LossConfig:
    prediction: str = "wbce"  # "wbce" (BCE with per-finding positive weights), "asl" or "bce"
    # m for the input-gradient term, relative to the prediction loss. 0 (off) by default: at 0.1, on the 80 px
    # physician benchmark (5 stratified folds), it lowered the shortcut's ΔP further but cost macro AUROC in every
    # fold (0.725 -> 0.694 pooled) and 2.1 macro-F1 points, and it doubles the cost of a masked training step.
    # Smaller weights keep most of the extra removal (0.03: ΔP -86% vs -79% off, macro AUROC 0.721 vs 0.725;
    # bench/results/physician_ignore_weight_0.03/); a new default waits for every attention arm rerun under it.
    ignore_weight: float = 0.0
    # The input-gradient term also on the masks the artefact detector propagated (its guesses), not only on those
    # physicians painted. Off: on the 96 px headline folds it cost 0.05 macro AUROC and 0.04-0.06 on the shortcut
    # finding for a few points of ΔP; propagated masks still feed the counterfactuals, which do most of the
    # debiasing (bench/results/attention_parts.md).
    input_gradient_on_propagated: bool = False
    evidence_weight: float = 0.1  # m for the heatmap-alignment term
    # Ignore masks also yield counterfactual images (counterfactual.py): artefacts removed from their images
    # and pasted onto this share of the others. All of them: with tags, tubes and rulers mixed and masks on a
    # tenth of the marked images, pasting onto every unmasked image (and two detector experts) took the shortcut
    # dependence to the clean model's level (-102% of labels-only fine-tuning's vs -75% pasting onto half, one
    # expert; macro AUROC 0.623 vs 0.619: bench/results/mechanism_mixed_10_cpu_defaults.md; 20 seeds: -100%,
    # mechanism_mixed_10_cpu_new_default.md).
    counterfactuals: bool = True
    artefact_paste_rate: float = 1.0
    max_pos_weight: float = 20.0
    # Reweigh each finding's loss column so it is independent of its strongest co-occurring partner
    # (reweighting.py); applies to "bce" and "wbce" (timm's ASL takes no per-element weights).
    decorrelate_cooccurrence: bool = False


def positive_weights(targets: torch.Tensor, cap: float) -> torch.Tensor:
    """neg/pos per finding (CheXNet-style weighted BCE), capped so a finding with 2 positives cannot dominate."""
    positives = targets.sum(dim=0)
    negatives = targets.shape[0] - positives
    return torch.where(positives > 0, negatives / positives.clamp_min(1), torch.ones_like(positives)).clamp(1.0, cap)


def prediction_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    config: LossConfig,
    pos_weight: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``weight``: optional (N, K) per-element weights (the decorrelating weights), BCE losses only."""
    if config.prediction == "asl":
        # timm's ASL sums over the batch; divide to keep the scale of a mean loss.
        return AsymmetricLossMultiLabel(gamma_neg=4, gamma_pos=0, clip=0.05)(logits, targets) / logits.numel()
    if config.prediction == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets, weight=weight)
    if config.prediction == "wbce":
        return F.binary_cross_entropy_with_logits(logits, targets, weight=weight, pos_weight=pos_weight)
    raise ValueError(f"unknown prediction loss {config.prediction!r} (wbce, asl or bce)")


def input_gradient_penalty(logits: torch.Tensor, inputs: torch.Tensor, ignore_masks: torch.Tensor) -> torch.Tensor:
    """RRR: squared input gradient of the summed logits inside the ignore masks, per masked image.

    ``inputs`` must require grad and ``logits`` come from them; ``create_graph`` makes it trainable
    (double backpropagation: 2.6-3.1x a plain step with every image masked, bench/results/training.md, so
    only masked images go through it).
    """
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return (grad * ignore_masks).pow(2).sum(dim=(1, 2, 3)).mean()


def evidence_outside_share(cams: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """Mean share of Grad-CAM mass outside the evidence mask, over the (image, finding) pairs given.

    ``cams`` (N, h, w) non-negative maps; ``evidence`` (N, h, w) in [0, 1] (share of each cell the physician
    marked). Minimising it rewards mass inside and penalises mass outside at once.
    """
    mass = cams.sum(dim=(1, 2)) + 1e-6
    return ((cams * (1.0 - evidence)).sum(dim=(1, 2)) / mass).mean()


def relative(term: torch.Tensor, reference: torch.Tensor, m: float) -> torch.Tensor:
    """``term`` rescaled to ``m x reference`` in value, keeping its gradient direction."""
    scale = m * reference.detach() / term.detach().clamp_min(1e-12)
    return term * scale
