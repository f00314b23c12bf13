"""Model outputs to Label Studio result items: the findings' choices with every probability, and one heatmap
region per predicted finding, in the form the project's label config asks for.

Each result kind has its own builder; ``build_prediction`` chooses by the config. Add a result kind here (and
validate it with the SDK's ``LabelInterface.validate_prediction`` in a test, as tests/test_serving.py does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ml_backend.config import HeatmapSettings
from ml_backend.explain.bitmask_png import encode_heat_png
from ml_backend.explain.brush_rle import encode_alpha, encode_alpha_array
from ml_backend.explain.cam import upsample_to_alpha
from ml_backend.inference.summary import probability_summary
from ml_backend.io.label_config import ProjectSchema
from ml_backend.models.registry import LoadedModel


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


def findings_result(
    schema: ProjectSchema, labels: Sequence[str], probabilities: np.ndarray, findings: list[str], confidence: float
) -> dict[str, Any] | None:
    """The predicted findings as the choices control's result, with every finding's probability beside it
    (kept with the prediction for review and ranking); None when there is nothing to tick."""
    choices = findings or ([schema.no_finding_label] if schema.no_finding_label else [])
    if not choices:
        return None
    return {
        "id": "findings",
        "from_name": schema.choices_name,
        "to_name": schema.image_name,
        "type": "choices",
        "value": {"choices": choices},
        "score": confidence,
        "probabilities": {label: round(float(p), 6) for label, p in zip(labels, probabilities, strict=True)},
    }


def build_prediction(
    heatmaps: HeatmapSettings,
    schema: ProjectSchema,
    loaded: LoadedModel,
    probabilities: np.ndarray,
    cams: torch.Tensor,
    width: int,
    height: int,
    *,
    rle_as_array: bool = False,
) -> dict[str, Any]:
    """One task's prediction: ``{"result": [...], "score", "model_version"}`` for an image of width x height.

    Brush RLE as a uint8 array (``rle_as_array``) needs orjson's ``OPT_SERIALIZE_NUMPY`` to serialise."""
    predicted = [k for k, p in enumerate(probabilities) if p >= loaded.thresholds[k]]
    confidence = float(np.mean(np.maximum(probabilities, 1.0 - probabilities)))
    result: list[dict[str, Any]] = []
    choices = findings_result(schema, loaded.labels, probabilities, [loaded.labels[k] for k in predicted], confidence)
    if choices is not None:
        result.append(choices)
    control = heatmap_control(schema)
    with_heatmap = [k for k in predicted if control and loaded.labels[k] in control.labels]
    if heatmaps.max_findings > 0 and len(with_heatmap) > heatmaps.max_findings:
        # The most probable findings only: a physician reads a few overlaid heatmaps, not ten, and at natural
        # size each costs tens of ms and (brush RLE) ~0.3 MB of JSON per 0.25 MP (bench/results/serving.md,
        # heatmap_png.md). The others keep their choice and probability.
        with_heatmap = sorted(with_heatmap, key=lambda k: -probabilities[k])[: heatmaps.max_findings]
    if control and with_heatmap:
        for k in with_heatmap:
            # Straight to uint8 alpha in cache-sized bands: no natural-size float32 map (bench/results/heatmap_png.md).
            alpha = upsample_to_alpha(cams[k], height, width, levels=heatmaps.levels, floor=heatmaps.floor)
            region = heatmap_region(
                control,
                schema.image_name,
                f"heatmap-{k}",
                loaded.labels[k],
                float(probabilities[k]),
                alpha,
                rle_as_array=rle_as_array,
            )
            result.append(region)
    summary = probability_summary(schema, loaded.labels, probabilities, loaded.thresholds, loaded.version)
    if summary is not None:  # what the physician reads on the page, when the config has the control
        result.append(summary)
    return {"result": result, "score": confidence, "model_version": loaded.version}
