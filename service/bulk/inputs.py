"""What bulk inference reads: a folder of images, or a table of image paths or base64 images
(Parquet or JSON Lines; one file, or a folder of them), on a local disk or behind a URI that
pyarrow's filesystems read (`s3://`, `gs://`, `hdfs://`: the filesystems Ray Data reads through).

Every input gets an id that is the same on every run over the same input, which is what a rerun
skips by: an image's path relative to the folder; a table row's `id` column, else its row index
in the table (its files in name order). The inputs become a Ray Dataset of work rows
(`WORK_SCHEMA`): the id, the image's path or its base64 text, or an error for a row that names
no image (it is answered with that error, never fails the run).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import posixpath
from collections.abc import Iterator, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from service.errors import InvalidJsonError, InvalidRequestError, PayloadTooLargeError
from service.jobs.runner import error_json

if TYPE_CHECKING:
    from ray.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TABLE_SUFFIXES = (".parquet", ".jsonl")
#: A work row: exactly one of `path` (a local path or URI) and `image` (base64), or `error` (the
#: JSON error object it is answered with).
WORK_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("image", pa.string()),
                         ("error", pa.string())])
_ROWS_PER_READ = 256  # table rows read and put out at once


class BulkInputError(ValueError):
    """The input cannot be read as a folder of images or a table (said why)."""


@functools.lru_cache(maxsize=16)
def _store(prefix: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem per `scheme://netloc` per process (an object store's client is costly)."""
    return pafs.FileSystem.from_uri(prefix)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a local path or a URI, and the path on it."""
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    scheme, rest = uri.split("://", 1)
    netloc, _, key = rest.partition("/")
    filesystem, base = _store(f"{scheme}://{netloc}")
    return filesystem, posixpath.join(base, key) if key else base


def read_image_file(uri: str, max_bytes: int) -> bytes:
    """An input's bytes; `InvalidRequestError` (as `/v1/jobs` says for a file it cannot read) or
    `PayloadTooLargeError` past `max_bytes`, read no further."""
    try:
        filesystem, path = resolve(uri)
        with filesystem.open_input_stream(path) as stream:
            data = stream.read(max_bytes + 1)
    except OSError as exc:  # pyarrow's I/O errors are OSErrors too
        raise InvalidRequestError(f"cannot read {uri!r}: {exc}") from None
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"{uri!r} is more than the limit of {max_bytes} bytes")
    return data


def _join(folder: str, name: str) -> str:
    return name if "://" in name or name.startswith("/") else posixpath.join(folder, name)


@dataclass(frozen=True)
class BulkInput:
    """A resolved `--input`. uri: its folder (or table file) as a local path or URI; files: its
    image or table files relative to `uri`'s folder, in name order; rows: a table's rows per
    file."""

    uri: str
    kind: Literal["images", "table"]
    files: tuple[str, ...]
    rows: tuple[int, ...] = ()

    @property
    def total(self) -> int:
        return len(self.files) if self.kind == "images" else sum(self.rows)

    def dataset(self, done: Set[str], rows_per_block: int) -> Dataset:
        """The inputs without a result yet (ids not in `done`) as a Ray Dataset of work rows,
        in blocks of `rows_per_block`: an actor answers a block per call and its answers come
        back per block, so the progress, and what a kill loses, are a block's worth.

        A folder's blocks are made here, and go straight to the actors. A table is read by Ray
        tasks, one per file (`done` goes with each), which need a CPU the actors leave free."""
        import ray.data

        if self.kind == "images":
            todo = [name for name in self.files if name not in done]
            blocks = [pa.table({"id": chunk, "path": [_join(self.uri, n) for n in chunk],
                                "image": [None] * len(chunk), "error": [None] * len(chunk)},
                               schema=WORK_SCHEMA)
                      for chunk in (todo[i:i + rows_per_block]
                                    for i in range(0, len(todo), rows_per_block))]
            return ray.data.from_arrow(blocks or [WORK_SCHEMA.empty_table()])
        offsets = itertools.accumulate(self.rows[:-1], initial=0)  # each file's first row
        files = ray.data.from_items([{"file": _join(self.uri, name), "first_row": offset}
                                     for name, offset in zip(self.files, offsets, strict=True)])
        rows = files.map_batches(functools.partial(read_table_files, done=frozenset(done)),
                                 batch_size=1, batch_format="pyarrow")
        # Fused into the read (Ray Data's rule): its tasks put out blocks of this many rows.
        return rows.repartition(target_num_rows_per_block=rows_per_block)


def open_input(uri: str) -> BulkInput:
    """List `uri`: a folder of images (in subfolders too; other files ignored), a `.parquet` or
    `.jsonl` table, or a folder of table files (and no images). Hidden files (`.name`) are
    skipped."""
    filesystem, root = resolve(uri)
    uri = root if "://" not in uri else uri.rstrip("/")
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise BulkInputError(f"no such input: {uri}")
    if info.type == pafs.FileType.File:
        if not root.endswith(TABLE_SUFFIXES):
            raise BulkInputError(f"{uri} is a file but not a table (.parquet or .jsonl); give a "
                                 "folder of images or a table")
        folder, name = posixpath.split(uri)
        return BulkInput(folder, "table", (name,), (_count_rows(uri),))
    names = sorted(posixpath.relpath(entry.path, root) for entry in filesystem.get_file_info(
        pafs.FileSelector(root, recursive=True)) if entry.type == pafs.FileType.File)
    names = [n for n in names if not any(part.startswith(".") for part in n.split("/"))]
    images = tuple(n for n in names if n.lower().endswith(IMAGE_SUFFIXES))
    tables = tuple(n for n in names if n.endswith(TABLE_SUFFIXES))
    if images:  # its other files (a world's annotations.jsonl) are not inputs
        return BulkInput(uri, "images", images)
    if tables:
        return BulkInput(uri, "table", tables,
                         tuple(_count_rows(_join(uri, name)) for name in tables))
    raise BulkInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) and no tables "
                         f"({', '.join(TABLE_SUFFIXES)}) in {uri}")


def _count_rows(uri: str) -> int:
    """A table file's rows: Parquet's from its footer; JSON Lines' non-blank lines, read once
    (they give the rows their indices, and the progress bar its total)."""
    filesystem, path = resolve(uri)
    if path.endswith(".parquet"):
        with filesystem.open_input_file(path) as handle:
            return int(pq.ParquetFile(handle).metadata.num_rows)
    with filesystem.open_input_stream(path) as stream:
        return sum(1 for line in io.BufferedReader(stream) if line.strip())


def read_table_files(batch: pa.Table, done: frozenset[str]) -> Iterator[pa.Table]:
    """Ray Data's read of table files (rows `{file, first_row}`): their rows whose id is not in
    `done`, as work rows, a block at a time."""
    rows: list[dict[str, Any]] = []
    for unit in batch.to_pylist():
        folder = posixpath.dirname(unit["file"])
        for index, row in enumerate(_table_rows(unit["file"]), start=unit["first_row"]):
            work = _work_row(row, index, folder)
            if work["id"] not in done:
                rows.append(work)
            if len(rows) == _ROWS_PER_READ:
                yield pa.Table.from_pylist(rows, schema=WORK_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def _table_rows(uri: str) -> Iterator[dict[str, Any] | str]:
    """A table file's rows as dicts; a JSON Lines row that is no JSON object, as the error's
    message."""
    filesystem, path = resolve(uri)
    if path.endswith(".parquet"):
        with filesystem.open_input_file(path) as handle:
            table = pq.ParquetFile(handle)
            columns = [c for c in ("id", "path", "image") if c in table.schema_arrow.names]
            for record_batch in table.iter_batches(_ROWS_PER_READ, columns=columns):
                yield from record_batch.to_pylist()
        return
    with filesystem.open_input_stream(path) as stream:
        for number, line in enumerate(io.BufferedReader(stream), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                yield f"line {number} is not valid JSON: {exc}"
                continue
            yield row if isinstance(row, dict) else f"line {number} is not a JSON object"


def _work_row(row: dict[str, Any] | str, index: int, folder: str) -> dict[str, Any]:
    """A table row -> a work row: its id (the `id` column, else its row index), and its image's
    path (relative ones are relative to the table's folder) or base64 text, or an error."""
    if isinstance(row, str):
        return {"id": str(index), "path": None, "image": None,
                "error": error_json(InvalidJsonError.code, row)}
    row_id = str(index) if row.get("id") is None else str(row["id"])
    path, image = row.get("path"), row.get("image")
    if (path is None) == (image is None) or not isinstance(path or image, str):
        return {"id": row_id, "path": None, "image": None, "error": error_json(
            InvalidRequestError.code, "a row needs exactly one of `path` (an image file) and "
                                      "`image` (base64 text)")}
    return {"id": row_id, "path": None if path is None else _join(folder, path),
            "image": image, "error": None}
