"""The shapes of what ``measure/metrics.py`` returns, as written to a version's ``metrics.json`` and read by the
promotion summary, the HTML report and the benchmarks. ``None`` is an undefined metric (no positives, one class,
a group too small); ``*_ci`` are ``[lo, hi]`` bootstrap intervals or None. Keys that only some producers add are
in a ``total=False`` subclass (``NotRequired`` needs Python 3.11; the package supports 3.10)."""

from __future__ import annotations

from typing import Any, TypedDict

Interval = list[float | None] | None


class _FindingQualityRequired(TypedDict):
    precision: float | None
    recall: float | None
    f1: float | None
    auroc: float | None
    auprc: float | None
    support: int
    prevalence: float | None
    predicted_positive: int
    threshold: float


class FindingQuality(_FindingQualityRequired, total=False):
    f1_ci: Interval  # evaluate_version only


class QualityMetrics(TypedDict):
    per_finding: dict[str, FindingQuality]
    macro_f1: float | None  # over findings with positives
    micro_f1: float | None
    macro_auroc: float | None  # over defined AUROCs
    n_images: int


class _FindingEqualizedOddsRequired(TypedDict):
    eod: float | None  # max(TPR gap, FPR gap) over the groups
    tpr_gap: float | None
    fpr_gap: float | None
    tpr: dict[str, float | None]  # per group
    fpr: dict[str, float | None]
    n_pos: dict[str, int]
    n_neg: dict[str, int]


class FindingEqualizedOdds(_FindingEqualizedOddsRequired, total=False):
    partner: str  # co-occurrence fairness: the finding B whose presence defines the groups
    eod_ci: Interval


class _AttributeFairnessRequired(TypedDict):
    groups: list[str]
    per_finding: dict[str, FindingEqualizedOdds]
    worst: float | None
    worst_finding: str | None
    mean: float | None
    n_defined: int  # findings whose EOD is defined


class AttributeFairness(_AttributeFairnessRequired, total=False):
    worst_ci: Interval


class _AttentionAlignmentRequired(TypedDict):
    n: int
    mass_inside: float | None  # share of heatmap mass inside the annotated region
    pointing_hit_rate: float | None
    region_fraction: float | None  # what a uniform heatmap would score


class AttentionAlignment(_AttentionAlignmentRequired, total=False):
    per_image: dict[str, list[Any]]


class CooccurrenceMatrices(TypedDict):
    labels: list[str]
    label_cooccurrence: list[list[float | None]]  # [a][b] = P(B | A) over true labels
    prediction_cooccurrence: list[list[float | None]]
    label_counts: list[int]
    prediction_counts: list[int]
    partner_dependence: dict[str, dict[str, Any]]


class _FairnessCoverageRequired(TypedDict):
    measured: bool
    reason: str


class FairnessCoverage(_FairnessCoverageRequired, total=False):
    group_sizes: dict[str, int]


class _VersionMetricsRequired(TypedDict):
    schema: int
    labels: list[str]
    n_images: int
    n_clusters: int | None  # patients, when the bootstrap is by patient
    thresholds: list[float]
    thresholds_source: str  # "given" or "tuned_on_eval"
    per_finding: dict[str, FindingQuality]
    macro_f1: float | None
    macro_f1_ci: Interval
    micro_f1: float | None
    macro_auroc: float | None
    fairness: dict[str, AttributeFairness]  # sex, age, site, ... and "cooccurrence"
    cooccurrence: CooccurrenceMatrices
    attention: dict[str, AttentionAlignment] | None  # per finding and "overall"
    bootstrap: dict[str, Any]
    settings: dict[str, int]


class VersionMetrics(_VersionMetricsRequired, total=False):
    """``metrics.json`` of a version: quality, fairness and attention on its held-out patients; the training job
    (train/jobs.py) adds the keys below."""

    fairness_coverage: dict[str, FairnessCoverage]
    parent: QualityMetrics  # the parent version on the same held-out images
    regions_skipped: Any
