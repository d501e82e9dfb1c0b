"""End to end on the shipped default model: the real server in a subprocess, world images posted.

- detection finds every object of the world samples with its label (box IoU >= 0.5);
- segmentation at the model's calibrated threshold covers the objects a colour-shape expression
  names (a floor under the shipped model's figure: a regression guard, not yet the issue's bar);
- VQA answers from the world's closed set and grounds the objects its questions name; caption
  phrases are grounded on objects of the shapes they name (floors under the shipped model's
  figures, as for segmentation);
- 1,203 class names (the 6 shapes among 1,197 distractors) still find them; the metrics show the
  vision engine ran once for that image and as many prompt chunks as token packing gives;
- 64 concurrent requests mixing the four tasks and different prompts all answer exactly what the
  same request answers alone, and the engines' batch-size histograms show batches larger than 1.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from benchmarks.load import sweep
from model_export.data.world import (
    RELATION_ABSENT_ANCHOR,
    WorldObject,
    expression_targets,
    present_expressions,
    relation_contrasts,
)
from model_export.evaluation.metrics import box_iou
from model_export.modeling.config import WORLD_ANSWERS
from model_export.processing.chunking import name_token_counts, pack_chunks
from model_export.processing.prompt import load_tokenizer

from conftest import start_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SAMPLES = Path(__file__).parent / "fixtures" / "world"
SHAPES = ["circle", "square", "triangle", "diamond", "star", "hexagon"]
THRESHOLD = 0.3
# Floors under the shipped step-35614 model's figures on the three samples: VQA 13 of 15 right,
# 11 of 12 grounded phrases on their objects; caption phrases (4 beams, detected objects named
# in turn, each phrase reading its object's box) on the object they describe 15 of 15 and
# captions exact 3 of 3 (step 29443: VQA 12 of 15, captions the same; attention anywhere:
# phrases on an object of their shape 15 / 15; objects only counted: 15 / 15; step 27110,
# objects not counted: 11 / 15, 13 / 13; step 25172: 12 / 15, 14 / 14;
# step 23549: 12 / 15, 12 / 13; step 21734: 10 / 15, 12 / 13; step 20237: 10 / 15, 14 / 14;
# step 18570: 9 / 15, 13 / 14; step 17511: 12 / 15, 12 / 13; step 15843, greedy: 12 / 15,
# 16 / 17; step 14943: 10 / 15, 24 / 25; step 14500: 9 / 15, 20 / 22). 15 questions are few:
# on 200 eval images step 35614's VQA is 0.938, 29443's 0.928, 27110's 0.915, 25172's 0.899,
# 23549's 0.901.
VQA_FLOOR = 0.5
VQA_GROUNDING_FLOOR = 0.6
CAPTION_GROUNDING_FLOOR = 0.8
CAPTION_EXACT_FLOOR = 2  # of the 3 samples


def records() -> list[dict[str, Any]]:
    lines = (SAMPLES / "annotations.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def image_b64(record: dict[str, Any]) -> str:
    return base64.b64encode((SAMPLES / record["file"]).read_bytes()).decode()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # 64 requests at once on 2 loaded cores can take longer than the default 30 s deadline;
    # these tests check answers under concurrency, not latency (that is `glipv2 bench`'s job).
    process, base = start_server([], {"GLIPV2_CAPTION_MAX_TOKENS": "40",
                                      "GLIPV2_BATCHER__MAX_QUEUE_DELAY_MS": "20",
                                      "GLIPV2_REQUEST_TIMEOUT_MS": "300000"}, 300)
    try:
        yield base
    finally:
        process.terminate()
        process.communicate(timeout=60)


def metric(base: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)"
    match = re.search(pattern, httpx.get(f"{base}/metrics").text)
    return float(match.group(1)) if match else 0.0


def assert_finds_every_object(record: dict[str, Any], detections: list[dict[str, Any]]) -> None:
    for obj in record["objects"]:
        assert any(d["label"] == obj["shape"] and box_iou(d["box"], obj["box"]) >= 0.5
                   for d in detections), (record["file"], obj, detections[:10])


def test_detection_finds_the_shapes(server: str) -> None:
    for record in records():
        response = httpx.post(f"{server}/v1/detect", timeout=120, json={
            "image": image_b64(record), "classes": SHAPES, "threshold": THRESHOLD})
        assert response.status_code == 200, response.text
        assert_finds_every_object(record, response.json()["detections"])


def test_phrase_grounding_and_segmentation_shapes(server: str) -> None:
    record = records()[0]
    prompt = ". ".join(f"{o['color']} {o['shape']}" for o in record["objects"])
    response = httpx.post(f"{server}/v1/detect", timeout=120, json={
        "image": image_b64(record), "prompt": prompt, "threshold": THRESHOLD})
    assert response.status_code == 200, response.text
    for detection in response.json()["detections"]:
        start, end = detection["span"]
        assert prompt[start:end] == detection["label"]
    expressions = [e["text"] for e in record["expressions"]]
    response = httpx.post(f"{server}/v1/segment", timeout=120, json={
        "image": image_b64(record), "expressions": expressions})
    assert response.status_code == 200, response.text
    body = response.json()
    for result in body["results"]:
        for segment in result["segments"]:
            mask = mask_utils.decode({"size": segment["mask"]["size"],
                                      "counts": segment["mask"]["counts"].encode()})
            assert mask.shape == (record["height"], record["width"])


def decode(rle: dict[str, Any]) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_segmentation_covers_the_named_objects(server: str) -> None:
    """Each colour-shape pair of a sample as a referring expression, at the model's calibrated
    threshold: the step-8750 model covers 12 of these 14 at mask IoU >= 0.5 (85 % of the pairs
    of all 24 world samples). Absent pairs are `glipv2 eval`'s empty-referent accuracy."""
    ious = []
    for record in records():
        present = sorted({f"{o['color']} {o['shape']}" for o in record["objects"]})
        response = httpx.post(f"{server}/v1/segment", timeout=120, json={
            "image": image_b64(record), "expressions": present})
        assert response.status_code == 200, response.text
        for text, result in zip(present, response.json()["results"], strict=True):
            truth = np.any([decode(o["mask"]) for o in record["objects"]
                            if f"{o['color']} {o['shape']}" == text], axis=0)
            predicted = np.zeros_like(truth)
            for segment in result["segments"]:
                predicted |= decode(segment["mask"])
            ious.append((truth & predicted).sum() / (truth | predicted).sum())
    assert len(ious) == 14
    assert np.mean([iou >= 0.5 for iou in ious]) >= 0.7, ious


def test_a_relation_names_only_what_stands_on_that_side_of_its_anchor(server: str) -> None:
    """Issue 38: each relation of the samples that names something; the same relation with
    another relation word, the anchor there but nothing of the shape on that side ("star above
    the red star" where the star is below it); and with its anchor in a colour no object of its
    shape has ("star below the green star"). The latter two get no segment (the geometry
    leaves no box on that side; the anchor's words find nothing), the former get their
    referents (floors under the shipped model's figures)."""
    answered, beside, absent_anchor = [], [], []
    for record in records():
        objects = world_objects(record)
        named = [(text, targets) for group in present_expressions(objects).get("relation", [])
                 for text, targets in group[:2]]  # 2 per relation word: 16, limit 32
        other_side = [relation_contrasts(objects, text).get("relation", [None])[0]
                      for text, _ in named]
        other_side = [text for text in other_side if text is not None]
        absent = [relation_contrasts(objects, text)[RELATION_ABSENT_ANCHOR][0]
                  for text, _ in named]
        response = httpx.post(f"{server}/v1/segment", timeout=120, json={
            "image": image_b64(record),
            "expressions": [text for text, _ in named] + other_side + absent})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        for (_, targets), result in zip(named, results[:len(named)], strict=True):
            answered.append(bool(result["segments"]) and all(
                any(box_iou(s["box"], objects[i].box) >= 0.5 for i in targets)
                for s in result["segments"]))
        results = results[len(named):]
        beside += [not r["segments"] for r in results[:len(other_side)]]
        absent_anchor += [not r["segments"] for r in results[len(other_side):]]
    # Step 35614 (relations "geometry", thresholds 0.525 and 0.15): all 24 and 24 silent,
    # 21 of 24 answered on their referents.
    assert len(beside) >= 20 and len(absent_anchor) >= 20
    assert np.mean(beside) >= 0.9, beside
    assert np.mean(absent_anchor) >= 0.9, absent_anchor
    assert np.mean(answered) >= 0.7, answered


def world_objects(record: dict[str, Any]) -> list[WorldObject]:
    return [WorldObject(o["id"], o["shape"], o["color"], o["size"], o["box"])
            for o in record["objects"]]


def test_vqa_answers_from_the_closed_set_and_grounds_the_named_objects(server: str) -> None:
    """Every question of the samples: the answer is one of the world's 24, and each grounded
    noun phrase that names objects lies on one of them. Floors under the shipped model's
    figures (a regression guard, not the issue's bar: `glipv2 eval` measures that)."""
    right, grounded, misses = [], 0, []
    for record in records():
        objects = world_objects(record)
        for item in record["questions"]:
            response = httpx.post(f"{server}/v1/vqa", timeout=120, json={
                "image": image_b64(record), "question": item["question"]})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["answer"] in WORLD_ANSWERS
            right.append(body["answer"] == item["answer"])
            for phrase in body["grounding"]:
                start, end = phrase["span"]
                assert item["question"][start:end] == phrase["phrase"]
                try:
                    targets = expression_targets(phrase["phrase"], objects)
                except ValueError:
                    continue  # not an expression the world defines ("object")
                if targets:
                    grounded += 1
                    if not any(box_iou(phrase["box"], objects[i].box) >= 0.5 for i in targets):
                        misses.append((record["file"], item["question"], phrase))
    assert len(right) == 15 and grounded >= 8
    assert np.mean(right) >= VQA_FLOOR, right
    assert 1 - len(misses) / grounded >= VQA_GROUNDING_FLOOR, (grounded, misses)


def test_caption_phrases_are_grounded_on_the_objects_they_describe(server: str) -> None:
    """Each caption phrase's span is its text, and its box lies on an object (IoU >= 0.5) that
    the phrase describes ("a {size} {colour} {shape}"); most captions are the reference's
    word for word."""
    phrases = matched = exact = 0
    for record in records():
        response = httpx.post(f"{server}/v1/caption", timeout=120,
                              json={"image": image_b64(record)})
        assert response.status_code == 200, response.text
        body = response.json()
        exact += body["caption"] == record["caption"]
        for phrase in body["phrases"]:
            start, end = phrase["span"]
            assert body["caption"][start:end] == phrase["phrase"]
            best = max(record["objects"], key=lambda o: box_iou(phrase["box"], o["box"]))
            phrases += 1
            matched += (box_iou(phrase["box"], best["box"]) >= 0.5 and phrase["phrase"]
                        == f"a {best['size']} {best['color']} {best['shape']}")
    assert phrases >= len(records())
    assert matched / phrases >= CAPTION_GROUNDING_FLOOR, (matched, phrases)
    assert exact >= CAPTION_EXACT_FLOOR, exact


def test_1203_classes_find_the_shapes_with_one_vision_run(server: str) -> None:
    distractors = [f"{word} {i}" for i, word in zip(range(1197), ["thing", "gadget", "animal",
                   "vehicle", "plant", "tool", "fruit"] * 200, strict=False)]
    classes = distractors[:600] + SHAPES + distractors[600:]
    assert len(classes) == 1203
    per_prompt = httpx.get(f"{server}/v1/models").json()["models"][0]["max_prompt_phrases"]
    expected_chunks = len(pack_chunks(classes, name_token_counts(
        load_tokenizer().backend_tokenizer, classes), 256, per_prompt))
    record = records()[1]
    vision_before = metric(server, "glipv2_engine_batch_size_sum", 'engine="vision"')
    chunks_before = metric(server, "glipv2_prompt_chunks_sum")
    response = httpx.post(f"{server}/v1/detect", timeout=300, json={
        "image": image_b64(record), "classes": classes, "threshold": THRESHOLD,
        "max_detections": 1000})
    assert response.status_code == 200, response.text
    assert_finds_every_object(record, response.json()["detections"])
    assert metric(server, "glipv2_engine_batch_size_sum", 'engine="vision"') - vision_before == 1
    assert metric(server, "glipv2_prompt_chunks_sum") - chunks_before == expected_chunks
    assert expected_chunks > 1


def test_64_concurrent_mixed_requests_answer_as_alone(server: str) -> None:
    requests: list[tuple[str, dict[str, Any]]] = []
    for i in range(64):
        record = records()[i % len(records())]
        image = image_b64(record)
        kind = i % 4
        if kind == 0:
            requests.append(("/v1/detect", {"image": image, "classes": SHAPES[i % 3:],
                                            "threshold": THRESHOLD}))
        elif kind == 1:
            requests.append(("/v1/segment", {"image": image, "expressions": [
                e["text"] for e in record["expressions"]][: 1 + i % 3]}))
        elif kind == 2:
            question = record["questions"][i % len(record["questions"])]["question"]
            requests.append(("/v1/vqa", {"image": image, "question": question}))
        else:
            requests.append(("/v1/caption", {"image": image}))
    sizes_before = {engine: (metric(server, "glipv2_engine_batch_size_sum", f'engine="{engine}"'),
                             metric(server, "glipv2_engine_batch_size_count",
                                    f'engine="{engine}"'))
                    for engine in ("vision", "fusion")}

    def post(item: tuple[str, dict[str, Any]]) -> httpx.Response:
        return httpx.post(f"{server}{item[0]}", json=item[1], timeout=600)

    with ThreadPoolExecutor(max_workers=64) as pool:
        together = list(pool.map(post, requests))
    assert [r.status_code for r in together] == [200] * 64, [r.text for r in together
                                                             if r.status_code != 200][:3]
    batched = {engine: (metric(server, "glipv2_engine_batch_size_sum", f'engine="{engine}"')
                        - before[0],
                        metric(server, "glipv2_engine_batch_size_count", f'engine="{engine}"')
                        - before[1])
               for engine, before in sizes_before.items()}
    for engine, (items, batches) in batched.items():
        assert items > batches, f"{engine} never ran a batch larger than 1: {batched}"
    # Each distinct request alone, compared with its concurrent answer (same prompt, same image).
    alone: dict[str, Any] = {}
    for item, response in zip(requests, together, strict=True):
        key = json.dumps(item, sort_keys=True)
        if key not in alone:
            alone[key] = post(item).json()
        assert_same_answer(alone[key], response.json())


def test_bench_load_sweeps_a_running_server(server: str) -> None:
    """`glipv2 bench load` against running servers (here the same one twice): every level's
    figures come from real answered requests and the server's own batch metrics."""
    on, off = sweep([1, 4], requests=8, distinct_images=1, urls=(server, server))
    for curve in (on, off):
        assert curve.concurrency == [1, 4]
        assert all(rate > 0 for rate in curve.throughput_rps)
        assert all(a <= b <= c for a, b, c in zip(curve.p50_ms, curve.p90_ms, curve.p99_ms,
                                                   strict=True))
        assert curve.mean_batch[0] == 1.0  # one client at a time: every vision batch is alone
        assert 1.0 <= curve.mean_batch[1] <= 4.0


def assert_same_answer(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal up to float noise of different batch compositions (boxes 0.5 px, scores 1e-3)."""
    if "detections" in a:
        assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
        pairs = zip(a["detections"], b["detections"], strict=True)
    elif "results" in a:
        assert [len(r["segments"]) for r in a["results"]] == [
            len(r["segments"]) for r in b["results"]]
        pairs = zip([s for r in a["results"] for s in r["segments"]],
                    [s for r in b["results"] for s in r["segments"]], strict=True)
    elif "answer" in a:
        assert a["answer"] == b["answer"]
        pairs = zip(a["grounding"] + a["answer_grounding"],
                    b["grounding"] + b["answer_grounding"], strict=True)
    else:
        assert a["caption"] == b["caption"]
        pairs = zip(a["phrases"], b["phrases"], strict=True)
    for x, y in pairs:
        assert max(abs(p - q) for p, q in zip(x["box"], y["box"], strict=True)) <= 0.5
        assert abs(x["score"] - y["score"]) <= 1e-3
