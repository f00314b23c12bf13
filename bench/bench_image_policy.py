"""Bounded /predict: slow-host isolation and memory per request (bench/results/image_policy.md).

    .venv/bin/python bench/bench_image_policy.py                # this tree
    PYTHONPATH=/tmp/old .venv/bin/python bench/bench_image_policy.py   # an older ml_backend, for comparison

Isolation: a 9-task /predict whose images are on a host that accepts and never answers, and, 0.5 s later, a
one-image /predict from another client (image from a Label Studio-like file server); FETCH_TIMEOUT_S=6,
PREDICT_DEADLINE_S=8 (where the tree has it). Memory: tracemalloc peak of ``Predictor.predict`` on 4 and 16 tasks
of 1024x1024 PNGs read from disk, batch 2, no heatmaps.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import tempfile
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from ml_backend.config import Settings

ROOT = Path(__file__).resolve().parents[1]
NIH_IMAGE = ROOT.parent / "shared" / "data" / "nih1000" / "images" / "00000001_000.png"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="findings" toName="image" choice="multiple">'
    '<Choice value="Effusion"/><Choice value="Nodule"/></Choices></View>'
)


def settings(**wanted) -> Settings:
    known = {f.name for f in dataclasses.fields(Settings)}
    return dataclasses.replace(Settings(), **{k: v for k, v in wanted.items() if k in known})


def file_server(root: Path) -> str:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            path = root / self.path.rsplit("/", 1)[-1]
            body = path.read_bytes() if path.is_file() else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def isolation(work: Path) -> dict:
    from fastapi.testclient import TestClient

    from ml_backend.serve.app import create_app

    shutil.copy(NIH_IMAGE, work / "one.png")
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    ls = file_server(work)
    config = settings(
        model_dir=work / "models",
        label_studio_url=ls,
        label_studio_api_key=TOKEN,
        image_allow_hosts=("127.0.0.1",),
        fetch_timeout_s=6.0,
        predict_deadline_s=8.0,
    )
    one = {"tasks": [{"id": 1, "data": {"image": "/data/upload/one.png"}}], "label_config": CONFIG}
    stuck = {
        "tasks": [{"id": i, "data": {"image": f"http://127.0.0.1:{hole.getsockname()[1]}/{i}.png"}} for i in range(9)],
        "label_config": CONFIG,
    }
    out: dict = {}
    with TestClient(create_app(config)) as client:
        client.post("/predict", json=one)  # model load
        t0 = time.monotonic()
        client.post("/predict", json=one)
        out["one_image_alone_s"] = round(time.monotonic() - t0, 3)

        def slow() -> None:
            t = time.monotonic()
            client.post("/predict", json=stuck)
            out["black_hole_request_s"] = round(time.monotonic() - t, 2)

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        client.post("/predict", json=one)
        out["one_image_beside_black_hole_s"] = round(time.monotonic() - t0, 3)
        thread.join()
    hole.close()
    return out


def memory(work: Path) -> dict:
    from ml_backend.io.label_config import parse_label_config
    from ml_backend.models.registry import ModelRegistry
    from ml_backend.serve.predictor import Predictor

    side, rng = 1024, np.random.default_rng(0)
    for i in range(16):
        pixels = (np.add.outer(np.arange(side), np.arange(side)) // 16 + rng.integers(0, 4, (side, side))) % 256
        Image.fromarray(pixels.astype(np.uint8)).save(work / f"big{i}.png")
    config = settings(model_dir=work / "models-mem", image_roots=(work,), predict_batch_size=2, fetch_per_request=2)
    schema = parse_label_config(CONFIG)
    loaded = ModelRegistry(config).get("p", schema.findings)
    predictor = Predictor(config)
    out = {}
    for n in (2, 4, 16):
        tasks = [{"id": i, "data": {"image": str(work / f"big{i}.png")}} for i in range(n)]
        tracemalloc.start()
        results = predictor.predict(tasks, schema, loaded)
        out[f"peak_MiB_{n}_tasks"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
        assert all(r["result"] for r in results), results
    out.pop("peak_MiB_2_tasks")  # warm-up
    out["decoded_MiB_per_image"] = side * side * 4 / 2**20
    return out


def main() -> None:
    import ml_backend

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"ml_backend": str(Path(ml_backend.__file__).parent), **isolation(work), **memory(work)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
