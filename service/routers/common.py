"""Reading a task request from either content type, and documenting both in OpenAPI.

Every task endpoint takes `application/json` (the image as base64 in `image`) or
`multipart/form-data` (an `image` file part; the other fields as form fields, a list field as one
field per item, e.g. `classes=circle&classes=star`). Both end in the same `...Params` model, so
validation and its messages are identical; the image stays encoded until the route decodes it
off the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.errors import InvalidJsonError, UnsupportedMediaTypeError

ParamsT = TypeVar("ParamsT", bound=BaseModel)
ModelT = TypeVar("ModelT", bound=BaseModel)

MAX_FORM_FIELDS = 10_000  # room for a long class list, one field per name
MAX_FORM_TEXT_BYTES = 64 * 1024  # one text field (a class name, a prompt)


@dataclass
class TaskInput(Generic[ParamsT]):
    """A task request with its fields validated and its image still encoded.

    image: base64 text (JSON) or the uploaded file's bytes (multipart).
    """

    params: ParamsT
    image: str | bytes


async def read_task_input(request: Request, json_model: type[ParamsT],
                          params_model: type[ParamsT]) -> TaskInput[ParamsT]:
    """Parse the body as JSON (`json_model`, which has `image: str`) or multipart.

    Raises `RequestValidationError` (422) for invalid fields, `InvalidJsonError` (400) for a body
    that is not JSON, `UnsupportedMediaTypeError` (415) for other content types.
    """
    content_type = request.headers.get("content-type", "application/json")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return await _read_json(request, json_model)
    if media_type == "multipart/form-data":
        return await _read_multipart(request, params_model)
    raise UnsupportedMediaTypeError(
        f"unsupported content type {media_type!r}: send application/json (image as base64) or "
        "multipart/form-data (image as a file)")


async def read_json(request: Request, model: type[ModelT]) -> ModelT:
    """The body as `model`, validated strictly: JSON types as the schema states them (no
    `"0.5"` or `false` for a number), which a schema-driven client or fuzzer relies on.

    Raises `InvalidJsonError` (400) for a body that is not JSON, `RequestValidationError` (422)
    for invalid fields.
    """
    body = await request.body()
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(error["type"] == "json_invalid" for error in errors):
            raise InvalidJsonError(f"body is not valid JSON: {errors[0]['msg']}") from None
        raise RequestValidationError(_in_body(_without_union_tag(errors, model))) from None


async def _read_json(request: Request, model: type[ParamsT]) -> TaskInput[ParamsT]:
    parsed = await read_json(request, model)
    # Every *Request is its *Params plus `image: str`, so it serves as the params itself.
    image: str = parsed.image  # type: ignore[attr-defined]  # typed as the base model
    return TaskInput(params=parsed, image=image)


async def _read_multipart(request: Request, model: type[ParamsT]) -> TaskInput[ParamsT]:
    form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS,
                              max_part_size=MAX_FORM_TEXT_BYTES)
    try:
        errors: list[Any] = []
        upload = form.get("image")
        image: bytes | None = None
        if upload is None:
            errors.append({"type": "missing", "loc": ("body", "image"), "msg": "Field required"})
        elif not isinstance(upload, UploadFile):
            errors.append({"type": "value_error", "loc": ("body", "image"),
                           "msg": "image must be a file part (multipart), not a text field"})
        else:
            image = await upload.read()
        fields: dict[str, Any] = {}
        list_fields: tuple[str, ...] = getattr(model, "list_fields", ())
        for key in form:
            if key == "image":
                continue
            values = form.getlist(key)
            if any(isinstance(value, UploadFile) for value in values):
                errors.append({"type": "value_error", "loc": ("body", key),
                               "msg": f"{key} must be a text field, not a file"})
                continue
            fields[key] = values if key in list_fields or len(values) > 1 else values[0]
        try:
            params = model.model_validate(fields)
        except ValidationError as exc:
            errors.extend(_in_body(exc.errors(include_url=False, include_input=False)))
        if errors:
            raise RequestValidationError(errors)
        assert image is not None
        return TaskInput(params=params, image=image)
    finally:
        await form.close()


def _without_union_tag(errors: list[Any], model: type[BaseModel]) -> list[Any]:
    """Errors of a tagged union (`JobRequest` by `task`) as the client wrote the body: pydantic
    puts the chosen tag first in each location (`detect.params.classes`), which is no field."""
    tags = _union_tags(model)
    return [{**error, "loc": error["loc"][1:]}
            if error.get("loc") and error["loc"][0] in tags else error for error in errors]


@cache
def _union_tags(model: type[BaseModel]) -> frozenset[str]:
    mapping = model.model_json_schema().get("discriminator", {}).get("mapping", {})
    return frozenset(mapping)


def _in_body(errors: list[Any]) -> list[Any]:
    return [{**error, "loc": ("body", *error.get("loc", ()))} for error in errors]


def request_body(json_model: type[BaseModel], form_model: type[BaseModel] | None = None
                 ) -> dict[str, Any]:
    """`openapi_extra` documenting the request body of a route that reads it itself (one path,
    two content types; strict JSON), which FastAPI cannot infer. The schemas go inline, their
    nested models in `$defs` referring to `components/schemas`: `service.openapi` moves them
    there."""
    def schema(model: type[BaseModel]) -> dict[str, Any]:
        return model.model_json_schema(ref_template="#/components/schemas/{model}")

    content = {"application/json": {"schema": schema(json_model)}}
    if form_model is not None:
        content["multipart/form-data"] = {"schema": _without_null(schema(form_model))}
    return {"requestBody": {"required": True, "content": content}}


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A form has no null: an optional field is left out. Each `anyOf: [X, null]` property of
    the form's schema becomes X (its description and bounds kept)."""
    for name, field in schema.get("properties", {}).items():
        options = [option for option in field.get("anyOf", ()) if option != {"type": "null"}]
        if "anyOf" in field and len(options) == 1:
            rest = {key: value for key, value in field.items()
                    if key not in ("anyOf", "default")}
            schema["properties"][name] = {**options[0], **rest}
    return schema


RenderQuery = Annotated[
    Literal["png"] | None,
    Query(description="`png`: answer with the image and the answer drawn on it (image/png) "
                      "instead of JSON."),
]


def png_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Error responses plus the `?render=png` alternative of the 200 answer."""
    from service.schemas import error_responses

    return {200: {"content": {"image/png": {}}, "description": "The answer (JSON), or with "
                  "`render=png` the image with the answer drawn on it"},
            **error_responses(*statuses)}


async def rendered(image: Any, response: BaseModel, title: str | None = None) -> Response:
    """The `?render=png` answer, drawn off the event loop."""
    from service.pipeline.render import render_png

    png = await asyncio.to_thread(render_png, image, response, title)
    return Response(content=png, media_type="image/png")
