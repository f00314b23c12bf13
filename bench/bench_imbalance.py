"""The imbalance scenario (issue 16, part 2): per-finding F1 and recall of the rare findings, with intervals.

Data and recipe: bench_base_models.py (nih1000 + nih_hires, 14 NIH findings, k folds split by patient); the
same folds, seeds and per-fold cache, so the BCE arm is the clean base model itself and resumes from its run.
Arms: the prediction losses the product offers (ml_backend/train/losses.py): plain BCE (the baseline), the
product's default weighted BCE (per-finding neg/pos weights, capped at 20) and, with ``--losses``, ASL.

Decisions use what the product serves with: a per-finding threshold that maximises F1 on validation data. Here
each fold's thresholds are chosen on the other folds' held-out predictions (cross-fitted), so no image's
threshold saw its own label. F1 and recall per finding, macro-F1 over all findings and over the rare ones
(prevalence < 5%), each with a 95% patient-bootstrap interval; the change against BCE is bootstrapped paired
(the same resampled patients for both arms) and counts only where its interval excludes zero. AUROC is
reported as well: a loss that only moves probabilities changes F1 at 0.5, not the ranking.

Run: ``.venv/bin/python bench/bench_imbalance.py --threads 1 --resume`` plus the base recipe's options;
``--quick`` for a pipeline smoke run (2 folds, 1 epoch, nih1000; writes only under ``--out``).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_base_models as base  # noqa: E402
import common  # noqa: E402

from ml_backend.measure.metrics import bootstrap_ci_vector, choose_thresholds  # noqa: E402

RARE_PREVALENCE = 0.05


def cross_fitted_decisions(labels: np.ndarray, probs: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """Binary decisions where each fold's per-finding thresholds maximise F1 on the other folds' predictions."""
    decisions = np.zeros(labels.shape, dtype=bool)
    for test_idx in folds:
        others = np.setdiff1d(np.arange(len(labels)), test_idx)
        thresholds = choose_thresholds(labels[others], probs[others])
        decisions[test_idx] = probs[test_idx] >= thresholds[None, :]
    return decisions


def scores(y: np.ndarray, d: np.ndarray, present: list[int], rare: list[int]) -> np.ndarray:
    """F1 of every finding, recall of every finding, macro-F1 over ``present`` and over ``rare``: from counts
    (sklearn's values with zero_division=0), so one bootstrap resample scores everything at once."""
    tp, positives, predicted = (y & d).sum(0), y.sum(0), d.sum(0)
    f1 = np.divide(2 * tp, positives + predicted, out=np.zeros(len(tp)), where=positives + predicted > 0)
    recall = np.divide(tp, positives, out=np.zeros(len(tp)), where=positives > 0)
    macro_rare = f1[rare].mean() if rare else np.nan
    return np.concatenate([f1, recall, [f1[present].mean(), macro_rare]])


def _entries(point: np.ndarray, lo: np.ndarray, hi: np.ndarray, paired: bool) -> list[dict]:
    """One {"value", "interval_95"} per component; a paired change also says whether its interval excludes 0."""
    out = []
    for v, a, b in zip(point, lo, hi, strict=True):
        entry: dict = {"value": _num(v), "interval_95": [_num(a), _num(b)]}
        if paired:
            entry["excludes_zero"] = bool(np.isfinite(a) and np.isfinite(b) and (a > 0 or b < 0))
        out.append(entry)
    return out


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def main() -> int:
    parser = base.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--losses", nargs="+", default=["bce", "wbce"], choices=["bce", "wbce", "asl"])
    parser.add_argument("--n-boot", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results; quick: none)")
    args = parser.parse_args()
    if args.quick:
        args.folds, args.epochs, args.sets, args.n_boot = 2, 1, ["nih1000"], 50
    if args.losses[0] != "bce":
        parser.error("the first loss is the baseline the others are compared with: bce")
    common.require_shared()
    common.apply_threads(args.threads)
    started = time.time()
    data = base.load(args.size, args.sets, args.norm)
    if len(args.split_seeds) > 1:
        parser.error("one patient split at a time: --split-seeds S")
    args.split_seed = args.split_seeds[0]  # the per-split cache held_out_predictions reads
    folds = base.split_folds(args, data, args.split_seed)
    labels, patients = data["labels"].astype(bool), data["patients"]
    findings = list(base.FINDINGS)
    prevalence = labels.mean(0)
    rare = [k for k in range(len(findings)) if 0 < prevalence[k] < RARE_PREVALENCE]
    present = [k for k in range(len(findings)) if labels[:, k].any()]

    probs: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for loss in args.losses:
        arm_args = copy.copy(args)
        arm_args.loss = loss
        per_member, fold_seconds, _ = base.held_out_predictions(arm_args, data, folds)
        if np.isnan(per_member).any():
            print(f"incomplete: loss {loss} lacks held-out predictions (run every fold and member)", file=sys.stderr)
            return 2
        probs[loss], seconds[loss] = per_member.mean(0), round(sum(fold_seconds.values()), 1)
    decisions = {loss: cross_fitted_decisions(labels, p, folds) for loss, p in probs.items()}

    boot = {"cluster_ids": patients, "n_boot": args.n_boot, "seed": 0}
    n = len(findings)

    def score(y: np.ndarray, d: np.ndarray) -> np.ndarray:
        return scores(y, d, present, rare)

    def change(y: np.ndarray, d: np.ndarray, d_ref: np.ndarray) -> np.ndarray:
        return 100 * (score(y, d) - score(y, d_ref))  # in points, on the same resampled patients

    arms: dict[str, dict] = {}
    for loss in args.losses:
        d = decisions[loss]
        own = _entries(*bootstrap_ci_vector(score, labels, d, **boot), paired=False)
        paired = (
            _entries(*bootstrap_ci_vector(change, labels, d, decisions["bce"], **boot), paired=True)
            if loss != "bce"
            else None
        )
        per_finding = {}
        for k in present:
            entry = {
                "f1": own[k],
                "recall": own[n + k],
                "auroc": float(roc_auc_score(labels[:, k], probs[loss][:, k])),
                "predicted_positive_rate": float(d[:, k].mean()),
            }
            if paired:
                entry["f1_change_points"], entry["recall_change_points"] = paired[k], paired[n + k]
            per_finding[findings[k]] = entry
        arm = {
            "per_finding": per_finding,
            "macro_f1": own[2 * n],
            "macro_f1_rare": own[2 * n + 1],
            "training_seconds": seconds[loss],
        }
        if paired:
            arm["macro_f1_change_points"], arm["macro_f1_rare_change_points"] = paired[2 * n], paired[2 * n + 1]
        arms[loss] = arm

    def cell(entry: dict, scale: float = 1.0) -> str:
        value, (lo, hi) = entry["value"], entry["interval_95"]
        if value is None:
            return "n/a"
        ci = "" if lo is None else f" [{scale * lo:.1f}, {scale * hi:.1f}]"
        verdict = "" if not entry.get("excludes_zero") else (" (gain)" if lo > 0 else " (worse)")
        return f"{scale * value:.1f}{ci}{verdict}"

    headers = ["finding", "positives", "prevalence"]
    for loss in args.losses:
        headers += [f"{loss} F1", f"{loss} recall", f"{loss} AUROC"]
        if loss != "bce":
            headers += [f"{loss} - bce F1 (points)", f"{loss} - bce recall (points)"]
    rows = []
    for k in sorted(present, key=lambda k: prevalence[k]):
        row: list = [findings[k] + (" (rare)" if k in rare else ""), int(labels[:, k].sum()), f"{prevalence[k]:.1%}"]
        for loss in args.losses:
            e = arms[loss]["per_finding"][findings[k]]
            row += [cell(e["f1"], 100), cell(e["recall"], 100), round(e["auroc"], 3)]
            if loss != "bce":
                row += [cell(e["f1_change_points"]), cell(e["recall_change_points"])]
        rows.append(row)
    macro_rows = []
    for loss in args.losses:
        a = arms[loss]
        macro_rows.append(
            [
                loss,
                cell(a["macro_f1"], 100),
                cell(a["macro_f1_rare"], 100),
                cell(a["macro_f1_change_points"]) if loss != "bce" else "",
                cell(a["macro_f1_rare_change_points"]) if loss != "bce" else "",
                a["training_seconds"],
            ]
        )
    data_out = {
        "arms": arms,
        "rare_findings": [findings[k] for k in rare],
        "rare_prevalence_below": RARE_PREVALENCE,
        "n_images": len(labels),
        "folds": args.folds,
        "thresholds": "per fold, F1-optimal on the other folds' held-out predictions (cross-fitted)",
        "recipe": {k: v for k, v in vars(args).items() if k not in ("resume", "run_folds", "run_members", "summary")},
        "command": common.command_line(),
        "duration_s": round(time.time() - started, 1),
        "environment": common.environment(),
    }
    sections = [
        f"{len(labels)} images, {args.folds} patient folds, {args.members} model(s) per fold; rare = prevalence "
        f"< {RARE_PREVALENCE:.0%} ({', '.join(data_out['rare_findings'])}). Thresholds: {data_out['thresholds']}. "
        "F1 and recall in %, 95% patient-bootstrap intervals; changes vs BCE paired, in points.\n",
        common.md_table(
            ["loss", "macro-F1", "macro-F1 (rare)", "change vs bce", "change vs bce (rare)", "training s"], macro_rows
        )
        + "\n",
        common.md_table(headers, rows) + "\n",
    ]
    if args.out or not args.quick:
        title = "Imbalance scenario: F1 and recall of the rare findings"
        common.write_results(args.out_name or "imbalance", title, sections, data_out, folder=args.out)
    print("\n".join(sections), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
