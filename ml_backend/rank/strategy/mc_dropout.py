"""MC dropout: (T, N, K) probability samples for BALD, from pooled features or full stochastic forward passes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml_backend.models.classifier import timm_api


def mc_probabilities_from_features(
    pooled: torch.Tensor | np.ndarray,
    classifier: nn.Linear,
    passes: int = 8,
    rate: float = 0.25,
    seed: int = 0,
) -> np.ndarray:
    """(T, N, K) sigmoid probabilities with dropout on pooled features before a linear head.

    Where timm puts ``drop_rate`` for avg-pool + linear heads; the backbone runs once, so BALD on
    features the predictor already computed costs T small matrix products.
    """
    x = torch.as_tensor(pooled, dtype=torch.float32)
    weight = classifier.weight.detach().float().cpu()
    bias = classifier.bias.detach().float().cpu() if classifier.bias is not None else None
    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(passes):
            keep = (torch.rand(x.shape, generator=generator) >= rate).float() / (1.0 - rate)
            out.append(torch.sigmoid(F.linear(x * keep, weight, bias)))
    return torch.stack(out).numpy()


def mc_dropout_probabilities(
    model: nn.Module,
    images_tensor: torch.Tensor,
    passes: int = 8,
    batch_size: int = 64,
    rate: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """(T, N, K) probabilities from ``passes`` stochastic forward passes with dropout on at inference.

    For avg-pool + linear heads (resnet, densenet, efficientnet, convnext in timm) the backbone runs once and
    dropout is applied to the pooled features, as timm's ``drop_rate`` does: the model's own rate, else
    ``rate`` (default 0.25). Other models run ``passes`` full forward passes with their dropout layers in
    training mode and BatchNorm kept in eval mode. The model's modes and rates are restored afterwards; hold
    the model's lock when it is shared with a server.
    """
    from ml_backend.explain.cam import linear_head  # ranking stays importable without the serving stack

    if passes < 2:
        raise ValueError("MC dropout needs at least 2 passes")
    images = torch.as_tensor(images_tensor)
    if images.ndim != 4:
        raise ValueError(f"images_tensor must be (N, 3, H, W), got shape {tuple(images.shape)}")
    param = next(model.parameters())
    own_rate = float(getattr(model, "drop_rate", 0.0) or 0.0)
    drop = own_rate if own_rate > 0 else (0.25 if rate is None else float(rate))
    was_training = model.training
    head = linear_head(model)
    try:
        if head is not None:
            model.eval()
            pooled = []
            with torch.no_grad():
                for start in range(0, len(images), batch_size):
                    batch = images[start : start + batch_size].to(param.device, param.dtype)
                    pooled.append(timm_api(model).forward_features(batch).float().mean(dim=(2, 3)).cpu())
            if not pooled:
                return np.zeros((passes, 0, head.out_features), dtype=np.float32)
            return mc_probabilities_from_features(torch.cat(pooled), head, passes, drop, seed)
        return _mc_full_passes(model, images, passes, batch_size, drop, seed)
    finally:
        model.train(was_training)


def _mc_full_passes(
    model: nn.Module, images: torch.Tensor, passes: int, batch_size: int, rate: float, seed: int
) -> np.ndarray:
    param = next(model.parameters())
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    saved_rates = [m.p for m in dropouts]
    saved_attr = getattr(model, "drop_rate", None)
    if not any(m.p > 0 for m in dropouts) and not (saved_attr or 0) > 0:
        if saved_attr is None and not dropouts:
            raise ValueError("the model has no dropout layer or drop_rate to sample with")
        for m in dropouts:
            m.p = rate
        if saved_attr is not None:
            setattr(model, "drop_rate", rate)  # noqa: B010 - timm's attribute, unknown to nn.Module's typing
    try:
        model.train()
        for module in model.modules():  # BatchNorm in eval: MC dropout samples weights, not batch statistics
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        out = []
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for _ in range(passes):
                probs = [
                    torch.sigmoid(model(images[s : s + batch_size].to(param.device, param.dtype))).float().cpu()
                    for s in range(0, len(images), batch_size)
                ]
                out.append(torch.cat(probs))
        return torch.stack(out).numpy()
    finally:
        for m, r in zip(dropouts, saved_rates, strict=True):
            m.p = r
        if saved_attr is not None:
            model.drop_rate = saved_attr
