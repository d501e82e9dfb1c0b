"""Where bulk inference writes: Parquet part files under the output folder, one row per input,
written so that a run stopped at any point (SIGKILL included) leaves only complete files.

Layout of `--output DIR`:
- `DIR/parquet/part-<time>-<random>.parquet`: rows `{id, path, result, error}`
  (`RESULT_SCHEMA`). Each part is written under a hidden temporary name, flushed to disk, then
  renamed: a part either exists whole or not at all, and its rows carry their ids, so the ids
  that have a result are the ids in the parts. A killed run's temporary file is removed by the
  next run.
- `DIR/_run.json`: what the results answer (task, parameters, input, model); a rerun over the
  same folder must ask the same, or it is refused rather than mixing answers.
- `DIR/_lock`: held (`flock`) while a run writes; the kernel releases it when the run dies.
- `DIR/results.jsonl` (`--jsonl`): the parts as JSON Lines, rewritten at the end of a run.

One writer, the driver, writes every part and drops a row whose id already has one (an input a
retried Ray task answered twice, or a table's repeated id), so an id is in the parts once.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

#: A result row: `result` is the online endpoint's JSON answer, `error` the error object
#: `{"code", "message"}` of a bad input (exactly one of them is set).
RESULT_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), ("path", pa.string()),
                          ("result", pa.string()), ("error", pa.string())])
PARTS = "parquet"


class BulkOutputError(ValueError):
    """The output folder cannot take this run (said why)."""


class ResultWriter:
    """Appends result rows to `out`, a part file per `rows_per_file` rows or per `flush_s`
    seconds, whichever comes first (what a kill can lose); `done` holds every id with a row."""

    def __init__(self, out: Path, run: dict[str, Any], rows_per_file: int = 1000,
                 flush_s: float = 30.0) -> None:
        self.out = out
        self.parts = out / PARTS
        self.parts.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self.flush_s = flush_s
        self._lock = _lock(out / "_lock")
        try:
            _check_run(out / "_run.json", run)
            for leftover in self.parts.glob(".part-*.tmp"):  # a killed run's unfinished part
                leftover.unlink()
            self.done: set[str] = set()
            for part in self._part_files():
                self.done.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
        except BaseException:
            self._lock.close()
            raise
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._first_buffered_s = 0.0

    def add(self, rows: pa.Table) -> pa.Table:
        """Buffer `rows` (RESULT_SCHEMA) less those whose id has a row already; returns the rows
        kept. Writes a part when the buffer is full or old enough."""
        ids = rows.column("id").to_pylist()
        keep = []
        for index, row_id in enumerate(ids):
            if row_id not in self.done:
                self.done.add(row_id)
                keep.append(index)
        kept = rows.take(keep) if len(keep) < len(ids) else rows
        if len(kept):
            if not self._buffer:
                self._first_buffered_s = time.monotonic()
            self._buffer.append(kept)
            self._buffered += len(kept)
        if self._buffered >= self.rows_per_file or (
                self._buffer and time.monotonic() - self._first_buffered_s >= self.flush_s):
            self.flush()
        return kept

    def flush(self) -> None:
        """Write the buffered rows as one part: a temporary name, fsync, rename, fsync the
        folder (a part is on disk whole before its name appears)."""
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"  # in writing order
        temporary = self.parts / f".{name}.tmp"
        with temporary.open("wb") as sink:
            pq.write_table(table, sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, self.parts / name)
        _fsync_dir(self.parts)
        self._buffer, self._buffered = [], 0

    def close(self) -> None:
        """Write what is buffered (every buffered row is a finished answer) and unlock."""
        try:
            self.flush()
        finally:
            self._lock.close()

    def export_jsonl(self) -> Path:
        """`results.jsonl` from the parts, one line per id: `{"id", "path", "result"}` or
        `{"id", "path", "error"}` with the JSON objects inline (not in input order)."""
        target = self.out / "results.jsonl"
        temporary = self.out / ".results.jsonl.tmp"
        seen: set[str] = set()
        with temporary.open("w", encoding="utf-8") as sink:
            for part in self._part_files():
                for row in pq.read_table(part).to_pylist():
                    if row["id"] in seen:
                        continue
                    seen.add(row["id"])
                    fields = [f'"id": {json.dumps(row["id"])}']
                    if row["path"] is not None:
                        fields.append(f'"path": {json.dumps(row["path"])}')
                    key = "result" if row["result"] is not None else "error"
                    fields.append(f'"{key}": {row[key]}')
                    sink.write("{" + ", ".join(fields) + "}\n")
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, target)
        return target

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))


def read_results(out: Path) -> pa.Table:
    """Every result row of an output folder (its complete parts)."""
    parts = sorted((out / PARTS).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else (
        RESULT_SCHEMA.empty_table())


def _lock(path: Path) -> IO[str]:
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise BulkOutputError(f"another run is writing to {path.parent}") from None
    return handle


def _check_run(path: Path, run: dict[str, Any]) -> None:
    """Record `run` in a new output folder; refuse a folder that answers another run."""
    if not path.exists():
        temporary = path.with_name(".run.json.tmp")
        temporary.write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, path)
        return
    recorded = json.loads(path.read_text())
    if recorded != json.loads(json.dumps(run)):
        differ = sorted(k for k in recorded.keys() | run.keys() if recorded.get(k) != run.get(k))
        raise BulkOutputError(
            f"{path.parent} holds the results of another run (its {', '.join(differ)} "
            f"differ: {path} has {json.dumps({k: recorded.get(k) for k in differ})}); give "
            "another --output, or the same task, parameters, input and model to resume it")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
