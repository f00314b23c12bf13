"""``rank_candidates``: check the inputs, then run the configured strategy from the registry."""

from __future__ import annotations

from collections.abc import Callable

from ml_backend.rank.strategy.baselines import rank_bald, rank_entropy, rank_random
from ml_backend.rank.strategy.bias import rank_bias
from ml_backend.rank.strategy.config import STRATEGIES, RankConfig
from ml_backend.rank.strategy.inputs import Candidates, RankedItem, RankInputs, checked_probabilities

StrategyFunction = Callable[[Candidates], list[RankedItem]]

# name -> strategy; a new strategy is a function of ``Candidates`` added here and to ``config.STRATEGIES``.
STRATEGY_FUNCTIONS: dict[str, StrategyFunction] = {
    "bias": rank_bias,
    "random": rank_random,
    "entropy": rank_entropy,
    "bald": rank_bald,
}
if tuple(STRATEGY_FUNCTIONS) != STRATEGIES:  # pragma: no cover - a programming error, caught on import
    raise RuntimeError(f"strategy registry {list(STRATEGY_FUNCTIONS)} does not match STRATEGIES {list(STRATEGIES)}")


def rank_candidates(inputs: RankInputs, config: RankConfig | None = None, top_k: int | None = None) -> list[RankedItem]:
    """Rank the candidates, most worth a physician's time first.

    Returns all N items in queue order, or only the first ``top_k``. For ``bias``, the first
    ``top_k or config.diverse_top`` places are chosen greedily for diversity when features are given; the
    rest follow by priority. ``RankedItem.priority`` is the strategy's score before that re-ordering, so a
    monotone queue score (e.g. for Label Studio) must come from ``rank``.
    """
    config = config or RankConfig()
    p, labels = checked_probabilities(inputs)
    n = p.shape[0]
    if n == 0:
        return []
    limit = n if top_k is None else max(0, min(int(top_k), n))
    w = config.finding_weight_vector(labels)
    candidates = Candidates(inputs=inputs, config=config, p=p, labels=labels, w=w, limit=limit, top_k=top_k)
    return STRATEGY_FUNCTIONS[config.strategy](candidates)
