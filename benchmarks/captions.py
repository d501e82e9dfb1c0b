"""`glipv2 bench captions`: caption throughput under concurrency, per-token cost, mixed traffic.

1. Closed-loop caption clients at each level (1, 4, 8, 12 by default) on world images: captions
   per second, p50 / p99 latency, and the mean rows per decoding step (from `/metrics`). With a
   `baseline_url` (a running server of another version or configuration, e.g. the one before
   iteration-level batching), each level is measured on both servers in turn, so a slow spell of
   a shared machine falls on both sides of the ratio.
2. Per-token cost: one decoding step (`caption_step` on the runtime, in-process) of `rows` beams
   over world images at prefix lengths 5 and 40, timed in turns: with the KV cache it should not
   grow with the prefix.
3. Mixed traffic: `clients` closed-loop clients posting detect, segment, VQA and caption requests
   in turn (`requests` in all) with the service's deadline: answers by status. The goal is 200
   or 429 (load shedding) for every request, and no 504 (work computed, then thrown away).

Without a URL it starts the server itself (`glipv2 serve`, extra serve flags passed through).
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.load import engine_batch_totals, world_pngs
from benchmarks.local_server import local_server
from engines.runtimes import RuntimeOptions, open_runtime
from model_export.data.world import SHAPES, render_index
from service.caption_runner import CaptionRunner, CaptionWork, KVCache
from service.model_runner import ModelRunner
from service.pipeline.caption_search import CaptionSearch
from service.pipeline.model_input import prepare_image
from service.settings import DEFAULT_MODEL_DIR

LEVELS = (1, 4, 8, 12)
TARGET_LEVEL = 8
MIXED_BODIES = (
    ("/v1/detect", {"classes": list(SHAPES)}),
    ("/v1/segment", {"expressions": ["red circle", "the blue shapes"]}),
    ("/v1/vqa", {"question": "how many squares are there?"}),
    ("/v1/caption", {}),
)


@dataclass
class CaptionCurve:
    """One server: per concurrency level, captions/s, latency quantiles, rows per step."""

    name: str
    concurrency: list[int] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    rows_per_step: list[float] = field(default_factory=list)


async def _closed_loop(url: str, bodies: Sequence[tuple[str, dict[str, object]]], requests: int,
                       clients: int) -> tuple[list[float], list[int], float]:
    """`clients` workers send `bodies` in turn until `requests` are answered: latencies of the
    200s, every status, wall time."""
    latencies: list[float] = []
    statuses: list[int] = []
    counter = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for index in counter:
            path, body = bodies[index % len(bodies)]
            started = time.perf_counter()
            response = await client.post(path, json=body)
            statuses.append(response.status_code)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return latencies, statuses, time.perf_counter() - started


def _caption_bodies(images: list[bytes]) -> list[tuple[str, dict[str, object]]]:
    return [("/v1/caption", {"image": base64.b64encode(png).decode()}) for png in images]


def measure_level(curve: CaptionCurve, url: str, images: list[bytes], level: int,
                  requests: int) -> None:
    """Append one level's figures to `curve` (after one warm-up caption)."""
    bodies = _caption_bodies(images)
    httpx.post(f"{url}/v1/caption", json=bodies[0][1], timeout=600).raise_for_status()
    steps_before, rows_before = engine_batch_totals(httpx.get(f"{url}/metrics").text, "caption")
    latencies, statuses, elapsed = asyncio.run(_closed_loop(url, bodies, requests, level))
    failed = [s for s in statuses if s != 200]
    if failed:
        raise RuntimeError(f"{curve.name}: {len(failed)} captions failed: {Counter(failed)}")
    steps, rows = engine_batch_totals(httpx.get(f"{url}/metrics").text, "caption")
    milliseconds = np.asarray(latencies) * 1000.0
    curve.concurrency.append(level)
    curve.throughput.append(len(latencies) / elapsed)
    curve.p50_ms.append(float(np.quantile(milliseconds, 0.5)))
    curve.p99_ms.append(float(np.quantile(milliseconds, 0.99)))
    curve.rows_per_step.append((rows - rows_before) / max(steps - steps_before, 1.0))


def mixed_traffic(url: str, images: list[bytes], clients: int, requests: int) -> Counter[int]:
    """Statuses of `requests` mixed-task requests from `clients` closed-loop clients."""
    bodies = [(path, {"image": base64.b64encode(images[i % len(images)]).decode(), **extra})
              for i in range(len(images)) for path, extra in MIXED_BODIES]
    _, statuses, _ = asyncio.run(_closed_loop(url, bodies, requests, clients))
    return Counter(statuses)


def step_cost_ms(options: RuntimeOptions, rows: int = 16, lengths: Sequence[int] = (5, 40),
                 repeats: int = 5) -> dict[int, float]:
    """Median ms of one decoding step of `rows` beams (4 per image) at each prefix length."""
    runtime = open_runtime(options)
    model = ModelRunner(runtime)
    captions = CaptionRunner(runtime, model.tokenizer, model.tokenizer_lock,
                             model.caption_grammar, model.vision_names)
    images = []
    for index in range(math.ceil(rows / 4)):
        world = render_index(5, index).image.resize((448, 336))  # one padded shape for all
        prepared = prepare_image(world, runtime.config.preprocess)
        out = runtime.run("vision", {"images": prepared.pixels[None]})
        work = CaptionWork([out[name] for name in model.vision_names],
                           CaptionSearch(max_tokens=max(lengths) + 1))
        images.append(captions.caption_images([work])[0])
    _, (cache, *_) = captions.caption_prefill(images[:1])
    layers, heads, head_dim = cache.keys.shape[1], cache.keys.shape[2], cache.keys.shape[4]
    generator = torch.Generator().manual_seed(0)
    parts = {}
    for length in lengths:
        keys = torch.randn(4, layers, heads, length - 1, head_dim, generator=generator)
        prefix = [captions.cls_id] + [1037] * (length - 1)
        parts[length] = [(image, [prefix] * 4, KVCache(keys, keys.clone())) for image in images]
    timings: dict[int, list[float]] = {length: [] for length in lengths}
    for _ in range(repeats):
        for length in lengths:  # in turns, so a slow spell falls on every length
            started = time.perf_counter()
            captions.caption_step(parts[length])
            timings[length].append((time.perf_counter() - started) * 1000.0)
    runtime.close()
    return {length: float(np.median(values)) for length, values in timings.items()}


@dataclass
class CaptionBench:
    current: CaptionCurve
    baseline: CaptionCurve | None
    mixed: Counter[int]
    mixed_clients: int
    step_ms: dict[int, float]
    step_rows: int


def bench_captions(levels: Sequence[int] = LEVELS, requests: int = 24, *,
                   distinct_images: int = 8, model_dir: str | None = None,
                   serve_args: Sequence[str] = (), url: str | None = None,
                   baseline_url: str | None = None, mixed_clients: int = 12,
                   mixed_requests: int = 48, step_runtime: RuntimeOptions | None = None,
                   step_rows: int = 16) -> CaptionBench:
    """Sweep (with the baseline side by side, when given), then mixed traffic, then the step
    cost on `step_runtime` (default: PyTorch on the default model)."""
    images = world_pngs(distinct_images)
    with ExitStack() as stack:
        if url is None:
            url = stack.enter_context(local_server(model_dir, serve_args))
        current = CaptionCurve(f"this server ({url})")
        baseline = CaptionCurve(f"baseline ({baseline_url})") if baseline_url else None
        for level in levels:
            measure_level(current, url, images, level, requests)
            if baseline is not None and baseline_url is not None:
                measure_level(baseline, baseline_url, images, level, requests)
        mixed = mixed_traffic(url, images, mixed_clients, mixed_requests)
    options = step_runtime or RuntimeOptions(model_dir=Path(model_dir or DEFAULT_MODEL_DIR))
    return CaptionBench(current, baseline, mixed, mixed_clients,
                        step_cost_ms(options, step_rows), step_rows)


def format_captions(bench: CaptionBench) -> str:
    current, baseline = bench.current, bench.baseline
    lines = [f"closed-loop captions; {current.name}"
             + (f" vs {baseline.name}" if baseline else ""),
             "clients | captions/s | p50 | p99 ms | rows/step"
             + (" | baseline captions/s | p50 | p99 ms | rows/step | throughput ratio"
                if baseline else ""),
             "--- | --- | --- | --- | ---" + (" | --- | --- | --- | --- | ---" if baseline else "")]
    for i, level in enumerate(current.concurrency):
        line = (f"{level} | {current.throughput[i]:.3f} | {current.p50_ms[i]:.0f} | "
                f"{current.p99_ms[i]:.0f} | {current.rows_per_step[i]:.1f}")
        if baseline:
            line += (f" | {baseline.throughput[i]:.3f} | {baseline.p50_ms[i]:.0f} | "
                     f"{baseline.p99_ms[i]:.0f} | {baseline.rows_per_step[i]:.1f} | "
                     f"{current.throughput[i] / baseline.throughput[i]:.2f}x")
        lines.append(line)
    if baseline and TARGET_LEVEL in current.concurrency:
        i = current.concurrency.index(TARGET_LEVEL)
        lines.append(f"throughput at {TARGET_LEVEL} clients vs baseline: "
                     f"{current.throughput[i] / baseline.throughput[i]:.2f}x (target >= 3x)")
    steps = ", ".join(f"prefix {length}: {ms:.1f} ms ({ms / bench.step_rows:.2f} ms/token)"
                      for length, ms in bench.step_ms.items())
    lines.append(f"one decoding step of {bench.step_rows} beams: {steps}")
    statuses = ", ".join(f"{status}: {count}" for status, count in sorted(bench.mixed.items()))
    lines.append(f"mixed traffic, {bench.mixed_clients} clients, "
                 f"{sum(bench.mixed.values())} requests: {statuses} "
                 "(goal: only 200 and 429, no 504)")
    return "\n".join(lines)
