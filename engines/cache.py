"""A cache of ONNX exports keyed by the model's contents, so ONNX Runtime serves a model folder
with no prior `glipv2 export` (`glipv2 serve --runtime onnxruntime` without `--engines`).

`cached_engines(model_dir, cache_root)` returns `cache_root/<model name>-<key>/`, exporting the
model there on first use (fp32 and the int8 variant, so either precision serves from it). The
key is a SHA-256 over everything that decides what the export holds: `config.json` and
`model.safetensors`, `MANIFEST_FORMAT` (the graphs' interface), the opset and the variants. A
retrained model or a new export format therefore gets a folder of its own; old folders stay
until deleted. An entry is used only once `load_manifest` has verified every checksum, so a
corrupt or partial one is exported again.

Two processes (or threads) starting at once export once: an exclusive `flock` on
`cache_root/<entry>.lock` serialises them, and the one that waited finds the entry built. The
export goes into a temporary folder beside the entry and is renamed into place, so no reader ever
sees half an export; a process killed mid-export leaves only that temporary folder, which the next
exporter removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from engines.manifest import DEFAULT_OPSET, MANIFEST_FORMAT, load_manifest, sha256_file
from model_export.checkpoints.weights import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

# int8 adds about a third to the export time (6 of 19 s for the default model on 2 cores) and
# lets `--precision int8` serve from the same entry.
CACHE_VARIANTS = ("int8",)


def cache_key(model_dir: str | Path, opset: int = DEFAULT_OPSET,
              variants: Sequence[str] = CACHE_VARIANTS) -> str:
    """`<model folder name>-<16 hex digits>`: the entry name of this model's export."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256(
        f"{MANIFEST_FORMAT}\nopset {opset}\nvariants {','.join(variants)}\n".encode())
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest.update(f"{name} {sha256_file(model_dir / name)}\n".encode())
    return f"{model_dir.resolve().name}-{digest.hexdigest()[:16]}"


def cached_engines(model_dir: str | Path, cache_root: str | Path, *, opset: int = DEFAULT_OPSET,
                   variants: Sequence[str] = CACHE_VARIANTS) -> Path:
    """The engine folder of the model in `model_dir`, exported into `cache_root` if absent or
    unusable; verified against its manifest checksums before it is returned."""
    model_dir, cache_root = Path(model_dir), Path(cache_root)
    key = cache_key(model_dir, opset, variants)
    entry = cache_root / key
    cache_root.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache_root / f"{key}.lock", entry):
        problem = _problem(entry)
        if problem is None:
            log.info("using the cached ONNX export of %s: %s", model_dir, entry)
            return entry
        if entry.exists():
            log.warning("the cached export %s is unusable (%s); exporting again", entry, problem)
            shutil.rmtree(entry)
        _export(model_dir, entry, opset, variants)
    return entry


@contextlib.contextmanager
def _exclusive(lock_path: Path, entry: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path`. Every call opens its own descriptor, so threads
    of one process exclude each other as processes do; the kernel releases it if we die."""
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process exporting into %s", entry)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _problem(entry: Path) -> str | None:
    """Why `entry` cannot be served (absent, or what `load_manifest` found), or None."""
    if not entry.is_dir():
        return "absent"
    try:
        load_manifest(entry)
    # ManifestError (a ValueError) for what it checks; a hand-edited manifest.json can also
    # lack a graph's keys or name a file that is not one.
    except (ValueError, KeyError, OSError) as exc:
        return str(exc)
    return None


def _export(model_dir: Path, entry: Path, opset: int, variants: Sequence[str]) -> None:
    """Export into a temporary folder beside `entry`, then rename it into place (atomic)."""
    from engines.export import export_model

    for stale in entry.parent.glob(f".{entry.name}.*"):  # left by an exporter that died
        shutil.rmtree(stale, ignore_errors=True)
    log.info("exporting %s to ONNX once (fp32, %s), cached in %s", model_dir,
             ", ".join(variants) or "no variants", entry)
    started = time.perf_counter()
    temporary = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        export_model(model_dir, temporary, opset=opset, variants=variants,
                     progress=lambda graph: log.info("exporting %s", graph))
        temporary.rename(entry)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    log.info("exported %s in %.1f s", model_dir, time.perf_counter() - started)
