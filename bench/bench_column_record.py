"""The ranking's record of which Data Manager columns are MEDebiaser's: what a first ranking of N tasks costs.

A ranking writes its columns chunk by chunk and must make its claims durable before each chunk's PATCH
(rank/columns.py). Rewriting the whole record each time grows quadratically with the project; the journal
appends one line per chunk and rewrites the record once. Both run in this process, on the same claims.

Run from the project root::

    .venv/bin/python bench/bench_column_record.py              # 10,000 and 30,000 tasks, chunks of 100
    .venv/bin/python bench/bench_column_record.py --tasks 1000 # a quick look

Writes ``bench/results/column_record.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

from ml_backend.rank.columns import SIGNATURE, ColumnOwnership, probability_column  # noqa: E402

FINDINGS = 14  # NIH's findings: a p_<finding> column each, next to the five queue and top columns
KEYS = [*SIGNATURE, *(probability_column(f"Finding{i}") for i in range(FINDINGS))]


def first_ranking(folder: Path, tasks: int, chunk: int, rewrite_each_chunk: bool) -> dict[str, float]:
    """Claims for ``tasks`` tasks, saved before each chunk's (here absent) PATCH, then the job's compaction."""
    ownership = ColumnOwnership(folder / "review_columns.json")
    started = time.perf_counter()
    for start in range(0, tasks, chunk):
        for task_id in range(start, min(start + chunk, tasks)):
            ownership.claim(task_id, KEYS)
        if rewrite_each_chunk:
            ownership.compact()  # what save() did before the journal: the whole record every chunk
        else:
            ownership.save()
    ownership.compact()
    seconds = time.perf_counter() - started
    reread = ColumnOwnership(folder / "review_columns.json")
    assert all(reread.writable(t, dict.fromkeys(KEYS, 0), KEYS)[0] == KEYS for t in range(0, tasks, 997))
    return {"seconds": seconds, "record_mb": (folder / "review_columns.json").stat().st_size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[10_000, 30_000])
    parser.add_argument("--chunk", type=int, default=100, help="RANK_WRITE_BATCH")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    rows, data = [], {"chunk": args.chunk, "keys_per_task": len(KEYS), "runs": []}
    for tasks in args.tasks:
        measured = {}
        for name, rewrite in (("rewrite per chunk", True), ("journal", False)):
            with tempfile.TemporaryDirectory() as folder:
                measured[name] = first_ranking(Path(folder), tasks, args.chunk, rewrite)
        ratio = measured["rewrite per chunk"]["seconds"] / measured["journal"]["seconds"]
        data["runs"].append({"tasks": tasks, **{k: v for k, v in measured.items()}, "speedup": ratio})
        rows.append(
            [
                tasks,
                measured["rewrite per chunk"]["seconds"],
                measured["journal"]["seconds"],
                f"{ratio:.0f}x",
                measured["journal"]["record_mb"],
            ]
        )
        print(rows[-1], flush=True)
    table = common.md_table(
        ["tasks", "rewrite per chunk (s)", "journal (s)", "speedup", "record (MB)"],
        rows,
    )
    sections = [
        f"A first ranking's column claims ({len(KEYS)} columns per task), saved before each chunk of "
        f"{args.chunk} tasks, then compacted once; both variants in this process, one after the other.",
        "",
        table,
        "",
        "Rewriting the record per chunk grows with tasks² / chunk; the journal appends one line per chunk.",
    ]
    common.write_results("column_record", "Review-column ownership record: first ranking", sections, data, args.out)


if __name__ == "__main__":
    main()
