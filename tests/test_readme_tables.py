"""The README's generated benchmark tables match bench/results (bench/readme_tables.py --check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_are_regenerated_from_the_results() -> None:
    script = ROOT / "bench" / "readme_tables.py"
    run = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    readme = (ROOT / "README.md").read_text()
    assert "| Equalized Odds difference over the Effusion group |" in readme  # the co-occurrence row is generated
