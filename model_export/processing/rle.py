"""COCO run-length encoding of boolean masks: the project's one encoder and one decoder.

Records, HTTP responses and COCO files carry the JSON form, `{"size": [H, W], "counts": str}`;
pycocotools reads `counts` as str or bytes, so masks loaded from any source decode the same way.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) boolean mask -> compressed COCO RLE with `counts` as a JSON-ready str."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    """(H, W) bool mask of a COCO RLE whose `counts` is str or bytes."""
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's `__array__(copy=...)` deprecation on every call.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(_native(rle)).astype(bool)


def mask_area(rle: dict[str, Any]) -> int:
    """Number of mask pixels, counted on the RLE without decoding it."""
    return int(mask_utils.area(_native(rle)))


def _native(rle: dict[str, Any]) -> dict[str, Any]:
    """The RLE as pycocotools' C functions take it: `counts` as bytes, `size` as a list."""
    counts = rle["counts"]
    return {"size": list(rle["size"]),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
