"""Where task images may come from: a pure policy (no I/O except `Path.resolve` and the resolver it is given).

In the spirit of Label Studio's own SSRF protection, a task's image reference can only make this backend read:

* the Label Studio origin (``LABEL_STUDIO_URL``, configured by the operator, so always allowed), with the API token
  sent only to its ``/data/`` paths after normalising them (a ``..`` escaping ``/data/`` is refused);
* hosts on the ``IMAGE_ALLOW_HOSTS`` list: host names (``pacs.example.org``, ``*.example.org``), IP addresses or
  CIDRs, or ``*`` for any host whose addresses are all public;
* files under ``IMAGE_ROOTS`` (none by default: local reads are off), after resolving symlinks and ``..``.

Every address a host name resolves to is checked (private, loopback, link-local incl. the cloud metadata address,
multicast, reserved, unspecified, shared and IPv4 embedded in IPv6 are refused unless a CIDR entry allows them);
the caller connects to the checked address, never resolving twice, and checks every redirect hop again.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urljoin, urlsplit

from ml_backend.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

MAX_REASON_CHARS = 300
# One text for "outside the roots", "missing", "not a file" and "unreadable", so a caller cannot probe the disk.
LOCAL_NOT_FOUND = "image file not found under IMAGE_ROOTS"
LOCAL_OFF = "local image paths are off (IMAGE_ROOTS is not set)"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ImageError(ValueError):
    """An image reference that cannot be fetched or decoded; the message says why."""


def short(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """Error texts quote references, and a reference can be 50 MB: keep logs and /metrics bounded."""
    return text if len(text) <= limit else f"{text[: limit - 15]}… ({len(text)} chars)"


def _quote_ref(ref: str) -> str:
    return repr(short(ref, 120))


@dataclass(frozen=True)
class LocalSource:
    path: Path  # resolved, inside one of the roots, an existing file


@dataclass(frozen=True)
class RemoteSource:
    url: str
    scheme: str
    host: str  # lower-case; an IP literal without brackets
    port: int
    target: str  # path and query, as sent
    send_token: bool  # a normalised Label Studio /data/ path
    trusted: bool  # the Label Studio origin or a host named on the allow-list: any address it resolves to


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _embedded_v4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4, Teredo): it is where the packets end up."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def is_public(address: IPAddress) -> bool:
    """True for globally routable unicast addresses only."""
    inner = _embedded_v4(address)
    if inner is not None and not is_public(inner):
        return False
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified)


@dataclass(frozen=True)
class SourcePolicy:
    label_studio: tuple[str, str, int, str] | None  # scheme, host, port, path prefix ("" or "/ls")
    any_public: bool
    host_names: frozenset[str]
    host_suffixes: tuple[str, ...]  # from "*.example.org" entries, as ".example.org"
    networks: tuple[IPNetwork, ...]
    roots: tuple[Path, ...]
    max_redirects: int = 3

    @classmethod
    def from_settings(cls, settings: Settings) -> SourcePolicy:
        ls = None
        if settings.label_studio_url:
            parts = urlsplit(settings.label_studio_url.strip())
            scheme = parts.scheme.lower()
            host = (parts.hostname or "").lower()
            if scheme not in ("http", "https") or not host:
                raise ValueError(f"LABEL_STUDIO_URL must be an http(s) URL, got {settings.label_studio_url!r}")
            ls = (scheme, host, parts.port or _default_port(scheme), parts.path.rstrip("/"))
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        any_public = False
        for raw in settings.image_allow_hosts:
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                any_public = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                names.add(entry.rstrip("."))
        roots = tuple(Path(root).expanduser().resolve() for root in settings.image_roots)
        return cls(ls, any_public, frozenset(names), tuple(suffixes), tuple(networks), roots)

    # ------------------------------------------------------------------------------------------ references
    def classify(self, ref: str) -> LocalSource | RemoteSource:
        """What a task's image reference points at, or ImageError saying why it may not be read."""
        if not isinstance(ref, str) or not ref:
            raise ImageError("task has no image reference")
        if ref.startswith("/data/"):
            if self.label_studio is None:
                raise ImageError(f"{_quote_ref(ref)} is a Label Studio path but LABEL_STUDIO_URL is not set")
            scheme, host, port, prefix = self.label_studio
            return self._remote(scheme, host, port, prefix + ref, ref)
        parts = urlsplit(ref)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            try:
                host, port = (parts.hostname or "").lower(), parts.port or _default_port(scheme)
            except ValueError as exc:  # a port that is not a number
                raise ImageError(f"invalid URL {_quote_ref(ref)}: {exc}") from exc
            if not host:
                raise ImageError(f"URL {_quote_ref(ref)} has no host")
            target = parts.path or "/"
            return self._remote(scheme, host, port, target + (f"?{parts.query}" if parts.query else ""), ref)
        if scheme == "file":
            return self.local(unquote(parts.path))
        if scheme == "" or (len(scheme) == 1 and ref[1:3] in (":\\", ":/")):  # a path (a Windows drive letter)
            return self.local(ref)
        raise ImageError(f"unsupported image reference scheme {scheme!r} in {_quote_ref(ref)}")

    def _remote(self, scheme: str, host: str, port: int, target: str, ref: str) -> RemoteSource:
        path, sep, query = target.partition("?")
        is_ls = self.label_studio is not None and self.label_studio[:3] == (scheme, host, port)
        send_token = False
        if is_ls:
            prefix = self.label_studio[3] + "/data/"  # type: ignore[index]
            raw_prefix_hit = path.startswith(prefix)
            normalised = _normalise_path(path)
            if raw_prefix_hit and not normalised.startswith(prefix):
                raise ImageError(f"{_quote_ref(ref)} leaves Label Studio's /data/ paths")
            if normalised.startswith(prefix):
                path, send_token = normalised, True
        elif not self.host_permitted(host):
            raise ImageError(
                f"image host {short(host, 100)!r} is not allowed (only LABEL_STUDIO_URL and IMAGE_ALLOW_HOSTS)"
            )
        display_host = f"[{host}]" if ":" in host else host
        url = f"{scheme}://{display_host}:{port}{path}{sep}{query}"
        trusted = is_ls or self._named(host)
        return RemoteSource(url, scheme, host, port, f"{path}{sep}{query}", send_token, trusted)

    def redirect(self, source: RemoteSource, location: str) -> RemoteSource:
        """The next hop of a redirect, checked like a task's own URL (relative locations join the current one)."""
        location = urljoin(source.url, location)
        if urlsplit(location).scheme.lower() not in ("http", "https"):
            raise ImageError(f"redirect to a non-http(s) location {_quote_ref(location)} refused")
        hop = self.classify(location)
        assert isinstance(hop, RemoteSource)
        return hop

    # ------------------------------------------------------------------------------------------ hosts
    def _named(self, host: str) -> bool:
        return host in self.host_names or any(host.endswith(suffix) for suffix in self.host_suffixes)

    def host_permitted(self, host: str) -> bool:
        if self._named(host) or self.any_public:
            return True
        literal = _ip(host)
        return literal is not None and self.address_in_networks(literal)

    def address_in_networks(self, address: IPAddress) -> bool:
        candidates = [address] + ([inner] if (inner := _embedded_v4(address)) is not None else [])
        return any(a in net for a in candidates for net in self.networks if a.version == net.version)

    def check_address(self, source: RemoteSource, address: IPAddress) -> None:
        """Raise unless ``source`` may be reached at ``address``."""
        if source.trusted or self.address_in_networks(address):
            return
        if is_public(address):
            if self.any_public:
                return
            raise ImageError(f"image host {short(source.host, 100)!r} resolves to {address}, which is not allowed")
        raise ImageError(
            f"image host {short(source.host, 100)!r} resolves to non-public address {address} "
            "(allow it explicitly in IMAGE_ALLOW_HOSTS)"
        )

    def addresses(self, source: RemoteSource, resolver: Resolver) -> list[str]:
        """Resolve once and check every address: one bad address refuses the host (DNS answers can rotate)."""
        literal = _ip(source.host)
        if literal is not None:
            found = [str(literal)]
        else:
            try:
                found = list(dict.fromkeys(resolver(source.host, source.port)))
            except OSError as exc:
                raise ImageError(f"cannot resolve image host {short(source.host, 100)!r}: {exc}") from exc
            if not found:
                raise ImageError(f"image host {short(source.host, 100)!r} has no address")
        for text in found:
            address = _ip(text)
            if address is None:
                raise ImageError(f"image host {short(source.host, 100)!r} resolved to an unusable address {text!r}")
            self.check_address(source, address)
        return found

    # ------------------------------------------------------------------------------------------ files
    def local(self, raw: str) -> LocalSource:
        if not self.roots:
            raise ImageError(LOCAL_OFF)
        if "\x00" in raw:
            raise ImageError(LOCAL_NOT_FOUND)
        given = Path(raw).expanduser()
        candidates = [given] if given.is_absolute() else [root / given for root in self.roots]
        for candidate in candidates:
            try:
                path = candidate.resolve(strict=True)
                inside = any(path == root or root in path.parents for root in self.roots)
                if inside and path.is_file():
                    return LocalSource(path)
            except (OSError, RuntimeError):  # missing, a symlink loop, permission: all read as "not found"
                continue
        raise ImageError(LOCAL_NOT_FOUND)


def _normalise_path(path: str) -> str:
    """Remove dot segments, judging them percent-decoded (servers decode ``%2e%2e`` and ``%2f`` before routing)."""
    segments = [unquote(segment) for segment in path.split("/")]
    if "//" not in path and not any(s in (".", "..") or "/" in s or "\\" in s for s in segments):
        return path  # nothing to normalise: sent exactly as Label Studio wrote it
    decoded = re.sub(r"/+", "/", unquote(path).replace("\\", "/"))
    normalised = posixpath.normpath(decoded)
    if decoded.endswith("/") and not normalised.endswith("/"):
        normalised += "/"
    return quote(normalised, safe="/!$&'()*+,;=:@-._~")


def system_resolver(host: str, port: int) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
