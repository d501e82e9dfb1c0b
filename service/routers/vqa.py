"""`POST /v1/vqa`: grounded visual question answering."""

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
from service.schemas import VqaForm, VqaParams, VqaRequest, VqaResponse

router = APIRouter(tags=["tasks"])


@router.post(
    "/v1/vqa", operation_id="vqa", response_model=VqaResponse,
    summary="Answer a question about the image",
    responses=png_responses(400, 401, 403, 413, 415, 422, 429, 500, 501, 503, 504),
    openapi_extra=request_body(VqaRequest, VqaForm),
)
async def vqa(request: Request, state: StateDep, serving: ServingDep,
             render: RenderQuery = None) -> VqaResponse | Response:
    task = await read_task_input(request, VqaRequest, VqaParams)
    serving.prepare_vqa(task.params)
    image = await state.decode_image(task.image)
    result = await serving.vqa(task.params, image)
    return await rendered(image, result, task.params.question) if render else result
