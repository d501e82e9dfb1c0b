"""COCO Captions -> captioning samples."""

from __future__ import annotations

from pathlib import Path

from model_export.data._common import (
    DataFormatError,
    image_file,
    image_size_entry,
    read_json,
    require_keys,
    require_list,
    require_text,
    validated,
)
from model_export.data.types import GroundingSample


def load_coco_captions(
    captions_json: Path | str, image_dir: Path | str, *, check_images: bool = True
) -> list[GroundingSample]:
    """Load COCO Captions (`captions_train2017.json`, cocodataset.org/#download).

    Format: `images` [{id, file_name, width, height}], `annotations` [{id, image_id, caption}],
    five or so captions per image.

    One caption sample per caption annotation, in file order. The caption is stripped of the
    stray spaces and newlines COCO captions carry, and is both `caption_target` (what to
    generate) and `caption` (what the causal language model reads under teacher forcing). COCO
    captions carry no grounding: no objects, no spans. detection_prompt False.

    Args:
        captions_json: the captions file.
        image_dir: folder holding the `file_name`s.
        check_images: fail now if an image file is missing.

    Raises:
        DataFormatError (a ValueError) naming the file and entry: missing keys, unknown image id,
        empty caption.
    """
    path = Path(captions_json)
    data = require_keys(read_json(path), ("images", "annotations"), path, "file")
    images: dict[object, dict] = {}
    for index, image in enumerate(require_list(data["images"], path, "'images'")):
        where = f"images[{index}]"
        require_keys(image, ("id", "file_name", "width", "height"), path, where)
        image_size_entry(image, path, where)
        images[image["id"]] = image

    image_paths: dict[object, Path] = {}
    samples = []
    for index, ann in enumerate(require_list(data["annotations"], path, "'annotations'")):
        where = f"annotations[{index}]"
        require_keys(ann, ("image_id", "caption"), path, where)
        image = images.get(ann["image_id"])
        if image is None:
            raise DataFormatError(path, f"{where}: unknown image_id {ann['image_id']!r}")
        text = require_text(ann["caption"], path, f"{where} caption").strip()
        if ann["image_id"] not in image_paths:
            image_paths[ann["image_id"]] = image_file(
                Path(image_dir), image["file_name"], check_images, path, where
            )
        width, height = image_size_entry(image, path, where)
        sample = GroundingSample(
            image_path=image_paths[ann["image_id"]],
            width=width,
            height=height,
            task="caption",
            caption=text,
            detection_prompt=False,
            caption_target=text,
            image_id=str(ann["image_id"]),
        )
        samples.append(validated(sample, path, where))
    return samples
