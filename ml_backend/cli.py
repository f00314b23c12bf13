"""``medebiaser``: serve the backend, run training workers, inspect jobs and versions, roll back.

Each subcommand imports what it needs inside its function: ``medebiaser --help`` and the light commands must not
pay for torch, timm and uvicorn (several seconds on a small machine)."""

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
        level=Settings.from_env().log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ml_backend.feedback.queue import EmbeddedRedis, redacted
    from ml_backend.serve.app import create_app

    settings = Settings.from_env()
    if args.port:
        settings = replace(settings, port=args.port)
    if args.host:
        settings = replace(settings, host=args.host)
    n_workers = settings.embedded_workers if args.workers is None else args.workers
    embedded: EmbeddedRedis | None = None
    workers: list[subprocess.Popen] = []
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(settings.model_dir / "redis")
            url = embedded.start()
            settings = replace(settings, redis_url=url)
            # With the embedded Redis this process also owns the training workers (they get the URL, password
            # included, through their environment, never on a command line).
            worker_env = {**os.environ, "REDIS_URL": url}
            for _ in range(n_workers):
                workers.append(subprocess.Popen([sys.executable, "-m", "ml_backend.cli", "worker"], env=worker_env))
            log.info("embedded Redis at %s with %d worker(s)", redacted(url), len(workers))
        # uvicorn re-raises SIGTERM once it has shut down; with the default handler that would kill this process
        # before the `finally` below stops the workers and the embedded Redis (leaving them running).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
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
    from ml_backend.feedback.queue import connect, make_worker, redacted

    settings = Settings.from_env()
    conn = connect(settings)
    # Import the job code once here rather than in every forked work-horse (7-11 s of torch/timm imports per
    # job). Importing starts no torch thread pool, so forking afterwards stays safe.
    import ml_backend.train.jobs  # noqa: F401
    from ml_backend.feedback.retrain_policy import schedule_quiet_projects

    # Between jobs the worker also starts the jobs of projects whose annotations have gone quiet.
    worker = make_worker(
        conn, settings, in_process=args.in_process, sweeps=[lambda c: schedule_quiet_projects(c, settings)]
    )
    log.info("rq worker %s listening on %s", worker.name, redacted(settings.redis_url or ""))
    # The scheduler runs retries that wait (JOB_RETRY_INTERVALS_S); one worker at a time holds its lock.
    worker.work(burst=args.burst, logging_level=settings.log_level, with_scheduler=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ml_backend.feedback.queue import connect, key, schedule_training

    settings = Settings.from_env()
    conn = connect(settings)
    if args.reconcile:
        conn.set(key(args.project, "reconcile"), "1")
    job = schedule_training(conn, args.project, reason="cli", reconcile=args.reconcile, settings=settings)
    print(json.dumps({"job_id": job, "note": None if job else "a training job is already queued for this project"}))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from rq.job import Job
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

    from ml_backend.feedback.queue import JOB_SERIALIZER, KINDS, connect, job_queue

    settings = Settings.from_env()
    conn = connect(settings)
    ids: dict[str, list[str]] = {"queued": [], "scheduled": [], "started": [], "finished": [], "failed": []}
    for kind in KINDS:
        queue = job_queue(conn, kind, settings)
        ids["queued"] += queue.get_job_ids()
        ids["scheduled"] += ScheduledJobRegistry(queue=queue).get_job_ids()  # retries waiting for their interval
        ids["started"] += StartedJobRegistry(queue=queue).get_job_ids()
        ids["finished"] += FinishedJobRegistry(queue=queue).get_job_ids()[-args.limit :]
        ids["failed"] += FailedJobRegistry(queue=queue).get_job_ids()[-args.limit :]
    for state, job_ids in ids.items():
        for job in Job.fetch_many(job_ids, connection=conn, serializer=JOB_SERIALIZER):
            if job is None:
                continue
            meta = {
                k: v for k, v in job.meta.items() if k in ("project", "stage", "epoch", "epochs", "loss", "version")
            }
            print(f"{state:9s} {job.id}  {json.dumps(meta)}")
            if state == "failed" and args.verbose:
                result = job.latest_result()
                print(result.exc_string if result is not None else "")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from ml_backend.models.store import VersionStore

    store = VersionStore(Settings.from_env().model_dir)
    for project in [args.project] if args.project else store.projects():
        live = store.live_version(project)
        print(f"project {project}")
        for info in store.list_versions(project):
            line = info.meta.summary()
            print(
                f"  {'*' if info.version == live else ' '} {info.version:5s} parent={line['parent']} "
                f"created={line['created_at']} kind={line['kind']} annotations={line['annotations']} "
                f"macro_f1={line['macro_f1']} macro_auroc={line['macro_auroc']}"
            )
            if info.meta.promotion and not line["promoted"] and info.version != live:
                print(f"          candidate, not live: {line['promotion']}")
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
            args.url or settings.label_studio_url or "",
            args.api_key or settings.label_studio_api_key or "",
            args.project,
            args.backend_url,
            webhook_secret=args.webhook_secret or settings.webhook_secret or "",
            basic_auth=(settings.basic_auth_user, settings.basic_auth_pass or "") if settings.basic_auth_user else None,
        )
    except ConnectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.__dict__ if hasattr(result, "__dict__") else result, default=str, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ml_backend.demo.run import DemoOptions, run_demo

    options = DemoOptions(
        images=Path(args.images) if args.images else None,
        synthetic_count=args.count,
        limit=args.limit or None,
        ls_port=args.ls_port,
        backend_port=args.port,
        fresh=args.fresh,
        watch=not args.no_watch,
        bootstrap=not args.no_bootstrap,
    )
    if args.var_dir:
        options.var_dir = Path(args.var_dir)
    return run_demo(options)


def cmd_rank(args: argparse.Namespace) -> int:
    from ml_backend.connect import ConnectError
    from ml_backend.rank.job import RankError, RankOptions, describe, rank_project, schedule_ranking

    settings = Settings.from_env()
    settings = replace(
        settings,
        label_studio_url=args.url or settings.label_studio_url,
        label_studio_api_key=args.api_key or settings.label_studio_api_key,
    )
    conn = None
    if settings.redis_url:
        from ml_backend.feedback.queue import connect

        conn = connect(settings)
    if args.queue:  # let a worker do it (progress: `medebiaser jobs`)
        if conn is None:
            print("error: --queue needs REDIS_URL", file=sys.stderr)
            return 2
        print(json.dumps({"job_id": schedule_ranking(conn, str(args.project), reason="cli")}))
        return 0
    options = RankOptions(
        strategy=args.strategy,
        config_path=args.config,
        batch_size=args.batch_size,
        limit=args.limit,
        force=args.force,
        dry_run=args.dry_run,
    )
    try:
        summary = rank_project(args.project, settings, options, conn=conn)
    except (RankError, ConnectError, ValueError) as exc:  # ValueError: an invalid ranking config
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str, indent=2) if args.json else describe(summary, args.top))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medebiaser", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ML backend (embedded Redis + a worker when REDIS_URL is unset)")
    serve.add_argument("--host", default=None, help="default: $HOST or 127.0.0.1 (0.0.0.0 listens on every interface)")
    serve.add_argument("--port", type=int, default=None, help="default: $PORT or 9090")
    serve.add_argument(
        "--workers", type=int, default=None, help="embedded-Redis workers (default $EMBEDDED_WORKERS or 1)"
    )
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

    rank = sub.add_parser("rank", help="rank a project's unlabelled tasks into Label Studio's review queue")
    rank.add_argument("--project", type=int, required=True)
    rank.add_argument("--url", help="Label Studio URL (default $LABEL_STUDIO_URL)")
    rank.add_argument("--api-key", help="default $LABEL_STUDIO_API_KEY")
    rank.add_argument("--strategy", choices=["bias", "random", "entropy", "bald"], help="default: from the config")
    rank.add_argument("--config", help="ranking config, JSON or YAML (default $RANKING_CONFIG)")
    rank.add_argument("--batch-size", type=int, help="images per model batch (default $PREDICT_BATCH_SIZE)")
    rank.add_argument("--limit", type=int, help="rank at most this many unlabelled tasks")
    rank.add_argument("--force", action="store_true", help="re-rank even if a saved ranking is current")
    rank.add_argument("--dry-run", action="store_true", help="rank and print, write nothing to Label Studio")
    rank.add_argument("--queue", action="store_true", help="enqueue an rq job instead of running here")
    rank.add_argument("--top", type=int, default=10, help="how many ranked tasks to print")
    rank.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    rank.set_defaults(func=cmd_rank)

    demo = sub.add_parser(
        "demo", help="local Label Studio + this backend with demo images, predictions and a review queue"
    )
    demo.add_argument("--images", help="a folder of chest X-ray PNG/JPEG files (default: synthetic images)")
    demo.add_argument("--count", type=int, default=120, help="how many synthetic images (default 120)")
    demo.add_argument("--limit", type=int, default=300, help="import at most this many images (0: all)")
    demo.add_argument("--ls-port", type=int, default=8080, help="Label Studio's port if free (default 8080)")
    demo.add_argument("--port", type=int, default=9090, help="the backend's port if free (default 9090)")
    demo.add_argument("--var-dir", help="where Label Studio's data, models and images go (default var/demo)")
    demo.add_argument("--fresh", action="store_true", help="forget the previous demo's Label Studio and models")
    demo.add_argument("--no-watch", action="store_true", help="exit after setting up (leaves nothing running)")
    demo.add_argument(
        "--no-bootstrap", action="store_true", help="start untrained instead of from a model trained on synthetic data"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
