"""`medebiaser connect` against a real Label Studio, with a tiny stand-in backend (not the real app).

The stand-in answers /health, /setup and /webhook and records what it receives, so these tests check only what
connect_project does to Label Studio: one ML backend, its webhook carrying the secret, the project's model
version, the "Review queue" tab ordered by prediction score -- and that a second run changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from label_studio_sdk import LabelStudio

from ml_backend.connect import (
    REVIEW_VIEW_TITLE,
    SCORE_ORDERING,
    SECRET_HEADER,
    ConnectError,
    ModelVersionNotInProject,
    connect_project,
    set_project_model_version,
    set_review_view,
)

from .label_studio import LabelStudioServer, free_port

pytestmark = pytest.mark.e2e

SECRET = "s3cret-for-tests"
VERSION = "v-test"
FINDINGS = ["Cardiomegaly", "Effusion", "Nodule", "No Finding"]
LABEL_CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <Choices name="findings" toName="image" choice="multiple" showInLine="true">
    {"".join(f'<Choice value="{f}"/>' for f in FINDINGS)}
  </Choices>
  <BrushLabels name="heatmap" toName="image">
    {"".join(f'<Label value="{f}"/>' for f in FINDINGS[:3])}
  </BrushLabels>
</View>"""


class StandInBackend:
    """The ML-backend protocol reduced to what `connect` and Label Studio's connect dialog touch."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                with outer._lock:
                    outer.requests.append(
                        {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                    )
                return body

            def _reply(self, payload: dict[str, Any], status: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._record()
                if self.path.split("?")[0] in ("/", "/health"):
                    self._reply({"status": "UP", "model_version": VERSION})
                else:
                    self._reply({"error": "not found"}, 404)

            def do_POST(self) -> None:  # noqa: N802
                self._record()
                path = self.path.split("?")[0]
                if path == "/setup":
                    self._reply({"model_version": VERSION})
                elif path == "/webhook":
                    self._reply({"status": "ok"})
                elif path == "/predict":
                    self._reply({"results": []})
                else:
                    self._reply({"error": "not found"}, 404)

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seen(self, path: str, method: str = "POST") -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["path"].split("?")[0] == path and r["method"] == method]


@pytest.fixture(scope="module")
def ls(label_studio_server: LabelStudioServer) -> LabelStudioServer:
    print(f"\nLabel Studio startup took {label_studio_server.startup_seconds:.1f} s")
    return label_studio_server


@pytest.fixture(scope="module")
def client(ls: LabelStudioServer) -> LabelStudio:
    return LabelStudio(base_url=ls.url, api_key=ls.token)


@pytest.fixture
def backend() -> Iterator[StandInBackend]:
    with StandInBackend() as b:
        yield b


@pytest.fixture
def project(client: LabelStudio) -> int:
    p = client.projects.create(title=f"connect-{time.monotonic_ns()}", label_config=LABEL_CONFIG)
    for i in range(3):
        client.tasks.create(project=p.id, data={"image": f"/data/local-files/?d=img{i}.png"})
    return int(p.id)


def _state(client: LabelStudio, pid: int, backend_url: str) -> dict[str, Any]:
    backends = [b for b in client.ml.list(project=pid) if b.url.rstrip("/") == backend_url]
    hooks = [h for h in client.webhooks.list(project=str(pid)) if h.url == f"{backend_url}/webhook"]
    views = [v for v in client.views.list(project=pid) if (v.data or {}).get("title") == REVIEW_VIEW_TITLE]
    return {
        "backends": backends,
        "hooks": hooks,
        "views": views,
        "model_version": client.projects.get(id=pid).model_version,
    }


def test_connect_registers_everything_and_is_idempotent(
    ls: LabelStudioServer, client: LabelStudio, backend: StandInBackend, project: int
) -> None:
    t0 = time.monotonic()
    first = connect_project(ls.url, ls.token, project, backend.url, webhook_secret=SECRET)
    print(f"connect (first run) took {time.monotonic() - t0:.2f} s: {first.changes}")
    assert first.changed
    assert first.model_version == VERSION
    # LS refuses a project model_version that no prediction carries yet: connect leaves it for later.
    assert first.model_version_applied is False
    # Label Studio health-checked and set up the backend itself while registering it.
    assert backend.seen("/health", "GET") and backend.seen("/setup")

    state = _state(client, project, backend.url)
    assert len(state["backends"]) == 1
    ml = state["backends"][0]
    assert ml.id == first.ml_backend_id and ml.is_interactive is False and ml.title == "MEDebiaser"
    assert len(state["hooks"]) == 1
    hook = state["hooks"][0]
    assert hook.headers == {SECRET_HEADER: SECRET}
    assert hook.send_payload and hook.send_for_all_actions and hook.is_active
    assert first.webhook_ids == (hook.id,)
    assert state["model_version"] != VERSION
    assert len(state["views"]) == 1
    assert state["views"][0].data["ordering"] == SCORE_ORDERING
    assert state["views"][0].id == first.view_id

    t0 = time.monotonic()
    second = connect_project(ls.url, ls.token, project, backend.url, webhook_secret=SECRET)
    print(f"connect (second run) took {time.monotonic() - t0:.2f} s")
    assert second.changes == ()
    assert (second.ml_backend_id, second.webhook_ids, second.view_id) == (
        first.ml_backend_id,
        first.webhook_ids,
        first.view_id,
    )
    again = _state(client, project, backend.url)
    assert [len(again[k]) for k in ("backends", "hooks", "views")] == [1, 1, 1]
    assert again["hooks"][0].updated_at == hook.updated_at

    # Once a prediction of the backend's version exists, a re-run points the project at it, then rests.
    task = next(iter(client.tasks.list(project=project)))
    client.predictions.create(task=task.id, result=[], score=0.5, model_version=VERSION)
    third = connect_project(ls.url, ls.token, project, backend.url, webhook_secret=SECRET)
    assert third.changes == (f"project model_version -> {VERSION}",) and third.model_version_applied
    assert client.projects.get(id=project).model_version == VERSION
    fourth = connect_project(ls.url, ls.token, project, backend.url, webhook_secret=SECRET)
    assert fourth.changes == () and fourth.model_version_applied


def test_webhook_reaches_backend_with_secret(
    ls: LabelStudioServer, client: LabelStudio, backend: StandInBackend, project: int
) -> None:
    connect_project(ls.url, ls.token, project, backend.url, webhook_secret=SECRET)
    task = next(iter(client.tasks.list(project=project)))
    result = [
        {
            "from_name": "findings",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": ["Effusion", "Nodule"]},
        }
    ]
    client.annotations.create(id=task.id, result=result)
    # LS sends webhooks synchronously inside the save request, so the event is already here.
    events = [r for r in backend.seen("/webhook") if (r["body"] or {}).get("action") == "ANNOTATION_CREATED"]
    assert len(events) == 1, [r["body"].get("action") for r in backend.seen("/webhook")]
    headers = {k.lower(): v for k, v in events[0]["headers"].items()}
    assert headers.get(SECRET_HEADER.lower()) == SECRET
    assert events[0]["body"]["annotation"]["result"][0]["value"]["choices"] == ["Effusion", "Nodule"]


def test_review_view_orders_by_score_of_current_version(
    ls: LabelStudioServer, client: LabelStudio, backend: StandInBackend, project: int
) -> None:
    tasks = sorted(client.tasks.list(project=project), key=lambda t: t.id)
    scores = {tasks[0].id: 0.2, tasks[1].id: 0.9, tasks[2].id: 0.5}
    for tid, score in scores.items():
        client.predictions.create(task=tid, result=[], score=score, model_version=VERSION)
    # An old version's high score must not count: the column averages only project.model_version's scores.
    client.predictions.create(task=tasks[0].id, result=[], score=0.99, model_version="v-old")
    result = connect_project(ls.url, ls.token, project, backend.url, webhook_secret=SECRET)
    assert result.model_version_applied

    ordered = [t.id for t in client.tasks.list(project=project, view=result.view_id)]
    assert ordered == sorted(scores, key=scores.get, reverse=True)

    # The ranking job's path: a new version makes that version's scores count instead.
    assert set_project_model_version(client, project, "v-old") is True
    assert set_project_model_version(client, project, "v-old") is False
    with pytest.raises(ModelVersionNotInProject, match="v-never"):
        set_project_model_version(client, project, "v-never")
    assert [t.id for t in client.tasks.list(project=project, view=result.view_id)][0] == tasks[0].id

    # A user changed the tab's ordering and added a filter: set_review_view restores ordering, keeps filter.
    view = client.views.get(id=str(result.view_id))
    data = dict(view.data)
    data["ordering"] = ["tasks:id"]
    data["filters"] = {
        "conjunction": "and",
        "items": [{"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": 0}],
    }
    client.views.update(id=str(result.view_id), data=data, project=project)
    assert set_review_view(client, project) == (result.view_id, True)
    fixed = client.views.get(id=str(result.view_id)).data
    assert fixed["ordering"] == SCORE_ORDERING
    assert fixed["filters"]["items"][0]["filter"] == "filter:tasks:id"
    assert set_review_view(client, project) == (result.view_id, False)


def test_basic_auth_is_registered_once(
    ls: LabelStudioServer, client: LabelStudio, backend: StandInBackend, project: int
) -> None:
    auth = ("physician", "pw-123")
    first = connect_project(ls.url, ls.token, project, backend.url, webhook_secret=SECRET, basic_auth=auth)
    ml = client.ml.get(id=first.ml_backend_id)
    assert ml.auth_method == "BASIC_AUTH" and ml.basic_auth_user == "physician" and ml.basic_auth_pass_is_set
    setup_auth = [r["headers"].get("Authorization", "") for r in backend.seen("/setup")]
    assert any(h.startswith("Basic ") for h in setup_auth), setup_auth
    assert connect_project(ls.url, ls.token, project, backend.url, webhook_secret=SECRET, basic_auth=auth).changes == ()
    # Dropping auth is a change; the project still has one backend.
    third = connect_project(ls.url, ls.token, project, backend.url, webhook_secret=SECRET)
    assert third.changed and third.ml_backend_id == first.ml_backend_id
    assert client.ml.get(id=first.ml_backend_id).auth_method == "NONE"


def test_wrong_token(ls: LabelStudioServer, backend: StandInBackend, project: int) -> None:
    with pytest.raises(ConnectError, match="token"):
        connect_project(ls.url, "0" * 40, project, backend.url, webhook_secret=SECRET)


def test_unknown_project(ls: LabelStudioServer, backend: StandInBackend) -> None:
    with pytest.raises(ConnectError, match="project 987654 does not exist"):
        connect_project(ls.url, ls.token, 987654, backend.url, webhook_secret=SECRET)


def test_backend_unreachable(ls: LabelStudioServer, client: LabelStudio, project: int) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectError, match="cannot reach the ML backend"):
        connect_project(ls.url, ls.token, project, url, webhook_secret=SECRET)
    assert client.ml.list(project=project) == []  # nothing half-registered


def test_backend_reachable_here_but_not_from_label_studio(
    ls: LabelStudioServer, client: LabelStudio, backend: StandInBackend, project: int
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # what LS is told; we check the stand-in instead
    with pytest.raises(ConnectError, match="reachable from the Label Studio server"):
        connect_project(ls.url, ls.token, project, url, webhook_secret=SECRET, backend_check_url=backend.url)


def test_label_studio_unreachable(backend: StandInBackend) -> None:
    with pytest.raises(ConnectError, match="cannot reach Label Studio"):
        connect_project(f"http://127.0.0.1:{free_port()}", "0" * 40, 1, backend.url, webhook_secret=SECRET)


@pytest.mark.parametrize(
    "ssrf_env",
    [
        # Defaults: LS refuses to register the backend (403).
        {"ML_BLOCK_LOCAL_IP": "true", "SSRF_PROTECTION_ENABLED": "true"},
        # Only ML_BLOCK_LOCAL_IP off: LS 1.23.2 still answers 403 ("reserved network address") for 127.0.0.1.
        {"ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "true"},
    ],
    ids=["defaults", "only-ml-block-off"],
)
def test_ssrf_protection_is_explained(
    ls: LabelStudioServer, backend: StandInBackend, project: int, tmp_path: Path, ssrf_env: dict[str, str]
) -> None:
    """Label Studio with SSRF protection refuses a 127.0.0.1 backend; the error says what to set."""
    data_dir = tmp_path / "ls-ssrf"
    data_dir.mkdir()
    # Copy the migrated database (online backup) so this second server starts in seconds, same token.
    src, dst = sqlite3.connect(Path(ls.data_dir) / "ls.sqlite3"), sqlite3.connect(data_dir / "ls.sqlite3")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    strict = LabelStudioServer(data_dir, username=ls.username, password=ls.password, token=ls.token, extra_env=ssrf_env)
    with strict:
        print(f"\nsecond Label Studio (migrated DB) startup took {strict.startup_seconds:.1f} s")
        with pytest.raises(ConnectError) as info:
            connect_project(strict.url, strict.token, project, backend.url, webhook_secret=SECRET)
    message = str(info.value)
    print(f"ssrf ({ssrf_env}): {message}")
    assert "ML_BLOCK_LOCAL_IP=false" in message and "SSRF_PROTECTION_ENABLED=false" in message
