"""Serving benchmarks: heatmap cost vs the plain forward, vs pytorch-grad-cam, and /predict end to end.

Run from the project root (needs ../shared/data; ~4 minutes on 2 shared cores)::

    .venv/bin/python bench/bench_serving.py
    .venv/bin/python bench/bench_serving.py --quick          # fewer repetitions (~2 minutes)
    .venv/bin/python bench/bench_serving.py --only cost,gradcam,predict,breakdown

Parts:

1. ``cost``: ``model(x)`` vs ``HeatmapExplainer(model).logits_and_cams(x)`` + ``normalise_maps`` for resnet18 at
   224 px, batch 8 and 32, in ``torch.inference_mode()``; the same with OUTPUT_STRIDE=16 (14x14 maps), relative
   to its own plain forward and to the stride-32 forward. Target: <= 1.15x.
2. ``gradcam``: the same 14 maps from ``pytorch_grad_cam.GradCAM`` (``target_layers=[model.layer4]``, one
   ``ClassifierOutputTarget(k)`` call per finding), both upsampled to 224x224; checks the maps agree. Target: >= 20x.
3. ``predict``: the real app under uvicorn in a subprocess, images served by a Label Studio-like file server
   (``/data/upload`` with token auth), a Label Studio 1.23.2 /predict body with 32 tasks: 32 NIH 64x64 images and
   32 tasks on the two 512x512 scans, interleaved with the bare ``model(x)`` on the same decoded, resized images
   (batch 32 and batch 16 = PREDICT_BATCH_SIZE). Reports tasks/s, the ratio (target >= 0.8), /metrics breakdown,
   response bytes, heatmaps per image, and the server's peak RSS (VmHWM).
4. ``breakdown``: the same requests' stages timed in-process (fetch+decode, model, upsample, alpha, RLE,
   response serialisation as FastAPI does it), to show what dominates the gap.

Writes ``bench/results/serving.json`` and ``bench/results/serving.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    CHEST_CONFIG,
    FULLRES,
    NIH,
    RESULTS,
    SHARED,
    TOKEN,
    AppServer,
    apply_threads,
    environment,
    exit_on_sigterm,
    interleaved,
    label_studio_files,
    loaded_images,
    ls_body,
    md_table,
    median,
    nih_manifest,
    paired_ratio,
    proc_status,
    require_shared,
    reset_peak_rss,
    summary,
    verdict,
    write_results,
)

from ml_backend.config import Settings
from ml_backend.explain.brush_rle import encode_alpha, heatmap_to_alpha
from ml_backend.explain.cam import HeatmapExplainer, normalise_maps, upsample_maps
from ml_backend.io.images import decode_image, load_image
from ml_backend.io.label_config import parse_label_config
from ml_backend.models.classifier import build_classifier, normalisation, to_input_tensor

INPUT = 224
FINDINGS = 14
COST_TARGET = 1.15
GRADCAM_TARGET = 20.0
PREDICT_TARGET = 0.8
FULL_NAMES = ["00000001_000.png", "00027426_000.png"]


def nih_images(n: int) -> list[np.ndarray]:
    return [decode_image((NIH / r["image"]).read_bytes(), 10**9).pixels for r in nih_manifest()[:n]]


def model_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """resnet18 with 14 outputs at output stride 32 and the same weights at stride 16 (dilated layer4)."""
    torch.manual_seed(0)
    s32 = build_classifier("resnet18", FINDINGS).eval()
    s16 = build_classifier("resnet18", FINDINGS, output_stride=16).eval()
    s16.load_state_dict(s32.state_dict())
    return s32, s16


# --------------------------------------------------------------------------------------------- 1. cost


def part_cost(batches: list[int], reps: int, budget_s: float) -> dict[str, Any]:
    s32, s16 = model_pair()
    mean, std = normalisation(s32)
    e32, e16 = HeatmapExplainer(s32), HeatmapExplainer(s16)
    assert e32.fast_path and e16.fast_path, "resnet18's head should take the one-pass CAM path"
    images = nih_images(max(batches))
    out: dict[str, Any] = {"fast_path": {"stride32": e32.fast_path, "stride16": e16.fast_path}, "batches": {}}
    for batch in batches:
        x = to_input_tensor(images[:batch], INPUT, mean, std)

        def plain(model: torch.nn.Module = s32, x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        def cams(explainer: HeatmapExplainer = e32, x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                logits, maps = explainer.logits_and_cams(x)
                normalise_maps(maps)

        with torch.inference_mode():
            grid32 = tuple(e32.logits_and_cams(x[:1])[1].shape[-2:])
            grid16 = tuple(e16.logits_and_cams(x[:1])[1].shape[-2:])
            same = torch.allclose(s32(x[:2]), e32.logits_and_cams(x[:2])[0], atol=1e-4)
        times = interleaved(
            {
                "plain_s32": plain,
                "cams_s32": cams,
                "plain_s16": partial(plain, s16, x),
                "cams_s16": partial(cams, e16, x),
            },
            reps,
            budget_s=budget_s * batch / 32,
        )
        row: dict[str, Any] = {
            "batch": batch,
            "grid_s32": grid32,
            "grid_s16": grid16,
            "logits_match_model": bool(same),
            "seconds": {k: summary(v) for k, v in times.items()},
            "images_per_s": {k: round(batch / median(v), 2) for k, v in times.items()},
            "ratio_cams_vs_plain_s32": paired_ratio(times["cams_s32"], times["plain_s32"]),
            "ratio_cams_vs_plain_s16": paired_ratio(times["cams_s16"], times["plain_s16"]),
            "ratio_cams_s16_vs_plain_s32": paired_ratio(times["cams_s16"], times["plain_s32"]),
            "ratio_plain_s16_vs_plain_s32": paired_ratio(times["plain_s16"], times["plain_s32"]),
        }
        row["target_met"] = row["ratio_cams_vs_plain_s32"]["median_of_ratios"] <= COST_TARGET
        out["batches"][str(batch)] = row
        print(f"[cost] batch {batch}: {json.dumps(row)}", flush=True)
    return out


# --------------------------------------------------------------------------------------------- 2. grad-cam


def part_gradcam(batches: list[int], reps: int, budget_s: float) -> dict[str, Any]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    s32, _ = model_pair()
    mean, std = normalisation(s32)
    ours_model = s32
    theirs_model = copy.deepcopy(s32)  # grad-cam keeps hooks on its model: keep them off ours
    explainer = HeatmapExplainer(ours_model)
    gradcam = GradCAM(model=theirs_model, target_layers=[theirs_model.layer4])
    images = nih_images(max(batches))
    out: dict[str, Any] = {"package": _version("grad-cam"), "batches": {}}
    for batch in batches:
        x = to_input_tensor(images[:batch], INPUT, mean, std)

        def ours(x: torch.Tensor = x) -> np.ndarray:
            with torch.inference_mode():
                _, maps = explainer.logits_and_cams(x)
                return upsample_maps(normalise_maps(maps), INPUT, INPUT).numpy()  # (B, 14, 224, 224)

        def theirs(x: torch.Tensor = x, batch: int = batch) -> np.ndarray:
            maps = [gradcam(input_tensor=x, targets=[ClassifierOutputTarget(k)] * batch) for k in range(FINDINGS)]
            return np.stack(maps, axis=1)  # (B, 14, 224, 224)

        ours()  # warm-up (grad-cam's first call is timed: it has nothing to warm beyond what ours warmed)
        outputs: dict[str, np.ndarray] = {}

        def keep(name: str, fn: Any, outputs: dict[str, np.ndarray] = outputs) -> None:
            outputs[name] = fn()

        times = interleaved(
            {"ours": partial(keep, "ours", ours), "grad_cam": partial(keep, "grad_cam", theirs)},
            reps,
            warmup=0,
            budget_s=budget_s,
            min_reps=2,
        )
        a, b = outputs["ours"], outputs["grad_cam"]
        diff = np.abs(a - b)
        flat_a, flat_b = a.reshape(-1, INPUT * INPUT), b.reshape(-1, INPUT * INPUT)
        corr = [float(np.corrcoef(u, v)[0, 1]) for u, v in zip(flat_a, flat_b, strict=True) if u.std() and v.std()]
        row: dict[str, Any] = {
            "batch": batch,
            "maps": list(a.shape),
            "max_abs_diff": round(float(diff.max()), 4),
            "mean_abs_diff": round(float(diff.mean()), 5),
            "min_correlation": round(min(corr), 5) if corr else None,
            "seconds": {k: summary(v) for k, v in times.items()},
            "speedup": paired_ratio(times["grad_cam"], times["ours"]),
        }
        row["target_met"] = row["speedup"]["median_of_ratios"] >= GRADCAM_TARGET
        out["batches"][str(batch)] = row
        print(f"[gradcam] batch {batch}: {json.dumps(row)}", flush=True)
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------- 3. /predict


def predict_body(refs: list[str]) -> bytes:
    """Label Studio 1.23.2's /predict body with our 32 tasks substituted and the chest X-ray config."""
    body = ls_body("predict")
    template = body["tasks"][0]
    body["tasks"] = [{**template, "id": 100 + i, "data": {"image": ref}} for i, ref in enumerate(refs)]
    body["label_config"] = CHEST_CONFIG
    return json.dumps(body).encode()


def workloads(n: int) -> dict[str, dict[str, Any]]:
    nih = [r["image"] for r in nih_manifest()[:n]]
    full = [FULL_NAMES[i % len(FULL_NAMES)] for i in range(n)]
    return {
        "nih64": {
            "label": f"{n} NIH 64x64",
            "refs": [f"/data/upload/nih1000/{p}" for p in nih],
            "pixels": [decode_image((NIH / p).read_bytes(), 10**9).pixels for p in nih],
        },
        "full512": {
            "label": f"{n} x 512x512 (the two full-size scans)",
            "refs": [f"/data/upload/nih_fullres/{p}" for p in full],
            "pixels": [decode_image((FULLRES / p).read_bytes(), 10**9).pixels for p in full],
        },
    }


def count_heatmaps(answer: dict[str, Any]) -> list[int]:
    return [sum(1 for item in r["result"] if item.get("type") == "brushlabels") for r in answer["results"]]


def part_predict(
    n: int,
    reps: int,
    budget_s: float,
    levels_variant: int | None,
    heatmaps_variant: float | None,
    uncapped_variant: bool,
    work: Path,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    import httpx

    loads = workloads(n)
    s32, _ = model_pair()
    mean, std = normalisation(s32)
    tensors = {name: to_input_tensor(w["pixels"], INPUT, mean, std) for name, w in loads.items()}
    with torch.inference_mode():
        bare_probs = {name: torch.sigmoid(s32(x)).numpy() for name, x in tensors.items()}
    batch_setting = Settings().predict_batch_size
    bodies = {name: predict_body(w["refs"]) for name, w in loads.items()}
    out: dict[str, Any] = {
        "tasks_per_request": n,
        "predict_batch_size": batch_setting,
        "heatmap_max_findings": Settings().heatmap.max_findings,
        "workloads": {},
    }
    # variants of the full-size request, each on its own server: fewer alpha levels, and a threshold that lets
    # through as many findings per image as a trained model would (the untrained one passes ~half of them)
    variant_env: dict[str, dict[str, str]] = {}
    if levels_variant:
        variant_env[f"levels{levels_variant}"] = {"HEATMAP_LEVELS": str(levels_variant)}
    if uncapped_variant:
        variant_env["all_heatmaps"] = {"HEATMAP_MAX_FINDINGS": "0"}
    if heatmaps_variant:
        flat = np.sort(bare_probs["full512"].ravel())[::-1]
        k = max(1, round(heatmaps_variant * len(bare_probs["full512"])))
        threshold = float((flat[k - 1] + flat[k]) / 2)
        variant_env["fewer_heatmaps"] = {"THRESHOLD": f"{threshold:.9f}"}
        out["fewer_heatmaps_threshold"] = threshold
    with contextlib.ExitStack() as stack:
        files_url, counter = stack.enter_context(label_studio_files(SHARED))
        env = {
            "MODEL_DIR": str(work / "models"),
            "LABEL_STUDIO_URL": files_url,
            "LABEL_STUDIO_API_KEY": TOKEN,
            "INPUT_SIZE": str(INPUT),
            "BACKBONE": "resnet18",
            **extra_env,
        }
        app = stack.enter_context(AppServer(env, work / "app.log"))
        out["server_rss_kb_after_start"] = proc_status(app.pid)
        servers = {"default": app}
        for name, overrides in variant_env.items():
            servers[name] = stack.enter_context(
                AppServer({**env, **overrides, "MODEL_DIR": str(work / f"models-{name}")}, work / f"app-{name}.log")
            )
        client = stack.enter_context(httpx.Client(timeout=600))
        records: dict[str, list[dict[str, Any]]] = {}

        def post(name: str, server: str = "default") -> None:
            url = servers[server].url
            before = client.get(url + "/metrics?format=json").json()["predict"]
            started = time.perf_counter()
            with client.stream(
                "POST", url + "/predict", content=bodies[name], headers={"Content-Type": "application/json"}
            ) as response:
                first_byte = time.perf_counter()  # headers in: the app has serialised the whole body
                content = response.read()
            wall = time.perf_counter() - started
            after = client.get(url + "/metrics?format=json").json()["predict"]
            assert response.status_code == 200, content[:500]
            answer = json.loads(content)
            heat = count_heatmaps(answer)
            assert len(answer["results"]) == n and all(r["result"] for r in answer["results"])
            served = np.array(
                [
                    [r["result"][0]["probabilities"][f] for f in parse_label_config(CHEST_CONFIG).findings]
                    for r in answer["results"]
                ]
            )
            records.setdefault(f"{server}:{name}", []).append(
                {
                    "wall_s": wall,
                    "time_to_first_byte_s": first_byte - started,
                    "body_transfer_s": wall - (first_byte - started),
                    "bytes": len(content),
                    "heatmaps_per_image": sum(heat) / len(heat),
                    "model_version": answer.get("model_version"),
                    "max_prob_diff_vs_bare_model": float(np.abs(served - bare_probs[name]).max()),
                    "failed_tasks": after["failed_tasks"] - before["failed_tasks"],
                    **{
                        k: after[k] - before[k]
                        for k in ("seconds_total", "seconds_fetch", "seconds_model", "seconds_heatmaps")
                    },
                }
            )

        def bare(name: str, batch: int) -> None:
            x = tensors[name]
            with torch.inference_mode():
                for start in range(0, len(x), batch):
                    s32(x[start : start + batch])

        # warm-up: the first request creates v0 (built with torch.manual_seed(0) like ours: same weights, checked
        # below through the served probabilities) and primes oneDNN; the bare variants are warmed too
        for name in loads:
            post(name)
            bare(name, 32)
            bare(name, batch_setting)
        for server in variant_env:
            post("full512", server)
        records.clear()
        variants: dict[str, Any] = {}
        for name in loads:
            variants[f"e2e_{name}"] = partial(post, name)
            variants[f"bare32_{name}"] = partial(bare, name, 32)
            variants[f"bare{batch_setting}_{name}"] = partial(bare, name, batch_setting)
        for server in variant_env:
            variants[f"e2e_full512_{server}"] = partial(post, "full512", server)
        times = interleaved(variants, reps, warmup=0, budget_s=budget_s, settle_s=0.2)
        out["rounds"] = len(next(iter(times.values())))
        out["server_rss_kb_after_timing"] = proc_status(app.pid)

        timed_records = {k: list(v) for k, v in records.items()}  # one per round, in round order
        # peak memory per workload: reset the high-water mark, run one request, read VmHWM
        peaks: dict[str, Any] = {}
        for name in loads:
            ok = reset_peak_rss(app.pid)
            post(name)
            peaks[name] = {"reset_ok": ok, **proc_status(app.pid)}
        out["peak_rss_kb"] = peaks

        def row_for(name: str, reqs: list[dict[str, Any]]) -> dict[str, Any]:
            # the request's own wall time (the variant's timing also holds the /metrics calls and the client's
            # JSON parsing), paired with the bare forward of the same round
            e2e = [r["wall_s"] for r in reqs]
            b32, bset = times[f"bare32_{name}"], times[f"bare{batch_setting}_{name}"]
            med = {k: round(median([r[k] for r in reqs]), 4) for k in reqs[0] if isinstance(reqs[0][k], float)}
            row = {
                "label": loads[name]["label"],
                "e2e_s": summary(e2e),
                "bare32_s": summary(b32),
                f"bare{batch_setting}_s": summary(bset),
                "e2e_tasks_per_s": round(n / median(e2e), 2),
                "bare32_images_per_s": round(n / median(b32), 2),
                f"bare{batch_setting}_images_per_s": round(n / median(bset), 2),
                # throughput ratio = bare time / e2e time, per interleaved round
                "ratio_vs_bare32": paired_ratio(b32, e2e),
                f"ratio_vs_bare{batch_setting}": paired_ratio(bset, e2e),
                "server_breakdown_s": {
                    k: med[k] for k in ("seconds_fetch", "seconds_model", "seconds_heatmaps", "seconds_total")
                },
                # between the predictor's return and the first response byte: FastAPI's response serialisation
                # (and the request's JSON parsing + model lookup before the predictor starts)
                "serialisation_etc_s": round(med["time_to_first_byte_s"] - med["seconds_total"], 4),
                "body_transfer_s": med["body_transfer_s"],
                "response_bytes": int(median([r["bytes"] for r in reqs])),
                "heatmaps_per_image": round(median([r["heatmaps_per_image"] for r in reqs]), 3),
                "max_prob_diff_vs_bare_model": max(r["max_prob_diff_vs_bare_model"] for r in reqs),
                "failed_tasks": sum(r["failed_tasks"] for r in reqs),
                "requests": reqs,
            }
            row["target_met"] = row["ratio_vs_bare32"]["median_of_ratios"] >= PREDICT_TARGET
            return row

        for name in loads:
            row = row_for(name, timed_records[f"default:{name}"])
            row["peak_rss_mb"] = round(peaks[name].get("VmHWM", 0) / 1024, 1)
            out["workloads"][name] = row
            print(f"[predict] {name}: {json.dumps({k: v for k, v in row.items() if k != 'requests'})}", flush=True)
        out["variants"] = {}
        for server, overrides in variant_env.items():
            row = row_for("full512", timed_records[f"{server}:full512"])
            row["settings"] = overrides
            row["label"] += ", " + ", ".join(f"{k}={v}" for k, v in overrides.items())
            out["variants"][server] = row
            print(f"[predict] {server}: {json.dumps({k: v for k, v in row.items() if k != 'requests'})}", flush=True)
        out["file_server_requests"] = counter.get("requests", 0)
    return out


# --------------------------------------------------------------------------------------------- 4. breakdown


def _build(settings: Any, schema: Any, loaded: Any, output: Any, images: list, i: int) -> dict[str, Any]:
    from ml_backend.inference.results import build_prediction

    image = images[i]
    return build_prediction(
        settings.heatmap, schema, loaded, output.probabilities[i], output.cams[i], image.width, image.height
    )


def part_breakdown(n: int, reps: int, work: Path) -> dict[str, Any]:
    """Stages of one /predict request, timed in this process with the predictor's own code paths."""
    from pydantic import TypeAdapter
    from starlette.responses import JSONResponse

    from ml_backend.inference.model_outputs import run_model
    from ml_backend.models.registry import ModelRegistry
    from ml_backend.serve.predictor import Predictor

    loads = workloads(n)
    schema = parse_label_config(CHEST_CONFIG)
    adapter = TypeAdapter(dict[str, Any])  # what FastAPI 0.11x+ does with the route's return annotation
    out: dict[str, Any] = {}
    with label_studio_files(SHARED) as (files_url, _):
        settings = replace(
            Settings(),
            model_dir=work / "models-breakdown",
            label_studio_url=files_url,
            label_studio_api_key=TOKEN,
            input_size=INPUT,
        )
        registry = ModelRegistry(settings)
        loaded = registry.get("2", schema.findings)
        predictor = Predictor(settings)
        http = predictor.images.fetcher  # the same source policy and connection pool as the server
        for name, w in loads.items():
            tasks = [{"id": i, "data": {"image": ref}} for i, ref in enumerate(w["refs"])]
            stage: dict[str, list[float]] = {}

            def add(key: str, seconds: float, stage: dict[str, list[float]] = stage) -> None:
                stage.setdefault(key, []).append(seconds)

            for rep in range(reps + 1):
                t0 = time.perf_counter()
                images = loaded_images(predictor.images.load_all(tasks, schema))  # 8 threads, as in the server
                t1 = time.perf_counter()
                for ref in w["refs"][:8]:
                    load_image(ref, settings, http)
                t2 = time.perf_counter()
                output = run_model(loaded, [im.pixels for im in images], settings.predict_batch_size)
                t3 = time.perf_counter()
                built = list(predictor.pool.map(partial(_build, settings, schema, loaded, output, images), range(n)))
                t4 = time.perf_counter()
                # the same heatmap work serially, split into its steps
                up = alpha = rle = 0.0
                n_maps = 0
                for i, image in enumerate(images):
                    keep = [k for k, p in enumerate(output.probabilities[i]) if p >= loaded.thresholds[k]]
                    if not keep:
                        continue
                    a = time.perf_counter()
                    heat = upsample_maps(output.cams[i][keep], image.height, image.width).clamp_(0, 1).numpy()
                    b = time.perf_counter()
                    alphas = [heatmap_to_alpha(h, settings.heatmap.levels, settings.heatmap.floor) for h in heat]
                    c = time.perf_counter()
                    for al in alphas:
                        encode_alpha(al)
                    d = time.perf_counter()
                    up, alpha, rle, n_maps = up + b - a, alpha + c - b, rle + d - c, n_maps + len(keep)
                t5 = time.perf_counter()
                payload = {"results": built, "model_version": loaded.version}
                body = adapter.dump_json(payload)
                t6 = time.perf_counter()
                JSONResponse(payload)  # what the app's /predict returns (json.dumps)
                t7 = time.perf_counter()
                if rep == 0:
                    continue  # warm-up
                add("fetch_decode_8_threads", t1 - t0)
                add("fetch_decode_serial_8_images_x_n/8", (t2 - t1) * n / 8)
                add("model_cams", t3 - t2)
                add("heatmaps_8_threads", t4 - t3)
                add("heatmaps_serial_total", t5 - t4)
                add("heatmaps_serial_upsample", up)
                add("heatmaps_serial_heatmap_to_alpha", alpha)
                add("heatmaps_serial_encode_alpha", rle)
                add("serialise_pydantic_dump_json", t6 - t5)
                add("serialise_starlette_JSONResponse", t7 - t6)
                out.setdefault(name, {})["response_bytes"] = len(body)
                out[name]["maps"] = n_maps
            out[name]["stages_s"] = {k: round(median(v), 4) for k, v in stage.items()}
            out[name]["maps_megapixels"] = round(out[name]["maps"] * images[0].height * images[0].width / 1e6, 2)
            print(f"[breakdown] {name}: {json.dumps(out[name])}", flush=True)
        http.close()
    return out


# --------------------------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> list[str]:
    s: list[str] = []
    if "cost" in res:
        s += [
            "## 1. Heatmaps for all 14 findings vs the plain forward",
            "",
            "resnet18, 14 outputs, 224x224 real NIH images, `torch.inference_mode()`. `cams` = "
            "`HeatmapExplainer(model).logits_and_cams(x)` + `normalise_maps`; `plain` = `model(x)`. Stride 16 = "
            "`OUTPUT_STRIDE=16` (dilated layer4, 14x14 maps), same weights. Ratios: median of per-round ratios "
            "(rounds interleaved). Target: cams/plain <= 1.15 at stride 32.",
            "",
        ]
        rows = []
        for b, r in res["cost"]["batches"].items():
            sec = r["seconds"]
            rows.append(
                [
                    b,
                    sec["plain_s32"]["median"] * 1e3,
                    sec["cams_s32"]["median"] * 1e3,
                    r["ratio_cams_vs_plain_s32"]["median_of_ratios"],
                    sec["plain_s16"]["median"] * 1e3,
                    sec["cams_s16"]["median"] * 1e3,
                    r["ratio_cams_vs_plain_s16"]["median_of_ratios"],
                    r["ratio_cams_s16_vs_plain_s32"]["median_of_ratios"],
                    verdict(r["target_met"]),
                ]
            )
        s += [
            md_table(
                [
                    "batch",
                    "plain s32 ms",
                    "cams s32 ms",
                    "cams/plain s32",
                    "plain s16 ms",
                    "cams s16 ms",
                    "cams/plain s16",
                    "cams s16 / plain s32",
                    "target <= 1.15",
                ],
                rows,
            ),
            "",
        ]
    if "gradcam" in res:
        s += [
            "## 2. vs pytorch-grad-cam",
            "",
            f"`pytorch_grad_cam.GradCAM` (grad-cam {res['gradcam']['package']}), `target_layers=[model.layer4]`, one "
            "call per finding with `ClassifierOutputTarget(k)` for the whole batch; ours: one pass + "
            "`normalise_maps` + bilinear upsampling to 224x224 (the same output as grad-cam's). Target: >= 20x.",
            "",
        ]
        rows = [
            [
                b,
                r["seconds"]["grad_cam"]["median"],
                r["seconds"]["ours"]["median"] * 1e3,
                r["speedup"]["median_of_ratios"],
                r["max_abs_diff"],
                r["min_correlation"],
                r["seconds"]["ours"]["n"],
                verdict(r["target_met"]),
            ]
            for b, r in res["gradcam"]["batches"].items()
        ]
        s += [
            md_table(
                [
                    "batch",
                    "grad-cam s",
                    "ours ms",
                    "speed-up",
                    "max abs diff of maps",
                    "min corr",
                    "rounds",
                    "target >= 20x",
                ],
                rows,
            ),
            "",
        ]
    if "predict" in res:
        p = res["predict"]
        bs = p["predict_batch_size"]
        s += [
            "## 3. /predict end to end",
            "",
            f"Real app (uvicorn subprocess, default settings: resnet18, INPUT_SIZE=224, PREDICT_BATCH_SIZE={bs}, "
            "HEATMAP_LEVELS=64), images from a Label Studio-like file server (`/data/upload/...`, `Token` auth), "
            f"Label Studio 1.23.2's /predict body with {p['tasks_per_request']} tasks and "
            "`label_config/chest_xray.xml`. Bare = `model(x)` in the benchmark process on the same images "
            "already decoded and resized, interleaved with the requests. Ratio = e2e tasks/s / bare images/s "
            "(median of per-round ratios); e2e = the request's wall time at the client, from sending the body to "
            "the response's last byte (the client's own JSON parsing excluded). Untrained model: about half the "
            "findings pass 0.5 (~7 per image); heatmaps are drawn for the most probable "
            f"HEATMAP_MAX_FINDINGS={p.get('heatmap_max_findings', 'all')} of them. The predictor pipelines: pool "
            "threads encode batch i's heatmaps while the model runs batch i+1, so `heatmaps` below is only the "
            "part not hidden behind the model.",
            "",
        ]
        rows = []
        for r in p["workloads"].values():
            rows.append(
                [
                    r["label"],
                    r["e2e_tasks_per_s"],
                    r["bare32_images_per_s"],
                    r[f"bare{bs}_images_per_s"],
                    r["ratio_vs_bare32"]["median_of_ratios"],
                    r[f"ratio_vs_bare{bs}"]["median_of_ratios"],
                    r["heatmaps_per_image"],
                    r["response_bytes"],
                    r["peak_rss_mb"],
                    verdict(r["target_met"]),
                ]
            )
        s += [
            md_table(
                [
                    "workload",
                    "e2e tasks/s",
                    "bare b32 img/s",
                    f"bare b{bs} img/s",
                    "ratio vs b32",
                    f"ratio vs b{bs}",
                    "heatmaps/image",
                    "response bytes",
                    "server peak RSS MB",
                    "target >= 0.8",
                ],
                rows,
            ),
            "",
            "Time per request (medians, seconds; fetch/model/heatmaps from the app's /metrics: fetch+decode and "
            "heatmaps are the parts the model waited for or that followed it, the rest overlaps the forward passes;"
            " `serialise` = time to the response's first byte minus the predictor's total (orjson in a worker "
            "thread); `transfer` = first byte to last byte at the client; `model / "
            "wall` = the app's own model stage over the request's wall time, the ratio the request would reach if "
            "the bare forward ran exactly as fast as the app's model stage (less sensitive to machine noise):",
            "",
        ]
        table = [*p["workloads"].values(), *p.get("variants", {}).values()]
        rows = [
            [
                r["label"],
                r["e2e_s"]["median"],
                r["server_breakdown_s"]["seconds_fetch"],
                r["server_breakdown_s"]["seconds_model"],
                r["server_breakdown_s"]["seconds_heatmaps"],
                r["serialisation_etc_s"],
                r["body_transfer_s"],
                r["bare32_s"]["median"],
                r["heatmaps_per_image"],
                r["response_bytes"],
                r["ratio_vs_bare32"]["median_of_ratios"],
                round(r["server_breakdown_s"]["seconds_model"] / r["e2e_s"]["median"], 3),
            ]
            for r in table
        ]
        s += [
            md_table(
                [
                    "request",
                    "wall",
                    "fetch+decode",
                    "model",
                    "heatmaps",
                    "serialise",
                    "transfer",
                    "bare b32",
                    "heatmaps/image",
                    "bytes",
                    "ratio vs b32",
                    "model / wall",
                ],
                rows,
            ),
            "",
        ]
        rss = p.get("server_rss_kb_after_start", {})
        s += [
            f"Server RSS after start: {rss.get('VmRSS', 0) / 1024:.0f} MB; peak RSS per workload measured after "
            "resetting the high-water mark (`/proc/<pid>/clear_refs`) and running one request.",
            "",
        ]
        if p.get("variants"):
            s += [
                "The last rows are the full-size request on extra servers (same rounds, interleaved): fewer alpha "
                "levels (`HEATMAP_LEVELS`), every predicted finding's heatmap (`HEATMAP_MAX_FINDINGS=0`), and a "
                "`THRESHOLD` that lets through as many findings per image as a trained model typically predicts "
                "(the untrained v0 passes about half of the 14).",
                "",
            ]
        for r in table:
            wall = r["e2e_s"]["median"]
            b = r["server_breakdown_s"]
            shares = {
                "model": b["seconds_model"],
                "heatmaps": b["seconds_heatmaps"],
                "serialise": r["serialisation_etc_s"],
                "transfer": r["body_transfer_s"],
                "fetch+decode": b["seconds_fetch"],
            }
            parts = ", ".join(f"{k} {v / wall:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
            s += [f"- {r['label']}: {parts} of the {wall:.2f} s wall."]
        s += [""]
        diffs = [r["max_prob_diff_vs_bare_model"] for r in p["workloads"].values()]
        s += [
            f"Served probabilities vs the bare model's on the same images: max abs diff {max(diffs):.2g} (same "
            "weights).",
            "",
        ]
    if "breakdown" in res:
        s += [
            "## 4. Where the time goes (stages timed in-process, medians, seconds)",
            "",
            "Same 32 tasks through the predictor's own functions in the benchmark process; the `serial` rows "
            "repeat the heatmap work on one thread, split into its steps; the two `serialise` rows encode the same "
            "response with Starlette's `JSONResponse` (`json.dumps`) and with pydantic-core "
            "(`TypeAdapter(dict[str, Any]).dump_json`, what FastAPI does for a route with a `dict[str, Any]` "
            "return annotation).",
            "",
        ]
        names = list(res["breakdown"])
        keys = list(res["breakdown"][names[0]]["stages_s"])
        rows = [[k, *[res["breakdown"][n]["stages_s"][k] for n in names]] for k in keys]
        rows.append(["maps encoded", *[res["breakdown"][n]["maps"] for n in names]])
        rows.append(["map megapixels", *[res["breakdown"][n]["maps_megapixels"] for n in names]])
        s += [md_table(["stage", *names], rows), ""]
    if res.get("notes"):
        s += ["## Notes", "", *[f"- {n}" for n in res["notes"]], ""]
    return s


def rebuild_markdown() -> None:
    res = json.loads((RESULTS / "serving.json").read_text())
    md, _ = write_results("serving", "Serving benchmarks (`bench/bench_serving.py`)", markdown(res), res)
    print(f"rebuilt {md}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="cost,gradcam,predict,breakdown", help="comma-separated parts")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--gradcam-batches", default="8", help="batches for the grad-cam comparison (e.g. 8,32)")
    parser.add_argument("--levels-variant", type=int, default=16, help="HEATMAP_LEVELS of the extra run (0: skip)")
    parser.add_argument(
        "--heatmaps-variant", type=float, default=1.5, help="heatmaps/image of the THRESHOLD variant (0: skip)"
    )
    parser.add_argument(
        "--no-uncapped-variant", action="store_true", help="skip the HEATMAP_MAX_FINDINGS=0 (every heatmap) run"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads, here and in the app")
    parser.add_argument("--markdown-only", action="store_true", help="rebuild the .md from the last .json")
    args = parser.parse_args()
    if args.markdown_only:
        rebuild_markdown()
        return
    require_shared()
    thread_env = apply_threads(args.threads)
    exit_on_sigterm()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    started = time.perf_counter()
    res: dict[str, Any] = {
        "environment": environment(),
        "targets": {
            "cams_vs_plain_max": COST_TARGET,
            "gradcam_speedup_min": GRADCAM_TARGET,
            "predict_ratio_min": PREDICT_TARGET,
        },
    }
    work = Path(tempfile.mkdtemp(prefix="medebiaser-bench-serving-"))
    res["workdir"] = str(work)
    if "cost" in parts:
        res["cost"] = part_cost([8, 32], reps=9, budget_s=20 if args.quick else 25)
    if "gradcam" in parts:
        batches = [int(b) for b in args.gradcam_batches.split(",")]
        res["gradcam"] = part_gradcam(batches, reps=3, budget_s=20 if args.quick else 25)
    if "predict" in parts:
        res["predict"] = part_predict(
            32,
            reps=10,
            budget_s=30 if args.quick else 80,
            levels_variant=args.levels_variant,
            heatmaps_variant=args.heatmaps_variant,
            uncapped_variant=not args.no_uncapped_variant,
            work=work,
            extra_env=thread_env,
        )
    if "breakdown" in parts:
        res["breakdown"] = part_breakdown(32, reps=1 if args.quick else 2, work=work)
    res["total_seconds"] = round(time.perf_counter() - started, 1)
    previous = _previous()
    if previous and parts != {"cost", "gradcam", "predict", "breakdown"}:
        # a partial run keeps the other parts' last results, and says so
        kept = [p for p in ("cost", "gradcam", "predict", "breakdown") if p not in parts and p in previous]
        res = {**{p: previous[p] for p in kept}, **res}
        res["kept_from_previous_run"] = {"parts": kept, "date_utc": previous.get("environment", {}).get("date_utc")}
        res.setdefault("notes", []).append(
            f"parts {kept} are from the run of {res['kept_from_previous_run']['date_utc']} UTC (same file)"
        )
    shutil.rmtree(work, ignore_errors=True)  # models and logs of this run's servers
    md, js = write_results("serving", "Serving benchmarks (`bench/bench_serving.py`)", markdown(res), res)
    print(f"done in {res['total_seconds']} s -> {md}, {js}")


def _previous() -> dict[str, Any] | None:
    path = RESULTS / "serving.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    main()
