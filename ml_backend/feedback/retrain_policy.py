"""When a training job starts: enough new annotations, a ``START_TRAINING``, or a quiet period after the last one.

One annotation must not replace the model everyone sees, and a job per annotation would keep a worker busy
training versions nobody can evaluate. So a job starts when

* at least ``RETRAIN_MIN_ANNOTATIONS`` (default 10) annotations changed since the last job took its snapshot:
  ten corrections are a few minutes of a physician's work, and with the held-out fifth of them (at least 4
  images, ``holdout_split``) the first version already has held-out patients for the promotion gate; or
* ``START_TRAINING`` arrives (the team asks for it: always a job); or
* nothing has arrived for ``RETRAIN_QUIET_S`` (default 600 s) while fewer are waiting: a session ended, its
  corrections train without anyone pressing a button. Workers sweep for such projects between jobs.

Redis: ``mdb:<p>:gen`` (the store's change counter) against ``mdb:<p>:gen-snapshot`` (the generation the last
job trained on) gives the waiting count; ``mdb:retrain:waiting`` is a sorted set of projects by the time of
their last annotation.
"""

from __future__ import annotations

import logging
import time

import redis

from ml_backend.config import Settings
from ml_backend.feedback.queue import key, schedule_training

log = logging.getLogger(__name__)

WAITING = "mdb:retrain:waiting"
# Remove the project from the waiting set only if nothing arrived after the job's snapshot.
_FORGET_IF_NOT_NEWER = (
    "local s = redis.call('zscore', KEYS[1], ARGV[1]) "
    "if s and tonumber(s) <= tonumber(ARGV[2]) then return redis.call('zrem', KEYS[1], ARGV[1]) end return 0"
)


def waiting_annotations(conn: redis.Redis, project: str) -> int:
    generation, trained = conn.mget(key(project, "gen"), key(project, "gen-snapshot"))
    return max(0, int(generation or 0) - int(trained or 0))


def after_annotations(conn: redis.Redis, project: str, settings: Settings, *, reason: str) -> str | None:
    """Called once annotations are recorded: a job now if enough are waiting, else the quiet-period clock runs.
    Returns the new job id, or None (a job is queued already, or it is not time yet)."""
    conn.zadd(WAITING, {project: time.time()})
    waiting = waiting_annotations(conn, project)
    if waiting < max(1, settings.retrain_min_annotations):
        log.info(
            "project %s: %d annotations waiting (a job starts at %d, or after %.0f s without new ones)",
            project,
            waiting,
            settings.retrain_min_annotations,
            settings.retrain_quiet_s,
        )
        return None
    return schedule_training(conn, project, reason=f"{reason}: {waiting} annotations waiting", settings=settings)


def snapshot_taken(conn: redis.Redis, project: str, generation: int, taken_at: float) -> None:
    """The job trains on everything up to ``generation``: the count starts again from there."""
    conn.set(key(project, "gen-snapshot"), generation)
    conn.eval(_FORGET_IF_NOT_NEWER, 1, WAITING, project, taken_at)


def schedule_quiet_projects(conn: redis.Redis, settings: Settings, now: float | None = None) -> list[str]:
    """Queue a job for every project whose last annotation is older than the quiet period (worker sweep)."""
    cutoff = (now if now is not None else time.time()) - settings.retrain_quiet_s
    queued = []
    for raw in conn.zrangebyscore(WAITING, "-inf", cutoff):
        project = raw.decode() if isinstance(raw, bytes) else str(raw)
        if waiting_annotations(conn, project) == 0:
            conn.zrem(WAITING, project)
            continue
        job = schedule_training(conn, project, reason="quiet period after the last annotation", settings=settings)
        if job is not None:
            queued.append(job)
    return queued
