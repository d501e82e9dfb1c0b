"""`TrainConfig`: the knobs of `glipv2 train`, from a TOML file plus `--set key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from model_export.data.world import HELD_OUT_PAIRS


@dataclass
class TrainConfig:
    """Knobs of a training run; a TOML file sets any of them, `--set key=value` overrides."""

    preset: str = "small"  # model preset to train
    steps: int = 20000  # optimiser steps
    batch_size: int = 8  # examples per step
    lr: float = 5e-4  # peak learning rate (AdamW), after a linear warm-up
    # parameter-name prefix -> factor on `lr` (the first matching prefix applies), e.g. to let
    # zero-initialised layers of a grown model catch up: {"fpn.skip_blocks." = 10}
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    warmup_steps: int = 300  # linear warm-up length
    # > 0: a warm restart (SGDR): the cosine starts again at this step, from `lr` down to 0 at
    # `steps`, so a finished schedule can go on with new objectives and still end annealed.
    # 0 with init_from: the weights' own step (fresh moments, so a fresh cosine)
    restart_at: int = 0
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    freeze_language: bool = True  # keep the packaged text encoder frozen
    min_sizes: tuple[int, ...] = (256, 288, 320)  # shorter-side sizes drawn per example
    task_weights: dict[str, float] = field(default_factory=lambda: {
        "detection": 0.25, "grounding": 0.25, "referring": 0.2, "vqa": 0.15, "caption": 0.15})
    # "attend" (off unless set): tokens' attention onto their boxes, `text_attention_loss`;
    # "glimpse" (off unless set, needs tasks.vqa_glimpses >= 2): the VQA head's last glimpse
    # onto the words naming the question's objects, `glimpse_grounding_loss`; "soft_token" (off
    # unless set): each positive anchor's softmax over the prompt's tokens, `soft_token_loss`
    loss_weights: dict[str, float] = field(default_factory=lambda: {
        "inter": 0.5, "mask": 1.0, "vqa": 1.0, "caption": 1.0, "mlm": 0.1})
    mlm_probability: float = 0.15  # chance each grounding/referring token is masked for L_mlm
    inter_regions_per_image: int = 48  # anchors sampled per image for L_inter (half positives)
    inter_temperature: float = 0.1  # softmax temperature of L_inter
    max_distractors: int = 0  # up to this many non-world class names in detection prompts
    # chance per scene that its referring examples are a relation naming something and one
    # naming nothing that differs from it in one word (another relation word, or the anchor in
    # a colour not there), and that its grounding prompt also names such a pair (`PromptMix`)
    relation_negatives: float = 0.0
    # chance that a grounding prompt is the whole colour-shape vocabulary (held-out pairs left
    # out) in a shuffled order, one of the chunks the service packs it into: users send it all
    full_vocabulary_share: float = 0.0
    held_out_pairs: str = HELD_OUT_PAIRS  # never rendered in training
    world_seed: int = 1  # seed of the training world (evaluation uses other seeds)
    seed: int = 0  # seed of sampling and initialisation
    checkpoint_every: int = 500  # steps between checkpoints
    threads: int = 0  # torch threads; 0 keeps torch's default
    device: str = "cpu"  # where the model trains: "cpu" or "cuda" (TF32 matrix products)
    workers: int = 0  # processes rendering the world in parallel; 0 renders in this one
    time_limit_s: float = 0  # > 0: after 30 steps, fit `steps` to this wall-clock budget

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str]) -> TrainConfig:
        values = tomllib.loads(Path(path).read_text()) if path else {}
        for item in overrides:
            key, _, raw = item.partition("=")
            if not _:
                raise ValueError(f"override {item!r} is not key=value")
            values[key] = json.loads(raw) if raw[:1] in "[{0123456789-tf" else raw
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        if "min_sizes" in values:
            values["min_sizes"] = tuple(values["min_sizes"])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Rules across fields and ranges; ValueError naming the setting."""
        if self.restart_at >= self.steps:
            raise ValueError(f"restart_at ({self.restart_at}) must come before steps "
                             f"({self.steps})")
        for name in ("relation_negatives", "full_vocabulary_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a chance, in [0, 1]: got {getattr(self, name)}")
