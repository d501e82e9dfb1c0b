"""Every error leaves the service as `{"error": {"code", "message"}}` with the right status.

The service's own failures are `ServiceError`s (status, code, message, headers). The batcher's
errors, FastAPI's validation errors and Starlette's HTTP errors are mapped onto the same body here,
so no handler anywhere else builds an error response.
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

from service.batching import (
    BatcherStoppedError,
    BatchExecutionError,
    DeadlineExceededError,
    OverloadedError,
    QueueFullError,
)

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying while the service starts or drains.
UNAVAILABLE_RETRY_AFTER_S = 1

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


class EngineUnavailableError(ServiceError):
    """The engine replica a request was on went away (Ray Serve: it died, or is being
    replaced). Nothing was answered for it, and inference is idempotent, so the client may
    retry at once: another replica takes the request."""

    status_code = 503
    code = "unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)})


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(status_code: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status_code,
                        headers=dict(headers or {}))


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


def _retry_after(seconds: float) -> str:
    """Retry-After takes whole seconds; never 0, which would invite an instant retry storm."""
    return str(max(1, math.ceil(seconds)))


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status_code, exc.code, exc.message, exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    invalid_json = [e for e in errors if e.get("type") == "json_invalid"]
    if invalid_json:  # a body FastAPI parsed itself: the same 400 as the task routes give
        detail = invalid_json[0].get("ctx", {}).get("error") or invalid_json[0].get("msg")
        return error_response(400, InvalidJsonError.code, f"body is not valid JSON: {detail}")
    return error_response(422, "invalid_request", format_validation_errors(errors))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(exc.status_code, code, message, exc.headers)


async def _queue_full(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QueueFullError)
    code = "overloaded" if isinstance(exc, OverloadedError) else "queue_full"
    return error_response(429, code, f"server busy: {exc}; retry later",
                          {"Retry-After": _retry_after(exc.retry_after_s)})


async def _stopped(_: Request, exc: Exception) -> JSONResponse:
    return error_response(503, "unavailable", f"not accepting requests: {exc}",
                          {"Retry-After": _retry_after(UNAVAILABLE_RETRY_AFTER_S)})


async def _deadline(_: Request, exc: Exception) -> JSONResponse:
    return error_response(504, "deadline_exceeded", f"request timed out: {exc}")


async def _batch_failed(request: Request, exc: Exception) -> JSONResponse:
    # The cause is an engine bug or resource failure: logged in full, not shown to clients.
    log.error("inference failed for %s", request.url.path, exc_info=exc)
    return error_response(500, "inference_failed", "inference failed; see the server log")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error for %s", request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Register every mapping above on `app` (the only place error bodies are built)."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(QueueFullError, _queue_full)
    app.add_exception_handler(BatcherStoppedError, _stopped)
    app.add_exception_handler(DeadlineExceededError, _deadline)
    app.add_exception_handler(BatchExecutionError, _batch_failed)
    app.add_exception_handler(Exception, _unexpected)
