"""Probabilities and reasons in front of the physician: the read-only ``model_summary`` TextArea filled from the
prediction, and the Data Manager columns written into task data (issue 14, part 4)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CHEST_CONFIG, ROOT
from label_studio_sdk.label_interface import LabelInterface

from ml_backend.config import Settings
from ml_backend.feedback.annotations import parse_annotation
from ml_backend.inference.results import build_prediction
from ml_backend.inference.summary import RANKING_PREFIX, add_ranking_to_summary, ranking_line
from ml_backend.io.label_config import SUMMARY_CONTROL, describe_label_mapping, parse_label_config
from ml_backend.io.label_studio import set_review_view
from ml_backend.models.registry import ModelRegistry
from ml_backend.rank.columns import (
    PRIORITY,
    RANK,
    REASON,
    ColumnOwnership,
    ColumnWrites,
    clear_queue_columns,
    column_types,
    probability_column,
    review_columns,
    write_review_columns,
)

BITMASK_CONFIG = (ROOT / "label_config" / "chest_xray_bitmask.xml").read_text()
SUMMARY_TAG = re.compile(r"\s*<TextArea name=\"model_summary\"[^>]*/>")
W, H = 80, 64


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    settings = replace(Settings(), model_dir=tmp_path_factory.mktemp("models"), backbone="test_resnet", input_size=64)
    return settings, ModelRegistry(settings).get("1", parse_label_config(CHEST_CONFIG).findings)


def _predict(config: str, settings: Settings, model: Any) -> tuple[dict[str, Any], np.ndarray]:
    k = len(model.labels)
    probabilities = np.linspace(0.95, 0.02, k).astype(np.float32)  # the first findings above 0.5
    cams = torch.rand(k, 8, 10, generator=torch.Generator().manual_seed(0))
    schema = parse_label_config(config)
    return build_prediction(settings.heatmap, schema, model, probabilities, cams, W, H), probabilities


def test_the_shipped_configs_have_the_summary_control() -> None:
    for config in (BITMASK_CONFIG, CHEST_CONFIG):
        schema = parse_label_config(config)
        assert schema.summary_name == SUMMARY_CONTROL
        assert ("TextArea", SUMMARY_CONTROL) in schema.other_controls  # known, so an annotation with it parses
        row = next(r for r in describe_label_mapping(schema) if r["control"] == SUMMARY_CONTROL)
        assert row["role"] == "model summary"
    # a TextArea of another name (a physician's comment) is not the model's
    other = parse_label_config(CHEST_CONFIG.replace('name="model_summary"', 'name="comment"'))
    assert other.summary_name is None


@pytest.mark.parametrize("config", [BITMASK_CONFIG, CHEST_CONFIG], ids=["bitmask", "brush"])
def test_prediction_carries_every_probability_in_a_readonly_textarea(loaded, config) -> None:
    settings, model = loaded
    prediction, probabilities = _predict(config, settings, model)
    assert LabelInterface(config).validate_prediction(prediction, return_errors=True) in (True, [])
    (summary,) = [r for r in prediction["result"] if r["type"] == "textarea"]
    assert summary["from_name"] == SUMMARY_CONTROL and summary["to_name"] == "image" and summary["readonly"] is True
    predicted, everything = summary["value"]["text"]
    for label, p in zip(model.labels, probabilities, strict=True):
        assert f"{label} p={p:.2f}" in everything
        assert (f"{label} p={p:.2f}" in predicted) == bool(p >= model.thresholds[model.labels.index(label)])
    assert predicted.startswith(f"Model {model.version}, predicted: Atelectasis p=0.95")
    assert everything.index("Atelectasis") < everything.index("Pneumothorax")  # most probable first


def test_a_config_without_the_control_gets_no_summary(loaded) -> None:
    settings, model = loaded
    bare = SUMMARY_TAG.sub("", BITMASK_CONFIG)
    assert "model_summary" not in bare
    prediction, _ = _predict(bare, settings, model)
    assert not [r for r in prediction["result"] if r["type"] == "textarea"]
    assert LabelInterface(bare).validate_prediction(prediction, return_errors=True) in (True, [])


def test_the_ranking_reason_goes_first_and_is_replaced_on_a_rerank(loaded) -> None:
    settings, model = loaded
    prediction, _ = _predict(BITMASK_CONFIG, settings, model)
    schema = parse_label_config(BITMASK_CONFIG)
    ranking = {"rank": 3, "priority": 0.7123, "reason": "heatmap on a marker", "strategy": "bias"}
    add_ranking_to_summary(prediction["result"], schema, ranking)
    add_ranking_to_summary(prediction["result"], schema, {**ranking, "rank": 2})  # idempotent: one reason line
    (summary,) = [r for r in prediction["result"] if r["type"] == "textarea"]
    lines = summary["value"]["text"]
    assert (
        lines[0]
        == "In your queue at #2 (priority 0.71, bias): heatmap on a marker"
        == ranking_line({**ranking, "rank": 2})
    )
    assert len(lines) == 3 and sum(line.startswith(RANKING_PREFIX) for line in lines) == 1
    assert LabelInterface(BITMASK_CONFIG).validate_prediction(prediction, return_errors=True) in (True, [])
    # no summary control: nothing added, nothing breaks
    bare = parse_label_config(SUMMARY_TAG.sub("", BITMASK_CONFIG))
    result: list[dict[str, Any]] = []
    add_ranking_to_summary(result, bare, ranking)
    assert result == []


def test_an_annotation_with_the_summary_still_trains(loaded) -> None:
    """A physician submits the pre-annotation as is: the summary rides along and is ignored for training."""
    settings, model = loaded
    prediction, _ = _predict(BITMASK_CONFIG, settings, model)
    schema = parse_label_config(BITMASK_CONFIG)
    add_ranking_to_summary(prediction["result"], schema, {"rank": 1, "priority": 0.9, "reason": "r", "strategy": "x"})
    annotation = {"id": 5, "result": prediction["result"]}
    task = {"id": 9, "data": {"image": "/data/upload/a.png", RANK: 1, REASON: "r", "p_Effusion": 0.4}}
    record = parse_annotation("1", annotation, task, schema, settings=settings)
    without = parse_annotation(
        "1",
        {"id": 5, "result": [r for r in prediction["result"] if r["type"] != "textarea"]},
        task,
        schema,
        settings=settings,
    )
    assert record is not None and without is not None
    assert record.positives == without.positives and set(record.masks) == set(without.masks)
    assert record.skipped == without.skipped == []


def test_review_columns_and_their_types() -> None:
    labels = ("Effusion", "Pleural Thickening", "a.b")
    values = review_columns(
        {"rank": 4, "priority": 0.51234, "reason": "rare finding"}, labels, np.array([0.2, 0.9, 0.1])
    )
    assert values == {
        RANK: 4,
        PRIORITY: 0.5123,
        REASON: "rare finding",
        "top_finding": "Pleural Thickening",
        "top_probability": 0.9,
        "p_Effusion": 0.2,
        "p_Pleural_Thickening": 0.9,
        "p_a_b": 0.1,
    }
    assert probability_column("Pleural Thickening") == "p_Pleural_Thickening"
    types = column_types(labels)
    assert types["tasks:data.review_rank"] == types["tasks:data.p_a_b"] == "Number"
    assert "tasks:data.review_reason" not in types  # text: filtered with "contains"


class FakeTasks:
    """``client.tasks`` in memory: list (stored data, or resolved when asked) and update."""

    def __init__(self, data: dict[int, dict[str, Any]]) -> None:
        self.data = data
        self.updates: list[tuple[int, dict[str, Any], Any]] = []
        self.fail: set[int] = set()

    def list(self, project: int, include: str, resolve_uri: bool, page_size: int, query: str) -> list[Any]:
        assert resolve_uri is False and include == "id,data"
        ids = json.loads(query)["selectedItems"]["included"]
        return [SimpleNamespace(model_dump=lambda i=i: {"id": i, "data": dict(self.data[i])}) for i in ids]

    def update(self, id: str, data: dict[str, Any], request_options: Any) -> None:
        if int(id) in self.fail:
            raise RuntimeError("Label Studio said no")
        self.updates.append((int(id), data, request_options))
        self.data[int(id)] = dict(data)


def test_columns_merge_into_the_stored_data_and_skip_unchanged_tasks(tmp_path: Path) -> None:
    tasks = FakeTasks({1: {"image": "s3://bucket/a.png", "site": "A"}, 2: {"image": "s3://bucket/b.png"}, 3: {}})
    client = SimpleNamespace(tasks=tasks)
    ownership = ColumnOwnership(tmp_path / "review_columns.json")
    values = {1: {RANK: 1, REASON: "why"}, 2: {RANK: 2, REASON: "why not"}}
    assert write_review_columns(client, 7, values, ownership) == ColumnWrites(written=2)
    assert tasks.data[1] == {"image": "s3://bucket/a.png", "site": "A", RANK: 1, REASON: "why"}  # merged, raw URL
    assert all(options == {"additional_query_parameters": {"fields": "id"}} for _, _, options in tasks.updates)
    assert write_review_columns(client, 7, values, ownership) == ColumnWrites()  # nothing changed: no PATCH
    tasks.fail = {2}
    # one failure, logged; a new job reads the record from disk
    ownership = ColumnOwnership(tmp_path / "review_columns.json")
    assert write_review_columns(client, 7, {1: {RANK: 3}, 2: {RANK: 4}}, ownership) == ColumnWrites(1, 1)
    # annotated since: the queue columns go, the rest stays; tasks without them are not read at all
    tasks.fail = set()
    listed = [{"id": 1, "data": {"image": "/tasks/1/resolve/?fileuri=x", RANK: 3}}, {"id": 3, "data": {}}]
    assert clear_queue_columns(client, 7, listed, ownership) == ColumnWrites(written=1)
    assert tasks.data[1] == {"image": "s3://bucket/a.png", "site": "A"}


def test_a_tasks_own_fields_are_never_overwritten_nor_removed(tmp_path: Path) -> None:
    """A user's data field named like a column (another reader's probability, a rank of their own) is theirs:
    that column is left out for that task and counted; every other column is written as usual."""
    user = {"image": "a.png", "p_Effusion": 0.7, RANK: "urgent"}
    tasks = FakeTasks({1: dict(user), 2: {"image": "b.png"}})
    client = SimpleNamespace(tasks=tasks)
    record = tmp_path / "review_columns.json"
    values = {t: {RANK: t, REASON: "why", "p_Effusion": 0.1 * t} for t in (1, 2)}
    done = write_review_columns(client, 7, values, ColumnOwnership(record))
    assert done == ColumnWrites(written=2, user_fields_kept=2)
    assert tasks.data[1] == {**user, REASON: "why"}
    assert tasks.data[2] == {"image": "b.png", RANK: 2, REASON: "why", "p_Effusion": 0.2}
    # A later job (the record read from disk) updates its own columns and still leaves the user's alone.
    values = {t: {RANK: 3 - t, REASON: "because", "p_Effusion": 0.5} for t in (1, 2)}
    done = write_review_columns(client, 7, values, ColumnOwnership(record))
    assert done == ColumnWrites(written=2, user_fields_kept=2)
    assert tasks.data[1] == {**user, REASON: "because"} and tasks.data[2][RANK] == 1
    # Annotated: only the queue columns this backend wrote go.
    listed = [{"id": t, "data": dict(tasks.data[t])} for t in (1, 2)]
    assert clear_queue_columns(client, 7, listed, ColumnOwnership(record)) == ColumnWrites(written=2)
    assert tasks.data[1] == user and tasks.data[2] == {"image": "b.png", "p_Effusion": 0.5}
    # A user field added after a column was cleared is the user's too.
    tasks.data[2][RANK] = "second read"
    done = write_review_columns(client, 7, {2: {RANK: 1, REASON: "why"}}, ColumnOwnership(record))
    assert done == ColumnWrites(written=1, user_fields_kept=1) and tasks.data[2][RANK] == "second read"


def test_the_record_forgets_deleted_tasks(tmp_path: Path) -> None:
    record = tmp_path / "review_columns.json"
    ownership = ColumnOwnership(record)
    ownership.claim(1, [RANK, REASON])
    ownership.claim(2, [RANK])
    ownership.save()
    reread = ColumnOwnership(record)
    assert reread.forget_absent([2, 3]) == 1 and reread.forget_absent([2, 3]) == 0
    reread.save()
    assert json.loads(record.read_text())["keys"] == {RANK: [2]}
    # task 1 is gone from the record: a new task of that id would have its fields treated as the user's
    assert ColumnOwnership(record).writable(1, {RANK: "mine"}, [RANK]) == ([], [RANK])


def test_chunk_claims_are_journalled_not_rewritten(tmp_path: Path) -> None:
    """A first ranking claims columns chunk by chunk: each save appends one line, the record itself is written
    once at the start and once when compacted (a rewrite per chunk made it quadratic)."""
    record = tmp_path / "review_columns.json"
    ownership = ColumnOwnership(record)
    ownership.claim(1, [RANK])
    ownership.save()  # no record yet: written whole
    inode = record.stat().st_ino
    for task_id in range(2, 12):
        ownership.claim(task_id, [RANK, REASON])
        ownership.save()
    assert (
        record.stat().st_ino == inode
        and len([line for line in ownership.journal.read_text().splitlines() if line]) == 10
    )
    # a new job (or a crashed one's successor) sees every claim: the record plus its journal
    reread = ColumnOwnership(record)
    assert all(reread.writable(t, {RANK: 1, REASON: "x"}, [RANK, REASON])[0] == [RANK, REASON] for t in range(2, 12))
    reread.compact()
    assert not reread.journal.exists() and json.loads(record.read_text())["keys"][REASON] == list(range(2, 12))
    assert ColumnOwnership(record).writable(11, {REASON: "x"}, [REASON]) == ([REASON], [])


def test_a_torn_or_stale_journal_line_claims_nothing(tmp_path: Path) -> None:
    record = tmp_path / "review_columns.json"
    ownership = ColumnOwnership(record)
    ownership.claim(1, [RANK])
    ownership.save()
    ownership.claim(2, [RANK])
    ownership.save()
    token = json.loads(record.read_text())["journal"]
    with ownership.journal.open("a") as journal:
        # a crash mid-append (before its PATCH), and a line of a record since rewritten
        journal.write(json.dumps({"journal": "0" * 16, "claim": {RANK: [4]}}) + "\n")
        journal.write(json.dumps({"journal": token, "claim": {RANK: [3]}})[:-7])
    reread = ColumnOwnership(record)
    mine = {t for t in (1, 2, 3, 4) if reread.writable(t, {RANK: "x"}, [RANK])[0]}
    assert mine == {1, 2}  # 3 and 4 hold a field of that name MEDebiaser cannot show it wrote: the user's
    # the next save folds the journal into the record: nothing is ever appended after a torn line
    reread.claim(5, [RANK])
    reread.save()
    assert not reread.journal.exists() and json.loads(record.read_text())["keys"] == {RANK: [1, 2, 5]}
    # and a line appended after a torn one still counts (each line starts on a line of its own)
    reread.claim(6, [RANK])
    reread.save()
    token = json.loads(record.read_text())["journal"]
    with reread.journal.open("a") as journal:
        journal.write(json.dumps({"journal": token, "claim": {RANK: [7]}})[:-7])
    reread.claim(8, [RANK])
    reread.save()
    assert {t for t in (6, 7, 8) if ColumnOwnership(record).writable(t, {RANK: "x"}, [RANK])[0]} == {6, 8}


def test_an_unsaveable_record_writes_no_column_and_stops_nothing(tmp_path: Path) -> None:
    """Without a record MEDebiaser could not tell its columns from the user's later: nothing is written, the
    tasks count as failed, and no exception reaches the ranking job."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    tasks = FakeTasks({1: {"image": "a.png"}})
    ownership = ColumnOwnership(blocker / "review_columns.json")
    done = write_review_columns(SimpleNamespace(tasks=tasks), 7, {1: {RANK: 1}}, ownership)
    assert done == ColumnWrites(failed=1) and tasks.updates == [] and tasks.data[1] == {"image": "a.png"}


def test_columns_written_before_the_record_existed_are_adopted(tmp_path: Path) -> None:
    """An upgrade from a version without the record: a task holding all the queue and top columns was ranked
    by MEDebiaser, so its columns stay up to date; a lost or broken record never overwrites a partial match."""
    ranked = {"image": "a.png", RANK: 4, PRIORITY: 0.3, REASON: "old", "top_finding": "Mass", "top_probability": 0.4}
    tasks = FakeTasks({1: {**ranked, "p_Mass": 0.4}, 2: {"image": "b.png", "top_finding": "Mass (2nd reader)"}})
    client = SimpleNamespace(tasks=tasks)
    record = tmp_path / "review_columns.json"
    record.write_text("{not json")
    values = {t: {RANK: t, REASON: "new", "top_finding": "Nodule", "p_Mass": 0.2} for t in (1, 2)}
    done = write_review_columns(client, 7, values, ColumnOwnership(record))
    assert done == ColumnWrites(written=2, user_fields_kept=1)
    assert tasks.data[1] == {**ranked, RANK: 1, REASON: "new", "top_finding": "Nodule", "p_Mass": 0.2}
    assert tasks.data[2]["top_finding"] == "Mass (2nd reader)" and tasks.data[2][RANK] == 2
    assert json.loads(record.read_text())["keys"]["p_Mass"] == [1, 2]


def test_review_tab_gets_numeric_column_types_and_keeps_the_users() -> None:
    views: list[SimpleNamespace] = []

    def create(project: int, data: dict[str, Any]) -> SimpleNamespace:
        views.append(SimpleNamespace(id=len(views) + 1, data=dict(data)))
        return views[-1]

    def update(id: str, data: dict[str, Any], project: int) -> None:
        views[int(id) - 1].data = dict(data)

    client: Any = SimpleNamespace(views=SimpleNamespace(list=lambda project: views, create=create, update=update))
    types = column_types(("Effusion",))
    assert set_review_view(client, 1, column_types=types) == (1, True)
    assert views[0].data["columnsDisplayType"] == types
    assert set_review_view(client, 1, column_types=types) == (1, False)
    views[0].data["columnsDisplayType"] = {"tasks:data.site": "String", "tasks:data.review_rank": "String"}
    assert set_review_view(client, 1, column_types=types) == (1, True)
    assert views[0].data["columnsDisplayType"] == {"tasks:data.site": "String", **types}
    assert set_review_view(client, 1) == (1, False)  # no types asked: a user's types are left alone
