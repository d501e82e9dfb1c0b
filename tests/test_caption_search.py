"""Beam search over a toy language model whose next-token logits depend on (image, prefix)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from model_export.processing.postprocess import Detections
from service.pipeline.caption_search import (
    BeamState,
    CaptionGrammar,
    CaptionSearch,
    left_to_right,
    names_a_region_twice,
    object_phrase_spans,
)

CLS, SEP = 0, 1
VOCAB = 5  # [CLS], [SEP] and three words
# rows' images (indices into the batch) and token prefixes ([CLS] first) -> (rows, vocab) logits
StepFn = Callable[[list[int], list[list[int]]], Tensor]


def beam_search(step: StepFn, searches: list[CaptionSearch], cls_id: int, sep_id: int,
                grammar: CaptionGrammar | None = None) -> list[list[list[int]]]:
    """Every image's `BeamState` advanced together, one batch of live prefixes per token, as
    the caption decoder runs them."""
    states = [BeamState(search, cls_id, sep_id, grammar) for search in searches]
    while not all(state.finished for state in states):
        rows = [(image, tokens) for image, state in enumerate(states)
                for tokens in state.prefixes()]
        logits = step([image for image, _ in rows], [tokens for _, tokens in rows])
        first = 0
        for state in states:
            count = len(state.live)
            if count:
                state.advance(logits[first:first + count])
            first += count
    return [state.results() for state in states]


def toy_step(calls: list[int] | None = None, first_image: int = 0):
    """Deterministic pseudo-random logits per (image, prefix); [CLS] is never predicted. Batch
    row i's image is `first_image + images[i]`."""

    def step(images: list[int], prefixes: list[list[int]]) -> Tensor:
        if calls is not None:
            calls.append(len(images))
        rows = []
        for index, prefix in zip(images, prefixes, strict=True):
            image = first_image + index
            rng = random.Random(f"{image}:{prefix}")
            rows.append([-1e9] + [rng.gauss(0.0, 2.0) for _ in range(VOCAB - 1)])
        return torch.tensor(rows)

    return step


def log_prob(image: int, tokens: list[int], limit: int) -> float:
    """Total log-probability of a generated caption under `toy_step` ([SEP] unless at the limit)."""
    step, prefix, total = toy_step(), [CLS], 0.0
    ends = tokens if len(tokens) == limit else [*tokens, SEP]
    for token in ends:
        total += float(torch.log_softmax(step([image], [prefix])[0], dim=-1)[token])
        prefix = [*prefix, token]
    return total


def search(step, limits: list[int], beams: list[int], length_penalty: float = 0.0
           ) -> list[list[int]]:
    """Each image's best caption."""
    return [ranked[0] for ranked in beam_search(
        step, [CaptionSearch(limit, width, length_penalty)
               for limit, width in zip(limits, beams, strict=True)], CLS, SEP)]


def exhaustive_best(image: int, limit: int, length_penalty: float = 0.0) -> list[int]:
    words = range(2, VOCAB)
    options = [list(c) for n in range(limit + 1) for c in itertools.product(words, repeat=n)]
    return max(options, key=lambda tokens: log_prob(image, tokens, limit)
               / max(len(tokens) + (len(tokens) < limit), 1) ** length_penalty)


def greedy(image: int, limit: int) -> list[int]:
    step, prefix = toy_step(), [CLS]
    while len(prefix) - 1 < limit:
        token = int(step([image], [prefix])[0].argmax())
        if token == SEP:
            break
        prefix.append(token)
    return prefix[1:]


def test_one_beam_is_greedy() -> None:
    got = search(toy_step(), [6] * 12, [1] * 12)
    assert got == [greedy(i, 6) for i in range(12)]
    assert len({tuple(tokens) for tokens in got}) > 1


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("image", range(8))
def test_a_beam_as_wide_as_every_prefix_finds_the_best_caption(image: int,
                                                               length_penalty: float) -> None:
    limit = 3
    best = exhaustive_best(image, limit, length_penalty)
    (got,) = search(toy_step(first_image=image), [limit], [(VOCAB - 2) ** (limit - 1)],
                    length_penalty)
    assert got == best
    assert math.isclose(log_prob(image, got, limit), log_prob(image, best, limit))


def test_length_normalisation_favours_longer_captions() -> None:
    images, limit = list(range(40)), 6
    plain = search(toy_step(), [limit] * len(images), [4] * len(images))
    normalised = search(toy_step(), [limit] * len(images), [4] * len(images), 1.0)
    assert sum(map(len, normalised)) > sum(map(len, plain))


def test_beams_find_more_probable_captions_than_greedy() -> None:
    images, limit = list(range(40)), 5
    searched = search(toy_step(), [limit] * len(images), [4] * len(images))
    gains = [log_prob(i, searched[i], limit) - log_prob(i, greedy(i, limit), limit)
             for i in images]
    assert sum(g > 1e-6 for g in gains) >= 5
    assert sum(gains) > 0


def test_images_of_one_batch_are_searched_independently() -> None:
    limits, beams = [4, 0, 2, 5], [3, 2, 1, 4]
    together = search(toy_step(), limits, beams)
    alone = [search(toy_step(first_image=k), [limit], [width])[0]
             for k, (limit, width) in enumerate(zip(limits, beams, strict=True))]
    assert together == alone
    assert together[1] == []
    assert all(len(tokens) <= limit for tokens, limit in zip(together, limits, strict=True))


def test_each_step_runs_every_live_prefix_of_the_batch_at_once() -> None:
    calls: list[int] = []
    search(toy_step(calls), [5, 5], [3, 3])
    assert calls[0] == 2  # one [CLS] row per image
    assert max(calls) <= 6  # at most 3 live prefixes per image
    assert len(calls) <= 5  # never past the token limit


def test_bad_search_settings_are_refused() -> None:
    for bad in ({"max_tokens": -1}, {"max_tokens": 4, "beams": 0},
                {"max_tokens": 4, "length_penalty": -0.5}):
        with pytest.raises(ValueError, match="need max_tokens"):
            CaptionSearch(**bad)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_search_returns_up_to_beams_finished_captions_best_first(length_penalty: float) -> None:
    limit, width = 4, 3
    ranked = beam_search(toy_step(), [CaptionSearch(limit, width, length_penalty)] * 6, CLS, SEP)
    for image, captions in enumerate(ranked):
        assert 1 <= len(captions) <= width
        assert len({tuple(c) for c in captions}) == len(captions)
        scores = [log_prob(image, c, limit) / max(len(c) + (len(c) < limit), 1) ** length_penalty
                  for c in captions]
        assert scores == sorted(scores, reverse=True)
    assert any(len(captions) > 1 for captions in ranked)


def test_names_a_region_twice_only_for_the_same_words_on_the_same_box() -> None:
    square, other = [10, 10, 50, 50], [60, 10, 100, 50]
    assert names_a_region_twice(["a blue square", "a red star", "a blue square"],
                                [square, other, [11, 10, 50, 51]])
    assert not names_a_region_twice(["a blue square", "a blue square"], [square, other])
    assert not names_a_region_twice(["a blue square", "a red square"], [square, square])
    assert not names_a_region_twice([], [])


# A toy caption vocabulary: [CLS], [SEP], the joints "a" "," "and" ".", two words and two
# class names, one of one token (8) and one of two (9 10).
A, COMMA, AND, DOT = 2, 3, 4, 5
CLASS_TOKENS = ((8,), (9, 10))
GRAMMAR = CaptionGrammar(article=A, comma=COMMA, conjunction=AND, period=DOT, end=SEP,
                         classes=CLASS_TOKENS)


def caption_step(images: list[int], prefixes: list[list[int]]) -> Tensor:
    """Pseudo-random logits over the toy caption vocabulary, [SEP] and "." made likely."""
    rows = []
    for image, prefix in zip(images, prefixes, strict=True):
        rng = random.Random(f"caption:{image}:{prefix}")
        rows.append([-1e9, 2.0, *(rng.gauss(0.0, 1.0) for _ in range(3)), 2.0,
                     *(rng.gauss(0.0, 1.0) for _ in range(5))])
    return torch.tensor(rows)


def joints(tokens: list[int]) -> list[int]:
    return [t for t in tokens if t in (A, COMMA, AND, DOT)]


def phrases(tokens: list[int]) -> list[list[int]]:
    """The words of each phrase: what follows each article up to the next joint."""
    out: list[list[int]] = []
    for token in tokens:
        if token == A:
            out.append([])
        elif token not in (COMMA, AND, DOT):
            out[-1].append(token)
    return out


@pytest.mark.parametrize("objects", [(0,), (1, 0), (0, 1, 1), (1, 1, 0, 0, 1)])
def test_captions_with_objects_name_each_in_order_in_the_caption_grammar(
        objects: tuple[int, ...]) -> None:
    limit = 40
    ranked = beam_search(caption_step, [CaptionSearch(limit, 3, 1.0, objects)] * 8, CLS, SEP,
                         GRAMMAR)
    # "a .., a .., a .. and a .." then "." and [SEP]: the joints in order, whatever the words
    count = len(objects)
    expected = [A] + [COMMA, A] * max(count - 2, 0) + [AND, A] * (count > 1) + [DOT]
    finished = [caption for captions in ranked for caption in captions if len(caption) < limit]
    assert finished
    for caption in finished:
        assert joints(caption) == expected and caption[-1] == DOT
        for words, label in zip(phrases(caption), objects, strict=True):
            name = list(CLASS_TOKENS[label])
            # each phrase ends with its own class name, and names no other class before it
            assert words[-len(name):] == name
            assert not {8, 9} & set(words[:-len(name)])
    free = beam_search(caption_step, [CaptionSearch(limit, 3, 1.0)] * 8, CLS, SEP)
    assert any(joints(captions[0]) != expected for captions in free)  # the grammar did work


def test_a_class_name_once_begun_runs_to_its_end() -> None:
    allowed = GRAMMAR.allowed([A, 6, 9], (1,), 11)
    assert allowed.nonzero().flatten().tolist() == [10]
    assert GRAMMAR.allowed([A, 6, 9, 10], (1,), 11).nonzero().flatten().tolist() == [DOT]
    # before the name: any word but the joints, [SEP] and the other class's name
    assert GRAMMAR.allowed([A, 6], (1,), 11).nonzero().flatten().tolist() == [0, 6, 7, 9, 10]
    # and no piece that would glue onto the article ("a" "##km" reads "akm")
    glued = dataclasses.replace(GRAMMAR, continuations=(7, 10))
    assert glued.allowed([A], (1,), 11).nonzero().flatten().tolist() == [0, 6, 9]
    assert glued.allowed([A, 6], (1,), 11).nonzero().flatten().tolist() == [0, 6, 7, 9, 10]


def test_images_without_objects_are_searched_freely_beside_constrained_ones() -> None:
    searches = [CaptionSearch(12, 3, 1.0, objects=(0, 0)), CaptionSearch(12, 3, 1.0)]
    together = beam_search(caption_step, searches, CLS, SEP, GRAMMAR)
    alone = beam_search(caption_step, [CaptionSearch(12, 3, 1.0)] * 2, CLS, SEP)
    assert together[1] == alone[1]
    assert joints(together[0][0]) == [A, AND, A, DOT]


def test_objects_need_a_grammar_with_their_classes_and_at_least_one_object() -> None:
    with pytest.raises(ValueError, match="needs a CaptionGrammar"):
        beam_search(caption_step, [CaptionSearch(8, 2, 1.0, objects=(0, 1))], CLS, SEP)
    with pytest.raises(ValueError, match="needs a CaptionGrammar"):
        beam_search(caption_step, [CaptionSearch(8, 2, 1.0, objects=(2,))], CLS, SEP, GRAMMAR)
    for objects in ((), (-1,)):
        with pytest.raises(ValueError, match="objects must be class indices"):
            CaptionSearch(8, objects=objects)


def test_phrase_of_tokens_runs_from_each_article_to_its_class_name() -> None:
    tokens = [CLS, A, 6, 8, COMMA, A, 7, 9, 10, AND, A, 9, DOT, SEP]
    assert GRAMMAR.phrase_of_tokens(tokens) == [-1, 0, 0, 0, -1, 1, 1, 1, 1, -1, 2, 2, -1, -1]
    assert GRAMMAR.phrase_of_tokens([CLS]) == [-1]


def test_caption_grammar_from_the_model_tokenizer() -> None:
    from model_export.processing.prompt import load_tokenizer

    tokenizer = load_tokenizer()
    grammar = CaptionGrammar.from_tokenizer(tokenizer, ["circle", "hexagon"])
    ids = tokenizer("a small red circle, a blue hexagon and a square.")["input_ids"]
    assert [grammar.article, grammar.comma, grammar.conjunction, grammar.period] == [
        ids[1], ids[5], ids[11], ids[-2]]
    assert grammar.end == ids[-1] == tokenizer.sep_token_id
    assert grammar.classes == (tuple(ids[4:5]), tuple(ids[8:11]))  # "hexagon" is 3 tokens
    assert tokenizer.decode(grammar.classes[1]) == "hexagon"
    assert tokenizer.convert_ids_to_tokens(ids[9]) in {
        tokenizer.convert_ids_to_tokens(i) for i in grammar.continuations}
    assert all(tokenizer.convert_ids_to_tokens(i).startswith("##")
               for i in grammar.continuations)


def test_left_to_right_keeps_the_objects_over_the_threshold_by_box_centre() -> None:
    found = Detections(torch.tensor([[50.0, 0, 60, 10], [0, 30, 10, 40], [0, 0, 10, 10],
                                     [20, 0, 30, 10]]),
                       torch.tensor([0.9, 0.8, 0.7, 0.2]), torch.tensor([0, 1, 2, 3]))
    ordered = left_to_right(found, 0.5)
    # same centre x: the upper one first; the 0.2 detection is not an object
    assert ordered.labels.tolist() == [2, 1, 0]
    assert ordered.scores.tolist() == pytest.approx([0.7, 0.8, 0.9])
    assert ordered.boxes[0].tolist() == [0, 0, 10, 10]
    assert len(left_to_right(found, 0.95).labels) == 0


def test_object_phrase_spans_run_from_each_article_to_its_class_name() -> None:
    caption = "a large gray star, a small red hexagon and a star."
    spans = object_phrase_spans(caption, ["star", "hexagon", "star"])
    assert [caption[a:b] for a, b in spans] == [
        "a large gray star", "a small red hexagon", "a star"]
    # a caption cut short at max_tokens: the phrases it finished
    cut = "a large gray star, a small red hex"
    assert object_phrase_spans(cut, ["star", "hexagon"]) == [(0, 17)]
