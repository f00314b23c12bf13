"""The one-pass CAM path equals autograd Grad-CAM, and the generic fallback is correct too."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from ml_backend.explain.cam import HeatmapExplainer, linear_head, normalise_maps, reference_gradcam, upsample_maps


def autograd_gradcam(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return reference_gradcam(model, x, model.get_classifier().out_features)


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0", "test_resnet"])
def test_fast_path_equals_autograd_gradcam(backbone: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(backbone, num_classes=14).eval()
    explainer = HeatmapExplainer(model)
    assert explainer.fast_path
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(3, 3, 160, 160)
        with torch.no_grad():
            logits, cams = explainer.logits_and_cams(x)
        expected = autograd_gradcam(model, x)
        assert torch.allclose(logits, model(x).detach(), atol=1e-5)
        assert cams.shape == expected.shape == (3, 14, 5, 5)
        scale = expected.abs().max()
        assert scale > 0
        assert torch.allclose(cams, expected, atol=1e-5 * float(scale), rtol=1e-4)


@pytest.mark.parametrize("backbone", ["mobilenetv3_small_100", "convnext_atto"])
def test_generic_fallback_for_heads_that_break_the_identity(backbone: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(backbone, num_classes=5).eval()
    explainer = HeatmapExplainer(model)
    assert not explainer.fast_path  # a non-linear head after pooling: CAM != Grad-CAM
    x = torch.randn(2, 3, 128, 128)
    logits, cams = explainer.logits_and_cams(x)
    expected = autograd_gradcam_generic(model, x)
    assert torch.allclose(logits, model(x).detach(), atol=1e-5)
    assert torch.allclose(cams, expected, atol=1e-6 + 1e-5 * float(expected.abs().max()))


def autograd_gradcam_generic(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    maps = []
    num = model(x).shape[1]
    for k in range(num):
        features = model.forward_features(x).detach().requires_grad_(True)
        logits = model.forward_head(features)
        (grad,) = torch.autograd.grad(logits[:, k].sum(), features)
        maps.append(F.relu((grad.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1)).detach())
    return torch.stack(maps, dim=1)


def test_matches_pytorch_grad_cam_after_its_normalisation() -> None:
    gradcam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(1)
    model = timm.create_model("resnet18", num_classes=4).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        _, cams = HeatmapExplainer(model).logits_and_cams(x)
    cv2 = pytest.importorskip("cv2")
    with gradcam.GradCAM(model=model, target_layers=[model.layer4]) as cam:
        for k in range(4):
            theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(k)] * 2)  # (2, 224, 224)
            for b in range(2):
                # pytorch-grad-cam min-max scales the ReLU'd map and resizes it with OpenCV: do the same to ours.
                ours = cams[b, k].numpy().astype(np.float32)
                ours = ours - ours.min()
                ours = ours / (1e-7 + ours.max())
                ours = cv2.resize(ours, (224, 224))
                ours = (ours - ours.min()) / (1e-7 + (ours - ours.min()).max())  # its multi-layer aggregation rescales
                assert np.allclose(ours, theirs[b], atol=1e-4)


def test_linear_head_detection_and_helpers() -> None:
    model = timm.create_model("resnet18", num_classes=3)
    assert linear_head(model) is model.get_classifier()
    maps = torch.rand(2, 3, 7, 7)
    norm = normalise_maps(maps)
    assert torch.allclose(norm.amax(dim=(-2, -1)), torch.ones(2, 3))
    assert torch.allclose(norm.amin(dim=(-2, -1)), torch.zeros(2, 3))
    assert torch.equal(normalise_maps(torch.zeros(1, 1, 7, 7)), torch.zeros(1, 1, 7, 7))
    assert upsample_maps(norm, 33, 47).shape == (2, 3, 33, 47)
