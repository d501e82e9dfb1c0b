"""The one in-memory sample type every dataset loader produces.

Training code consumes only these types, so the same trainer runs on the synthetic shapes world
(`WORLD.md`) and on real datasets (COCO, MDETR GoldG, RefCOCO, PhraseCut, VQA v2, COCO Captions).

Box convention: `[x0, y0, x1, y1]` float pixels of the original image, end-exclusive — a COCO
`[x, y, w, h]` becomes `[x, y, x + w, y + h]`, and the world's `[x_min, y_min, x_max + 1,
y_max + 1]` is already in this form. This is the HTTP API's convention. The reference
(maskrcnn_benchmark `BoxList`) stores `x + w - 1` internally (legacy "+1" widths, see
`model_export.processing.box_coding.TO_REMOVE`); the trainer converts when it builds targets.

Masks are kept as compressed COCO RLE and decoded on access: decoded boolean masks of all COCO
instances would take hundreds of GB, their RLE a few hundred MB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from model_export.processing.rle import decode_mask, encode_mask, mask_area

Task = Literal["detection", "grounding", "referring", "vqa", "caption"]
TASKS: tuple[str, ...] = get_args(Task)

Box = tuple[float, float, float, float]
Span = tuple[int, int]


@dataclass(frozen=True, init=False)
class GroundedObject:
    """One object a text is grounded to. Frozen, so the samples of one image can share it.

    Construct with `GroundedObject(box, label, mask)` (mask: (H, W) bool array or None) or, from
    an RLE already at hand, `GroundedObject(box, label, rle=rle)`; `dataclasses.replace` works.

    Attributes:
        box: `(x0, y0, x1, y1)` float pixels of the original image, end-exclusive (module doc).
        label: category name for detection-style data (COCO, the world's shapes); None when the
            object is only named by a free-text phrase.
        rle: the mask as compressed COCO RLE `{"size": [H, W], "counts": bytes}`, or None.
        mask (property): the mask decoded from `rle`, a fresh (H, W) bool array, or None.
    """

    box: Box
    label: str | None = None
    rle: dict[str, Any] | None = field(default=None, repr=False)

    def __init__(
        self,
        box: Sequence[float],
        label: str | None = None,
        mask: np.ndarray | None = None,
        *,
        rle: dict[str, Any] | None = None,
    ) -> None:
        # A hand-written __init__ so `mask` can be an argument while the stored field is `rle`;
        # frozen, so attributes are set through object.__setattr__.
        if len(box) != 4:
            raise ValueError(f"box must have 4 numbers [x0, y0, x1, y1], got {box!r}")
        if mask is not None:
            if rle is not None:
                raise ValueError("pass either mask or rle, not both")
            rle = encode_mask(np.asarray(mask, dtype=bool))
        object.__setattr__(self, "box", tuple(float(v) for v in box))
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "rle", rle)

    @property
    def mask(self) -> np.ndarray | None:
        """(H, W) bool mask decoded from the RLE; None when the object has no mask."""
        if self.rle is None:
            return None
        return decode_mask(self.rle)

    @property
    def mask_size(self) -> tuple[int, int] | None:
        """(H, W) of the mask without decoding it; None without mask."""
        if self.rle is None:
            return None
        height, width = self.rle["size"]
        return int(height), int(width)

    @property
    def mask_area(self) -> int:
        """Number of mask pixels, computed on the RLE (0 without mask)."""
        return 0 if self.rle is None else mask_area(self.rle)


@dataclass
class GroundingSample:
    """One training example: one image and one text (or none, for plain detection).

    Attributes:
        image_path: the image file.
        width, height: size of the image in pixels; boxes and masks are in this frame.
        task: which head the example trains.
        caption: the text fed to the language encoder. "" for detection (the trainer builds the
            class-name prompt from `class_names`); the question for VQA; for captioning the
            caption itself (the LM reads it under a causal mask; `spans` index it).
        class_names: detection only: the dataset's category names, in category-id order.
        objects: the objects of the example: every annotated instance for detection, the
            referred/grounded objects otherwise (may be empty: an expression naming nothing).
        spans: per object, the `[start, end)` character spans of `caption` grounding it; `[]`
            when the task has no text grounding (detection, VQA, plain captions). When not
            empty, `len(spans) == len(objects)`.
        detection_prompt: True for class-name-like texts (detection prompts and attribute
            phrases such as "red circle"), False for natural sentences. L_inter propagates a
            region's label only to phrases of detection-prompt texts (GLIPv2 section 3.2).
        answer: VQA: the most common annotator answer (VQA v2 `multiple_choice_answer`).
        answers: VQA: all annotator answers, repeats kept (soft VQA scores count them).
        question_grounded: VQA: `objects`/`spans` ground the phrase the question names, with
            every object it matches (none: it names nothing in the image), so the question
            also trains the grounding losses (grounded VQA); off, only the answer is trained.
        answer_span: grounded VQA whose answer is an attribute of one object: the `[start, end)`
            of the words pointing at that object (the relation words "left of" in
            `what shape is left of the red circle?`); `objects`/`spans` ground it there too.
            The VQA head's steered glimpse reads these words (else the named ones).
        caption_target: captioning: the caption to generate.
        image_id: the dataset's image id, as a string.
    """

    image_path: Path
    width: int
    height: int
    task: Task
    caption: str = ""
    class_names: list[str] | None = None
    objects: list[GroundedObject] = field(default_factory=list)
    spans: list[list[Span]] = field(default_factory=list)
    detection_prompt: bool = False
    answer: str | None = None
    answers: list[str] = field(default_factory=list)
    question_grounded: bool = False
    answer_span: Span | None = None
    caption_target: str | None = None
    image_id: str = ""

    def validate(self) -> None:
        """Raise ValueError if the sample breaks the invariants the trainer relies on."""
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        if self.spans and len(self.spans) != len(self.objects):
            raise ValueError(
                f"{len(self.spans)} span lists for {len(self.objects)} objects; "
                "spans must be [] or one list per object"
            )
        for index, obj in enumerate(self.objects):
            x0, y0, x1, y1 = obj.box
            if not (0.0 <= x0 < x1 <= self.width and 0.0 <= y0 < y1 <= self.height):
                raise ValueError(
                    f"object {index}: box {list(obj.box)} is empty or outside the "
                    f"{self.width}x{self.height} image"
                )
            size = obj.mask_size
            if size is not None and size != (self.height, self.width):
                raise ValueError(
                    f"object {index}: mask size {list(size)} != image (H, W) "
                    f"{[self.height, self.width]}"
                )
        for index, spans_per_object in enumerate(self.spans):
            for start, end in spans_per_object:
                if not 0 <= start < end <= len(self.caption):
                    raise ValueError(
                        f"object {index}: span [{start}, {end}] outside the caption "
                        f"({len(self.caption)} characters)"
                    )
        if self.answer_span is not None:
            start, end = self.answer_span
            if not (self.question_grounded and 0 <= start < end <= len(self.caption)):
                raise ValueError(
                    f"answer_span [{start}, {end}] needs a grounded VQA question it lies in "
                    f"({len(self.caption)} characters)"
                )
        if self.task == "detection" and not self.class_names:
            raise ValueError("a detection sample needs class_names")
        if self.task == "detection":
            names = set(self.class_names or ())
            for index, obj in enumerate(self.objects):
                if obj.label not in names:
                    raise ValueError(f"object {index}: label {obj.label!r} not in class_names")
