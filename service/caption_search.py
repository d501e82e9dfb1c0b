"""Caption decoding: beam search over the captioning language model, several images at once.

Greedy decoding commits to each token as it goes. On the shipped model, of the 34 greedy captions
of 40 evaluation images that missed their reference, 14 scored *below* the reference under the
model's own probabilities (a search error, not a model error): a token that looked best at one
step led into a worse caption. Beam search keeps the `beams` most probable prefixes per image and
returns the most probable finished caption it found. Scores are total log-probabilities with no
length normalisation, so a caption is not rewarded for going on; `beams=1` is exactly greedy.

The search sees the model only through `step`: the next-token logits of a batch of prefixes, each
on its own image, which the model runner computes with one caption-step graph call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The serving default (`ServiceSettings.caption_beams`, `glipv2 eval --caption-beams`).
DEFAULT_BEAMS = 4
# rows' images (indices into the batch) and token prefixes ([CLS] first) -> (rows, vocab) logits
StepFn = Callable[[list[int], list[list[int]]], Tensor]


@dataclass(frozen=True)
class _Prefix:
    tokens: list[int]  # [CLS] then the generated tokens
    log_prob: float


def beam_search(step: StepFn, max_tokens: Sequence[int], beams: Sequence[int], cls_id: int,
                sep_id: int) -> list[list[int]]:
    """The most probable caption per image, as generated token ids (no [CLS] or [SEP]).

    Per image: max_tokens, the most tokens its caption may have (0: empty caption), and beams,
    the prefixes it keeps. A prefix ends at [SEP] or at its limit. An image stops searching once
    its best finished caption is at least as probable as every live prefix, which
    log-probabilities can only lower.
    """
    if len(beams) != len(max_tokens) or min(beams, default=1) < 1:
        raise ValueError(f"need one beam width >= 1 per image, got {list(beams)}")
    live = [[_Prefix([cls_id], 0.0)] if limit > 0 else [] for limit in max_tokens]
    done: list[list[_Prefix]] = [[] if limit > 0 else [_Prefix([cls_id], 0.0)]
                                 for limit in max_tokens]
    while any(live):
        rows = [(image, prefix) for image, prefixes in enumerate(live) for prefix in prefixes]
        logits = step([image for image, _ in rows], [prefix.tokens for _, prefix in rows])
        top = torch.log_softmax(logits.float(), dim=-1).topk(
            min(max(beams), logits.shape[-1]), dim=-1)
        candidates: list[list[tuple[float, _Prefix, int]]] = [[] for _ in live]
        for row, (image, prefix) in enumerate(rows):
            width = beams[image]
            for log_prob, token in zip(top.values[row, :width].tolist(),
                                       top.indices[row, :width].tolist(), strict=True):
                candidates[image].append((prefix.log_prob + log_prob, prefix, token))
        for image, options in enumerate(candidates):
            if not options:
                continue
            live[image] = []
            for score, prefix, token in sorted(options, key=lambda option: -option[0]):
                if token == sep_id:
                    done[image].append(_Prefix(prefix.tokens, score))
                    continue
                extended = _Prefix([*prefix.tokens, token], score)
                if len(extended.tokens) - 1 >= max_tokens[image]:
                    done[image].append(extended)
                elif len(live[image]) < beams[image]:
                    live[image].append(extended)
            if done[image] and (not live[image] or max(p.log_prob for p in done[image])
                                >= live[image][0].log_prob):
                live[image] = []
    return [max(finished, key=lambda p: p.log_prob).tokens[1:] for finished in done]
