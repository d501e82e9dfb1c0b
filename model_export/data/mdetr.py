"""MDETR-style modulated COCO (GoldG: Flickr30k entities, GQA, RefCOCO in MDETR form) -> samples."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from model_export.data._common import (
    DataFormatError,
    check_spans,
    image_file,
    image_size_entry,
    read_json,
    require_keys,
    require_list,
    require_text,
    segmentation_to_rle,
    validated,
    xywh_to_xyxy,
)
from model_export.data.types import GroundedObject, GroundingSample, Span


def load_mdetr_grounding(
    annotation_json: Path | str,
    image_dir: Path | str,
    *,
    task: Literal["grounding", "referring"] = "grounding",
    check_images: bool = True,
) -> list[GroundingSample]:
    """Load an MDETR annotation file (`final_mixed_train.json`, `final_flickr_separateGT_*.json`,
    `finetune_refcoco_*.json`; github.com/ashkamath/mdetr, the GoldG data GLIP trains on).

    Format: COCO-like, but each `images` entry is one image-caption pair: {id, file_name, width,
    height, caption, original_img_id?, ...}; `annotations` [{image_id, bbox: [x, y, w, h],
    tokens_positive: [[start, end], ...] (character spans into that caption), phrase_ids?,
    category_id?, segmentation?}]; `categories` optional.

    One sample per image-caption entry, in file order. Each annotation is one object whose spans
    are its `tokens_positive`. The captions are natural sentences, so `detection_prompt` is False:
    a "person" region here must not become a positive for "person" in other captions of the batch.
    `label` is the category name when the file has categories and the annotation a category_id.
    `image_id` is the entry's `original_img_id` (the real image) when present, else its `id`.

    Args:
        annotation_json: the MDETR JSON file.
        image_dir: folder holding the `file_name`s (COCO train2014, flickr30k-images, GQA images).
        task: "grounding" (phrase grounding), or "referring" for MDETR's RefCOCO files.
        check_images: fail now if an image file is missing.

    Raises:
        DataFormatError (a ValueError) naming the file and entry: missing keys, box outside the
        image, span outside the caption, unknown image id.
    """
    path = Path(annotation_json)
    data = require_keys(read_json(path), ("images", "annotations"), path, "file")
    categories: dict[int, str] = {}
    for index, category in enumerate(require_list(data.get("categories", []), path, "categories")):
        require_keys(category, ("id", "name"), path, f"categories[{index}]")
        categories[category["id"]] = category["name"]

    entries: dict[int, dict] = {}
    for index, image in enumerate(require_list(data["images"], path, "'images'")):
        where = f"images[{index}]"
        require_keys(image, ("id", "file_name", "width", "height", "caption"), path, where)
        image_size_entry(image, path, where)
        require_text(image["caption"], path, f"{where} caption")
        if image["id"] in entries:
            raise DataFormatError(path, f"{where}: duplicate image id {image['id']!r}")
        entries[image["id"]] = image

    grounded: dict[int, list[tuple[GroundedObject, list[Span]]]] = {i: [] for i in entries}
    for index, ann in enumerate(require_list(data["annotations"], path, "'annotations'")):
        where = f"annotations[{index}]"
        require_keys(ann, ("image_id", "bbox", "tokens_positive"), path, where)
        if ann.get("iscrowd", 0):
            continue
        image = entries.get(ann["image_id"])
        if image is None:
            raise DataFormatError(path, f"{where}: unknown image_id {ann['image_id']!r}")
        width, height = image_size_entry(image, path, where)
        spans = check_spans(ann["tokens_positive"], image["caption"], path, where)
        box = xywh_to_xyxy(ann["bbox"], width, height, path, where)
        if box is None:
            continue
        rle = segmentation_to_rle(ann.get("segmentation"), width, height, path, where)
        label = categories.get(ann["category_id"]) if "category_id" in ann else None
        grounded[ann["image_id"]].append((GroundedObject(box=box, label=label, rle=rle), spans))

    samples = []
    for image_id, image in entries.items():
        where = f"image {image_id}"
        width, height = image_size_entry(image, path, where)
        pairs = grounded[image_id]
        sample = GroundingSample(
            image_path=image_file(Path(image_dir), image["file_name"], check_images, path, where),
            width=width,
            height=height,
            task=task,
            caption=image["caption"],
            objects=[obj for obj, _ in pairs],
            spans=[spans for _, spans in pairs],
            detection_prompt=False,
            image_id=str(image.get("original_img_id", image_id)),
        )
        samples.append(validated(sample, path, where))
    return samples
