"""How to rank: ``RankConfig`` (strategy, signal and finding weights, diversity, MC dropout) and its parsing
from a mapping, a JSON/YAML file or a project's overrides."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

# The names a config may choose; ``ranking.STRATEGY_FUNCTIONS`` maps each to its function.
STRATEGIES = ("bias", "random", "entropy", "bald")
SIGNALS = ("uncertainty", "epistemic", "rarity", "cooccurrence", "heatmap", "diversity")
HEATMAP_PARTS = ("ignore", "outside", "overlap")


def _default_signal_weights() -> dict[str, float]:
    # Epistemic uncertainty (BALD on MC dropout, used where MC samples are given) weighs most: in the per-signal
    # ablation (bench/results/rank_ablation.md, 5 patient folds) it is the one signal whose removal costs
    # annotations (53 instead of 29 to 90% of the reduction, worse in 4 of 5 folds).
    # Diversity is off by default: on the finer budget grid (rank_ablation_budgets10-20-30-60-120.md) the
    # ranking with it needed 68 annotations to 90% of the reduction, without it 28 (BALD 29). Images that share a
    # shortcut marker share backbone features, so a similarity penalty pushes exactly the biased images down the
    # queue. A project with many near-duplicate films can switch it back on (signal_weights: {diversity: 1}).
    # Heatmap risk stays next to epistemic: attention on a marker or outside the body is the bias a physician's
    # mask fixes, and it writes the reasons.
    return {
        "uncertainty": 1.0,
        "epistemic": 3.0,
        "rarity": 1.0,
        "cooccurrence": 0.75,
        "heatmap": 2.0,
        "diversity": 0.0,
    }


def _default_heatmap_parts() -> dict[str, float]:
    return {"ignore": 1.0, "outside": 0.4, "overlap": 0.4}


@dataclass
class RankConfig:
    """How to rank; loadable from JSON/YAML (``RANKING_CONFIG``) or a project's settings, no code needed.

    Example (YAML)::

        strategy: bias
        signal_weights: {heatmap: 2.0, cooccurrence: 0.5}   # unnamed signals keep their defaults
        finding_weights: {Pneumothorax: 3.0, Hernia: 2.0}   # unnamed findings weigh default_finding_weight
        diversity_lambda: 0.5
    """

    strategy: str = "bias"
    signal_weights: dict[str, float] = field(default_factory=_default_signal_weights)
    finding_weights: dict[str, float] = field(default_factory=dict)
    default_finding_weight: float = 1.0
    diversity_lambda: float = 0.5  # penalty per unit of (centred cosine) similarity to an item ranked higher
    diverse_top: int = 200  # how much of the head of the queue is chosen greedily for diversity
    # Share of the priority taken by the strongest single signal (the rest is the weighted mean): one strong
    # reason, such as a heatmap on a marker, is not averaged away by the signals an image is unremarkable on.
    peak_share: float = 0.5
    heatmap_parts: dict[str, float] = field(default_factory=_default_heatmap_parts)
    # Expected prevalence per finding, used for rarity while no annotation exists yet (cold start).
    prevalence: dict[str, float] = field(default_factory=dict)
    mc_passes: int = 8  # BALD: MC-dropout passes
    mc_dropout: float = 0.25  # BALD: dropout rate when the model has none of its own
    seed: int = 0

    def __post_init__(self) -> None:
        self.signal_weights = {**_default_signal_weights(), **(self.signal_weights or {})}
        self.heatmap_parts = {**_default_heatmap_parts(), **(self.heatmap_parts or {})}
        self.validate()

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> RankConfig:
        """A config from a plain mapping; a top-level ``ranking`` key is unwrapped. Raises ValueError."""
        data = dict(data or {})
        if set(data) == {"ranking"} and isinstance(data["ranking"], Mapping):
            data = dict(data["ranking"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ranking setting(s) {unknown}; allowed: {sorted(known)}")
        for name in ("signal_weights", "finding_weights", "heatmap_parts", "prevalence"):
            if name in data and data[name] is not None and not isinstance(data[name], Mapping):
                raise ValueError(f"ranking setting {name!r} must be a mapping of name -> number")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"invalid ranking config: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> RankConfig:
        """JSON (``.json``) or YAML (anything else); the error names the file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read ranking config {path}: {exc}") from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml  # PyYAML comes with timm; only YAML configs need it

                data = yaml.safe_load(text)
        except Exception as exc:  # json/yaml raise their own error types
            raise ValueError(f"ranking config {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from None
        if data is not None and not isinstance(data, Mapping):
            raise ValueError(f"ranking config {path} must hold a mapping, got {type(data).__name__}")
        try:
            return cls.from_mapping(data)
        except ValueError as exc:
            raise ValueError(f"ranking config {path}: {exc}") from None

    def merged(self, overrides: Mapping[str, Any] | None) -> RankConfig:
        """This config with ``overrides`` applied; weight mappings merge key by key."""
        if not overrides:
            return self
        overrides = dict(overrides)
        if set(overrides) == {"ranking"} and isinstance(overrides["ranking"], Mapping):
            overrides = dict(overrides["ranking"])
        base = self.to_json()
        for name in ("signal_weights", "finding_weights", "heatmap_parts", "prevalence"):
            if isinstance(overrides.get(name), Mapping):
                overrides[name] = {**base[name], **overrides[name]}
        return RankConfig.from_mapping({**base, **overrides})

    def to_json(self) -> dict[str, Any]:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v) for f in fields(self)}

    # -- checks -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown ranking strategy {self.strategy!r}; choose one of {list(STRATEGIES)}")
        for name, table, allowed in (
            ("signal_weights", self.signal_weights, SIGNALS),
            ("heatmap_parts", self.heatmap_parts, HEATMAP_PARTS),
        ):
            extra = sorted(set(table) - set(allowed))
            if extra:
                raise ValueError(f"{name} has unknown key(s) {extra}; allowed: {list(allowed)}")
        for name, table in (
            ("signal_weights", self.signal_weights),
            ("finding_weights", self.finding_weights),
            ("heatmap_parts", self.heatmap_parts),
        ):
            for key, value in table.items():
                if not _is_number(value) or value < 0 or not math.isfinite(value):
                    raise ValueError(f"{name}[{key!r}] must be a finite number >= 0, got {value!r}")
        for key, value in self.prevalence.items():
            if not _is_number(value) or not 0 < value < 1:
                raise ValueError(f"prevalence[{key!r}] must lie strictly between 0 and 1, got {value!r}")
        checks = {
            "default_finding_weight": (self.default_finding_weight, 0, math.inf),
            "diversity_lambda": (self.diversity_lambda, 0, math.inf),
            "peak_share": (self.peak_share, 0, 1),
            "mc_dropout": (self.mc_dropout, 0, 0.95),
        }
        for name, (value, low, high) in checks.items():
            if not _is_number(value) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        for name in ("diverse_top", "mc_passes", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (2 if name == "mc_passes" else 0):
                raise ValueError(f"{name} must be an integer >= {2 if name == 'mc_passes' else 0}, got {value!r}")
        if not any(self.signal_weights[s] > 0 for s in SIGNALS if s != "diversity") and self.strategy == "bias":
            raise ValueError("every signal weight is 0: the bias strategy would have nothing to rank by")

    def finding_weight_vector(self, labels: Sequence[str]) -> np.ndarray:
        weights = np.array([float(self.finding_weights.get(k, self.default_finding_weight)) for k in labels])
        if weights.size and weights.max() <= 0:
            raise ValueError("every finding weight is 0 for this project's findings: nothing to rank by")
        return weights

    def unknown_findings(self, labels: Sequence[str]) -> list[str]:
        """Findings named in the config that this project does not have (a typo, or another project's)."""
        return sorted(set(self.finding_weights) - set(labels))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
