"""`glipv2 train`: train GLIPv2 on the shapes world (rendered on the fly) with all heads and losses.

One step: a batch of examples of mixed tasks; captioning examples run in the causal mode, the
others bidirectionally (two forward passes when both are present). Losses: L_loc (GIoU +
centerness), L_intra (token focal), L_inter (batch-wide region-token contrast on pre-fusion
features, label propagation to class-name prompts only), L_mlm, and the mask, VQA and caption
losses. Checkpoints are safetensors model files plus the optimiser state; `--resume` continues.
The knobs are `config.TrainConfig`; the examples come from `world_stream.example_batches`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from model_export.checkpoints.weights import load_model, load_pretrained_language, save_model
from model_export.modeling.config import get_preset
from model_export.modeling.mask_head import Glipv2MaskHead, downsample_masks, mask_loss
from model_export.modeling.model import Glipv2ContrastiveProjection, Glipv2Model
from model_export.modeling.vqa_head import glimpse_grounding_loss, vqa_loss
from model_export.processing.anchors import AnchorGenerator
from model_export.processing.box_coding import BoxCoder, to_exclusive
from model_export.processing.prompt import load_tokenizer
from model_export.training.config import TrainConfig
from model_export.training.examples import Batch, Example, collate, pad_tokens
from model_export.training.losses import (
    MLM_IGNORE_INDEX,
    ImageTargets,
    PromptInfo,
    SpecialTokenIds,
    contrastive_region_inputs,
    detection_losses,
    inter_image_contrastive_loss,
    inter_image_contrastive_targets,
    mask_tokens,
    mlm_loss,
    text_attention_loss,
)
from model_export.training.world_stream import example_batches


class Glipv2Trainer:
    """Owns the model, optimiser and loss assembly; `step(examples)` runs one update."""

    def __init__(self, config: TrainConfig, model: Glipv2Model | None = None) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        if model is None:
            model = Glipv2Model(get_preset(config.preset))
            if model.config.language.pretrained:
                load_pretrained_language(model)
        if config.loss_weights.get("glimpse", 0) > 0 and model.config.tasks.vqa_glimpses < 2:
            raise ValueError("loss_weights.glimpse steers the VQA head's last glimpse and needs "
                             "tasks.vqa_glimpses >= 2 (with one it would replace the pooling)")
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        if config.freeze_language:
            self.model.language.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.tokenizer = load_tokenizer(self.model.config.language.tokenizer)
        self.specials = SpecialTokenIds.from_tokenizer(self.tokenizer)
        self.anchor_generator = AnchorGenerator.from_config(self.model.config.head)
        self.box_coder = BoxCoder.from_config(self.model.config.head)
        self.step_index = 0
        self.warmup_from = 0  # step the optimiser state started at (fresh moments warm up)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)

    def _param_groups(self) -> list[dict]:
        """Trainable parameters grouped by learning-rate factor (`config.lr_multipliers`)."""
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups: dict[float, list[nn.Parameter]] = {}
        for name, parameter in trainable:
            factor = next((f for prefix, f in self.config.lr_multipliers.items()
                           if name.startswith(prefix)), 1.0)
            groups.setdefault(factor, []).append(parameter)
        unused = [prefix for prefix in self.config.lr_multipliers
                  if not any(n.startswith(prefix) for n, _ in trainable)]
        if unused:
            raise ValueError(f"lr_multipliers name no trainable parameter: {unused}")
        return [{"params": params, "lr_factor": factor} for factor, params in groups.items()]

    def learning_rate(self, step: int) -> float:
        """Cosine decay from `config.restart_at` (0: the start) to `config.steps`, times a
        linear warm-up from `warmup_from`."""
        warmup = max(1, self.config.warmup_steps)
        start = self.config.restart_at if self.config.restart_at > 0 else warmup
        progress = max(0, step - start) / max(1, self.config.steps - start)
        rate = self.config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return rate * min(1.0, (step - self.warmup_from + 1) / warmup)

    def step(self, examples: list[Example]) -> dict[str, float]:
        """One optimiser step on a list of examples; returns the loss terms."""
        self.model.train()
        if self.config.freeze_language:
            self.model.language.eval()
        rate = self.learning_rate(self.step_index)
        for group in self.optimizer.param_groups:
            group["lr"] = rate * group["lr_factor"]
        divisibility = self.model.config.preprocess.size_divisibility
        losses: dict[str, Tensor] = {}
        for causal in (False, True):
            members = [e for e in examples if e.causal == causal]
            if members:
                part = self.losses(collate(members, divisibility).to(self.device))
                weight = len(members) / len(examples)
                for name, value in part.items():
                    losses[name] = losses.get(name, 0.0) + weight * value
        total = cast(Tensor, sum(losses.values()))  # every batch has at least one term
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.config.grad_clip)
        self.optimizer.step()
        self.step_index += 1
        report = {name: float(value.detach()) for name, value in losses.items()}
        report["total"] = float(total.detach())
        return report

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted loss terms of one batch (all examples in the same mode)."""
        model, weights = self.model, self.config.loss_weights
        input_ids, mask = batch.input_ids, batch.attention_mask
        mlm_labels = None
        if not batch.causal and model.mlm_head is not None and weights.get("mlm", 0) > 0:
            input_ids, mlm_labels = self._mask_for_mlm(batch)
        visual = model.encode_image(batch.images)
        text = model.encode_text(input_ids, mask, causal=batch.causal)
        attend = weights.get("attend", 0) > 0
        recording: AbstractContextManager[list[Tensor]] = (
            model.fusion.recording_text_attention() if attend else nullcontext([]))
        with recording as maps:
            out = model.fuse(visual, text, causal=batch.causal,
                             colours=model.image_colours(batch.images))
        num_tokens = input_ids.shape[1]
        result: dict[str, Tensor] = {}

        grounded = [i for i, e in enumerate(batch.examples) if e.grounded]
        if grounded:
            sizes = [(level.shape[-2], level.shape[-1]) for level in out.box_regression]
            anchors = self.anchor_generator.grid_anchors(sizes, device=self.device)
            targets = [ImageTargets(boxes=batch.examples[i].boxes,
                                    positive_map=pad_tokens(batch.examples[i].positive_map,
                                                            num_tokens),
                                    box_labels=batch.examples[i].box_labels) for i in grounded]
            det = detection_losses(
                [b[grounded] for b in out.box_regression], [c[grounded] for c in out.centerness],
                [t[grounded] for t in out.token_logits], anchors, targets, mask[grounded],
                self.box_coder, soft_token=weights.get("soft_token", 0) > 0)
            result["box"] = det.loss_box_giou
            result["centerness"] = det.loss_centerness
            result["token"] = det.loss_token
            if det.loss_soft_token is not None:
                result["soft_token"] = weights["soft_token"] * det.loss_soft_token
            if maps:
                centres = torch.cat(anchors)
                centres = (centres[:, :2] + centres[:, 2:]) / 2
                result["attend"] = weights["attend"] * text_attention_loss(
                    [m[grounded] for m in maps], [t.positive_map for t in targets],
                    [t.boxes for t in targets], centres)
            if model.contrastive is not None and weights.get("inter", 0) > 0:
                result["inter"] = weights["inter"] * self._inter_loss(
                    visual, text.hidden, mask, grounded, det.matched_gt, targets, batch)
            if model.mask_head is not None and weights.get("mask", 0) > 0:
                masked = self._mask_loss(out, batch, grounded)
                if masked is not None:
                    result["mask"] = weights["mask"] * masked
        vqa_rows = [i for i, e in enumerate(batch.examples) if e.vqa_scores is not None]
        if vqa_rows and model.vqa_head is not None:
            fused, vqa_mask = out.fused_text[vqa_rows], mask[vqa_rows]
            logits = model.vqa_head(fused, vqa_mask)
            scores = torch.stack([e.vqa_scores for e in batch.examples if e.vqa_scores is not None])
            result["vqa"] = weights.get("vqa", 1.0) * vqa_loss(logits, scores)
            if weights.get("glimpse", 0) > 0:
                named = torch.stack([self._glimpse_tokens(batch.examples[i], num_tokens)
                                     for i in vqa_rows])
                last = model.vqa_head.pool_weights(fused, vqa_mask)[:, -1]
                result["glimpse"] = weights["glimpse"] * glimpse_grounding_loss(last, named)
        if batch.causal and model.mlm_head is not None:
            # Causal batches hold captioning examples only, and every one has lm_labels.
            labels = torch.stack([pad_tokens(cast(Tensor, e.lm_labels), num_tokens,
                                             MLM_IGNORE_INDEX) for e in batch.examples])
            logits = model.lm_logits(out.fused_text)
            result["caption"] = weights.get("caption", 1.0) * F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=MLM_IGNORE_INDEX)
        if mlm_labels is not None and out.mlm_logits is not None:
            result["mlm"] = weights["mlm"] * mlm_loss(out.mlm_logits, mlm_labels)
        return result

    @staticmethod
    def _glimpse_tokens(example: Example, num_tokens: int) -> Tensor:
        """(T,) bool: the words the steered glimpse reads, those pointing at the object the
        answer describes where known (a relation's "left of": the anchor's words describe
        another object), else every word naming a question's object."""
        if example.answer_tokens is not None:
            return pad_tokens(example.answer_tokens, num_tokens, False) & example.grounded
        named = pad_tokens(example.positive_map, num_tokens).bool().any(dim=0)
        return named & example.grounded

    def _mask_for_mlm(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Mask tokens of the grounding/referring texts only (class-name prompts stay intact)."""
        input_ids = batch.input_ids.clone()
        labels = torch.full_like(input_ids, MLM_IGNORE_INDEX)
        rows = [i for i, e in enumerate(batch.examples) if e.task in ("grounding", "referring")]
        if rows:
            masked, row_labels = mask_tokens(
                input_ids[rows], batch.attention_mask[rows], self.specials,
                self.model.config.language.vocab_size, self.config.mlm_probability,
                self.generator)
            input_ids[rows] = masked
            labels[rows] = row_labels
        return input_ids, labels

    def _inter_loss(self, visual: list[Tensor], hidden: Tensor, mask: Tensor, rows: list[int],
                    matched: list[Tensor], targets: list[ImageTargets], batch: Batch) -> Tensor:
        n = len(rows)
        # (N, C, H, W) per level -> (N, A, C), levels concatenated in anchor order
        regions = torch.cat([level[rows].flatten(2).transpose(1, 2) for level in visual], dim=1)
        picks = []
        half = self.config.inter_regions_per_image // 2
        for match in matched:
            positive = torch.nonzero(match >= 0).flatten()
            negative = torch.nonzero(match < 0).flatten()
            positive = positive[torch.randperm(len(positive), generator=self.generator,
                                               device=self.device)[:half]]
            negative = negative[torch.randperm(len(negative), generator=self.generator,
                                               device=self.device)[:half]]
            picks.append(torch.cat([positive, negative]))
        labels, positives = contrastive_region_inputs(matched, targets, picks)
        prompts = [PromptInfo(token_labels=batch.examples[i].token_labels
                              + [None] * (mask.shape[1] - len(batch.examples[i].token_labels)),
                              detection_prompt=batch.examples[i].detection_prompt) for i in rows]
        target = inter_image_contrastive_targets(labels, positives, prompts)
        region_features = torch.cat([regions[i, pick] for i, pick in enumerate(picks)])
        token_features = hidden[rows].reshape(n * mask.shape[1], -1)
        # `losses` computes L_inter only for a model with the projection.
        contrastive = cast(Glipv2ContrastiveProjection, self.model.contrastive)
        region_proj, token_proj = contrastive(region_features, token_features)
        return inter_image_contrastive_loss(region_proj, token_proj, target,
                                            mask[rows].flatten().bool(),
                                            self.config.inter_temperature)

    def _mask_loss(self, out, batch: Batch, rows: list[int]) -> Tensor | None:
        """Mask loss over every (phrase, object) pair of the batch's rows, the head run once on
        all of them (per-image calls cost hundreds of small kernels per image on a GPU)."""
        members = [i for i in rows if batch.examples[i].masks is not None
                   and batch.examples[i].phrases is not None
                   and any(batch.examples[i].phrase_objects)]
        if not members:
            return None
        examples = [batch.examples[i] for i in members]
        num_phrases = max(len(e.phrase_objects) for e in examples)
        count = max(len(m) for e in examples for m in e.phrase_objects)
        num_tokens = batch.input_ids.shape[1]
        boxes = torch.zeros(len(members), num_phrases, count, 4, device=self.device)
        valid = torch.zeros(len(members), num_phrases, count, dtype=torch.bool,
                            device=self.device)
        phrases = torch.zeros(len(members), num_phrases, num_tokens, device=self.device)
        slots, targets = [], []  # per pair: (row, phrase, slot) of the head output; its mask
        padded_hw = (batch.images.shape[-2], batch.images.shape[-1])
        # Every member has phrases and masks (the filter above), hence the casts below.
        for n, example in enumerate(examples):
            pairs = torch.tensor([(n, p, k, obj) for p, objects in enumerate(example.phrase_objects)
                                  for k, obj in enumerate(objects)], device=self.device)
            slot, objects = tuple(pairs[:, :3].T), pairs[:, 3]
            boxes[slot], valid[slot] = to_exclusive(example.boxes[objects]), True
            phrases[n, :len(example.phrase_objects)] = pad_tokens(cast(Tensor, example.phrases),
                                                                  num_tokens)
            slots.append(pairs[:, :3])
            targets.append(downsample_masks(cast(Tensor, example.masks), padded_hw)[objects])
        rows_index = torch.tensor(members, device=self.device)
        # `losses` computes the mask loss only for a model with the head.
        mask_head = cast(Glipv2MaskHead, self.model.mask_head)
        logits = mask_head([level[rows_index] for level in out.fused_visual],
                           out.fused_text[rows_index], phrases, boxes, valid)
        n, p, k = torch.cat(slots).T
        return mask_loss(logits[n, p, k], torch.cat(targets))

    def save(self, out_dir: str | Path) -> Path:
        """Model (without the packaged text encoder when frozen) + optimiser + step."""
        out = Path(out_dir)
        external = self.config.freeze_language and self.model.config.language.pretrained
        save_model(self.model, out, external_language=bool(external))
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step_index,
                    "generator": self.generator.get_state(), "device": self.device.type},
                   out / "trainer_state.pt")
        (out / "progress.json").write_text(json.dumps({"step": self.step_index}) + "\n")
        (out / "train_config.json").write_text(
            json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        return out

    @classmethod
    def from_weights(cls, model_dir: str | Path, config: TrainConfig) -> Glipv2Trainer:
        """Continue from a model folder without optimiser state (e.g. the committed default
        model): fresh AdamW moments, the step count (schedule, world index) from progress.json.
        Unless `restart_at` says otherwise the cosine restarts at that step: counted from step 0
        it would sit near its end, and a time-limited run would train at a learning rate near 0."""
        trainer = cls(config, model=load_model(model_dir))
        progress = Path(model_dir) / "progress.json"
        if progress.is_file():
            trainer.step_index = int(json.loads(progress.read_text())["step"])
        trainer.warmup_from = trainer.step_index
        if config.restart_at == 0 and 0 < trainer.step_index < config.steps:
            trainer.config = dataclasses.replace(config, restart_at=trainer.step_index)
        return trainer

    @classmethod
    def resume(cls, checkpoint_dir: str | Path, config: TrainConfig) -> Glipv2Trainer:
        trainer = cls(config, model=load_model(checkpoint_dir))
        state = torch.load(Path(checkpoint_dir) / "trainer_state.pt", weights_only=False,
                           map_location=trainer.device)
        factors = [group["lr_factor"] for group in trainer.optimizer.param_groups]
        saved = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
        groups = [len(group["params"]) for group in trainer.optimizer.param_groups]
        if saved != groups:
            raise ValueError(
                f"{checkpoint_dir} has optimiser groups of {saved} parameters, this config's "
                f"lr_multipliers make {groups}: resume with the multipliers it was saved with, "
                "or continue from its weights with fresh moments (init_from / --init-from)")
        trainer.optimizer.load_state_dict(state["optimizer"])
        for group, factor in zip(trainer.optimizer.param_groups, factors, strict=True):
            group["lr_factor"] = factor  # this run's config, not the saved run's
        trainer.step_index = int(state["step"])
        if state.get("device", "cpu") == trainer.device.type:  # a generator state is per device
            trainer.generator.set_state(state["generator"].cpu())
        return trainer


_STEPS_TIMED = 30  # steps measured before `time_limit_s` fits the step count


def train(config: TrainConfig, out_dir: str | Path, resume: str | Path | None = None,
          init_from: str | Path | None = None, progress: bool = True) -> Glipv2Trainer:
    """Run `config.steps` steps: from scratch, continuing a checkpoint with its optimiser state
    (`resume`), or from a model folder's weights only (`init_from`)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if resume and init_from:
        raise ValueError("give either resume or init_from, not both")
    if resume:
        trainer = Glipv2Trainer.resume(resume, config)
    elif init_from:
        trainer = Glipv2Trainer.from_weights(init_from, config)
    else:
        trainer = Glipv2Trainer(config)
    batches = example_batches(config, trainer.model.config, trainer.tokenizer,
                              start_index=trainer.step_index * config.batch_size)
    out = Path(out_dir)
    bar = tqdm(total=config.steps, initial=trainer.step_index, disable=not progress,
               dynamic_ncols=True)
    started, done = time.monotonic(), 0
    while trainer.step_index < trainer.config.steps:
        report = trainer.step(next(batches))
        done += 1
        elapsed = time.monotonic() - started
        if config.time_limit_s > 0 and done == _STEPS_TIMED:
            fit = trainer.step_index + int((config.time_limit_s - elapsed) * done / elapsed)
            fit = min(config.steps, max(trainer.step_index, fit))
            trainer.config = dataclasses.replace(trainer.config, steps=fit)
            bar.total = trainer.config.steps
        rate = done * config.batch_size / elapsed
        bar.set_postfix(loss=f"{report['total']:.3f}", img_s=f"{rate:.2f}")
        bar.update(1)
        if (trainer.step_index % config.checkpoint_every == 0
                or trainer.step_index == trainer.config.steps):
            trainer.save(out)
            with (out / "train_log.jsonl").open("a") as log:
                log.write(json.dumps({"step": trainer.step_index, **report}) + "\n")
    bar.close()
    return trainer
