"""The bias report of one project's model versions, from the metrics stored with each version."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.measure.report import render_report_html, write_report
from ml_backend.models.store import VersionRepository


def _examples(saved: bytes | None) -> list[dict[str, Any]]:
    """Held-out example heatmaps the training job saved with the version (``examples.npz``)."""
    if saved is None:
        return []
    with np.load(io.BytesIO(saved), allow_pickle=False) as data:
        return [
            {
                "image": data["images"][i],
                "heatmap": data["heatmaps"][i],
                "finding": str(data["findings"][i]),
                "prob": float(data["probs"][i]),
            }
            for i in range(len(data["images"]))
        ]


def project_versions(store: VersionRepository, project: str) -> list[dict[str, Any]]:
    """Report entries oldest -> newest; versions without metrics (initial, label-set changes) are listed too."""
    return [
        {
            "version": info.version,
            "created_at": info.meta.created_at,
            "parent": info.meta.parent,
            "metrics": info.meta.metrics or {},
            "examples": _examples(store.read_file(info, "examples.npz")),
        }
        for info in store.list_versions(project)
    ]


def render_project_report(store: VersionRepository, project: str) -> str:
    return render_report_html(project_versions(store, project))


def write_project_report(store: VersionRepository, project: str, out_dir: Path) -> Path:
    return write_report(project_versions(store, project), out_dir)
