"""Request and response bodies of the HTTP API (the contract of DESIGN.md, as pydantic v2 models).

Each task has a `...Params` model (every field but the image), a `...Request` (JSON: the params
plus a base64 `image`) and a `...Form` (multipart: the params as form fields plus an `image` file;
it exists for the OpenAPI document, the route validates the form fields with `...Params`).

Field rules that need no model live here and fail with a message naming the field and the rule
("threshold must be between 0 and 1"); the JSON Schema states each of them, so that a request
the schema accepts is never refused for its fields (schemathesis checks both ways). The one rule
it cannot state is the text encoder's limit: an expression, a question or one class name or
phrase over 256 tokens is a 422 from the serving layer (class lists and prompts are chunked).
Boxes are `[x0, y0, x1, y1]` in pixels of the image as sent (end exclusive); masks are COCO RLE.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    field_validator,
    model_validator,
)

# Bounds on request sizes that keep one request's cost bounded before any model work.
MAX_CLASSES = 5000  # class names in one detect request (LVIS has 1203)
MAX_CLASS_CHARS = 256  # characters of one class name
MAX_PROMPT_CHARS = 4096  # characters of a free-text prompt (the 256-token limit comes first)
MAX_EXPRESSIONS = 32  # referring expressions in one segment request
MAX_TEXT_CHARS = 1024  # characters of one expression or question
MAX_DETECTIONS = 1000
DEFAULT_THRESHOLD = 0.3  # score a detection needs to be returned
DEFAULT_MAX_DETECTIONS = 100

Box = Annotated[list[float], Field(min_length=4, max_length=4,
                                   description="[x0, y0, x1, y1], pixels, end exclusive")]
Span = Annotated[list[int], Field(min_length=2, max_length=2,
                                  description="[start, end): character offsets, end exclusive")]


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 5.0; JSON bodies are validated strictly (no "5"), where
    pydantic's int would refuse it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_integral)]


class _Body(BaseModel):
    """Requests refuse unknown fields: a misspelt `threshhold` must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


def _check_threshold(value: float) -> float:
    if not (0.0 <= value <= 1.0):  # NaN fails too
        raise ValueError(f"threshold must be between 0 and 1, got {value}")
    return value


# Text rules as JSON Schema patterns, which the validators below apply as they are. Whitespace
# is spelt out (ECMA-262's, which JSON Schema's patterns use) because `\s` differs between
# regex engines (Python's also matches \x1c-\x1f): a client's validator and ours must agree.
# A text needs a character that is not whitespace; a prompt needs a phrase, a character that is
# neither whitespace nor a phrase separator.
_WHITESPACE = r"\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NOT_BLANK = f"[^{_WHITESPACE}]"
HAS_PHRASE = f"[^{_WHITESPACE}.,;]"


def _check_text(value: str, name: str, max_chars: int) -> str:
    if not re.search(NOT_BLANK, value):
        raise ValueError(f"{name} must not be empty")
    if len(value) > max_chars:
        raise ValueError(f"{name} must be at most {max_chars} characters, got {len(value)}")
    return value


_THRESHOLD = Field(DEFAULT_THRESHOLD, json_schema_extra={"minimum": 0, "maximum": 1},
                   description="Minimum score of a returned result, 0..1.")
_IMAGE_B64 = Field(min_length=1,
                   description="Base64 of the PNG, JPEG or WebP file (a data: URL prefix is "
                               "accepted), or an http(s) URL where the server allows them.")
_IMAGE_FILE = Field(description="The PNG, JPEG or WebP file.")


# --- detect -----------------------------------------------------------------------------------


def _exactly_one_of(*names: str) -> dict[str, Any]:
    """JSON Schema for "exactly one of these fields is given": not none of them, and not two.

    As one `not` (generators such as openapi-python-client read `oneOf` as a union of types
    and cannot take partial schemas there). A field sent as null counts as not given.
    """
    def given(name: str) -> dict[str, Any]:
        return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}

    pairs = [{"allOf": [given(a), given(b)]} for i, a in enumerate(names) for b in names[i + 1:]]
    return {"not": {"anyOf": [*pairs, {"not": {"anyOf": [given(name) for name in names]}}]}}


class DetectParams(_Body):
    """Exactly one of `classes`, `prompt`, `prompt_id`."""

    model_config = ConfigDict(json_schema_extra=_exactly_one_of("classes", "prompt", "prompt_id"))

    list_fields: ClassVar[tuple[str, ...]] = ("classes",)

    classes: list[str] | None = Field(
        None, json_schema_extra={"minItems": 1, "maxItems": MAX_CLASSES, "items": {
            "type": "string", "maxLength": MAX_CLASS_CHARS, "pattern": NOT_BLANK}},
        description="Class names to detect; each detection's label is one of them. A name "
                    "with nothing left to match once cleaned (parenthesised text and "
                    "underscores are removed, as GLIP does) is never detected.")
    prompt: str | None = Field(
        None, json_schema_extra={"maxLength": MAX_PROMPT_CHARS, "pattern": HAS_PHRASE},
        description="Free-text phrase grounding: phrases separated by '.', ',', ';' or new "
                    "lines; detections carry the phrase's span. A prompt over 256 tokens is "
                    "chunked by phrases, as class lists are.")
    prompt_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.\-]{1,128}$",
        description="A tuned prompt registered on the server (see /v1/models).")
    threshold: float = _THRESHOLD
    max_detections: JsonInt = Field(
        DEFAULT_MAX_DETECTIONS, json_schema_extra={"minimum": 1, "maximum": MAX_DETECTIONS},
        description="Most detections returned, best first.")
    chunk_size: JsonInt | None = Field(
        None, json_schema_extra={"minimum": 1},
        description="Most classes per prompt chunk (chunks are also bounded by 256 tokens); "
                    "omitted: the model's `max_prompt_phrases` (GET /v1/models), the prompt "
                    "length it grounds best at.")

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("classes must not be empty")
        if len(value) > MAX_CLASSES:
            raise ValueError(f"classes must have at most {MAX_CLASSES} names, got {len(value)}")
        for index, name in enumerate(value):
            if not re.search(NOT_BLANK, name):
                raise ValueError(f"classes[{index}] is empty")
            if len(name) > MAX_CLASS_CHARS:
                raise ValueError(f"classes[{index}] is longer than {MAX_CLASS_CHARS} characters")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        if value is None:
            return value
        _check_text(value, "prompt", MAX_PROMPT_CHARS)
        if not re.search(HAS_PHRASE, value):
            raise ValueError("prompt has no phrases (only separators)")
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: float) -> float:
        return _check_threshold(value)

    @field_validator("max_detections")
    @classmethod
    def _max_detections(cls, value: int) -> int:
        if not 1 <= value <= MAX_DETECTIONS:
            raise ValueError(f"max_detections must be between 1 and {MAX_DETECTIONS}, got {value}")
        return value

    @field_validator("chunk_size")
    @classmethod
    def _chunk_size(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"chunk_size must be at least 1, got {value}")
        return value

    @model_validator(mode="after")
    def _one_query(self) -> DetectParams:
        given = [name for name in ("classes", "prompt", "prompt_id")
                 if getattr(self, name) is not None]
        if not given:
            raise ValueError("give one of classes, prompt or prompt_id")
        if len(given) > 1:
            raise ValueError(f"give only one of classes, prompt or prompt_id (got "
                             f"{' and '.join(given)})")
        return self


class DetectRequest(DetectParams):
    """JSON body: exactly one of `classes`, `prompt`, `prompt_id`, and the image as base64."""

    image: str = _IMAGE_B64


class DetectForm(DetectParams):
    """Multipart body: exactly one of `classes` (one field per name), `prompt`, `prompt_id`."""

    image: bytes = _IMAGE_FILE


class ImageInfo(BaseModel):
    width: int = Field(description="Width of the image as sent, pixels.")
    height: int = Field(description="Height of the image as sent, pixels.")


class Detection(BaseModel):
    label: str = Field(description="The class name, or the phrase of the prompt.")
    score: float = Field(description="Confidence 0..1.")
    box: Box
    span: Span | None = Field(None, description="Phrase grounding: the phrase's [start, end) "
                                                "in `prompt`; absent for classes.")


class DetectResponse(BaseModel):
    model: str
    image: ImageInfo
    detections: list[Detection] = Field(description="Best first.")


# --- segment ----------------------------------------------------------------------------------


class SegmentParams(_Body):
    list_fields: ClassVar[tuple[str, ...]] = ("expressions",)

    expressions: list[str] = Field(
        json_schema_extra={"minItems": 1, "maxItems": MAX_EXPRESSIONS, "items": {
            "type": "string", "maxLength": MAX_TEXT_CHARS, "pattern": NOT_BLANK}},
        description="Referring expressions; each gets its own list of segments, scored on the "
                    "words naming its referent: up to the end of its first spatial relation "
                    "(\"circle left of\" of \"circle left of the red square\"), a score capped "
                    "by the best of its anchor's words (\"red square\"): where the anchor is "
                    "not found, the expression names nothing. A model whose `relations` is "
                    "\"geometry\" (GET /v1/models) resolves left of, right of, above and below "
                    "on boxes instead: the referent's noun (\"circle\") scored, kept where it "
                    "lies wholly on that side of the anchor's best box, which must reach "
                    "`threshold`.")
    threshold: float | None = Field(
        None, json_schema_extra={"minimum": 0, "maximum": 1},
        description="Minimum score of a returned segment, and of a geometric relation's "
                    "anchor, 0..1; omitted: the model's calibrated `segment_threshold` (GET "
                    "/v1/models).")
    relation_threshold: float | None = Field(
        None, json_schema_extra={"minimum": 0, "maximum": 1},
        description="Minimum score of a referent resolved by geometry (its noun's score), "
                    "0..1; omitted: the model's calibrated `relation_threshold` (GET "
                    "/v1/models).")

    @field_validator("expressions")
    @classmethod
    def _expressions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("expressions must not be empty")
        if len(value) > MAX_EXPRESSIONS:
            raise ValueError(f"expressions must have at most {MAX_EXPRESSIONS} entries, "
                             f"got {len(value)}")
        for index, text in enumerate(value):
            _check_text(text, f"expressions[{index}]", MAX_TEXT_CHARS)
        return value

    @field_validator("threshold", "relation_threshold")
    @classmethod
    def _threshold(cls, value: float | None) -> float | None:
        return None if value is None else _check_threshold(value)


class SegmentRequest(SegmentParams):
    """JSON body: the expressions and the image as base64."""

    image: str = _IMAGE_B64


class SegmentForm(SegmentParams):
    """Multipart body: `expressions` as one field per expression, and the image file."""

    image: bytes = _IMAGE_FILE


class RleMask(BaseModel):
    size: list[int] = Field(min_length=2, max_length=2, description="[height, width]")
    counts: str = Field(description="COCO compressed RLE counts")


class Segment(BaseModel):
    score: float
    box: Box
    mask: RleMask


class SegmentResult(BaseModel):
    expression: str
    segments: list[Segment] = Field(description="Best first; empty when nothing is referred to.")


class SegmentResponse(BaseModel):
    model: str
    image: ImageInfo
    results: list[SegmentResult] = Field(description="One per expression, in request order.")


# --- vqa --------------------------------------------------------------------------------------


class VqaParams(_Body):
    list_fields: ClassVar[tuple[str, ...]] = ()

    question: str = Field(json_schema_extra={"maxLength": MAX_TEXT_CHARS, "pattern": NOT_BLANK})

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        return _check_text(value, "question", MAX_TEXT_CHARS)


class VqaRequest(VqaParams):
    """JSON body: the question and the image as base64."""

    image: str = _IMAGE_B64


class VqaForm(VqaParams):
    """Multipart body: the question field and the image file."""

    image: bytes = _IMAGE_FILE


class AnswerScore(BaseModel):
    answer: str
    score: float


class GroundedPhrase(BaseModel):
    phrase: str
    span: Span
    box: Box
    score: float


class ScoredBox(BaseModel):
    box: Box
    score: float


class VqaResponse(BaseModel):
    model: str
    image: ImageInfo
    answer: str
    score: float
    answers: list[AnswerScore] = Field(description="Top answers, best first.")
    grounding: list[GroundedPhrase] = Field(
        description="Phrases of the question grounded to boxes (spans into `question`).")
    answer_grounding: list[ScoredBox] = Field(
        default_factory=list,
        description="Boxes of what the answer names (e.g. the shape an answer \"square\" "
                    "points at), best first; empty for numbers and yes/no.")


# --- caption ----------------------------------------------------------------------------------


class CaptionParams(_Body):
    list_fields: ClassVar[tuple[str, ...]] = ()


class CaptionRequest(CaptionParams):
    """JSON body: the image as base64."""

    image: str = _IMAGE_B64


class CaptionForm(CaptionParams):
    """Multipart body: the image file."""

    image: bytes = _IMAGE_FILE


class CaptionResponse(BaseModel):
    model: str
    image: ImageInfo
    caption: str
    phrases: list[GroundedPhrase] = Field(description="Phrases of the caption with their boxes.")


# --- jobs -------------------------------------------------------------------------------------

TaskName = Literal["detect", "segment", "vqa", "caption"]
TASK_PARAMS: dict[str, type[_Body]] = {
    "detect": DetectParams, "segment": SegmentParams, "vqa": VqaParams, "caption": CaptionParams}


class JobInputItem(_Body):
    """One input: exactly one of `image` (as in the online endpoints) or `path`."""

    model_config = ConfigDict(json_schema_extra=_exactly_one_of("image", "path"))

    image: str | None = Field(None, min_length=1, description="Base64 of the image file (or "
                              "an http(s) URL where the server allows them).")
    path: str | None = Field(None, min_length=1, description="A file under the server's job "
                             "input folder (relative path; off unless configured).")

    @model_validator(mode="after")
    def _one_source(self) -> JobInputItem:
        if (self.image is None) == (self.path is None):
            raise ValueError("give exactly one of image or path")
        return self


class _Job(_Body):
    inputs: list[JobInputItem] = Field(min_length=1, description="Images, in result order.")


class DetectJob(_Job):
    task: Literal["detect"] = Field(description="The online endpoint each input goes through.")
    params: DetectParams = Field(description="Its fields except the image.")


class SegmentJob(_Job):
    task: Literal["segment"] = Field(description="The online endpoint each input goes through.")
    params: SegmentParams = Field(description="Its fields except the image.")


class VqaJob(_Job):
    task: Literal["vqa"] = Field(description="The online endpoint each input goes through.")
    params: VqaParams = Field(description="Its fields except the image.")


class CaptionJob(_Job):
    task: Literal["caption"] = Field(description="The online endpoint each input goes through.")
    params: CaptionParams = Field(default_factory=CaptionParams,
                                  description="Its fields except the image (none).")


class JobRequest(RootModel[Annotated[DetectJob | SegmentJob | VqaJob | CaptionJob,
                                     Field(discriminator="task")]]):
    """A job: `task` names the online endpoint, `params` its fields except the image."""


class JobProgress(BaseModel):
    total: int
    done: int = Field(description="Inputs with a result (succeeded + failed).")
    succeeded: int
    failed: int = Field(description="Inputs that got an error result (bad image, ...).")
    rate_per_s: float | None = Field(None, description="Inputs per second since the job "
                                                      "(re)started; absent before any.")
    eta_s: float | None = Field(None, description="Seconds left at that rate.")


class JobStatus(BaseModel):
    id: str
    task: TaskName
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    created_s: float = Field(description="Unix time the job was accepted.")
    finished_s: float | None = Field(None, description="Unix time the job finished.")
    error: str | None = Field(None, description="Why the whole job failed.")
    progress: JobProgress


class JobList(BaseModel):
    jobs: list[JobStatus] = Field(description="Newest first.")


# --- models, health, errors -------------------------------------------------------------------


class ModelInfo(BaseModel):
    id: str
    preset: str
    runtime: str
    tasks: list[TaskName]
    max_prompt_tokens: int = Field(description="Token limit of one prompt, special tokens "
                                               "included.")
    max_prompt_phrases: int | None = Field(description="Classes per prompt chunk when a detect "
                                                       "request names no chunk_size (null: "
                                                       "bounded by tokens alone).")
    image_min_size: int = Field(description="Shorter side the model resizes images to.")
    image_max_size: int = Field(description="Cap of the longer side after resizing.")
    vqa_answers: list[str] = Field(description="The closed VQA answer vocabulary.")
    segment_threshold: float = Field(description="Score a segment needs when a segment request "
                                                 "names no threshold (calibrated per model).")
    relations: str = Field(description="How segment resolves left of, right of, above and "
                                       "below: \"words\" (scored by the model) or "
                                       "\"geometry\" (on boxes).")
    relation_threshold: float = Field(description="Score a referent resolved by geometry needs "
                                                  "when a request names none (calibrated).")
    prompt_ids: list[str] = Field(description="Registered tuned prompts for `prompt_id`.")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    model: str


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_request.")
    message: str = Field(description="What was wrong, for people.")
    request_id: str = Field(description="The request's id, as in the X-Request-ID response "
                                        "header (the client's, when it sent a valid one); the "
                                        "service's access log has it.")


class ErrorBody(BaseModel):
    error: ErrorDetail


def rounded(value: float, digits: int) -> float:
    """Round for JSON; non-finite values (never expected) become 0 rather than invalid JSON."""
    return round(value, digits) if math.isfinite(value) else 0.0


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting the error body for each status."""
    descriptions = {
        400: "Bad image (not base64, corrupt) or body not valid JSON",
        401: "Missing or invalid API key",
        403: "A capability this server has turned off (image URLs, job inputs by path)",
        413: "Body or image over the size limits",
        415: "Image type (or body content type) not supported",
        404: "No such job (or its results expired), or no such prompt_id",
        409: "The job already finished",
        422: "Invalid fields",
        429: ("Queue full (queue_full), expected wait past the deadline (overloaded: load "
              "shedding), or too many active jobs; see Retry-After"),
        500: ("Inference failed (inference_failed: an engine error or non-finite outputs; "
              "the other requests and later batches are not affected)"),
        501: "The loaded model has no head for this task",
        503: ("Model not loaded yet, shutting down, or (Ray Serve) the engine replica went "
              "away mid-request: retry; see Retry-After"),
        504: "Deadline passed",
    }
    return {s: {"model": ErrorBody, "description": descriptions[s]} for s in statuses}
