"""`glipv2 bench runtimes --profile`: ONNX Runtime time split by operator type."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.runtimes import (
    MATRIX_PRODUCT_OPS,
    machine_description,
    op_time_by_type,
    ort_op_profile,
    side_by_side_ms,
)


def _run(ts: int, dur: int) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _kernel(op: str, ts: int, dur: int) -> dict:
    return {"cat": "Node", "name": f"node_{op}_kernel_time", "ts": ts, "dur": dur,
            "args": {"op_name": op}}


def test_op_time_by_type_leaves_out_the_warm_up_and_averages_per_run() -> None:
    events = [_run(0, 100), _kernel("Gemm", 10, 90),  # warm-up: slow, left out
              _run(200, 50), _kernel("Gemm", 210, 30), _kernel("Relu", 240, 4),
              _run(300, 50), _kernel("Gemm", 310, 10), _kernel("Relu", 330, 2)]
    assert op_time_by_type(events, skip_runs=1) == pytest.approx({"Gemm": 0.02, "Relu": 0.003})
    assert list(op_time_by_type(events)) == ["Gemm", "Relu"]  # largest first
    with pytest.raises(ValueError, match="3 runs"):
        op_time_by_type(events, skip_runs=3)


def test_ort_op_profile_of_a_real_graph(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    x = torch.randn(32, 64)
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=False)
    per_op = ort_op_profile(path, {"x": x}, repeats=3, threads=1)
    assert per_op and all(ms > 0 for ms in per_op.values())
    assert set(per_op) & MATRIX_PRODUCT_OPS  # the linear layers, whatever ORT fused them into


def test_machine_description_names_the_kernels_isa() -> None:
    text = machine_description()
    assert f"{os.cpu_count()} CPUs" in text
    assert f"PyTorch kernels: {torch.backends.cpu.get_cpu_capability()}" in text


def test_side_by_side_timing_takes_turns() -> None:
    calls: list[str] = []
    medians = side_by_side_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              repeats=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds
    assert set(medians) == {"a", "b"} and all(ms >= 0 for ms in medians.values())
