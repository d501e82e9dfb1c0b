"""Prompt building, tokenisation and positive maps against the reference GLIP-T test vector."""

from __future__ import annotations

import json

import pytest
import torch

from model_export.processing.prompt import (
    DetectionPrompt,
    build_detection_prompt,
    clean_name,
    load_tokenizer,
    positive_map,
    tokenize,
)

from conftest import REFERENCE, label_to_tokens

SHAPES = ["circle", "square", "triangle", "diamond", "star", "hexagon"]
EVAL_CAPTION = "circle. square. triangle. diamond. star. hexagon"
EVAL_IDS = [101, 4418, 1012, 2675, 1012, 9546, 1012, 6323, 1012, 2732, 1012, 2002, 18684, 7446, 102]
DEMO_CAPTION = "circle . square . triangle . diamond . star . hexagon . "
DEMO_IDS = [*EVAL_IDS[:-1], 1012, 102]
SHAPE_TOKENS = {0: [1], 1: [3], 2: [5], 3: [7], 4: [9], 5: [11, 12, 13]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def vector() -> dict:
    return json.loads((REFERENCE / "glip_t_vector_outputs.json").read_text())


def _map(tokenizer, prompt: DetectionPrompt, pad_to: int | None = None) -> dict[int, list[int]]:
    input_ids, _, encodings = tokenize(tokenizer, [prompt.caption], pad_to=pad_to)
    return label_to_tokens(positive_map(encodings[0], prompt.spans, input_ids.shape[1]))


@pytest.mark.parametrize(
    ("name", "cleaned"),
    [
        ("traffic_light", "traffic light"),
        ("bat (animal)", "bat "),  # the reference keeps the space before "(": trailing space
        ("hot_dog_(food)", "hot dog "),
        ("a (b) c (d)", "a "),  # greedy: from the first "(" to the last ")"
        ("a_(b)_c", "a c"),  # "a__c" -> "a  c" -> "a c"
        ("x   y", "x  y"),  # one non-overlapping pass over double spaces
        ("circle", "circle"),
    ],
)
def test_clean_name_matches_reference(name: str, cleaned: str) -> None:
    assert clean_name(name) == cleaned


def test_eval_prompt_caption_and_spans(vector: dict) -> None:
    prompt = build_detection_prompt(SHAPES)
    assert prompt.caption == EVAL_CAPTION == vector["prompt"]["caption"]
    assert prompt.class_names == SHAPES
    for name, spans in zip(SHAPES, prompt.spans, strict=True):
        ((start, end),) = spans
        assert prompt.caption[start:end] == name


def test_demo_prompt_caption(vector: dict) -> None:
    prompt = build_detection_prompt(SHAPES, separator=" . ", trailing=True)
    assert prompt.caption == DEMO_CAPTION == vector["demo_path"]["caption"]


def test_prompt_keeps_original_names_and_rejects_empty() -> None:
    prompt = build_detection_prompt(["traffic_light", "bat (animal)"])
    assert prompt.caption == "traffic light. bat "
    assert prompt.class_names == ["traffic_light", "bat (animal)"]
    assert build_detection_prompt(["a_b"], clean=False).caption == "a_b"
    with pytest.raises(ValueError):
        build_detection_prompt([])
    with pytest.raises(ValueError, match="empty"):
        build_detection_prompt(["(only parentheses)"])


def test_load_tokenizer_is_cached_lowercase_and_local() -> None:
    tokenizer = load_tokenizer()
    assert load_tokenizer("bert-base-uncased") is tokenizer
    assert len(tokenizer) == 30522
    assert tokenizer("CIRCLE Hexagon")["input_ids"] == tokenizer("circle hexagon")["input_ids"]
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("roberta-base")


def test_eval_path_tokens_and_positive_map(tokenizer, vector: dict) -> None:
    prompt = build_detection_prompt(SHAPES)
    input_ids, attention_mask, encodings = tokenize(tokenizer, [prompt.caption])
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.tolist() == [EVAL_IDS] == [vector["prompt"]["input_ids"]]
    assert attention_mask.tolist() == [[1] * 15]
    assert encodings[0].tokens == vector["prompt"]["tokens"]

    pmap = positive_map(encodings[0], prompt.spans, input_ids.shape[1])
    assert pmap.shape == (6, 15) and pmap.dtype == torch.float32
    assert set(pmap.unique().tolist()) == {0.0, 1.0}
    assert label_to_tokens(pmap) == SHAPE_TOKENS
    reference = vector["prompt"]["positive_map_label_to_token"]
    assert {int(label) - 1: tokens for label, tokens in reference.items()} == SHAPE_TOKENS


def test_pad_to_reference_query_length(tokenizer) -> None:
    prompt = build_detection_prompt(SHAPES)
    input_ids, attention_mask, encodings = tokenize(tokenizer, [prompt.caption], pad_to=256)
    assert input_ids.shape == attention_mask.shape == (1, 256)
    assert input_ids[0, :15].tolist() == EVAL_IDS
    assert input_ids[0, 15:].eq(0).all() and attention_mask[0, 15:].eq(0).all()
    assert attention_mask[0, :15].eq(1).all()
    pmap = positive_map(encodings[0], prompt.spans, 256)
    assert pmap.shape == (6, 256)
    assert label_to_tokens(pmap) == SHAPE_TOKENS


def test_demo_path_tokens_and_positive_map(tokenizer, vector: dict) -> None:
    prompt = build_detection_prompt(SHAPES, separator=" . ", trailing=True)
    input_ids, _, _ = tokenize(tokenizer, [prompt.caption])
    assert input_ids.tolist() == [DEMO_IDS] == [vector["demo_path"]["input_ids"]]
    assert _map(tokenizer, prompt) == SHAPE_TOKENS
    reference = vector["demo_path"]["positive_map_label_to_token"]
    assert {int(label) - 1: tokens for label, tokens in reference.items()} == SHAPE_TOKENS


def test_batch_pads_to_longest(tokenizer) -> None:
    input_ids, attention_mask, encodings = tokenize(tokenizer, [EVAL_CAPTION, DEMO_CAPTION])
    assert input_ids.shape == (2, 16)
    assert input_ids[0].tolist() == [*EVAL_IDS, 0]
    assert input_ids[1].tolist() == DEMO_IDS
    assert attention_mask.sum(dim=1).tolist() == [15, 16]
    assert len(encodings) == 2


def test_multi_word_class(tokenizer) -> None:
    prompt = build_detection_prompt(["person", "traffic_light", "stop sign"])
    assert prompt.caption == "person. traffic light. stop sign"
    assert _map(tokenizer, prompt) == {0: [1], 1: [3, 4], 2: [6, 7]}


def test_span_edges_on_whitespace_use_reference_fallbacks(tokenizer) -> None:
    # "bat (animal)" -> "bat ": the span's last char is a space, so end-2 ("t") is used.
    prompt = build_detection_prompt(["bat (animal)", "ball"])
    assert prompt.caption == "bat . ball" and prompt.spans[0] == [(0, 4)]
    assert _map(tokenizer, prompt) == {0: [1], 1: [3]}
    # "(big) dog" -> " dog": the first char is a space, so start+1 ("d") is used.
    prompt = build_detection_prompt(["(big) dog", "cat"])
    assert prompt.caption == " dog. cat" and prompt.spans[0] == [(0, 4)]
    assert _map(tokenizer, prompt) == {0: [1], 1: [3]}


def test_fallback_depth_and_skipped_spans(tokenizer) -> None:
    caption = "ab  .   c"  # tokens: [CLS] ab . c [SEP]
    _, _, encodings = tokenize(tokenizer, [caption])
    spans = [
        [(0, 4)],  # ends on two spaces: end-1 and end-2 are spaces, end-3 is "b"
        [(4, 8)],  # "." + three spaces: end-1, end-2 and end-3 are all spaces -> skipped
        [(5, 8)],  # three spaces: start, start+1 and start+2 are all spaces -> skipped
        [(3, 9)],  # starts on a space, start+1 is ".", ends on "c"
    ]
    pmap = positive_map(encodings[0], spans, 5)
    assert label_to_tokens(pmap) == {0: [1], 1: [], 2: [], 3: [2, 3]}


def test_invalid_span_and_too_few_tokens(tokenizer) -> None:
    _, _, encodings = tokenize(tokenizer, ["circle"])
    with pytest.raises(ValueError, match="invalid character span"):
        positive_map(encodings[0], [[(3, 3)]], 3)
    with pytest.raises(ValueError, match="beyond num_tokens"):
        positive_map(encodings[0], [[(0, 6)]], 1)


def test_over_length_caption_is_an_error_not_truncated(tokenizer) -> None:
    names = [f"thing{i}" for i in range(200)]
    caption = build_detection_prompt(names).caption
    count = len(tokenizer(caption)["input_ids"])
    assert count > 256
    with pytest.raises(ValueError, match=rf"has {count} tokens, more than max_length=256"):
        tokenize(tokenizer, ["circle", caption])
    input_ids, _, _ = tokenize(tokenizer, [caption], max_length=count)
    assert input_ids.shape == (1, count)
    with pytest.raises(ValueError, match="pad_to"):
        tokenize(tokenizer, [EVAL_CAPTION], pad_to=10)
    with pytest.raises(ValueError):
        tokenize(tokenizer, [])
