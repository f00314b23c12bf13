"""What the physician sees of the model in a real Label Studio 1.23.2: every finding's probability and why a task
is in the review queue, on the labelling page and as Data Manager columns (issue 14, part 4).

The shipped ``BitmaskLabels`` config with its read-only ``model_summary`` TextArea; real NIH films served as
Label Studio local files; ``rank_project`` writes the predictions and the task-data columns. Checked: the stored
predictions validate with the SDK and carry the summary; the Data Manager lists the columns, orders a tab by
``review_rank`` and filters by a probability as numbers; an annotated task leaves the queue columns on a re-rank;
and headless Chromium shows the reason and the probabilities as text on the labelling page.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from label_studio_sdk.label_interface import LabelInterface

from ml_backend.config import Settings
from ml_backend.connect import REVIEW_VIEW_TITLE
from ml_backend.demo.services import BackendProcess
from ml_backend.demo.setup import LabelStudioAPI
from ml_backend.inference.summary import RANKING_PREFIX
from ml_backend.rank.columns import column_types, probability_column
from ml_backend.rank.job import RankOptions, rank_project

from .label_studio import E2E_ENV, PROJECT_ROOT, LabelStudioServer, film_project, nih_films, running_backend

pytestmark = pytest.mark.e2e

CONFIG = (PROJECT_ROOT / "label_config" / "chest_xray_bitmask.xml").read_text()
SECRET = "review-info-secret"
N_FILMS = 4


@pytest.fixture(scope="module")
def films(label_studio_server: LabelStudioServer) -> Path:
    return nih_films(label_studio_server, "review-info-films", N_FILMS)  # the originals, 1024 px


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("review-info-backend")


@pytest.fixture(scope="module")
def backend(label_studio_server: LabelStudioServer, work: Path) -> Iterator[BackendProcess]:
    env = {"WEBHOOK_SECRET": SECRET, "INPUT_SIZE": "128", "HEATMAP_MAX_FINDINGS": "2", "LOG_LEVEL": "INFO"}
    with running_backend(work, label_studio_server, env, "review-info-backend.log") as process:
        yield process


def _summary_lines(prediction: dict[str, Any]) -> list[str]:
    (summary,) = [r for r in prediction["result"] if r["type"] == "textarea"]
    assert summary["from_name"] == "model_summary" and summary["readonly"] is True
    return list(summary["value"]["text"])


def test_probabilities_and_reasons_in_front_of_the_physician(
    label_studio_server: LabelStudioServer,
    backend: BackendProcess,
    films: Path,
    work: Path,
) -> None:
    ls = label_studio_server
    interface = LabelInterface(CONFIG)
    settings = replace(
        Settings.from_env(),
        model_dir=work / "models",  # the backend's models: the ranking uses its live version
        label_studio_url=ls.url,
        label_studio_api_key=ls.token,
        input_size=128,
    )
    with LabelStudioAPI(ls.url, ls.token) as api:
        project = film_project(ls, api, "review-info", CONFIG, films, backend.url, SECRET)
        # One task carries a field of its own named like a column (a second reader's call): it is never touched.
        own = api.tasks(project)[0]
        own_data = {**own["data"], "top_finding": "Mass (second reader)"}
        api.call("PATCH", f"/api/tasks/{own['id']}", json={"data": own_data})

        started = time.monotonic()
        summary = rank_project(project, settings)
        print(f"[review-info] ranked {summary['ranked']} in {time.monotonic() - started:.1f} s: {summary['seconds']}")
        assert summary["status"] == "ranked" and summary["ranked"] == N_FILMS
        assert summary["review_columns"] == {"written": N_FILMS, "failed": 0, "cleared": 0, "user_fields_kept": 1}
        version = summary["version"]
        items = {item["task"]: item for item in summary["top"]}

        # 1. Stored predictions are valid for the config and carry the summary: the reason first, every finding.
        probabilities: dict[int, dict[str, float]] = {}
        for task_id, item in items.items():
            (prediction,) = [p for p in api.predictions(task_id) if p["model_version"] == version]
            assert interface.validate_prediction(prediction), interface.validate_prediction(prediction, True)
            lines = _summary_lines(prediction)
            assert lines[0].startswith(f"{RANKING_PREFIX} at #{item['rank']} ") and item["reason"] in lines[0]
            findings = next(r for r in prediction["result"] if r["type"] == "choices")
            probabilities[task_id] = findings["probabilities"]
            for label, p in findings["probabilities"].items():
                assert f"{label} p={p:.2f}" in lines[-1]

        # 2. Data Manager columns: listed, in the stored task data, the image reference untouched.
        columns = api.call("GET", "/api/dm/columns", params={"project": project})["columns"]
        data_columns = {c["id"] for c in columns if c.get("parent") == "data"}
        labels = list(next(iter(probabilities.values())))
        wanted = {"image", "review_rank", "review_priority", "review_reason", "top_finding", "top_probability"}
        assert wanted | {probability_column(label) for label in labels} <= data_columns, data_columns
        stored = {t["id"]: t["data"] for t in api.tasks(project)}
        for task_id, item in items.items():
            assert stored[task_id]["review_rank"] == item["rank"] and stored[task_id]["review_reason"] == item["reason"]
            assert stored[task_id]["image"].startswith("/data/local-files/?d=")
            assert stored[task_id]["p_Effusion"] == round(probabilities[task_id]["Effusion"], 4)
        assert stored[own["id"]]["top_finding"] == "Mass (second reader)"

        # The review tab shows the numeric columns as numbers (Label Studio orders data columns as text otherwise).
        views = api.call("GET", "/api/dm/views", params={"project": project})
        review = next(v for v in views if v["data"].get("title") == REVIEW_VIEW_TITLE)
        assert review["data"]["columnsDisplayType"]["tasks:data.review_rank"] == "Number"
        by_queue = [t["id"] for t in api.tasks(project, view_id=review["id"])]
        assert by_queue == sorted(items, key=lambda t: items[t]["rank"])

        # A tab a physician makes: sorted by rank (descending), filtered by one finding's probability.
        top = max(labels, key=lambda label: max(p[label] for p in probabilities.values()))
        values = sorted(probabilities[t][top] for t in items)
        cut = (values[0] + values[1]) / 2  # drops the least probable task
        key = probability_column(top)
        tab = api.call(
            "POST",
            "/api/dm/views",
            json={
                "project": project,
                "data": {
                    "title": "By rank",
                    "type": "list",
                    "target": "tasks",
                    "ordering": ["-tasks:data.review_rank"],
                    "columnsDisplayType": column_types(labels),
                    "filters": {
                        "conjunction": "and",
                        "items": [
                            {
                                "filter": f"filter:tasks:data.{key}",
                                "operator": "greater",
                                "type": "Number",
                                "value": cut,
                            }
                        ],
                    },
                },
            },
        )
        listed = [t["id"] for t in api.tasks(project, view_id=tab["id"])]
        expected = sorted((t for t in items if probabilities[t][top] > cut), key=lambda t: -items[t]["rank"])
        print(f"[review-info] 'By rank' tab filtered by {key} > {cut:.4f}: {listed}")
        assert listed == expected and len(listed) == N_FILMS - 1

        # 3. A task annotated since it was ranked is out of the queue: its rank and reason go on the next ranking.
        done = max(items, key=lambda t: items[t]["rank"])
        choices = {"from_name": "findings", "to_name": "image", "type": "choices", "value": {"choices": ["No Finding"]}}
        api.call("POST", f"/api/tasks/{done}/annotations", json={"result": [choices], "lead_time": 5.0})
        again = rank_project(project, settings, RankOptions(force=True))
        assert again["review_columns"]["cleared"] == 1 and again["review_columns"]["failed"] == 0
        after = {t["id"]: t["data"] for t in api.tasks(project)}
        assert "review_rank" not in after[done] and "review_reason" not in after[done] and key in after[done]
        assert after[done]["image"] == stored[done]["image"]
        assert after[own["id"]]["top_finding"] == "Mass (second reader)"
        reranked = {item["task"]: item for item in again["top"]}
        first = min(reranked, key=lambda t: reranked[t]["rank"])

    # 4. On the labelling page: the reason and every probability as text, beside the film.
    from .screenshot import find_chromium, labelling_screenshot

    if not find_chromium():
        if os.environ.get(E2E_ENV) == "1":
            pytest.fail("no chromium binary for the screenshot (apt-get install chromium)")
        pytest.skip("no chromium binary for the screenshot")
    out = PROJECT_ROOT / "test-artifacts" / "labelling-review-summary.png"
    shot = labelling_screenshot(ls.url, ls.username, ls.password, project, first, out, settle_s=5.0)
    text = shot.text
    print(f"[review-info] screenshot of task {first} in {shot.seconds:.1f} s -> {out}")
    reason_line = f"{RANKING_PREFIX} at #1 "
    assert reason_line in text and reranked[first]["reason"] in text, text[-3000:]
    for label, p in probabilities[first].items():
        assert f"{label} p={p:.2f}" in text, (label, text[-3000:])
