"""`GET /metrics`: Prometheus text exposition of this app's registry."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.dependencies import StateDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", operation_id="metrics",
            summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}},
                             "description": "Prometheus text format"}})
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
