"""`glipv2`: the project's one command-line entry point."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path


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
    from model_export.data.world.generator import generate_world, parse_pairs

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
    from model_export.data.world.generator import HELD_OUT_PAIRS
    from model_export.evaluation.evaluate import TASKS, evaluate, format_table, write_report
    from service.offline import ServingPredictor
    from service.pipeline.caption_search import DEFAULT_SEARCH

    held_out = HELD_OUT_PAIRS if args.held_out is None else args.held_out
    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    if args.runtime == "pytorch" and not args.model:
        print("--model is required with the pytorch runtime", file=sys.stderr)
        return 2
    if args.runtime != "pytorch" and not args.engines:
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
        segment_threshold_sweep,
    )
    from service.offline import ServingPredictor

    predictor = ServingPredictor(TorchRuntime.from_dir(args.model))
    try:
        seed = CALIBRATION_SEED if args.seed is None else args.seed
        scores = segment_threshold_sweep(predictor, args.n, seed)
    finally:
        predictor.close()
    best = best_threshold(scores)
    print("threshold  mIoU   empty acc  gIoU")
    for s in scores:
        cells = [f"{v:.3f}" if v is not None else "-"
                 for v in (s.miou, s.empty_accuracy, s.giou)]
        print(f"{s.threshold:9.3f}  {cells[0]:5s}  {cells[1]:9s}  {cells[2]}"
              + ("  <- best" if s is best else ""))
    config = load_config(args.model)
    current = config.postprocess.segment_threshold
    if args.write:
        config.postprocess.segment_threshold = best.threshold
        print(f"{save_config(config, args.model)}: segment_threshold {current} -> "
              f"{best.threshold} (engines exported before this need re-exporting)")
    else:
        print(f"best {best.threshold} (the model has {current}; --write stores it)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from engines.export import export_model

    manifest = export_model(args.model, args.out, opset=args.opset,
                            progress=lambda name: print(f"exporting {name}", flush=True),
                            variants=args.variants.split(",") if args.variants else ())
    print(f"wrote {manifest}")
    return 0


def _build_engines(args: argparse.Namespace) -> int:
    from engines.runtimes import ManifestError, RuntimeUnavailableError
    from engines.tensorrt import build_engines

    try:
        manifest = build_engines(args.engines, graphs=args.graphs.split(","),
                                 fp16=not args.fp32, max_batch=args.max_batch,
                                 workspace_bytes=args.workspace_mb * 1024 * 1024,
                                 progress=lambda name: print(f"building {name}", flush=True))
    except (RuntimeUnavailableError, ManifestError) as exc:
        print(f"cannot build engines: {exc}", file=sys.stderr)
        return 2
    print(f"wrote engines into {manifest}")
    return 0


def _bench_runtimes(args: argparse.Namespace) -> int:
    from benchmarks.runtimes import bench_runtimes, format_result

    result = bench_runtimes(Path(args.model), Path(args.engines) if args.engines else None,
                            args.height, args.width, repeats=args.repeats, threads=args.threads,
                            profile=args.profile)
    print(format_result(result))
    return 0


def _bench_load(args: argparse.Namespace) -> int:
    from benchmarks.load import format_sweep, sweep

    if (args.url is None) != (args.unbatched_url is None):
        print("give both --url and --unbatched-url (two running servers), or neither",
              file=sys.stderr)
        return 2
    # Flags passed on to `glipv2 serve` as they are; --model and --max-batch-size go to `sweep`.
    serve_flags = {"--runtime": args.runtime, "--engines": args.engines,
                   "--threads": args.threads or None,
                   "--max-queue-delay-ms": args.max_queue_delay_ms}
    given = [flag for flag, value in {**serve_flags, "--model": args.model,
                                      "--max-batch-size": args.max_batch_size}.items()
             if value is not None]
    if args.url and given:
        print(f"{', '.join(given)} configure the servers this command starts; with --url the "
              "running servers keep their own settings", file=sys.stderr)
        return 2
    serve_args = [str(part) for flag, value in serve_flags.items() if value is not None
                  for part in (flag, value)]
    levels = [int(v) for v in args.concurrency.split(",")]
    on, off = sweep(levels, args.requests, max_batch_size=args.max_batch_size or 8,
                    distinct_images=args.images, model_dir=args.model, serve_args=serve_args,
                    urls=(args.url, args.unbatched_url) if args.url else None)
    print(format_sweep(on, off))
    return 0


def _bench_jobs(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from benchmarks.jobs import bench_jobs, format_phases
    from benchmarks.local_server import local_server

    server = nullcontext(args.url) if args.url else local_server(args.model)
    with server as url:
        alone, with_job = bench_jobs(url, args.requests, args.concurrency, args.job_images)
    print(format_phases(alone, with_job, args.concurrency))
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    from benchmarks.report import bench_report

    levels = tuple(int(v) for v in args.concurrency.split(","))
    path = bench_report(Path(args.out), args.model, args.engines, levels, args.requests,
                        runtimes=not args.no_runtimes)
    print(f"wrote {path}")
    return 0


def _jobs(args: argparse.Namespace) -> int:


    from service.jobs.client import JobClient, JobClientError, folder_images

    client = JobClient(args.url, api_key=args.api_key)
    try:
        if args.jobs_command == "submit":
            params = json.loads(args.params) if args.params else {}
            if args.classes:
                params["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
            files = folder_images(Path(args.folder))
            job = client.submit(args.task, params, [f.read_bytes() for f in files])
            print(f"job {job['id']}: {len(files)} images from {args.folder}", file=sys.stderr)
            if args.no_wait:
                print(job["id"])
                return 0
            job_id = job["id"]
        else:
            job_id = args.id
        cancel = args.jobs_command == "cancel"
        status = client.cancel(job_id) if cancel else client.wait(job_id)
        print(json.dumps(status, indent=2))
        if args.jobs_command != "cancel" and args.out:
            lines = client.save_results(job_id, Path(args.out))
            print(f"{lines} results in {args.out}", file=sys.stderr)
        return 0 if status["state"] in ("done", "cancelled") else 1
    except JobClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _serve(args: argparse.Namespace) -> int:
    import signal

    from pydantic import ValidationError

    from service.settings import ServiceSettings

    # Flags override environment variables (GLIPV2_*), which override the defaults.
    overrides: dict[str, object] = {
        key: value for key, value in {
            "host": args.host, "port": args.port, "model_dir": args.model,
            "runtime": args.runtime, "engine_dir": args.engines,
            "ort_provider": args.provider, "precision": args.precision, "threads": args.threads,
            "prompts_dir": args.prompts,
            "request_timeout_ms": args.request_timeout_ms,
        }.items() if value is not None
    }
    batcher = {
        key: value for key, value in {
            "max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
            "max_queue_size": args.max_queue_size,
        }.items() if value is not None
    }
    if batcher:
        overrides["batcher"] = batcher
    try:
        settings = ServiceSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        print(f"invalid serve settings:\n{exc}", file=sys.stderr)
        return 2
    model_dir = settings.model_dir
    if not (model_dir / "config.json").is_file():
        print(
            f"no model to serve at {model_dir} (no config.json there). Serve a model folder "
            "with --model DIR or GLIPV2_MODEL_DIR=DIR: the embedded default (models/default), a "
            "`glipv2 train` checkpoint folder, or a released GLIP checkpoint converted with "
            "`glipv2 convert`.",
            file=sys.stderr,
        )
        return 2

    import uvicorn

    from service.app import create_app

    def _terminated(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # uvicorn handles SIGTERM while it runs: it stops accepting, lets in-flight requests finish
    # (bounded by the graceful-shutdown timeout), then runs the lifespan shutdown, which drains
    # the batchers. Afterwards it re-raises the signal under the handler it found at start; this
    # one turns that (and a SIGTERM before uvicorn starts) into a clean exit 0 instead of death
    # by signal, so supervisors see a completed drain.
    signal.signal(signal.SIGTERM, _terminated)
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glipv2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    evaluate.add_argument("--runtime", choices=["pytorch", "onnxruntime", "tensorrt"],
                          default="pytorch",
                          help="what runs the service's path: pytorch on --model, or the "
                               "exported graphs in --engines")
    evaluate.add_argument("--engines", help="engine folder (glipv2 export)")
    evaluate.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                          help="ONNX Runtime execution provider")
    evaluate.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
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
    calibrate.add_argument("--write", action="store_true",
                           help="store the best threshold in the model's config.json")
    calibrate.set_defaults(func=_calibrate)

    export = sub.add_parser("export", help="export the engine graphs as ONNX + manifest")
    export.add_argument("--model", required=True, help="model folder")
    export.add_argument("--out", required=True, help="output folder, e.g. engines/NAME")
    export.add_argument("--opset", type=int, default=19, help="ONNX opset (DeformConv needs 19)")
    export.add_argument("--variants", default="",
                        help="reduced-precision variants of vision and fusion to add: int8")
    export.set_defaults(func=_export)

    engines = sub.add_parser(
        "build-engines", help="build TensorRT engines from an exported folder (GPU host)")
    engines.add_argument("--engines", required=True, help="engine folder (glipv2 export)")
    engines.add_argument("--graphs", default="vision,fusion",
                         help="graphs to build engines for; the rest run on ONNX Runtime")
    engines.add_argument("--fp32", action="store_true", help="no FP16 layers")
    engines.add_argument("--max-batch", type=int, default=8,
                         help="largest batch of the optimisation profiles")
    engines.add_argument("--workspace-mb", type=int, default=4096,
                         help="scratch GPU memory one layer may use")
    engines.set_defaults(func=_build_engines)

    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    runtimes = bench_sub.add_parser(
        "runtimes", help="each graph's latency on PyTorch fp32/bf16 and ONNX Runtime fp32/int8")
    runtimes.add_argument("--model", default="models/default", help="model folder (PyTorch)")
    runtimes.add_argument("--engines", help="exported engine folder (ONNX Runtime); export "
                                            "with --variants int8 to include int8")
    runtimes.add_argument("--height", type=int, default=288, help="padded image height")
    runtimes.add_argument("--width", type=int, default=448, help="padded image width")
    runtimes.add_argument("--repeats", type=int, default=5, help="timed runs per graph")
    runtimes.add_argument("--threads", type=int, default=0, help="compute threads (0: all)")
    runtimes.add_argument("--profile", action="store_true",
                          help="also split ONNX Runtime's vision and fusion time by operator type")
    runtimes.set_defaults(func=_bench_runtimes)
    load = bench_sub.add_parser(
        "load", help="closed-loop concurrency sweep, batcher on vs max_batch_size=1, as ratios")
    load.add_argument("--url", help="a running server with the batcher on (with --unbatched-url; "
                                    "default: start both servers here)")
    load.add_argument("--unbatched-url", help="a running server with --max-batch-size 1")
    load.add_argument("--model", help="model folder for the servers started here")
    load.add_argument("--runtime", choices=["pytorch", "onnxruntime", "tensorrt"],
                      help="runtime of the servers started here (default: serve's)")
    load.add_argument("--engines", help="engine folder for --runtime onnxruntime / tensorrt")
    load.add_argument("--threads", type=int, default=0, help="servers' intra-op threads")
    load.add_argument("--max-batch-size", type=int,
                      help="the batched server's max_batch_size (8)")
    load.add_argument("--max-queue-delay-ms", type=float,
                      help="the servers' max_queue_delay_ms (default: serve's)")
    load.add_argument("--concurrency", default="1,2,4,8,16,32", help="client counts to measure")
    load.add_argument("--requests", type=int, default=64, help="requests per level")
    load.add_argument("--images", type=int, default=16,
                      help="distinct world images cycled through (of varying sizes; 1: every "
                           "request the same image, so batches always share a shape)")
    load.set_defaults(func=_bench_load)
    jobs_bench = bench_sub.add_parser(
        "jobs", help="online p50/p90/p99 latency with and without a batch job running")
    jobs_bench.add_argument("--url", help="a running server (default: start one on --model)")
    jobs_bench.add_argument("--model", help="model folder for the server started here")
    jobs_bench.add_argument("--requests", type=int, default=80, help="online requests per phase")
    jobs_bench.add_argument("--concurrency", type=int, default=4, help="online clients")
    jobs_bench.add_argument("--job-images", type=int, default=500, help="images in the batch job")
    jobs_bench.set_defaults(func=_bench_jobs)
    report = bench_sub.add_parser(
        "report", help="run the benchmarks, write a Markdown report with PNG plots")
    report.add_argument("--out", default="docs/bench", help="report folder (docs/bench)")
    report.add_argument("--model", help="model folder (default: the embedded model)")
    report.add_argument("--engines", help="exported engines (default: export to a temp dir)")
    report.add_argument("--concurrency", default="1,2,4,8,16,32", help="client counts to measure")
    report.add_argument("--requests", type=int, default=64, help="requests per level")
    report.add_argument("--no-runtimes", action="store_true", help="skip the runtime section")
    report.set_defaults(func=_bench_report)

    jobs = sub.add_parser("jobs", help="batch jobs on a running server (/v1/jobs)")
    jobs.add_argument("--url", default="http://127.0.0.1:8000", help="server URL")
    jobs.add_argument("--api-key", default=os.environ.get("GLIPV2_API_KEY"),
                      help="API key (default: GLIPV2_API_KEY)")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    submit = jobs_sub.add_parser("submit", help="submit a folder of images, follow, save")
    submit.add_argument("folder", help="folder of .png/.jpg/.webp images (name order)")
    submit.add_argument("--task", required=True, choices=["detect", "segment", "vqa", "caption"])
    submit.add_argument("--classes", help="detect: comma-separated class names")
    submit.add_argument("--params", help="the task's other fields as JSON, e.g. "
                                         "'{\"threshold\": 0.3}'")
    submit.add_argument("--out", default="results.jsonl", help="results file (JSON Lines)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and exit")
    for name, text in (("wait", "follow a job and save its results"), ("cancel", "cancel a job")):
        command = jobs_sub.add_parser(name, help=text)
        command.add_argument("id", help="job id")
        if name == "wait":
            command.add_argument("--out", default="results.jsonl", help="results file")
    jobs.set_defaults(func=_jobs)

    serve = sub.add_parser(
        "serve", help="serve the model over HTTP",
        description="Serve a model over HTTP. Every flag overrides its GLIPV2_* environment "
                    "variable (service/settings.py documents all settings and defaults).")
    serve.add_argument("--model", help="model folder (default: GLIPV2_MODEL_DIR, else "
                                       "models/default of the repository)")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000)")
    serve.add_argument("--runtime", choices=["pytorch", "onnxruntime", "tensorrt"],
                       help="inference runtime (default pytorch)")
    serve.add_argument("--engines", help="engine folder for onnxruntime / tensorrt "
                                         "(glipv2 export)")
    serve.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"],
                       help="ONNX Runtime execution provider (default cpu)")
    serve.add_argument("--precision", choices=["fp32", "bf16", "int8"],
                       help="ONNX Runtime variant of vision and fusion (default fp32)")
    serve.add_argument("--threads", type=int, help="intra-op threads (default: one per core)")
    serve.add_argument("--prompts", help="folder of tuned prompts served as prompt_id "
                                         "(glipv2 tune-prompt)")
    serve.add_argument("--max-batch-size", type=int, help="most requests per engine batch (8)")
    serve.add_argument("--max-queue-delay-ms", type=float,
                       help="how long a partial batch waits for company (0)")
    serve.add_argument("--max-queue-size", type=int,
                       help="most waiting requests per engine before 429 (64)")
    serve.add_argument("--request-timeout-ms", type=float,
                       help="per-request deadline before 504 (30000)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
