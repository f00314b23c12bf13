"""Fine-tuning loop: prediction loss on every labelled image, attention terms only where masks exist."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ml_backend.explain.cam import HeatmapExplainer
from ml_backend.models.classifier import timm_api
from ml_backend.train.counterfactual import ArtefactBank, counterfactual_batch
from ml_backend.train.examples import ExampleTensors
from ml_backend.train.losses import (
    LossConfig,
    evidence_outside_share,
    input_gradient_penalty,
    positive_weights,
    prediction_loss,
    relative,
)
from ml_backend.train.mask_propagation import (
    ArtefactDetector,
    PropagationConfig,
    PropagationReport,
    propagate_ignore_masks,
)
from ml_backend.train.reweighting import DecorrelatedPair, DecorrelationConfig, decorrelating_weights

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-4
    freeze_batchnorm: bool = True  # small fine-tuning batches would wreck the running statistics
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    # Find the physician-marked artefacts in the unmasked images before training (mask_propagation.py);
    # None = train on the physicians' masks alone.
    propagation: PropagationConfig | None = field(default_factory=PropagationConfig)
    decorrelation: DecorrelationConfig = field(default_factory=DecorrelationConfig)  # used when the loss asks

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingRun:
    history: list[dict[str, float]]  # one entry per epoch
    propagation: PropagationReport | None = None  # None when no ignore mask reached the training set
    decorrelated: list[DecorrelatedPair] = field(default_factory=list)  # loss columns reweighted, if any


def heatmap_grid(model: nn.Module, input_size: int) -> tuple[int, int]:
    param = next(model.parameters())
    with torch.no_grad():
        was_training = model.training
        model.eval()
        shape = timm_api(model).forward_features(torch.zeros(1, 3, input_size, input_size, device=param.device)).shape
        model.train(was_training)
    return int(shape[-2]), int(shape[-1])


def _set_train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _batchnorm_training(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def train_step(
    explainer: HeatmapExplainer,
    batch: ExampleTensors,
    config: LossConfig,
    pos_weight: torch.Tensor,
    weight: torch.Tensor | None = None,
    gradient_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss for one batch; double backpropagation only over the images that carry an ignore mask. ``weight``:
    the batch's (N, K) decorrelating loss weights, if any; ``gradient_rows``: (N,) bool, the images whose ignore
    mask the input-gradient term may use (default: every masked image)."""
    masked = batch.has_ignore if gradient_rows is None else batch.has_ignore & gradient_rows
    images = batch.images
    parts: dict[str, float] = {}
    x_masked: torch.Tensor | None = None
    if masked.any() and config.ignore_weight > 0:
        if _batchnorm_training(explainer.model):
            # Batch statistics couple the samples: keep the batch whole (splitting it would normalise a
            # sub-batch of one or two masked images by its own statistics).
            images = images.clone().requires_grad_(True)
            features = explainer.features(images)
            x_masked = images
        else:
            # Frozen batch norm (fine-tuning): only the masked images need a differentiable input gradient.
            x_masked = images[masked].clone().requires_grad_(True)
            order = torch.cat([masked.nonzero()[:, 0], (~masked).nonzero()[:, 0]])
            feats_masked = explainer.features(x_masked)
            feats_rest = explainer.features(images[~masked]) if (~masked).any() else None
            features = feats_masked if feats_rest is None else torch.cat([feats_masked, feats_rest])
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order), device=order.device)
            features = features[inverse]
    else:
        features = explainer.features(images)
    logits, cams = explainer.logits_and_cams_from_features(features)
    pred = prediction_loss(logits, batch.targets, config, pos_weight, weight)
    total = pred
    parts["prediction"] = float(pred.detach())
    if x_masked is not None:
        if x_masked.shape[0] == masked.shape[0]:  # whole batch carries the graph; penalise masked rows only
            rrr = input_gradient_penalty(logits[masked], x_masked, batch.ignore) * (masked.numel() / masked.sum())
        else:
            rrr = input_gradient_penalty(logits[masked], x_masked, batch.ignore[masked])
        total = total + relative(rrr, pred, config.ignore_weight)
        parts["ignore_gradient"] = float(rrr.detach())
    if batch.has_evidence.any() and config.evidence_weight > 0:
        share = evidence_outside_share(cams[batch.has_evidence], batch.evidence[batch.has_evidence])
        total = total + relative(share, pred, config.evidence_weight)
        parts["evidence_outside"] = float(share.detach())
    parts["total"] = float(total.detach())
    return total, parts


def fine_tune(
    model: nn.Module,
    data: ExampleTensors,
    config: TrainConfig,
    progress: Progress | None = None,
    rejected: tuple[torch.Tensor, torch.Tensor] | None = None,
    previous_detector: ArtefactDetector | None = None,
) -> TrainingRun:
    """Train ``model`` in place; returns the loss curve and what mask propagation found. ``rejected``: images and
    masks of suggested ignore regions physicians deleted, negatives for the propagation detector.
    ``previous_detector``: an earlier run's accepted detector, used where this run's fit declines and it still
    passes the gate on this model's features (mask_propagation.propagate_ignore_masks)."""
    if len(data) == 0:
        raise ValueError("empty training set")
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    explainer = HeatmapExplainer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    pos_weight = positive_weights(data.targets, config.loss.max_pos_weight).to(device)
    history: list[dict[str, float]] = []
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    # The bank holds what physicians painted only: propagated masks are the detector's guesses.
    bank = ArtefactBank.from_examples(data) if config.loss.counterfactuals else None
    weights: torch.Tensor | None = None
    decorrelated: list[DecorrelatedPair] = []
    if config.loss.decorrelate_cooccurrence and config.loss.prediction in ("bce", "wbce"):
        weights, decorrelated = decorrelating_weights(data.targets, config.decorrelation)
        if not decorrelated:
            weights = None
    painted = data.has_ignore.clone()  # before propagation: the masks physicians drew
    propagation: PropagationReport | None = None
    if config.propagation is not None and bool(data.has_ignore.any()):
        if progress:
            progress({"stage": "mask propagation"})
        data, propagation = propagate_ignore_masks(
            model, data, config.propagation, seed=config.seed, rejected=rejected, previous=previous_detector
        )
    for epoch in range(config.epochs):
        _set_train_mode(model, config.freeze_batchnorm)
        started = time.perf_counter()
        permutation = torch.randperm(len(data))
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            index = permutation[step * config.batch_size : (step + 1) * config.batch_size]
            if len(index) < 2 and len(data) > 1:
                continue
            batch = data.subset(index)
            batch = ExampleTensors(
                *(
                    t.to(device)
                    for t in (
                        batch.images,
                        batch.targets,
                        batch.ignore,
                        batch.has_ignore,
                        batch.evidence,
                        batch.has_evidence,
                    )
                )
            )
            if bank is not None:
                batch = counterfactual_batch(batch, bank, generator, config.loss.artefact_paste_rate)
            batch_weight = None if weights is None else weights[index].to(device)
            rows = None if config.loss.input_gradient_on_propagated else painted[index].to(device)
            loss, parts = train_step(explainer, batch, config.loss, pos_weight, batch_weight, rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value
        record = {name: value / steps_per_epoch for name, value in sums.items()}
        record.update(epoch=epoch + 1, seconds=round(time.perf_counter() - started, 3))
        history.append(record)
        log.info("epoch %d/%d %s", epoch + 1, config.epochs, {k: round(v, 4) for k, v in record.items()})
        if progress:
            progress({"stage": "training", "epoch": epoch + 1, "epochs": config.epochs, "loss": record.get("total")})
    model.eval()
    return TrainingRun(history, propagation, decorrelated)


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = [torch.sigmoid(model(images[i : i + batch_size].to(device))).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)
