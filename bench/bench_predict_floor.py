"""How close /predict at clinical resolution can get to the bare forward: the floor under issue 14's >= 0.8x.

Run from the project root::

    .venv/bin/python bench/bench_predict_floor.py --reps 3

On 32 tasks of 2048x2500 PNG films (the 8 NIH 1024 px originals upsampled under /tmp, as in
``bench_heatmap_png.py --only predict``), interleaved in one process:

* ``bare``: the model on tensors already resized to the input size (the issue's baseline);
* ``decode``: only decoding the 32 PNGs to float pixels, on as many threads as cores (what the app's fetch
  pool does); no model, no heatmaps;
* ``decode + resize + forward``: what /predict must do before any heatmap;
* ``/predict`` (BitmaskLabels config): ``Predictor.predict`` + orjson, 4 natural-size PNG heatmaps per task.

Throughput ratios are the bare time over each variant's time (median of per-round ratios). If ``decode`` alone
is slower than 1.25x the bare forward, 0.8x is out of reach whatever the heatmaps cost.

Writes ``bench/results/predict_floor.json`` and ``predict_floor.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_heatmap_png import BITMASK_CONFIG, HIRES, WORK, H, W, upscaled_xrays  # noqa: E402
from common import apply_threads, command_line, interleaved, md_table, paired_ratio, write_results  # noqa: E402

from ml_backend.config import Settings  # noqa: E402
from ml_backend.io.label_config import parse_label_config  # noqa: E402
from ml_backend.models.classifier import to_input_tensor  # noqa: E402
from ml_backend.models.registry import ModelRegistry  # noqa: E402
from ml_backend.serve.predictor import Predictor  # noqa: E402


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def measure(reps: int, n_tasks: int) -> dict[str, Any]:
    files = upscaled_xrays(8)
    settings = replace(Settings(), model_dir=WORK / "models", image_roots=(WORK,), max_image_pixels=64_000_000)
    schema = parse_label_config(BITMASK_CONFIG)
    loaded = ModelRegistry(settings).get("1", schema.findings)
    predictor = Predictor(settings)
    tasks = [{"id": i, "data": {"image": str(files[i % len(files)])}} for i in range(n_tasks)]
    paths = [files[i % len(files)] for i in range(n_tasks)]
    batch = settings.predict_batch_size
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    x = to_input_tensor(list(pool.map(decode, paths)), loaded.input_size, loaded.mean, loaded.std)

    def forward(tensor: torch.Tensor) -> None:
        with torch.inference_mode():
            for start in range(0, n_tasks, batch):
                loaded.model(tensor[start : start + batch])

    def decode_all() -> list[np.ndarray]:
        return list(pool.map(decode, paths))

    def decode_forward() -> None:
        forward(to_input_tensor(decode_all(), loaded.input_size, loaded.mean, loaded.std))

    def predict() -> None:
        orjson.dumps({"results": predictor.predict(tasks, schema, loaded)}, option=orjson.OPT_SERIALIZE_NUMPY)

    variants = {
        "bare": lambda: forward(x),
        "decode": decode_all,
        "decode_resize_forward": decode_forward,
        "predict_bitmask": predict,
    }
    times = interleaved(variants, reps, warmup=1)
    pool.shutdown()
    out: dict[str, Any] = {"tasks": n_tasks, "batch": batch, "image": f"{W}x{H}", "reps": reps}
    for name, t in times.items():
        out[name] = {
            "seconds_median": round(statistics.median(t), 3),
            "tasks_per_s": round(n_tasks / statistics.median(t), 2),
        }
        out[name]["throughput_vs_bare"] = paired_ratio(times["bare"], t)
    out["predict_vs_decode_resize_forward"] = paired_ratio(times["decode_resize_forward"], times["predict_bitmask"])
    return out


def markdown(res: dict[str, Any]) -> list[str]:
    labels = {
        "bare": "bare forward (preprocessed tensors)",
        "decode": "decode the 32 PNGs only (no model)",
        "decode_resize_forward": "decode + resize + forward (no heatmaps)",
        "predict_bitmask": "/predict, BitmaskLabels (4 PNG heatmaps per task) + orjson",
    }
    rows = [
        [labels[k], res[k]["seconds_median"], res[k]["tasks_per_s"], res[k]["throughput_vs_bare"]["median_of_ratios"]]
        for k in labels
    ]
    decode_ratio = res["decode"]["throughput_vs_bare"]["median_of_ratios"]
    verdict = (
        "cannot be met on this CPU whatever the heatmaps cost"
        if decode_ratio < 0.8
        else "is not ruled out by decoding alone"
    )
    return [
        f"## 32 tasks of {res['image']} PNG films, batch {res['batch']}, {res['reps']} interleaved rounds\n\n"
        f"Produced by `{res['command']}`.\n\n"
        + md_table(["variant", "s (median)", "tasks/s", "throughput vs bare forward"], rows)
        + f"\n\n/predict over decode + resize + forward: "
        f"{res['predict_vs_decode_resize_forward']['median_of_ratios']}x the throughput (the cost of the heatmaps "
        "and the response).\n\n"
        f"Reading: decoding the input films alone runs at {decode_ratio}x the bare forward's throughput "
        f"({'below' if decode_ratio < 0.8 else 'above'} 0.8x), before any resize, model or heatmap, so "
        "/predict >= 0.8x the bare forward "
        f"{verdict}."
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    apply_threads(args.threads)
    if not HIRES.is_dir():
        sys.exit(f"this benchmark needs {HIRES}")
    res = measure(args.reps, args.tasks)
    res["command"] = command_line()
    md, _ = write_results("predict_floor", "/predict at clinical resolution: the floor", markdown(res), res)
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
