"""Phrases of free text: a grounding prompt's phrases, a question's noun phrases, and whether
an answer names something that can be pointed at. Pure functions of the text."""

from __future__ import annotations

import re
from collections.abc import Collection

_PHRASE = re.compile(r"[^.,;\n]+")
_WORD = re.compile(r"[A-Za-z0-9_-]+")
_NOT_OBJECTS = frozenset({"yes", "no", "none", "nothing", "zero"})


def split_phrases(prompt: str) -> list[tuple[int, int]]:
    """Character spans of the phrases of a free-text prompt, in order.

    Phrases are separated by '.', ',', ';' or new lines (how grounding prompts are written in
    training: "red circle. large blue star"), with surrounding whitespace left out of the span.
    """
    spans = []
    for match in _PHRASE.finditer(prompt):
        text = match.group()
        start = match.start() + len(text) - len(text.lstrip())
        end = match.end() - (len(text) - len(text.rstrip()))
        if end > start:
            spans.append((start, end))
    return spans


def answer_names_something(answer: str) -> bool:
    """Whether an answer can be pointed at: not a count, not yes/no."""
    text = answer.strip().lower()
    return bool(text) and text not in _NOT_OBJECTS and not text.replace(".", "").isdigit()


def question_phrases(question: str, stopwords: Collection[str]) -> list[tuple[int, int]]:
    """Spans of the noun phrases a question names: maximal runs of words that are not
    `stopwords` (the model's `tasks.question_stopwords`: question words, relations, attribute
    names), e.g. "what shape is left of the red square?" -> "red square". The phrases grounded
    VQA returns boxes for."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    end = 0
    for match in _WORD.finditer(question):
        if match.group().lower() in stopwords:
            if start is not None:
                spans.append((start, end))
                start = None
            continue
        if start is None:
            start = match.start()
        end = match.end()
    if start is not None:
        spans.append((start, end))
    return spans
