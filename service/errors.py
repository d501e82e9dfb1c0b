"""Every error leaves the service as `{"error": {"code", "message", "request_id"}}` with the right
status.

The service's own failures are `ServiceError`s (status, code, message, headers). The batcher's
errors, FastAPI's validation errors and Starlette's HTTP errors are mapped onto the same body here,
so no handler anywhere else builds an error response. Given the request's ASGI scope, a response
carries the request's id (`service.request_context`) in its body and its `X-Request-ID` header,
and its code is recorded for the access log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from service.batching import (
    BatcherStoppedError,
    BatchExecutionError,
    DeadlineExceededError,
    EngineStalledError,
    NonFiniteOutputError,
    OverloadedError,
    QueueFullError,
)
from service.request_context import REQUEST_ID_HEADER, scope_request

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying while the service starts or drains.
UNAVAILABLE_RETRY_AFTER_S = 1
# ... and while the job store cannot be written (a disk filling up is not freed in a second).
JOBS_UNAVAILABLE_RETRY_AFTER_S = 5

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "queue_full",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
    504: "deadline_exceeded",
}


class ServiceError(Exception):
    """An error with an HTTP status and a message meant for the client."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadImageError(ServiceError):
    """The image could not be read (not base64, corrupt, truncated, zero-sized)."""

    status_code = 400
    code = "bad_image"


class InvalidJsonError(ServiceError):
    status_code = 400
    code = "invalid_json"


class UnauthorizedError(ServiceError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PayloadTooLargeError(ServiceError):
    """The body or the image is over a configured limit (bytes or pixels)."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(ServiceError):
    """Not a PNG, JPEG or WebP image, or a body that is neither JSON nor multipart."""

    status_code = 415
    code = "unsupported_media_type"


class InvalidRequestError(ServiceError):
    """Fields that parse but cannot be served (e.g. a prompt over the model's token limit)."""

    status_code = 422
    code = "invalid_request"


class FeatureDisabledError(ServiceError):
    """A capability this server has turned off (image URLs, job inputs by path): the request is
    well-formed, and another server (or this one, configured so) would serve it."""

    status_code = 403
    code = "disabled"


class TaskUnavailableError(ServiceError):
    """The loaded model has no head for this task."""

    status_code = 501
    code = "task_unavailable"


class NotFoundError(ServiceError):
    status_code = 404
    code = "not_found"


class ConflictError(ServiceError):
    status_code = 409
    code = "conflict"


class TooManyJobsError(ServiceError):
    """Active (queued + running) jobs are at their limit: retry when one has finished."""

    status_code = 429
    code = "too_many_jobs"


class NotReadyError(ServiceError):
    """The model is not loaded yet (or failed to load)."""

    status_code = 503
    code = "not_ready"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)})


class ShuttingDownError(ServiceError):
    """The process is draining (SIGTERM): it finishes what it has and takes nothing new.
    Another replica (or this one, restarted) serves a retry; `Connection: close` sends the
    client's next request through the load balancer instead of back down this connection."""

    status_code = 503
    code = "shutting_down"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S),
                                           "Connection": "close"})


class EngineUnavailableError(ServiceError):
    """The engine replica a request was on went away (Ray Serve: it died, or is being
    replaced). Nothing was answered for it, and inference is idempotent, so the client may
    retry at once: another replica takes the request."""

    status_code = 503
    code = "unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)})


class JobsUnavailableError(ServiceError):
    """The job store cannot be read or written now (disk full, read-only, database away): the
    jobs API answers 503 meanwhile, online inference goes on, stored jobs and results are kept
    and the runner resumes once the store takes writes again."""

    status_code = 503
    code = "jobs_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(JOBS_UNAVAILABLE_RETRY_AFTER_S)})


def error_body(code: str, message: str, request_id: str | None = None
               ) -> dict[str, dict[str, str]]:
    detail = {"code": code, "message": message}
    if request_id is not None:
        detail["request_id"] = request_id
    return {"error": detail}


def error_response(status_code: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None, *,
                   scope: Mapping[str, Any] | None = None) -> JSONResponse:
    """The error body as a response. `scope`: the request's; its id goes into the body and the
    `X-Request-ID` header (set here too, since the catch-all 500 is sent past the middleware),
    its `code` into the access log."""
    headers = dict(headers or {})
    context = scope_request(scope) if scope is not None else None
    if context is not None:
        context.error_code = code
        if context.sets_header:
            headers[REQUEST_ID_HEADER] = context.request_id
    return JSONResponse(error_body(code, message, context.request_id if context else None),
                        status_code=status_code, headers=headers)


def format_validation_errors(errors: Sequence[Any]) -> str:
    """pydantic's error list -> one readable line: `classes: classes must not be empty; ...`.

    `body` is dropped from locations (the client knows it sent a body), list indices print as
    `[i]`, and pydantic's "Value error, " prefix of our own messages goes away.
    """
    parts = []
    for error in errors:
        where = ""
        for item in error.get("loc", ()):
            if item == "body":
                continue
            if isinstance(item, int):
                where += f"[{item}]"
            else:
                where += f".{item}" if where else str(item)
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where and not message.startswith(where)
                     else message)
    return "; ".join(parts) or "invalid request"


def _request_id(request: Request) -> str | None:
    """The id the client got in the body of the 500: what ties its report to the log."""
    context = scope_request(request.scope)
    return context.request_id if context is not None else None


def _retry_after(seconds: float) -> str:
    """Retry-After takes whole seconds; never 0, which would invite an instant retry storm."""
    return str(max(1, math.ceil(seconds)))


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status_code, exc.code, exc.message, exc.headers,
                          scope=request.scope)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    invalid_json = [e for e in errors if e.get("type") == "json_invalid"]
    if invalid_json:  # a body FastAPI parsed itself: the same 400 as the task routes give
        detail = invalid_json[0].get("ctx", {}).get("error") or invalid_json[0].get("msg")
        return error_response(400, InvalidJsonError.code, f"body is not valid JSON: {detail}",
                              scope=request.scope)
    return error_response(422, "invalid_request", format_validation_errors(errors),
                          scope=request.scope)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Starlette names only the first route of the path
        headers["Allow"] = _allowed_methods(request)
    return error_response(exc.status_code, code, message, headers, scope=request.scope)


def _allowed_methods(request: Request) -> str:
    """Every method of every route on the request's path, for a 405's `Allow`."""
    path = request.url.path
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.path_regex.fullmatch(path):
            methods.update(route.methods or ())
    return ", ".join(sorted(methods))


async def _queue_full(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QueueFullError)
    code = "overloaded" if isinstance(exc, OverloadedError) else "queue_full"
    return error_response(429, code, f"server busy: {exc}; retry later",
                          {"Retry-After": _retry_after(exc.retry_after_s)}, scope=request.scope)


async def _stopped(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, "unavailable", f"not accepting requests: {exc}",
                          {"Retry-After": _retry_after(UNAVAILABLE_RETRY_AFTER_S)},
                          scope=request.scope)


async def _deadline(request: Request, exc: Exception) -> JSONResponse:
    return error_response(504, "deadline_exceeded", f"request timed out: {exc}",
                          scope=request.scope)


async def _engine_stalled(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineStalledError)
    return error_response(503, "engine_stalled", f"not accepting requests now: {exc}",
                          {"Retry-After": _retry_after(exc.retry_after_s)}, scope=request.scope)


async def _batch_failed(request: Request, exc: Exception) -> JSONResponse:
    # The cause is an engine bug or resource failure: logged in full, not shown to clients.
    log.error("inference failed for %s (request %s)", request.url.path, _request_id(request),
              exc_info=exc)
    message = "inference failed; see the server log"
    if isinstance(exc.__cause__, NonFiniteOutputError):
        message = ("inference failed: the model produced non-finite outputs (NaN or infinity) "
                   "for this request's batch; see the server log")
    return error_response(500, "inference_failed", message, scope=request.scope)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error for %s (request %s)", request.url.path, _request_id(request),
              exc_info=exc)
    return error_response(500, "internal_error", "internal server error", scope=request.scope)


def install_error_handlers(app: FastAPI) -> None:
    """Register every mapping above on `app` (the only place error bodies are built)."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(QueueFullError, _queue_full)
    app.add_exception_handler(BatcherStoppedError, _stopped)
    app.add_exception_handler(EngineStalledError, _engine_stalled)
    app.add_exception_handler(DeadlineExceededError, _deadline)
    app.add_exception_handler(BatchExecutionError, _batch_failed)
    app.add_exception_handler(Exception, _unexpected)
