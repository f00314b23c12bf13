"""`medebiaser rank` against a real Label Studio and the real backend app.

A project with a few NIH X-rays served by Label Studio's local-files storage, connected to the backend (served
by uvicorn in a thread); two tasks annotated through the editor's API (the webhook records them, one with an
"ignore" mask). Then the command ranks the rest: predictions with heatmaps and ranking scores land in Label
Studio, the project points at the backend's version, and the "Review queue" tab lists the tasks in ranking
order. A new model version re-ranks and takes over the queue; the old version's predictions stay as history.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import CHEST_CONFIG, NIH, ROOT, shared_or_skip

from ml_backend.config import Settings
from ml_backend.connect import REVIEW_VIEW_TITLE, SCORE_ORDERING, connect_project
from ml_backend.explain.brush_rle import encode_alpha
from ml_backend.models.store import VersionStore
from ml_backend.rank.job import RankError, RankOptions, rank_project

from .label_studio import LabelStudioServer, free_port

pytestmark = pytest.mark.e2e

SECRET = "rank-e2e-secret"
N_IMAGES = 8


@pytest.fixture(scope="module")
def ls(label_studio_server: LabelStudioServer) -> LabelStudioServer:
    shared_or_skip(NIH)
    return label_studio_server


@pytest.fixture(scope="module")
def client(ls: LabelStudioServer):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=ls.url, api_key=ls.token)


@pytest.fixture(scope="module")
def backend(ls: LabelStudioServer, redis_url: str, tmp_path_factory) -> Iterator[tuple[str, Any, Settings]]:
    """The real FastAPI app under uvicorn, on a free port, with a real Redis for the webhook."""
    import uvicorn

    from ml_backend.serve.app import create_app

    settings = replace(
        Settings(),
        model_dir=tmp_path_factory.mktemp("rank-e2e-models"),
        label_studio_url=ls.url,
        label_studio_api_key=ls.token,
        webhook_secret=SECRET,
        redis_url=redis_url,
        input_size=128,
    )
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("the backend app did not start")
        time.sleep(0.1)
    yield url, app, settings
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def project(ls: LabelStudioServer, client, backend, nih_manifest) -> dict[str, Any]:
    backend_url, _, _ = backend
    folder = Path(ls.local_files_root) / f"rank-e2e-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    records = nih_manifest[:N_IMAGES]
    for record in records:
        shutil.copy(NIH / record["image"], folder / Path(record["image"]).name)
    p = client.projects.create(title=f"rank-e2e-{time.monotonic_ns()}", label_config=CHEST_CONFIG)
    client.import_storage.local.create(project=p.id, path=str(folder), title="nih", use_blob_urls=True)
    refs = [f"/data/local-files/?d={folder.name}/{Path(r['image']).name}" for r in records]
    refs.append(f"/data/local-files/?d={folder.name}/missing.png")  # a task whose image fails
    client.projects.import_tasks(id=p.id, request=[{"image": ref} for ref in refs])
    tasks = sorted(client.tasks.list(project=p.id), key=lambda t: t.id)
    connected = connect_project(ls.url, ls.token, p.id, backend_url, webhook_secret=SECRET)
    assert connected.model_version == "v0" and not connected.model_version_applied

    # Two physicians' annotations, through the webhook into the backend's annotation store.
    marker = np.zeros((64, 64), dtype=np.uint8)
    marker[:10, :10] = 255
    ignore = {
        "from_name": "evidence",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": 64,
        "original_height": 64,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_alpha(marker), "brushlabels": ["Ignore (marker, tube, text)"]},
    }
    for task, record, extra in ((tasks[0], records[0], [ignore]), (tasks[1], records[1], [])):
        choices = {
            "from_name": "findings",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": record["labels"] or ["No Finding"]},
        }
        client.annotations.create(id=task.id, result=[choices, *extra])
    return {"id": p.id, "tasks": [t.id for t in tasks], "labelled": {tasks[0].id, tasks[1].id}, "broken": tasks[-1].id}


def _versioned(client, task_id: int, version: str) -> list[Any]:
    return [p for p in client.predictions.list(task=task_id) if p.model_version == version]


def _review_order(client, project_id: int) -> tuple[int, list[int]]:
    views = [v for v in client.views.list(project=project_id) if (v.data or {}).get("title") == REVIEW_VIEW_TITLE]
    assert len(views) == 1
    return views[0].id, [t.id for t in client.tasks.list(project=project_id, view=views[0].id)]


def test_rank_command_fills_the_review_queue(ls: LabelStudioServer, client, backend, project, redis_url) -> None:
    _, _, settings = backend
    pid = project["id"]
    env = {
        **os.environ,
        "MODEL_DIR": str(settings.model_dir),
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "REDIS_URL": redis_url,
        "INPUT_SIZE": "128",
    }
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "ml_backend.cli", "rank", "--project", str(pid), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(f"\n`medebiaser rank` took {time.perf_counter() - started:.1f} s (incl. interpreter start)")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    print(json.dumps({k: summary[k] for k in ("seconds", "tasks_per_s", "priors")}, indent=1))
    n = N_IMAGES - 2
    assert summary["status"] == "ranked" and summary["version"] == "v0"
    assert summary["ranked"] == n and summary["written"] == n and summary["model_version_set"] is True
    assert summary["skipped"][0]["task"] == project["broken"] and "HTTP 404" in summary["skipped"][0]["reason"]
    # The webhook recorded both annotations, so the priors come from the backend's own store.
    assert summary["priors"]["source"] == "annotation store" and summary["priors"]["annotated"] == 2
    assert summary["priors"]["ignore_masks"] == 1

    assert client.projects.get(id=pid).model_version == "v0"
    scores = {}
    for item in summary["top"]:
        (prediction,) = _versioned(client, item["task"], "v0")  # exactly one: nothing piled up
        scores[item["task"]] = prediction.score
        assert prediction.score == pytest.approx(item["score"])
        findings = next(r for r in prediction.result if r["type"] == "choices")
        assert findings["ranking"]["reason"] == item["reason"] and findings["ranking"]["rank"] == item["rank"]
        assert len(findings["probabilities"]) == 14
        heatmaps = [r for r in prediction.result if r["type"] == "brushlabels"]
        assert all(r["original_width"] == 64 and r["value"]["format"] == "rle" for r in heatmaps)
    assert any(r["type"] == "brushlabels" for t in scores for r in _versioned(client, t, "v0")[0].result)  # heatmaps

    view_id, ordered = _review_order(client, pid)
    assert client.views.get(id=str(view_id)).data["ordering"] == SCORE_ORDERING
    ranking = [item["task"] for item in summary["top"]]
    assert ordered[:n] == ranking  # "Label tasks as displayed" follows the ranking
    assert set(ordered[n:]) == project["labelled"] | {project["broken"]}  # no score of v0: listed last

    # Running the command again changes nothing in Label Studio.
    again = subprocess.run(
        [sys.executable, "-m", "ml_backend.cli", "rank", "--project", str(pid), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["written"] == 0
    assert all(len(_versioned(client, t, "v0")) == 1 for t in ranking)


def test_new_version_takes_over_the_queue(client, backend, project) -> None:
    _, app, settings = backend
    pid = project["id"]
    store = VersionStore(settings.model_dir)
    registry = app.state.registry  # the serving process's registry: the live model, loaded once
    v0 = store.info(str(pid), "v0")
    state = store.load_state(v0)
    generator = np.random.default_rng(0)
    for name in ("fc.weight", "fc.bias"):  # a "fine-tuned" head: a different ranking
        state[name] = state[name] + 0.5 * state[name].new_tensor(generator.normal(size=tuple(state[name].shape)))
    store.save_version(str(pid), state, v0.meta.but(parent="v0", kind="fine-tuned", created_at=None))
    assert store.live_version(str(pid)) == "v1"

    summary = rank_project(pid, settings, RankOptions(write_batch=4), registry=registry)
    assert summary["status"] == "ranked" and summary["version"] == "v1" and summary["model_version_set"] is True
    assert client.projects.get(id=pid).model_version == "v1"
    ranking = [item["task"] for item in summary["top"]]
    _, ordered = _review_order(client, pid)
    assert ordered[: len(ranking)] == ranking
    for task in ranking:  # the old version's prediction stays as history; only v1's score counts
        assert len(_versioned(client, task, "v1")) == 1 and len(_versioned(client, task, "v0")) == 1


def test_bad_input_is_refused_clearly(ls: LabelStudioServer, client, backend) -> None:
    _, _, settings = backend
    with pytest.raises(RankError, match="Label Studio has no project 987654"):
        rank_project(987654, settings)
    empty = client.projects.create(title=f"rank-empty-{time.monotonic_ns()}", label_config=CHEST_CONFIG)
    assert rank_project(empty.id, settings)["reason"] == f"project {empty.id} has no tasks"
    no_findings = client.projects.create(
        title=f"rank-nofindings-{time.monotonic_ns()}",
        label_config='<View><Image name="image" value="$image"/><TextArea name="note" toName="image"/></View>',
    )
    client.tasks.create(project=no_findings.id, data={"image": "/data/local-files/?d=x.png"})
    with pytest.raises(RankError, match="label config unusable for ranking"):
        rank_project(no_findings.id, settings)
    assert client.predictions.list(project=no_findings.id) == []
