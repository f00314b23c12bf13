"""Task images for a batch of Label Studio tasks: fetched concurrently, within a deadline and a pixel budget.

A task whose image cannot be used yields an ``ImageError`` (its reason) in its place; the batch goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from ml_backend.config import Settings
from ml_backend.io.image_sources import short
from ml_backend.io.images import ImageError, ImageFetcher, LoadedImage, load_image
from ml_backend.io.label_config import ProjectSchema

log = logging.getLogger(__name__)

TaskImage = LoadedImage | ImageError  # the image, or why the task has none


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


class TaskImageLoader:
    """Loads tasks' images with one shared ``ImageFetcher`` (connections kept alive, FETCH_PER_HOST shared)."""

    def __init__(self, settings: Settings, fetcher: ImageFetcher | None = None) -> None:
        self.settings = settings
        self.fetcher = fetcher or ImageFetcher(settings)

    def close(self) -> None:
        self.fetcher.close()

    def deadline_error(self) -> ImageError:
        return ImageError(
            f"not finished within PREDICT_DEADLINE_S ({self.settings.predict_deadline_s:g} s); predict it again"
        )

    def load_one(
        self, task: Any, schema: ProjectSchema, deadline: float | None = None, budget: PixelBudget | None = None
    ) -> TaskImage:
        try:
            if not isinstance(task, dict):
                raise ImageError("task is not a JSON object")
            ref = task_image_ref(task, schema)
            return load_image(ref, self.settings, self.fetcher, deadline=deadline, reserve=budget)
        except ImageError as exc:
            return ImageError(short(str(exc)))
        except Exception as exc:  # a bad task must never sink the batch
            log.exception("unexpected error loading task image")
            return ImageError(short(f"unexpected error: {exc.__class__.__name__}: {exc}"))

    def stream(
        self,
        tasks: Sequence[Any],
        schema: ProjectSchema,
        deadline: float | None = None,
        budget: PixelBudget | None = None,
        window: int | None = None,
    ) -> Generator[tuple[int, TaskImage], None, None]:
        """(index, image or error) in completion order. At most ``window`` tasks are fetched or waiting to be
        consumed at once, on this call's own threads: one request's slow host cannot occupy another's, and at most
        ``window`` decoded images exist beyond the batch being predicted. At the deadline the rest get an error."""
        window = max(1, window or self.settings.fetch_per_request)
        executor = ThreadPoolExecutor(max_workers=window, thread_name_prefix="predict-fetch")
        running: dict[Future[TaskImage], int] = {}
        submitted = 0
        try:
            while running or submitted < len(tasks):
                while submitted < len(tasks) and len(running) < window:
                    future = executor.submit(self.load_one, tasks[submitted], schema, deadline, budget)
                    running[future] = submitted
                    submitted += 1
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
                if not done:
                    break
                for future in done:
                    yield running.pop(future), future.result()  # load_one never raises
            late = self.deadline_error()
            for future, index in running.items():
                future.cancel()
                yield index, late
            for index in range(submitted, len(tasks)):
                yield index, late
        finally:
            # Threads still fetching end by the deadline themselves (it caps their fetch); nobody waits for them.
            executor.shutdown(wait=False, cancel_futures=True)

    def load_all(self, tasks: Sequence[Any], schema: ProjectSchema) -> list[TaskImage]:
        """Each task's image or error, in order (each fetch bounded by FETCH_TIMEOUT_S)."""
        images: list[TaskImage] = [ImageError("not loaded")] * len(tasks)
        for index, image in self.stream(tasks, schema, window=min(max(len(tasks), 1), 32)):
            images[index] = image
        return images
