"""Beam search over a toy language model whose next-token logits depend on (image, prefix)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import Tensor

from service.caption_search import CaptionSearch, beam_search, names_a_region_twice

CLS, SEP = 0, 1
VOCAB = 5  # [CLS], [SEP] and three words


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
