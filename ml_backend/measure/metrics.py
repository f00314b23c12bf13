"""Quality and bias metrics for one model version, shared by the backend, the report and the benchmark.

Conventions used throughout:

* ``y_true`` is an (N, K) 0/1 matrix, ``y_prob`` an (N, K) matrix of probabilities, ``labels`` the K finding
  names in column order. A prediction is positive when ``prob >= threshold`` (see :func:`binarize`).
* A metric that is undefined (no positives, a single class, too few images in a group) is ``None`` in the
  returned dicts (``NaN`` inside the numpy helpers) and is skipped by every aggregate (mean, worst, macro).
* Group attributes are arrays of strings, one per image (``{"sex": [...], "age": age_bins(ages)}``); the
  values ``None``, ``""``, ``"unknown"`` and NaN mean "not recorded" and those images are left out of that
  attribute only.

Point estimates come from scikit-learn and fairlearn. Two things are written by hand because they lack them:
fairlearn's ``equalized_odds_difference`` silently scores a group without positives as TPR 0 (a fake gap of
up to 1.0), and it takes ~20 ms per call, too slow for thousands of bootstrap resamples. Both cases use the
count-based rates of ``_group_counts``/``_eod_from_counts``; the tests check they equal fairlearn's numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
from fairlearn.metrics import equalized_odds_difference
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from ml_backend.measure.payloads import (
    AttentionAlignment,
    AttributeFairness,
    CooccurrenceMatrices,
    FairnessCoverage,
    FindingEqualizedOdds,
    FindingQuality,
    QualityMetrics,
    VersionMetrics,
)

__all__ = [
    "COOCCURRENCE",
    "age_bins",
    "attention_alignment",
    "binarize",
    "bootstrap_ci",
    "bootstrap_ci_vector",
    "choose_thresholds",
    "cooccurrence_eod",
    "cooccurrence_groups",
    "cooccurrence_matrices",
    "equalized_odds",
    "evaluate_version",
    "fairness_coverage",
    "patient_groups",
    "per_finding_metrics",
    "phi_coefficients",
    "polygon_mask",
    "strongest_partners",
]

#: Key under which :func:`evaluate_version` stores the co-occurrence fairness next to the caller's attributes.
COOCCURRENCE = "cooccurrence"
SCHEMA_VERSION = 1
_MISSING = frozenset({"", "unknown", "none", "nan"})


# --------------------------------------------------------------------------------------------- helpers


def _as_2d(a: ArrayLike, dtype: type) -> np.ndarray:
    arr: np.ndarray = np.asarray(a, dtype=dtype)
    if arr.ndim == 1:  # a single finding given as a vector
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"expected an (N, K) array, got shape {arr.shape}")
    return arr


def _num(x: Any) -> float | None:
    """A finite Python float, or None for NaN/inf/None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _json_ready(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays into floats/ints/lists and NaN into None."""
    if isinstance(obj, Mapping):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [_json_ready(v) for v in obj.tolist()]
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return str(v).strip().lower() in _MISSING


def _encode_groups(values: ArrayLike) -> tuple[np.ndarray, list[str]]:
    """Integer codes per image (-1 = missing) and the sorted group names."""
    vals = [None if _is_missing(v) else str(v) for v in np.asarray(values, dtype=object).ravel()]
    names = sorted({v for v in vals if v is not None})
    index = {n: i for i, n in enumerate(names)}
    codes = np.array([-1 if v is None else index[v] for v in vals], dtype=np.int64)
    return codes, names


def binarize(y_prob: ArrayLike, thresholds: ArrayLike | float) -> np.ndarray:
    """Positive predictions, ``prob >= threshold`` per column (the rule the thresholds are chosen for)."""
    prob = _as_2d(y_prob, float)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=float), (prob.shape[1],))
    return prob >= thr[None, :]


# ---------------------------------------------------------------------------------- quality metrics


def choose_thresholds(y_true: ArrayLike, y_prob: ArrayLike, default: float = 0.5) -> np.ndarray:
    """Per finding, the probability threshold that maximises F1 on (validation) data.

    Findings without positives keep ``default``. Use with :func:`binarize` (``>=``); choose them on
    validation data, not on the data you report, or the F1 is optimistic.
    """
    yt, yp = _as_2d(y_true, bool), _as_2d(y_prob, float)
    thr = np.full(yt.shape[1], float(default))
    for k in range(yt.shape[1]):
        ok = np.isfinite(yp[:, k])
        if not yt[ok, k].any():
            continue
        precision, recall, cand = precision_recall_curve(yt[ok, k], yp[ok, k])
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        thr[k] = float(cand[int(np.argmax(f1[:-1]))])  # the last PR point has no threshold
    return thr


def per_finding_metrics(
    y_true: ArrayLike, y_prob: ArrayLike, labels: Sequence[str], thresholds: ArrayLike | float
) -> QualityMetrics:
    """Precision, recall, F1, AUROC, AUPRC, support and prevalence per finding, plus macro/micro aggregates.

    F1 and recall are None for a finding without positives (nothing to find); AUROC is None unless both
    classes occur. ``macro_f1`` averages findings with support > 0, ``macro_auroc`` the defined AUROCs,
    ``micro_f1`` pools every (image, finding) decision.
    """
    yt, yp = _as_2d(y_true, bool), _as_2d(y_prob, float)
    labels = list(labels)
    if yt.shape != yp.shape or yt.shape[1] != len(labels):
        raise ValueError(f"shapes disagree: y_true {yt.shape}, y_prob {yp.shape}, {len(labels)} labels")
    thr = np.broadcast_to(np.asarray(thresholds, dtype=float), (len(labels),))
    pred = binarize(yp, thr)
    n = yt.shape[0]
    per: dict[str, FindingQuality] = {}
    for k, name in enumerate(labels):
        t, p, s = yt[:, k], pred[:, k], yp[:, k]
        support = int(t.sum())
        has_both = 0 < support < n
        per[name] = {
            "precision": _num(precision_score(t, p, zero_division=np.nan)) if p.any() else None,
            "recall": _num(recall_score(t, p)) if support else None,
            "f1": _num(f1_score(t, p)) if support else None,
            "auroc": _num(roc_auc_score(t, s)) if has_both else None,
            "auprc": _num(average_precision_score(t, s)) if has_both else None,
            "support": support,
            "prevalence": support / n if n else None,
            "predicted_positive": int(p.sum()),
            "threshold": float(thr[k]),
        }
    f1s = [v["f1"] for v in per.values() if v["f1"] is not None]
    aucs = [v["auroc"] for v in per.values() if v["auroc"] is not None]
    micro = f1_score(yt, pred, average="micro", zero_division=np.nan) if yt.any() or pred.any() else None
    return {
        "per_finding": per,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "micro_f1": _num(micro),
        "macro_auroc": float(np.mean(aucs)) if aucs else None,
        "n_images": n,
    }


def _f1_vector(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-finding F1 (NaN without positives) followed by macro-F1; count-based for bootstrap speed."""
    tp = (y_true & y_pred).sum(0)
    pos = y_true.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(pos > 0, 2 * tp / (pos + y_pred.sum(0)), np.nan)
        macro = np.nanmean(f1) if np.isfinite(f1).any() else np.nan
    return np.append(f1, macro)


# ------------------------------------------------------------------------------------------ fairness


def _group_counts(
    y_true: np.ndarray, y_pred: np.ndarray, codes: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """TP, positives, FP, negatives per (group, finding) as (G, K) arrays; code -1 is ignored."""
    onehot = (codes[None, :] == np.arange(n_groups)[:, None]).astype(np.float64)  # (G, N)
    t = y_true.astype(np.float64)
    p = y_pred.astype(np.float64)
    pos = onehot @ t
    tp = onehot @ (t * p)
    neg = onehot.sum(1, keepdims=True) - pos
    fp = onehot @ ((1 - t) * p)
    return tp, pos, fp, neg


def _eod_from_counts(
    tp: np.ndarray, pos: np.ndarray, fp: np.ndarray, neg: np.ndarray, min_count: int
) -> dict[str, np.ndarray]:
    """Equalized-odds gaps from counts; a group needs ``min_count`` positives (negatives) to enter the
    TPR (FPR) gap, and a gap needs two such groups. EOD = max(TPR gap, FPR gap), fairlearn's definition."""
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(pos >= max(min_count, 1), tp / pos, np.nan)
        fpr = np.where(neg >= max(min_count, 1), fp / neg, np.nan)

    def gap(r: np.ndarray) -> np.ndarray:
        ok = np.isfinite(r)
        hi = np.where(ok, r, -np.inf).max(0)
        lo = np.where(ok, r, np.inf).min(0)
        return np.where(ok.sum(0) >= 2, hi - lo, np.nan)

    tpr_gap, fpr_gap = gap(tpr), gap(fpr)
    eod = np.fmax(tpr_gap, fpr_gap)  # fmax ignores a NaN side
    return {"eod": eod, "tpr_gap": tpr_gap, "fpr_gap": fpr_gap, "tpr": tpr, "fpr": fpr}


def _attribute_fairness(
    groups: list[str], per: dict[str, FindingEqualizedOdds], names: Sequence[str]
) -> AttributeFairness:
    """One attribute's entry: per finding, and the worst and mean EOD over the findings where it is defined."""
    values = [per[n]["eod"] for n in names]
    defined = [(v, n) for v, n in zip(values, names, strict=True) if v is not None and math.isfinite(v)]
    if not defined:
        return {
            "groups": groups,
            "per_finding": per,
            "worst": None,
            "worst_finding": None,
            "mean": None,
            "n_defined": 0,
        }
    worst, worst_name = max(defined, key=lambda vn: vn[0])
    return {
        "groups": groups,
        "per_finding": per,
        "worst": float(worst),
        "worst_finding": worst_name,
        "mean": float(np.mean([v for v, _ in defined])),
        "n_defined": len(defined),
    }


def _finding_eod_entry(
    t: np.ndarray, p: np.ndarray, codes: np.ndarray, names: list[str], min_count: int
) -> FindingEqualizedOdds:
    tp, pos, fp, neg = _group_counts(t[:, None], p[:, None], codes, len(names))
    r = _eod_from_counts(tp, pos, fp, neg, min_count)
    eod = _num(r["eod"][0])
    valid = codes >= 0
    degenerate = (pos[:, 0] < max(min_count, 1)).any() or (neg[:, 0] < max(min_count, 1)).any()
    if eod is not None and len(names) >= 2 and not degenerate:
        # The normal case: fairlearn's own number (identical to the count-based one, see the tests).
        eod = float(equalized_odds_difference(t[valid], p[valid], sensitive_features=codes[valid]))
    return {
        "eod": eod,
        "tpr_gap": _num(r["tpr_gap"][0]),
        "fpr_gap": _num(r["fpr_gap"][0]),
        "tpr": {g: _num(r["tpr"][i, 0]) for i, g in enumerate(names)},
        "fpr": {g: _num(r["fpr"][i, 0]) for i, g in enumerate(names)},
        "n_pos": {g: int(pos[i, 0]) for i, g in enumerate(names)},
        "n_neg": {g: int(neg[i, 0]) for i, g in enumerate(names)},
    }


def equalized_odds(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    groups: Mapping[str, ArrayLike],
    labels: Sequence[str],
    min_group_count: int = 1,
) -> dict[str, AttributeFairness]:
    """Equalized-odds difference per finding and group attribute, with worst and mean over findings.

    Returns ``{attribute: {"groups": [...], "per_finding": {finding: {"eod", "tpr_gap", "fpr_gap", "tpr",
    "fpr", "n_pos", "n_neg"}}, "worst", "worst_finding", "mean", "n_defined"}}``. A group with fewer than
    ``min_group_count`` positives (negatives) of a finding is left out of its TPR (FPR) gap; ``eod`` is None
    when neither gap has two groups. Raise ``min_group_count`` to keep single-image groups from dominating.
    """
    yt, yp = _as_2d(y_true, bool), _as_2d(y_pred, bool)
    labels = list(labels)
    out: dict[str, AttributeFairness] = {}
    for attr, values in groups.items():
        codes, names = _encode_groups(values)
        if codes.shape[0] != yt.shape[0]:
            raise ValueError(f"group {attr!r} has {codes.shape[0]} values for {yt.shape[0]} images")
        per = {
            name: _finding_eod_entry(yt[:, k], yp[:, k], codes, names, min_group_count) for k, name in enumerate(labels)
        }
        out[attr] = _attribute_fairness(names, per, labels)
    return out


def phi_coefficients(y_true: ArrayLike) -> np.ndarray:
    """(K, K) phi coefficients of the binary label columns (their Pearson correlation); 0 on the diagonal and
    wherever a column is constant (no association to speak of)."""
    yt = _as_2d(y_true, bool).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant column has no spread: NaN, then 0
        phi = np.atleast_2d(np.corrcoef(yt.T)) if len(yt) > 1 else np.zeros((yt.shape[1], yt.shape[1]))
    phi = np.nan_to_num(phi, nan=0.0)
    np.fill_diagonal(phi, 0.0)
    return phi


def strongest_partners(y_true: ArrayLike, min_support: int = 5, min_phi: float = 0.0) -> dict[int, tuple[int, float]]:
    """For each finding A (by column), the finding B it is most associated with: the highest phi coefficient
    among the findings sharing at least ``min_support`` images with A, kept when it is positive and at least
    ``min_phi``. Returns ``{a: (b, phi)}``; ties go to the first in label order.

    Association, not raw co-occurrence: a common finding such as Infiltration shares the most images with
    everything without being anyone's partner. The version report's co-occurrence groups and the training's
    decorrelating weights (``train/reweighting.py``) both use this, so a report measures a finding against the
    partner that training decorrelated it from.
    """
    yt = _as_2d(y_true, bool)
    counts = yt.T.astype(np.int64) @ yt.astype(np.int64)
    phi = phi_coefficients(yt)
    out: dict[int, tuple[int, float]] = {}
    for a in range(yt.shape[1]):
        eligible = counts[a] >= max(min_support, 1)
        eligible[a] = False
        if not eligible.any():
            continue
        b = int(np.argmax(np.where(eligible, phi[a], -np.inf)))
        if phi[a, b] > 0 and phi[a, b] >= min_phi:
            out[a] = (b, float(phi[a, b]))
    return out


def cooccurrence_groups(
    y_true: ArrayLike, labels: Sequence[str], min_support: int = 5
) -> dict[str, tuple[str, np.ndarray]]:
    """For each finding A, its partner B (:func:`strongest_partners`) and the per-image groups
    ``"B present"``/``"B absent"`` (from the true labels). Findings that share fewer than ``min_support``
    images with every positively associated finding are omitted (their gap would be noise)."""
    yt = _as_2d(y_true, bool)
    labels = list(labels)
    out: dict[str, tuple[str, np.ndarray]] = {}
    for a, (b, _) in strongest_partners(yt, min_support).items():
        partner = labels[b]
        out[labels[a]] = (partner, np.where(yt[:, b], f"{partner} present", f"{partner} absent"))
    return out


def cooccurrence_eod(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    labels: Sequence[str],
    min_support: int = 5,
    min_group_count: int = 1,
) -> AttributeFairness:
    """Co-occurrence fairness: EOD of each finding A between images with and without its usual partner B.

    A large gap means the model's errors on A depend on whether B is there (it learned B as evidence for
    A). Same structure as one attribute of :func:`equalized_odds`, with ``partner`` in each finding entry.
    """
    yt, yp = _as_2d(y_true, bool), _as_2d(y_pred, bool)
    labels = list(labels)
    per: dict[str, FindingEqualizedOdds] = {}
    for name, (partner, grp) in cooccurrence_groups(yt, labels, min_support).items():
        k = labels.index(name)
        codes, names = _encode_groups(grp)
        per[name] = _finding_eod_entry(yt[:, k], yp[:, k], codes, names, min_group_count)
        per[name]["partner"] = partner
    return _attribute_fairness(["partner present", "partner absent"], per, list(per))


def _conditional(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = y.T.astype(np.float64) @ y.astype(np.float64)
    n = np.diag(counts).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = np.where(n[:, None] > 0, counts / n[:, None], np.nan)
    return cond, n


def cooccurrence_matrices(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    labels: Sequence[str],
    y_prob: ArrayLike | None = None,
    min_support: int = 5,
) -> CooccurrenceMatrices:
    """How often findings occur together in the labels and in the predictions, and how much the
    prediction of A moves with its partner B.

    ``label_cooccurrence[a][b]`` = P(B | A) over true labels, ``prediction_cooccurrence`` the same over
    predicted positives (rows are None when A never occurs). A model that predicts pairs more often than
    they occur amplifies co-occurrence. ``partner_dependence[A]`` gives, among images where A is truly
    absent (``a_absent``) and truly present (``a_present``), the mean score of A when B is present vs absent
    and their ``gap``; a positive gap among A-absent images means B raises false alarms of A. The score is
    ``y_prob`` when given, else the 0/1 predictions (then it is the predicted-positive rate).
    """
    yt, yp = _as_2d(y_true, bool), _as_2d(y_pred, bool)
    score = _as_2d(y_prob, float) if y_prob is not None else yp.astype(float)
    labels = list(labels)
    lab_cond, lab_n = _conditional(yt)
    pred_cond, pred_n = _conditional(yp)
    dependence: dict[str, Any] = {}
    for name, (partner, _) in cooccurrence_groups(yt, labels, min_support).items():
        a, b = labels.index(name), labels.index(partner)
        entry: dict[str, Any] = {"partner": partner}
        for key, a_state in (("a_absent", False), ("a_present", True)):
            sel = yt[:, a] == a_state
            with_b, without_b = sel & yt[:, b], sel & ~yt[:, b]
            m_with = float(score[with_b, a].mean()) if with_b.any() else None
            m_without = float(score[without_b, a].mean()) if without_b.any() else None
            entry[key] = {
                "b_present": m_with,
                "b_absent": m_without,
                "gap": None if m_with is None or m_without is None else m_with - m_without,
                "n_b_present": int(with_b.sum()),
                "n_b_absent": int(without_b.sum()),
            }
        dependence[name] = entry
    return cast(
        CooccurrenceMatrices,
        _json_ready(
            {
                "labels": labels,
                "label_cooccurrence": lab_cond,
                "prediction_cooccurrence": pred_cond,
                "label_counts": lab_n.astype(int),
                "prediction_counts": pred_n.astype(int),
                "partner_dependence": dependence,
            }
        ),
    )


def age_bins(ages: ArrayLike, edges: Sequence[float] = (40, 60)) -> np.ndarray:
    """Age groups as strings: with the default edges ``"<40"``, ``"40-60"`` (40 <= age < 60), ``">=60"``;
    missing or non-numeric ages become ``"unknown"`` (left out of the fairness metrics)."""
    edges = sorted(edges)
    names = [f"<{edges[0]:g}"]
    names += [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:], strict=False)]
    names.append(f">={edges[-1]:g}")
    out = []
    for a in np.asarray(ages, dtype=object).ravel():
        try:
            v = float(a)
        except (TypeError, ValueError):
            v = math.nan
        out.append("unknown" if not math.isfinite(v) else names[int(np.searchsorted(edges, v, side="right"))])
    return np.array(out, dtype=object)


# ----------------------------------------------------------------------------------------- bootstrap


def _resample_indices(n: int, cluster_ids: ArrayLike | None, n_boot: int, rng: np.random.Generator) -> list[np.ndarray]:
    if cluster_ids is None:
        return [rng.integers(0, n, n) for _ in range(n_boot)]
    ids = np.asarray(cluster_ids, dtype=object).ravel()
    if ids.shape[0] != n:
        raise ValueError(f"{ids.shape[0]} cluster ids for {n} rows")
    _, inverse = np.unique(ids.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    n_clusters = len(members)
    # Whole patients are drawn so that images of one patient (correlated) stay together.
    return [np.concatenate([members[c] for c in rng.integers(0, n_clusters, n_clusters)]) for _ in range(n_boot)]


def _safe_eval(metric_fn: Callable[..., Any], arrays: Sequence[np.ndarray]) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = metric_fn(*arrays)
    except (ValueError, ZeroDivisionError, FloatingPointError):  # e.g. AUROC of a one-class resample
        return np.array([np.nan])
    return np.atleast_1d(np.asarray([np.nan] if value is None else value, dtype=float)).ravel()


def _bootstrap_samples(
    metric_fn: Callable[..., Any],
    arrays: Sequence[ArrayLike],
    cluster_ids: ArrayLike | None,
    n_boot: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Point value and an (n_boot, m) matrix of resampled values of a scalar- or vector-valued metric."""
    arrs = [np.asarray(a) for a in arrays]
    if not arrs:
        raise ValueError("bootstrap needs at least one array")
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise ValueError("all arrays must have the same length")
    point = _safe_eval(metric_fn, arrs)
    rng = np.random.default_rng(seed)
    samples = np.full((n_boot, point.size), np.nan)
    for i, idx in enumerate(_resample_indices(n, cluster_ids, n_boot, rng)):
        v = _safe_eval(metric_fn, [a[idx] for a in arrs])
        if v.size == point.size:
            samples[i] = v
    return point, samples


def _percentile_ci(samples: np.ndarray, alpha: float, min_valid: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column over the finite resamples; NaN where too few are finite."""
    lo = np.full(samples.shape[1], np.nan)
    hi = np.full(samples.shape[1], np.nan)
    for j in range(samples.shape[1]):
        col = samples[:, j][np.isfinite(samples[:, j])]
        if col.size >= min_valid:
            lo[j], hi[j] = np.quantile(col, [alpha / 2, 1 - alpha / 2])
    return lo, hi


def bootstrap_ci_vector(
    metric_fn: Callable[..., Any],
    *arrays: ArrayLike,
    cluster_ids: ArrayLike | None = None,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(point, lo, hi)`` arrays for a vector-valued metric: every component from the same resamples, so a
    benchmark bootstraps all findings' scores in one pass (NaN where a component has too few valid resamples)."""
    point, samples = _bootstrap_samples(metric_fn, arrays, cluster_ids, n_boot, seed)
    lo, hi = _percentile_ci(samples, alpha, min(10, n_boot))
    return point, lo, hi


def bootstrap_ci(
    metric_fn: Callable[..., float | None],
    *arrays: ArrayLike,
    cluster_ids: ArrayLike | None = None,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float | None, float | None, float | None]:
    """``(point, lo, hi)``: ``metric_fn(*arrays)`` and its percentile bootstrap interval.

    Rows of all arrays are resampled together; with ``cluster_ids`` (e.g. patient ids) whole clusters are
    resampled. Resamples where the metric is undefined (None/NaN, or a ValueError such as a one-class AUROC)
    are skipped; with fewer than ``min(10, n_boot)`` valid ones the interval is ``(None, None)``.
    """
    point, lo, hi = bootstrap_ci_vector(
        metric_fn, *arrays, cluster_ids=cluster_ids, n_boot=n_boot, seed=seed, alpha=alpha
    )
    if point.size != 1:
        raise ValueError("metric_fn must return a scalar")
    return _num(point[0]), _num(lo[0]), _num(hi[0])


# ---------------------------------------------------------------------------------------- attention


def _resize_bilinear(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float64)


def attention_alignment(
    heatmaps: ArrayLike | Sequence[ArrayLike], region_masks: ArrayLike | Sequence[ArrayLike]
) -> AttentionAlignment:
    """How well heatmaps sit on the annotated regions.

    ``heatmaps``: (N, h, w) floats (negative values count as 0); ``region_masks``: N boolean masks of any
    size, each heatmap is resized bilinearly to its mask. Per image: ``mass_inside`` = share of heatmap mass
    inside the region, ``pointing_hit`` = a maximal heatmap pixel lies inside the region (pointing game).
    Images with an empty mask or an all-zero heatmap (mass) / a constant heatmap (pointing) give None.
    ``region_fraction`` (mean mask area share) is what a uniform heatmap would score for mass.
    """
    mass: list[float | None] = []
    hits: list[bool | None] = []
    areas: list[float] = []
    maps: list[Any] = list(heatmaps)  # type: ignore[arg-type]  # a sequence of 2-D arrays, not one array
    masks: list[Any] = list(region_masks)  # type: ignore[arg-type]
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} heatmaps for {len(masks)} masks")
    for h, m in zip(maps, masks, strict=True):
        m = np.asarray(m, dtype=bool)
        h = np.nan_to_num(np.asarray(h, dtype=np.float64))
        if h.shape != m.shape:
            h = _resize_bilinear(h, (int(m.shape[0]), int(m.shape[1])))
        h = np.clip(h, 0.0, None)
        if not m.any():
            mass.append(None)
            hits.append(None)
            continue
        areas.append(float(m.mean()))
        total = h.sum()
        mass.append(float(h[m].sum() / total) if total > 0 else None)
        top = h.max()
        hits.append(bool(m[h >= top - 1e-9 * max(top, 1.0)].any()) if top > h.min() else None)
    m_def = [v for v in mass if v is not None]
    h_def = [v for v in hits if v is not None]
    return {
        "n": len(m_def),
        "mass_inside": float(np.mean(m_def)) if m_def else None,
        "pointing_hit_rate": float(np.mean(h_def)) if h_def else None,
        "region_fraction": float(np.mean(areas)) if areas else None,
        "per_image": {"mass_inside": mass, "pointing_hit": hits},
    }


def polygon_mask(polygon_xy: ArrayLike, coord_space: float = 1024, out_size: int | tuple[int, int] = 64) -> np.ndarray:
    """Rasterise a ChestX-Det polygon ``[[x, y], ...]`` (or an ``[x0, y0, x1, y1]`` box) given in a square
    ``coord_space`` into a boolean mask of ``out_size`` (an int, or ``(height, width)``).

    Drawn at about the source resolution and reduced by area: a pixel is inside when at least half of it
    is covered (PIL alone rounds vertices to whole output pixels, off by up to a pixel at 64x64). A region
    smaller than half a pixel keeps its best-covered pixel so it never vanishes.
    """
    out_h, out_w = (out_size, out_size) if isinstance(out_size, (int, np.integer)) else tuple(out_size)
    pts = np.asarray(polygon_xy, dtype=np.float64)
    if pts.ndim == 1 and pts.size == 4:
        x0, y0, x1, y1 = pts
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    elif pts.ndim == 1 and pts.size % 2 == 0:
        pts = pts.reshape(-1, 2)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 3:
        raise ValueError(f"need a polygon of >= 3 points or an xyxy box, got shape {pts.shape}")
    k = int(np.clip(math.ceil(coord_space / max(out_h, out_w)), 1, 8))  # supersampling factor
    fine = Image.new("L", (out_w * k, out_h * k), 0)
    scale = np.array([out_w * k / coord_space, out_h * k / coord_space])
    xy = pts * scale - 0.5  # continuous coordinates -> pixel-centre coordinates
    ImageDraw.Draw(fine).polygon([tuple(p) for p in xy], fill=255, outline=255)
    cover = np.asarray(fine, dtype=np.float64).reshape(out_h, k, out_w, k).mean(axis=(1, 3)) / 255.0
    mask = cover >= 0.5
    if not mask.any() and cover.max() > 0:
        mask = cover == cover.max()
    return mask


# ------------------------------------------------------------------------------------ one version


def _eod_vector_fn(n_groups: int, min_count: int) -> Callable[..., np.ndarray]:
    def fn(yt: np.ndarray, yp: np.ndarray, codes: np.ndarray) -> np.ndarray:
        eod = _eod_from_counts(*_group_counts(yt, yp, codes, n_groups), min_count)["eod"]
        worst = np.nanmax(eod) if np.isfinite(eod).any() else np.nan
        return np.append(eod, worst)

    return fn


def _cooc_vector_fn(cols: list[int], min_count: int) -> Callable[..., np.ndarray]:
    def fn(yt: np.ndarray, yp: np.ndarray, partner_present: np.ndarray) -> np.ndarray:
        eod = np.full(len(cols), np.nan)
        for j, k in enumerate(cols):
            counts = _group_counts(yt[:, [k]], yp[:, [k]], partner_present[:, j].astype(np.int64), 2)
            eod[j] = _eod_from_counts(*counts, min_count)["eod"][0]
        worst = np.nanmax(eod) if np.isfinite(eod).any() else np.nan
        return np.append(eod, worst)

    return fn


def _ci_pair(lo: float, hi: float) -> list[float | None] | None:
    lo_, hi_ = _num(lo), _num(hi)
    return None if lo_ is None or hi_ is None else [lo_, hi_]


def _quality_with_intervals(
    yt: np.ndarray,
    yp: np.ndarray,
    pred: np.ndarray,
    labels: list[str],
    thr: np.ndarray,
    boot: dict[str, Any],
    alpha: float,
    min_valid: int,
) -> tuple[QualityMetrics, list[float | None] | None]:
    """Per-finding quality with each F1's bootstrap interval; and macro-F1's interval."""
    quality = per_finding_metrics(yt, yp, labels, thr)
    _, f1_samples = _bootstrap_samples(_f1_vector, [yt, pred], **boot)
    f1_lo, f1_hi = _percentile_ci(f1_samples, alpha, min_valid)
    for k, name in enumerate(labels):
        quality["per_finding"][name]["f1_ci"] = _ci_pair(f1_lo[k], f1_hi[k])
    return quality, _ci_pair(f1_lo[-1], f1_hi[-1])


def _fairness_with_intervals(
    yt: np.ndarray,
    pred: np.ndarray,
    groups: Mapping[str, ArrayLike],
    labels: list[str],
    min_group_count: int,
    boot: dict[str, Any],
    alpha: float,
    min_valid: int,
) -> dict[str, AttributeFairness]:
    """Equalized odds per group attribute, with intervals for each finding's EOD and the worst."""
    fairness = equalized_odds(yt, pred, groups, labels, min_group_count)
    for attr, values in groups.items():
        codes, names = _encode_groups(values)
        _, s = _bootstrap_samples(_eod_vector_fn(len(names), min_group_count), [yt, pred, codes], **boot)
        lo, hi = _percentile_ci(s, alpha, min_valid)
        for k, name in enumerate(labels):
            fairness[attr]["per_finding"][name]["eod_ci"] = _ci_pair(lo[k], hi[k])
        fairness[attr]["worst_ci"] = _ci_pair(lo[-1], hi[-1])
    return fairness


def _cooccurrence_fairness(
    yt: np.ndarray,
    pred: np.ndarray,
    labels: list[str],
    min_cooccurrence: int,
    min_group_count: int,
    boot: dict[str, Any],
    alpha: float,
    min_valid: int,
) -> AttributeFairness:
    """Each finding's EOD between images with and without its usual partner, with intervals."""
    cooc = cooccurrence_eod(yt, pred, labels, min_cooccurrence, min_group_count)
    partners = cooccurrence_groups(yt, labels, min_cooccurrence)
    if not partners:
        cooc["worst_ci"] = None
        return cooc
    cols = [labels.index(a) for a in partners]
    present = np.stack([yt[:, labels.index(b)] for b, _ in partners.values()], axis=1)
    _, s = _bootstrap_samples(_cooc_vector_fn(cols, min_group_count), [yt, pred, present], **boot)
    lo, hi = _percentile_ci(s, alpha, min_valid)
    for j, name in enumerate(partners):
        cooc["per_finding"][name]["eod_ci"] = _ci_pair(lo[j], hi[j])
    cooc["worst_ci"] = _ci_pair(lo[-1], hi[-1])
    return cooc


def _attention_by_finding(
    labels: list[str],
    heatmaps: Mapping[str, ArrayLike],
    regions: Mapping[str, ArrayLike | Sequence[ArrayLike]],
) -> dict[str, AttentionAlignment]:
    """Attention alignment per finding with annotated regions, and over all of them (``overall``)."""
    attention: dict[str, AttentionAlignment] = {}
    all_maps: list[np.ndarray] = []
    all_masks: list[np.ndarray] = []
    for name in labels:
        if name in heatmaps and name in regions:
            maps: list[Any] = list(heatmaps[name])  # type: ignore[arg-type]  # n 2-D heatmaps
            masks: list[Any] = list(regions[name])  # type: ignore[arg-type]
            res = attention_alignment(maps, masks)
            res.pop("per_image")
            attention[name] = res
            all_maps += maps
            all_masks += masks
    overall = attention_alignment(all_maps, all_masks)
    overall.pop("per_image")
    attention["overall"] = overall
    return attention


def evaluate_version(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    labels: Sequence[str],
    groups: Mapping[str, ArrayLike] | None,
    thresholds: ArrayLike | Mapping[str, float] | None = None,
    cluster_ids: ArrayLike | None = None,
    heatmaps: Mapping[str, ArrayLike] | None = None,
    regions: Mapping[str, ArrayLike | Sequence[ArrayLike]] | None = None,
    *,
    min_cooccurrence: int = 5,
    min_group_count: int = 5,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> VersionMetrics:
    """Everything measured for one model version, as a JSON-serialisable dict (``metrics.json``).

    ``groups``: ``{"sex": [...], "age": age_bins(ages), ...}``; co-occurrence fairness is added under
    ``fairness["cooccurrence"]`` (the name must not be used by a caller's attribute). ``thresholds``: per
    finding (list aligned with ``labels`` or ``{finding: t}``); when None they are tuned on this very data
    (``thresholds_source = "tuned_on_eval"``, optimistic F1). ``cluster_ids``: patient ids for the
    bootstrap. ``heatmaps``/``regions``: ``{finding: (n, h, w) heatmaps}`` and ``{finding: n masks}`` for
    the images that have an annotated region for that finding.

    ``min_group_count`` (default 5): a group enters a finding's TPR (FPR) gap only with at least that many
    positives (negatives); below it a rate moves in steps of 0.2 or more and the worst EOD would be noise.

    Bootstrap intervals (``*_ci`` = ``[lo, hi]`` or None) are given for macro-F1 and per-finding F1
    (``per_finding[f]["f1_ci"]``), and for each attribute's worst EOD and per-finding EOD.
    """
    yt, yp = _as_2d(y_true, bool), _as_2d(y_prob, float)
    labels = list(labels)
    groups = dict(groups or {})
    if COOCCURRENCE in groups:
        raise ValueError(f"group attribute name {COOCCURRENCE!r} is reserved")
    if isinstance(thresholds, Mapping):
        thr, source = np.array([float(thresholds.get(n, 0.5)) for n in labels]), "given"
    elif thresholds is not None:
        thr, source = np.broadcast_to(np.asarray(thresholds, dtype=float), (len(labels),)).copy(), "given"
    else:
        thr, source = choose_thresholds(yt, yp), "tuned_on_eval"
    pred = binarize(yp, thr)
    boot: dict[str, Any] = {"cluster_ids": cluster_ids, "n_boot": n_boot, "seed": seed}
    min_valid = min(10, n_boot)

    quality, macro_f1_ci = _quality_with_intervals(yt, yp, pred, labels, thr, boot, alpha, min_valid)
    fairness = _fairness_with_intervals(yt, pred, groups, labels, min_group_count, boot, alpha, min_valid)
    fairness[COOCCURRENCE] = _cooccurrence_fairness(
        yt, pred, labels, min_cooccurrence, min_group_count, boot, alpha, min_valid
    )
    attention = _attention_by_finding(labels, heatmaps, regions) if heatmaps and regions else None

    n_clusters = (
        len({str(c) for c in np.asarray(cluster_ids, dtype=object).ravel()}) if cluster_ids is not None else None
    )
    result = {
        "schema": SCHEMA_VERSION,
        "labels": labels,
        "n_images": int(yt.shape[0]),
        "n_clusters": n_clusters,
        "thresholds": thr,
        "thresholds_source": source,
        "per_finding": quality["per_finding"],
        "macro_f1": quality["macro_f1"],
        "macro_f1_ci": macro_f1_ci,
        "micro_f1": quality["micro_f1"],
        "macro_auroc": quality["macro_auroc"],
        "fairness": fairness,
        "cooccurrence": cooccurrence_matrices(yt, pred, labels, y_prob=yp, min_support=min_cooccurrence),
        "attention": attention,
        "bootstrap": {
            "n_boot": n_boot,
            "alpha": alpha,
            "seed": seed,
            "unit": "cluster" if cluster_ids is not None else "image",
        },
        "settings": {"min_cooccurrence": min_cooccurrence, "min_group_count": min_group_count},
    }
    return cast(VersionMetrics, _json_ready(result))


# ------------------------------------------------------------------------------------ patient groups

FAIRNESS_ATTRIBUTES = ("sex", "age", "site")


def patient_groups(attributes: Sequence[Mapping[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``groups`` for :func:`evaluate_version` from per-image patient attributes (sex, age in years, site; age
    as :func:`age_bins` bands), and for each attribute no image has, why it is absent."""
    groups: dict[str, np.ndarray] = {}
    absent: dict[str, str] = {}
    for attr in FAIRNESS_ATTRIBUTES:
        values = [a.get(attr) for a in attributes]
        if all(_is_missing(v) for v in values):
            absent[attr] = f"no held-out image has a {attr} (no such field in the task data)"
        elif attr == "age":
            groups[attr] = age_bins(np.array([np.nan if _is_missing(v) else v for v in values], dtype=object))
        else:
            groups[attr] = np.array(["unknown" if _is_missing(v) else str(v) for v in values], dtype=object)
    return groups, absent


def fairness_coverage(
    metrics: Mapping[str, Any], groups: Mapping[str, ArrayLike], absent: Mapping[str, str], min_group_count: int = 5
) -> dict[str, FairnessCoverage]:
    """Which group attributes :func:`evaluate_version` could measure, in plain words: ``{attr: {"measured",
    "reason", "group_sizes"}}``; an attribute is measured when the EOD of at least one finding is defined."""
    out: dict[str, FairnessCoverage] = {attr: {"measured": False, "reason": why} for attr, why in absent.items()}
    fairness = metrics.get("fairness") or {}
    for attr, values in groups.items():
        codes, names = _encode_groups(values)
        sizes = {name: int((codes == i).sum()) for i, name in enumerate(names)}
        listed = ", ".join(f"{name}: {n}" for name, n in sizes.items())
        defined = int((fairness.get(attr) or {}).get("n_defined") or 0)
        if len(names) < 2:
            reason = f"only one {attr} group among the held-out images ({listed or 'none known'})"
        elif defined == 0:
            reason = (
                f"too few images per group: a finding's EOD needs {min_group_count} positives (or negatives) in each "
                f"of two groups; held-out images per group: {listed}"
            )
        else:
            reason = f"measured on {defined} finding(s); held-out images per group: {listed}"
        out[attr] = {"measured": defined > 0, "reason": reason, "group_sizes": sizes}
    return out
