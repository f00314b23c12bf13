"""Find, in the images nobody masked, the artefacts physicians marked "never look here" on a few others.

A physician paints the text tag or the chest drain on some images, not on all: the unmasked copies keep
teaching the shortcut. With masks on 10-25% of the marked images, the counterfactual rows and the gradient
penalty left a third of the dependence (bench/results/mechanism.md, rows ``both``). Here the marked pixels
train a per-location artefact detector on the live model's own features; the regions it finds in unmasked
images become ignore masks for this job's training (never for the physicians' data), so every copy of the
artefact is removed or penalised, not only the painted ones. Measured (5 folds): with masks on 10% of the
tagged images it finds 99.7% of the other tags and masks 1.6% of tag-free images, and the dependence goes
(ΔP 0.56 labels only, 0.23 without propagation, -0.01 with it).

Detector: logistic regression (scikit-learn) on hypercolumns, the model's intermediate feature maps of
strides 2-16 (timm ``forward_intermediates``, any backbone) brought to the stride-4 grid; with
``experts`` > 1, one regression per k-means cluster of the masked cells, a cell scoring its best one. Cells under a
physician's mask are positives; the other cells of those images, a margin around the mask left out, are
negatives, so every fitted example has a known label. The threshold comes from images held out of the fit
(grouped folds): at most ``false_cells_per_image`` held-out negative cells per image above it, and never
below ``min_threshold``. If it then finds the artefact on under half the held-out masked images (a barely
trained model's features), nothing is propagated. A component must be at least ``min_cells`` cells big, and a mask over
``max_area`` of the image is dropped (a half-film mask is not an artefact). Unmasked images as extra
(PU-style) negatives were tried: fewer false masks on some folds, more on others, lower recall on tags.
No library does mask propagation for brush labels; the pieces are scikit-learn's and timm's.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler
from torch import nn

from ml_backend.models.classifier import timm_api
from ml_backend.train.examples import ExampleTensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PropagationConfig:
    min_masked_images: int = 3  # fewer physician masks than this: nothing to learn the artefact from
    min_cells: int = 2  # smallest component kept, in stride-4 cells
    margin_cells: int = 1  # cells around a mask left out of the negatives
    false_cells_per_image: float = 0.5  # held-out negative cells per image allowed over the threshold
    min_heldout_images_found: float = 0.5  # share of held-out masked images found; below it the features do not know it
    grow_cells: int = 1  # cells added around each found component: an artefact's edge straddles cells
    max_area: float = 0.15  # largest propagated mask, as a share of the image
    negatives_per_image: int = 256  # negative cells sampled per masked image for the fit
    min_threshold: float = 0.5  # lowest cell probability that counts as the artefact
    # Linear detectors, one per cluster of the positive cells (k-means); a cell scores its best expert. Kinds of
    # artefact that look nothing alike (a tag, a tube, a ruler) are not one half-space of the features: with one
    # expert the commonest kind sets the boundary and a kind with ~3 masks is missed (mechanism_mixed_10.md).
    # Detection only, 6 seeds (bench/results/detector_mixed_10.md): 2 experts found 82% of the unmasked mixed
    # artefacts against 66%, mostly by not declining where one did, with twice the false masks (6.6% vs 3.0%).
    # Fine-tuned, with every unmasked image given a pasted artefact (LossConfig.artefact_paste_rate), the mixed
    # shortcut went to the clean model's level (bench/results/mechanism_mixed_10_cpu_new_default.md).
    experts: int = 2
    min_rows_per_expert: int = 8  # positive cells each expert needs; fewer positives mean fewer experts
    batch_size: int = 64


@dataclass
class PropagationReport:
    masked_images: int  # physician-masked images the detector learnt from
    threshold: float | None  # probability a cell must exceed
    heldout_cell_recall: float | None  # share of held-out positive cells found at that threshold
    propagated: int  # unmasked images that received a mask
    searched: int  # unmasked images searched
    skipped: str = ""  # why nothing was propagated, if so
    heldout_images: int = 0  # masked images with a positive cell, each scored by a fit that did not see it
    heldout_images_seen: int = 0  # of those, the ones with at least one positive cell over the threshold
    seconds: float = 0.0
    rejected_images: int = 0  # images whose suggested ignore regions physicians deleted: negatives for the fit
    rejected_cells: int = 0
    detector_from: str = ""  # "fit": this run's fit; "previous": a detector passed in, kept when the fit declined
    detector: ArtefactDetector | None = field(default=None, repr=False)  # saved with the version (suggestions)

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "detector"}


@dataclass(frozen=True)
class ArtefactDetector:
    """The fitted detector as plain arrays (standardised logistic regressions on hypercolumns, one per expert;
    a cell's probability is its best expert's), saved with the version so the ranking job can suggest ignore
    regions on unlabelled tasks (train/suggestions.py)."""

    mean: np.ndarray  # (C,)
    scale: np.ndarray  # (C,)
    coef: np.ndarray  # (E, C)
    intercept: np.ndarray  # (E,)
    threshold: float

    def __post_init__(self) -> None:  # a file saved before experts holds one (C,) row and a scalar
        object.__setattr__(self, "coef", np.atleast_2d(np.asarray(self.coef, dtype=np.float64)))
        object.__setattr__(self, "intercept", np.atleast_1d(np.asarray(self.intercept, dtype=np.float64)))

    @classmethod
    def from_fitted(cls, fitted: _Experts, threshold: float) -> ArtefactDetector:
        return cls(
            np.asarray(fitted.scaler.mean_, dtype=np.float64),
            np.asarray(fitted.scaler.scale_, dtype=np.float64),
            np.stack([np.asarray(r.coef_[0], dtype=np.float64) for r in fitted.regressions]),
            np.array([float(r.intercept_[0]) for r in fitted.regressions]),
            threshold,
        )

    def probabilities(self, cells: np.ndarray) -> np.ndarray:
        """(M,) artefact probability of (M, C) hypercolumn cells."""
        z = ((cells - self.mean) / self.scale) @ self.coef.T + self.intercept
        return (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))).max(axis=1)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept, t=self.threshold)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, payload: bytes) -> ArtefactDetector:
        with np.load(io.BytesIO(payload), allow_pickle=False) as f:
            return cls(f["mean"], f["scale"], f["coef"], f["intercept"], float(f["t"]))


@dataclass(frozen=True)
class _Experts:
    scaler: StandardScaler
    regressions: list[LogisticRegression]

    def predict(self, rows: np.ndarray) -> np.ndarray:
        z = self.scaler.transform(rows)
        return np.max([r.predict_proba(z)[:, 1] for r in self.regressions], axis=0)


def _stages(model: nn.Module, input_size: int) -> list[tuple[int, int]]:
    """(index, stride) of the feature stages of stride 2 to 16: fine enough for a small tag or a ruler's ticks,
    deep enough to know it. Empty for a model without timm's ``feature_info`` / ``forward_intermediates`` or
    without a stride-4..16 stage (the grid the detector works on)."""
    info = getattr(model, "feature_info", None)
    if info is None or not hasattr(model, "forward_intermediates"):
        return []
    stages = [
        (i, int(f["reduction"]))
        for i, f in enumerate(info)
        if 2 <= f["reduction"] <= 16 and input_size // f["reduction"] >= 2
    ]
    return stages if any(stride >= 4 for _, stride in stages) else []


@torch.no_grad()
def hypercolumns(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, C, S/4, S/4) features: the chosen stages' maps on the stride-4 grid, concatenated. A stride-2 stem map
    is max-pooled onto it (a thin ruler tick survives a max, not an average); coarser maps are upsampled."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stages = _stages(model, images.shape[-1])
    if not stages:
        raise ValueError("hypercolumns need a timm model with forward_intermediates and stride-4..16 stages")
    finest = next(n for n, (_, stride) in enumerate(stages) if stride >= 4)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        maps = timm_api(model).forward_intermediates(batch, indices=[i for i, _ in stages], intermediates_only=True)
        grid = tuple(maps[finest].shape[-2:])
        on_grid = [
            F.adaptive_max_pool2d(m, grid)
            if m.shape[-1] > grid[-1]
            else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in maps
        ]
        out.append(torch.cat(on_grid, 1).cpu())
    model.train(was_training)
    return torch.cat(out)


# Connectivity within each image of an (N, h, w) stack, never across images: ndimage's default 2-D cross.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _artefact_cells(prob: np.ndarray, threshold: float, config: PropagationConfig) -> np.ndarray:
    """(N, h, w) bool: per image, the components over ``threshold`` of at least ``min_cells`` cells, grown by
    ``grow_cells``; empty where they would cover over ``max_area``."""
    components, _ = ndimage.label(prob > threshold, structure=_IN_PLANE)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = sizes[components] >= config.min_cells
    keep[keep.mean(axis=(1, 2)) > config.max_area] = False
    if config.grow_cells <= 0:  # scipy dilates until nothing changes when iterations < 1
        return keep
    return ndimage.binary_dilation(keep, structure=_IN_PLANE, iterations=config.grow_cells)


def _fit(features: np.ndarray, labels: np.ndarray, config: PropagationConfig, seed: int) -> _Experts:
    """Standardise, cluster the positive cells into up to ``config.experts`` groups, and fit one balanced
    logistic regression per group against every negative cell."""
    scaler = StandardScaler().fit(features)
    z = scaler.transform(features)
    positive = np.flatnonzero(labels == 1)
    negative = np.flatnonzero(labels != 1)
    k = max(1, min(config.experts, len(positive) // max(config.min_rows_per_expert, 1)))
    groups = [positive]
    if k > 1:
        assignment = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(z[positive])
        groups = [positive[assignment == c] for c in range(k) if (assignment == c).any()]
    regressions = [
        LogisticRegression(C=0.1, class_weight="balanced", max_iter=500).fit(
            z[np.concatenate([negative, group])], labels[np.concatenate([negative, group])]
        )
        for group in groups
    ]
    return _Experts(scaler, regressions)


def propagate_ignore_masks(
    model: nn.Module,
    data: ExampleTensors,
    config: PropagationConfig | None = None,
    seed: int = 0,
    rejected: tuple[torch.Tensor, torch.Tensor] | None = None,
    previous: ArtefactDetector | None = None,
) -> tuple[ExampleTensors, PropagationReport]:
    """``data`` with ignore masks added where the detector finds a physician-marked artefact, and a report.

    ``rejected``: (images (R, 3, S, S), masks (R, 1, S, S)) of suggested ignore regions physicians deleted; the
    cells under them are negatives for the fit and for the threshold (the detector learns it was wrong there).
    ``previous``: a detector an earlier run accepted. Where this run's fit fails its held-out gate, the previous
    one is used instead if it passes the same tests on this model's features: it finds the share of the masked
    images the gate asks for, with no more false cells than the threshold allows. Without it, a declined round
    trains on the painted masks alone and the shortcut can come back (rank_ablation_fold4_propagation_probe.md)."""
    started = time.perf_counter()
    data, report = _propagate(model, data, config or PropagationConfig(), seed, rejected, previous)
    report.seconds = time.perf_counter() - started
    log.info("mask propagation: %s", report.to_json())
    return data, report


def _rejected_cells(
    model: nn.Module, rejected: tuple[torch.Tensor, torch.Tensor], config: PropagationConfig, first_group: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Hypercolumn rows under deleted suggestions (label 0), each image its own group."""
    images, masks = rejected
    rows, labels, groups = [], [], []
    for start in range(0, len(images), config.batch_size):
        feats = hypercolumns(model, images[start : start + config.batch_size], config.batch_size)
        grid = (int(feats.shape[-2]), int(feats.shape[-1]))
        share = F.adaptive_avg_pool2d(masks[start : start + config.batch_size].float(), grid)[:, 0].numpy()
        for j in range(len(feats)):
            cells = np.flatnonzero(share[j].ravel() >= 0.5)
            rows.append(feats[j].flatten(1).T.numpy()[cells])
            labels.append(np.zeros(len(cells), dtype=np.int64))
            groups.append(np.full(len(cells), first_group + start + j))
    return rows, labels, groups


def _propagate(
    model: nn.Module,
    data: ExampleTensors,
    config: PropagationConfig,
    seed: int,
    rejected: tuple[torch.Tensor, torch.Tensor] | None = None,
    previous: ArtefactDetector | None = None,
) -> tuple[ExampleTensors, PropagationReport]:
    masked = data.has_ignore.nonzero()[:, 0]
    unmasked = (~data.has_ignore).nonzero()[:, 0]
    report = PropagationReport(len(masked), None, None, 0, len(unmasked))
    if len(masked) < config.min_masked_images:
        report.skipped = f"{len(masked)} masked images (< {config.min_masked_images})"
        return data, report
    # Every image masked: nothing to propagate here, but the detector is still fitted, for suggestions on the
    # project's unlabelled tasks (train/suggestions.py).
    size = data.images.shape[-1]
    if not _stages(model, size):
        report.skipped = "the backbone has no timm forward_intermediates with stride-4..16 stages"
        return data, report

    rng = np.random.default_rng(seed)
    rows, labels, groups = [], [], []
    for start in range(0, len(masked), config.batch_size):  # batch by batch: hypercolumns are large at 224 px
        index = masked[start : start + config.batch_size]
        feats = hypercolumns(model, data.images[index], config.batch_size)  # (B, C, h, w)
        grid = (int(feats.shape[-2]), int(feats.shape[-1]))
        share = F.adaptive_avg_pool2d(data.ignore[index], grid)[:, 0].numpy()  # share of each cell masked
        for j in range(len(index)):
            cells = feats[j].flatten(1).T.numpy()  # (h*w, C)
            positive = np.flatnonzero(share[j].ravel() >= 0.5)
            # Cells next to the mask see the artefact through their receptive field: neither label is sure.
            near = ndimage.binary_dilation(share[j] > 0, iterations=config.margin_cells).ravel()
            negative = np.flatnonzero(~near)
            negative = rng.choice(negative, size=min(len(negative), config.negatives_per_image), replace=False)
            for cell_index, label in ((positive, 1), (negative, 0)):
                rows.append(cells[cell_index])
                labels.append(np.full(len(cell_index), label))
                groups.append(np.full(len(cell_index), start + j))
    if rejected is not None and len(rejected[0]):
        more = _rejected_cells(model, rejected, config, first_group=len(masked))
        rows, labels, groups = rows + more[0], labels + more[1], groups + more[2]
        report.rejected_images = len(rejected[0])
        report.rejected_cells = int(sum(len(r) for r in more[0]))
    x, y, g = np.concatenate(rows), np.concatenate(labels), np.concatenate(groups)
    if y.sum() == 0:
        report.skipped = "masks smaller than a feature cell"
        return data, report

    # Threshold from images the detector did not see: at most ``false_cells_per_image`` negative cells of an
    # image over it (before the component-size filter), and at least ``min_threshold``.
    folds = GroupKFold(n_splits=min(5, len(masked)))
    heldout = np.zeros(len(y))
    for fit_rows, test_rows in folds.split(x, y, g):
        if y[fit_rows].min() == y[fit_rows].max():
            heldout[test_rows] = 0.0
            continue
        heldout[test_rows] = _fit(x[fit_rows], y[fit_rows], config, seed).predict(x[test_rows])
    quantile = 1.0 - config.false_cells_per_image / (grid[0] * grid[1])
    threshold = float(max(config.min_threshold, np.quantile(heldout[y == 0], quantile)))
    report.threshold = threshold
    report.heldout_cell_recall = float((heldout[y == 1] > threshold).mean())
    # The gate counts images, not cells: one cell over the threshold is enough for the component (dilated by a
    # cell) to cover a small tag, while a long tube's cell recall can be low on an image it does find. With the
    # pooled cell-recall gate, mixed artefacts at 10% masks declined in two of four seeds
    # (bench/results/mechanism_mixed.md: found 0.38 +/- 0.45).
    seen, total, passes = _image_gate(heldout > threshold, y, g, config)
    report.heldout_images, report.heldout_images_seen = total, seen
    score: Callable[[np.ndarray], np.ndarray]
    if not passes:  # e.g. a barely trained model: noise
        declined = (
            f"the detector finds {seen} of {total} held-out masked images "
            f"({report.heldout_cell_recall:.0%} of their artefact cells)"
        )
        kept, over, why_not = _previous_passes(previous, x, y, g, config, quantile)
        if kept is None or over is None:
            report.skipped = declined + (f"; {why_not}" if why_not else "")
            return data, report
        threshold, score = kept.threshold, kept.probabilities
        report.threshold, report.detector, report.detector_from = threshold, kept, "previous"
        # the kept detector's recall on all masked images (partly in sample for it: see _previous_passes)
        report.heldout_cell_recall = float(over[y == 1].mean())
        report.heldout_images_seen = _image_gate(over, y, g, config)[0]
    else:
        fitted = _fit(x, y, config, seed)
        score, report.detector, report.detector_from = (
            fitted.predict,
            ArtefactDetector.from_fitted(fitted, threshold),
            "fit",
        )

    ignore = data.ignore.clone()
    has_ignore = data.has_ignore.clone()
    for start in range(0, len(unmasked), config.batch_size):
        index = unmasked[start : start + config.batch_size]
        f = hypercolumns(model, data.images[index], config.batch_size)
        n, c, h, w = f.shape
        prob = score(f.permute(0, 2, 3, 1).reshape(-1, c).numpy()).reshape(n, h, w)
        cells = _artefact_cells(prob, threshold, config)
        found = cells.any(axis=(1, 2))
        if found.any():
            pixels = torch.from_numpy(cells[found].astype(np.float32))[:, None]
            ignore[index[found]] = F.interpolate(pixels, size=(size, size))
            has_ignore[index[found]] = True
            report.propagated += int(found.sum())
    return replace(data, ignore=ignore, has_ignore=has_ignore), report


def _image_gate(over: np.ndarray, y: np.ndarray, g: np.ndarray, config: PropagationConfig) -> tuple[int, int, bool]:
    """(masked images with an artefact cell over the threshold, masked images, whether that share passes the
    gate). ``over``: per feature row, whether it is over the threshold; ``g``: the image of each row."""
    seen = len(np.unique(g[(y == 1) & over]))
    total = len(np.unique(g[y == 1]))
    return seen, total, seen >= config.min_heldout_images_found * total


def _previous_passes(
    previous: ArtefactDetector | None,
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    config: PropagationConfig,
    quantile: float,
) -> tuple[ArtefactDetector | None, np.ndarray | None, str]:
    """(``previous``, which rows it puts over its threshold, "") when, on this model's features, it finds at least
    the gate's share of the masked images and no more of the negative cells over its threshold than this run's
    threshold allows (1 - ``quantile``); else (None, None, why). The features move with each fine-tuning, so an
    earlier detector is tested, never trusted. The test is only partly held out (the masks painted since it was
    fitted are new to it, the older ones are not), and the negative cells it is held to include those under
    suggestions physicians deleted."""
    if previous is None:
        return None, None, ""
    channels = x.shape[1]
    if not (previous.mean.shape == previous.scale.shape == (channels,) and previous.coef.shape[1] == channels):
        return None, None, "the previous detector was fitted on other features"
    over = previous.probabilities(x) > previous.threshold
    seen, total, passes = _image_gate(over, y, g, config)
    if not passes:
        return None, None, f"the previous detector finds {seen} of {total}"
    false_share = float(over[y == 0].mean()) if (y == 0).any() else 0.0
    if false_share > 1.0 - quantile:
        return None, None, f"the previous detector marks {false_share:.1%} of the negative cells"
    return previous, over, ""
