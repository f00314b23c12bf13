"""The seed's co-occurrence bias as a scenario on real labels (issue 16, part 2, first bullet).

Data and recipe: bench_base_models.py (nih1000 + nih_hires at 64 px, 14 findings, k folds split by patient).
Per fold, the training split (and a validation slice of it that chooses thresholds) is resampled so that finding
A nearly always comes with its partner B: images with A but without B are kept with probability
``--keep-a-without-b`` (default 0.1). The test fold is decorrelated: its (A, B) cells are subsampled so that A is
independent of B.

Arms: ``baseline`` = the recipe's BCE model on the resampled split; ``full`` = that model fine-tuned with the
product's trainer and losses (weighted BCE, the attention loss with evidence masks from the real regions:
ChestX-Det polygons and NIH boxes, where they exist, for the findings an image carries).

Measured on the pooled decorrelated held-out predictions: A's Equalized Odds over the co-occurrence group
(max of the TPR and FPR gaps between test images with and without B), A's F1, and their change full vs
baseline with 95% patient-bootstrap intervals (``eod_reduction_pct``, ``f1_gain_points``). Written to
bench/results/cooccurrence.{md,json} and under ``cooccurrence`` in bench/results/summary.json (other fields kept).

Run: ``.venv/bin/python bench/bench_cooccurrence.py --threads 2 --resume``; ``--quick`` for a pipeline smoke run
(writes under --out, default a temporary name, and never touches summary.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_base_models as base  # noqa: E402
import common  # noqa: E402
import simulation as sim  # noqa: E402

from ml_backend.measure.metrics import choose_thresholds  # noqa: E402
from ml_backend.train.losses import LossConfig  # noqa: E402

# The fine-tuned arms: "full" = the product's trainer with the attention loss (evidence masks); "decorrelated" =
# the same plus the decorrelating loss weights (train/reweighting.py). The headline keys are the product default's.
FINE_TUNED = ("full", "decorrelated")
PRODUCT_ARM = "decorrelated" if LossConfig().decorrelate_cooccurrence else "full"
ARM_NAMES = {"full": "attention loss", "decorrelated": "attention loss + decorrelating weights"}


def fine_tune_arm(
    model: torch.nn.Module,
    initial: dict,
    tensors,
    spec: sim.ModelSpec,
    args: argparse.Namespace,
    fold: int,
    split: tuple[np.ndarray, np.ndarray, np.ndarray],
    decorrelate: bool,
) -> tuple[np.ndarray, np.ndarray, list]:
    """The product's fine-tuning from the baseline weights ``initial`` (``model`` is overwritten): the held-out
    probabilities, the thresholds chosen on validation and the loss columns decorrelated."""
    val_images, val_labels, test_images = split
    model.load_state_dict(initial)
    loss = LossConfig(prediction="wbce", decorrelate_cooccurrence=decorrelate)
    config = replace(spec.finetune, epochs=args.finetune_epochs, loss=loss, propagation=None)
    run = sim.train(model, tensors, config, seed=fold)
    model.eval()
    thr = choose_thresholds(val_labels, sim.probabilities(model, spec, val_images))
    return sim.probabilities(model, spec, test_images), thr, run.decorrelated


def arm_summary(result: dict) -> dict[str, dict]:
    """Each fine-tuned arm's headline changes and their intervals, for summary.json."""
    every = result["intervals_95_all"]
    return {
        arm: {
            "name": ARM_NAMES[arm],
            "eod_reduction_pct": result[f"eod_reduction_pct_{arm}"],
            "f1_gain_points": result[f"f1_gain_points_{arm}"],
            "intervals_95": {k: every.get(f"{k}_{arm}") for k in ("eod_reduction_pct", "f1_gain_points")},
        }
        for arm in FINE_TUNED
    }


def correlate(idx: np.ndarray, labels: np.ndarray, a: int, b: int, keep: float, rng: np.random.Generator):
    """Keep images with A but without B with probability ``keep``: A then nearly always comes with B."""
    a_only = (labels[idx, a] > 0) & (labels[idx, b] == 0)
    return idx[~a_only | (rng.random(len(idx)) < keep)]


def decorrelate(idx: np.ndarray, labels: np.ndarray, a: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """Subsample the (A, B) cells so that A is independent of B (n11 * n00 == n10 * n01, up to rounding)."""
    cell = {
        (i, j): idx[((labels[idx, a] > 0) == bool(i)) & ((labels[idx, b] > 0) == bool(j))]
        for i in (0, 1)
        for j in (0, 1)
    }
    n = {k: len(v) for k, v in cell.items()}
    if min(n.values()) == 0:
        return idx
    # P(A | B) must equal P(A | not B): shrink whichever side has the higher A rate
    rate_b, rate_nb = n[1, 1] / (n[1, 1] + n[0, 1]), n[1, 0] / (n[1, 0] + n[0, 0])
    keep = dict(n)
    if rate_b > rate_nb:  # too many A among B: drop A&B
        keep[1, 1] = max(1, round(rate_nb * n[0, 1] / (1 - rate_nb)))
    else:
        keep[1, 0] = max(1, round(rate_b * n[0, 0] / (1 - rate_b)))
    return np.sort(np.concatenate([rng.permutation(cell[k])[: keep[k]] for k in cell]))


def eod_and_f1(y_a: np.ndarray, pred_a: np.ndarray, group_b: np.ndarray) -> tuple[float | None, float | None]:
    gaps = []
    for truth in (1, 0):  # TPR gap, FPR gap
        rates = [
            pred_a[(y_a == truth) & (group_b == g)].mean() for g in (0, 1) if ((y_a == truth) & (group_b == g)).any()
        ]
        if len(rates) < 2:
            return None, None
        gaps.append(abs(rates[0] - rates[1]))
    tp, fp, fn = (pred_a & (y_a == 1)).sum(), (pred_a & (y_a == 0)).sum(), (~pred_a & (y_a == 1)).sum()
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return float(max(gaps)), None if f1 is None else float(f1)


# what a bench_base_models recipe sets (--base-recipe); the rest of train_fold's knobs keep their defaults
RECIPE_KNOBS = (
    "size",
    "backbone",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "augment",
    "norm",
    "output_stride",
    "drop_rate",
    "label_smoothing",
    "ema",
    "sets",
    "mixup",  # recipes recorded before these options lack them: train_fold's defaults (off) then apply
    "hflip",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, default=["Atelectasis", "Effusion"], metavar=("A", "B"))
    parser.add_argument("--keep-a-without-b", type=float, default=0.1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--sets", nargs="+", default=["nih1000", "nih_hires"], choices=list(base.SOURCES))
    parser.add_argument("--n-boot", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="pipeline smoke run: 2 folds, 1 epoch, nih1000")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument(
        "--base-recipe",
        help="train the baseline with this bench_base_models results file's recipe and data (its loss replaced "
        "by BCE, the baseline's definition), e.g. base_models_96; the recipe options above are then ignored",
    )
    parser.add_argument("--only-folds", type=int, nargs="+", help="compute only these folds (parallel processes)")
    parser.add_argument(
        "--out-name",
        default="cooccurrence",
        help="results file name and summary.json key (another pair: another name, so 'cooccurrence' stays)",
    )
    args = parser.parse_args()
    args.augment = True
    if args.base_recipe:
        recipe = base.load_recipe(args.base_recipe)
        for knob in RECIPE_KNOBS:
            if hasattr(recipe, knob):
                setattr(args, knob, getattr(recipe, knob))
    args.loss = "bce"
    if args.quick:
        args.folds, args.epochs, args.finetune_epochs, args.sets, args.n_boot = 2, 1, 1, ["nih1000"], 50
    out = args.out or (common.RESULTS if not args.quick else None)
    common.require_shared()
    common.apply_threads(args.threads)
    started = time.time()
    data = base.load(args.size, args.sets, getattr(args, "norm", "none"))
    evidence_all = base.evidence_regions(args.size, args.sets)
    a, b = (base.FINDINGS.index(f) for f in args.pair)
    labels = data["labels"]
    folds = sim.patient_folds(data["patients"], args.folds, seed=0)
    key = "-".join(
        ["cooc", *args.pair, str(args.keep_a_without_b), str(args.size), args.backbone]
        + [str(args.epochs), str(args.finetune_epochs), "+".join(args.sets)]
        + ([args.base_recipe] if args.base_recipe else [])
    )
    cache = (out or Path("/tmp")) / ".cooccurrence_cache" / key
    cache.mkdir(parents=True, exist_ok=True)
    (cache.parent / ".gitignore").write_text("*\n")  # per-fold cache for --resume, not results
    spec = sim.ModelSpec(backbone=args.backbone, input_size=args.size, output_stride=getattr(args, "output_stride", 16))
    per_fold = []
    for fold in range(args.folds):
        path = cache / f"fold{fold}.npz"
        extra = cache / f"fold{fold}_decorrelated.npz"
        wanted = args.only_folds is None or fold in args.only_folds
        if path.exists() and extra.exists() and (args.resume or args.only_folds):
            per_fold.append(dict(np.load(path)) | dict(np.load(extra)))
            continue
        if not wanted:
            continue
        t0 = time.time()
        rng = np.random.default_rng(fold)
        rest = np.setdiff1d(np.arange(len(labels)), folds[fold])
        val_patients = set(
            rng.permutation(np.unique(data["patients"][rest]))[: len(np.unique(data["patients"][rest])) // 10]
        )
        is_val = np.array([data["patients"][i] in val_patients for i in rest])
        train_idx = correlate(rest[~is_val], labels, a, b, args.keep_a_without_b, rng)
        val_idx = correlate(rest[is_val], labels, a, b, args.keep_a_without_b, rng)
        test_idx = decorrelate(folds[fold], labels, a, b, rng)
        checkpoint = cache / f"fold{fold}_baseline.pt"
        cached = dict(np.load(path)) if path.exists() and (args.resume or args.only_folds) else None
        if cached is not None and checkpoint.exists():
            baseline = sim.new_model(spec, len(base.FINDINGS), seed=fold)
            baseline.load_state_dict(torch.load(checkpoint, weights_only=True))
            baseline.eval()
        else:
            baseline = base.train_fold(data, train_idx, args, seed=fold)
            torch.save(baseline.state_dict(), checkpoint)
        evidence = [{k: m for k, m in evidence_all[i].items() if labels[i, k] > 0} for i in train_idx]
        tensors = sim.make_tensors(baseline, spec, data["images"][train_idx], labels[train_idx], evidence=evidence)
        initial = copy.deepcopy(baseline.state_dict())

        split = (data["images"][val_idx], labels[val_idx], data["images"][test_idx])
        fine_tuned = partial(fine_tune_arm, baseline, initial, tensors, spec, args, fold, split)  # (decorrelate)

        baseline_p = sim.probabilities(baseline, spec, data["images"][test_idx])
        if cached is None:
            row = {"test_idx": test_idx, "train_p_b_given_a": labels[train_idx][labels[train_idx, a] > 0, b].mean()}
            row["baseline_thr"] = choose_thresholds(
                labels[val_idx], sim.probabilities(baseline, spec, data["images"][val_idx])
            )
            row["baseline_p"] = baseline_p
            row["full_p"], row["full_thr"], _ = fine_tuned(False)
            row["n_evidence"] = sum(bool(e) for e in evidence)
            row["seconds"] = time.time() - t0
            np.savez(path, **row)
        else:  # a fold cached before the decorrelated arm existed: its baseline retrained (or loaded) to extend it
            row = cached
            assert np.array_equal(row["test_idx"], test_idx), "the fold's split changed since it was cached"
        t1 = time.time()
        p, thr, pairs = fine_tuned(True)
        partner_of_a = [q.partner for q in pairs if q.finding == a]
        more: dict[str, Any] = {
            "decorrelated_p": p,
            "decorrelated_thr": thr,
            "decorrelated_partner_of_finding": partner_of_a[0] if partner_of_a else -1,
            "decorrelated_pairs": len(pairs),
            # the baseline behind both fine-tuned arms: 0 when it was reproduced exactly
            "baseline_reproduced_max_abs_diff": float(np.abs(baseline_p - row["baseline_p"]).max()),
            "decorrelated_seconds": time.time() - t1,
        }
        np.savez(extra, **more)
        row = row | more
        per_fold.append(row)
        print(
            f"fold {fold}: {time.time() - t0:.0f}s, train P(B|A) {float(row['train_p_b_given_a']):.2f}, "
            f"{len(pairs)} columns decorrelated, baseline reproduced to {more['baseline_reproduced_max_abs_diff']:.1e}",
            flush=True,
        )

    if len(per_fold) < args.folds:
        print(f"{len(per_fold)} of {args.folds} folds cached; summarise with --resume once all are", flush=True)
        return 2
    # pool the decorrelated held-out predictions (each fold binarised with its own validation thresholds)
    idx = np.concatenate([r["test_idx"] for r in per_fold])
    pred = {
        arm: np.concatenate([r[f"{arm}_p"][:, a] >= r[f"{arm}_thr"][a] for r in per_fold])
        for arm in ("baseline", *FINE_TUNED)
    }
    y_a, g_b, patients = labels[idx, a].astype(int), (labels[idx, b] > 0).astype(int), data["patients"][idx]
    product = PRODUCT_ARM

    def stats(rows: np.ndarray) -> dict[str, float | None]:
        eb, fb = eod_and_f1(y_a[rows], pred["baseline"][rows], g_b[rows])
        out: dict[str, float | None] = {"eod_baseline": eb, "f1_baseline": fb}
        for arm in FINE_TUNED:
            ef, ff = eod_and_f1(y_a[rows], pred[arm][rows], g_b[rows])
            out[f"eod_{arm}"], out[f"f1_{arm}"] = ef, ff
            out[f"eod_reduction_pct_{arm}"] = None if eb in (None, 0) or ef is None else 100 * (eb - ef) / eb
            out[f"f1_gain_points_{arm}"] = None if fb is None or ff is None else 100 * (ff - fb)
        # the headline keys: the product's default fine-tuning
        out["eod_reduction_pct"] = out[f"eod_reduction_pct_{product}"]
        out["f1_gain_points"] = out[f"f1_gain_points_{product}"]
        return out

    point = stats(np.arange(len(idx)))
    unique = np.unique(patients)
    rows_of = {p: np.flatnonzero(patients == p) for p in unique}
    rng = np.random.default_rng(0)
    boots: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(args.n_boot):
        rows = np.concatenate([rows_of[p] for p in rng.choice(unique, len(unique))])
        for k, v in stats(rows).items():
            if v is not None:
                boots[k].append(v)
    intervals = {
        k: [round(float(np.percentile(v, 2.5)), 2), round(float(np.percentile(v, 97.5)), 2)]
        for k, v in boots.items()
        if v
    }
    result = {
        "pair": {"finding": args.pair[0], "partner": args.pair[1]},
        **{k: None if v is None else round(v, 4) for k, v in point.items()},
        "intervals_95": {k: intervals.get(k) for k in ("eod_reduction_pct", "f1_gain_points")},
        "intervals_95_all": intervals,
        "product_arm": product,
        "train_p_partner_given_finding": [round(float(r["train_p_b_given_a"]), 3) for r in per_fold],
        "decorrelated_pairs_per_fold": [int(r["decorrelated_pairs"]) for r in per_fold],
        "baseline_reproduced_max_abs_diff": max(float(r["baseline_reproduced_max_abs_diff"]) for r in per_fold),
        "test_images": int(len(idx)),
        "test_finding_positives": int(y_a.sum()),
        "folds": args.folds,
        "n_boot": args.n_boot,
        "command": common.command_line(),
        "duration_s": round(time.time() - started, 1),
        "environment": common.environment(),
    }
    print(
        json.dumps({k: result[k] for k in ("pair", "eod_reduction_pct", "f1_gain_points", "intervals_95")}), flush=True
    )
    if out is None:
        return 0
    gain = lambda k: (iv := intervals.get(k)) is not None and (iv[0] > 0 or iv[1] < 0)  # noqa: E731
    sections = [
        f"Pair: {args.pair[0]} (finding) with {args.pair[1]} (partner); training keeps {args.keep_a_without_b:.0%} of "
        f"the {args.pair[0]}-without-{args.pair[1]} images; test folds decorrelated; {args.folds} patient folds.\n",
        common.md_table(
            ["arm", "metric", "baseline", "arm's value", "change", "95% interval", "interval excludes 0"],
            [
                [
                    ARM_NAMES[arm] + (" (product default)" if arm == product else ""),
                    metric,
                    point[f"{key}_baseline"],
                    point[f"{key}_{arm}"],
                    point[f"{change}_{arm}"],
                    intervals.get(f"{change}_{arm}"),
                    gain(f"{change}_{arm}"),
                ]
                for arm in FINE_TUNED
                for metric, key, change in (
                    ("EOD over the partner group", "eod", "eod_reduction_pct"),
                    (f"{args.pair[0]} F1", "f1", "f1_gain_points"),
                )
            ],
        )
        + "\n",  # a blank line: the sentence below is not a table row
        "Change: EOD reduction in % of the baseline's, F1 gain in points. Columns decorrelated per fold: "
        + ", ".join(str(int(r["decorrelated_pairs"])) for r in per_fold)
        + f"; {args.pair[0]}'s partner among them in "
        + f"{sum(int(r['decorrelated_partner_of_finding']) == b for r in per_fold)} of {args.folds} folds.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    if out == common.RESULTS:
        common.write_results(args.out_name, "Co-occurrence scenario", sections, result)
        keys = ("pair", "eod_reduction_pct", "f1_gain_points", "intervals_95", "product_arm", "command")
        # another pair (--out-name) gets its own key, so the "cooccurrence" keeps the pair it names
        common.update_summary({args.out_name: {k: result[k] for k in keys} | {"arms": arm_summary(result)}})
    else:
        (out / f"{args.out_name}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
