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
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, recall_score, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_base_models as base  # noqa: E402
import common  # noqa: E402
import simulation as sim  # noqa: E402

from ml_backend.measure.metrics import bootstrap_ci, choose_thresholds  # noqa: E402

RARE_PREVALENCE = 0.05


def cross_fitted_decisions(labels: np.ndarray, probs: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """Binary decisions where each fold's per-finding thresholds maximise F1 on the other folds' predictions."""
    decisions = np.zeros(labels.shape, dtype=bool)
    for test_idx in folds:
        others = np.setdiff1d(np.arange(len(labels)), test_idx)
        thresholds = choose_thresholds(labels[others], probs[others])
        decisions[test_idx] = probs[test_idx] >= thresholds[None, :]
    return decisions


def _f1(y: np.ndarray, d: np.ndarray) -> float:
    return float(f1_score(y, d, zero_division=0))


def _recall(y: np.ndarray, d: np.ndarray) -> float:
    return float(recall_score(y, d, zero_division=0))


def _macro_f1(columns: list[int]) -> Callable[[np.ndarray, np.ndarray], float]:
    return lambda y, d: float(np.mean([_f1(y[:, k], d[:, k]) for k in columns]))


def _interval(fn: Callable[..., float], *arrays: np.ndarray, patients: np.ndarray, n_boot: int) -> dict:
    point, lo, hi = bootstrap_ci(fn, *arrays, cluster_ids=patients, n_boot=n_boot, seed=0)
    return {"value": point, "interval_95": [lo, hi]}


def _paired(
    fn: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, d: np.ndarray, d_ref: np.ndarray, **kw: object
) -> dict:
    """fn(arm) - fn(BCE) on the same resampled patients, in points (x100); a gain needs its interval above 0."""
    out = _interval(lambda yy, a, b: 100 * (fn(yy, a) - fn(yy, b)), y, d, d_ref, **kw)  # type: ignore[arg-type]
    lo, hi = out["interval_95"]
    out["excludes_zero"] = lo is not None and hi is not None and (lo > 0 or hi < 0)
    return out


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
    folds = sim.patient_folds(data["patients"], args.folds, seed=0)
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
        per_member, fold_seconds = base.held_out_predictions(arm_args, data, folds)
        if np.isnan(per_member).any():
            print(f"incomplete: loss {loss} lacks held-out predictions (run every fold and member)", file=sys.stderr)
            return 2
        probs[loss], seconds[loss] = per_member.mean(0), round(sum(fold_seconds.values()), 1)
    decisions = {loss: cross_fitted_decisions(labels, p, folds) for loss, p in probs.items()}

    boot = {"patients": patients, "n_boot": args.n_boot}
    arms: dict[str, dict] = {}
    for loss in args.losses:
        d, d_ref = decisions[loss], decisions["bce"]
        per_finding = {}
        for k in present:
            y = labels[:, k]
            entry = {
                "f1": _interval(_f1, y, d[:, k], **boot),
                "recall": _interval(_recall, y, d[:, k], **boot),
                "auroc": float(roc_auc_score(y, probs[loss][:, k])),
                "predicted_positive_rate": float(d[:, k].mean()),
            }
            if loss != "bce":
                entry["f1_change_points"] = _paired(_f1, y, d[:, k], d_ref[:, k], **boot)
                entry["recall_change_points"] = _paired(_recall, y, d[:, k], d_ref[:, k], **boot)
            per_finding[findings[k]] = entry
        arm = {
            "per_finding": per_finding,
            "macro_f1": _interval(_macro_f1(present), labels, d, **boot),
            "macro_f1_rare": _interval(_macro_f1(rare), labels, d, **boot),
            "training_seconds": seconds[loss],
        }
        if loss != "bce":
            arm["macro_f1_change_points"] = _paired(_macro_f1(present), labels, d, d_ref, **boot)
            arm["macro_f1_rare_change_points"] = _paired(_macro_f1(rare), labels, d, d_ref, **boot)
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
