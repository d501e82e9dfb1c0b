"""`glipv2` commands of the service: serve, and jobs (a client of a running server)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cli.common import Subcommands
from engines.kinds import OrtProvider, Precision, RuntimeKind
from service.batching import BatcherConfig


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
            "request_timeout_ms": args.request_timeout_ms, "log_level": args.log_level,
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
    if args.ray:
        return _serve_ray(args, overrides)
    try:
        # Flags as given: pydantic validates them here (a bad value is exit 2, below).
        settings = ServiceSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        print(f"invalid serve settings:\n{exc}", file=sys.stderr)
        return 2
    if not _has_model(settings.model_dir):
        return 2

    from service.access_log import configure_logging
    from service.app import create_app
    from service.http_server import run_server

    def _terminated(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # While it serves, SIGTERM drains (`service.http_server`): /readyz and new requests answer
    # 503, the work in flight finishes (bounded by shutdown_timeout_s), then the server closes
    # and this returns 0. A SIGTERM before it serves, or a second one (which cuts the drain
    # short), is re-raised by uvicorn under the handler found at start: this one turns it into
    # a clean exit 0 instead of death by signal, so supervisors see an orderly stop.
    signal.signal(signal.SIGTERM, _terminated)
    configure_logging(settings.log_level)  # the access log's JSON lines (uvicorn's are off)
    return run_server(create_app(settings), settings, log_level=settings.log_level,
                      log_config=_log_config(settings.log_level))


def _has_model(model_dir: Path) -> bool:
    if (model_dir / "config.json").is_file():
        return True
    print(
        f"no model to serve at {model_dir} (no config.json there). Serve a model folder "
        "with --model DIR or GLIPV2_MODEL_DIR=DIR: the embedded default (models/default), a "
        "`glipv2 train` checkpoint folder, or a released GLIP checkpoint converted with "
        "`glipv2 convert`.",
        file=sys.stderr,
    )
    return False


def _serve_ray(args: argparse.Namespace, overrides: dict[str, object]) -> int:
    """The Serve config's application with the flags over its settings, on the Ray cluster at
    --ray-address (else a local one started here), until SIGINT or SIGTERM."""
    import signal
    import threading

    from pydantic import ValidationError

    from service.settings import ServiceSettings

    try:
        from service.distributed.app import APP_NAME, DEFAULT_CONFIG, application, read_config
        from service.distributed.serve_env import apply_serve_env
    except ImportError:  # the optional extra is not installed
        print("--ray needs Ray Serve: pip install -e '.[ray]'", file=sys.stderr)
        return 2
    try:
        config = read_config(Path(args.ray_config) if args.ray_config else DEFAULT_CONFIG)
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        print(f"invalid Serve config: {exc}", file=sys.stderr)
        return 2
    host = overrides.pop("host", config.host)
    port = overrides.pop("port", config.port)
    settings = {**config.settings, **overrides}
    try:
        checked = ServiceSettings(**settings)  # what each replica will build, checked here
    except ValidationError as exc:
        print(f"invalid serve settings:\n{exc}", file=sys.stderr)
        return 2
    try:  # Serve checks every deployment option as it binds them (no cluster needed)
        app = application(settings, config.deployments)
    except (TypeError, ValueError) as exc:
        print(f"invalid Serve config: {exc}", file=sys.stderr)
        return 2
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address is None and not _has_model(checked.model_dir):  # a cluster's replicas may
        return 2  # have the model where this host has not

    import ray
    from ray import serve

    if address is None:  # a Ray started here: its processes inherit Serve's request path setup
        apply_serve_env()
    ray.init(address=address or "local")  # "local": a new one, never another's cluster
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(proxy_location=config.proxy_location,
                    http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix=config.route_prefix)
        print(f"serving on http://{host}:{port}{config.route_prefix} (Ray Serve; "
              "Ctrl-C to stop)", file=sys.stderr)
        stop.wait()
    finally:
        serve.delete(APP_NAME)  # replicas drain (graceful_shutdown_timeout_s)
        if address is None:
            serve.shutdown()
            ray.shutdown()
    return 0


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, with the service's and the engines' loggers on its console handler:
    without them their lines (the model loading, a first start's ONNX export) go nowhere.
    uvicorn's access log is off: the app writes its own (`service.access_log`)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"] |= {name: {"handlers": ["default"], "level": level.upper(),
                                 "propagate": False} for name in ("service", "engines")}
    config["loggers"]["uvicorn.access"] = {"handlers": [], "propagate": False}
    return config


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


def register(sub: Subcommands) -> None:
    """Add this group's commands to the `glipv2` parser."""
    serve = sub.add_parser(
        "serve", help="serve the model over HTTP",
        description="Serve a model over HTTP. Every flag overrides its GLIPV2_* environment "
                    "variable (service/settings.py documents all settings and defaults).")
    serve.add_argument("--model", help="model folder (default: GLIPV2_MODEL_DIR, else "
                                       "models/default of the repository)")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000)")
    serve.add_argument("--runtime", choices=list(RuntimeKind),
                       help="inference runtime (default pytorch; `make serve`: onnxruntime)")
    serve.add_argument("--engines", help="engine folder for onnxruntime / tensorrt (glipv2 "
                                         "export); without it onnxruntime serves an export "
                                         "of --model made once, cached in "
                                         "GLIPV2_ENGINE_CACHE_DIR (default var/engines/)")
    serve.add_argument("--provider", choices=list(OrtProvider),
                       help="ONNX Runtime execution provider (default cpu)")
    serve.add_argument("--precision", choices=list(Precision),
                       help="ONNX Runtime variant of vision and fusion (default fp32)")
    serve.add_argument("--threads", type=int, help="intra-op threads (default: one per core)")
    serve.add_argument("--prompts", help="folder of tuned prompts served as prompt_id "
                                         "(glipv2 tune-prompt)")
    serve.add_argument("--max-batch-size", type=int,
                       help=f"most requests per engine batch ({BatcherConfig.max_batch_size})")
    serve.add_argument("--max-queue-delay-ms", type=float,
                       help="how long a partial batch waits for company "
                            f"({BatcherConfig.max_queue_delay_ms:g})")
    serve.add_argument("--max-queue-size", type=int,
                       help="most waiting requests per engine before 429 "
                            f"({BatcherConfig.max_queue_size})")
    serve.add_argument("--request-timeout-ms", type=float,
                       help="per-request deadline before 504 (default: GLIPV2_REQUEST_TIMEOUT_MS "
                            "or its default)")
    serve.add_argument("--ray", action="store_true",
                       help="serve on Ray Serve: ingress replicas in front of engine replicas "
                            "(GPUs, autoscaling), as --ray-config describes them")
    serve.add_argument("--ray-config", help="Serve config file (default docker/ray/serve.yaml); "
                                            "the flags here override its settings and HTTP "
                                            "address")
    serve.add_argument("--ray-address", help="Ray cluster to deploy to (default: RAY_ADDRESS, "
                                             "else a local Ray started here)")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                       help="level of the service's logs; the JSON access log is at info "
                            "(default: GLIPV2_LOG_LEVEL, else info)")
    serve.set_defaults(func=_serve)

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
