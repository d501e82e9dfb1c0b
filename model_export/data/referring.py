"""Referring expression segmentation data: RefCOCO/RefCOCO+/RefCOCOg and PhraseCut -> samples."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from model_export.data._common import (
    DataFormatError,
    image_file,
    image_size_entry,
    read_image_size,
    read_json,
    require_keys,
    require_list,
    require_text,
    segmentation_to_rle,
    validated,
    xywh_to_xyxy,
)
from model_export.data.coco_detection import coco_index
from model_export.data.types import GroundedObject, GroundingSample

PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only plain data (dict, list, str, numbers): `refs(unc).p` holds nothing else,
    and refusing every global keeps a tampered pickle from running code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: refs hold plain data only")


def _read_refs(path: Path) -> list[Any]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            with path.open("rb") as handle:
                # The UNC/UMD refs were pickled by Python 2: its byte strings are UTF-8 text.
                refs = _PlainDataUnpickler(handle, encoding="utf-8", errors="replace").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            raise DataFormatError(path, f"not a plain-data refs pickle: {error}") from error
    else:
        refs = read_json(path)
    return require_list(refs, path, "the refs file")


def load_referring(
    refs_json_or_pickle: Path | str,
    instances_json: Path | str,
    image_dir: Path | str,
    *,
    split: str | None = None,
    check_images: bool = True,
) -> list[GroundingSample]:
    """Load RefCOCO / RefCOCO+ / RefCOCOg (github.com/lichengunc/refer).

    Format: `refs(unc).p` / `refs(umd).p` (a Python pickle) or the same list as JSON:
    [{ref_id, ann_id, image_id, split, sentences: [{sent, raw?, sent_id?}], ...}], plus the
    dataset's `instances.json` (COCO train2014 instances with segmentation polygons) that the
    `ann_id`s point into.

    One referring sample per sentence, in file order: `caption` is the sentence's `sent`, the one
    object is the referred instance (box, category name as `label`, mask from its segmentation)
    and its span covers the whole sentence. Sentences are natural language: detection_prompt
    False.

    Args:
        refs_json_or_pickle: the refs file; `.p`/`.pkl`/`.pickle` is read as a pickle of plain
            data only (no code runs), anything else as JSON.
        instances_json: the COCO instances file.
        image_dir: folder with the COCO images (`train2014/`).
        split: keep only refs of this split ("train", "val", "testA", ...); None keeps all.
        check_images: fail now if an image file is missing.

    Raises:
        DataFormatError (a ValueError) naming the file and entry: missing keys, unknown ann_id or
        image_id, box outside the image.
    """
    refs_path, instances_path = Path(refs_json_or_pickle), Path(instances_json)
    refs = _read_refs(refs_path)
    images, categories, annotations, _ = coco_index(instances_path)
    annotations_by_id: dict[Any, dict] = {}
    for index, annotation in enumerate(annotations):
        require_keys(annotation, ("id", "image_id", "bbox"), instances_path,
                     f"annotations[{index}]")
        annotations_by_id[annotation["id"]] = annotation

    samples = []
    for index, ref in enumerate(refs):
        where = f"refs[{index}]"
        require_keys(ref, ("ann_id", "image_id", "split", "sentences"), refs_path, where)
        if split is not None and ref["split"] != split:
            continue
        ann = annotations_by_id.get(ref["ann_id"])
        if ann is None:
            raise DataFormatError(refs_path, f"{where}: ann_id {ref['ann_id']!r} not in instances")
        if ann["image_id"] != ref["image_id"]:
            raise DataFormatError(
                refs_path,
                f"{where}: image_id {ref['image_id']!r} != its annotation's {ann['image_id']!r}",
            )
        image = images.get(ref["image_id"])
        if image is None:
            raise DataFormatError(refs_path, f"{where}: image_id {ref['image_id']!r} unknown")
        ann_where = f"annotation {ann['id']}"
        width, height = image_size_entry(image, instances_path, f"image {image['id']}")
        box = xywh_to_xyxy(ann["bbox"], width, height, instances_path, ann_where)
        if box is None:
            raise DataFormatError(instances_path, f"{ann_where}: referred box has zero area")
        rle = segmentation_to_rle(ann.get("segmentation"), width, height, instances_path, ann_where)
        category_id = ann.get("category_id")
        label = categories.get(category_id) if category_id is not None else None
        obj = GroundedObject(box=box, label=label, rle=rle)
        image_path = image_file(Path(image_dir), image["file_name"], check_images, refs_path, where)
        for sent_index, sentence in enumerate(require_list(ref["sentences"], refs_path, where)):
            sent_where = f"{where} sentences[{sent_index}]"
            require_keys(sentence, ("sent",), refs_path, sent_where)
            text = require_text(sentence["sent"], refs_path, sent_where)
            sample = GroundingSample(
                image_path=image_path,
                width=width,
                height=height,
                task="referring",
                caption=text,
                objects=[obj],
                spans=[[(0, len(text))]],
                detection_prompt=False,
                image_id=str(ref["image_id"]),
            )
            samples.append(validated(sample, refs_path, sent_where))
    return samples


def load_phrasecut(
    refer_json: Path | str,
    image_dir: Path | str,
    *,
    image_name_format: str = "{image_id}.jpg",
) -> list[GroundingSample]:
    """Load VGPhraseCut (github.com/ChenyunWu/PhraseCutDataset) `refer_{split}.json`.

    Format: a list of {task_id?, image_id, phrase, instance_boxes: [[x, y, w, h], ...],
    Polygons: [per instance: [polygon: [[x, y], ...], ...]], phrase_structure?, ...}; the images
    are Visual Genome's, `images/{image_id}.jpg`.

    One referring sample per entry: `caption` is the phrase, one object per instance (box from
    `instance_boxes`, mask = union of that instance's polygons), each with a span covering the
    whole phrase. The file has no image sizes, so they are read from the image headers (the
    images must exist). detection_prompt False, as the design's referring data.

    Args:
        refer_json: the refer file.
        image_dir: the folder of Visual Genome images.
        image_name_format: file name of an image, formatted with `image_id`.

    Raises:
        DataFormatError (a ValueError) naming the file and entry: missing keys, box/polygon count
        mismatch, box outside the image, unreadable image.
    """
    path = Path(refer_json)
    entries = require_list(read_json(path), path, "the refer file")
    sizes: dict[Any, tuple[int, int]] = {}
    samples = []
    for index, entry in enumerate(entries):
        where = f"[{index}]"
        require_keys(entry, ("image_id", "phrase", "instance_boxes", "Polygons"), path, where)
        phrase = require_text(entry["phrase"], path, f"{where} phrase")
        boxes = require_list(entry["instance_boxes"], path, f"{where} instance_boxes")
        polygons = require_list(entry["Polygons"], path, f"{where} Polygons")
        if len(boxes) != len(polygons):
            raise DataFormatError(
                path, f"{where}: {len(boxes)} instance_boxes but {len(polygons)} Polygons"
            )
        image_path = Path(image_dir) / image_name_format.format(image_id=entry["image_id"])
        if image_path not in sizes:
            sizes[image_path] = read_image_size(image_path, path, where)
        width, height = sizes[image_path]
        objects = []
        for instance, (bbox, instance_polygons) in enumerate(zip(boxes, polygons, strict=True)):
            instance_where = f"{where} instance {instance}"
            box = xywh_to_xyxy(bbox, width, height, path, instance_where)
            if box is None:
                continue
            flat = _flatten_polygons(instance_polygons, path, instance_where)
            rle = segmentation_to_rle(flat, width, height, path, instance_where)
            objects.append(GroundedObject(box=box, rle=rle))
        sample = GroundingSample(
            image_path=image_path,
            width=width,
            height=height,
            task="referring",
            caption=phrase,
            objects=objects,
            spans=[[(0, len(phrase))] for _ in objects],
            detection_prompt=False,
            image_id=str(entry["image_id"]),
        )
        samples.append(validated(sample, path, where))
    return samples


def _flatten_polygons(instance_polygons: Any, path: Path, where: str) -> list[list[float]]:
    """PhraseCut polygons `[[[x, y], ...], ...]` -> COCO polygons `[[x, y, x, y, ...], ...]`."""
    flat = []
    for polygon in require_list(instance_polygons, path, f"{where} Polygons"):
        points = require_list(polygon, path, f"{where} polygon")
        if not all(isinstance(p, list | tuple) and len(p) == 2 for p in points):
            raise DataFormatError(path, f"{where}: polygon points must be [x, y] pairs")
        flat.append([coord for point in points for coord in point])
    return flat
