"""Fetching images by URL without opening a door into the server's network (SSRF).

Off by default (`allow_image_urls`). When on, a URL must be http(s), its host on the configured
allowlist, and every address its name resolves to public: no private, loopback, link-local,
multicast or reserved address. The connection goes to the address that was checked (the host
name travels as the Host header and the TLS server name), so a second DNS answer cannot swap in
an internal address. Redirects are followed by hand, each hop checked the same way; the body is
bounded in bytes and the whole fetch in time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

import httpx

from service.errors import PayloadTooLargeError, ServiceError

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
AddressPolicy = Callable[[IpAddress], bool]


class ImageUrlError(ServiceError):
    """The URL is refused (scheme, host, address) or could not be fetched."""

    status_code = 400
    code = "bad_image_url"


def is_public_address(address: IpAddress) -> bool:
    """Globally routable unicast only: what an image host on the internet has."""
    return address.is_global and not address.is_multicast


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """Exact names, or "*.example.com" for the subdomains of example.com."""
    host = host.lower().rstrip(".")
    for entry in allowed_hosts:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]) and host != entry[2:]:
            return True
        if host == entry:
            return True
    return False


class ImageUrlFetcher:
    """Fetches one image URL under the policy above.

    allowed_hosts: host allowlist (exact or "*.domain"); required.
    max_bytes: largest body; more is 413. timeout_s: the whole fetch, redirects included.
    resolver / address_policy: injectable for tests (default: system DNS, public addresses).
    """

    def __init__(self, allowed_hosts: Sequence[str], max_bytes: int, timeout_s: float,
                 max_redirects: int = 3, resolver: Resolver = resolve,
                 address_policy: AddressPolicy = is_public_address) -> None:
        if not allowed_hosts:
            raise ValueError("image URLs need a host allowlist")
        self.allowed_hosts = list(allowed_hosts)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.resolver = resolver
        self.address_policy = address_policy

    async def fetch(self, url: str) -> bytes:
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout_s)
        except TimeoutError:
            raise ImageUrlError(f"fetching the image URL took longer than {self.timeout_s:g} s"
                                ) from None

    async def _fetch(self, url: str) -> bytes:
        current = self._parse(url)
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                     timeout=self.timeout_s) as client:
            for _ in range(self.max_redirects + 1):
                address = await self._checked_address(current)
                request = client.build_request(
                    "GET", current.copy_with(host=address),
                    headers={"Host": current.netloc.decode("ascii"), "Accept": "image/*"},
                    extensions={"sni_hostname": current.host})
                try:
                    response = await client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise ImageUrlError(f"could not fetch the image URL: {exc}") from None
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        current = self._parse(str(current.join(location)))
                        continue
                    if response.status_code != 200:
                        raise ImageUrlError(f"the image URL answered HTTP {response.status_code}")
                    return await self._read(response)
                finally:
                    await response.aclose()
        raise ImageUrlError(f"the image URL redirected more than {self.max_redirects} times")

    def _parse(self, url: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ImageUrlError(f"invalid image URL: {exc}") from None
        if parsed.scheme not in ("http", "https"):
            raise ImageUrlError(f"image URLs must be http or https, not {parsed.scheme!r}")
        if not parsed.host:
            raise ImageUrlError("the image URL has no host")
        if not host_allowed(parsed.host, self.allowed_hosts):
            raise ImageUrlError(f"host {parsed.host!r} is not on this server's image URL "
                                "allowlist")
        return parsed

    async def _checked_address(self, url: httpx.URL) -> str:
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = await self.resolver(url.host, port)
        except OSError as exc:
            raise ImageUrlError(f"cannot resolve {url.host!r}: {exc}") from None
        if not addresses:
            raise ImageUrlError(f"{url.host!r} resolves to no address")
        for text in addresses:
            if not self.address_policy(ipaddress.ip_address(text)):
                raise ImageUrlError(f"{url.host!r} resolves to {text}, a private, loopback, "
                                    "link-local or reserved address: refused")
        return addresses[0]

    async def _read(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLargeError(f"the image URL's body is {declared} bytes, more than "
                                       f"the limit of {self.max_bytes}")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise PayloadTooLargeError(f"the image URL's body is more than the limit of "
                                           f"{self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
