"""Which ignore-mask term removes a learnt shortcut when fine-tuning? Seeds and spread for issue 3's mechanism.

Setup (as tests/test_shortcut_mechanism.py): ../shared/data/nih1000, one patient fold held out (marker-free);
a text tag (varying corner, size, intensity) stamped on the training images of Cardiomegaly (100% of men's
positives, 80% of women's, 3% of negatives); resnet10t at 64 px, output stride 16, trained from scratch on that
data (the biased live version), then fine-tuned from it for ``--epochs`` epochs on the same data with ignore masks
over the artefact on a share of the marked images, as the product's worker fine-tunes from the live version.

Arms (the product's own trainer and losses):
* labels only: prediction loss (weighted BCE), no mask used;
* input gradient: + RRR penalty inside the masks (m = 0.1, rescaled every step);
* counterfactual: + counterfactual rows (train/counterfactual.py: the marked region filled from another image,
  marked regions pasted onto half the unmasked images with their labels kept), no gradient penalty;
* both: the product's default (LossConfig()).

Primary measure: ΔP, the mean change of the Cardiomegaly probability when a tag is added to the same marker-free
test image (paired). Also the finding's AUROC on the marker-free test fold, and a clean model (never saw a marker).

Run: ``.venv/bin/python bench/bench_mechanism.py --shares 0.1 0.25 1.0`` (about 15 min per seed on 2 shared
cores); ``--seeds 0`` for one. The paste-rate sweep: ``--shares 0.25 --arms "both (default)" --paste-rates 0.8 1.0
--name mechanism_paste_rate``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml_backend.measure import simulation as sim  # noqa: E402
from ml_backend.train.losses import LossConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data" / "nih1000"
OFF = LossConfig(prediction="wbce", ignore_weight=0.0, evidence_weight=0.0, counterfactuals=False)
ARMS = {
    "labels only": OFF,
    "input gradient": replace(OFF, ignore_weight=0.1),
    "counterfactual": replace(OFF, counterfactuals=True),
    "both (default)": LossConfig(evidence_weight=0.0),
}


def arms(args: argparse.Namespace) -> dict[str, LossConfig]:
    chosen = {name: loss for name, loss in ARMS.items() if name == "labels only" or name in args.arms}
    for rate in args.paste_rates:  # the default's counterfactual rows with another share of pasted artefacts
        chosen[f"both, paste rate {rate:g}"] = replace(ARMS["both (default)"], artefact_paste_rate=rate)
    return chosen


def run_seed(seed: int, data: sim.LabelledImages, args: argparse.Namespace) -> dict:
    started = time.time()
    test_idx = sim.patient_folds(data.patients, 5, seed=0)[seed % 5]
    train = data.subset(np.setdiff1d(np.arange(len(data)), test_idx))
    test = data.subset(test_idx)
    shortcut = sim.Shortcut(kinds=tuple(args.kinds))
    images, markers = sim.inject_shortcut(train, shortcut, np.random.default_rng(seed))
    spec = sim.ModelSpec()
    thresholds = np.full(len(data.findings), 0.5)

    def measure(model: torch.nn.Module) -> dict:
        r = sim.evaluate(model, spec, test, shortcut, thresholds, seed=1000 + seed, with_bias_metrics=False)
        return {"delta_p": r["delta_p"], "auroc": r["shortcut_auroc"]}

    def scratch(pixels: np.ndarray) -> torch.nn.Module:
        model = sim.new_model(spec, len(data.findings), seed)
        sim.train(model, sim.make_tensors(model, spec, pixels, train.labels), replace(spec.scratch, loss=OFF), seed)
        return model

    biased = scratch(images)
    out = {"seed": seed, "biased": measure(biased), "clean": measure(scratch(train.images)), "arms": {}}
    marked = [i for i, m in enumerate(markers) if m is not None]
    for share in args.shares:
        rng = np.random.default_rng(10_000 + seed)
        chosen = set(rng.choice(marked, size=max(1, round(len(marked) * share)), replace=False).tolist())
        ignore = [markers[i] if i in chosen else None for i in range(len(images))]
        for name, loss in arms(args).items():
            if name == "labels only" and share != args.shares[0]:
                out["arms"][f"{name} @ {share:.0%}"] = out["arms"][f"{name} @ {args.shares[0]:.0%}"]
                continue
            t0 = time.time()
            model = copy.deepcopy(biased)
            tensors = sim.make_tensors(model, spec, images, train.labels, ignore=ignore)
            sim.train(model, tensors, replace(spec.finetune, loss=loss, epochs=args.epochs), seed)
            out["arms"][f"{name} @ {share:.0%}"] = {**measure(model), "seconds": time.time() - t0, "masks": len(chosen)}
    out["seconds"] = time.time() - started
    print(
        f"seed {seed}: biased ΔP {out['biased']['delta_p']:.3f} clean {out['clean']['delta_p']:.3f} | "
        + " | ".join(f"{k} {v['delta_p']:.3f}" for k, v in out["arms"].items()),
        flush=True,
    )
    return out


def write(runs: list[dict], args: argparse.Namespace, command: str) -> None:
    rows = ["biased", "clean", *runs[0]["arms"].keys()]

    def values(row: str, key: str) -> np.ndarray:
        pick = (lambda r: r[row]) if row in ("biased", "clean") else (lambda r: r["arms"][row])
        return np.array([pick(r)[key] for r in runs], dtype=float)

    table = {
        row: {
            key: {
                "mean": float(values(row, key).mean()),
                "sd": float(values(row, key).std(ddof=1)) if len(runs) > 1 else None,
                "per_seed": values(row, key).round(4).tolist(),
            }
            for key in ("delta_p", "auroc")
        }
        for row in rows
    }
    summary = {
        "command": command,
        "seeds": [r["seed"] for r in runs],
        "epochs": args.epochs,
        "kinds": args.kinds,
        "table": table,
        "seconds_per_seed": float(np.mean([r["seconds"] for r in runs])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summary, indent=1))

    def fmt(cell: dict) -> str:
        return f"{cell['mean']:.3f}" + (f" ± {cell['sd']:.3f}" if cell["sd"] is not None else "")

    lines = [
        "# Mechanism: which ignore-mask term removes a learnt shortcut (`bench/bench_mechanism.py`)",
        "",
        f"- Date: {summary['date']}; CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}",
        f"- Seeds {summary['seeds']} (each: its own test fold, marker draw and initialisation); {args.epochs} "
        f"fine-tuning epochs from the biased model; artefact kinds {args.kinds}; "
        f"{summary['seconds_per_seed']:.0f} s per seed.",
        f"- Reproduce: `{command}`",
        "",
        "ΔP = mean change of the Cardiomegaly probability when the artefact is added to the same marker-free test "
        "image (0 = no dependence). AUROC on the marker-free test fold. Mean ± sd over seeds; per-seed values in "
        f"{args.name}.json. `@ 25%` = ignore masks on a quarter of the marked training images.",
        "",
        "| model | ΔP | Cardiomegaly AUROC |",
        "|---|---|---|",
    ]
    lines += [f"| {row} | {fmt(table[row]['delta_p'])} | {fmt(table[row]['auroc'])} |" for row in rows]
    base = table[f"labels only @ {args.shares[0]:.0%}"]["delta_p"]["mean"]
    lines += ["", "ΔP relative to labels-only fine-tuning (mean over seeds):", ""]
    lines += [
        f"- {row}: {100 * (table[row]['delta_p']['mean'] / base - 1):+.0f}%"
        for row in rows
        if row not in ("biased", "clean") and not row.startswith("labels only")
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--kinds", nargs="+", default=["tag"])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="labels only always runs")
    parser.add_argument("--paste-rates", type=float, nargs="*", default=[], help="extra ARTEFACT_PASTE_RATE arms")
    parser.add_argument("--name", default="mechanism", help="results file stem in bench/results")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} is absent: this benchmark needs ../shared/data/nih1000")
    data = sim.load_manifest_folder(DATA)
    runs = [run_seed(seed, data, args) for seed in args.seeds]
    write(runs, args, ("python bench/bench_mechanism.py " + " ".join(sys.argv[1:])).strip())


if __name__ == "__main__":
    main()
