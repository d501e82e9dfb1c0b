"""Ground truth of one image, as the detection losses and L_inter read it."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ImageTargets:
    """Ground truth of one image.

    Attributes:
        boxes: (K, 4) float xyxy pixels in the model-input frame (resized, before padding).
        positive_map: (K, T) float 0/1: the tokens of this image's caption each box is positive
            for. T is the batch's padded token count (the width of `token_logits`).
        box_labels: K category names (e.g. "circle"), used for L_inter label propagation.
    """

    boxes: Tensor
    positive_map: Tensor
    box_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.boxes.dim() != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be (K, 4), got {tuple(self.boxes.shape)}")
        if self.positive_map.dim() != 2 or self.positive_map.shape[0] != self.boxes.shape[0]:
            raise ValueError(
                f"positive_map must be (K, T) with K = {self.boxes.shape[0]}, "
                f"got {tuple(self.positive_map.shape)}"
            )
        if self.box_labels and len(self.box_labels) != self.boxes.shape[0]:
            raise ValueError(
                f"{len(self.box_labels)} box labels for {self.boxes.shape[0]} boxes"
            )

