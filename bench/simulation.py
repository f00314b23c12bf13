"""Shortcut experiments on a labelled image folder: the machinery shared by the mechanism test and the
simulated-physician benchmark.

A folder with a ``manifest.json`` (image, labels, patient_id, sex, age, optional ChestX-Det regions; the
layout of ../shared/data/nih1000) is loaded once; a shortcut marker is stamped on the training images of
one finding (more often for one sex); models are trained with the product's own trainer and losses and
measured with the product's own metrics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ml_backend.measure.metrics import age_bins, choose_thresholds, evaluate_version, polygon_mask
from ml_backend.measure.shortcut import MARKER_KINDS, shortcut_dependence, stamp_marker
from ml_backend.models.classifier import build_classifier, normalisation, to_input_tensor
from ml_backend.train.examples import Example, ExampleTensors, tensorise
from ml_backend.train.mask_propagation import ArtefactDetector
from ml_backend.train.trainer import TrainConfig, TrainingRun, fine_tune, heatmap_grid, predict_probabilities

DEFAULT_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Effusion", "Infiltration", "Pneumothorax")


@dataclass
class LabelledImages:
    images: np.ndarray  # (N, H, W) float32 in [0, 1]
    labels: np.ndarray  # (N, K) float32
    findings: tuple[str, ...]
    patients: np.ndarray  # (N,) str
    sex: np.ndarray  # (N,) "M"/"F"
    age: np.ndarray  # (N,) float
    regions: list[dict[int, np.ndarray]]  # per image: finding index -> bool mask (ChestX-Det polygons)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Sequence[int] | np.ndarray) -> LabelledImages:
        index = np.asarray(index)
        return LabelledImages(
            self.images[index],
            self.labels[index],
            self.findings,
            self.patients[index],
            self.sex[index],
            self.age[index],
            [self.regions[i] for i in index],
            [self.names[i] for i in index] if self.names else [],
        )


def load_manifest_folder(folder: Path, findings: Sequence[str] = DEFAULT_FINDINGS) -> LabelledImages:
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    images, labels, regions = [], [], []
    for record in manifest:
        image = np.asarray(Image.open(folder / record["image"]).convert("L"), dtype=np.float32) / 255.0
        images.append(image)
        labels.append([float(f in record["labels"]) for f in findings])
        masks: dict[int, np.ndarray] = {}
        for region in record.get("chestxdet") or []:
            if region.get("label") in findings:
                k = findings.index(region["label"])
                shape = region.get("polygon") or region.get("xyxy")
                mask = polygon_mask(shape, record.get("coord_space", 1024), (int(image.shape[0]), int(image.shape[1])))
                masks[k] = masks[k] | mask if k in masks else mask
        regions.append(masks)
    return LabelledImages(
        np.stack(images),
        np.asarray(labels, np.float32),
        tuple(findings),
        np.array([str(r["patient_id"]) for r in manifest]),
        np.array([r.get("sex", "") for r in manifest]),
        np.array([float(r.get("age", np.nan)) for r in manifest]),
        regions,
        [r["image"] for r in manifest],
    )


def patient_folds(patients: np.ndarray, k: int, seed: int, stratify_by: np.ndarray | None = None) -> list[np.ndarray]:
    """k disjoint test-index arrays; a patient's images are always in the same fold. With ``stratify_by`` (the
    images' labels), each finding's positives are spread across the folds (:func:`stratified_patient_folds`)."""
    if stratify_by is not None:
        return stratified_patient_folds(patients, stratify_by, k, seed)
    unique = np.unique(patients)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {p: i % k for i, p in zip(range(len(unique)), unique[order], strict=True)}
    assignment = np.array([fold_of[p] for p in patients])
    return [np.flatnonzero(assignment == i) for i in range(k)]


def stratified_patient_folds(patients: np.ndarray, labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint test-index arrays, a patient's images in one fold, each finding's positives spread across the
    folds as evenly as whole patients allow.

    Plain patient folds can leave most of a rare finding's positives in one fold (split 1 put 72 of the 134
    Cardiomegaly images in one fold, whose model then trained on 62: base_models_80_mixup_2splits.md), so the
    held-out AUROC measures the split as much as the recipe. sklearn's StratifiedGroupKFold stratifies one class
    per image; the class is the image's rarest positive finding (0: none), the usual multi-label reduction that
    serves rare findings first. Classes with fewer than k images are pooled into one, as the splitter asks.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    positive = np.asarray(labels) > 0
    counts = positive.sum(0)
    rarity = np.where(positive, counts[None, :], np.iinfo(np.int64).max)
    cls = np.where(positive.any(1), rarity.argmin(1) + 1, 0)
    values, per_class = np.unique(cls, return_counts=True)
    cls = np.where(np.isin(cls, values[per_class < k]), -1, cls)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [np.sort(test) for _, test in splitter.split(np.zeros(len(cls)), cls, groups=np.asarray(patients))]


@dataclass
class Shortcut:
    finding: str = "Cardiomegaly"
    p_positive_male: float = 1.0  # marker on this share of the finding's positives among men...
    p_positive_female: float = 0.8  # ...and women: a group disparity on top of the shortcut
    p_negative: float = 0.03
    kinds: tuple[str, ...] = MARKER_KINDS  # artefact kinds drawn from (one kind = the easy, fixed-pattern case)


def inject_shortcut(
    data: LabelledImages, shortcut: Shortcut, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray | None], list[str | None]]:
    """Images with markers stamped per the shortcut's rates, each image's marker mask and marker kind (None if
    none)."""
    k = data.findings.index(shortcut.finding)
    images = data.images.copy()
    masks: list[np.ndarray | None] = [None] * len(data)
    kinds: list[str | None] = [None] * len(data)
    for i in range(len(data)):
        positive = data.labels[i, k] > 0
        rate = (
            (shortcut.p_positive_male if data.sex[i] == "M" else shortcut.p_positive_female)
            if positive
            else (shortcut.p_negative)
        )
        if rng.random() < rate:
            kind = shortcut.kinds[int(rng.integers(len(shortcut.kinds)))]
            images[i], masks[i] = stamp_marker(images[i], rng, kind=kind)
            kinds[i] = kind
    return images, masks, kinds


def score_propagation(
    found: ExampleTensors,
    markers: Sequence[np.ndarray | None],
    physician_masked: set[int],
    kinds: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Mask propagation against the true markers: ``marked_found`` = share of the marked images nobody masked
    that got a mask covering at least half their marker; ``clean_masked`` = share of marker-free images masked;
    with ``kinds``, ``found_by_kind`` = ``marked_found`` per artefact kind, and ``coverage_by_kind`` = the mean
    share of the marker's pixels under the propagated mask (0 where none was given)."""
    unmasked = [i for i, m in enumerate(markers) if m is not None and i not in physician_masked]
    covered = {
        i: float((found.ignore[i, 0].numpy() > 0)[markers[i]].mean()) if bool(found.has_ignore[i]) else 0.0
        for i in unmasked
    }
    clean = [bool(found.has_ignore[i]) for i, m in enumerate(markers) if m is None]
    out: dict[str, Any] = {
        "marked_found": float(np.mean([c >= 0.5 for c in covered.values()])) if covered else None,
        "clean_masked": float(np.mean(clean)) if clean else None,
    }
    if kinds is not None:
        by_kind: dict[str, list[float]] = {}
        for i, share in covered.items():
            by_kind.setdefault(str(kinds[i]), []).append(share)
        out["found_by_kind"] = {k: float(np.mean([c >= 0.5 for c in v])) for k, v in sorted(by_kind.items())}
        out["coverage_by_kind"] = {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}
    return out


@dataclass(frozen=True)
class ModelSpec:
    backbone: str = "resnet10t"
    output_stride: int = 16
    input_size: int = 64
    scratch: TrainConfig = TrainConfig(epochs=8, batch_size=64, lr=1e-3, freeze_batchnorm=False)
    finetune: TrainConfig = TrainConfig(epochs=3, batch_size=64, lr=3e-4, freeze_batchnorm=True)


def new_model(spec: ModelSpec, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier(spec.backbone, num_classes, output_stride=spec.output_stride)


def make_tensors(
    model: torch.nn.Module,
    spec: ModelSpec,
    images: np.ndarray,
    labels: np.ndarray,
    ignore: Sequence[np.ndarray | None] | None = None,
    evidence: Sequence[dict[int, np.ndarray]] | None = None,
):
    mean, std = normalisation(model)
    grid = heatmap_grid(model, spec.input_size)
    examples = [
        Example(
            image=images[i],
            targets=labels[i],
            ignore=ignore[i] if ignore else None,
            evidence=evidence[i] if evidence else {},
        )
        for i in range(len(images))
    ]
    return tensorise(examples, labels.shape[1], spec.input_size, grid, mean, std)


def train(
    model: torch.nn.Module, tensors, config: TrainConfig, seed: int, previous_detector: ArtefactDetector | None = None
) -> TrainingRun:
    return fine_tune(model, tensors, replace(config, seed=seed), previous_detector=previous_detector)


def probabilities(model: torch.nn.Module, spec: ModelSpec, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    mean, std = normalisation(model)
    return predict_probabilities(model, to_input_tensor(list(images), spec.input_size, mean, std))


def evaluate(
    model: torch.nn.Module,
    spec: ModelSpec,
    test: LabelledImages,
    shortcut: Shortcut,
    thresholds: np.ndarray,
    seed: int,
    with_bias_metrics: bool = True,
) -> dict[str, Any]:
    """Shortcut dependence (paired), the finding's AUROC on marker-free test images, macro-F1 and EOD."""
    k = test.findings.index(shortcut.finding)
    probs = probabilities(model, spec, test.images)
    dependence = shortcut_dependence(
        lambda imgs: probabilities(model, spec, imgs), test.images, k, seed=seed, kinds=shortcut.kinds
    )
    from sklearn.metrics import roc_auc_score

    result: dict[str, Any] = {
        "delta_p": dependence["delta_p"],
        "shortcut_auroc": float(roc_auc_score(test.labels[:, k], probs[:, k]))
        if 0 < test.labels[:, k].sum() < len(test)
        else None,
        "probabilities": probs,
    }
    if with_bias_metrics:
        metrics = evaluate_version(
            test.labels,
            probs,
            test.findings,
            {"sex": test.sex, "age": age_bins(test.age)},
            thresholds=thresholds,
            cluster_ids=test.patients,
            n_boot=50,
            seed=seed,
        )
        sex_fairness = metrics["fairness"].get("sex")
        sex_shortcut = sex_fairness.get("per_finding", {}).get(shortcut.finding) if sex_fairness else None
        result.update(
            macro_f1=metrics["macro_f1"],
            macro_auroc=metrics["macro_auroc"],
            eod_sex_worst=sex_fairness.get("worst") if sex_fairness else None,
            eod_sex_shortcut=sex_shortcut.get("eod") if sex_shortcut else None,
        )
    return result


def validation_thresholds(
    model: torch.nn.Module, spec: ModelSpec, images: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    return choose_thresholds(labels, probabilities(model, spec, images))
