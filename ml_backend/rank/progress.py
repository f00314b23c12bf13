"""Where a ranking job is: its stage and counters, for the log, the rq job's meta and Redis ``mdb:<p>:rank``."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from rq import get_current_job

from ml_backend.feedback.queue import key

log = logging.getLogger(__name__)


class Progress:
    """Stage and counters to the log, the rq job's meta and Redis ``mdb:<p>:rank`` (whichever exist)."""

    def __init__(self, project: str, conn: Any = None) -> None:
        self.project, self.conn = project, conn
        self.state: dict[str, Any] = {"project": project}
        self._last_log = 0.0

    def __call__(self, force_log: bool = True, **values: Any) -> None:
        self.state.update(values, updated_at=time.time())
        now = time.monotonic()
        if force_log or now - self._last_log > 5:
            log.info("ranking %s: %s", self.project, {k: v for k, v in values.items() if k != "updated_at"})
            self._last_log = now
        job = get_current_job()
        if job is not None:
            job.meta.update(self.state)
            job.save_meta()
        if self.conn is not None:
            try:
                self.conn.hset(key(self.project, "rank"), mapping={k: json.dumps(v) for k, v in self.state.items()})
            except Exception as exc:  # progress is best effort; the job itself must go on
                log.debug("ranking progress not stored in Redis: %s", exc)
