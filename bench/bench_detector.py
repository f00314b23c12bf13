"""Does the artefact detector find every kind of artefact from a few masks? (issue 16, part 4)

Mask propagation (train/mask_propagation.py) learns the artefact physicians masked and finds it on the images
nobody masked. With mixed artefacts (text tags, tubes, rulers) and masks on 10% of the marked images (~3 per
kind), the one linear detector found 70% of the unmasked artefacts and half of the rulers
(mechanism_mixed_10.md), and the dependence fell by 87% instead of the ~100% seen with tags alone. This probe
measures detection only, with the fine-tuning left out, so detector variants can be compared on many seeds
quickly: per seed the biased model and the masked images of bench_mechanism.py (same seeds, same draws), then
each detector (``PropagationConfig.experts`` = linear detectors, one per cluster of masked cells) scored against
the true markers.

Run: ``.venv/bin/python bench/bench_detector.py --seeds 0 1 2 3 4 5 --experts 1 3`` (about 2 min per seed on one
CPU thread); the results name the command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_mechanism as mech  # noqa: E402
import common  # noqa: E402
import simulation as sim  # noqa: E402

from ml_backend.train.mask_propagation import PropagationConfig  # noqa: E402


def run_seed(seed: int, data: sim.LabelledImages, args: argparse.Namespace) -> dict:
    """bench_mechanism.run_seed's biased model and masks (same seed, same draws), then each detector."""
    started = time.time()
    train, _, _, images, markers, kinds = mech.seed_split(seed, data, tuple(args.kinds))
    model = mech.scratch_model(seed, train, images, args.device)
    chosen = mech.physician_masked(markers, args.share, seed)
    ignore = [markers[i] if i in chosen else None for i in range(len(images))]
    tensors = sim.make_tensors(model, sim.ModelSpec(), images, train.labels, ignore=ignore)
    masks_by_kind = {k: sum(kinds[i] == k for i in chosen) for k in args.kinds}
    out: dict[str, Any] = {"seed": seed, "masks": len(chosen), "masks_by_kind": masks_by_kind, "detectors": {}}
    for experts in args.experts:
        t0 = time.time()
        config = PropagationConfig(experts=experts)
        found = mech.detection(model, tensors, config, markers, kinds, chosen, seed)
        out["detectors"][str(experts)] = {**found, "seconds": round(time.time() - t0, 1)}
    out["seconds"] = round(time.time() - started, 1)
    print(
        f"seed {seed} masks {masks_by_kind}: "
        + " | ".join(
            f"experts {e}: found {d['marked_found']} {d.get('found_by_kind')} clean {d['clean_masked']:.3f}"
            for e, d in out["detectors"].items()
        ),
        flush=True,
    )
    return out


def summarise(runs: list[dict], args: argparse.Namespace) -> dict:
    def stat(values: list[float | None]) -> dict:
        v = [x for x in values if x is not None]
        return {"mean": float(np.mean(v)), "sd": float(np.std(v)), "n": len(v)} if v else {"mean": None, "n": 0}

    table = {}
    for experts in map(str, args.experts):
        rows = [r["detectors"][experts] for r in runs]
        table[experts] = {
            "marked_found": stat([r["marked_found"] for r in rows]),
            "clean_masked": stat([r["clean_masked"] for r in rows]),
            "declined": sum(bool(r["skipped"]) for r in rows),
            "found_by_kind": {k: stat([(r.get("found_by_kind") or {}).get(k) for r in rows]) for k in args.kinds},
            "coverage_by_kind": {k: stat([(r.get("coverage_by_kind") or {}).get(k) for r in rows]) for k in args.kinds},
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--kinds", nargs="+", default=["tag", "tube", "ruler"])
    parser.add_argument("--share", type=float, default=0.1, help="share of the marked images a physician masked")
    parser.add_argument("--device", default=common.default_device())
    parser.add_argument("--name", default="detector_mixed_10")
    parser.add_argument("--quick", action="store_true", help="pipeline only: one seed, written nowhere")
    args = parser.parse_args()
    if args.quick:
        args.seeds = args.seeds[:1]
    data = sim.load_manifest_folder(mech.DATA)
    started = time.time()
    runs = [run_seed(seed, data, args) for seed in args.seeds]
    table = summarise(runs, args)
    if args.quick:
        print(table)
        return

    def cell(s: dict) -> str:
        return "" if s["mean"] is None else f"{s['mean']:.3f} ± {s['sd']:.3f}"

    headers = ["experts", "found (all kinds)", *[f"found: {k}" for k in args.kinds], "clean masked", "declined"]
    rows = [
        [e, cell(t["marked_found"]), *[cell(t["found_by_kind"][k]) for k in args.kinds], cell(t["clean_masked"])]
        + [f"{t['declined']} of {len(runs)}"]
        for e, t in table.items()
    ]
    masks = {k: float(np.mean([r["masks_by_kind"][k] for r in runs])) for k in args.kinds}
    sections = [
        f"Seeds {args.seeds} (bench_mechanism.py's biased model and draws per seed); artefact kinds {args.kinds}; "
        f"masks on {args.share:.0%} of the marked training images, per kind on average {masks}. Detection only "
        "(no fine-tuning). `found` = share of the marked images nobody masked that got a mask covering at least "
        "half of their marker; `clean masked` = share of marker-free images given a mask; `declined` = seeds "
        "where the held-out gate propagated nothing. Mean ± sd over seeds.\n",
        common.md_table(headers, rows) + "\n",
        f"Total {time.time() - started:.0f} s on {common.device_name(args.device)}.\n",
    ]
    title = "Artefact detector: found rate per kind from a few masks (`bench/bench_detector.py`)"
    common.write_results(args.name, title, sections, {"runs": runs, "table": table, "args": vars(args)})


if __name__ == "__main__":
    main()
