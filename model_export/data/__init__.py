"""Dataset loaders: real dataset formats and the shapes world -> one `GroundingSample` type.

Every loader returns `list[GroundingSample]` and raises `DataFormatError` (a ValueError naming the
file and entry) on malformed input, so the trainer never needs to know which format a sample came
from.
"""

from model_export.data._common import BOX_TOLERANCE_PX, DataFormatError
from model_export.data.coco_captions import load_coco_captions
from model_export.data.coco_detection import load_coco_detection
from model_export.data.mdetr import load_mdetr_grounding
from model_export.data.referring import load_phrasecut, load_referring
from model_export.data.types import (
    TASKS,
    GroundedObject,
    GroundingSample,
    Task,
)
from model_export.data.vqa import load_vqa_v2
from model_export.data.world.records import is_attribute_phrase, load_world

__all__ = [
    "BOX_TOLERANCE_PX",
    "TASKS",
    "DataFormatError",
    "GroundedObject",
    "GroundingSample",
    "Task",
    "is_attribute_phrase",
    "load_coco_captions",
    "load_coco_detection",
    "load_mdetr_grounding",
    "load_phrasecut",
    "load_referring",
    "load_vqa_v2",
    "load_world",
]
