"""Label Studio tasks in, one prediction per task out: findings, probabilities and a heatmap per finding."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import torch

from ml_backend.config import Settings
from ml_backend.explain.brush_rle import encode_alpha, encode_alpha_array, heatmap_to_alpha
from ml_backend.explain.cam import normalise_maps, upsample_maps
from ml_backend.io.images import ImageError, LoadedImage, load_image
from ml_backend.io.label_config import ProjectSchema
from ml_backend.models.classifier import to_input_tensor
from ml_backend.models.registry import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class PredictStats:
    """Counters exposed on /metrics."""

    requests: int = 0
    tasks: int = 0
    failed_tasks: int = 0
    seconds_total: float = 0.0
    seconds_fetch: float = 0.0
    seconds_model: float = 0.0
    seconds_heatmaps: float = 0.0
    last_errors: list[dict[str, Any]] = field(default_factory=list)

    def record_error(self, task_id: Any, reason: str) -> None:
        self.failed_tasks += 1
        self.last_errors = [*self.last_errors[-19:], {"task": task_id, "reason": reason}]


@dataclass(frozen=True)
class ModelOutput:
    probabilities: np.ndarray  # (B, K)
    cams: torch.Tensor  # (B, K, h, w), each map scaled to [0, 1]
    features: torch.Tensor  # (B, C) pooled backbone features (ranking uses them for diversity)


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


def task_image_ref(task: dict[str, Any], schema: ProjectSchema) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise ImageError("task has no 'data' object")
    ref = data.get(schema.image_value_key)
    if not isinstance(ref, str) or not ref:
        raise ImageError(f"task data has no image under {schema.image_value_key!r}")
    return ref


class Predictor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = httpx.Client(timeout=settings.fetch_timeout_s, follow_redirects=True)
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="predict-io")
        self.stats = PredictStats()

    def _load_one(self, task: Any, schema: ProjectSchema) -> LoadedImage | str:
        try:
            if not isinstance(task, dict):
                raise ImageError("task is not a JSON object")
            return load_image(task_image_ref(task, schema), self.settings, self.http)
        except ImageError as exc:
            return str(exc)
        except Exception as exc:  # a bad task must never sink the batch
            log.exception("unexpected error loading task image")
            return f"unexpected error: {exc.__class__.__name__}: {exc}"

    def load_images(self, tasks: Sequence[dict[str, Any]], schema: ProjectSchema) -> list[LoadedImage | str]:
        """Each task's image, or the reason it could not be loaded."""
        return list(self.pool.map(lambda task: self._load_one(task, schema), tasks))

    def predict(self, tasks: Sequence[dict[str, Any]], schema: ProjectSchema, loaded: LoadedModel) -> list[dict]:
        """One result per task, in order. Brush RLE in the results is a uint8 array: serialise with orjson's
        ``OPT_SERIALIZE_NUMPY`` (the app does), or use ``task_prediction`` for plain lists."""
        started = time.perf_counter()
        # Pipelined end to end: pool threads fetch and decode every image at once; the model starts on the
        # first batch as soon as its images are in; while it runs batch i+1 (holding the model lock), pool
        # threads turn batch i's maps into heatmaps (numpy RLE, GIL mostly released). At natural image size the
        # fetch and the heatmaps then hide behind the forward pass instead of preceding and following it.
        fetches = [self.pool.submit(self._load_one, task, schema) for task in tasks]
        images: list[LoadedImage | str] = []
        pending: list[tuple[int, Future[dict[str, Any]]]] = []
        seconds_model = seconds_waiting = 0.0
        batch_size = max(1, self.settings.predict_batch_size)
        # The last batch's heatmaps cannot hide behind a forward pass: a short final batch keeps that tail short.
        tail = max(1, batch_size // 4)
        slots: list[int] = []
        for index, fetch in enumerate(fetches):
            before = time.perf_counter()
            images.append(fetch.result())  # _load_one never raises
            seconds_waiting += time.perf_counter() - before
            if isinstance(images[index], LoadedImage):
                slots.append(index)
            remaining = len(fetches) - 1 - index
            if slots and (len(slots) == batch_size or remaining in (0, tail)):
                before = time.perf_counter()
                output = run_model(loaded, [images[i].pixels for i in slots], batch_size)
                seconds_model += time.perf_counter() - before
                for j, slot in enumerate(slots):
                    future = self.pool.submit(
                        self.task_prediction,
                        schema,
                        loaded,
                        output.probabilities[j],
                        output.cams[j],
                        images[slot],
                        rle_as_array=True,
                    )
                    pending.append((slot, future))
                slots = []
        modelled = time.perf_counter()
        by_index: dict[int, dict[str, Any] | str] = {}
        for index, future in pending:
            try:
                by_index[index] = future.result()
            except Exception as exc:  # one task's heatmap failing must not sink the batch
                log.exception("task at position %d: building the prediction failed", index)
                by_index[index] = f"building the prediction failed: {exc.__class__.__name__}: {exc}"
        results: list[dict[str, Any]] = []
        for index, task in enumerate(tasks):
            built = by_index.get(index, images[index])
            if isinstance(built, dict):
                results.append(built)
                continue
            task_id = task.get("id") if isinstance(task, dict) else None
            log.warning("task %s: no prediction: %s", task_id, built)
            self.stats.record_error(task_id, str(built))
            results.append({"result": [], "score": 0.0, "model_version": loaded.version})
        finished = time.perf_counter()
        self.stats.requests += 1
        self.stats.tasks += len(tasks)
        # Fetch time the model waited for (the rest overlapped the forward passes).
        self.stats.seconds_fetch += seconds_waiting
        self.stats.seconds_model += seconds_model
        # Heatmap time not hidden behind the model (the last batch's, mostly).
        self.stats.seconds_heatmaps += finished - modelled
        self.stats.seconds_total += finished - started
        return results

    def task_prediction(
        self,
        schema: ProjectSchema,
        loaded: LoadedModel,
        probabilities: np.ndarray,
        cams: torch.Tensor,
        image: LoadedImage,
        rle_as_array: bool = False,
    ) -> dict[str, Any]:
        predicted = [k for k, p in enumerate(probabilities) if p >= loaded.thresholds[k]]
        findings = [loaded.labels[k] for k in predicted]
        confidence = float(np.mean(np.maximum(probabilities, 1.0 - probabilities)))
        result: list[dict[str, Any]] = []
        choices = findings or ([schema.no_finding_label] if schema.no_finding_label else [])
        if choices:
            result.append(
                {
                    "id": "findings",
                    "from_name": schema.choices_name,
                    "to_name": schema.image_name,
                    "type": "choices",
                    "value": {"choices": choices},
                    "score": confidence,
                    # Every finding's probability, kept with the prediction for review and ranking.
                    "probabilities": {
                        label: round(float(p), 6) for label, p in zip(loaded.labels, probabilities, strict=True)
                    },
                }
            )
        with_heatmap = [k for k in predicted if schema.brush_name and loaded.labels[k] in schema.brush_labels]
        cap = self.settings.heatmap_max_findings
        if cap > 0 and len(with_heatmap) > cap:
            # The most probable findings only: a physician reads a few overlaid heatmaps, not ten, and at natural
            # size each costs ~40 ms and ~0.3 MB of JSON per 0.25 MP (bench/results/serving.md). The others keep
            # their choice and probability.
            with_heatmap = sorted(with_heatmap, key=lambda k: -probabilities[k])[:cap]
        if with_heatmap:
            encode = encode_alpha_array if rle_as_array else encode_alpha
            heat = upsample_maps(cams[with_heatmap], image.height, image.width).clamp_(0, 1).numpy()
            for k, finding_heat in zip(with_heatmap, heat, strict=True):
                alpha = heatmap_to_alpha(
                    finding_heat, levels=self.settings.heatmap_levels, floor=self.settings.heatmap_floor
                )
                result.append(
                    {
                        "id": f"heatmap-{k}",
                        "from_name": schema.brush_name,
                        "to_name": schema.image_name,
                        "type": "brushlabels",
                        "original_width": image.width,
                        "original_height": image.height,
                        "image_rotation": 0,
                        "value": {"format": "rle", "rle": encode(alpha), "brushlabels": [loaded.labels[k]]},
                        "score": round(float(probabilities[k]), 6),
                    }
                )
        return {"result": result, "score": confidence, "model_version": loaded.version}
