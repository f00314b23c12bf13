"""Reliability of the feedback loop: a webhook burst under /predict load, SIGKILL of the whole backend mid-burst,
and a restart of the embedded Redis. Everything is real: `medebiaser serve` (uvicorn, embedded Redis with its
password, a forking rq worker), real NIH images behind a Label Studio-like file server, HTTP from threads.

    .venv/bin/python bench/bench_reliability.py            # writes bench/results/reliability.{md,json}

tests/test_reliability.py runs the same scenarios with smaller numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import CHEST_CONFIG, NIH, PYTHON, TOKEN, free_port, label_studio_files, md_table, write_results  # noqa: E402

FINDINGS = ("Cardiomegaly", "Effusion", "Atelectasis", "Infiltration")


# --------------------------------------------------------------------------------------------- pieces
def copy_images(dest: Path, n: int) -> list[str]:
    """n real NIH images (with at least one label) into a scratch folder served as /data/upload/<name>."""
    manifest = json.loads((NIH / "manifest.json").read_text())
    names = []
    for record in [r for r in manifest if r["labels"]][:n]:
        name = os.path.basename(record["image"])
        shutil.copy(NIH / record["image"], dest / name)
        names.append(name)
    return names


def annotation_body(project: int, i: int, image: str, action: str = "ANNOTATION_CREATED") -> dict[str, Any]:
    """A Label Studio ANNOTATION_CREATED webhook body (choices only), annotation i on task 10_000 + i."""
    return {
        "action": action,
        "annotation": {
            "id": 1_000_000 * project + i,
            "result": [
                {
                    "id": "c",
                    "from_name": "findings",
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": [FINDINGS[i % len(FINDINGS)]]},
                }
            ],
            "was_cancelled": False,
            "ground_truth": False,
            "updated_at": "2026-12-01T10:00:00Z",
            "task": 10_000 + i,
            "lead_time": 2.0,
        },
        "task": {"id": 10_000 + i, "data": {"image": f"/data/upload/{image}"}},
        "project": {"id": project, "label_config": CHEST_CONFIG, "model_version": "v0"},
    }


def predict_body(project: int, image: str) -> dict[str, Any]:
    return {
        "tasks": [{"id": 1, "data": {"image": f"/data/upload/{image}"}}],
        "project": f"{project}.1795625307",
        "label_config": CHEST_CONFIG,
        "params": {"login": None, "password": None, "context": None},
    }


def descendants(pid: int) -> list[int]:
    """Every process below pid (/proc walk; rq's work-horse sits in a process group of its own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def sigkill_tree(process: subprocess.Popen) -> int:
    """SIGKILL a process and everything below it at once; returns how many processes died."""
    pids = [*descendants(process.pid), process.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    return len(pids)


def embedded_redis_conn(model_dir: Path):
    """A connection to the embedded Redis `serve` started under model_dir (port from its config file)."""
    import redis

    data = model_dir / "redis"
    port = next(line.split()[1] for line in (data / "redis.conf").read_text().splitlines() if line.startswith("port "))
    return redis.Redis(host="127.0.0.1", port=int(port), password=(data / "password").read_text().strip())


@dataclass
class Backend:
    """`medebiaser serve` in a session of its own: embedded Redis + `workers` rq workers unless REDIS_URL is set."""

    model_dir: Path
    files_url: str
    log_path: Path
    redis_url: str | None = None
    workers: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "HOST")}
        env.update(
            MODEL_DIR=str(self.model_dir),
            LABEL_STUDIO_URL=self.files_url,
            LABEL_STUDIO_API_KEY=TOKEN,
            INPUT_SIZE="128",
            BACKBONE="resnet18",
            TRAIN_EPOCHS="1",
            TRAINING_LOCK_TTL_S="5",
            JOB_RETRY_INTERVALS_S="1",
            WORKER_MAINTENANCE_S="5",
            WORKER_HEARTBEAT_S="2",
            PYTHONPATH=str(ROOT),
            **self.extra_env,
        )
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return env

    def start(self, timeout_s: float = 180.0) -> Backend:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        command = [PYTHON, "-m", "ml_backend.cli", "serve", "--port", str(self.port), "--workers", str(self.workers)]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}; log: {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"serve did not answer /health in {timeout_s} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                sigkill_tree(self.process)

    def kill(self) -> int:
        assert self.process is not None
        return sigkill_tree(self.process)

    def conn(self):
        import redis

        return redis.Redis.from_url(self.redis_url) if self.redis_url else embedded_redis_conn(self.model_dir)


@dataclass
class BurstResult:
    sent: int = 0
    acked: list[int] = field(default_factory=list)  # annotation ids answered 2xx
    errors: dict[str, int] = field(default_factory=dict)
    ack_ms: list[float] = field(default_factory=list)
    predictions: int = 0
    predict_errors: dict[str, int] = field(default_factory=dict)
    job_ids: set[str] = field(default_factory=set)
    seconds: float = 0.0

    def p(self, q: float) -> float:
        ordered = sorted(self.ack_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def burst(
    url: str,
    bodies: list[dict[str, Any]],
    *,
    threads: int = 8,
    predict_clients: int = 2,
    predict_json: dict[str, Any] | None = None,
    stop: threading.Event | None = None,
    on_ack: Any = None,
) -> BurstResult:
    """POST the bodies to /webhook from `threads` threads while `predict_clients` threads call /predict."""
    result = BurstResult()
    lock = threading.Lock()
    cursor = iter(range(len(bodies)))
    done = threading.Event()
    stop = stop or threading.Event()

    def count(table: dict[str, int], reason: str) -> None:
        with lock:
            table[reason] = table.get(reason, 0) + 1

    def sender() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                body = bodies[i]
                started = time.perf_counter()
                try:
                    answer = client.post(url + "/webhook", json=body)
                except httpx.HTTPError as exc:
                    count(result.errors, type(exc).__name__)
                    continue
                finally:
                    with lock:
                        result.sent += 1
                if answer.status_code < 300:
                    with lock:
                        result.acked.append(body["annotation"]["id"])
                        result.ack_ms.append((time.perf_counter() - started) * 1000)
                        if answer.json().get("job_id"):
                            result.job_ids.add(answer.json()["job_id"])
                    if on_ack:
                        on_ack(len(result.acked))
                else:
                    count(result.errors, f"HTTP {answer.status_code}")

    def predictor() -> None:
        with httpx.Client(timeout=120) as client:
            while not done.is_set() and not stop.is_set():
                try:
                    answer = client.post(url + "/predict", json=predict_json)
                except httpx.HTTPError as exc:
                    count(result.predict_errors, type(exc).__name__)
                    continue
                if answer.status_code == 200:
                    with lock:
                        result.predictions += 1
                else:
                    count(result.predict_errors, f"HTTP {answer.status_code}")

    started = time.perf_counter()
    senders = [threading.Thread(target=sender, daemon=True) for _ in range(threads)]
    predictors = [
        threading.Thread(target=predictor, daemon=True) for _ in range(predict_clients if predict_json else 0)
    ]
    for thread in [*predictors, *senders]:
        thread.start()
    for thread in senders:
        thread.join()
    result.seconds = time.perf_counter() - started
    done.set()
    for thread in predictors:
        thread.join(timeout=120)
    return result


def stored_ids(conn, project: int) -> set[int]:
    from ml_backend.feedback.store import AnnotationStore

    return {r.annotation_id for r in AnnotationStore(conn, str(project)).snapshot()[1]}


def project_jobs(conn, project: int) -> dict[str, int]:
    """The project's training jobs by state, over every kind's queue and registry."""
    from rq.registry import ScheduledJobRegistry, StartedJobRegistry

    from ml_backend.feedback.queue import TRAINING, fetch_job, job_queue

    queue = job_queue(conn, TRAINING)
    prefix = f"train-{project}-"
    return {
        "queued": sum(1 for j in queue.get_job_ids() if j.startswith(prefix)),
        "scheduled": sum(1 for j in ScheduledJobRegistry(queue=queue).get_job_ids() if j.startswith(prefix)),
        "started": sum(
            1
            for j in StartedJobRegistry(queue=queue).get_job_ids(cleanup=False)
            if j.startswith(prefix) and fetch_job(conn, j).get_status() == "started"
        ),
    }


def wait_trained(model_dir: Path, project: int, task_ids: set[int], timeout_s: float) -> tuple[str | None, float]:
    """Wait for a live version whose training set holds every given task; (version, seconds waited)."""
    from ml_backend.models.store import VersionStore

    store = VersionStore(model_dir)
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        live = store.live_version(str(project))
        if live and live != "v0":
            trained = set((store.info(str(project), live).meta.training or {}).get("task_ids", []))
            if task_ids <= trained:
                return live, time.monotonic() - started
        time.sleep(0.5)
    return None, time.monotonic() - started


# --------------------------------------------------------------------------------------------- scenarios
@contextlib.contextmanager
def workspace() -> Iterator[tuple[Path, str, list[str]]]:
    root = Path(tempfile.mkdtemp(prefix="medebiaser-reliability-"))
    files = root / "files"
    files.mkdir()
    images = copy_images(files, 24)
    try:
        with label_studio_files(files) as (files_url, _):
            yield root, files_url, images
    finally:
        shutil.rmtree(root, ignore_errors=True)


def scenario_burst(n: int, threads: int = 8, predict_clients: int = 2, projects: int = 2) -> dict[str, Any]:
    """n webhooks over `projects` projects from `threads` threads with `predict_clients` /predict clients, into a
    backend with its embedded Redis and no worker (so the queue shows what coalescing left)."""
    with workspace() as (root, files_url, images):
        backend = Backend(root / "models", files_url, root / "serve.log", workers=0).start()
        try:
            bodies = [annotation_body(1 + i % projects, i, images[i % len(images)]) for i in range(n)]
            result = burst(
                backend.url,
                bodies,
                threads=threads,
                predict_clients=predict_clients,
                predict_json=predict_body(1, images[0]),
            )
            conn = backend.conn()
            stored = set().union(*(stored_ids(conn, p) for p in range(1, projects + 1)))
            jobs = {p: project_jobs(conn, p) for p in range(1, projects + 1)}
            password = (root / "models" / "redis" / "password").read_text().strip()
            assert backend.process is not None
            children = descendants(backend.process.pid)
        finally:
            backend.stop()
        time.sleep(0.5)
        left_running = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        log_text = (root / "serve.log").read_text(errors="replace")
    return {
        "n": n,
        "threads": threads,
        "predict_clients": predict_clients,
        "acked": len(result.acked),
        "stored": len(stored),
        "lost": len(set(result.acked) - stored),
        "errors": result.errors,
        "ack_ms_p50": round(result.p(0.5), 1),
        "ack_ms_p99": round(result.p(0.99), 1),
        "seconds": round(result.seconds, 2),
        "webhooks_per_s": round(len(result.acked) / result.seconds, 1),
        "predictions": result.predictions,
        "predict_errors": result.predict_errors,
        "jobs_per_project": jobs,
        "password_in_log": password in log_text,
        "children_left_after_sigterm": len(left_running),  # the embedded Redis must stop with serve
    }


def scenario_kill(n: int, kill_after: int, threads: int = 8, train_timeout_s: float = 300.0) -> dict[str, Any]:
    """SIGKILL of serve, embedded Redis, worker and work-horse at once after `kill_after` acknowledgements; a new
    serve on the same MODEL_DIR; every acknowledged annotation must be stored and trained without a new webhook."""
    with workspace() as (root, files_url, images):
        model_dir = root / "models"
        backend = Backend(model_dir, files_url, root / "serve.log").start()
        stop = threading.Event()
        bodies = [annotation_body(1, i, images[i % len(images)]) for i in range(n)]
        killed: dict[str, Any] = {}

        def on_ack(count: int) -> None:
            if count >= kill_after and not stop.is_set():
                stop.set()
                killed["processes"] = backend.kill()
                killed["at_acked"] = count

        result = burst(backend.url, bodies, threads=threads, predict_clients=0, stop=stop, on_ack=on_ack)
        if not stop.is_set():  # the burst ended before the kill point
            killed["processes"] = backend.kill()
        acked = set(result.acked)
        restarted = Backend(model_dir, files_url, root / "serve.log", port=free_port())
        t0 = time.monotonic()
        restarted.start()
        restart_s = time.monotonic() - t0
        try:
            conn = restarted.conn()
            stored = stored_ids(conn, 1)
            tasks = {10_000 + (a - 1_000_000) for a in acked}
            version, waited = wait_trained(model_dir, 1, tasks, train_timeout_s)
            jobs = project_jobs(conn, 1)
        finally:
            restarted.stop()
    return {
        "n": n,
        "acked_before_kill": len(acked),
        "killed_processes": killed.get("processes"),
        "stored_after_restart": len(acked & stored),
        "lost": len(acked - stored),
        "restart_s": round(restart_s, 1),
        "trained_version": version,
        "trained_all_acked_after_s": round(waited, 1) if version else None,
        "jobs_left": jobs,
    }


def scenario_redis_restart(n: int) -> dict[str, Any]:
    """A backend on an embedded Redis that is stopped and started again on the same data dir and port between two
    batches of webhooks; the queued job and every annotation survive and a worker then trains on all of them."""
    from ml_backend.feedback.queue import EmbeddedRedis

    with workspace() as (root, files_url, images):
        data_dir = root / "redis"
        server = EmbeddedRedis(data_dir)
        url = server.start()
        backend = Backend(root / "models", files_url, root / "serve.log", redis_url=url, workers=0).start()
        try:
            first = burst(backend.url, [annotation_body(1, i, images[i % 24]) for i in range(n)], predict_clients=0)
            conn = backend.conn()
            marker = conn.get("mdb:1:queued")
            server.stop()
            down = httpx.post(backend.url + "/webhook", json=annotation_body(1, n, images[0]), timeout=30)
            t0 = time.monotonic()
            EmbeddedRedis(data_dir, port=server.port).start()
            restart_s = time.monotonic() - t0
            second = burst(
                backend.url, [annotation_body(1, i, images[i % 24]) for i in range(n + 1, 2 * n)], predict_clients=0
            )
            stored = stored_ids(conn, 1)
            acked = set(first.acked) | set(second.acked)
            marker_after = conn.get("mdb:1:queued")
            jobs = project_jobs(conn, 1)
            worker = subprocess.run(
                [PYTHON, "-m", "ml_backend.cli", "worker", "--burst"],
                cwd=ROOT,
                env=backend.env(),
                capture_output=True,
                timeout=600,
            )
            tasks = {10_000 + (a - 1_000_000) for a in acked}
            version, _ = wait_trained(root / "models", 1, tasks, 5)
        finally:
            backend.stop()
            with contextlib.suppress(Exception):
                import redis

                redis.Redis.from_url(url).shutdown(nosave=False)
    return {
        "n": 2 * n - 1,
        "acked": len(acked),
        "lost": len(acked - stored),
        "webhook_while_down": down.status_code,
        "redis_restart_s": round(restart_s, 2),
        "queued_marker_kept": marker is not None and marker == marker_after,
        "jobs_after_restart": jobs,
        "worker_rc": worker.returncode,
        "trained_version": version,
    }


def _wait_job(conn, job_id: str, done: Any, timeout_s: float = 300.0) -> None:
    from ml_backend.feedback.queue import fetch_job

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done(fetch_job(conn, job_id)):
            return
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} did not get there in {timeout_s} s")


def _work_horse(worker_pid: int) -> int:
    """rq forks the work-horse into a process group of its own (the scheduler child stays in the worker's)."""
    for _ in range(200):
        horses = [p for p in descendants(worker_pid) if os.getpgid(p) == p]
        if horses:
            return horses[0]
        time.sleep(0.05)
    raise RuntimeError("no work-horse")


def scenario_worker_death() -> dict[str, Any]:
    """A training job whose work-horse is SIGKILLed (the worker retries it), then a job whose worker, work-horse
    and scheduler are SIGKILLed together (the next worker requeues it); seconds until each finishes trained."""
    from fastapi.testclient import TestClient

    from ml_backend.config import Settings
    from ml_backend.feedback.queue import EmbeddedRedis
    from ml_backend.serve.app import create_app

    with workspace() as (root, files_url, images):
        server = EmbeddedRedis(root / "redis")
        url = server.start()
        backend = Backend(root / "models", files_url, root / "worker.log", redis_url=url)
        env = {**backend.env(), "TRAIN_EPOCHS": "1"}
        settings = Settings(redis_url=url, model_dir=root / "models", label_studio_url=files_url)
        settings = __import__("dataclasses").replace(settings, label_studio_api_key=TOKEN, input_size=128)
        conn = backend.conn()
        out: dict[str, Any] = {}

        def worker() -> subprocess.Popen:
            return subprocess.Popen(
                [PYTHON, "-m", "ml_backend.cli", "worker"], cwd=ROOT, env=env, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip

        def training(job: Any) -> bool:
            return job.get_meta(refresh=True).get("stage") == "training"

        def finished(job: Any) -> bool:
            return job.get_status() == "finished"

        try:
            with TestClient(create_app(settings)) as client:
                for i in range(12):
                    client.post("/webhook", json=annotation_body(5, i, images[i]))
                first = conn.get("mdb:5:queued").decode()
                proc = worker()
                _wait_job(conn, first, training)
                os.kill(_work_horse(proc.pid), signal.SIGKILL)
                t0 = time.monotonic()
                _wait_job(conn, first, finished)
                out["horse_killed_retried_and_trained_s"] = round(time.monotonic() - t0, 1)
                out["horse_killed_result"] = rel_status(conn, first)
                for i in range(12, 24):
                    client.post("/webhook", json=annotation_body(5, i, images[i]))
                second = conn.get("mdb:5:queued").decode()
                _wait_job(conn, second, training)
                out["killed_processes"] = sigkill_tree(proc)
                time.sleep(1)
                out["orphan_status_after_kill"] = rel_status(conn, second)["status"]
                proc = worker()
                t0 = time.monotonic()
                _wait_job(conn, second, finished)
                out["orphan_requeued_and_trained_s"] = round(time.monotonic() - t0, 1)
                out["orphan_result"] = rel_status(conn, second)
                sigkill_tree(proc)
        finally:
            server.stop()
    return out


def rel_status(conn, job_id: str) -> dict[str, Any]:
    from ml_backend.feedback.queue import fetch_job

    job = fetch_job(conn, job_id)
    value = job.return_value() or {}
    status = job.get_status()
    return {"status": getattr(status, "value", status), "result": value.get("status"), "version": value.get("version"),
            "retries_left": job.retries_left}  # fmt: skip


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=1000, help="webhooks in the burst")
    parser.add_argument("--kill-burst", type=int, default=300, help="webhooks in the kill scenario")
    parser.add_argument("--predict-clients", type=int, default=4)
    args = parser.parse_args()
    data: dict[str, Any] = {}
    data["burst"] = scenario_burst(args.burst, predict_clients=args.predict_clients)
    data["kill"] = scenario_kill(args.kill_burst, kill_after=args.kill_burst // 2)
    data["redis_restart"] = scenario_redis_restart(50)
    data["worker_death"] = scenario_worker_death()
    b, k, r, w = data["burst"], data["kill"], data["redis_restart"], data["worker_death"]
    sections = [
        "## Burst: webhooks from 8 threads while clients call /predict (embedded Redis, no worker)",
        "",
        md_table(
            ["webhooks", "/predict clients", "acked", "stored", "lost", "ack p50 ms", "ack p99 ms", "webhooks/s",
             "predictions", "queued jobs per project"],
            [[b["n"], b["predict_clients"], b["acked"], b["stored"], b["lost"], b["ack_ms_p50"], b["ack_ms_p99"],
              b["webhooks_per_s"], b["predictions"],
              ", ".join(f"p{p}: {j['queued']}" for p, j in b["jobs_per_project"].items())]],
        ),
        "",
        f"Errors: {b['errors'] or 'none'}; /predict errors: {b['predict_errors'] or 'none'}; "
        f"Redis password in the serve log: {b['password_in_log']}.",
        "",
        "Ack times are client round trips (thread start to response) on the same 2 cores as the server, the",
        "/predict clients and the burst senders; the queue holds one job per project at the end of the burst.",
        "",
        "## SIGKILL of the whole `serve` process tree (uvicorn, embedded Redis, worker) mid-burst, then a new serve",
        "",
        md_table(
            ["webhooks", "acked before kill", "processes killed", "stored after restart", "lost", "restart s",
             "trained version", "all acked trained after s"],
            [[k["n"], k["acked_before_kill"], k["killed_processes"], k["stored_after_restart"], k["lost"],
              k["restart_s"], k["trained_version"], k["trained_all_acked_after_s"]]],
        ),
        "",
        "## Embedded Redis stopped and started on the same data dir (append-only file) between two batches",
        "",
        md_table(
            ["webhooks", "acked", "lost", "webhook while Redis is down", "Redis restart s", "queued job kept",
             "trained version (worker after restart)"],
            [[r["n"], r["acked"], r["lost"], f"HTTP {r['webhook_while_down']}", r["redis_restart_s"],
              r["queued_marker_kept"], r["trained_version"]]],
        ),
        "",
        "## Worker death during training (JOB_RETRY_INTERVALS_S=1, 12 annotations per job, 1 epoch)",
        "",
        md_table(
            ["what was SIGKILLed", "job afterwards", "seconds until it finished trained", "retries left"],
            [["the work-horse (the worker lives)", w["horse_killed_result"]["result"],
              w["horse_killed_retried_and_trained_s"], w["horse_killed_result"]["retries_left"]],
             [f"worker + work-horse + scheduler ({w['killed_processes']} processes); the job stays "
              f"'{w['orphan_status_after_kill']}'; a new worker starts", w["orphan_result"]["result"],
              w["orphan_requeued_and_trained_s"], w["orphan_result"]["retries_left"]]],
        ),
        "",
        "Seconds count from the kill (work-horse) or from the new worker's start (orphan), torch import included.",
    ]  # fmt: skip
    md, _ = write_results("reliability", "Reliability: bursts, SIGKILL, Redis restart", sections, data)
    print(md.read_text())


if __name__ == "__main__":
    main()
