"""`POST /v1/segment`: referring segmentation, one list of RLE-masked segments per expression."""

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
    SegmentForm,
    SegmentParams,
    SegmentRequest,
    SegmentResponse,
)

router = APIRouter(tags=["tasks"])


@router.post(
    "/v1/segment", operation_id="segment", response_model=SegmentResponse,
    summary="Segment what each referring expression names",
    responses=png_responses(400, 401, 403, 413, 415, 422, 429, 500, 501, 503, 504),
    openapi_extra=request_body(SegmentRequest, SegmentForm),
)
async def segment(request: Request, state: StateDep, serving: ServingDep,
                 render: RenderQuery = None) -> SegmentResponse | Response:
    task = await read_task_input(request, SegmentRequest, SegmentParams)
    serving.prepare_segment(task.params)
    image = await state.decode_image(task.image)
    result = await serving.segment(task.params, image)
    return await rendered(image, result, None) if render else result
