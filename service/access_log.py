"""Request ids and the access log: one middleware, one JSON line per request.

`RequestContextMiddleware` (pure ASGI, the outermost of the app's own middlewares) gives every
HTTP request a `RequestContext` (`service.request_context`): the client's `X-Request-ID` when
valid, else a new one. The id comes back in the `X-Request-ID` response header of every answer
and in every error body. When the response is done, one line goes to the `service.access`
logger at INFO, formatted as JSON by `JsonFormatter`:

    {"ts": "2025-06-01T12:00:00.123+00:00", "level": "info", "logger": "service.access",
     "message": "POST /v1/detect 200", "request_id": "5f0c...", "method": "POST",
     "route": "/v1/detect", "path": "/v1/detect", "status": 200, "latency_ms": 41.27,
     "engine_batches": {"vision": [2], "language": [1], "fusion": [2]}}

- `route`: the matched route's template (`/v1/jobs/{job_id}`), null when no route matched;
  `path`: the path as requested (no query string).
- `latency_ms`: from the request's arrival at the middleware to the end of its response body.
- `engine_batches`: per engine, the size of each batch the request had items in (only engines
  batched in this process: under Ray Serve the engine replicas' batches are not reported, and
  the key is absent, as it is for requests that reached no engine). Caption decoding steps are
  not listed (a caption takes one per token); its `vision` batch and the detection of its
  objects are.
- `error_code`: on error responses (status >= 400), the `code` of the error body.

`configure_logging` is for the processes that serve (`glipv2 serve`, a Ray Serve ingress
replica): the service's and the engines' loggers at `log_level`, and the access lines on stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from service.request_context import (
    REQUEST_ID_HEADER,
    SCOPE_KEY,
    RequestContext,
    accepted_request_id,
    bind_request,
    unbind_request,
)
from service.telemetry import ASGIApp, Message, Receive, Scope, Send

ACCESS_LOGGER = "service.access"
SERVICE_LOGGERS = ("service", "engines")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_HEADER_NAME = REQUEST_ID_HEADER.lower().encode("latin-1")
_UNHANDLED_CODE = "internal_error"  # the catch-all 500's code (service.errors)

log = logging.getLogger(ACCESS_LOGGER)


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: `ts` (ISO 8601, UTC, ms), `level`, `logger`, `message`,
    the record's `fields` (`extra={"fields": {...}}`), and `exc_info` when it has one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line.update(fields)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        # ASCII escapes: no character of a path (U+2028 ...) can split the line.
        return json.dumps(line, default=str)


class _AccessHandler(logging.StreamHandler[TextIO]):
    """The access log's own handler (a class of its own, so reconfiguring replaces it)."""


def configure_logging(level: str) -> None:
    """The service's and engines' loggers at `level` (one of `LOG_LEVELS`); the access log as
    JSON lines on stdout, not propagated (so it is not also printed in the console format).
    Idempotent: a second call replaces the first's handler."""
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(LOG_LEVELS)}")
    numeric: int = getattr(logging, level.upper())
    for name in SERVICE_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(numeric)
    access.propagate = False
    for handler in [h for h in access.handlers if isinstance(h, _AccessHandler)]:
        access.removeHandler(handler)
    handler = _AccessHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    access.addHandler(handler)


class RequestContextMiddleware:
    """Request ids, the `X-Request-ID` response header, and the access-log line (pure ASGI).

    access_log: False keeps the ids and the header, and writes no lines.
    proxy_request_id: a proxy in front assigns every request's id, forwards it in
        `X-Request-ID` and puts it on the response itself (Ray Serve's proxy does, appending
        its header to the app's): the app then adds no header, so there is one. The id is
        still checked here; an invalid one the client sent is echoed by the proxy, while the
        body and the log get a new one.
    """

    def __init__(self, app: ASGIApp, access_log: bool = True,
                 proxy_request_id: bool = False) -> None:
        self.app = app
        self.access_log = access_log
        self.proxy_request_id = proxy_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        context = RequestContext(accepted_request_id(_header(scope, _HEADER_NAME)),
                                 sets_header=not self.proxy_request_id)
        scope[SCOPE_KEY] = context  # the error handlers find it here, the catch-all 500's too
        id_header = (_HEADER_NAME, context.request_id.encode("ascii"))
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", ()))
                if context.sets_header and not any(name.lower() == _HEADER_NAME
                                                   for name, _ in headers):
                    headers.append(id_header)  # error responses already carry it
                    message["headers"] = headers
            await send(message)

        token = bind_request(context)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status is None:  # Starlette's outermost middleware answers it: a 500
                status = 500
                context.error_code = context.error_code or _UNHANDLED_CODE
            raise
        finally:
            unbind_request(token)
            if self.access_log and log.isEnabledFor(logging.INFO):
                _log_access(scope, context, status, time.perf_counter() - started)


def _log_access(scope: Scope, context: RequestContext, status: int | None,
                elapsed_s: float) -> None:
    route = getattr(scope.get("route"), "path", None)
    method = scope.get("method", "")
    path = scope.get("path", "")
    fields: dict[str, Any] = {
        "request_id": context.request_id, "method": method, "route": route, "path": path,
        # None: the client left before any response (a cancelled request).
        "status": status, "latency_ms": round(elapsed_s * 1000.0, 2),
    }
    if context.engine_batches:
        fields["engine_batches"] = context.engine_batches
    if status is not None and status >= 400:
        fields["error_code"] = context.error_code
    log.info("%s %s %s", method, route or path, status, extra={"fields": fields})


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lowercase), as latin-1 text (what HTTP allows)."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None
