"""The serving layer: the four tasks over one runtime, as the routers and the job runner call it.

One hop per layer (vLLM's split): a router parses HTTP and calls `Glipv2Serving`; it hands the
request to its task (`service.tasks`: prepare -> run -> respond); the task awaits engine stages
on an `EngineRequest` (`service.engine_client`); each engine's `DynamicBatcher` hands a
`BatchPlan` to the `ModelRunner`, which computes and never sees a queue; results come back to
the task, which post-processes them and shapes the response.

Under Ray Serve (`service.distributed`) the same serving layer runs on each ingress replica
over remote engines (`Glipv2Serving.over`): the tasks, post-processing and responses are this
code; only the engine stages are calls to engine replicas.

A request flows through the engines of DESIGN.md, each batching across requests and tasks:
`vision` once per image; `language` once per distinct prompt text (the text-feature cache);
`fusion` once per (image, prompt chunk) row, rows of any prompts and tasks batched together; then
`mask`, `vqa` or the `caption` decoder. Pre- and post-processing run in worker threads, never on
the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from PIL import Image
from transformers import PreTrainedTokenizerBase

from engines.runtimes import Runtime
from model_export.checkpoints.tuned_prompts import TunedPrompt
from model_export.modeling.config import Glipv2Config
from model_export.processing.postprocess import Detections
from model_export.processing.prompt import load_tokenizer
from service.batching import PRIORITY_ONLINE, BatcherConfig
from service.caption_decoder import DecoderConfig
from service.engine_client import Engine, EngineClient, Engines
from service.errors import EngineUnavailableError
from service.model_runner import ModelRunner
from service.pipeline.caption_search import DEFAULT_SEARCH, CaptionGrammar, CaptionSearch
from service.schemas import (
    CaptionResponse,
    DetectParams,
    DetectResponse,
    ModelInfo,
    SegmentParams,
    SegmentResponse,
    TaskName,
    VqaParams,
    VqaResponse,
)
from service.tasks.caption import CaptionTask
from service.tasks.common import TaskContext
from service.tasks.detect import DetectQuery, DetectTask
from service.tasks.segment import SegmentTask
from service.tasks.vqa import VqaTask
from service.telemetry import ServiceMetrics

T = TypeVar("T")

TASKS: tuple[TaskName, ...] = ("detect", "segment", "vqa", "caption")
# Graphs each task needs beyond vision, language and fusion, and the engine that runs them.
TASK_GRAPHS: dict[TaskName, tuple[str, ...]] = {
    "detect": (), "segment": ("mask",), "vqa": ("vqa",),
    "caption": ("caption_image", "caption_prefix", "caption_step", "caption_ground")}
TASK_ENGINES: dict[TaskName, Engine] = {
    "segment": Engine.MASK, "vqa": Engine.VQA, "caption": Engine.CAPTION}


def available_tasks(graphs: frozenset[str]) -> list[TaskName]:
    """Tasks a runtime with `graphs` can serve (detection always)."""
    return [t for t in TASKS if all(g in graphs for g in TASK_GRAPHS[t])]


def task_engines(tasks: list[TaskName]) -> list[Engine]:
    """The engines `tasks` run on: vision, language and fusion, and the heads' engines."""
    heads = [engine for task, engine in TASK_ENGINES.items() if task in tasks]
    return [Engine.VISION, Engine.LANGUAGE, Engine.FUSION, *heads]


@dataclass(frozen=True)
class ServedModel:
    """What the serving layer knows of the model, wherever its engines run: the runtime's name
    and graphs, the config, and the tokenizer and caption grammar the tasks plan prompts with."""

    runtime_name: str
    config: Glipv2Config
    graphs: frozenset[str]
    tokenizer: PreTrainedTokenizerBase
    caption_grammar: CaptionGrammar | None

    @classmethod
    def describe(cls, runtime_name: str, config: Glipv2Config, graphs: frozenset[str]
                 ) -> ServedModel:
        """The model an engine replica described, with the tokenizer loaded here (as
        `ModelRunner` loads it)."""
        tokenizer = load_tokenizer(config.language.tokenizer)
        classes = config.tasks.caption_classes
        grammar = CaptionGrammar.from_tokenizer(tokenizer, classes) if classes else None
        return cls(runtime_name, config, graphs, tokenizer, grammar)


class RemoteEngines(Engines, Protocol):
    """Engines in other processes (Ray Serve engine replicas, `service.distributed`)."""

    async def connect(self) -> ServedModel:
        """Wait until an engine replica answers; the model it serves."""
        ...


class Glipv2Serving:
    """The four tasks over one set of engines, one handler per task.

    `Glipv2Serving(runtime, ...)` runs the engines' batchers in this process;
    `Glipv2Serving.over(model, engines, ...)` serves engines that run elsewhere.
    `start()`/`stop()` run on the event loop (the app's lifespan). Every request method is a
    coroutine that awaits its engines without blocking the loop; `priority` is
    `PRIORITY_BATCH` for job work (no deadline, after online requests). `caption_objects`: see
    `CaptionTask`. A request whose engine replica went away mid-request
    (`EngineUnavailableError`) is run once more from the start (another replica takes it;
    inference is idempotent) before the client gets the 503.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        model_id: str,
        batcher_config: BatcherConfig,
        metrics: ServiceMetrics | None = None,
        caption_search: CaptionSearch = DEFAULT_SEARCH,
        caption_objects: bool = True,
        caption_max_rows: int = DecoderConfig.max_rows,
        text_cache_bytes: int = 256 * 1024 * 1024,
        max_segments: int = 20,
        prompts: Mapping[str, TunedPrompt] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        runner = ModelRunner(runtime)
        model = ServedModel(runtime.name, runtime.config, runtime.graphs, runner.tokenizer,
                            runner.caption_grammar)
        engines = EngineClient(runner, task_engines(available_tasks(runtime.graphs)),
                               batcher_config=batcher_config, metrics=metrics,
                               text_cache_bytes=text_cache_bytes,
                               caption_max_rows=caption_max_rows, clock=clock)
        self._compose(model, engines, model_id, metrics, caption_search, caption_objects,
                      max_segments, prompts)

    @classmethod
    def over(cls, model: ServedModel, engines: Engines, *, model_id: str,
             metrics: ServiceMetrics | None = None,
             caption_search: CaptionSearch = DEFAULT_SEARCH, caption_objects: bool = True,
             max_segments: int = 20, prompts: Mapping[str, TunedPrompt] | None = None
             ) -> Glipv2Serving:
        """The same serving layer over engines that run elsewhere (their batchers, text cache
        and deadlines are `engines`' own)."""
        serving = cls.__new__(cls)
        serving._compose(model, engines, model_id, metrics, caption_search, caption_objects,
                         max_segments, prompts)
        return serving

    def _compose(self, model: ServedModel, engines: Engines, model_id: str,
                 metrics: ServiceMetrics | None, caption_search: CaptionSearch,
                 caption_objects: bool, max_segments: int,
                 prompts: Mapping[str, TunedPrompt] | None) -> None:
        self.model = model
        self.model_id = model_id
        self.config = model.config
        self.metrics = metrics
        self.tasks = available_tasks(model.graphs)
        self.engines = engines
        context = TaskContext(model_id, self.config, engines,
                              model.tokenizer.backend_tokenizer, self.tasks)
        self.detect_task = DetectTask(context, prompts or {})
        self.segment_task = SegmentTask(context, max_segments)
        self.vqa_task = VqaTask(context)
        grammar = model.caption_grammar
        class_texts = ([model.tokenizer.decode(list(ids)) for ids in grammar.classes]
                       if grammar is not None else [])
        self.caption_task = CaptionTask(context, self.detect_task, caption_search,
                                        caption_objects, class_texts)

    async def start(self) -> None:
        await self.engines.start()

    async def stop(self, drain: bool = True) -> None:
        """`drain=True` finishes queued and in-flight work first (SIGTERM)."""
        await self.engines.stop(drain=drain)

    def stalled_engines(self) -> dict[str, float]:
        """Engine -> seconds its batch in flight has been stalled (`/readyz` is 503 while any
        is: the batch cannot be interrupted, so traffic is better sent elsewhere)."""
        return self.engines.stalled()

    def info(self) -> ModelInfo:
        pre = self.config.preprocess
        return ModelInfo(
            id=self.model_id, preset=self.config.preset, runtime=self.model.runtime_name,
            tasks=self.tasks, max_prompt_tokens=self.config.language.max_query_len,
            max_prompt_phrases=self.config.language.max_prompt_phrases,
            image_min_size=pre.min_size, image_max_size=pre.max_size,
            vqa_answers=list(self.config.tasks.vqa_answers),
            segment_threshold=self.config.postprocess.segment_threshold,
            relations=self.config.postprocess.relations,
            relation_threshold=self.config.postprocess.relation_threshold,
            prompt_ids=sorted(self.detect_task.prompts))

    # --- checks before the image is decoded (422 for what only the model can tell) ----------

    def prepare_detect(self, params: DetectParams) -> DetectQuery:
        return self.detect_task.prepare(params)

    def prepare_segment(self, params: SegmentParams) -> None:
        self.segment_task.prepare(params)

    def prepare_vqa(self, params: VqaParams) -> None:
        self.vqa_task.prepare(params)

    def prepare_caption(self) -> None:
        self.caption_task.prepare()

    # --- requests -----------------------------------------------------------------------------

    async def detections(self, query: DetectQuery, image: Image.Image,
                         priority: int = PRIORITY_ONLINE) -> Detections:
        """All detections after NMS, unthresholded: original-image pixels (legacy +1 boxes),
        labels indexing `query.names`, scores descending."""
        found = await _once_more_if_unavailable(
            lambda: self.detect_task.detections(query, image, priority))
        if self.metrics is not None:
            self.metrics.prompt_chunks.observe(len(query.chunks))
        return found

    async def detect(self, query: DetectQuery, image: Image.Image,
                     priority: int = PRIORITY_ONLINE) -> DetectResponse:
        found = await self.detections(query, image, priority)
        return self.detect_task.respond(query, found, image)

    async def segment(self, params: SegmentParams, image: Image.Image,
                      priority: int = PRIORITY_ONLINE) -> SegmentResponse:
        return await _once_more_if_unavailable(
            lambda: self.segment_task.run(params, image, priority))

    async def vqa(self, params: VqaParams, image: Image.Image,
                  priority: int = PRIORITY_ONLINE) -> VqaResponse:
        return await _once_more_if_unavailable(lambda: self.vqa_task.run(params, image, priority))

    async def caption(self, image: Image.Image,
                      priority: int = PRIORITY_ONLINE) -> CaptionResponse:
        return await _once_more_if_unavailable(lambda: self.caption_task.run(image, priority))


async def _once_more_if_unavailable(run: Callable[[], Awaitable[T]]) -> T:
    """`run()`, and once more if an engine replica it was on went away: features it kept died
    with it, so the retry starts over (a fresh request, a fresh deadline). Never raised by
    engines in this process."""
    try:
        return await run()
    except EngineUnavailableError:
        return await run()
