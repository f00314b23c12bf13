"""Round trips of the numpy brush RLE codec against the Label Studio SDK's reference codec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from ml_backend.explain.brush_rle import alpha_to_mask, decode_alpha, encode_alpha, heatmap_to_alpha

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEBHOOK = SHARED / "data" / "label-studio-1.23.2-requests" / "webhook_ANNOTATION_CREATED.json"


def graded(height: int, width: int, grid: int = 7, seed: int = 0) -> np.ndarray:
    """A CAM-like heatmap in [0, 1]: a random grid x grid map, bilinearly upsampled (align_corners=True)."""
    g = np.random.default_rng(seed).random((grid, grid))
    ys = np.linspace(0, grid - 1, height)
    xs = np.linspace(0, grid - 1, width)
    y0 = np.minimum(ys.astype(int), grid - 2)
    x0 = np.minimum(xs.astype(int), grid - 2)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x0 + 1] * fx
    bottom = g[y0 + 1][:, x0] * (1 - fx) + g[y0 + 1][:, x0 + 1] * fx
    h = top * (1 - fy) + bottom * fy
    return (h - h.min()) / (h.max() - h.min())


def masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    return {
        "random": rng.integers(0, 256, (61, 47), dtype=np.uint8),
        "binary": np.where(rng.random((80, 33)) < 0.5, 255, 0).astype(np.uint8),
        "blob": np.pad(np.full((20, 30), 255, np.uint8), ((10, 7), (5, 9))),
        "zeros": np.zeros((45, 71), np.uint8),
        "full": np.full((45, 71), 255, np.uint8),
        "small_values": rng.integers(0, 4, (17, 19), dtype=np.uint8),  # word size 2 in our encoder
        "graded_256": heatmap_to_alpha(graded(333, 517), levels=256),
        "graded_64": heatmap_to_alpha(graded(333, 517, seed=1), levels=64),
        "pixel": np.array([[200]], np.uint8),
        "pixel_zero": np.array([[0]], np.uint8),
        "row": np.arange(256, dtype=np.uint8)[None, :],
        "column": np.arange(256, dtype=np.uint8)[::-1, None].copy(),
        # runs far longer than the 2**16-value limit of one chunk: 300 * 300 * 4 = 360k zero values
        "long_runs": np.pad(np.full((1, 3), 9, np.uint8), ((150, 149), (100, 197))),
    }


MASKS = masks()


@pytest.fixture(params=sorted(MASKS), ids=sorted(MASKS))
def alpha(request: pytest.FixtureRequest) -> np.ndarray:
    return MASKS[request.param]


def test_our_encode_decodes_with_sdk(alpha: np.ndarray) -> None:
    rle = encode_alpha(alpha)
    assert all(type(b) is int and 0 <= b <= 255 for b in rle)
    np.testing.assert_array_equal(decode_rle(rle), np.repeat(alpha.ravel(), 4))


def test_sdk_encode_decodes_with_ours(alpha: np.ndarray) -> None:
    out = decode_alpha(mask2rle(alpha), *alpha.shape)
    assert out.dtype == np.uint8 and out.shape == alpha.shape
    np.testing.assert_array_equal(out, alpha)


def test_own_round_trip(alpha: np.ndarray) -> None:
    rle = encode_alpha(alpha)
    np.testing.assert_array_equal(decode_alpha(rle, *alpha.shape), alpha)
    # the other input types the payload may arrive as
    np.testing.assert_array_equal(decode_alpha(bytes(rle), *alpha.shape), alpha)
    np.testing.assert_array_equal(decode_alpha(np.asarray(rle, np.int64), *alpha.shape), alpha)
    json.dumps(rle)  # plain ints, JSON serialisable


def test_payload_not_larger_than_sdk(alpha: np.ndarray) -> None:
    # both emit one repeat chunk per run; ours also tunes rle_sizes and word size, so it can only win
    # (the SDK also pads a whole zero byte when the bit count is a multiple of 8)
    assert len(encode_alpha(alpha)) <= len(mask2rle(alpha))


def test_sdk_format_is_bit_identical_to_mask2rle(alpha: np.ndarray) -> None:
    ours = encode_alpha(alpha, rle_sizes=(3, 4, 8, 16), wordsize=8)
    sdk = mask2rle(alpha)
    # the SDK appends a whole zero byte when the bit count is already a multiple of 8
    assert sdk == ours or sdk == [*ours, 0]


@pytest.mark.parametrize("sizes", [(1, 2, 3, 4), (8, 3, 16, 4), (5, 5, 5, 5)])
def test_forced_formats_round_trip(sizes: tuple[int, int, int, int]) -> None:
    a = MASKS["long_runs"].copy()
    a[:40] = MASKS["graded_64"][:40, :300]
    for ws in (8, 11):
        rle = encode_alpha(a, rle_sizes=sizes, wordsize=ws)
        np.testing.assert_array_equal(decode_alpha(rle, *a.shape), a)
        if ws == 8:
            np.testing.assert_array_equal(decode_rle(rle)[3::4], a.ravel())


@pytest.mark.parametrize(
    "kwargs", [{"wordsize": 7}, {"wordsize": 33}, {"rle_sizes": (3, 4, 8)}, {"rle_sizes": (0, 4, 8, 16)}]
)
def test_encode_rejects_bad_format(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        encode_alpha(np.full((3, 3), 200, np.uint8), **kwargs)


def test_graded_payload_is_smaller_with_tuned_sizes() -> None:
    a = MASKS["graded_256"]
    assert len(encode_alpha(a)) < 0.97 * len(mask2rle(a))


def test_large_constant_mask() -> None:
    a = np.full((700, 600), 17, np.uint8)  # 1.68M values -> 26 chunks of 2**16 values
    rle = encode_alpha(a)
    assert len(rle) < 100
    np.testing.assert_array_equal(decode_alpha(rle, 700, 600), a)
    np.testing.assert_array_equal(decode_rle(rle)[3::4], a.ravel())


def test_input_dtypes() -> None:
    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True
    np.testing.assert_array_equal(decode_alpha(encode_alpha(m), 5, 6), m.astype(np.uint8))
    ints = np.arange(30, dtype=np.int64).reshape(5, 6) * 8
    assert encode_alpha(ints) == encode_alpha(ints.astype(np.uint8))
    view = MASKS["graded_64"][::2, ::3]  # non-contiguous
    np.testing.assert_array_equal(decode_alpha(encode_alpha(view), *view.shape), view)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3, 4), np.uint8), np.zeros((0, 5), np.uint8), np.full((2, 2), 0.5), np.full((2, 2), 256)],
    ids=["3d", "empty", "float", "out_of_range"],
)
def test_encode_rejects_bad_alpha(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_alpha(bad)


# ------------------------------------------------------------------ streams with literal chunks


def reference_encode(values: np.ndarray, wordsize: int, sizes: tuple[int, int, int, int]) -> list[int]:
    """Slow, obviously-correct rle-pack encoder. Like @thi.ng/rle-pack's encoder, which the editor uses,
    it packs consecutive lone values into literal chunks and runs into repeat chunks, both split at the
    largest class."""
    bits = [f"{len(values):032b}", f"{wordsize - 1:05b}", *(f"{s - 1:04b}" for s in sizes)]
    biggest = 1 << sizes[3]

    def chunk_head(repeat: bool, count: int) -> str:
        cls = next(i for i, s in enumerate(sizes) if count - 1 < (1 << s))
        return f"{int(repeat)}{cls:02b}" + format(count - 1, f"0{sizes[cls]}b")

    literal: list[int] = []

    def flush() -> None:
        while literal:
            part = literal[:biggest]
            del literal[:biggest]
            bits.append(chunk_head(False, len(part)) + "".join(format(v, f"0{wordsize}b") for v in part))

    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        count = j - i + 1
        if count == 1:
            literal.append(int(values[i]))
        else:
            flush()
            while count:
                part = min(count, biggest)
                bits.append(chunk_head(True, part) + format(int(values[i]), f"0{wordsize}b"))
                count -= part
        i = j + 1
    flush()
    s = "".join(bits)
    s += "0" * (-len(s) % 8)
    return [int(s[k : k + 8], 2) for k in range(0, len(s), 8)]


@pytest.mark.parametrize(
    ("wordsize", "sizes"),
    [(8, (3, 4, 8, 16)), (8, (1, 2, 3, 4)), (3, (2, 2, 5, 9)), (1, (1, 1, 1, 1)), (5, (16, 16, 16, 16))],
)
def test_decode_literal_chunks_any_format(wordsize: int, sizes: tuple[int, int, int, int]) -> None:
    rng = np.random.default_rng(wordsize)
    h, w = 23, 19
    top = (1 << wordsize) - 1
    # RGBA with independent channels: singles (literal chunks) mixed with runs, some longer than a class
    rgba = rng.integers(0, top + 1, (h, w, 4))
    rgba[5:9] = top  # long repeat run
    rgba[12:20:2, :, :3] = rng.integers(0, top + 1, 3)
    values = rgba.ravel()
    rle = reference_encode(values, wordsize, sizes)
    np.testing.assert_array_equal(decode_rle(rle), values)  # the reference encoder is valid
    np.testing.assert_array_equal(decode_alpha(rle, h, w), rgba[..., 3])


def test_decode_editor_like_stream() -> None:
    # the editor sets RGB = alpha and encodes with rle-pack's defaults; a brush disk with antialiased edges
    # and zero runs longer than one chunk (2**16 values)
    yy, xx = np.mgrid[0:300, 0:300]
    alpha = (np.clip(40.5 - np.hypot(yy - 150, xx - 150), 0, 1) * 255).astype(np.uint8)
    values = np.repeat(alpha.ravel(), 4)
    rle = reference_encode(values, 8, (3, 4, 8, 16))
    np.testing.assert_array_equal(decode_rle(rle), values)
    np.testing.assert_array_equal(decode_alpha(rle, 300, 300), alpha)


def test_decode_sdk_literal_singletons() -> None:
    # RGB = a label colour, alpha graded: the SDK's encode_rle writes every lone value as a literal
    a = MASKS["graded_64"][:40, :50]
    rgba = np.dstack([np.full_like(a, 255), np.zeros_like(a), np.full_like(a, 7), a])
    np.testing.assert_array_equal(decode_alpha(encode_rle(rgba.ravel()), 40, 50), a)


def test_decode_wide_words() -> None:
    values = np.repeat(np.array([0, 255, 3, 255], np.int64), 4)  # 4 pixels, fine in 12-bit words
    rle = reference_encode(values, 12, (3, 4, 8, 16))
    np.testing.assert_array_equal(decode_alpha(rle, 2, 2), [[0, 255], [3, 255]])
    big = values.copy()
    big[7] = 300
    with pytest.raises(ValueError, match="above 255"):
        decode_alpha(reference_encode(big, 12, (3, 4, 8, 16)), 2, 2)


def test_decode_ignores_trailing_bytes_and_clips_overshoot() -> None:
    a = MASKS["blob"]
    rle = encode_alpha(a)
    np.testing.assert_array_equal(decode_alpha([*rle, 0, 255, 17], *a.shape), a)
    # a stream whose last repeat chunk produces more values than the header announces
    over = reference_encode(np.zeros(8, np.int64), 8, (3, 4, 8, 16))
    over[3] = 4  # header says 4 values = 1 pixel; the chunk repeats 8
    np.testing.assert_array_equal(decode_alpha(over, 1, 1), [[0]])


# ------------------------------------------------------------------ malformed input


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ([], "truncated"),
        ([0, 0, 0], "truncated"),
        (encode_alpha(np.zeros((2, 2), np.uint8))[:7], "truncated"),  # header only
        ([0, 0, 1.5], "integers"),
        ([0, 0, 256], "integers"),
        ([0, -1, 3], "integers"),
        (["a", "b"], "sequence"),
        ("abc", "sequence"),
        ([[1, 2], [3]], "integers"),
        (np.zeros((2, 7), np.uint8), "1-D"),
        (np.full(9, 0.5), "1-D"),
        (np.array([0, 300]), r"\[0, 255\]"),
    ],
)
def test_decode_rejects_malformed(rle: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_alpha(rle, 2, 2)  # type: ignore[arg-type]


def test_decode_rejects_truncated_stream() -> None:
    a = MASKS["graded_64"]
    rle = encode_alpha(a)
    for keep in (1, 5, 8, len(rle) // 2, len(rle) - 1):
        with pytest.raises(ValueError, match="truncated"):
            decode_alpha(rle[:keep], *a.shape)


def test_decode_rejects_wrong_shape() -> None:
    a = MASKS["blob"]
    rle = encode_alpha(a)
    with pytest.raises(ValueError, match="values but a"):
        decode_alpha(rle, a.shape[1], a.shape[0] + 1)
    with pytest.raises(ValueError, match="positive"):
        decode_alpha(rle, 0, 10)
    with pytest.raises(ValueError, match="positive"):
        decode_alpha(rle, 2.5, 10)  # type: ignore[arg-type]


# ------------------------------------------------------------------ a real Label Studio payload


@pytest.mark.shared_data
@pytest.mark.skipif(not WEBHOOK.exists(), reason=f"Label Studio request fixtures not found at {WEBHOOK}")
def test_webhook_brush_result_matches_sdk() -> None:
    body = json.loads(WEBHOOK.read_text())["body"]
    result = body["annotation"]["result"][1]
    assert result["type"] == "brushlabels"
    h, w = result["original_height"], result["original_width"]
    assert (h, w) == (64, 64)
    rle = result["value"]["rle"]
    ours = decode_alpha(rle, h, w)
    sdk = decode_rle(rle).reshape(h, w, 4)[..., 3]
    np.testing.assert_array_equal(ours, sdk)
    assert alpha_to_mask(ours).sum() == (sdk > 0).sum() > 0
    np.testing.assert_array_equal(decode_alpha(encode_alpha(ours), h, w), ours)


# ------------------------------------------------------------------ heatmaps


def test_heatmap_to_alpha_floor_and_range() -> None:
    heat = graded(120, 90)
    alpha = heatmap_to_alpha(heat, levels=256, floor=0.2)
    assert alpha.dtype == np.uint8 and alpha.shape == heat.shape
    np.testing.assert_array_equal(alpha == 0, heat < 0.2)
    assert alpha[heat == 1.0].min() == 255
    assert alpha[heat >= 0.2].min() >= 1
    order = np.argsort(heat.ravel(), kind="stable")
    assert (np.diff(alpha.ravel()[order].astype(int)) >= 0).all()  # monotone in heat
    assert len(np.unique(alpha)) > 150  # no quantisation at 256 levels


@pytest.mark.parametrize("levels", [2, 8, 16, 32, 64, 255, 256])
def test_heatmap_levels(levels: int) -> None:
    heat = np.linspace(0.0, 1.0, 5000)[None, :]
    alpha = heatmap_to_alpha(heat, levels=levels, floor=0.2)
    nonzero = np.unique(alpha[alpha > 0])
    assert len(nonzero) == min(levels, 255)
    assert nonzero.max() == 255


def test_fewer_levels_give_smaller_payloads() -> None:
    heat = graded(256, 256)
    sizes = [len(encode_alpha(heatmap_to_alpha(heat, levels=n))) for n in (256, 64, 16, 8)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[1] < 0.75 * sizes[0]


def test_heatmap_edge_cases() -> None:
    heat = np.array([[np.nan, 0.0, 0.1, 0.2, 1.5, -1.0]])
    np.testing.assert_array_equal(heatmap_to_alpha(heat, levels=4, floor=0.2), [[0, 0, 0, 64, 255, 0]])
    assert heatmap_to_alpha(np.array([[0.0, 0.5]]), floor=0.0)[0, 0] == 0  # zero heat is never painted
    for kwargs in ({"levels": 0}, {"levels": 257}, {"floor": 1.0}, {"floor": -0.1}):
        with pytest.raises(ValueError):
            heatmap_to_alpha(heat, **kwargs)
    with pytest.raises(ValueError):
        heatmap_to_alpha(np.zeros(5))


def test_alpha_to_mask() -> None:
    alpha = np.array([[0, 1, 127, 128, 255]], np.uint8)
    np.testing.assert_array_equal(alpha_to_mask(alpha), [[False, True, True, True, True]])
    np.testing.assert_array_equal(alpha_to_mask(alpha, threshold=128), [[False, False, False, True, True]])


def test_array_form_serialises_to_the_same_json_as_the_list() -> None:
    import orjson

    from ml_backend.explain.brush_rle import encode_alpha_array

    alpha = (np.random.default_rng(3).random((97, 131)) * 255).astype(np.uint8)
    array = encode_alpha_array(alpha)
    assert array.dtype == np.uint8
    assert array.tolist() == encode_alpha(alpha)
    # what /predict does (orjson with OPT_SERIALIZE_NUMPY) gives the bytes the list would give
    assert orjson.dumps({"rle": array}, option=orjson.OPT_SERIALIZE_NUMPY) == orjson.dumps({"rle": array.tolist()})
