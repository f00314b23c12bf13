"""What the physician reads on the labelling page: every finding's probability and, on a ranked task, why the
task is in front of them.

Label Studio's editor never shows extra fields of a result item (the findings result's ``probabilities`` and
``ranking``), so the same facts go into a read-only ``textarea`` result for the project's ``<TextArea
name="model_summary">`` (``ProjectSchema.summary_name``), one entry per line. Without that control nothing is
added: any label config keeps working. The heatmap regions carry their own probability in ``meta.text``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ml_backend.io.label_config import ProjectSchema

SUMMARY_ID = "model-summary"
RANKING_PREFIX = "In your queue"


def probability_lines(
    labels: Sequence[str], probabilities: np.ndarray, thresholds: np.ndarray, version: str
) -> list[str]:
    """Two lines: the findings at or above their threshold, then every finding, most probable first."""
    order = sorted(range(len(labels)), key=lambda k: (-float(probabilities[k]), k))
    predicted = [f"{labels[k]} p={float(probabilities[k]):.2f}" for k in order if probabilities[k] >= thresholds[k]]
    everything = [f"{labels[k]} p={float(probabilities[k]):.2f}" for k in order]
    return [
        f"Model {version}, predicted: {', '.join(predicted) if predicted else 'no finding above its threshold'}",
        f"All findings: {', '.join(everything)}",
    ]


def ranking_line(ranking: dict[str, Any]) -> str:
    """Why the task is where it is in the review queue: its rank, priority and the ranking's reason."""
    return (
        f"{RANKING_PREFIX} at #{int(ranking['rank'])} (priority {float(ranking['priority']):.2f}, "
        f"{ranking.get('strategy') or 'ranking'}): {ranking['reason']}"
    )


def summary_result(schema: ProjectSchema, lines: Sequence[str]) -> dict[str, Any] | None:
    """The read-only textarea result holding ``lines``; None when the config has no summary control."""
    if not schema.summary_name or not lines:
        return None
    return {
        "id": SUMMARY_ID,
        "from_name": schema.summary_name,
        "to_name": schema.image_name,
        "type": "textarea",
        "readonly": True,  # the editor neither edits nor deletes a read-only result's entries
        "value": {"text": list(lines)},
    }


def probability_summary(
    schema: ProjectSchema, labels: Sequence[str], probabilities: np.ndarray, thresholds: np.ndarray, version: str
) -> dict[str, Any] | None:
    """The summary of a prediction: :func:`probability_lines` as a textarea result, or None without the control."""
    if not schema.summary_name:
        return None
    return summary_result(schema, probability_lines(labels, probabilities, thresholds, version))


def add_ranking_to_summary(result: list[dict[str, Any]], schema: ProjectSchema, ranking: dict[str, Any]) -> None:
    """Put the ranking's line first in the prediction's summary (in place); nothing without a summary control."""
    if not schema.summary_name:
        return
    summary = next((r for r in result if r.get("type") == "textarea" and r.get("id") == SUMMARY_ID), None)
    if summary is None:
        summary = summary_result(schema, [ranking_line(ranking)])
        if summary is not None:
            result.append(summary)
        return
    kept = [line for line in summary["value"]["text"] if not str(line).startswith(RANKING_PREFIX)]
    summary["value"]["text"] = [ranking_line(ranking), *kept]
