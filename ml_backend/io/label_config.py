"""What the backend needs from a Label Studio label config, parsed with label-studio-sdk.

Any config works that has an ``<Image>`` and a multi-label ``<Choices>`` on it (the findings). Region controls on
the same image (BrushLabels, RectangleLabels, PolygonLabels, BitmaskLabels) give evidence (a label named like a
finding) or "never look here" regions (an ignore label: declared, or named like a marker/tube/text); every other
control (a single-choice quality rating, a TextArea, ...) is left alone, except that a ``<TextArea
name="model_summary">`` on the image receives the model's read-only summary. :func:`describe_label_mapping` says
how each label was read, so a project can check it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

# Choices that mean "nothing found" are answers, not model outputs.
_NO_FINDING = re.compile(r"^\s*(no[ _-]?finding|normal|none)\s*$", re.IGNORECASE)
# Words that name things a model must not depend on (whole words, any case): "Artifact", "Ignore (marker, tube,
# text)", "ECG lead", "Chest tube", "Burned-in text"... A label that is also a finding stays a finding.
IGNORE_WORDS = (
    "ignore",
    "ignored",
    "artifact",
    "artifacts",
    "artefact",
    "artefacts",
    "marker",
    "markers",
    "device",
    "devices",
    "tube",
    "tubes",
    "line",
    "lines",
    "catheter",
    "catheters",
    "wire",
    "wires",
    "drain",
    "drains",
    "text",
    "ruler",
    "rulers",
    "exclude",
    "excluded",
    "pacemaker",
    "pacemakers",
    "electrode",
    "electrodes",
    "lead",
    "leads",
    "clip",
    "clips",
    "stent",
    "stents",
    "implant",
    "implants",
    "hardware",
    "annotation",
    "burned-in",
)
_IGNORE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in IGNORE_WORDS) + r")(?![\w-])", re.IGNORECASE)
REGION_TAGS = ("brushlabels", "rectanglelabels", "polygonlabels", "bitmasklabels")
# A <TextArea> of this name on the image is filled by the backend with every finding's probability and, on ranked
# tasks, why the task is in the review queue (ml_backend/inference/summary.py); never read for training.
SUMMARY_CONTROL = "model_summary"


class LabelConfigError(ValueError):
    """The label config cannot drive this backend (no multi-label Choices on an Image, or unparsable)."""


@dataclass(frozen=True)
class RegionControl:
    """One region control on the project's image: its name, kind (a REGION_TAGS entry) and labels."""

    name: str
    tag: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ProjectSchema:
    image_name: str
    image_value_key: str  # key in task["data"] holding the image reference
    choices_name: str
    findings: tuple[str, ...]
    no_finding_label: str | None
    brush_name: str | None
    brush_labels: tuple[str, ...]
    ignore_label: str | None
    bitmask_name: str | None = None
    bitmask_labels: tuple[str, ...] = ()
    region_controls: tuple[RegionControl, ...] = ()  # every region control on the image, brush first
    ignore_labels: tuple[str, ...] = ()  # region labels read as "never look here"
    other_controls: tuple[tuple[str, str], ...] = ()  # (tag, name) of controls this backend leaves alone
    summary_name: str | None = None  # the read-only TextArea the model's summary goes to (SUMMARY_CONTROL)

    @property
    def evidence_labels(self) -> tuple[str, ...]:
        """Brush labels that carry evidence for a finding (brush label == finding name)."""
        return tuple(label for label in self.brush_labels if label in self.findings)

    def region_control(self, name: Any) -> RegionControl | None:
        return next((c for c in self.region_controls if c.name == name), None)

    def region_role(self, label: str) -> str:
        """'finding' (evidence for that finding), 'ignore' or 'unused' for a region label."""
        if label in self.ignore_labels:
            return "ignore"
        return "finding" if label in self.findings else "unused"


def parse_ignore_labels(value: Any) -> tuple[str, ...]:
    """Ignore labels declared by a user: a list, a JSON list, or a string separated by '|' (label names may
    contain commas, e.g. "Ignore (marker, tube, text)"); empty entries dropped."""
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                value = text.split("|")
        else:
            value = text.split("|")
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(dict.fromkeys(str(v).strip() for v in value if isinstance(v, str) and v.strip()))


def ignore_labels_from_extra_params(extra_params: Any) -> tuple[str, ...]:
    """``ignore_labels`` from the ML backend's "Extra params" in Label Studio (sent to /setup as a JSON object,
    or a JSON string); () when absent or unreadable (extra params are free text: never an error)."""
    if isinstance(extra_params, str):
        try:
            extra_params = json.loads(extra_params)
        except ValueError:
            return ()
    if not isinstance(extra_params, dict):
        return ()
    return parse_ignore_labels(extra_params.get("ignore_labels", extra_params.get("IGNORE_LABELS")))


def parse_label_config(config: str, ignore_labels: Iterable[str] = ()) -> ProjectSchema:
    """The schema of ``config``; ``ignore_labels`` are region labels declared "never look here" on top of those
    recognised by name (Settings.ignore_labels, the project's extra params)."""
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("label config is empty")
    return _parse_cached(config, tuple(sorted(set(ignore_labels))))


@lru_cache(maxsize=64)
def _parse_cached(config: str, declared_ignore: tuple[str, ...]) -> ProjectSchema:
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises a variety of lxml/XML errors
        raise LabelConfigError(f"label config is not valid XML: {exc}") from exc

    images = {obj.name: obj for obj in interface.objects if obj.tag.lower() == "image"}
    if not images:
        raise LabelConfigError("label config has no <Image> tag")
    choices = [
        control
        for control in interface.controls
        if control.tag.lower() == "choices"
        and str(control.attr.get("choice", "")).lower() == "multiple"
        and any(name in images for name in control.to_name)
    ]
    if not choices:
        raise LabelConfigError(
            'label config has no <Choices choice="multiple"> bound to an <Image>: the findings come from it'
        )
    # Several multi-label Choices: the findings are the longest list (a second one is e.g. "view: PA, AP").
    choice_control = max(choices, key=lambda c: len(c.labels))
    image = images[next(name for name in choice_control.to_name if name in images)]
    findings = tuple(label for label in choice_control.labels if not _NO_FINDING.match(label))
    if not findings:
        raise LabelConfigError(f"<Choices name={choice_control.name!r}> lists no findings")
    no_finding = next((label for label in choice_control.labels if _NO_FINDING.match(label)), None)

    regions = [
        RegionControl(control.name, control.tag.lower(), tuple(control.labels))
        for control in interface.controls
        if control.tag.lower() in REGION_TAGS and image.name in control.to_name
    ]
    regions.sort(key=lambda c: REGION_TAGS.index(c.tag))  # stable: config order within a kind
    region_labels = [label for control in regions for label in control.labels]
    ignore = tuple(
        dict.fromkeys(
            label
            for label in region_labels
            if label in declared_ignore or (label not in findings and _IGNORE.search(label))
        )
    )

    def first(tag: str) -> RegionControl | None:
        # the control heatmaps are predicted into: the first of its kind that names a finding
        kind = [c for c in regions if c.tag == tag]
        return next((c for c in kind if set(c.labels) & set(findings)), kind[0] if kind else None)

    brush, bitmask = first("brushlabels"), first("bitmasklabels")
    brush_labels = brush.labels if brush else ()
    others = tuple(
        (control.tag, control.name)
        for control in interface.controls
        if control is not choice_control and control.name not in {c.name for c in regions}
    )
    summary = next(
        (
            control.name
            for control in interface.controls
            if control.tag.lower() == "textarea" and control.name == SUMMARY_CONTROL and image.name in control.to_name
        ),
        None,
    )
    value = str(image.value or "")
    return ProjectSchema(
        image_name=image.name,
        image_value_key=value[1:] if value.startswith("$") else value,
        choices_name=choice_control.name,
        findings=findings,
        no_finding_label=no_finding,
        brush_name=brush.name if brush else None,
        brush_labels=brush_labels,
        ignore_label=next(  # the first brush ignore label, as before (any brush control)
            (label for c in regions if c.tag == "brushlabels" for label in c.labels if label in ignore), None
        ),
        bitmask_name=bitmask.name if bitmask else None,
        bitmask_labels=bitmask.labels if bitmask else (),
        region_controls=tuple(regions),
        ignore_labels=ignore,
        other_controls=others,
        summary_name=summary,
    )


def describe_label_mapping(schema: ProjectSchema) -> list[dict[str, str]]:
    """How every label and control of the config was read: one row per (control, label) with ``role``
    'finding', 'no finding', 'evidence', 'ignore' or 'not used' (and why), for /setup's log."""
    rows = [
        {
            "control": schema.choices_name,
            "tag": "choices",
            "label": label,
            "role": "finding",
            "why": "a choice of the findings control",
        }
        for label in schema.findings
    ]
    if schema.no_finding_label:
        rows.append(
            {
                "control": schema.choices_name,
                "tag": "choices",
                "label": schema.no_finding_label,
                "role": "no finding",
                "why": "means no finding is present",
            }
        )
    for control in schema.region_controls:
        for label in control.labels:
            role = schema.region_role(label)
            why = {
                "finding": "names a finding: its regions are the evidence for it",
                "ignore": "an ignore label: the model must not depend on these pixels",
                "unused": "neither a finding nor an ignore label (declare it in IGNORE_LABELS or the "
                "project's extra params 'ignore_labels' to use it)",
            }[role]
            rows.append(
                {
                    "control": control.name,
                    "tag": control.tag,
                    "label": label,
                    "role": {"finding": "evidence", "ignore": "ignore", "unused": "not used"}[role],
                    "why": why,
                }
            )
    for tag, name in schema.other_controls:
        if name == schema.summary_name:
            why = "filled by the model: every finding's probability and the review reason; not read"
            rows.append({"control": name, "tag": tag.lower(), "label": "", "role": "model summary", "why": why})
            continue
        rows.append({"control": name, "tag": tag.lower(), "label": "", "role": "not used", "why": "not read"})
    return rows


def format_label_mapping(schema: ProjectSchema) -> str:
    """:func:`describe_label_mapping` as one log line per control."""
    by_control: dict[str, list[str]] = {}
    for row in describe_label_mapping(schema):
        entry = f"{row['label']!r}: {row['role']}" if row["label"] else row["role"]
        by_control.setdefault(f"{row['tag']} {row['control']!r}", []).append(entry)
    return "; ".join(f"{control} -> {', '.join(entries)}" for control, entries in by_control.items())
