"""Prompt tuning ("one set of weights for all"): learn a fixed class list's text offset.

GLIPv2 serves many detection tasks with one frozen model: each task keeps only a small offset
added to the text encoder's features of its prompt (GLIP's `tunable_linear`). `tune_prompt`
learns it with the detection losses on shapes-world scenes (a few of them: few-shot tuning), every
model weight frozen; the result is a `TunedPrompt` (`model_export/checkpoints/tuned_prompts.py`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from model_export.checkpoints.tuned_prompts import TunedPrompt
from model_export.checkpoints.weights import load_model
from model_export.data.types import GroundingSample
from model_export.data.world import HELD_OUT_PAIRS, SHAPES, parse_pairs, render_index
from model_export.processing.prompt import build_detection_prompt, load_tokenizer
from model_export.training.config import TrainConfig
from model_export.training.examples import build_example, collate, grounded_object
from model_export.training.trainer import Glipv2Trainer


@dataclass
class TuningConfig:
    """Knobs of `glipv2 tune-prompt`."""

    steps: int = 200  # optimiser steps on the offset
    batch_size: int = 4  # world images per step
    lr: float = 1e-2  # AdamW on the offset alone
    min_size: int = 288  # shorter side of the training images
    world_seed: int = 7  # scenes the offset is tuned on (evaluation uses other seeds)
    scenes: int = 0  # > 0: cycle over this many scenes (few-shot); 0: a new scene each time
    held_out_pairs: str = HELD_OUT_PAIRS
    seed: int = 0


def tune_prompt(model_dir: str | Path, name: str, classes: Sequence[str],
                config: TuningConfig | None = None, description: str = "",
                progress: bool = True) -> tuple[TunedPrompt, list[float]]:
    """Learn the offset of `classes` (in this order) on world scenes, the model frozen.

    Objects of other classes are simply absent from the targets: the prompt asks for its own
    classes only. Returns the prompt and the detection loss of every step.
    """
    config = config or TuningConfig()
    classes = list(classes)
    unknown = sorted(set(classes) - set(SHAPES))
    if unknown:
        raise ValueError(f"the shapes world has no {unknown}; its classes are {list(SHAPES)}")
    model = load_model(model_dir)
    if model.prompt_offset is not None:
        raise ValueError("this model carries its own prompt offset (a converted prompt-tuned "
                         "checkpoint); tune prompts on a model without one")
    model.requires_grad_(False)
    tokenizer = load_tokenizer(model.config.language.tokenizer)
    tokens = len(tokenizer(build_detection_prompt(classes).caption)["input_ids"])
    model.prompt_offset = nn.Parameter(torch.zeros(tokens, model.config.language.hidden_size))
    train_config = TrainConfig(lr=config.lr, weight_decay=0.0, seed=config.seed,
                               loss_weights={"inter": 0.0, "mask": 0.0, "mlm": 0.0})
    trainer = Glipv2Trainer(train_config, model=model)
    rng = random.Random(config.seed)
    exclude = parse_pairs(config.held_out_pairs) if config.held_out_pairs else frozenset()
    model.eval()  # frozen: dropout off, the offset is the only thing that changes
    losses: list[float] = []
    index = 0
    for _ in tqdm(range(config.steps), disable=not progress, desc=f"tuning {name}"):
        examples = []
        for _ in range(config.batch_size):
            scene = render_index(config.world_seed,
                                 index % config.scenes if config.scenes else index, exclude)
            index += 1
            objects = [grounded_object(o) for o in scene.objects if o.shape in classes]
            sample = GroundingSample(
                # A rendered scene has no file; `GroundingSample.image_path` is typed `Path`.
                image_path=None,  # type: ignore[arg-type]
                width=scene.width, height=scene.height, task="detection", class_names=classes,
                objects=objects, detection_prompt=True)
            examples.append(build_example(
                sample, scene.image, tokenizer, model.config.preprocess,
                model.config.tasks.vqa_answers, model.config.language.max_query_len, rng,
                min_size=config.min_size, shuffle=False))
        batch = collate(examples, model.config.preprocess.size_divisibility)
        loss = cast(Tensor, sum(trainer.losses(batch).values()))  # always the detection terms
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        losses.append(float(loss.detach()))
    prompt = TunedPrompt(name, classes, model.prompt_offset.detach().clone(), description)
    return prompt, losses
