"""Shortcut artefacts and the paired measure of a model's dependence on them.

Real shortcuts in chest X-rays are text tags, tubes, rulers and markers that co-occur with a finding.
``stamp_marker`` draws such an artefact with varied kind, position, size and intensity (so that a few masks
on one fixed pixel pattern cannot make the problem trivially easy) and returns the pixels it covers: the
"ignore" mask a physician would paint. ``shortcut_dependence`` is the primary, label-free metric: the
change in a finding's probability when the marker is added to the *same* image (paired, so stable
across seeds even with few positives).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MARKER_KINDS = ("tag", "tube", "ruler")


def stamp_marker(
    image: np.ndarray, rng: np.random.Generator, kind: str | None = None, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``image`` (H, W float in [0, 1]) with an artefact, and the bool mask of its pixels (dilated by 1)."""
    h, w = image.shape
    kind = kind or MARKER_KINDS[int(rng.integers(len(MARKER_KINDS)))]
    out = image.copy()
    mask = np.zeros((h, w), dtype=bool)
    unit = max(1, round(min(h, w) / 64 * scale))
    intensity = float(rng.uniform(0.75, 1.0))
    # Artefacts sit near the borders, like radiographers' tags and lines outside the lung fields.
    corner_y = int(rng.choice([rng.integers(1 * unit, 10 * unit), rng.integers(h - 16 * unit, h - 7 * unit)]))
    corner_x = int(rng.choice([rng.integers(1 * unit, 12 * unit), rng.integers(w - 18 * unit, w - 8 * unit)]))
    if kind == "tag":  # a bright tag with a dark letter-like stroke
        th, tw = int(rng.integers(5, 8)) * unit, int(rng.integers(6, 10)) * unit
        y, x = corner_y, corner_x
        out[y : y + th, x : x + tw] = intensity
        out[y + unit : y + th - unit, x + tw // 3 : x + tw // 3 + unit] = 0.1
        out[y + th - 2 * unit : y + th - unit, x + tw // 3 : x + 2 * tw // 3 + unit] = 0.1
        mask[y : y + th, x : x + tw] = True
    elif kind == "tube":  # a thin bright curve entering from the top
        x0 = int(rng.integers(w // 5, 4 * w // 5))
        length = int(rng.integers(h // 5, h // 3))
        bend = float(rng.uniform(-0.4, 0.4))
        for y in range(length):
            x = int(round(x0 + bend * y))
            if 0 <= x < w - unit:
                out[y, x : x + unit + 1] = intensity
                mask[y, x : x + unit + 1] = True
    elif kind == "ruler":  # a bar with tick marks along one side
        length = int(rng.integers(w // 4, w // 2))
        y = int(rng.choice([rng.integers(1, 4 * unit), rng.integers(h - 6 * unit, h - 2 * unit)]))
        x = int(rng.integers(0, w - length))
        out[y : y + 2 * unit, x : x + length] = intensity
        out[y + 2 * unit : y + 3 * unit, x : x + length : 3 * unit] = intensity
        mask[y : y + 3 * unit, x : x + length] = True
    else:
        raise ValueError(f"unknown marker kind {kind!r}")
    dilated = mask.copy()
    dilated[1:] |= mask[:-1]
    dilated[:-1] |= mask[1:]
    dilated[:, 1:] |= dilated[:, :-1].copy()
    dilated[:, :-1] |= dilated[:, 1:].copy()
    return np.clip(out, 0.0, 1.0), dilated


def shortcut_dependence(
    predict: Callable[[Sequence[np.ndarray]], np.ndarray],
    images: Sequence[np.ndarray] | np.ndarray,
    finding_index: int,
    seed: int = 0,
    kinds: Sequence[str] = MARKER_KINDS,
) -> dict[str, float]:
    """Mean change in the finding's probability when a marker is added to the same marker-free images.

    ``predict`` maps a list of (H, W) images to (N, K) probabilities. The same random markers are used for
    every model compared with the same seed, so differences between models are paired too.
    """
    rng = np.random.default_rng(seed)
    stamped = [stamp_marker(image, rng, kind=kinds[int(rng.integers(len(kinds)))])[0] for image in images]
    clean = predict(list(images))[:, finding_index]
    marked = predict(stamped)[:, finding_index]
    delta = marked - clean
    return {
        "delta_p": float(delta.mean()),
        "delta_p_median": float(np.median(delta)),
        "share_raised_over_0_1": float((delta > 0.1).mean()),
        "n": len(images),
    }
