"""Bulk inference on Ray Data (`glipv2 batch run`, `service/bulk/`) on the tiny random model.

On the session's local Ray (conftest's `ray_cluster`, logical resources): 200 world images and a
bad one answer exactly as `/v1/detect` does, the bad one as an error row with the online error;
a table names its inputs by `id` or row index, by path or base64, and a rerun skips what is
answered. The output's writer keeps one row per id and never reads a killed run's unfinished
part. And the command itself, with a Ray of its own, SIGKILLed mid-run then rerun: one row per
input, 200 rows.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engines.runtimes.torch_eager import TorchRuntime
from model_export.checkpoints.weights import save_model
from model_export.data.world import SHAPES, render_index
from service.app import create_app
from service.settings import ServiceSettings

from conftest import assert_same_answer, tiny_serving_model

pytest.importorskip("ray.data", reason="bulk inference needs the `ray` extra: "
                                       "pip install -e '.[ray]'")

import pyarrow as pa  # the `ray` extra's, with Ray Data
import pyarrow.parquet as pq

from service.bulk.output import (
    RESULT_SCHEMA,
    BulkOutputError,
    ResultWriter,
    read_results,
)
from service.bulk.run import BulkOptions, run_bulk

REPO = Path(__file__).resolve().parent.parent
PARAMS = {"classes": list(SHAPES), "threshold": 0.0}
IMAGES = 200
OPTIONS = BulkOptions(batch_size=16, max_actors=1, rows_per_file=50, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tiny_serving_model(), tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def settings(model_dir: Path) -> ServiceSettings:
    """The actors' and the online app's settings: one compute thread each."""
    return ServiceSettings(model_dir=model_dir, model_name="tiny", caption_max_tokens=4,
                           api_keys=[], threads=1)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 world images (crops of 25 renders, at most 160 px: the tiny model reads 96-128),
    half of them in a subfolder."""
    folder = tmp_path_factory.mktemp("world")
    (folder / "more").mkdir()
    for index in range(IMAGES):
        image = render_index(3, index // 8).image
        width, height = image.size
        step = index % 8
        crop = image.crop((step * width // 16, step * height // 16, width, height))
        crop.thumbnail((160, 160))
        crop.save(folder / ("more" if index % 2 else "") / f"{index:03d}.png")
    return folder


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_writer_keeps_one_row_per_id_and_never_reads_an_unfinished_part(tmp_path: Path) -> None:
    run = {"task": "detect", "params": PARAMS, "input": "/in", "model": "tiny"}

    def rows(*ids: str) -> pa.Table:
        return pa.Table.from_pylist([{"id": i, "path": None, "result": "{}", "error": None}
                                     for i in ids], schema=RESULT_SCHEMA)

    writer = ResultWriter(tmp_path, run, rows_per_file=2)
    with pytest.raises(BulkOutputError, match="another run is writing"):
        ResultWriter(tmp_path, run)  # the lock: one writer per output folder
    assert writer.add(rows("a", "b", "a")).column("id").to_pylist() == ["a", "b"]
    assert writer.add(rows("b", "c")).column("id").to_pylist() == ["c"]  # buffered, not written
    writer._lock.close()  # as a SIGKILL would: "c" was never written
    killed_part = tmp_path / "parquet" / ".part-killed.parquet.tmp"
    killed_part.write_bytes(b"PAR1 half a file")

    resumed = ResultWriter(tmp_path, run)
    assert resumed.done == {"a", "b"} and not killed_part.exists()
    resumed.add(rows("c", "a"))
    resumed.close()
    assert sorted(read_results(tmp_path).column("id").to_pylist()) == ["a", "b", "c"]
    with pytest.raises(BulkOutputError, match="params differ"):
        ResultWriter(tmp_path, run | {"params": {"classes": ["star"]}})


def test_results_equal_the_online_endpoint_and_a_bad_image_is_an_error_row(
        ray_cluster: int, settings: ServiceSettings, world_dir: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    shutil.copytree(world_dir, inputs)
    bad = b"GIF89a, not an image we take"
    (inputs / "bad.png").write_bytes(bad)

    summary = run_bulk(str(inputs), "detect", PARAMS, tmp_path / "out", settings, OPTIONS)

    assert (summary.total, summary.answered, summary.failed) == (IMAGES + 1, IMAGES + 1, 1)
    rows = {row["id"]: row for row in read_results(tmp_path / "out").to_pylist()}
    names = {p.relative_to(inputs).as_posix() for p in inputs.rglob("*.png")}
    assert rows.keys() == names and "more/001.png" in names
    with TestClient(create_app(settings, TorchRuntime.from_dir(settings.model_dir, threads=1))
                    ) as client:
        online = client.post("/v1/detect", json={"image": b64(bad), **PARAMS})
        assert online.status_code == 415
        error = rows.pop("bad.png")
        assert error["result"] is None
        assert json.loads(error["error"]) == {
            k: v for k, v in online.json()["error"].items() if k != "request_id"}
        for name, row in rows.items():
            assert row["path"] == str(inputs / name) and row["error"] is None
            online = client.post("/v1/detect",
                                 json={"image": b64((inputs / name).read_bytes()), **PARAMS})
            assert_same_answer(json.loads(row["result"]), online.json())
    assert all(json.loads(row["result"])["detections"] for row in rows.values())


def test_a_table_names_inputs_by_id_or_row_index_and_a_rerun_skips_them(
        ray_cluster: int, settings: ServiceSettings, world_dir: Path, tmp_path: Path) -> None:
    table = tmp_path / "table"
    table.mkdir()
    first, second = world_dir / "000.png", world_dir / "more" / "001.png"
    lines = [json.dumps({"id": "by-path", "path": str(first)}),
             json.dumps({"id": 7, "image": b64(first.read_bytes())}),
             json.dumps({"id": "neither"}),
             "{not json",
             ""]  # blank lines are not rows
    (table / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({  # no id column: ids are row indices in the whole table
        "path": [os.path.relpath(second, table), None],
        "image": [None, b64(second.read_bytes())]}), table / "b.parquet")
    out = tmp_path / "out"

    summary = run_bulk(str(table), "detect", PARAMS, out, settings,
                       BulkOptions(max_actors=1, progress=False, jsonl=True))

    assert (summary.total, summary.answered, summary.failed) == (6, 6, 2)
    rows = {row["id"]: row for row in read_results(out).to_pylist()}
    assert rows.keys() == {"by-path", "7", "neither", "3", "4", "5"}
    assert json.loads(rows["neither"]["error"])["code"] == "invalid_request"
    assert json.loads(rows["3"]["error"])["code"] == "invalid_json"
    assert rows["by-path"]["result"] == rows["7"]["result"]  # a path and base64: one answer
    assert rows["4"]["result"] == rows["5"]["result"]
    assert rows["4"]["path"] == os.path.join(table, os.path.relpath(second, table))
    exported = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {line["id"]: line.get("result") for line in exported} == {
        i: None if row["result"] is None else json.loads(row["result"])
        for i, row in rows.items()}

    again = run_bulk(str(table), "detect", PARAMS, out, settings, BulkOptions(progress=False))
    assert (again.skipped, again.answered) == (6, 0)
    with pytest.raises(BulkOutputError, match="task"):
        run_bulk(str(table), "caption", {}, out, settings, BulkOptions(progress=False))


def test_a_run_killed_with_sigkill_finishes_on_rerun_with_one_row_per_input(
        model_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    """`glipv2 batch run` in a subprocess (its own local Ray), killed once its first part file
    is written, then run again to the end."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cli.main", "batch", "run", "--input", str(world_dir),
               "--task", "detect", "--params", json.dumps(PARAMS), "--output", str(out),
               "--model", str(model_dir), "--threads", "1", "--batch-size", "8",
               "--actors", "1", "--rows-per-file", "10", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLIPV2_")
           and k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1", "GLIPV2_MODEL_NAME": "tiny"}
    with (tmp_path / "first.log").open("w") as log:
        # A session of its own: its Ray's processes can be cleaned up after its death.
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "parquet").glob("part-*.parquet")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no part file in 240 s"
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        written = read_results(out).num_rows
        assert 0 < written < IMAGES  # killed mid-run

        second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"{IMAGES - written} answered (" in second.stderr
    finally:
        with suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # the killed driver's Ray, left orphaned
    ids = read_results(out).column("id").to_pylist()
    assert len(ids) == IMAGES and len(set(ids)) == IMAGES
    assert set(ids) == {p.relative_to(world_dir).as_posix() for p in world_dir.rglob("*.png")}
    assert not list((out / "parquet").glob(".*"))
