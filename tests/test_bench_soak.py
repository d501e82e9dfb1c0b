"""`glipv2 bench soak` end to end on the tiny model: a short soak, then SIGTERM under load."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from benchmarks.soak import Drain, Minute, bench_soak, format_drain, format_soak
from model_export.checkpoints.weights import save_model
from model_export.modeling.model import Glipv2Model


def test_a_short_soak_and_its_drain(tiny_model: Glipv2Model, tmp_path: Path) -> None:
    model_dir = save_model(tiny_model, tmp_path / "model", external_language=True)
    minutes, drain = bench_soak(0.25, 4, model_dir=str(model_dir), distinct_images=2)
    (minute,) = minutes
    assert minute.statuses[200] > 0 and set(minute.statuses) <= {200, 429}, minute.statuses
    assert minute.rss_bytes is not None and minute.rss_bytes > 1e6
    assert drain is not None and drain.exit_code == 0, format_drain(drain)
    assert set(drain.in_flight) <= {"200", "429 overloaded", "429 queue_full"}, drain.in_flight
    assert drain.in_flight["200"] > 0
    assert set(drain.after) <= {"503 shutting_down", "no connection"}, drain.after
    assert "errors other than 429: none" in format_soak(minutes, 4)


def test_the_summary_checks_the_goals() -> None:
    first = Minute(Counter({200: 10}), [0.1] * 10, 100e6)
    last = Minute(Counter({200: 9, 500: 1}), [0.2] * 9, 120e6, Counter({(500, "/v1/vqa"): 1}))
    text = format_soak([first, last], 32)
    assert "RSS growth first -> last minute: +20.0 %" in text
    assert "p99 last / first minute: 2.00x" in text
    assert "errors other than 429: 500 /v1/vqa: 1" in text
    drain = Drain(Counter({"200": 5}), Counter({"503 shutting_down": 3}), 0, 2.5)
    assert format_drain(drain) == ("SIGTERM under load: sent before it: 200: 5; sent after it: "
                                   "503 shutting_down: 3; exit code 0 after 2.5 s")
