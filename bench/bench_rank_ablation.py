"""Which of the bias-aware ranking's signals earn their place (issue 16, part 5).

The simulated-physician loop of ``bench_physician.py`` (same folds, shortcut, physician and cost model), run for
the full system with each ranking signal switched off in turn (its weight set to 0), next to random and BALD
order with the same attention loss. The figure of merit is the one the issue names: annotations needed to reach
90% of the full system's ΔP reduction (interpolated between budgets), per fold and pooled over folds.

Run: ``.venv/bin/python bench/bench_rank_ablation.py --resume`` (folds are cached as they finish);
``--quick`` for a smoke run (one fold, two signals).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import bench_physician as physician  # noqa: E402
import common  # noqa: E402

from ml_backend.rank.strategy.config import SIGNALS  # noqa: E402
from ml_backend.train.losses import LossConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ATTENTION = LossConfig(prediction="wbce")
# The input-gradient weight every study ran under before the product turned it off (6445513). Their cache and
# results files carry no weight in their names, so only a study under this weight may find them again.
LEGACY_IGNORE_WEIGHT = 0.1


def attention_loss(args: argparse.Namespace) -> LossConfig:
    """The arms' loss: the product's, with ``--ignore-weight`` as the input-gradient weight when given."""
    return physician.with_ignore_weight(ATTENTION, args)


def parse_combo(text: str) -> tuple[tuple[str, float], ...]:
    """``"epistemic=3,heatmap=1"`` -> signal weight overrides; raises ValueError on unknown signals."""
    pairs = []
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in SIGNALS:
            raise ValueError(f"unknown signal {name!r} in {text!r}; known: {', '.join(SIGNALS)}")
        pairs.append((name, float(value)))
    return tuple(pairs)


def combo_name(weights: tuple[tuple[str, float], ...]) -> str:
    return "full_" + "_".join(f"{name}{value:g}" for name, value in weights)


DEFAULT_BUDGETS = [30, 60, 120]


def ablation_arms(
    signals: tuple[str, ...],
    combos: tuple[str, ...] = (),
    with_random: bool = True,
    keep_detector: bool = False,
    loss: LossConfig = ATTENTION,
) -> list[physician.Arm]:
    """The reference arms (random order unless ``with_random`` is False, BALD, the default ranking), one drop-one
    arm per signal, one arm per combination of weights and, with ``keep_detector``, the default ranking and BALD
    order with rounds that fall back to the last accepted artefact detector where a new fit declines."""
    weighted = [parse_combo(c) for c in combos]
    references = (("full", "bias"), ("attention_bald", "bald"))
    kept = [physician.Arm(f"{n}_keep_detector", "wbce", loss, o, keep_detector=True) for n, o in references]
    kept = kept if keep_detector else []
    random_arm = [physician.Arm("attention_random", "wbce", loss, "random")] if with_random else []
    return [
        *random_arm,
        physician.Arm("attention_bald", "wbce", loss, "bald"),
        physician.Arm("full", "wbce", loss, "bias"),
        *[physician.Arm(f"full_without_{s}", "wbce", loss, "bias", ((s, 0.0),)) for s in signals],
        *[physician.Arm(combo_name(w), "wbce", loss, "bias", w) for w in weighted],
        *kept,
    ]


def shared_command(argv: list[str]) -> str:
    """The command without --only-folds/--only-arms and their values: what every parallel process shares."""
    kept, skipping = [], False
    for token in argv:
        if token in ("--only-folds", "--only-arms"):
            skipping = True
        elif not (skipping and not token.startswith("--")):
            kept.append(token)
            skipping = False
    return " ".join(["python bench/bench_rank_ablation.py", *kept])


def merge_parts(parts: list[dict]) -> dict:
    """One fold from its per-arm files. Each process trained the fold's seeded initial models or loaded the kept
    ones; the spread of their ΔP across processes (0 on CPU, GPU nondeterminism otherwise) is kept to show it is
    negligible."""
    starts = [float(p["initial"]["wbce"]["dp"].mean()) for p in parts]
    merged = {**parts[0], "arms": {}, "seconds": sum(float(p["seconds"]) for p in parts)}
    merged["initial_spread"] = max(starts) - min(starts)
    merged["machines"] = sorted({p.get("machine", "unrecorded") for p in parts})
    merged["commands"] = sorted({p.get("command", "unrecorded") for p in parts})
    for part in parts:
        merged["arms"].update(part["arms"])
    return merged


def mean_delta_p_over_budgets(fold: dict, arm: str, budgets: list[int]) -> float:
    """The area under one fold's ΔP curve from 0 annotations (the initial model) to the last budget, divided by
    that budget: the mean dependence left over the annotation effort. Lower is a faster removal. Unlike the
    annotations to 90% of the reduction, it does not hinge on where a curve that flattens near the 90% level
    first dips under it (after 10 annotations most curves are already within a few hundredths of that level, and
    single rounds bounce by more)."""
    xs = [0.0, *map(float, budgets)]
    ys = [float(fold["initial"]["wbce"]["dp"].mean()), *(float(r["delta_p"]) for r in fold["arms"][arm])]
    area = sum((ys[i] + ys[i - 1]) / 2 * (xs[i] - xs[i - 1]) for i in range(1, len(xs)))  # trapezoids
    return area / xs[-1]


def reach(folds: list[dict], arms: list[str], budgets: list[int]) -> dict:
    """Annotations each arm needs to reach 90% of the full system's reduction: on the fold-mean curves (as
    bench_physician reports it) and per fold (each fold against its own start and full-system reduction)."""

    def curve(fold_list: list[dict], arm: str) -> list[float]:
        return [float(np.mean([f["arms"][arm][r]["delta_p"] for f in fold_list])) for r in range(len(budgets))]

    def one(fold_list: list[dict]) -> dict[str, float | None]:
        start = float(np.mean([f["initial"]["wbce"]["dp"].mean() for f in fold_list]))
        target = start - 0.9 * (start - curve(fold_list, "full")[-1])
        return {arm: physician.effort_to_reach(start, budgets, curve(fold_list, arm), target) for arm in arms}

    per_fold = [one([f]) for f in folds]
    area = {arm: [mean_delta_p_over_budgets(f, arm, budgets) for f in folds] for arm in arms}
    return {
        "pooled": one(folds),
        "per_fold": {arm: [p[arm] for p in per_fold] for arm in arms},
        "mean_delta_p_over_budgets": {arm: [round(a, 4) for a in values] for arm, values in area.items()},
        "final_delta_p": {arm: [round(float(f["arms"][arm][-1]["delta_p"]), 4) for f in folds] for arm in arms},
        "start_delta_p": [round(float(f["initial"]["wbce"]["dp"].mean()), 4) for f in folds],
        # ΔP after each budget, per arm and fold: another reference arm's target can be computed from the file
        "delta_p_curves": {
            arm: [[round(float(r["delta_p"]), 4) for r in f["arms"][arm]] for f in folds] for arm in arms
        },
    }


def summary_entry(result: dict, suffix: str = "") -> dict:
    """summary.json's key for one ablation run: ``rank_ablation`` plus the results file's suffix."""
    return {
        f"rank_ablation{suffix}": {
            "annotations_to_90pct_of_full_reduction": result["pooled"],
            "per_fold": result["per_fold"],
            "commands": result["commands"],
            "results": f"bench/results/rank_ablation{suffix}.md",
        }
    }


def write_outputs(result: dict, out: Path, suffix: str = "") -> None:
    (out / f"rank_ablation{suffix}.json").write_text(json.dumps(result, indent=1))
    budget_cap = result["budgets"][-1]

    def show(n: float | None) -> str:
        return f"{n:.0f}" if n is not None else f">{budget_cap}"

    pooled, per_fold, final = result["pooled"], result["per_fold"], result["final_delta_p"]
    random_n = pooled.get("attention_random")
    random_run = "attention_random" in pooled
    # files written before the loss was recorded ran under the legacy input-gradient weight
    loss = result.get("attention_loss", f"not recorded (input-gradient weight {LEGACY_IGNORE_WEIGHT})")
    lines = [
        "# Ranking ablation: which signals earn their place (`bench/bench_rank_ablation.py`)",
        "",
        "Commands (each run as parallel processes with `--only-folds F --only-arms ...`, then summarised with "
        "`--no-compute`):",
        "",
        *[f"- `{c}`" for c in result["commands"]],
        "",
        f"Machine: {result['machine']}; {result['seconds']:.0f} s of compute over all processes. Folds: "
        f"{result['folds']} of 5 {'stratified ' if result.get('stratify') else ''}patient folds "
        f"(split seed {result['split_seed']}; 0 = bench_physician's); "
        f"budgets {result['budgets']}; same shortcut, "
        "simulated physician and cost model.",
        "",
        f"Every arm's loss: {loss}.",
        "",
        "Annotations to reach 90% of the full system's ΔP reduction (interpolated between budgets; "
        f"`>{budget_cap}` = not reached within the budget). `pooled` = on the fold-mean ΔP curves; `vs random` = "
        "fewer annotations than random order (a lower bound where random never got there). Every arm uses the "
        "attention loss; `full_without_X` is the default bias-aware ranking with signal X's weight set to 0.",
        "",
        "| ordering | pooled | vs random | per fold | final ΔP per fold |",
        "|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        n = pooled[arm]
        base = random_n if random_n is not None else float(budget_cap)
        versus = f"{100 * (1 - n / base):.0f}%" + ("" if random_n is not None else " (≥)") if n is not None else ""
        versus = versus if random_run else "not run"
        folds_text = ", ".join(show(v) for v in per_fold[arm])
        lines.append(f"| {arm} | {show(n)} | {versus} | {folds_text} | {', '.join(f'{v:.3f}' for v in final[arm])} |")
    area = result.get("mean_delta_p_over_budgets")
    if area and "full" in area:  # files written before this column existed have no curves' area
        lines += [
            "",
            f"Mean ΔP over the first {budget_cap} annotations (the area under each fold's ΔP curve from the "
            "initial model to the last budget, divided by it; lower = faster removal) and each arm's paired "
            "difference from `full` per fold (negative = the arm removes the dependence faster than `full`):",
            "",
            "| ordering | mean over folds | per fold | minus full, per fold | folds faster than full |",
            "|---|---|---|---|---|",
        ]
        for arm in result["arms"]:
            diff = [a - f for a, f in zip(area[arm], area["full"], strict=True)]
            faster = sum(d < 0 for d in diff)
            lines.append(
                f"| {arm} | {np.mean(area[arm]):.4f} | {', '.join(f'{v:.4f}' for v in area[arm])} | "
                f"{', '.join(f'{d:+.4f}' for d in diff)} | {faster} of {len(diff)} |"
            )
    lines += [
        "",
        f"ΔP of the initial (weighted-BCE, biased) model per fold: {result['start_delta_p']} (largest spread "
        f"between the processes that retrained it: {result['initial_delta_p_spread']:.4f}).",
        "",
        "Reading: a signal helps where switching it off needs more annotations than `full`, and hurts where "
        f"fewer. With {result['folds']} folds and one run each, the per-fold spread is the honest error bar.",
    ]
    (out / f"rank_ablation{suffix}.md").write_text("\n".join(lines) + "\n")


def stored_part(path: Path, loss: LossConfig) -> dict | None:
    """A cached (fold, arm) computed under this loss, or None. The study's name carries the input-gradient
    weight; the recorded loss catches any other change of it. Parts from before the record was kept are legacy
    studies'."""
    if not path.exists():
        return None
    part = pickle.loads(path.read_bytes())
    recorded = part.get("attention_loss")
    if recorded is not None and recorded != asdict(loss):
        print(f"{path.name}: computed under another loss ({recorded}), not reused", flush=True)
        return None
    return part


def study_suffix(args: argparse.Namespace, setup: physician.Setup) -> str:
    """The name this study's cache and results files carry: each setting that changes what is measured adds to
    it, and a study with none of them keeps the name the first one had."""
    suffix = f"_split{args.split_seed}" if args.split_seed else ""
    suffix += f"_{setup.name}" if setup.recipe is not None else ""
    suffix += "_stratified" if args.stratify else ""  # bench_physician's stratified folds and kept initial models
    # budgets other than the default grid are another experiment: their own cache and results files
    if not args.quick and args.budgets != DEFAULT_BUDGETS:
        suffix += "_budgets" + "-".join(map(str, args.budgets))
    weight = attention_loss(args).ignore_weight
    suffix += f"_ignore_weight{weight:g}" if weight != LEGACY_IGNORE_WEIGHT else ""
    return suffix + (f"_{args.tag}" if args.tag else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folds", type=int, default=5, help="patient folds the data is split into")
    parser.add_argument("--run-folds", type=int, default=3, help="how many of them to run")
    parser.add_argument("--budgets", type=int, nargs="+", default=DEFAULT_BUDGETS)
    parser.add_argument("--scratch-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--base-recipe", help="initial models from this bench_base_models recipe (bench_physician)")
    parser.add_argument("--device", default=common.default_device(), help="where models train")
    parser.add_argument("--only-folds", type=int, nargs="+", help="compute only these folds (parallel runs)")
    parser.add_argument("--only-arms", nargs="+", help="compute only these arms (parallel runs)")
    parser.add_argument("--split-seed", type=int, default=0, help="patient split; another seed = a replicate")
    parser.add_argument(
        "--stratify",
        action="store_true",
        help="bench_physician's stratified patient folds (each finding's positives spread across them)",
    )
    parser.add_argument("--no-compute", action="store_true", help="summarise the cached folds, compute nothing")
    parser.add_argument("--signals", nargs="*", choices=SIGNALS, default=list(SIGNALS), help="drop-one arms")
    parser.add_argument(
        "--combos", nargs="*", default=[], help="other weightings of the bias strategy, e.g. epistemic=3,heatmap=1"
    )
    parser.add_argument(
        "--without-random", action="store_true", help="skip the random-order arm (a drop-one study compares to full)"
    )
    parser.add_argument(
        "--keep-detector",
        action="store_true",
        help="add full_ and attention_bald_keep_detector: the last accepted detector kept",
    )
    parser.add_argument(
        "--ignore-weight",
        type=float,
        help="the input-gradient weight of every arm (default: the product's LossConfig); part of the study's name",
    )
    parser.add_argument("--tag", default="", help="a name for this study in its cache and results files")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resume", action="store_true", help="reuse folds saved by an earlier run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.quick:  # the pipeline end to end (tests/test_bench_quick.py), not the numbers
        args.run_folds, args.budgets, args.scratch_epochs, args.finetune_epochs = 1, [10, 20], 2, 1
        args.signals = ["heatmap", "epistemic"]
    setup = physician.load_setup(args)
    try:
        arms = ablation_arms(
            tuple(args.signals),
            tuple(args.combos),
            with_random=not args.without_random,
            keep_detector=args.keep_detector,
            loss=attention_loss(args),
        )
    except ValueError as error:
        parser.error(str(error))
    command = shared_command(sys.argv[1:])
    machine = common.device_name(args.device)
    if args.device.startswith("cuda"):  # arms run in separate processes start from the same initial models
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    # One cache file per (fold, arm): an interrupted run resumes, and groups of arms run in parallel processes
    # (--only-folds / --only-arms). A fold's seeded initial models come from bench_physician's kept file
    # (physician.initial_models_file) when one was made with the same settings; the first process to need them
    # trains and keeps them otherwise.
    suffix = study_suffix(args, setup)
    cache = args.out / f".cache_rank_ablation{suffix}"
    cache.mkdir(parents=True, exist_ok=True)
    folds = []
    for f in range(args.run_folds):
        parts = {a.name: cache / f"fold{f}_{a.name}.pkl" for a in arms}
        stored = {a.name: stored_part(parts[a.name], a.loss) for a in arms}  # each part read once
        todo = [a for a in arms if not (args.resume and stored[a.name] is not None)]
        if args.no_compute or (args.only_folds is not None and f not in args.only_folds):
            todo = []
        if args.only_arms:
            todo = [a for a in todo if a.name in args.only_arms]
        if todo:
            out = physician.run_fold(f, setup, args, todo, initial_file=physician.initial_models_file(args, setup, f))
            for a in todo:
                part = {k: v for k, v in out.items() if k != "arms"} | {"arms": {a.name: out["arms"][a.name]}}
                part["seconds"] = out["seconds"] / len(todo)  # the arm's share of its process
                part["machine"], part["command"] = machine, command
                part["attention_loss"] = asdict(a.loss)
                parts[a.name].write_bytes(pickle.dumps(part))
                stored[a.name] = part
        complete = [part for part in stored.values() if part is not None]
        if len(complete) == len(arms):
            folds.append(merge_parts(complete))
    if len(folds) < args.run_folds:
        print(f"{len(folds)} of {args.run_folds} folds complete so far; summarise once all are (--resume)")
        return
    names = [a.name for a in arms]
    result = {
        **reach(folds, names, args.budgets),
        "arms": names,
        "split_seed": args.split_seed,
        "stratify": args.stratify,
        "budgets": args.budgets,
        "folds": len(folds),
        "fold_seconds": [round(float(f["seconds"]), 1) for f in folds],
        "seconds": sum(float(f["seconds"]) for f in folds),
        "initial_delta_p_spread": max(f["initial_spread"] for f in folds),
        # what computed the arms (parallel processes), not the call that summarised them
        "commands": sorted({c for f in folds for c in f["commands"]}),
        "machine": "; ".join(sorted({m for f in folds for m in f["machines"]})),
        "attention_loss": asdict(attention_loss(args)),
    }
    write_outputs(result, args.out, suffix)
    if args.out == RESULTS:  # one key per split and budget grid; summary.json keeps the other benchmarks' keys
        common.update_summary(summary_entry(result, suffix))
    print(json.dumps({k: result[k] for k in ("pooled", "final_delta_p")}, indent=1))


if __name__ == "__main__":
    main()
