"""Bias-aware ranking of unlabelled tasks: ``strategy`` (scores, baselines, reasons), ``priors`` (what the
annotations so far say) and ``job`` (the Label Studio ranking job behind ``medebiaser rank`` and rq)."""

from ml_backend.rank.strategy import (
    RankConfig,
    RankedItem,
    RankInputs,
    mc_dropout_probabilities,
    rank_candidates,
)

__all__ = ["RankConfig", "RankInputs", "RankedItem", "mc_dropout_probabilities", "rank_candidates"]
