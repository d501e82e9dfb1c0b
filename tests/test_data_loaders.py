"""Dataset loaders: each real format's tiny fixture -> GroundingSample, and malformed files."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest

from model_export.data import (
    DataFormatError,
    GroundedObject,
    GroundingSample,
    is_attribute_phrase,
    load_coco_captions,
    load_coco_detection,
    load_mdetr_grounding,
    load_phrasecut,
    load_referring,
    load_vqa_v2,
    load_world,
)
from model_export.data.world import ANSWERS, SHAPES

DATA = Path(__file__).parent / "fixtures" / "data"
WORLD = DATA / "world" / "annotations.jsonl"
SHARED_WORLD = Path("/work/shared/world-samples/annotations.jsonl")
IMAGE_FORMAT = "COCO_{split}_{image_id:012d}.png"  # the fixture images are PNG, VQA's are JPEG

# pycocotools 2.0.x `decode` trips numpy 2's __array__(copy=...) deprecation; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def read(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def rect(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# --- the common types -------------------------------------------------------------------------


def test_grounded_object_stores_mask_as_rle_and_decodes_it() -> None:
    mask = rect(24, 32, 2, 3, 12, 11)
    obj = GroundedObject(box=(2, 3, 12, 11), label="person", mask=mask)
    assert obj.box == (2.0, 3.0, 12.0, 11.0)
    assert isinstance(obj.rle["counts"], str)
    assert obj.mask_size == (24, 32) and obj.mask_area == 80
    decoded = obj.mask
    assert decoded.dtype == bool and np.array_equal(decoded, mask)
    moved = dataclasses.replace(obj, box=(0, 0, 1, 1))  # keeps the mask
    assert np.array_equal(moved.mask, mask)
    assert GroundedObject(box=(0, 0, 1, 1)).mask is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.label = "dog"  # type: ignore[misc]
    with pytest.raises(ValueError, match="either mask or rle"):
        GroundedObject(box=(0, 0, 1, 1), mask=mask, rle=obj.rle)


def test_sample_validate_rejects_broken_invariants() -> None:
    obj = GroundedObject(box=(0, 0, 10, 10), label="dog")
    base = GroundingSample(
        image_path=Path("x.png"), width=20, height=20, task="grounding", caption="dog"
    )
    cases = {
        "outside": dataclasses.replace(
            base, objects=[GroundedObject(box=(0, 0, 30, 10))], spans=[[(0, 3)]]
        ),
        "caption": dataclasses.replace(base, objects=[obj], spans=[[(0, 4)]]),
        "per object": dataclasses.replace(base, objects=[obj, obj], spans=[[(0, 3)]]),
        "mask size": dataclasses.replace(
            base, objects=[GroundedObject(box=(0, 0, 5, 5), mask=np.ones((5, 5), bool))]
        ),
        "class_names": dataclasses.replace(base, task="detection", caption=""),
        "not in class_names": dataclasses.replace(
            base, task="detection", caption="", class_names=["cat"], objects=[obj]
        ),
    }
    for message, sample in cases.items():
        with pytest.raises(ValueError, match=message):
            sample.validate()
    dataclasses.replace(base, objects=[obj], spans=[[(0, 3)]]).validate()


# --- COCO detection ---------------------------------------------------------------------------


def test_coco_detection_fixture() -> None:
    samples = load_coco_detection(DATA / "coco_instances.json", DATA)
    assert [s.image_id for s in samples] == ["1", "2"]
    first, second = samples
    assert first.task == "detection" and first.caption == "" and first.detection_prompt
    assert first.class_names == ["person", "car", "dog"]  # category id order, not file order
    assert (first.width, first.height) == (32, 24)
    assert first.image_path == DATA / "COCO_val2014_000000000001.png"
    # the crowd annotation (103) is skipped
    assert [o.label for o in first.objects] == ["person", "dog"]
    assert [o.label for o in second.objects] == ["car", "person", "dog"]
    assert first.objects[0].box == (2.0, 3.0, 12.0, 11.0)  # xywh [2, 3, 10, 8] -> xyxy
    assert second.objects[0].box == (0.5, 1.5, 24.0, 32.0)
    assert second.objects[1].box == (10.0, 20.0, 24.0, 32.0)  # overshoot 0.4/0.3 px: clipped
    # polygon, compressed RLE, no segmentation, uncompressed RLE
    person, dog = first.objects
    assert person.mask.shape == (24, 32) and person.mask.sum() == 80
    assert np.array_equal(person.mask, rect(24, 32, 2, 3, 12, 11))
    assert np.array_equal(dog.mask, rect(24, 32, 20, 10, 28, 16))
    assert second.objects[0].mask is None and second.objects[1].mask is None
    assert np.array_equal(second.objects[2].mask, rect(32, 24, 1, 1, 5, 4))
    assert all(s.spans == [] for s in samples)


def broken_coco(tmp_path: Path, edit: Any) -> Path:
    data = read("coco_instances.json")
    edit(data)
    return write(tmp_path, "instances.json", data)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] lacks key\(s\) 'bbox'"),
        (lambda d: d["annotations"][0].update(bbox=[25, 3, 10, 8]), "outside the 32x24 image"),
        (lambda d: d["annotations"][0].update(bbox=[2, 3, -1, 8]), "negative width"),
        (lambda d: d["annotations"][0].update(bbox=[2, 3, 8]), "4 numbers"),
        (lambda d: d["annotations"][0].update(category_id=99), "unknown category_id 99"),
        (lambda d: d["annotations"][0].update(image_id=7), "unknown image_id 7"),
        (lambda d: d["images"][0].pop("width"), "lacks key"),
        (lambda d: d["categories"].append({"id": 5, "name": "dog"}), "share a name"),
        (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]), "polygon"),
        (
            lambda d: d["annotations"][1]["segmentation"].update(size=[32, 24]),
            r"RLE size \[32, 24\]",
        ),
        (lambda d: d.pop("categories"), "file lacks key"),
    ],
)
def test_coco_detection_rejects_malformed(tmp_path: Path, edit: Any, message: str) -> None:
    path = broken_coco(tmp_path, edit)
    with pytest.raises(DataFormatError, match=message) as info:
        load_coco_detection(path, DATA)
    assert str(path) in str(info.value)


def test_coco_detection_missing_image_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="does not exist"):
        load_coco_detection(DATA / "coco_instances.json", tmp_path)
    assert len(load_coco_detection(DATA / "coco_instances.json", tmp_path, check_images=False)) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataFormatError, match="not valid JSON"):
        load_coco_detection(bad, DATA)


# --- MDETR grounding --------------------------------------------------------------------------


def test_mdetr_grounding_fixture() -> None:
    samples = load_mdetr_grounding(DATA / "mdetr_grounding.json", DATA)
    assert len(samples) == 2
    first, second = samples
    assert first.task == "grounding" and not first.detection_prompt
    assert first.image_id == "1"  # original_img_id, the real image
    assert first.spans == [[(0, 8)], [(15, 20)]]
    assert [first.caption[s:e] for [(s, e)] in first.spans] == ["a person", "a dog"]
    assert [o.box for o in first.objects] == [(2.0, 3.0, 12.0, 11.0), (20.0, 10.0, 28.0, 16.0)]
    assert [o.label for o in first.objects] == ["object", None]
    assert second.spans == [[(0, 3), (4, 13)], [(18, 25)]]
    assert second.caption[18:25] == "the car"
    referring = load_mdetr_grounding(DATA / "mdetr_grounding.json", DATA, task="referring")
    assert {s.task for s in referring} == {"referring"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["annotations"][0].update(tokens_positive=[[30, 40]]),
            r"span \[30, 40\] outside the caption",
        ),
        (lambda d: d["annotations"][0].update(tokens_positive=[[5, 2]]), "outside the caption"),
        (lambda d: d["annotations"][0].update(tokens_positive=[3]), r"not \[start, end\]"),
        (lambda d: d["annotations"][1].pop("tokens_positive"), "lacks key"),
        (lambda d: d["images"][0].pop("caption"), "lacks key"),
        (lambda d: d["annotations"][0].update(bbox=[2, 3, 40, 8]), "outside the 32x24 image"),
    ],
)
def test_mdetr_rejects_malformed(tmp_path: Path, edit: Any, message: str) -> None:
    data = read("mdetr_grounding.json")
    edit(data)
    path = write(tmp_path, "mdetr.json", data)
    with pytest.raises(DataFormatError, match=message):
        load_mdetr_grounding(path, DATA)


# --- RefCOCO and PhraseCut ---------------------------------------------------------------------


@pytest.mark.parametrize("refs", ["refcoco_refs.json", "refs(unc).p"])
def test_referring_fixture(refs: str) -> None:
    samples = load_referring(DATA / refs, DATA / "coco_instances.json", DATA)
    assert [s.caption for s in samples] == [
        "man on the left", "person", "dog right", "tiny dog top left"
    ]  # fmt: skip
    for sample in samples:
        assert sample.task == "referring" and not sample.detection_prompt
        assert sample.spans == [[(0, len(sample.caption))]]
        assert len(sample.objects) == 1
    man, _, dog, tiny = samples
    assert man.objects[0].label == "person" and man.objects[0].box == (2.0, 3.0, 12.0, 11.0)
    assert man.objects[0].mask.shape == (24, 32) and man.objects[0].mask.sum() == 80
    assert dog.objects[0].mask.sum() == 48
    assert (tiny.width, tiny.height) == (24, 32) and tiny.objects[0].mask.shape == (32, 24)
    only_val = load_referring(DATA / refs, DATA / "coco_instances.json", DATA, split="val")
    assert [s.caption for s in only_val] == ["dog right"]


def test_referring_rejects_malformed(tmp_path: Path) -> None:
    refs = read("refcoco_refs.json")
    refs[1]["ann_id"] = 999
    path = write(tmp_path, "refs.json", refs)
    with pytest.raises(DataFormatError, match="ann_id 999 not in instances"):
        load_referring(path, DATA / "coco_instances.json", DATA)
    refs = read("refcoco_refs.json")
    del refs[0]["sentences"][1]["sent"]
    with pytest.raises(DataFormatError, match=r"sentences\[1\] lacks key\(s\) 'sent'"):
        load_referring(write(tmp_path, "refs.json", refs), DATA / "coco_instances.json", DATA)


def test_referring_pickle_runs_no_code(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": PurePosixPath("x")}], protocol=2))
    with pytest.raises(DataFormatError, match="refusing to load"):
        load_referring(path, DATA / "coco_instances.json", DATA)


def test_phrasecut_fixture() -> None:
    samples = load_phrasecut(
        DATA / "phrasecut_refer.json", DATA, image_name_format="COCO_val2014_{image_id:012d}.png"
    )
    dogs, car = samples
    assert dogs.caption == "black dogs" and dogs.task == "referring"
    assert (dogs.width, dogs.height) == (32, 24)  # read from the PNG header
    assert [o.box for o in dogs.objects] == [(2.0, 3.0, 12.0, 11.0), (20.0, 10.0, 28.0, 16.0)]
    assert dogs.spans == [[(0, 10)], [(0, 10)]]
    # the second instance is the union of two polygons
    assert np.array_equal(dogs.objects[1].mask, rect(24, 32, 20, 10, 28, 16))
    assert car.objects[0].mask.shape == (32, 24) and car.objects[0].mask.all()


def test_phrasecut_rejects_malformed(tmp_path: Path) -> None:
    entries = read("phrasecut_refer.json")
    entries[0]["Polygons"].pop()
    path = write(tmp_path, "refer_train.json", entries)
    with pytest.raises(DataFormatError, match="2 instance_boxes but 1 Polygons"):
        load_phrasecut(path, DATA, image_name_format="COCO_val2014_{image_id:012d}.png")
    with pytest.raises(DataFormatError, match=r"1\.jpg does not exist"):
        load_phrasecut(DATA / "phrasecut_refer.json", DATA)


# --- VQA v2 -----------------------------------------------------------------------------------


def test_vqa_v2_fixture() -> None:
    samples = load_vqa_v2(
        DATA / "vqa_questions.json", DATA / "vqa_annotations.json", DATA, IMAGE_FORMAT
    )
    assert [s.caption for s in samples] == [
        "What animal is this?", "How many dogs are there?", "Is the car red?"
    ]  # fmt: skip
    animal, count, car = samples
    assert animal.task == "vqa" and not animal.detection_prompt and animal.objects == []
    assert animal.answer == "dog" and Counter(animal.answers) == {"dog": 7, "puppy": 2, "cat": 1}
    assert count.answer == "1" and len(count.answers) == 10
    assert car.answer == "no"  # no multiple_choice_answer: the most common answer
    assert (car.width, car.height) == (24, 32)
    assert car.image_path == DATA / "COCO_val2014_000000000002.png"
    unanswered = load_vqa_v2(DATA / "vqa_questions.json", None, DATA, IMAGE_FORMAT)
    assert all(s.answer is None and s.answers == [] for s in unanswered)


def test_vqa_v2_default_names_and_errors(tmp_path: Path) -> None:
    # the default file name is COCO's JPEG name with the questions' data_subtype
    with pytest.raises(DataFormatError, match=r"COCO_val2014_000000000001\.jpg does not exist"):
        load_vqa_v2(DATA / "vqa_questions.json", None, DATA)
    with pytest.raises(DataFormatError, match=r"COCO_test2015_000000000001\.png"):
        load_vqa_v2(DATA / "vqa_questions.json", None, DATA, IMAGE_FORMAT, split="test2015")
    annotations = read("vqa_annotations.json")
    annotations["annotations"].pop()
    path = write(tmp_path, "annotations.json", annotations)
    with pytest.raises(DataFormatError, match="no annotation for question_id 20"):
        load_vqa_v2(DATA / "vqa_questions.json", path, DATA, IMAGE_FORMAT)
    questions = read("vqa_questions.json")
    del questions["questions"][0]["question"]
    path = write(tmp_path, "questions.json", questions)
    with pytest.raises(DataFormatError, match=r"questions\[0\] lacks key\(s\) 'question'"):
        load_vqa_v2(path, None, DATA, IMAGE_FORMAT)


# --- COCO captions ----------------------------------------------------------------------------


def test_coco_captions_fixture(tmp_path: Path) -> None:
    samples = load_coco_captions(DATA / "coco_captions.json", DATA)
    assert [s.caption_target for s in samples] == [
        "A person walking a dog.", "A dog on a leash.", "A car parked on the street."
    ]  # fmt: skip
    for sample in samples:
        assert sample.task == "caption" and sample.caption == sample.caption_target
        assert sample.objects == [] and sample.spans == [] and not sample.detection_prompt
    assert [s.image_id for s in samples] == ["1", "1", "2"]
    data = read("coco_captions.json")
    data["annotations"][1]["caption"] = "  "
    with pytest.raises(DataFormatError, match=r"annotations\[1\] caption must be a non-empty"):
        load_coco_captions(write(tmp_path, "captions.json", data), DATA)
    data = read("coco_captions.json")
    data["annotations"][2]["image_id"] = 3
    with pytest.raises(DataFormatError, match="unknown image_id 3"):
        load_coco_captions(write(tmp_path, "captions.json", data), DATA)


# --- the shapes world -------------------------------------------------------------------------


def test_world_fixture_expands_every_task() -> None:
    samples = load_world(WORLD)
    records = [json.loads(line) for line in WORLD.read_text().splitlines()]
    expected = []
    for record in records:
        expected += ["detection"] + ["referring"] * len(record["expressions"])
        expected += ["vqa"] * len(record["questions"]) + ["caption"]
    assert [s.task for s in samples] == expected

    detection = samples[0]
    record = records[0]
    assert detection.image_path == WORLD.parent / "000000.png"
    assert (detection.width, detection.height) == (491, 314) and detection.image_id == "000000"
    assert detection.class_names == list(SHAPES) and detection.detection_prompt
    assert [o.label for o in detection.objects] == [o["shape"] for o in record["objects"]]
    for obj, source in zip(detection.objects, record["objects"], strict=True):
        mask = obj.mask
        assert mask.shape == (314, 491) and mask.dtype == bool
        ys, xs = np.nonzero(mask)
        # WORLD.md: the box is [x_min, y_min, x_max + 1, y_max + 1] of the mask
        assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert obj.box == tuple(source["box"])
    assert detection.objects[4].mask.sum() == 29 * 29  # the small red square


def test_world_referring_vqa_caption_samples() -> None:
    samples = load_world(WORLD)
    by_text = {s.caption: s for s in samples if s.task == "referring"}
    relation = by_text["hexagon below the red square"]
    assert not relation.detection_prompt
    # the referent on "hexagon below", the anchor on "red square"
    assert [o.label for o in relation.objects] == ["hexagon", "square"]
    assert relation.spans == [[(0, 13)], [(18, 28)]]
    attribute = by_text["small circle"]
    assert attribute.detection_prompt and [o.label for o in attribute.objects] == ["circle"]
    assert attribute.spans == [[(0, len(attribute.caption))]]
    assert attribute.objects[0].mask.shape == (314, 491)
    absent = by_text["circle above the purple triangle"]  # names nothing present
    assert [o.label for o in absent.objects] == ["triangle"] and absent.spans == [[(17, 32)]]
    two = by_text["square right of the yellow diamond"]
    assert [o.label for o in two.objects] == ["square", "square", "diamond"]
    assert two.spans == [[(0, 15)]] * 2 + [[(20, 34)]]

    vqa = [s for s in samples if s.task == "vqa"]
    assert vqa[0].caption == "what size is the orange triangle?" and vqa[0].answer == "small"
    assert all(s.answers == [s.answer] and s.answer in ANSWERS for s in vqa)

    caption = next(s for s in samples if s.task == "caption")
    assert caption.caption == caption.caption_target
    assert caption.caption.startswith("a small purple triangle, a small red hexagon")
    for obj, [(start, end)] in zip(caption.objects, caption.spans, strict=True):
        assert caption.caption[start:end].endswith(obj.label)
    assert caption.spans[0] == [(0, 23)] and caption.objects[0].label == "triangle"


@pytest.mark.parametrize(
    ("text", "attribute"),
    [
        ("red circle", True),
        ("large square", True),
        ("small purple star", True),
        ("purple shapes", True),
        ("hexagon", True),
        ("circle left of the red square", False),
        ("star below the purple star", False),
    ],
)
def test_attribute_phrases(text: str, attribute: bool) -> None:
    assert is_attribute_phrase(text) is attribute


def test_attribute_phrase_outside_grammar() -> None:
    with pytest.raises(ValueError, match="not a referring expression"):
        is_attribute_phrase("the red circle")


def broken_world(tmp_path: Path, edit: Any) -> Path:
    record = json.loads(WORLD.read_text().splitlines()[0])
    edit(record)
    path = tmp_path / "annotations.jsonl"
    path.write_text(json.dumps(record) + "\n")
    shutil.copyfile(WORLD.parent / record["file"], tmp_path / record["file"])
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("caption_phrases"), "line 1 lacks key"),
        (lambda r: r["objects"][0].update(shape="oval"), "unknown shape 'oval'"),
        (lambda r: r["objects"][0].update(box=[45, 247, 84, 315]), "outside the 491x314 image"),
        (lambda r: r["objects"][1].update(id=0), "duplicate object id 0"),
        (lambda r: r["objects"][0]["mask"].update(size=[10, 10]), r"RLE size \[10, 10\]"),
        (lambda r: r["objects"][0]["mask"].update(counts="%%%"), "disagrees with box"),
        (lambda r: r["objects"][0].update(mask=r["objects"][1]["mask"]), "disagrees with box"),
        (lambda r: r["expressions"][0].update(targets=[9]), "unknown object id 9"),
        (lambda r: r["expressions"][0].update(text="big circle"), "not a referring expression"),
        (lambda r: r["objects"][3].update(color="purple"),  # a second purple triangle
         "anchor of 'hexagon above the purple triangle' is not unique"),
        (lambda r: r["questions"][0].update(answer="maybe"), "answer 'maybe' not in"),
        (lambda r: r["caption_phrases"][0].update(span=[0, 500]), "outside the caption"),
        (lambda r: r["caption_phrases"][0].update(object=7), "unknown object id 7"),
    ],
)
def test_world_rejects_malformed(tmp_path: Path, edit: Any, message: str) -> None:
    path = broken_world(tmp_path, edit)
    with pytest.raises(DataFormatError, match=message) as info:
        load_world(path)
    assert str(path) in str(info.value)


def test_world_relation_with_an_absent_anchor_names_nothing(tmp_path: Path) -> None:
    """No blue star: "star left of the blue star" names nothing and grounds no anchor."""
    path = broken_world(tmp_path, lambda r: r["expressions"][0].update(
        text="star left of the blue star"))
    (sample,) = [s for s in load_world(path) if s.caption == "star left of the blue star"]
    assert sample.objects == [] and sample.spans == []


def test_world_questions_with_generator_keys_are_grounded(tmp_path: Path) -> None:
    def ground(record: dict[str, Any]) -> None:
        record["questions"][0].update(objects=[3], span=[17, 32])  # "orange triangle"
        record["questions"][1].update(objects=[], span=[24, 37])  # grounded to nothing

    samples = [s for s in load_world(broken_world(tmp_path, ground)) if s.task == "vqa"]
    first, second, plain = samples[:3]
    assert first.question_grounded and [o.label for o in first.objects] == ["triangle"]
    assert first.caption[slice(*first.spans[0][0])] == "orange triangle"
    assert second.question_grounded and second.objects == [] and second.spans == []
    assert not plain.question_grounded and plain.objects == []

    def relation(record: dict[str, Any]) -> None:
        # "what shape is below the purple circle?": names the circle, answers with the hexagon
        record["questions"][1].update(objects=[1], span=[24, 37], answer_object=0,
                                      answer_span=[14, 19])

    question = [s for s in load_world(broken_world(tmp_path, relation)) if s.task == "vqa"][1]
    assert [o.label for o in question.objects] == ["circle", "hexagon"]
    assert [question.caption[slice(*s[0])] for s in question.spans] == ["purple circle", "below"]
    assert question.answer_span == (14, 19)

    def bad_span(record: dict[str, Any]) -> None:
        record["questions"][0].update(objects=[0], span=[17, 99])

    with pytest.raises(DataFormatError, match="outside the caption"):
        load_world(broken_world(tmp_path, bad_span))


def test_world_rejects_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "annotations.jsonl"
    path.write_text(WORLD.read_text().splitlines()[0] + "\n{oops\n")
    with pytest.raises(DataFormatError, match="line 2: not valid JSON"):
        load_world(path, check_images=False)


@pytest.mark.skipif(not SHARED_WORLD.exists(), reason="shared world samples not present")
def test_world_shared_samples_load() -> None:
    samples = load_world(SHARED_WORLD)
    assert sum(s.task == "detection" for s in samples) == 24
    assert sum(s.task == "caption" for s in samples) == 24
