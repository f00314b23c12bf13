"""Fast numpy codec for Label Studio brush masks (the ``@thi.ng/rle-pack`` bit format).

Label Studio stores a brush mask as RLE over the flattened RGBA canvas (H * W * 4 values); the editor shows
only the alpha channel, tinted with the label colour. The SDK codec in ``label_studio_sdk.converter.brush``
builds Python strings bit by bit, which takes seconds per multi-megapixel heatmap; we send 14 heatmaps per
X-ray, so this module encodes and decodes with array operations instead.

Stream layout (bits packed MSB first)::

    header: 32 bits value count | 5 bits (wordsize - 1) | 4 x 4 bits (rle_sizes[i] - 1)
    chunk:  1 bit repeat flag | 2 bits size class i | rle_sizes[i] bits (count - 1) | payload
            payload = one word (repeat) or ``count`` words (literal)

A decoder stops once the header's value count has been produced, so trailing padding bits are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations_with_replacement

import numpy as np

__all__ = ["alpha_to_mask", "decode_alpha", "encode_alpha", "encode_alpha_array", "heatmap_to_alpha"]

HEADER_BITS = 53
CHANNELS = 4  # RGBA; every pixel is repeated 4 times in the stream, like the SDK's ``mask2rle``
MAX_SIZE_BITS = 16  # the header stores rle_sizes - 1 in 4 bits, so a chunk holds at most 2**16 values
_U64 = np.uint64
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------- encoding


def _choose_rle_sizes(bitlen_hist: np.ndarray) -> tuple[int, int, int, int]:
    """Pick the 4 count-field widths that minimise the stream size for this histogram.

    ``bitlen_hist[b]`` counts chunks whose ``count - 1`` needs ``b`` bits. Every chunk costs
    ``3 + size + wordsize`` bits, so only the chosen field size depends on the choice and the exact total
    can be computed for all (at most 816) sorted candidates at once.
    """
    top = max(1, len(bitlen_hist) - 1)  # the widest class must hold the longest chunk (splitting is done)
    cands = np.array([(*c, top) for c in combinations_with_replacement(range(1, top + 1), 3)], dtype=np.int64)
    need = np.maximum(np.arange(top + 1), 1)  # a field is at least 1 bit wide
    # width used by each candidate for each bit length: the smallest size >= need (sizes are sorted)
    fits = cands[:, :, None] >= need[None, None, :]
    used = np.where(fits, cands[:, :, None], 99).min(axis=1)
    cost = used @ bitlen_hist[: top + 1].astype(np.int64)
    best = cands[int(np.argmin(cost))]
    return int(best[0]), int(best[1]), int(best[2]), int(best[3])


def _pack_codes(codes: np.ndarray, widths: np.ndarray, header: int) -> np.ndarray:
    """Concatenate variable-width codes (each at most 64 bits) MSB first after a 53-bit header.

    Each code lands in one 64-bit word or straddles two. Codes are in stream order, so the parts that land
    in the same word are contiguous and can be OR-reduced with ``reduceat``; at most one code straddles
    each word boundary, so the spill-over parts have unique targets.
    """
    ends = HEADER_BITS + np.cumsum(widths, dtype=np.int64)
    starts = ends - widths
    total_bits = int(ends[-1]) if len(ends) else HEADER_BITS
    words = np.zeros((total_bits + 63) // 64, dtype=_U64)
    words[0] = _U64(header << (64 - HEADER_BITS))
    if len(codes):
        word = starts >> 6
        end_in_word = (starts & 63) + widths
        spill = end_in_word > 64
        left = np.where(spill, 0, 64 - end_in_word).astype(_U64)
        right = np.where(spill, end_in_word - 64, 0).astype(_U64)
        first = (codes << left) >> right
        group = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
        words[word[group]] |= np.bitwise_or.reduceat(first, group)
        if spill.any():
            words[word[spill] + 1] |= codes[spill] << (128 - end_in_word[spill]).astype(_U64)
    return words.astype(">u8").view(np.uint8)[: (total_bits + 7) // 8]


def encode_alpha(
    alpha: np.ndarray,
    *,
    rle_sizes: tuple[int, int, int, int] | None = None,
    wordsize: int | None = None,
) -> list[int]:
    """Label Studio brush RLE of a (H, W) uint8 alpha mask, as the list of byte values its JSON holds."""
    return encode_alpha_array(alpha, rle_sizes=rle_sizes, wordsize=wordsize).tolist()


def encode_alpha_array(
    alpha: np.ndarray,
    *,
    rle_sizes: tuple[int, int, int, int] | None = None,
    wordsize: int | None = None,
) -> np.ndarray:
    """Encode a (H, W) uint8 alpha mask as Label Studio brush RLE bytes (a uint8 array).

    The array form skips building ~100k Python ints per full-size heatmap: orjson writes a uint8 array
    (``OPT_SERIALIZE_NUMPY``) to the same JSON list, faster than it writes the list.

    The stream decodes to ``np.repeat(alpha.ravel(), 4)`` (RGB = alpha, as the SDK's ``mask2rle`` and
    the editor write it). Every run in that stream is >= 4 values long, so repeat chunks are always
    cheaper than literal ones and only repeat chunks are emitted. By default the word size and
    ``rle_sizes`` are chosen per mask to minimise the payload; pass them to force a format
    (``rle_sizes=(3, 4, 8, 16), wordsize=8`` reproduces the SDK's ``mask2rle`` bit for bit, up to its
    padding). Runs longer than the widest class allows are split.
    """
    a = np.asarray(alpha)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"alpha must be a non-empty 2-D array, got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "biu":
            raise ValueError(f"alpha must be an integer (uint8) array, got dtype {a.dtype}")
        if a.dtype.kind != "b" and (a.min() < 0 or a.max() > 255):
            raise ValueError("alpha values must lie in [0, 255]")
        a = a.astype(np.uint8)
    flat = np.ascontiguousarray(a).ravel()
    num = flat.size * CHANNELS
    if num >= 2**32:
        raise ValueError(f"mask too large for the 32-bit value count: {a.shape}")
    min_wordsize = max(1, int(flat.max()).bit_length())
    if wordsize is None:
        wordsize = min_wordsize
    elif not min_wordsize <= wordsize <= 32:
        raise ValueError(f"wordsize must be in [{min_wordsize}, 32] for this mask, got {wordsize}")
    if rle_sizes is not None and (len(rle_sizes) != 4 or not all(1 <= s <= MAX_SIZE_BITS for s in rle_sizes)):
        raise ValueError(f"rle_sizes must be 4 field widths in [1, {MAX_SIZE_BITS}], got {rle_sizes}")
    split_bits = MAX_SIZE_BITS if rle_sizes is None else max(rle_sizes)

    # runs of equal pixels; in the RGBA stream each run is 4x longer
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    run_starts = np.r_[0, change]
    values = flat[run_starts]
    counts = np.diff(np.r_[run_starts, flat.size]).astype(np.int64) * CHANNELS

    # split runs that do not fit the widest count field into full chunks plus a remainder
    extra = (counts - 1) >> split_bits
    if extra.any():
        per_run = extra + 1
        last = np.cumsum(per_run) - 1
        values = np.repeat(values, per_run)
        rem = counts - (extra << split_bits)
        counts = np.full(len(values), 1 << split_bits, dtype=np.int64)
        counts[last] = rem

    m = counts - 1
    bitlen = np.frexp(m.astype(np.float64))[1].astype(np.int64)  # bits needed for count - 1 (0 for 0)
    hist = np.bincount(bitlen, minlength=2)
    sizes = _choose_rle_sizes(hist) if rle_sizes is None else tuple(int(s) for s in rle_sizes)

    # per bit length: class index (the narrowest class that fits) and its field size
    need = np.maximum(np.arange(len(hist)), 1)
    order = sorted(range(4), key=lambda i: sizes[i])
    cls_of = np.array([next(i for i in order if sizes[i] >= b) for b in need], dtype=np.int64)
    size_of = np.asarray(sizes, dtype=np.int64)[cls_of]
    prefix_of = ((4 + cls_of) << (size_of + wordsize)).astype(_U64)  # repeat flag (1) + class, shifted

    codes = prefix_of[bitlen] | (m.astype(_U64) << _U64(wordsize)) | values.astype(_U64)
    widths = 3 + size_of[bitlen] + wordsize

    header = (num << 21) | ((wordsize - 1) << 16)
    for k, s in enumerate(sizes):
        header |= (s - 1) << (12 - 4 * k)
    return _pack_codes(codes, widths, header)


# --------------------------------------------------------------------------------------------- decoding


def _as_bytes(rle: Sequence[int] | bytes | bytearray | np.ndarray) -> np.ndarray:
    """Validate and convert the RLE payload (a JSON list of byte values) to a uint8 array."""
    if isinstance(rle, (bytes, bytearray, memoryview)):
        return np.frombuffer(rle, dtype=np.uint8)
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1 or (rle.size and rle.dtype.kind not in "iu"):
            raise ValueError(f"rle must be a 1-D integer array, got {rle.dtype} with shape {rle.shape}")
        if rle.size and (int(rle.min()) < 0 or int(rle.max()) > 255):
            raise ValueError("rle byte values must lie in [0, 255]")
        return rle.astype(np.uint8)
    if isinstance(rle, (str, dict)):
        raise ValueError(f"rle must be a sequence of byte values, got {type(rle).__name__}")
    try:
        # bytes() checks int-ness and range in C: ~10x faster than np.asarray on a list of Python ints
        return np.frombuffer(bytes(rle), dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rle must be a sequence of integers in [0, 255]: {exc}") from None


class _BitReader:
    """Reads of <= 57 bits at arbitrary bit offsets, vectorised over offsets."""

    def __init__(self, data: np.ndarray) -> None:
        self.nbits = 8 * len(data)
        self.raw = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
        self.bytes = self.raw.tobytes()
        # overlapping 64-bit windows, one per byte offset (a strided view, no copy). Gathering them as
        # little-endian and byte-swapping the gathered copy is ~2x faster than gathering as '>u8'.
        self.windows: np.ndarray = np.ndarray((len(data) + 1,), dtype="<u8", buffer=self.raw, strides=(1,))

    def window(self, pos: np.ndarray) -> np.ndarray:
        """64-bit words whose MSB is the bit at ``pos`` (the top >= 57 bits are valid)."""
        return self.windows[pos >> 3].byteswap().astype(_U64, copy=False) << (pos & 7).astype(_U64)

    def read_scalar(self, pos: int, nbits: int) -> int:
        b = pos >> 3
        return ((int.from_bytes(self.bytes[b : b + 8], "big") << (pos & 7)) & _MASK64) >> (64 - nbits)


def _repeat_width_table(reader: _BitReader, sizes: tuple[int, ...], wordsize: int) -> bytes:
    """Width in bits of the chunk that would start at each bit offset, if it is a repeat chunk; 0 if the
    bits there announce a literal chunk (its width depends on its count and is computed separately).

    A chunk's first 3 bits (repeat flag, size class) fix a repeat chunk's width. The 3 bits at offset k
    of byte i are bits 7-k..9-k of the 10-bit key ``byte[i] << 2 | byte[i+1] >> 6``, so one lookup in a
    (1024, 8) table gives the widths at all 8 offsets of a byte.
    """
    by_code = np.zeros(8, dtype=np.uint8)  # codes 0-3: literal flag -> 0
    by_code[4:] = [3 + s + wordsize for s in sizes]
    keys = np.arange(1024)[:, None] >> (7 - np.arange(8))[None, :]
    table = by_code[keys & 7]
    raw = reader.raw
    key = (raw[:-1].astype(np.intp) << 2) | (raw[1:] >> 6)
    return table[key].tobytes()  # nbits + 56 entries; the zero padding reads as literal -> 0


def _chunk_starts(reader: _BitReader, sizes: tuple[int, ...], wordsize: int) -> list[int]:
    """Bit offsets of the chunks, from the header to the end of the data.

    Each chunk's header gives its length, so finding chunk starts is inherently sequential. The per-bit
    width table makes the Python loop a bare ``p += table[p]`` (~70 ns per chunk); everything else is
    vectorised. The walk runs past the last real chunk into the padding; the caller cuts by value count.
    """
    widths = _repeat_width_table(reader, sizes, wordsize)
    nbits = reader.nbits
    starts: list[int] = []
    add = starts.append
    p = HEADER_BITS
    while p < nbits:
        w = widths[p]
        while w:  # hot loop: repeat chunks
            add(p)
            p += w
            w = widths[p]
        if p >= nbits:
            break
        add(p)  # a literal chunk: count words follow the count field
        size = sizes[reader.read_scalar(p + 1, 2)]
        p += 3 + size + (reader.read_scalar(p + 3, size) + 1) * wordsize
    return starts


def decode_alpha(rle: Sequence[int] | bytes | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE bytes to the (H, W) uint8 alpha channel.

    Accepts any valid rle-pack stream (repeat and literal chunks, any word size, any ``rle_sizes``), e.g.
    masks edited in the Label Studio editor. Raises ``ValueError`` for malformed input: non-integer or
    out-of-range bytes, a truncated stream, a value count that is not ``height * width * 4``, or
    values above 255. Like the JS decoder, a last chunk that overshoots the value count is clipped.
    Literal chunks take a slower per-chunk path (~1 us each); the editor and ``mask2rle`` write RGB = alpha,
    where every run is >= 4 values long and literal chunks are rare.
    """
    if int(height) != height or int(width) != width or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive integers, got {height}x{width}")
    height, width = int(height), int(width)
    data = _as_bytes(rle)
    if len(data) * 8 < HEADER_BITS:
        raise ValueError(f"rle is truncated: {len(data)} bytes, the header alone needs 7")
    head = int.from_bytes(data[:7].tobytes(), "big") >> (56 - HEADER_BITS)
    num = head >> 21
    wordsize = ((head >> 16) & 31) + 1
    sizes = tuple(((head >> (12 - 4 * k)) & 15) + 1 for k in range(4))
    expected = height * width * CHANNELS
    if num != expected:
        raise ValueError(
            f"rle holds {num} values but a {height}x{width} RGBA mask needs {expected} "
            "(wrong original_height/original_width?)"
        )

    reader = _BitReader(data)
    offsets = _chunk_starts(reader, sizes, wordsize)
    starts = np.fromiter(offsets, dtype=np.int64, count=len(offsets))
    win = reader.window(starts)
    repeat = (win >> _U64(63)).astype(bool)
    size = np.asarray(sizes, dtype=np.int64)[(win >> _U64(61)).astype(np.int64) & 3]
    count = ((win << _U64(3)) >> (64 - size).astype(_U64)).astype(np.int64) + 1
    produced = np.cumsum(count)
    n_used = int(np.searchsorted(produced, num)) + 1  # chunks needed to produce num values
    if n_used > len(starts):
        have = int(produced[-1]) if len(produced) else 0
        raise ValueError(f"rle is truncated: it decodes to {have} of {num} values")
    starts, repeat, size, count = starts[:n_used], repeat[:n_used], size[:n_used], count[:n_used]
    n_words = np.where(repeat, 1, count)
    if int(starts[-1] + 3 + size[-1] + n_words[-1] * wordsize) > reader.nbits:
        raise ValueError("rle is truncated: the last chunk runs past the end of the data")

    payload = starts + 3 + size
    if repeat.all():  # the usual case: one word per chunk
        word_pos, reps = payload, count
    else:
        first = np.cumsum(n_words) - n_words
        owner = np.repeat(np.arange(n_used), n_words)
        word_pos = payload[owner] + (np.arange(len(owner)) - first[owner]) * wordsize
        reps = np.where(repeat, count, 1)[owner]
    words = reader.window(word_pos) >> _U64(64 - wordsize)
    if wordsize > 8 and int(words.max()) > 255:
        raise ValueError("rle contains values above 255, which cannot be alpha values")
    values = np.repeat(words.astype(np.uint8), reps)[:num]
    return values[CHANNELS - 1 :: CHANNELS].reshape(height, width)


# --------------------------------------------------------------------------------------------- heatmaps


def heatmap_to_alpha(heat: np.ndarray, levels: int = 64, floor: float = 0.2) -> np.ndarray:
    """Map a [0, 1] heatmap to a uint8 alpha mask for the brush overlay.

    Heat below ``floor`` (and NaN, and 0 when ``floor`` is 0) becomes alpha 0 so the X-ray stays visible
    there; heat in [floor, 1] maps linearly onto ``levels`` equally spaced alpha values in (0, 255]
    (``levels >= 255`` keeps all 255 non-zero values). Fewer levels give longer runs and a smaller payload,
    but too few show as concentric bands in the editor (see bench/results/rle.md).
    """
    if not 1 <= levels <= 256:
        raise ValueError(f"levels must be in [1, 256], got {levels}")
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    h = np.asarray(heat)
    if h.ndim != 2:
        raise ValueError(f"heat must be a 2-D array, got shape {h.shape}")
    h = h.astype(np.float64 if h.dtype == np.float64 else np.float32, copy=False)
    steps = min(levels, 255)
    # level = floor((h - floor) * steps / (1 - floor)) + 1, clipped to [0, steps]: the sign of h - floor
    # is exact in floating point, so heat < floor always lands on level 0 and heat >= floor on >= 1.
    # In-place ops on one buffer: this runs on 14 multi-megapixel maps per image.
    q = np.subtract(h, h.dtype.type(floor))
    q *= steps / (1.0 - floor)
    np.floor(q, out=q)
    q += 1
    np.fmax(q, 0, out=q)  # fmax/fmin also send NaN to 0 (10x cheaper than nan_to_num)
    np.fmin(q, steps, out=q)
    if floor == 0.0:
        q[h <= 0] = 0
    q *= 255.0 / steps
    np.rint(q, out=q)
    return q.astype(np.uint8)


def alpha_to_mask(alpha: np.ndarray, threshold: int = 1) -> np.ndarray:
    """Boolean mask of pixels with ``alpha >= threshold`` (default: anything painted at all)."""
    return np.asarray(alpha) >= threshold
