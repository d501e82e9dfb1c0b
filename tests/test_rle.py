"""The one COCO RLE codec: JSON-ready str counts, decodes str and bytes alike."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from model_export.processing.rle import decode_mask, encode_mask, mask_area


def test_round_trip_with_json_ready_counts() -> None:
    mask = np.zeros((7, 9), dtype=bool)
    mask[1:4, 2:8] = True
    mask[6, 0] = True
    rle = encode_mask(mask)
    assert rle["size"] == [7, 9] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_mask(rle), mask)
    assert mask_area(rle) == 19


def test_decodes_pycocotools_bytes_counts() -> None:
    mask = np.eye(5, dtype=bool)
    native = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert isinstance(native["counts"], bytes)
    assert np.array_equal(decode_mask(native), mask)
    assert mask_area(native) == 5


def test_rejects_a_mask_that_is_not_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_mask(np.zeros((2, 3, 4), dtype=bool))
