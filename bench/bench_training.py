"""Training step cost of the attention terms: evidence (heatmap alignment) and ignore (input-gradient, RRR).

Run from the project root (needs ../shared/data; ~3-4 minutes on 2 shared cores)::

    .venv/bin/python bench/bench_training.py
    .venv/bin/python bench/bench_training.py --quick      # fewer rounds
    .venv/bin/python bench/bench_training.py --sizes 224  # one input size

One full step = ``ml_backend.train.trainer.train_step`` + ``loss.backward()`` + ``AdamW.step()`` on resnet18 (14
findings, frozen batch norm as ``fine_tune`` trains it), batch 16 of real NIH images at 224 and 128 px. Variants,
each on the same 16 images and labels, interleaved round by round:

* ``plain``: prediction loss only (``LossConfig(ignore_weight=0, evidence_weight=0)``, no masks in the batch);
* ``evidence``: evidence mask for one finding on every image, ``evidence_weight=0.1`` (target <= 1.3x plain);
* ``ignore_100``: ignore mask on all 16 images, ``ignore_weight=0.1`` (double backprop, expected ~2x);
* ``ignore_25``: ignore mask on 4 of 16 images (only those go through double backprop);
* ``ignore_25+evidence``: both terms, the mix a real round has;
* ``ignore_25_weight0``: masks present but ``ignore_weight=0`` (what switching the term off costs);
* ``ignore_25+counterfactual``: ``ignore_25`` plus the counterfactual images ``fine_tune`` makes by default
  (``train/counterfactual.py``: artefacts removed from masked images, pasted onto 25% of the others).

Writes ``bench/results/training.json`` and ``bench/results/training.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch
from common import (
    CHEST_CONFIG,
    NIH,
    RESULTS,
    apply_threads,
    environment,
    exit_on_sigterm,
    interleaved,
    md_table,
    median,
    nih_manifest,
    paired_ratio,
    require_shared,
    summary,
    verdict,
    write_results,
)

from ml_backend.explain.cam import HeatmapExplainer
from ml_backend.io.images import decode_image
from ml_backend.io.label_config import parse_label_config
from ml_backend.models.classifier import build_classifier, normalisation
from ml_backend.train.counterfactual import ArtefactBank, counterfactual_batch
from ml_backend.train.examples import Example, ExampleTensors, tensorise
from ml_backend.train.losses import LossConfig, positive_weights
from ml_backend.train.trainer import _set_train_mode, heatmap_grid, train_step

BATCH = 16
EVIDENCE_TARGET = 1.3
FINDINGS = parse_label_config(CHEST_CONFIG).findings


def examples(n: int) -> list[Example]:
    """``n`` real NIH images with their labels, an ignore mask (top-left marker) and an evidence mask for the
    first positive finding (or finding 0), as a physician would paint them on the 64x64 image."""
    records = [r for r in nih_manifest() if r["labels"]][:n]
    out = []
    for r in records:
        image = decode_image((NIH / r["image"]).read_bytes(), 10**9).pixels
        targets = np.array([f in r["labels"] for f in FINDINGS], dtype=np.float32)
        ignore = np.zeros(image.shape, bool)
        ignore[:10, :12] = True
        evidence = np.zeros(image.shape, bool)
        evidence[18:52, 12:54] = True
        k = int(np.flatnonzero(targets)[0]) if targets.any() else 0
        out.append(Example(image=image, targets=targets, ignore=ignore, evidence={k: evidence}, key=r["image"]))
    return out


def with_masks(full: ExampleTensors, ignore_fraction: float, evidence: bool) -> ExampleTensors:
    """The same images and labels; ignore masks kept on the first ``ignore_fraction`` of the batch."""
    n = len(full)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[: round(n * ignore_fraction)] = True
    return replace(
        full,
        ignore=full.ignore * keep[:, None, None, None],
        has_ignore=full.has_ignore & keep,
        evidence=full.evidence if evidence else torch.zeros_like(full.evidence),
        has_evidence=full.has_evidence if evidence else torch.zeros_like(full.has_evidence),
    )


def run_size(size: int, reps: int, budget_s: float) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_classifier("resnet18", len(FINDINGS))
    mean, std = normalisation(model)
    grid = heatmap_grid(model, size)
    data = tensorise(examples(BATCH), len(FINDINGS), size, grid, mean, std)
    explainer = HeatmapExplainer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    pos_weight = positive_weights(data.targets, 20.0)
    _set_train_mode(model, freeze_batchnorm=True)

    off = LossConfig(ignore_weight=0.0, evidence_weight=0.0)
    variants_spec = {
        "plain": (with_masks(data, 0.0, False), off),
        "evidence": (with_masks(data, 0.0, True), LossConfig(ignore_weight=0.0, evidence_weight=0.1)),
        "ignore_100": (with_masks(data, 1.0, False), LossConfig(ignore_weight=0.1, evidence_weight=0.0)),
        "ignore_25": (with_masks(data, 0.25, False), LossConfig(ignore_weight=0.1, evidence_weight=0.0)),
        "ignore_25+evidence": (with_masks(data, 0.25, True), LossConfig(ignore_weight=0.1, evidence_weight=0.1)),
        "ignore_25_weight0": (with_masks(data, 0.25, False), off),
        # what fine_tune ran by default until the input-gradient weight became 0 (LossConfig): the input-gradient
        # term + counterfactual images (same rows)
        "ignore_25+counterfactual": (
            with_masks(data, 0.25, False),
            LossConfig(ignore_weight=0.1, evidence_weight=0.0),
        ),
    }
    generator = torch.Generator().manual_seed(0)
    parts_seen: dict[str, list[str]] = {}

    def step(name: str) -> None:
        batch, config = variants_spec[name]
        if config.counterfactuals and config.ignore_weight > 0:
            batch = counterfactual_batch(
                batch, ArtefactBank.from_examples(batch), generator, config.artefact_paste_rate
            )
        loss, parts = train_step(explainer, batch, config, pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        parts_seen[name] = sorted(parts)

    times = interleaved({name: partial(step, name) for name in variants_spec}, reps, warmup=1, budget_s=budget_s)
    base = times["plain"]
    rows: dict[str, dict[str, Any]] = {}
    for name, values in times.items():
        batch, config = variants_spec[name]
        rows[name] = {
            "masked_ignore": int(batch.has_ignore.sum()),
            "evidence_pairs": int(batch.has_evidence.sum()),
            "ignore_weight": config.ignore_weight,
            "evidence_weight": config.evidence_weight,
            "loss_parts": parts_seen.get(name),
            "step_s": summary(values),
            "images_per_s": round(BATCH / median(values), 2),
            "vs_plain": paired_ratio(values, base),
        }
    rows["evidence"]["target_met"] = rows["evidence"]["vs_plain"]["median_of_ratios"] <= EVIDENCE_TARGET
    out = {"input_size": size, "grid": list(grid), "batch": BATCH, "rounds": len(base), "variants": rows}
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"[training] {size}px: {json.dumps(out)}", flush=True)
    return out


def markdown(res: dict[str, Any]) -> list[str]:
    s = [
        "## Cost of a full training step by loss terms",
        "",
        "`train_step` + `loss.backward()` + `AdamW.step()`, resnet18 (14 findings, frozen batch norm), batch "
        f"{BATCH} of real NIH images, same images and labels in every variant; rounds interleaved; ratio = median "
        "of per-round ratios to `plain` (prediction loss only, both weights 0, no masks). Targets: evidence <= "
        "1.3x plain; the ignore term's double backprop is expected at ~2x with every image masked.",
        "",
    ]
    for size in res["sizes"].values():
        s += [
            f"### {size['input_size']} px input ({size['grid'][0]}x{size['grid'][1]} heatmap grid), "
            f"{size['rounds']} rounds",
            "",
        ]
        rows = []
        for name, r in size["variants"].items():
            rows.append(
                [
                    name,
                    r["masked_ignore"],
                    r["evidence_pairs"],
                    f"{r['ignore_weight']:g} / {r['evidence_weight']:g}",
                    r["step_s"]["median"],
                    r["images_per_s"],
                    r["vs_plain"]["median_of_ratios"],
                    f"{r['vs_plain']['min']:.2f}-{r['vs_plain']['max']:.2f}",
                    verdict(r.get("target_met")) if name == "evidence" else "",
                ]
            )
        s += [
            md_table(
                [
                    "variant",
                    "images with ignore mask",
                    "evidence pairs",
                    "weights ignore / evidence",
                    "step s",
                    "images/s",
                    "x plain",
                    "range of per-round ratios",
                    "target",
                ],
                rows,
            ),
            "",
        ]
    if res.get("notes"):
        s += ["## Notes", "", *[f"- {n}" for n in res["notes"]], ""]
    return s


def rebuild_markdown() -> None:
    res = json.loads((RESULTS / "training.json").read_text())
    md, _ = write_results("training", "Training step benchmarks (`bench/bench_training.py`)", markdown(res), res)
    print(f"rebuilt {md}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224,128", help="input sizes, comma-separated")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--markdown-only", action="store_true", help="rebuild the .md from the last .json")
    args = parser.parse_args()
    if args.markdown_only:
        rebuild_markdown()
        return
    require_shared()
    apply_threads(args.threads)
    exit_on_sigterm()
    started = time.perf_counter()
    res: dict[str, Any] = {"environment": environment(), "targets": {"evidence_vs_plain_max": EVIDENCE_TARGET}}
    res["sizes"] = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        budget = (30 if args.quick else 120) * (size / 224) ** 2 + (0 if args.quick else 20)
        res["sizes"][str(size)] = run_size(size, reps=12, budget_s=budget)
    res["notes"] = [
        "`ignore_25_weight0` has ignore masks on 4 images but IGNORE_LOSS_WEIGHT=0: it checks that switching the "
        "term off gives the plain step's cost back (no batch split, no input gradient).",
        "`ignore_25` splits the batch (4 masked images with a differentiable input gradient, 12 without) under "
        "frozen batch norm: two smaller forward passes plus double backprop through the 4.",
    ]
    res["total_seconds"] = round(time.perf_counter() - started, 1)
    md, js = write_results("training", "Training step benchmarks (`bench/bench_training.py`)", markdown(res), res)
    print(f"done in {res['total_seconds']} s -> {md}, {js}")


if __name__ == "__main__":
    main()
