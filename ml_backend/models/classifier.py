"""Build timm multi-label classifiers and turn decoded images into their input tensors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class TimmModel(Protocol):
    """The part of timm's model API the backend relies on (timm's models share it but no typed base class)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...
    def get_classifier(self) -> nn.Module: ...
    def forward_intermediates(self, x: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]: ...


def timm_api(model: nn.Module) -> TimmModel:
    """``model`` seen through timm's API, for the type checker (no runtime check: timm guarantees it)."""
    return cast(TimmModel, model)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_classifier(
    backbone: str,
    num_classes: int,
    *,
    pretrained: str | None = None,
    output_stride: int = 32,
    drop_rate: float = 0.0,
) -> nn.Module:
    """A timm model with a ``num_classes`` multi-label head.

    ``pretrained``: None for random init, ``"hub"`` for timm's hub weights, or a path to a local weights file
    (a state dict, e.g. ImageNet or CheXpert weights); the classifier is re-initialised to ``num_classes``.
    """
    kwargs: dict = {"num_classes": num_classes, "drop_rate": drop_rate}
    if output_stride != 32:
        kwargs["output_stride"] = output_stride  # finer heatmap grid (dilated last stages) at extra cost
    if pretrained is None:
        return timm.create_model(backbone, pretrained=False, **kwargs)
    if pretrained == "hub":
        return timm.create_model(backbone, pretrained=True, **kwargs)
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"PRETRAINED={pretrained!r} is neither 'hub' nor an existing weights file")
    # timm's pretrained_cfg_overlay loads a local file through the same code path as hub weights,
    # including dropping a classifier whose size differs from num_classes.
    return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)


def normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def to_input_tensor(
    images: Sequence[np.ndarray],
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Grayscale float images (H, W) in [0, 1] of any size -> normalised (B, 3, S, S) batch.

    Every image is resized to the model's input size: heatmaps need the backbone's full spatial grid
    (a stride-32 backbone gives 7x7 at 224 px but only 2x2 at 64 px).
    """
    resized = [
        F.interpolate(
            torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None],
            size=(input_size, input_size),
            mode="bilinear",
            align_corners=False,
            antialias=img.shape[0] > input_size or img.shape[1] > input_size,
        )
        for img in images
    ]
    batch = torch.cat(resized).expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((batch - mean_t) / std_t).contiguous()
