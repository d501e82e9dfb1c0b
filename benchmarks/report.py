"""`glipv2 bench report`: run the benchmarks and write a Markdown report with PNG plots.

1. Online serving, batcher on (`max_batch_size` 8) vs off (1), as `glipv2 bench load`: throughput,
   p50 / p90 / p99 latency and mean batch of detection requests against concurrency, each
   configuration on its own fresh server.
2. Runtimes: every graph on PyTorch and ONNX Runtime (fp32, int8), as `glipv2 bench runtimes`.

Each figure comes from one run, side by side; the report says which machine and settings.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.load import LEVELS, LoadCurve, format_sweep, sweep
from benchmarks.runtimes import BenchResult, bench_runtimes, machine_description
from service.settings import DEFAULT_MODEL_DIR


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
    lines += ["", "| configuration | clients | requests/s | p50 ms | p90 ms | p99 ms | "
              "mean vision batch |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for curve in curves:
        for i, level in enumerate(curve.concurrency):
            lines.append(f"| {curve.name} | {level} | {curve.throughput_rps[i]:.2f} | "
                         f"{curve.p50_ms[i]:.0f} | {curve.p90_ms[i]:.0f} | "
                         f"{curve.p99_ms[i]:.0f} | {curve.mean_batch[i]:.2f} |")
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
                 levels: Sequence[int] = LEVELS, requests: int = 64,
                 runtimes: bool = True) -> Path:
    curves = sweep(levels, requests, model_dir=model_dir)
    print(format_sweep(*curves))
    result = None
    if runtimes:
        model = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
        engine_dir = Path(engines) if engines else None
        if engine_dir is None:
            from engines.export import export_model

            engine_dir = Path(tempfile.mkdtemp(prefix="glipv2-bench-engines-"))
            export_model(model, engine_dir, variants=("int8",))
        result = bench_runtimes(model, engine_dir, 288, 448)
    settings = (f"{requests} closed-loop detection requests per level (6 classes, world images "
                "of varying sizes); runtimes at 288x448, median of 5.")
    return write_report(out, list(curves), result, settings)
