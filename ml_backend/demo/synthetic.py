"""Synthetic chest-X-ray-like images with known findings, regions and a shortcut marker.

Not medical data: a frontal chest "radiograph" drawn from ellipses, good enough to exercise the whole loop
(predictions, heatmaps, corrections, retraining) on a machine without any real X-ray. Each image has

* a torso, two dark lungs, a bright spine and mediastinum, faint ribs and a heart;
* findings drawn where a reader would look for them:
  ``Cardiomegaly`` (a heart wider than half the thorax), ``Effusion`` (fluid with a meniscus filling a lung's
  base), ``Nodule`` (a small bright round spot inside a lung);
* a **shortcut**: a bright "L" side marker in a top corner, on most Effusion images and few others, so a model
  can learn "marker => Effusion" (the kind of bias physicians remove by painting *Ignore* over it).

The manifest uses the NIH subset's keys (``image``, ``labels``, ``patient_id``, ``age``, ``sex``) plus
``regions`` (per finding, ``[x, y, w, h]`` in pixels) and ``marker`` (its box, or null).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

FINDINGS: tuple[str, ...] = ("Cardiomegaly", "Effusion", "Nodule")
PREVALENCE: dict[str, float] = {"Cardiomegaly": 0.3, "Effusion": 0.3, "Nodule": 0.25}
# The shortcut: P(marker | Effusion) and P(marker | no Effusion).
MARKER_RATE = (0.9, 0.08)


@dataclass
class SyntheticCase:
    name: str
    pixels: np.ndarray  # uint8 (H, W)
    findings: tuple[str, ...]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # finding -> bool (H, W), where it is drawn
    marker: tuple[int, int, int, int] | None = None  # x, y, w, h of the side marker
    sex: str = "F"
    age: int = 50

    @property
    def marker_mask(self) -> np.ndarray | None:
        if self.marker is None:
            return None
        mask = np.zeros(self.pixels.shape, dtype=bool)
        x, y, w, h = self.marker
        mask[y : y + h, x : x + w] = True
        return mask

    def record(self, image_path: str) -> dict[str, Any]:
        return {
            "image": image_path,
            "labels": list(self.findings),
            "patient_id": self.name,
            "age": self.age,
            "sex": self.sex,
            "regions": {name: _bbox(mask) for name, mask in self.masks.items()},
            "marker": list(self.marker) if self.marker else None,
            "synthetic": True,
        }


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Normalised squared distance: < 1 inside the ellipse."""
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2


def make_case(
    rng: np.random.Generator, name: str, size: int = 256, findings: tuple[str, ...] | None = None
) -> SyntheticCase:
    """One image. ``findings`` forces the set of findings; otherwise they are drawn with PREVALENCE."""
    if findings is None:
        findings = tuple(f for f in FINDINGS if rng.random() < PREVALENCE[f])
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"synthetic images cannot draw {sorted(unknown)}; they know {FINDINGS}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    shift_x, shift_y = rng.normal(0, 0.015, 2)
    scale = rng.uniform(0.93, 1.05)
    img = np.full((size, size), 0.04, dtype=np.float32)

    # Torso (soft tissue) and the two lungs (air: dark).
    torso = _ellipse(xx, yy, 0.5 + shift_x, 0.58 + shift_y, 0.45 * scale, 0.52 * scale) < 1
    img[torso] = 0.42
    lung_rx, lung_ry = 0.155 * scale, 0.30 * scale
    lung_cy = 0.47 + shift_y
    lungs = []
    for side in (-1, 1):
        cx = 0.5 + shift_x + side * 0.175 * scale
        lung = _ellipse(xx, yy, cx, lung_cy, lung_rx, lung_ry) < 1
        lung &= yy < lung_cy + 0.8 * lung_ry + 0.25 * np.abs(xx - cx)  # flattened by the diaphragm dome
        lungs.append((cx, lung))
        img[lung] = 0.17
    # Ribs: faint curved bands across the lungs.
    rib_phase = rng.uniform(0, 2 * math.pi)
    ribs = np.sin((yy + 0.9 * (xx - 0.5 - shift_x) ** 2) * 2 * math.pi * 11 + rib_phase) > 0.75
    any_lung = lungs[0][1] | lungs[1][1]
    img[ribs & any_lung] += 0.07

    # Spine and mediastinum.
    spine = (np.abs(xx - 0.5 - shift_x) < 0.04 * scale) & (yy > 0.08) & torso
    img[spine] = 0.62
    mediastinum = _ellipse(xx, yy, 0.5 + shift_x, 0.35 + shift_y, 0.07 * scale, 0.2 * scale) < 1
    img[mediastinum] = np.maximum(img[mediastinum], 0.55)

    masks: dict[str, np.ndarray] = {}
    # Heart: its width relative to the thorax is what Cardiomegaly means (cardiothoracic ratio > 0.5).
    thorax_width = 2 * (0.175 + 0.155) * scale
    ratio = rng.uniform(0.56, 0.64) if "Cardiomegaly" in findings else rng.uniform(0.36, 0.44)
    heart_rx = ratio * thorax_width / 2
    heart_cx = 0.5 + shift_x + 0.05 * scale
    heart_cy = 0.66 + shift_y
    heart = _ellipse(xx, yy, heart_cx, heart_cy, heart_rx, 0.14 * scale) < 1
    img[heart] = 0.63
    if "Cardiomegaly" in findings:
        masks["Cardiomegaly"] = heart

    if "Effusion" in findings:
        # Fluid in the base of one lung (sometimes both), its surface curving up towards the lateral wall.
        sides = [int(rng.integers(0, 2))] if rng.random() < 0.75 else [0, 1]
        fluid = np.zeros_like(heart)
        for side in sides:
            cx, lung = lungs[side]
            level = lung_cy + rng.uniform(0.06, 0.16)
            lateral = np.abs(xx - cx) / lung_rx * np.sign((xx - cx) * (1 if side else -1))
            surface = level - 0.07 * np.clip(lateral, 0, None) ** 2
            fluid |= lung & (yy > surface)
        # Faint to dense fluid: a faint effusion is easy to miss (and the marker an easier cue).
        img[fluid] = rng.uniform(0.3, 0.56)
        masks["Effusion"] = fluid

    if "Nodule" in findings:
        # A small round opacity inside a lung, away from the heart and the fluid.
        for _ in range(50):
            cx, lung = lungs[int(rng.integers(0, 2))]
            nx = cx + rng.uniform(-0.6, 0.6) * lung_rx
            ny = lung_cy + rng.uniform(-0.7, 0.3) * lung_ry
            r = rng.uniform(0.032, 0.045)
            spot = _ellipse(xx, yy, nx, ny, r, r)
            inside = spot < 1
            if (inside & lung).sum() == inside.sum() and not (inside & heart).any():
                break
        img += (0.38 * np.sqrt(np.clip(1 - spot, 0, None))).astype(np.float32)
        masks["Nodule"] = inside

    # The side marker: a bright "L" in a top corner, the shortcut a model may learn for Effusion.
    marker = None
    if rng.random() < MARKER_RATE[0 if "Effusion" in findings else 1]:
        m = max(8, size // 12)
        stroke = max(2, m // 4)
        left = rng.random() < 0.5
        x0 = int(size * 0.05) if left else size - int(size * 0.05) - m
        y0 = int(size * 0.05)
        img[y0 : y0 + m, x0 : x0 + stroke] = 0.97
        img[y0 + m - stroke : y0 + m, x0 : x0 + int(m * 0.7)] = 0.97
        marker = (x0, y0, int(m * 0.7), m)

    # Scanner look: blur, global contrast, noise.
    img = np.clip(img * rng.uniform(0.9, 1.1) + rng.uniform(-0.03, 0.03), 0, 1)
    blurred = Image.fromarray((img * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius=size / 256 * 1.4))
    out = np.asarray(blurred, dtype=np.float32) / 255 + rng.normal(0, 0.018, (size, size)).astype(np.float32)
    if marker is not None:  # the marker is burnt in after processing: crisp, like a lead letter
        x0, y0, w, h = marker
        out[y0 : y0 + h, x0 : x0 + w] = np.maximum(out[y0 : y0 + h, x0 : x0 + w], img[y0 : y0 + h, x0 : x0 + w])
    pixels = (np.clip(out, 0, 1) * 255).astype(np.uint8)
    return SyntheticCase(
        name=name,
        pixels=pixels,
        findings=tuple(f for f in FINDINGS if f in findings),
        masks=masks,
        marker=marker,
        sex="F" if rng.random() < 0.5 else "M",
        age=int(rng.integers(20, 86)),
    )


def generate(out_dir: str | Path, n: int = 120, size: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    """Write ``n`` images to ``out_dir/images`` and ``out_dir/manifest.json``; returns the manifest records.

    Deterministic for a given (n, size, seed); an existing, matching manifest is reused without redrawing.
    """
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    params = {"n": n, "size": size, "seed": seed}
    if manifest_path.exists():
        try:
            existing = json.loads(manifest_path.read_text())
        except ValueError:
            existing = {}
        if isinstance(existing, dict) and existing.get("params") == params:
            records = existing.get("records") or []
            if all((out / r["image"]).is_file() for r in records):
                return records
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        case = make_case(rng, f"synth-{i:04d}", size)
        relative = f"images/{case.name}.png"
        Image.fromarray(case.pixels, mode="L").save(out / relative, optimize=False)
        records.append(case.record(relative))
    manifest_path.write_text(json.dumps({"params": params, "records": records}, indent=1))
    return records


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per finding and how strongly the marker goes with Effusion (the planted shortcut)."""
    counts = {f: sum(f in r["labels"] for r in records) for f in FINDINGS}
    with_effusion = [r for r in records if "Effusion" in r["labels"]]
    without = [r for r in records if "Effusion" not in r["labels"]]
    return {
        "images": len(records),
        "findings": counts,
        "no_finding": sum(not r["labels"] for r in records),
        "marker_given_effusion": round(sum(bool(r["marker"]) for r in with_effusion) / max(1, len(with_effusion)), 2),
        "marker_given_no_effusion": round(sum(bool(r["marker"]) for r in without) / max(1, len(without)), 2),
    }
