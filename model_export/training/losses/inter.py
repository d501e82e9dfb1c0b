"""L_inter: GLIPv2's inter-image region-word contrastive loss with label propagation.

Features are taken *before* fusion: all sampled regions of the batch against all tokens of the
batch. Reference: microsoft/GLIP `modeling/rpn/loss.py` (the shallow contrastive loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model_export.training.losses.targets import ImageTargets


@dataclass
class PromptInfo:
    """What L_inter label propagation needs to know about one caption of the batch.

    Attributes:
        token_labels: length T (the batch's padded token count): the category the phrase
            covering each token names (e.g. "person"), None for every other token and padding.
        detection_prompt: True for class-name / attribute prompts ("circle. square. red star"),
            whose phrases are labels; False for natural sentences, captions and questions, whose
            phrases are never propagation targets (a "person" in a sentence may be a specific
            person, not every person of the batch).
    """

    token_labels: list[str | None]
    detection_prompt: bool


def contrastive_region_inputs(
    matched_gt: Sequence[Tensor],
    targets: Sequence[ImageTargets],
    region_indices: Sequence[Tensor],
) -> tuple[list[list[str | None]], list[Tensor]]:
    """Labels and own-caption positive maps of the regions sampled for L_inter.

    Args:
        matched_gt: per image (A,) int64 matched box per anchor, -1 background
            (`DetectionLosses.matched_gt`).
        targets: per image ground truth.
        region_indices: per image (R_i,) int64 anchor indices sampled as regions (e.g. the
            positives, capped, plus some background anchors).

    Returns:
        `region_box_labels` (per image, per region: its box's category or None) and
        `region_positive` (per image (R_i, T) float positive-map rows, zero for background),
        the inputs of `inter_image_contrastive_targets`.
    """
    labels: list[list[str | None]] = []
    positives: list[Tensor] = []
    for match, target, idx in zip(matched_gt, targets, region_indices, strict=True):
        gt = match[idx.to(match.device)].cpu()
        num_tokens = target.positive_map.shape[1]
        rows = torch.zeros(len(gt), num_tokens, dtype=target.positive_map.dtype,
                           device=target.positive_map.device)
        fg = gt >= 0
        if fg.any():
            rows[fg] = target.positive_map[gt[fg].to(target.positive_map.device)]
        if target.box_labels:
            labels.append([target.box_labels[g] if g >= 0 else None for g in gt.tolist()])
        else:
            labels.append([None] * len(gt))
        positives.append(rows)
    return labels, positives


def inter_image_contrastive_targets(
    region_box_labels: Sequence[Sequence[str | None]],
    region_positive: Sequence[Tensor],
    prompts: Sequence[PromptInfo],
) -> Tensor:
    """GLIPv2's L_inter target matrix: every sampled region against every token of the batch.

    Region r of image i is positive for token t of caption j when
    - j == i and `region_positive[i][r, t] > 0` (its own caption's grounding), or
    - j != i, caption j is a detection prompt, and token t of caption j names r's category
      (label propagation: a "person" region is positive for the "person" phrase of every other
      detection prompt of the batch). Natural-sentence captions never receive propagated
      positives, and background regions (category None) never propagate.

    Args:
        region_box_labels: per image (N of them), per region: the category of its matched box,
            None for background.
        region_positive: per image (R_i, T) positive-map rows of the matched boxes (zeros for
            background), in the image's own caption.
        prompts: per image the caption's `PromptInfo` (token_labels of length T).

    Returns:
        (R_total, N * T) float 0/1, rows = regions in image order, columns = caption j's token
        t at `j * T + t`.
    """
    n = len(prompts)
    if not len(region_box_labels) == len(region_positive) == n:
        raise ValueError("need one region label list, positive map and prompt per image")
    if n == 0:
        return torch.zeros(0, 0)
    token_counts = {len(p.token_labels) for p in prompts}
    if len(token_counts) != 1:
        raise ValueError(f"prompts disagree on the token count: {sorted(token_counts)}")
    t = token_counts.pop()
    device = region_positive[0].device

    # Categories as integers, so that matching is one broadcast comparison. Tokens that cannot
    # receive propagated positives (no category, or a non-detection caption) get -1; regions
    # without a category get -2: the two never compare equal.
    category_ids: dict[str, int] = {}
    token_ids = torch.full((n, t), -1, dtype=torch.int64)
    for j, prompt in enumerate(prompts):
        if not prompt.detection_prompt:
            continue
        for col, name in enumerate(prompt.token_labels):
            if name is not None:
                token_ids[j, col] = category_ids.setdefault(name, len(category_ids))
    region_ids, region_image, own_rows = [], [], []
    for i, (labels_i, positive_i) in enumerate(zip(region_box_labels, region_positive,
                                                    strict=True)):
        r = len(labels_i)
        if positive_i.shape != (r, t):
            raise ValueError(f"image {i}: region_positive is {tuple(positive_i.shape)}, "
                             f"expected {(r, t)}")
        region_ids += [category_ids.get(name, -2) if name is not None else -2
                       for name in labels_i]
        region_image += [i] * r
        own_rows.append(positive_i.detach().to("cpu", torch.float32) > 0)
    regions = torch.tensor(region_ids, dtype=torch.int64)  # (R,)
    images = torch.tensor(region_image, dtype=torch.int64)  # (R,)
    column_image = torch.arange(n).repeat_interleave(t)  # (N*T,) caption of each column

    propagated = regions[:, None] == token_ids.reshape(-1)[None, :]  # (R, N*T)
    own_block = images[:, None] == column_image[None, :]  # (R, N*T)
    own = torch.zeros_like(propagated)
    # Each region's own caption block takes its positive-map row: (R, T) -> (R, N*T).
    own[own_block] = torch.cat(own_rows, dim=0).reshape(-1)
    targets = own | (propagated & ~own_block)
    return targets.float().to(device)


def multi_positive_nll(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Mean over rows with a positive of `-mean_{positives} log softmax(row over valid cols)`.

    logits, targets: (R, C); valid: (C,) or (R, C) bool. Invalid columns take no softmax mass
    and are never positives. Returns 0 (connected to the graph) when no row has a positive.
    """
    valid = valid.expand_as(logits)
    positives = (targets > 0) & valid
    has_pos = positives.any(dim=1)
    if not bool(has_pos.any()):
        return logits.sum() * 0.0
    log_prob = logits[has_pos].masked_fill(~valid[has_pos], -math.inf).log_softmax(dim=1)  # (R', C)
    pos = positives[has_pos]
    pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return (-pos_log_prob / pos.sum(dim=1)).mean()


def inter_image_contrastive_loss(
    region_features: Tensor,
    token_features: Tensor,
    targets: Tensor,
    token_valid: Tensor,
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """Bidirectional multi-positive contrastive loss between regions and tokens (L_inter).

    Features are L2-normalised and `logits = region · tokenᵀ / temperature` (R_total, N * T).
    Each direction is a softmax cross-entropy whose target is the uniform distribution over the
    positives (GLIP's shallow contrastive `NllSoftMaxLoss` with a row-normalised positive map,
    also MDETR's contrastive-align form): for a row with positives P,
    `-1/|P| * sum_{p in P} log softmax(row)_p`. This is principled for several positives per
    row (the expected negative log-likelihood under the target distribution, minimised only when
    the probability mass is spread over the positives) and does not make positives compete
    harder than negatives, as a per-positive InfoNCE would.
    - region -> tokens: softmax over all valid tokens of the batch, for regions with a positive;
    - token -> regions: softmax over all regions, for valid tokens with a positive.
    Rows / columns without a positive are skipped (they are still negatives for the others).
    Loss = (mean over regions + mean over tokens) / 2. (The reference sums rows and divides by
    the number of positive anchors; means keep the scale independent of batch composition.)

    Args:
        region_features: (R_total, D) pre-fusion features of the sampled regions, projected.
        token_features: (N * T, D) pre-fusion token features of all captions, projected.
        targets: (R_total, N * T) 0/1 from `inter_image_contrastive_targets`.
        token_valid: (N * T,) bool, False for padding (excluded from every softmax).
        temperature: softmax temperature, > 0 (a float, or e.g. `log_scale.exp()` to learn it).

    Returns:
        Scalar loss (0 when there is no positive pair).
    """
    if targets.shape != (region_features.shape[0], token_features.shape[0]):
        raise ValueError(
            f"targets {tuple(targets.shape)} vs {region_features.shape[0]} regions and "
            f"{token_features.shape[0]} tokens"
        )
    regions = F.normalize(region_features, p=2, dim=-1)
    tokens = F.normalize(token_features, p=2, dim=-1)
    logits = regions @ tokens.t() / temperature  # (R, N*T)
    targets = targets.to(logits.device)
    token_valid = token_valid.to(device=logits.device, dtype=torch.bool)
    region_valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    region_to_token = multi_positive_nll(logits, targets, token_valid)
    token_positive = targets.t() * token_valid[:, None]
    token_to_region = multi_positive_nll(logits.t(), token_positive, region_valid)
    return (region_to_token + token_to_region) / 2

