"""Probes: `/healthz` (the process is alive) and `/readyz` (the model serves; 503 before).

Both stay outside API-key authentication: orchestrators probe without credentials.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.dependencies import StateDep
from service.errors import NotReadyError
from service.schemas import HealthResponse, ReadyResponse, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness",
            responses=error_responses(503))
async def healthz(state: StateDep) -> HealthResponse:
    # A model that failed to load will not recover in this process: report it so a supervisor
    # restarts (and surfaces) it instead of keeping a replica that can never serve.
    if state.load_error is not None:
        raise NotReadyError(f"the model failed to load: {state.load_error}")
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, summary="Readiness",
            responses=error_responses(503))
async def readyz(state: StateDep) -> ReadyResponse:
    serving = state.require_serving()
    return ReadyResponse(status="ready", model=serving.model_id)
