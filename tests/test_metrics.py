"""Metrics against hand-computed cases, fairlearn/scikit-learn, and one real ChestX-Det polygon."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fairlearn.metrics import equalized_odds_difference
from sklearn.metrics import f1_score

from ml_backend.measure.metrics import (
    COOCCURRENCE,
    _eod_vector_fn,
    _f1_vector,
    age_bins,
    attention_alignment,
    binarize,
    bootstrap_ci,
    choose_thresholds,
    cooccurrence_eod,
    cooccurrence_groups,
    cooccurrence_matrices,
    equalized_odds,
    evaluate_version,
    per_finding_metrics,
    phi_coefficients,
    polygon_mask,
    strongest_partners,
)
from ml_backend.train.reweighting import decorrelating_weights

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MANIFEST = SHARED / "data" / "nih1000" / "manifest.json"


def _random_case(n: int = 400, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random((n, k)) < 0.3
    prob = np.clip(0.35 * y + 0.65 * rng.random((n, k)), 0, 1)
    sex = rng.choice(["F", "M"], n)
    return y, prob, sex


# ------------------------------------------------------------------------------------ thresholds


def test_choose_thresholds_hand_case_and_fallback() -> None:
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 0]])
    prob = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.2, 0.9]])
    thr = choose_thresholds(y, prob)
    assert thr[0] == pytest.approx(0.8)  # >= 0.8 separates the classes perfectly
    assert thr[1] == 0.5  # no positives -> fallback
    assert binarize(prob, thr)[:, 0].tolist() == [True, True, False, False]


def test_choose_thresholds_maximises_f1() -> None:
    y, prob, _ = _random_case()
    thr = choose_thresholds(y, prob)
    for k in range(y.shape[1]):
        best = f1_score(y[:, k], prob[:, k] >= thr[k])
        for t in np.linspace(0.05, 0.95, 19):
            assert best >= f1_score(y[:, k], prob[:, k] >= t) - 1e-12


# ------------------------------------------------------------------------------- quality metrics


def test_perfect_predictor_scores_one() -> None:
    y, _, sex = _random_case()
    res = per_finding_metrics(y, y.astype(float), list("ABCD"), 0.5)
    assert res["macro_f1"] == 1.0 and res["micro_f1"] == 1.0 and res["macro_auroc"] == 1.0
    for v in res["per_finding"].values():
        assert v["f1"] == v["precision"] == v["recall"] == v["auroc"] == 1.0
    eo = equalized_odds(y, y, {"sex": sex}, list("ABCD"))
    assert eo["sex"]["worst"] == 0.0 and eo["sex"]["mean"] == 0.0


def test_per_finding_hand_case_and_no_support() -> None:
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 0]])
    prob = np.array([[0.9, 0.6], [0.1, 0.1], [0.8, 0.2], [0.2, 0.3]])
    res = per_finding_metrics(y, prob, ["A", "B"], [0.5, 0.5])
    a, b = res["per_finding"]["A"], res["per_finding"]["B"]
    assert (a["precision"], a["recall"], a["f1"]) == (0.5, 0.5, 0.5)
    assert a["auroc"] == pytest.approx(0.5)  # pairs: (0.9 > 0.8, 0.2), (0.1 < both) -> 2 of 4
    assert a["support"] == 2 and a["prevalence"] == 0.5 and a["predicted_positive"] == 2
    # B has no positives: F1/recall/AUROC undefined, precision 0 (one false alarm), left out of macro-F1.
    assert b["f1"] is None and b["recall"] is None and b["auroc"] is None and b["precision"] == 0.0
    assert b["support"] == 0
    assert res["macro_f1"] == 0.5 and res["macro_auroc"] == pytest.approx(0.5)
    assert res["micro_f1"] == pytest.approx(f1_score(y, prob >= 0.5, average="micro"))


def test_count_based_f1_matches_sklearn() -> None:
    y, prob, _ = _random_case(k=5)
    pred = prob >= 0.5
    vec = _f1_vector(y, pred)
    for k in range(5):
        assert vec[k] == pytest.approx(f1_score(y[:, k], pred[:, k]))
    assert vec[-1] == pytest.approx(per_finding_metrics(y, prob, list("abcde"), 0.5)["macro_f1"])


# -------------------------------------------------------------------------------------- fairness


def test_predictor_that_fires_only_for_men_has_eod_one() -> None:
    rng = np.random.default_rng(1)
    sex = np.array(["M", "F"] * 50)
    y = rng.random(100) < 0.4
    pred = sex == "M"
    eo = equalized_odds(y[:, None], pred[:, None], {"sex": sex}, ["Cardiomegaly"])
    entry = eo["sex"]["per_finding"]["Cardiomegaly"]
    assert entry["eod"] == 1.0 and entry["tpr_gap"] == 1.0 and entry["fpr_gap"] == 1.0
    assert entry["tpr"] == {"F": 0.0, "M": 1.0}
    assert eo["sex"]["worst"] == 1.0 and eo["sex"]["worst_finding"] == "Cardiomegaly"


def test_eod_matches_fairlearn_on_non_degenerate_groups() -> None:
    y, prob, _ = _random_case(n=600, k=3, seed=3)
    pred = prob >= 0.5
    age = age_bins(np.random.default_rng(3).integers(20, 90, 600))
    eo = equalized_odds(y, pred, {"age": age}, ["a", "b", "c"])
    fast = _eod_vector_fn(3, 1)(y, pred, np.unique(age, return_inverse=True)[1])
    for k, name in enumerate(["a", "b", "c"]):
        expected = equalized_odds_difference(y[:, k], pred[:, k], sensitive_features=age)
        assert eo["age"]["per_finding"][name]["eod"] == pytest.approx(expected)
        assert fast[k] == pytest.approx(expected)  # the bootstrap path agrees with fairlearn too
    assert fast[-1] == pytest.approx(eo["age"]["worst"])
    assert eo["age"]["mean"] <= eo["age"]["worst"]


def test_degenerate_groups_report_none_instead_of_a_fake_gap() -> None:
    sex = np.array(["F"] * 6 + ["M"] * 6 + ["unknown"] * 2)
    # Finding A: no positives among women -> only the FPR gap is defined.
    a = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1], bool)
    pa = np.array([1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    # Finding B: no positives anywhere; D: every image positive.
    y = np.stack([a, np.zeros(14, bool), np.ones(14, bool)], 1)
    pred = np.stack([pa, pa, pa], 1)
    groups = {"sex": sex, "site": np.array(["x"] * 14)}
    eo = equalized_odds(y, pred, groups, ["A", "B", "D"])
    ea = eo["sex"]["per_finding"]["A"]
    assert ea["tpr_gap"] is None and ea["tpr"]["F"] is None and ea["tpr"]["M"] == pytest.approx(2 / 3)
    assert ea["fpr_gap"] == pytest.approx(1 / 6) and ea["eod"] == pytest.approx(1 / 6)
    assert "unknown" not in ea["tpr"]  # missing values are left out
    # fairlearn would count TPR(F) as 0 and report the fake gap 2/3.
    assert equalized_odds_difference(a[:12], pa[:12], sensitive_features=sex[:12]) == pytest.approx(2 / 3)
    assert eo["sex"]["per_finding"]["B"]["eod"] == pytest.approx(1 / 6)  # FPR gap only
    assert eo["sex"]["per_finding"]["D"]["eod"] == pytest.approx(2 / 6 - 1 / 6)  # TPR gap only
    assert eo["site"]["worst"] is None and eo["site"]["n_defined"] == 0  # one group: nothing to compare
    # min_group_count drops groups with too few positives: now A's TPR(M) needs 4 positives.
    strict = equalized_odds(y, pred, {"sex": sex}, ["A", "B", "D"], min_group_count=4)
    assert strict["sex"]["per_finding"]["A"]["tpr"]["M"] is None


# ---------------------------------------------------------------------------------- co-occurrence


def _cooc_case() -> tuple[np.ndarray, list[str]]:
    labels = ["Effusion", "Atelectasis", "Nodule"]
    rows = [[1, 1, 0]] * 10 + [[1, 0, 1]] * 3 + [[1, 0, 0]] * 7 + [[0, 1, 0]] * 5 + [[0, 0, 0]] * 15
    return np.array(rows, bool), labels


def test_cooccurrence_groups_pick_the_most_associated_partner() -> None:
    y, labels = _cooc_case()
    groups = cooccurrence_groups(y, labels, min_support=5)
    assert set(groups) == {"Effusion", "Atelectasis"}  # Nodule shares only 3 images with Effusion
    partner, grp = groups["Effusion"]
    assert partner == "Atelectasis"
    assert (grp == "Atelectasis present").sum() == 15 and (grp == "Atelectasis absent").sum() == 25
    assert cooccurrence_groups(y, labels, min_support=3)["Nodule"][0] == "Effusion"


def test_partner_is_the_association_not_the_commonest_companion() -> None:
    """A common finding shares the most images with A without being associated with it; the partner is the
    finding whose presence changes A's odds (phi), the one training decorrelates A from."""
    rng = np.random.default_rng(0)
    n = 2000
    infiltration = rng.random(n) < 0.8  # common, independent of the rest
    effusion = rng.random(n) < 0.15
    atelectasis = np.where(effusion, rng.random(n) < 0.6, rng.random(n) < 0.05)  # mostly alongside effusion
    y = np.stack([atelectasis, effusion, infiltration], axis=1)
    labels = ["Atelectasis", "Effusion", "Infiltration"]
    counts = y.T.astype(int) @ y.astype(int)
    assert counts[0, 2] > counts[0, 1]  # Infiltration is Atelectasis's most frequent companion...
    assert cooccurrence_groups(y, labels)["Atelectasis"][0] == "Effusion"  # ...Effusion its partner
    partners = strongest_partners(y, min_support=5, min_phi=0.2)
    assert set(partners) == {0, 1} and partners[0][0] == 1 and partners[1][0] == 0
    assert partners[0][1] == pytest.approx(phi_coefficients(y)[0, 1]) and partners[0][1] > 0.4
    assert 2 not in partners  # Infiltration's best phi is near zero: no partner at all
    # the weights training uses pick the same pair
    weights, pairs = decorrelating_weights(torch.from_numpy(y.astype(np.float32)))
    assert {(p.finding, p.partner) for p in pairs} == {(0, 1), (1, 0)}


def test_cooccurrence_eod_detects_partner_shortcut() -> None:
    y, labels = _cooc_case()
    pred = np.zeros_like(y)
    pred[:, 0] = y[:, 1]  # "Effusion" predicted exactly when Atelectasis is present
    res = cooccurrence_eod(y, pred, labels, min_support=5)
    eff = res["per_finding"]["Effusion"]
    assert eff["partner"] == "Atelectasis" and eff["eod"] == 1.0
    assert eff["tpr"] == {"Atelectasis absent": 0.0, "Atelectasis present": 1.0}
    assert res["worst"] == 1.0 and res["worst_finding"] == "Effusion"


def test_cooccurrence_matrices_hand_computed() -> None:
    y, labels = _cooc_case()
    prob = np.full(y.shape, 0.1)
    prob[y[:, 1], 0] = 0.7  # Effusion's score rises whenever Atelectasis is present
    res = cooccurrence_matrices(y, prob >= 0.5, labels, y_prob=prob, min_support=5)
    lab = res["label_cooccurrence"]
    assert lab[0][1] == pytest.approx(10 / 20) and lab[1][0] == pytest.approx(10 / 15)
    assert lab[2][0] == 1.0 and lab[0][0] == 1.0
    assert res["prediction_cooccurrence"][1] is not None
    assert res["prediction_counts"] == [15, 0, 0]
    assert res["prediction_cooccurrence"][2] == [None, None, None]  # Nodule never predicted
    dep = res["partner_dependence"]["Effusion"]
    assert dep["partner"] == "Atelectasis"
    assert dep["a_absent"]["b_present"] == pytest.approx(0.7)
    assert dep["a_absent"]["b_absent"] == pytest.approx(0.1)
    assert dep["a_absent"]["gap"] == pytest.approx(0.6) and dep["a_absent"]["n_b_present"] == 5
    assert dep["a_present"]["gap"] == pytest.approx(0.6)
    json.dumps(res, allow_nan=False)


# ------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_point_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (60, 2000):
        x = rng.random(n) < 0.3
        point, lo, hi = bootstrap_ci(np.mean, x, n_boot=300, seed=1)
        assert point == pytest.approx(x.mean())
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # width shrinks ~ 1/sqrt(n): sqrt(2000/60) ~ 5.8


def test_cluster_bootstrap_respects_patients() -> None:
    rng = np.random.default_rng(2)
    base = (rng.random(80) < 0.5).astype(float)
    x = np.repeat(base, 10)  # 10 identical images per patient
    patients = np.repeat(np.arange(80), 10)
    _, lo_i, hi_i = bootstrap_ci(np.mean, x, n_boot=300)
    _, lo_c, hi_c = bootstrap_ci(np.mean, x, cluster_ids=patients, n_boot=300)
    _, lo_b, hi_b = bootstrap_ci(np.mean, base, n_boot=300)
    assert (hi_c - lo_c) > 2 * (hi_i - lo_i)  # image-level resampling is overconfident here
    assert (hi_c - lo_c) == pytest.approx(hi_b - lo_b, rel=0.35)  # ~ the 80-patient interval


def test_bootstrap_skips_degenerate_resamples() -> None:
    from sklearn.metrics import roc_auc_score

    y = np.zeros(30, bool)
    y[:2] = True  # many resamples have no positive -> roc_auc_score raises
    s = np.linspace(1, 0, 30)
    point, lo, hi = bootstrap_ci(roc_auc_score, y, s, n_boot=100)
    assert point == 1.0 and lo is not None and lo <= point <= hi
    assert bootstrap_ci(lambda v: None, np.arange(5)) == (None, None, None)
    assert bootstrap_ci(lambda v: np.nan, np.arange(5), n_boot=20) == (None, None, None)


# ------------------------------------------------------------------------------------- attention


def test_attention_alignment_mass_and_pointing() -> None:
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    inside = np.array([[1.0, 0.0], [0.0, 0.0]])  # 2x2 map, bilinear-upsampled to 8x8
    outside = np.array([[0.0, 0.0], [0.0, 1.0]])
    flat = np.ones((2, 2))
    res = attention_alignment(np.stack([inside, outside, flat]), [mask, mask, mask])
    mass = res["per_image"]["mass_inside"]
    assert mass[0] > 0.6 and mass[1] < 0.2 and mass[2] == pytest.approx(0.25)
    assert res["per_image"]["pointing_hit"] == [True, False, None]  # a flat map points nowhere
    assert res["pointing_hit_rate"] == 0.5 and res["region_fraction"] == 0.25 and res["n"] == 3
    empty = attention_alignment([np.ones((4, 4))], [np.zeros((4, 4), bool)])
    assert empty["n"] == 0 and empty["mass_inside"] is None and empty["pointing_hit_rate"] is None


def test_attention_exact_when_sizes_match() -> None:
    h = np.zeros((4, 4))
    h[0, 0], h[3, 3] = 3.0, 1.0
    m = np.zeros((4, 4), bool)
    m[0, 0] = True
    res = attention_alignment(h[None], m[None])
    assert res["mass_inside"] == pytest.approx(0.75) and res["pointing_hit_rate"] == 1.0


# ---------------------------------------------------------------------------------------- masks


def test_polygon_mask_box_is_exact() -> None:
    m = polygon_mask([0, 0, 512, 512], 1024, 64)
    assert m.dtype == bool and m.shape == (64, 64) and m.sum() == 32 * 32 and m[:32, :32].all()
    assert polygon_mask([0, 0, 512, 1024], 1024, (32, 64)).sum() == 32 * 32
    tiny = polygon_mask([500, 500, 505, 505], 1024, 64)  # smaller than a pixel: kept, one pixel
    assert tiny.sum() == 1 and tiny[31, 31]
    with pytest.raises(ValueError):
        polygon_mask([[0, 0], [1, 1]], 1024, 64)


@pytest.mark.shared_data
def test_polygon_mask_real_chestxdet_polygon() -> None:
    if not MANIFEST.exists():
        pytest.skip(f"needs the shared NIH data at {MANIFEST}")
    records = json.loads(MANIFEST.read_text())
    ann = next(a for r in records for a in r["chestxdet"] if a.get("polygon") and len(a["polygon"]) > 10)
    poly = np.asarray(ann["polygon"], float)
    x, y = poly[:, 0], poly[:, 1]
    area_1024 = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
    mask = polygon_mask(ann["polygon"], 1024, 64)
    expected = area_1024 * (64 / 1024) ** 2
    assert mask.sum() == pytest.approx(expected, rel=0.15, abs=4)
    x0, y0, x1, y1 = np.asarray(ann["xyxy"]) * 64 / 1024
    rows, cols = np.nonzero(mask)
    assert cols.min() >= np.floor(x0) and cols.max() <= np.ceil(x1)
    assert rows.min() >= np.floor(y0) and rows.max() <= np.ceil(y1)
    box = polygon_mask(ann["xyxy"], 1024, 64)
    assert mask.sum() <= box.sum() and (mask & ~box).sum() == 0  # the polygon lies within its box


# ----------------------------------------------------------------------------------------- misc


def test_age_bins() -> None:
    bins = age_bins([5, 39.9, 40, 59, 60, 95, None, float("nan"), "n/a"])
    assert bins.tolist() == ["<40", "<40", "40-60", "40-60", ">=60", ">=60", "unknown", "unknown", "unknown"]
    assert age_bins([10, 50, 70], edges=(18, 65)).tolist() == ["<18", "18-65", ">=65"]


# ------------------------------------------------------------------------------------ one version


def test_evaluate_version_is_json_and_consistent() -> None:
    rng = np.random.default_rng(5)
    labels = ["Effusion", "Atelectasis", "Cardiomegaly", "Hernia"]
    n = 300
    y = rng.random((n, 4)) < [0.3, 0.2, 0.15, 0.0]
    y[:, 1] |= y[:, 0] & (rng.random(n) < 0.5)
    prob = np.clip(0.4 * y + 0.6 * rng.random((n, 4)), 0, 1)
    sex = rng.choice(["F", "M"], n)
    age = age_bins(rng.integers(20, 90, n))
    heat = {"Effusion": rng.random((3, 4, 4))}
    regions = {"Effusion": [polygon_mask([0, 0, 512, 1024], 1024, 16)] * 3}
    res = evaluate_version(
        y, prob, labels, {"sex": sex, "age": age}, cluster_ids=rng.integers(0, 80, n),
        heatmaps=heat, regions=regions, n_boot=60,
    )  # fmt: skip
    json.dumps(res, allow_nan=False)
    assert res["thresholds_source"] == "tuned_on_eval" and res["n_images"] == n and res["n_clusters"] <= 80
    assert set(res["fairness"]) == {"sex", "age", COOCCURRENCE}
    lo, hi = res["macro_f1_ci"]
    assert lo <= res["macro_f1"] <= hi
    assert res["per_finding"]["Hernia"]["f1"] is None and res["per_finding"]["Hernia"]["f1_ci"] is None
    for attr in ("sex", "age"):
        fa = res["fairness"][attr]
        assert fa["worst"] == max(v["eod"] for v in fa["per_finding"].values() if v["eod"] is not None)
        assert fa["worst_ci"][0] <= fa["worst_ci"][1]
    assert res["fairness"][COOCCURRENCE]["per_finding"]["Effusion"]["partner"] == "Atelectasis"
    assert res["attention"]["Effusion"]["n"] == 3 and res["attention"]["overall"]["region_fraction"] == 0.5
    given = evaluate_version(y, prob, labels, {"sex": sex}, thresholds=dict.fromkeys(labels, 0.5), n_boot=20)
    assert given["thresholds_source"] == "given" and given["thresholds"] == [0.5] * 4


def test_evaluate_version_degenerate_inputs_do_not_crash() -> None:
    y = np.array([[1, 0], [0, 0], [0, 0]], bool)
    prob = np.array([[0.9, 0.2], [0.1, 0.8], [0.4, 0.1]])
    res = evaluate_version(y, prob, ["A", "B"], {"sex": ["F", "F", None]}, n_boot=20)
    json.dumps(res, allow_nan=False)
    assert res["fairness"]["sex"]["worst"] is None and res["fairness"]["sex"]["worst_ci"] is None
    assert res["fairness"][COOCCURRENCE]["per_finding"] == {} and res["attention"] is None
    assert res["per_finding"]["B"]["auroc"] is None
    with pytest.raises(ValueError):
        evaluate_version(y, prob, ["A", "B"], {COOCCURRENCE: ["x"] * 3})
