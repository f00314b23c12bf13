"""Label configs the project does not ship, against a real Label Studio 1.23.2 and the real backend: nothing lost.

Two projects a new team would set up on their own:
* A: the findings in a ``Choices`` named ``dx``, a ``BrushLabels`` control with the findings and **"Artifact"**;
* B: a single-choice image-quality control, the findings in ``abnormalities``, ``RectangleLabels`` (evidence
  boxes and a "Chest drain" ignore label), ``PolygonLabels`` and a ``TextArea`` for comments.
Tasks carry real NIH chest X-rays and their patient data under other names than ours (``PatientID``,
``PatientSex``, ``PatientAge`` as DICOM writes it, "058Y"). Physicians submit 10 annotations per project through
Label Studio's API (one with a region whose label is in no control): every one is recorded (``rejected`` stays
0; the odd region is skipped and counted); the retraining policy starts jobs every 10 and the quiet period
trains the rest, until a version is trained on all of them; its metadata carries Equalized Odds by sex; and
while the worker trains and ranks, each unlabelled task keeps a prediction of the version the project points at.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ml_backend.connect import connect_project, make_client, set_project_model_version
from ml_backend.demo.services import BackendProcess
from ml_backend.demo.setup import LabelStudioAPI, local_file_ref
from ml_backend.explain.brush_rle import encode_alpha
from ml_backend.models.store import VersionStore

from .label_studio import PROJECT_ROOT, LabelStudioServer, running_backend

pytestmark = pytest.mark.e2e

NIH = PROJECT_ROOT.parent / "shared" / "data" / "nih1000"
SECRET = "any-config-webhook-secret"
FINDINGS = ["Cardiomegaly", "Effusion", "Infiltration", "Atelectasis"]
N_TASKS, N_ANNOTATED = 104, 100
CONFIG_A = f"""<View>
  <Image name="xray" value="$img"/>
  <Choices name="dx" toName="xray" choice="multiple">
    {"".join(f'<Choice value="{f}"/>' for f in FINDINGS)}<Choice value="Normal"/>
  </Choices>
  <BrushLabels name="paint" toName="xray">
    {"".join(f'<Label value="{f}"/>' for f in FINDINGS)}<Label value="Artifact" background="#ff00ff"/>
  </BrushLabels>
</View>"""
CONFIG_B = f"""<View>
  <Image name="film" value="$picture"/>
  <Choices name="quality" toName="film" choice="single"><Choice value="Good"/><Choice value="Poor"/></Choices>
  <Choices name="abnormalities" toName="film" choice="multiple">
    {"".join(f'<Choice value="{f}"/>' for f in FINDINGS)}<Choice value="No finding"/>
  </Choices>
  <RectangleLabels name="boxes" toName="film">
    {"".join(f'<Label value="{f}"/>' for f in FINDINGS)}<Label value="Chest drain"/>
  </RectangleLabels>
  <PolygonLabels name="outline" toName="film"><Label value="Effusion"/><Label value="Pacemaker"/></PolygonLabels>
  <TextArea name="comment" toName="film"/>
</View>"""
BACKEND_ENV = {
    "INPUT_SIZE": "64",
    "TRAIN_EPOCHS": "1",
    "TRAIN_BATCH_SIZE": "8",
    "LOG_LEVEL": "INFO",
    "HEATMAP_MAX_FINDINGS": "1",
    "PATIENT_FIELDS": "patient_id=PatientID,sex=PatientSex,age=PatientAge",
    # 10 annotations hold out 4 images, too few for the gate to be sure either way; this test is about nothing
    # being lost, and it needs the version live to watch the ranking (tests/test_promotion.py tests the gate).
    "PROMOTION_GATE": "0",
    "WORKER_MAINTENANCE_S": "3",
    "RETRAIN_QUIET_S": "8",  # the last few annotations (fewer than 10) train after a short quiet period
}


def _say(message: str) -> None:
    print(f"[any-config {time.strftime('%H:%M:%S')}] {message}", flush=True)


@pytest.fixture(scope="module")
def nih_records(label_studio_server: LabelStudioServer) -> tuple[Path, list[dict[str, Any]]]:
    if not NIH.exists():
        pytest.skip(f"{NIH} is absent: this test needs ../shared/data")
    manifest = json.loads((NIH / "manifest.json").read_text())
    # Both sexes, several findings, no patient twice (one image per patient keeps the split simple to read)
    chosen, seen = [], set()
    for record in manifest:
        if record["patient_id"] in seen or not (set(record["labels"]) & set(FINDINGS) or not record["labels"]):
            continue
        seen.add(record["patient_id"])
        chosen.append(record)
        if len(chosen) == 2 * N_TASKS:
            break
    folder = label_studio_server.local_files_root / "any-config"
    folder.mkdir(parents=True, exist_ok=True)
    for record in chosen:  # into Label Studio's scratch document root, not the project
        shutil.copy(NIH / record["image"], folder / Path(record["image"]).name)
    return folder, chosen


@pytest.fixture(scope="module")
def backend(label_studio_server: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    work = tmp_path_factory.mktemp("any-config-backend")
    env = {**BACKEND_ENV, "WEBHOOK_SECRET": SECRET}
    with running_backend(work, label_studio_server, env, "any-config-backend.log") as process:
        yield process, work / "models"


def _task_data(record: dict[str, Any], key: str, folder: Path, root: Path, index: int) -> dict[str, Any]:
    data: dict[str, Any] = {key: local_file_ref(folder / Path(record["image"]).name, root)}
    data["PatientID"] = record["patient_id"]
    data["PatientSex"] = record["sex"]
    data["PatientAge"] = f"{int(record['age']):03d}Y" if index % 2 else record["age"]
    return data


def _findings(record: dict[str, Any]) -> list[str]:
    return [f for f in record["labels"] if f in FINDINGS]


def _result_a(record: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = [
        {
            "from_name": "dx",
            "to_name": "xray",
            "type": "choices",
            "value": {"choices": _findings(record) or ["Normal"]},
        }
    ]

    def brush(label: str, rows: slice, cols: slice) -> dict[str, Any]:
        alpha = np.zeros((64, 64), np.uint8)
        alpha[rows, cols] = 255
        return {
            "from_name": "paint",
            "to_name": "xray",
            "type": "brushlabels",
            "original_width": 64,
            "original_height": 64,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": encode_alpha(alpha), "brushlabels": [label]},
        }

    result.append(brush("Artifact", slice(0, 8), slice(0, 10)))  # the film's corner text
    if _findings(record):
        result.append(brush(_findings(record)[0], slice(16, 56), slice(8, 56)))
    return result


def _result_b(record: dict[str, Any], odd_region: bool) -> list[dict[str, Any]]:
    base = {"to_name": "film", "original_width": 64, "original_height": 64, "image_rotation": 0}
    result: list[dict[str, Any]] = [
        {"from_name": "quality", "to_name": "film", "type": "choices", "value": {"choices": ["Good"]}},
        {
            "from_name": "abnormalities",
            "to_name": "film",
            "type": "choices",
            "value": {"choices": _findings(record) or ["No finding"]},
        },
        {"from_name": "comment", "to_name": "film", "type": "textarea", "value": {"text": ["reviewed"]}},
        {
            **base,
            "from_name": "boxes",
            "type": "rectanglelabels",
            "value": {"x": 70, "y": 5, "width": 25, "height": 40, "rotation": 0, "rectanglelabels": ["Chest drain"]},
        },
    ]
    if _findings(record):
        result.append(
            {
                **base,
                "from_name": "boxes",
                "type": "rectanglelabels",
                "value": {
                    "x": 15,
                    "y": 25,
                    "width": 70,
                    "height": 55,
                    "rotation": 0,
                    "rectanglelabels": [_findings(record)[0]],
                },
            }
        )
    if "Effusion" in _findings(record):
        result.append(
            {
                **base,
                "from_name": "outline",
                "type": "polygonlabels",
                "value": {"points": [[10, 60], [45, 60], [40, 90], [12, 92]], "polygonlabels": ["Effusion"]},
            }
        )
    if odd_region:  # a label no control of the config has: skipped and counted, the annotation kept
        odd = {"x": 1, "y": 1, "width": 5, "height": 5, "rotation": 0, "rectanglelabels": ["Foo"]}
        result.append({**base, "from_name": "boxes", "type": "rectanglelabels", "value": odd})
    return result


def _latest_of(predictions: list[dict[str, Any]], version: str) -> dict[str, Any] | None:
    mine = [p for p in predictions if p["model_version"] == version]
    return max(mine, key=lambda p: p["id"]) if mine else None


@pytest.mark.parametrize("variant", ["A", "B"])
def test_own_label_config_nothing_lost(
    label_studio_server: LabelStudioServer,
    backend: tuple[BackendProcess, Path],
    nih_records: tuple[Path, list[dict[str, Any]]],
    variant: str,
) -> None:
    ls = label_studio_server
    process, model_dir = backend
    folder, records = nih_records
    records = records[:N_TASKS] if variant == "A" else records[N_TASKS:]
    config, key = (CONFIG_A, "img") if variant == "A" else (CONFIG_B, "picture")
    with LabelStudioAPI(ls.url, ls.token) as api:
        project = int(api.create_project(f"any-config-{variant}-{time.monotonic_ns()}", config)["id"])
        api.ensure_local_storage(project, folder)
        data = [_task_data(r, key, folder, ls.local_files_root, i) for i, r in enumerate(records)]
        assert api.import_tasks(project, data) == len(records)
        connect_project(ls.url, ls.token, project, process.url, webhook_secret=SECRET)
        tasks = sorted(api.tasks(project), key=lambda t: t["id"])
        ids = [t["id"] for t in tasks]
        api.retrieve_predictions(project, ids)
        assert all(_latest_of(api.predictions(t), "v0") for t in ids), "every task predicted by v0"
        assert set_project_model_version(make_client(ls.url, ls.token), project, "v0") is True
        before = httpx.get(f"{process.url}/metrics?format=json", timeout=10).json()["webhook"]

        for i, (task_id, record) in enumerate(zip(ids[:N_ANNOTATED], records, strict=False)):
            result = _result_a(record) if variant == "A" else _result_b(record, odd_region=i == 3)
            api.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": result, "lead_time": 30.0})
        after = httpx.get(f"{process.url}/metrics?format=json", timeout=10).json()["webhook"]
        recorded = after["recorded"] - before["recorded"]
        _say(f"{variant}: webhook stats after {N_ANNOTATED} annotations: {after}")
        assert recorded == N_ANNOTATED and after["rejected"] == before["rejected"] == 0, after
        if variant == "B":
            assert after["regions_skipped"] - before["regions_skipped"] >= 1 and after["skip_reasons"], after

        # Jobs start every 10 annotations and after the quiet period; while the worker trains and ranks, every
        # unlabelled task keeps a prediction of the version the project points at, until the project points at a
        # version trained on all the annotations.
        store = VersionStore(model_dir)
        unlabelled = ids[N_ANNOTATED:]
        deadline, checks, seen = time.monotonic() + 600, 0, []
        while True:
            pointed = api.project(project)["model_version"]
            for task_id in unlabelled:
                assert _latest_of(api.predictions(task_id), pointed), (task_id, pointed, api.predictions(task_id))
            checks += 1
            if pointed not in seen:
                seen.append(pointed)
            if pointed not in ("v0", "MEDebiaser"):
                training = store.info(str(project), pointed).meta.training
                if training["annotations_used"] + training["holdout"] == N_ANNOTATED:
                    break
            assert time.monotonic() < deadline, f"no version trained on all annotations:\n{process.log_tail()}"
            time.sleep(0.5)
        _say(f"{variant}: project pointed at {seen}; {checks} checks of every unlabelled task on the way")

    key_ = str(project)
    assert store.live_version(key_) == pointed
    meta = store.info(key_, pointed).meta
    training = meta.training
    assert training["annotations_used"] + training["holdout"] == N_ANNOTATED, training  # trained on all of them
    assert training["masked_ignore"] >= 1, "the Artifact / Chest drain regions act as ignore masks"
    fairness, coverage = meta.metrics["fairness"], meta.metrics["fairness_coverage"]
    assert coverage["sex"]["measured"], coverage["sex"]  # Equalized Odds by sex, from the tasks' PatientSex
    by_sex = [v["eod"] for v in fairness["sex"]["per_finding"].values() if v["eod"] is not None]
    assert by_sex and fairness["sex"]["worst_ci"] is not None, fairness["sex"]
    _say(f"{variant}: {pointed} meta: training={ {k: training[k] for k in ('annotations_used', 'holdout')} }, "
         f"fairness coverage={coverage}")  # fmt: skip
