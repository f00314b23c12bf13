"""The HTTP app against request bodies shaped exactly like Label Studio 1.23.2's, on real chest X-rays."""

from __future__ import annotations

import base64
import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CHEST_CONFIG, FULLRES, NIH, shared_or_skip
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from ml_backend.serve.app import create_app


@pytest.fixture()
def client(settings, file_root):
    # The file server's folder is an image root so a task may name a local path there (local reads are off by
    # default); /public/ URLs are on the Label Studio origin, fetched without the token.
    with TestClient(create_app(replace(settings, image_roots=(file_root,)))) as test_client:
        yield test_client


@pytest.fixture()
def nih_files(file_root: Path) -> dict[str, Path]:
    """A few real NIH images (64x64) and both full-size scans, placed where the file server serves them."""
    shared_or_skip(NIH)
    files = {}
    for name in ["00000001_000.png", "00000003_001.png", "00000010_000.png"]:
        files[name] = file_root / name
        shutil.copy(NIH / "images" / name, files[name])
    for name in ["00000001_000.png", "00027426_000.png"]:
        files[f"full_{name}"] = file_root / f"full_{name}"
        shutil.copy(shared_or_skip(FULLRES) / name, files[f"full_{name}"])
    return files


def ls_predict_body(ls_request, image_refs: list[str], config: str = CHEST_CONFIG) -> dict:
    """Label Studio's /predict body with our tasks substituted (the task dicts keep every field LS sends)."""
    body = ls_request("predict")
    template = body["tasks"][0]
    body["tasks"] = [{**template, "id": 100 + i, "data": {"image": ref}} for i, ref in enumerate(image_refs)]
    body["label_config"] = config
    return body


def test_health_and_setup_with_label_studio_bodies(client, ls_request) -> None:
    assert client.get("/health").json()["status"] == "UP"
    setup = ls_request("setup")
    answer = client.post("/setup", json=setup)
    assert answer.status_code == 200
    assert answer.json() == {"model_version": "v0"}
    # the setup fixture's config has 3 findings + "No Finding": the head follows the project's label set
    versions = client.get("/versions").json()
    assert versions["versions"] == ["v0"]
    assert versions["projects"]["2"]["live"] == "v0"


def test_predict_findings_probabilities_and_heatmaps(client, ls_request, nih_files, file_server) -> None:
    refs = [
        "/data/upload/00000001_000.png",  # Label Studio upload (needs the token)
        "/data/local-files/?d=00000003_001.png",  # local-files storage (needs the token)
        f"{file_server}/public/00000010_000.png",  # plain URL
        str(nih_files["00000001_000.png"]),  # local path
        "/data/upload/full_00000001_000.png",  # full-size 512x512 scans
        "/data/upload/full_00027426_000.png",
    ]
    setup = ls_request("setup")
    setup["schema"] = CHEST_CONFIG
    version = client.post("/setup", json=setup).json()["model_version"]
    response = client.post("/predict", json=ls_predict_body(ls_request, refs))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(refs)
    interface = LabelInterface(CHEST_CONFIG)
    sizes = [64, 64, 64, 64, 512, 512]
    for prediction, size in zip(results, sizes, strict=True):
        assert prediction["model_version"] == version
        assert 0.5 <= prediction["score"] <= 1.0
        assert interface.validate_prediction(prediction, return_errors=True) in (True, [])
        choices = [r for r in prediction["result"] if r["type"] == "choices"]
        assert len(choices) == 1
        probabilities = choices[0]["probabilities"]
        assert len(probabilities) == 14 and all(0 <= p <= 1 for p in probabilities.values())
        predicted = {k for k, p in probabilities.items() if p >= 0.5}
        assert set(choices[0]["value"]["choices"]) == (predicted or {"No Finding"})
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        # a heatmap for each predicted finding, the most probable HEATMAP_MAX_FINDINGS of them
        cap = client.app.state.settings.heatmap.max_findings
        top = set(sorted(predicted, key=lambda k: -probabilities[k])[:cap])
        assert {b["value"]["brushlabels"][0] for b in brushes} == top
        for brush in brushes:
            assert (brush["original_width"], brush["original_height"]) == (size, size)
            alpha = np.asarray(decode_rle(brush["value"]["rle"])).reshape(size, size, 4)[:, :, 3]
            assert alpha.max() >= 200  # each heatmap peaks near full opacity...
            assert (alpha == 0).any()  # ...and leaves the rest of the X-ray visible
            assert len(np.unique(alpha)) > 8  # graded, not a flat binary region
            assert brush["score"] == pytest.approx(probabilities[brush["value"]["brushlabels"][0]], abs=1e-4)


def test_image_formats_label_studio_serves(client, ls_request, file_root) -> None:
    rng = np.random.default_rng(0)
    gray16 = (rng.random((96, 80)) * 4095).astype(np.uint16)
    formats = {
        "gray16.png": Image.fromarray(gray16),  # 16-bit grayscale (12 bits used)
        "gray8.png": Image.fromarray((rng.random((70, 90)) * 255).astype(np.uint8)),
        "rgb.jpg": Image.fromarray((rng.random((50, 60, 3)) * 255).astype(np.uint8)),
        "rgba.png": Image.fromarray((rng.random((40, 40, 4)) * 255).astype(np.uint8), "RGBA"),
        "palette.png": Image.fromarray((rng.random((30, 30)) * 255).astype(np.uint8)).convert("P"),
    }
    for name, image in formats.items():
        image.save(file_root / name)
    assert Image.open(file_root / "gray16.png").mode.startswith("I")
    body = ls_predict_body(ls_request, [f"/data/upload/{name}" for name in formats])
    results = client.post("/predict", json=body).json()["results"]
    assert [bool(r["result"]) for r in results] == [True] * len(formats)
    for prediction, image in zip(results, formats.values(), strict=True):
        for region in prediction["result"]:
            if region["type"] == "brushlabels":
                assert (region["original_width"], region["original_height"]) == image.size


def test_bad_tasks_get_empty_results_and_do_not_sink_the_batch(client, ls_request, nih_files, file_root) -> None:
    (file_root / "not_an_image.png").write_bytes(b"this is not a PNG")
    (file_root / "truncated.png").write_bytes(nih_files["full_00000001_000.png"].read_bytes()[:5000])
    Image.new("1", (9000, 9000)).save(file_root / "bomb.png")  # 81 MP of zeros: a few KB on disk
    refs = [
        "/data/upload/00000001_000.png",
        "/data/upload/missing.png",
        "/data/upload/not_an_image.png",
        "/data/upload/truncated.png",
        "/data/upload/bomb.png",
        "http://127.0.0.1:9/unreachable.png",
        "s3://bucket/key.png",
        "/data/upload/00000003_001.png",
    ]
    body = ls_predict_body(ls_request, refs)
    body["tasks"].append({"id": 999, "data": {}})  # no image at all
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(refs) + 1  # Label Studio needs exactly one entry per task
    assert [bool(r["result"]) for r in results] == [True] + [False] * 6 + [True, False]
    # each failed task's reason is in its own entry (Label Studio ignores the field and logs the answer)
    assert [("error" in r) for r in results] == [not bool(r["result"]) for r in results]
    reasons = " | ".join(r["error"] for r in results if "error" in r)
    for expected in ["HTTP 404", "cannot decode", "MAX_IMAGE_PIXELS", "unsupported image reference", "no image"]:
        assert expected in reasons


@pytest.mark.parametrize(
    ("path", "payload", "status", "message"),
    [
        ("/predict", b"{not json", 400, "not valid JSON"),
        ("/predict", b"[1, 2]", 400, "JSON object"),
        ("/predict", b"", 400, "empty"),
        ("/predict", b'{"tasks": "nope", "label_config": "<View/>"}', 400, "'tasks' must be a list"),
        ("/predict", b'{"tasks": [{"id": 1}]}', 400, "label config missing"),
        (
            "/predict",
            b'{"tasks": [], "label_config": "<View><Image name=\\"i\\" value=\\"$i\\"/></View>"}',
            422,
            "Choices",
        ),
        ("/predict", b'{"tasks": [], "label_config": "<View><Choices"}', 422, "label config"),
        ("/setup", b'{"project": "1.2"}', 400, "label config missing"),
        ("/setup", b'{"schema": "<View></View>", "project": "1.2"}', 422, "Image"),
        ("/setup", b'{"schema": "<View/>", "project": "../../etc"}', 400, "project"),
        ("/webhook", b'{"no_action": 1}', 400, "action"),
    ],
)
def test_malformed_requests_get_a_4xx_json_error(client, path, payload, status, message) -> None:
    response = client.post(path, content=payload, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_label_set_follows_the_project_and_models_are_cached(client, ls_request, nih_files) -> None:
    small = ls_predict_body(ls_request, ["/data/upload/00000001_000.png"], config=ls_request("setup")["schema"])
    small["project"] = "7.123"
    full = ls_predict_body(ls_request, ["/data/upload/00000001_000.png"])
    full["project"] = "8.456"
    small_probs = client.post("/predict", json=small).json()["results"][0]["result"][0]["probabilities"]
    full_probs = client.post("/predict", json=full).json()["results"][0]["result"][0]["probabilities"]
    assert list(small_probs) == ["Cardiomegaly", "Effusion", "Nodule"]
    assert len(full_probs) == 14
    registry = client.app.state.registry
    first = registry.get("7", ("Cardiomegaly", "Effusion", "Nodule")).model
    client.post("/predict", json=small)
    assert registry.get("7", ("Cardiomegaly", "Effusion", "Nodule")).model is first  # loaded once, not per request
    # the project's label set changes: a new version keeps the known findings' head rows
    changed = small["label_config"].replace(
        '<Choice value="Nodule"/>', '<Choice value="Nodule"/><Choice value="Mass"/>'
    )
    small["label_config"] = changed
    # /predict never changes the model (a caller could otherwise swap what everyone sees): a clear 422 ...
    refused = client.post("/predict", json=small)
    assert refused.status_code == 422 and "/setup" in refused.json()["error"]
    assert client.app.state.registry.store.live_version("7") == "v0"
    # ... and the change arrives through /setup, as Label Studio sends it on every connection check
    assert client.post("/setup", json={"project": "7.123", "schema": changed}).json() == {"model_version": "v1"}
    answer = client.post("/predict", json=small).json()
    assert answer["model_version"] == "v1"
    probabilities = answer["results"][0]["result"][0]["probabilities"]
    assert list(probabilities) == ["Cardiomegaly", "Effusion", "Nodule", "Mass"]
    for label in ["Cardiomegaly", "Effusion", "Nodule"]:
        assert probabilities[label] == pytest.approx(small_probs[label], abs=1e-3)


def test_basic_auth_on_every_route(settings, ls_request) -> None:
    secured = replace(settings, basic_auth_user="ls", basic_auth_pass="s3cret", webhook_secret="hook-secret")
    with TestClient(create_app(secured)) as client:
        assert client.get("/health").status_code == 401
        assert client.post("/setup", json=ls_request("setup")).status_code == 401
        good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
        bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
        assert client.get("/health", headers=good).status_code == 200
        assert client.get("/health", headers=bad).status_code == 401
        assert client.post("/setup", json=ls_request("setup"), headers=good).json() == {"model_version": "v0"}
        assert client.get("/versions", headers=good).status_code == 200
        # Label Studio sends no basic auth on its automatic webhook: the shared secret is accepted there only
        event = {"action": "TASKS_CREATED", "project": {"id": 2}}
        assert client.post("/webhook", json=event).status_code == 401
        assert client.post("/webhook", json=event, headers={"X-Webhook-Secret": "hook-secret"}).status_code == 200
        assert client.post("/webhook?token=hook-secret", json=event).status_code == 200
        assert client.get("/health", headers={"X-Webhook-Secret": "hook-secret"}).status_code == 401


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
