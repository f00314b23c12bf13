"""PNG heatmaps at clinical resolution in a real Label Studio 1.23.2 with the shipped ``BitmaskLabels`` config.

Real NIH originals (1024 px) upscaled to a 2048x2500 film, served as Label Studio local files: the backend's
predictions are stored and valid for the config, each heatmap a palette PNG data URL at the film's natural size
and under 150 KB; headless Chromium shows the whole film with label-coloured heat over it; and a physician's
edited bitmask, saved through Label Studio, reaches the webhook and decodes to the mask that was drawn.
"""

from __future__ import annotations

import colorsys
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from ml_backend.connect import connect_project
from ml_backend.demo.services import BackendProcess
from ml_backend.demo.setup import LabelStudioAPI, local_file_ref
from ml_backend.explain.bitmask_png import decode_mask_data_url, encode_heat_png, png_data_url_size

from .label_studio import E2E_ENV, PROJECT_ROOT, LabelStudioServer, running_backend

pytestmark = pytest.mark.e2e

ORIGINALS = PROJECT_ROOT.parent / "shared" / "data" / "nih_hires" / "images_1024"
CONFIG = (PROJECT_ROOT / "label_config" / "chest_xray_bitmask.xml").read_text()
SECRET = "bitmask-webhook-secret"
FILM = (2048, 2500)  # width, height: a clinical-size film
ARTIFACTS = PROJECT_ROOT / "test-artifacts"


def _say(message: str) -> None:
    print(f"[bitmask {time.strftime('%H:%M:%S')}] {message}", flush=True)


@pytest.fixture(scope="module")
def films(label_studio_server: LabelStudioServer) -> Path:
    if not ORIGINALS.exists():
        pytest.skip(f"{ORIGINALS} is absent: this test needs ../shared/data")
    folder = label_studio_server.local_files_root / "bitmask-films"
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(p.name for p in ORIGINALS.glob("*.png"))[:3]:  # upscaled into LS's scratch root
        Image.open(ORIGINALS / name).convert("L").resize(FILM, Image.BICUBIC).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def backend(label_studio_server: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    env = {
        "WEBHOOK_SECRET": SECRET,
        "INPUT_SIZE": "128",
        "THRESHOLD": "0.3",  # an untrained model: predict enough findings to draw heatmaps for
        "HEATMAP_MAX_FINDINGS": "3",
        "LOG_LEVEL": "INFO",
    }
    work = tmp_path_factory.mktemp("bitmask-backend")
    with running_backend(work, label_studio_server, env, "bitmask-backend.log") as process:
        yield process


def _colours() -> dict[str, str]:
    control = ElementTree.fromstring(CONFIG).find(".//BitmaskLabels")
    assert control is not None
    return {label.get("value"): label.get("background") for label in control.iter("Label")}


def test_png_heatmaps_on_a_clinical_size_film(
    label_studio_server: LabelStudioServer,
    backend: BackendProcess,
    films: Path,
) -> None:
    ls = label_studio_server
    interface = LabelInterface(CONFIG)
    with LabelStudioAPI(ls.url, ls.token) as api:
        project = int(api.create_project(f"bitmask-{time.monotonic_ns()}", CONFIG)["id"])
        api.ensure_local_storage(project, films)
        data = [{"image": local_file_ref(p, ls.local_files_root)} for p in sorted(films.glob("*.png"))]
        assert api.import_tasks(project, data) == len(data)
        connect_project(ls.url, ls.token, project, backend.url, webhook_secret=SECRET)
        ids = sorted(t["id"] for t in api.tasks(project))
        started = time.monotonic()
        api.retrieve_predictions(project, ids)
        _say(f"{len(ids)} tasks of {FILM[0]}x{FILM[1]} predicted in {time.monotonic() - started:.1f} s")

        # 1. Stored, valid for the config, PNG heatmaps at the film's natural size and light.
        with_heat: dict[int, list[dict[str, Any]]] = {}
        for task_id in ids:
            prediction = max(api.predictions(task_id), key=lambda p: p["id"])
            assert interface.validate_prediction(prediction), interface.validate_prediction(prediction, True)
            regions = [r for r in prediction["result"] if r["type"] == "bitmasklabels"]
            assert not [r for r in prediction["result"] if r["type"] == "brushlabels"]
            for region in regions:
                url = region["value"]["imageDataURL"]
                assert png_data_url_size(url, 10_000_000) == FILM
                assert (region["original_width"], region["original_height"]) == FILM
                assert len(url) < 150_000, f"{len(url)} bytes of data URL for one 5 MP heatmap"
                assert region["meta"]["text"][0].startswith("p=")  # the probability, shown with the region
            if regions:
                with_heat[task_id] = regions
        assert with_heat, "no task got a heatmap"
        task_id, regions = next(iter(with_heat.items()))
        _say(f"task {task_id}: {len(regions)} PNG heatmaps, {[len(r['value']['imageDataURL']) for r in regions]} B")

        # 2. A physician keeps the heat of the first finding only inside a box and submits.
        region = regions[0]
        label = region["value"]["bitmasklabels"][0]
        heat = decode_mask_data_url(region["value"]["imageDataURL"], *FILM, max_bytes=10_000_000, max_pixels=64_000_000)
        edited = np.zeros_like(heat)
        edited[700:1900, 300:1700] = np.maximum(heat[700:1900, 300:1700], 96)
        saved = {**region, "id": "edited", "origin": "prediction-changed"}
        saved["value"] = {"imageDataURL": encode_heat_png(edited), "bitmasklabels": [label]}
        choices = next(
            r for r in max(api.predictions(task_id), key=lambda p: p["id"])["result"] if r["type"] == "choices"
        )
        before = httpx.get(f"{backend.url}/metrics?format=json", timeout=10).json()["webhook"]
        api.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": [choices, saved], "lead_time": 20.0})
        after = httpx.get(f"{backend.url}/metrics?format=json", timeout=10).json()["webhook"]
        assert after["recorded"] == before["recorded"] + 1 and after["rejected"] == 0, after
        assert after["regions_skipped"] == before["regions_skipped"], after
        stored = api.call("GET", f"/api/tasks/{task_id}/annotations")[0]
        back = next(r for r in stored["result"] if r["type"] == "bitmasklabels")
        decoded = decode_mask_data_url(
            back["value"]["imageDataURL"], *FILM, max_bytes=10_000_000, max_pixels=64_000_000
        )
        assert np.array_equal(decoded > 0, edited > 0), "the mask Label Studio stored is the one drawn"

    # 3. What the physician sees: the whole film, with heat in the labels' colours over it.
    from .screenshot import find_chromium, labelling_screenshot

    if not find_chromium():
        if os.environ.get(E2E_ENV) == "1":
            pytest.fail("no chromium binary for the screenshot (apt-get install chromium)")
        pytest.skip("no chromium binary for the screenshot")
    target = next((t for t in with_heat if t != task_id), task_id)  # an unannotated task shows the prediction
    out = ARTIFACTS / "labelling-bitmask-2048x2500.png"
    shot = labelling_screenshot(ls.url, ls.username, ls.password, project, target, out, settle_s=6.0)
    rect = shot.image_rect
    assert rect is not None
    _say(f"screenshot of task {target} in {shot.seconds:.1f} s: canvas {rect} -> {out}")
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert rect["y"] >= 0 and rect["y"] + rect["height"] <= pixels.shape[0], "the whole film fits the editor"
    assert abs(rect["width"] / rect["height"] - FILM[0] / FILM[1]) < 0.02, rect
    top, left = round(rect["y"]), round(rect["x"])
    crop = Image.fromarray(pixels[top : top + round(rect["height"]), left : left + round(rect["width"])])
    hsv = np.asarray(crop.convert("HSV")).astype(int)
    coloured = (hsv[..., 1] > 60) & (hsv[..., 2] > 40)  # the X-ray itself is grey
    share = float(coloured.mean())
    hues = []
    for colour in _colours().values():
        rgb = [int(colour.lstrip("#")[i : i + 2], 16) / 255 for i in (0, 2, 4)]
        h, s, _ = colorsys.rgb_to_hsv(*rgb)
        if s >= 0.3:
            hues.append(round(h * 255))
    near = np.zeros_like(coloured)
    for hue in hues:
        distance = np.abs(hsv[..., 0] - hue)
        near |= np.minimum(distance, 256 - distance) <= 8
    _say(f"coloured share over the film {share:.3f}, of it in label hues {float((coloured & near).mean()):.3f}")
    assert share > 0.03, "hardly any heat drawn over the film"
    assert (coloured & near).sum() > 0.8 * coloured.sum(), "the heat is not in the labels' colours"
