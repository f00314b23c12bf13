"""Start and stop a real Label Studio (installed by scripts/install_label_studio.sh) for end-to-end tests.

Usage::

    with LabelStudioServer(tmp_path / "ls", port=None) as ls:
        client = LabelStudio(base_url=ls.url, api_key=ls.token)

or, in a test under tests/e2e, ask for the session fixture ``label_studio_server`` (from tests/e2e/conftest.py;
it skips when Label Studio is not installed, unless ``MEDEBIASER_E2E=1`` makes that a failure). Every test
shares one server per pytest process: the first start runs ~45 s of migrations, so it is started once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import pytest

from ml_backend.demo.services import BackendProcess, label_studio_env, pick_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LS_BIN = PROJECT_ROOT / ".ls-venv" / "bin" / "label-studio"
E2E_ENV = "MEDEBIASER_E2E"
LS_BIN_ENV = "MEDEBIASER_LS_BIN"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def label_studio_bin() -> Path:
    return Path(os.environ.get(LS_BIN_ENV) or DEFAULT_LS_BIN)


try:  # loaded here, not in the forked child, where an import could deadlock on a lock held by another thread
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    # Runs in the child before exec: ask Linux to SIGTERM Label Studio if pytest dies without cleaning up.
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LabelStudioError(RuntimeError):
    pass


class LabelStudioServer:
    """A Label Studio process with an admin user, a known legacy API token and settings for local backends."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        local_files_root: str | os.PathLike[str] | None = None,
        *,
        username: str = "admin@medebiaser.test",
        password: str | None = None,
        token: str | None = None,
        extra_env: dict[str, str] | None = None,
        startup_timeout: float = 240.0,
        ls_bin: str | os.PathLike[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.local_files_root = Path(local_files_root).resolve() if local_files_root else self.data_dir
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        self.token = token or secrets.token_hex(20)  # a legacy token is 40 hex characters
        self.extra_env = dict(extra_env or {})
        self.startup_timeout = startup_timeout
        self.ls_bin = Path(ls_bin) if ls_bin else label_studio_bin()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / "label-studio.log"
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = label_studio_env(self.data_dir, self.username, self.password, self.token, self.local_files_root)
        env.update(self.extra_env)
        return env

    def command(self) -> list[str]:
        return [
            str(self.ls_bin), "start", "--no-browser",
            "--internal-host", "127.0.0.1", "-p", str(self.port),
            "--data-dir", str(self.data_dir), "-db", str(self.data_dir / "ls.sqlite3"),
            "--enable-legacy-api-token",
        ]  # fmt: skip

    def start(self) -> LabelStudioServer:
        if self._proc is not None:
            return self
        if not self.ls_bin.exists():
            raise LabelStudioError(f"{self.ls_bin} not found: run scripts/install_label_studio.sh")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.local_files_root.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(),
            cwd=self.data_dir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group, so stop() can end it and all it spawned
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        # /health answers before the token is usable only in theory; wait for an authenticated call too.
        deadline = t0 + self.startup_timeout
        with httpx.Client(timeout=5.0) as http:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise LabelStudioError(
                        f"Label Studio exited with {self._proc.returncode} during startup; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    health = http.get(f"{self.url}/health")
                    if health.status_code == 200:
                        me = http.get(f"{self.url}/api/current-user/whoami", headers=self.auth_headers)
                        if me.status_code == 200:
                            return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise LabelStudioError(
            f"Label Studio not ready after {self.startup_timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"


# -- pytest integration (the session fixture ``label_studio_server`` lives in tests/e2e/conftest.py) -----------
def require_label_studio() -> None:
    """Skip (or, with MEDEBIASER_E2E=1, fail) when Label Studio is not installed."""
    if label_studio_bin().exists():
        return
    reason = (
        f"Label Studio is not installed at {label_studio_bin()}: run scripts/install_label_studio.sh "
        f"(set {E2E_ENV}=1 to make this a failure instead of a skip)"
    )
    if os.environ.get(E2E_ENV) == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def running_backend(work: Path, ls: LabelStudioServer, env: dict[str, str], log_name: str) -> Iterator[BackendProcess]:
    """``medebiaser serve`` (embedded Redis + worker) pointed at ``ls``, models under ``work``; its log is kept in
    ``test-artifacts/<log_name>`` afterwards."""
    process = BackendProcess(
        work / "backend.log",
        port=pick_port(),
        env={
            "MODEL_DIR": str(work / "models"),
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.token,
            **env,
        },
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
        artifacts = PROJECT_ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (artifacts / log_name).write_bytes(process.log_path.read_bytes())


NIH_ORIGINALS = PROJECT_ROOT.parent / "shared" / "data" / "nih_hires" / "images_1024"


def nih_films(ls: LabelStudioServer, folder: str, count: int) -> Path:
    """The first ``count`` NIH originals (1024 px) copied into Label Studio's local-files root under ``folder``;
    skips the test without ../shared/data."""
    if not NIH_ORIGINALS.exists():
        pytest.skip(f"{NIH_ORIGINALS} is absent: this test needs ../shared/data")
    target = ls.local_files_root / folder
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(NIH_ORIGINALS.glob("*.png"))[:count]:
        shutil.copy(path, target / path.name)
    return target


def film_project(
    ls: LabelStudioServer, api: Any, prefix: str, config: str, films: Path, backend_url: str, secret: str
) -> int:
    """A new project with ``config``, one task per PNG in ``films`` (local files), connected to the backend."""
    from ml_backend.connect import connect_project
    from ml_backend.demo.setup import local_file_ref

    project = int(api.create_project(f"{prefix}-{time.monotonic_ns()}", config)["id"])
    api.ensure_local_storage(project, films)
    data = [{"image": local_file_ref(p, ls.local_files_root)} for p in sorted(films.glob("*.png"))]
    assert api.import_tasks(project, data) == len(data)
    connect_project(ls.url, ls.token, project, backend_url, webhook_secret=secret)
    return project


@contextlib.contextmanager
def app_in_thread(settings: Any, timeout: float = 30.0) -> Iterator[str]:
    """The real FastAPI app for ``settings`` under uvicorn in a thread, on a free port; yields its URL."""
    import threading

    import uvicorn

    from ml_backend.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        if time.monotonic() > deadline:
            pytest.fail("the backend app did not start")
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
