"""`glipv2 bench soak`: hours of load in minutes: mixed tasks, errors, memory and latency drift.

`concurrency` closed-loop clients post detect, segment, VQA and caption requests on world images
in turn for `minutes`. Per minute: requests by status, p50 / p99 of the 200s, and the server's
resident memory (`process_resident_memory_bytes` from its `/metrics`). The summary checks the
goals of a long-running service: no errors but 429 (load shedding), resident memory growing less
than 10 % from the first to the last minute, and the last minute's p99 within 1.5x of the first.

Then, for a server started here, SIGTERM under the same load (`Drain`): the requests it had taken
must be answered (200, or 429), every request sent after it refused with 503 JSON until the
listener closes, and the process must exit 0 within its shutdown timeout.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.captions import MIXED_BODIES
from benchmarks.load import world_pngs
from benchmarks.local_server import spawn_server

RSS_GROWTH_GOAL = 0.10
P99_DRIFT_GOAL = 1.5


@dataclass
class Minute:
    """One minute of the soak: statuses, latencies of the 200s, server memory at its end."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    rss_bytes: float | None = None
    errors: Counter[tuple[int, str]] = field(default_factory=Counter)  # (status, path)

    def quantile_ms(self, q: float) -> float:
        return float(np.quantile(self.latencies_s, q) * 1000.0) if self.latencies_s else 0.0


@dataclass
class Drain:
    """SIGTERM under load. in_flight: statuses of the requests sent before the signal;
    after: of those sent after it ("503 shutting_down", "no connection", or anything else);
    exit_code and exit_s: the process's, seconds from the signal."""

    in_flight: Counter[str] = field(default_factory=Counter)
    after: Counter[str] = field(default_factory=Counter)
    exit_code: int | None = None
    exit_s: float = 0.0


def resident_memory(metrics_text: str) -> float | None:
    """The server's resident memory in bytes, from its Prometheus exposition."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "process_resident_memory_bytes":
            return float(family.samples[0].value)
    return None


async def _soak(url: str, images: list[bytes], minutes: float, concurrency: int
                ) -> list[Minute]:
    bodies = _bodies(images)
    started = time.monotonic()
    end = started + minutes * 60.0
    slots = max(1, round(minutes))
    per_minute = [Minute() for _ in range(slots)]
    counter = iter(range(1 << 62))

    def minute_of(now: float) -> Minute:
        return per_minute[min(int((now - started) // 60.0), slots - 1)]

    async def worker(client: httpx.AsyncClient) -> None:
        for index in counter:
            if time.monotonic() >= end:
                return
            path, body = bodies[index % len(bodies)]
            sent = time.monotonic()
            try:
                status = (await client.post(path, json=body)).status_code
            except httpx.HTTPError:
                status = 0  # no answer at all: counted as an error
            done = time.monotonic()
            minute = minute_of(sent)
            minute.statuses[status] += 1
            if status == 200:
                minute.latencies_s.append(done - sent)
            elif status != 429:
                minute.errors[status, path] += 1

    async def memory(client: httpx.AsyncClient) -> None:
        for index in range(slots):
            await asyncio.sleep(max(0.0, started + (index + 1) * 60.0 - time.monotonic() - 1.0))
            per_minute[index].rss_bytes = resident_memory((await client.get("/metrics")).text)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(memory(client), *(worker(client) for _ in range(concurrency)))
    return per_minute


async def _drain(url: str, images: list[bytes], concurrency: int,
                 process: subprocess.Popen[str], load_s: float = 5.0) -> Drain:
    """`load_s` of the soak's load, SIGTERM, and the load kept on until the server is gone."""
    bodies = _bodies(images)
    drain = Drain()
    signalled: list[float] = []
    counter = iter(range(1 << 62))

    async def worker(client: httpx.AsyncClient) -> None:
        for index in counter:
            path, body = bodies[index % len(bodies)]
            sent = time.monotonic()
            try:
                response = await client.post(path, json=body)
                code = response.json().get("error", {}).get("code", "") \
                    if response.status_code >= 400 else ""
                outcome = f"{response.status_code} {code}".strip()
            except (httpx.TransportError, ValueError):
                outcome = "no connection"
            if not signalled or sent < signalled[0]:
                drain.in_flight[outcome] += 1
            else:
                drain.after[outcome] += 1
                if outcome == "no connection" and process.poll() is not None:
                    return

    async def terminate() -> None:
        await asyncio.sleep(load_s)
        signalled.append(time.monotonic())
        process.send_signal(signal.SIGTERM)
        drain.exit_code = await asyncio.to_thread(process.wait, 600)
        drain.exit_s = time.monotonic() - signalled[0]

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(terminate(), *(worker(client) for _ in range(concurrency)))
    return drain


def _bodies(images: list[bytes]) -> list[tuple[str, dict[str, object]]]:
    return [(path, {"image": base64.b64encode(images[i % len(images)]).decode(), **extra})
            for i in range(len(images)) for path, extra in MIXED_BODIES]


def bench_soak(minutes: float = 10.0, concurrency: int = 32, *, model_dir: str | None = None,
               serve_args: Sequence[str] = (), url: str | None = None,
               distinct_images: int = 8) -> tuple[list[Minute], Drain | None]:
    """The soak against `url`, or against a server started here and then SIGTERMed under the
    same load (its `Drain`; None for `url`)."""
    images = world_pngs(distinct_images)
    if url is not None:
        return asyncio.run(_soak(url, images, minutes, concurrency)), None
    args = [*serve_args, *(["--model", model_dir] if model_dir else [])]
    process, started = spawn_server(args)
    try:
        minutes_ = asyncio.run(_soak(started, images, minutes, concurrency))
        return minutes_, asyncio.run(_drain(started, images, concurrency, process))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def format_soak(minutes: list[Minute], concurrency: int) -> str:
    lines = [f"soak: {concurrency} clients, mixed tasks, {len(minutes)} minutes",
             "minute | requests | 200 | 429 | other | p50 ms | p99 ms | RSS MB",
             "--- | --- | --- | --- | --- | --- | --- | ---"]
    for index, minute in enumerate(minutes, 1):
        total = sum(minute.statuses.values())
        other = total - minute.statuses[200] - minute.statuses[429]
        rss = f"{minute.rss_bytes / 2**20:.0f}" if minute.rss_bytes else "-"
        lines.append(f"{index} | {total} | {minute.statuses[200]} | {minute.statuses[429]} | "
                     f"{other} | {minute.quantile_ms(0.5):.0f} | {minute.quantile_ms(0.99):.0f} | "
                     f"{rss}")
    errors = Counter[tuple[int, str]]()
    for minute in minutes:
        errors.update(minute.errors)
    first, last = minutes[0], minutes[-1]
    if first.rss_bytes and last.rss_bytes:
        growth = last.rss_bytes / first.rss_bytes - 1.0
        lines.append(f"RSS growth first -> last minute: {growth * 100:+.1f} % "
                     f"(goal < {RSS_GROWTH_GOAL * 100:.0f} %)")
    if first.latencies_s and last.latencies_s:
        drift = last.quantile_ms(0.99) / first.quantile_ms(0.99)
        lines.append(f"p99 last / first minute: {drift:.2f}x (goal <= {P99_DRIFT_GOAL}x)")
    lines.append("errors other than 429: " + (", ".join(
        f"{status} {path}: {n}" for (status, path), n in sorted(errors.items())) or "none"))
    return "\n".join(lines)


def format_drain(drain: Drain) -> str:
    def counts(counter: Counter[str]) -> str:
        return ", ".join(f"{outcome}: {n}" for outcome, n in sorted(counter.items())) or "none"

    return (f"SIGTERM under load: sent before it: {counts(drain.in_flight)}; sent after it: "
            f"{counts(drain.after)}; exit code {drain.exit_code} after {drain.exit_s:.1f} s")
