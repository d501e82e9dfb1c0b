"""`glipv2 bench load`: a closed-loop concurrency sweep, batcher on vs `max_batch_size=1`.

Like perf_analyzer: at each level, `concurrency` clients each send a detection request, wait for
its answer, then send the next, until `requests` have been answered. Two servers that differ
only in `max_batch_size` take turns level by level on the same images and prompt; the report
gives throughput and p50 / p90 / p99 per level side by side, their ratios, and the mean
`vision` batch the batched server formed (from its `/metrics`), so a ratio near 1 can be told
apart from a batcher that never batched.

Without URLs it starts both servers itself (`glipv2 serve`, the default model unless `model_dir`
is given, extra serve flags such as `--runtime onnxruntime --engines DIR` passed through) and
alternates between them level by level. With URLs and `labels`, any two running servers are
compared the same way (e.g. Ray Serve against the single-process server): the report then
gives the first's p50 at 1 client and throughput at 16 clients as ratios to the second's.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.local_server import local_server
from model_export.data.world import SHAPES, render_index
from service.batching import BatcherConfig

_WORLD_SEED = 5
LEVELS = (1, 2, 4, 8, 16, 32)
TARGET_LEVEL = 16


def world_pngs(count: int, offset: int = 0) -> list[bytes]:
    """World images (seed 5) of their own, varying sizes, as PNG bytes."""
    images = []
    for index in range(offset, offset + count):
        buffer = io.BytesIO()
        render_index(_WORLD_SEED, index).image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


async def online_load(url: str, images: list[bytes], requests: int, concurrency: int
                      ) -> tuple[list[float], float]:
    """Closed-loop detection requests (after one warm-up request); returns each request's
    latency and the wall time of them all. Every request must succeed."""
    bodies = [{"image": base64.b64encode(d).decode(), "classes": list(SHAPES)} for d in images]
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for index in counter:
            started = time.perf_counter()
            response = await client.post("/v1/detect", json=bodies[index % len(bodies)])
            if response.status_code != 200:
                raise RuntimeError(f"online request failed: {response.status_code} "
                                   f"{response.text[:200]}")
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        (await client.post("/v1/detect", json=bodies[0])).raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def engine_batch_totals(metrics_text: str, engine: str) -> tuple[float, float]:
    """(batches, items) `engine` has run, from a Prometheus exposition text (for the caption
    decoder: decoding steps and their rows)."""
    totals = {"_count": 0.0, "_sum": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "glipv2_engine_batch_size":
            continue
        for sample in family.samples:
            suffix = sample.name.removeprefix(family.name)
            if sample.labels.get("engine") == engine and suffix in totals:
                totals[suffix] += sample.value
    return totals["_count"], totals["_sum"]


def _vision_batches(url: str) -> tuple[float, float]:
    return engine_batch_totals(httpx.get(f"{url}/metrics", timeout=30).text, "vision")


@dataclass
class LoadCurve:
    """One server configuration: per concurrency level, throughput, latency quantiles and the
    mean `vision` batch size."""

    name: str
    concurrency: list[int] = field(default_factory=list)
    throughput_rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p90_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    mean_batch: list[float] = field(default_factory=list)


def measure_level(curve: LoadCurve, url: str, images: list[bytes], level: int,
                  requests: int) -> None:
    """Append one concurrency level's figures to `curve`."""
    batches_before, served_before = _vision_batches(url)
    latencies, elapsed = asyncio.run(online_load(url, images, requests, level))
    batches, served = _vision_batches(url)
    milliseconds = np.asarray(latencies) * 1000.0
    curve.concurrency.append(level)
    curve.throughput_rps.append(len(latencies) / elapsed)
    curve.p50_ms.append(float(np.quantile(milliseconds, 0.5)))
    curve.p90_ms.append(float(np.quantile(milliseconds, 0.9)))
    curve.p99_ms.append(float(np.quantile(milliseconds, 0.99)))
    # The warm-up request is in the deltas too; it ran alone, as a batch of one.
    curve.mean_batch.append((served - served_before) / max(batches - batches_before, 1.0))


def sweep(levels: Sequence[int] = LEVELS, requests: int = 64, *,
          max_batch_size: int = BatcherConfig.max_batch_size,
          distinct_images: int = 16, model_dir: str | None = None,
          serve_args: Sequence[str] = (), urls: tuple[str, str] | None = None,
          labels: tuple[str, str] | None = None) -> tuple[LoadCurve, LoadCurve]:
    """(batched, unbatched) curves. `urls`: two running servers, the first with the batcher on,
    the second with `max_batch_size=1` (`max_batch_size` then unused), or any two servers named
    by `labels`; otherwise both are started here and run side by side.
    Each level is measured on one server, then at once on the other (only one is loaded at a
    time), so a slow spell of a shared machine falls on both sides of a ratio, not on one curve.
    `distinct_images`: world images cycled through (1: every request posts the same image, so
    every request shares a shape bucket and batches can always form)."""
    images = world_pngs(distinct_images)
    with ExitStack() as stack:
        if urls is None:
            on = LoadCurve(f"batcher on (max_batch_size {max_batch_size})")
            off = LoadCurve("batcher off (max_batch_size 1)")
            urls = (stack.enter_context(local_server(
                        model_dir, [*serve_args, "--max-batch-size", str(max_batch_size)])),
                    stack.enter_context(local_server(
                        model_dir, [*serve_args, "--max-batch-size", "1"])))
        elif labels is not None:
            on, off = LoadCurve(labels[0]), LoadCurve(labels[1])
        else:  # their settings are the running servers' own
            on, off = LoadCurve(f"batcher on ({urls[0]})"), LoadCurve(f"batcher off ({urls[1]})")
        for level in levels:
            for curve, url in ((on, urls[0]), (off, urls[1])):
                measure_level(curve, url, images, level, requests)
    return on, off


def _mean_batch(value: float) -> str:
    """0 means the server's `/metrics` has no `vision` engine (a Ray Serve ingress: its
    engines report through Ray's metrics)."""
    return f"{value:.2f}" if value else "-"


def format_sweep(on: LoadCurve, off: LoadCurve, compared: bool = False) -> str:
    """Both curves side by side per level, with throughput and p99 ratios (on / off).

    compared: the curves are two servers named by `sweep`'s labels, not the batcher on and off:
    the summary gives the first's p50 at 1 client and throughput at 16 clients as speed ratios
    to the second's (>= 1: at least as fast)."""
    lines = [f"closed-loop detection sweep; on = {on.name}, off = {off.name}",
             "clients | on req/s | p50 | p90 | p99 ms | mean vision batch | off req/s | p50 | "
             "p90 | p99 ms | throughput on/off | p99 on/off",
             "--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---"]
    for i, level in enumerate(on.concurrency):
        lines.append(
            f"{level} | {on.throughput_rps[i]:.2f} | {on.p50_ms[i]:.0f} | {on.p90_ms[i]:.0f} | "
            f"{on.p99_ms[i]:.0f} | {_mean_batch(on.mean_batch[i])} | "
            f"{off.throughput_rps[i]:.2f} | "
            f"{off.p50_ms[i]:.0f} | {off.p90_ms[i]:.0f} | {off.p99_ms[i]:.0f} | "
            f"{on.throughput_rps[i] / off.throughput_rps[i]:.2f}x | "
            f"{on.p99_ms[i] / off.p99_ms[i]:.2f}x")
    if compared:
        if 1 in on.concurrency:
            i = on.concurrency.index(1)
            lines.append(f"p50 at 1 client: {on.name} {on.p50_ms[i]:.1f} ms, {off.name} "
                         f"{off.p50_ms[i]:.1f} ms: speed {off.p50_ms[i] / on.p50_ms[i]:.2f}x")
        if TARGET_LEVEL in on.concurrency:
            i = on.concurrency.index(TARGET_LEVEL)
            lines.append(f"throughput at {TARGET_LEVEL} clients, {on.name} / {off.name}: "
                         f"{on.throughput_rps[i] / off.throughput_rps[i]:.2f}x")
    elif TARGET_LEVEL in on.concurrency:
        i = on.concurrency.index(TARGET_LEVEL)
        lines.append(f"throughput at {TARGET_LEVEL} clients, batcher on / off: "
                     f"{on.throughput_rps[i] / off.throughput_rps[i]:.2f}x (target >= 1.5x)")
    return "\n".join(lines)
