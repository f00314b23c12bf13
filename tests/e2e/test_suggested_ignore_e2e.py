"""Suggested ignore regions in a real Label Studio 1.23.2 (issue 14, part 5).

Real NIH X-rays with the same text tag stamped on every film, the shipped ``BitmaskLabels`` config, the real
backend app (uvicorn in a thread, a real Redis for the webhook). Physicians mask the tag on eight films; the first
training job's mask propagation fits the artefact detector and saves it with the new version. The ranking job
then offers the tag on the unlabelled films as suggested ignore regions, stored in Label Studio's prediction with
a ``suggested-ignore-`` id and a visible "suggested" note. A physician submits one task with the suggestion kept
and one with it deleted; the next training job trains on the kept one as an ignore mask and uses the deleted one
as a negative for the detector (its result and the version meta count both).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NIH, ROOT, shared_or_skip
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from ml_backend.config import Settings
from ml_backend.connect import connect_project
from ml_backend.explain.bitmask_png import encode_heat_png
from ml_backend.feedback.queue import connect
from ml_backend.feedback.store import AnnotationStore
from ml_backend.models.store import VersionStore
from ml_backend.rank.job import RankOptions, rank_project
from ml_backend.train.jobs import train_project
from ml_backend.train.suggestions import DETECTOR_FILE, PREFIX

from .label_studio import LabelStudioServer, app_in_thread

pytestmark = pytest.mark.e2e

CONFIG = (ROOT / "label_config" / "chest_xray_bitmask.xml").read_text()
IGNORE_LABEL = "Ignore (marker, tube, text)"
SECRET = "suggested-ignore-secret"
N_MASKED, N_FILMS = 8, 12
TAG = (slice(4, 16), slice(44, 60))  # rows, cols of the stamped tag on the 64 px films


@pytest.fixture(scope="module")
def backend(label_studio_server: LabelStudioServer, redis_url: str, tmp_path_factory) -> Iterator[tuple[str, Settings]]:
    shared_or_skip(NIH)
    ls = label_studio_server
    env = {
        "MODEL_DIR": str(tmp_path_factory.mktemp("suggested-e2e-models")),
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "WEBHOOK_SECRET": SECRET,
        "REDIS_URL": redis_url,
        "INPUT_SIZE": "128",
        "PROMOTION_GATE": "0",  # a dozen annotations: the gate would keep the candidate; here it goes live
        "TRAIN_EPOCHS": "1",
    }
    settings = Settings.from_env(env)
    with app_in_thread(settings) as url:
        yield url, settings


def _tagged_films(ls: LabelStudioServer, nih_manifest: list[dict]) -> list[str]:
    folder = Path(ls.local_files_root) / f"suggested-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    refs = []
    for record in nih_manifest[:N_FILMS]:
        pixels = np.asarray(Image.open(NIH / record["image"]).convert("L")).copy()
        pixels[TAG] = np.where(np.indices((12, 16)).sum(axis=0) // 2 % 2, 255, 0)  # a burned-in text-like tag
        name = Path(record["image"]).name
        Image.fromarray(pixels).save(folder / name)
        refs.append(f"/data/local-files/?d={folder.name}/{name}")
    return refs


def _ignore_region(width: int, height: int) -> dict[str, Any]:
    alpha = np.zeros((height, width), dtype=np.uint8)
    alpha[TAG] = 255
    return {
        "from_name": "evidence",
        "to_name": "image",
        "type": "bitmasklabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"imageDataURL": encode_heat_png(alpha), "bitmasklabels": [IGNORE_LABEL]},
    }


def _choices(labels: list[str]) -> dict[str, Any]:
    return {
        "from_name": "findings",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": labels or ["No Finding"]},
    }


def _wait_recorded(settings: Settings, project: str, count: int) -> None:
    store = AnnotationStore(connect(settings), project)
    deadline = time.monotonic() + 30
    while store.count() < count:
        assert time.monotonic() < deadline, f"the webhook recorded {store.count()} of {count} annotations"
        time.sleep(0.2)


def test_a_suggested_ignore_region_is_confirmed_and_trained_on(
    label_studio_server: LabelStudioServer, backend: tuple[str, Settings], nih_manifest: list[dict]
) -> None:
    from label_studio_sdk import LabelStudio

    ls = label_studio_server
    backend_url, settings = backend
    client = LabelStudio(base_url=ls.url, api_key=ls.token)
    p = client.projects.create(title=f"suggested-ignore-{time.monotonic_ns()}", label_config=CONFIG)
    refs = _tagged_films(ls, nih_manifest)
    client.import_storage.local.create(
        project=p.id, path=str(Path(ls.local_files_root) / refs[0].split("=")[1].split("/")[0]), use_blob_urls=True
    )
    client.projects.import_tasks(id=p.id, request=[{"image": ref} for ref in refs])
    tasks = sorted(client.tasks.list(project=p.id), key=lambda t: t.id)
    connect_project(ls.url, ls.token, p.id, backend_url, webhook_secret=SECRET)
    project = str(p.id)

    # Physicians mask the tag on eight films (the webhook records them); the first job fits the detector.
    for task, record in zip(tasks[:N_MASKED], nih_manifest, strict=False):
        client.annotations.create(id=task.id, result=[_choices(record["labels"]), _ignore_region(64, 64)])
    _wait_recorded(settings, project, N_MASKED)
    first = train_project(project, settings, force=True)
    assert first["status"] == "trained", first
    versions = VersionStore(settings.model_dir)
    live = versions.info(project, first["version"])
    propagation = live.meta.training["mask_propagation"]
    assert (live.path / DETECTOR_FILE).is_file(), propagation

    # The ranking offers the tag on the unlabelled films as suggestions, stored in Label Studio's prediction.
    summary = rank_project(p.id, settings, RankOptions(), conn=connect(settings))
    assert summary["status"] == "ranked" and summary["version"] == live.version, summary
    interface = LabelInterface(CONFIG)
    suggested: dict[int, list[dict[str, Any]]] = {}
    for task in tasks[N_MASKED:]:
        (prediction,) = [x for x in client.predictions.list(task=task.id) if x.model_version == live.version]
        assert interface.validate_prediction({"result": prediction.result, "score": 0.5}, return_errors=True) in (
            True,
            [],
        )
        regions = [r for r in prediction.result if str(r.get("id", "")).startswith(PREFIX)]
        for r in regions:
            assert r["value"]["bitmasklabels"] == [IGNORE_LABEL] and "suggested" in r["meta"]["text"][0]
        if regions:
            suggested[task.id] = [r for r in prediction.result if r["type"] != "textarea"]
    print(f"suggestions on {len(suggested)} of {N_FILMS - N_MASKED} unlabelled films; propagation {propagation}")
    assert len(suggested) >= 2, "the detector suggested the tag on fewer than two unlabelled films"

    # One physician keeps the suggestion (submits the prediction's regions as they are), one deletes it.
    keep, delete = list(suggested)[:2]
    client.annotations.create(id=keep, result=suggested[keep])
    client.annotations.create(id=delete, result=[r for r in suggested[delete] if not str(r["id"]).startswith(PREFIX)])
    _wait_recorded(settings, project, N_MASKED + 2)
    stored = {a.task_id: a for a in AnnotationStore(connect(settings), project).snapshot()[1]}
    assert any(m.suggested.startswith(PREFIX) for m in stored[keep].masks.values())

    second = train_project(project, settings, force=True)
    assert second["status"] == "trained", second
    counts = second["suggested_ignore"]
    assert counts["confirmed"] >= 1 and counts["deleted"] >= 1, counts
    meta = versions.info(project, second["version"]).meta.training
    assert meta["suggested_ignore"] == counts
    print("second job:", {k: meta[k] for k in ("annotations_used", "holdout", "masked_ignore", "regions_skipped")})
    print("mask propagation:", meta["mask_propagation"])
    # Every training annotation carries an ignore mask, drawn or a kept suggestion, except the deleted one, which
    # (in the training split) went to the detector as a negative.
    rejected = meta["mask_propagation"]["rejected_images"]
    assert meta["masked_ignore"] == meta["annotations_used"] - rejected
    if rejected:
        assert meta["mask_propagation"]["rejected_cells"] > 0
