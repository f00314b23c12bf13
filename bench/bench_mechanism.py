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
* both: gradient penalty + counterfactual rows on the physicians' masks alone;
* propagation (default): the product's default, ``both`` after mask propagation (train/mask_propagation.py: the
  marked artefacts found in the unmasked images by a detector on the model's features). Its detection is
  scored against the true markers: share of unmasked marked images found, share of marker-free images given
  a mask.

Primary measure: ΔP, the mean change of the Cardiomegaly probability when a tag is added to the same marker-free
test image (paired). Also the finding's AUROC and the macro AUROC over every finding with both classes in the
marker-free test fold, and a clean model (never saw a marker).

Run: ``.venv/bin/python bench/bench_mechanism.py --shares 0.1 0.25 1.0`` (about 15 min per seed on 2 shared
cores); ``--seeds 0`` for one. The paste-rate sweep: ``--shares 0.25 --arms both --paste-rates 0.8 1.0
--name mechanism_paste_rate``; detector thresholds: ``--false-cells 0.1 2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import simulation as sim  # noqa: E402

from ml_backend.measure.metrics import per_finding_metrics  # noqa: E402
from ml_backend.train.losses import LossConfig  # noqa: E402
from ml_backend.train.mask_propagation import PropagationConfig, propagate_ignore_masks  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data" / "nih1000"
OFF = LossConfig(prediction="wbce", ignore_weight=0.0, evidence_weight=0.0, counterfactuals=False)
DEFAULT = LossConfig(evidence_weight=0.0)  # no evidence masks in this scenario
# name -> (loss, mask propagation or None)
PROPAGATION_FIELDS = {f.name: getattr(PropagationConfig(), f.name) for f in fields(PropagationConfig)}
# the fields --propagation-variants may change (a bool or a string is another arm's business)
NUMERIC_FIELDS = {
    f.name: value
    for config in (PropagationConfig(), DEFAULT)
    for f in fields(config)
    if type(value := getattr(config, f.name)) in (int, float)
}
ARMS: dict[str, tuple[LossConfig, PropagationConfig | None]] = {
    "labels only": (OFF, None),
    "input gradient": (replace(OFF, ignore_weight=0.1), None),
    "counterfactual": (replace(OFF, counterfactuals=True), None),
    "both": (DEFAULT, None),
    "propagation (default)": (DEFAULT, PropagationConfig()),
}


def arms(args: argparse.Namespace) -> dict[str, tuple[LossConfig, PropagationConfig | None]]:
    chosen = {name: arm for name, arm in ARMS.items() if name == "labels only" or name in args.arms}
    for rate in args.paste_rates:  # counterfactual rows with another share of pasted artefacts
        chosen[f"both, paste rate {rate:g}"] = (replace(DEFAULT, artefact_paste_rate=rate), None)
    for rate in args.false_cells:  # the default with another detector threshold
        chosen[f"propagation, false cells {rate:g}"] = (DEFAULT, PropagationConfig(false_cells_per_image=rate))
    for cells in args.grow_cells:  # the default with found masks grown by another margin
        chosen[f"propagation, grown {cells} cells"] = (DEFAULT, PropagationConfig(grow_cells=cells))
    for experts in args.experts:  # the default with a detector per cluster of masked cells (bench_detector.py)
        chosen[f"propagation, {experts} experts"] = (DEFAULT, PropagationConfig(experts=experts))
    for rate in args.propagation_paste_rates:  # the default pasting the painted artefacts onto another share
        chosen[f"propagation, paste rate {rate:g}"] = (replace(DEFAULT, artefact_paste_rate=rate), PropagationConfig())
    for text in args.propagation_variants:  # several of the changes above at once
        name, arm = propagation_variant(text)
        chosen[name] = arm
    return chosen


def propagation_variant(text: str) -> tuple[str, tuple[LossConfig, PropagationConfig]]:
    """``"experts=2,artefact_paste_rate=1"`` -> the default arm with those PropagationConfig and LossConfig
    fields changed, named after them. Raises ValueError on an unknown field or a value of the wrong type."""
    propagation: dict[str, Any] = {}
    loss: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in NUMERIC_FIELDS:
            raise ValueError(f"unknown or non-numeric field {key!r} in {text!r}; known: {', '.join(NUMERIC_FIELDS)}")
        (propagation if key in PROPAGATION_FIELDS else loss)[key] = type(NUMERIC_FIELDS[key])(value)
    changes = {**propagation, **loss}
    name = "propagation, " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in changes.items())
    return name, (replace(DEFAULT, **loss), PropagationConfig(**propagation))


def detection(
    model, tensors, config: PropagationConfig, markers: list, kinds: list, chosen: set[int], seed: int
) -> dict:
    """Mask propagation scored against the true markers (the same call fine_tune makes, so the same masks)."""
    found, report = propagate_ignore_masks(model, tensors, config, seed=seed)
    score = sim.score_propagation(found, markers, chosen, kinds)
    return {**score, "threshold": report.threshold, "skipped": report.skipped}


def seed_split(
    seed: int, data: sim.LabelledImages, kinds: tuple[str, ...]
) -> tuple[sim.LabelledImages, sim.LabelledImages, sim.Shortcut, np.ndarray, list, list]:
    """One seed's training and test split, its shortcut and the stamped training images with their markers and
    kinds (bench_detector.py draws the same)."""
    test_idx = sim.patient_folds(data.patients, 5, seed=0)[seed % 5]
    train = data.subset(np.setdiff1d(np.arange(len(data)), test_idx))
    shortcut = sim.Shortcut(kinds=kinds)
    images, markers, marker_kinds = sim.inject_shortcut(train, shortcut, np.random.default_rng(seed))
    return train, data.subset(test_idx), shortcut, images, markers, marker_kinds


def physician_masked(markers: list, share: float, seed: int) -> set[int]:
    """The marked training images a physician masked: ``share`` of them, drawn per seed."""
    marked = [i for i, m in enumerate(markers) if m is not None]
    rng = np.random.default_rng(10_000 + seed)
    return set(rng.choice(marked, size=max(1, round(len(marked) * share)), replace=False).tolist())


def scratch_model(seed: int, train: sim.LabelledImages, pixels: np.ndarray, device: str) -> torch.nn.Module:
    """A model trained from scratch on ``pixels`` with ``train``'s labels (the biased live version, or the clean
    one on marker-free pixels)."""
    spec = sim.ModelSpec()
    model = sim.new_model(spec, len(train.findings), seed).to(device)
    sim.train(model, sim.make_tensors(model, spec, pixels, train.labels), replace(spec.scratch, loss=OFF), seed)
    return model


def run_seed(seed: int, data: sim.LabelledImages, args: argparse.Namespace) -> dict:
    started = time.time()
    train, test, shortcut, images, markers, kinds = seed_split(seed, data, tuple(args.kinds))
    spec = sim.ModelSpec()
    thresholds = np.full(len(data.findings), 0.5)

    def measure(model: torch.nn.Module) -> dict:
        r = sim.evaluate(model, spec, test, shortcut, thresholds, seed=1000 + seed, with_bias_metrics=False)
        # every finding, not only the shortcut's: removing a shortcut must not cost the others their accuracy
        macro = per_finding_metrics(test.labels, r["probabilities"], test.findings, 0.5)["macro_auroc"]
        return {"delta_p": r["delta_p"], "auroc": r["shortcut_auroc"], "macro_auroc": macro}

    biased = scratch_model(seed, train, images, args.device)
    clean = scratch_model(seed, train, train.images, args.device)
    out: dict[str, Any] = {"seed": seed, "biased": measure(biased), "clean": measure(clean), "arms": {}}
    for share in args.shares:
        chosen = physician_masked(markers, share, seed)
        ignore = [markers[i] if i in chosen else None for i in range(len(images))]
        for name, (loss, propagation) in arms(args).items():
            if name == "labels only" and share != args.shares[0]:
                out["arms"][f"{name} @ {share:.0%}"] = out["arms"][f"{name} @ {args.shares[0]:.0%}"]
                continue
            t0 = time.time()
            model = copy.deepcopy(biased)
            tensors = sim.make_tensors(model, spec, images, train.labels, ignore=ignore)
            found = detection(model, tensors, propagation, markers, kinds, chosen, seed) if propagation else {}
            config = replace(spec.finetune, loss=loss, epochs=args.epochs, propagation=propagation)
            sim.train(model, tensors, config, seed)
            out["arms"][f"{name} @ {share:.0%}"] = {
                **measure(model),
                **found,
                "seconds": time.time() - t0,
                "masks": len(chosen),
            }
    out["seconds"] = time.time() - started
    out["device"] = common.device_name(args.device)
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
        return np.array([pick(r).get(key, np.nan) for r in runs], dtype=float)

    table = {
        row: {
            key: {
                "mean": float(values(row, key).mean()),
                "sd": float(values(row, key).std(ddof=1)) if len(runs) > 1 else None,
                "per_seed": values(row, key).round(4).tolist(),
            }
            for key in ("delta_p", "auroc", "macro_auroc", "marked_found", "clean_masked")
        }
        for row in rows
    }
    summary = {
        "command": runs[0].get("command", command),  # how the first seed was measured, not a re-render
        "seeds": [r["seed"] for r in runs],
        "epochs": args.epochs,
        "kinds": args.kinds,
        "table": table,
        "seconds_per_seed": float(np.mean([r["seconds"] for r in runs])),
        "devices": sorted({r.get("device", "unrecorded") for r in runs}),
        "date": max(r.get("date", "") for r in runs) or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "runs": runs,
    }
    # per artefact kind, for the arms that propagate (seeds measured before found_by_kind was recorded are left out)
    by_kind: dict[str, dict[str, float]] = {}
    for row in rows[2:]:
        recorded = [r["arms"][row]["found_by_kind"] for r in runs if "found_by_kind" in r["arms"][row]]
        if recorded:
            by_kind[row] = {kind: float(np.nanmean([f.get(kind, np.nan) for f in recorded])) for kind in args.kinds}
    summary["found_by_kind"] = by_kind
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summary, indent=1))

    def fmt(cell: dict) -> str:
        if cell["mean"] != cell["mean"]:  # nan: not measured for this row
            return ""
        return f"{cell['mean']:.3f}" + (f" ± {cell['sd']:.3f}" if cell["sd"] is not None else "")

    lines = [
        "# Mechanism: which ignore-mask term removes a learnt shortcut (`bench/bench_mechanism.py`)",
        "",
        f"- Date: {summary['date']}; {'; '.join(summary['devices'])}",
        f"- Seeds {summary['seeds']} (each: its own test fold, marker draw and initialisation); {args.epochs} "
        f"fine-tuning epochs from the biased model; artefact kinds {args.kinds}; "
        f"{summary['seconds_per_seed']:.0f} s per seed.",
        f"- Reproduce: `{command}`",
        "",
        "ΔP = mean change of the Cardiomegaly probability when the artefact is added to the same marker-free test "
        "image (0 = no dependence). AUROC on the marker-free test fold. Mean ± sd over seeds; per-seed values in "
        f"{args.name}.json. `@ 25%` = ignore masks on a quarter of the marked training images. Mask propagation: "
        "`found` = share of the unmasked marked images given a mask covering half the marker or more, `clean "
        "masked` = share of marker-free training images given a mask.",
        "",
        "| model | ΔP | Cardiomegaly AUROC | macro AUROC | found | clean masked |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row} | "
        + " | ".join(
            fmt(table[row][key]) for key in ("delta_p", "auroc", "macro_auroc", "marked_found", "clean_masked")
        )
        + " |"
        for row in rows
    ]
    if by_kind:
        lines += ["", "`found` per artefact kind (mean over the seeds that recorded it):", ""]
        lines += [f"| model | {' | '.join(args.kinds)} |", "|---|" + "---|" * len(args.kinds)]
        lines += [
            f"| {row} | " + " | ".join(f"{v:.3f}" for v in cells.values()) + " |" for row, cells in by_kind.items()
        ]
    base = table[f"labels only @ {args.shares[0]:.0%}"]["delta_p"]["mean"]
    lines += ["", "ΔP relative to labels-only fine-tuning (mean over seeds):", ""]
    lines += [
        f"- {row}: {100 * (table[row]['delta_p']['mean'] / base - 1):+.0f}%"
        for row in rows
        if row not in ("biased", "clean") and not row.startswith("labels only")
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.summary:
        common.update_summary({"mixed_artefacts_10pct_reduction_pct": propagation_reduction(table, args, summary)})


def propagation_reduction(table: dict, args: argparse.Namespace, summary: dict) -> dict:
    """What issue 16 part 4 asks for: the default's ΔP relative to labels-only fine-tuning, both with masks on
    the same share of the marked images (mean over seeds, and per seed)."""
    share = f"{args.shares[0]:.0%}"
    ours, labels = table[f"propagation (default) @ {share}"]["delta_p"], table[f"labels only @ {share}"]["delta_p"]
    per_seed = [round(100 * (a / b - 1), 1) for a, b in zip(ours["per_seed"], labels["per_seed"], strict=True)]
    # 95% interval of the ratio of means, resampling seeds (each its own marker draw, fold and initialisation)
    a, b = np.array(ours["per_seed"]), np.array(labels["per_seed"])
    pick = np.random.default_rng(0).integers(0, len(a), size=(2000, len(a)))
    ratios = 100 * (a[pick].mean(axis=1) / b[pick].mean(axis=1) - 1)
    return {
        "value": round(100 * (ours["mean"] / labels["mean"] - 1), 1),
        "interval_95": [round(float(np.percentile(ratios, q)), 1) for q in (2.5, 97.5)],
        "per_seed": per_seed,
        "mask_share": args.shares[0],
        "kinds": args.kinds,
        "seeds": summary["seeds"],
        "command": summary["command"],
        "results": f"bench/results/{args.name}.md",
    }


def earlier_runs(path: Path) -> list[dict]:
    """The per-seed runs of an earlier results file (``--resume``)."""
    return json.loads(path.read_text()).get("runs", []) if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--kinds", nargs="+", default=["tag"])
    parser.add_argument(
        "--grow-cells", type=int, nargs="*", default=[], help="arms: the default with found masks grown by N cells"
    )
    parser.add_argument(
        "--experts", type=int, nargs="*", default=[], help="arms: the default with N linear detectors (experts)"
    )
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="labels only always runs")
    parser.add_argument("--paste-rates", type=float, nargs="*", default=[], help="extra ARTEFACT_PASTE_RATE arms")
    parser.add_argument("--false-cells", type=float, nargs="*", default=[], help="extra detector threshold arms")
    parser.add_argument(
        "--propagation-paste-rates",
        type=float,
        nargs="*",
        default=[],
        help="arms: the default (mask propagation) with another ARTEFACT_PASTE_RATE",
    )
    parser.add_argument(
        "--propagation-variants",
        nargs="*",
        default=[],
        help='arms: the default with several changes at once, e.g. "experts=2,artefact_paste_rate=1" '
        "(numeric PropagationConfig and LossConfig fields)",
    )
    parser.add_argument("--data", type=Path, default=DATA, help="the nih1000 folder")
    parser.add_argument("--resume", action="store_true", help="keep the seeds already in the results file")
    parser.add_argument("--device", default=common.default_device())
    parser.add_argument("--name", default="mechanism", help="results file stem in bench/results")
    parser.add_argument(
        "--summary",
        action="store_true",
        help="record the default's ΔP change vs labels only as mixed_artefacts_10pct_reduction_pct in "
        "summary.json (needs --shares 0.1 first, several --kinds and the 'propagation (default)' arm)",
    )
    args = parser.parse_args()
    try:
        [propagation_variant(text) for text in args.propagation_variants]
    except ValueError as error:
        parser.error(str(error))
    if args.summary and (args.shares[0] != 0.1 or len(args.kinds) < 2 or "propagation (default)" not in args.arms):
        parser.error("--summary needs --shares 0.1 ..., several --kinds and --arms 'propagation (default)'")
    if not args.data.exists():
        sys.exit(f"{args.data} is absent: this benchmark needs ../shared/data/nih1000")
    data = sim.load_manifest_folder(args.data)
    command = shlex.join(["python", "bench/bench_mechanism.py", *sys.argv[1:]])
    runs = earlier_runs(RESULTS / f"{args.name}.json") if args.resume else []
    done = {r["seed"] for r in runs}
    for seed in [s for s in args.seeds if s not in done]:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        runs.append({**run_seed(seed, data, args), "command": command, "date": when})
        write(runs, args, command)  # after each seed: a run cut short keeps what it measured
    if runs and set(args.seeds) <= done:  # nothing new: re-render the tables from the stored runs
        write(runs, args, command)


if __name__ == "__main__":
    main()
