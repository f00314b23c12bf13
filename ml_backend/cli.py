"""``medebiaser``: serve the backend, run training workers, inspect jobs and versions, roll back."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from ml_backend.config import Settings

log = logging.getLogger("medebiaser")


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ml_backend.feedback.queue import EmbeddedRedis
    from ml_backend.serve.app import create_app

    settings = Settings.from_env()
    if args.port:
        settings = replace(settings, port=args.port)
    embedded: EmbeddedRedis | None = None
    workers: list[subprocess.Popen] = []
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(settings.model_dir / "redis")
            url = embedded.start()
            settings = replace(settings, redis_url=url)
            os.environ["REDIS_URL"] = url
            # With the embedded Redis this process also owns the training workers.
            for _ in range(args.workers):
                workers.append(
                    subprocess.Popen([sys.executable, "-m", "ml_backend.cli", "worker"], env=os.environ.copy())
                )
            log.info("embedded Redis at %s with %d worker(s)", url, len(workers))
        uvicorn.run(create_app(settings), host=args.host, port=settings.port, log_level="info")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if embedded:
            embedded.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from rq import SimpleWorker, Worker

    from ml_backend.feedback.queue import connect, training_queue

    settings = Settings.from_env()
    conn = connect(settings)
    worker_class = SimpleWorker if args.in_process else Worker
    worker = worker_class([training_queue(conn)], connection=conn)
    log.info("rq worker %s listening on %s", worker.name, settings.redis_url)
    worker.work(burst=args.burst, logging_level=os.environ.get("LOG_LEVEL", "INFO"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ml_backend.feedback.queue import connect, key, schedule_training

    settings = Settings.from_env()
    conn = connect(settings)
    if args.reconcile:
        conn.set(key(args.project, "reconcile"), "1")
    job = schedule_training(conn, args.project, reason="cli", reconcile=args.reconcile)
    print(json.dumps({"job_id": job, "note": None if job else "a training job is already queued for this project"}))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from rq.job import Job
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

    from ml_backend.feedback.queue import connect, training_queue

    conn = connect(Settings.from_env())
    queue = training_queue(conn)
    ids = {
        "queued": queue.get_job_ids(),
        "started": StartedJobRegistry(queue=queue).get_job_ids(),
        "finished": FinishedJobRegistry(queue=queue).get_job_ids()[-args.limit :],
        "failed": FailedJobRegistry(queue=queue).get_job_ids()[-args.limit :],
    }
    for state, job_ids in ids.items():
        for job in Job.fetch_many(job_ids, connection=conn):
            if job is None:
                continue
            meta = {
                k: v for k, v in job.meta.items() if k in ("project", "stage", "epoch", "epochs", "loss", "version")
            }
            print(f"{state:9s} {job.id}  {json.dumps(meta)}")
            if state == "failed" and args.verbose:
                print(job.latest_result().exc_string if job.latest_result() else "")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from ml_backend.models.store import VersionStore

    store = VersionStore(Settings.from_env().model_dir)
    for project in [args.project] if args.project else store.projects():
        live = store.live_version(project)
        print(f"project {project}")
        for info in store.list_versions(project):
            metrics = info.meta.get("metrics") or {}
            training = info.meta.get("training") or {}
            print(
                f"  {'*' if info.version == live else ' '} {info.version:5s} parent={info.meta.get('parent')} "
                f"created={info.meta.get('created_at')} kind={info.meta.get('kind')} "
                f"annotations={training.get('annotations_used')} macro_f1={metrics.get('macro_f1')} "
                f"macro_auroc={metrics.get('macro_auroc')}"
            )
    return 0


def cmd_activate(args: argparse.Namespace) -> int:
    from ml_backend.models.store import VersionStore

    store = VersionStore(Settings.from_env().model_dir)
    store.set_live(args.project, args.version)
    print(f"project {args.project}: {args.version} is live (the server picks it up on its next request)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ml_backend.measure.project_report import write_project_report
    from ml_backend.models.store import VersionStore

    store = VersionStore(Settings.from_env().model_dir)
    path = write_project_report(store, args.project, Path(args.out))
    print(path)
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    from ml_backend.connect import ConnectError, connect_project

    settings = Settings.from_env()
    try:
        result = connect_project(
            args.url or settings.label_studio_url,
            args.api_key or settings.label_studio_api_key,
            args.project,
            args.backend_url,
            webhook_secret=args.webhook_secret or settings.webhook_secret,
            basic_auth=(settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None,
        )
    except ConnectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.__dict__ if hasattr(result, "__dict__") else result, default=str, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medebiaser", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ML backend (embedded Redis + a worker when REDIS_URL is unset)")
    serve.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    serve.add_argument("--port", type=int, default=None, help="default: $PORT or 9090")
    serve.add_argument("--workers", type=int, default=int(os.environ.get("EMBEDDED_WORKERS", "1")))
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run an rq training worker (start more to scale out)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--in-process", action="store_true", help="run jobs in the worker process (no fork)")
    worker.set_defaults(func=cmd_worker)

    train = sub.add_parser("train", help="queue a training job for a project")
    train.add_argument("project")
    train.add_argument("--reconcile", action="store_true", help="first re-read the annotations from Label Studio")
    train.set_defaults(func=cmd_train)

    jobs = sub.add_parser("jobs", help="list training jobs with their progress (stage, epoch, loss)")
    jobs.add_argument("--limit", type=int, default=10)
    jobs.add_argument("-v", "--verbose", action="store_true")
    jobs.set_defaults(func=cmd_jobs)

    versions = sub.add_parser("versions", help="list model versions (* = live)")
    versions.add_argument("--project")
    versions.set_defaults(func=cmd_versions)

    activate = sub.add_parser("activate", help="make an existing version live (rollback)")
    activate.add_argument("project")
    activate.add_argument("version")
    activate.set_defaults(func=cmd_activate)

    report = sub.add_parser("report", help="write the bias report of a project's versions to a folder")
    report.add_argument("project")
    report.add_argument("--out", default="report")
    report.set_defaults(func=cmd_report)

    connect = sub.add_parser("connect", help="attach this backend to a Label Studio project")
    connect.add_argument("--url", help="Label Studio URL (default $LABEL_STUDIO_URL)")
    connect.add_argument("--api-key", help="legacy token or personal access token (default $LABEL_STUDIO_API_KEY)")
    connect.add_argument("--project", type=int, required=True)
    connect.add_argument("--backend-url", required=True, help="this backend's URL as Label Studio reaches it")
    connect.add_argument("--webhook-secret", help="default $WEBHOOK_SECRET")
    connect.set_defaults(func=cmd_connect)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
