"""`glipv2 bench report` output: the Markdown report and its plots (from given measurements)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from service.bench_load import Phase, format_phases
from service.bench_report import LoadCurve, write_report
from service.bench_runtimes import BenchResult


def test_report_has_tables_and_real_plots(tmp_path: Path) -> None:
    curves = [LoadCurve("batcher on", [1, 2, 4], [1.5, 2.8, 4.9], [600, 700, 800],
                        [700, 900, 1000]),
              LoadCurve("batcher off", [1, 2, 4], [1.5, 1.9, 2.0], [600, 1000, 2000],
                        [700, 1300, 2600])]
    runtimes = BenchResult(runtimes=["pytorch fp32", "onnxruntime fp32"],
                           latency_ms={"vision": {"pytorch fp32": 80.0,
                                                  "onnxruntime fp32": 40.0},
                                       "fusion": {"pytorch fp32": 70.0}})
    path = write_report(tmp_path, curves, runtimes, "Synthetic numbers.")
    text = path.read_text()
    assert "| batcher on | 4 | 4.90 | 800 | 1000 |" in text
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
