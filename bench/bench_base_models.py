"""Credible base models (issue 16, part 1): how good is the marker-free "clean" model the benchmarks build on?

Data: ../shared/data/nih1000 (64 px) and ../shared/data/nih_hires (128 px, resized to the input size), read in
place, 14 NIH findings, k-fold cross-validation split by patient across both sets (17 patients are in both).
Recipe: a small CNN from scratch (timm backbone via the product's classifier), BCE, AdamW with a one-cycle
cosine schedule, light augmentation (random shift/scale crop, small brightness/contrast jitter; no horizontal
flip unless --hflip: the heart is on the left). Every image gets one held-out prediction; AUROC is computed on
the pooled held-out predictions, per finding, and per source where it matters.

Targets (issue 16): Cardiomegaly AUROC >= 0.78, Effusion >= 0.75, macro AUROC >= 0.72 over the findings with
>= 50 positives. The script exits non-zero with a clear message when the recipe falls short.

Which patients share a fold moves these figures a lot (Cardiomegaly's 134 positive images come from 66
patients): ``--split-seeds 0 1`` repeats the cross-validation on a second patient split and checks the targets on
the mean over the splits; the results also give 95% patient-bootstrap intervals.

Run: ``.venv/bin/python bench/bench_base_models.py --threads 2 --resume`` (per-fold results are cached in
bench/results/.base_models_cache/ so an interrupted run resumes); ``--quick`` for a pipeline smoke run. On two
cores, run one split per process (``--split-seeds 1 --threads 1``), then ``--split-seeds 0 1 --resume`` summarises.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.utils import ModelEmaV3

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import simulation as sim  # noqa: E402

from ml_backend.measure.metrics import polygon_mask  # noqa: E402
from ml_backend.models.classifier import build_classifier, normalisation, to_input_tensor  # noqa: E402
from ml_backend.train.losses import LossConfig, positive_weights, prediction_loss  # noqa: E402
from ml_backend.train.trainer import predict_probabilities  # noqa: E402

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
TARGETS = {"Cardiomegaly": 0.78, "Effusion": 0.75, "macro": 0.72}
MIN_POSITIVES = 50
SOURCES = {"nih1000": ("nih1000", "."), "nih_hires": ("nih_hires", "images_128")}


def standardise(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit std per image, mapped so that the model's ImageNet normalisation gives ~N(0, 1) again."""
    z = (image - image.mean()) / max(float(image.std()), 1e-6)
    return (z * 0.229 + 0.485).astype(np.float32)


def load(size: int, sets: list[str], norm: str = "none") -> dict:
    """``norm``: "none" (pixels / 255), "image" (per-image standardisation) or "equalize" (histogram
    equalisation at the stored resolution, before resizing): both remove per-source brightness/contrast."""
    images, labels, patients, sexes, ages, sources = [], [], [], [], [], []
    for name in sets:
        folder, sub = SOURCES[name]
        root = common.SHARED / folder
        for record in json.loads((root / "manifest.json").read_text()):
            img = Image.open(root / sub / record["image"]).convert("L")
            if norm == "equalize":
                img = ImageOps.equalize(img)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(img, dtype=np.float32) / 255.0
            images.append(standardise(array) if norm == "image" else array)
            labels.append([float(f in record["labels"]) for f in FINDINGS])
            patients.append(str(record["patient_id"]))
            sexes.append(record.get("sex", ""))
            ages.append(float(record.get("age") or np.nan))
            sources.append(name if name == "nih1000" else "nih_hires:" + record.get("source", "").split("@")[0])
    return {
        "images": np.stack(images),
        "labels": np.asarray(labels, np.float32),
        "patients": np.array(patients),
        "sex": np.array(sexes),
        "age": np.array(ages),
        "source": np.array(sources),
    }


def evidence_regions(size: int, sets: list[str]) -> list[dict[int, np.ndarray]]:
    """Per image (same order as load), evidence masks by finding index from ChestX-Det and NIH boxes."""
    out = []
    aliases = {"Infiltrate": "Infiltration"}
    for name in sets:
        folder, _ = SOURCES[name]
        for record in json.loads((common.SHARED / folder / "manifest.json").read_text()):
            masks: dict[int, np.ndarray] = {}
            for region in (record.get("chestxdet") or []) + (record.get("nih_boxes") or []):
                label = aliases.get(region.get("label"), region.get("label"))
                if label not in FINDINGS:
                    continue
                k = FINDINGS.index(label)
                mask = polygon_mask(region.get("polygon") or region["xyxy"], record.get("coord_space", 1024), size)
                masks[k] = masks[k] | mask if k in masks else mask
            out.append(masks)
    return out


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine (scale 0.9-1.1, shift +-6%, rotation +-5 deg) and brightness/contrast jitter, per image."""
    n = x.shape[0]
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)  # noqa: E731
    scale, angle = r(0.9, 1.1), r(-5, 5) * np.pi / 180
    tx, ty = r(-0.06, 0.06), r(-0.06, 0.06)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    contrast, bright = r(0.85, 1.15)[:, None, None, None], r(-0.15, 0.15)[:, None, None, None]
    return out * contrast.to(x.device) + bright.to(x.device)


# deterministic test-time views: the identity plus the mildest of the training augmentations (scale and shift),
# no flip (the heart is on the left); the probabilities of the views are averaged
TTA_VIEWS = ((1.0, 0.0, 0.0), (1.05, 0.0, 0.0), (0.95, 0.0, 0.0), (1.0, 0.04, 0.0), (1.0, -0.04, 0.0))


def tta_probabilities(model: torch.nn.Module, size: int, images: np.ndarray) -> np.ndarray:
    mean, std = normalisation(model)
    x = to_input_tensor(list(images), size, mean, std)
    views = []
    for scale, tx, ty in TTA_VIEWS:
        theta = torch.tensor([[1 / scale, 0.0, tx], [0.0, 1 / scale, ty]]).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        view = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
        views.append(predict_probabilities(model, view))
    return np.mean(views, axis=0).astype(np.float32)


def train_fold(
    data: dict,
    train_idx: np.ndarray,
    args: argparse.Namespace,
    seed: int,
    device: str = "cpu",
    after_epoch: Callable[[int, torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """The recipe's model trained on ``data["images"][train_idx]`` (its EMA when ``args.ema``), on ``device``;
    the random draws (initialisation, order, augmentation) are the same on every device. ``after_epoch(epoch,
    model)`` sees the model that would be returned (the EMA when on) after each epoch, in eval mode; it must not
    draw from torch's global generator."""
    torch.manual_seed(seed)
    # bench_cooccurrence.py trains through here with its own arguments, which predate these knobs
    output_stride: int = getattr(args, "output_stride", 16)
    drop_rate: float = getattr(args, "drop_rate", 0.0)
    smoothing, ema_decay = getattr(args, "label_smoothing", 0.0), getattr(args, "ema", 0.0)
    model = build_classifier(args.backbone, len(FINDINGS), output_stride=output_stride, drop_rate=drop_rate).to(device)
    # an exponential moving average of the weights (timm's, with warm-up) evaluates like a cheap ensemble of the
    # last few epochs' models: the held-out AUROC of a small model trained from scratch moves a lot between epochs
    ema = ModelEmaV3(model, decay=ema_decay, use_warmup=True) if ema_decay > 0 else None
    mean, std = normalisation(model)
    x = to_input_tensor(list(data["images"][train_idx]), args.size, mean, std).to(device)
    y = torch.from_numpy(data["labels"][train_idx]).to(device)
    # the product's prediction losses (train/losses.py): "wbce" is what its fine-tuning uses by default
    loss_config = LossConfig(prediction=getattr(args, "loss", "bce"))
    pos_weight = positive_weights(y, loss_config.max_pos_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * int(np.ceil(len(x) / args.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    # mixup (Zhang et al. 2018): convex pairs of images and their label vectors, one Beta(a, a) weight per batch;
    # the learning curves show these small models overfitting 2,000 images after ~16 epochs
    mixup, mix_rng = getattr(args, "mixup", 0.0), np.random.default_rng(seed)
    hflip = getattr(args, "hflip", False)
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), args.batch_size):
            index = perm[start : start + args.batch_size].to(device)
            if len(index) < 2:
                continue
            xb = augment(x[index], generator) if args.augment else x[index]
            # half the images mirrored; off by default: it cost Cardiomegaly 0.07 AUROC (base_models_80_mixup_hflip.md)
            if hflip:
                mirrored = (torch.rand(len(index), generator=generator) < 0.5).to(device)
                xb = torch.where(mirrored[:, None, None, None], xb.flip(-1), xb)
            target = y[index] * (1 - smoothing) + 0.5 * smoothing
            if mixup > 0:
                lam, partner = float(mix_rng.beta(mixup, mixup)), torch.randperm(len(index), generator=generator)
                xb = lam * xb + (1 - lam) * xb[partner.to(device)]
                target = lam * target + (1 - lam) * target[partner.to(device)]
            loss = prediction_loss(model(xb), target, loss_config, pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if ema is not None:
                ema.update(model)
        if after_epoch is not None:
            after_epoch(epoch, (ema.module if ema is not None else model).eval())
            model.train()
    return (ema.module if ema is not None else model).eval()


def auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None


def report(data: dict, pooled: np.ndarray, have: np.ndarray) -> dict:
    y, p = data["labels"][have], pooled[have]
    positives = {f: int(y[:, k].sum()) for k, f in enumerate(FINDINGS)}
    per = {f: auroc(y[:, k], p[:, k]) for k, f in enumerate(FINDINGS)}
    counted = [f for f in FINDINGS if positives[f] >= MIN_POSITIVES and per[f] is not None]
    macro = float(np.mean([per[f] for f in counted])) if counted else None
    # nih_hires's Pneumonia comes mostly from one collection (Pneumonia and No Finding only): its AUROC can be the
    # source, not the finding, so the targets are also checked without it (shared/data/README.md)
    unconfounded = [f for f in counted if f != "Pneumonia"]
    macro_wo = float(np.mean([per[f] for f in unconfounded])) if unconfounded else None
    by_source = {}
    for source in np.unique(data["source"][have]):
        m = data["source"][have] == source
        by_source[str(source)] = {
            "n": int(m.sum()),
            "auroc": {f: auroc(y[m, k], p[m, k]) for k, f in enumerate(FINDINGS) if y[m, k].sum() >= 10},
        }
    return {
        "per_finding": per,
        "positives": positives,
        "macro": macro,
        "macro_over": counted,
        "macro_excluding_pneumonia": macro_wo,
        "by_source": by_source,
    }


def load_recipe(name: str) -> argparse.Namespace:
    """The recipe a run recorded in bench/results/NAME.json, as the options train_fold and load take."""
    return argparse.Namespace(**json.loads((common.RESULTS / f"{name}.json").read_text())["recipe"])


def build_parser(description: str) -> argparse.ArgumentParser:
    """The recipe's options, shared with the scenarios that train on the same folds (bench_imbalance.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--split-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="patient splits (0: the one every bench shares); several = repeated cross-validation, AUROC averaged",
    )
    parser.add_argument(
        "--stratify",
        action="store_true",
        help="patient folds that spread each finding's positives evenly (simulation.stratified_patient_folds)",
    )
    parser.add_argument("--run-folds", type=int, nargs="*", help="only these folds (default: all)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--norm", default="none", choices=["none", "image", "equalize"], help="see load()")
    parser.add_argument("--output-stride", type=int, default=16, choices=[8, 16, 32])
    parser.add_argument("--drop-rate", type=float, default=0.0, help="dropout before the classifier head")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="BCE targets y*(1-s) + s/2")
    parser.add_argument("--hflip", action="store_true", help="mirror half the training images left-right")
    parser.add_argument("--mixup", type=float, default=0.0, help="mixup's Beta(a, a) parameter a (0: off)")
    parser.add_argument("--loss", default="bce", choices=["bce", "wbce", "asl"], help="prediction loss")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: off)")
    parser.add_argument(
        "--tta", action="store_true", help="report the test-time-augmented predictions (TTA_VIEWS averaged)"
    )
    parser.add_argument(
        "--curve-every", type=int, default=0, help="record held-out AUROC every N epochs (0: off; not in the recipe)"
    )
    parser.add_argument("--members", type=int, default=1, help="models per fold (seeds), probabilities averaged")
    parser.add_argument(
        "--run-members", type=int, nargs="*", help="only train these members and write no results (default: all)"
    )
    parser.add_argument("--sets", nargs="+", default=["nih1000", "nih_hires"], choices=list(SOURCES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="pipeline smoke run: 2 folds, 1 epoch, nih1000")
    parser.add_argument("--name", default="base_models", help="run name: the per-fold cache's and the results'")
    parser.add_argument("--out-name", help="results file name in bench/results (default: --name)")
    parser.add_argument("--summary", action="store_true", help="record the run as the clean model in summary.json")
    return parser


def cache_dir(args: argparse.Namespace) -> Path:
    key = f"{args.name}-{args.size}-{args.backbone}-{args.epochs}-{args.lr}-{args.augment}-{'+'.join(args.sets)}"
    # knobs added later join the cache key only when they differ from the original recipe, so old caches resume
    original = {"batch_size": 64, "weight_decay": 1e-4, "norm": "none", "output_stride": 16, "drop_rate": 0.0}
    original.update(label_smoothing=0.0, ema=0.0, loss="bce", mixup=0.0, hflip=False, split_seed=0, stratify=False)
    # one split's cache: main() runs each of --split-seeds with its own split_seed
    key += "".join(f"-{k}={getattr(args, k, v)}" for k, v in original.items() if getattr(args, k, v) != v)
    cache = (Path("/tmp") if args.quick else common.RESULTS) / ".base_models_cache" / key
    cache.mkdir(parents=True, exist_ok=True)
    (cache.parent / ".gitignore").write_text("*\n")  # per-fold cache for --resume, not results
    return cache


def curve_recorder(
    images: np.ndarray, size: int, every: int, curve: list[np.ndarray]
) -> Callable[[int, torch.nn.Module], None]:
    """An ``after_epoch`` for train_fold that appends, every ``every`` epochs, the model's probabilities on the
    held-out ``images`` to ``curve``: whether the recipe's epochs stop short of, or run past, its best."""

    def record(epoch: int, model: torch.nn.Module) -> None:
        if (epoch + 1) % every == 0:
            curve.append(sim.probabilities(model, sim.ModelSpec(input_size=size), images))

    return record


def held_out_predictions(
    args: argparse.Namespace, data: dict, folds: list[np.ndarray]
) -> tuple[np.ndarray, dict[int, float], np.ndarray | None]:
    """(members, images, findings) held-out probabilities (NaN where not computed), seconds per fold, and the
    learning curve's (members, points, images, findings) held-out probabilities where --curve-every recorded one.

    Member m of fold f trains with seed f + 1000 m and caches to fold{f}.npz (m = 0, the single-model layout)
    or fold{f}_m{m}.npz, so members can be trained by separate processes (one per core) and a run with fewer
    members resumes into a larger ensemble.
    """
    cache = cache_dir(args)
    run_members, tta = args.run_members, getattr(args, "tta", False)
    per_member = np.full((args.members, *data["labels"].shape), np.nan, np.float32)
    fold_seconds: dict[int, float] = {}
    curves: np.ndarray | None = None

    def keep_curve(member: int, idx: np.ndarray, curve: np.ndarray) -> None:
        nonlocal curves
        if curves is None:
            curves = np.full((args.members, len(curve), *data["labels"].shape), np.nan, np.float32)
        curves[member][:, idx] = curve  # same cache, same epochs; the interval is checked where it is read

    for fold in args.run_folds if args.run_folds is not None else range(args.folds):
        for member in range(args.members):
            path = cache / (f"fold{fold}.npz" if member == 0 else f"fold{fold}_m{member}.npz")
            skipped = run_members is not None and member not in run_members
            if path.exists() and (args.resume or skipped):
                saved = np.load(path)
                if tta and "p_tta" not in saved:
                    raise SystemExit(
                        f"{path} predates --tta (no test-time-augmented predictions): rerun it without --resume"
                    )
                per_member[member][saved["idx"]] = saved["p_tta" if tta else "p"]
                if "curve" in saved and int(saved.get("curve_every", 0)) == getattr(args, "curve_every", 0):
                    keep_curve(member, saved["idx"], saved["curve"])
                fold_seconds[fold] = fold_seconds.get(fold, 0.0) + float(saved["seconds"])
                continue
            if skipped:
                continue
            t0 = time.time()
            test_idx = folds[fold]
            train_idx = np.setdiff1d(np.arange(len(data["labels"])), test_idx)
            curve: list[np.ndarray] = []
            every = getattr(args, "curve_every", 0)
            record = curve_recorder(data["images"][test_idx], args.size, every, curve) if every else None
            model = train_fold(data, train_idx, args, fold + 1000 * member, after_epoch=record)
            p = sim.probabilities(model, sim.ModelSpec(input_size=args.size), data["images"][test_idx])
            # both kinds of prediction are cached, so one training run reports with and without --tta
            p_tta = tta_probabilities(model, args.size, data["images"][test_idx])
            per_member[member][test_idx] = p_tta if tta else p
            seconds = time.time() - t0
            fold_seconds[fold] = fold_seconds.get(fold, 0.0) + seconds
            if curve:
                keep_curve(member, test_idx, np.stack(curve))
                np.savez(
                    path, idx=test_idx, p=p, p_tta=p_tta, seconds=seconds, curve=np.stack(curve), curve_every=every
                )
            else:
                np.savez(path, idx=test_idx, p=p, p_tta=p_tta, seconds=seconds)
            partial = report(data, per_member[member], ~np.isnan(per_member[member][:, 0]))
            print(
                f"{cache.name} fold {fold} member {member}: {seconds:.0f}s; member so far macro {partial['macro']}, "
                f"Cardiomegaly {partial['per_finding']['Cardiomegaly']}, Effusion {partial['per_finding']['Effusion']}",
                flush=True,
            )
    return per_member, fold_seconds, curves


def learning_curve(data: dict, curves: np.ndarray | None, every: int) -> list[dict]:
    """Pooled held-out AUROC (Cardiomegaly, Effusion, macro) of the ensemble at each recorded epoch, once every
    fold and member has its curve."""
    if curves is None or np.isnan(curves[:, :, :, 0]).any():
        return []
    points = []
    for point in range(curves.shape[1]):
        result = report(data, curves[:, point].mean(0), np.ones(len(data["labels"]), bool))
        points.append(
            {
                "epoch": (point + 1) * every,
                "Cardiomegaly": result["per_finding"]["Cardiomegaly"],
                "Effusion": result["per_finding"]["Effusion"],
                "macro": result["macro"],
            }
        )
    return points


@dataclass
class SplitRun:
    """One patient split's cross-validation: its pooled held-out report and what it cost."""

    split_seed: int
    result: dict[str, Any]  # report()'s
    complete: bool
    n_images: int
    fold_seconds: dict[int, float]
    member_macro: list[float | None]
    curve: list[dict[str, Any]]
    pooled: np.ndarray  # (images, findings) held-out probabilities, NaN where a fold or member has not run


def split_folds(args: argparse.Namespace, data: dict, split_seed: int) -> list[np.ndarray]:
    """The test folds of one patient split: plain (every bench's) or, with --stratify, stratified by finding."""
    labels = data["labels"] if getattr(args, "stratify", False) else None
    return sim.patient_folds(data["patients"], args.folds, seed=split_seed, stratify_by=labels)


def run_split(args: argparse.Namespace, data: dict, split_seed: int) -> SplitRun:
    """Every fold of one patient split (cached per split), pooled over its folds (and members)."""
    replicate = argparse.Namespace(**{**vars(args), "split_seed": split_seed})
    folds = split_folds(args, data, split_seed)
    per_member, fold_seconds, curves = held_out_predictions(replicate, data, folds)
    member_done = ~np.isnan(per_member[:, :, 0])
    member_macro = [
        report(data, per_member[m], member_done[m])["macro"] if member_done[m].all() else None
        for m in range(args.members)
    ]
    # the ensemble's prediction for an image exists once every member has predicted it
    pooled = np.where(member_done.all(0)[:, None], per_member.mean(0), np.nan).astype(np.float32)
    have = ~np.isnan(pooled[:, 0])
    return SplitRun(
        split_seed,
        report(data, pooled, have),
        bool(have.all()),
        int(have.sum()),
        fold_seconds,
        member_macro,
        learning_curve(data, curves, args.curve_every),
        pooled,
    )


def progress_fields(runs: list[SplitRun]) -> dict[str, Any]:
    """The results file's run-level progress. With several splits the per-fold figures (seconds, member AUROCs) live
    under "splits" alone: split 0's at top level read as the whole run's."""
    fields: dict[str, Any] = {
        "folds_done": sorted(set.intersection(*(set(r.fold_seconds) for r in runs))),  # done in every split
        "n_images": min(r.n_images for r in runs),
    }
    if len(runs) == 1:
        fields |= {"fold_seconds": runs[0].fold_seconds, "member_macro_auroc": runs[0].member_macro}
    return fields


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean([v for v in values if v is not None]))


def mean_over_splits(runs: list[SplitRun]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report and learning curve averaged over the splits (one split: its own). Each split's figure is already
    pooled over every image, so the mean over splits is repeated cross-validation's estimate: it averages out
    which patients happen to share a fold, which moved the pooled AUROC by up to 0.05 (base_models_80_mixup_2splits)."""
    first = runs[0].result
    result = {
        "per_finding": {f: _mean([r.result["per_finding"][f] for r in runs]) for f in FINDINGS},
        "positives": first["positives"],
        "macro": _mean([r.result["macro"] for r in runs]),
        "macro_over": first["macro_over"],
        "macro_excluding_pneumonia": _mean([r.result["macro_excluding_pneumonia"] for r in runs]),
        "by_source": {
            source: {
                "n": info["n"],
                # a split summarised before all its folds ran may lack a source or finding: None, not a crash
                "auroc": {
                    f: _mean([r.result["by_source"].get(source, {}).get("auroc", {}).get(f) for r in runs])
                    for f in info["auroc"]
                },
            }
            for source, info in first["by_source"].items()
        },
    }
    curves = [r.curve for r in runs]
    curve = []
    if all(curves) and len({len(c) for c in curves}) == 1:
        curve = [
            {
                "epoch": points[0]["epoch"],
                **{k: _mean([p[k] for p in points]) for k in ("Cardiomegaly", "Effusion", "macro")},
            }
            for points in zip(*curves, strict=True)
        ]
    return result, curve


def target_intervals(data: dict, runs: list[SplitRun], macro_over: list[str], n_boot: int) -> dict[str, list[float]]:
    """95% patient-bootstrap intervals of the checked figures (Cardiomegaly, Effusion, macro), each the mean over
    the splits recomputed on every resample of whole patients. They show how far the test images alone move a
    figure: Cardiomegaly's 134 positive images come from 66 patients, two of them with 18 and 20 images."""
    from sklearn.metrics import roc_auc_score  # raises on a one-class resample, which the bootstrap then skips

    from ml_backend.measure.metrics import bootstrap_ci_vector

    columns = [FINDINGS.index(f) for f in macro_over]
    card, eff = FINDINGS.index("Cardiomegaly"), FINDINGS.index("Effusion")
    stacked = np.stack([r.pooled for r in runs], axis=1)  # (images, splits, findings)

    def figures(y: np.ndarray, p: np.ndarray) -> list[float]:
        per = {
            k: np.mean([roc_auc_score(y[:, k], p[:, s, k]) for s in range(p.shape[1])]) for k in {card, eff, *columns}
        }
        return [per[card], per[eff], float(np.mean([per[k] for k in columns]))]

    _, lo, hi = bootstrap_ci_vector(figures, data["labels"], stacked, cluster_ids=data["patients"], n_boot=n_boot)
    return {
        name: [round(float(a), 4), round(float(b), 4)]
        for name, a, b in zip(("Cardiomegaly", "Effusion", "macro"), lo, hi, strict=True)
    }


def main() -> int:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--n-boot", type=int, default=200, help="patient-bootstrap resamples for the intervals")
    args = parser.parse_args()
    if args.quick:
        args.folds, args.epochs, args.sets = 2, 1, ["nih1000"]  # results are printed, not written
        args.n_boot = 20
    common.require_shared()
    common.apply_threads(args.threads)
    started = time.time()
    data = load(args.size, args.sets, args.norm)
    print(f"loaded {len(data['labels'])} images of {len(np.unique(data['patients']))} patients", flush=True)
    runs = [run_split(args, data, seed) for seed in args.split_seeds]
    result, curve = mean_over_splits(runs)
    complete = all(r.complete for r in runs)
    checked = {
        "Cardiomegaly": result["per_finding"]["Cardiomegaly"],
        "Effusion": result["per_finding"]["Effusion"],
        "macro": result["macro"],
        "macro (without Pneumonia)": result["macro_excluding_pneumonia"],
    }
    shortfalls = [
        f"{name} AUROC {value if value is None else round(value, 3)} < {TARGETS[name.split()[0]]}"
        for name, value in checked.items()
        if value is None or value < TARGETS[name.split()[0]]
    ]
    seconds_total = sum(sum(r.fold_seconds.values()) for r in runs)
    intervals = target_intervals(data, runs, result["macro_over"], args.n_boot) if complete else {}
    data_out = {
        "clean_model_auroc": {**result["per_finding"], "macro": result["macro"]},
        "targets": TARGETS,
        "meets_targets": complete and not shortfalls,
        "shortfalls": shortfalls,
        "intervals_95": intervals,
        "complete": complete,
        **progress_fields(runs),
        "training_seconds_total": round(seconds_total, 1),  # duration_s excludes folds resumed from cache
        "learning_curve": curve,
        "splits": [
            {
                "split_seed": r.split_seed,
                "clean_model_auroc": {**r.result["per_finding"], "macro": r.result["macro"]},
                "macro_excluding_pneumonia": r.result["macro_excluding_pneumonia"],
                "complete": r.complete,
                "n_images": r.n_images,
                "fold_seconds": r.fold_seconds,
                "member_macro_auroc": r.member_macro,
            }
            for r in runs
        ],
        "recipe": {
            k: v
            for k, v in vars(args).items()
            if k not in ("resume", "run_folds", "run_members", "summary", "curve_every", "n_boot")
            and not (k == "split_seeds" and v == [0])  # the shared split: recipes recorded before repeats existed
            and not (k == "stratify" and not v)  # plain folds: likewise
        },
        **{k: v for k, v in result.items() if k != "per_finding"},
        "command": common.command_line(),
        "duration_s": round(time.time() - started, 1),
        "environment": common.environment(),
    }
    several = len(runs) > 1
    split_heads = [f"split {r.split_seed}" for r in runs] if several else []

    def cell(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    rows = [
        [
            f,
            result["positives"][f],
            *(cell(r.result["per_finding"][f]) for r in runs if several),
            cell(result["per_finding"][f]),
        ]
        for f in FINDINGS
    ]
    rows.append(
        [
            f"macro (>= {MIN_POSITIVES} positives)",
            len(result["macro_over"]),
            *(cell(r.result["macro"]) for r in runs if several),
            cell(result["macro"]),
        ]
    )
    rows.append(
        [
            "macro without Pneumonia (source-confounded)",
            "",
            *(cell(r.result["macro_excluding_pneumonia"]) for r in runs if several),
            cell(result["macro_excluding_pneumonia"]),
        ]
    )
    by_source = [
        [source, info["n"], ", ".join(f"{f} {v:.3f}" for f, v in info["auroc"].items() if v is not None)]
        for source, info in result["by_source"].items()
    ]
    pooled_head = "clean-model AUROC (pooled held-out)"
    sections = [
        f"Folds done: {data_out['folds_done']} of {args.folds} (patient-level)"
        + (f", in each of {len(runs)} patient splits (seeds {args.split_seeds})" if several else "")
        + f"; images with a held-out prediction: {data_out['n_images']}; recipe: `{json.dumps(data_out['recipe'])}`.",
        common.md_table(
            ["finding", "positives", *split_heads, f"mean over the {len(runs)} splits" if several else pooled_head],
            rows,
        ),
        (
            "Each split's column is its pooled held-out AUROC (every image predicted once, by the fold model that "
            "did not train on its patient); the last column, their mean, is what the targets are checked on.\n"
            if several
            else ""
        )
        + f"Targets {TARGETS} (macro checked with and without Pneumonia): "
        + ("met" if data_out["meets_targets"] else f"NOT met: {shortfalls or 'incomplete'}")
        + (
            f"\n\n95% patient-bootstrap intervals ({args.n_boot} resamples of whole patients"
            + (", the splits' mean recomputed on each" if several else "")
            + "; they show how far the choice of test images moves a figure, not how far retraining does): "
            + ", ".join(f"{name} {cell(checked[name])} [{lo:.3f}, {hi:.3f}]" for name, (lo, hi) in intervals.items())
            + "."
            if intervals
            else ""
        ),
        "Per source (AUROC of findings with >= 10 positives in that source"
        + (", mean over the splits" if several else "")
        + "):",
        common.md_table(["source", "images", "AUROC"], by_source),
        (
            "Learning curve (pooled held-out AUROC of the model after each recorded epoch of this recipe's "
            "schedule"
            + (", mean over the splits" if several else "")
            + "; the figures above are its last epoch's, whatever the curve shows):\n\n"
            + common.md_table(
                ["epoch", "Cardiomegaly", "Effusion", "macro"],
                [[c["epoch"], *(cell(c[k]) for k in ("Cardiomegaly", "Effusion", "macro"))] for c in curve],
            )
            if curve
            else "Learning curve: not recorded (--curve-every)."
        ),
        f"Members per fold: {args.members} (probabilities averaged); each member's own macro AUROC: "
        + "; ".join(f"split {r.split_seed}: {r.member_macro}" for r in runs)
        + ".",
        "Seconds per fold (training + prediction of all members, 2 shared CPU cores): "
        + "; ".join(f"split {r.split_seed}: {r.fold_seconds}" for r in runs)
        + f"; total {seconds_total:.0f} s.",
    ]
    # a run of some members (one process per core, or another loss's arm for bench_imbalance.py) writes no
    # results: the run without --run-members assembles them
    if not args.quick and args.run_members is None and (not args.run_folds or complete):
        sections = [section + "\n" for section in sections]
        title = "Clean base models: patient-level cross-validated AUROC"
        common.write_results(args.out_name or args.name, title, sections, data_out)
        if complete and (args.summary or args.name == "base_models"):  # summary.json keeps its other fields
            common.update_summary(
                {
                    "clean_model_auroc": data_out["clean_model_auroc"],
                    "clean_model_meets_targets": data_out["meets_targets"],
                    "clean_model_command": data_out["command"],
                }
            )
    if not complete:
        print("incomplete: not every fold and member has run", file=sys.stderr)
        return 2
    if shortfalls:
        print(f"FAIL: the clean model falls short of issue 16's targets: {'; '.join(shortfalls)}", file=sys.stderr)
        return 1
    print("clean model meets the targets", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
