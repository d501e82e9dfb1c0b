"""`POST /v1/caption`: grounded captioning (each phrase of the caption with its box)."""

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
from service.schemas import (
    CaptionForm,
    CaptionParams,
    CaptionRequest,
    CaptionResponse,
)

router = APIRouter(tags=["tasks"])


@router.post(
    "/v1/caption", operation_id="caption", response_model=CaptionResponse,
    summary="Caption the image and ground the caption's phrases",
    responses=png_responses(400, 401, 403, 413, 415, 422, 429, 500, 501, 503, 504),
    openapi_extra=request_body(CaptionRequest, CaptionForm),
)
async def caption(request: Request, state: StateDep, serving: ServingDep,
                 render: RenderQuery = None) -> CaptionResponse | Response:
    task = await read_task_input(request, CaptionRequest, CaptionParams)
    serving.prepare_caption()
    image = await state.decode_image(task.image)
    result = await serving.caption(image)
    return await rendered(image, result, None) if render else result
