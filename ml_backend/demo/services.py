"""The processes a demo runs: a local Label Studio and ``medebiaser serve`` (backend + embedded Redis + worker).

Each runs in its own process group (session), so stopping it ends everything it started, and a Ctrl-C in the
terminal reaches only the demo, which then stops them in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LS_BIN = PROJECT_ROOT / ".ls-venv" / "bin" / "label-studio"


class ServiceError(RuntimeError):
    """A service did not start; the message includes the end of its log."""


def port_is_free(port: int) -> bool:
    # SO_REUSEADDR like the servers themselves: a port in TIME_WAIT after the previous demo is free to them.
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def pick_port(preferred: int | None = None) -> int:
    """``preferred`` when it is free, else any free port."""
    if preferred and port_is_free(preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # In the child before exec: SIGTERM it when the demo dies without cleaning up (Linux only).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ManagedProcess:
    """A child process in its own session, logging to a file, stopped with its whole process group."""

    name = "process"

    def __init__(self, log_path: Path) -> None:
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _spawn(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise ServiceError(
                    f"{self.name} exited ({code}) before {what}; log {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if ready():
                    return
            time.sleep(0.5)
        raise ServiceError(f"{self.name}: no {what} after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the leader and let it clean up; then SIGTERM/SIGKILL whatever is left in its group."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(1.0 if sig == signal.SIGTERM else 0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


def label_studio_env(data_dir: Path, username: str, password: str, token: str, document_root: Path) -> dict[str, str]:
    """Environment for an unattended local Label Studio 1.23 (shared by the demo and the e2e test harness)."""
    env = dict(os.environ)
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):  # our venv must not leak into LS's (other pins)
        env.pop(key, None)
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "HOME": str(data_dir),
            "LABEL_STUDIO_USERNAME": username,
            "LABEL_STUDIO_PASSWORD": password,
            "LABEL_STUDIO_USER_TOKEN": token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LATEST_VERSION_CHECK": "false",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            # The backend listens on 127.0.0.1: LS refuses such URLs (and their webhook) unless both are off.
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
        }
    )
    return env


class LabelStudioProcess(ManagedProcess):
    """Label Studio from its own venv, set up for a local backend (SSRF protection off) and local files."""

    name = "Label Studio"

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int,
        username: str,
        password: str,
        token: str,
        document_root: Path,
        ls_bin: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        super().__init__(self.data_dir / "label-studio.log")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.username, self.password, self.token = username, password, token
        self.document_root = Path(document_root).resolve()
        self.ls_bin = Path(ls_bin or DEFAULT_LS_BIN)

    def env(self) -> dict[str, str]:
        return label_studio_env(self.data_dir, self.username, self.password, self.token, self.document_root)

    def start(self, timeout: float = 300.0) -> LabelStudioProcess:
        if not self.ls_bin.exists():
            raise ServiceError(f"{self.ls_bin} not found: run `bash scripts/install_label_studio.sh` first")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.ls_bin), "start", "--no-browser",
            "--internal-host", "127.0.0.1", "-p", str(self.port),
            "--data-dir", str(self.data_dir), "-db", str(self.data_dir / "ls.sqlite3"),
            "--enable-legacy-api-token",
        ]  # fmt: skip
        self._spawn(command, self.env(), self.data_dir)
        headers = {"Authorization": f"Token {self.token}"}

        def ready() -> bool:
            with httpx.Client(timeout=5.0) as http:
                if http.get(f"{self.url}/health").status_code != 200:
                    return False
                return http.get(f"{self.url}/api/current-user/whoami", headers=headers).status_code == 200

        try:
            self.wait_until(ready, timeout, "answer on /health with the admin token")
        except BaseException:
            self.stop()
            raise
        return self


class BackendProcess(ManagedProcess):
    """``medebiaser serve``: the FastAPI backend, plus an embedded Redis and a training worker."""

    name = "ML backend"

    def __init__(self, log_path: Path, *, port: int, env: dict[str, str], cwd: Path | None = None) -> None:
        super().__init__(log_path)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.extra_env = dict(env)
        self.cwd = Path(cwd or PROJECT_ROOT)

    def start(self, timeout: float = 180.0) -> BackendProcess:
        env = dict(os.environ)
        env.pop("REDIS_URL", None)  # embedded Redis + worker, owned by this process
        env.update(self.extra_env)
        env["PORT"] = str(self.port)
        command = [sys.executable, "-m", "ml_backend.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self._spawn(command, env, self.cwd)

        def ready() -> bool:
            with httpx.Client(timeout=5.0) as http:
                return http.get(f"{self.url}/health").status_code == 200

        try:
            self.wait_until(ready, timeout, "answer on /health")
        except BaseException:
            self.stop()
            raise
        return self
