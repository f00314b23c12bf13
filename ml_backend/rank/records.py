"""What a ranking produces, as typed records: the saved ranking (``ranking.json``), one item per task, and the
prediction written for a ranked task. Pure: no Label Studio, no files."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np
import torch

from ml_backend.config import HeatmapSettings
from ml_backend.inference.results import build_prediction
from ml_backend.inference.summary import add_ranking_to_summary
from ml_backend.io.label_config import ProjectSchema
from ml_backend.models.registry import LoadedModel
from ml_backend.rank.priors import Priors
from ml_backend.rank.strategy import RankConfig, RankedItem


class RankingItem(TypedDict):
    """One ranked task: its place in the queue and why."""

    task: int
    rank: int  # 1 = review first
    score: float  # the prediction's score: 1 - (rank - 1) / N, so "Prediction score" descending is the queue
    priority: float  # the strategy's own number (higher = sooner)
    reason: str  # one sentence for the physician
    signals: dict[str, float]  # each signal's contribution


class SavedRanking(TypedDict):
    """``ranking.json``: every score exists before the first prediction is written (see ``rank/job.py``)."""

    key: str  # version + config + candidate ids: a rerun with the same key reuses the ranking
    version: str
    strategy: str
    config: dict[str, Any]
    created_at: float
    priors: dict[str, Any]
    items: list[RankingItem]


class RankedPrediction(TypedDict):
    """A Label Studio prediction (the import format) for one ranked task."""

    task: int
    result: list[dict[str, Any]]
    score: float
    model_version: str


def ranking_key(version: str, config: RankConfig, task_ids: Sequence[int]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": version, "config": config.to_json()}, sort_keys=True).encode())
    digest.update(np.array(sorted(int(t) for t in task_ids), dtype=np.int64).tobytes())
    return digest.hexdigest()[:20]


def saved_ranking(
    key: str,
    version: str,
    config: RankConfig,
    task_ids: Sequence[int],
    items: Sequence[RankedItem],
    priors_summary: dict[str, Any],
) -> SavedRanking:
    """``items[i].index`` points into ``task_ids``."""
    n = len(items)
    return {
        "key": key,
        "version": version,
        "strategy": config.strategy,
        "config": config.to_json(),
        "created_at": time.time(),
        "priors": priors_summary,
        "items": [
            {
                "task": int(task_ids[item.index]),
                "rank": item.rank + 1,  # 1-based for people
                "score": round(1.0 - item.rank / n, 6),  # higher = review sooner; monotone in rank
                "priority": round(item.priority, 4),
                "reason": item.reason,
                "signals": {k: round(v, 4) for k, v in item.signals.items()},
            }
            for item in items
        ],
    }


def priors_summary(priors: Priors, findings: Sequence[str], source: str) -> dict[str, Any]:
    return {**priors.summary(list(findings)), "source": source}


def ranked_prediction(
    heatmap: HeatmapSettings,
    schema: ProjectSchema,
    loaded: LoadedModel,
    probabilities: np.ndarray,
    cams: np.ndarray,
    width: int,
    height: int,
    item: RankingItem,
    strategy: str,
) -> RankedPrediction:
    """The prediction ``/predict`` would return for the task, with the ranking's score and reason: on the
    findings result (``ranking``) and in the read-only summary text the physician reads."""
    prediction = build_prediction(
        heatmap, schema, loaded, probabilities, torch.from_numpy(cams.astype(np.float32)), width, height
    )
    ranking = {
        "rank": item["rank"],
        "score": item["score"],
        "priority": item["priority"],
        "reason": item["reason"],
        "signals": item["signals"],
        "strategy": strategy,
    }
    result = prediction["result"]
    carrier = next((r for r in result if r.get("type") == "choices"), None)
    if carrier is None:  # no finding and no "No Finding" choice: an empty choices result carries the reason
        carrier = {
            "id": "findings",
            "from_name": schema.choices_name,
            "to_name": schema.image_name,
            "type": "choices",
            "value": {"choices": []},
        }
        result.insert(0, carrier)
    carrier["ranking"] = ranking
    add_ranking_to_summary(result, schema, ranking)
    return {"task": item["task"], "result": result, "score": item["score"], "model_version": loaded.version}
