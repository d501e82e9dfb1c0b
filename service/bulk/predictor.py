"""The Ray Data actor of bulk inference: the service's serving layer, answering inputs as
`/v1/jobs` answers them.

Each actor opens the runtime and builds the serving layer exactly as the app does
(`service.state.build_serving`, the same settings), decodes images with the service's decoding
and limits, and answers every input through `service.jobs.runner.answer_input`: the JSON the
online endpoint returns, or the error object of a bad input. A batch's inputs all go in at once,
so the engines' dynamic batchers batch them as they batch concurrent online requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import pyarrow as pa
from PIL import Image

from engines.runtimes import open_runtime
from service.bulk.inputs import read_image_file
from service.bulk.output import RESULT_SCHEMA
from service.jobs.runner import answer_input, validate_params
from service.pipeline.images import configure_pillow, decode_image_source
from service.schemas import TaskName
from service.settings import ServiceSettings
from service.state import build_serving, tuned_prompts

T = TypeVar("T")


class BulkPredictor:
    """Ray Data's callable class for `map_batches`: work rows in, result rows out
    (`RESULT_SCHEMA`), one per input. `device`: PyTorch's device for the pytorch runtime ("cuda"
    on an actor given a GPU). The parameters are checked against the model here (token limits,
    `prompt_id`s): a bad one fails the actor's start, so the run, before any input."""

    def __init__(self, settings: ServiceSettings, task: TaskName, params: dict[str, Any],
                 device: str = "cpu") -> None:
        configure_pillow(settings.max_image_pixels)
        runtime = open_runtime(dataclasses.replace(settings.runtime_options(), device=device))
        self._settings = settings
        self._task = task
        # The batchers live on a loop of their own (Ray Data calls from its threads).
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="bulk-loop").start()
        self._serving = build_serving(settings, runtime, None,
                                      tuned_prompts(settings, runtime.config))
        self._call(self._serving.start())
        self._prepared = validate_params(task, params, self._serving)
        self._decodes = asyncio.Semaphore(settings.max_concurrent_decodes)

    def __del__(self) -> None:
        """Ray Data drops the UDF when the pool shuts down gracefully: stop the batchers, so
        their tasks end instead of being destroyed pending with the loop."""
        if hasattr(self, "_serving"):
            stopping = asyncio.run_coroutine_threadsafe(self._serving.stop(drain=False),
                                                        self._loop)
            with contextlib.suppress(Exception):  # a loop gone with the interpreter: no wait
                stopping.result(timeout=5.0)
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        answers = self._call(self._answer_all(rows))
        return pa.Table.from_pylist(
            [{"id": row["id"], "path": row["path"], "result": result, "error": error}
             for row, (result, error) in zip(rows, answers, strict=True)], schema=RESULT_SCHEMA)

    async def _answer_all(self, rows: list[dict[str, Any]]
                          ) -> list[tuple[str | None, str | None]]:
        return await asyncio.gather(*(self._answer(row) for row in rows))

    async def _answer(self, row: dict[str, Any]) -> tuple[str | None, str | None]:
        """(the answer's JSON, None) or (None, the error object's JSON)."""
        if row["error"] is not None:
            return None, row["error"]
        ok, body = await answer_input(self._serving, self._task, self._prepared,
                                      lambda: self._image(row), f"input {row['id']!r}")
        return (body, None) if ok else (None, body)

    async def _image(self, row: dict[str, Any]) -> Image.Image:
        """The row's image, read and decoded off the loop, a bounded number at once, with the
        service's limits (`max_body_bytes` bounds a file as it bounds an upload)."""
        settings = self._settings
        async with self._decodes:
            source: bytes | str = row["image"] if row["image"] is not None else (
                await asyncio.to_thread(read_image_file, row["path"], settings.max_body_bytes))
            return await asyncio.to_thread(decode_image_source, source,
                                           settings.max_image_pixels, settings.max_body_bytes)
