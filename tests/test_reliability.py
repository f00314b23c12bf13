"""Reliability: one queued job per project under concurrent senders, jobs that survive a killed work-horse or
worker, JSON jobs on a password-protected embedded Redis, and the bench scenarios (burst under /predict load,
SIGKILL of the whole backend mid-burst, a Redis restart) with smaller numbers. All real: redis-server, rq
workers (`medebiaser worker`), `medebiaser serve`, NIH images."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
import redis
from conftest import NIH, ROOT, shared_or_skip
from fastapi.testclient import TestClient
from test_training_loop import loop_env, post_annotations  # noqa: F401 - loop_env is a fixture

from ml_backend.config import Settings
from ml_backend.feedback.queue import (
    JOB_SERIALIZER,
    TRAINING,
    EmbeddedRedis,
    fetch_job,
    job_queue,
    make_worker,
    redacted,
    schedule_training,
    training_queue,
)
from ml_backend.models.store import VersionStore
from ml_backend.serve.app import create_app

sys.path.insert(0, str(ROOT / "bench"))
import bench_reliability as rel  # noqa: E402


# --------------------------------------------------------------------------------------------- Redis, serializer
def test_embedded_redis_has_a_private_password_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    try:
        password = (tmp_path / "redis" / "password").read_text().strip()
        assert len(password) >= 32 and f":{password}@" in url and password not in redacted(url)
        for name in ("password", "redis.conf"):  # the password never goes on a command line (ps shows those)
            assert stat.S_IMODE((tmp_path / "redis" / name).stat().st_mode) == 0o600
        assert password not in " ".join(Path(f"/proc/{server.process.pid}/cmdline").read_text().split("\0"))
        port = server.port
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
        redis.Redis.from_url(url).set("kept", "1")
        server.process.kill()  # SIGKILL: only the append-only file keeps the write
        server.process.wait()
        again = EmbeddedRedis(tmp_path / "redis", port=port)
        assert again.start() == url  # same password, same port: clients' URLs stay valid
        assert redis.Redis.from_url(url).get("kept") == b"1"
        again.stop()
    finally:
        server.stop()


def test_jobs_are_json_and_a_pickled_payload_never_runs(redis_url, redis_conn, settings, tmp_path: Path) -> None:
    job_id = schedule_training(redis_conn, "5", reason="test")
    raw = redis_conn.hgetall(f"rq:job:{job_id}")
    assert json.loads(zlib.decompress(raw[b"data"]))[2] == ["5"]  # (function, instance, args, kwargs), JSON
    assert json.loads(raw[b"meta"])["project"] == "5"
    redis_conn.flushall()

    # Someone who can write to Redis plants a pickle that runs a command when unpickled: the worker reads JSON.
    witness = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    from rq import Queue

    Queue(TRAINING.queue, connection=redis_conn).enqueue("builtins.print", Evil())  # pickle serializer
    worker = make_worker(redis_conn, Settings(redis_url=redis_url), in_process=True)
    with contextlib.suppress(Exception):
        worker.work(burst=True)
    assert not witness.exists()


# --------------------------------------------------------------------------------------------- coalescing
_SENDER = """
import json, os, sys, time
import redis
from ml_backend.feedback.queue import schedule_training
conn = redis.Redis.from_url(os.environ["REDIS_URL"])
while not conn.exists("go"):
    time.sleep(0.001)
ids = [schedule_training(conn, str(i % 3), reason="proc") for i in range(int(sys.argv[1]))]
print(json.dumps([i for i in ids if i]))
"""


def _queued_per_project(conn) -> Counter:
    return Counter(job_id.split("-")[1] for job_id in training_queue(conn).get_job_ids())


def test_parallel_senders_leave_one_queued_job_per_project(redis_url, redis_conn) -> None:
    """16 threads and 3 processes call schedule_training for 3 projects at once, 5 times over."""
    for _ in range(5):
        redis_conn.flushall()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _SENDER, "60"],
                cwd=ROOT,
                env={**os.environ, "REDIS_URL": redis_url},
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        time.sleep(1.5)  # let them import and wait on the start key
        barrier = threading.Barrier(16)
        created: list[str] = []

        def send(barrier=barrier, created=created) -> None:
            conn = redis.Redis.from_url(redis_url)
            barrier.wait()
            for i in range(30):
                job = schedule_training(conn, str(i % 3), reason="thread")
                if job:
                    created.append(job)

        threads = [threading.Thread(target=send) for _ in range(16)]
        for thread in threads:
            thread.start()
        redis_conn.set("go", "1")
        for thread in threads:
            thread.join()
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            created += json.loads(out)
        assert sorted(j.split("-")[1] for j in created) == ["0", "1", "2"]  # one winner per project
        assert _queued_per_project(redis_conn) == {"0": 1, "1": 1, "2": 1}
        for project in "012":
            assert redis_conn.get(f"mdb:{project}:queued").decode() in created


def test_parallel_webhooks_through_the_app_leave_one_queued_job_per_project(redis_url, redis_conn, tmp_path) -> None:
    """The real /webhook route (uvicorn subprocess), 8 threads, two projects, three rounds."""
    backend = rel.Backend(tmp_path / "models", "http://127.0.0.1:9", tmp_path / "serve.log", redis_url=redis_url)
    backend.workers = 0
    backend.start()
    try:
        for _ in range(3):
            redis_conn.flushall()
            bodies = [rel.annotation_body(1 + i % 2, i, f"{i}.png") for i in range(160)]
            result = rel.burst(backend.url, bodies, threads=8, predict_clients=0)
            assert len(result.acked) == 160 and not result.errors
            assert _queued_per_project(redis_conn) == {"1": 1, "2": 1}
            assert len(result.job_ids) == 2  # exactly one answer per project carried a new job id
    finally:
        backend.stop()


# --------------------------------------------------------------------------------------------- worker death
def _start_worker(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ml_backend.cli", "worker"],
        cwd=ROOT,
        env={**os.environ, **env},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_worker(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        rel.sigkill_tree(worker)


def _wait_training(redis_conn, job_id: str, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        meta = fetch_job(redis_conn, job_id).get_meta(refresh=True)
        if meta.get("stage") == "training":
            return
        time.sleep(0.1)
    pytest.fail("training never started")


def _wait_finished(redis_conn, job_id: str, timeout_s: float = 300) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = fetch_job(redis_conn, job_id)
        if job.get_status() == "finished":
            return job.return_value()
        time.sleep(0.5)
    pytest.fail(f"job {job_id} is {fetch_job(redis_conn, job_id).get_status()} after {timeout_s} s")


def _horse(worker_pid: int) -> int:
    """rq forks the work-horse into a process group of its own (the scheduler child stays in the worker's)."""
    for _ in range(100):
        horses = [p for p in rel.descendants(worker_pid) if os.getpgid(p) == p]
        if horses:
            return horses[0]
        time.sleep(0.1)
    raise AssertionError("no work-horse")


_RETRY_ENV = {"JOB_RETRY_INTERVALS_S": "1", "WORKER_MAINTENANCE_S": "5", "WORKER_HEARTBEAT_S": "2", "TRAIN_EPOCHS": "2"}


def _annotated(settings, redis_conn, records) -> tuple[str, list[int]]:
    with TestClient(create_app(settings)) as client:
        post_annotations(client, records[:12])
    job_id = redis_conn.get("mdb:5:queued").decode()
    return job_id, [500 + i for i in range(12)]


def _assert_trained_everything(settings, result: dict, tasks: list[int]) -> None:
    assert result["status"] == "trained" and result["version"] == "v1", result
    store = VersionStore(settings.model_dir)
    assert store.live_version("5") == "v1" and [v.version for v in store.list_versions("5")] == ["v0", "v1"]
    assert store.info("5", "v1").meta.training["task_ids"] == tasks


@pytest.mark.slow
def test_killed_work_horse_is_retried_without_a_new_webhook(loop_env, redis_conn) -> None:  # noqa: F811
    settings, records, env = loop_env
    job_id, tasks = _annotated(settings, redis_conn, records)
    worker = _start_worker({**env, **_RETRY_ENV})
    try:
        _wait_training(redis_conn, job_id)
        os.kill(_horse(worker.pid), signal.SIGKILL)
        started = time.monotonic()
        result = _wait_finished(redis_conn, job_id)
        print(f"killed work-horse: job retried and finished {time.monotonic() - started:.1f} s later")
    finally:
        _stop_worker(worker)
    _assert_trained_everything(settings, result, tasks)
    assert fetch_job(redis_conn, job_id).retries_left == 2  # one of JOB_RETRIES=3 spent


@pytest.mark.slow
def test_orphaned_job_of_a_killed_worker_is_requeued_by_the_next_worker(loop_env, redis_conn) -> None:  # noqa: F811
    settings, records, env = loop_env
    job_id, tasks = _annotated(settings, redis_conn, records)
    worker = _start_worker({**env, **_RETRY_ENV})
    try:
        _wait_training(redis_conn, job_id)
    finally:
        rel.sigkill_tree(worker)  # worker, work-horse and scheduler at once
    time.sleep(1)
    assert fetch_job(redis_conn, job_id).get_status() == "started"  # nobody is left to say otherwise
    started = time.monotonic()
    worker = _start_worker({**env, **_RETRY_ENV})
    try:
        result = _wait_finished(redis_conn, job_id)
        print(f"orphaned job: requeued and finished {time.monotonic() - started:.1f} s after the new worker started")
    finally:
        _stop_worker(worker)
    _assert_trained_everything(settings, result, tasks)
    assert len(job_queue(redis_conn, TRAINING)) == 0


# --------------------------------------------------------------------------------------------- bench scenarios
@pytest.fixture()
def nih_images():
    shared_or_skip(NIH)


def test_burst_under_predict_load_loses_nothing(nih_images) -> None:
    result = rel.scenario_burst(300, threads=8, predict_clients=2)
    print(json.dumps(result))
    assert result["acked"] == result["stored"] == 300 and result["lost"] == 0 and not result["errors"]
    assert result["predictions"] > 0 and not result["predict_errors"]
    assert all(jobs["queued"] == 1 for jobs in result["jobs_per_project"].values())
    assert not result["password_in_log"]
    assert result["children_left_after_sigterm"] == 0  # SIGTERM to serve stops its embedded Redis too


@pytest.mark.slow
def test_sigkill_of_the_whole_backend_mid_burst_loses_nothing_and_trains_it(nih_images) -> None:
    result = rel.scenario_kill(200, kill_after=100, train_timeout_s=300)
    print(json.dumps(result))
    assert result["acked_before_kill"] >= 100 and result["lost"] == 0
    assert result["killed_processes"] >= 3  # serve, redis-server, worker (+ work-horse / scheduler)
    assert result["trained_version"] is not None  # trained on every acknowledged annotation, no new webhook


@pytest.mark.slow
def test_redis_restart_keeps_annotations_and_the_queued_job(nih_images) -> None:
    result = rel.scenario_redis_restart(30)
    print(json.dumps(result))
    assert result["lost"] == 0 and result["acked"] >= 58
    assert result["webhook_while_down"] == 503  # Redis down: a clear "try again", and Label Studio's copy stays
    assert result["queued_marker_kept"] and result["jobs_after_restart"]["queued"] == 1
    assert result["worker_rc"] == 0 and result["trained_version"] == "v1"


def test_serve_listens_on_loopback_unless_host_says_otherwise(monkeypatch) -> None:
    monkeypatch.delenv("HOST", raising=False)
    assert Settings.from_env().host == "127.0.0.1"
    monkeypatch.setenv("HOST", "0.0.0.0")
    assert Settings.from_env().host == "0.0.0.0"
    assert "HOST=0.0.0.0" in (ROOT / "docker" / "Dockerfile").read_text()  # the container still listens outside
    assert JOB_SERIALIZER.loads(JOB_SERIALIZER.dumps({"x": __import__("numpy").float32(0.5)})) == {"x": 0.5}
