"""Which part of the attention mechanism costs the other findings their accuracy (issue 16, parts 1 and 3).

On the 96 px headline run (``bench_physician.py --base-recipe base_models_96``, folds 0-1) the attention arms
removed ~96% of the shortcut's ΔP, but the macro AUROC over all findings fell from 0.70-0.72 (the same
weighted-BCE fine-tuning without masks) to 0.65-0.69, the more so the more ignore masks the fold had.

This benchmark takes a fold's initial models kept by that run (no retraining), lets the bias-aware ranking
choose the same images for the same budgets, and fine-tunes with one part of the mechanism switched off at a
time: the artefact detector's mask propagation, the counterfactual images (artefacts removed and pasted), the
input-gradient penalty inside ignore masks, the evidence alignment. A part that costs accuracy is one whose
removal raises macro AUROC; a part that removes the shortcut is one whose removal raises ΔP.

Run: ``.venv/bin/python bench/bench_attention_parts.py --base-recipe base_models_96 --folds 1 --budgets 30
--resume`` (one fine-tuning per variant and budget: about 8 min each on one CPU thread at 96 px).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import bench_physician as physician  # noqa: E402
import common  # noqa: E402

from ml_backend.measure.metrics import binarize, per_finding_metrics  # noqa: E402
from ml_backend.train.losses import LossConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NAME = "attention_parts"

# Every variant is the full system (weighted BCE, bias-aware order) with one part changed, measured from the
# mechanism as it was (input-gradient term on every ignore mask, propagated ones included: ``EVERYWHERE``).
# The input-gradient weight is pinned at 0.1, the default when this study ran (the product's is 0 since).
EVERYWHERE = {"prediction": "wbce", "input_gradient_on_propagated": True, "ignore_weight": 0.1}


def _arm(name: str, propagation: bool = True, **loss: object) -> physician.Arm:
    return physician.Arm(name, "wbce", LossConfig(**{**EVERYWHERE, **loss}), "bias", propagation=propagation)  # type: ignore[arg-type]


VARIANTS: dict[str, physician.Arm] = {
    # the default until this benchmark (called "default" in the first command of the results file)
    "input_gradient_everywhere": _arm("input_gradient_everywhere"),
    "labels_only": _arm("labels_only", **physician.NO_ATTENTION),
    "no_propagation": _arm("no_propagation", propagation=False),
    "no_counterfactuals": _arm("no_counterfactuals", counterfactuals=False),
    "no_input_gradient": _arm("no_input_gradient", ignore_weight=0.0),
    # the default since: the input-gradient term on the masks physicians painted only
    "input_gradient_painted_only": _arm("input_gradient_painted_only", input_gradient_on_propagated=False),
    "no_evidence": _arm("no_evidence", evidence_weight=0.0),
}


def round_metrics(labels: np.ndarray, findings: list[str], shortcut: int, measured: dict) -> dict:
    """What one fine-tuned model does on the fold's marker-free test images."""
    p, thresholds = measured["p"], measured["thr"]
    quality = per_finding_metrics(labels, p, findings, 0.5)
    decisions = per_finding_metrics(labels, binarize(p, thresholds).astype(float), findings, 0.5)
    per_finding = {label: row["auroc"] for label, row in quality["per_finding"].items() if row["auroc"] is not None}
    return {
        "delta_p": float(np.mean(measured["dp"])),
        "shortcut_auroc": per_finding.get(findings[shortcut]),
        "macro_auroc": quality["macro_auroc"],
        "macro_f1": decisions["macro_f1"],
        "auroc": per_finding,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-recipe", default="base_models_96")
    parser.add_argument("--folds", type=int, nargs="+", default=[1], help="folds whose kept initial models exist")
    parser.add_argument("--budgets", type=int, nargs="+", default=[30])
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--device", default=common.default_device())
    parser.add_argument("--resume", action="store_true", help="keep the variants already in the results file")
    parser.add_argument("--train-initial", action="store_true", help="train a fold's initial models when none kept")
    args = parser.parse_args()
    # what bench_physician's setup and fold code read
    args.quick, args.backbone, args.out, args.split_seed = False, "resnet10t", RESULTS, 0
    args.n_folds = 5
    physician_args = argparse.Namespace(**{**vars(args), "folds": args.n_folds})
    setup = physician.load_setup(physician_args)
    path = RESULTS / f"{NAME}.json"
    if not args.resume:
        path.unlink(missing_ok=True)
    findings = list(setup.data.findings)
    shortcut = findings.index("Cardiomegaly")
    for fold in args.folds:
        kept = physician.initial_models_file(physician_args, setup, fold)
        if not kept.exists() and not args.train_initial:
            sys.exit(f"{kept} is absent: run bench_physician.py for fold {fold} first, or pass --train-initial")
        for name in args.variants:
            key = f"fold{fold}"
            if name in stored(path)[0].get(key, {}):
                continue
            started = time.time()
            out = physician.run_fold(fold, setup, physician_args, [VARIANTS[name]], initial_file=kept)
            labels = setup.data.labels[np.array(out["test_idx"])]
            rounds = out["arms"][name]
            measured = [
                {
                    "budget": r["budget"],
                    "ignore_masks": r["ignore_masks"],
                    "evidence_images": r["evidence_images"],
                    **round_metrics(labels, findings, shortcut, r),
                }
                for r in rounds
            ]
            # read again just before writing: parallel processes (one per fold) share the file
            results, seconds = stored(path)
            results.setdefault(key, {})[name] = measured
            seconds += time.time() - started
            last = measured[-1]
            print(
                f"fold {fold} {name:20s} ΔP {last['delta_p']:.3f} macro AUROC {last['macro_auroc']:.3f} "
                f"macro F1 {last['macro_f1']:.3f} ({time.time() - started:.0f} s)",
                flush=True,
            )
            write(args, results, seconds)
    results, seconds = stored(path)
    if results:  # also when every variant was stored already: the tables are rewritten from the file
        write(args, results, seconds)


def stored(path: Path) -> tuple[dict, float]:
    """The variants measured so far and their fine-tuning seconds."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    return previous.get("results", {}), float(previous.get("seconds", 0.0))


def write(args: argparse.Namespace, results: dict, seconds: float) -> None:
    rows = []
    for key, variants in sorted(results.items()):
        for name in VARIANTS:
            for r in variants.get(name, []):
                rows.append(
                    [
                        key,
                        name,
                        r["budget"],
                        r["ignore_masks"],
                        round(r["delta_p"], 3),
                        round(r["shortcut_auroc"], 3),
                        round(r["macro_auroc"], 3),
                        round(r["macro_f1"], 3),
                    ]
                )
    headers = ["fold", "variant", "budget", "ignore masks", "ΔP", "Cardiomegaly AUROC", "macro AUROC", "macro F1"]
    sections = [
        f"Machine: {common.device_name(args.device)}; {seconds:.0f} s of fine-tuning. Initial models: the ones "
        f"bench_physician.py kept for `--base-recipe {args.base_recipe}` (same fold, split and images); every "
        "variant is the full system (weighted BCE, bias-aware order) with one part changed; `labels_only` has no "
        "attention part at all. Test images are marker-free; ΔP is the paired change in P(Cardiomegaly) when a "
        "marker is stamped.",
        "",
        common.md_table(headers, rows),
    ]
    path = RESULTS / f"{NAME}.json"
    commands = json.loads(path.read_text()).get("commands", []) if path.exists() else []
    commands = sorted({*commands, common.command_line()})
    sections[0:0] = ["Commands (processes side by side, one per fold, one torch thread each):", ""]
    sections[2:2] = [*(f"- `{c}`" for c in commands), ""]
    data = {"results": results, "seconds": seconds, "finetune_epochs": args.finetune_epochs, "commands": commands}
    common.write_results(NAME, "Attention mechanism: which part costs accuracy", sections, data)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
