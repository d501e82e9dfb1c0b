"""COCO instances (object detection / instance segmentation) -> detection samples."""

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
    segmentation_to_rle,
    validated,
    xywh_to_xyxy,
)
from model_export.data.types import GroundedObject, GroundingSample


def coco_index(
    annotation_json: Path,
) -> tuple[dict[int, dict], dict[int, str], list[dict], list[str]]:
    """Read and check a COCO instances file.

    Returns (images by id, category name by id, annotations, class names in category-id order).
    Shared with the RefCOCO loader, whose `instances.json` is the same format.
    """
    path = Path(annotation_json)
    data = require_keys(read_json(path), ("images", "annotations", "categories"), path, "file")
    images: dict[int, dict] = {}
    for index, image in enumerate(require_list(data["images"], path, "'images'")):
        where = f"images[{index}]"
        require_keys(image, ("id", "file_name", "width", "height"), path, where)
        image_size_entry(image, path, where)
        if image["id"] in images:
            raise DataFormatError(path, f"{where}: duplicate image id {image['id']!r}")
        images[image["id"]] = image
    categories: dict[int, str] = {}
    for index, category in enumerate(require_list(data["categories"], path, "'categories'")):
        where = f"categories[{index}]"
        require_keys(category, ("id", "name"), path, where)
        if category["id"] in categories:
            raise DataFormatError(path, f"{where}: duplicate category id {category['id']!r}")
        categories[category["id"]] = require_text(category["name"], path, f"{where} name")
    class_names = [categories[cid] for cid in sorted(categories)]
    if len(set(class_names)) != len(class_names):
        # Labels are matched to prompt phrases by name: two ids with one name are ambiguous.
        raise DataFormatError(path, "two categories share a name")
    annotations = require_list(data["annotations"], path, "'annotations'")
    return images, categories, annotations, class_names


def load_coco_detection(
    annotation_json: Path | str, image_dir: Path | str, *, check_images: bool = True
) -> list[GroundingSample]:
    """Load a COCO instances file (e.g. `instances_train2017.json`, LVIS, Objects365 in COCO form).

    Format (cocodataset.org/#format-data): `images` [{id, file_name, width, height}],
    `annotations` [{id, image_id, category_id, bbox: [x, y, w, h], iscrowd, segmentation?}],
    `categories` [{id, name}]. Segmentation is polygons `[[x, y, ...], ...]` or RLE.

    One detection sample per image, in file order, images without annotations included (they are
    negatives for the contrastive loss). Crowd annotations are skipped, as GLIP's COCO dataset
    does; zero-area boxes are dropped. `class_names` lists the category names in category-id
    order and the trainer turns them into the "cat. dog. ..." prompt, so `caption` stays "".

    Args:
        annotation_json: the instances file.
        image_dir: folder holding the `file_name`s.
        check_images: fail now if an image file is missing, rather than mid-epoch.

    Raises:
        DataFormatError (a ValueError) naming the file and entry: missing keys, unknown image or
        category id, box outside the image, malformed segmentation.
    """
    path = Path(annotation_json)
    images, categories, annotations, class_names = coco_index(path)
    objects_per_image: dict[int, list[GroundedObject]] = {image_id: [] for image_id in images}
    for index, ann in enumerate(annotations):
        where = f"annotations[{index}]"
        require_keys(ann, ("image_id", "category_id", "bbox"), path, where)
        if ann.get("iscrowd", 0):
            continue
        image = images.get(ann["image_id"])
        if image is None:
            raise DataFormatError(path, f"{where}: unknown image_id {ann['image_id']!r}")
        if ann["category_id"] not in categories:
            raise DataFormatError(path, f"{where}: unknown category_id {ann['category_id']!r}")
        width, height = image_size_entry(image, path, f"image {image['id']}")
        box = xywh_to_xyxy(ann["bbox"], width, height, path, where)
        if box is None:
            continue
        rle = segmentation_to_rle(ann.get("segmentation"), width, height, path, where)
        label = categories[ann["category_id"]]
        objects_per_image[ann["image_id"]].append(GroundedObject(box=box, label=label, rle=rle))

    samples = []
    for image_id, image in images.items():
        where = f"image {image_id}"
        width, height = image_size_entry(image, path, where)
        sample = GroundingSample(
            image_path=image_file(Path(image_dir), image["file_name"], check_images, path, where),
            width=width,
            height=height,
            task="detection",
            caption="",
            class_names=class_names,
            objects=objects_per_image[image_id],
            detection_prompt=True,
            image_id=str(image_id),
        )
        samples.append(validated(sample, path, where))
    return samples
