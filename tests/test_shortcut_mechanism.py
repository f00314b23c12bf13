"""Mechanism test on real chest X-rays: the ignore-mask terms act on the model's dependence on a shortcut.

An artefact (a text tag with varying position, size and intensity) is stamped on the training images of
Cardiomegaly (more often for men); the test split is marker-free. A model trained on that data leans on the
marker. Fine-tuning from it (as the product's worker does) with ignore masks on a tenth of the tagged images
lowers the dependence compared with fine-tuning on the same data without masks; with mask propagation (the
default: the detector finds the other tags, train/mask_propagation.py) it goes. Dependence is measured
directly: the change in the Cardiomegaly probability when the marker is added to the same test image.

Measured (seed 0, 8 fine-tuning epochs, this CPU, 2026-12-08, today's defaults: input-gradient term off, every
unmasked image given a pasted artefact, two detector experts): the biased model ΔP 0.30; fine-tuned on labels
only 0.39; masks on 5 of the 58 tagged images: 0.07 without propagation, -0.07 with it (54 images given a mask);
masks on all of them -0.06, and -0.06 with the input-gradient term on; the finding's AUROC 0.65-0.67 (labels only
0.66). Under the defaults of 2026-12-07 (half the images pasted onto, one expert) the same arms read 0.18, 0.05,
0.12 and 0.08. bench/results/mechanism.md has 5 folds (term on, the older defaults).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import simulation as sim  # bench/simulation.py: tests/conftest.py puts bench/ on sys.path
from conftest import NIH, shared_or_skip

from ml_backend.train.losses import LossConfig
from ml_backend.train.mask_propagation import PropagationConfig

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


def test_ignore_masks_remove_the_dependence_on_a_shortcut() -> None:
    data = sim.load_manifest_folder(shared_or_skip(NIH))
    test_idx = sim.patient_folds(data.patients, 5, seed=0)[0]
    train = data.subset(np.setdiff1d(np.arange(len(data)), test_idx))
    test = data.subset(test_idx)
    # One artefact kind (a text tag at varying corners, sizes and intensities): the mechanism case. The
    # benchmark draws tags, tubes and rulers, where a minority of masks has less to generalise from.
    shortcut = sim.Shortcut(kinds=("tag",))
    images, markers, _ = sim.inject_shortcut(train, shortcut, np.random.default_rng(0))
    spec = sim.ModelSpec()
    no_attention = LossConfig(prediction="wbce", ignore_weight=0.0, evidence_weight=0.0, counterfactuals=False)

    biased = sim.new_model(spec, len(data.findings), seed=0)
    sim.train(biased, sim.make_tensors(biased, spec, images, train.labels), replace(spec.scratch, loss=no_attention), 0)
    thresholds = np.full(len(data.findings), 0.5)
    before = sim.evaluate(biased, spec, test, shortcut, thresholds, seed=1, with_bias_metrics=False)
    assert before["delta_p"] > 0.04, f"the model did not learn the shortcut (ΔP {before['delta_p']:.3f})"

    rng = np.random.default_rng(1)
    marked = [i for i, m in enumerate(markers) if m is not None]
    tenth = set(rng.choice(marked, size=max(3, len(marked) // 10), replace=False).tolist())
    results = {}
    arms = [
        ("labels only", no_attention, None, set()),
        ("masks on 10%, no propagation", LossConfig(), None, tenth),
        ("masks on 10%", LossConfig(), PropagationConfig(), tenth),  # the product's default
        ("masks on all", LossConfig(), PropagationConfig(), set(marked)),
        # the input-gradient term, off by default since it cost accuracy (bench/results/physician.md), turned on
        ("masks on all, input-gradient term", LossConfig(ignore_weight=0.1), PropagationConfig(), set(marked)),
    ]
    for arm, loss, propagation, masked in arms:
        model = copy.deepcopy(biased)
        ignore = [markers[i] if i in masked else None for i in range(len(images))]
        tensors = sim.make_tensors(model, spec, images, train.labels, ignore=ignore)
        config = replace(spec.finetune, loss=loss, epochs=8, propagation=propagation)
        run = sim.train(model, tensors, config, seed=0)
        results[arm] = sim.evaluate(model, spec, test, shortcut, thresholds, seed=1, with_bias_metrics=False)
        results[arm]["propagation"] = run.propagation

    print(
        {arm: (round(r["delta_p"], 3), round(r["shortcut_auroc"], 3)) for arm, r in results.items()},
        "before",
        round(before["delta_p"], 3),
        f"{len(tenth)} / {len(marked)} masks on {len(images)} images",
        results["masks on 10%"]["propagation"],
    )
    labels_only = results["labels only"]["delta_p"]
    # measured with today's defaults: 0.39 labels only; masks on a tenth of the tags 0.07 without propagation,
    # -0.07 with it; -0.06 on all of them, with or without the input-gradient term. The bounds keep the margins
    # the older defaults' 0.18 / 0.05 / 0.12 / 0.08 needed, so another CPU's rounding cannot fail them.
    assert results["masks on 10%, no propagation"]["delta_p"] < 0.75 * labels_only
    assert results["masks on 10%"]["delta_p"] < 0.25 * labels_only
    assert results["masks on 10%"]["propagation"].propagated >= len(marked) - len(tenth) - 5
    assert results["masks on all"]["delta_p"] < 0.4 * labels_only
    assert results["masks on all, input-gradient term"]["delta_p"] < 0.25 * labels_only
    # the finding itself is still learnt
    assert results["masks on 10%"]["shortcut_auroc"] > 0.6 and results["masks on all"]["shortcut_auroc"] > 0.6
