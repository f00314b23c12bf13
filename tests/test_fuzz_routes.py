"""Generative fuzzing of every route: whatever the body, a 2xx/4xx JSON answer (per-task reasons in /predict),
never a 5xx, and a healthy server afterwards. Bodies are Label Studio 1.23.2's real requests with parts
replaced by arbitrary JSON, plus arbitrary JSON and bytes; the app runs with a real Redis behind /webhook."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from typing import Any

import pytest
from conftest import CHEST_CONFIG, LS_REQUESTS, NIH, shared_or_skip
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from ml_backend.serve.app import create_app

# Keys Label Studio really sends, so generated objects reach the parsers' branches instead of bouncing off
# the first missing field.
KEYS = [
    "action", "project", "annotation", "annotations", "task", "tasks", "id", "result", "data", "image",
    "label_config", "schema", "was_cancelled", "value", "type", "from_name", "to_name", "rle", "format",
    "brushlabels", "choices", "original_width", "original_height", "points", "x", "y", "width", "height",
    "imageDataURL", "bitmasklabels", "rectanglelabels", "polygonlabels", "extra_params", "params", "updated_at",
    "patient_id", "sex", "age",
]  # fmt: skip
ACTIONS = [
    "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED", "START_TRAINING",
    "PROJECT_UPDATED", "TASKS_CREATED", "SOMETHING_ELSE",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(["/data/upload/x.png", "file:///etc/passwd", "http://169.254.169.254/", "<View/>", "é€\u0000"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=6),
    ),
    max_leaves=25,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            found += _paths(v, (*prefix, i))
    return found


def _replace_at(body: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    body = copy.deepcopy(body)
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return body


@st.composite
def mutated(draw: st.DrawFn, template: dict) -> Any:
    """A real request with one to three of its parts replaced by arbitrary JSON (or deleted)."""
    body: Any = copy.deepcopy(template)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(body)
        path = draw(st.sampled_from(paths))
        if path and draw(st.booleans()) and isinstance(body, dict):
            parent = body
            try:
                for step in path[:-1]:
                    parent = parent[step]
                del parent[path[-1]]
                continue
            except (KeyError, IndexError, TypeError):
                pass
        body = _replace_at(body, path, draw(json_values))
    return body


def _template(name: str) -> dict:
    return json.loads((shared_or_skip(LS_REQUESTS) / f"{name}.json").read_text())["body"]


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory, file_server, file_root, redis_url):
    from conftest import TOKEN

    from ml_backend.config import HeatmapSettings, Settings

    shutil.copy(shared_or_skip(NIH) / "images" / "00000001_000.png", file_root / "fuzz.png")
    settings = replace(
        Settings(),
        model_dir=tmp_path_factory.mktemp("fuzz-models"),
        label_studio_url=file_server,
        label_studio_api_key=TOKEN,
        redis_url=redis_url,
        max_projects=3,  # fuzzed project ids must not each cost a model: the cap answers 403 instead
        heatmap=HeatmapSettings(max_findings=1),
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _check(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert "error" in response.json()


FUZZ = hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@FUZZ
@given(data=st.data())
def test_webhook_never_answers_5xx(fuzz_client, data) -> None:
    template = _template(data.draw(st.sampled_from([p.stem for p in LS_REQUESTS.glob("webhook_*.json")])))
    body = data.draw(
        st.one_of(
            mutated(template),
            st.fixed_dictionaries(
                {"action": st.sampled_from(ACTIONS), "project": json_values},
                optional={
                    "annotation": json_values,
                    "annotations": json_values,
                    "task": json_values,
                    "tasks": json_values,
                },
            ),
            json_values,
        )  # fmt: skip
    )
    _check(fuzz_client.post("/webhook", content=json.dumps(body), headers={"Content-Type": "application/json"}))


@FUZZ
@given(data=st.data())
def test_predict_never_answers_5xx_and_keeps_one_result_per_task(fuzz_client, data) -> None:
    template = _template("predict")
    template["label_config"] = CHEST_CONFIG
    template["tasks"][0]["data"]["image"] = "/data/upload/fuzz.png"
    body = data.draw(st.one_of(mutated(template), json_values))
    response = fuzz_client.post("/predict", content=json.dumps(body), headers={"Content-Type": "application/json"})
    _check(response)
    if response.status_code == 200 and isinstance(body, dict) and isinstance(body.get("tasks"), list):
        results = response.json()["results"]
        assert len(results) == len(body["tasks"])
        for result in results:
            assert result["result"] or result.get("error")  # an empty result always says why


@FUZZ
@given(data=st.data())
def test_setup_versions_report_never_answer_5xx(fuzz_client, data) -> None:
    body = data.draw(st.one_of(mutated(_template("setup")), json_values))
    _check(fuzz_client.post("/setup", content=json.dumps(body), headers={"Content-Type": "application/json"}))
    project = data.draw(st.one_of(st.text(max_size=12), st.sampled_from(["2", "../x", "1.5", "é"])))
    _check(fuzz_client.get("/versions", params={"project": project}))
    _check(fuzz_client.get("/report", params={"project": project}))


@FUZZ
@given(raw=st.binary(max_size=300), path=st.sampled_from(["/setup", "/predict", "/webhook"]))
def test_arbitrary_bytes_get_a_4xx(fuzz_client, raw, path) -> None:
    _check(fuzz_client.post(path, content=raw, headers={"Content-Type": "application/json"}))


def test_server_is_healthy_after_fuzzing(fuzz_client) -> None:
    assert fuzz_client.get("/health").status_code == 200
    setup = _template("setup")
    setup["schema"] = CHEST_CONFIG
    setup["project"] = "2.1"
    assert fuzz_client.post("/setup", json=setup).status_code in (200, 403)  # 403 once the fuzz filled the cap
    body = _template("predict")
    body["label_config"] = CHEST_CONFIG
    body["tasks"][0]["data"]["image"] = "/data/upload/fuzz.png"
    live = fuzz_client.app.state.registry.store.projects()
    body["project"] = f"{live[0]}.1" if live else "2.1"
    answer = fuzz_client.post("/predict", json=body)
    assert answer.status_code in (200, 422), answer.text  # 422: that project's label set differs (fuzzed setup)
