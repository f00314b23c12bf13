"""CUDA check: the heatmap and training code paths on a GPU, where this repository's CI cannot go.

Run on a machine with a CUDA GPU (needs torch and timm, no server dependencies, no shared data)::

    python bench/bench_gpu.py            # writes bench/results/gpu.json and gpu.md
    python bench/bench_gpu.py --out DIR

What it checks and measures, each against a baseline in the same process:

* correctness: the one-pass CAM path equals autograd Grad-CAM on CUDA (fp32, TF32 off), for resnet18 and
  efficientnet_b0, and ``fine_tune`` runs on CUDA with ignore and evidence masks and counterfactual rows
  (finite losses, weights still on the GPU, the model changed);
* heatmaps for 14 findings vs the plain forward pass (batch 32, 224 and 512 px, CUDA-synchronised timing);
* one training step with the attention terms vs a prediction-loss-only step (batch 16, 224 px).

Random images and labels: the check is about code paths and cost, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import timm
import torch
from common import interleaved, median, paired_ratio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml_backend.explain.cam import HeatmapExplainer, reference_gradcam  # noqa: E402
from ml_backend.train.counterfactual import ArtefactBank, counterfactual_batch  # noqa: E402
from ml_backend.train.examples import ExampleTensors  # noqa: E402
from ml_backend.train.losses import LossConfig, positive_weights  # noqa: E402
from ml_backend.train.trainer import TrainConfig, _set_train_mode, fine_tune, heatmap_grid, train_step  # noqa: E402

FINDINGS = 14
RESULTS = Path(__file__).resolve().parent / "results"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced(fn: Callable[[], object], reps: int) -> Callable[[], None]:
    """``fn`` run ``reps`` times and waited for: one timed call of common.interleaved is one GPU round."""

    def run() -> None:
        for _ in range(reps):
            fn()
        sync()

    return run


def ratio(a: Callable[[], object], b: Callable[[], object], rounds: int, reps: int) -> dict[str, float]:
    """a's time over b's, rounds interleaved (common.interleaved), median of per-round ratios."""
    times = interleaved({"a": synced(a, reps), "b": synced(b, reps)}, rounds, warmup=1)
    return {
        **paired_ratio(times["a"], times["b"]),
        "ms": round(1000 * median(times["a"]) / reps, 3),
        "baseline_ms": round(1000 * median(times["b"]) / reps, 3),
    }


def check_cam_identity(device: torch.device) -> dict[str, dict[str, float]]:
    out = {}
    for backbone in ("resnet18", "efficientnet_b0"):
        torch.manual_seed(0)
        model = timm.create_model(backbone, num_classes=FINDINGS).to(device).eval()
        explainer = HeatmapExplainer(model)
        x = torch.randn(4, 3, 224, 224, device=device)
        with torch.no_grad():
            logits, cams = explainer.logits_and_cams(x)
        expected = reference_gradcam(model, x, FINDINGS)
        scale = float(expected.abs().max())
        error = float((cams - expected).abs().max())
        out[backbone] = {
            "max_abs_error": error,
            "relative_error": error / scale,
            "logit_error": float((logits - model(x).detach()).abs().max()),
            "equal": bool(torch.allclose(cams, expected, atol=1e-4 * scale, rtol=1e-4)),
        }
    return out


def synthetic_examples(n: int, size: int, grid: tuple[int, int], device: torch.device) -> ExampleTensors:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g)
    targets = (torch.rand(n, FINDINGS, generator=g) < 0.2).float()
    ignore = torch.zeros(n, 1, size, size)
    ignore[:, :, : size // 6, : size // 5] = 1.0  # a marker in the corner
    has_ignore = torch.arange(n) % 4 == 0  # masks on a quarter of the images
    ignore = ignore * has_ignore[:, None, None, None]
    evidence = torch.zeros(n, FINDINGS, *grid)
    evidence[:, :, grid[0] // 4 : 3 * grid[0] // 4, grid[1] // 4 : 3 * grid[1] // 4] = 1.0
    has_evidence = (targets > 0) & (torch.arange(n) % 2 == 0)[:, None]
    evidence = evidence * has_evidence[:, :, None, None]
    return ExampleTensors(*(t.to(device) for t in (images, targets, ignore, has_ignore, evidence, has_evidence)))


def check_fine_tune(device: torch.device) -> dict[str, object]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=FINDINGS).to(device)
    data = synthetic_examples(48, 224, heatmap_grid(model, 224), device)
    before = [p.detach().clone() for p in model.parameters()]
    started = time.perf_counter()
    history = fine_tune(model, data, TrainConfig(epochs=2, batch_size=16, loss=LossConfig())).history
    seconds = time.perf_counter() - started
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    finite = all(all(v == v and abs(v) != float("inf") for v in h.values()) for h in history)
    return {
        "epochs": len(history),
        "last_epoch": {k: round(v, 5) for k, v in history[-1].items()},
        "finite": finite,
        "weights_changed": changed,
        "weights_on_gpu": all(p.device.type == device.type for p in model.parameters()),
        "seconds": round(seconds, 2),
    }


def heatmap_cost(device: torch.device, size: int, rounds: int, reps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=FINDINGS).to(device).eval()
    explainer = HeatmapExplainer(model)
    x = torch.randn(32, 3, size, size, device=device)

    @torch.no_grad()
    def plain() -> object:
        return torch.sigmoid(model(x))

    @torch.no_grad()
    def heatmaps() -> object:
        logits, cams = explainer.logits_and_cams(x)
        return torch.sigmoid(logits), cams

    return ratio(heatmaps, plain, rounds, reps)


def training_cost(device: torch.device, rounds: int, reps: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=FINDINGS).to(device)
    data = synthetic_examples(16, 224, heatmap_grid(model, 224), device)
    explainer = HeatmapExplainer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pos_weight = positive_weights(data.targets, 20.0).to(device)
    _set_train_mode(model, freeze_batchnorm=True)
    no_masks = replace(
        data, has_ignore=torch.zeros_like(data.has_ignore), has_evidence=torch.zeros_like(data.has_evidence)
    )
    bank = ArtefactBank.from_examples(data)
    generator = torch.Generator().manual_seed(0)

    def step(batch: ExampleTensors, config: LossConfig, counterfactual: bool = False) -> Callable[[], object]:
        def run() -> object:
            b = counterfactual_batch(batch, bank, generator) if counterfactual else batch
            loss, _ = train_step(explainer, b, config, pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        return run

    plain = step(no_masks, LossConfig(ignore_weight=0.0, evidence_weight=0.0))
    only_evidence = replace(data, has_ignore=torch.zeros_like(data.has_ignore))
    only_ignore = replace(data, has_evidence=torch.zeros_like(data.has_evidence))
    variants = {
        "evidence": step(only_evidence, LossConfig(ignore_weight=0.0)),
        "ignore_25": step(only_ignore, LossConfig(ignore_weight=0.1, evidence_weight=0.0)),
        # fine_tune's default mix until the input-gradient weight became 0 (LossConfig)
        "ignore_25+evidence+counterfactual (fine_tune default)": step(
            data, LossConfig(ignore_weight=0.1), counterfactual=True
        ),
    }
    return {name: ratio(fn, plain, rounds, reps) for name, fn in variants.items()}


def markdown(res: dict) -> str:
    lines = [
        "# CUDA check (bench/bench_gpu.py)",
        "",
        f"Device: {res['device']}; torch {res['torch']}, timm {res['timm']}. Command: `{res['command']}`",
        "",
        "## Correctness on CUDA",
        "",
        "| backbone | one-pass CAM vs autograd Grad-CAM, max abs error | relative | equal |",
        "|---|---|---|---|",
    ]
    for name, r in res["cam_identity"].items():
        lines.append(f"| {name} | {r['max_abs_error']:.2e} | {r['relative_error']:.2e} | {r['equal']} |")
    ft = res["fine_tune"]
    lines += [
        "",
        f"`fine_tune` on CUDA (resnet18, 48 images, masks on 25%, evidence, counterfactual rows, 2 epochs): "
        f"finite losses {ft['finite']}, weights changed {ft['weights_changed']}, on GPU {ft['weights_on_gpu']}, "
        f"{ft['seconds']} s; last epoch {ft['last_epoch']}.",
        "",
        "## Cost ratios on this GPU (median over interleaved rounds; CUDA-synchronised)",
        "",
        "| what | vs | ratio (min-max) | ms | baseline ms |",
        "|---|---|---|---|---|",
    ]
    for size, r in res["heatmaps"].items():
        lines.append(
            f"| 14 heatmaps + logits, resnet18, batch 32, {size} px | plain forward | {r['median_of_ratios']} "
            f"({r['min']}-{r['max']}) | {r['ms']} | {r['baseline_ms']} |"
        )
    for name, r in res["training"].items():
        lines.append(
            f"| training step {name}, batch 16, 224 px | prediction loss only | {r['median_of_ratios']} "
            f"({r['min']}-{r['max']}) | {r['ms']} | {r['baseline_ms']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cuda", help="'cpu' only to smoke-test this script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (this check runs on a GPU machine)", file=sys.stderr)
        sys.exit(77)  # bench/run_all.py counts 77 as skipped
    torch.backends.cuda.matmul.allow_tf32 = False  # exact comparisons in fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "command": "python bench/bench_gpu.py " + " ".join(sys.argv[1:]),
        "cam_identity": check_cam_identity(device),
        "fine_tune": check_fine_tune(device),
        "heatmaps": {str(s): heatmap_cost(device, s, args.rounds, args.reps) for s in (224, 512)},
        "training": training_cost(device, args.rounds, args.reps),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(res, indent=2))
    (args.out / "gpu.md").write_text(markdown(res))
    print(markdown(res))
    ok = all(r["equal"] for r in res["cam_identity"].values()) and res["fine_tune"]["finite"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
