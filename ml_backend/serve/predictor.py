"""Label Studio tasks in, one prediction per task out: findings, probabilities and a heatmap per finding."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ml_backend.config import Settings
from ml_backend.explain.bitmask_png import encode_heat_png
from ml_backend.explain.brush_rle import encode_alpha, encode_alpha_array, heatmap_to_alpha
from ml_backend.explain.cam import normalise_maps, upsample_maps
from ml_backend.io.image_sources import short
from ml_backend.io.images import ImageError, ImageFetcher, LoadedImage, load_image
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
        # Bounded: a reference can be megabytes long, and error texts quote it.
        task = task_id if task_id is None or isinstance(task_id, int) else short(str(task_id), 40)
        entry = {"task": task, "reason": short(reason)}
        self.last_errors = [*self.last_errors[-19:], entry]


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


class PixelBudget:
    """Decoded pixels one request may still use (PREDICT_MAX_PIXELS); thread-safe, reserved before decoding."""

    def __init__(self, limit: int) -> None:
        self.limit, self.left = limit, limit
        self._lock = threading.Lock()

    def __call__(self, width: int, height: int) -> None:
        with self._lock:
            if width * height > self.left:
                raise ImageError(
                    f"this request's images pass PREDICT_MAX_PIXELS ({self.limit}) with this {width}x{height} "
                    "image: send fewer tasks per request"
                )
            self.left -= width * height


class Predictor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # One fetcher for all requests: connections kept alive per host, FETCH_PER_HOST shared by all requests.
        self.http = ImageFetcher(settings)
        # Heatmap building (and the rank job's prediction building); fetches run on each request's own threads.
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="predict-io")
        self.stats = PredictStats()

    def _load_one(
        self, task: Any, schema: ProjectSchema, deadline: float | None = None, budget: PixelBudget | None = None
    ) -> LoadedImage | str:
        try:
            if not isinstance(task, dict):
                raise ImageError("task is not a JSON object")
            ref = task_image_ref(task, schema)
            return load_image(ref, self.settings, self.http, deadline=deadline, reserve=budget)
        except ImageError as exc:
            return short(str(exc))
        except Exception as exc:  # a bad task must never sink the batch
            log.exception("unexpected error loading task image")
            return short(f"unexpected error: {exc.__class__.__name__}: {exc}")

    def _loads(
        self,
        tasks: Sequence[Any],
        schema: ProjectSchema,
        deadline: float | None = None,
        budget: PixelBudget | None = None,
        window: int | None = None,
    ) -> Generator[tuple[int, LoadedImage | str], None, None]:
        """(index, image or reason) in completion order. At most ``window`` tasks are fetched or waiting to be
        consumed at once, on this call's own threads: one request's slow host cannot occupy another's, and at most
        ``window`` decoded images exist beyond the batch being predicted. At the deadline the rest get a reason."""
        window = max(1, window or self.settings.fetch_per_request)
        executor = ThreadPoolExecutor(max_workers=window, thread_name_prefix="predict-fetch")
        running: dict[Future[LoadedImage | str], int] = {}
        submitted = 0
        try:
            while running or submitted < len(tasks):
                while submitted < len(tasks) and len(running) < window:
                    future = executor.submit(self._load_one, tasks[submitted], schema, deadline, budget)
                    running[future] = submitted
                    submitted += 1
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
                if not done:
                    break
                for future in done:
                    yield running.pop(future), future.result()  # _load_one never raises
            late = self._deadline_reason()
            for future, index in running.items():
                future.cancel()
                yield index, late
            for index in range(submitted, len(tasks)):
                yield index, late
        finally:
            # Threads still fetching end by the deadline themselves (it caps their fetch); nobody waits for them.
            executor.shutdown(wait=False, cancel_futures=True)

    def _deadline_reason(self) -> str:
        return f"not finished within PREDICT_DEADLINE_S ({self.settings.predict_deadline_s:g} s); predict it again"

    def load_images(self, tasks: Sequence[dict[str, Any]], schema: ProjectSchema) -> list[LoadedImage | str]:
        """Each task's image, or the reason it could not be loaded (each fetch bounded by FETCH_TIMEOUT_S)."""
        images: list[LoadedImage | str] = [""] * len(tasks)
        for index, image in self._loads(tasks, schema, window=min(max(len(tasks), 1), 32)):
            images[index] = image
        return images

    def predict(self, tasks: Sequence[dict[str, Any]], schema: ProjectSchema, loaded: LoadedModel) -> list[dict]:
        """One result per task, in order; a task without a prediction gets ``result: []`` and an ``error`` field
        with the reason (Label Studio stores the entry and ignores the field; its log shows it). Brush RLE in the
        results is a uint8 array: serialise with orjson's ``OPT_SERIALIZE_NUMPY`` (the app does), or use
        ``task_prediction`` for plain lists."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.settings.predict_deadline_s
        # Pipelined end to end: a window of fetches (FETCH_PER_REQUEST) runs while the model predicts; a batch
        # starts as soon as enough images are in (completion order, so one slow image does not hold the others);
        # while the model runs batch i+1 (holding the model lock), pool threads turn batch i's maps into heatmaps.
        # Decoded pixels are dropped once their batch is predicted: memory follows the batch, not the task count.
        pending: list[tuple[int, Future[dict[str, Any]]]] = []
        reasons: dict[int, str] = {}
        seconds_model = seconds_waiting = 0.0
        batch_size = max(1, self.settings.predict_batch_size)
        # The last batch's heatmaps cannot hide behind a forward pass: a short final batch keeps that tail short.
        tail = max(1, batch_size // 4)
        slots: list[tuple[int, LoadedImage]] = []
        loads = self._loads(tasks, schema, deadline, PixelBudget(self.settings.predict_max_pixels))
        consumed = 0
        while True:
            before = time.perf_counter()
            try:
                item = next(loads, None)
            except BaseException:
                loads.close()
                raise
            seconds_waiting += time.perf_counter() - before
            if item is None:
                break
            index, image = item
            consumed += 1
            if isinstance(image, LoadedImage):
                slots.append((index, image))
            else:
                reasons[index] = image
            remaining = len(tasks) - consumed
            if slots and (len(slots) == batch_size or remaining in (0, tail)):
                if time.monotonic() >= deadline:
                    reasons.update((i, self._deadline_reason()) for i, _ in slots)
                    slots = []
                    continue
                before = time.perf_counter()
                output = run_model(loaded, [img.pixels for _, img in slots], batch_size)
                seconds_model += time.perf_counter() - before
                for j, (slot, img) in enumerate(slots):
                    # Only the natural size is needed from here on (the rank job builds predictions the same way).
                    sized = LoadedImage(np.zeros((0, 0), dtype=np.float32), img.width, img.height)
                    future = self.pool.submit(
                        self.task_prediction,
                        schema,
                        loaded,
                        output.probabilities[j],
                        output.cams[j],
                        sized,
                        rle_as_array=True,
                    )
                    pending.append((slot, future))
                slots = []  # the batch's pixels are released here
        modelled = time.perf_counter()
        by_index: dict[int, dict[str, Any] | str] = dict(reasons)
        for index, future in pending:
            try:
                by_index[index] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                future.cancel()
                by_index[index] = self._deadline_reason()
            except Exception as exc:  # one task's heatmap failing must not sink the batch
                log.exception("task at position %d: building the prediction failed", index)
                by_index[index] = short(f"building the prediction failed: {exc.__class__.__name__}: {exc}")
        results: list[dict[str, Any]] = []
        for index, task in enumerate(tasks):
            built = by_index.get(index, self._deadline_reason())
            if isinstance(built, dict):
                results.append(built)
                continue
            task_id = task.get("id") if isinstance(task, dict) else None
            log.warning("task %s: no prediction: %s", short(str(task_id), 40), built)
            self.stats.record_error(task_id, built)
            results.append({"result": [], "score": 0.0, "model_version": loaded.version, "error": built})
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
        control = heatmap_control(schema)
        with_heatmap = [k for k in predicted if control and loaded.labels[k] in control.labels]
        cap = self.settings.heatmap_max_findings
        if cap > 0 and len(with_heatmap) > cap:
            # The most probable findings only: a physician reads a few overlaid heatmaps, not ten, and at natural
            # size each costs tens of ms and (brush RLE) ~0.3 MB of JSON per 0.25 MP (bench/results/serving.md,
            # heatmap_png.md). The others keep their choice and probability.
            with_heatmap = sorted(with_heatmap, key=lambda k: -probabilities[k])[:cap]
        if control and with_heatmap:
            heat = upsample_maps(cams[with_heatmap], image.height, image.width).clamp_(0, 1).numpy()
            for k, finding_heat in zip(with_heatmap, heat, strict=True):
                alpha = heatmap_to_alpha(
                    finding_heat, levels=self.settings.heatmap_levels, floor=self.settings.heatmap_floor
                )
                result.append(
                    heatmap_region(
                        control,
                        schema.image_name,
                        f"heatmap-{k}",
                        loaded.labels[k],
                        float(probabilities[k]),
                        alpha,
                        rle_as_array=rle_as_array,
                    )
                )
        return {"result": result, "score": confidence, "model_version": loaded.version}


# --------------------------------------------------------------------------------------------- heatmap regions


@dataclass(frozen=True)
class HeatmapControl:
    """The region control that receives the heatmaps: its name, result type and labels."""

    name: str
    kind: str  # "bitmasklabels" (graded-alpha PNG data URL) or "brushlabels" (graded brush RLE)
    labels: tuple[str, ...]


def heatmap_control(schema: ProjectSchema) -> HeatmapControl | None:
    """The control heatmaps go to, chosen by the label config: ``BitmaskLabels`` when the image has one (a PNG
    is ~15x lighter than brush RLE at clinical resolution, bench/results/heatmap_png.md), else ``BrushLabels``,
    else none (no heatmaps, findings only)."""
    if schema.bitmask_name:
        return HeatmapControl(schema.bitmask_name, "bitmasklabels", tuple(schema.bitmask_labels))
    if schema.brush_name:
        return HeatmapControl(schema.brush_name, "brushlabels", tuple(schema.brush_labels))
    return None


def heatmap_region(
    control: HeatmapControl,
    image_name: str,
    region_id: str,
    label: str,
    probability: float,
    alpha: np.ndarray,
    *,
    rle_as_array: bool = False,
) -> dict[str, Any]:
    """One heatmap as a Label Studio result item at the image's natural size (the editor scales neither format).

    ``meta.text`` shows the finding's probability in the editor's region details.
    """
    height, width = alpha.shape
    if control.kind == "bitmasklabels":
        value: dict[str, Any] = {"imageDataURL": encode_heat_png(alpha), "bitmasklabels": [label]}
    else:
        rle = encode_alpha_array(alpha) if rle_as_array else encode_alpha(alpha)
        value = {"format": "rle", "rle": rle, "brushlabels": [label]}
    return {
        "id": region_id,
        "from_name": control.name,
        "to_name": image_name,
        "type": control.kind,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": value,
        "score": round(probability, 6),
        "meta": {"text": [f"p={probability:.2f}"]},
    }
