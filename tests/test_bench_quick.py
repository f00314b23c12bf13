"""The simulated-physician benchmark's quick mode runs end to end (one fold, small budget): the pipeline, not
the headline numbers, which need the full run (bench/results/physician.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NIH, shared_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]
ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    """Run bench/<script> in quick mode as a user would (a subprocess), output captured."""
    command = [sys.executable, str(ROOT / "bench" / script), "--quick", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_physician_benchmark_quick_mode(tmp_path: Path) -> None:
    shared_or_skip(NIH)
    run = _bench("bench_physician.py", "--out", str(tmp_path), timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "shortcut_dependence_reduction_pct",
        "auroc_gap_recovered_pct",
        "macro_f1_gain_points",
        "eod_reduction_pct",
        "intervals_95",
        "annotation_reduction_pct",
        "full_vs_orderings_at_their_final_delta_p",
        "seeds",
        "budget",
        "command",
    ):
        assert key in summary, key
    assert summary["seeds"] == 1 and summary["budget"] == [10, 20]
    arms = summary["per_arm"]
    assert {"baseline", "imbalance", "attention_random", "attention_entropy", "attention_bald", "full"} <= set(arms)
    for name, row in arms.items():
        assert -1.0 <= row["delta_p"] <= 1.0, name
        assert 0.0 <= row["macro_auroc"] <= 1.0, name
        # AUROC is taken within each fold, then averaged: with one fold that is the pooled AUROC
        assert row["shortcut_auroc"] == pytest.approx(row["shortcut_auroc_pooled"], nan_ok=True), name
    assert len(summary["compute_seconds"]["per_fold"]) == 1 and summary["compute_seconds"]["total"] > 0
    # every ordering reviewed exactly the budget, and the simulated physician painted masks where it saw markers
    for curve in summary["curves"].values():
        assert curve["budget"] == [10, 20] and curve["seconds"][-1] >= 20 * 20.0
    assert (tmp_path / "physician_curves.png").stat().st_size > 10_000
    assert "| shortcut_dependence_reduction_pct |" in (tmp_path / "physician.md").read_text()


def test_rank_ablation_quick_mode(tmp_path: Path) -> None:
    """The ablation runs the loop with each named signal switched off and reports every arm per fold."""
    shared_or_skip(NIH)
    run = _bench("bench_rank_ablation.py", "--out", str(tmp_path), "--combos", "epistemic=3,heatmap=1", timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # the study's name carries the input-gradient weight it ran under (the product's default, off)
    result = json.loads((tmp_path / "rank_ablation_ignore_weight0.json").read_text())
    assert result["attention_loss"]["ignore_weight"] == 0.0
    expected = ["attention_random", "attention_bald", "full", "full_without_heatmap", "full_without_epistemic"]
    expected.append("full_epistemic3_heatmap1")  # a --combos weighting
    assert result["arms"] == expected and result["folds"] == 1 and result["budgets"] == [10, 20]
    assert result["commands"] == [
        f"python bench/bench_rank_ablation.py --quick --out {tmp_path} --combos epistemic=3,heatmap=1"
    ]
    # where the full system reduced ΔP at all, it reaches 90% of its own reduction by its last budget at the latest
    if result["final_delta_p"]["full"][0] <= result["start_delta_p"][0]:
        assert result["pooled"]["full"] is not None and 0 <= result["pooled"]["full"] <= 20
    for arm in expected:
        assert len(result["per_fold"][arm]) == 1 and -1.0 <= result["final_delta_p"][arm][0] <= 1.0
        curve = result["delta_p_curves"][arm][0]  # one ΔP per budget, the last being the final one
        assert len(curve) == 2 and curve[-1] == result["final_delta_p"][arm][0]
    table = (tmp_path / "rank_ablation_ignore_weight0.md").read_text()
    assert all(f"| {arm} |" in table for arm in expected)


def test_base_models_quick_mode_fails_loudly_when_short() -> None:
    """One epoch cannot reach issue 16's clean-model targets: the benchmark must say so and exit non-zero."""
    shared_or_skip(NIH)
    run = _bench("bench_base_models.py", "--threads", "2", timeout=600)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "FAIL: the clean model falls short" in run.stderr and "Cardiomegaly AUROC" in run.stderr


def test_cooccurrence_quick_mode(tmp_path: Path) -> None:
    shared_or_skip(NIH)
    run = _bench("bench_cooccurrence.py", "--out", str(tmp_path), timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "cooccurrence.json").read_text())
    assert result["pair"] == {"finding": "Atelectasis", "partner": "Effusion"}
    assert set(result["intervals_95"]) == {"eod_reduction_pct", "f1_gain_points"}
    assert all(p >= 0.8 for p in result["train_p_partner_given_finding"])  # A nearly always comes with B
    # both fine-tuned arms from one baseline per fold, the headline keys being the product default's
    assert result["product_arm"] in ("full", "decorrelated")
    for arm in ("full", "decorrelated"):
        assert f"eod_reduction_pct_{arm}" in result and f"f1_gain_points_{arm}" in result
    assert result["eod_reduction_pct"] == result[f"eod_reduction_pct_{result['product_arm']}"]
    assert result["baseline_reproduced_max_abs_diff"] == 0.0 and len(result["decorrelated_pairs_per_fold"]) >= 1


def test_imbalance_quick_mode(tmp_path: Path) -> None:
    """Both loss arms train on the same folds; every finding gets F1/recall intervals and a paired change."""
    shared_or_skip(NIH)
    run = _bench("bench_imbalance.py", "--threads", "2", "--out", str(tmp_path), timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "imbalance.json").read_text())
    assert set(result["arms"]) == {"bce", "wbce"} and result["rare_findings"]
    wbce = result["arms"]["wbce"]
    for name, entry in wbce["per_finding"].items():
        lo, hi = entry["f1"]["interval_95"]
        assert lo is not None and 0.0 <= lo <= hi <= 1.0 and 0.0 <= entry["f1"]["value"] <= 1.0, name
        assert "excludes_zero" in entry["f1_change_points"], name
    assert set(wbce["macro_f1_rare_change_points"]) >= {"value", "interval_95", "excludes_zero"}
    assert "| wbce |" in (tmp_path / "imbalance.md").read_text()


def test_physician_setup_from_a_base_recipe() -> None:
    """``--base-recipe``: the physician loop builds on the data and recipe bench_base_models measured (both NIH
    sets, per-image standardisation, the recipe's stride), and the recipe trains on the device asked for."""
    sys.path.insert(0, str(ROOT / "bench"))
    import argparse

    import bench_base_models as base
    import bench_physician as physician
    import numpy as np
    import torch

    shared_or_skip(NIH)
    args = argparse.Namespace(base_recipe="base_models_ema", quick=True, backbone="resnet10t")
    setup = physician.load_setup(args)
    recipe = json.loads((ROOT / "bench" / "results" / "base_models_ema.json").read_text())["recipe"]
    assert len(setup.data) == 2337 and len(setup.data.regions) == 2337  # nih1000 + nih_hires
    # the summary is given per source too: their label mixes differ
    assert setup.sources is not None and len(setup.sources) == 2337 and {"nih1000"} < set(setup.sources.tolist())
    assert setup.data.findings == base.FINDINGS and set(setup.data.sex) == {"M", "F"}
    assert sum(bool(r) for r in setup.data.regions) >= 70  # ChestX-Det polygons and NIH boxes for evidence masks
    assert setup.spec.input_size == recipe["size"] and setup.spec.output_stride == recipe["output_stride"]
    assert setup.recipe is not None and setup.recipe.epochs == 1  # quick mode shortens the recipe, nothing else
    assert setup.describe()["initial_models"] == "base_models_ema"
    # per-image standardisation: every image has the same mean and spread
    assert np.allclose(setup.data.images.mean(axis=(1, 2)), 0.485, atol=1e-3)

    pixels = {"images": setup.data.images[:64], "labels": setup.data.labels[:64]}
    curve: list[np.ndarray] = []
    record = base.curve_recorder(setup.data.images[64:80], setup.spec.input_size, 1, curve)
    model = base.train_fold(pixels, np.arange(64), setup.recipe, seed=0, device="cpu", after_epoch=record)
    assert not model.training
    with torch.no_grad():
        probs = physician.sim.probabilities(model, setup.spec, setup.data.images[64:80])
    assert probs.shape == (16, len(base.FINDINGS)) and np.isfinite(probs).all()
    # the learning curve's last point is the model the recipe returns (its EMA), not the raw weights
    assert len(curve) == 1 and np.allclose(curve[0], probs, atol=1e-6)


def test_learning_curve_pools_folds_per_recorded_epoch() -> None:
    """``learning_curve``: one pooled AUROC per recorded epoch, and nothing until every image has its curve."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_base_models as base
    import numpy as np

    rng = np.random.default_rng(0)
    labels = (rng.random((200, len(base.FINDINGS))) < 0.3).astype(np.float32)
    noise, perfect = rng.random(labels.shape), labels * 0.8 + 0.1
    curves = np.stack([noise, perfect])[None].astype(np.float32)  # 1 member, 2 points
    points = base.learning_curve({"labels": labels, "source": np.array(["a"] * 200)}, curves, every=3)
    assert [p["epoch"] for p in points] == [3, 6]
    assert abs(points[0]["Cardiomegaly"] - 0.5) < 0.15 and points[1]["Cardiomegaly"] == 1.0
    assert points[1]["macro"] == 1.0
    curves[0, :, 5, 0] = np.nan  # one image's curve missing (a fold run without --curve-every)
    assert base.learning_curve({"labels": labels, "source": np.array(["a"] * 200)}, curves, every=3) == []


def test_physician_fold_resumes_from_its_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A fold interrupted after some arms continues from its checkpoint (the initial models and the finished
    arms, as saved) and computes the remaining arms exactly as an uninterrupted run does."""
    import argparse

    import bench_physician as physician
    import numpy as np

    shared_or_skip(NIH)
    args = argparse.Namespace(folds=5, budgets=[10], scratch_epochs=1, finetune_epochs=1, device="cpu", out=tmp_path)
    setup = physician.Setup(physician.sim.load_manifest_folder(NIH), physician.sim.ModelSpec())
    baseline, imbalance = physician.ARMS[0], physician.ARMS[1]
    checkpoint = tmp_path / "fold0.partial.pt"
    kept = physician.initial_models_file(args, setup, 0)
    kept.parent.mkdir(parents=True, exist_ok=True)

    first = physician.run_fold(0, setup, args, [baseline], checkpoint=checkpoint, initial_file=kept)
    assert checkpoint.exists() and set(first["arms"]) == {"baseline"} and kept.exists()
    # each round records what mask propagation did (none here: the baseline arm has no attention loss)
    assert [(r["propagated"], r["propagation_skipped"]) for r in first["arms"]["baseline"]] == [(0, "")]
    resumed = physician.run_fold(0, setup, args, [baseline, imbalance], checkpoint=checkpoint)
    straight = physician.run_fold(0, setup, args, [baseline, imbalance])

    assert set(resumed["arms"]) == {"baseline", "imbalance"}
    assert resumed["seconds"] > first["seconds"] > 0  # compute adds up over the processes that worked on it
    for name in ("baseline", "imbalance"):
        for got, want in zip(resumed["arms"][name], straight["arms"][name], strict=True):
            assert got["budget"] == want["budget"] and got["ignore_masks"] == want["ignore_masks"]
            np.testing.assert_array_equal(got["dp"], want["dp"])
            np.testing.assert_array_equal(got["p"], want["p"])
    np.testing.assert_array_equal(resumed["initial"]["wbce"]["p"], straight["initial"]["wbce"]["p"])

    # bench_rank_ablation's way: no checkpoint, the kept initial models (not retrained: the process's compute is
    # the arm's alone); the arm equals the uninterrupted run's
    reused = physician.run_fold(0, setup, args, [imbalance], initial_file=kept)
    for got, want in zip(reused["arms"]["imbalance"], straight["arms"]["imbalance"], strict=True):
        np.testing.assert_array_equal(got["dp"], want["dp"])
    np.testing.assert_array_equal(reused["clean"]["p"], straight["clean"]["p"])
    assert reused["test_idx"] == straight["test_idx"] and 0 < reused["seconds"] < straight["seconds"]

    # other budgets: the checkpoint's initial models are kept, its arms are not
    other_budgets = argparse.Namespace(**{**vars(args), "budgets": [5]})
    rebudgeted = physician.run_fold(0, setup, other_budgets, [baseline], checkpoint=checkpoint)
    assert [r["budget"] for r in rebudgeted["arms"]["baseline"]] == [5]
    # another input-gradient weight (--ignore-weight, or another default): the checkpoint's arms are not kept
    capsys.readouterr()
    reweighted = physician.run_fold(
        0, setup, argparse.Namespace(**{**vars(other_budgets), "ignore_weight": 0.5}), [], checkpoint
    )
    assert "its arms are rerun" in capsys.readouterr().out and reweighted["arms"] == {}
    np.testing.assert_array_equal(rebudgeted["initial"]["bce"]["p"], straight["initial"]["bce"]["p"])
    # other initial models (more scratch epochs): the checkpoint is not used at all
    more_epochs = argparse.Namespace(**{**vars(args), "scratch_epochs": 2})
    retrained = physician.run_fold(0, setup, more_epochs, [], checkpoint, initial_file=kept)
    assert not np.array_equal(retrained["initial"]["bce"]["p"], straight["initial"]["bce"]["p"])
    assert physician.initial_models_file(more_epochs, setup, 0) != kept  # each setting keeps a file of its own

    # --rerun-arms merges only the arms asked for (a stale rerun checkpoint may hold others) and adds its compute
    merged = physician.merge_rerun(straight, reused | {"arms": {**reused["arms"], **first["arms"]}}, ["imbalance"])
    assert merged["arms"]["imbalance"] is reused["arms"]["imbalance"]
    assert merged["arms"]["baseline"] is straight["arms"]["baseline"]
    assert merged["rerun_seconds"] == reused["seconds"] and "rerun_seconds" not in straight


def test_recipe_regularisers_are_deterministic_per_seed() -> None:
    """``--mixup`` and ``--hflip`` draw only from the fold's seed: the same seed trains the same model, and each
    knob changes the training (it is not silently ignored)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import argparse

    import bench_base_models as base
    import numpy as np

    rng = np.random.default_rng(0)
    labels = (rng.random((24, 14)) < 0.3).astype(np.float32)
    pixels = {"images": rng.random((24, 32, 32), dtype=np.float32), "labels": labels}
    recipe = dict(size=32, backbone="resnet10t", epochs=1, batch_size=8, lr=2e-3, weight_decay=0.05, augment=True)

    def probabilities(**knobs: object) -> np.ndarray:
        model = base.train_fold(pixels, np.arange(24), argparse.Namespace(**recipe, **knobs), seed=3)
        return base.sim.probabilities(model, base.sim.ModelSpec(input_size=32), pixels["images"][:4])

    plain, mixed, mirrored = probabilities(), probabilities(mixup=0.3), probabilities(hflip=True)
    assert np.array_equal(mixed, probabilities(mixup=0.3)) and np.array_equal(mirrored, probabilities(hflip=True))
    assert not np.allclose(plain, mixed) and not np.allclose(plain, mirrored)


def test_split_seed_names_its_own_cache_and_folds() -> None:
    """Each of ``--split-seeds`` (repeated cross-validation) caches apart from the shared split, whose cache key
    (and so every run resumed from it) is unchanged; the report is the mean over the splits."""
    sys.path.insert(0, str(ROOT / "bench"))
    import argparse

    import bench_base_models as base
    import numpy as np

    shared = base.build_parser("test").parse_args(["--quick", "--split-seeds", "0", "1"])
    replicate = argparse.Namespace(**{**vars(shared), "split_seed": 1})
    assert "split_seed" not in base.cache_dir(shared).name
    assert base.cache_dir(replicate).name == base.cache_dir(shared).name + "-split_seed=1"
    patients = np.repeat(np.arange(100), 2)
    first, second = (base.sim.patient_folds(patients, 5, seed) for seed in (0, 1))
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))

    def split(seed: int, auroc: float, sources: dict) -> base.SplitRun:
        per = dict.fromkeys(base.FINDINGS, auroc)
        result = {"per_finding": per, "positives": dict.fromkeys(base.FINDINGS, 60), "macro": auroc}
        result.update(macro_over=list(base.FINDINGS), macro_excluding_pneumonia=auroc, by_source=sources)
        curve = [{"epoch": 2, "Cardiomegaly": auroc, "Effusion": auroc, "macro": auroc}]
        return base.SplitRun(seed, result, True, 200, {0: 1.0}, [auroc], curve, np.full((200, 14), auroc))

    sources = {"nih1000": {"n": 200, "auroc": {"Effusion": 0.7}}}
    mean, curve = base.mean_over_splits([split(0, 0.8, sources), split(1, 0.7, sources)])
    assert mean["per_finding"]["Cardiomegaly"] == mean["macro"] == curve[0]["macro"] == 0.75
    assert mean["by_source"]["nih1000"]["auroc"]["Effusion"] == 0.7
    partial, _ = base.mean_over_splits([split(0, 0.8, sources), split(1, 0.7, {})])  # split 1 not run yet
    assert partial["by_source"]["nih1000"]["auroc"]["Effusion"] is None

    # the results file's progress: per-fold figures per split only; a fold counts as done once every split has it
    first, second = split(0, 0.8, sources), split(1, 0.7, sources)
    second.fold_seconds, second.n_images = {0: 2.0, 1: 3.0}, 150
    first.fold_seconds = {0: 1.0, 1: 4.0, 2: 5.0}
    progress = base.progress_fields([first, second])
    assert progress == {"folds_done": [0, 1], "n_images": 150}
    assert base.progress_fields([first]) == {
        "folds_done": [0, 1, 2],
        "n_images": 200,
        "fold_seconds": {0: 1.0, 1: 4.0, 2: 5.0},
        "member_macro_auroc": [0.8],
    }


def test_stratified_folds_spread_a_rare_findings_positives_and_keep_patients_whole() -> None:
    """--stratify: every image in exactly one fold, a patient's images together, and a finding whose positives
    plain folds can pile into one fold (few patients, many images each) spread over all of them; its own cache."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_base_models as base
    import numpy as np

    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(300), 3)
    labels = np.zeros((len(patients), 3), np.float32)
    labels[:, 0] = rng.random(len(patients)) < 0.3  # common finding
    rare_patients = rng.choice(300, 20, replace=False)
    labels[np.isin(patients, rare_patients), 1] = 1  # rare finding: 20 patients, 60 images
    for seed in (0, 1):
        folds = base.sim.stratified_patient_folds(patients, labels, 5, seed)
        assert sorted(np.concatenate(folds).tolist()) == list(range(len(patients)))
        fold_of = {p: {i for i, f in enumerate(folds) if p in set(patients[f])} for p in np.unique(patients)}
        assert all(len(f) == 1 for f in fold_of.values())
        rare_per_fold = [int(labels[f, 1].sum()) for f in folds]
        assert rare_per_fold == [12] * 5, rare_per_fold  # 4 patients of 3 images each per fold
        assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 0.06 * len(patients) / 5
    shared = base.build_parser("test").parse_args(["--quick"])
    stratified = base.build_parser("test").parse_args(["--quick", "--stratify"])
    assert base.cache_dir(stratified).name == base.cache_dir(shared).name + "-stratify=True"


def test_physician_stratified_folds_cache_apart(tmp_path: Path) -> None:
    """bench_physician --stratify measures on stratified patient folds, and its folds, checkpoints and kept
    initial models never mix with the plain folds' (whose names are unchanged)."""
    import argparse

    import bench_physician as physician
    import numpy as np

    shared_or_skip(NIH)
    plain = argparse.Namespace(folds=5, scratch_epochs=1, out=tmp_path)
    stratified = argparse.Namespace(**{**vars(plain), "stratify": True})
    setup = physician.Setup(physician.sim.load_manifest_folder(NIH), physician.sim.ModelSpec())
    assert physician.cache_dir(plain, setup) == tmp_path / ".cache"
    assert physician.cache_dir(stratified, setup) == tmp_path / ".cache" / "stratified"
    assert "stratify" not in physician.initial_settings(plain, setup)
    assert (
        physician.initial_models_file(stratified, setup, 0).name != physician.initial_models_file(plain, setup, 0).name
    )
    folds = physician.held_out_folds(stratified, setup.data)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(setup.data)))
    np.testing.assert_array_equal(
        folds[0], physician.sim.stratified_patient_folds(setup.data.patients, setup.data.labels, 5, 0)[0]
    )
    spread = [setup.data.labels[f].sum(0) for f in folds]
    plain_spread = [setup.data.labels[f].sum(0) for f in physician.held_out_folds(plain, setup.data)]
    assert np.ptp(spread, axis=0).sum() < np.ptp(plain_spread, axis=0).sum()


def test_rank_ablation_stratified_reuses_the_physician_runs_initial_models(tmp_path: Path) -> None:
    """bench_rank_ablation --stratify starts from the initial models bench_physician --stratify kept for the same
    recipe and folds (no hour per fold retrained), and its own cache and results files carry the setting."""
    import argparse

    import bench_base_models as base
    import bench_physician as physician
    import bench_rank_ablation as ablation

    shared_or_skip(NIH)
    name = "base_models_80_mixup_strat"
    setup = physician.Setup(
        physician.sim.load_manifest_folder(NIH), physician.sim.ModelSpec(), base.load_recipe(name), name
    )
    flags = ["--base-recipe", name, "--out", str(tmp_path)]
    stratified = ablation.build_parser().parse_args([*flags, "--stratify"])
    plain = ablation.build_parser().parse_args(flags)
    physician_run = argparse.Namespace(folds=5, stratify=True, out=tmp_path)  # bench_physician's --stratify
    for fold in range(5):
        assert physician.initial_models_file(stratified, setup, fold) == physician.initial_models_file(
            physician_run, setup, fold
        )
    assert physician.initial_models_file(plain, setup, 0) != physician.initial_models_file(stratified, setup, 0)
    # the product's input-gradient weight (off) is part of the name; the legacy weight keeps the earlier names
    assert ablation.study_suffix(plain, setup) == f"_{name}_ignore_weight0"
    legacy = ablation.build_parser().parse_args([*flags, "--ignore-weight", "0.1"])
    assert ablation.study_suffix(legacy, setup) == f"_{name}"  # the name studies before the option had
    assert ablation.study_suffix(stratified, setup) == f"_{name}_stratified_ignore_weight0"
    finer = ablation.build_parser().parse_args([*flags, "--stratify", "--budgets", "10", "30", "--tag", "x"])
    assert ablation.study_suffix(finer, setup) == f"_{name}_stratified_budgets10-30_ignore_weight0_x"


def test_ignore_weight_variant_reruns_only_the_attention_arms_from_another_runs_cache(tmp_path: Path) -> None:
    """``--ignore-weight`` changes the input-gradient weight of the arms that have one and no other arm or term;
    ``--start-from`` copies the folds a variant's cache lacks from the run it varies, never over its own."""
    import argparse

    import bench_physician as physician

    default = physician.arms_for(argparse.Namespace())
    assert default == physician.ARMS  # no --ignore-weight: the arms as they are
    variant = physician.arms_for(argparse.Namespace(ignore_weight=0.5))  # not the default (0 since 2026-12-07)
    for before, after in zip(default, variant, strict=True):
        assert (before.name, before.order, before.initial) == (after.name, after.order, after.initial)
        if physician.has_attention(before):  # the four attention arms: only the weight changes
            assert after.loss == physician.replace(before.loss, ignore_weight=0.5)
        else:
            assert after is before
    assert [a.name for a, b in zip(variant, default, strict=True) if a.loss != b.loss] == [
        "attention_random",
        "attention_entropy",
        "attention_bald",
        "full",
    ]

    source, cache = tmp_path / "run", tmp_path / "variant"
    source.mkdir(), cache.mkdir()
    for name in ("fold0.pkl", "fold0-abc.initial.pt", "fold1.pkl", "fold1-abc.initial.pt", "fold2.pkl"):
        (source / name).write_bytes(name.encode())
    (cache / "fold1.pkl").write_bytes(b"the variant's own")
    copied = physician.start_from_cache(source, cache, [0, 1])
    assert copied == ["fold0.pkl", "fold0-abc.initial.pt", "fold1-abc.initial.pt"]
    assert (cache / "fold0.pkl").read_bytes() == b"fold0.pkl"
    assert (cache / "fold1.pkl").read_bytes() == b"the variant's own"  # never replaced
    assert not (cache / "fold2.pkl").exists()  # only the folds asked for

    # the summary names the attention arms the variant did not rerun: they keep the source run's loss
    arms = {"baseline": [], "attention_random": [], "attention_bald": [], "full": []}
    copied_fold = {"arms": arms, "seconds": 1.0}
    rerun = {"arms": {"full": ["new"], "attention_bald": ["new"]}, "seconds": 2.0}
    merged = physician.merge_rerun(copied_fold, rerun, ["full", "attention_bald"])
    assert merged["rerun_arms"] == ["attention_bald", "full"] and merged["arms"]["full"] == ["new"]
    assert physician.arms_not_rerun([merged]) == ["attention_random"]  # baseline has no attention loss
    again = physician.merge_rerun(merged, {"arms": {"attention_random": ["new"]}, "seconds": 1.0}, ["attention_random"])
    assert physician.arms_not_rerun([again]) == [] and physician.arms_not_rerun([copied_fold]) == []
