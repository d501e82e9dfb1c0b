"""The request-body byte limit, enforced while the body streams in (pure ASGI middleware).

A declared `Content-Length` over the limit is answered 413 at once, before a byte of the body is
read. A body without one (chunked) is counted as it arrives; the read that crosses the limit
raises `PayloadTooLargeError`, which the error handlers turn into the same 413 body. Either way no
more than `max_body_bytes` (+ one chunk) is ever held, whatever a handler does with the body.
"""

from __future__ import annotations

from service.errors import PayloadTooLargeError, error_response
from service.telemetry import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimitMiddleware:
    """`max_body_bytes` for every path but those in `path_limits` (exact path -> bytes)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int,
                 path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.max_body_bytes)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = error_response(
                413, PayloadTooLargeError.code,
                f"request body is {declared} bytes, more than the limit of {limit}",
                scope=scope)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(
                        f"request body is more than the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
