"""Load each project's live model once per process and swap it when a new version goes live."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ml_backend.config import Settings
from ml_backend.explain.cam import HeatmapExplainer
from ml_backend.models.classifier import build_classifier, normalisation, pick_device, timm_api
from ml_backend.models.store import VersionInfo, VersionMeta, VersionRepository, VersionStore

log = logging.getLogger(__name__)


class ProjectQuotaExceeded(RuntimeError):
    """A new project id beyond ``MAX_PROJECTS``: refused before any weights are written."""


class LabelSetMismatch(ValueError):
    """A request names findings other than the live model's, and may not change the model."""

    def __init__(self, project: str, live: tuple[str, ...], requested: tuple[str, ...]) -> None:
        added = [f for f in requested if f not in live]
        dropped = [f for f in live if f not in requested]
        super().__init__(
            f"project {project}: the label config's findings differ from the live model's "
            f"(added {added or 'none'}, dropped {dropped or 'none'}, or reordered); /predict never changes the "
            "model: send the new config through /setup (Label Studio does on every connection check) or a "
            "PROJECT_UPDATED webhook"
        )


@dataclass
class LoadedModel:
    project: str
    version: str
    labels: tuple[str, ...]
    model: nn.Module
    explainer: HeatmapExplainer
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    thresholds: np.ndarray
    device: torch.device
    meta: VersionMeta
    lock: threading.Lock = field(default_factory=threading.Lock)


def model_from_version(info: VersionInfo, store: VersionRepository, device: torch.device) -> nn.Module:
    meta = info.meta
    model = build_classifier(meta.backbone, len(meta.labels), output_stride=meta.output_stride)
    model.load_state_dict(store.load_state(info))
    return model.to(device).eval()


def initial_meta(settings: Settings, labels: tuple[str, ...]) -> VersionMeta:
    return VersionMeta(
        backbone=settings.backbone,
        labels=tuple(labels),
        input_size=settings.input_size,
        output_stride=settings.output_stride,
        pretrained=settings.pretrained,
    )


def remap_head(
    model: nn.Module, old_labels: tuple[str, ...], new_labels: tuple[str, ...], meta: VersionMeta
) -> nn.Module:
    """A model for a new label set that keeps the backbone and the head rows of findings it already knew."""
    new_model = build_classifier(meta.backbone, len(new_labels), output_stride=meta.output_stride)
    old_state = model.state_dict()
    head = timm_api(new_model).get_classifier()
    head_names = {name for name, module in new_model.named_modules() if module is head}
    prefix = next(iter(head_names)) + "."
    new_state = new_model.state_dict()
    for key, value in old_state.items():
        if not key.startswith(prefix) and key in new_state and new_state[key].shape == value.shape:
            new_state[key] = value
    for index, label in enumerate(new_labels):
        if label in old_labels:
            old_index = old_labels.index(label)
            for suffix in ("weight", "bias"):
                if prefix + suffix in old_state:
                    new_state[prefix + suffix][index] = old_state[prefix + suffix][old_index]
    new_model.load_state_dict(new_state)
    return new_model


class ModelRegistry:
    """Per-process cache: ``get(project, labels)`` returns the live model, creating v0 on first use."""

    def __init__(self, settings: Settings, store: VersionRepository | None = None) -> None:
        self.settings = settings
        self.store: VersionRepository = store or VersionStore(settings.model_dir, settings.max_model_dir_bytes)
        self.device = pick_device(settings.device)
        self._cache: dict[tuple[str, str], LoadedModel] = {}
        self._lock = threading.Lock()

    def ensure_version(self, project: str, labels: tuple[str, ...], *, allow_label_change: bool = True) -> str:
        """The live version for ``project``; creates the initial one, or a head-remapped one on a new label set.

        ``allow_label_change=False`` (``/predict``) refuses a label set other than the live model's: only
        ``/setup``, ``PROJECT_UPDATED`` and the project's own jobs may change the model everyone sees.
        """
        live = self.store.live_version(project)
        if live is not None and self.store.info(project, live).meta.labels == tuple(labels):
            return live
        with self._lock:
            live = self.store.live_version(project)
            if live is None:
                return self._create_initial(project, labels)
            info = self.store.info(project, live)
            if info.meta.labels == tuple(labels):
                return live
            if not allow_label_change:
                raise LabelSetMismatch(project, info.meta.labels, tuple(labels))
            old = model_from_version(info, self.store, torch.device("cpu"))
            model = remap_head(old, info.meta.labels, tuple(labels), info.meta)
            meta = info.meta.but(
                labels=tuple(labels),
                parent=live,
                kind="label-set-change",
                created_at=None,
                thresholds=None,
                training=None,
                metrics=None,
            )
            new = self.store.save_version(project, model.state_dict(), meta)
            log.info("project %s: label set changed, %s -> %s", project, live, new.version)
            return new.version

    def _create_initial(self, project: str, labels: tuple[str, ...]) -> str:
        known = self.store.projects()
        if project not in known and len(known) >= self.settings.max_projects:
            raise ProjectQuotaExceeded(
                f"this backend already serves {len(known)} projects (MAX_PROJECTS={self.settings.max_projects})"
            )
        torch.manual_seed(0)  # every process that races to create v0 builds the same weights
        model = build_classifier(
            self.settings.backbone,
            len(labels),
            pretrained=self.settings.pretrained,
            output_stride=self.settings.output_stride,
        )
        meta = initial_meta(self.settings, labels)
        try:
            info = self.store.save_version(
                project, model.state_dict(), meta, version="v0", shared_key=self._initial_weights_key(len(labels))
            )
        except FileExistsError:
            self.store.set_live(project, "v0")
            info = self.store.info(project, "v0")
        log.info("project %s: created initial version %s for %d findings", project, info.version, len(labels))
        return info.version

    def _initial_weights_key(self, n_labels: int) -> str:
        """Projects with the same backbone, head size and starting weights share one file (seeded above)."""
        source = self.settings.pretrained or "init0"
        if source != "hub" and source != "init0":
            path = Path(source)
            stat = path.stat() if path.is_file() else None
            identity = f"{path.resolve()}:{stat and stat.st_size}:{stat and stat.st_mtime_ns}"
            source = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return f"{self.settings.backbone}-k{n_labels}-s{self.settings.output_stride}-{source}"

    def get(
        self, project: str, labels: tuple[str, ...] | None = None, *, allow_label_change: bool = True
    ) -> LoadedModel:
        version = (
            self.ensure_version(project, labels, allow_label_change=allow_label_change)
            if labels
            else self.store.live_version(project)
        )
        if version is None:
            raise LookupError(f"project {project} has no model yet: call /setup first")
        key = (project, version)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                cached = self._load(project, version)
                # Keep only the live model per project: old versions are released once swapped out.
                for old_key in [k for k in self._cache if k[0] == project]:
                    del self._cache[old_key]
                self._cache[key] = cached
        return cached

    def _load(self, project: str, version: str) -> LoadedModel:
        info = self.store.info(project, version)
        model = model_from_version(info, self.store, self.device)
        labels = info.meta.labels
        thresholds = info.meta.thresholds or [self.settings.threshold] * len(labels)
        mean, std = normalisation(model)
        log.info("project %s: loaded %s (%s, %d findings)", project, version, info.meta.backbone, len(labels))
        return LoadedModel(
            project=project,
            version=version,
            labels=labels,
            model=model,
            explainer=HeatmapExplainer(model),
            input_size=info.meta.input_size,
            mean=mean,
            std=std,
            thresholds=np.asarray(thresholds, dtype=np.float32),
            device=self.device,
            meta=info.meta,
        )
