"""`POST /v1/detect`: language-guided detection (class names) and phrase grounding (a prompt)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.dependencies import ServingDep, StateDep
from service.routers.common import (
    RenderQuery,
    png_responses,
    read_task_input,
    rendered,
    request_body,
)
from service.schemas import DetectForm, DetectParams, DetectRequest, DetectResponse

router = APIRouter(tags=["tasks"])


@router.post(
    "/v1/detect", operation_id="detect",
    response_model=DetectResponse, response_model_exclude_none=True,
    summary="Detect classes, or ground the phrases of a prompt",
    responses=png_responses(400, 401, 403, 404, 413, 415, 422, 429, 500, 503, 504),
    openapi_extra=request_body(DetectRequest, DetectForm),
)
async def detect(request: Request, state: StateDep, serving: ServingDep,
                render: RenderQuery = None) -> DetectResponse | Response:
    task = await read_task_input(request, DetectRequest, DetectParams)
    query = serving.prepare_detect(task.params)  # token limits before decoding the image
    image = await state.decode_image(task.image)
    result = await serving.detect(query, image)
    return await rendered(image, result, None) if render else result
