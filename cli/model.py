"""`glipv2` commands about the model: convert, detect, world, train, tune-prompt, eval,
calibrate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cli.common import Subcommands
from engines.kinds import OrtProvider, Precision, RuntimeKind
from model_export.modeling.config import RELATION_MODES, SCORE_AGGREGATIONS

if TYPE_CHECKING:
    from model_export.evaluation.calibrate import ThresholdScore


def _convert(args: argparse.Namespace) -> int:
    from model_export.checkpoints.convert import ConversionError, convert_checkpoint

    try:
        report = convert_checkpoint(args.checkpoint, args.preset, args.out,
                                    trust_pickle=args.trust_pickle)
    except ConversionError as exc:
        print(f"conversion failed: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


def _detect(args: argparse.Namespace) -> int:
    from PIL import Image

    from model_export.inference import Glipv2Detector

    detector = Glipv2Detector.from_dir(args.model)
    with Image.open(args.image) as image:
        run = detector.detect(image, [c.strip() for c in args.classes.split(",")])
    rows = [d for d in run.as_dicts() if d["score"] >= args.threshold]
    print(json.dumps({"detections": rows}, indent=2))
    return 0


def _world(args: argparse.Namespace) -> int:
    from model_export.data.world import generate_world, parse_pairs

    exclude = parse_pairs(args.exclude) if args.exclude else frozenset()
    path = generate_world(args.out, args.n, args.seed, exclude_pairs=exclude)
    print(f"wrote {args.n} images and {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from model_export.training.trainer import TrainConfig, train

    config = TrainConfig.load(args.config, args.set or [])
    train(config, args.out, resume=args.resume, init_from=args.init_from)
    print(f"checkpoint in {args.out}")
    return 0


def _tune_prompt(args: argparse.Namespace) -> int:
    from model_export.checkpoints.tuned_prompts import save_tuned_prompt
    from model_export.training.prompt_tuning import TuningConfig, tune_prompt

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    config = TuningConfig(steps=args.steps, lr=args.lr, scenes=args.scenes)
    prompt, losses = tune_prompt(args.model, args.name, classes, config,
                                 description=args.description)
    path = save_tuned_prompt(prompt, args.out)
    window = max(1, len(losses) // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"{path}: detection loss {first:.3f} -> {last:.3f} over {len(losses)} steps")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from engines.runtimes import RuntimeOptions, open_runtime
    from model_export.data.world import HELD_OUT_PAIRS
    from model_export.evaluation.evaluate import TASKS, evaluate, format_table, write_report
    from service.offline import ServingPredictor
    from service.pipeline.caption_search import DEFAULT_SEARCH

    held_out = HELD_OUT_PAIRS if args.held_out is None else args.held_out
    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    if args.runtime == RuntimeKind.PYTORCH and not args.model:
        print("--model is required with the pytorch runtime", file=sys.stderr)
        return 2
    if args.runtime != RuntimeKind.PYTORCH and not args.engines:
        print(f"--runtime {args.runtime} needs --engines (glipv2 export)", file=sys.stderr)
        return 2
    try:
        search = dataclasses.replace(DEFAULT_SEARCH, **{
            key: value for key, value in (("beams", args.caption_beams),
                                          ("length_penalty", args.caption_length_penalty))
            if value is not None})
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    predictor = ServingPredictor(open_runtime(RuntimeOptions(
        kind=args.runtime, model_dir=Path(args.model) if args.model else None,
        engine_dir=Path(args.engines) if args.engines else None, provider=args.provider,
        precision=args.precision)), search, args.caption_objects)
    try:
        metrics = evaluate(predictor, args.n, args.seed, tasks, held_out=held_out)
    finally:
        predictor.close()
    print(format_table(metrics))
    if args.out:
        write_report(metrics, args.out)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from engines.runtimes.torch_eager import TorchRuntime
    from model_export.checkpoints.weights import load_config, save_config
    from model_export.evaluation.calibrate import (
        CALIBRATION_SEED,
        best_threshold,
        relation_threshold_sweep,
        segment_threshold_sweep,
    )
    from service.offline import ServingPredictor

    runtime = TorchRuntime.from_dir(args.model)
    post = runtime.config.postprocess
    if args.score_agg is not None:
        post.score_agg = args.score_agg
    if args.relations is not None:
        post.relations = args.relations
    geometry = post.relations == "geometry"
    predictor = ServingPredictor(runtime)
    seed = CALIBRATION_SEED if args.seed is None else args.seed
    try:
        scores = segment_threshold_sweep(predictor, args.n, seed, geometry=geometry)
        best = best_threshold(scores)
        _print_sweep("threshold", scores, best)
        if geometry:
            relation_scores = relation_threshold_sweep(predictor, args.n, best.threshold, seed)
            best_relation = best_threshold(relation_scores)
            _print_sweep("relation threshold", relation_scores, best_relation)
    finally:
        predictor.close()
    config = load_config(args.model)
    before = (config.postprocess.segment_threshold, config.postprocess.relation_threshold)
    if not args.write:
        print(f"best {best.threshold}" + (f", relation {best_relation.threshold}" if geometry
                                           else "")
              + f" (the model has {before[0]}, relation {before[1]}; --write stores it)")
        return 0
    config.postprocess.segment_threshold = best.threshold
    config.postprocess.score_agg = post.score_agg
    config.postprocess.relations = post.relations
    if geometry:
        config.postprocess.relation_threshold = best_relation.threshold
    print(f"{save_config(config, args.model)}: segment_threshold {before[0]} -> "
          f"{best.threshold}, relation_threshold {before[1]} -> "
          f"{config.postprocess.relation_threshold}, score_agg {post.score_agg}, relations "
          f"{post.relations} (engines exported before this need re-exporting)")
    return 0


def _print_sweep(name: str, scores: Sequence[ThresholdScore], best: ThresholdScore) -> None:
    print(f"{name}  mIoU   empty acc  gIoU")
    for s in scores:
        cells = [f"{v:.3f}" if v is not None else "-"
                 for v in (s.miou, s.empty_accuracy, s.giou)]
        print(f"{s.threshold:{len(name)}.3f}  {cells[0]:5s}  {cells[1]:9s}  {cells[2]}"
              + ("  <- best" if s is best else ""))


def register(sub: Subcommands) -> None:
    """Add this group's commands to the `glipv2` parser."""
    convert = sub.add_parser("convert", help="convert a released GLIP checkpoint (strict)")
    convert.add_argument("checkpoint", help="GLIP .pth file ({'model': state_dict})")
    convert.add_argument("--preset", required=True, choices=["glip-t", "glip-l", "small"])
    convert.add_argument("--out", required=True, help="output folder")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow arbitrary pickled objects in the checkpoint (trusted files)")
    convert.set_defaults(func=_convert)

    detect = sub.add_parser("detect", help="detect classes in one image (PyTorch, local)")
    detect.add_argument("--model", required=True, help="converted model folder")
    detect.add_argument("--image", required=True)
    detect.add_argument("--classes", required=True, help="comma-separated class names")
    detect.add_argument("--threshold", type=float, default=0.3, help="minimum score to print")
    detect.set_defaults(func=_detect)

    world = sub.add_parser("world", help="render grounded-shapes world images + annotations")
    world.add_argument("--out", required=True, help="output folder")
    world.add_argument("--n", type=int, required=True, help="number of images")
    world.add_argument("--seed", type=int, default=0, help="world seed (deterministic)")
    world.add_argument("--exclude", default="",
                       help='held-out pairs, e.g. "purple star,orange hexagon"')
    world.set_defaults(func=_world)

    train = sub.add_parser("train", help="train GLIPv2 on the shapes world (all heads, all losses)")
    train.add_argument("--config", help="TOML file of TrainConfig settings")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one setting (repeatable), e.g. --set steps=100")
    train.add_argument("--out", required=True, help="checkpoint folder")
    train.add_argument("--resume", help="checkpoint folder to continue from (with optimiser)")
    train.add_argument("--init-from", help="model folder whose weights to start from")
    train.set_defaults(func=_train)

    tune = sub.add_parser(
        "tune-prompt", help="learn a tuned prompt (class list + text offset) for prompt_id",
        description="Prompt tuning: the model stays frozen; only an offset of the prompt's "
                    "token features is learned, on shapes-world scenes. The file goes into a "
                    "folder the service serves with --prompts.")
    tune.add_argument("--model", default="models/default", help="model folder")
    tune.add_argument("--name", required=True, help="the prompt_id clients will send")
    tune.add_argument("--classes", required=True, help="comma-separated class names, in order")
    tune.add_argument("--out", default="prompts", help="prompt folder (default prompts/)")
    tune.add_argument("--steps", type=int, default=200, help="optimiser steps (200)")
    tune.add_argument("--lr", type=float, default=1e-2, help="learning rate (0.01)")
    tune.add_argument("--scenes", type=int, default=0,
                      help="few-shot: cycle over this many scenes (default: new ones)")
    tune.add_argument("--description", default="", help="stored with the prompt")
    tune.set_defaults(func=_tune_prompt)

    evaluate = sub.add_parser("eval", help="metrics of a model on fresh shapes-world images")
    evaluate.add_argument("--model", help="model folder (the pytorch runtime)")
    evaluate.add_argument("--runtime", choices=list(RuntimeKind),
                          default="pytorch",
                          help="what runs the service's path: pytorch on --model, or the "
                               "exported graphs in --engines")
    evaluate.add_argument("--engines", help="engine folder (glipv2 export)")
    evaluate.add_argument("--provider", choices=list(OrtProvider), default="cpu",
                          help="ONNX Runtime execution provider")
    evaluate.add_argument("--precision", choices=list(Precision), default="fp32",
                          help="vision and fusion: bf16 (pytorch) or int8 (onnxruntime)")
    evaluate.add_argument("--n", type=int, default=500, help="images to render and score")
    evaluate.add_argument("--seed", type=int, default=1000, help="world seed (not a training one)")
    evaluate.add_argument("--tasks", default="", help="comma-separated subset of the tasks")
    evaluate.add_argument("--held-out",
                          help="colour-shape pairs held out of training, scored separately "
                          "(default: the ones training holds out)")
    evaluate.add_argument("--caption-beams", type=int,
                          help="beam width of caption decoding (1: greedy); default: the "
                               "service's GLIPV2_CAPTION_BEAMS default")
    evaluate.add_argument("--caption-length-penalty", type=float,
                          help="length normalisation of caption beam search; default: the "
                               "service's GLIPV2_CAPTION_LENGTH_PENALTY default")
    evaluate.add_argument("--caption-objects", action=argparse.BooleanOptionalAction,
                          default=True,
                          help="captions name the objects detection finds, left to right, "
                               "as the service does by default (GLIPV2_CAPTION_OBJECTS)")
    evaluate.add_argument("--out", help="write the metrics as JSON here")
    evaluate.set_defaults(func=_eval)

    calibrate = sub.add_parser(
        "calibrate", help="choose a model's default referring-segment threshold",
        description="Sweeps the score threshold of referring segments on a validation world "
                    "and picks the best gIoU (gRefCOCO: expressions naming nothing count 1 "
                    "when answered with no segment); --write stores it in the model's "
                    "config.json, where the service takes its default from.")
    calibrate.add_argument("--model", default="models/default", help="model folder")
    calibrate.add_argument("--n", type=int, default=100, help="validation images (100)")
    calibrate.add_argument("--seed", type=int,
                           help="validation world seed (default: calibrate.CALIBRATION_SEED, "
                                "neither training's nor eval's)")
    calibrate.add_argument("--score-agg", choices=SCORE_AGGREGATIONS,
                           help="how a phrase's score comes from its tokens' (default: the "
                                "model's postprocess.score_agg); stored with --write")
    calibrate.add_argument("--relations", choices=RELATION_MODES,
                           help="how directional relations are resolved (default: the model's "
                                "postprocess.relations); stored with --write")
    calibrate.add_argument("--write", action="store_true",
                           help="store the best thresholds in the model's config.json")
    calibrate.set_defaults(func=_calibrate)
