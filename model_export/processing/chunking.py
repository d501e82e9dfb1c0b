"""Prompt chunking: any number of class names packed into prompts that fit the text encoder.

The service packs every detection request with it, and training packs its full-vocabulary
grounding prompts the same way, so the model is trained on the prompts it is served.

GLIP's text encoder takes at most 256 tokens, LVIS has 1,203 classes. The names are packed greedily,
in the client's order, into chunks whose caption ("name. name. name", as the reference builds it)
stays within the token budget ([CLS] and [SEP] included) and holds at most `chunk_size` names. The
vision encoder runs once per image whatever the number of chunks; the chunks go through the fusion
engine as a batch, and their detections merge back under the original class indices.

Token counts are additive for BERT's WordPiece: the pre-tokenizer splits on whitespace and
punctuation, so a caption's tokens are its names' tokens plus one per "." separator plus the two
special tokens. Each chunk's caption is still tokenised in full when it is used, which checks this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_export.processing.prompt import (
    EVAL_SEPARATOR,
    DetectionPrompt,
    build_detection_prompt,
    clean_name,
)

SPECIAL_TOKENS = 2  # [CLS] ... [SEP]
SEPARATOR_TOKENS = 1  # "." between names


class ChunkingError(ValueError):
    """A class name cannot fit any chunk: it alone is over the token budget."""


@dataclass(frozen=True)
class PromptChunk:
    """One prompt of a chunked request.

    class_indices: for label c of this chunk's prompt, the index of that name in the request.
    prompt: the caption and character spans, as tokenised and fed to the model.
    num_tokens: tokens of the caption, special tokens included.
    """

    class_indices: tuple[int, ...]
    prompt: DetectionPrompt
    num_tokens: int


def name_token_counts(tokenizer: Any, names: Sequence[str]) -> list[int]:
    """WordPiece tokens of each cleaned name (no special tokens), in one batched call."""
    encodings = tokenizer.encode_batch([clean_name(name) for name in names],
                                       add_special_tokens=False)
    return [len(encoding.ids) for encoding in encodings]


def pack_chunks(names: Sequence[str], token_counts: Sequence[int], max_tokens: int,
                chunk_size: int | None = None) -> list[PromptChunk]:
    """Greedy packing in order: a chunk closes when the next name would exceed a bound.

    `token_counts[i]` is `names[i]`'s count from `name_token_counts`. A name with no tokens
    (nothing left once cleaned, e.g. "(x)", or only characters the tokenizer drops) has nothing
    for a region to match: it is in no chunk, and so is never detected. No names with tokens,
    no chunks. Raises `ChunkingError` naming the first class that fits no chunk.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ChunkingError(f"chunk_size must be >= 1, got {chunk_size}")
    budget = max_tokens - SPECIAL_TOKENS
    chunks: list[list[int]] = [[]]
    used = 0
    for index, count in enumerate(token_counts):
        if count == 0:
            continue
        if count > budget:
            raise ChunkingError(
                f"class {index} ({names[index]!r}) is {count + SPECIAL_TOKENS} tokens long on "
                f"its own, more than the model's limit of {max_tokens}")
        current = chunks[-1]
        extra = count + (SEPARATOR_TOKENS if current else 0)
        full = chunk_size is not None and len(current) >= chunk_size
        if current and (used + extra > budget or full):
            chunks.append([])
            current, extra, used = chunks[-1], count, 0
        current.append(index)
        used += extra
    return [PromptChunk(class_indices=tuple(indices),
                        prompt=build_detection_prompt([names[i] for i in indices],
                                                      EVAL_SEPARATOR),
                        num_tokens=SPECIAL_TOKENS + sum(token_counts[i] for i in indices)
                        + SEPARATOR_TOKENS * (len(indices) - 1))
            for indices in chunks if indices]
