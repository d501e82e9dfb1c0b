"""Probes: `/healthz` (the process is alive) and `/readyz` (the model serves; 503 before, while
an engine's batch is stalled past every deadline in it, and
503 `shutting_down` from SIGTERM on, so load balancers stop sending while the process drains;
`/healthz` stays 200 then: the process is alive and finishing its work).

Both stay outside API-key authentication: orchestrators probe without credentials.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.dependencies import StateDep
from service.errors import NotReadyError, ShuttingDownError
from service.schemas import HealthResponse, ReadyResponse, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="health", response_model=HealthResponse, summary="Liveness",
            responses=error_responses(503))
async def healthz(state: StateDep) -> HealthResponse:
    # A model that failed to load will not recover in this process: report it so a supervisor
    # restarts (and surfaces) it instead of keeping a replica that can never serve.
    if state.load_error is not None:
        raise NotReadyError(f"the model failed to load: {state.load_error}")
    return HealthResponse(status="ok")


@router.get("/readyz", operation_id="ready", response_model=ReadyResponse, summary="Readiness",
            responses=error_responses(503))
async def readyz(state: StateDep) -> ReadyResponse:
    if state.draining:
        raise ShuttingDownError("the server is shutting down: finishing the requests in flight")
    serving = state.require_serving()
    # A batch that hangs cannot be interrupted: its engine refuses online requests until it
    # returns, so the replica is not ready meanwhile (traffic goes elsewhere), then is again.
    stalled = serving.stalled_engines()
    if stalled:
        raise NotReadyError("stalled: " + ", ".join(
            f"the {engine} engine's batch has run past every deadline in it ({seconds:.1f} s "
            "ago)" for engine, seconds in sorted(stalled.items())))
    return ReadyResponse(status="ready", model=serving.model_id)
