"""Image URLs: off by default; when on, only allowlisted hosts with public addresses, checked
after DNS and on every redirect, with byte and time limits. A local HTTP server plays the image
host; an injected resolver maps test names to addresses (no network needed)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service.errors import PayloadTooLargeError
from service.pipeline.image_urls import (
    ImageUrlError,
    ImageUrlFetcher,
    host_allowed,
    is_public_address,
)

PNG = (Path(__file__).parent / "fixtures" / "world" / "000000.png").read_bytes()
LOOPBACK = ipaddress.ip_address("127.0.0.1")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        routes = {
            "/image.png": (200, {"Content-Type": "image/png"}, PNG),
            "/to-image": (302, {"Location": "/image.png"}, b""),
            "/to-other-host": (302, {"Location": "http://other.test/image.png"}, b""),
            "/to-metadata": (302, {"Location": "http://metadata.test/latest"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/missing": (404, {}, b"no"),
        }
        if self.path == "/slow":
            time.sleep(2)
        status, headers, body = routes.get(self.path, (200, {}, PNG))
        self.server.hosts.append(self.headers["Host"])  # type: ignore[attr-defined]
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the time-limit test)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.hosts = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def fetcher(server: ThreadingHTTPServer, **overrides: object) -> ImageUrlFetcher:
    """images.test and other.test are the local server; metadata.test is the cloud metadata
    address. Only the local server's loopback address is let through the public-address rule."""
    table = {"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"],
             "metadata.test": ["169.254.169.254"], "private.test": ["10.0.0.7", "8.8.8.8"]}

    async def resolver(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    options: dict[str, object] = {
        "allowed_hosts": ["images.test", "metadata.test", "private.test"], "max_bytes": 10**6,
        "timeout_s": 5.0, "resolver": resolver,
        "address_policy": lambda a: a == LOOPBACK or is_public_address(a)}
    return ImageUrlFetcher(**(options | overrides))  # type: ignore[arg-type]


def url(server: ThreadingHTTPServer, path: str, host: str = "images.test") -> str:
    return f"http://{host}:{server.server_address[1]}{path}"


def fetch(f: ImageUrlFetcher, target: str) -> bytes:
    return asyncio.run(f.fetch(target))


def test_fetches_from_the_checked_address_with_the_host_header(server) -> None:
    assert fetch(fetcher(server), url(server, "/image.png")) == PNG
    assert server.hosts[-1] == f"images.test:{server.server_address[1]}"
    assert fetch(fetcher(server), url(server, "/to-image")) == PNG  # a redirect, re-checked


def test_refusals_say_why(server) -> None:
    f = fetcher(server)
    cases = {
        "file:///etc/passwd": "must be http or https",
        "ftp://images.test/x.png": "must be http or https",
        url(server, "/image.png", host="other.test"): "not on this server's image URL allowlist",
        url(server, "/to-other-host"): "'other.test' is not on this server's image URL allowlist",
        url(server, "/image.png", host="metadata.test"): "resolves to 169.254.169.254, a",
        url(server, "/to-metadata"): "resolves to 169.254.169.254",
        url(server, "/image.png", host="private.test"): "resolves to 10.0.0.7",
        url(server, "/loop"): "redirected more than 3 times",
        url(server, "/missing"): "answered HTTP 404",
    }
    for target, message in cases.items():
        with pytest.raises(ImageUrlError, match=re.escape(message)):
            fetch(f, target)
    with pytest.raises(ImageUrlError, match="cannot resolve"):
        fetch(fetcher(server, allowed_hosts=["nowhere.test"]), "http://nowhere.test/x.png")


def test_loopback_is_refused_by_the_default_policy(server) -> None:
    with pytest.raises(ImageUrlError, match=r"resolves to 127\.0\.0\.1, a private, loopback"):
        fetch(fetcher(server, address_policy=is_public_address), url(server, "/image.png"))


def test_byte_and_time_limits(server) -> None:
    with pytest.raises(PayloadTooLargeError, match="more than the limit of 1000"):
        fetch(fetcher(server, max_bytes=1000), url(server, "/image.png"))
    with pytest.raises(ImageUrlError, match=r"took longer than 0\.5 s"):
        fetch(fetcher(server, timeout_s=0.5), url(server, "/slow"))


def test_allowlist_matching() -> None:
    assert host_allowed("Images.Example.com.", ["images.example.com"])
    assert host_allowed("a.cdn.example", ["*.cdn.example"])
    assert not host_allowed("cdn.example", ["*.cdn.example"])
    assert not host_allowed("evilcdn.example", ["*.cdn.example"])
    assert not host_allowed("images.example.com.evil", ["images.example.com"])
    with pytest.raises(ValueError, match="allowlist"):
        ImageUrlFetcher([], max_bytes=1, timeout_s=1)
