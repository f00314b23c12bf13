"""The retraining policy on a real Redis and the real webhook handler: a job starts at N waiting annotations,
on START_TRAINING, or after a quiet period; the count starts again from each job's snapshot."""

from __future__ import annotations

import time
from dataclasses import replace

from conftest import CHEST_CONFIG

from ml_backend.feedback.queue import training_queue
from ml_backend.feedback.retrain_policy import WAITING, schedule_quiet_projects, snapshot_taken, waiting_annotations
from ml_backend.feedback.store import AnnotationStore
from ml_backend.feedback.webhook import WebhookHandler


def _event(i: int, project: int = 41) -> dict:
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": project, "label_config": CHEST_CONFIG},
        "task": {"id": 100 + i, "data": {"image": f"/data/upload/{i}.png"}},
        "annotation": {
            "id": 500 + i,
            "result": [
                {"from_name": "findings", "to_name": "image", "type": "choices", "value": {"choices": ["Edema"]}}
            ],
        },
    }


def test_a_job_starts_at_n_annotations_not_at_the_first(settings, redis_url, redis_conn) -> None:
    handler = WebhookHandler(replace(settings, redis_url=redis_url, retrain_min_annotations=4), redis_conn)
    answers = [handler.handle(_event(i))[1] for i in range(3)]
    assert [a["job_id"] for a in answers] == [None, None, None]
    assert answers[-1]["waiting"] == 3 and "starts at 4" in answers[-1]["training"]
    assert training_queue(redis_conn).count == 0
    fourth = handler.handle(_event(3))[1]
    assert fourth["job_id"] is not None and training_queue(redis_conn).count == 1
    # the job takes its snapshot: everything so far is its training set, the count starts again
    generation, records = AnnotationStore(redis_conn, "41").snapshot()
    snapshot_taken(redis_conn, "41", generation, time.time())
    assert len(records) == 4 and waiting_annotations(redis_conn, "41") == 0
    assert redis_conn.zscore(WAITING, "41") is None


def test_start_training_always_starts_a_job(settings, redis_url, redis_conn) -> None:
    handler = WebhookHandler(replace(settings, redis_url=redis_url, retrain_min_annotations=10), redis_conn)
    handler.handle(_event(0))
    status, answer = handler.handle({"action": "START_TRAINING", "project": {"id": 41, "label_config": CHEST_CONFIG}})
    assert status == 201 and answer["job_id"] is not None


def test_a_quiet_period_starts_the_job_for_the_few_waiting(settings, redis_url, redis_conn) -> None:
    configured = replace(settings, redis_url=redis_url, retrain_min_annotations=10, retrain_quiet_s=0.5)
    handler = WebhookHandler(configured, redis_conn)
    handler.handle(_event(0, project=42))
    handler.handle(_event(1, project=42))
    assert schedule_quiet_projects(redis_conn, configured) == []  # the last annotation is too recent
    time.sleep(0.6)
    queued = schedule_quiet_projects(redis_conn, configured)
    assert len(queued) == 1 and queued[0].startswith("train-42-")
    assert schedule_quiet_projects(redis_conn, configured) == []  # one job per project: it is queued already
    # an annotation after the job's snapshot keeps the project waiting; one before it does not
    snapshot_taken(redis_conn, "42", *_generation_and_time(redis_conn, "42"))
    assert redis_conn.zscore(WAITING, "42") is None
    handler.handle(_event(2, project=42))
    assert waiting_annotations(redis_conn, "42") == 1 and redis_conn.zscore(WAITING, "42") is not None


def _generation_and_time(conn, project: str) -> tuple[int, float]:
    return AnnotationStore(conn, project).snapshot()[0], time.time()
