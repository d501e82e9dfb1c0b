"""Metrics of generated text: VQA exact-match accuracy, caption exact match and corpus BLEU-4,
and the grounding accuracy of a caption's phrases.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from model_export.evaluation.metrics.detection import Box, box_iou


def _normalise_text(text: str) -> str:
    # Case and runs of whitespace carry no meaning in a closed-set answer or a caption.
    return " ".join(text.lower().split())


def _check_lengths(name: str, a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name}: {len(a)} predictions for {len(b)} references")


def vqa_exact_accuracy(predicted: Sequence[str], answers: Sequence[str]) -> float | None:
    """Fraction of answers equal to the truth, ignoring case and whitespace; `None` if empty.

    The world's VQA has exactly one right answer per question, so exact match replaces the
    VQA-v2 "min(#humans agreeing / 3, 1)" soft score.
    """
    _check_lengths("vqa_exact_accuracy", predicted, answers)
    if not answers:
        return None
    hits = sum(
        _normalise_text(p) == _normalise_text(a) for p, a in zip(predicted, answers, strict=True)
    )
    return hits / len(answers)


_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize_caption(text: str) -> list[str]:
    """BLEU tokens: lower-cased words, with every punctuation mark a token of its own.

    `"a small red circle, a large gray star."` -> `a small red circle , a large gray star .`
    Splitting punctuation off is what sacrebleu's default "13a" tokeniser does for text without
    digits, so the BLEU here equals sacrebleu's (lowercase=True, scaled to [0, 1]) on captions.
    """
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    max_order: int = 4,
) -> float:
    """Corpus BLEU (Papineni et al. 2002) of token lists, one reference each, in [0, 1].

    Clipped n-gram matches and n-gram counts are summed over the corpus before dividing (not
    averaged per sentence); uniform weights over orders 1..max_order; brevity penalty
    exp(1 - r/c) when the total hypothesis length c is below the reference length r. No
    smoothing: an order with no match gives 0, as the standard definition does.
    """
    _check_lengths("corpus_bleu", hypotheses, references)
    matches = [0] * max_order
    totals = [0] * max_order
    hyp_length = 0
    ref_length = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp_length += len(hyp)
        ref_length += len(ref)
        for n in range(1, max_order + 1):
            hyp_counts = _ngrams(hyp, n)
            ref_counts = _ngrams(ref, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
            totals[n - 1] += sum(hyp_counts.values())
    if hyp_length == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_order
    brevity = 1.0 if hyp_length > ref_length else math.exp(1.0 - ref_length / hyp_length)
    return brevity * math.exp(log_precision)


def caption_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Caption `exact_match` (case/whitespace-insensitive) and corpus `bleu4`, both in [0, 1].

    The world's captions are fully determined by the image, so exact match is the strict score
    and BLEU-4 the partial-credit one. Tokenisation: `tokenize_caption`. Empty input gives `None`
    for both.
    """
    _check_lengths("caption_metrics", hypotheses, references)
    if not references:
        return {"exact_match": None, "bleu4": None}
    pairs = zip(hypotheses, references, strict=True)
    exact = sum(_normalise_text(h) == _normalise_text(r) for h, r in pairs)
    bleu = corpus_bleu(
        [tokenize_caption(h) for h in hypotheses], [tokenize_caption(r) for r in references]
    )
    return {"exact_match": exact / len(references), "bleu4": bleu}


def phrase_grounding_accuracy(pairs: Sequence[tuple[Box | None, Box]]) -> float | None:
    """Fraction of `(predicted box or None, gt box)` pairs with IoU >= 0.5; `None` if empty.

    A phrase the model did not ground (`None`) counts as wrong, so skipping hard phrases cannot
    raise the score.
    """
    if not pairs:
        return None
    hits = sum(pred is not None and box_iou(pred, gt) >= 0.5 for pred, gt in pairs)
    return hits / len(pairs)


def match_caption_phrases(references: Sequence[tuple[str, Box]],
                          predicted: Sequence[tuple[str, Box]]) -> list[tuple[Box | None, Box]]:
    """Pairs each reference phrase `(text, gt box)` of a caption with the predicted box of the
    same text, in caption order: the k-th "a small red circle" of the reference takes the k-th
    of the generated caption, so two objects that read alike can both be grounded right. A
    reference phrase the caption lacks (or has fewer times) gets `None`. Input to
    `phrase_grounding_accuracy`."""
    boxes: dict[str, list[Box]] = {}
    for text, box in predicted:
        boxes.setdefault(text, []).append(box)
    taken: Counter = Counter()
    pairs = []
    for text, truth in references:
        found = boxes.get(text, [])
        pairs.append((found[taken[text]] if taken[text] < len(found) else None, truth))
        taken[text] += 1
    return pairs
