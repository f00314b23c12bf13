"""Run every benchmark script (``bench/bench_*.py``) in turn; each writes its own ``bench/results/<name>.*``.

Usage (from the project root; most scripts need ../shared/data)::

    .venv/bin/python bench/run_all.py                   # all of them, one after the other
    .venv/bin/python bench/run_all.py --only serving    # one (or several: --only rle,webhook)
    .venv/bin/python bench/run_all.py --quick           # pass --quick to the scripts that accept it
    .venv/bin/python bench/run_all.py --list

Scripts run as separate processes, never in parallel (they time CPU work), in alphabetical order. New
``bench_*.py`` files are picked up automatically. The exit status is non-zero if any script failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


# Exit status of a script that cannot run on this machine (bench_gpu.py without CUDA), as in automake tests.
SKIPPED = 77


def scripts() -> dict[str, Path]:
    """name ("rle" for bench_rle.py) -> path."""
    return {path.stem.removeprefix("bench_"): path for path in sorted(BENCH.glob("bench_*.py"))}


def accepts(path: Path, flag: str) -> bool:
    return f'"{flag}"' in path.read_text(errors="replace")


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the script's process group (its cleanup stops its servers), SIGKILL what is left after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated names: rle, serving, training, webhook, ...")
    parser.add_argument("--quick", action="store_true", help="pass --quick to the scripts that accept it")
    parser.add_argument("--list", action="store_true", help="list the scripts and exit")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per script (default: none)")
    args = parser.parse_args()

    available = scripts()
    if args.list:
        for name, path in available.items():
            print(f"{name:12s} {path.relative_to(ROOT)}{'  (--quick)' if accepts(path, '--quick') else ''}")
        return 0
    wanted = [n.strip().removeprefix("bench_").removesuffix(".py") for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    selected = {n: available[n] for n in (wanted or available)}

    outcomes: list[tuple[str, str, float]] = []
    for name, path in selected.items():
        cmd = [sys.executable, str(path.relative_to(ROOT))]
        if args.quick and accepts(path, "--quick"):
            cmd.append("--quick")
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        started = time.perf_counter()
        # own process group: on a timeout or Ctrl-C the script's own children (servers, workers) go too
        process = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            rc = process.wait(timeout=args.timeout)
            status = {0: "ok", SKIPPED: "skipped (needs hardware absent here)"}.get(rc, f"failed (exit {rc})")
        except subprocess.TimeoutExpired:
            stop_group(process)
            status = f"timed out after {args.timeout:g} s"
        except KeyboardInterrupt:
            stop_group(process)
            outcomes.append((name, "interrupted", time.perf_counter() - started))
            break
        outcomes.append((name, status, time.perf_counter() - started))

    print("\n| benchmark | status | seconds |\n|---|---|---|")
    for name, status, seconds in outcomes:
        print(f"| {name} | {status} | {seconds:.0f} |")
    passed = all(status == "ok" or status.startswith("skipped") for _, status, _ in outcomes)
    return 0 if passed and len(outcomes) == len(selected) else 1


if __name__ == "__main__":
    sys.exit(main())
