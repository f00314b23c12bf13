"""HTML report: self-contained, names every finding and version, copes with one version and missing metrics."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path

import numpy as np
import pytest

from ml_backend.measure.metrics import age_bins, evaluate_version
from ml_backend.measure.report import render_report_html, write_report

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "report"
# NIH ChestX-ray14 findings with the prevalences of the shared nih1000 sample (Hernia ~1%).
PREVALENCE = {
    "Effusion": 0.17, "Infiltration": 0.16, "Atelectasis": 0.095, "Cardiomegaly": 0.083, "Consolidation": 0.042,
    "Pneumothorax": 0.04, "Nodule": 0.039, "Emphysema": 0.037, "Mass": 0.035, "Fibrosis": 0.032, "Edema": 0.031,
    "Pleural_Thickening": 0.029, "Pneumonia": 0.011, "Hernia": 0.009,
}  # fmt: skip
LABELS = list(PREVALENCE)
PNG_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _synthetic_data(n: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random((n, len(LABELS))) < np.array(list(PREVALENCE.values()))
    eff, atel = LABELS.index("Effusion"), LABELS.index("Atelectasis")
    y[:, atel] |= y[:, eff] & (rng.random(n) < 0.4)  # Atelectasis often accompanies Effusion
    y[:, LABELS.index("Hernia")] = False  # one finding without support in the evaluation set
    return {
        "y": y,
        "sex": rng.choice(["F", "M"], n),
        "age": age_bins(rng.integers(18, 95, n)),
        "patient": rng.integers(0, n // 3, n),
        "noise": rng.random((n, len(LABELS))),
    }


def _synthetic_probs(d: dict[str, np.ndarray], bias: float) -> np.ndarray:
    """A model whose Cardiomegaly fires more for men and whose Effusion follows Atelectasis, by ``bias``."""
    y = d["y"]
    prob = 0.3 + 0.3 * y + 0.5 * (d["noise"] - 0.5)
    prob[:, LABELS.index("Cardiomegaly")] += bias * (d["sex"] == "M")
    prob[:, LABELS.index("Effusion")] += bias * y[:, LABELS.index("Atelectasis")]
    return np.clip(prob, 0, 1)


def _examples(rng: np.random.Generator) -> list[dict]:
    yy, xx = np.mgrid[0:64, 0:64]
    chest = (255 * np.exp(-(((xx - 32) / 22) ** 2 + ((yy - 34) / 26) ** 2))).astype(np.uint8)
    out = []
    for i, finding in enumerate(["Cardiomegaly", "Effusion", "Atelectasis"]):
        heat = np.zeros((8, 8))
        heat[4 + i % 2, 2 + 2 * i] = 1.0
        img = chest if i != 1 else np.repeat(chest[..., None], 3, axis=2)  # grayscale and RGB
        out.append({"image": img, "heatmap": heat + 0.1 * rng.random((8, 8)), "finding": finding, "prob": 0.8 - i / 10})
    return out


@pytest.fixture(scope="module")
def two_versions() -> list[dict]:
    d = _synthetic_data()
    groups = {"sex": d["sex"], "age": d["age"]}
    thr = [0.5] * len(LABELS)
    versions = []
    for i, bias in enumerate([0.35, 0.05]):
        metrics = evaluate_version(
            d["y"], _synthetic_probs(d, bias), LABELS, groups, thresholds=thr, cluster_ids=d["patient"], n_boot=60
        )
        versions.append({
            "version": f"v{i + 1}-synthetic",
            "created_at": f"2025-01-0{i + 1}T10:00:00+00:00",
            "parent": None if i == 0 else "v1-synthetic",
            "metrics": metrics,
            "examples": _examples(np.random.default_rng(i)),
        })  # fmt: skip
    return versions


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in PNG_URI.findall(page)]


def test_two_versions_report_is_self_contained(two_versions: list[dict]) -> None:
    path = write_report(two_versions, ARTIFACTS)
    assert path == ARTIFACTS / "index.html" and path.exists()
    page = path.read_text(encoding="utf-8")
    pngs = _pngs(page)
    # F1, EOD, co-occurrence, before/after, trends, examples
    assert len(pngs) == 6 and all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 5000 for p in pngs)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no external assets
    for name in LABELS + ["v1-synthetic", "v2-synthetic"]:
        assert name in page
    assert "Since <b>v1-synthetic</b>" in page and "What the last feedback round changed" in page
    # The debiased v2 removed the sex shortcut of Cardiomegaly and the Atelectasis shortcut of Effusion.
    assert "Changes outside noise since v1-synthetic" in page
    assert re.search(r"<b>Cardiomegaly</b> EOD by sex: [0-9.]+ → [0-9.]+ <span[^>]*>improved", page)
    assert re.search(r"<b>Effusion</b> EOD with vs without partner: [0-9.]+ → [0-9.]+ <span[^>]*>improved", page)
    assert "How to read this report" in page
    for i, png in enumerate(pngs):  # kept for a human look next to the HTML
        (ARTIFACTS / f"plot-{i}.png").write_bytes(png)


def test_single_version_report(two_versions: list[dict], tmp_path: Path) -> None:
    page = write_report(two_versions[:1], tmp_path).read_text(encoding="utf-8")
    assert "Only one version so far" in page and "v1-synthetic" in page
    assert "What the last feedback round changed" not in page
    assert len(_pngs(page)) == 5  # no before/after plot
    assert "no positives (n=0)" not in page  # text lives inside the PNG, not the HTML
    assert "Hernia" in page
    assert re.search(r"Most biased findings.*<b>Cardiomegaly</b> by sex", page)  # the biased v1


def test_report_tolerates_none_and_missing_metrics(two_versions: list[dict]) -> None:
    broken = copy.deepcopy(two_versions)
    m = broken[1]["metrics"]
    m["macro_f1"] = m["macro_f1_ci"] = None
    m["fairness"]["sex"]["worst"] = None
    m["per_finding"]["Effusion"] = {"f1": None, "auroc": None, "support": 0, "f1_ci": None}
    m["fairness"]["age"]["per_finding"] = {}
    m["cooccurrence"] = None
    broken.insert(0, {"version": "v0-empty", "created_at": None, "parent": None, "metrics": None})
    page = render_report_html(broken)
    assert "v0-empty" in page and "no comparison" in page
    assert len(_pngs(page)) == 5  # co-occurrence plot skipped, the rest still drawn
    assert "<p>No model versions" in render_report_html([])


def test_verdict_rules() -> None:
    from ml_backend.measure.report import _verdict

    assert _verdict(0.1, [0.05, 0.15], 0.4, [0.3, 0.5], higher_better=False) == "improved"
    assert _verdict(0.1, [0.05, 0.35], 0.4, [0.3, 0.5], higher_better=False) == "noise"
    assert _verdict(0.6, [0.55, 0.65], 0.4, [0.3, 0.5], higher_better=True) == "improved"
    assert _verdict(0.6, None, 0.4, None, higher_better=False) == "worse"
    assert _verdict(None, None, 0.4, None, higher_better=True) == "na"
