"""A starting model for the demo, trained on synthetic images with the planted shortcut.

A randomly initialised v0 predicts every finding at ~0.5 and draws meaningless heat, which hides what the tool
is for. So, on synthetic data, the demo first trains v0 on a *separate* synthetic training set (never the
images it imports) whose side marker goes with Effusion: the model learns Cardiomegaly and Effusion and, like
real chest X-ray models, partly the marker. Its heatmaps are then worth correcting (erase the heat on the
marker, paint Ignore over it) and the retrained version shows the difference.

The weights are cached under the demo folder, so later runs and new projects install them in a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ml_backend.config import Settings
from ml_backend.demo import synthetic
from ml_backend.models.classifier import build_classifier, normalisation
from ml_backend.models.registry import initial_meta
from ml_backend.models.store import VersionStore
from ml_backend.train.examples import Example, tensorise
from ml_backend.train.trainer import TrainConfig, fine_tune, heatmap_grid, predict_probabilities

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapConfig:
    images: int = 120
    size: int = 256
    seed: int = 1000  # the imported demo images use seed 0: different images
    epochs: int = 6
    batch_size: int = 16
    lr: float = 1e-3


def _cache_key(settings: Settings, labels: tuple[str, ...], config: BootstrapConfig) -> str:
    ident = {
        "backbone": settings.backbone,
        "input_size": settings.input_size,
        "output_stride": settings.output_stride,
        "pretrained": settings.pretrained,
        "labels": list(labels),
        "config": config.__dict__,
        "generator": 1,
    }
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def train_bootstrap(
    settings: Settings, labels: tuple[str, ...], config: BootstrapConfig, work_dir: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train from scratch (or from PRETRAINED) on synthetic images; returns (state dict, training summary)."""
    started = time.monotonic()
    records = synthetic.generate(work_dir / "train", n=config.images, size=config.size, seed=config.seed)
    holdout = synthetic.generate(work_dir / "check", n=40, size=config.size, seed=config.seed + 1)

    def examples(folder: Path, recs: list[dict[str, Any]]) -> list[Example]:
        out = []
        for record in recs:
            pixels = np.asarray(Image.open(folder / record["image"]).convert("L"), dtype=np.float32) / 255
            targets = np.array([label in record["labels"] for label in labels], dtype=np.float32)
            out.append(Example(image=pixels, targets=targets, key=record["patient_id"]))
        return out

    torch.manual_seed(config.seed)
    model = build_classifier(
        settings.backbone, len(labels), pretrained=settings.pretrained, output_stride=settings.output_stride
    )
    mean, std = normalisation(model)
    grid = heatmap_grid(model, settings.input_size)
    train = tensorise(examples(work_dir / "train", records), len(labels), settings.input_size, grid, mean, std)
    check = tensorise(examples(work_dir / "check", holdout), len(labels), settings.input_size, grid, mean, std)
    train_config = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        freeze_batchnorm=False,  # training from scratch: batch norm must learn its statistics
        seed=config.seed,
    )
    history = fine_tune(model, train, train_config).history
    probs = predict_probabilities(model, check.images)
    truth = check.targets.numpy().astype(bool)
    accuracy = {
        label: round(float(((probs[:, k] >= settings.threshold) == truth[:, k]).mean()), 3)
        for k, label in enumerate(labels)
        if label in synthetic.FINDINGS
    }
    marker = np.array([bool(r["marker"]) for r in holdout])
    effusion = labels.index("Effusion") if "Effusion" in labels else None
    summary: dict[str, Any] = {
        "synthetic_images": config.images,
        "epochs": config.epochs,
        "seconds": round(time.monotonic() - started, 1),
        "final_loss": round(history[-1].get("total", float("nan")), 4) if history else None,
        "holdout_accuracy": accuracy,
    }
    if effusion is not None and marker.any() and (~marker).any():
        # The planted shortcut, measured: P(Effusion) on images without Effusion, with and without the marker.
        no_effusion = ~truth[:, effusion]
        with_marker = probs[no_effusion & marker, effusion]
        without = probs[no_effusion & ~marker, effusion]
        if len(with_marker) and len(without):
            summary["effusion_prob_healthy_with_marker"] = round(float(with_marker.mean()), 3)
            summary["effusion_prob_healthy_without_marker"] = round(float(without.mean()), 3)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state, summary


def cached_bootstrap(
    settings: Settings, labels: tuple[str, ...], cache_dir: Path, config: BootstrapConfig | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The bootstrapped weights and summary, trained once per (backbone, input size, labels, config)."""
    config = config or BootstrapConfig()
    cache = Path(cache_dir) / f"bootstrap-{_cache_key(settings, labels, config)}"
    weights, summary_path = cache / "model.pt", cache / "summary.json"
    if weights.is_file() and summary_path.is_file():
        state = torch.load(weights, map_location="cpu", weights_only=True)
        return state, {**json.loads(summary_path.read_text()), "cached": True}
    state, summary = train_bootstrap(settings, labels, config, cache)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(state, weights)
    summary_path.write_text(json.dumps(summary, indent=2))
    return state, summary


def install_bootstrap(
    store: VersionStore,
    project: str,
    settings: Settings,
    labels: tuple[str, ...],
    state: dict[str, torch.Tensor],
    summary: dict[str, Any],
) -> bool:
    """Make the bootstrapped model the project's v0, unless the project already has a version."""
    if store.live_version(project) is not None:
        return False
    meta = initial_meta(settings, labels).but(kind="demo-bootstrap", training={"bootstrap": summary})
    store.save_version(project, state, meta, version="v0")
    return True
