"""Shared validation and conversion helpers of the dataset loaders.

Every problem is reported as a `DataFormatError` (a ValueError) that names the annotation file and
the offending entry, so a bad line in a 100k-entry file is found without a debugger.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from model_export.data.types import Box, GroundingSample, Span

# Real annotation files have boxes that overshoot the image by float rounding (COCO has boxes
# ending at 640.01 in 640-wide images). Within this tolerance a box is clipped to the image;
# beyond it, the box and the image size disagree and the file is rejected.
BOX_TOLERANCE_PX = 1.0


class DataFormatError(ValueError):
    """An annotation file does not follow its format; the message names the file and entry."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def read_json(path: Path) -> Any:
    """Parse a JSON file, reporting syntax errors with the file name."""
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise DataFormatError(path, f"not valid JSON: {error}") from error


def require_keys(entry: Any, keys: Iterable[str], path: Path, where: str) -> Mapping[str, Any]:
    """Check `entry` is a JSON object holding `keys`; return it."""
    if not isinstance(entry, Mapping):
        raise DataFormatError(path, f"{where} must be an object, got {type(entry).__name__}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise DataFormatError(path, f"{where} lacks key(s) {', '.join(map(repr, missing))}")
    return entry


def require_list(value: Any, path: Path, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise DataFormatError(path, f"{where} must be a list, got {type(value).__name__}")
    return value


def require_text(value: Any, path: Path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(path, f"{where} must be a non-empty string, got {value!r}")
    return value


def image_size_entry(entry: Mapping[str, Any], path: Path, where: str) -> tuple[int, int]:
    """(width, height) of a COCO-style image entry, checked positive integers."""
    width, height = entry["width"], entry["height"]
    valid = all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 and float(v).is_integer()
        for v in (width, height)
    )
    if not valid:
        raise DataFormatError(path, f"{where}: width/height must be positive integers")
    return int(width), int(height)


def _numbers(values: Any, count: int) -> list[float] | None:
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != count:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return None
    numbers = [float(v) for v in values]
    return numbers if all(np.isfinite(numbers)) else None


def xywh_to_xyxy(bbox: Any, width: int, height: int, path: Path, where: str) -> Box | None:
    """COCO `[x, y, w, h]` -> end-exclusive `(x0, y0, x0 + w, y0 + h)`, checked and clipped.

    Returns None for a zero-area box (after clipping): the reference drops those too
    (maskrcnn_benchmark `BoxList.clip_to_image(remove_empty=True)` in `COCODataset`).
    """
    numbers = _numbers(bbox, 4)
    if numbers is None:
        raise DataFormatError(path, f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = numbers
    if w < 0 or h < 0:
        raise DataFormatError(path, f"{where}: bbox {bbox!r} has a negative width or height")
    return clip_box((x, y, x + w, y + h), width, height, path, where)


def clip_box(box: Sequence[float], width: int, height: int, path: Path, where: str) -> Box | None:
    """Check an xyxy box lies in the image (within `BOX_TOLERANCE_PX`) and clip it to it.

    Returns None when the clipped box is empty.
    """
    numbers = _numbers(box, 4)
    if numbers is None:
        raise DataFormatError(path, f"{where}: box must be 4 numbers, got {box!r}")
    x0, y0, x1, y1 = numbers
    tol = BOX_TOLERANCE_PX
    if x1 < x0 or y1 < y0:
        raise DataFormatError(path, f"{where}: box {list(box)} has x1 < x0 or y1 < y0")
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise DataFormatError(
            path,
            f"{where}: box {[round(v, 2) for v in numbers]} outside the {width}x{height} image",
        )
    clipped = (
        min(max(x0, 0.0), width),
        min(max(y0, 0.0), height),
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
    )
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None
    return clipped


def check_spans(value: Any, caption: str, path: Path, where: str) -> list[Span]:
    """Validate `[[start, end], ...]` character spans into `caption`; return them as tuples."""
    if not isinstance(value, list):
        raise DataFormatError(path, f"{where}: spans must be a list of [start, end]")
    spans: list[Span] = []
    for span in value:
        valid = (
            isinstance(span, Sequence)
            and len(span) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
        )
        if not valid:
            raise DataFormatError(path, f"{where}: span {span!r} is not [start, end] integers")
        start, end = span
        if not 0 <= start < end <= len(caption):
            raise DataFormatError(
                path,
                f"{where}: span [{start}, {end}] outside the caption "
                f"({len(caption)} characters: {caption!r})",
            )
        spans.append((start, end))
    return spans


def segmentation_to_rle(
    segmentation: Any, width: int, height: int, path: Path, where: str
) -> dict[str, Any] | None:
    """COCO `segmentation` (polygons, uncompressed or compressed RLE) -> compressed RLE.

    Returns None for an absent/empty segmentation (so the object simply has no mask). Polygons
    with fewer than 3 points are dropped, as in maskrcnn_benchmark: pycocotools would read a
    4-number "polygon" as a box. Compressed counts are not decoded here: a full decode per
    instance would dominate loading COCO; pycocotools reports a corrupt string when decoding.
    """
    if segmentation is None or segmentation == []:
        return None
    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            coords = _numbers(polygon, len(polygon)) if isinstance(polygon, list) else None
            if coords is None or len(coords) % 2:
                raise DataFormatError(
                    path, f"{where}: polygon must be an even-length list of numbers [x, y, ...]"
                )
            if len(coords) >= 6:
                polygons.append(coords)
        if not polygons:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, Mapping):
        require_keys(segmentation, ("size", "counts"), path, f"{where} RLE segmentation")
        size = segmentation["size"]
        if list(size) != [height, width]:
            raise DataFormatError(
                path, f"{where}: RLE size {list(size)} != image (H, W) {[height, width]}"
            )
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE (crowd regions, some exports)
            rle = mask_utils.frPyObjects(dict(segmentation), height, width)
        elif isinstance(counts, str | bytes):
            rle = {"size": [height, width], "counts": counts}
        else:
            raise DataFormatError(path, f"{where}: RLE counts must be a string or a list")
    else:
        raise DataFormatError(path, f"{where}: segmentation must be polygons or RLE")
    counts = rle["counts"]
    return {
        "size": [height, width],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def image_file(image_dir: Path, name: str, check: bool, path: Path, where: str) -> Path:
    """`image_dir / name`, checked to exist when `check` (fail at load time, not mid-epoch)."""
    image_path = Path(image_dir) / name
    if check and not image_path.is_file():
        raise DataFormatError(path, f"{where}: image file {image_path} does not exist")
    return image_path


def read_image_size(image_path: Path, path: Path, where: str) -> tuple[int, int]:
    """(width, height) from the image header only, for formats that do not record the size."""
    try:
        with Image.open(image_path) as image:
            return image.size
    except FileNotFoundError as error:
        raise DataFormatError(path, f"{where}: image file {image_path} does not exist") from error
    except OSError as error:
        raise DataFormatError(path, f"{where}: cannot read image {image_path}: {error}") from error


def validated(sample: GroundingSample, path: Path, where: str) -> GroundingSample:
    """Run `GroundingSample.validate`, re-raising with the file and entry named."""
    try:
        sample.validate()
    except ValueError as error:
        raise DataFormatError(path, f"{where}: {error}") from error
    return sample
