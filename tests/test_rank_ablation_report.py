"""bench_rank_ablation's arms and report without training anything: a drop-one study run without the random arm
must say so in its table rather than compare against a random order it never ran."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_rank_ablation as ablation  # noqa: E402


def _result(arms: list[str], pooled: dict[str, float | None]) -> dict:
    return {
        "arms": arms,
        "pooled": pooled,
        "per_fold": {arm: [pooled[arm]] for arm in arms},
        "final_delta_p": {arm: [0.01] for arm in arms},
        "start_delta_p": [0.3],
        "budgets": [10, 20, 30, 60, 120],
        "commands": ["python bench/bench_rank_ablation.py --without-random"],
        "machine": "test",
        "seconds": 1.0,
        "folds": 1,
        "split_seed": 0,
        "initial_delta_p_spread": 0.0,
    }


def test_arms_without_random_keep_the_references_and_drop_one_arms() -> None:
    names = [a.name for a in ablation.ablation_arms(("heatmap", "rarity"), with_random=False)]
    assert names == ["attention_bald", "full", "full_without_heatmap", "full_without_rarity"]
    with_random = [a.name for a in ablation.ablation_arms(("heatmap",))]
    assert with_random[0] == "attention_random" and with_random[1:] == names[:3]
    kept = [a for a in ablation.ablation_arms((), with_random=False, keep_detector=True) if a.keep_detector]
    assert [(a.name, a.order) for a in kept] == [
        ("full_keep_detector", "bias"),
        ("attention_bald_keep_detector", "bald"),
    ]


def test_report_without_random_says_not_run(tmp_path: Path) -> None:
    arms = ["attention_bald", "full", "full_without_heatmap"]
    pooled = {"attention_bald": 10.0, "full": 13.0, "full_without_heatmap": None}
    ablation.write_outputs(_result(arms, pooled), tmp_path)
    rows = {line.split(" | ")[0]: line for line in (tmp_path / "rank_ablation.md").read_text().splitlines()}
    assert rows["| attention_bald"] == "| attention_bald | 10 | not run | 10 | 0.010 |"
    assert rows["| full_without_heatmap"] == "| full_without_heatmap | >120 | not run | >120 | 0.010 |"


def test_report_with_random_compares_to_it(tmp_path: Path) -> None:
    arms = ["attention_random", "full"]
    ablation.write_outputs(_result(arms, {"attention_random": 100.0, "full": 25.0}), tmp_path)
    table = (tmp_path / "rank_ablation.md").read_text()
    assert "| full | 25 | 75% | 25 | 0.010 |" in table
    # random never reaching the target: the saving is a lower bound against the last budget
    ablation.write_outputs(_result(arms, {"attention_random": None, "full": 30.0}), tmp_path)
    assert "| full | 30 | 75% (≥) | 30 | 0.010 |" in (tmp_path / "rank_ablation.md").read_text()


def test_mean_delta_p_over_budgets_is_the_area_under_the_curve_from_the_initial_model() -> None:
    import numpy as np

    fold = {"initial": {"wbce": {"dp": np.array([0.2, 0.4])}}, "arms": {"full": [{"delta_p": 0.1}, {"delta_p": 0.0}]}}
    # trapezoids from (0, 0.3) to (10, 0.1) to (20, 0.0): (2.0 + 0.5) / 20
    assert ablation.mean_delta_p_over_budgets(fold, "full", [10, 20]) == pytest.approx(0.125)


def test_report_shows_each_arms_paired_difference_from_full(tmp_path: Path) -> None:
    arms = ["attention_bald", "full"]
    result = _result(arms, {"attention_bald": 10.0, "full": 13.0})
    result["mean_delta_p_over_budgets"] = {"attention_bald": [0.05], "full": [0.03]}
    ablation.write_outputs(result, tmp_path)
    table = (tmp_path / "rank_ablation.md").read_text()
    assert "| attention_bald | 0.0500 | 0.0500 | +0.0200 | 0 of 1 |" in table
    assert "| full | 0.0300 | 0.0300 | +0.0000 | 0 of 1 |" in table


def test_a_cached_arm_is_reused_only_under_the_loss_it_was_computed_with(tmp_path: Path) -> None:
    """The study's name carries the input-gradient weight; each cached (fold, arm) also records its whole loss,
    so a study whose loss changed in any other way recomputes it instead of mixing two losses in one table."""
    import argparse
    import pickle
    from dataclasses import asdict, replace

    loss = ablation.attention_loss(argparse.Namespace(ignore_weight=None))
    assert loss == ablation.ATTENTION and loss.ignore_weight == 0.0  # the product's default
    assert ablation.attention_loss(argparse.Namespace(ignore_weight=0.03)).ignore_weight == 0.03
    assert all(a.loss == loss for a in ablation.ablation_arms(("heatmap",), loss=loss))
    part = tmp_path / "fold0_full.pkl"
    assert ablation.stored_part(part, loss) is None  # nothing cached yet
    stored = {"arms": {"full": [1]}, "attention_loss": asdict(loss)}
    part.write_bytes(pickle.dumps(stored))
    assert ablation.stored_part(part, loss) == stored
    assert ablation.stored_part(part, replace(loss, artefact_paste_rate=loss.artefact_paste_rate / 2)) is None
    part.write_bytes(pickle.dumps({"arms": {}}))  # cached before the loss was recorded: a legacy study's
    assert ablation.stored_part(part, loss) == {"arms": {}}
    ablation.write_outputs(_result(["full"], {"full": 10.0}), tmp_path)
    assert "not recorded (input-gradient weight 0.1)" in (tmp_path / "rank_ablation.md").read_text()
    ablation.write_outputs(_result(["full"], {"full": 10.0}) | {"attention_loss": asdict(loss)}, tmp_path)
    assert "'ignore_weight': 0.0" in (tmp_path / "rank_ablation.md").read_text()
