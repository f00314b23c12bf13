"""BitmaskLabels heatmaps: graded-alpha PNG data URLs on real chest X-rays, the way back to a mask, bad input."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import CHEST_CONFIG, NIH, ROOT, SHARED, shared_or_skip
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from ml_backend.explain.bitmask_png import (
    BitmaskError,
    decode_mask_data_url,
    encode_heat_png,
    png_data_url_size,
)
from ml_backend.explain.brush_rle import decode_alpha, heatmap_to_alpha
from ml_backend.explain.cam import upsample_maps
from ml_backend.inference.model_outputs import run_model
from ml_backend.inference.results import build_prediction, heatmap_control
from ml_backend.io.images import LoadedImage
from ml_backend.io.label_config import parse_label_config
from ml_backend.models.registry import ModelRegistry
from ml_backend.serve.predictor import Predictor

BITMASK_CONFIG = (ROOT / "label_config" / "chest_xray_bitmask.xml").read_text()
HIRES = SHARED / "data" / "nih_hires" / "images_1024"
LIMITS = {"max_bytes": 16 * 1024 * 1024, "max_pixels": 64_000_000}
W, H = 2048, 2500  # a clinical-size film (width x height)


def _url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _png(image: Image.Image, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **params)
    return out.getvalue()


def _xray(width: int, height: int) -> np.ndarray:
    """A real NIH X-ray (1024 px) upsampled in memory to a clinical size, float32 in [0, 1]."""
    path = sorted(shared_or_skip(HIRES).glob("*.png"))[0]
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def model_and_settings(tmp_path_factory):
    from ml_backend.config import Settings

    settings = replace(Settings(), model_dir=tmp_path_factory.mktemp("models"), backbone="resnet18", input_size=224)
    schema = parse_label_config(BITMASK_CONFIG)
    loaded = ModelRegistry(settings).get("1", schema.findings)
    return settings, loaded


def _prediction(settings, schema, loaded, probabilities, cams, image: LoadedImage) -> dict:
    return build_prediction(settings.heatmap, schema, loaded, probabilities, cams, image.width, image.height)


@pytest.fixture(scope="module")
def clinical(model_and_settings):
    """CAMs of the real model on a real X-ray at 2048x2500, with every finding forced above threshold."""
    settings, loaded = model_and_settings
    pixels = _xray(W, H)
    output = run_model(loaded, [pixels], 1)
    probabilities = np.linspace(0.95, 0.6, len(loaded.labels)).astype(np.float32)
    return LoadedImage(pixels, W, H), probabilities, output.cams[0]


def _real_alpha(clinical) -> np.ndarray:
    image, _, cams = clinical
    heat = upsample_maps(cams[:1], image.height, image.width).clamp_(0, 1).numpy()[0]
    return heatmap_to_alpha(heat, levels=64, floor=0.2)


# --------------------------------------------------------------------------------------------- round trip


def test_round_trip_on_a_real_xray_and_other_decoders_agree(clinical) -> None:
    alpha = _real_alpha(clinical)
    assert alpha.shape == (H, W) and (alpha == 0).any() and alpha.max() >= 200 and len(np.unique(alpha)) > 8
    url = encode_heat_png(alpha)
    assert url.startswith("data:image/png;base64,")
    assert png_data_url_size(url, LIMITS["max_bytes"]) == (W, H)
    assert np.array_equal(decode_mask_data_url(url, W, H, **LIMITS), alpha)
    png = base64.b64decode(url.split(",", 1)[1])
    # libpng (OpenCV) and Pillow read the same alpha: the hand-written PNG is standard
    via_libpng = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(via_libpng[:, :, 3], alpha)
    with Image.open(io.BytesIO(png)) as im:
        assert np.array_equal(np.asarray(im.convert("RGBA"))[:, :, 3], alpha)
    # far lighter than brush RLE: <= 150 KB of base64 per 5 MP heatmap
    assert len(url) <= 150_000


def test_editor_edits_keep_the_rle_semantics(clinical) -> None:
    """The editor saves an RGBA PNG of the region: kept heat stays graded, erased is 0, painted is 255."""
    alpha = _real_alpha(clinical)
    edited = alpha.copy()
    edited[:400, :400] = 0  # erased
    edited[2000:2100, 1000:1400] = 255  # painted
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[:, :, 0], rgba[:, :, 3] = 230, edited  # the editor's colour does not matter, only the alpha
    back = decode_mask_data_url(_url(_png(Image.fromarray(rgba, "RGBA"))), W, H, **LIMITS)
    assert np.array_equal(back, edited)
    assert (back[:400, :400] == 0).all() and (back[2000:2100, 1000:1400] == 255).all()
    # luminance-alpha works too
    la = np.stack([np.zeros_like(edited), edited], axis=-1)
    assert np.array_equal(decode_mask_data_url(_url(_png(Image.fromarray(la, "LA"))), W, H, **LIMITS), edited)


def test_real_nih_images_round_trip_at_their_own_size(nih_manifest) -> None:
    for entry in nih_manifest[:5]:
        with Image.open(shared_or_skip(NIH) / entry["image"]) as im:
            gray = np.asarray(im.convert("L"))
        alpha = np.where(gray > 100, gray, 0).astype(np.uint8)  # any graded mask of the image's size
        height, width = alpha.shape
        url = encode_heat_png(alpha)
        assert png_data_url_size(url, 10**6) == (width, height)
        assert np.array_equal(decode_mask_data_url(url, width, height, **LIMITS), alpha)


# --------------------------------------------------------------------------------------------- bad input


def _raw_png(width: int, height: int, depth: int, colour: int, idat: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


SMALL = np.zeros((6, 8), np.uint8)


@pytest.mark.parametrize(
    ("data_url", "reason"),
    [
        (None, "must be a string"),
        ("https://example.com/mask.png", "not a data URL"),
        ("data:image/jpeg;base64,/9j/4AAQ", "data:image/jpeg;base64"),
        ("data:image/png;base64,@@@@not-base64@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@", "not valid base64"),
        (_url(b"GIF89a" + b"\x00" * 40), "does not hold a PNG"),
        (_url(_png(Image.fromarray(np.zeros((6, 9, 4), np.uint8), "RGBA"))), "PNG is 9x6 but the image is 8x6"),
        (_url(_png(Image.fromarray(np.zeros((6, 8), np.uint8), "L"))), "grayscale without an alpha channel"),
        (_url(_png(Image.fromarray(np.zeros((6, 8, 3), np.uint8), "RGB"))), "RGB without an alpha channel"),
        (_url(_png(Image.fromarray(np.zeros((6, 8), np.uint8), "L").convert("P"))), "no transparency"),
        (_url(cv2.imencode(".png", np.zeros((6, 8, 4), np.uint16))[1].tobytes()), "16-bit"),
        (_url(_raw_png(8, 6, 8, 6, zlib.compress(b"\x00" * 5))), "corrupt PNG"),
        (_url(_raw_png(8, 6, 8, 6, b"not zlib")), "corrupt PNG"),
    ],
)
def test_bad_data_urls_get_a_clear_reason(data_url: object, reason: str) -> None:
    with pytest.raises(BitmaskError, match=reason):
        decode_mask_data_url(data_url, 8, 6, **LIMITS)  # type: ignore[arg-type]


def test_palette_png_with_transparency_is_converted() -> None:
    """Palette PNGs are accepted when they carry tRNS (our encoder writes one); the alpha is the tRNS value."""
    alpha = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    indices = Image.fromarray(alpha, "P")
    indices.putpalette([0, 0, 0] * 256)
    url = _url(_png(indices, transparency=bytes(range(256))))
    assert np.array_equal(decode_mask_data_url(url, 8, 6, **LIMITS), alpha)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    # 100k x 100k RGBA declared in the IHDR, a few bytes of data: refused before any decompression
    bomb = _url(_raw_png(100_000, 100_000, 8, 6, zlib.compress(b"\x00" * 1000)))
    with pytest.raises(BitmaskError, match="decompression bomb"):
        decode_mask_data_url(bomb, 100_000, 100_000, **LIMITS)
    assert png_data_url_size(bomb, LIMITS["max_bytes"]) == (100_000, 100_000)  # the cheap check still reads it
    # a real zlib bomb: 40 MP of zeros in ~40 KB, declared with the image's true size but above max_pixels
    zeros = _raw_png(8000, 5000, 8, 6, zlib.compress(b"\x00" * (8000 * 4 + 1) * 5000, 9))
    assert len(zeros) < 200_000
    with pytest.raises(BitmaskError, match="above the limit"):
        decode_mask_data_url(_url(zeros), 8000, 5000, max_bytes=LIMITS["max_bytes"], max_pixels=10_000_000)


def test_a_100_mb_data_url_is_refused_without_decoding() -> None:
    url = encode_heat_png(SMALL) + "A" * (100 * 1024 * 1024)
    with pytest.raises(BitmaskError, match="more than"):
        decode_mask_data_url(url, 8, 6, **LIMITS)
    with pytest.raises(BitmaskError, match="more than"):
        png_data_url_size(url, LIMITS["max_bytes"])


def test_header_check_is_cheap() -> None:
    import time

    url = encode_heat_png(np.full((H, W), 128, np.uint8))
    started = time.perf_counter()
    for _ in range(1000):
        png_data_url_size(url, LIMITS["max_bytes"])
    assert (time.perf_counter() - started) / 1000 < 1e-3  # microseconds each (a full decode takes ~40 ms)


def test_encoder_rejects_what_is_not_an_alpha_mask() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_heat_png(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_heat_png(np.full((4, 4), 300))
    with pytest.raises(ValueError, match="uint8"):
        encode_heat_png(np.zeros((4, 4), np.float32))


# --------------------------------------------------------------------------------------------- the result builder


def _with_control(tag: str) -> str:
    return BITMASK_CONFIG.replace("BitmaskLabels", tag)


def test_the_config_chooses_the_heatmap_control() -> None:
    bitmask = heatmap_control(parse_label_config(BITMASK_CONFIG))
    brush = heatmap_control(parse_label_config(CHEST_CONFIG))
    assert bitmask is not None and (bitmask.name, bitmask.kind) == ("evidence", "bitmasklabels")
    assert brush is not None and (brush.name, brush.kind) == ("evidence", "brushlabels")
    both = CHEST_CONFIG.replace(
        "</View>",
        '<BitmaskLabels name="png" toName="image"><Label value="Mass"/></BitmaskLabels></View>',
    )
    chosen = heatmap_control(parse_label_config(both))
    assert chosen is not None and (chosen.name, chosen.kind, chosen.labels) == ("png", "bitmasklabels", ("Mass",))
    assert heatmap_control(parse_label_config(_with_control("RectangleLabels"))) is None


@pytest.mark.parametrize(("config", "kind"), [(BITMASK_CONFIG, "bitmasklabels"), (CHEST_CONFIG, "brushlabels")])
def test_predictions_at_clinical_size_validate_with_the_sdk(model_and_settings, clinical, config, kind) -> None:
    settings, loaded = model_and_settings
    image, probabilities, cams = clinical
    schema = parse_label_config(config)
    prediction = _prediction(settings, schema, loaded, probabilities, cams, image)
    assert LabelInterface(config).validate_prediction(prediction, return_errors=True) in (True, [])
    regions = [r for r in prediction["result"] if r["type"] not in ("choices", "textarea")]
    assert len(regions) == settings.heatmap.max_findings
    assert {r["type"] for r in regions} == {kind}
    top = [loaded.labels[k] for k in np.argsort(-probabilities)[: settings.heatmap.max_findings]]
    assert [r["value"][kind][0] for r in regions] == top
    for region, k in zip(regions, np.argsort(-probabilities), strict=False):
        assert (region["original_width"], region["original_height"]) == (W, H)
        assert region["meta"] == {"text": [f"p={probabilities[k]:.2f}"]}
        if kind == "bitmasklabels":
            alpha = decode_mask_data_url(region["value"]["imageDataURL"], W, H, **LIMITS)
        else:
            alpha = decode_alpha(region["value"]["rle"], H, W)
        assert alpha.max() >= 200 and (alpha == 0).any() and len(np.unique(alpha)) > 8
    if kind == "bitmasklabels":
        # the same heat in both formats: PNG and RLE decode to identical masks
        rle = build_prediction(
            settings.heatmap, parse_label_config(CHEST_CONFIG), loaded, probabilities, cams, image.width, image.height
        )
        for png_region, rle_region in zip(
            regions, [r for r in rle["result"] if r["type"] == "brushlabels"], strict=True
        ):
            assert np.array_equal(
                decode_mask_data_url(png_region["value"]["imageDataURL"], W, H, **LIMITS),
                decode_alpha(rle_region["value"]["rle"], H, W),
            )


def test_predict_uses_png_for_a_bitmask_project(model_and_settings, nih_manifest) -> None:
    """The whole /predict path (fetch, batching, pool threads) with a BitmaskLabels config on real images."""
    settings, loaded = model_and_settings
    settings = replace(settings, image_roots=(Path(shared_or_skip(NIH)),))
    loaded = replace(loaded, thresholds=np.zeros(len(loaded.labels)))  # every finding predicted
    schema = parse_label_config(BITMASK_CONFIG)
    paths = [str(Path(shared_or_skip(NIH)) / e["image"]) for e in nih_manifest[:3]]
    tasks = [{"id": i, "data": {"image": p}} for i, p in enumerate(paths)] + [{"id": 9, "data": {}}]
    results = Predictor(settings).predict(tasks, schema, loaded)
    interface = LabelInterface(BITMASK_CONFIG)
    for prediction in results[:3]:
        assert interface.validate_prediction(prediction, return_errors=True) in (True, [])
        masks = [r for r in prediction["result"] if r["type"] == "bitmasklabels"]
        assert len(masks) == settings.heatmap.max_findings
        for region in masks:
            size = (region["original_width"], region["original_height"])
            assert png_data_url_size(region["value"]["imageDataURL"], 10**6) == size
    assert results[3]["result"] == []  # a bad task gets an empty result, not a crash


def test_brush_config_output_is_unchanged_by_the_refactor(model_and_settings, clinical) -> None:
    settings, loaded = model_and_settings
    image, probabilities, cams = clinical
    small = LoadedImage(image.pixels[:64, :64], 64, 64)
    prediction = build_prediction(
        settings.heatmap, parse_label_config(CHEST_CONFIG), loaded, probabilities, cams, small.width, small.height
    )
    brush = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    assert brush and all(isinstance(r["value"]["rle"], list) and r["value"]["format"] == "rle" for r in brush)
    assert torch.is_tensor(cams)


def test_an_unedited_prediction_reads_back_as_the_same_evidence_in_both_formats(model_and_settings, clinical) -> None:
    """Submitting a prediction unchanged saves its regions as they are: the annotation parser must read the PNG and
    the RLE of the same heat as the same mask."""
    from ml_backend.feedback.annotations import decode_region, parse_region

    settings, loaded = model_and_settings
    image, probabilities, cams = clinical
    masks = {}
    for config in (BITMASK_CONFIG, CHEST_CONFIG):
        prediction = build_prediction(
            settings.heatmap, parse_label_config(config), loaded, probabilities, cams, image.width, image.height
        )
        region = next(r for r in prediction["result"] if r["type"] != "choices")
        masks[region["type"]] = decode_region(parse_region(region["type"], region, settings), W, H, settings)
    assert masks["bitmasklabels"].any() and not masks["bitmasklabels"].all()
    assert np.array_equal(masks["bitmasklabels"], masks["brushlabels"])
