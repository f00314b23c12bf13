"""Fetch and decode the images Label Studio tasks point at, safely.

References come as Label Studio paths (``/data/upload/...``, ``/data/local-files/?d=...``) that need the
Label Studio URL and API key, plain http(s) URLs, ``file://`` URLs or local paths. What may be read is decided by
``ml_backend/io/image_sources.py``; this module enforces it on the wire:

* httpcore (httpx's transport layer) with our own network backend: ``connect_tcp`` resolves the host once, checks
  every address with the policy and connects to a checked one, so DNS cannot answer differently the second time;
  TLS still verifies the certificate against the host name (httpcore passes it as SNI / server_hostname);
* redirects are followed here, each hop checked again, at most ``SourcePolicy.max_redirects``;
* every socket read and write is clipped to the fetch's deadline, so a host that trickles one byte at a time is cut
  off at ``FETCH_TIMEOUT_S`` in total (httpx's timeouts are per operation only);
* at most ``FETCH_PER_HOST`` fetches to one host at once, all requests together.

httpx's client is not used for the fetch because it offers no hook at the socket level (``network_backend``); env
proxies are deliberately not honoured: a proxy would resolve and connect on its own, past the address check.
"""

from __future__ import annotations

import io
import os
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import numpy as np
from PIL import Image, UnidentifiedImageError

from ml_backend.config import Settings
from ml_backend.io.image_sources import (
    LOCAL_NOT_FOUND,
    ImageError,
    LocalSource,
    RemoteSource,
    Resolver,
    SourcePolicy,
    short,
    system_resolver,
)

__all__ = ["ImageError", "ImageFetcher", "LoadedImage", "decode_image", "fetch_bytes", "load_image"]

Reserve = Callable[[int, int], None]  # called with (width, height) before decoding; raises ImageError to refuse
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class LoadedImage:
    pixels: np.ndarray  # float32 (H, W) grayscale in [0, 1]; X-ray content is grayscale
    width: int
    height: int


def _auth_headers(settings: Settings) -> list[tuple[bytes, bytes]]:
    key = settings.label_studio_api_key
    if not key:
        return []
    # A personal access token is a JWT (three dot-separated parts); legacy tokens are 40 hex chars.
    scheme = "Bearer" if key.count(".") == 2 else "Token"
    return [(b"Authorization", f"{scheme} {key}".encode())]


class _Guard(threading.local):
    """The fetch this thread is doing: the source the backend checks addresses for, and the deadline."""

    source: RemoteSource | None = None
    deadline: float | None = None

    def remaining(self, timeout: float | None) -> float | None:
        if self.deadline is None:
            return timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the fetch's total deadline (FETCH_TIMEOUT_S) passed")
        return left if timeout is None else min(timeout, left)


class _GuardedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, guard: _Guard) -> None:
        self._inner, self._guard = inner, guard

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._guard.remaining(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._guard.remaining(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        tls = self._inner.start_tls(ssl_context, server_hostname, self._guard.remaining(timeout))
        return _GuardedStream(tls, self._guard)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Resolve once, check every address, connect to a checked one."""

    def __init__(self, policy: SourcePolicy, guard: _Guard, resolver: Resolver) -> None:
        self._policy, self._guard, self._resolver = policy, guard, resolver
        self._sync = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        source = self._guard.source
        # Only the fetch this thread started reaches here, for the host it checked.
        if source is None or source.port != port or host.lower() not in (source.host, _ascii_host(source.host)):
            raise ImageError("connection outside an image fetch refused")
        addresses = self._policy.addresses(source, self._resolver)
        error: Exception | None = None
        for address in addresses:
            try:
                stream = self._sync.connect_tcp(
                    address, port, self._guard.remaining(timeout), local_address, socket_options
                )
                return _GuardedStream(stream, self._guard)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise ImageError("unix sockets are not image sources")

    def sleep(self, seconds: float) -> None:
        self._sync.sleep(seconds)


class ImageFetcher:
    """Reads image references under the source policy; thread-safe, keeps connections alive per host."""

    def __init__(
        self, settings: Settings, resolver: Resolver = system_resolver, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.settings = settings
        self.policy = SourcePolicy.from_settings(settings)
        self._guard = _Guard()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,  # None: httpcore's default (certifi's CA bundle, hostname verification)
            network_backend=_PinnedBackend(self.policy, self._guard, resolver),
            max_connections=64,
            max_keepalive_connections=16,
            keepalive_expiry=30.0,
        )
        self._slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
        self._slots_lock = threading.Lock()

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _slot(self, source: RemoteSource) -> threading.BoundedSemaphore:
        with self._slots_lock:
            key = (source.host, source.port)
            if key not in self._slots:
                self._slots[key] = threading.BoundedSemaphore(max(1, self.settings.fetch_per_host))
            return self._slots[key]

    def fetch(self, ref: str, deadline: float | None = None) -> bytes:
        """The bytes ``ref`` points at; ``deadline`` (time.monotonic) caps FETCH_TIMEOUT_S for a request's own limit."""
        source = self.policy.classify(ref)
        limit = self.settings.max_image_bytes
        if isinstance(source, LocalSource):
            return _read_local(source, limit)
        ends = time.monotonic() + self.settings.fetch_timeout_s
        ends = ends if deadline is None else min(ends, deadline)
        for _ in range(self.policy.max_redirects + 1):
            location = self._fetch_hop(source, ref, ends, limit)
            if isinstance(location, bytes):
                return location
            source = self.policy.redirect(source, location)
        raise ImageError(f"fetching {short(ref, 120)!r} redirected more than {self.policy.max_redirects} times")

    def _fetch_hop(self, source: RemoteSource, ref: str, ends: float, limit: int) -> bytes | str:
        """The body, or the Location of a redirect."""
        slot = self._slot(source)
        left = ends - time.monotonic()
        if left <= 0 or not slot.acquire(timeout=left):
            raise ImageError(f"fetching {short(ref, 120)!r}: no time left (FETCH_TIMEOUT_S or the request's deadline)")
        self._guard.source, self._guard.deadline = source, ends
        try:
            headers = [(b"Accept", b"image/*, */*;q=0.5")]
            if source.send_token:
                headers += _auth_headers(self.settings)
            left = max(0.001, ends - time.monotonic())
            host = _ascii_host(source.host).encode()
            url = httpcore.URL(
                scheme=source.scheme.encode(), host=host, port=source.port, target=source.target.encode()
            )
            timeouts = {"connect": left, "read": left, "write": left, "pool": left}
            with self._pool.stream("GET", url, headers=headers, extensions={"timeout": timeouts}) as response:
                if response.status in _REDIRECTS:
                    location = _header(response.headers, b"location")
                    if not location:
                        raise ImageError(f"fetching {short(ref, 120)!r}: redirect without a Location")
                    return location
                if response.status != 200:
                    raise ImageError(f"fetching {short(ref, 120)!r} returned HTTP {response.status}")
                declared = _header(response.headers, b"content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise ImageError(f"image at {short(ref, 120)!r} is larger than MAX_IMAGE_BYTES ({limit})")
                chunks, size = [], 0
                for chunk in response.iter_stream():
                    size += len(chunk)
                    if size > limit:
                        raise ImageError(f"image at {short(ref, 120)!r} is larger than MAX_IMAGE_BYTES ({limit})")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpcore.TimeoutException as exc:
            raise ImageError(f"fetching {short(ref, 120)!r} timed out: {exc.__class__.__name__}: {exc}") from exc
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
            raise ImageError(f"cannot fetch {short(ref, 120)!r}: {exc.__class__.__name__}: {exc}") from exc
        finally:
            self._guard.source = self._guard.deadline = None
            slot.release()


def _ascii_host(host: str) -> str:
    try:
        return host if host.isascii() else host.encode("idna").decode()
    except UnicodeError as exc:
        raise ImageError(f"invalid image host {short(host, 100)!r}") from exc


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _read_local(source: LocalSource, limit: int) -> bytes:
    try:
        with source.path.open("rb") as handle:
            # Not read(limit + 1): CPython allocates that whole buffer first (64 MiB per image at the default).
            if os.fstat(handle.fileno()).st_size > limit:
                raise ImageError(f"image file larger than MAX_IMAGE_BYTES ({limit})")
            data = handle.read()
    except OSError as exc:  # vanished or unreadable since the check: the same text as "not found"
        raise ImageError(LOCAL_NOT_FOUND) from exc
    if len(data) > limit:
        raise ImageError(f"image file larger than MAX_IMAGE_BYTES ({limit})")
    return data


def fetch_bytes(
    ref: str, settings: Settings, client: ImageFetcher | None = None, deadline: float | None = None
) -> bytes:
    if client is not None:
        return client.fetch(ref, deadline)
    with ImageFetcher(settings) as fetcher:
        return fetcher.fetch(ref, deadline)


def decode_image(data: bytes, max_pixels: int, reserve: Reserve | None = None) -> LoadedImage:
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
            if reserve is not None:
                reserve(width, height)
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
    gray = np.asarray(image.convert("L"), dtype=np.float32)  # a new array: divided in place, no second copy
    gray /= 255.0
    return gray


def load_image(
    ref: str,
    settings: Settings,
    client: ImageFetcher | None = None,
    *,
    deadline: float | None = None,
    reserve: Reserve | None = None,
) -> LoadedImage:
    return decode_image(fetch_bytes(ref, settings, client, deadline), settings.max_image_pixels, reserve)
