"""Label Studio tasks in, one prediction per task out: findings, probabilities and a heatmap per finding."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from ml_backend.config import Settings
from ml_backend.inference.model_outputs import run_model
from ml_backend.inference.results import build_prediction
from ml_backend.inference.task_images import PixelBudget, TaskImageLoader
from ml_backend.io.image_sources import short
from ml_backend.io.images import LoadedImage
from ml_backend.io.label_config import ProjectSchema
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


class Predictor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # One loader for all requests: connections kept alive per host, FETCH_PER_HOST shared by all requests.
        self.images = TaskImageLoader(settings)
        # Heatmap building; fetches run on each request's own threads.
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="predict-io")
        self.stats = PredictStats()

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.images.close()

    def _deadline_reason(self) -> str:
        return str(self.images.deadline_error())

    def predict(self, tasks: Sequence[dict[str, Any]], schema: ProjectSchema, loaded: LoadedModel) -> list[dict]:
        """One result per task, in order; a task without a prediction gets ``result: []`` and an ``error`` field
        with the reason (Label Studio stores the entry and ignores the field; its log shows it). Brush RLE in the
        results is a uint8 array: serialise with orjson's ``OPT_SERIALIZE_NUMPY`` (the app does)."""
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
        loads = self.images.stream(tasks, schema, deadline, PixelBudget(self.settings.predict_max_pixels))
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
                reasons[index] = str(image)
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
                    future = self.pool.submit(
                        build_prediction,
                        self.settings.heatmap,
                        schema,
                        loaded,
                        output.probabilities[j],
                        output.cams[j],
                        img.width,
                        img.height,
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
