"""Any Label Studio label config: every region control, ignore labels by name or declaration, nothing lost (bad
items skipped with reasons), patient metadata for fairness, and no 5xx from malformed webhook bodies."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import NIH, SHARED, shared_or_skip
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from ml_backend.explain.bitmask_png import encode_heat_png
from ml_backend.feedback.annotations import (
    IGNORE,
    AnnotationRecord,
    RegionError,
    check_rle,
    parse_age,
    parse_annotation,
)
from ml_backend.feedback.store import AnnotationStore
from ml_backend.feedback.webhook import WebhookHandler, project_ignore_labels, record_project_params
from ml_backend.io.label_config import (
    describe_label_mapping,
    format_label_mapping,
    ignore_labels_from_extra_params,
    parse_label_config,
)
from ml_backend.measure.report import render_report_html
from ml_backend.serve.app import create_app
from ml_backend.train.examples import Example, holdout_split, skipped_regions_summary
from ml_backend.train.jobs import evaluate_holdout, record_to_example

HIRES = SHARED / "data" / "nih_hires"

# A config the project does not ship: findings under another name, a quality rating, comments, two brush controls,
# boxes, polygons and bitmasks, "Artifact" for markers, a label that is neither.
CONFIG = """<View>
  <Image name="xray" value="$img"/>
  <Choices name="diagnosis" toName="xray" choice="multiple">
    <Choice value="Cardiomegaly"/><Choice value="Effusion"/><Choice value="Normal"/>
  </Choices>
  <Choices name="quality" toName="xray" choice="single"><Choice value="good"/><Choice value="poor"/></Choices>
  <TextArea name="comment" toName="xray"/>
  <BrushLabels name="paint" toName="xray">
    <Label value="Cardiomegaly"/><Label value="Effusion"/><Label value="Artifact"/><Label value="Foo"/>
  </BrushLabels>
  <BrushLabels name="paint2" toName="xray"><Label value="Chest tube"/></BrushLabels>
  <RectangleLabels name="box" toName="xray"><Label value="Effusion"/><Label value="ECG lead"/></RectangleLabels>
  <PolygonLabels name="outline" toName="xray"><Label value="Cardiomegaly"/><Label value="Pacemaker"/></PolygonLabels>
  <BitmaskLabels name="heat" toName="xray"><Label value="Cardiomegaly"/><Label value="Effusion"/></BitmaskLabels>
  <Image name="prior" value="$prior"/>
</View>"""


def test_any_config_maps_every_label() -> None:
    schema = parse_label_config(CONFIG)
    assert schema.choices_name == "diagnosis" and schema.findings == ("Cardiomegaly", "Effusion")
    assert schema.brush_name == "paint" and schema.bitmask_name == "heat"
    assert schema.bitmask_labels == ("Cardiomegaly", "Effusion")
    assert set(schema.ignore_labels) == {"Artifact", "Chest tube", "ECG lead", "Pacemaker"}
    assert schema.ignore_label == "Artifact"  # the brush ignore label, as before
    roles = {(r["control"], r["label"]): r["role"] for r in describe_label_mapping(schema)}
    assert roles[("paint", "Foo")] == "not used" and roles[("box", "Effusion")] == "evidence"
    assert roles[("quality", "")] == "not used" and roles[("comment", "")] == "not used"
    assert roles[("diagnosis", "Normal")] == "no finding"
    assert "'Foo': not used" in format_label_mapping(schema)
    # declared ignore labels: Settings.ignore_labels or the project's extra params in Label Studio
    assert ignore_labels_from_extra_params({"ignore_labels": ["Foo"]}) == ("Foo",)
    assert ignore_labels_from_extra_params('{"ignore_labels": "Foo|Bar (a, b)"}') == ("Foo", "Bar (a, b)")
    assert ignore_labels_from_extra_params("not json") == () and ignore_labels_from_extra_params(None) == ()
    assert parse_label_config(CONFIG, ignore_labels=["Foo"]).region_role("Foo") == "ignore"
    # "Line" as a whole word is an ignore label; "Outline" and "Baseline" are not
    words = parse_label_config(CONFIG.replace('"Foo"', '"Line"').replace('"Chest tube"', '"Outline"'))
    assert "Line" in words.ignore_labels and "Outline" not in words.ignore_labels


def _real_image(size: int = 256) -> tuple[np.ndarray, dict]:
    manifest = json.loads((shared_or_skip(HIRES) / "manifest.json").read_text())
    entry = next(m for m in manifest if (HIRES / f"images_{size}" / m["image"]).exists())
    path = HIRES / f"images_{size}" / entry["image"]
    return np.asarray(Image.open(path).convert("L")), {**entry, "path": path}


def _region(kind: str, from_name: str, value: dict, w: int, h: int, to_name: str = "xray") -> dict:
    return {
        "id": f"r-{len(json.dumps(value)) % 997}",
        "type": kind,
        "from_name": from_name,
        "to_name": to_name,
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": value,
    }


def _rich_annotation(w: int, h: int) -> tuple[list[dict], dict]:
    """Every region kind, good and bad, on a w x h image; and the task data with patient fields."""
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    marker = np.zeros((h, w), np.uint8)
    marker[:10, :10] = 255
    rle = mask2rle(mask)
    heat = np.zeros((h, w), np.uint8)
    heat[h // 2 :, w // 2 :] = 200
    results = [
        {"type": "choices", "from_name": "diagnosis", "to_name": "xray", "value": {"choices": ["Effusion", "Bogus"]}},
        {"type": "choices", "from_name": "quality", "to_name": "xray", "value": {"choices": ["poor"]}},
        {"type": "textarea", "from_name": "comment", "to_name": "xray", "value": {"text": ["tube in place"]}},
        _region("brushlabels", "paint", {"format": "rle", "rle": rle, "brushlabels": ["Effusion"]}, w, h),  # 3
        _region("brushlabels", "paint", {"format": "rle", "rle": mask2rle(marker), "brushlabels": ["Artifact"]}, w, h),
        _region("brushlabels", "paint2", {"format": "rle", "rle": rle, "brushlabels": ["Chest tube"]}, w, h),  # 5
        _region(
            "rectanglelabels",
            "box",
            {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0, "rectanglelabels": ["Effusion"]},
            w,
            h,
        ),  # fmt: skip
        _region(
            "polygonlabels",
            "outline",
            {"points": [[50, 50], [90, 50], [70, 90]], "polygonlabels": ["Cardiomegaly"]},
            w,
            h,
        ),  # fmt: skip
        _region(
            "bitmasklabels", "heat", {"imageDataURL": encode_heat_png(heat), "bitmasklabels": ["Cardiomegaly"]}, w, h
        ),  # fmt: skip
        # bad items from here (index 9 on): each skipped with a reason, the rest kept
        _region("brushlabels", "paint", {"format": "rle", "rle": rle, "brushlabels": ["Foo"]}, w, h),
        _region("brushlabels", "paint", {"format": "rle", "rle": rle, "brushlabels": ["Effusion"]}, w * 2, h),
        _region("brushlabels", "paint", {"format": "rle", "rle": rle, "brushlabels": ["Effusion"]}, w, h, "prior"),
        _region(
            "polygonlabels",
            "outline",
            {"points": [[120, 120], [150, 120], [130, 160]], "polygonlabels": ["Cardiomegaly"]},
            w,
            h,
        ),  # fmt: skip
        _region("polygonlabels", "outline", {"points": [[10, 10], [20, 20]], "polygonlabels": ["Cardiomegaly"]}, w, h),
        _region(
            "polygonlabels",
            "outline",
            {"points": [[10, 10], [40, 40], [40, 10], [10, 40]], "polygonlabels": ["Cardiomegaly"]},
            w,
            h,
        ),  # fmt: skip
        _region("brushlabels", "paint", {"format": "rle", "rle": rle + [999, "x"], "brushlabels": ["Effusion"]}, w, h),
        _region(
            "brushlabels", "paint", {"format": "rle", "rle": rle[: len(rle) // 2], "brushlabels": ["Effusion"]}, w, h
        ),  # fmt: skip
        _region(
            "bitmasklabels",
            "heat",
            {"imageDataURL": encode_heat_png(heat[:, :-1]), "bitmasklabels": ["Effusion"]},
            w,
            h,
        ),  # fmt: skip
        _region(
            "rectanglelabels",
            "box",
            {"x": 10, "y": 20, "width": 0, "height": 40, "rectanglelabels": ["Effusion"]},
            w,
            h,
        ),  # fmt: skip
        "not a region",
    ]
    data = {"PatientID": "p-17", "PatientSex": "female", "PatientAge": "058Y", "hospital": "site-A"}
    return results, data


def test_every_region_kind_recorded_and_bad_items_skipped_with_reasons(tmp_path, file_root, file_server, settings):
    pixels, entry = _real_image(256)
    h, w = pixels.shape
    shutil.copy(entry["path"], file_root / "any-config.png")
    results, data = _rich_annotation(w, h)
    schema = parse_label_config(CONFIG)
    annotation = {"id": 41, "result": results, "was_cancelled": False, "updated_at": "2026-12-01T00:00:00Z"}
    task = {"id": 7, "data": {"img": f"{file_server}/public/any-config.png", **data}}
    record = parse_annotation("9", annotation, task, schema, settings=settings)
    assert record.positives == ["Effusion"]
    assert record.attributes == {"patient_id": "p-17", "sex": "F", "age": 58.0, "site": "site-A"}
    kinds = {k: m.kind for k, m in record.masks.items()}
    assert kinds == {
        "Effusion": "rle",
        IGNORE: "rle",
        f"{IGNORE}#5": "rle",
        "Effusion#6": "rectangle",
        "Cardiomegaly": "polygon",
        "Cardiomegaly#8": "bitmask",
        "Cardiomegaly#14": "polygon",  # crosses itself: kept, the rasteriser fills what was drawn
    }
    codes = {s["where"]: s["code"] for s in record.skipped}
    assert codes == {
        "result[0]": "unknown_label",
        "result[9]": "unknown_label",
        "result[10]": "wrong_size",
        "result[11]": "other_object",
        "result[12]": "outside_image",
        "result[13]": "empty_region",
        "result[15]": "bad_rle",
        "result[16]": "bad_rle",
        "result[17]": "wrong_size",
        "result[18]": "empty_region",
        "result[19]": "malformed",
    }
    assert "label 'Foo' is neither a finding nor an ignore label" in {s["reason"] for s in record.skipped}

    # stored and read back (compact JSON), then decoded at the natural size in training
    stored = AnnotationRecord.from_json(json.loads(json.dumps(record.to_json())))
    example = record_to_example(stored, schema.findings, settings)
    assert example.image.shape == (h, w) and example.group == "patient:p-17"
    assert example.attributes["sex"] == "F"
    assert example.ignore is not None and example.ignore[:10, :10].all() and example.ignore[h // 4, w // 4]
    effusion, cardio = example.evidence[1], example.evidence[0]
    box = np.zeros((h, w), bool)
    box[int(0.2 * h) : int(0.6 * h), int(0.1 * w) : int(0.4 * w)] = True
    assert effusion[box].mean() > 0.95  # the rectangle, rasterised from percent at 256x256
    assert effusion[h // 4 : h // 2, w // 4 : w // 2].all()  # merged with the brush stroke
    assert cardio[int(0.55 * h), int(0.7 * w)] and cardio[-1, -1]  # polygon and bitmask
    assert len(example.skipped) == 11
    summary = skipped_regions_summary([example])
    assert summary["count"] == 11 and summary["reasons"]["label 'Foo' is neither a finding nor an ignore label"] == 1

    # a mask that does not fit the image found at training time skips that region only
    wrong = replace(stored, masks={**stored.masks, "Effusion": replace(stored.masks["Effusion"], width=w + 1)})
    example = record_to_example(wrong, schema.findings, settings)
    assert example.skipped[-1]["code"] == "wrong_size" and 1 in example.evidence  # the box still counts


def test_old_records_and_patient_fields() -> None:
    old = {
        "project": "5",
        "task_id": 1,
        "annotation_id": 2,
        "image_ref": "/x.png",
        "positives": ["Effusion"],
        "masks": {"Effusion": {"rle": [0, 0, 64, 0, 2, 0, 0], "width": 4, "height": 4}},
        "updated_at": None,
        "attributes": {},
        "seq": 3,
    }
    record = AnnotationRecord.from_json(old)
    assert record.masks["Effusion"].kind == "rle" and record.skipped == []
    assert record.to_json()["masks"]["Effusion"] == old["masks"]["Effusion"]  # brush stays as compact as before
    assert parse_age("058Y") == 58 and parse_age("6 months") == 0.5 and parse_age(71) == 71
    for bad in ("unknown", "", "-3", "200", None, [58]):
        with pytest.raises(RegionError):
            parse_age(bad)
    schema = parse_label_config(CONFIG)
    base = {"id": 1, "result": []}
    record = parse_annotation("5", base, {"id": 1, "data": {"img": "/a.png"}}, schema)
    assert record.attributes == {} and record.skipped == []  # no patient fields: recorded, nothing to report
    record = parse_annotation("5", base, {"id": 1, "data": {"img": "/a.png", "age": "unknown", "sex": "?"}}, schema)
    assert record.attributes == {} and {s["code"] for s in record.skipped} == {"bad_attribute"}
    custom = replace(settings_default(), patient_fields={"sex": "Geschlecht"})
    record = parse_annotation(
        "5", base, {"id": 1, "data": {"img": "/a.png", "Geschlecht": "M"}}, schema, settings=custom
    )
    assert record.attributes == {"sex": "M"}


def settings_default():
    from ml_backend.config import Settings

    return Settings()


def test_rle_validation_catches_tails_truncation_and_size() -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[5:30, 7:40] = 255
    rle = mask2rle(mask)
    check_rle(rle, 64, 64)
    cases = {
        "garbage tail": (rle + [300], "bad_rle"),
        "truncated": (rle[:-3], "bad_rle"),
        "header only": (rle[:7], "bad_rle"),
        "strings": (["a"] * 20, "bad_rle"),
        "wrong size": (mask2rle(np.zeros((32, 64), np.uint8)), "wrong_size"),
    }
    for name, (stream, code) in cases.items():
        with pytest.raises(RegionError) as info:
            check_rle(stream, 64, 64)
        assert info.value.code == code, name
    with pytest.raises(RegionError, match="truncated"):  # above the walk limit the length bound still catches it
        check_rle(rle[:8], 64, 64, walk_max_bytes=0)


@pytest.fixture()
def client(settings, redis_url, redis_conn):
    with TestClient(create_app(replace(settings, redis_url=redis_url))) as c:
        yield c


def test_webhook_shapes_never_5xx_and_skips_are_counted(client, redis_conn, ls_request) -> None:
    project = {"id": 9, "label_config": CONFIG}
    results, data = _rich_annotation(64, 64)
    event = {
        "action": "ANNOTATION_CREATED",
        "project": project,
        "annotation": {"id": 1, "result": results, "was_cancelled": False},
        "task": {"id": 1, "data": {"img": "/data/upload/1.png", **data}},
    }
    answer = client.post("/webhook", json=event)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["recorded"] == 1 and body["skipped_count"] == 11
    assert {s["code"] for s in body["skipped"]} >= {"unknown_label", "empty_region", "bad_rle", "other_object"}
    stats = client.app.state.webhook.stats()
    assert stats["regions_skipped"] == 11 and stats["skip_reasons"]["bad_rle"] == 2
    (record,) = AnnotationStore(redis_conn, "9").snapshot()[1]
    assert len(record.masks) == 7 and len(record.skipped) == 11  # the rest of the annotation is kept

    bad_bodies = [
        {"action": "ANNOTATION_CREATED", "project": project, "annotation": {"was_cancelled": True}, "task": {}},
        {"action": "ANNOTATION_UPDATED", "project": project, "annotation": {"was_cancelled": True, "id": "x"}},
        {"action": "ANNOTATIONS_CREATED", "project": project, "tasks": 5, "annotation": [{"id": 2, "task": 1}]},
        {"action": "ANNOTATIONS_CREATED", "project": project, "task": [1], "annotation": [{"id": 2, "task": [1]}]},
        {"action": "ANNOTATIONS_CREATED", "project": project, "tasks": [{"id": {}}], "annotation": [{"id": 2}]},
        {"action": "ANNOTATIONS_DELETED", "project": project, "annotations": 5},
        {"action": "START_TRAINING", "project": {"id": 9, "label_config": "not <xml"}},
        {"action": "START_TRAINING", "project": {"id": 9, "label_config": 5}},
        {"action": "ANNOTATION_CREATED", "project": project, "annotation": {"id": 3, "result": []}, "task": {"id": {}}},
    ]
    for body in bad_bodies:
        answer = client.post("/webhook", json=body)
        assert 400 <= answer.status_code < 500, (body, answer.status_code, answer.text)
        assert answer.json()["error"]
    assert client.post("/webhook", content=b"[1, 2]", headers={"Content-Type": "application/json"}).status_code < 500
    assert AnnotationStore(redis_conn, "9").label_config() == CONFIG  # the non-XML config was not stored

    # a cancelled annotation with an id removes it; the bulk shape with a real task records it
    cancel = {**event, "action": "ANNOTATION_UPDATED", "annotation": {"id": 1, "was_cancelled": True}}
    assert client.post("/webhook", json=cancel).json()["cancelled"] == 1
    bulk = {
        "action": "ANNOTATIONS_CREATED",
        "project": project,
        "tasks": [{"id": 4, "data": {"img": "/data/upload/4.png"}}, {"id": {}}],
        "annotation": [{"id": 5, "task": 4, "result": results[:3]}, {"id": 6, "task": [4], "result": []}],
    }
    answer = client.post("/webhook", json=bulk).json()
    assert answer["recorded"] == 1 and len(answer["errors"]) == 1

    # ignore labels declared in the project's extra params reach the webhook's parsing
    assert record_project_params(redis_conn, "9", {"ignore_labels": ["Foo"]}) == ("Foo",)
    assert "Foo" in project_ignore_labels(redis_conn, "9", client.app.state.settings)
    event["annotation"]["id"] = 7
    body = client.post("/webhook", json=event).json()
    assert body["skipped_count"] == 10  # 'Foo' is now an ignore label


def test_patient_split_and_fairness_by_sex_age_site(nih_manifest) -> None:
    rng = np.random.default_rng(0)
    entries = nih_manifest[:400]
    labels = ("Effusion", "Infiltration")
    examples = [
        Example(
            image=np.zeros((2, 2), np.float32),
            targets=np.array([lbl in e["labels"] for lbl in labels], np.float32),
            key=str(i),
            group=f"patient:{e['patient_id']}",
            attributes={"patient_id": e["patient_id"], "sex": e["sex"], "age": e["age"]},
        )
        for i, e in enumerate(entries)
    ]
    train, held = holdout_split(examples, fraction=0.3)
    train_patients = {examples[i].group for i in train}
    assert held and not train_patients & {examples[i].group for i in held}  # no patient on both sides
    assert holdout_split(examples, fraction=0.3) == (train, held)
    heldout = [examples[i] for i in held]
    y_true = np.stack([e.targets for e in heldout])
    y_prob = np.clip(y_true * 0.6 + rng.uniform(0, 0.5, y_true.shape), 0, 1)
    metrics = evaluate_holdout(y_true, y_prob, labels, heldout, [0.5, 0.5])
    coverage = metrics["fairness_coverage"]
    assert coverage["sex"]["measured"] and metrics["fairness"]["sex"]["worst_ci"] is not None
    assert set(coverage["sex"]["group_sizes"]) == {"F", "M"}
    assert not coverage["site"]["measured"] and "no such field" in coverage["site"]["reason"]
    assert "age" in metrics["fairness"]
    few = evaluate_holdout(y_true[:6], y_prob[:6], labels, heldout[:6], [0.5, 0.5])
    assert not few["fairness_coverage"]["sex"]["measured"]
    assert few["fairness_coverage"]["sex"]["reason"].startswith(("too few images per group", "only one sex"))
    metrics["regions_skipped"] = {"count": 2, "reasons": {"label 'Foo' is neither a finding nor an ignore label": 2}}
    html = render_report_html([{"version": "v1", "metrics": metrics}])
    assert "2 region(s) or field(s) skipped: label &#x27;Foo&#x27; is neither" in html
    assert "Equalized Odds by site not measured: no held-out image has a site" in html


def test_rotated_rectangle_and_setup_of_a_project(settings, redis_url, redis_conn, caplog) -> None:
    from ml_backend.feedback.annotations import MaskRef, decode_region
    from ml_backend.feedback.webhook import WebhookHandler

    # LS rotates a rectangle clockwise about its top-left corner: 90 degrees turns +x into +y
    box = MaskRef(None, 0, 0, kind="rectangle", geometry={"x": 50, "y": 10, "width": 20, "height": 10, "rotation": 90})
    mask = decode_region(box, 100, 100, settings)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (40, 50, 10, 30)
    handler = WebhookHandler(replace(settings, redis_url=redis_url, ignore_labels=("Bar",)))
    with caplog.at_level("INFO", logger="ml_backend.feedback.webhook"):
        schema = handler.setup_project("9", CONFIG, {"ignore_labels": ["Foo"]})
    assert schema.region_role("Foo") == "ignore" and "'Foo': ignore" in caplog.text
    assert project_ignore_labels(redis_conn, "9", handler.settings) == ("Bar", "Foo")
    offline = WebhookHandler(replace(settings, redis_url="redis://127.0.0.1:1/0"))
    assert offline.setup_project("9", CONFIG, '{"ignore_labels": ["Foo"]}').region_role("Foo") == "ignore"


def test_real_radiologist_polygons_are_recorded(nih_manifest) -> None:
    from ml_backend.feedback.annotations import check_geometry

    polygons = [r["polygon"] for e in nih_manifest for r in e.get("chestxdet") or [] if r.get("polygon")]
    assert len(polygons) > 200
    for polygon in polygons:  # ChestX-Det outlines (1024 px space) as LS percent points; some cross themselves
        check_geometry("polygon", {"points": [[x / 10.24, y / 10.24] for x, y in polygon]})


def test_real_label_studio_request_still_parses(ls_request) -> None:
    body = ls_request("webhook_ANNOTATION_CREATED")
    schema = parse_label_config(body["project"]["label_config"])
    record = parse_annotation("2", body["annotation"], body["task"], schema)
    assert set(record.masks) == {"Cardiomegaly"} and record.skipped == []
    assert NIH.exists()


def test_bulk_annotations_without_their_tasks_are_reconciled_not_lost(settings, redis_url, redis_conn) -> None:
    """Label Studio's ANNOTATIONS_CREATED may name each annotation's task without sending it: the webhook cannot
    record those, so it flags the project for reconcile (the next job re-reads them from Label Studio)."""
    handler = WebhookHandler(replace(settings, redis_url=redis_url), redis_conn)
    body = {
        "action": "ANNOTATIONS_CREATED",
        "project": {"id": 12, "label_config": CONFIG},
        "annotation": [{"id": 21, "task": 7, "result": []}, {"id": 22, "task": 8, "result": []}],
    }
    status, answer = handler.handle(body)
    assert status == 202 and answer["from_label_studio"] == 2 and answer["job_id"], answer
    assert redis_conn.get("mdb:12:reconcile") == b"1"
    # without a Label Studio to re-read from, the same event is unusable as a whole: a 4xx with the reason
    offline = WebhookHandler(replace(settings, redis_url=redis_url, label_studio_url=None), redis_conn)
    status, answer = offline.handle({**body, "project": {"id": 13, "label_config": CONFIG}})
    assert status == 422 and "no annotation" in answer["error"]
