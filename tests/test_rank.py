"""Bias-aware ranking: each signal moves the order as intended, baselines behave, configs load, 10k is fast,
and the ranking job (against an in-memory Label Studio, with a real Redis) is resumable and never half-writes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CHEST_CONFIG, NIH, shared_or_skip
from label_studio_sdk.label_interface import LabelInterface
from torch import nn

from ml_backend.explain.brush_rle import encode_alpha
from ml_backend.feedback.annotations import IGNORE, AnnotationRecord, MaskRef
from ml_backend.rank.job import RankError, RankOptions, load_rank_config, rank_project, schedule_ranking
from ml_backend.rank.priors import label_statistics, priors_from_records
from ml_backend.rank.strategy import (
    RankConfig,
    RankInputs,
    bald_scores,
    default_body_mask,
    mc_dropout_probabilities,
    rank_candidates,
)

GRID = 7


def peaked_cam(row: int, col: int, grid: int = GRID, sigma: float = 0.7) -> np.ndarray:
    """A CAM-like map peaking at (row, col), min-max scaled to [0, 1] like run_model's."""
    y, x = np.mgrid[0:grid, 0:grid]
    cam = np.exp(-((y - row) ** 2 + (x - col) ** 2) / (2 * sigma**2))
    return ((cam - cam.min()) / (cam.max() - cam.min())).astype(np.float32)


def order(items) -> list[int]:
    return [item.index for item in items]


# ------------------------------------------------------------------------------------------------ signals
def test_rare_finding_at_half_beats_common_one() -> None:
    labels = ["Infiltration", "Hernia"]
    p = np.array([[0.5, 0.02], [0.02, 0.5]], dtype=np.float32)  # same entropy; only rarity tells them apart
    inputs = RankInputs(p, labels, label_counts=np.array([200, 5]), n_annotated=400)
    items = rank_candidates(inputs, RankConfig())
    assert order(items) == [1, 0]
    assert "rare finding Hernia predicted at 0.50" in items[0].reason
    assert items[0].signals["rarity"] > 0.4 > items[1].signals["rarity"]
    # Without label counts (or with a balanced set) there is no rarity signal: the tie stays in index order.
    assert order(rank_candidates(RankInputs(p, labels), RankConfig())) == [0, 1]
    balanced = RankInputs(p, labels, label_counts=np.array([100, 90]), n_annotated=400)
    assert rank_candidates(balanced, RankConfig())[0].signals["rarity"] < 0.05


def test_cold_start_rarity_from_configured_prevalence() -> None:
    p = np.array([[0.5, 0.02], [0.02, 0.5]], dtype=np.float32)
    config = RankConfig(prevalence={"Infiltration": 0.18, "Hernia": 0.002})
    items = rank_candidates(RankInputs(p, ["Infiltration", "Hernia"]), config)
    assert order(items) == [1, 0] and "rare finding Hernia" in items[0].reason


def test_heatmap_on_ignore_region_ranks_up_and_says_so() -> None:
    labels = ["Cardiomegaly", "Effusion"]
    n = 6
    p = np.full((n, 2), 0.3, dtype=np.float32)
    p[:, 0] = 0.7
    cams = np.stack([np.stack([peaked_cam(3, 3), peaked_cam(6, 3)]) for _ in range(n)])
    cams[0, 0] = peaked_cam(3, 5)  # mirror image of the shortcut position: same outside-body risk
    cams[4, 0] = peaked_cam(3, 1)  # the shortcut: Cardiomegaly's heat sits where physicians painted "ignore"
    prior = np.zeros((GRID, GRID), dtype=np.float32)
    prior[2:5, 0:3] = 1.0
    # Physicians' masks are at image resolution: the prior may come at any size and is resized to the CAM grid.
    big_prior = np.kron(prior, np.ones((32, 32), dtype=np.float32))
    without = rank_candidates(RankInputs(p, labels, cams=cams), RankConfig())
    with_prior = rank_candidates(RankInputs(p, labels, cams=cams, ignore_prior=big_prior), RankConfig())
    # Nothing marks the shortcut spot: image 4 is no different from its mirror image 0.
    by_index = {item.index: item for item in without}
    assert by_index[4].priority == pytest.approx(by_index[0].priority) and order(without)[0] != 4
    assert order(with_prior)[0] == 4
    top = with_prior[0]
    assert "heatmap of Cardiomegaly (p=0.70) on the ignore region" in top.reason
    assert top.signals["heatmap_ignore"] > 0.5 > with_prior[-1].signals["heatmap_ignore"]
    assert all("ignore region" not in item.reason for item in with_prior[1:])


def test_heatmap_outside_the_body() -> None:
    p = np.full((2, 1), 0.6, dtype=np.float32)
    cams = np.stack([peaked_cam(3, 3)[None], peaked_cam(0, 0)[None]])
    items = rank_candidates(RankInputs(p, ["Mass"], cams=cams), RankConfig())
    assert order(items) == [1, 0] and "heatmap of Mass (p=0.60) outside the body" in items[0].reason
    body = default_body_mask(GRID, GRID)
    assert body[3, 3] == 1.0 and body[0, 0] == 0.0


def test_findings_looking_at_the_same_spot() -> None:
    labels = ["Effusion", "Atelectasis"]
    p = np.full((2, 2), 0.8, dtype=np.float32)
    cams = np.stack([np.stack([peaked_cam(4, 2), peaked_cam(2, 4)]), np.stack([peaked_cam(4, 2), peaked_cam(4, 2)])])
    config = RankConfig(signal_weights={"uncertainty": 0.0})  # isolate the heatmap signal
    items = rank_candidates(RankInputs(p, labels, cams=cams), config)
    assert order(items) == [1, 0]
    assert "heatmaps of Effusion and Atelectasis on the same spot" in items[0].reason


def test_cooccurrence_risk_with_and_without_partner() -> None:
    labels = ["Effusion", "Infiltration", "Mass"]
    cooc = np.full((3, 3), 0.2)
    cooc[0, 1] = 0.9  # Effusion almost always comes with Infiltration
    np.fill_diagonal(cooc, 1.0)
    counts, n = np.array([20, 20, 20]), 100
    p = np.array([[0.8, 0.8, 0.02], [0.8, 0.02, 0.8], [0.3, 0.02, 0.02]], dtype=np.float32)
    config = RankConfig(signal_weights={"uncertainty": 0.0})
    items = rank_candidates(RankInputs(p, labels, label_counts=counts, n_annotated=n, cooccurrence=cooc), config)
    by_index = {item.index: item for item in items}
    assert by_index[0].priority > by_index[1].priority  # predicted alongside the partner > predicted alone
    assert "Effusion predicted at 0.80 alongside its frequent partner Infiltration" in by_index[0].reason
    assert "Effusion possibly missed (p=0.30) where its usual partner Infiltration is absent" in by_index[2].reason
    # A partner that is merely common (P(B|A) at its base rate) is no partner at all.
    flat = np.full((3, 3), 0.2)
    none = rank_candidates(RankInputs(p, labels, label_counts=counts, n_annotated=n, cooccurrence=flat), config)
    assert all("partner" not in item.reason for item in none)


def test_finding_weights_change_the_order() -> None:
    labels = ["Effusion", "Pneumothorax", "Nodule"]
    p = np.array([[0.5, 0.01, 0.01], [0.01, 0.5, 0.01]], dtype=np.float32)
    assert order(rank_candidates(RankInputs(p, labels), RankConfig())) == [0, 1]
    weighted = rank_candidates(RankInputs(p, labels), RankConfig(finding_weights={"Pneumothorax": 3.0}))
    assert order(weighted) == [1, 0] and "Pneumothorax" in weighted[0].reason
    muted = RankConfig(finding_weights={"Effusion": 0.0, "Pneumothorax": 0.0, "Nodule": 0.0})
    with pytest.raises(ValueError, match="every finding weight is 0"):
        rank_candidates(RankInputs(p, labels), muted)


def test_near_duplicates_are_not_adjacent_at_the_top() -> None:
    rng = np.random.default_rng(1)
    n, c = 60, 32
    features = rng.normal(size=(n, c)).astype(np.float32)
    features[1:5] = features[0] + rng.normal(scale=0.01, size=(4, c))  # five near-identical X-rays
    p = rng.uniform(0.01, 0.08, size=(n, 4)).astype(np.float32)
    p[:5, 0] = 0.5  # ... which are also the most uncertain
    labels = ["A", "B", "C", "D"]
    plain = rank_candidates(RankInputs(p, labels), RankConfig())
    assert sorted(order(plain)[:5]) == [0, 1, 2, 3, 4]  # without features they would fill the top five
    diverse = RankConfig(signal_weights={"diversity": 1.0})  # off by default (config.py says why)
    items = rank_candidates(RankInputs(p, labels, features=features), diverse)
    top = order(items)[:10]
    assert len({0, 1, 2, 3, 4} & set(top)) == 1
    later = next(item for item in items if item.index in {1, 2, 3, 4})
    assert "looks like a task ranked higher" in later.reason and later.signals["diversity"] < 0.1
    assert sorted(order(items)) == list(range(n))  # a permutation: nothing lost or repeated
    no_diversity = rank_candidates(
        RankInputs(p, labels, features=features), RankConfig(signal_weights={"diversity": 1.0}, diversity_lambda=0.0)
    )
    assert order(no_diversity) == order(plain)
    by_default = rank_candidates(RankInputs(p, labels, features=features), RankConfig())
    assert order(by_default) == order(plain)


def test_top_k_and_edge_cases() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(30, 3)).astype(np.float32)
    feats = rng.normal(size=(30, 8)).astype(np.float32)
    items = rank_candidates(RankInputs(p, ["a", "b", "c"], features=feats), RankConfig(), top_k=5)
    assert [i.rank for i in items] == [0, 1, 2, 3, 4]
    assert all(0.0 <= i.priority <= 1.0 for i in items)
    assert rank_candidates(RankInputs(np.zeros((0, 3)), ["a", "b", "c"]), RankConfig()) == []
    nan = p.copy()
    nan[0, 0] = np.nan
    assert len(rank_candidates(RankInputs(nan, ["a", "b", "c"]), RankConfig())) == 30
    with pytest.raises(ValueError, match="3 columns but 2 labels"):
        rank_candidates(RankInputs(p, ["a", "b"]), RankConfig())
    with pytest.raises(ValueError, match="cams must have shape"):
        rank_candidates(RankInputs(p, ["a", "b", "c"], cams=np.zeros((30, 2, 7, 7))), RankConfig())


# ------------------------------------------------------------------------------------------------ baselines
def test_random_baseline_is_a_seeded_permutation() -> None:
    p = np.random.default_rng(0).uniform(size=(100, 3)).astype(np.float32)
    a = rank_candidates(RankInputs(p, ["a", "b", "c"]), RankConfig(strategy="random", seed=3))
    b = rank_candidates(RankInputs(p, ["a", "b", "c"]), RankConfig(strategy="random", seed=3))
    c = rank_candidates(RankInputs(p, ["a", "b", "c"]), RankConfig(strategy="random", seed=4))
    assert order(a) == order(b) != order(c) and sorted(order(a)) == list(range(100))
    assert a[0].reason == "random baseline (seed 3)"


def test_entropy_baseline_orders_by_mean_entropy() -> None:
    p = np.array([[0.99, 0.01], [0.5, 0.5], [0.7, 0.1]], dtype=np.float32)
    items = rank_candidates(RankInputs(p, ["a", "b"]), RankConfig(strategy="entropy"))
    assert order(items) == [1, 2, 0]
    assert items[0].reason.startswith("entropy baseline: mean entropy 1.00")


def test_bald_baseline_prefers_disagreeing_passes() -> None:
    t, n = 8, 3
    mc = np.full((t, n, 1), 0.5, dtype=np.float32)  # image 0: uncertain but every pass agrees (aleatoric)
    mc[::2, 1, 0], mc[1::2, 1, 0] = 0.05, 0.95  # image 1: passes disagree (epistemic)
    mc[:, 2, 0] = 0.02  # image 2: confident
    p = mc.mean(axis=0)
    items = rank_candidates(RankInputs(p, ["x"], mc_probabilities=mc), RankConfig(strategy="bald"))
    assert order(items)[0] == 1
    assert bald_scores(mc)[0, 0] == pytest.approx(0.0, abs=1e-6) and bald_scores(mc)[1, 0] > 0.5
    assert "BALD baseline (8 MC-dropout passes)" in items[0].reason
    with pytest.raises(ValueError, match="needs mc_probabilities"):
        rank_candidates(RankInputs(p, ["x"]), RankConfig(strategy="bald"))


def test_bias_strategy_uses_epistemic_disagreement_when_samples_are_given() -> None:
    t, n = 8, 4
    mc = np.full((t, n, 2), 0.3, dtype=np.float32)  # same mean probability everywhere
    mc[::2, 2, 1], mc[1::2, 2, 1] = 0.05, 0.55  # image 2: the passes disagree on finding "b"
    p = mc.mean(axis=0)
    config = RankConfig(signal_weights={"diversity": 0.0})
    without = rank_candidates(RankInputs(p, ["a", "b"]), config)
    assert "epistemic" not in without[0].signals  # no samples, no signal (and no error)
    items = rank_candidates(RankInputs(p, ["a", "b"], mc_probabilities=mc), config)
    assert order(items)[0] == 2
    assert items[0].signals["epistemic"] == pytest.approx(1.0)
    assert "knowledge of b is unsettled" in items[0].reason
    off = rank_candidates(
        RankInputs(p, ["a", "b"], mc_probabilities=mc), RankConfig(signal_weights={"epistemic": 0, "diversity": 0})
    )
    assert "epistemic" not in off[0].signals
    with pytest.raises(ValueError, match="mc_probabilities must have shape"):
        rank_candidates(RankInputs(p, ["a", "b"], mc_probabilities=mc[:, :3]), config)


def test_mc_dropout_probabilities_on_a_timm_model_and_a_plain_one() -> None:
    from ml_backend.models.classifier import build_classifier

    torch.manual_seed(0)
    model = build_classifier("test_resnet", 3).eval()  # a tiny timm resnet: avg-pool + linear head
    images = torch.randn(5, 3, 32, 32)
    mc = mc_dropout_probabilities(model, images, passes=6, batch_size=2)
    assert mc.shape == (6, 5, 3) and np.all((mc >= 0) & (mc <= 1))
    assert mc.std(axis=0).mean() > 1e-4  # the passes differ: dropout is on
    np.testing.assert_allclose(mc, mc_dropout_probabilities(model, images, passes=6, batch_size=2))  # seeded
    assert not model.training  # modes restored

    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 2)).eval()
    mc2 = mc_dropout_probabilities(plain, torch.randn(4, 3, 2, 2), passes=4, rate=0.5)
    assert mc2.shape == (4, 4, 2) and mc2.std(axis=0).mean() > 1e-4
    assert plain[3].p == 0.0 and not plain.training
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_probabilities(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(2, 3, 2, 2))


# ------------------------------------------------------------------------------------------------ config
def test_config_from_json_and_yaml_files(tmp_path: Path) -> None:
    (tmp_path / "rank.json").write_text(
        json.dumps({"strategy": "bias", "finding_weights": {"Pneumothorax": 3}, "signal_weights": {"heatmap": 2}})
    )
    config = RankConfig.from_file(tmp_path / "rank.json")
    assert config.finding_weights == {"Pneumothorax": 3} and config.signal_weights["heatmap"] == 2
    assert config.signal_weights["uncertainty"] == 1.0  # unnamed signals keep their defaults
    (tmp_path / "rank.yaml").write_text(
        "ranking:\n  strategy: entropy\n  finding_weights:\n    Hernia: 2.5\n  diversity_lambda: 0.2\n"
    )
    yaml_config = RankConfig.from_file(tmp_path / "rank.yaml")
    assert yaml_config.strategy == "entropy" and yaml_config.finding_weights == {"Hernia": 2.5}
    assert yaml_config.diversity_lambda == 0.2
    assert yaml_config.unknown_findings(["Effusion"]) == ["Hernia"]

    merged = config.merged({"ranking": {"finding_weights": {"Hernia": 2}}})
    assert merged.finding_weights == {"Pneumothorax": 3, "Hernia": 2}
    assert RankConfig.from_mapping(merged.to_json()) == merged


def test_config_errors_are_clear(tmp_path: Path, monkeypatch) -> None:
    for bad, message in [
        ({"strategy": "magic"}, "unknown ranking strategy 'magic'"),
        ({"finding_weights": {"Effusion": -1}}, r"finding_weights\['Effusion'\] must be a finite number >= 0"),
        ({"signal_weights": {"vibes": 1}}, r"signal_weights has unknown key\(s\) \['vibes'\]"),
        ({"colour": "red"}, r"unknown ranking setting\(s\) \['colour'\]"),
        ({"finding_weights": ["Effusion"]}, "must be a mapping"),
        ({"prevalence": {"Hernia": 2}}, "strictly between 0 and 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            RankConfig.from_mapping(bad)
    (tmp_path / "broken.yaml").write_text("finding_weights: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid yaml"):
        RankConfig.from_file(tmp_path / "broken.yaml")
    with pytest.raises(ValueError, match="cannot read ranking config"):
        RankConfig.from_file(tmp_path / "absent.json")
    # $RANKING_CONFIG < project settings < command line
    (tmp_path / "env.json").write_text(json.dumps({"strategy": "entropy", "finding_weights": {"Mass": 2}}))
    monkeypatch.setenv("RANKING_CONFIG", str(tmp_path / "env.json"))
    layered = load_rank_config(project_overrides={"ranking": {"finding_weights": {"Edema": 4}}}, strategy="bias")
    assert layered.strategy == "bias" and layered.finding_weights == {"Mass": 2, "Edema": 4}


# ------------------------------------------------------------------------------------------------ speed
def test_ten_thousand_candidates_are_all_ranked() -> None:
    # The speed is measured by bench/bench_rank.py (rank.md: 0.43 s), not here: a wall-clock bound in a test
    # failed on this 2-core machine whenever benchmarks shared it (19 s at nice 15), while the code was unchanged.
    rng = np.random.default_rng(0)
    n, k, c = 10_000, 14, 512
    labels = [f"F{i}" for i in range(k)]
    prior = np.zeros((GRID, GRID), dtype=np.float32)
    prior[0, 0] = 1.0
    inputs = RankInputs(
        probabilities=rng.beta(0.5, 2.0, size=(n, k)).astype(np.float32),
        labels=labels,
        cams=(rng.random((n, k, GRID, GRID)) ** 4).astype(np.float32),
        features=rng.random((n, c)).astype(np.float32),
        label_counts=rng.integers(5, 2000, size=k),
        n_annotated=5000,
        cooccurrence=rng.random((k, k)) * 0.5,
        ignore_prior=prior,
    )
    for config in (RankConfig(), RankConfig(signal_weights={"diversity": 1.0})):
        items = rank_candidates(inputs, config)
        assert sorted(item.index for item in items) == list(range(n))  # a permutation: nothing lost or repeated
        priorities = [item.priority for item in items]
        assert all(0.0 <= p <= 1.0 for p in priorities) and all(item.reason for item in items[:10])


# ------------------------------------------------------------------------------------------------ priors
def test_priors_from_annotation_records() -> None:
    labels = ["Effusion", "Infiltration", "Hernia"]
    counts, n, cooc = label_statistics([["Effusion", "Infiltration"], ["Effusion"], [], ["Hernia", "Unknown"]], labels)
    assert counts.tolist() == [2, 1, 1] and n == 4
    assert cooc[0, 1] == 0.5 and cooc[1, 0] == 1.0 and cooc[2, 0] == 0.0

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:16, :16] = 255  # a marker in the top-left corner
    rle = encode_alpha(mask)
    records = [
        AnnotationRecord("1", 1, 11, "a.png", ["Effusion"], {IGNORE: MaskRef(rle, 64, 64)}),
        AnnotationRecord("1", 2, 12, "b.png", ["Effusion", "Infiltration"], {f"{IGNORE}#3": MaskRef(rle, 64, 64)}),
        AnnotationRecord("1", 3, 13, "c.png", []),
        AnnotationRecord("1", 4, 14, "d.png", [], {IGNORE: MaskRef([1, 2, 3, 4, 5, 6, 7], 64, 64)}),  # corrupt
    ]
    priors = priors_from_records(records, labels, (4, 4))
    assert priors.n_annotated == 4 and priors.n_ignore_masks == 2
    assert priors.ignore_prior[0, 0] == 1.0 and priors.ignore_prior[1:, :].sum() == 0  # mean over masked images
    assert priors.skipped and "ignore mask unreadable" in priors.skipped[0]["reason"]


# ------------------------------------------------------------------------------------------------ the job
class FakeLabelStudio:
    """The few Label Studio API calls the ranking job makes, in memory (the e2e test uses the real one)."""

    def __init__(self, project_id: int, label_config: str, tasks: list[dict[str, Any]]) -> None:
        self.project_id, self.label_config = project_id, label_config
        self.model_version = "MEDebiaser"  # what connecting a backend leaves there: its title
        self.task_data = {t["id"]: t for t in tasks}
        self.annotation_data: dict[int, list[dict[str, Any]]] = {}
        self.prediction_data: dict[int, dict[str, Any]] = {}
        self.view_list: list[SimpleNamespace] = []
        self.fail_import_after: int | None = None  # simulate a crash during the n-th import call
        self.import_calls = 0
        self.projects = SimpleNamespace(get=self._get_project, update=self._update, import_predictions=self._import)
        self.tasks = SimpleNamespace(list=self._list_tasks, update=self._update_task)
        self.task_updates: list[dict[str, Any]] = []  # the data PATCHes (Data Manager columns)
        self.annotations = SimpleNamespace(list=lambda id: self.annotation_data.get(id, []))
        self.predictions = SimpleNamespace(
            list=self._list_predictions, delete=self._delete_prediction, update=self._update_prediction
        )
        self.views = SimpleNamespace(list=lambda project: self.view_list, create=self._create_view, update=self._upd)
        self.ml = SimpleNamespace(list=lambda project: [SimpleNamespace(id=1, extra_params=None)])

    def _get_project(self, id: int) -> SimpleNamespace:
        if id != self.project_id:
            from label_studio_sdk.core.api_error import ApiError

            raise ApiError(status_code=404, body={"detail": "Not found."})
        return SimpleNamespace(id=id, label_config=self.label_config, model_version=self.model_version)

    def _update(self, id: int, model_version: str) -> None:
        if not any(p["model_version"] == model_version for p in self.prediction_data.values()):
            from label_studio_sdk.core.api_error import ApiError

            raise ApiError(status_code=400, body={"model_version": ["not in project"]})
        self.model_version = model_version

    def _versions(self, task_id: int) -> str:
        return ",".join(sorted({p["model_version"] for p in self.prediction_data.values() if p["task"] == task_id}))

    def _list_tasks(
        self, project: int, include: str, page_size: int, query: str | None, resolve_uri: bool | None = None
    ) -> list[dict[str, Any]]:
        ids = json.loads(query)["selectedItems"]["included"] if query else sorted(self.task_data)
        return [
            {
                **self.task_data[i],
                "total_annotations": len(self.annotation_data.get(i, [])),
                "cancelled_annotations": 0,
                "predictions_model_versions": self._versions(i),
            }
            for i in ids
            if i in self.task_data
        ]

    def _update_task(self, id: str, data: dict[str, Any], request_options: dict[str, Any]) -> None:
        self.task_updates.append({"id": int(id), "data": data, "request_options": request_options})
        self.task_data[int(id)]["data"] = dict(data)

    def _import(self, id: int, request: list[dict[str, Any]]) -> None:
        self.import_calls += 1
        if self.fail_import_after is not None and self.import_calls > self.fail_import_after:
            raise ConnectionError("Label Studio went away")
        for prediction in request:
            self.prediction_data[max(self.prediction_data, default=999) + 1] = dict(prediction)

    def _list_predictions(self, task: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(id=i, **p) for i, p in self.prediction_data.items() if p["task"] == task]

    def _delete_prediction(self, id: int) -> None:
        del self.prediction_data[id]

    def _update_prediction(self, id: int, **fields: Any) -> SimpleNamespace:
        self.prediction_data[id].update(fields)
        return SimpleNamespace(id=id, **self.prediction_data[id])

    def _create_view(self, project: int, data: dict[str, Any]) -> SimpleNamespace:
        self.view_list.append(SimpleNamespace(id=len(self.view_list) + 1, data=dict(data)))
        return self.view_list[-1]

    def _upd(self, id: str, data: dict[str, Any], project: int) -> None:
        next(v for v in self.view_list if v.id == int(id)).data = dict(data)

    def scores(self, version: str) -> dict[int, float]:
        return {p["task"]: p["score"] for p in self.prediction_data.values() if p["model_version"] == version}


@pytest.fixture()
def job_setup(settings, file_root, nih_manifest, redis_conn):
    """Twelve NIH images behind the test file server (as Label Studio serves uploads), plus a broken task."""
    shared_or_skip(NIH)
    settings = replace(settings, backbone="test_resnet", input_size=64, predict_batch_size=8)  # a tiny timm resnet
    tasks = []
    for i, record in enumerate(nih_manifest[:12]):
        name = Path(record["image"]).name
        shutil.copy(NIH / record["image"], file_root / name)
        tasks.append({"id": 100 + i, "data": {"image": f"/data/upload/{name}"}})
    tasks.append({"id": 200, "data": {"image": "/data/upload/not-there.png"}})
    client = FakeLabelStudio(7, CHEST_CONFIG, tasks)
    # two tasks are labelled; one carries an ignore mask over the top-left corner
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:12, :12] = 255
    brush = {
        "from_name": "evidence",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": 64,
        "original_height": 64,
        "value": {"format": "rle", "rle": encode_alpha(mask), "brushlabels": ["Ignore (marker, tube, text)"]},
    }
    choices = {"from_name": "findings", "to_name": "image", "type": "choices", "value": {"choices": ["Effusion"]}}
    client.annotation_data[100] = [{"id": 1, "result": [choices, brush], "updated_at": "2026-01-01"}]
    client.annotation_data[101] = [{"id": 2, "result": [choices], "updated_at": "2026-01-01"}]
    return settings, client, redis_conn


def test_ranking_job_writes_scores_reasons_and_switches_the_project(job_setup) -> None:
    settings, client, conn = job_setup
    stale_checkpoint = settings.model_dir / "projects" / "7" / "ranking" / "v-old"
    stale_checkpoint.mkdir(parents=True)
    summary = rank_project(7, settings, RankOptions(write_batch=4), client=client, conn=conn)
    assert summary["status"] == "ranked" and summary["version"] == "v0"
    assert not stale_checkpoint.exists()  # an older version's checkpoint goes once this version is live
    assert (settings.model_dir / "projects" / "7" / "ranking" / "v0" / "ranking.json").is_file()
    assert summary["ranked"] == 10 and summary["written"] == 10 and summary["candidates"] == 11
    assert summary["skipped"] == [{"task": 200, "reason": "fetching '/data/upload/not-there.png' returned HTTP 404"}]
    assert summary["priors"]["source"] == "label studio" and summary["priors"]["ignore_masks"] == 1
    scores = client.scores("v0")
    assert sorted(scores) == list(range(102, 112))  # unlabelled, loadable tasks only
    assert sorted(scores.values(), reverse=True) == [round(1 - r / 10, 6) for r in range(10)]
    top = max(scores, key=scores.get)
    prediction = next(p for p in client.prediction_data.values() if p["task"] == top)
    findings = next(r for r in prediction["result"] if r["type"] == "choices")
    assert findings["ranking"]["rank"] == 1 and findings["ranking"]["reason"] == summary["top"][0]["reason"]
    assert len(findings["probabilities"]) == 14
    assert any(r["type"] == "brushlabels" for r in prediction["result"])  # heatmaps, as /predict sends them
    assert client.model_version == "v0"
    assert client.view_list[0].data["title"] == "Review queue" and client.view_list[0].data["ordering"] == [
        "-tasks:predictions_score"
    ]
    progress = {k.decode(): json.loads(v) for k, v in conn.hgetall("mdb:7:rank").items()}
    assert progress["stage"] == "done" and progress["version"] == "v0"

    # A rerun with nothing new reuses the model outputs and the saved ranking and writes nothing.
    again = rank_project(7, settings, RankOptions(write_batch=4), client=client, conn=conn)
    assert again["written"] == 0 and again["seconds"].get("rank") is None and len(client.prediction_data) == 10
    # Forced: re-ranked; this version's predictions are updated in place, not piled up (and never deleted).
    ids_before = set(client.prediction_data)
    forced = rank_project(7, settings, RankOptions(write_batch=4, force=True), client=client, conn=conn)
    assert forced["written"] == 10 and forced["updated_in_place"] == 10 and set(client.prediction_data) == ids_before


def test_ranking_job_shows_reasons_and_probabilities_to_the_physician(job_setup) -> None:
    """The reason on the labelling page (the summary TextArea) and in Data Manager columns (task data)."""
    settings, client, conn = job_setup
    client.task_data[105]["data"]["top_finding"] = "Mass (second reader)"  # the user's own field: kept
    summary = rank_project(7, settings, RankOptions(write_batch=4), client=client, conn=conn)
    assert summary["review_columns"] == {"written": 10, "failed": 0, "cleared": 0, "user_fields_kept": 1}
    assert client.task_data[105]["data"]["top_finding"] == "Mass (second reader)"
    assert "review_rank" in client.task_data[105]["data"]
    first = summary["top"][0]
    data = client.task_data[first["task"]]["data"]
    assert data["image"].startswith("/data/upload/")  # the image reference is kept
    assert data["review_rank"] == 1 and data["review_reason"] == first["reason"]
    assert data["review_priority"] == round(first["priority"], 4)
    assert len([k for k in data if k.startswith("p_")]) == 14 and 0 <= data["p_Effusion"] <= 1
    assert data["top_probability"] == max(data[k] for k in data if k.startswith("p_"))
    prediction = next(p for p in client.prediction_data.values() if p["task"] == first["task"])
    (text,) = [r for r in prediction["result"] if r["type"] == "textarea"]
    assert (
        text["value"]["text"][0] == f"In your queue at #1 (priority {first['priority']:.2f}, bias): {first['reason']}"
    )
    assert LabelInterface(CHEST_CONFIG).validate_prediction(prediction, return_errors=True) in (True, [])
    view = client.view_list[0].data
    assert view["columnsDisplayType"]["tasks:data.review_rank"] == "Number"
    assert view["columnsDisplayType"]["tasks:data.p_Effusion"] == "Number"

    # Nothing new: no PATCH. Task 102 annotated since: out of the queue, its rank and reason go.
    patches = len(client.task_updates)
    assert rank_project(7, settings, RankOptions(write_batch=4), client=client, conn=conn)["written"] == 0
    assert len(client.task_updates) == patches
    labelled = 102
    client.annotation_data[labelled] = [{"id": 3, "result": [], "updated_at": "2026-01-02"}]
    again = rank_project(7, settings, RankOptions(write_batch=4, force=True), client=client, conn=conn)
    assert again["review_columns"]["cleared"] == 1
    data = client.task_data[labelled]["data"]
    assert "review_rank" not in data and "review_reason" not in data and "p_Effusion" in data

    # A deleted task leaves the record of which columns are MEDebiaser's (it would otherwise grow forever).
    record = settings.model_dir / "projects" / "7" / "review_columns.json"
    gone = first["task"]
    assert any(gone in ids for ids in json.loads(record.read_text())["keys"].values())
    del client.task_data[gone]
    rank_project(7, settings, RankOptions(write_batch=4, force=True), client=client, conn=conn)
    keys = json.loads(record.read_text())["keys"]
    assert keys["review_rank"] and all(gone not in ids for ids in keys.values())


def test_interrupted_write_resumes_without_mixing(job_setup) -> None:
    settings, client, conn = job_setup
    client.fail_import_after = 1  # the second chunk's import fails: a crash half-way
    with pytest.raises(ConnectionError):
        rank_project(7, settings, RankOptions(write_batch=4), client=client, conn=conn)
    assert len(client.prediction_data) == 4
    assert client.model_version == "MEDebiaser" and not client.view_list  # the queue still follows the old state
    first_scores = client.scores("v0")
    client.fail_import_after = None
    resumed = rank_project(7, settings, RankOptions(write_batch=4), client=client, conn=conn)
    assert resumed["written"] == 6 and resumed["seconds"].get("rank") is None  # the saved ranking is reused
    scores = client.scores("v0")
    assert len(scores) == 10 and all(scores[t] == s for t, s in first_scores.items())
    assert sorted(scores.values(), reverse=True) == [round(1 - r / 10, 6) for r in range(10)]
    assert client.model_version == "v0"


def test_prediction_made_meanwhile_is_updated_in_place(job_setup) -> None:
    settings, client, conn = job_setup
    # A physician opened task 105 before the ranking: /predict stored a v0 prediction with its own score.
    client.prediction_data[1] = {"task": 105, "result": [], "score": 0.93, "model_version": "v0"}
    client.prediction_data[2] = {"task": 105, "result": [], "score": 0.5, "model_version": "old"}
    summary = rank_project(7, settings, RankOptions(write_batch=20), client=client, conn=conn)
    assert summary["updated_in_place"] == 1
    on_task = {i: p for i, p in client.prediction_data.items() if p["task"] == 105}
    assert sorted(p["model_version"] for p in on_task.values()) == ["old", "v0"]  # other versions are history
    # the prediction Label Studio created is kept (same id) and now carries the ranking's score and reason
    assert 1 in on_task and on_task[1]["score"] == client.scores("v0")[105] != 0.93
    assert next(r for r in on_task[1]["result"] if r["type"] == "choices")["ranking"]["rank"] >= 1


def test_bad_projects_fail_clearly_and_write_nothing(job_setup) -> None:
    settings, client, conn = job_setup
    with pytest.raises(RankError, match="Label Studio has no project 8"):
        rank_project(8, settings, client=client, conn=conn)
    no_findings = FakeLabelStudio(
        7, '<View><Image name="image" value="$image"/></View>', list(client.task_data.values())
    )
    with pytest.raises(RankError, match="label config unusable for ranking"):
        rank_project(7, settings, client=no_findings, conn=conn)
    empty = FakeLabelStudio(7, CHEST_CONFIG, [])
    assert rank_project(7, settings, client=empty, conn=conn)["reason"] == "project 7 has no tasks"
    broken = FakeLabelStudio(7, CHEST_CONFIG, [{"id": 1, "data": {"image": "/data/upload/nope.png"}}, {"id": 2}])
    summary = rank_project(7, settings, client=broken, conn=conn)
    assert summary["status"] == "skipped" and summary["reason"] == "no candidate image could be loaded"
    assert {s["task"] for s in summary["skipped"]} == {1, 2} and not broken.prediction_data
    with pytest.raises(ValueError, match="unknown ranking strategy"):
        rank_project(7, settings, RankOptions(strategy="oracle"), client=client, conn=conn)
    assert not client.prediction_data


def test_baseline_strategies_through_the_job(job_setup) -> None:
    settings, client, conn = job_setup
    for strategy in ("random", "entropy", "bald"):
        summary = rank_project(7, settings, RankOptions(strategy=strategy, dry_run=True), client=client, conn=conn)
        assert summary["status"] == "dry-run" and summary["strategy"] == strategy and summary["ranked"] == 10
    assert summary["top"][0]["reason"].startswith("BALD baseline")
    assert not client.prediction_data  # dry runs write nothing


def test_schedule_ranking_coalesces_and_the_rq_job_reports(redis_url, redis_conn, settings, monkeypatch) -> None:
    from ml_backend.feedback.queue import fetch_job, make_worker, ranking_queue, training_queue

    first = schedule_ranking(redis_conn, "7", "v1")
    assert first is not None and schedule_ranking(redis_conn, "7", "v2") is None  # one queued ranking per project
    assert ranking_queue(redis_conn).count == 1 and training_queue(redis_conn).count == 0  # its own queue
    # The worker runs it against the test file server, which is no Label Studio: a clear "skipped", no crash.
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MODEL_DIR", str(settings.model_dir))
    monkeypatch.setenv("LABEL_STUDIO_URL", settings.label_studio_url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", settings.label_studio_api_key)
    make_worker(redis_conn, replace(settings, redis_url=redis_url), in_process=True).work(burst=True)
    job = fetch_job(redis_conn, first)
    assert job.get_status() == "finished", job.latest_result().exc_string if job.latest_result() else None
    assert job.return_value() == {"status": "skipped", "reason": "Label Studio has no project 7"}
    assert redis_conn.get("mdb:7:rank-queued") is None  # the job released its marker
    assert schedule_ranking(redis_conn, "7", "v2") is not None
