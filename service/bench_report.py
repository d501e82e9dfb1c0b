"""`glipv2 bench report`: run the benchmarks and write a Markdown report with PNG plots.

1. Online serving, batcher on (`max_batch_size` 8) vs off (1): throughput and p50 / p99 latency of
   detection requests against concurrency, each configuration on its own fresh server.
2. Runtimes: every graph on PyTorch and ONNX Runtime (fp32, int8), as `glipv2 bench runtimes`.

Each figure comes from one run, side by side; the report says which machine and settings.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.bench_load import online_load, world_pngs
from service.bench_runtimes import BenchResult, bench_runtimes, machine_description
from service.local_server import local_server
from service.settings import DEFAULT_MODEL_DIR


@dataclass
class LoadCurve:
    """One server configuration: per concurrency level, throughput and latency quantiles."""

    name: str
    concurrency: list[int] = field(default_factory=list)
    throughput_rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)


def measure_curve(name: str, url: str, levels: list[int], requests: int) -> LoadCurve:
    images = world_pngs(16)
    curve = LoadCurve(name)
    for level in levels:
        latencies, elapsed = asyncio.run(online_load(url, images, requests, level))
        curve.concurrency.append(level)
        curve.throughput_rps.append(len(latencies) / elapsed)
        curve.p50_ms.append(float(np.quantile(latencies, 0.5)) * 1000)
        curve.p99_ms.append(float(np.quantile(latencies, 0.99)) * 1000)
    return curve


def batcher_curves(levels: list[int], requests: int, model_dir: str | None) -> list[LoadCurve]:
    curves = []
    for name, batch in (("batcher on (max_batch_size 8)", "8"),
                        ("batcher off (max_batch_size 1)", "1")):
        with local_server(model_dir, ["--max-batch-size", batch]) as url:
            curves.append(measure_curve(name, url, levels, requests))
    return curves


def plot_curves(curves: list[LoadCurve], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for metric, label, filename in (
            ("throughput_rps", "requests / s", "throughput_vs_concurrency.png"),
            ("p99_ms", "p99 latency, ms", "p99_vs_concurrency.png")):
        figure, axis = plt.subplots(figsize=(5.5, 3.5), dpi=110)
        for curve in curves:
            axis.plot(curve.concurrency, getattr(curve, metric), marker="o", label=curve.name)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.set_xticks(curves[0].concurrency)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / filename)
        plt.close(figure)
        names.append(filename)
    return names


def plot_runtimes(result: BenchResult, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = list(result.latency_ms)
    width = 0.8 / len(result.runtimes)
    figure, axis = plt.subplots(figsize=(7, 3.5), dpi=110)
    for index, runtime in enumerate(result.runtimes):
        values = [result.latency_ms[g].get(runtime, np.nan) for g in graphs]
        axis.bar(np.arange(len(graphs)) + index * width, values, width, label=runtime)
    axis.set_xticks(np.arange(len(graphs)) + 0.4 - width / 2, graphs)
    axis.set_ylabel("ms per call (median)")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    filename = "runtimes.png"
    figure.savefig(out / filename)
    plt.close(figure)
    return filename


def write_report(out: Path, curves: list[LoadCurve], runtimes: BenchResult | None,
                 settings: str) -> Path:
    """The Markdown report beside its PNG plots; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# GLIPv2 serving benchmarks", "",
             f"Machine: {machine_description()}. {settings}", "",
             "## Online detection: batcher on vs off", ""]
    for name in plot_curves(curves, out):
        lines.append(f"![{name}]({name})")
    lines += ["", "| configuration | clients | requests/s | p50 ms | p99 ms |",
              "| --- | --- | --- | --- | --- |"]
    for curve in curves:
        for i, level in enumerate(curve.concurrency):
            lines.append(f"| {curve.name} | {level} | {curve.throughput_rps[i]:.2f} | "
                         f"{curve.p50_ms[i]:.0f} | {curve.p99_ms[i]:.0f} |")
    if runtimes is not None:
        lines += ["", "## Runtimes, per graph", "", f"![runtimes]({plot_runtimes(runtimes, out)})",
                  "", "| graph | " + " | ".join(runtimes.runtimes) + " |",
                  "| --- |" + " --- |" * len(runtimes.runtimes)]
        for graph, row in runtimes.latency_ms.items():
            base = row.get(runtimes.runtimes[0])
            cells = []
            for index, runtime in enumerate(runtimes.runtimes):
                value = row.get(runtime)
                ratio = f" ({value / base:.2f}x)" if value and base and index else ""
                cells.append("-" if value is None else f"{value:.1f}{ratio}")
            lines.append(f"| {graph} | " + " | ".join(cells) + " |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_report(out: Path, model_dir: str | None = None, engines: str | None = None,
                 levels: tuple[int, ...] = (1, 2, 4, 8), requests: int = 32,
                 runtimes: bool = True) -> Path:
    curves = batcher_curves(list(levels), requests, model_dir)
    result = None
    if runtimes:
        model = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
        engine_dir = Path(engines) if engines else None
        if engine_dir is None:
            from model_export.export import export_model

            engine_dir = Path(tempfile.mkdtemp(prefix="glipv2-bench-engines-"))
            export_model(model, engine_dir, variants=("int8",))
        result = bench_runtimes(model, engine_dir, 288, 448)
    settings = (f"{requests} closed-loop detection requests per level (6 classes, world images "
                "of varying sizes); runtimes at 288x448, median of 5.")
    return write_report(out, curves, result, settings)
