"""What an untrusted caller can and cannot do to the app: credentials in any encoding, oversized bodies, what
/health and /metrics reveal, the cost of a new project, and who may change the model's label set."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from conftest import CHEST_CONFIG
from fastapi.testclient import TestClient

from ml_backend.serve.app import create_app


def _basic(user: bytes, password: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user + b":" + password).decode()}


def test_non_ascii_credentials_are_compared_not_crashed_on(settings, ls_request) -> None:
    secured = replace(settings, basic_auth_user="médecin", basic_auth_pass="clé€", webhook_secret="sécret")
    with TestClient(create_app(secured), raise_server_exceptions=False) as client:
        assert client.get("/health", headers=_basic("médecin".encode(), "clé€".encode())).status_code == 200
        for headers in (
            _basic("médecin".encode(), b"wrong"),
            _basic(b"\xff\xfe", b"\x80"),  # not UTF-8 at all
            {"Authorization": "Basic !!!not-base64"},
            {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        ):
            assert client.get("/health", headers=headers).status_code == 401
        event = {"action": "TASKS_CREATED", "project": {"id": 2}}
        # Header values travel as latin-1: a non-ASCII secret arrives as its UTF-8 bytes read as latin-1
        assert client.post("/webhook?token=sécret", json=event).status_code == 200
        assert client.post("/webhook?token=sécreté", json=event).status_code == 401
        assert client.post("/webhook", json=event, headers={"X-Webhook-Secret": "sécret".encode()}).status_code == 200
        assert client.post("/webhook", json=event, headers={"X-Webhook-Secret": "été".encode()}).status_code == 401
    plain = replace(settings, webhook_secret="secret")
    with TestClient(create_app(plain), raise_server_exceptions=False) as client:
        event = {"action": "TASKS_CREATED", "project": {"id": 2}}
        wrong = {"X-Webhook-Secret": "s\u00e9cret".encode()}
        assert client.post("/webhook", json=event, headers=wrong).status_code == 401
        assert client.post("/webhook?token=%C3%A9", json=event).status_code == 401


def test_bodies_over_the_limit_get_413_declared_or_streamed(settings) -> None:
    small = replace(settings, max_body_bytes=10_000)
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        big = b'{"tasks": [' + b"1," * 20_000 + b"1]}"
        for path in ("/predict", "/webhook", "/setup"):
            declared = client.post(path, content=big, headers={"Content-Type": "application/json"})
            assert declared.status_code == 413, (path, declared.text)
            assert "MAX_BODY_BYTES" in declared.json()["detail"]

            def chunks():  # no Content-Length: counted as it streams
                for start in range(0, len(big), 4096):
                    yield big[start : start + 4096]

            streamed = client.post(path, content=chunks(), headers={"Content-Type": "application/json"})
            assert streamed.status_code == 413, (path, streamed.text)
        assert client.post("/setup", content=b"{}", headers={"Content-Type": "application/json"}).status_code == 400


def test_health_and_metrics_reveal_nothing_sensitive_without_auth(client_factory, ls_request) -> None:
    client = client_factory()
    setup = ls_request("setup")
    assert client.post("/setup", json=setup).status_code == 200
    health = client.get("/health").json()
    assert health["status"] == "UP" and "2" not in str(health)  # no project ids
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    assert 'medebiaser_http_requests_total{route="/setup",status="200"} 1.0' in text.text
    assert "medebiaser_http_request_seconds_bucket" in text.text
    assert "medebiaser_predict_failed_tasks_total" in text.text
    as_json = client.get("/metrics?format=json").json()
    assert "last_errors" not in as_json["predict"] and as_json["live_versions"] is None
    assert set(as_json["webhook"]) >= {"received", "recorded", "rejected"}


def test_a_new_project_costs_no_copy_of_the_weights_and_projects_are_capped(settings, ls_request) -> None:
    capped = replace(settings, max_projects=3)
    with TestClient(create_app(capped), raise_server_exceptions=False) as client:
        setup = ls_request("setup")
        for project in ("11.1", "12.1", "13.1"):
            setup["project"] = project
            assert client.post("/setup", json=setup).json() == {"model_version": "v0"}
        store = client.app.state.registry.store
        inodes = {(store.project_dir(p) / "versions" / "v0" / "model.pt").stat().st_ino for p in ("11", "12", "13")}
        assert len(inodes) == 1  # one file on disk, hard-linked into each project's v0
        one_model = (store.project_dir("11") / "versions" / "v0" / "model.pt").stat().st_size
        assert store.disk_usage() < 1.1 * one_model
        setup["project"] = "14.1"
        refused = client.post("/setup", json=setup)
        assert refused.status_code == 403 and "MAX_PROJECTS" in refused.json()["error"]
        assert "14" not in store.projects()  # refused before anything was written


def test_only_setup_or_project_updated_change_the_label_set(client_factory, ls_request, redis_url) -> None:
    client = client_factory(redis_url=redis_url)
    setup = ls_request("setup")
    setup["project"] = "21.1"
    assert client.post("/setup", json=setup).json() == {"model_version": "v0"}
    body = ls_request("predict")
    body["project"], body["label_config"] = "21.1", CHEST_CONFIG  # 14 findings, the live model has 3
    refused = client.post("/predict", json=body)
    assert refused.status_code == 422 and "never changes the model" in refused.json()["error"]
    event = ls_request("webhook_PROJECT_UPDATED")
    event["project"]["id"], event["project"]["label_config"] = 21, CHEST_CONFIG
    answer = client.post("/webhook", json=event)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "v1"
    assert client.app.state.registry.store.info("21", "v1").meta.kind == "label-set-change"


@pytest.fixture()
def client_factory(settings):
    clients: list[TestClient] = []

    def make(**overrides) -> TestClient:
        client = TestClient(create_app(replace(settings, **overrides)), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
