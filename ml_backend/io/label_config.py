"""What the backend needs from a Label Studio label config, parsed with label-studio-sdk."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from label_studio_sdk.label_interface import LabelInterface

# Choices that mean "nothing found" are answers, not model outputs.
_NO_FINDING = re.compile(r"^\s*(no[ _-]?finding|normal|none)\s*$", re.IGNORECASE)
# A brush label whose name starts with "Ignore" marks pixels the model must not depend on.
_IGNORE = re.compile(r"^\s*ignore", re.IGNORECASE)


class LabelConfigError(ValueError):
    """The label config cannot drive this backend (no multi-label Choices on an Image, or unparsable)."""


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

    @property
    def evidence_labels(self) -> tuple[str, ...]:
        """Brush labels that carry evidence for a finding (brush label == finding name)."""
        return tuple(label for label in self.brush_labels if label in self.findings)


def parse_label_config(config: str) -> ProjectSchema:
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("label config is empty")
    return _parse_cached(config)


@lru_cache(maxsize=64)
def _parse_cached(config: str) -> ProjectSchema:
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
    choice_control = choices[0]
    image = images[next(name for name in choice_control.to_name if name in images)]
    findings = tuple(label for label in choice_control.labels if not _NO_FINDING.match(label))
    if not findings:
        raise LabelConfigError(f"<Choices name={choice_control.name!r}> lists no findings")
    no_finding = next((label for label in choice_control.labels if _NO_FINDING.match(label)), None)

    brushes = [
        control
        for control in interface.controls
        if control.tag.lower() == "brushlabels" and image.name in control.to_name
    ]
    brush = brushes[0] if brushes else None
    brush_labels = tuple(brush.labels) if brush else ()
    ignore = next((label for label in brush_labels if _IGNORE.match(label)), None)
    value = str(image.value or "")
    return ProjectSchema(
        image_name=image.name,
        image_value_key=value[1:] if value.startswith("$") else value,
        choices_name=choice_control.name,
        findings=findings,
        no_finding_label=no_finding,
        brush_name=brush.name if brush else None,
        brush_labels=brush_labels,
        ignore_label=ignore,
    )
