"""Measure: quality and bias metrics per model version (``metrics``) and the HTML report (``report``).

The report (matplotlib) is imported lazily so that the backend can use the metrics without loading it.
"""

from __future__ import annotations

from typing import Any

from .metrics import (
    COOCCURRENCE,
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

__all__ = [
    "COOCCURRENCE",
    "age_bins",
    "attention_alignment",
    "binarize",
    "bootstrap_ci",
    "choose_thresholds",
    "cooccurrence_eod",
    "cooccurrence_groups",
    "cooccurrence_matrices",
    "equalized_odds",
    "evaluate_version",
    "per_finding_metrics",
    "phi_coefficients",
    "polygon_mask",
    "strongest_partners",
    "render_report_html",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in ("render_report_html", "write_report"):
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
