"""Mechanism test on real chest X-rays: the ignore-mask loss acts on the model's dependence on a shortcut.

An artefact (a text tag with varying position, size and intensity) is stamped on the training images of
Cardiomegaly (more often for men); the test split is marker-free. A model trained on that data leans on the
marker. Fine-tuning from it (as the product's worker does) with the input-gradient ignore-mask loss on 25% of
the marked images lowers the dependence compared with fine-tuning on the same data without masks. Dependence is
measured directly: the change in the Cardiomegaly probability when the marker is added to the same test image
(paired, label-free).

Measured here (seed 0): ΔP 0.49 after labels-only fine-tuning, 0.38 with masks: the term works in the right
direction but does not yet remove the dependence when fine-tuning (issue 3 stays open on that); the test
guards the direction and a minimum effect. Multi-seed numbers: bench/results/physician.md.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
from conftest import NIH, shared_or_skip

from ml_backend.measure import simulation as sim
from ml_backend.train.losses import LossConfig

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


def test_ignore_masks_remove_the_dependence_on_a_shortcut() -> None:
    data = sim.load_manifest_folder(shared_or_skip(NIH))
    test_idx = sim.patient_folds(data.patients, 5, seed=0)[0]
    train = data.subset(np.setdiff1d(np.arange(len(data)), test_idx))
    test = data.subset(test_idx)
    # One artefact kind (a text tag at varying corners, sizes and intensities): the mechanism case. The
    # benchmark draws tags, tubes and rulers, where a minority of masks has less to generalise from.
    shortcut = sim.Shortcut(kinds=("tag",))
    images, markers = sim.inject_shortcut(train, shortcut, np.random.default_rng(0))
    spec = sim.ModelSpec()
    no_attention = LossConfig(prediction="wbce", ignore_weight=0.0, evidence_weight=0.0)

    biased = sim.new_model(spec, len(data.findings), seed=0)
    sim.train(biased, sim.make_tensors(biased, spec, images, train.labels), replace(spec.scratch, loss=no_attention), 0)
    thresholds = np.full(len(data.findings), 0.5)
    before = sim.evaluate(biased, spec, test, shortcut, thresholds, seed=1, with_bias_metrics=False)
    assert before["delta_p"] > 0.04, f"the model did not learn the shortcut (ΔP {before['delta_p']:.3f})"

    rng = np.random.default_rng(1)
    marked = [i for i, m in enumerate(markers) if m is not None]
    masked = set(rng.choice(marked, size=max(1, len(marked) // 4), replace=False).tolist())
    ignore = [markers[i] if i in masked else None for i in range(len(images))]
    results = {}
    for arm, loss, masks in [("labels only", no_attention, None), ("ignore masks", LossConfig(), ignore)]:
        model = copy.deepcopy(biased)
        tensors = sim.make_tensors(model, spec, images, train.labels, ignore=masks)
        sim.train(model, tensors, replace(spec.finetune, loss=loss, epochs=4), seed=0)
        results[arm] = sim.evaluate(model, spec, test, shortcut, thresholds, seed=1, with_bias_metrics=False)

    print(
        {arm: (round(r["delta_p"], 3), round(r["shortcut_auroc"], 3)) for arm, r in results.items()},
        "before",
        round(before["delta_p"], 3),
        f"{len(masked)} masks on {len(images)} images",
    )
    # at least a 10% lower dependence than the same fine-tuning without masks (measured: 22%)
    assert results["ignore masks"]["delta_p"] < 0.9 * results["labels only"]["delta_p"]
