"""The GLIPv2 model: Enc_V (Swin + FPN), Enc_L (BERT), Enc_VL (fusion tower) and the ATSS head.

The three encoders are separate methods because they are separate engines at serving time: the
image is encoded once for any number of prompt chunks, and text features are cached per prompt.
`forward` returns raw head tensors, the same in training and evaluation; post-processing is in
`model_export.processing.postprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.modeling.backbone import Glipv2SwinBackbone
from model_export.modeling.config import Glipv2Config
from model_export.modeling.fpn import Glipv2FPN
from model_export.modeling.fusion import CaptionImageStates, Glipv2FusionTower
from model_export.modeling.head import Glipv2AtssHead
from model_export.modeling.language import Glipv2LanguageBackbone, TextFeatures
from model_export.modeling.lm_head import Glipv2LMHead
from model_export.modeling.mask_head import Glipv2MaskHead
from model_export.modeling.vqa_head import Glipv2VqaHead


@dataclass
class Glipv2Output:
    """Raw outputs of the model, one list entry per FPN level (P3..P7, strides 8..128).

    box_regression: (N, 4, H_l, W_l) box deltas (dx, dy, dw, dh, coder-weighted) per location.
    centerness: (N, 1, H_l, W_l) centerness logits.
    token_logits: (N, H_l * W_l, T) region-token logits, locations in row-major (y, x) order.
    fused_visual: (N, C, H_l, W_l) image features after the fusion tower (for the mask head).
    fused_text: (N, T, D) token features after the fusion tower.
    mlm_logits: (N, T, vocab) masked-token logits when the model has an MLM head, else None.
    """

    box_regression: list[Tensor]
    centerness: list[Tensor]
    token_logits: list[Tensor]
    fused_visual: list[Tensor]
    fused_text: Tensor
    mlm_logits: Tensor | None = None


@dataclass
class CaptionTokens:
    """Caption tokens after the fusion tower, and their entries of the key/value cache.

    fused_text: (N, T, D) token features after the fusion tower (T = 1 for a decoding step).
    keys, values: (N, L, heads, T, d) self-attention keys and values of every text layer, in
        order: the language encoder's layers, then each fusion layer's text layer.
    """

    fused_text: Tensor
    keys: Tensor
    values: Tensor


class Glipv2ContrastiveProjection(nn.Module):
    """Linear maps of pre-fusion region and token features into one space, for L_inter."""

    def __init__(self, visual_dim: int, text_dim: int, dim: int) -> None:
        super().__init__()
        self.region = nn.Linear(visual_dim, dim)
        self.token = nn.Linear(text_dim, dim)

    def forward(self, regions: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(R, C) regions, (M, D) tokens -> L2-normalised (R, d) and (M, d)."""
        return (nn.functional.normalize(self.region(regions), dim=-1),
                nn.functional.normalize(self.token(tokens), dim=-1))


class Glipv2Model(nn.Module):
    """GLIPv2 with GLIP-compatible parameters (presets `glip-t`, `glip-l` load released weights)."""

    def __init__(self, config: Glipv2Config) -> None:
        super().__init__()
        config.validate()
        self.config = config
        stage_channels = config.swin.stage_channels()
        self.backbone = Glipv2SwinBackbone(config.swin)
        self.fpn = Glipv2FPN(
            tuple(stage_channels[i] for i in config.swin.out_stages), config.fpn.out_channels,
            config.fpn.lateral_skip,
        )
        self.language = Glipv2LanguageBackbone(config.language)
        self.fusion = Glipv2FusionTower(config.fusion, config.language, config.head.anchor_strides)
        self.head = Glipv2AtssHead(config.head, config.fusion.channels,
                                   config.language.hidden_size)
        lang = config.language
        self.prompt_offset = (
            nn.Parameter(torch.zeros(lang.prompt_offset_len, lang.hidden_size))
            if lang.prompt_offset_len else None
        )
        self.mlm_head = (Glipv2LMHead(lang, tied=config.head.tie_mlm_decoder)
                         if config.head.mlm_head else None)
        tasks = config.tasks
        channels = config.fusion.channels
        self.mask_head = (
            Glipv2MaskHead(channels, lang.hidden_size, embed_dim=tasks.mask_embed_dim,
                           group_norm_groups=config.fusion.group_norm_groups)
            if tasks.mask_head else None
        )
        self.vqa_head = (
            Glipv2VqaHead(lang.hidden_size, tasks.vqa_hidden_dim, len(tasks.vqa_answers),
                          tasks.vqa_glimpses)
            if tasks.vqa_head else None
        )
        # L_inter compares pre-fusion region and token features in a shared space (training).
        self.contrastive = (
            Glipv2ContrastiveProjection(channels, lang.hidden_size, tasks.contrastive_dim)
            if tasks.contrastive_dim else None
        )

    def encode_image(self, images: Tensor) -> list[Tensor]:
        """images: (N, 3, H, W) normalised BGR, H and W multiples of 32 -> P3..P7 (N, C, h, w)."""
        return self.fpn(self.backbone(images))

    def image_colours(self, images: Tensor) -> Tensor | None:
        """images (N, 3, H, W) -> the mean pixel of each P3 cell (N, 3, H/8, W/8), which a
        fusion with `pixel_colours` reads beside the FPN levels; None without it."""
        if not self.config.fusion.pixel_colours:
            return None
        stride = self.config.head.anchor_strides[0]
        return F.avg_pool2d(images, stride)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, causal: bool = False
                    ) -> TextFeatures:
        """input_ids, attention_mask: (N, T) -> token features, with the prompt offset if tuned.

        `causal`: unidirectional features for captioning (token i sees tokens <= i only).
        """
        return self._with_prompt_offset(self.language(input_ids, attention_mask, causal=causal))

    def _with_prompt_offset(self, text: TextFeatures) -> TextFeatures:
        if self.prompt_offset is None:
            return text
        offset = self.prompt_offset[: text.hidden.shape[1]].unsqueeze(0)  # (1, T, D)
        return TextFeatures(hidden=text.hidden + offset, embedded=text.embedded + offset,
                            mask=text.mask)

    def fuse(self, visual: list[Tensor], text: TextFeatures, causal: bool = False,
             colours: Tensor | None = None) -> Glipv2Output:
        """Deep fusion, then the head: FPN levels + token features -> raw outputs.

        `causal` is the captioning mode (see `Glipv2FusionTower`); `mlm_logits` then predict
        the next token at every position. `colours`: `image_colours` of the same images.
        """
        fused_visual, fused_text = self.fusion(visual, text, causal=causal, colours=colours)
        box_regression, centerness, token_logits = self.head(fused_visual, fused_text)
        mlm_logits = self.lm_logits(fused_text) if self.mlm_head is not None else None
        return Glipv2Output(
            box_regression=box_regression,
            centerness=centerness,
            token_logits=token_logits,
            fused_visual=fused_visual,
            fused_text=fused_text,
            mlm_logits=mlm_logits,
        )

    def lm_logits(self, fused_text: Tensor) -> Tensor:
        """(N, T, D) fused tokens -> (N, T, vocab) language-model logits."""
        if self.mlm_head is None:
            raise ValueError("this model has no language-model head")
        embeddings = self.language.bert.embeddings.word_embeddings.weight
        return self.mlm_head(fused_text, embeddings if self.config.head.tie_mlm_decoder else None)

    def caption_prefix(self, states: CaptionImageStates, input_ids: Tensor,
                       attention_mask: Tensor, token_boxes: Tensor | None = None
                       ) -> CaptionTokens:
        """Whole captions at once: input_ids, attention_mask (N, T) right padded, token_boxes
        (N, T, 4) (`Glipv2FusionTower.caption_prefix`), `states` of each row's image
        (`fusion.caption_image_states`). The fused tokens are `fuse(..., causal=True)`'s; the
        keys and values start a cache for `caption_step`."""
        text, keys, values = self.language.encode_caption(input_ids, attention_mask)
        fused_text, fusion_keys, fusion_values = self.fusion.caption_prefix(
            states, self._with_prompt_offset(text), token_boxes)
        return CaptionTokens(fused_text=fused_text, keys=torch.cat([keys, fusion_keys], dim=1),
                             values=torch.cat([values, fusion_values], dim=1))

    def caption_step(self, states: CaptionImageStates, input_ids: Tensor, past_mask: Tensor,
                     token_boxes: Tensor, past_keys: Tensor, past_values: Tensor
                     ) -> CaptionTokens:
        """One new token per row against its caption's cache; only it is computed.

        input_ids: (N, 1) the new tokens; past_mask: (N, P) 1 for real cached positions (rows
        right padded); token_boxes: (N, 1, 4) the new tokens' boxes (zeros: anywhere);
        past_keys, past_values: (N, L, heads, P, d) (`CaptionTokens`). A new token's position
        is its row's count of cached tokens ([CLS] is 0), so rows of different lengths step
        together. -> the new tokens' `CaptionTokens` (T = 1), which the caller appends.
        """
        positions = past_mask.sum(dim=1, keepdim=True)  # (N, 1)
        layers = self.config.language.num_layers
        hidden, keys, values = self.language.step(input_ids, positions, past_mask,
                                                  past_keys[:, :layers], past_values[:, :layers])
        if self.prompt_offset is not None:  # encode_text's offset of that position
            hidden = hidden + F.embedding(positions, self.prompt_offset)  # (N, 1, D)
        fused_text, fusion_keys, fusion_values = self.fusion.caption_step(
            states, hidden, token_boxes, past_mask, past_keys[:, layers:], past_values[:, layers:])
        return CaptionTokens(fused_text=fused_text, keys=torch.cat([keys, fusion_keys], dim=1),
                             values=torch.cat([values, fusion_values], dim=1))

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                causal: bool = False) -> Glipv2Output:
        text = self.encode_text(input_ids, attention_mask, causal=causal)
        return self.fuse(self.encode_image(images), text, causal=causal,
                         colours=self.image_colours(images))
