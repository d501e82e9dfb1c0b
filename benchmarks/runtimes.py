"""`glipv2 bench runtimes`: each graph's latency on every runtime, side by side in one run.

Same inputs for every runtime (an image at the preset's serving size, a detection prompt), the
median of `repeats` timed runs after a warm-up, the runtimes taking turns run by run, so the
ratios compare like with like on a noisy machine. Also prints the achieved GFLOP/s of `vision`
and `fusion` (matrix-product and convolution FLOPs counted by PyTorch's FLOP counter on the eager
graph) beside the machine's own measured matrix-product rate in fp32 and bf16. With `profile`,
ONNX Runtime's own profiler splits `vision` and `fusion` time by operator type: what share is
matrix products (which int8 and a faster GEMM can speed up) and what share is memory-bound glue
(layout, norms, softmax).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from engines.graphs import HEAVY_GRAPHS, LEVELS
from engines.kinds import Precision, RuntimeKind
from engines.runtimes import (
    Runtime,
    RuntimeOptions,
    RuntimeUnavailableError,
    load_manifest,
    open_runtime,
)
from engines.runtimes.onnx_runtime import session_options
from model_export.processing.prompt import build_detection_prompt, load_tokenizer, tokenize

PROMPT = ["circle", "square", "triangle", "diamond", "star", "hexagon"]
GRAPHS = ("vision", "language", "fusion", "mask", "vqa", "caption_step")
# ONNX Runtime operator types (after its graph fusions) that are matrix products or convolutions.
MATRIX_PRODUCT_OPS = frozenset({"Gemm", "MatMul", "FusedMatMul", "FusedGemm", "Conv", "FusedConv",
                                "NchwcConv", "DynamicQuantizeMatMul", "MatMulInteger",
                                "MatMulIntegerToFloat", "ConvInteger", "QLinearConv",
                                "QLinearMatMul", "DeformConv"})


@dataclass
class BenchResult:
    runtimes: list[str]
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # graph -> runtime
    gflop: dict[str, float] = field(default_factory=dict)  # graph -> GFLOP per call
    matmul_gflops: dict[str, float] = field(default_factory=dict)  # dtype -> GFLOP/s
    # "graph precision" -> operator type -> ms per call (ONNX Runtime's profiler)
    op_ms: dict[str, dict[str, float]] = field(default_factory=dict)


def graph_inputs(runtime: Runtime, height: int, width: int) -> dict[str, dict[str, Tensor]]:
    """Consistent inputs for every graph, computed once with `runtime` (the fp32 reference)."""
    config = runtime.config
    tokenizer = load_tokenizer(config.language.tokenizer)
    ids, mask, _ = tokenize(tokenizer, [build_detection_prompt(PROMPT).caption])
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    visual = runtime.run("vision", {"images": images})
    hidden = runtime.run("language", {"input_ids": ids, "attention_mask": mask})["hidden"]
    fused = runtime.run("fusion", {**visual, "hidden": hidden, "attention_mask": mask})
    tokens = ids.shape[1]
    inputs = {
        "vision": {"images": images},
        "language": {"input_ids": ids, "attention_mask": mask},
        "fusion": {**visual, "hidden": hidden, "attention_mask": mask},
        "vqa": {"fused_text": fused["fused_text"], "attention_mask": mask},
    }
    phrase_map = torch.zeros(1, 1, tokens)
    phrase_map[0, 0, 1] = 1.0
    inputs["mask"] = {**{f"fused_{lv}": fused[f"fused_{lv}"] for lv in LEVELS[:3]},
                      "fused_text": fused["fused_text"], "phrase_map": phrase_map,
                      "boxes": torch.tensor([[[[10.0, 10.0, 90.0, 90.0]] * 5]]),
                      "box_valid": torch.ones(1, 1, 5, dtype=torch.bool)}
    if "caption_image" in runtime.graphs:
        states = {name: value for name, value in runtime.run("caption_image", visual).items()
                  if not name.startswith("fused_")}
        # Served captions name detected objects: every token after [CLS] on one object's box.
        # The step: the 8th token, with the first 7 cached.
        token_boxes = torch.zeros(1, 8, 4)
        token_boxes[:, 1:] = torch.tensor([0.0, 0.0, width / 2, height / 2])
        prefix = runtime.run("caption_prefix", {
            "input_ids": ids[:, :7], "attention_mask": mask[:, :7],
            "token_boxes": token_boxes[:, :7], **states})
        inputs["caption_step"] = {"input_ids": ids[:, 7:8], "past_mask": mask[:, :7],
                                  "token_boxes": token_boxes[:, 7:8],
                                  "past_keys": prefix["keys"], "past_values": prefix["values"],
                                  **states}
    return inputs


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return side_by_side_ms({"": fn}, repeats)[""]


def side_by_side_ms(calls: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call of each function, timed in rounds (each function once per round) so
    that a slow spell of a shared machine falls on every function alike, not on one of them."""
    for fn in calls.values():
        fn()  # warm-up: allocations, ONNX Runtime's first-run optimisations
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def machine_description() -> str:
    """The CPU, the vector ISA PyTorch's kernels dispatch to, and the core count: the figures
    (and whether the reduced-precision targets can be met) depend on them, e.g. bf16 matrix
    products are fast only where the CPU has AVX-512 bf16 or AMX."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return (f"{model}, {os.cpu_count()} CPUs, PyTorch kernels: "
            f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    ms = median_ms(lambda: a @ b, repeats)
    return 2 * size**3 / (ms / 1000.0) / 1e9


def ort_op_profile(onnx_path: Path, feeds: dict[str, Tensor], repeats: int = 5,
                   threads: int = 0) -> dict[str, float]:
    """Kernel time per operator type (ms per run, largest first) of one graph under ONNX
    Runtime's profiler, with the serving session's options; the first run is a warm-up."""
    import onnxruntime as ort

    options = session_options(threads)
    with tempfile.TemporaryDirectory() as folder:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(str(onnx_path), options,
                                       providers=["CPUExecutionProvider"])
        arrays = {i.name: feeds[i.name].numpy() for i in session.get_inputs()}
        for _ in range(repeats + 1):
            session.run(None, arrays)
        events = json.loads(Path(session.end_profiling()).read_text())
    return op_time_by_type(events, skip_runs=1)


def op_time_by_type(events: list[dict], skip_runs: int = 0) -> dict[str, float]:
    """ONNX Runtime profile events -> ms per run by operator type, largest first, leaving out
    the kernels of the first `skip_runs` runs."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) <= skip_runs:
        raise ValueError(f"the profile has {len(runs)} runs; {skip_runs} are to be skipped")
    start = runs[skip_runs - 1]["ts"] + runs[skip_runs - 1]["dur"] if skip_runs else 0
    total: Counter[str] = Counter()
    for event in events:
        if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                and event["ts"] >= start):
            total[event["args"]["op_name"]] += event["dur"]
    count = len(runs) - skip_runs
    return {op: us / count / 1000.0 for op, us in total.most_common()}


def bench_runtimes(model_dir: Path, engine_dir: Path | None, height: int, width: int,
                   repeats: int = 5, threads: int = 0, profile: bool = False) -> BenchResult:
    """Latency of every graph on PyTorch fp32/bf16 and ONNX Runtime fp32/int8 (when exported)."""
    if threads:
        torch.set_num_threads(threads)
    torch_kind, ort_kind = RuntimeKind.PYTORCH, RuntimeKind.ONNXRUNTIME
    candidates = [RuntimeOptions(kind=torch_kind, model_dir=model_dir, threads=threads),
                  RuntimeOptions(kind=torch_kind, model_dir=model_dir, precision=Precision.BF16,
                                 threads=threads)]
    if engine_dir is not None:
        candidates += [RuntimeOptions(kind=ort_kind, engine_dir=engine_dir, threads=threads),
                       RuntimeOptions(kind=ort_kind, engine_dir=engine_dir,
                                      precision=Precision.INT8, threads=threads)]
    runtimes: list[Runtime] = []
    for options in candidates:
        try:
            runtimes.append(open_runtime(options))
        except RuntimeUnavailableError as exc:
            print(f"skipped: {exc}")
    reference = runtimes[0]
    inputs = graph_inputs(reference, height, width)
    result = BenchResult(runtimes=[r.name for r in runtimes])
    for graph in GRAPHS:
        if graph not in inputs:
            continue
        result.latency_ms[graph] = side_by_side_ms(
            {runtime.name: (lambda r=runtime, g=graph: r.run(g, inputs[g]))
             for runtime in runtimes if graph in runtime.graphs}, repeats)
    for graph in HEAVY_GRAPHS:
        counter = FlopCounterMode(display=False)
        with counter:
            reference.run(graph, inputs[graph])
        result.gflop[graph] = counter.get_total_flops() / 1e9
    result.matmul_gflops = {"fp32": matmul_gflops(torch.float32),
                            "bf16": matmul_gflops(torch.bfloat16)}
    if profile and engine_dir is not None:
        manifest = load_manifest(engine_dir)
        for graph in HEAVY_GRAPHS:
            for precision in ("fp32", "int8"):
                if manifest.has_variant(graph, precision):
                    result.op_ms[f"{graph} {precision}"] = ort_op_profile(
                        manifest.graph_path(graph, precision), inputs[graph], repeats, threads)
    return result


def format_result(result: BenchResult) -> str:
    """A Markdown table: ms per graph and runtime, each as a ratio of PyTorch fp32."""
    names = result.runtimes
    lines = ["| graph | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for graph, per_runtime in result.latency_ms.items():
        base = per_runtime[names[0]]
        cells = []
        for name in names:
            ms = per_runtime.get(name)
            cells.append("n/a" if ms is None else f"{ms:.1f} ms ({ms / base:.2f}x)")
        lines.append(f"| {graph} | " + " | ".join(cells) + " |")
    lines.append("")
    for graph, gflop in result.gflop.items():
        rates = ", ".join(f"{name} {gflop / (ms / 1000.0):.0f}"
                          for name, ms in result.latency_ms[graph].items())
        lines.append(f"{graph}: {gflop:.1f} GFLOP per call; achieved GFLOP/s: {rates}")
    lines.append(f"machine: {machine_description()}")
    lines.append("machine matrix product (2048^3): " + ", ".join(
        f"{dtype} {rate:.0f} GFLOP/s" for dtype, rate in result.matmul_gflops.items()))
    for name, per_op in result.op_ms.items():
        total = sum(per_op.values())
        products = sum(ms for op, ms in per_op.items() if op in MATRIX_PRODUCT_OPS)
        top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(per_op.items())[:8])
        lines.append(f"ONNX Runtime {name}: {total:.1f} ms in kernels, matrix products "
                     f"{products:.1f} ms ({products / total:.0%}); by operator (ms): {top}")
    return "\n".join(lines)
