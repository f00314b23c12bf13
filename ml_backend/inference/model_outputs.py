"""Probabilities, every finding's CAM and pooled features from one forward pass per batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ml_backend.explain.cam import normalise_maps
from ml_backend.models.classifier import to_input_tensor
from ml_backend.models.registry import LoadedModel


@dataclass(frozen=True)
class ModelOutput:
    probabilities: np.ndarray  # (B, K)
    cams: torch.Tensor  # (B, K, h, w), each map scaled to [0, 1]
    features: torch.Tensor  # (B, C) pooled backbone features (ranking uses them for diversity and MC dropout)


def run_model(loaded: LoadedModel, images: Sequence[np.ndarray], batch_size: int) -> ModelOutput:
    probs, cams, feats = [], [], []
    for start in range(0, len(images), batch_size):
        batch = to_input_tensor(images[start : start + batch_size], loaded.input_size, loaded.mean, loaded.std)
        with loaded.lock, torch.inference_mode():
            features = loaded.explainer.features(batch.to(loaded.device))
            logits, maps = loaded.explainer.logits_and_cams_from_features(features)
        probs.append(torch.sigmoid(logits).float().cpu())
        cams.append(normalise_maps(maps.float()).cpu())
        feats.append(features.float().mean(dim=(2, 3)).cpu())
    return ModelOutput(torch.cat(probs).numpy(), torch.cat(cams), torch.cat(feats))
