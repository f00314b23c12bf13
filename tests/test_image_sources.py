"""The image-source policy and bounded /predict, against real HTTP servers on loopback, real files and the real app.

Loopback servers stand in for internal services: each test allow-lists them explicitly and shows they are refused
without it. Figures (slow-host isolation latency, memory) are printed; run with ``-s`` to see them
(bench/results/image_policy.md records a run).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from conftest import NIH, TOKEN, shared_or_skip
from fastapi.testclient import TestClient
from PIL import Image

from ml_backend.config import Settings
from ml_backend.io.image_sources import LOCAL_NOT_FOUND, LOCAL_OFF, ImageError, SourcePolicy, is_public
from ml_backend.io.images import ImageFetcher, load_image
from ml_backend.io.label_config import parse_label_config
from ml_backend.models.registry import ModelRegistry
from ml_backend.serve.app import create_app
from ml_backend.serve.predictor import Predictor

CHOICES_ONLY = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="findings" toName="image" choice="multiple">'
    '<Choice value="Effusion"/><Choice value="Nodule"/></Choices></View>'
)


def _png(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(size[0] * size[1]) % 251).astype(np.uint8).reshape(size[1], size[0])).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


PNG = _png()


class _Handler(BaseHTTPRequestHandler):
    """/img.png: an image; /redirect?to=URL: a 302; /trickle: headers, then one body byte every 0.3 s;
    /trickle-headers: the status line one byte every 0.3 s. Records (path, Host, Authorization) of each request."""

    seen: list[tuple[str, str | None, str | None]]
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).seen.append((self.path, self.headers.get("Host"), self.headers.get("Authorization")))
        url = urlparse(self.path)
        if url.path.endswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", parse_qs(url.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif url.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self._trickle(PNG)
        elif url.path == "/trickle-headers":
            self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
        elif url.path.endswith(".png"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _trickle(self, body: bytes) -> None:
        try:
            for i in range(len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:  # the client hung up: what a deadline does
            pass


@contextmanager
def serve(host: str = "127.0.0.1") -> Iterator[tuple[str, list]]:
    handler = type("Handler", (_Handler,), {"seen": []})
    server_class = ThreadingHTTPServer
    if ":" in host:
        server_class = type("V6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = server_class((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    display = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{display}:{server.server_address[1]}", handler.seen
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def black_hole() -> Iterator[str]:
    """A host that accepts connections (the kernel completes the handshake) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def fetcher(**changes) -> ImageFetcher:
    return ImageFetcher(replace(Settings(), **changes))


def refused(fetch: ImageFetcher, ref: str) -> str:
    with pytest.raises(ImageError) as caught:
        fetch.fetch(ref)
    return str(caught.value)


# ------------------------------------------------------------------------------------------------ hosts
def test_loopback_hosts_are_refused_unless_allow_listed() -> None:
    with serve() as (url, seen):
        ref = f"{url}/img.png"
        assert "not allowed" in refused(fetcher(), ref)
        assert "non-public address 127.0.0.1" in refused(fetcher(image_allow_hosts=("*",)), ref)  # "*" = public only
        assert "non-public" in refused(fetcher(image_allow_hosts=("*",)), ref.replace("127.0.0.1", "localhost"))
        assert "not allowed" in refused(fetcher(image_allow_hosts=("10.0.0.0/8",)), ref)
        assert seen == []  # nothing reached the server
        image = load_image(ref, replace(Settings(), image_allow_hosts=("127.0.0.1",)))
        assert (image.width, image.height) == (32, 24)
        assert load_image(ref, replace(Settings(), image_allow_hosts=("127.0.0.0/8",))).width == 32
        assert len(seen) == 2


def test_special_addresses_are_never_public() -> None:
    import ipaddress

    blocked = [
        "169.254.169.254",  # cloud metadata (link-local)
        "100.100.100.200",  # Alibaba metadata (shared address space)
        "fd00:ec2::254",  # AWS IPv6 metadata (unique local)
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "0.0.0.0", "255.255.255.255", "224.0.0.1",
        "240.0.0.1", "::1", "::", "fe80::1", "ff02::1",
        "::ffff:127.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
        "64:ff9b::a9fe:a9fe", "2002:7f00:1::",  # NAT64 and 6to4 carrying 169.254.169.254 / 127.0.0.1
    ]  # fmt: skip
    for text in blocked:
        assert not is_public(ipaddress.ip_address(text)), text
    for text in ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"]:
        assert is_public(ipaddress.ip_address(text)), text
    policy = SourcePolicy.from_settings(replace(Settings(), image_allow_hosts=("*", "10.9.0.0/16")))
    source = policy.classify("http://pacs.example.org/x.png")
    for text in blocked:
        with pytest.raises(ImageError, match="non-public"):
            policy.check_address(source, ipaddress.ip_address(text))
    policy.check_address(source, ipaddress.ip_address("10.9.3.4"))  # explicitly allowed CIDR
    policy.check_address(source, ipaddress.ip_address("8.8.8.8"))


def test_redirects_are_checked_at_every_hop() -> None:
    with serve("127.0.0.2") as (redirector, hops), serve() as (internal, internal_seen):
        allowed = fetcher(image_allow_hosts=("127.0.0.2",))  # the redirector only, not 127.0.0.1
        assert refused(allowed, f"{redirector}/redirect?to={internal}/img.png").startswith("image host '127.0.0.1'")
        metadata = "http://169.254.169.254/latest/meta-data/"
        assert "not allowed" in refused(allowed, f"{redirector}/redirect?to={metadata}")
        assert "non-http" in refused(allowed, f"{redirector}/redirect?to=file:///etc/passwd")
        assert internal_seen == []
        assert allowed.fetch(f"{redirector}/redirect?to=/img.png") == PNG  # a relative hop on the same host
        loop = f"{redirector}/redirect?to=/redirect?to=/redirect?to=/redirect?to=/img.png"
        assert "more than 3 times" in refused(allowed, loop)
        assert len(hops) == 3 + 2 + 4  # 3 refused first hops, redirect + image, the loop cut after 3 redirects


def test_ipv6_loopback_and_mapped_addresses() -> None:
    try:
        context = serve("::1")
        url, seen = context.__enter__()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        port = urlparse(url).port
        assert "not allowed" in refused(fetcher(), f"{url}/img.png")
        assert "non-public address ::1" in refused(fetcher(image_allow_hosts=("*",)), f"{url}/img.png")
        mapped = f"http://[::ffff:127.0.0.1]:{port}/img.png"  # IPv4 loopback in IPv6 clothing
        assert "non-public" in refused(fetcher(image_allow_hosts=("*", "::1")), mapped)
        assert seen == []
        assert fetcher(image_allow_hosts=("::1",)).fetch(f"{url}/img.png") == PNG
    finally:
        context.__exit__(None, None, None)


def test_a_host_is_resolved_once_and_every_address_checked() -> None:
    """DNS rebinding: the answer checked is the address connected to; a second lookup is never made per
    connection, and one bad address among several refuses the host."""
    with serve() as (url, seen):
        port = urlparse(url).port
        answers = [["127.0.0.1"], ["169.254.169.254"]]
        calls: list[str] = []

        def rebinding(host: str, _port: int) -> list[str]:
            calls.append(host)
            return answers[min(len(calls), len(answers)) - 1]

        settings = replace(Settings(), image_allow_hosts=("*", "127.0.0.1"))
        fetch = ImageFetcher(settings, resolver=rebinding)
        assert fetch.fetch(f"http://images.test:{port}/img.png") == PNG
        assert calls == ["images.test"]
        assert seen[0][1] == f"images.test:{port}"  # the Host header names the host, the socket the checked IP
        fetch.close()  # a new connection resolves again: now to the metadata address, refused before connecting
        assert "169.254.169.254" in refused(
            ImageFetcher(settings, resolver=rebinding), f"http://images.test:{port}/a.png"
        )
        mixed = ImageFetcher(settings, resolver=lambda *_: ["127.0.0.1", "10.0.0.7"])
        assert "10.0.0.7" in refused(mixed, f"http://images.test:{port}/img.png")
        assert len(seen) == 1


def test_https_to_the_checked_address_still_verifies_the_host_name() -> None:
    """The socket goes to the resolved, checked IP; TLS gets the host name (SNI) and verifies the certificate
    against it, so pinning the address weakens nothing."""
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("images.test").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    handler = type("Handler", (_Handler,), {"seen": []})
    tls = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    tls.daemon_threads = True
    tls.socket = server_context.wrap_socket(tls.socket, server_side=True)
    threading.Thread(target=tls.serve_forever, daemon=True).start()
    try:
        port = tls.server_address[1]
        settings = replace(Settings(), image_allow_hosts=("images.test", "other.test"))
        fetch = ImageFetcher(settings, resolver=lambda *_: ["127.0.0.1"], ssl_context=client_context)
        assert fetch.fetch(f"https://images.test:{port}/img.png") == PNG
        assert handler.seen[-1][1] == f"images.test:{port}"
        # the same address under a name the certificate does not carry: refused by TLS
        assert "CERTIFICATE_VERIFY_FAILED" in refused(fetch, f"https://other.test:{port}/img.png")
    finally:
        tls.shutdown()
        tls.server_close()


# ------------------------------------------------------------------------------------------------ Label Studio
def test_label_studio_token_goes_only_to_its_data_paths() -> None:
    with serve() as (ls, seen):
        fetch = fetcher(label_studio_url=ls, label_studio_api_key=TOKEN)
        assert fetch.fetch("/data/upload/3/img.png") == PNG
        assert fetch.fetch(f"{ls}/data/upload/a/../img.png") == PNG  # normalised, still under /data/
        for escape in ["/data/../api/users/", "/data/%2e%2e/api/users/", "/data/upload/..%2F..%2Fapi/users/"]:
            assert "leaves Label Studio's /data/ paths" in refused(fetch, escape), escape
        assert "HTTP 404" in refused(fetch, f"{ls}/api/users/")  # the LS host itself, but no token
        assert "HTTP 404" in refused(fetch, f"/data/upload/redirect?to={ls}/api/projects/")  # redirected: no token
        tokens = {path: auth for path, _, auth in seen}
        assert tokens["/data/upload/3/img.png"] == tokens["/data/upload/img.png"] == f"Token {TOKEN}"
        assert tokens["/api/users/"] is None and tokens["/api/projects/"] is None
        assert tokens[f"/data/upload/redirect?to={ls}/api/projects/"] == f"Token {TOKEN}"
        assert not any("users" in path and auth for path, _, auth in seen)
        other = fetcher(label_studio_url=ls, image_allow_hosts=("127.0.0.1",), label_studio_api_key=TOKEN)
        with serve() as (elsewhere, elsewhere_seen):
            other.fetch(f"{elsewhere}/data/upload/img.png")  # another origin's /data/: no token
        assert elsewhere_seen[0][2] is None


# ------------------------------------------------------------------------------------------------ files
def test_local_paths_only_under_roots_with_one_error_text(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "img.png").write_bytes(PNG)
    (root / "sub").mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "dir").symlink_to(outside)
    fetch = fetcher(image_roots=(root,))
    for ok in [str(root / "img.png"), f"file://{root}/img.png", "img.png", str(root / "sub" / ".." / "img.png")]:
        assert fetch.fetch(ok) == PNG, ok
    probes = [
        "/etc/passwd",  # exists, outside
        "file:///etc/passwd",
        "/proc/self/environ",
        str(outside / "secret.png"),
        f"{root}/../outside/secret.png",
        "../outside/secret.png",
        "../../../../etc/passwd",
        str(root / "link.png"),  # a symlink out of the root
        str(root / "dir" / "secret.png"),
        str(root / "missing.png"),  # inside, missing
        "file:///nonexistent/x.png",
        str(root),  # a directory
        "img.png\x00.txt",
    ]
    for probe in probes:
        assert refused(fetch, probe) == LOCAL_NOT_FOUND, probe
    off = fetcher()
    assert {refused(off, probe) for probe in [*probes, str(root / "img.png")]} == {LOCAL_OFF}


# ------------------------------------------------------------------------------------------------ deadlines
@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers"])
def test_a_trickling_host_is_cut_off_at_the_total_fetch_deadline(path: str) -> None:
    with serve() as (url, _):
        fetch = fetcher(image_allow_hosts=("127.0.0.1",), fetch_timeout_s=1.5)
        started = time.monotonic()
        message = refused(fetch, f"{url}{path}")  # every byte arrives within 0.3 s: no per-read timeout fires
        elapsed = time.monotonic() - started
        print(f"\n{path}: cut off after {elapsed:.2f} s (FETCH_TIMEOUT_S=1.5)")
        assert "timed out" in message
        assert 1.4 <= elapsed < 2.0


def _nih_files(file_root: Path, names: list[str]) -> None:
    for name in names:
        shutil.copy(shared_or_skip(NIH) / "images" / name, file_root / name)


def test_a_black_hole_host_holds_neither_another_client_nor_the_request(settings, file_root) -> None:
    _nih_files(file_root, ["00000001_000.png"])
    bounded = replace(settings, image_allow_hosts=("127.0.0.1",), fetch_timeout_s=6.0, predict_deadline_s=8.0)
    one = {"tasks": [{"id": 1, "data": {"image": "/data/upload/00000001_000.png"}}], "label_config": CHOICES_ONLY}
    with black_hole() as hole, TestClient(create_app(bounded)) as client:
        started = time.monotonic()
        assert client.post("/predict", json=one).json()["results"][0]["result"]  # loads the model
        alone = time.monotonic() - started
        stuck = {
            "tasks": [{"id": i, "data": {"image": f"{hole}/{i}.png"}} for i in range(9)],
            "label_config": CHOICES_ONLY,
        }
        answer: dict = {}

        def slow_client() -> None:
            t0 = time.monotonic()
            answer.update(client.post("/predict", json=stuck).json(), seconds=time.monotonic() - t0)

        thread = threading.Thread(target=slow_client)
        thread.start()
        time.sleep(0.5)  # the nine fetches are in flight
        started = time.monotonic()
        quick = client.post("/predict", json=one).json()["results"][0]
        beside = time.monotonic() - started
        thread.join(30)
        print(f"\none-image /predict: {alone:.2f} s alone (model load included), {beside:.3f} s beside a 9-task "
              f"request to a black hole; that request answered in {answer['seconds']:.2f} s")  # fmt: skip
        assert quick["result"] and "error" not in quick
        assert beside < 1.5  # far below the black hole's 6 s fetch timeout
        results = answer["results"]
        assert len(results) == 9 and all(r["result"] == [] for r in results)
        assert all("timed out" in r["error"] or "PREDICT_DEADLINE_S" in r["error"] for r in results)
        assert answer["seconds"] < 8.0 + 1.5  # the request's deadline, not 2 x 6 s of fetches


# ------------------------------------------------------------------------------------------------ budgets
@pytest.fixture()
def predictor_setup(tmp_path: Path):
    def make(**changes) -> tuple[Predictor, object, object]:
        settings = replace(Settings(), model_dir=tmp_path / "models", **changes)
        schema = parse_label_config(CHOICES_ONLY)
        loaded = ModelRegistry(settings).get("p", schema.findings)
        return Predictor(settings), schema, loaded

    return make


def test_pixel_budget_and_bounded_error_texts(predictor_setup) -> None:
    images = shared_or_skip(NIH) / "images"
    names = sorted(os.listdir(images))[:5]
    predictor, schema, loaded = predictor_setup(image_roots=(images,), predict_max_pixels=3 * 64 * 64)
    huge = "/data/upload/" + "a" * 50_000
    tasks = [{"id": i, "data": {"image": name}} for i, name in enumerate(names)] + [{"id": 9, "data": {"image": huge}}]
    results = predictor.predict(tasks, schema, loaded)
    assert len(results) == 6
    assert sum(bool(r["result"]) for r in results[:5]) == 3
    assert sum("PREDICT_MAX_PIXELS" in r.get("error", "") for r in results[:5]) == 2
    assert "LABEL_STUDIO_URL is not set" in results[5]["error"]
    assert all(len(r.get("error", "")) <= 300 for r in results)
    assert all(len(e["reason"]) <= 300 for e in predictor.stats.last_errors)


def test_memory_follows_the_batch_not_the_task_count(predictor_setup, tmp_path: Path) -> None:
    side = 1024
    rng = np.random.default_rng(0)
    for i in range(16):
        pixels = (np.add.outer(np.arange(side), np.arange(side)) // 16 + rng.integers(0, 4, (side, side))) % 256
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / f"big{i}.png")
    predictor, schema, loaded = predictor_setup(
        image_roots=(tmp_path,), predict_batch_size=2, fetch_per_request=2, predict_max_pixels=10**9
    )
    decoded = side * side * 4  # one float32 image

    def peak(n: int) -> int:
        tasks = [{"id": i, "data": {"image": f"big{i}.png"}} for i in range(n)]
        tracemalloc.start()
        try:
            results = predictor.predict(tasks, schema, loaded)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert all(r["result"] for r in results)

    peak(2)  # warm-up
    small, large = peak(4), peak(16)
    print(f"\ntraced peak: 4 tasks {small / 2**20:.0f} MiB, 16 tasks {large / 2**20:.0f} MiB "
          f"(one decoded image {decoded / 2**20:.0f} MiB, all 16 {16 * decoded / 2**20:.0f} MiB)")  # fmt: skip
    # the batch being predicted (2) + the fetch window (2) + decodes in progress: far below all 16 kept (64 MiB)
    assert large < 8 * decoded
    assert large - small < 3 * decoded
