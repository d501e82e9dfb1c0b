"""`GET /v1/models`: what is served (tasks, limits, answer vocabulary, tuned prompts)."""

from __future__ import annotations

from fastapi import APIRouter

from service.dependencies import ServingDep
from service.schemas import ModelsResponse, error_responses

router = APIRouter(tags=["models"])


@router.get("/v1/models", operation_id="listModels",
            response_model=ModelsResponse, summary="The served model",
            responses=error_responses(401, 503))
async def list_models(serving: ServingDep) -> ModelsResponse:
    return ModelsResponse(models=[serving.info()])
