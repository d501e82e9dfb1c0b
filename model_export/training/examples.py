"""From dataset samples to training tensors: one `Example` per sample, `collate` into a `Batch`.

Every dataset (the shapes world, COCO, MDETR grounding, RefCOCO, VQA v2, COCO captions) arrives as
`data.GroundingSample`; this module is the one place that turns a sample into model inputs and
targets, so all tasks and datasets share one path. The world additionally gets `world_samples`,
which renders scenes on the fly and builds multi-phrase attribute prompts.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from model_export.data.types import GroundedObject, GroundingSample
from model_export.data.world import (
    RELATION_ABSENT_ANCHOR,
    Pairs,
    WorldImage,
    empty_expressions,
    expression_targets,
    present_expressions,
    relation_anchor,
    relation_contrasts,
    unique_anchor,
)
from model_export.data.world.records import is_attribute_phrase, referring_grounding
from model_export.modeling.config import PreprocessConfig
from model_export.modeling.vqa_head import vqa_target_scores
from model_export.processing.box_coding import to_legacy
from model_export.processing.chunking import pack_chunks
from model_export.processing.preprocess import batch_images, preprocess_image
from model_export.processing.prompt import (
    DetectionPrompt,
    Span,
    build_detection_prompt,
    positive_map,
    tokenize,
)
from model_export.processing.referring import referent_span
from model_export.training.losses import MLM_IGNORE_INDEX


@dataclass
class Example:
    """One image + one text, as tensors in the model-input frame (resized, unpadded).

    pixels: (3, h, w) normalised BGR. boxes: (K, 4) legacy xyxy (x1 = last pixel).
    input_ids: (T,) token ids of the text with [CLS]/[SEP]. positive_map: (K, T) 0/1.
    token_labels: length T, category a token names (class-name prompts only) or None.
    masks: (K, h, w) bool or None. phrases: (P, T) token weights (rows sum to 1) and
    phrase_objects: per phrase, the indices of the objects it names (mask head supervision).
    vqa_scores: (A,) soft answer targets or None. answer_tokens: (T,) bool, the tokens of the
    sample's `answer_span` (what the VQA head's steered glimpse reads) or None.
    lm_labels: (T,) next-token targets (MLM_IGNORE_INDEX elsewhere) for captioning, which runs
    the model in causal mode. grounded: boxes and positive_map supervise the grounding losses
    (False for VQA without question grounding).
    """

    task: str
    pixels: Tensor
    resized_hw: tuple[int, int]
    input_ids: Tensor
    boxes: Tensor
    positive_map: Tensor
    box_labels: list[str]
    token_labels: list[str | None]
    detection_prompt: bool
    masks: Tensor | None = None
    phrases: Tensor | None = None
    phrase_objects: list[list[int]] = field(default_factory=list)
    vqa_scores: Tensor | None = None
    answer_tokens: Tensor | None = None
    lm_labels: Tensor | None = None
    grounded: bool = True

    @property
    def causal(self) -> bool:
        return self.task == "caption"

    def to(self, device: torch.device | str) -> Example:
        """A copy with every tensor field on `device` (training on a GPU)."""
        moved = {f.name: getattr(self, f.name).to(device)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **moved)


@dataclass
class Batch:
    """Examples padded together: images to a multiple of 32, texts to the longest."""

    examples: list[Example]
    images: Tensor  # (N, 3, H, W)
    image_sizes: list[tuple[int, int]]
    input_ids: Tensor  # (N, T)
    attention_mask: Tensor  # (N, T)

    @property
    def causal(self) -> bool:
        return self.examples[0].causal

    def to(self, device: torch.device | str) -> Batch:
        return Batch(examples=[e.to(device) for e in self.examples],
                     images=self.images.to(device), image_sizes=self.image_sizes,
                     input_ids=self.input_ids.to(device),
                     attention_mask=self.attention_mask.to(device))


def _resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = image.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= 128


def _object_boxes(objects: Sequence[GroundedObject], scale_xy: tuple[float, float]) -> Tensor:
    """End-exclusive original-pixel boxes -> legacy boxes in the resized frame."""
    if not objects:
        return torch.zeros(0, 4)
    boxes = to_legacy(torch.tensor([obj.box for obj in objects], dtype=torch.float32))
    sx, sy = scale_xy
    return boxes * torch.tensor([sx, sy, sx, sy])


def _phrases(spans: list[list[tuple[int, int]]], encoding, num_tokens: int
             ) -> tuple[Tensor, list[list[int]]]:
    """Each distinct span is a phrase; its objects are those grounded to it."""
    distinct = sorted({span for spans_per_object in spans for span in spans_per_object})
    if not distinct:
        return torch.zeros(0, num_tokens), []
    rows = positive_map(encoding, [[span] for span in distinct], num_tokens)
    rows = rows / rows.sum(dim=1, keepdim=True).clamp(min=1.0)
    members = [[k for k, s in enumerate(spans) if span in s] for span in distinct]
    return rows, members


def build_example(sample: GroundingSample, image: Image.Image, tokenizer,
                  preprocess: PreprocessConfig, answers: Sequence[str],
                  max_tokens: int, rng: random.Random, min_size: int | None = None,
                  shuffle: bool = True) -> Example:
    """Turn one sample and its image into model-input tensors and targets.

    Detection samples get a class-name prompt in a random order (the model must not learn
    positions) unless `shuffle` is off (prompt tuning learns one fixed order); `min_size`
    overrides the preset's resize target (scale augmentation).
    """
    config = preprocess if min_size is None else PreprocessConfig(
        min_size=min_size, max_size=preprocess.max_size,
        size_divisibility=preprocess.size_divisibility, pixel_mean=preprocess.pixel_mean,
        pixel_std=preprocess.pixel_std)
    pixels, resized_hw = preprocess_image(image, config)
    scale = (resized_hw[1] / image.width, resized_hw[0] / image.height)

    objects = list(sample.objects)
    spans = [list(s) for s in sample.spans]
    text = sample.caption
    class_of_token: dict[tuple[int, int], str] = {}
    if sample.task == "detection":
        names = list(sample.class_names or [])
        if shuffle:
            rng.shuffle(names)
        prompt = build_detection_prompt(names)
        text = prompt.caption
        span_of = {name: prompt.spans[i] for i, name in enumerate(names)}
        # Detection objects are labelled with one of the class names (`GroundingSample.validate`).
        spans = [list(span_of[cast(str, obj.label)]) for obj in objects]
        class_of_token = {span_of[name][0]: name for name in names}
    elif sample.task == "caption":
        text = sample.caption_target or sample.caption

    input_ids, _, encodings = tokenize(tokenizer, [text], max_length=max_tokens)
    ids = input_ids[0]
    num_tokens = ids.shape[0]
    pmap = (positive_map(encodings[0], spans, num_tokens) if spans
            else torch.zeros(len(objects), num_tokens))

    token_labels: list[str | None] = [None] * num_tokens
    for span, name in class_of_token.items():
        tokens = positive_map(encodings[0], [[span]], num_tokens)[0]
        for t in torch.nonzero(tokens).flatten().tolist():
            token_labels[t] = name

    masks = None
    if objects and all(obj.rle is not None for obj in objects):
        # Every object has an RLE, hence a mask.
        resized = [_resize_mask(cast(np.ndarray, obj.mask), resized_hw) for obj in objects]
        masks = torch.from_numpy(np.stack(resized))
    phrases, members = _phrases(spans, encodings[0], num_tokens) if spans else (None, [])

    vqa_scores = None
    if sample.task == "vqa":
        answers_given = sample.answers or ([sample.answer] if sample.answer else [])
        vqa_scores = vqa_target_scores([answers_given], answers)[0]
    answer_tokens = None
    if sample.answer_span is not None:
        answer_tokens = positive_map(encodings[0], [[sample.answer_span]], num_tokens)[0].bool()
    lm_labels = None
    if sample.task == "caption":
        lm_labels = torch.full_like(ids, MLM_IGNORE_INDEX)
        lm_labels[:-1] = ids[1:]

    return Example(
        task=sample.task, pixels=pixels, resized_hw=resized_hw, input_ids=ids,
        boxes=_object_boxes(objects, scale), positive_map=pmap,
        box_labels=[obj.label or "" for obj in objects], token_labels=token_labels,
        detection_prompt=sample.detection_prompt or sample.task == "detection",
        masks=masks, phrases=phrases, phrase_objects=members, vqa_scores=vqa_scores,
        answer_tokens=answer_tokens, lm_labels=lm_labels,
        grounded=sample.task != "vqa" or sample.question_grounded,
    )


def collate(examples: Sequence[Example], size_divisibility: int) -> Batch:
    """Pad images (bottom/right, to a multiple of `size_divisibility`) and texts (right)."""
    images, sizes = batch_images([e.pixels for e in examples], size_divisibility)
    num_tokens = max(e.input_ids.shape[0] for e in examples)
    input_ids = torch.zeros(len(examples), num_tokens, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, example in enumerate(examples):
        length = example.input_ids.shape[0]
        input_ids[row, :length] = example.input_ids
        attention_mask[row, :length] = 1
    return Batch(examples=list(examples), images=images, image_sizes=sizes,
                 input_ids=input_ids, attention_mask=attention_mask)


def pad_tokens(tensor: Tensor, num_tokens: int, value: float = 0.0) -> Tensor:
    """Right-pad the last dimension of a (..., T) tensor to `num_tokens`."""
    pad = num_tokens - tensor.shape[-1]
    return torch.nn.functional.pad(tensor, (0, pad), value=value) if pad else tensor


# ------------------------------------------------------------------------------------------------
# The shapes world, rendered on the fly
# ------------------------------------------------------------------------------------------------


def grounded_object(world_object) -> GroundedObject:
    """A world object as a dataset object: box, shape name as the label, mask."""
    return GroundedObject(box=tuple(world_object.box), label=world_object.shape,
                          mask=world_object.mask)


def _attribute_phrase(obj, rng: random.Random) -> str:
    form = rng.randrange(4)
    if form == 0:
        return f"{obj.color} {obj.shape}"
    if form == 1:
        return f"{obj.size} {obj.shape}"
    if form == 2:
        return f"{obj.size} {obj.color} {obj.shape}"
    return f"{obj.color} shapes"


def distractor_words(tokenizer: Any, exclude: Sequence[str]) -> list[str]:
    """Whole words of the tokenizer's vocabulary that name nothing in the world: negative class
    names for detection prompts (GLIP samples negative categories into its prompts), so the
    model learns that a name it was not trained on is not a shape (large vocabularies, chunks).
    """
    banned = {w for word in exclude for w in (word, word + "s", word + "es")}
    return sorted(word for word in tokenizer.get_vocab()
                  if word.isalpha() and len(word) >= 3 and word not in banned)


@dataclass(frozen=True)
class PromptMix:
    """Negatives `world_samples` adds to a scene's grounding and referring samples; the defaults
    add none (`TrainConfig.relation_negatives`, `TrainConfig.full_vocabulary_share`).

    relation_negatives: chance that the scene's referring samples are replaced by a relation of
        the scene naming something and one naming nothing that differs from it in one word
        (`_relation_texts`: another relation word, or the anchor in a colour not there), and,
        drawn apart, that its attribute grounding prompt also names such a pair. The world's
        own expressions hold few of them, and a model that grounds the shape word alone gets
        every one wrong.
    full_vocabulary: chance that the grounding prompt is every colour-shape phrase (held-out
        pairs left out) in a shuffled order, as one of the chunks `pack_chunks` makes of it for
        a prompt of `max_tokens`: what a user of `/v1/detect` sends.
    name_tokens: WordPiece tokens of each colour-shape phrase (`name_token_counts`), which the
        packing needs; required with `full_vocabulary`.
    max_tokens: the model's prompt limit (`language.max_query_len`).
    chunk_size: most names per chunk (`language.max_prompt_phrases`), as the service packs.
    """

    relation_negatives: float = 0.0
    full_vocabulary: float = 0.0
    name_tokens: Mapping[str, int] = field(default_factory=dict)
    max_tokens: int = 256
    chunk_size: int | None = None


def _grounding_phrases(scene: WorldImage, rng: random.Random, colors: Sequence[str],
                       shapes: Sequence[str], exclude: Pairs) -> list[str]:
    """Attribute phrases for one grounding prompt, never naming an `exclude` (held-out) pair.

    Half the prompts mix 1 to 8 attribute phrases of present objects (60 %) and random
    colour-shapes (40 %). The other half name every present object by colour and shape, as
    `glipv2 eval` does, plus 1 to 4 hard negatives: a present shape in a colour no object of
    that shape has. Random negatives rarely share a shape with a present object, so without
    these the model is seldom asked to tell a red triangle from a blue one in the same prompt.
    """
    if rng.random() < 0.5:
        present = {(o.color, o.shape) for o in scene.objects}
        hard = sorted({(c, o.shape) for o in scene.objects for c in colors}
                      - present - exclude)
        chosen = sorted(present) + rng.sample(hard, min(len(hard), rng.randint(1, 4)))
        rng.shuffle(chosen)
        return [f"{c} {s}" for c, s in chosen]
    allowed = [(c, s) for c in colors for s in shapes if (c, s) not in exclude]
    phrases: list[str] = []
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.6:
            phrase = _attribute_phrase(rng.choice(scene.objects), rng)
        else:
            phrase = "{} {}".format(*rng.choice(allowed))
        if phrase not in phrases:
            phrases.append(phrase)
    return phrases


def _full_vocabulary_prompt(rng: random.Random, colors: Sequence[str], shapes: Sequence[str],
                            exclude: Pairs, mix: PromptMix) -> DetectionPrompt:
    """One chunk of the whole colour-shape vocabulary in a shuffled order, packed as the service
    packs a request's classes (the model must not learn positions, so no fixed order)."""
    names = [f"{c} {s}" for c in colors for s in shapes if (c, s) not in exclude]
    rng.shuffle(names)
    chunks = pack_chunks(names, [mix.name_tokens[name] for name in names], mix.max_tokens,
                         mix.chunk_size)
    return rng.choice(chunks).prompt


def _relation_texts(scene: WorldImage, rng: random.Random, exclude: Pairs
                    ) -> tuple[str | None, str | None]:
    """(a relation naming nothing, a relation naming something) of the scene, None where it has
    none: the named one of a relation word drawn evenly (`present_expressions`), the empty one
    differing from it in one word, of a form drawn evenly (`relation_contrasts`: another
    relation word, or the anchor in an absent colour), else a nearest miss (anchor there or
    absent, `empty_expressions`)."""
    groups = present_expressions(scene.objects, exclude).get("relation")
    positive = rng.choice(rng.choice(groups))[0] if groups else None
    contrasts = relation_contrasts(scene.objects, positive, exclude) if positive else {}
    if contrasts:
        return rng.choice(contrasts[rng.choice(sorted(contrasts))]), positive
    empty = empty_expressions(scene.objects, exclude)
    forms = [form for form in ("relation", RELATION_ABSENT_ANCHOR) if form in empty]
    negative = rng.choice(empty[rng.choice(forms)]) if forms else None
    return negative, positive


def _phrase_grounding(scene: WorldImage, prompt: DetectionPrompt, phrases: Sequence[str]
                      ) -> list[tuple[Span, set[int]]]:
    """Each phrase's grounded words in the prompt with the ids of the objects they name: the
    referent's words (`referent_span`: the whole phrase, or "star left of") to its targets,
    and a relation's anchor words to its anchor where present."""
    grounding = []
    for ((start, _),), phrase in zip(prompt.spans, phrases, strict=True):
        first, last = referent_span(phrase)
        grounding.append(((start + first, start + last),
                          set(expression_targets(phrase, scene.objects))))
        if relation := relation_anchor(phrase):
            (a, b), colour, shape = relation
            if (anchor := unique_anchor(scene.objects, colour, shape)) is not None:
                grounding.append(((start + a, start + b), {anchor.id}))
    return grounding


def world_samples(scene: WorldImage, rng: random.Random, colors: Sequence[str],
                  shapes: Sequence[str], distractors: Sequence[str] = (),
                  max_distractors: int = 0,
                  exclude: Pairs = frozenset(),
                  mix: PromptMix = PromptMix()) -> list[GroundingSample]:
    """Every training sample one rendered scene offers (the trainer picks among them).

    The detection prompt names the shapes plus 0 to `max_distractors` names drawn from
    `distractors` (sometimes numbered, as in "gadget 17"), which no object matches. Besides the
    record's own tasks, builds an attribute-grounding prompt (`_grounding_phrases`, joined by
    ". "), each object grounded to every phrase it matches. A referring expression grounds its
    targets on the referent's words (`referent_span`) and a relation's anchor on the anchor's
    words. `mix` adds relation negatives and full-vocabulary prompts (`PromptMix`).
    """
    objects = [grounded_object(o) for o in scene.objects]
    base: dict[str, Any] = {"image_path": None, "width": scene.width, "height": scene.height}
    negatives = []
    if distractors and max_distractors:
        for word in rng.sample(list(distractors), rng.randint(0, max_distractors)):
            negatives.append(f"{word} {rng.randint(0, 1500)}" if rng.random() < 0.3 else word)
    samples = [GroundingSample(task="detection", class_names=list(shapes) + negatives,
                               objects=objects, detection_prompt=True, **base)]

    if mix.full_vocabulary and rng.random() < mix.full_vocabulary:
        prompt = _full_vocabulary_prompt(rng, colors, shapes, exclude, mix)
        phrases = [prompt.caption[start:end] for (start, end), in prompt.spans]
    else:
        phrases = _grounding_phrases(scene, rng, colors, shapes, exclude)
        if mix.relation_negatives and rng.random() < mix.relation_negatives:
            phrases += [text for text in _relation_texts(scene, rng, exclude) if text]
            rng.shuffle(phrases)
        # Spans as the prompt builder records them: "red hexagon" may also occur inside an
        # earlier "small red hexagon", where a text search would find it.
        prompt = build_detection_prompt(phrases, clean=False)
    grounding = _phrase_grounding(scene, prompt, phrases)
    grounded, spans = [], []
    for obj, world_obj in zip(objects, scene.objects, strict=True):
        own = [span for span, ids in grounding if world_obj.id in ids]
        if own:
            grounded.append(obj)
            spans.append(own)
    samples.append(GroundingSample(
        task="grounding", caption=prompt.caption, objects=grounded, spans=spans,
        detection_prompt=all(map(is_attribute_phrase, phrases)), **base))

    expressions = scene.expressions
    if mix.relation_negatives and rng.random() < mix.relation_negatives:
        negative, positive = _relation_texts(scene, rng, exclude)
        if negative is not None:
            # Beside a relation of the same scene that names something: negatives alone taught
            # a model to answer every relation with nothing (relation mIoU 0.68 -> 0.04).
            expressions = [{"text": negative, "targets": []}]
            if positive is not None:
                expressions.append({"text": positive,
                                    "targets": expression_targets(positive, scene.objects)})

    def anchor(colour: str, shape: str) -> GroundedObject | None:
        # The world writes only relations whose anchor is unique in the scene, or absent.
        found = unique_anchor(scene.objects, colour, shape)
        return None if found is None else objects[found.id]

    for expression in expressions:
        text = expression["text"]
        targets, spans = referring_grounding(
            text, [objects[i] for i in expression["targets"]], anchor)
        samples.append(GroundingSample(
            task="referring", caption=text, objects=targets, spans=spans,
            detection_prompt=is_attribute_phrase(text), **base))
    for question in scene.questions:
        named = [objects[i] for i in question["objects"]]
        spans = [[tuple(question["span"])] for _ in named]
        answer_span = tuple(question["answer_span"]) if "answer_span" in question else None
        if answer_span is not None and question["answer_object"] not in question["objects"]:
            named.append(objects[question["answer_object"]])
            spans.append([answer_span])
        samples.append(GroundingSample(
            task="vqa", caption=question["question"], answer=question["answer"],
            answers=[question["answer"]], objects=named, spans=spans, question_grounded=True,
            answer_span=answer_span, **base))
    phrase_objects = [objects[p["object"]] for p in scene.caption_phrases]
    samples.append(GroundingSample(
        task="caption", caption=scene.caption, caption_target=scene.caption,
        objects=phrase_objects, spans=[[tuple(p["span"])] for p in scene.caption_phrases],
        **base))
    return samples
