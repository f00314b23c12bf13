"""Simulated physicians on real chest X-rays: does the whole loop remove a shortcut, and for how much work?

Data: ../shared/data/nih1000 (real NIH X-rays, 64x64), 5-fold patient-level cross-validation (fold = seed), so
every image gets a held-out prediction. Bias sources: the real label imbalance/co-occurrence, and an injected
shortcut: a varied artefact (text tag, tube, ruler; random position, size, intensity) stamped on the training
images of Cardiomegaly, more often for men; the test folds are marker-free.

The loop per arm: an initial model trained on the labelled, biased training split; then rounds in which the
system orders the training pool, a simulated physician reviews the next tasks up to a cumulative budget, and the
model is fine-tuned from the live version on the labelled split plus every mask painted so far (as the
product's worker does with a project's annotations).

Simulated physician: gives the true labels; paints an ignore mask over the artefact when the heatmap of a
finding it shows looks at it (cell enrichment >= 1.5 or the hottest cell on the artefact); gives evidence masks
from the real ChestX-Det regions where they exist. Cost model (an assumption, stated in the results): 20 s to
review an image's findings, +10 s per ignore mask, +15 s per evidence mask.

Run: ``.venv/bin/python bench/bench_physician.py`` (about 30-40 min on 2 CPU cores); ``--quick`` for a smoke run.
``--base-recipe base_models_96`` builds on the clean-model recipe bench_base_models.py measured instead (both NIH
sets, 2,337 images, 96 px, per-image standardisation, EMA: issue 16's credible models); about 75 min per fold on
one CPU thread, so run it on a GPU with one process per fold (``--only-folds F``, then ``--resume``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import pickle
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_base_models as base  # noqa: E402
import common  # noqa: E402
import simulation as sim  # noqa: E402

from ml_backend.explain.cam import HeatmapExplainer, normalise_maps  # noqa: E402
from ml_backend.measure.metrics import (  # noqa: E402
    _encode_groups,
    _eod_vector_fn,
    _f1_vector,
    _num,
    binarize,
    choose_thresholds,
    per_finding_metrics,
)
from ml_backend.measure.shortcut import stamp_marker  # noqa: E402
from ml_backend.models.classifier import normalisation, to_input_tensor  # noqa: E402
from ml_backend.models.store import write_atomic  # noqa: E402
from ml_backend.rank.strategy import RankConfig, RankInputs, mc_dropout_probabilities, rank_candidates  # noqa: E402
from ml_backend.train.losses import LossConfig  # noqa: E402
from ml_backend.train.mask_propagation import ArtefactDetector  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data" / "nih1000"
COST_REVIEW_S, COST_IGNORE_S, COST_EVIDENCE_S = 20.0, 10.0, 15.0


@dataclass(frozen=True)
class Arm:
    name: str
    initial: str  # "bce" or "wbce" initial model
    loss: LossConfig
    order: str  # ranking strategy
    # RankConfig.signal_weights overrides (name, weight) for the bias strategy, e.g. (("heatmap", 0.0),)
    signal_weights: tuple[tuple[str, float], ...] = ()
    # mask propagation (the artefact detector) before fine-tuning; False: physicians' masks only
    propagation: bool = True
    # where a round's detector fit declines, try the last accepted round's detector (an experiment, off by default)
    keep_detector: bool = False


class AttentionTerms(TypedDict):
    """LossConfig's attention terms, to pass as keyword arguments."""

    ignore_weight: float
    evidence_weight: float
    counterfactuals: bool


NO_ATTENTION: AttentionTerms = dict(ignore_weight=0.0, evidence_weight=0.0, counterfactuals=False)
ARMS = [
    Arm("baseline", "bce", LossConfig(prediction="bce", **NO_ATTENTION), "random"),
    Arm("imbalance", "wbce", LossConfig(prediction="wbce", **NO_ATTENTION), "random"),
    Arm("attention_random", "wbce", LossConfig(prediction="wbce"), "random"),
    Arm("attention_entropy", "wbce", LossConfig(prediction="wbce"), "entropy"),
    Arm("attention_bald", "wbce", LossConfig(prediction="wbce"), "bald"),
    Arm("full", "wbce", LossConfig(prediction="wbce"), "bias"),
]


def with_ignore_weight(loss: LossConfig, args: argparse.Namespace) -> LossConfig:
    """``loss`` with ``--ignore-weight`` as its input-gradient weight when the run was given one (this benchmark
    and bench_rank_ablation.py measure a variant of the attention loss the same way)."""
    weight = getattr(args, "ignore_weight", None)
    return loss if weight is None else replace(loss, ignore_weight=weight)


def arms_for(args: argparse.Namespace) -> list[Arm]:
    """The arms this run measures: ARMS, with ``--ignore-weight`` (when given) as the input-gradient weight of
    the arms that have one, so a variant of the attention loss is measured on the same folds and orders."""
    return [replace(a, loss=with_ignore_weight(a.loss, args)) if has_attention(a) else a for a in ARMS]


def has_attention(arm: Arm) -> bool:
    """Whether the arm fine-tunes with the attention loss (any of its terms), not with labels alone."""
    return any(getattr(arm.loss, term) != off for term, off in NO_ATTENTION.items())


def start_from_cache(source: Path, cache: Path, folds: Sequence[int]) -> list[str]:
    """Copy into ``cache`` the folds (results and kept initial models) it lacks from another run's cache, so a
    variant run with ``--rerun-arms`` recomputes only its arms and keeps the others as that run measured them.
    Nothing already in ``cache`` is replaced. Returns the names copied."""
    copied = []
    for fold in folds:
        for file in [source / f"fold{fold}.pkl", *sorted(source.glob(f"fold{fold}-*.initial.pt"))]:
            target = cache / file.name
            if file.exists() and not target.exists():
                write_atomic(target, file.read_bytes())  # whole or not at all, like every file in the cache
                copied.append(file.name)
    return copied


@dataclass(frozen=True)
class Setup:
    """The data, the model shape and how the initial models are trained, shared by every fold and arm."""

    data: sim.LabelledImages
    spec: sim.ModelSpec
    # bench_base_models' recipe (a results file's "recipe") for the initial and clean models; None: the product's
    # trainer for ``--scratch-epochs`` on nih1000 (the benchmark's first, weak setting)
    recipe: argparse.Namespace | None = None
    name: str = "nih1000"  # names the cache, so folds of different setups never mix
    # each image's source (nih1000, or nih_hires and where it came from): their label mixes differ, so the
    # summary is also given per source (shared/data/README.md); None when there is only one
    sources: np.ndarray | None = None

    def describe(self) -> dict:
        shape = {
            "backbone": self.spec.backbone,
            "input": self.spec.input_size,
            "output_stride": self.spec.output_stride,
        }
        if self.recipe is None:
            return {**shape, "data": "nih1000", "initial_models": "product trainer, --scratch-epochs"}
        return {**shape, "data": "+".join(self.recipe.sets), "initial_models": self.name, "recipe": vars(self.recipe)}


def load_setup(args: argparse.Namespace) -> Setup:
    """``--base-recipe NAME``: the data and recipe measured in bench/results/NAME.json (issue 16 part 1's clean
    model); otherwise nih1000 and the product's trainer."""
    name = getattr(args, "base_recipe", None)
    if not name:
        if not DATA.exists():
            sys.exit(f"{DATA} is absent: this benchmark needs ../shared/data/nih1000")
        return Setup(sim.load_manifest_folder(DATA), sim.ModelSpec(backbone=args.backbone))
    common.require_shared()
    recipe = base.load_recipe(name)
    if args.quick:  # the pipeline, not the numbers
        recipe.epochs = 1
    raw = base.load(recipe.size, recipe.sets, recipe.norm)
    data = sim.LabelledImages(
        raw["images"],
        raw["labels"],
        base.FINDINGS,
        raw["patients"],
        raw["sex"],
        raw["age"],
        base.evidence_regions(recipe.size, recipe.sets),
    )
    spec = sim.ModelSpec(backbone=recipe.backbone, output_stride=recipe.output_stride, input_size=recipe.size)
    return Setup(data, spec, recipe, name, np.asarray(raw["source"]))


def cams_and_probs(model: torch.nn.Module, spec: sim.ModelSpec, images: np.ndarray):
    mean, std = normalisation(model)
    x = to_input_tensor(list(images), spec.input_size, mean, std).to(next(model.parameters()).device)
    explainer = HeatmapExplainer(model.eval())
    probs, cams, feats = [], [], []
    with torch.no_grad():
        for start in range(0, len(x), 128):
            f = explainer.features(x[start : start + 128])
            logits, maps = explainer.logits_and_cams_from_features(f)
            probs.append(torch.sigmoid(logits).cpu())
            cams.append(normalise_maps(maps).cpu())
            feats.append(f.mean(dim=(2, 3)).cpu())
    return torch.cat(probs).numpy(), torch.cat(cams).numpy(), torch.cat(feats).numpy(), x


def physician_sees_marker(cam: np.ndarray, probs: np.ndarray, marker: np.ndarray) -> bool:
    """Would a physician looking at the shown heatmaps notice attention on the artefact?"""
    h, w = cam.shape[-2:]
    cover = F.adaptive_max_pool2d(torch.from_numpy(marker.astype(np.float32))[None, None], (h, w))[0, 0].numpy() > 0
    if not cover.any():
        return False
    shown = [k for k in range(len(probs)) if probs[k] >= max(0.5, 0.5 * probs.max())] or [int(np.argmax(probs))]
    for k in shown:
        mass = cam[k].sum()
        if mass <= 0:
            continue
        enrichment = (cam[k][cover].sum() / mass) / cover.mean()
        if enrichment >= 1.5 or cover.flat[int(np.argmax(cam[k]))]:
            return True
    return False


def cache_dir(args: argparse.Namespace, setup: Setup) -> Path:
    """Where this setup's folds, checkpoints and initial models are cached (gitignored)."""
    name = "" if setup.recipe is None else f"{setup.name}-split{args.folds}"
    if getattr(args, "stratify", False):  # only then: the plain folds' caches keep their names
        name = f"{name}-stratified" if name else "stratified"
    return args.out / ".cache" / name


def held_out_folds(args: argparse.Namespace, data: sim.LabelledImages) -> list[np.ndarray]:
    """The patient folds every arm is measured on; --stratify spreads each finding's positives across them."""
    seed = getattr(args, "split_seed", 0)  # another split seed: an independent replicate
    labels = data.labels if getattr(args, "stratify", False) else None
    return sim.patient_folds(data.patients, args.folds, seed=seed, stratify_by=labels)


def initial_settings(args: argparse.Namespace, setup: Setup) -> dict:
    """What a fold's initial models depend on: a checkpoint or kept file made otherwise is not reused."""
    settings = {"setup": setup.describe(), "folds": args.folds, "split_seed": getattr(args, "split_seed", 0)}
    if getattr(args, "stratify", False):  # only when set: files made before the option keep their digest
        settings["stratify"] = True
    if setup.recipe is None:
        settings["scratch_epochs"] = args.scratch_epochs
    return settings


def initial_models_file(args: argparse.Namespace, setup: Setup, fold: int) -> Path:
    """A fold's initial and clean models' measurements and the initial models, kept after the fold is done:
    bench_rank_ablation starts its arms from them instead of retraining (an hour per 96 px fold on a CPU).
    Named by a digest of the settings, so runs with other settings keep files of their own."""
    digest = hashlib.sha1(json.dumps(initial_settings(args, setup), sort_keys=True, default=str).encode())
    return cache_dir(args, setup) / f"fold{fold}-{digest.hexdigest()[:10]}.initial.pt"


def save_initial_models(
    path: Path, settings: dict, initial: dict[str, torch.nn.Module], out: dict, seconds: float | None
) -> None:
    """Written whole, then renamed: a kill mid-write leaves no half file. ``seconds``: the initial models'
    compute, None where it was not recorded (a fold resumed from a checkpoint made before this file existed)."""
    measured = {k: out[k] for k in ("fold", "test_idx", "clean", "initial")}
    buffer = io.BytesIO()
    torch.save({"initial_settings": settings, "initial": initial, "measured": measured, "seconds": seconds}, buffer)
    write_atomic(path, buffer.getvalue())  # a temp file of its own: parallel ablation processes may write it


def run_fold(
    fold: int,
    setup: Setup,
    args: argparse.Namespace,
    arms: list[Arm] = ARMS,
    checkpoint: Path | None = None,
    initial_file: Path | None = None,
) -> dict:
    """One fold: the initial and clean models, then every arm's rounds. With ``checkpoint``, the initial models
    and each finished arm are saved there as they come, and a rerun continues from them: a 96 px fold takes over
    an hour on one CPU thread, and an interrupted one would otherwise start over. Arms are seeded by the fold
    alone, so an arm computed after a resume equals the one an uninterrupted run computes. With
    ``initial_file`` (:func:`initial_models_file`), the initial models are taken from it when it was made with
    the same settings, and kept in it otherwise."""
    started = time.time()
    saved = torch.load(checkpoint, weights_only=False) if checkpoint is not None and checkpoint.exists() else None
    data, spec = setup.data, setup.spec
    test_idx = held_out_folds(args, data)[fold]
    rest = np.setdiff1d(np.arange(len(data)), test_idx)
    # a validation slice of the training patients (biased like training) chooses decision thresholds
    val_patients = set(np.random.default_rng(100 + fold).permutation(np.unique(data.patients[rest]))[: len(rest) // 40])
    val_idx = np.array([i for i in rest if data.patients[i] in val_patients])
    train_idx = np.array([i for i in rest if data.patients[i] not in val_patients])
    train, val, test = data.subset(train_idx), data.subset(val_idx), data.subset(test_idx)
    shortcut = sim.Shortcut()
    rng = np.random.default_rng(fold)
    train_images, marker_masks, _ = sim.inject_shortcut(train, shortcut, rng)
    val_images, _, _ = sim.inject_shortcut(val, shortcut, np.random.default_rng(1000 + fold))
    k_short = data.findings.index(shortcut.finding)
    # paired ΔP: the same markers for every model of this fold
    marker_rng = np.random.default_rng(5000 + fold)
    marked_test = np.stack([stamp_marker(img, marker_rng)[0] for img in test.images])

    def measure(model: torch.nn.Module) -> dict:
        p_test = sim.probabilities(model, spec, test.images)
        p_marked = sim.probabilities(model, spec, marked_test)
        thresholds = choose_thresholds(val.labels, sim.probabilities(model, spec, val_images))
        return {"p": p_test, "dp": p_marked[:, k_short] - p_test[:, k_short], "thr": thresholds}

    def scratch(prediction: str | None, images: np.ndarray, seed: int) -> torch.nn.Module:
        """A model trained from scratch on ``images`` with the ``prediction`` loss (None: the recipe's own)."""
        if setup.recipe is not None:
            recipe = argparse.Namespace(**{**vars(setup.recipe), "loss": prediction or setup.recipe.loss})
            pixels = {"images": images, "labels": train.labels}
            return base.train_fold(pixels, np.arange(len(images)), recipe, seed, device=args.device).eval()
        model = sim.new_model(spec, len(data.findings), seed).to(args.device)
        tensors = sim.make_tensors(model, spec, images, train.labels)
        loss = LossConfig(prediction=prediction or "bce", **NO_ATTENTION)
        sim.train(model, tensors, replace(spec.scratch, loss=loss, epochs=args.scratch_epochs), seed)
        return model.eval()

    # what the initial models depend on (a checkpoint made otherwise is not reused) and what the arms depend on
    # (a checkpoint made with other budgets or fine-tuning keeps its initial models, not its arms)
    initial_made_with = initial_settings(args, setup)
    # the input-gradient weight too: a checkpoint made under another default (or --ignore-weight) keeps no arms
    ignore_weight = next(a.loss.ignore_weight for a in arms_for(args) if has_attention(a))
    arm_settings = {
        "budgets": list(args.budgets),
        "finetune_epochs": args.finetune_epochs,
        "ignore_weight": ignore_weight,
    }

    def save(out: dict, initial: dict[str, torch.nn.Module]) -> None:
        if checkpoint is not None:  # written whole, then renamed: a kill mid-write leaves the previous one
            partial = checkpoint.with_suffix(".tmp")
            state = {"out": {**out, "seconds": out["seconds"] + time.time() - started}, "initial": initial}
            torch.save({**state, "initial_settings": initial_made_with, "arm_settings": arm_settings}, partial)
            partial.replace(checkpoint)

    if saved is not None and saved.get("initial_settings") != initial_made_with:
        print(f"fold {fold}: {checkpoint} was made with other initial models: starting over", flush=True)
        saved = None
    if saved is None and initial_file is not None and initial_file.exists():
        kept = torch.load(initial_file, weights_only=False)
        if kept.get("initial_settings") == initial_made_with:
            # this process's compute starts at 0: the initial models were paid for by the run that made them
            saved = {"out": {**kept["measured"], "arms": {}, "seconds": 0.0}, "initial": kept["initial"]}
            saved |= {"initial_settings": initial_made_with, "arm_settings": arm_settings}
            print(f"fold {fold}: initial models from {initial_file}", flush=True)
    if saved is not None:
        out, initial = saved["out"], saved["initial"]
        if saved.get("arm_settings") != arm_settings:
            print(f"fold {fold}: {checkpoint} has other budgets or fine-tuning: its arms are rerun", flush=True)
            out["arms"] = {}
        print(f"fold {fold}: resumed with arms {sorted(out['arms'])} done", flush=True)
        if initial_file is not None and not initial_file.exists():
            save_initial_models(initial_file, initial_made_with, initial, out, None)
    else:
        initial = {"bce": scratch("bce", train_images, fold), "wbce": scratch("wbce", train_images, fold)}
        # the marker-free model: with a recipe, the one bench_base_models measured (issue 16 part 1)
        clean = scratch(None, train.images, fold)
        out = {
            "fold": fold,
            "test_idx": test_idx.tolist(),
            "clean": measure(clean),
            "initial": {name: measure(m) for name, m in initial.items()},
            "arms": {},
            "seconds": 0.0,  # compute so far, over every process that worked on this fold
        }
        print(
            f"fold {fold}: initial models in {time.time() - started:.0f}s; "
            f"ΔP bce {out['initial']['bce']['dp'].mean():.3f} clean {out['clean']['dp'].mean():.3f}",
            flush=True,
        )
        save(out, initial)
        if initial_file is not None:
            save_initial_models(initial_file, initial_made_with, initial, out, time.time() - started)

    for arm in arms:
        if arm.name in out["arms"]:
            continue
        model = copy.deepcopy(initial[arm.initial])
        annotated: list[int] = []
        ignore: dict[int, np.ndarray] = {}
        evidence: dict[int, dict[int, np.ndarray]] = {}
        seconds = 0.0
        rounds = []
        last_detector: ArtefactDetector | None = None  # the last round's accepted artefact detector (Arm.keep_detector)
        for budget in args.budgets:
            candidates = np.array([i for i in range(len(train)) if i not in set(annotated)])
            probs, cams, feats, x = cams_and_probs(model, spec, train_images[candidates])
            need = budget - len(annotated)
            inputs = RankInputs(probabilities=probs, labels=data.findings, cams=cams, features=feats)
            if annotated:
                labels_done = train.labels[annotated]
                inputs.label_counts = labels_done.sum(0)
                inputs.n_annotated = len(annotated)
                if ignore:
                    grid = cams.shape[-2:]
                    resized = [
                        F.adaptive_avg_pool2d(torch.from_numpy(m.astype(np.float32))[None, None], grid)[0, 0]
                        for m in ignore.values()
                    ]
                    inputs.ignore_prior = torch.stack(resized).mean(0).numpy()
            if arm.order in ("bald", "bias"):  # the bias strategy's epistemic signal uses the same samples
                inputs.mc_probabilities = mc_dropout_probabilities(model, x, passes=8, seed=fold)
            ranked = rank_candidates(
                inputs,
                RankConfig(strategy=arm.order, signal_weights=dict(arm.signal_weights), seed=fold * 100 + budget),
                top_k=need,
            )
            chosen = [int(candidates[item.index]) for item in ranked]
            for slot, i in enumerate(chosen):
                seconds += COST_REVIEW_S
                local = ranked[slot].index
                marker = marker_masks[i]
                if marker is not None and physician_sees_marker(cams[local], probs[local], marker):
                    ignore[i] = marker
                    seconds += COST_IGNORE_S
                regions = {k: m for k, m in train.regions[i].items() if train.labels[i, k] > 0}
                if regions:
                    evidence[i] = regions
                    seconds += COST_EVIDENCE_S * len(regions)
            annotated += chosen
            # Every training image keeps its label; the masks physicians painted on the reviewed ones are added,
            # and the model is fine-tuned from the live version on all of it (what the product's worker does
            # when the project's labelled tasks are in Label Studio).
            tensors = sim.make_tensors(
                model,
                spec,
                train_images,
                train.labels,
                ignore=[ignore.get(i) for i in range(len(train))],
                evidence=[evidence.get(i, {}) for i in range(len(train))],
            )
            finetune = replace(spec.finetune, loss=arm.loss, epochs=args.finetune_epochs)
            if not arm.propagation:
                finetune = replace(finetune, propagation=None)
            # what propagation did this round: a round whose detector declined trains on the physicians' masks
            # alone, and the dependence can come back (the bounces between rounds in physician.md)
            previous = last_detector if arm.keep_detector else None
            propagation = sim.train(model, tensors, finetune, fold, previous_detector=previous).propagation
            if propagation is not None and propagation.detector is not None:
                last_detector = propagation.detector
            model.eval()
            m = measure(model)
            rounds.append(
                {
                    "budget": budget,
                    "seconds": seconds,
                    "delta_p": float(m["dp"].mean()),
                    "markers_shown": int(sum(marker_masks[i] is not None for i in annotated)),
                    "ignore_masks": len(ignore),
                    "evidence_images": len(evidence),
                    "propagated": 0 if propagation is None else propagation.propagated,
                    "propagation_skipped": "" if propagation is None else propagation.skipped,
                    "detector_from": "" if propagation is None else propagation.detector_from,
                    **m,
                }
            )
        out["arms"][arm.name] = rounds
        print(
            f"fold {fold} {arm.name:18s} "
            + " ".join(
                f"[{r['budget']}: ΔP {r['delta_p']:.3f} ign {r['ignore_masks']} prop {r['propagated']}"
                + (" declined" if r["propagation_skipped"] else "")
                + (" kept" if r["detector_from"] == "previous" else "")
                + "]"
                for r in rounds
            ),
            flush=True,
        )
        save(out, initial)
    out["seconds"] += time.time() - started
    return out


# ------------------------------------------------------------------------------------------------ analysis
def pooled(folds: list[dict], pick) -> np.ndarray:
    return np.concatenate([pick(f) for f in folds])


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def effort_to_reach(start: float, efforts: list, delta_p: list, level: float) -> float | None:
    """Annotations (or seconds) at which a ΔP curve first reaches ``level``: the curve starts at (0, ``start``)
    and is interpolated linearly between measured budgets; None when it never gets there."""
    xs, ys = [0.0, *efforts], [start, *delta_p]
    for i in range(1, len(xs)):
        if ys[i] <= level:
            frac = (ys[i - 1] - level) / (ys[i - 1] - ys[i]) if ys[i - 1] != ys[i] else 1.0
            return float(xs[i - 1] + frac * (xs[i] - xs[i - 1]))
    return None


def reduction_pct(before: float | None, after: float | None) -> float | None:
    """How much of ``before`` is gone in ``after``, in %; None where either is undefined (a group too small)
    or there is nothing to reduce."""
    return 100 * (before - after) / before if before and after is not None else None


def summarise(folds: list[dict], setup: Setup, args: argparse.Namespace, command: str) -> dict:
    data = setup.data
    order = pooled(folds, lambda f: np.array(f["test_idx"]))
    fold_of = pooled(folds, lambda f: np.full(len(f["test_idx"]), f["fold"]))
    y, sex, patients = data.labels[order].astype(bool), data.sex[order], data.patients[order]
    k = data.findings.index("Cardiomegaly")
    # the count-based F1 and equalized odds the product's metrics use for their own bootstraps: the same values
    # as sklearn's f1_score and fairlearn's equalized_odds_difference (tests/test_metrics.py), in microseconds
    # instead of seconds per resample
    sex_codes, sex_groups = _encode_groups(sex)
    sex_eod = _eod_vector_fn(len(sex_groups), min_count=5)
    # the headline's macro-F1 is over the findings the model can learn here (issue 16): those with at least
    # bench_base_models' MIN_POSITIVES held-out positives, the set its clean-model macro AUROC is taken over; a
    # finding with a handful of positives adds a near-zero F1 whatever the model does
    learnt = y.sum(0) >= base.MIN_POSITIVES
    if not learnt.any():  # a small run (--quick): every finding with a positive
        learnt = y.sum(0) > 0
    last = -1

    def arm_arrays(name: str, round_index: int = last) -> dict:
        if name in ("clean",):
            src = [f["clean"] for f in folds]
        elif name.startswith("initial_"):
            src = [f["initial"][name.split("_", 1)[1]] for f in folds]
        else:
            src = [f["arms"][name][round_index] for f in folds]
        p = np.concatenate([s["p"] for s in src])
        pred = np.concatenate([binarize(s["p"], s["thr"]) for s in src])
        return {"p": p, "pred": pred, "dp": np.concatenate([s["dp"] for s in src])}

    arrays = {name: arm_arrays(name) for name in ["clean", "initial_bce", "initial_wbce", *[a.name for a in ARMS]]}

    def fold_mean(idx: np.ndarray, score) -> float:
        # AUROC within each fold, then the mean: each fold's model has a calibration of its own, and an AUROC over
        # pooled scores would also rank one fold's images against another's (issue 16's fold-level figures)
        values = [score(idx[fold_of[idx] == f]) for f in np.unique(fold_of[idx])]
        values = [v for v in values if v is not None and np.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")

    def stats(idx: np.ndarray, names: Sequence[str] = tuple(arrays), with_macro_auroc: bool = True) -> dict:
        res = {}
        for name in names:
            a = arrays[name]
            pred = a["pred"][idx].astype(bool)
            eod = sex_eod(y[idx], pred, sex_codes[idx])  # per finding, then the worst
            f1 = _f1_vector(y[idx], pred)  # per finding, then the macro over all findings
            res[name] = {
                "delta_p": float(a["dp"][idx].mean()),
                "shortcut_auroc": fold_mean(idx, lambda i, p=a["p"]: auroc(y[i, k], p[i, k])),
                "macro_f1": _num(np.nanmean(f1[:-1][learnt])),
                "macro_f1_all": _num(f1[-1]),
                "eod_sex_worst": _num(eod[-1]),
                "eod_sex_shortcut": _num(eod[k]),
            }
            if with_macro_auroc:
                res[name]["macro_auroc"] = fold_mean(
                    idx, lambda i, p=a["p"]: per_finding_metrics(y[i], p[i], data.findings, 0.5)["macro_auroc"]
                )
                res[name]["shortcut_auroc_pooled"] = auroc(y[idx, k], a["p"][idx, k])
        return res

    def compare(s: dict, reference: str, suffix: str = "") -> dict:
        base, full, clean = s[reference], s["full"], s["clean"]
        # below 0.02 AUROC the clean model is no better than the reference on the shortcut finding: no gap to
        # recover, and a ratio over it is noise
        gap = clean["shortcut_auroc"] - base["shortcut_auroc"]
        gap = gap if gap >= 0.02 else None
        return {
            f"shortcut_dependence_reduction_pct{suffix}": 100 * (base["delta_p"] - full["delta_p"]) / base["delta_p"],
            f"auroc_gap_recovered_pct{suffix}": 100 * (full["shortcut_auroc"] - base["shortcut_auroc"]) / gap
            if gap
            else None,
            f"macro_f1_gain_points{suffix}": 100 * (full["macro_f1"] - base["macro_f1"]),
            f"eod_reduction_pct{suffix}": reduction_pct(base["eod_sex_worst"], full["eod_sex_worst"]),
            # the group gap the injected artefact creates: sex Equalized Odds on the artefact's finding (issue 16)
            f"eod_shortcut_reduction_pct{suffix}": reduction_pct(base["eod_sex_shortcut"], full["eod_sex_shortcut"]),
        }

    headline_arms = ("clean", "baseline", "imbalance", "full")  # what compare() reads

    def headline(s: dict) -> dict:
        # vs the baseline the issue defines (BCE, random order), and vs the same imbalance-aware loss without
        # masks or ranking (what the attention terms and the ranking add on their own)
        return {**compare(s, "baseline"), **compare(s, "imbalance", "_vs_imbalance")}

    everything = np.arange(len(order))
    point_stats = stats(everything)
    point = headline(point_stats)
    # bootstrap by patient (images of one patient move together)
    rng = np.random.default_rng(0)
    unique = np.unique(patients)
    members = {p: np.flatnonzero(patients == p) for p in unique}
    samples: dict[str, list[float]] = {key: [] for key in point}
    for _ in range(args.n_boot):
        pick = rng.choice(unique, size=len(unique), replace=True)
        idx = np.concatenate([members[p] for p in pick])
        try:
            # only the arms the headline compares, without macro AUROC (the one sklearn call per finding left)
            h = headline(stats(idx, headline_arms, with_macro_auroc=False))
        except (ZeroDivisionError, TypeError, ValueError):
            continue
        for key, value in h.items():
            if value is not None and np.isfinite(value):
                samples[key].append(value)
    intervals = {
        key: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
        if len(v) > 10 and point[key] is not None
        else None
        for key, v in samples.items()
    }

    # curves: ΔP per budget per arm, mean over folds, and annotations/time to reach 90% of the full reduction
    curves = {
        arm.name: {
            "budget": args.budgets,
            "delta_p": [
                float(np.mean([f["arms"][arm.name][r]["delta_p"] for f in folds])) for r in range(len(args.budgets))
            ],
            "seconds": [
                float(np.mean([f["arms"][arm.name][r]["seconds"] for f in folds])) for r in range(len(args.budgets))
            ],
            "ignore_masks": [
                float(np.mean([f["arms"][arm.name][r]["ignore_masks"] for f in folds]))
                for r in range(len(args.budgets))
            ],
        }
        for arm in ARMS
    }
    start = float(np.mean([f["initial"]["wbce"]["dp"].mean() for f in folds]))
    target = start - 0.9 * (start - curves["full"]["delta_p"][-1])

    def needed(arm: str, key: str, level: float = target) -> float | None:
        xs = curves[arm][key] if key == "seconds" else curves[arm]["budget"]
        return effort_to_reach(start, xs, curves[arm]["delta_p"], level)

    reach = {
        arm.name: {"annotations": needed(arm.name, "budget"), "seconds": needed(arm.name, "seconds")} for arm in ARMS
    }
    random_n, full_n = reach["attention_random"]["annotations"], reach["full"]["annotations"]
    random_s, full_s = reach["attention_random"]["seconds"], reach["full"]["seconds"]
    censored = random_n is None
    if censored:  # random order never got there within the budget: a lower bound on the reduction
        random_n, random_s = float(args.budgets[-1]), curves["attention_random"]["seconds"][-1]

    # The other reading of "fewer annotations": what the full system needs to match each ordering's final ΔP
    # (both with the attention loss), where each ordering first got there.
    def matched(arm: str) -> dict:
        level = curves[arm]["delta_p"][-1]
        own = {key: needed(arm, key, level) for key in ("budget", "seconds")}
        full = {key: needed("full", key, level) for key in ("budget", "seconds")}
        out = {"delta_p": round(level, 4), "annotations": own["budget"], "full_annotations": full["budget"]}
        out["seconds"], out["full_seconds"] = own["seconds"], full["seconds"]
        for key, name in (("budget", "annotation_reduction_pct"), ("seconds", "time_reduction_pct")):
            full_effort, own_effort = full[key], own[key]
            out[name] = round(100 * (1 - full_effort / own_effort), 1) if full_effort and own_effort else None
        return out

    match = {arm: matched(arm) for arm in ("attention_random", "attention_entropy", "attention_bald")}

    # per source, at the final budget: a pooled figure can hide a finding learnt from one source only
    per_source: dict[str, dict] = {}
    if setup.sources is not None:
        source = setup.sources[order]
        for name in sorted(set(source.tolist())):
            m = np.flatnonzero(source == name)
            if len(m) < 50:
                continue
            per_source[str(name)] = {
                "images": len(m),
                "shortcut_positives": int(y[m, k].sum()),
                "arms": {
                    arm: {
                        "delta_p": round(float(a["dp"][m].mean()), 4),
                        "shortcut_auroc": _num(auroc(y[m, k], a["p"][m, k])),
                        "macro_auroc": per_finding_metrics(y[m], a["p"][m], data.findings, 0.5)["macro_auroc"],
                    }
                    for arm, a in arrays.items()
                },
            }
    return {
        **{key: round(value, 2) if value is not None else None for key, value in point.items()},
        "intervals_95": intervals,
        "annotation_reduction_pct": round(100 * (1 - full_n / random_n), 1) if full_n and random_n else None,
        "annotation_time_reduction_pct": round(100 * (1 - full_s / random_s), 1) if full_s and random_s else None,
        "annotation_reduction_is_lower_bound": censored,
        "annotations_to_90pct_of_full_reduction": reach,
        "full_vs_orderings_at_their_final_delta_p": match,
        "per_arm": {
            name: {k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in s.items()}
            for name, s in point_stats.items()
        },
        "per_source": per_source,
        "macro_f1_findings": [f for f, keep in zip(data.findings, learnt, strict=True) if keep],
        "per_fold_delta_p": {
            arm.name: [round(float(f["arms"][arm.name][-1]["delta_p"]), 4) for f in folds] for arm in ARMS
        }
        | {"clean": [round(float(f["clean"]["dp"].mean()), 4) for f in folds]},
        "curves": curves,
        # what the results cost: each fold's process wall time (initial models, arms and any --rerun-arms, arms
        # the reruns replaced included), one torch thread per process, processes sharing the machine's cores
        "compute_seconds": {
            "per_fold": [round(f["seconds"] + f.get("rerun_seconds", 0.0)) for f in folds],
            "total": round(sum(f["seconds"] + f.get("rerun_seconds", 0.0) for f in folds)),
        },
        "seeds": len(folds),
        "budget": args.budgets,
        "cost_model_s": {
            "review": COST_REVIEW_S,
            "ignore_mask": COST_IGNORE_S,
            "evidence_mask": COST_EVIDENCE_S,
            "source": "assumption: ~20 s to read a chest X-ray and tick findings; brush strokes timed"
            " as short edits in the Label Studio editor",
        },
        "model": setup.describe(),
        # the attention arms' loss (the product's LossConfig unless --ignore-weight changed it)
        "attention_loss": asdict(next(a.loss for a in arms_for(args) if a.name == "full")),
        "arms_not_rerun": arms_not_rerun(folds),
        "command": command,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": common.device_name(args.device),
        },
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_outputs(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    # the other benchmarks' keys (clean model, co-occurrence, mixed artefacts) stay
    common.update_summary(summary, out / "summary.json")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in summary["curves"].items():
        axes[0].plot([0, *curve["budget"]], [None, *curve["delta_p"]], marker="o", label=name)
        axes[1].plot([0, *curve["seconds"]], [None, *curve["delta_p"]], marker="o", label=name)
    for ax, xlabel in zip(axes, ["annotated images", "simulated physician time (s)"], strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ΔP(marker) on Cardiomegaly (lower = less shortcut)")
        ax.axhline(summary["per_arm"]["clean"]["delta_p"], color="grey", ls="--", lw=1, label="clean model")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Shortcut dependence vs annotation effort ({summary['seeds']} folds, mean)")
    fig.tight_layout()
    fig.savefig(out / "physician_curves.png", dpi=110)
    arms = summary["per_arm"]
    lines = [
        "# Simulated-physician benchmark (real NIH X-rays, injected varied shortcut)",
        "",
        f"Command: `{summary['command']}`  ",
        f"Folds (= seeds): {summary['seeds']}, patient-level CV; budgets {summary['budget']}; "
        f"model {summary['model']}; cost model {summary['cost_model_s']}.  ",
        f"Machine: {summary['machine']}; compute {summary['compute_seconds']['total'] / 3600:.1f} process-hours "
        f"(per fold, s: {summary['compute_seconds']['per_fold']}; one torch thread per process, initial models "
        "and reruns included).  ",
        f"Attention arms' loss: {summary.get('attention_loss')}"
        + (
            f"; except {summary['arms_not_rerun']}: not rerun by this run, they keep the loss of the run that "
            "computed them."
            if summary.get("arms_not_rerun")
            else "."
        ),
        "",
        "## Headline (full system vs baseline, pooled held-out predictions, 95% patient bootstrap intervals)",
        "",
        "Baseline = BCE, random order (the issue's definition); `_vs_imbalance` = vs the same weighted BCE without "
        "masks or ranking. A gain counts only where its interval excludes zero.",
        "",
        "| metric | value | 95% interval |",
        "|---|---|---|",
    ]
    for key, interval in summary["intervals_95"].items():
        shown = f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "n/a"
        verdict = "" if not interval else (" (gain)" if interval[0] > 0 else " (loss)" if interval[1] < 0 else "")
        value = "n/a (clean model no better: no gap)" if summary[key] is None else summary[key]
        lines.append(f"| {key} | {value} | {shown}{verdict} |")
    lines += [
        f"| annotation_reduction_pct (ranking vs random, to 90% of the full reduction) | "
        f"{summary['annotation_reduction_pct']} | lower bound: {summary['annotation_reduction_is_lower_bound']} |",
        f"| annotation_time_reduction_pct | {summary['annotation_time_reduction_pct']} | |",
        "",
        "Annotations (and simulated seconds) each ordering needs to reach 90% of the full system's ΔP reduction "
        "(interpolated between budgets; None = not reached within the budget):",
        "",
        *[
            f"- {name}: {r['annotations'] and round(r['annotations'])} annotations, "
            f"{r['seconds'] and round(r['seconds'])} s"
            for name, r in summary["annotations_to_90pct_of_full_reduction"].items()
        ],
        "",
        "What the full system (bias-aware ranking) needs to match each ordering's ΔP at the final budget "
        "(all with the attention loss; interpolated):",
        "",
        "| ordering | its final ΔP | its annotations / s | full system's annotations / s | fewer annotations "
        "| less time |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {m['delta_p']} | {m['annotations'] and round(m['annotations'])} / "
            f"{m['seconds'] and round(m['seconds'])} | {m['full_annotations'] and round(m['full_annotations'])} / "
            f"{m['full_seconds'] and round(m['full_seconds'])} | {m['annotation_reduction_pct']}% | "
            f"{m['time_reduction_pct']}% |"
            for name, m in summary["full_vs_orderings_at_their_final_delta_p"].items()
        ],
        "",
        "## Per arm (final budget)",
        "",
        "AUROC: within each fold, then the mean over folds (pooled over folds in brackets); F1 and Equalized Odds "
        "on the pooled thresholded predictions. Macro-F1 over the findings with at least "
        f"{base.MIN_POSITIVES} positives ({', '.join(summary['macro_f1_findings'])}); over all findings in "
        "brackets.",
        "",
        "| arm | ΔP(marker) | Cardiomegaly AUROC | macro AUROC | macro-F1 | worst EOD (sex) | Cardiomegaly EOD (sex) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in arms.items():
        lines.append(
            f"| {name} | {s['delta_p']:.3f} | {s['shortcut_auroc']:.3f} ({_fmt(s.get('shortcut_auroc_pooled'))}) | "
            f"{s['macro_auroc']:.3f} | "
            f"{s['macro_f1']:.3f} ({_fmt(s.get('macro_f1_all'))}) | {s['eod_sex_worst']} | {s['eod_sex_shortcut']} |"
        )
    if summary.get("per_source"):
        sources = summary["per_source"]
        lines += [
            "",
            "## Per source (final budget, AUROC over the pooled folds): ΔP / Cardiomegaly AUROC / macro AUROC",
            "",
            "| arm | "
            + " | ".join(
                f"{s} ({v['images']} images, {v['shortcut_positives']} Cardiomegaly)" for s, v in sources.items()
            )
            + " |",
            "|---|" + "---|" * len(sources),
        ]
        for name in arms:
            cells = []
            for v in sources.values():
                r = v["arms"][name]
                cells.append(f"{r['delta_p']:.3f} / {_fmt(r['shortcut_auroc'])} / {_fmt(r['macro_auroc'])}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per-fold ΔP at the final budget: `" + json.dumps(summary["per_fold_delta_p"]) + "`",
        "",
        "![curves](physician_curves.png)",
        "",
    ]
    (out / "physician.md").write_text("\n".join(lines))


def rerun_started(cache: Path, fold: int) -> Path:
    """Present while a --rerun-arms of the fold is under way or was interrupted (resume it to finish): the
    summary would otherwise mix the fold's old and new arms."""
    return cache / f"fold{fold}.rerun.started"


def merge_rerun(cached: dict, rerun: dict, arms: Sequence[str]) -> dict:
    """A cached fold with the ``arms`` a ``--rerun-arms`` run recomputed. Only those: a rerun checkpoint left by
    an interrupted rerun of other arms must not replace them. The rerun's compute is added to the fold's, so the
    summary reports what the results cost."""
    merged = {**cached, "arms": {**cached["arms"], **{a: r for a, r in rerun["arms"].items() if a in arms}}}
    merged["rerun_seconds"] = cached.get("rerun_seconds", 0.0) + rerun["seconds"]
    # the arms recomputed under this run's loss: the others keep the loss of the run that computed them
    merged["rerun_arms"] = sorted(set(cached.get("rerun_arms", [])) | set(arms))
    return merged


def arms_not_rerun(folds: list[dict]) -> list[str]:
    """The attention arms a --rerun-arms run did not recompute in some fold: measured under the loss of the run
    that computed them (the one --start-from copied), not necessarily this run's."""
    attention = {a.name for a in ARMS if has_attention(a)}
    return sorted({a for f in folds if "rerun_arms" in f for a in f["arms"] if a in attention - set(f["rerun_arms"])})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--run-folds", type=int, default=None, help="run only the first N folds (smoke runs)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--scratch-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument(
        "--base-recipe",
        help="initial and clean models from this bench_base_models results file's recipe and data (e.g. "
        "base_models_ema); default: the product's trainer for --scratch-epochs on nih1000",
    )
    parser.add_argument(
        "--stratify",
        action="store_true",
        help="patient folds that spread each finding's positives (bench_base_models --stratify); caches apart",
    )
    parser.add_argument("--device", default=common.default_device(), help="where models train (cuda when there is one)")
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resume", action="store_true", help="reuse folds saved by an earlier run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument("--only-folds", type=int, nargs="+", help="compute only these folds (parallel runs)")
    parser.add_argument(
        "--rerun-arms",
        nargs="+",
        choices=[a.name for a in ARMS],
        help="with --resume: recompute only these arms in the cached folds (seeded: the other arms are unchanged)",
    )
    parser.add_argument(
        "--ignore-weight",
        type=float,
        help="the input-gradient weight of the attention arms (default: the product's LossConfig); a variant "
        "run: give it its own --out",
    )
    parser.add_argument(
        "--start-from",
        type=Path,
        help="with --rerun-arms: another run's cache folder; the folds --out lacks are copied from it first, so "
        "only the rerun arms are computed",
    )
    args = parser.parse_args()
    if args.start_from is not None and not (args.rerun_arms and args.resume):
        parser.error("--start-from goes with --resume and --rerun-arms")
    if args.quick:
        # one seed, a small budget: checks the pipeline end to end (tests/test_bench_quick.py), not the numbers
        args.run_folds, args.budgets, args.scratch_epochs, args.finetune_epochs, args.n_boot = 1, [10, 20], 2, 1, 20
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setup = load_setup(args)
    # Each fold is saved as it finishes, so an interrupted run resumes (--resume) instead of starting over.
    cache = cache_dir(args, setup)
    cache.mkdir(parents=True, exist_ok=True)
    if args.start_from is not None:
        todo_folds = args.only_folds if args.only_folds is not None else range(args.run_folds or args.folds)
        print(f"copied from {args.start_from}: {start_from_cache(args.start_from, cache, todo_folds)}", flush=True)
    arms = arms_for(args)
    folds = []
    for f in range(args.run_folds or args.folds):
        path = cache / f"fold{f}.pkl"
        if args.only_folds is not None and f not in args.only_folds:
            if path.exists():
                folds.append(pickle.loads(path.read_bytes()))
            continue
        if args.resume and path.exists():
            cached = pickle.loads(path.read_bytes())
            if args.rerun_arms:
                # in the order asked for: an interrupted rerun has the arms named first
                todo = [a for name in args.rerun_arms for a in arms if a.name == name]
                # checkpointed per arm like a fresh fold, so an interrupted rerun resumes at its last arm
                rerun_checkpoint = cache / f"fold{f}.rerun.partial.pt"
                started_marker = rerun_started(cache, f)
                started_marker.touch()  # the checkpoint only appears after the first arm: this marks the start
                rerun = run_fold(
                    f, setup, args, todo, checkpoint=rerun_checkpoint, initial_file=initial_models_file(args, setup, f)
                )
                cached = merge_rerun(cached, rerun, args.rerun_arms)
                write_atomic(path, pickle.dumps(cached))
                rerun_checkpoint.unlink(missing_ok=True)
                started_marker.unlink()
            folds.append(cached)
            continue
        checkpoint = cache / f"fold{f}.partial.pt"
        if not args.resume:
            checkpoint.unlink(missing_ok=True)
        kept = initial_models_file(args, setup, f)
        folds.append(run_fold(f, setup, args, arms, checkpoint=checkpoint, initial_file=kept))
        write_atomic(path, pickle.dumps(folds[-1]))  # a kill mid-write leaves no torn fold to resume from
        checkpoint.unlink(missing_ok=True)
    if len(folds) < (args.run_folds or args.folds):
        print(f"{len(folds)} folds cached so far; summarise once all are done (--resume)")
        return
    # a fold whose --rerun-arms is under way (in another process) would mix old and new arms into the summary
    rerunning = [f for f in range(len(folds)) if rerun_started(cache, f).exists()]
    if rerunning:
        print(f"folds {rerunning} have a rerun under way (fold*.rerun.started): summarise once it is done")
        return
    # read again: a fold loaded before this process's own work may have been rerun by another process since
    folds = [pickle.loads((cache / f"fold{f}.pkl").read_bytes()) for f in range(len(folds))]
    command = "python bench/bench_physician.py " + " ".join(sys.argv[1:])
    summary = summarise(folds, setup, args, command.strip())
    write_outputs(summary, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("curves", "per_arm")}, indent=1))


if __name__ == "__main__":
    main()
