"""bench_mechanism's arms without training anything: a combined variant changes exactly the fields it names, on
the right config, and a typo stops the run before an hour of training rather than measuring the default twice."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_mechanism as mechanism  # noqa: E402

from ml_backend.train.mask_propagation import PropagationConfig  # noqa: E402


def test_a_combined_variant_changes_the_named_propagation_and_loss_fields_only() -> None:
    name, (loss, propagation) = mechanism.propagation_variant("experts=2,artefact_paste_rate=1,ignore_weight=0.03")
    assert name == "propagation, experts 2, artefact paste rate 1, ignore weight 0.03"
    assert propagation == PropagationConfig(experts=2)
    assert (loss.artefact_paste_rate, loss.ignore_weight) == (1.0, 0.03)
    assert loss.counterfactuals and loss.evidence_weight == 0.0  # the rest is the default arm's
    assert type(propagation.experts) is int and type(loss.artefact_paste_rate) is float


@pytest.mark.parametrize("text", ["expert=2", "counterfactuals=0", "prediction=bce", "experts=two", "experts"])
def test_an_unknown_non_numeric_or_malformed_field_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        mechanism.propagation_variant(text)


def test_variants_join_the_arms_after_labels_only() -> None:
    parser_defaults = dict(paste_rates=[], false_cells=[], grow_cells=[], experts=[], propagation_paste_rates=[])
    args = argparse.Namespace(arms=["labels only"], propagation_variants=["experts=2"], **parser_defaults)
    assert list(mechanism.arms(args)) == ["labels only", "propagation, experts 2"]
