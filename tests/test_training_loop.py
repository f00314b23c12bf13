"""Webhook -> rq job on a real worker -> new model version -> /predict answers with it; crashes lose nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CHEST_CONFIG, NIH, ROOT, shared_or_skip
from fastapi.testclient import TestClient
from rq.job import Job
from test_feedback import annotation_event

from ml_backend.feedback.queue import JOB_SERIALIZER, training_queue
from ml_backend.models.store import VersionStore
from ml_backend.serve.app import create_app


@pytest.fixture()
def loop_env(settings, redis_url, redis_conn, file_root, nih_manifest, monkeypatch):
    """Backend settings shared by the app (this process) and the worker (forked work-horse or subprocess)."""
    shared_or_skip(NIH)
    configured = replace(settings, redis_url=redis_url, input_size=128)
    env = {
        "MODEL_DIR": str(configured.model_dir),
        "REDIS_URL": redis_url,
        "INPUT_SIZE": "128",
        "BACKBONE": "resnet18",
        "LABEL_STUDIO_URL": configured.label_studio_url,
        "LABEL_STUDIO_API_KEY": configured.label_studio_api_key,
        "TRAIN_EPOCHS": "1",
        "TRAINING_LOCK_TTL_S": "3",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    records = [r for r in nih_manifest if r["labels"]][:24]
    for record in records:
        shutil.copy(NIH / record["image"], file_root / os.path.basename(record["image"]))
    return configured, records, env


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def run_worker_burst(env: dict[str, str]) -> None:
    """A real `medebiaser worker --burst` process: it forks a work-horse per job, as in production.

    (Forking from this test process instead would copy a torch runtime whose thread pools are already
    started, which can crash the child; the worker command never touches torch before forking.)
    """
    done = subprocess.run(
        [sys.executable, "-m", "ml_backend.cli", "worker", "--burst"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def post_annotations(client: TestClient, records: list[dict]) -> list[dict]:
    answers = []
    for i, record in enumerate(records):
        findings = [f for f in record["labels"]]
        masks = {}
        if i % 3 == 0:  # ignore masks on a third of the images, as physicians would mark a marker
            ignore = np.zeros((64, 64), np.uint8)
            ignore[:8, :8] = 255
            masks["Ignore (marker, tube, text)"] = ignore
        if i % 4 == 0:  # evidence for the first finding
            evidence = np.zeros((64, 64), np.uint8)
            evidence[20:50, 15:50] = 200
            masks[findings[0]] = evidence
        event = annotation_event(
            1000 + i, 500 + i, choices=findings, masks=masks, image=f"/data/upload/{os.path.basename(record['image'])}"
        )
        event["task"]["data"].update(sex=record["sex"], age=record["age"], patient_id=record["patient_id"])
        answer = client.post("/webhook", json=event)
        assert answer.status_code == 200, answer.text
        answers.append(answer.json())
    return answers


def test_webhook_to_new_version_served_by_predict(loop_env, redis_conn, ls_request) -> None:
    settings, records, env = loop_env
    with TestClient(create_app(settings)) as client:
        setup = ls_request("setup")
        setup.update(schema=CHEST_CONFIG, project="5.1795625307")
        assert client.post("/setup", json=setup).json() == {"model_version": "v0"}
        answers = post_annotations(client, records)
        # bad items inside the job are skipped and counted: an unfetchable image, a mask/image size mismatch
        missing = annotation_event(2000, 900, image="/data/upload/does-not-exist.png")
        client.post("/webhook", json=missing)
        big_mask = np.zeros((128, 128), np.uint8)
        big_mask[:10, :10] = 255
        mismatch = annotation_event(
            2001, 901, masks={"Effusion": big_mask}, image=f"/data/upload/{os.path.basename(records[0]['image'])}"
        )
        client.post("/webhook", json=mismatch)
        job_ids = {a["job_id"] for a in answers} - {None}
        assert len(job_ids) == 1
        queue = training_queue(redis_conn)
        assert queue.count == 1

        run_worker_burst(env)
        job = Job.fetch(job_ids.pop(), connection=redis_conn, serializer=JOB_SERIALIZER)
        result = job.return_value()
        assert job.get_status() == "finished", job.latest_result().exc_string if job.latest_result() else None
        assert result["status"] == "trained" and result["version"] == "v1"
        assert job.meta["stage"] == "done" and job.meta["epoch"] == 1 and job.meta["loss"] > 0
        reasons = {s["task"]: s["reason"] for s in result["skipped"]}
        assert "HTTP 404" in reasons[900] and 901 not in reasons  # a bad region no longer drops its annotation:
        assert result["regions_skipped"]["reasons"] == {"mask is 128x128 but the image is 64x64": 1}  # it is skipped

        info = VersionStore(settings.model_dir).info("5", "v1")
        training = info.meta.training
        # every annotation acknowledged before the job started is in its training set
        assert training["task_ids"] == sorted([500 + i for i in range(len(records))] + [900, 901])
        assert training["annotations_used"] + training["holdout"] == len(records) + 1  # + 901, without its mask
        assert training["masked_ignore"] > 0 and training["masked_evidence_pairs"] > 0
        first_epoch = training["history"][0]
        assert first_epoch["prediction"] > 0 and "evidence_outside" in first_epoch
        assert "ignore_gradient" not in first_epoch  # off by default (LossConfig.ignore_weight): no double backprop
        assert info.meta.parent == "v0" and info.meta.metrics["n_images"] == training["holdout"]

        started = time.perf_counter()
        body = ls_request("predict")
        body.update(label_config=CHEST_CONFIG, project="5.1795625307")
        body["tasks"] = [
            {**body["tasks"][0], "data": {"image": f"/data/upload/{os.path.basename(records[1]['image'])}"}}
        ]
        answer = client.post("/predict", json=body).json()
        assert answer["results"][0]["model_version"] == "v1"
        # the new version answers without a restart (loading it is the only delay; bench/results/training.md
        # times it on a quiet machine, this bound only keeps a loaded CI machine from flaking)
        assert time.perf_counter() - started < 15.0
        versions = client.get("/versions").json()
        assert versions["versions"] == ["v0", "v1"] and versions["projects"]["5"]["live"] == "v1"

        # the bias report of the project's versions, behind the same auth as every route
        report = client.get("/report?project=5")
        assert report.status_code == 200 and "v1" in report.text and "data:image/png;base64" in report.text
        assert "Example heatmaps" in report.text

        # nothing changed since v1: a new job does not train again for no reason
        from ml_backend.feedback.queue import schedule_training

        again = schedule_training(redis_conn, "5", reason="test")
        run_worker_burst(env)
        assert Job.fetch(again, connection=redis_conn, serializer=JOB_SERIALIZER).return_value()["status"] == "skipped"

        # rollback with the CLI; the server serves the old version on its next request
        cli = subprocess.run(
            [sys.executable, "-m", "ml_backend.cli", "activate", "5", "v0"],
            capture_output=True,
            text=True,
            env={**os.environ},
            cwd=ROOT,
        )
        assert cli.returncode == 0, cli.stderr
        assert client.post("/predict", json=body).json()["results"][0]["model_version"] == "v0"
        listing = subprocess.run(
            [sys.executable, "-m", "ml_backend.cli", "versions"],
            capture_output=True,
            text=True,
            env={**os.environ},
            cwd=ROOT,
        ).stdout
        assert "* v0" in listing and "  v1" in listing


def test_killed_training_leaves_the_live_version_intact(loop_env, redis_conn) -> None:
    settings, records, env = loop_env
    with TestClient(create_app(settings)) as client:
        post_annotations(client, records[:12])
    store = VersionStore(settings.model_dir)
    assert store.live_version("5") is None  # no /setup yet: the job creates v0 itself
    worker = subprocess.Popen(
        [sys.executable, "-m", "ml_backend.cli", "worker", "--burst"],
        cwd=ROOT,
        start_new_session=True,
        env={**os.environ, **env, "TRAIN_EPOCHS": "200"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    job_id = redis_conn.get("mdb:5:queued")
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            job = Job.fetch(job_id.decode(), connection=redis_conn, serializer=JOB_SERIALIZER) if job_id else None
            if job and job.get_meta(refresh=True).get("stage") == "training" and job.meta.get("epoch", 0) >= 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail("training never started")
    finally:
        # the worker and its work-horse (rq forks it into a process group of its own) die mid-training
        for pid in [*_children(worker.pid), worker.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        worker.wait()
    assert store.live_version("5") == "v0"
    assert [v.version for v in store.list_versions("5")] == ["v0"]
    # the dead job's project lock expires and the next job trains normally
    from ml_backend.feedback.queue import schedule_training

    time.sleep(3.5)
    job_id = schedule_training(redis_conn, "5", reason="after crash")
    assert job_id is not None  # the dead job's queued marker does not swallow new work
    run_worker_burst(env)
    # rq re-queues the abandoned job when a worker cleans its registries: whichever job runs first trains
    # on every annotation, the other finds nothing new. Exactly one new version, complete and live.
    outcome = Job.fetch(job_id, connection=redis_conn, serializer=JOB_SERIALIZER).return_value()
    assert outcome["status"] in ("trained", "skipped"), outcome
    assert [v.version for v in store.list_versions("5")] == ["v0", "v1"]
    assert store.live_version("5") == "v1"
    assert (
        store.info("5", "v1").meta.training["annotations_used"] + store.info("5", "v1").meta.training["holdout"] == 12
    )


def test_the_settings_defaults_are_the_loss_defaults() -> None:
    """The loss defaults are written three times (LossConfig, TrainingSettings, its environment reader): a job run
    with no settings must train with exactly the loss the benchmarks measured as the default."""
    from ml_backend.config import TrainingSettings
    from ml_backend.train.jobs import train_config
    from ml_backend.train.losses import LossConfig
    from ml_backend.train.mask_propagation import PropagationConfig

    assert TrainingSettings.from_env({}) == TrainingSettings()
    assert train_config(TrainingSettings()).loss == LossConfig()
    assert train_config(TrainingSettings()).propagation == PropagationConfig()  # the detector's experts too
    assert train_config(TrainingSettings.from_env({"PROPAGATION_EXPERTS": "1"})).propagation == PropagationConfig(
        experts=1
    )
    assert train_config(TrainingSettings.from_env({"IGNORE_LOSS_WEIGHT": "0.1"})).loss.ignore_weight == 0.1
