"""FastAPI dependencies: the app's state, the serving layer, and the optional API-key check.

Routers get what they need only through these, so tests swap the model by passing a predictor to
`create_app` (or override a dependency) instead of patching modules.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import UnauthorizedError
from service.jobs.runner import JobRunner
from service.serving import Glipv2Serving
from service.state import ServiceState

# auto_error=False: the check below decides (keys may be off); these declare the schemes in
# the OpenAPI document so clients see both ways to send a key.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key")


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


def get_serving(state: Annotated[ServiceState, Depends(get_state)]) -> Glipv2Serving:
    return state.require_serving()


async def admit_request(state: Annotated[ServiceState, Depends(get_state)]
                        ) -> AsyncIterator[None]:
    """Every /v1 route's gate: 503 `shutting_down` while draining, otherwise counted in flight
    until its response is sent, so a drain (SIGTERM) waits for it. Async: it runs on the event
    loop, which owns the count (a sync dependency would run in a worker thread)."""
    with state.admit():
        yield


def require_api_key(
    state: Annotated[ServiceState, Depends(get_state)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_api_key_header)],
) -> None:
    """401 unless a configured key came as `Authorization: Bearer` or `X-API-Key`.

    No keys configured means authentication is off. Keys are compared in constant time, and
    every configured key is compared, so timing does not reveal which one nearly matched.
    """
    keys = state.settings.api_key_values()
    if not keys:
        return
    offered = [key for key in (bearer.credentials if bearer else None, header_key) if key]
    if not offered:
        raise UnauthorizedError(
            "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    matched = False
    for candidate in offered:
        for key in keys:
            matched |= hmac.compare_digest(candidate.encode(), key.encode())
    if not matched:
        raise UnauthorizedError("invalid API key")


StateDep = Annotated[ServiceState, Depends(get_state)]
ServingDep = Annotated[Glipv2Serving, Depends(get_serving)]


def get_jobs(state: Annotated[ServiceState, Depends(get_state)]) -> JobRunner:
    return state.require_jobs()


JobsDep = Annotated[JobRunner, Depends(get_jobs)]
