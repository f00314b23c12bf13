"""What the webhook's validation costs: parse_annotation (RLE stream walk, PNG header, geometry) and the whole
handler (validation + Redis write + job coalescing), per region kind and size, on real NIH images.

Run from the project root (needs ../shared/data; ~1 minute on 2 shared cores)::

    .venv/bin/python bench/bench_webhook_validation.py

In-process, with a real redis-server (``scratch_redis``); HTTP and JSON parsing are not included (they are in
bench_webhook.py). Writes ``bench/results/webhook_validation.md``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml_backend.config import Settings  # noqa: E402
from ml_backend.explain.bitmask_png import encode_heat_png  # noqa: E402
from ml_backend.explain.brush_rle import encode_alpha, heatmap_to_alpha  # noqa: E402
from ml_backend.feedback.annotations import parse_annotation  # noqa: E402
from ml_backend.feedback.queue import scratch_redis  # noqa: E402
from ml_backend.feedback.webhook import WebhookHandler  # noqa: E402
from ml_backend.io.label_config import parse_label_config  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="findings" toName="image" choice="multiple"><Choice value="Cardiomegaly"/><Choice value="Effusion"/>
</Choices>
<BrushLabels name="paint" toName="image"><Label value="Cardiomegaly"/><Label value="Artifact"/></BrushLabels>
<RectangleLabels name="box" toName="image"><Label value="Cardiomegaly"/></RectangleLabels>
<PolygonLabels name="outline" toName="image"><Label value="Cardiomegaly"/></PolygonLabels>
<BitmaskLabels name="heat" toName="image"><Label value="Cardiomegaly"/></BitmaskLabels></View>"""
REPS = 30


def image(size: int) -> np.ndarray:
    folder = SHARED / "nih_hires" / f"images_{size}"
    return np.asarray(Image.open(sorted(folder.glob("*.png"))[0]).convert("L"))


def region(kind: str, name: str, value: dict, w: int, h: int) -> dict:
    size = {"original_width": w, "original_height": h}
    return {"type": kind, "from_name": name, "to_name": "image", **size, "value": value}


def cases() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for size in (256, 1024):
        pixels = image(size)
        h, w = pixels.shape
        binary = np.zeros((h, w), np.uint8)
        binary[h // 4 : h // 2, w // 4 : w // 2] = 255
        graded = heatmap_to_alpha(pixels.astype(np.float32) / 255, 64, 0.2)  # a heatmap-like graded alpha
        out[f"brush binary {w}x{h}"] = [
            region("brushlabels", "paint", {"format": "rle", "rle": list(encode_alpha(binary)),
                                            "brushlabels": ["Cardiomegaly"]}, w, h)]  # fmt: skip
        rle = list(encode_alpha(graded))
        out[f"brush graded {w}x{h} ({len(rle) // 1024} KiB)"] = [
            region("brushlabels", "paint", {"format": "rle", "rle": rle, "brushlabels": ["Cardiomegaly"]}, w, h)
        ]
        out[f"brush graded {w}x{h}, truncated"] = [
            region("brushlabels", "paint", {"format": "rle", "rle": rle[:-50], "brushlabels": ["Cardiomegaly"]}, w, h)
        ]
        out[f"bitmask graded PNG {w}x{h}"] = [
            region("bitmasklabels", "heat", {"imageDataURL": encode_heat_png(graded),
                                             "bitmasklabels": ["Cardiomegaly"]}, w, h)]  # fmt: skip
    manifest = json.loads((SHARED / "nih1000" / "manifest.json").read_text())
    polygon = max((r["polygon"] for e in manifest for r in e.get("chestxdet") or [] if r.get("polygon")), key=len)
    out[f"rectangle + ChestX-Det polygon ({len(polygon)} points)"] = [
        region("rectanglelabels", "box", {"x": 10, "y": 10, "width": 30, "height": 20, "rotation": 15,
                                          "rectanglelabels": ["Cardiomegaly"]}, 1024, 1024),
        region("polygonlabels", "outline", {"points": [[x / 10.24, y / 10.24] for x, y in polygon],
                                            "polygonlabels": ["Cardiomegaly"]}, 1024, 1024),
    ]  # fmt: skip
    return out


def ms(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50) * 1000), float(np.percentile(values, 99) * 1000)


def main() -> None:
    schema = parse_label_config(CONFIG)
    server = scratch_redis()
    url = server.start()
    try:
        settings = Settings(redis_url=url)
        handler = WebhookHandler(settings)
        rows = []
        for i, (name, regions) in enumerate(cases().items()):
            results = [{"type": "choices", "from_name": "findings", "to_name": "image",
                        "value": {"choices": ["Cardiomegaly"]}}, *regions]  # fmt: skip
            annotation = {"id": i + 1, "result": results}
            task = {"id": i + 1, "data": {"image": "/data/upload/x.png", "PatientSex": "F", "PatientAge": "058Y"}}
            parse_t, handle_t = [], []
            skipped = 0
            for _ in range(REPS):
                t = time.perf_counter()
                record = parse_annotation("1", annotation, task, schema, settings=settings)
                parse_t.append(time.perf_counter() - t)
                if record is None:
                    raise RuntimeError(f"{name}: parse_annotation read the annotation as cancelled")
                skipped = len(record.skipped)
                body = {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": CONFIG},
                        "annotation": annotation, "task": task}  # fmt: skip
                t = time.perf_counter()
                status, _ = handler.handle(body)
                handle_t.append(time.perf_counter() - t)
                assert status == 200
            (p50, p99), (h50, h99) = ms(parse_t), ms(handle_t)
            rows.append(f"| {name} | {p50:.2f} | {p99:.2f} | {h50:.2f} | {h99:.2f} | {skipped} |")
            print(rows[-1], flush=True)
    finally:
        server.stop()
    text = "\n".join(
        [
            "# Webhook validation cost (`bench/bench_webhook_validation.py`)",
            "",
            "Command: `.venv/bin/python bench/bench_webhook_validation.py` "
            f"({platform.processor() or platform.machine()}, Python {platform.python_version()}, 2 shared cores, "
            f"{REPS} repetitions each, in-process, real redis-server; HTTP and JSON parsing not included).",
            "",
            "`parse` = `parse_annotation` (RLE byte/header/length checks and, up to 256 KiB, the chunk walk; PNG IHDR;",
            "geometry checks); `handle` = the whole webhook handler (parse + Redis write + job coalescing).",
            "",
            "| payload | parse p50 ms | parse p99 ms | handle p50 ms | handle p99 ms | items skipped |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "A truncated stream above 256 KiB passes the webhook's cheap checks (0 skipped above) and is skipped,",
            "with its reason, when training decodes it; the rest of that annotation is kept either way.",
            "",
        ]
    )
    out = ROOT / "bench" / "results" / "webhook_validation.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
