"""The per-project annotation store in Redis: what the next training job trains on.

``mdb:<p>:ann`` maps annotation id -> record JSON; ``mdb:<p>:gen`` counts changes (created, updated,
deleted, reconciled) so a job can tell whether anything changed since the live version was trained.
"""

from __future__ import annotations

import orjson
import redis

from ml_backend.feedback.annotations import AnnotationRecord
from ml_backend.feedback.queue import key


class AnnotationStore:
    def __init__(self, conn: redis.Redis, project: str) -> None:
        self.conn, self.project = conn, project

    def put(self, record: AnnotationRecord) -> int:
        record.seq = int(self.conn.incr(key(self.project, "seq")))
        pipe = self.conn.pipeline(transaction=True)
        pipe.hset(key(self.project, "ann"), str(record.annotation_id), orjson.dumps(record.to_json()))
        pipe.incr(key(self.project, "gen"))
        pipe.execute()
        return record.seq

    def delete(self, annotation_ids: list[int]) -> int:
        if not annotation_ids:
            return 0
        pipe = self.conn.pipeline(transaction=True)
        pipe.hdel(key(self.project, "ann"), *[str(i) for i in annotation_ids])
        pipe.incr(key(self.project, "gen"))
        removed, _ = pipe.execute()
        return int(removed)

    def snapshot(self) -> tuple[int, list[AnnotationRecord]]:
        """(generation, records) read atomically; one record per task (its most recent annotation)."""
        pipe = self.conn.pipeline(transaction=True)
        pipe.get(key(self.project, "gen"))
        pipe.hgetall(key(self.project, "ann"))
        gen, raw = pipe.execute()
        records = [AnnotationRecord.from_json(orjson.loads(v)) for v in raw.values()]
        latest: dict[int, AnnotationRecord] = {}
        for record in sorted(records, key=lambda r: r.seq):
            latest[record.task_id] = record
        return int(gen or 0), sorted(latest.values(), key=lambda r: r.task_id)

    def count(self) -> int:
        return int(self.conn.hlen(key(self.project, "ann")))

    def set_label_config(self, config: str) -> None:
        self.conn.set(key(self.project, "label_config"), config)

    def label_config(self) -> str | None:
        raw = self.conn.get(key(self.project, "label_config"))
        return raw.decode() if isinstance(raw, bytes) else raw
