"""Class activation maps for every finding at once.

For a timm backbone followed by global average pooling and a linear classifier, Grad-CAM on the last
feature map A equals the classic CAM: d logit_k / d A = w_k / (h*w) everywhere, so
``GradCAM_k = ReLU(sum_c w_kc A_c) / (h*w)``. All K maps come from one forward pass plus one small
matrix product, with no backward pass, and stay differentiable (the training loss uses the same code).
Heads that break the identity (norm or MLP after pooling) fall back to autograd Grad-CAM through the
head only: the gradient with respect to the features needs no backward pass through the backbone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml_backend.explain.brush_rle import heatmap_to_alpha
from ml_backend.models.classifier import timm_api


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The classifier if ``forward_head`` is exactly avg-pool + linear (checked numerically), else None."""
    classifier = timm_api(model).get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear) or not hasattr(model, "forward_head"):
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            features = torch.randn(2, classifier.in_features, 3, 5, device=param.device, dtype=param.dtype)
            expected = timm_api(model).forward_head(features)
            via_cam = _cam_logits(features, classifier)[0]
            if expected.shape != via_cam.shape:
                return None
            ok = torch.allclose(expected, via_cam, rtol=1e-4, atol=1e-4)
    except Exception:  # heads expecting other layouts (tokens, NHWC) are not CAM-compatible
        ok = False
    finally:
        model.train(was_training)
    return classifier if ok else None


def _cam_logits(features: torch.Tensor, classifier: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    raw = torch.einsum("kc,bchw->bkhw", classifier.weight, features)
    logits = raw.mean(dim=(2, 3))
    if classifier.bias is not None:
        logits = logits + classifier.bias
    return logits, raw


class HeatmapExplainer:
    """Logits and one heatmap per finding, from a single forward pass where the head allows it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.classifier = linear_head(model)

    @property
    def fast_path(self) -> bool:
        return self.classifier is not None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return timm_api(self.model).forward_features(x)

    def logits_and_cams(self, x: torch.Tensor, *, relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) logits and (B, K, h, w) Grad-CAM maps on the backbone's last feature grid.

        Differentiable on the fast path (used by the attention loss); ``relu=False`` keeps the signed map.
        """
        features = self.features(x)
        return self.logits_and_cams_from_features(features, relu=relu)

    def logits_and_cams_from_features(
        self, features: torch.Tensor, *, relu: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.classifier is not None:
            logits, raw = _cam_logits(features, self.classifier)
            cams = raw / (raw.shape[2] * raw.shape[3])
        else:
            logits, cams = self._autograd_gradcam(features)
        return logits, (F.relu(cams) if relu else cams)

    def _autograd_gradcam(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Samples are independent in eval mode, so the gradient of the batch sum gives each sample's gradient.
        feats = features.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = timm_api(self.model).forward_head(feats)
            maps = []
            for k in range(logits.shape[1]):
                (grad,) = torch.autograd.grad(logits[:, k].sum(), feats, retain_graph=k < logits.shape[1] - 1)
                weights = grad.mean(dim=(2, 3), keepdim=True)
                maps.append((weights * feats).sum(dim=1))
        return logits.detach(), torch.stack(maps, dim=1).detach()


def normalise_maps(cams: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (h, w) map to [0, 1], like pytorch-grad-cam: the least-attended cell becomes
    transparent, so the heatmap keeps contrast even where the map is positive everywhere (flat maps -> 0)."""
    low = cams.amin(dim=(-2, -1), keepdim=True)
    span = cams.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 1e-12, (cams - low) / span.clamp_min(1e-12), torch.zeros_like(cams))


def upsample_maps(cams: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., h, w) maps -> (..., H, W) with bilinear interpolation (smooth heat, no blocky cells)."""
    lead = cams.shape[:-2]
    flat = cams.reshape(-1, 1, *cams.shape[-2:])
    up = F.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False)
    return up.reshape(*lead, height, width)


def _bilinear_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of F.interpolate's bilinear weights (align_corners=False, no antialias)."""
    src = np.maximum((np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    frac = src - i0
    w = np.zeros((size_out, size_in), dtype=np.float32)
    rows = np.arange(size_out)
    np.add.at(w, (rows, i0), (1.0 - frac).astype(np.float32))
    np.add.at(w, (rows, i1), frac.astype(np.float32))
    return w


def upsample_to_alpha(
    cam: torch.Tensor, height: int, width: int, *, levels: int, floor: float, rows: int = 32
) -> np.ndarray:
    """One (h, w) map -> (height, width) uint8 alpha: ``heatmap_to_alpha(upsample_maps(cam).clamp(0, 1))``
    without the natural-size float32 map (20 MB at 5 MP). Bilinear upsampling is separable, so it is
    ``Wy @ cam @ Wx.T``; computed in bands of ``rows`` rows that stay in L2 and are quantised straight away
    (64+ rows measured 4-7x slower here: BLAS goes multithreaded and the band leaves the cache).
    Same weights as F.interpolate; float rounding can move a pixel sitting exactly on a level step by one level.
    """
    m = cam.detach().to(torch.float32).cpu().numpy()
    wy = _bilinear_weights(m.shape[0], height)
    across = m @ _bilinear_weights(m.shape[1], width).T  # (h, width)
    out = np.empty((height, width), dtype=np.uint8)
    for r0 in range(0, height, rows):
        band = wy[r0 : r0 + rows] @ across
        np.clip(band, 0.0, 1.0, out=band)
        out[r0 : r0 + rows] = heatmap_to_alpha(band, levels=levels, floor=floor)
    return out


def reference_gradcam(model: nn.Module, x: torch.Tensor, num_findings: int) -> torch.Tensor:
    """Textbook Grad-CAM on the last feature map, one full backward pass per finding through the whole model.

    Slow on purpose: the reference the one-pass path is checked against (tests/test_cam.py, bench/bench_gpu.py).
    """
    maps = []
    for k in range(num_findings):
        inputs = x.clone().requires_grad_(True)
        features = timm_api(model).forward_features(inputs)
        features.retain_grad()
        logits = timm_api(model).forward_head(features)
        model.zero_grad()
        logits[:, k].sum().backward()
        assert features.grad is not None  # retain_grad above: backward filled it
        weights = features.grad.mean(dim=(2, 3), keepdim=True)
        maps.append(F.relu((weights * features).sum(dim=1)).detach())
    return torch.stack(maps, dim=1)
