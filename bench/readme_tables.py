"""Regenerate the README's issue-16 tables (base models, imbalance, co-occurrence) from bench/results/*.json.

The README quotes numbers that a benchmark wrote; typing them by hand lets the two drift apart. This script
rewrites the block between the two markers below from the results files, and ``--check`` (run by the tests)
fails when the README's block differs from what the files say.

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
# the clean-model runs, in the order the README shows them
BASE_RUNS = (
    "base_models",
    "base_models_imgnorm",
    "base_models_wbce",
    "base_models_ema",
    "base_models_x3",
    "base_models_96",
    "base_models_96_tta",
)


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


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


def base_models_table() -> list[str]:
    rows = [
        "| recipe (5 patient folds, 2,337 NIH images) | models per fold | Cardiomegaly | Effusion | macro "
        "(≥ 50 positives) | macro without Pneumonia | targets 0.78 / 0.75 / 0.72 | training s | file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in BASE_RUNS:
        run = _load(name)
        if run is None:
            continue
        auroc, recipe = run["clean_model_auroc"], run["recipe"]
        knobs = ", ".join(
            f"{k} {recipe[k]}"
            for k in ("size", "backbone", "epochs", "batch_size", "norm", "output_stride", "loss", "ema")
            if k in recipe and recipe[k] not in (0.0, "none")  # knobs left off are not part of the recipe
        ) + (", test-time augmentation" if recipe.get("tta") else "")
        rows.append(
            f"| {knobs} | {recipe.get('members', 1)} | {_f(auroc['Cardiomegaly'])} | {_f(auroc['Effusion'])} | "
            f"{_f(auroc['macro'])} | {_f(run.get('macro_excluding_pneumonia'))} | "
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
        value, interval = run[f"{key}_{arm}"], every.get(f"{key}_{arm}")
        if value is None:
            return "n/a"
        text = f"{value:+.1f}{unit}" + ("" if interval is None else f" [{interval[0]:+.1f}, {interval[1]:+.1f}]")
        return text + (" **(excludes 0)**" if interval and (interval[0] > 0 or interval[1] < 0) else "")

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


def block() -> str:
    parts = [START, "", *base_models_table(), ""]
    for table in (imbalance_table(), cooccurrence_table()):
        if table:
            parts += [*table, ""]
    return "\n".join([*parts, END])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's block is out of date")
    args = parser.parse_args()
    text = README.read_text()
    if START not in text or END not in text:
        print(f"README.md lacks the markers {START!r} ... {END!r}", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    updated = head + block() + tail
    if args.check:
        if updated != text:
            print("README.md's generated tables differ from bench/results: run bench/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
