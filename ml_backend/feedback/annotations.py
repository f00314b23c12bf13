"""Physicians' annotations, validated and reduced to what training needs.

An annotation carries the findings (a ``choices`` result) and regions: evidence for a finding ("the evidence is
here": the heatmap they kept or painted, a box, a polygon) and "never look here" regions for an ignore label
(markers, tubes, text). Regions come from BrushLabels (RLE), RectangleLabels and PolygonLabels (geometry in percent
of the image) and BitmaskLabels (a PNG data URL); they are stored compactly and decoded to masks at the image's
natural size in training. The webhook only checks what it can check in milliseconds.

Nothing is lost: an annotation is refused as a whole only when it is unusable (not an object, no integer id, no
task or image, no result list). A region, label or patient field that cannot be used is skipped and the skip is
kept, with its reason, in the record (``AnnotationRecord.skipped``); everything else is recorded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ml_backend.config import Settings
from ml_backend.explain import brush_rle
from ml_backend.explain.bitmask_png import BitmaskError, decode_mask_data_url, png_data_url_size
from ml_backend.io.label_config import ProjectSchema

IGNORE = "__ignore__"  # mask key for "never look here" regions
SUGGESTED_PREFIX = "suggested-ignore-"  # region ids of the ignore regions the backend suggests
# Task data fields read as patient metadata, tried in this order (case-insensitive); Settings.patient_fields
# (PATIENT_FIELDS=sex=Gender,...) names a project's own field first.
DEFAULT_PATIENT_FIELDS: dict[str, tuple[str, ...]] = {
    "patient_id": ("patient_id", "PatientID", "patient", "patientId", "subject_id", "mrn"),
    "sex": ("sex", "gender", "PatientSex", "patient_sex"),
    "age": ("age", "PatientAge", "patient_age", "age_years"),
    "site": ("site", "hospital", "scanner", "institution", "InstitutionName", "center", "centre"),
}
GROUP_FIELDS = tuple(DEFAULT_PATIENT_FIELDS)
# Brush streams up to this size are walked chunk by chunk at the webhook (a 60 KiB graded heatmap: 8-9 ms p50 in
# bench/results/webhook_validation.md, so roughly 4x that at the limit); larger ones (graded heatmaps at clinical
# size: 0.7-2 MB) get the byte, header and length checks only (8-16 ms at 1024x1024, mostly bytes()), and a stream
# that still fails to decode is skipped, with its reason, in training.
RLE_WALK_MAX_BYTES = 256 * 1024
MAX_POLYGON_POINTS = 10_000  # bounds the work per polygon at the webhook; LS polygons have tens to hundreds
_SEX = {"m": "M", "male": "M", "man": "M", "f": "F", "female": "F", "woman": "F", "o": "O", "other": "O"}
# "58", "58.5", DICOM AS "058Y" / "006M" / "012W" / "003D", "58 years", "6 months"
_AGE = re.compile(r"^\s*(\d{1,3}(?:\.\d+)?)\s*(y|yr|yrs|years?|m|mo|months?|w|wk|weeks?|d|days?)?\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"y": 1.0, "m": 1 / 12, "w": 7 / 365.25, "d": 1 / 365.25}


class AnnotationError(ValueError):
    """The annotation payload as a whole is unusable (answered with a 4xx at the webhook)."""


class RegionError(ValueError):
    """One region, label or field cannot be used: it is skipped with ``code`` (a counter name) and the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class MaskRef:
    """One region, as compact as Label Studio sent it: brush RLE, rectangle/polygon geometry (percent of the
    image), or a bitmask PNG data URL. ``width``/``height``: the original_width/height it was drawn on."""

    rle: list[int] | None
    width: int
    height: int
    kind: str = "rle"  # "rle" | "rectangle" | "polygon" | "bitmask"
    geometry: dict[str, Any] | None = None  # rectangle: x, y, width, height, rotation; polygon: points
    data_url: str | None = None
    where: str = ""  # "result[3]": names the region in a skip reason
    suggested: str = ""  # the region id of a kept suggested ignore region (train/suggestions.py), else ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"rle": self.rle, "width": self.width, "height": self.height}
        if self.kind != "rle":  # records in the old format had only these three keys: keep brush records as small
            data.update(kind=self.kind, geometry=self.geometry, data_url=self.data_url)
        if self.where:
            data["where"] = self.where
        if self.suggested:
            data["suggested"] = self.suggested
        return data


@dataclass
class AnnotationRecord:
    project: str
    task_id: int
    annotation_id: int
    image_ref: str
    positives: list[str]
    masks: dict[str, MaskRef] = field(default_factory=dict)  # finding name or IGNORE ("#n" suffix) -> region
    updated_at: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)  # patient_id, sex, age (years), site from task data
    seq: int = 0  # assigned by the store: the order annotations were acknowledged in
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"where", "code", "reason"} of unusable items

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: dataclasses.asdict deep-copies every RLE byte (277 ms vs 9 ms at 512 px).
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["masks"] = {k: m.to_json() for k, m in self.masks.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnnotationRecord:
        known = {f.name for f in fields(cls)}
        masks = {key: MaskRef(**value) for key, value in (data.get("masks") or {}).items()}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "masks": masks})


# ------------------------------------------------------------------------------------------- validation


def check_rle(rle: Any, height: int, width: int, walk_max_bytes: int = RLE_WALK_MAX_BYTES) -> None:
    """Raise RegionError unless ``rle`` is a consistent rle-pack stream for a ``width`` x ``height`` mask.

    Always (microseconds to a few ms): byte values, the header's value count, and that the length lies between
    the fewest and the most bits that many values can take. Streams up to ``walk_max_bytes``: the chunk walk too
    (garbage or truncation anywhere). Uses brush_rle's own reader so the webhook and the decoder cannot disagree.
    """
    try:
        data = brush_rle._as_bytes(rle)
    except ValueError as exc:
        raise RegionError("bad_rle", f"brush mask: {exc}") from None
    if len(data) * 8 < brush_rle.HEADER_BITS:
        raise RegionError("bad_rle", f"brush mask is truncated: {len(data)} bytes, the header alone needs 7")
    head = int.from_bytes(data[:7].tobytes(), "big") >> (56 - brush_rle.HEADER_BITS)
    num, wordsize = head >> 21, ((head >> 16) & 31) + 1
    sizes = tuple(((head >> (12 - 4 * k)) & 15) + 1 for k in range(4))
    expected = height * width * brush_rle.CHANNELS
    if num != expected:
        raise RegionError(
            "wrong_size",
            f"brush mask encodes {num // brush_rle.CHANNELS} pixels but the image is {width}x{height} = "
            f"{width * height} (original_width/original_height)",
        )
    # Each chunk yields 1..2**max(sizes) values for >= 3 + min(sizes) + wordsize bits (a repeat chunk).
    least_bits = brush_rle.HEADER_BITS + math.ceil(num / 2 ** max(sizes)) * (3 + min(sizes) + wordsize)
    if len(data) * 8 < least_bits:
        raise RegionError("bad_rle", f"brush mask is truncated: {len(data)} bytes cannot encode {num} values")
    if len(data) > walk_max_bytes:
        return
    reader = brush_rle._BitReader(data)
    starts = np.asarray(brush_rle._chunk_starts(reader, sizes, wordsize), dtype=np.int64)
    if not len(starts):
        raise RegionError("bad_rle", "brush mask is truncated: no chunk after the header")
    win = reader.window(starts)
    repeat = (win >> np.uint64(63)).astype(bool)
    size = np.asarray(sizes, dtype=np.int64)[(win >> np.uint64(61)).astype(np.int64) & 3]
    count = ((win << np.uint64(3)) >> (64 - size).astype(np.uint64)).astype(np.int64) + 1
    produced = np.cumsum(count)
    used = int(np.searchsorted(produced, num)) + 1
    if used > len(starts):
        raise RegionError("bad_rle", f"brush mask is truncated: it decodes to {int(produced[-1])} of {num} values")
    last = used - 1
    end = int(starts[last] + 3 + size[last] + (1 if repeat[last] else count[last]) * wordsize)
    if end > reader.nbits:
        raise RegionError("bad_rle", "brush mask is truncated: the last chunk runs past the end of the data")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rectangle_corners(g: dict[str, Any], width: float, height: float) -> np.ndarray:
    """Corners in pixels of a LS rectangle: top-left (x, y), size and clockwise rotation about the top-left."""
    x, y = g["x"] * width / 100, g["y"] * height / 100
    w, h = g["width"] * width / 100, g["height"] * height / 100
    theta = math.radians(g.get("rotation") or 0.0)
    c, s = math.cos(theta), math.sin(theta)
    local = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    return np.stack([x + local[:, 0] * c - local[:, 1] * s, y + local[:, 0] * s + local[:, 1] * c], axis=1)


def check_geometry(kind: str, geometry: dict[str, Any]) -> None:
    """Raise RegionError unless a rectangle or polygon (percent coordinates) marks some pixels of the image."""
    if kind == "rectangle":
        if not all(_finite(geometry.get(k)) for k in ("x", "y", "width", "height")) or not (
            geometry.get("rotation") is None or _finite(geometry["rotation"])
        ):
            raise RegionError("bad_geometry", "rectangle needs numeric x, y, width, height (and rotation)")
        if geometry["width"] <= 0 or geometry["height"] <= 0:
            raise RegionError("empty_region", "rectangle has no area (width or height <= 0)")
        pts = _rectangle_corners(geometry, 100.0, 100.0)
    else:
        pts = np.asarray(geometry["points"], dtype=np.float64)
        if len(np.unique(pts, axis=0)) < 3:
            raise RegionError("empty_region", f"polygon has {len(np.unique(pts, axis=0))} distinct points, needs 3")
        # A polygon that crosses itself is kept: radiologists' traced outlines often do (40 of the 225 ChestX-Det
        # polygons in nih1000), and the rasteriser fills what was drawn. Only a polygon with no area is skipped.
        if np.linalg.matrix_rank(pts - pts[0], tol=1e-9) < 2:
            raise RegionError("empty_region", "polygon has no area (all points on one line)")
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    if hi[0] <= 0 or hi[1] <= 0 or lo[0] >= 100 or lo[1] >= 100:
        raise RegionError("outside_image", f"{kind} lies outside the image")


def _polygon_points(value: dict[str, Any]) -> list[list[float]]:
    points = value.get("points")
    if not isinstance(points, list) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and _finite(p[0]) and _finite(p[1]) for p in points
    ):
        raise RegionError("bad_geometry", "polygon needs 'points' as a list of [x%, y%] numbers")
    if len(points) > MAX_POLYGON_POINTS:
        raise RegionError("bad_geometry", f"polygon has {len(points)} points, more than {MAX_POLYGON_POINTS}")
    return [[float(x), float(y)] for x, y in points]


def _natural_size(item: dict[str, Any], required: bool) -> tuple[int, int]:
    width, height = item.get("original_width"), item.get("original_height")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height))
    if not ok:
        if required:
            raise RegionError("bad_geometry", "region needs positive integer original_width/original_height")
        return 0, 0  # rectangles and polygons are in percent: rasterised at the image's size then
    return int(width), int(height)  # type: ignore[arg-type]


def parse_region(kind: str, item: dict[str, Any], settings: Settings) -> MaskRef:
    """The compact region of one result item (validated at webhook cost), or RegionError."""
    value = item["value"]
    if kind == "brushlabels":
        rle = value.get("rle")
        if value.get("format", "rle") != "rle" or not isinstance(rle, list):
            raise RegionError("bad_rle", "brush mask has no 'rle' list")
        width, height = _natural_size(item, required=True)
        if width * height > settings.max_image_pixels:
            raise RegionError("wrong_size", f"brush mask of {width}x{height} exceeds MAX_IMAGE_PIXELS")
        check_rle(rle, height, width)
        return MaskRef(rle, width, height)
    if kind == "bitmasklabels":
        width, height = _natural_size(item, required=True)
        data_url = value.get("imageDataURL")
        try:
            size = png_data_url_size(data_url, settings.max_image_bytes)
        except BitmaskError as exc:
            raise RegionError("bad_bitmask", str(exc)) from None
        if size != (width, height):
            raise RegionError("wrong_size", f"bitmask PNG is {size[0]}x{size[1]} but the image is {width}x{height}")
        return MaskRef(None, width, height, kind="bitmask", data_url=data_url)
    width, height = _natural_size(item, required=False)
    if kind == "rectanglelabels":
        geometry = {k: value.get(k) for k in ("x", "y", "width", "height", "rotation")}
        check_geometry("rectangle", geometry)
        return MaskRef(None, width, height, kind="rectangle", geometry=geometry)
    geometry = {"points": _polygon_points(value)}
    check_geometry("polygon", geometry)
    return MaskRef(None, width, height, kind="polygon", geometry=geometry)


# ----------------------------------------------------------------------------------------------- decoding


def decode_region(ref: MaskRef, width: int, height: int, settings: Settings) -> np.ndarray:
    """A region as a bool (height, width) mask at the image's natural size; RegionError when it cannot be."""
    if ref.kind in ("rle", "bitmask"):
        if ref.width and (ref.width, ref.height) != (width, height):
            raise RegionError("wrong_size", f"mask is {ref.width}x{ref.height} but the image is {width}x{height}")
        try:
            if ref.kind == "rle":
                return brush_rle.decode_alpha(ref.rle or [], height, width) > 0
            alpha = decode_mask_data_url(
                ref.data_url or "",
                width,
                height,
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
            )
            return alpha > 0
        except ValueError as exc:  # BitmaskError is a ValueError
            raise RegionError("bad_rle" if ref.kind == "rle" else "bad_bitmask", str(exc)) from None
    geometry = ref.geometry or {}
    if ref.kind == "rectangle":
        pts = _rectangle_corners(geometry, width, height)
    elif ref.kind == "polygon":
        pts = np.asarray(geometry.get("points") or [], dtype=np.float64) * [width / 100, height / 100]
    else:
        raise RegionError("unsupported_region", f"region kind {ref.kind!r} is not known")
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts.tolist()], fill=1)
    mask = np.asarray(canvas, dtype=bool)
    if not mask.any():
        raise RegionError("outside_image", f"{ref.kind} covers no pixel of the {width}x{height} image")
    return mask


# ------------------------------------------------------------------------------------------ patient data


def parse_age(value: Any) -> float:
    """Age in years from a number or a string such as "58", "058Y" (DICOM), "6 months"; RegionError otherwise."""
    if _finite(value):
        years = float(value)
    elif isinstance(value, str) and (m := _AGE.match(value)):
        years = float(m.group(1)) * _AGE_UNIT_YEARS[(m.group(2) or "y")[0].lower()]
    else:
        raise RegionError("bad_attribute", f"age {str(value)[:40]!r} is not an age (e.g. 58, '058Y', '6 months')")
    if not 0 <= years <= 130:
        raise RegionError("bad_attribute", f"age {years:g} is outside 0-130 years")
    return round(years, 2)


def parse_patient(data: dict[str, Any], settings: Settings | None) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Patient attributes (patient_id, sex, age, site) from the task data, and a skip entry per unusable value."""
    lowered = {str(k).lower(): k for k in data}
    overrides = settings.patient_fields if settings else {}
    attributes: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    for attribute, names in DEFAULT_PATIENT_FIELDS.items():
        candidates = ((overrides[attribute],) if attribute in overrides else ()) + names
        source = next((lowered[n.lower()] for n in candidates if n.lower() in lowered), None)
        if source is None or data[source] is None or data[source] == "":
            continue
        raw = data[source]
        try:
            if attribute == "age":
                attributes["age"] = parse_age(raw)
            elif not isinstance(raw, (str, int)) or isinstance(raw, bool):
                raise RegionError("bad_attribute", f"{attribute} must be a string or a number")
            elif attribute == "sex":
                sex = _SEX.get(str(raw).strip().lower())
                if sex is None:
                    raise RegionError("bad_attribute", f"sex {str(raw)[:40]!r} is not one of M, F, O")
                attributes["sex"] = sex
            else:
                attributes[attribute] = str(raw).strip()[:200]
        except RegionError as exc:
            skipped.append({"where": f"data.{source}", "code": exc.code, "reason": str(exc)})
    return attributes, skipped


# ------------------------------------------------------------------------------------------------ parsing

_REGION_KINDS = {"brushlabels", "rectanglelabels", "polygonlabels", "bitmasklabels"}


def parse_annotation(
    project: str, annotation: Any, task: Any, schema: ProjectSchema, *, settings: Settings | None = None
) -> AnnotationRecord | None:
    """The training record for one annotation; None when it is not training data (cancelled).

    Raises AnnotationError only when the annotation is unusable as a whole; unusable regions, labels and patient
    fields are skipped and listed in ``record.skipped``.
    """
    settings = settings or Settings()
    if not isinstance(annotation, dict):
        raise AnnotationError("'annotation' must be an object")
    annotation_id = annotation.get("id")
    if not isinstance(annotation_id, int) or isinstance(annotation_id, bool):
        raise AnnotationError("the annotation needs an integer 'id'")
    if annotation.get("was_cancelled"):
        return None
    if not isinstance(task, dict):
        raise AnnotationError("'task' must be an object")
    task_id = task.get("id", annotation.get("task"))
    if not isinstance(task_id, int) or isinstance(task_id, bool):
        raise AnnotationError("the task needs an integer 'id'")
    data = task.get("data")
    image_ref = data.get(schema.image_value_key) if isinstance(data, dict) else None
    if not isinstance(image_ref, str) or not image_ref:
        raise AnnotationError(f"task {task_id} has no image under data.{schema.image_value_key}")
    results = annotation.get("result")
    if not isinstance(results, list):
        raise AnnotationError("annotation 'result' must be a list")

    attributes, skipped = parse_patient(data, settings)  # type: ignore[arg-type]
    positives: list[str] = []
    masks: dict[str, MaskRef] = {}

    def skip(where: str, code: str, reason: str) -> None:
        skipped.append({"where": where, "code": code, "reason": reason})

    known_controls = (
        {schema.choices_name} | {c.name for c in schema.region_controls} | {name for _, name in schema.other_controls}
    )
    for index, item in enumerate(results):
        where = f"result[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            skip(where, "malformed", "result item must be an object with a 'value'")
            continue
        kind, value, from_name = str(item.get("type", "")).lower(), item["value"], item.get("from_name")
        if not isinstance(from_name, str) or from_name not in known_controls:  # a list or object is not a name
            if kind in _REGION_KINDS or kind == "choices":
                skip(where, "unknown_control", f"control {str(from_name)[:60]!r} is not in the label config")
            continue
        control = schema.region_control(from_name)
        if from_name != schema.choices_name and control is None:
            continue  # a control this backend leaves alone (image quality, comments...)
        to_name = item.get("to_name", schema.image_name)
        if to_name != schema.image_name:
            skip(where, "other_object", f"region is for {str(to_name)[:60]!r}, not the image {schema.image_name!r}")
            continue
        if from_name == schema.choices_name:
            chosen = value.get("choices")
            if not isinstance(chosen, list):
                skip(where, "malformed", "value.choices must be a list")
                continue
            for c in chosen:
                if c not in schema.findings and c != schema.no_finding_label:
                    skip(where, "unknown_label", f"choice {str(c)[:60]!r} is not in the label config")
            positives = list(dict.fromkeys(c for c in chosen if c in schema.findings))
            continue
        assert control is not None
        if kind != control.tag:
            skip(where, "malformed", f"result type {kind!r} does not match control {control.name!r} ({control.tag})")
            continue
        labels = value.get(kind)
        if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
            skip(where, "malformed", f"region needs a non-empty list of labels in value.{kind}")
            continue
        keys = []
        for label in labels:
            role = schema.region_role(label)
            if role == "unused":
                skip(where, "unknown_label", f"label {label[:60]!r} is neither a finding nor an ignore label")
            else:
                keys.append(IGNORE if role == "ignore" else label)
        if not keys:
            continue
        try:
            ref = parse_region(kind, item, settings)
        except RegionError as exc:
            skip(where, exc.code, str(exc))
            continue
        ref.where = where
        region_id = item.get("id")
        if isinstance(region_id, str) and region_id.startswith(SUGGESTED_PREFIX) and len(region_id) <= 64:
            ref.suggested = region_id  # a suggested ignore region the physician kept
        for key in dict.fromkeys(keys):
            name = key if key not in masks else f"{key}#{index}"  # several regions per label: merged at decode
            masks[name] = ref
    return AnnotationRecord(
        project=project,
        task_id=task_id,
        annotation_id=annotation_id,
        image_ref=image_ref,
        positives=positives,
        masks=masks,
        updated_at=annotation.get("updated_at"),
        attributes=attributes,
        skipped=skipped,
    )
