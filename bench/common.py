"""Shared helpers for the benchmarks: environment record, interleaved timing, a Label Studio-like file server,
the real app in a uvicorn subprocess, a scratch Redis, and result writers (markdown + JSON).

The benchmark machine is usually small and shared, so every comparison runs its variants interleaved in one
process (A B C, B C A, C A B, ...) and reports medians and the median of per-round ratios.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlparse

if TYPE_CHECKING:
    from ml_backend.inference.task_images import TaskImage
    from ml_backend.io.images import LoadedImage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "data"
NIH = SHARED / "nih1000"
FULLRES = SHARED / "nih_fullres"
LS_REQUESTS = SHARED / "label-studio-1.23.2-requests"
CHEST_CONFIG = (ROOT / "label_config" / "chest_xray.xml").read_text()
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # a legacy (40 hex) Label Studio token: "Token <key>"
PYTHON = sys.executable


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop the servers and workers a benchmark started."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def apply_threads(threads: int | None) -> dict[str, str]:
    """Set torch's intra-op threads here (None: leave torch's default) and return the environment that gives
    the app and worker subprocesses the same number. On a small machine shared with other CPU-heavy work, one
    thread per process avoids OpenMP barrier stalls that make 2-thread timings swing by 3-5x."""
    if not threads:
        return {}
    import torch

    torch.set_num_threads(threads)
    os.environ["MEDEBIASER_BENCH_THREADS"] = str(threads)  # recorded by environment()
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def require_shared() -> None:
    if not NIH.is_dir() or not LS_REQUESTS.is_dir():
        sys.exit(f"this benchmark needs {SHARED} (NIH chest X-rays and Label Studio request bodies)")


def ls_body(name: str) -> dict[str, Any]:
    """The exact body Label Studio 1.23.2 sent for ``name`` (e.g. "predict", "webhook_ANNOTATION_CREATED")."""
    return json.loads((LS_REQUESTS / f"{name}.json").read_text())["body"]


def nih_manifest() -> list[dict[str, Any]]:
    return json.loads((NIH / "manifest.json").read_text())


# --------------------------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    import numpy as np
    import torch

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:  # pragma: no cover
        timm_version = None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": cpu_model(),
        "cpus_visible": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "threads_forced": bool(os.environ.get("MEDEBIASER_BENCH_THREADS")),
        "torch_version": torch.__version__,
        "timm_version": timm_version,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def command_line() -> str:
    """The command that reproduces this run, relative to the project root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_arg = str(script.relative_to(ROOT))
    except ValueError:
        script_arg = str(script)
    return " ".join([".venv/bin/python", script_arg, *map(shlex.quote, sys.argv[1:])])


# --------------------------------------------------------------------------------------------- statistics


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: list[float], scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
    scaled = [v * scale for v in values]
    return {
        "median": round(median(scaled), digits),
        "min": round(min(scaled), digits),
        "max": round(max(scaled), digits),
        "n": len(scaled),
    }


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median of per-round ratios (robust to drift on a shared machine) and the ratio of medians."""
    per_round = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {
        "median_of_ratios": round(median(per_round), 3),
        "ratio_of_medians": round(median(numerator) / median(denominator), 3),
        "min": round(min(per_round), 3),
        "max": round(max(per_round), 3),
    }


def interleaved(
    variants: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    budget_s: float | None = None,
    min_reps: int = 3,
    settle_s: float = 0.0,
) -> dict[str, list[float]]:
    """Wall seconds of each variant over up to ``reps`` rounds; each round runs every variant once, in a rotated
    order (A B C, B C A, C A B, ...) so slow drifts of the shared machine hit every variant alike. With
    ``budget_s``, stops starting new rounds once the budget is spent (but runs at least ``min_reps``).
    ``settle_s``: pause before each variant (lets another process finish freeing a big response, say)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for r in range(reps):
        if budget_s is not None and r >= min_reps and time.perf_counter() - started > budget_s:
            break
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if settle_s:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------- file server


class _LabelStudioFiles(BaseHTTPRequestHandler):
    """Serves files like Label Studio's /data/upload/<path> and /data/local-files/?d=<path> (API token needed)."""

    root: Path = Path(".")
    counter: dict[str, int] = {}
    protocol_version = "HTTP/1.1"  # keep-alive, as Label Studio's server does
    # headers and body go out in two writes: without TCP_NODELAY, Nagle + delayed ACK stall every keep-alive
    # response by ~40 ms (that would be the file server's artefact, not the backend's fetch cost)
    disable_nagle_algorithm = True

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlparse(self.path)
        type(self).counter["requests"] = type(self).counter.get("requests", 0) + 1
        if not url.path.startswith("/data/"):
            self._send(404, b"not found")
            return
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            self._send(401, b'{"detail": "Authentication credentials were not provided."}')
            return
        if url.path.startswith("/data/local-files/"):
            relative = parse_qs(url.query).get("d", [""])[0]
        elif url.path.startswith("/data/upload/"):
            relative = url.path[len("/data/upload/") :]
        else:
            self._send(404, b"not found")
            return
        path = (self.root / unquote(relative)).resolve()
        if not path.is_file() or self.root.resolve() not in path.parents:
            self._send(404, b"not found")
            return
        self._send(200, path.read_bytes(), "image/png")

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def label_studio_files(root: Path) -> Iterator[tuple[str, dict[str, int]]]:
    """(base URL, request counter) of a threaded file server imitating Label Studio's file endpoints."""
    counter: dict[str, int] = {}
    handler = type("Handler", (_LabelStudioFiles,), {"root": Path(root), "counter": counter})
    # a listen backlog of 5 (socketserver's default) drops SYNs when the backend opens 8 connections at once,
    # and the kernel retries them after 1 s: Label Studio's server (gunicorn: 2048) has no such stall
    server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 128, "daemon_threads": True})
    server = server_class(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="ls-files")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counter
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a process."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                out[name] = int(rest.split()[0])
    except OSError:
        pass
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def loaded_images(images: Sequence[TaskImage]) -> list[LoadedImage]:
    """``TaskImageLoader.load_all``'s images, where every one loaded; a benchmark cannot go on without one."""
    out = []
    for i, image in enumerate(images):
        if isinstance(image, Exception):  # an ImageError
            raise RuntimeError(f"task image {i} did not load: {image}") from image
        out.append(image)
    return out


class AppServer:
    """The real backend (``ml_backend.serve.app:create_app``) under uvicorn in a subprocess on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | int | None = None  # a log file, subprocess.DEVNULL or nothing yet

    def start(self, timeout_s: float = 120.0) -> AppServer:
        import httpx

        cmd = [
            PYTHON,
            "-m",
            "uvicorn",
            "--factory",
            "ml_backend.serve.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with {self.process.returncode} (log: {self.log_path})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the app did not answer /health in time")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None and not isinstance(self._log, int):  # an open log file, not DEVNULL
            self._log.close()

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------- results


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def env_lines(env: dict[str, Any]) -> list[str]:
    # the caveat explains why a run pinned its torch threads; it only reads true for a one-thread run
    forced = [
        "- One torch thread per process (`--threads 1`): on this 2-core machine, shared with other CPU-heavy jobs "
        "(load average 5-8), 2-thread timings swung 3-5x between repetitions (OpenMP workers descheduled at "
        "barriers); run without `--threads` on a dedicated machine."
    ]
    if env.get("torch_num_threads") != 1:
        forced = [f"- Torch threads pinned to {env.get('torch_num_threads')} per process with `--threads`."]
    return [
        f"- Date (UTC): {env['date_utc']}",
        f"- CPU: {env['cpu_model']}, {env['cpus_usable']} usable cores (shared with other work: timings are noisy; "
        f"load average at start {env['load_average_at_start']})",
        f"- torch {env['torch_version']} (`torch.get_num_threads()` = {env['torch_num_threads']}"
        f"{', set with --threads, also for any app/worker subprocess' if env.get('threads_forced') else ''}), "
        f"timm {env['timm_version']}, numpy {env['numpy_version']}, Python {env['python']}",
        *(forced if env.get("threads_forced") else []),
    ]


def write_results(
    name: str, title: str, sections: list[str], data: dict[str, Any], folder: Path | None = None
) -> tuple[Path, Path]:
    """<folder>/<name>.json (data + environment + command) and <folder>/<name>.md; folder: bench/results."""
    folder = folder or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    env = data.setdefault("environment", environment())
    command = data.setdefault("command", command_line())
    json_path = folder / f"{name}.json"
    md_path = folder / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    header = [f"# {title}", "", *env_lines(env), "", "Reproduce (from the project root):", ""]
    header += ["```", command, "```", ""]
    md_path.write_text("\n".join(header + sections).rstrip() + "\n")
    return md_path, json_path


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**NOT met**")


def update_summary(fields: dict[str, Any], path: Path = RESULTS / "summary.json") -> None:
    """Set ``fields`` in bench/results/summary.json and keep the rest: each benchmark owns its own keys. Written
    through a temporary file and ``os.replace``: a benchmark killed mid-write leaves the old file whole."""
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)


def default_device() -> str:
    """Where a benchmark's models train unless told: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    """What computed a result, for its results file: the GPU's name, or the CPU and torch's thread count."""
    import torch

    if device.startswith("cuda"):
        return f"GPU: {torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU: {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"
