"""Screenshots of Label Studio's labelling page in headless Chromium, driven by playwright.

Playwright drives Debian's ``chromium`` through ``executable_path``: no ``playwright install`` browser download.
Log in at ``/user/login/`` (fields ``email``, ``password``), open ``/projects/<pid>/data?task=<tid>``, wait for
the editor's ``.konvajs-content canvas``, the task image and a few seconds, capture the page.

Command line (for the README image)::

    python -m tests.e2e.screenshot URL EMAIL PASSWORD PROJECT TASK out.png
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-dev-shm-usage", "--hide-scrollbars"]
WINDOW = (1600, 1300)
_IMAGE_LOADED = (
    "Array.from(document.images).some(i => i.complete && i.naturalWidth > 0 && i.src.includes('local-files'))"
)
_CANVAS_RECT = (
    "() => { const r = document.querySelector('.konvajs-content').getBoundingClientRect();"
    " return {x: r.x, y: r.y, width: r.width, height: r.height}; }"
)


def find_chromium() -> str | None:
    for name in (os.environ.get("MEDEBIASER_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@dataclass
class Shot:
    path: Path
    image_rect: dict[str, float] | None  # the editor's image canvas, in CSS pixels (device scale 1)
    seconds: float
    text: str = ""  # the page's innerText when the screenshot was taken (what a reader sees as text)


def login(page: Page, base_url: str, email: str, password: str) -> None:
    page.goto(f"{base_url}/user/login/", wait_until="load", timeout=60_000)
    page.fill("input[name=email]", email, timeout=30_000)
    page.fill("input[name=password]", password)
    page.eval_on_selector("input[name=email]", "e => e.form.submit()")
    page.wait_for_url(lambda url: "/user/login" not in url, wait_until="load", timeout=60_000)


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
    executable = binary or find_chromium()
    if not executable:
        raise RuntimeError("no chromium binary found (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WINDOW[0], "height": WINDOW[1]}, device_scale_factor=1)
            login(page, base_url, email, password)
            page.goto(f"{base_url}/projects/{project_id}/data?task={task_id}", wait_until="load", timeout=60_000)
            page.wait_for_selector(".konvajs-content canvas", state="attached", timeout=90_000)
            # The image loads after the canvas appears; the brush layers are drawn after it.
            page.wait_for_function(_IMAGE_LOADED, timeout=60_000)
            time.sleep(settle_s)
            rect = page.evaluate(_CANVAS_RECT)
            text = page.evaluate("document.body.innerText") or ""
            page.screenshot(path=str(out))
        finally:
            browser.close()
    return Shot(out, rect, time.monotonic() - started, str(text))


if __name__ == "__main__":
    url, email, password, project, task, target = sys.argv[1:7]
    shot = labelling_screenshot(url, email, password, int(project), int(task), Path(target))
    print(json.dumps({"path": str(shot.path), "image_rect": shot.image_rect, "seconds": round(shot.seconds, 1)}))
