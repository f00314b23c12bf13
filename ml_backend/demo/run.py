"""``medebiaser demo``: a local Label Studio wired to this backend, with images and ranked predictions.

What it does, in order (everything under ``var/demo/``, git-ignored):

1. images: synthetic chest X-rays (``synthetic.py``), or a folder the user names (``--images``; a
   ``manifest.json`` beside or above it, as in the NIH subset, adds known findings, sex and age as columns);
2. with synthetic images, trains a starting model on *other* synthetic images whose side marker goes with
   Effusion (``bootstrap.py``; once, cached), while Label Studio starts;
3. starts Label Studio (``.ls-venv``) with local-file serving, and SSRF protection off for the local backend;
4. starts ``medebiaser serve`` (backend + embedded Redis + a training worker) with a generated webhook secret;
5. creates the project from ``label_config/chest_xray_bitmask.xml`` (``BitmaskLabels``: heatmaps as PNG, ~15x
   lighter than the brush RLE of ``chest_xray.xml`` at clinical resolution; or reuses it), a local-files storage,
   the tasks;
6. connects the backend (``connect_project``: ML backend, webhook with ``X-Webhook-Secret``, review tab);
7. predicts the unlabelled tasks: ``medebiaser rank`` where ml_backend.rank exists (ranked predictions with
   heatmaps, project pointed at the version, "Review queue" tab), else Label Studio's "Retrieve predictions"
   and the project pointed at the backend's version so the tab orders by prediction score;
8. prints the URL and the login, then follows new model versions (a physician's Submit -> webhook -> training
   -> the worker's ranking job) and reports them; Ctrl-C stops everything it started.

A second run reuses Label Studio's data, the login and the project (``--fresh`` starts over).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ml_backend.config import Settings
from ml_backend.connect import ConnectError, connect_project
from ml_backend.demo import synthetic
from ml_backend.demo.bootstrap import cached_bootstrap, install_bootstrap
from ml_backend.demo.services import PROJECT_ROOT, BackendProcess, LabelStudioProcess, ServiceError, pick_port
from ml_backend.demo.setup import DemoError, LabelStudioAPI, image_tasks
from ml_backend.io.label_config import parse_label_config
from ml_backend.io.label_studio import make_client, set_project_model_version, set_review_view
from ml_backend.models.store import VersionStore

log = logging.getLogger("medebiaser.demo")

DEFAULT_LABEL_CONFIG = PROJECT_ROOT / "label_config" / "chest_xray_bitmask.xml"
# Backend settings that keep the demo quick on a laptop CPU (128 px input, an 8x8 heatmap grid); the user's
# environment overrides them.
DEMO_BACKEND_DEFAULTS = {
    "TRAIN_EPOCHS": "3",
    "INPUT_SIZE": "128",
    "OUTPUT_STRIDE": "16",
    "LOG_LEVEL": "INFO",
    # A demo session is short: train after 5 corrections or a minute without one (production: 10 / 600 s).
    "RETRAIN_MIN_ANNOTATIONS": "5",
    "RETRAIN_QUIET_S": "60",
}


@dataclass
class DemoOptions:
    var_dir: Path = PROJECT_ROOT / "var" / "demo"
    images: Path | None = None  # a folder of PNG/JPEG chest X-rays; None: synthetic images
    synthetic_count: int = 120
    synthetic_size: int = 256
    limit: int | None = 300
    ls_port: int = 8080
    backend_port: int = 9090
    label_config: Path = DEFAULT_LABEL_CONFIG
    fresh: bool = False
    watch: bool = True
    poll_s: float = 5.0
    bootstrap: bool = True  # synthetic images only: start from a model trained on other synthetic images
    backend_env: dict[str, str] = field(default_factory=dict)


@dataclass
class DemoState:
    """The login and secrets, kept in var/demo/state.json so a second run reuses Label Studio's data."""

    username: str
    password: str
    token: str
    webhook_secret: str
    projects: dict[str, int] = field(default_factory=dict)  # image folder -> project id

    @classmethod
    def load_or_create(cls, path: Path) -> DemoState:
        if path.is_file():
            return cls(**json.loads(path.read_text()))
        return cls(
            username="admin@medebiaser.local",
            password=secrets.token_urlsafe(9),
            token=secrets.token_hex(20),  # a Label Studio legacy token is 40 hex characters
            webhook_secret=secrets.token_urlsafe(24),
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__, indent=2))
        path.chmod(0o600)


def backend_live_version(backend_url: str, project_id: int) -> str | None:
    answer = httpx.get(f"{backend_url}/versions", params={"project": str(project_id)}, timeout=10).json()
    return (answer.get("projects") or {}).get(str(project_id), {}).get("live")


def ranking_available() -> bool:
    """Whether this checkout has ``medebiaser rank`` (ml_backend.rank), which writes ranked predictions itself."""
    return importlib.util.find_spec("ml_backend.rank.job") is not None


def retrieve_and_point(api: LabelStudioAPI, project_id: int, backend_url: str) -> dict[str, Any]:
    """Without the ranking job: Label Studio's "Retrieve predictions" for every unlabelled task, then the project
    pointed at the backend's live version, so the review tab orders by that version's scores."""
    tasks = api.tasks(project_id)
    todo = [t["id"] for t in tasks if not t.get("is_labeled")]
    started = time.monotonic()
    api.retrieve_predictions(project_id, todo)
    version = backend_live_version(backend_url, project_id)
    client = make_client(api.url, api.token)
    if version:
        set_project_model_version(client, project_id, version)
    view_id, _ = set_review_view(client, project_id)
    return {
        "how": "retrieve_tasks_predictions",
        "predicted": len(todo),
        "seconds": round(time.monotonic() - started, 1),
        "model_version": version,
        "view_id": view_id,
    }


def rank_with_command(api: LabelStudioAPI, project_id: int, env: dict[str, str]) -> dict[str, Any]:
    """``medebiaser rank --project ID``: predicts the unlabelled tasks, stores ranked predictions (heatmaps
    included), points the project at the version and sets up the review tab."""
    started = time.monotonic()
    command = [sys.executable, "-m", "ml_backend.cli", "rank", "--project", str(project_id), "--json"]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"medebiaser rank failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    try:
        summary = json.loads(done.stdout)
    except ValueError:
        summary = {}
    view_id, _ = set_review_view(make_client(api.url, api.token), project_id)
    return {
        "how": "medebiaser rank",
        "predicted": summary.get("ranked"),
        "seconds": round(time.monotonic() - started, 1),
        "model_version": api.project(project_id).get("model_version"),
        "view_id": view_id,
    }


class Demo:
    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.var = Path(options.var_dir).resolve()
        self.ls: LabelStudioProcess | None = None
        self.backend: BackendProcess | None = None
        self._stopping = False
        self._bootstrap: dict[str, Any] = {}
        self._state: DemoState | None = None

    # -- steps ---------------------------------------------------------------------------------------------
    def prepare_images(self) -> tuple[Path, Path]:
        """(image folder, local-files document root)."""
        if self.options.images:
            folder = Path(self.options.images).expanduser().resolve()
            if not folder.is_dir():
                raise SystemExit(f"DEMO_IMAGES={self.options.images} is not a folder")
            # Label Studio refuses a storage path equal to LOCAL_FILES_DOCUMENT_ROOT: serve from the parent.
            return folder, folder.parent
        root = self.var / "synthetic"
        records = synthetic.generate(root, n=self.options.synthetic_count, size=self.options.synthetic_size)
        print(f"synthetic images in {root}: {json.dumps(synthetic.summary(records))}")
        return root / "images", root

    def backend_env(self) -> dict[str, str]:
        env = {**DEMO_BACKEND_DEFAULTS, **{k: v for k, v in os.environ.items() if k in DEMO_BACKEND_DEFAULTS}}
        env.update(self.options.backend_env)
        env["MODEL_DIR"] = str(self.var / "models")
        return env

    def backend_settings(self) -> Settings:
        """The settings the backend this demo starts will read (its environment: ours plus the demo's)."""
        return Settings.from_env({**os.environ, **self.backend_env()})

    def start_bootstrap(self, state: DemoState, image_dir: Path) -> None:
        """Train (or load) the starting model in a thread while Label Studio starts."""
        self._bootstrap = {}
        if not self.options.bootstrap or self.options.images:
            return
        project_id = state.projects.get(str(image_dir))
        settings = self.backend_settings()
        if project_id is not None and VersionStore(settings.model_dir).live_version(str(project_id)):
            return  # that project already has its models
        labels = parse_label_config(Path(self.options.label_config).read_text()).findings
        print("training the starting model on synthetic images (once; cached in var/demo; --no-bootstrap skips)")

        def work() -> None:
            try:
                self._bootstrap["result"] = cached_bootstrap(settings, labels, self.var / "bootstrap")
            except Exception as exc:  # the demo still works with an untrained model
                log.exception("bootstrap failed")
                self._bootstrap["error"] = exc

        self._bootstrap.update(settings=settings, labels=labels)
        self._bootstrap["thread"] = threading.Thread(target=work, name="bootstrap", daemon=True)
        self._bootstrap["thread"].start()

    def finish_bootstrap(self, project_id: int) -> None:
        if "thread" not in self._bootstrap:
            return
        self._bootstrap["thread"].join()
        if "result" not in self._bootstrap:
            print(f"  starting model failed ({self._bootstrap.get('error')}): the project starts untrained")
            return
        settings, labels = self._bootstrap["settings"], self._bootstrap["labels"]
        weights, summary = self._bootstrap["result"]
        if install_bootstrap(VersionStore(settings.model_dir), str(project_id), settings, labels, weights, summary):
            print(f"  starting model v0: {json.dumps(summary)}")

    def start_services(self, state: DemoState, document_root: Path) -> None:
        ls_port = pick_port(self.options.ls_port)
        backend_port = pick_port(self.options.backend_port)
        self.ls = LabelStudioProcess(
            self.var / "label-studio",
            port=ls_port,
            username=state.username,
            password=state.password,
            token=state.token,
            document_root=document_root,
            ls_bin=self.backend_settings().label_studio_bin,
        )
        first = not (self.var / "label-studio" / "ls.sqlite3").exists()
        print(f"starting Label Studio on port {ls_port}" + (" (first start: migrations, ~1 min)" if first else ""))
        t0 = time.monotonic()
        self.ls.start()
        print(f"  up after {time.monotonic() - t0:.0f} s (log {self.ls.log_path})")
        env = {
            **self.backend_env(),
            "LABEL_STUDIO_URL": self.ls.url,
            "LABEL_STUDIO_API_KEY": state.token,
            "WEBHOOK_SECRET": state.webhook_secret,
        }
        self.backend = BackendProcess(self.var / "backend.log", port=backend_port, env=env)
        print(f"starting the ML backend (+ Redis + worker) on port {backend_port}")
        t0 = time.monotonic()
        self.backend.start()
        print(f"  up after {time.monotonic() - t0:.0f} s (log {self.backend.log_path})")

    def setup_project(self, api: LabelStudioAPI, state: DemoState, image_dir: Path, document_root: Path) -> int:
        config = Path(self.options.label_config).read_text()
        title = "MEDebiaser demo" if not self.options.images else f"MEDebiaser demo: {image_dir.name}"
        project_id = state.projects.get(str(image_dir))
        project = None
        if project_id is not None:
            try:
                project = api.project(project_id)
            except Exception:  # deleted in the UI: make a new one
                project = None
        if project is None:
            project = api.find_project(title) or api.create_project(
                title, config, "Chest X-ray findings with Grad-CAM evidence; corrections retrain the model."
            )
        project_id = int(project["id"])
        state.projects[str(image_dir)] = project_id
        api.ensure_local_storage(project_id, image_dir)
        if not project.get("task_number") and not api.tasks(project_id, page_size=1):
            tasks = image_tasks(image_dir, document_root, limit=self.options.limit)
            if not tasks:
                raise SystemExit(f"no PNG/JPEG images in {image_dir}")
            print(f"importing {api.import_tasks(project_id, tasks)} tasks into project {project_id}")
        return project_id

    def connect(self, state: DemoState, project_id: int) -> Any:
        assert self.ls and self.backend
        result = connect_project(
            self.ls.url, state.token, project_id, self.backend.url, webhook_secret=state.webhook_secret
        )
        return result  # connect_project logs each change it made

    # -- the whole run -------------------------------------------------------------------------------------
    def run(self) -> int:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if self.options.fresh:
            for name in ("label-studio", "models", "state.json", "backend.log"):
                target = self.var / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        state_path = self.var / "state.json"
        if not state_path.exists() and (self.var / "label-studio").exists():
            # Label Studio's data without the login that created it: start that part over.
            shutil.rmtree(self.var / "label-studio")
            shutil.rmtree(self.var / "models", ignore_errors=True)
        state = DemoState.load_or_create(state_path)
        state.save(state_path)
        self._state = state

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        # Explicit for SIGINT too: a shell that starts the demo in the background leaves SIGINT ignored.
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            image_dir, document_root = self.prepare_images()
            self.start_bootstrap(state, image_dir)
            self.start_services(state, document_root)
            assert self.ls and self.backend
            with LabelStudioAPI(self.ls.url, state.token) as api:
                project_id = self.setup_project(api, state, image_dir, document_root)
                state.save(state_path)
                self.finish_bootstrap(project_id)  # before connecting: /setup would create an untrained v0
                print("connecting the backend (ML backend, webhook with secret, review tab)")
                connection = self.connect(state, project_id)
                summary = self.predict(api, project_id)
                print(f"  {summary['predicted']} tasks in {summary['seconds']} s, model {summary['model_version']}")
                self.print_banner(state, project_id, summary["view_id"] or connection.view_id)
                if self.options.watch:
                    self.watch(api, project_id, summary["model_version"])
                else:
                    print("--no-watch: stopping now; the next `medebiaser demo` reuses this project")
            return 0
        except KeyboardInterrupt:
            print("\nstopping")
            return 0
        except (ServiceError, DemoError, ConnectError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def ls_env(self, state: DemoState) -> dict[str, str]:
        assert self.ls is not None
        return {**self.backend_env(), "LABEL_STUDIO_URL": self.ls.url, "LABEL_STUDIO_API_KEY": state.token}

    def predict(self, api: LabelStudioAPI, project_id: int) -> dict[str, Any]:
        assert self.backend is not None and self._state is not None
        if ranking_available():
            print("ranking the unlabelled tasks (medebiaser rank: predictions with heatmaps, review queue)")
            try:
                return rank_with_command(api, project_id, self.ls_env(self._state))
            except RuntimeError as exc:
                print(f"  {exc}\n  falling back to Label Studio's 'Retrieve predictions'")
        else:
            print("retrieving predictions (heatmaps) for the unlabelled tasks")
        return retrieve_and_point(api, project_id, self.backend.url)

    def print_banner(self, state: DemoState, project_id: int, view_id: int) -> None:
        assert self.ls and self.backend
        lines = [
            "",
            "MEDebiaser demo is running",
            f"  Label Studio   {self.ls.url}/projects/{project_id}/data?tab={view_id}   (the review queue)",
            f"  login          {state.username}",
            f"  password       {state.password}",
            f"  ML backend     {self.backend.url}   (/versions, /metrics, /report?project={project_id})",
            f"  logs           {self.ls.log_path}, {self.backend.log_path}",
            "",
            "Open a task: the model's findings are pre-ticked and each finding's heatmap is a bitmask region",
            "(select it in the Regions list; its probability is in the region's meta).",
            "Fix the findings, erase heat where the evidence is not, paint 'Ignore' over markers, Submit:",
            "the backend retrains in the background and this demo fetches the new version's predictions.",
            "Ctrl-C stops Label Studio, the backend, its worker and Redis.",
            "",
        ]
        print("\n".join(lines), flush=True)

    def watch(self, api: LabelStudioAPI, project_id: int, version: str | None) -> None:
        """Follow new model versions: the worker's ranking job brings each one into Label Studio (where
        ml_backend.rank exists); otherwise, or if it has not within a minute, this does."""
        assert self.ls and self.backend
        pending: tuple[str, float] | None = None  # (new version, when it was seen)
        while True:
            time.sleep(self.options.poll_s)
            for service in (self.ls, self.backend):
                if not service.running:
                    raise SystemExit(f"{service.name} stopped; log {service.log_path}:\n{service.log_tail()}")
            try:
                live = backend_live_version(self.backend.url, project_id)
                if live and live != version and (pending is None or pending[0] != live):
                    print(f"new model version {live} (was {version})", flush=True)
                    pending = (live, time.monotonic())
                if pending is None:
                    continue
                in_project = api.project(project_id).get("model_version")
                if in_project == pending[0]:
                    print(f"  Label Studio has {pending[0]}'s predictions; the review queue follows them", flush=True)
                    version, pending = pending[0], None
                elif not ranking_available() or time.monotonic() - pending[1] > 60:
                    summary = self.predict(api, project_id)
                    print(
                        f"  {summary['predicted']} unlabelled tasks re-predicted in {summary['seconds']} s", flush=True
                    )
                    version, pending = summary["model_version"], None
            except (httpx.HTTPError, RuntimeError) as exc:
                log.warning("watch: %s", exc)

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for service in (self.backend, self.ls):
            if service is not None and service.running:
                print(f"stopping {service.name}", flush=True)
            if service is not None:
                service.stop()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (e.g. from a process manager) stops the demo like Ctrl-C


def run_demo(options: DemoOptions) -> int:
    return Demo(options).run()
