"""Fetch and decode the images Label Studio tasks point at, safely.

References come as Label Studio paths (``/data/upload/...``, ``/data/local-files/?d=...``) that need the
Label Studio URL and API key, plain http(s) URLs, ``file://`` URLs or local paths.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import numpy as np
from PIL import Image, UnidentifiedImageError

from ml_backend.config import Settings


class ImageError(ValueError):
    """An image reference that cannot be fetched or decoded; the message says why."""


@dataclass(frozen=True)
class LoadedImage:
    pixels: np.ndarray  # float32 (H, W) grayscale in [0, 1]; X-ray content is grayscale
    width: int
    height: int


def _auth_headers(settings: Settings) -> dict[str, str]:
    key = settings.label_studio_api_key
    if not key:
        return {}
    # A personal access token is a JWT (three dot-separated parts); legacy tokens are 40 hex chars.
    scheme = "Bearer" if key.count(".") == 2 else "Token"
    return {"Authorization": f"{scheme} {key}"}


def resolve_url(ref: str, settings: Settings) -> tuple[str, dict[str, str]]:
    """Turn an image reference into (absolute URL or local path, headers)."""
    if ref.startswith("/data/"):
        if not settings.label_studio_url:
            raise ImageError(f"{ref!r} is a Label Studio path but LABEL_STUDIO_URL is not set")
        return settings.label_studio_url.rstrip("/") + ref, _auth_headers(settings)
    parsed = urlparse(ref)
    if parsed.scheme in ("http", "https"):
        ls = urlparse(settings.label_studio_url or "")
        same_host = bool(ls.netloc) and ls.netloc == parsed.netloc
        return ref, _auth_headers(settings) if same_host else {}
    if parsed.scheme == "file":
        return unquote(parsed.path), {}
    if parsed.scheme in ("",) or (len(parsed.scheme) == 1 and ref[1:3] in (":\\", ":/")):
        return ref, {}
    raise ImageError(f"unsupported image reference scheme {parsed.scheme!r} in {ref!r}")


def fetch_bytes(ref: str, settings: Settings, client: httpx.Client | None = None) -> bytes:
    if not isinstance(ref, str) or not ref:
        raise ImageError("task has no image reference")
    target, headers = resolve_url(ref, settings)
    if not target.startswith(("http://", "https://")):
        path = Path(target)
        if not path.is_file():
            raise ImageError(f"image file not found: {target}")
        if path.stat().st_size > settings.max_image_bytes:
            raise ImageError(f"image file larger than MAX_IMAGE_BYTES ({settings.max_image_bytes})")
        return path.read_bytes()
    own_client = client is None
    client = client or httpx.Client(timeout=settings.fetch_timeout_s, follow_redirects=True)
    try:
        with client.stream("GET", target, headers=headers) as response:
            if response.status_code != 200:
                raise ImageError(f"fetching {ref!r} returned HTTP {response.status_code}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > settings.max_image_bytes:
                    raise ImageError(f"image at {ref!r} is larger than MAX_IMAGE_BYTES")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise ImageError(f"cannot fetch {ref!r}: {exc.__class__.__name__}: {exc}") from exc
    finally:
        if own_client:
            client.close()


def decode_image(data: bytes, max_pixels: int) -> LoadedImage:
    """Decode PNG/JPEG (8/16-bit gray, RGB, RGBA, palette) to float grayscale, refusing decompression bombs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header, before any pixel is decoded
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, above MAX_IMAGE_PIXELS ({max_pixels})"
                )
            image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"cannot decode image: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode image (truncated or corrupt): {exc}") from exc
    return LoadedImage(pixels=_to_gray_float(image), width=width, height=height)


def _to_gray_float(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit scans rarely use the full range (often 12 bits): window to the image's own range.
        array = np.asarray(image, dtype=np.float32)
        lo, hi = float(array.min()), float(array.max())
        return (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Composite transparency onto black, the background an X-ray viewer would show.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def load_image(ref: str, settings: Settings, client: httpx.Client | None = None) -> LoadedImage:
    return decode_image(fetch_bytes(ref, settings, client), settings.max_image_pixels)
