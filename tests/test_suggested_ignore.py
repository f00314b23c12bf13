"""Suggested ignore regions: the propagation detector, saved with a version, finds the physician-marked artefact on
unlabelled images; the regions are offered as marked suggestions; kept ones come back as ignore masks, deleted
ones become negatives for the detector.

Real NIH chest X-rays with a text tag stamped on most Cardiomegaly images (as in test_mask_propagation.py), a
model briefly trained on them, physicians' masks on 8 of the tags.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from label_studio_sdk.label_interface import LabelInterface
from scipy import ndimage
from test_mask_propagation import tagged  # noqa: F401  (the module fixture, reused)

from ml_backend.config import Settings
from ml_backend.feedback.annotations import IGNORE, decode_region, parse_annotation
from ml_backend.io.label_config import parse_label_config
from ml_backend.train.mask_propagation import ArtefactDetector, propagate_ignore_masks
from ml_backend.train.suggestions import (
    PREFIX,
    Suggestion,
    SuggestionStore,
    find_suggestions,
    rejected_tensors,
    suggestion_outcomes,
    suggestion_regions,
)

ROOT = Path(__file__).resolve().parents[1]
BRUSH = (ROOT / "label_config/chest_xray.xml").read_text()
BITMASK = (ROOT / "label_config/chest_xray_bitmask.xml").read_text()
RECTANGLE = """<View><Image name="image" value="$image"/>
<Choices name="findings" toName="image" choice="multiple"><Choice value="Cardiomegaly"/><Choice value="Mass"/></Choices>
<RectangleLabels name="boxes" toName="image"><Label value="Mass"/><Label value="Ignore (marker)"/></RectangleLabels>
</View>"""


@pytest.fixture(scope="module")
def suggesting(tagged: dict) -> dict:  # noqa: F811  (the imported fixture)
    """test_mask_propagation's tagged films and model, with the detector propagation fitted on them."""
    _, report = propagate_ignore_masks(tagged["model"], tagged["tensors"])
    assert report.detector is not None, report.skipped
    return {**tagged, "report": report}


@pytest.mark.shared_data
def test_the_saved_detector_suggests_the_tag_on_unlabelled_images(suggesting: dict) -> None:
    detector = ArtefactDetector.from_bytes(suggesting["report"].detector.to_bytes())  # as the ranking job loads it
    markers, tensors = suggesting["markers"], suggesting["tensors"]
    unmasked_tags = [i for i, m in enumerate(markers) if m is not None and i not in suggesting["chosen"]][:40]
    clean = [i for i, m in enumerate(markers) if m is None][:200]
    found = find_suggestions(suggesting["model"], tensors.images[unmasked_tags], detector)
    hits = 0
    for i, suggestions in zip(unmasked_tags, found, strict=True):
        assert len(suggestions) <= 3 and all(s.region_id.startswith(PREFIX) for s in suggestions)
        if suggestions:
            size = markers[i].shape
            union = np.logical_or.reduce([s.mask(size[1], size[0]) for s in suggestions])
            hits += float(union[markers[i]].mean()) >= 0.5
    on_clean = find_suggestions(suggesting["model"], tensors.images[clean], detector)
    false = np.mean([bool(s) for s in on_clean])
    print(f"tags suggested {hits}/{len(unmasked_tags)}, clean images with a suggestion {false:.3f}")
    assert hits >= 0.8 * len(unmasked_tags)
    assert false <= 0.12


@pytest.mark.shared_data
def test_a_detector_fitted_on_other_features_suggests_nothing(suggesting: dict) -> None:
    """A version saved before the hypercolumns gained the stride-2 stem (or another backbone's detector): its
    coefficients do not match the features, so it suggests nothing instead of crashing or guessing."""
    detector = suggesting["report"].detector
    shorter = ArtefactDetector(
        detector.mean[:-8], detector.scale[:-8], detector.coef[:, :-8], detector.intercept, detector.threshold
    )
    images = suggesting["tensors"].images[:5]
    assert find_suggestions(suggesting["model"], images, shorter) == [[] for _ in range(5)]


@pytest.mark.parametrize("config", [BRUSH, BITMASK, RECTANGLE], ids=["brush", "bitmask", "rectangle"])
def test_a_suggestion_is_a_marked_ignore_region_that_comes_back_as_an_ignore_mask(config: str) -> None:
    cells = np.zeros((16, 16), dtype=bool)
    cells[1:3, 12:15] = True
    suggestion = Suggestion(f"{PREFIX}0", 0.83, cells)
    schema = parse_label_config(config)
    [region] = suggestion_regions(schema, [suggestion], 96, 80)
    assert (
        region["id"] == f"{PREFIX}0"
        and "suggested" in region["meta"]["text"][0]
        and "0.83" in region["meta"]["text"][0]
    )
    assert region["value"][region["type"]][0] in schema.ignore_labels
    assert LabelInterface(config).validate_prediction({"result": [region], "score": 0.5}, return_errors=True) in (
        True,
        [],
    )

    # The physician submits with the region kept: Label Studio keeps the prediction region's id.
    annotation = {"id": 5, "result": [region]}
    record = parse_annotation("1", annotation, {"id": 9, "data": {"image": "x.png"}}, schema)
    assert record is not None and not record.skipped
    [ref] = record.masks.values()
    assert list(record.masks) == [IGNORE] and ref.suggested == f"{PREFIX}0"
    mask = decode_region(ref, 96, 80, Settings())
    expected = suggestion.mask(96, 80)
    assert (mask & expected).sum() / expected.sum() >= 0.9
    assert not (mask & ~ndimage.binary_dilation(expected, np.ones((3, 3)))).any()  # a rectangle's edge pixels at most


def test_kept_and_deleted_suggestions_are_told_apart(redis_conn) -> None:
    schema = parse_label_config(BRUSH)
    cells = np.zeros((16, 16), dtype=bool)
    cells[2:4, 2:4] = True
    store = SuggestionStore(redis_conn, "1")
    one, two = Suggestion(f"{PREFIX}0", 0.9, cells), Suggestion(f"{PREFIX}1", 0.7, np.roll(cells, 8, axis=1))
    store.put(9, "v0002", [one, two])
    store.put(10, "v0002", [one])
    redis_conn.hset(store.key, "11", b"{not json")  # a damaged entry reads as no suggestion
    assert [s.region_id for s in store.get(9)] == [one.region_id, two.region_id]
    assert store.get(11) == [] and store.get(12) == []
    assert np.array_equal(store.get(9)[1].cells, two.cells)

    kept = suggestion_regions(schema, [one], 64, 64)
    task = {"data": {"image": "x.png"}}
    on_9 = parse_annotation("1", {"id": 1, "result": kept}, {**task, "id": 9}, schema)  # kept one, deleted two
    on_10 = parse_annotation("1", {"id": 2, "result": []}, {**task, "id": 10}, schema)  # deleted its only one
    assert on_9 is not None and on_10 is not None
    outcomes = suggestion_outcomes([on_9, on_10], store)
    assert outcomes.kept == {9: [one.region_id]}
    assert {t: [s.region_id for s in v] for t, v in outcomes.deleted.items()} == {
        9: [two.region_id],
        10: [one.region_id],
    }
    assert outcomes.summary({9}) == {"confirmed": 1, "confirmed_trained": 1, "deleted": 2, "deleted_tasks": 2}

    images = torch.zeros(3, 3, 32, 32)
    rejected = rejected_tensors(outcomes.deleted, ["10", "8", "9"], images)
    assert rejected is not None and rejected[0].shape == (2, 3, 32, 32) and rejected[1].shape == (2, 1, 32, 32)
    assert rejected_tensors({}, ["1"], images) is None


def test_a_bad_suggested_region_is_skipped_and_counted_and_odd_ids_are_not_suggestions() -> None:
    schema = parse_label_config(BRUSH)
    cells = np.zeros((16, 16), dtype=bool)
    cells[0:2, 0:2] = True
    [region] = suggestion_regions(schema, [Suggestion(f"{PREFIX}0", 0.9, cells)], 64, 64)
    broken = {**region, "value": {**region["value"], "rle": [1, 2, 3]}}
    long_id = {**region, "id": PREFIX + "x" * 200}
    record = parse_annotation("1", {"id": 1, "result": [broken, long_id]}, {"id": 3, "data": {"image": "x"}}, schema)
    assert record is not None
    assert [s["code"] for s in record.skipped] == ["bad_rle"]
    assert [m.suggested for m in record.masks.values()] == [""]  # drawn-like, but not counted as a suggestion


@pytest.mark.shared_data
def test_deleted_suggestions_teach_the_detector_it_was_wrong_there(suggesting: dict) -> None:
    """Suggestions on tag-free images (NIH films carry real text of their own) deleted by physicians: cells under
    them are negatives for the next fit, and the detector scores them lower."""
    tensors, markers, model = suggesting["tensors"], suggesting["markers"], suggesting["model"]
    detector = suggesting["report"].detector
    clean = [i for i, m in enumerate(markers) if m is None]
    found = find_suggestions(model, tensors.images[clean], detector)
    wrong = [(i, s) for i, s in zip(clean, found, strict=True) if s][:12]
    assert wrong, "the detector made no false suggestion to reject"
    deleted = {i: s for i, s in wrong}
    keys = [str(i) for i in range(len(tensors))]
    rejected = rejected_tensors(deleted, keys, tensors.images)
    assert rejected is not None
    _, report = propagate_ignore_masks(model, tensors, rejected=rejected)
    assert report.rejected_images == len(wrong) and report.rejected_cells > 0 and report.detector is not None
    again = find_suggestions(model, rejected[0], report.detector)
    before = sum(len(s) for _, s in wrong)
    after = sum(len(s) for s in again)
    print(f"suggestions on the rejected images: {before} before, {after} after")
    assert after < before
