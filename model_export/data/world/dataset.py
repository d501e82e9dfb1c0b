"""A world dataset on disk: `{i:06d}.png` images plus `annotations.jsonl` in WORLD.md's record
format, written by `generate_world` and read back by `read_records` / `objects_from_record`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from model_export.data.world.render import render_index
from model_export.data.world.scene import WorldImage, WorldObject
from model_export.data.world.vocabulary import Pairs, validate_pairs
from model_export.processing.rle import decode_mask, encode_mask


def to_record(world_image: WorldImage, file_name: str) -> dict[str, Any]:
    """The JSON record of one image in the format of WORLD.md (extra keys on questions only)."""
    objects = []
    for obj in world_image.objects:
        if obj.mask is None:
            raise ValueError(f"object {obj.id} has no mask to encode")
        objects.append(
            {
                "id": obj.id,
                "shape": obj.shape,
                "color": obj.color,
                "size": obj.size,
                "box": [int(v) for v in obj.box],
                "mask": encode_mask(obj.mask),
            }
        )
    return {
        "file": file_name,
        "width": world_image.width,
        "height": world_image.height,
        "objects": objects,
        "expressions": world_image.expressions,
        "questions": world_image.questions,
        "caption": world_image.caption,
        "caption_phrases": world_image.caption_phrases,
    }


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of an `annotations.jsonl` (or of a folder holding one), one dict per image."""
    path = Path(path)
    if path.is_dir():
        path = path / "annotations.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def objects_from_record(record: dict[str, Any], decode_masks: bool = True) -> list[WorldObject]:
    """The record's objects as WorldObjects (masks decoded unless `decode_masks` is False)."""
    return [
        WorldObject(
            id=int(o["id"]),
            shape=o["shape"],
            color=o["color"],
            size=o["size"],
            box=[int(v) for v in o["box"]],
            mask=decode_mask(o["mask"]) if decode_masks else None,
        )
        for o in record["objects"]
    ]


def generate_world(
    out_dir: str | Path,
    n: int,
    seed: int,
    exclude_pairs: Pairs = frozenset(),
    progress: bool = True,
) -> Path:
    """Render images 0..n-1 of dataset `seed` as `{i:06d}.png` plus `annotations.jsonl`.

    Deterministic: image i is `render_index(seed, i, exclude_pairs)`. Returns the path of the
    written `annotations.jsonl`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exclude_pairs = validate_pairs(exclude_pairs)
    annotations = out_dir / "annotations.jsonl"
    with annotations.open("w", encoding="utf-8") as f:
        for index in tqdm(range(n), desc="rendering world", disable=not progress):
            scene = render_index(seed, index, exclude_pairs)
            file_name = f"{index:06d}.png"
            scene.image.save(out_dir / file_name)
            f.write(json.dumps(to_record(scene, file_name)) + "\n")
    return annotations
