"""One HTTP request's identity and trace: its request id, the engine batches it rode in, and
the error code it was answered with.

`service.access_log.RequestContextMiddleware` opens a `RequestContext` per request, keeps it in
the ASGI scope (for the error handlers, which also run outside the middleware: the catch-all 500
is answered by Starlette's outermost middleware) and in a context variable (for the engine
client, which sees no scope). Everything here is standard library: the error handlers and the
engine client import it without pulling in the HTTP layer.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_CHARS = 128
# Printable ASCII (space to tilde): safe to echo in a header, a JSON body and a log line.
_VALID_REQUEST_ID = re.compile(rf"[\x20-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")
SCOPE_KEY = "glipv2.request_context"


def new_request_id() -> str:
    """32 lowercase hex digits (a random UUID)."""
    return uuid.uuid4().hex


def accepted_request_id(sent: str | None) -> str:
    """The client's `X-Request-ID` when it is 1 to 128 printable ASCII characters (surrounding
    spaces stripped); otherwise (absent, empty, too long, control or non-ASCII characters) a new
    one, so that garbage is never echoed into headers and logs."""
    if sent is not None:
        sent = sent.strip(" ")
        if _VALID_REQUEST_ID.fullmatch(sent):
            return sent
    return new_request_id()


@dataclass
class RequestContext:
    """What the access log tells about one request, beside its method, route and status.

    engine_batches: per engine, the size of each batch this request had items in (a batch
        once, however many of its items it held), in the order the batches started
        (`{"vision": [4], "fusion": [8, 8]}`: two fusion batches of 8). Engines that ran in
        another process (Ray Serve) are not seen here.
    error_code: the `code` of the error body it was answered with, if any.
    sets_header: whether the app puts `X-Request-ID` on the response; False when a proxy in
        front (Ray Serve's) assigned the id and returns it itself.
    """

    request_id: str
    engine_batches: dict[str, list[int]] = field(default_factory=dict)
    error_code: str | None = None
    sets_header: bool = True
    _recorders: dict[str, Callable[[int], None]] = field(default_factory=dict, repr=False)

    def record_batch(self, engine: str, size: int) -> None:
        self.engine_batches.setdefault(engine, []).append(size)

    def batch_recorder(self, engine: str) -> Callable[[int], None]:
        """`record_batch` for `engine`, as the batcher's `on_batched`: the same callable for
        every item of this request, so a batch holding several of them is listed once."""
        recorder = self._recorders.get(engine)
        if recorder is None:
            recorder = self._recorders[engine] = functools.partial(self.record_batch, engine)
        return recorder


_current: ContextVar[RequestContext | None] = ContextVar("glipv2_request_context", default=None)


def current_request() -> RequestContext | None:
    """The context of the HTTP request being served by this task (None outside one: job work,
    engine replicas, the lifespan)."""
    return _current.get()


def bind_request(context: RequestContext) -> Token[RequestContext | None]:
    return _current.set(context)


def unbind_request(token: Token[RequestContext | None]) -> None:
    _current.reset(token)


def scope_request(scope: Mapping[str, Any]) -> RequestContext | None:
    """The context the middleware stored in this ASGI scope (None if it did not see it)."""
    context = scope.get(SCOPE_KEY)
    return context if isinstance(context, RequestContext) else None
