"""Training: examples built from samples, and a short run whose loss falls (CI smoke test)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model_export.data.types import GroundedObject, GroundingSample
from model_export.data.world import (
    ANSWERS,
    COLOR_NAMES,
    HELD_OUT_PAIRS,
    SHAPES,
    expression_targets,
    parse_pairs,
    render_index,
)
from model_export.modeling.config import WORLD_ANSWERS, WORLD_SHAPES, PreprocessConfig, get_preset
from model_export.modeling.model import Glipv2Model
from model_export.processing.chunking import name_token_counts
from model_export.processing.prompt import load_tokenizer
from model_export.processing.referring import referent_span
from model_export.training.config import TrainConfig
from model_export.training.examples import (
    Example,
    PromptMix,
    build_example,
    collate,
    distractor_words,
    world_samples,
)
from model_export.training.trainer import Glipv2Trainer, train
from model_export.training.world_stream import WorldStream, example_batches

PRE = PreprocessConfig(min_size=64, max_size=128)


def _sample(task: str, **fields) -> GroundingSample:
    return GroundingSample(image_path=None, width=100, height=50, task=task, **fields)


def _image():
    from PIL import Image

    return Image.new("RGB", (100, 50), (230, 230, 230))


def test_world_vocabulary_in_the_config_matches_the_world() -> None:
    assert WORLD_ANSWERS == ANSWERS
    assert WORLD_SHAPES == SHAPES


def test_detection_example_targets_follow_the_shuffled_prompt() -> None:
    tokenizer = load_tokenizer()
    objects = [GroundedObject(box=(10, 10, 30, 20), label="hexagon"),
               GroundedObject(box=(50, 5, 60, 45), label="star")]
    sample = _sample("detection", class_names=["circle", "star", "hexagon"], objects=objects,
                     detection_prompt=True)
    example = build_example(sample, _image(), tokenizer, PRE, WORLD_ANSWERS, 256,
                            random.Random(3))
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids.tolist())
    hexagon = [tokens[t] for t in torch.nonzero(example.positive_map[0]).flatten()]
    star = [tokens[t] for t in torch.nonzero(example.positive_map[1]).flatten()]
    assert "".join(hexagon).replace("##", "") == "hexagon" and star == ["star"]
    for t, label in enumerate(example.token_labels):
        assert (label is not None) == any(example.positive_map[:, t]) or label == "circle"
    # 100x50 resized to min side 64: scale 1.28; legacy box = exclusive end - 1, then scaled
    torch.testing.assert_close(example.boxes[0], torch.tensor([10, 10, 29, 19]) * 1.28)
    assert example.detection_prompt and not example.causal


def test_caption_example_predicts_the_next_token() -> None:
    tokenizer = load_tokenizer()
    caption = "a small red circle."
    sample = _sample("caption", caption=caption, caption_target=caption,
                     objects=[GroundedObject(box=(10, 10, 30, 30), label="circle")],
                     spans=[[(0, 18)]])
    example = build_example(sample, _image(), tokenizer, PRE, WORLD_ANSWERS, 256,
                            random.Random(0))
    ids = example.input_ids
    assert example.causal
    assert example.lm_labels[:-1].tolist() == ids[1:].tolist() and example.lm_labels[-1] == -100
    assert example.positive_map[0, 1:5].tolist() == [1, 1, 1, 1]  # a small red circle


def test_vqa_example_scores_its_answer() -> None:
    sample = _sample("vqa", caption="what color is the circle?", answer="red", answers=["red"])
    example = build_example(sample, _image(), load_tokenizer(), PRE, WORLD_ANSWERS, 256,
                            random.Random(0))
    assert example.vqa_scores[WORLD_ANSWERS.index("red")] == 1 and example.vqa_scores.sum() == 1
    assert not example.grounded  # no question grounding: trains the answer only


def test_world_questions_ground_the_objects_they_name() -> None:
    scene = render_index(7, 3)
    vqa = [s for s in world_samples(scene, random.Random(0), COLOR_NAMES, SHAPES)
           if s.task == "vqa"]
    assert vqa and all(s.question_grounded for s in vqa)
    for sample, question in zip(vqa, scene.questions, strict=True):
        assert [o.box for o in sample.objects] == [
            tuple(scene.objects[i].box) for i in question["objects"]]
        start, end = question["span"]
        assert all(spans == [(start, end)] for spans in sample.spans)
    example = build_example(vqa[0], scene.image, load_tokenizer(), PRE, WORLD_ANSWERS, 256,
                            random.Random(0))
    assert example.grounded and example.positive_map.shape[0] == len(vqa[0].objects)


def test_relation_questions_ground_their_answer_object_on_the_relation_words() -> None:
    """"what shape is left of the red hexagon?" names the hexagon, but its answer is the shape
    of another object: the relation words ground that one, and they are what the steered
    glimpse reads (the anchor's words describe the wrong object)."""
    scene = render_index(7, 148)
    question = next(q for q in scene.questions
                    if q["question"] == "what shape is left of the red hexagon?")
    sample = next(s for s in world_samples(scene, random.Random(0), COLOR_NAMES, SHAPES)
                  if s.caption == question["question"])
    anchor, answer = (scene.objects[i] for i in (*question["objects"], question["answer_object"]))
    assert [o.box for o in sample.objects] == [tuple(anchor.box), tuple(answer.box)]
    assert [sample.caption[slice(*s[0])] for s in sample.spans] == ["red hexagon", "left of"]
    assert sample.answer_span == (14, 21)
    tokenizer = load_tokenizer()
    example = build_example(sample, scene.image, tokenizer, PRE, WORLD_ANSWERS, 256,
                            random.Random(0))
    read = Glipv2Trainer._glimpse_tokens(example, 20)
    assert tokenizer.convert_ids_to_tokens(example.input_ids[read[:len(example.input_ids)]]) == [
        "left", "of"]
    assert read.shape == (20,) and not read[len(example.input_ids):].any()
    plain = dataclasses.replace(example, answer_tokens=None)
    assert tokenizer.convert_ids_to_tokens(
        example.input_ids[Glipv2Trainer._glimpse_tokens(plain, len(example.input_ids))]) == [
        "left", "of", "red", "he", "##xa", "##gon"]
    assert not Glipv2Trainer._glimpse_tokens(
        dataclasses.replace(example, grounded=False), 20).any()


def test_world_scene_offers_every_task() -> None:
    scene = render_index(7, 3)
    samples = world_samples(scene, random.Random(0), COLOR_NAMES, SHAPES)
    assert {s.task for s in samples} == {"detection", "grounding", "referring", "vqa", "caption"}
    grounding = next(s for s in samples if s.task == "grounding")
    for obj, spans in zip(grounding.objects, grounding.spans, strict=True):
        for start, end in spans:
            words = grounding.caption[start:end].split()
            assert words[-1] in (obj.label, "shapes")


def test_grounding_spans_are_whole_phrases_even_inside_longer_ones() -> None:
    """A phrase that also occurs inside an earlier one ("red hexagon" after "small red
    hexagon") is grounded at its own position, not inside the other phrase."""
    nested = 0
    for index in range(60):
        scene = render_index(7, index)
        rng = random.Random(index)
        for _ in range(5):
            (grounding,) = [s for s in world_samples(scene, rng, COLOR_NAMES, SHAPES)
                            if s.task == "grounding"]
            phrases = grounding.caption.split(". ")
            bounds, start = set(), 0
            for phrase in phrases:
                bounds.add((start, start + len(phrase)))
                start += len(phrase) + 2
            nested += any(p in q and q.index(p) and i < j for j, p in enumerate(phrases)
                          for i, q in enumerate(phrases))
            for spans in grounding.spans:
                assert set(spans) <= bounds, (grounding.caption, spans)
    assert nested  # the case the text search got wrong was exercised


def test_grounding_prompts_carry_hard_colour_negatives_and_never_held_out_pairs() -> None:
    held_out = parse_pairs(HELD_OUT_PAIRS)
    names = {f"{c} {s}" for c, s in held_out}
    full_prompts = 0
    for index in range(40):
        scene = render_index(7, index, held_out)
        present = {f"{o.color} {o.shape}" for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        rng = random.Random(index)
        for _ in range(5):
            (grounding,) = [s for s in world_samples(scene, rng, COLOR_NAMES, SHAPES,
                                                     exclude=held_out) if s.task == "grounding"]
            phrases = set(grounding.caption.split(". "))
            assert not phrases & names
            if present <= phrases:
                hard = phrases - present
                full_prompts += bool(hard) and all(p.split()[-1] in shapes for p in hard)
    assert full_prompts >= 50
    rng = random.Random(0)  # half the random pairs held out: a prompt still names something
    for _ in range(300):
        (grounding,) = [s for s in world_samples(scene, rng, ["purple", "red"], ["star"],
                                                 exclude=held_out) if s.task == "grounding"]
        assert grounding.caption and "purple star" not in grounding.caption


def test_relation_negatives_replace_referring_samples_and_join_grounding_prompts() -> None:
    """`relation_negatives` 1: a scene's referring samples are a relation naming nothing whose
    shape is in the image (not on that side, or its anchor absent) and, where the scene has one,
    a relation naming something, grounded on its targets; its grounding prompt names such a
    relation too, with no object on its referent's words, beside one naming something; 0 keeps
    the world's own expressions."""
    tokenizer = load_tokenizer()
    positives = paired = 0
    for index in range(12):
        scene = render_index(7, index)
        shapes = {o.shape for o in scene.objects}
        samples = world_samples(scene, random.Random(index), COLOR_NAMES, SHAPES,
                                mix=PromptMix(relation_negatives=1.0))
        referring, *named = [s for s in samples if s.task == "referring"]
        assert " the " in referring.caption and referring.caption.split()[0] in shapes
        assert expression_targets(referring.caption, scene.objects) == []
        assert all(s[0][1] > referring.caption.index(" the ") for s in referring.spans)
        for other in named:  # at most one, naming what it grounds
            assert len(named) == 1 and " the " in other.caption
            targets = expression_targets(other.caption, scene.objects)
            assert targets and len(other.objects) >= len(targets)
            paired += 1
        (grounding,) = [s for s in samples if s.task == "grounding"]
        relations = [p for p in grounding.caption.split(". ") if " the " in p]
        targets = [expression_targets(p, scene.objects) for p in relations]
        assert [] in targets and not grounding.detection_prompt
        positives += any(targets)
        negative = relations[targets.index([])]
        start = grounding.caption.index(negative)
        words = (start, start + referent_span(negative)[1])  # "star left of", named by nobody
        assert all(words not in spans for spans in grounding.spans)
        example = build_example(grounding, scene.image, tokenizer, PRE, WORLD_ANSWERS, 256,
                                random.Random(0))
        assert example.positive_map.shape[0] == len(grounding.objects)
        plain = world_samples(scene, random.Random(index), COLOR_NAMES, SHAPES)
        assert [s.caption for s in plain if s.task == "referring"] == [
            e["text"] for e in scene.expressions]
    assert positives >= 6 and paired >= 6


def test_full_vocabulary_prompts_are_service_chunks_of_every_pair_not_held_out() -> None:
    """`full_vocabulary_share` 1: the grounding prompt is every colour-shape phrase but the
    held-out ones, shuffled and packed as `/v1/detect` packs classes: one prompt of the 39 at the
    model's 256 tokens, one chunk of several at a tighter limit; each object grounded on its own
    colour-shape phrase only. The trainer's stream builds them from `TrainConfig`."""
    tokenizer = load_tokenizer()
    held_out = parse_pairs(HELD_OUT_PAIRS)
    names = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]
    counts = dict(zip(names, name_token_counts(tokenizer.backend_tokenizer, names), strict=True))
    allowed = {f"{c} {s}" for c in COLOR_NAMES for s in SHAPES if (c, s) not in held_out}
    for max_tokens in (256, 40):
        mix = PromptMix(full_vocabulary=1.0, name_tokens=counts, max_tokens=max_tokens)
        orders = set()
        for index in range(8):
            scene = render_index(7, index, held_out)
            (grounding,) = [s for s in world_samples(scene, random.Random(index), COLOR_NAMES,
                                                     SHAPES, exclude=held_out, mix=mix)
                            if s.task == "grounding"]
            phrases = grounding.caption.split(". ")
            orders.add(tuple(phrases))
            assert set(phrases) <= allowed and len(set(phrases)) == len(phrases)
            assert len(tokenizer(grounding.caption)["input_ids"]) <= max_tokens
            assert (len(phrases) == len(allowed)) == (max_tokens == 256)
            boxes = {tuple(o.box): f"{o.color} {o.shape}" for o in scene.objects}
            for obj, spans in zip(grounding.objects, grounding.spans, strict=True):
                assert [grounding.caption[slice(*span)] for span in spans] == [boxes[obj.box]]
        assert len(orders) == 8  # shuffled: positions carry no meaning
    mix = PromptMix(full_vocabulary=1.0, name_tokens=counts, chunk_size=6)
    for index in range(4):  # the model's `max_prompt_phrases`, as the service packs
        (grounding,) = [s for s in world_samples(render_index(7, index, held_out),
                                                 random.Random(index), COLOR_NAMES, SHAPES,
                                                 exclude=held_out, mix=mix)
                        if s.task == "grounding"]
        assert 1 <= len(grounding.caption.split(". ")) <= 6
    config = TrainConfig(full_vocabulary_share=1.0, task_weights={"grounding": 1.0})
    stream = iter(WorldStream(config, get_preset("small"), tokenizer))
    example = next(stream)
    caption = tokenizer.decode(example.input_ids, skip_special_tokens=True)
    assert example.task == "grounding" and len(caption.split(". ")) == len(allowed)
    with pytest.raises(ValueError, match="full_vocabulary_share is a chance"):
        TrainConfig.load(None, ["full_vocabulary_share=1.5"])


def test_detection_prompts_carry_distractor_names_no_object_matches() -> None:
    words = distractor_words(load_tokenizer(), [*COLOR_NAMES, *SHAPES])
    assert "circle" not in words and "stars" not in words and "red" not in words
    assert {"ferry", "audience"} <= set(words)
    counts = set()
    rng = random.Random(0)
    for index in range(20):
        scene = render_index(7, index)
        (detection,) = [s for s in world_samples(scene, rng, COLOR_NAMES, SHAPES, words, 5)
                        if s.task == "detection"]
        assert detection.class_names[:6] == list(SHAPES)
        negatives = detection.class_names[6:]
        counts.add(len(negatives))
        assert all(name.split()[0] in words for name in negatives)
        assert {o.label for o in detection.objects} <= set(SHAPES)
        example = build_example(detection, scene.image, load_tokenizer(), PRE, WORLD_ANSWERS,
                                256, rng)
        assert example.positive_map.shape[0] == len(scene.objects)
    assert min(counts) == 0 and max(counts) == 5


def test_short_training_run_lowers_the_loss() -> None:
    """A few steps on fixed examples: the total loss must fall (all heads, all losses)."""
    torch.manual_seed(0)
    config = TrainConfig(batch_size=4, steps=100, lr=2e-3, warmup_steps=1, min_sizes=(128,),
                         held_out_pairs="purple star")
    trainer = Glipv2Trainer(config)
    model_config = trainer.model.config
    model_config.preprocess = PreprocessConfig(min_size=128, max_size=192)
    stream = iter(WorldStream(config, model_config, trainer.tokenizer))
    examples = [next(stream) for _ in range(4)]
    totals = [trainer.step(examples)["total"] for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(totals)))
    assert sum(totals[-3:]) / 3 < 0.8 * sum(totals[:3]) / 3, totals


def _attend_trainer() -> tuple[Glipv2Trainer, Iterator[Example]]:
    """A tiny-image trainer with the attend loss on, and its world stream."""
    torch.manual_seed(0)
    config = TrainConfig(batch_size=2, steps=5, min_sizes=(96,), warmup_steps=1,
                         loss_weights={"attend": 1.0})
    trainer = Glipv2Trainer(config)
    trainer.model.config.preprocess = PreprocessConfig(min_size=96, max_size=128)
    return trainer, iter(WorldStream(config, trainer.model.config, trainer.tokenizer))


def test_text_attention_loss_trains_where_tokens_look() -> None:
    """With loss_weights["attend"], every fusion layer's token-to-region attention is recorded
    for one step (and only then), the term is reported, and its gradient reaches the
    cross-attention's projections."""
    trainer, stream = _attend_trainer()
    examples = [e for e in (next(stream) for _ in range(12)) if e.task == "detection"][:2]
    report = trainer.step(examples)
    assert report["attend"] > 0 and math.isfinite(report["attend"])
    trainer.model.zero_grad(set_to_none=True)
    trainer.losses(collate(examples, 32))["attend"].backward()
    for layer in trainer.model.fusion.layers:
        for projection in (layer.vl_fuse.attn.v_proj, layer.vl_fuse.attn.l_proj):
            assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert all(layer.vl_fuse.attn.text_attention is None for layer in trainer.model.fusion.layers)


def test_grounded_questions_train_grounding_ungrounded_ones_only_the_answer() -> None:
    trainer, stream = _attend_trainer()
    vqa = [e for e in (next(stream) for _ in range(60))
           if e.task == "vqa" and len(e.boxes)][:2]
    assert len(vqa) == 2
    terms = trainer.losses(collate(vqa, 32))
    assert {"box", "token", "attend", "vqa"} <= set(terms)
    plain = [dataclasses.replace(e, grounded=False) for e in vqa]
    assert set(trainer.losses(collate(plain, 32))) == {"vqa"}


def test_glimpse_loss_steers_the_last_glimpse_of_grounded_questions() -> None:
    torch.manual_seed(0)
    config = TrainConfig(batch_size=2, steps=5, min_sizes=(96,), warmup_steps=1,
                         loss_weights={"glimpse": 1.0})
    preset = get_preset("small")
    preset.tasks.vqa_glimpses = 1
    with pytest.raises(ValueError, match="vqa_glimpses >= 2"):
        Glipv2Trainer(config, Glipv2Model(preset))
    preset.tasks.vqa_glimpses = 2
    preset.preprocess = PreprocessConfig(min_size=96, max_size=128)
    trainer = Glipv2Trainer(config, Glipv2Model(preset))
    stream = WorldStream(config, trainer.model.config, trainer.tokenizer)
    vqa = [e for e in itertools.islice(stream, 60) if e.task == "vqa" and len(e.boxes)][:2]
    assert len(vqa) == 2
    loss = trainer.losses(collate(vqa, 32))["glimpse"]
    assert loss > 0
    loss.backward()
    grad = trainer.model.vqa_head.attention.weight.grad
    assert grad[-1].abs().sum() > 0 and grad[0].abs().sum() == 0  # the last glimpse only
    plain = [dataclasses.replace(e, grounded=False) for e in vqa]
    assert trainer.losses(collate(plain, 32))["glimpse"] == 0


def test_mask_loss_of_a_batch_is_the_mean_over_its_rows_pairs() -> None:
    """The head runs once over every row; the loss is still the mean over all (phrase, object)
    pairs, so a row with more pairs weighs more, exactly as one image at a time."""
    trainer, stream = _attend_trainer()
    trainer.model.eval()
    candidates = sorted((e for e in itertools.islice(stream, 80)
                         if not e.causal and e.masks is not None and any(e.phrase_objects)),
                        key=lambda e: sum(map(len, e.phrase_objects)))
    examples = [candidates[0], candidates[len(candidates) // 2], candidates[-1]]
    batch = collate(examples, 32)
    model = trainer.model
    text = model.encode_text(batch.input_ids, batch.attention_mask)
    out = model.fuse(model.encode_image(batch.images), text,
                     colours=model.image_colours(batch.images))
    pairs = [sum(map(len, e.phrase_objects)) for e in examples]
    assert len(set(pairs)) > 1  # else a plain mean over rows would pass too
    rows = [trainer._mask_loss(out, batch, [i]) for i in range(3)]
    expected = sum(n * loss for n, loss in zip(pairs, rows, strict=True)) / sum(pairs)
    torch.testing.assert_close(trainer._mask_loss(out, batch, [0, 1, 2]), expected)
    assert trainer._mask_loss(out, batch, []) is None


def test_relation_expressions_ground_referent_and_anchor_on_their_own_words() -> None:
    """"square right of the yellow diamond": the squares on "square right of", the diamond on
    "yellow diamond" (not the squares on every word), so its tokens also train where to look;
    with no yellow diamond in the image, nothing is grounded at all."""
    anchors_seen = set()
    for index in range(12):
        scene = render_index(7, index)
        samples = {s.caption: s for s in world_samples(scene, random.Random(0), COLOR_NAMES,
                                                       SHAPES) if s.task == "referring"}
        for expression in scene.expressions:
            text, ids = expression["text"], expression["targets"]
            if " the " not in text:
                continue
            sample = samples[text]
            referent, anchor_words = text.split(" the ")
            anchored = any(f"{o.color} {o.shape}" == anchor_words for o in scene.objects)
            anchors_seen.add(anchored)
            assert [o.box for o in sample.objects[:len(ids)]] == [
                tuple(scene.objects[i].box) for i in ids]
            words = [text[slice(*spans[0])] for spans in sample.spans]
            assert words == [referent] * len(ids) + [anchor_words] * anchored
            assert len(sample.objects) == len(ids) + anchored
            if anchored:
                assert sample.objects[-1].label == text.split()[-1]
    assert anchors_seen == {True, False}
    trainer, stream = _attend_trainer()
    referring = [e for e in (next(stream) for _ in range(200))
                 if e.task == "referring" and len(e.boxes)]
    relation_examples = [e for e in referring if not e.detection_prompt][:2]
    assert len(relation_examples) == 2
    assert trainer.losses(collate(relation_examples, 32))["attend"] > 0


def test_checkpoint_round_trip_and_resume(tmp_path) -> None:
    config = TrainConfig(batch_size=2, steps=5, min_sizes=(96,), warmup_steps=1)
    trainer = Glipv2Trainer(config)
    trainer.model.config.preprocess = PreprocessConfig(min_size=96, max_size=128)
    stream = iter(WorldStream(config, trainer.model.config, trainer.tokenizer))
    trainer.step([next(stream), next(stream)])
    trainer.save(tmp_path)
    resumed = Glipv2Trainer.resume(tmp_path, config)
    assert resumed.step_index == 1
    regrouped = dataclasses.replace(config, lr_multipliers={"fpn.skip_blocks.": 10.0})
    with pytest.raises(ValueError, match="--init-from"):
        Glipv2Trainer.resume(tmp_path, regrouped)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    warm = Glipv2Trainer.from_weights(tmp_path, config)
    assert warm.step_index == 1 and not warm.optimizer.state
    # fresh optimiser moments warm up again from the step the weights were saved at
    slow = TrainConfig(batch_size=2, steps=5, min_sizes=(96,), warmup_steps=4)
    rewarm = Glipv2Trainer.from_weights(tmp_path, slow)
    fresh = Glipv2Trainer(slow)
    assert rewarm.learning_rate(1) == pytest.approx(0.5 * fresh.learning_rate(1))
    # weights from late in a schedule: the cosine restarts at their step unless told otherwise
    # (counted from step 0 it would be near its end: lr about 2 % of the peak at step 900)
    trainer.step_index = 800
    trainer.save(tmp_path / "late")
    later = TrainConfig(batch_size=2, steps=1000, min_sizes=(96,), warmup_steps=10, lr=1e-3)
    late = Glipv2Trainer.from_weights(tmp_path / "late", later)
    assert late.config.restart_at == 800
    assert late.learning_rate(900) == pytest.approx(0.5e-3)
    told = Glipv2Trainer.from_weights(tmp_path / "late", dataclasses.replace(later,
                                                                             restart_at=600))
    assert told.config.restart_at == 600
    assert get_preset("small").language.pretrained == "minilm-l6"


def test_restart_at_starts_the_cosine_again() -> None:
    """SGDR's warm restart: `lr` again at `restart_at`, half of it midway, 0 at `steps`; without
    it the one cosine runs from the warm-up's end."""
    config = TrainConfig(steps=1000, lr=1e-3, warmup_steps=10, restart_at=600)
    trainer = Glipv2Trainer(config)
    assert trainer.learning_rate(600) == pytest.approx(1e-3)
    assert trainer.learning_rate(800) == pytest.approx(0.5e-3)
    assert trainer.learning_rate(1000) == pytest.approx(0.0, abs=1e-12)
    plain = Glipv2Trainer(dataclasses.replace(config, restart_at=0))
    assert plain.learning_rate(505) == pytest.approx(0.5e-3)
    with pytest.raises(ValueError, match="restart_at"):
        TrainConfig.load(None, ["steps=1000", "restart_at=1000"])


@pytest.mark.parametrize("name", ["train_default", "train_gpu", "train_cpu"])
def test_shipped_training_configs_load(name: str) -> None:
    """The recipes the README cites stay valid TrainConfigs as fields change, and all hold out
    the pairs `glipv2 eval` scores separately (else held-out AP50 would mean nothing)."""
    config = TrainConfig.load(Path(__file__).parents[1] / "configs" / f"{name}.toml", [])
    assert config.preset == "small"
    assert config.held_out_pairs == HELD_OUT_PAIRS
    assert sum(config.task_weights.values()) == pytest.approx(1.0)
    if name != "train_default":  # continuations: the cosine restarts at --init-from's step
        assert config.restart_at == 0


def test_lr_multipliers_scale_the_rate_of_the_named_parameters(tmp_path) -> None:
    """Zero-initialised layers of a grown model can learn faster; a resumed run keeps the
    factors of its own config, and a prefix naming nothing trainable (a typo, or the frozen text
    encoder) is an error, not a silent no-op."""
    config = TrainConfig(batch_size=2, steps=5, min_sizes=(96,), warmup_steps=1,
                         lr_multipliers={"fpn.skip_blocks.": 10.0})
    trainer = Glipv2Trainer(config)
    trainer.model.config.preprocess = PreprocessConfig(min_size=96, max_size=128)
    stream = iter(WorldStream(config, trainer.model.config, trainer.tokenizer))
    trainer.step([next(stream), next(stream)])
    skip = {id(p) for p in trainer.model.fpn.skip_blocks.parameters()}
    rates = {factor: group["lr"] for group in trainer.optimizer.param_groups
             for factor in [group["lr_factor"]]}
    assert rates[10.0] == pytest.approx(10 * rates[1.0]) and rates[1.0] > 0
    fast = next(g for g in trainer.optimizer.param_groups if g["lr_factor"] == 10.0)
    assert {id(p) for p in fast["params"]} == skip
    trainer.save(tmp_path)
    slower = dataclasses.replace(config, lr_multipliers={"fpn.skip_blocks.": 3.0})
    resumed = Glipv2Trainer.resume(tmp_path, slower)
    assert sorted(g["lr_factor"] for g in resumed.optimizer.param_groups) == [1.0, 3.0]
    for prefix in ("fpn.skip.", "language."):
        with pytest.raises(ValueError, match=rf"name no trainable parameter: \['{prefix}'\]"):
            Glipv2Trainer(dataclasses.replace(config, lr_multipliers={prefix: 2.0}))


def test_examples_move_to_a_device_with_every_tensor_field() -> None:
    """`Batch.to` is what puts training on a GPU: no tensor field may stay behind."""
    import dataclasses

    from model_export.training.examples import collate

    config = TrainConfig(min_sizes=(64,))
    model_config = get_preset("small")
    stream = iter(WorldStream(config, model_config, load_tokenizer()))
    batch = collate([next(stream) for _ in range(6)], 32).to("meta")
    assert batch.images.is_meta and batch.input_ids.is_meta and batch.attention_mask.is_meta
    for example in batch.examples:
        for f in dataclasses.fields(example):
            value = getattr(example, f.name)
            assert not isinstance(value, torch.Tensor) or value.is_meta, f.name


def test_render_workers_split_the_world_without_repeats() -> None:
    """Two DataLoader workers render disjoint scenes (without the stride both would yield the
    same stream: every example twice)."""
    config = TrainConfig(min_sizes=(64,), batch_size=2, workers=2,
                         task_weights={"detection": 1.0})
    model_config = get_preset("small")
    batches = example_batches(config, model_config, load_tokenizer(), start_index=0)
    examples = [e for _ in range(4) for e in next(batches)]
    boxes = {tuple(e.boxes.flatten().tolist()) for e in examples}
    assert len(boxes) == len(examples) == 8
    # the same scenes, one process: scenes 0..7 in some order
    serial = iter(WorldStream(config, model_config, load_tokenizer()))
    assert boxes == {tuple(next(serial).boxes.flatten().tolist()) for _ in range(8)}


def test_time_limit_fits_the_step_count_and_checkpoints(tmp_path) -> None:
    config = TrainConfig(batch_size=1, steps=10_000, min_sizes=(64,), warmup_steps=1,
                         time_limit_s=1e-3, checkpoint_every=10_000)
    trainer = train(config, tmp_path, progress=False)
    assert trainer.step_index == 30 == trainer.config.steps  # stopped after the timed steps
    assert (tmp_path / "model.safetensors").is_file()
    assert '"step": 30' in (tmp_path / "progress.json").read_text()
