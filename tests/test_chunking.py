"""Prompt chunking: token-budget packing, the additivity it relies on, and its errors."""

from __future__ import annotations

import itertools
import random

import pytest

from model_export.processing.chunking import ChunkingError, name_token_counts, pack_chunks
from model_export.processing.prompt import load_tokenizer


@pytest.fixture(scope="module")
def backend():
    return load_tokenizer().backend_tokenizer


def lvis_like_names(n: int, seed: int = 0) -> list[str]:
    """Names shaped like LVIS's: underscores, parenthesised senses, long rare words."""
    rng = random.Random(seed)
    words = ["bat", "hot_dog", "aerosol_can", "bolo_tie", "cornet", "ferris_wheel", "yo-yo",
             "mallard", "pirate_flag", "zucchini", "Lego", "chopping_board", "kiwi_fruit"]
    names = []
    for i in range(n):
        name = rng.choice(words)
        if rng.random() < 0.3:
            name += f" ({rng.choice(['animal', 'baseball', 'musical instrument'])})"
        names.append(f"{name}_{i}" if rng.random() < 0.5 else f"{name} {i}")
    return names


def test_names_without_tokens_are_in_no_chunk() -> None:
    chunks = pack_chunks(["(x)", "ok", "_", "fine"], [0, 1, 0, 1], max_tokens=10)
    assert [chunk.class_indices for chunk in chunks] == [(1, 3)]
    assert pack_chunks(["(x)"], [0], max_tokens=10) == []


def test_chunks_cover_every_class_once_in_order_within_budget(backend) -> None:
    names = lvis_like_names(1203)
    counts = name_token_counts(backend, names)
    chunks = pack_chunks(names, counts, max_tokens=256)
    assert [i for c in chunks for i in c.class_indices] == list(range(1203))
    for chunk in chunks:
        assert chunk.num_tokens <= 256
        # the additivity the packing relies on, against the real tokenizer
        assert len(backend.encode(chunk.prompt.caption).ids) == chunk.num_tokens
        assert chunk.prompt.class_names == [names[i] for i in chunk.class_indices]
    # greedy: a chunk closes only when the next name would not fit
    for chunk, following in itertools.pairwise(chunks):
        assert chunk.num_tokens + 1 + counts[following.class_indices[0]] > 256


def test_chunk_size_caps_classes_per_chunk(backend) -> None:
    names = ["circle", "square", "triangle", "diamond", "star", "hexagon", "cube"]
    chunks = pack_chunks(names, name_token_counts(backend, names), 256, chunk_size=3)
    assert [c.class_indices for c in chunks] == [(0, 1, 2), (3, 4, 5), (6,)]
    assert chunks[1].prompt.caption == "diamond. star. hexagon"


def test_small_budget_splits_exactly_at_the_bound() -> None:
    # 2 specials + names of 3 tokens + 1 per separator: [3, 3] = 9 tokens, a third makes 13
    chunks = pack_chunks(["a", "b", "c"], [3, 3, 3], max_tokens=9)
    assert [c.class_indices for c in chunks] == [(0, 1), (2,)]
    assert [c.num_tokens for c in chunks] == [9, 5]


def test_errors_name_the_class() -> None:
    with pytest.raises(ChunkingError, match=r"class 1 \('long'\) is 11 tokens long on its own"):
        pack_chunks(["ok", "long"], [1, 9], max_tokens=10)
    assert pack_chunks([], [], max_tokens=10) == []
    with pytest.raises(ChunkingError, match="chunk_size must be >= 1"):
        pack_chunks(["a"], [1], max_tokens=10, chunk_size=0)
