"""Physicians' annotations, validated and reduced to what training needs.

An annotation carries the findings (a ``choices`` result) and brush masks: one per finding ("the evidence
is here": the heatmap they kept or painted) and optionally one for the ignore label ("never look here":
markers, tubes, text). Masks stay RLE-encoded until training, where they are decoded at the image's natural
size; the webhook only checks what it can check in microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ml_backend.io.label_config import ProjectSchema

IGNORE = "__ignore__"  # mask key for "never look here" regions
# Task data fields used to measure group fairness of each new version (when the project imports them).
GROUP_FIELDS = ("patient_id", "sex", "age")


class AnnotationError(ValueError):
    """The annotation payload itself is malformed (answered with a 4xx at the webhook)."""


@dataclass
class MaskRef:
    rle: list[int]
    width: int
    height: int


@dataclass
class AnnotationRecord:
    project: str
    task_id: int
    annotation_id: int
    image_ref: str
    positives: list[str]
    masks: dict[str, MaskRef] = field(default_factory=dict)  # finding name or IGNORE -> mask
    updated_at: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)  # sex, age, patient_id when the task data has them
    seq: int = 0  # assigned by the store: the order annotations were acknowledged in

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: dataclasses.asdict deep-copies every RLE byte (277 ms vs 9 ms at 512 px).
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["masks"] = {k: {"rle": m.rle, "width": m.width, "height": m.height} for k, m in self.masks.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnnotationRecord:
        masks = {key: MaskRef(**value) for key, value in (data.get("masks") or {}).items()}
        return cls(**{**data, "masks": masks})


def _rle_value_count(rle: list[Any]) -> int:
    """The number of values an rle-pack stream declares (its first 32 bits), without decoding it."""
    if len(rle) < 7 or not all(isinstance(b, int) and 0 <= b <= 255 for b in rle[:7]):
        raise AnnotationError("brush mask 'rle' is not a list of bytes")
    return int.from_bytes(bytes(rle[:4]), "big")


def parse_annotation(project: str, annotation: Any, task: Any, schema: ProjectSchema) -> AnnotationRecord | None:
    """The training record for one annotation; None when it is not training data (cancelled)."""
    if not isinstance(annotation, dict):
        raise AnnotationError("'annotation' must be an object")
    if annotation.get("was_cancelled"):
        return None
    if not isinstance(task, dict):
        raise AnnotationError("'task' must be an object")
    annotation_id, task_id = annotation.get("id"), task.get("id", annotation.get("task"))
    if not isinstance(annotation_id, int) or not isinstance(task_id, int):
        raise AnnotationError("annotation and task need integer 'id's")
    data = task.get("data")
    image_ref = data.get(schema.image_value_key) if isinstance(data, dict) else None
    if not isinstance(image_ref, str) or not image_ref:
        raise AnnotationError(f"task {task_id} has no image under data.{schema.image_value_key}")
    results = annotation.get("result")
    if not isinstance(results, list):
        raise AnnotationError("annotation 'result' must be a list")

    positives: list[str] = []
    masks: dict[str, MaskRef] = {}
    for index, item in enumerate(results):
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise AnnotationError(f"result[{index}] must be an object with a 'value'")
        kind, value = str(item.get("type", "")).lower(), item["value"]
        if kind == "choices" and item.get("from_name") == schema.choices_name:
            chosen = value.get("choices")
            if not isinstance(chosen, list):
                raise AnnotationError(f"result[{index}].value.choices must be a list")
            unknown = [c for c in chosen if c not in schema.findings and c != schema.no_finding_label]
            if unknown:
                raise AnnotationError(f"result[{index}] names findings not in the label config: {unknown}")
            positives = [c for c in chosen if c in schema.findings]
        elif kind == "brushlabels" and item.get("from_name") == schema.brush_name:
            labels, rle = value.get("brushlabels"), value.get("rle")
            if value.get("format", "rle") != "rle" or not isinstance(rle, list):
                raise AnnotationError(f"result[{index}] brush mask has no 'rle' list")
            if not isinstance(labels, list) or len(labels) != 1:
                raise AnnotationError(f"result[{index}] brush mask needs exactly one label")
            label = labels[0]
            if label == schema.ignore_label:
                key = IGNORE
            elif label in schema.findings:
                key = label
            else:
                raise AnnotationError(f"result[{index}] brush label {label!r} is not a finding of this project")
            width, height = item.get("original_width"), item.get("original_height")
            if not isinstance(width, int) or not isinstance(height, int) or width <= 0 or height <= 0:
                raise AnnotationError(f"result[{index}] brush mask needs original_width/original_height")
            declared = _rle_value_count(rle)
            if declared != width * height * 4:
                raise AnnotationError(
                    f"result[{index}] brush mask encodes {declared // 4} pixels but the image is "
                    f"{width}x{height} = {width * height}"
                )
            if key in masks:  # several strokes for one label: keep them all, merged at decode time
                masks[f"{key}#{index}"] = MaskRef(rle, width, height)
            else:
                masks[key] = MaskRef(rle, width, height)
    return AnnotationRecord(
        project=project,
        task_id=task_id,
        annotation_id=annotation_id,
        image_ref=image_ref,
        positives=positives,
        masks=masks,
        updated_at=annotation.get("updated_at"),
    )
