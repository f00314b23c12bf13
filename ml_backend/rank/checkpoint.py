"""The ranking job's checkpoint: per (project, version), the model outputs of every predicted task, the saved
ranking and how far writing it got, so a rerun after a crash predicts and writes only what is missing.

Layout: ``MODEL_DIR/projects/<p>/ranking/<version>/`` with ``outputs-*.npz`` (one per predicted batch, written
atomically), ``ranking.json`` and ``progress.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from ml_backend.rank.records import SavedRanking

log = logging.getLogger(__name__)


@dataclass
class TaskOutput:
    task_id: int
    probabilities: np.ndarray  # (K,)
    cams: np.ndarray  # (K, h, w) float16, [0, 1]
    features: np.ndarray  # (C,) float16
    width: int
    height: int


class RankCheckpoint:
    """Per (project, version) folder: model outputs per task, the saved ranking, and write progress."""

    def __init__(self, model_dir: Path, project: str, version: str) -> None:
        self.dir = Path(model_dir) / "projects" / project / "ranking" / version

    def prune_other_versions(self) -> None:
        """Drop older versions' checkpoints once this version's ranking is live (~2.5 kB per task each)."""
        for other in self.dir.parent.iterdir():
            if other.is_dir() and other != self.dir:
                shutil.rmtree(other, ignore_errors=True)

    def load_outputs(self, labels: Sequence[str]) -> dict[int, TaskOutput]:
        outputs: dict[int, TaskOutput] = {}
        for path in sorted(self.dir.glob("outputs-*.npz")):
            try:
                with np.load(path, allow_pickle=False) as data:
                    if list(data["labels"]) != list(labels):
                        continue
                    for i, task_id in enumerate(data["task_ids"].tolist()):
                        outputs[int(task_id)] = TaskOutput(
                            int(task_id),
                            data["probabilities"][i],
                            data["cams"][i],
                            data["features"][i],
                            int(data["width"][i]),
                            int(data["height"][i]),
                        )
            except (OSError, ValueError, KeyError) as exc:  # a torn file from a killed job: predict those again
                log.warning("ignoring unreadable ranking checkpoint %s: %s", path, exc)
        return outputs

    def save_outputs(self, batch: Sequence[TaskOutput], labels: Sequence[str]) -> None:
        if not batch:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        arrays = {
            "labels": np.array(list(labels)),
            "task_ids": np.array([o.task_id for o in batch], dtype=np.int64),
            "probabilities": np.stack([o.probabilities for o in batch]).astype(np.float32),
            "cams": np.stack([o.cams for o in batch]).astype(np.float16),
            "features": np.stack([o.features for o in batch]).astype(np.float16),
            "width": np.array([o.width for o in batch], dtype=np.int32),
            "height": np.array([o.height for o in batch], dtype=np.int32),
        }
        fd, tmp = tempfile.mkstemp(prefix=".outputs-", suffix=".npz", dir=self.dir)
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        os.replace(tmp, self.dir / f"outputs-{time.time_ns()}-{batch[0].task_id}.npz")

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / name).read_text())
        except (OSError, ValueError):
            return None

    def _write(self, name: str, payload: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.dir)
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle)
        os.replace(tmp, self.dir / name)

    def load_ranking(self) -> SavedRanking | None:
        saved = self._read("ranking.json")
        return cast(SavedRanking, saved) if saved is not None and "items" in saved else None

    def save_ranking(self, ranking: SavedRanking) -> None:
        self._write("ranking.json", dict(ranking))
        self.save_progress(ranking["key"], written=0, done=False)

    def progress(self) -> dict[str, Any]:
        return self._read("progress.json") or {}

    def save_progress(self, key: str, *, written: int, done: bool) -> None:
        self._write("progress.json", {"key": key, "written": written, "done": done, "updated_at": time.time()})
