"""The promotion gate on the real NIH label mix (nih1000's findings, sexes and patients) with model outputs
of known quality: a version no worse than its parent goes live; a worse or more biased one is kept back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CHEST_CONFIG, NIH, shared_or_skip
from fastapi.testclient import TestClient

from ml_backend.models.store import VersionStore
from ml_backend.serve.app import create_app
from ml_backend.train.jobs import train_project
from ml_backend.train.promotion import PromotionPolicy, decide, macro_auroc

FINDINGS = ["Effusion", "Infiltration", "Atelectasis", "Cardiomegaly"]


@pytest.fixture(scope="module")
def holdout(nih_manifest):
    records = nih_manifest[:400]
    y = np.array([[f in r["labels"] for f in FINDINGS] for r in records], dtype=bool)
    sex = np.array([r["sex"] for r in records], dtype=object)
    patients = np.array([r["patient_id"] for r in records], dtype=object)
    return y, sex, patients


def _informative(y: np.ndarray, rng: np.random.Generator, strength: float = 2.0) -> np.ndarray:
    logits = rng.normal(size=y.shape) + strength * (y.astype(float) - 0.5) - 1.0
    return 1 / (1 + np.exp(-logits))


def test_macro_auroc_matches_scikit_learn(holdout) -> None:
    from sklearn.metrics import roc_auc_score

    y, _, _ = holdout
    prob = _informative(y, np.random.default_rng(1))
    expected = np.mean([roc_auc_score(y[:, k], prob[:, k]) for k in range(y.shape[1])])
    assert macro_auroc(y, prob) == pytest.approx(expected, abs=1e-9)


def test_a_version_as_good_as_its_parent_goes_live(holdout) -> None:
    y, sex, patients = holdout
    rng = np.random.default_rng(0)
    parent = _informative(y, rng)
    candidate = np.clip(parent + rng.normal(scale=0.02, size=parent.shape), 0, 1)
    thr = np.full(len(FINDINGS), 0.4)
    decision = decide(y, parent, candidate, thr, thr, {"sex": sex}, patients)
    assert decision.promote, decision.reason
    assert {c.name for c in decision.checks} == {"macro_auroc", "macro_f1", "worst_eod_sex"}
    assert decision.n_patients == len(set(patients))
    assert all(c.delta_ci is not None for c in decision.checks)


def test_a_worse_version_is_kept_as_a_candidate_with_the_reason(holdout) -> None:
    y, sex, patients = holdout
    rng = np.random.default_rng(0)
    parent = _informative(y, rng)
    candidate = rng.uniform(size=y.shape)  # forgot everything
    thr = np.full(len(FINDINGS), 0.4)
    decision = decide(y, parent, candidate, thr, thr, {"sex": sex}, patients)
    assert not decision.promote
    assert decision.reason.startswith("kept as a candidate: worse") and "macro_auroc" in decision.reason
    failed = {c.name for c in decision.checks if not c.passed}
    assert "macro_auroc" in failed


def test_an_equally_accurate_but_more_biased_version_is_kept_back(holdout) -> None:
    y, sex, patients = holdout
    rng = np.random.default_rng(0)
    parent = _informative(y, rng, strength=3.0)
    candidate = parent.copy()
    # Women without Effusion now get it predicted: a false-positive-rate gap between the sexes
    women_without = (sex == "F") & ~y[:, 0]
    candidate[women_without, 0] = np.maximum(
        candidate[women_without, 0], 0.45 + 0.1 * rng.uniform(size=women_without.sum())
    )
    thr = np.full(len(FINDINGS), 0.4)
    decision = decide(y, parent, candidate, thr, thr, {"sex": sex}, patients)
    assert not decision.promote
    assert "more biased" in decision.reason and "worst_eod_sex" in decision.reason


def test_too_few_held_out_images_or_the_gate_off(holdout) -> None:
    y, sex, patients = holdout
    rng = np.random.default_rng(0)
    parent = _informative(y[:3], rng)
    thr = np.full(len(FINDINGS), 0.5)
    small = decide(y[:3], parent, parent, thr, thr, {"sex": sex[:3]}, patients[:3])
    assert not small.promote and "3 held-out images" in small.reason and "activate" in small.reason
    off = decide(y[:3], parent, parent, thr, thr, policy=PromotionPolicy(enabled=False))
    assert off.promote and "off" in off.reason


def _choices_event(annotation_id: int, task_id: int, record: dict) -> dict:
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 31, "label_config": CHEST_CONFIG},
        "task": {
            "id": task_id,
            "data": {"image": f"/data/upload/{Path(record['image']).name}", "patient_id": record["patient_id"]},
        },
        "annotation": {
            "id": annotation_id,
            "was_cancelled": False,
            "result": [
                {
                    "from_name": "findings",
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": record["labels"] or ["No Finding"]},
                }
            ],
        },
    }


def test_a_job_without_held_out_patients_keeps_a_candidate_that_activate_promotes(
    settings, redis_url, redis_conn, file_root, nih_manifest, capsys
) -> None:
    """A real training job on 5 annotations (too few to hold any patient out): v1 is saved, v0 stays live, the
    reason is in /versions and `medebiaser versions`, and `medebiaser activate` makes v1 live."""
    shared_or_skip(NIH)
    configured = replace(settings, redis_url=redis_url, input_size=64)
    records = nih_manifest[:5]
    for record in records:
        shutil.copy(NIH / record["image"], file_root / Path(record["image"]).name)
    with TestClient(create_app(configured)) as client:
        for i, record in enumerate(records):
            assert client.post("/webhook", json=_choices_event(3000 + i, 700 + i, record)).status_code == 200
        result = train_project("31", replace(configured))  # the job's function, in this process
        assert result["status"] == "candidate", result
        assert "held-out images" in result["promotion"] and "activate" in result["promotion"]
        store = client.app.state.registry.store
        assert store.live_version("31") == "v0" and store.info("31", "v1").meta.promotion["promote"] is False
        summary = client.get("/versions", params={"project": "31"}).json()["projects"]["31"]
        v1 = next(v for v in summary["versions"] if v["version"] == "v1")
        assert summary["live"] == "v0" and v1["promoted"] is False and "candidate" in v1["promotion"]
    env = {"MODEL_DIR": str(configured.model_dir)}
    command = [sys.executable, "-m", "ml_backend.cli", "versions", "--project", "31"]
    listing = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120).stdout
    assert "candidate, not live" in listing
    command = [sys.executable, "-m", "ml_backend.cli", "activate", "31", "v1"]
    subprocess.run(command, env={**os.environ, **env}, check=True, timeout=120, capture_output=True)
    assert VersionStore(configured.model_dir).live_version("31") == "v1"
