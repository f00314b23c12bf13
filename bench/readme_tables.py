"""Regenerate the README's issue-16 tables (simulated physicians, base models, imbalance, co-occurrence) from
bench/results/*.json.

The README quotes numbers that a benchmark wrote; typing them by hand lets the two drift apart. This script
rewrites each block between a pair of markers below from the results files, and ``--check`` (run by the tests)
fails when a README block differs from what the files say.

Run: ``.venv/bin/python bench/readme_tables.py`` (writes README.md) or ``--check``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START = "<!-- tables from bench/readme_tables.py: edit the results, not this block -->"
END = "<!-- end of the generated tables -->"
PHYSICIAN_START = "<!-- physician tables from bench/readme_tables.py: edit the results, not this block -->"
PHYSICIAN_END = "<!-- end of the physician tables -->"
# bench_physician's arms, as the README names them
ARM_NAMES = {
    "clean": "clean model (trained without markers)",
    "initial_bce": "initial model, BCE",
    "initial_wbce": "initial model, weighted BCE",
    "baseline": "**baseline**: BCE, random order",
    "imbalance": "weighted BCE, labels only, random order",
    "attention_random": "attention loss, random order",
    "attention_entropy": "attention loss, entropy order",
    "attention_bald": "attention loss, BALD order",
    "full": "**full system**: attention loss, bias-aware order",
}
# the clean-model runs, in the order the README shows them
BASE_RUNS = (
    "base_models",
    "base_models_imgnorm",
    "base_models_wbce",
    "base_models_ema",
    "base_models_x3",
    "base_models_96",
    "base_models_96_tta",
    "base_models_64_mixup",
    "base_models_64_mixup_tta",
    "base_models_80_mixup",
    "base_models_80_mixup_tta",
    "base_models_80_mixup_x2",
    "base_models_80_mixup_hflip",
    "base_models_96_mixup",
    "base_models_64_mixup_resnet18d",
    "base_models_64_mixup_2splits",
    "base_models_64_mixup_resnet18d_2splits",
    "base_models_80_mixup_2splits",
    "base_models_64_mixup_resnet18d_strat",
    "base_models_80_mixup_strat",
)


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _change_cell(value: float | None, interval: list[float] | None, unit: str, missing: str = "n/a") -> str:
    """ "+1.0% [-2.6, +4.4]", marked where the interval excludes zero (the issue's rule for a gain)."""
    if value is None:
        return missing
    text = f"{value:+.1f}{unit}" + ("" if not interval else f" [{interval[0]:+.1f}, {interval[1]:+.1f}]")
    return text + (" **(excludes 0)**" if interval and (interval[0] > 0 or interval[1] < 0) else "")


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(entry: dict[str, Any] | None, scale: float = 1.0, signed: bool = False) -> str:
    """ "value [lo, hi]" of a {"value", "interval_95"} entry, a change (signed) marked when it excludes zero."""
    if entry is None or entry["value"] is None:
        return "n/a" if entry is not None else ""
    value, (lo, hi) = entry["value"], entry["interval_95"]
    fmt = "+.1f" if signed else ".1f"
    interval = "" if lo is None else f" [{scale * lo:{fmt}}, {scale * hi:{fmt}}]"
    return f"{scale * value:{fmt}}{interval}" + (" **(excludes 0)**" if entry.get("excludes_zero") else "")


def _auroc_cell(run: dict[str, Any], name: str) -> str:
    """A base-model run's AUROC with its patient-bootstrap interval, where the run recorded one."""
    lo_hi = run.get("intervals_95", {}).get(name)
    return _f(run["clean_model_auroc"][name]) + ("" if lo_hi is None else f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]")


def base_models_table() -> list[str]:
    rows = [
        "| recipe (5 patient folds, 2,337 NIH images; split_seeds: repeated on those patient splits, mean shown; "
        "stratify: folds spreading each finding's positives) | "
        "models per fold | Cardiomegaly [95% patient bootstrap] | Effusion | macro (≥ 50 positives) | "
        "macro without Pneumonia | targets 0.78 / 0.75 / 0.72 | training s | file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in BASE_RUNS:
        run = _load(name)
        if run is None:
            continue
        recipe = run["recipe"]
        shown = (
            "size",
            "backbone",
            "epochs",
            "batch_size",
            "weight_decay",
            "norm",
            "output_stride",
            "loss",
            "ema",
            "mixup",
            "hflip",
            "split_seeds",
            "stratify",
        )
        knobs = ", ".join(
            k if recipe[k] is True else f"{k} {recipe[k]}"
            for k in shown
            # knobs left off (or, for weight decay, at the first recipe's 1e-4) are not part of the recipe
            if k in recipe and recipe[k] not in (0.0, "none") and not (k == "weight_decay" and recipe[k] == 1e-4)
        ) + (", test-time augmentation" if recipe.get("tta") else "")
        rows.append(
            f"| {knobs} | {recipe.get('members', 1)} | "
            + " | ".join(_auroc_cell(run, f) for f in ("Cardiomegaly", "Effusion", "macro"))
            + f" | {_f(run.get('macro_excluding_pneumonia'))} | "
            f"{'met' if run['meets_targets'] else 'not met'} | {run['training_seconds_total']:,.0f} | "
            f"`{name}.md` |"
        )
    return rows


def imbalance_table() -> list[str]:
    run = _load("imbalance")
    if run is None:
        return []
    rare = run["rare_findings"]
    rows = [
        f"| loss (5 patient folds, cross-fitted F1-optimal thresholds) | macro-F1 (%) | change vs BCE (points) | "
        f"macro-F1 of the {len(rare)} rare findings (%) | change vs BCE (points) |",
        "|---|---|---|---|---|",
    ]
    for loss, arm in run["arms"].items():
        change = _ci(arm.get("macro_f1_change_points"), signed=True)
        change_rare = _ci(arm.get("macro_f1_rare_change_points"), signed=True)
        rows.append(
            f"| {loss} | {_ci(arm['macro_f1'], 100)} | {change} | {_ci(arm['macro_f1_rare'], 100)} | {change_rare} |"
        )
    rare_rule = f"prevalence < {run['rare_prevalence_below']:.0%}"
    rows += ["", f"Rare ({rare_rule}): {', '.join(rare)}; per finding, with recall, in `imbalance.md`."]
    return rows


def cooccurrence_table() -> list[str]:
    run = _load("cooccurrence")
    if run is None:
        return []
    pair, every, product = run["pair"], run["intervals_95_all"], run["product_arm"]
    names = {"full": "attention loss", "decorrelated": "attention loss + decorrelating weights"}

    def change(key: str, arm: str, unit: str) -> str:
        return _change_cell(run[f"{key}_{arm}"], every.get(f"{key}_{arm}"), unit)

    rows = [
        f"| co-occurrence: {pair['finding']} trained nearly always with {pair['partner']}, decorrelated test | "
        f"Equalized Odds difference over the {pair['partner']} group | change (% reduction), 95% interval | "
        f"{pair['finding']} F1 | change (points), 95% interval |",
        "|---|---|---|---|---|",
        f"| baseline (BCE) | {run['eod_baseline']:.3f} | | {run['f1_baseline']:.3f} | |",
    ]
    for arm, name in names.items():
        rows.append(
            f"| {name}{' (product default)' if arm == product else ''} | {run[f'eod_{arm}']:.3f} | "
            f"{change('eod_reduction_pct', arm, '%')} | {run[f'f1_{arm}']:.3f} | {change('f1_gain_points', arm, '')} |"
        )
    return rows


def _change(summary: dict[str, Any], key: str, unit: str) -> str:
    """A headline change from bench_physician's summary with its interval."""
    missing = "n/a: no gap (clean model < 0.02 above)" if key.startswith("auroc_gap") else "n/a"
    return _change_cell(summary.get(key), summary["intervals_95"].get(key), unit, missing)


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{-value:+.0f}"  # a reduction of 48% reads -48%


def physician_tables() -> list[str]:
    run = _load("summary")
    if run is None or "per_arm" not in run:
        return []
    arms, model, reach = run["per_arm"], run["model"], run["annotations_to_90pct_of_full_reduction"]
    clean, base, wbce, full = arms["clean"], arms["baseline"], arms["imbalance"], arms["full"]
    compute = run.get("compute_seconds")
    learnt = run.get("macro_f1_findings")
    over = f"the {len(learnt)} findings with ≥ 50 held-out positives" if learnt else "all findings"
    rows = [
        f"Measured by `{run['command']}` ({run['seeds']} patient folds; {model.get('data', 'nih1000')}, "
        f"{model['input']} px, {model['backbone']}"
        + (f"; {compute['total'] / 3600:.1f} process-hours, one torch thread each" if compute else "")
        + "). Changes: pooled held-out predictions at the last budget, 95% patient-bootstrap intervals.",
        "",
        "| full system vs | baseline (BCE, random order) | weighted BCE, labels only |",
        "|---|---|---|",
        f"| shortcut dependence ΔP reduction (%): {base['delta_p']:.3f} / {wbce['delta_p']:.3f} → "
        f"{full['delta_p']:.3f} | {_change(run, 'shortcut_dependence_reduction_pct', '%')} | "
        f"{_change(run, 'shortcut_dependence_reduction_pct_vs_imbalance', '%')} |",
        f"| Cardiomegaly AUROC gap recovered (%): clean {clean['shortcut_auroc']:.3f}, "
        f"{base['shortcut_auroc']:.3f} / {wbce['shortcut_auroc']:.3f} → {full['shortcut_auroc']:.3f} | "
        f"{_change(run, 'auroc_gap_recovered_pct', '%')} | "
        f"{_change(run, 'auroc_gap_recovered_pct_vs_imbalance', '%')} |",
        f"| macro-F1 gain (points), {over}: {100 * base['macro_f1']:.1f} / "
        f"{100 * wbce['macro_f1']:.1f} → "
        f"{100 * full['macro_f1']:.1f} | {_change(run, 'macro_f1_gain_points', '')} | "
        f"{_change(run, 'macro_f1_gain_points_vs_imbalance', '')} |",
        f"| worst-finding Equalized Odds difference (sex), reduction (%): {base['eod_sex_worst']:.3f} / "
        f"{wbce['eod_sex_worst']:.3f} → {full['eod_sex_worst']:.3f} | {_change(run, 'eod_reduction_pct', '%')} | "
        f"{_change(run, 'eod_reduction_pct_vs_imbalance', '%')} |",
        f"| Cardiomegaly (the artefact's finding) Equalized Odds difference (sex), reduction (%): "
        f"{_f(base['eod_sex_shortcut'])} / {_f(wbce['eod_sex_shortcut'])} → {_f(full['eod_sex_shortcut'])} | "
        f"{_change(run, 'eod_shortcut_reduction_pct', '%')} | "
        f"{_change(run, 'eod_shortcut_reduction_pct_vs_imbalance', '%')} |",
        "",
        f"Annotations to 90% of the full system's ΔP reduction: bias-aware order vs random order "
        f"{_signed(run.get('annotation_reduction_pct'))}%, "
        f"simulated time {_signed(run.get('annotation_time_reduction_pct'))}%"
        + (" (a lower bound: random order never got there)" if run.get("annotation_reduction_is_lower_bound") else "")
        + "; per ordering in the last column below.",
        "",
        "| arm (last budget) | ΔP (marker) | Cardiomegaly AUROC | macro AUROC | macro-F1 | worst EOD (sex) | "
        "annotations to 90% of the full reduction |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        needed = reach.get(name, {}).get("annotations")
        shown = "" if name not in reach else (f"{needed:.0f}" if needed is not None else f"> {run['budget'][-1]}")
        rows.append(
            f"| {ARM_NAMES.get(name, name)} | {arm['delta_p']:.3f} | {_f(arm['shortcut_auroc'])} | "
            f"{_f(arm['macro_auroc'])} | {100 * arm['macro_f1']:.1f} | {_f(arm['eod_sex_worst'])} | {shown} |"
        )
    sweep = ignore_weight_table()
    return rows + (["", *sweep] if sweep else [])


def ignore_weight_table() -> list[str]:
    """The physician run against its variants that rerun the attention arms under another input-gradient weight
    (bench/results/physician_ignore_weight_*/): the dose-response behind the default weight."""
    found = [("bench/results/summary.json", _load("summary"))]
    for path in sorted(RESULTS.glob("physician_ignore_weight_*/summary.json")):
        found.append((str(path.relative_to(ROOT)), json.loads(path.read_text())))
    runs = [(where, run) for where, run in found if run is not None and "attention_loss" in run]
    if len(runs) < 2:
        return []
    rows = [
        "Input-gradient weight (`IGNORE_LOSS_WEIGHT`) against what it costs, same folds, physician and initial "
        "models (the full system vs the baseline, 95% patient-bootstrap intervals; BALD order alongside):",
        "",
        "| weight | full: ΔP reduction (%) | full: macro-F1 gain (points) | full: macro AUROC | "
        "full: Cardiomegaly AUROC | full: ΔP per fold | BALD: ΔP / macro AUROC | arms not rerun | results |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for where, run in sorted(runs, key=lambda item: item[1]["attention_loss"]["ignore_weight"]):
        full, bald = run["per_arm"]["full"], run["per_arm"]["attention_bald"]
        rows.append(
            f"| {run['attention_loss']['ignore_weight']:g} | "
            f"{_change(run, 'shortcut_dependence_reduction_pct', '%')} | {_change(run, 'macro_f1_gain_points', '')} | "
            f"{_f(full['macro_auroc'])} | {_f(full['shortcut_auroc'])} | "
            f"{', '.join(f'{v:.3f}' for v in run['per_fold_delta_p']['full'])} | "
            f"{bald['delta_p']:.3f} / {_f(bald['macro_auroc'])} | "
            f"{', '.join(run.get('arms_not_rerun', [])) or 'none'} | `{where}` |"
        )
    return rows


def issue16_block() -> list[str]:
    parts = [*base_models_table(), ""]
    for table in (imbalance_table(), cooccurrence_table()):
        if table:
            parts += [*table, ""]
    return parts


# each generated block: its markers and what fills it
BLOCKS = ((PHYSICIAN_START, PHYSICIAN_END, physician_tables), (START, END, issue16_block))


def regenerate(text: str) -> str:
    for start, end, fill in BLOCKS:
        if start not in text or end not in text:
            raise ValueError(f"README.md lacks the markers {start!r} ... {end!r}")
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        body = fill()
        text = head + "\n".join([start, "", *body, *([""] if body and body[-1] else []), end]) + tail
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's block is out of date")
    args = parser.parse_args()
    text = README.read_text()
    try:
        updated = regenerate(text)
    except ValueError as missing:
        print(missing, file=sys.stderr)
        return 1
    if args.check:
        if updated != text:
            print("README.md's generated tables differ from bench/results: run bench/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
