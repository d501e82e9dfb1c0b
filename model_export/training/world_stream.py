"""Training examples from the shapes world, rendered on the fly, in batches of `batch_size`
(in this process or in DataLoader workers)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from model_export.data.types import GroundingSample
from model_export.data.world import (
    COLOR_NAMES,
    SHAPES,
    parse_pairs,
    render_index,
)
from model_export.processing.chunking import name_token_counts
from model_export.training.config import TrainConfig
from model_export.training.examples import (
    Example,
    PromptMix,
    build_example,
    distractor_words,
    world_samples,
)


class WorldStream:
    """Endless training examples from the shapes world, rendered on the fly: scenes
    `start_index`, `start_index + stride`, ... (a stride > 1 splits the world across workers)."""

    def __init__(self, config: TrainConfig, model_config, tokenizer, start_index: int = 0,
                 stride: int = 1) -> None:
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.distractors: list[str] = []
        if config.max_distractors:
            words = [*COLOR_NAMES, *SHAPES, "small", "large", "shape", "object"]
            self.distractors = distractor_words(tokenizer, words)
        self.rng = random.Random(config.seed * 1000003 + start_index)
        self.index = start_index
        self.stride = stride
        self.exclude = parse_pairs(config.held_out_pairs) if config.held_out_pairs else frozenset()
        names = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]
        self.mix = PromptMix(
            relation_negatives=config.relation_negatives,
            full_vocabulary=config.full_vocabulary_share,
            name_tokens=dict(zip(names, name_token_counts(tokenizer.backend_tokenizer, names),
                                 strict=True)) if config.full_vocabulary_share else {},
            max_tokens=model_config.language.max_query_len,
            chunk_size=model_config.language.max_prompt_phrases)
        self.tasks = list(config.task_weights)
        self.weights = [config.task_weights[t] for t in self.tasks]

    def __iter__(self) -> Iterator[Example]:
        while True:
            scene = render_index(self.config.world_seed, self.index, self.exclude)
            self.index += self.stride
            samples = world_samples(scene, self.rng, COLOR_NAMES, SHAPES, self.distractors,
                                    self.config.max_distractors, self.exclude, self.mix)
            task = self.rng.choices(self.tasks, self.weights)[0]
            candidates = [s for s in samples if s.task == task] or samples
            sample: GroundingSample = self.rng.choice(candidates)
            yield build_example(
                sample, scene.image, self.tokenizer, self.model_config.preprocess,
                self.model_config.tasks.vqa_answers, self.model_config.language.max_query_len,
                self.rng, min_size=self.rng.choice(self.config.min_sizes))


class WorldDataset(torch.utils.data.IterableDataset):
    """`WorldStream` for a DataLoader: worker k of W renders scenes start + k, start + k + W, ..."""

    def __init__(self, config: TrainConfig, model_config, tokenizer, start_index: int) -> None:
        super().__init__()
        self.config, self.model_config, self.tokenizer = config, model_config, tokenizer
        self.start_index = start_index

    def __iter__(self) -> Iterator[Example]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter(WorldStream(self.config, self.model_config, self.tokenizer,
                                self.start_index + worker, stride=workers))


def example_batches(config: TrainConfig, model_config, tokenizer, start_index: int
                    ) -> Iterator[list[Example]]:
    """Endless lists of `config.batch_size` examples, rendered by `config.workers` processes."""
    if config.workers <= 0:
        stream = iter(WorldStream(config, model_config, tokenizer, start_index))
        while True:
            yield [next(stream) for _ in range(config.batch_size)]
    loader = torch.utils.data.DataLoader(
        WorldDataset(config, model_config, tokenizer, start_index),
        batch_size=config.batch_size, collate_fn=list, num_workers=config.workers,
        prefetch_factor=4, persistent_workers=True)
    yield from loader
