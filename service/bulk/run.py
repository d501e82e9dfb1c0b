"""One bulk inference run: inputs -> Ray Data actor pool -> part files, with progress and a
summary; resumed by running it again.

The driver lists the inputs, skips those whose id already has a row in the output, streams the
rest through `BulkPredictor` actors (`map_batches`, an autoscaling `ActorPoolStrategy`, CPUs and
GPUs per actor) and writes the rows it gets back (`ResultWriter`), on the Ray this process
joined, else on one it starts (or the cluster at `address`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from service.bulk.inputs import BulkInput, BulkInputError, open_input
from service.bulk.output import ResultWriter
from service.bulk.predictor import BulkPredictor
from service.jobs.runner import parse_params
from service.schemas import TaskName
from service.settings import ServiceSettings


@dataclass(frozen=True)
class BulkOptions:
    """How a run is spread and written.

    batch_size: inputs per actor call, all in flight together (the engines batch them; keep it
        at least the batcher's `max_batch_size`).
    min_actors / max_actors: the actor pool's size; Ray Data adds actors up to the maximum (None:
        as many as the cluster fits) while inputs wait.
    num_cpus / num_gpus: reserved per actor (fractions share a GPU). With a GPU the pytorch
        runtime runs on it; set `threads` in the settings to use more CPUs than reserved.
    rows_per_file / flush_s: a part file per this many rows or seconds (what a kill may lose).
    jsonl: also write `results.jsonl` when the run ends.
    progress: a progress bar on stderr (rate, ETA).
    """

    batch_size: int = 32
    min_actors: int = 1
    max_actors: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    rows_per_file: int = 1000
    flush_s: float = 30.0
    jsonl: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.min_actors < 1 or self.min_actors > (self.max_actors or self.min_actors):
            raise ValueError(f"actors must be 1 <= min <= max, got {self.min_actors}:"
                             f"{self.max_actors}")
        if self.batch_size < 1 or self.rows_per_file < 1 or self.flush_s <= 0:
            raise ValueError("batch size, rows per file and flush_s must be positive")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("CPUs and GPUs per actor may not be negative")


@dataclass(frozen=True)
class BulkSummary:
    """What a run did: `answered` inputs (of which `failed` got an error row) out of `total`,
    `skipped` answered by earlier runs; wall time, and when the first block of answers came
    (`first_answers` of them; Ray's start and the actors' model loading came before)."""

    total: int
    skipped: int
    answered: int
    failed: int
    elapsed_s: float
    first_answer_s: float | None = None
    first_answers: int = 0

    @property
    def rate_per_s(self) -> float:
        return self.answered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def steady_rate_per_s(self) -> float | None:
        """Answers per second after the first block: the pool's pace, its start-up left out."""
        if self.first_answer_s is None or self.elapsed_s <= self.first_answer_s:
            return None
        return (self.answered - self.first_answers) / (self.elapsed_s - self.first_answer_s)

    def format(self) -> str:
        steady = self.steady_rate_per_s
        first = "" if self.first_answer_s is None or steady is None else (
            f" ({steady:.2f} after the first answers, at {self.first_answer_s:.1f} s)")
        return (f"{self.answered} answered ({self.answered - self.failed} results, "
                f"{self.failed} errors), {self.skipped} done by earlier runs, {self.total} "
                f"inputs; {self.rate_per_s:.2f} images/s over {self.elapsed_s:.1f} s{first}")


def run_bulk(input_uri: str, task: TaskName, params: dict[str, Any], out: Path,
             settings: ServiceSettings, options: BulkOptions | None = None,
             address: str | None = None) -> BulkSummary:
    """Answer every input of `input_uri` without a row in `out` yet, on the Ray this process
    has initialised, else on the one at `address` (None: a local Ray, stopped at the end).
    Raises InvalidRequestError (bad parameters), BulkInputError or BulkOutputError before any
    input runs."""
    import ray
    import ray.data

    options = options or BulkOptions()
    started = time.perf_counter()
    parse_params(task, params)  # the schema's checks here; the model's in each actor
    source = open_input(input_uri)
    run = {"task": task, "params": params, "input": source.uri, "model": settings.model_id}
    writer = ResultWriter(out, run, options.rows_per_file, options.flush_s)
    skipped = len(writer.done)
    answered = failed = 0
    first_answer_s: float | None = None
    first_answers = 0
    own_ray = False
    try:
        if skipped < source.total:
            if not ray.is_initialized():
                # "local": a Ray of its own, never another one running on this machine.
                ray.init(address=address or "local", include_dashboard=False,
                         logging_level=logging.WARNING)
                own_ray = True
            if source.kind == "table" and (options.min_actors * options.num_cpus
                                           > ray.cluster_resources().get("CPU", 0) - 1):
                raise BulkInputError(
                    "a table is read by Ray tasks, which need a CPU the actors leave free: "
                    "fewer actors or fewer CPUs per actor")
            ray.data.DataContext.get_current().enable_progress_bars = False  # ours instead
            with tqdm(total=source.total, initial=skipped, unit="img", file=sys.stderr,
                      disable=not options.progress, desc=task) as bar:
                for batch in _answers(source, writer.done, task, params, settings, options):
                    kept = writer.add(batch)
                    if first_answer_s is None:
                        first_answer_s, first_answers = time.perf_counter() - started, len(kept)
                    errors = len(kept) - kept.column("error").null_count
                    answered, failed = answered + len(kept), failed + errors
                    bar.update(len(kept))
                    bar.set_postfix(errors=failed, refresh=False)
    finally:
        writer.close()
        if own_ray:
            ray.shutdown()
    if options.jsonl:
        writer.export_jsonl()
    return BulkSummary(source.total, skipped, answered, failed,
                       time.perf_counter() - started, first_answer_s, first_answers)


def _answers(source: BulkInput, done: set[str], task: TaskName, params: dict[str, Any],
             settings: ServiceSettings, options: BulkOptions) -> Iterator[pa.Table]:
    """The result blocks, as the actor pool finishes them."""
    import ray.data

    device = "cuda" if options.num_gpus > 0 else "cpu"
    dataset = source.dataset(done, options.batch_size).map_batches(
        BulkPredictor, batch_size=options.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=options.min_actors,
                                           max_size=options.max_actors),
        num_cpus=options.num_cpus, num_gpus=options.num_gpus or None,
        fn_constructor_kwargs={"settings": settings, "task": task, "params": params,
                               "device": device})
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        assert isinstance(batch, pa.Table)
        yield batch

