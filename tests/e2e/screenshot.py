"""Screenshots of Label Studio's labelling page in headless Chromium, driven over the DevTools protocol.

Pure Python: Debian's ``chromium`` (no browser download) and a minimal WebSocket client from the standard
library, so neither playwright nor node is needed. Log in at ``/user/login/`` (fields ``email``, ``password``),
open ``/projects/<pid>/data?task=<tid>``, wait for the editor's ``.konvajs-content canvas`` and a few seconds,
capture the page.

Command line (for the README image)::

    python -m tests.e2e.screenshot URL EMAIL PASSWORD PROJECT TASK out.png
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]
WINDOW = (1600, 1300)


def find_chromium() -> str | None:
    for name in (os.environ.get("MEDEBIASER_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class CDPError(RuntimeError):
    pass


class WebSocket:
    """Just enough RFC 6455 for the DevTools protocol: masked text frames out, (fragmented) frames in."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parsed = urlparse(url)
        self.sock = socket.create_connection((parsed.hostname, parsed.port or 80), timeout=timeout)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        request = (
            f"GET {parsed.path} HTTP/1.1\r\nHost: {parsed.hostname}:{parsed.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise CDPError("DevTools closed the connection during the WebSocket handshake")
            head += chunk
        status, _, rest = head.partition(b"\r\n\r\n")
        if b" 101 " not in status.split(b"\r\n", 1)[0]:
            raise CDPError(f"WebSocket handshake refused: {status[:200]!r}")
        self._buffer = rest

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buffer)))
            if not chunk:
                raise CDPError("DevTools connection closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def send(self, text: str, opcode: int = 0x1) -> None:
        payload = text.encode()
        header = bytearray([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = secrets.token_bytes(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise CDPError("DevTools closed the WebSocket")
            if opcode == 0x9:  # ping
                self.send(payload.decode(errors="replace"), opcode=0xA)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:
                    return message.decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Page:
    """One browser tab over CDP: commands by id, events ignored."""

    def __init__(self, ws_url: str) -> None:
        self.ws = WebSocket(ws_url)
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"script failed: {result['exceptionDetails'].get('text')}: {expression[:200]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(CDPError):
                value = self.evaluate(expression)
                if value:
                    return value
            time.sleep(0.25)
        raise CDPError(f"timed out after {timeout:.0f} s waiting for {what} (at {self.evaluate('location.href')})")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(0.3)
        self.wait_for("document.readyState === 'complete'", 60, f"{url} to load")

    def close(self) -> None:
        self.ws.close()


@dataclass
class Shot:
    path: Path
    image_rect: dict[str, float] | None  # the editor's image canvas, in CSS pixels (device scale 1)
    seconds: float


class Browser:
    """A headless Chromium with a fresh profile, stopped (process group) and removed on close."""

    def __init__(self, binary: str | None = None, window: tuple[int, int] = WINDOW) -> None:
        self.binary = binary or find_chromium()
        if not self.binary:
            raise CDPError("no chromium binary found (apt-get install chromium)")
        self.profile = Path(tempfile.mkdtemp(prefix="medebiaser-chromium-"))
        self.window = window
        self.log_path = self.profile / "chromium.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the profile
        self.proc = subprocess.Popen(
            [
                self.binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                f"--window-size={window[0]},{window[1]}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._log = log
        self.port = self._devtools_port()

    def _devtools_port(self, timeout: float = 30.0) -> int:
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            if marker.exists():
                lines = marker.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.1)
        raise CDPError("chromium did not open its DevTools port")

    def page(self) -> Page:
        targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=10).json()
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            target = httpx.put(f"http://127.0.0.1:{self.port}/json/new?about:blank", timeout=10).json()
        else:
            target = pages[0]
        page = Page(target["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.window[0],
            height=self.window[1],
            deviceScaleFactor=1,
            mobile=False,
        )
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def login(page: Page, base_url: str, email: str, password: str) -> None:
    page.goto(f"{base_url}/user/login/")
    page.wait_for("!!document.querySelector('input[name=email]')", 30, "the login form")
    page.evaluate(
        "(() => { const f = document.querySelector('input[name=email]').form;"
        f" f.querySelector('input[name=email]').value = {json.dumps(email)};"
        f" f.querySelector('input[name=password]').value = {json.dumps(password)};"
        " f.submit(); })()"
    )
    page.wait_for("!location.pathname.startsWith('/user/login') && document.readyState === 'complete'", 60, "login")


def labelling_screenshot(
    base_url: str,
    email: str,
    password: str,
    project_id: int,
    task_id: int,
    out: Path,
    *,
    settle_s: float = 4.0,
    binary: str | None = None,
) -> Shot:
    """Log in, open the task in the labelling editor, wait for the image canvas, save a PNG."""
    started = time.monotonic()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Browser(binary) as browser:
        page = browser.page()
        try:
            login(page, base_url, email, password)
            page.goto(f"{base_url}/projects/{project_id}/data?task={task_id}")
            page.wait_for("!!document.querySelector('.konvajs-content canvas')", 90, "the editor's image canvas")
            # The image loads after the canvas appears; the brush layers are drawn after it.
            page.wait_for(
                "Array.from(document.images).some(i => i.complete && i.naturalWidth > 0"
                " && i.src.includes('local-files'))",
                60,
                "the task image",
            )
            time.sleep(settle_s)
            rect = page.evaluate(
                "(() => { const r = document.querySelector('.konvajs-content').getBoundingClientRect();"
                " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()"
            )
            data = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
            out.write_bytes(base64.b64decode(data))
        finally:
            page.close()
    return Shot(out, rect, time.monotonic() - started)


if __name__ == "__main__":
    url, email, password, project, task, target = sys.argv[1:7]
    shot = labelling_screenshot(url, email, password, int(project), int(task), Path(target))
    print(json.dumps({"path": str(shot.path), "image_rect": shot.image_rect, "seconds": round(shot.seconds, 1)}))
