"""Caption decoding: beam search over the captioning language model, several images at once.

Greedy decoding commits to each token as it goes. On the step-15843 model, of the 34 greedy
captions of 40 evaluation images that missed their reference, 14 scored *below* the reference
under the model's own probabilities (a search error, not a model error). Beam search keeps the
`beams` best prefixes per image and returns the best finished caption it found, by total
log-probability divided by length ** `length_penalty`; `beams=1` is exactly greedy. By total
log-probability alone (penalty 0) it prefers captions that stop early: on 40 images (step 17511,
`glipv2 eval --tasks caption`) exact match / BLEU-4 / phrase grounding went 0.150 / 0.548 / 0.496
greedy -> 0.175 / 0.528 / 0.442 with 4 beams and penalty 0 -> 0.175 / 0.635 / 0.535 with
penalty 1 (the mean log-probability per token), the default. More beams do not pay: on 200
images (step 21734) 8 beams scored 0.295 / 0.697 / 0.599 against 4 beams' 0.290 / 0.702 / 0.604,
for twice the decoding time.

The search returns each image's `beams` best finished captions. The service grounds them in that
order and answers with the first that does not put the same words on one object twice
(`names_a_region_twice`): the decoder often loses track of what it has named and repeats the
last object ("... a small blue star and a small blue star."), while two alike objects, grounded
apart, stay allowed. On 200 evaluation images (step 27110) exact match went 0.450 -> 0.510,
BLEU-4 0.780 -> 0.761 and phrase grounding 0.713 -> 0.702: the next caption in line often drops
an object where the best one repeated one. Weighting captions by their phrases' grounding scores
as well gained nothing on 100 validation images.

Where the model's config names caption classes, the service first detects them and the search
makes one phrase per object found, left to right (box centre x, then y, the world's caption
order), each phrase ending in its object's class name (`objects`), like constrained beam search
with detected objects (Anderson et al., 2017): `CaptionGrammar` allows only captions of those
phrases, joined as "p, p and p.". Each phrase is grounded to the object it was made for, as
slot-filling captioners ground theirs (Neural Baby Talk, Lu et al., 2018). The decoder still
chooses every other word (size and colour in the world). Counting came first: the decoder's
commonest error was an object left out (28 of 32 wrong captions of 60 validation images, step
27110), while detection at score 0.5 counted the objects right on 59; fixing only the phrase
count took exact match / BLEU-4 / phrase grounding on 200 evaluation images (seed 1000, step
27110) 0.510 / 0.761 / 0.702 -> 0.605 / 0.862 / 0.758. With the count alone, the class words of
the captions were in the reference's order on 61 of 100 validation images (seed 2000, step
29443), the detections' on 99; and the caption head grounded 26 of the 241 right phrases to
another object of the same shape. Naming each detection in turn took 200 evaluation images
(step 29443) from 0.620 / 0.878 / 0.772 to 0.635 / 0.875 / 0.794; what stays wrong is mostly
a colour or size (53 and 25 phrases of 100 validation captions), which rescoring the phrases
with the detection head at their objects' boxes did not fix.

The search sees the model only through the next-token logits of its live prefixes (`BeamState`);
the caption decoder (`service.caption_decoder`) batches every caption's prefixes into one step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model_export.evaluation.metrics import box_iou
from model_export.processing.postprocess import Detections

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The serving default (`ServiceSettings.caption_beams`, `glipv2 eval --caption-beams`).
DEFAULT_BEAMS = 4
DEFAULT_LENGTH_PENALTY = 1.0
DEFAULT_MAX_TOKENS = 64
# Two phrases on boxes overlapping this much are on one object: the phrase grounding bar's IoU.
DUPLICATE_IOU = 0.5



@dataclass(frozen=True)
class CaptionSearch:
    """How one image's caption is searched for.

    max_tokens: the most tokens the caption may have (0: empty caption). beams: prefixes kept
    (1: greedy). length_penalty: a caption scores its total log-probability divided by (its
    token count, [SEP] included) ** length_penalty; 0 ranks by probability alone, which favours
    short captions, 1 by the mean log-probability per token. objects: the class (an index into
    `CaptionGrammar.classes`) of each object phrase the caption must have, in order; None leaves
    the phrases to the decoder.
    """

    max_tokens: int
    beams: int = DEFAULT_BEAMS
    length_penalty: float = DEFAULT_LENGTH_PENALTY
    objects: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0 or self.beams < 1 or self.length_penalty < 0:
            raise ValueError(f"need max_tokens >= 0, beams >= 1 and length_penalty >= 0: {self}")
        if self.objects is not None and (not self.objects or min(self.objects) < 0):
            raise ValueError(f"objects must be class indices, at least one (or None): {self}")


@dataclass(frozen=True)
class CaptionGrammar:
    """The token ids of a world caption's joints and class names: "a small red circle, a large
    blue square and a small green star." Object phrases start with `article` and end with their
    class name (`classes`: each name's token ids); all but the last two are followed by `comma`,
    the last but one by `conjunction`, the last by `period`, then `end` ([SEP]). `continuations`:
    the word-piece tokens that continue a word ("##km"), which may not follow the article."""

    article: int
    comma: int
    conjunction: int
    period: int
    end: int
    classes: tuple[tuple[int, ...], ...]
    continuations: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, class_names: Sequence[str]
                       ) -> CaptionGrammar:
        article, comma, conjunction, period = ids = tokenizer.convert_tokens_to_ids(
            ["a", ",", "and", "."])
        if tokenizer.unk_token_id in ids:
            raise ValueError("the tokenizer has no single tokens for 'a', ',', 'and' and '.'")
        classes = tuple(tuple(tokenizer(name, add_special_tokens=False)["input_ids"])
                        for name in class_names)
        if not all(classes):
            raise ValueError(f"a caption class name has no tokens: {list(class_names)}")
        continuations = tuple(sorted(i for t, i in tokenizer.get_vocab().items()
                                     if t.startswith("##")))
        return cls(article, comma, conjunction, period, end=tokenizer.sep_token_id,
                   classes=classes, continuations=continuations)

    def allowed(self, generated: Sequence[int], objects: Sequence[int], vocab_size: int
                ) -> Tensor:
        """(vocab_size,) bool: the tokens that can follow `generated` in a caption of one phrase
        per entry of `objects` (class indices). A phrase is the article, any words but the
        joints and the other classes' names, then its own class name, whose tokens once begun
        run to its end; the joints come between phrases, the period after the last, then
        [SEP]."""
        last = generated[-1] if generated else None
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        if last is None or last in (self.comma, self.conjunction):
            allowed[self.article] = True
            return allowed
        if last == self.period:
            allowed[self.end] = True
            return allowed
        started = generated.count(self.article)
        words = generated[len(generated) - generated[::-1].index(self.article):]
        name = self.classes[objects[started - 1]]
        if tuple(words[-len(name):]) == name:
            allowed[self.comma if started < len(objects) - 1 else
                    self.conjunction if started == len(objects) - 1 else self.period] = True
            return allowed
        begun = next((n for n in range(len(name) - 1, 0, -1)
                      if len(words) >= n and tuple(words[-n:]) == name[:n]), 0)
        if begun:
            allowed[name[begun]] = True
            return allowed
        allowed[:] = True
        allowed[[self.article, self.comma, self.conjunction, self.period, self.end]] = False
        allowed[[c[0] for c in self.classes if c[0] != name[0]]] = False
        if not words:
            allowed[list(self.continuations)] = False
        return allowed

    def phrase_of_tokens(self, tokens: Sequence[int]) -> list[int]:
        """For each token of a caption prefix ([CLS] first), the index of the object phrase it
        is in (its article to its class name), or -1: [CLS], the joints, the period, [SEP]."""
        joints = (self.comma, self.conjunction, self.period, self.end)
        phrases, phrase = [], -1
        for token in tokens:
            phrase += token == self.article
            phrases.append(-1 if token in joints else phrase)
        return phrases


# The service's defaults (`ServiceSettings.caption_*`).
DEFAULT_SEARCH = CaptionSearch(max_tokens=DEFAULT_MAX_TOKENS)


@dataclass(frozen=True)
class _Prefix:
    tokens: list[int]  # [CLS] then the generated tokens
    log_prob: float
    scored: int  # tokens the log-probability sums over: the generated ones, and [SEP] if ended

    def score(self, length_penalty: float, more: int = 0) -> float:
        """Its length-normalised score, or with `more`, what it would score `more` tokens on
        at the same log-probability."""
        return self.log_prob / max(self.scored + more, 1) ** length_penalty


class BeamState:
    """One image's beam search, advanced one token at a time by whoever batches the steps.

    `prefixes()` are the live prefixes (all of one length), whose next-token logits `advance`
    takes, one row each; it returns, per new live prefix, the index of the prefix it extends
    (what a key/value cache gathers its rows by). A prefix ends at [SEP] or at `max_tokens`.
    The search stops once its best finished caption scores at least what every live prefix
    would if it ended at the next token (exact for length_penalty 0, since log-probabilities
    only fall; the usual beam-search cut-off otherwise). With `search.objects`, only captions
    `grammar` allows (the next-token distribution renormalised over the allowed tokens).
    """

    def __init__(self, search: CaptionSearch, cls_id: int, sep_id: int,
                 grammar: CaptionGrammar | None = None) -> None:
        if search.objects is not None and (
                grammar is None or max(search.objects) >= len(grammar.classes)):
            raise ValueError(f"a search with `objects` needs a CaptionGrammar with its classes: "
                             f"{search}")
        self.search = search
        self.sep_id = sep_id
        self.grammar = grammar
        start = _Prefix([cls_id], 0.0, 0)
        self.live: list[_Prefix] = [start] if search.max_tokens > 0 else []
        self.done: list[_Prefix] = [] if search.max_tokens > 0 else [start]

    @property
    def finished(self) -> bool:
        return not self.live

    def prefixes(self) -> list[list[int]]:
        return [prefix.tokens for prefix in self.live]

    def advance(self, logits: Tensor) -> list[int]:
        """logits (live prefixes, vocab) -> the parent index of each new live prefix."""
        search = self.search
        if self.grammar is not None and search.objects is not None:
            logits = logits.clone()
            for row, prefix in enumerate(self.live):
                allowed = self.grammar.allowed(prefix.tokens[1:], search.objects,
                                               logits.shape[-1])
                logits[row, ~allowed] = float("-inf")
        top = torch.log_softmax(logits.float(), dim=-1).topk(
            min(search.beams, logits.shape[-1]), dim=-1)
        options: list[tuple[float, int, int]] = []  # (log-probability, parent row, token)
        for row, prefix in enumerate(self.live):
            for log_prob, token in zip(top.values[row].tolist(), top.indices[row].tolist(),
                                       strict=True):
                if log_prob == -math.inf:  # not allowed by the grammar (topk runs on into them)
                    break
                options.append((prefix.log_prob + log_prob, row, token))
        if not options:
            return list(range(len(self.live)))
        previous, self.live, parents = self.live, [], []
        for log_prob, row, token in sorted(options, key=lambda option: -option[0]):
            prefix = previous[row]
            if token == self.sep_id:
                self.done.append(_Prefix(prefix.tokens, log_prob, prefix.scored + 1))
                continue
            extended = _Prefix([*prefix.tokens, token], log_prob, prefix.scored + 1)
            if extended.scored >= search.max_tokens:
                self.done.append(extended)
            elif len(self.live) < search.beams:
                self.live.append(extended)
                parents.append(row)
        penalty = search.length_penalty
        best = max(p.score(penalty) for p in self.done) if self.done else None
        if best is not None and (not self.live or best >= max(
                p.score(penalty, more=1) for p in self.live)):
            self.live, parents = [], []
        return parents

    def results(self) -> list[list[int]]:
        """Its `beams` best-scoring finished captions, best first, as generated token ids (no
        [CLS] or [SEP])."""
        ranked = sorted(self.done, key=lambda p: -p.score(self.search.length_penalty))
        return [p.tokens[1:] for p in ranked[:self.search.beams]]


def names_a_region_twice(phrases: Sequence[str], boxes: Sequence[Sequence[float]],
                         min_iou: float = DUPLICATE_IOU) -> bool:
    """Whether two phrases of a grounded caption are the same words on the same region (box IoU
    at least `min_iou`): the caption names one object twice. The same words on two regions are
    two objects, which a caption may well name alike."""
    return any(phrases[a] == phrases[b] and box_iou(boxes[a], boxes[b]) >= min_iou
               for a in range(len(phrases)) for b in range(a + 1, len(phrases)))


def left_to_right(found: Detections, threshold: float) -> Detections:
    """The detections scoring at least `threshold`, in the order a world caption names its
    objects: by box centre x, then y."""
    keep = found.scores >= threshold
    boxes, scores, labels = found.boxes[keep], found.scores[keep], found.labels[keep]
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2).tolist()
    order = sorted(range(len(centres)), key=lambda i: centres[i])
    return Detections(boxes[order], scores[order], labels[order])


_ARTICLE = re.compile(r"\ba\b")


def object_phrase_spans(caption: str, names: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of the phrases of a caption searched with `objects` whose class names
    are `names`, in order: each from its article to the end of its class name. Stops at the
    first phrase the caption does not finish (one cut short at `max_tokens`)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for name in names:
        article = _ARTICLE.search(caption, start)
        end = caption.find(name, article.end()) if article is not None else -1
        if article is None or end < 0:
            break
        spans.append((article.start(), end + len(name)))
        start = end + len(name)
    return spans
