"""`glipv2 batch`: bulk inference over a folder, a table or a bucket of images on Ray Data
(`service.bulk`), resumable: rerun the same command to finish a stopped run."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cli.common import Subcommands
from engines.kinds import OrtProvider, Precision, RuntimeKind


def _run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.errors import ServiceError
    from service.settings import ServiceSettings

    try:
        from ray.exceptions import RayError

        from service.bulk.inputs import BulkInputError
        from service.bulk.output import BulkOutputError
        from service.bulk.run import BulkOptions, run_bulk
    except ImportError:  # the optional extra is not installed
        print("glipv2 batch needs Ray Data: pip install -e '.[ray]'", file=sys.stderr)
        return 2
    overrides = {key: value for key, value in {
        "model_dir": args.model, "runtime": args.runtime, "engine_dir": args.engines,
        "ort_provider": args.provider, "precision": args.precision, "threads": args.threads,
        "prompts_dir": args.prompts}.items() if value is not None}
    try:
        params = json.loads(args.params)
        if not isinstance(params, dict):
            raise ValueError("not a JSON object")
        settings = ServiceSettings(**overrides)  # flags over GLIPV2_* over the defaults
        min_actors, max_actors = actor_pool(args.actors)
        options = BulkOptions(
            batch_size=args.batch_size, min_actors=min_actors,
            max_actors=max_actors, num_cpus=args.num_cpus,
            num_gpus=args.num_gpus, rows_per_file=args.rows_per_file, jsonl=args.jsonl,
            progress=not args.no_progress)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"invalid --params or option: {exc}", file=sys.stderr)
        return 2

    try:
        summary = run_bulk(args.input, args.task, params, Path(args.output), settings, options,
                           address=args.address or os.environ.get("RAY_ADDRESS"))
    except ServiceError as exc:
        print(f"invalid --params: {exc.message}", file=sys.stderr)
        return 2
    except (BulkInputError, BulkOutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped; the answers so far are kept: run the same command to go on",
              file=sys.stderr)
        return 130
    except RayError as exc:  # e.g. an actor refused the parameters (a prompt_id it lacks)
        cause = [line for line in str(exc).splitlines() if line.strip()][-1:]
        print(f"the run failed (answers so far are kept): {''.join(cause)}", file=sys.stderr)
        return 1
    print(summary.format(), file=sys.stderr)
    return 0


def actor_pool(text: str) -> tuple[int, int | None]:
    """`--actors`: "N" (a pool of N), "MIN:MAX", or "MIN:" (up to as many as the cluster fits)."""
    low, colon, high = text.partition(":")
    return int(low), (int(high) if high else None) if colon else int(low)


def register(sub: Subcommands) -> None:
    """Add this group's commands to the `glipv2` parser."""
    batch = sub.add_parser("batch", help="bulk inference on Ray Data (resumable)")
    batch_sub = batch.add_subparsers(dest="batch_command", required=True)
    run = batch_sub.add_parser(
        "run", help="answer every image of a folder, table or bucket into Parquet",
        description="Run one task over every input of --input on a Ray Data actor pool and "
                    "write one row per input under --output: the online endpoint's JSON, or "
                    "the error object of a bad input. Rerunning the same command skips the "
                    "inputs that have a row: a stopped run (killed, even) finishes. The model "
                    "flags override their GLIPV2_* environment variables, as for serve.")
    run.add_argument("--input", required=True,
                     help="a folder of .png/.jpg/.jpeg/.webp images; a .parquet or .jsonl table "
                          "(or a folder of them) with a `path` (relative to the table) or "
                          "`image` (base64) column and an optional `id`; local, or a URI "
                          "(s3://, gs://, hdfs://)")
    run.add_argument("--task", required=True, choices=["detect", "segment", "vqa", "caption"])
    run.add_argument("--params", default="{}",
                     help="the task's fields as the endpoint takes them, as JSON, e.g. "
                          "'{\"classes\": [\"circle\", \"star\"]}'")
    run.add_argument("--output", required=True,
                     help="output folder: parquet/part-*.parquet (and results.jsonl)")
    run.add_argument("--jsonl", action="store_true",
                     help="also write OUTPUT/results.jsonl when the run ends")
    run.add_argument("--address",
                     help="Ray cluster (ray://HOST:10001 or HOST:6379; default: RAY_ADDRESS, "
                          "else a local Ray started here)")
    run.add_argument("--actors", default="1:",
                     help="actor pool size: N, or MIN:MAX (Ray Data autoscales between them), "
                          "or MIN: (up to as many as the cluster fits); default 1:")
    run.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor (default 1)")
    run.add_argument("--num-gpus", type=float, default=0.0,
                     help="GPUs per actor (default 0; 0.5: two actors share one)")
    run.add_argument("--batch-size", type=int, default=32,
                     help="inputs per actor call, in flight together (default 32)")
    run.add_argument("--rows-per-file", type=int, default=1000,
                     help="rows per Parquet part file: at most this many answers (or 30 s of "
                          "them) are lost when the run is killed (default 1000)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--model", help="model folder (default: GLIPV2_MODEL_DIR, else "
                                     "models/default); on a cluster, at this path on every node")
    run.add_argument("--runtime", choices=list(RuntimeKind), help="inference runtime "
                                                                  "(default pytorch)")
    run.add_argument("--engines", help="engine folder for onnxruntime / tensorrt")
    run.add_argument("--provider", choices=list(OrtProvider),
                     help="ONNX Runtime execution provider (default cpu)")
    run.add_argument("--precision", choices=list(Precision),
                     help="reduced precision of vision and fusion (default fp32)")
    run.add_argument("--threads", type=int,
                     help="intra-op threads per actor (default: Ray's, --num-cpus)")
    run.add_argument("--prompts", help="folder of tuned prompts (prompt_id)")
    run.set_defaults(func=_run)
