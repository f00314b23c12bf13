"""Heatmaps as graded-alpha PNG data URLs for Label Studio's ``BitmaskLabels`` (and the way back to a mask).

A ``bitmasklabels`` region's value is ``{"imageDataURL": "data:image/png;base64,...", "bitmasklabels": [label]}``;
the editor paints the label's colour through the PNG's alpha channel, so a PNG whose alpha carries the heat renders
like the graded brush heatmap, at a fraction of the brush RLE's payload (label-studio-facts.md).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib

import numpy as np
from PIL import Image

__all__ = ["BitmaskError", "decode_mask_data_url", "encode_heat_png", "png_data_url_size"]

DATA_URL_PREFIX = "data:image/png;base64,"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# signature (8) + IHDR length and type (8) + IHDR data (13) + CRC (4)
_IHDR_END = 33
_IHDR_B64_CHARS = 4 * ((_IHDR_END + 2) // 3)
ZLIB_LEVEL = 6  # 9 saved 7-16% of the bytes in ~8x the time; 1-3 cost 1.6-2.2x the bytes (heatmap_png.md)


class BitmaskError(ValueError):
    """A bitmask data URL that cannot be used; the message says why (it reaches the user as a per-item reason)."""


# --------------------------------------------------------------------------------------------- encoding


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_heat_png(alpha: np.ndarray) -> str:
    """A (H, W) uint8 alpha mask as ``data:image/png;base64,...``: black pixels whose alpha is the heat."""
    a = np.asarray(alpha)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"alpha must be a non-empty 2-D array, got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "biu" or (a.dtype.kind != "b" and (a.min() < 0 or a.max() > 255)):
            raise ValueError(f"alpha must be uint8 values in [0, 255], got dtype {a.dtype}")
        a = a.astype(np.uint8)
    height, width = a.shape
    # Written by hand rather than with Pillow: see _encode_png_bytes (filter choice and speed, measured in
    # bench/results/heatmap_png.md).
    png = _encode_png_bytes(np.ascontiguousarray(a), width, height)
    return DATA_URL_PREFIX + base64.b64encode(png).decode("ascii")


def _encode_png_bytes(a: np.ndarray, width: int, height: int) -> bytes:
    """8-bit palette PNG (index = alpha, tRNS alpha = index), every row Sub-filtered, zlib level 6.

    One byte per pixel: half of luminance-alpha's zlib input, so faster and smaller. The Sub filter turns a
    bilinearly upsampled CAM quantised to a few levels into rows of mostly zeros with a spike at each level step;
    None/Up/Average/Paeth gave 1.06-1.4x the bytes in 1-2.4x the time (a real CAM at 5 MP: 97 KB as a data URL,
    9-12 ms/MP; bench/results/heatmap_png.md). Pillow cannot Sub-filter a palette image and its adaptive filter on
    RGBA took 4-5x longer for 1.8x the bytes, hence this small writer; decoding uses Pillow.
    """
    filtered = np.empty((height, width + 1), dtype=np.uint8)
    filtered[:, 0] = 1  # filter type Sub: each byte minus the one to its left (mod 256)
    filtered[:, 1] = a[:, 0]
    np.subtract(a[:, 1:], a[:, :-1], out=filtered[:, 2:])  # uint8 wraps mod 256, as the PNG filter defines it
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit, colour type 3 (palette)
    levels = np.arange(256, dtype=np.uint8)
    palette = np.zeros((256, 3), dtype=np.uint8).tobytes()  # black; the editor uses the label's colour anyway
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", ihdr),
            _chunk(b"PLTE", palette),
            _chunk(b"tRNS", levels.tobytes()),
            _chunk(b"IDAT", zlib.compress(filtered.tobytes(), ZLIB_LEVEL)),
            _chunk(b"IEND", b""),
        )
    )


# --------------------------------------------------------------------------------------------- decoding


def _split_data_url(data_url: object, max_bytes: int) -> str:
    """The base64 part of a PNG data URL, after the cheap checks (type, prefix, length)."""
    if not isinstance(data_url, str):
        raise BitmaskError(f"imageDataURL must be a string, got {type(data_url).__name__}")
    head = data_url[:64].lower()
    if not head.startswith("data:"):
        raise BitmaskError("imageDataURL is not a data URL (it must start with 'data:image/png;base64,')")
    if not head.startswith(DATA_URL_PREFIX):
        kind = data_url[5 : data_url.find(",")] if "," in data_url[:64] else data_url[5:40]
        raise BitmaskError(f"imageDataURL must be 'data:image/png;base64,...', got 'data:{kind},...'")
    payload = data_url[len(DATA_URL_PREFIX) :]
    # base64 is 4/3 the size of the bytes: refuse an oversized URL before decoding anything
    if len(payload) > 4 * ((max_bytes + 2) // 3):
        raise BitmaskError(f"imageDataURL holds more than {max_bytes} bytes of PNG ({len(data_url)} characters)")
    return payload


def _parse_ihdr(head: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the first 33 bytes of a PNG."""
    if len(head) < _IHDR_END or head[:8] != PNG_SIGNATURE:
        raise BitmaskError("imageDataURL does not hold a PNG (bad signature)")
    if head[12:16] != b"IHDR":
        raise BitmaskError("imageDataURL holds a malformed PNG (first chunk is not IHDR)")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if width == 0 or height == 0:
        raise BitmaskError(f"imageDataURL holds an empty PNG ({width}x{height})")
    return width, height, depth, colour


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BitmaskError(f"imageDataURL is not valid base64: {exc}") from None


def png_data_url_size(data_url: str, max_bytes: int) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR, decoding only its first 44 base64 characters (microseconds)."""
    payload = _split_data_url(data_url, max_bytes)
    width, height, _, _ = _parse_ihdr(_b64decode(payload[:_IHDR_B64_CHARS])[:_IHDR_END])
    return width, height


def decode_mask_data_url(data_url: str, width: int, height: int, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """The (height, width) uint8 alpha of a PNG data URL, as the brush RLE decoder returns it.

    The semantics match the brush path: kept heat stays graded, painted pixels are 255, erased pixels 0.
    Checks, each a ``BitmaskError`` with the reason: a PNG data URL of at most ``max_bytes`` bytes, valid
    base64, a PNG whose IHDR says ``width`` x ``height`` (the image's original size) and at most ``max_pixels``
    pixels (checked before decompressing: a decompression bomb is refused from its header), 8-bit, with an
    alpha channel (RGBA, LA, or palette with tRNS, as our encoder writes). 16-bit PNGs are refused rather
    than converted: neither the editor (canvas ``toDataURL``) nor this backend writes them, and Pillow's
    16-bit RGBA support is lossy.
    """
    payload = _split_data_url(data_url, max_bytes)
    # header first: size and bomb checks cost microseconds and run before the full base64 decode
    w, h, depth, colour = _parse_ihdr(_b64decode(payload[:_IHDR_B64_CHARS])[:_IHDR_END])
    if w * h > max_pixels:
        raise BitmaskError(f"PNG is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} (decompression bomb?)")
    if (w, h) != (width, height):
        raise BitmaskError(f"PNG is {w}x{h} but the image is {width}x{height} (original_width x original_height)")
    if depth == 16:
        raise BitmaskError("16-bit PNGs are not supported: send an 8-bit RGBA PNG (as the editor saves)")
    if colour not in (3, 4, 6):  # palette, gray + alpha, RGBA
        kind = {0: "grayscale", 2: "RGB"}.get(colour, f"colour type {colour}")
        raise BitmaskError(f"PNG is {kind} without an alpha channel: the mask must be in the alpha channel")
    png = _b64decode(payload)
    if len(png) > max_bytes:
        raise BitmaskError(f"PNG is {len(png)} bytes, above the limit of {max_bytes}")
    try:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as im:
            im.load()
            decoded: Image.Image = im
            if im.mode == "P":
                if "transparency" not in im.info:
                    raise BitmaskError("palette PNG has no transparency (tRNS): the mask must be in the alpha")
                decoded = im.convert("RGBA")  # index -> its tRNS alpha
            if decoded.mode not in ("RGBA", "LA", "PA"):
                raise BitmaskError(f"PNG mode {decoded.mode} has no 8-bit alpha channel")
            alpha = np.asarray(decoded.getchannel("A"), dtype=np.uint8)
    except BitmaskError:
        raise
    except (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError) as exc:
        raise BitmaskError(f"imageDataURL holds a corrupt PNG: {exc}") from None
    if alpha.shape != (height, width):
        raise BitmaskError(f"PNG decoded to {alpha.shape[1]}x{alpha.shape[0]}, expected {width}x{height}")
    return alpha
