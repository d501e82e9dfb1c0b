"""`glipv2 bench` output: the load sweep table, the jobs phases, the Markdown report and its
plots (from given measurements)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import generate_latest

from benchmarks.jobs import Phase, format_phases
from benchmarks.load import LoadCurve, engine_batch_totals, format_sweep
from benchmarks.report import write_report
from benchmarks.runtimes import BenchResult
from cli.main import main
from service.telemetry import ServiceMetrics


def test_report_has_tables_and_real_plots(tmp_path: Path) -> None:
    curves = [LoadCurve("batcher on", [1, 2, 4], [1.5, 2.8, 4.9], [600, 700, 800],
                        [650, 800, 900], [700, 900, 1000], [1.0, 1.8, 3.2]),
              LoadCurve("batcher off", [1, 2, 4], [1.5, 1.9, 2.0], [600, 1000, 2000],
                        [650, 1200, 2300], [700, 1300, 2600], [1.0, 1.0, 1.0])]
    runtimes = BenchResult(runtimes=["pytorch fp32", "onnxruntime fp32"],
                           latency_ms={"vision": {"pytorch fp32": 80.0,
                                                  "onnxruntime fp32": 40.0},
                                       "fusion": {"pytorch fp32": 70.0}})
    path = write_report(tmp_path, curves, runtimes, "Synthetic numbers.")
    text = path.read_text()
    assert "| batcher on | 4 | 4.90 | 800 | 900 | 1000 | 3.20 |" in text
    assert "| vision | 80.0 | 40.0 (0.50x) |" in text and "| fusion | 70.0 | - |" in text
    for name in ("throughput_vs_concurrency.png", "p99_vs_concurrency.png", "runtimes.png"):
        assert f"]({name})" in text
        image = np.asarray(Image.open(tmp_path / name).convert("L"))
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert (image < 128).mean() > 0.01  # axes, lines and labels were drawn


def test_load_phases_report_the_p99_ratio() -> None:
    alone = Phase("online alone", [0.1] * 99 + [0.2])
    with_job = Phase("online + job", [0.15] * 99 + [0.3], job_rate_per_s=2.5)
    text = format_phases(alone, with_job, 4)
    assert "p99 with the job / alone: 1.50x" in text and "| 2.50" in text


def test_vision_batch_totals_read_the_services_own_metrics() -> None:
    metrics = ServiceMetrics()
    on_batch = metrics.engine_callbacks("vision").on_batch
    on_fusion = metrics.engine_callbacks("fusion").on_batch
    for size in (1, 3, 4):
        on_batch(size, [0.0] * size, 0.01)
    on_fusion(8, [0.0] * 8, 0.01)
    text = generate_latest(metrics.registry).decode()
    assert engine_batch_totals(text, "vision") == (3.0, 8.0)
    assert engine_batch_totals("", "vision") == (0.0, 0.0)


def test_sweep_table_sets_the_configurations_side_by_side() -> None:
    on = LoadCurve("batcher on", [1, 16], [4.0, 9.0], [250, 1700], [260, 1800], [270, 1900],
                   [1.0, 5.5])
    off = LoadCurve("batcher off", [1, 16], [4.0, 6.0], [250, 2600], [260, 2700], [270, 3800],
                    [1.0, 1.0])
    text = format_sweep(on, off)
    assert "16 | 9.00 | 1700 | 1800 | 1900 | 5.50 | 6.00 | 2600 | 2700 | 3800 | 1.50x | 0.50x" \
        in text
    assert "throughput at 16 clients, batcher on / off: 1.50x (target >= 1.5x)" in text


def test_sweep_of_two_named_servers_gives_latency_and_throughput_ratios() -> None:
    """Ray Serve against the single-process server: the first's p50 at 1 client and throughput
    at 16 clients as speed ratios to the second's; an ingress has no vision batches to show."""
    ray = LoadCurve("ray serve", [1, 16], [4.0, 6.0], [250, 2000], [260, 2100], [270, 2200],
                    [0.0, 0.0])
    local = LoadCurve("single process", [1, 16], [5.0, 7.5], [200, 1900], [210, 2000],
                      [220, 2100], [1.0, 1.3])
    text = format_sweep(ray, local, compared=True)
    assert "1 | 4.00 | 250 | 260 | 270 | - | 5.00 |" in text
    assert "p50 at 1 client: ray serve 250.0 ms, single process 200.0 ms: speed 0.80x" in text
    assert "throughput at 16 clients, ray serve / single process: 0.80x" in text
    assert "target" not in text


def test_bench_load_labels_name_two_running_servers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "load", "--labels", "ray,local"]) == 2
    assert main(["bench", "load", "--url", "http://a", "--unbatched-url", "http://b",
                 "--labels", "just-one"]) == 2
    assert capsys.readouterr().err.count("--labels names the two running servers") == 2


@pytest.mark.parametrize("flags", [["--unbatched-url", "http://b", "--runtime", "onnxruntime"],
                                   ["--unbatched-url", "http://b", "--threads", "1"],
                                   ["--unbatched-url", "http://b", "--max-batch-size", "4"],
                                   []])
def test_bench_load_refuses_flags_it_cannot_apply(flags: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Two URLs or none; server flags only for servers it starts (nothing is contacted)."""
    assert main(["bench", "load", "--url", "http://a", *flags]) == 2
    assert "--url" in capsys.readouterr().err
