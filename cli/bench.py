"""`glipv2 bench`: the benchmarks, each printing ratios measured side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import Subcommands
from engines.kinds import RuntimeKind
from service.batching import BatcherConfig


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
    names = args.labels.split(",") if args.labels else None
    if names is not None and (args.url is None or len(names) != 2):
        print("--labels names the two running servers: --labels FIRST,SECOND with --url and "
              "--unbatched-url", file=sys.stderr)
        return 2
    labels = (names[0], names[1]) if names is not None else None
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
    max_batch_size = args.max_batch_size or BatcherConfig.max_batch_size
    on, off = sweep(levels, args.requests, max_batch_size=max_batch_size,
                    distinct_images=args.images, model_dir=args.model, serve_args=serve_args,
                    urls=(args.url, args.unbatched_url) if args.url else None,
                    labels=labels)
    print(format_sweep(on, off, compared=labels is not None))
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


def _bench_batch(args: argparse.Namespace) -> int:
    from benchmarks.batch import bench_batch, format_batch
    from cli.batch import actor_pool
    from service.bulk.run import BulkOptions

    min_actors, max_actors = actor_pool(args.actors)
    options = BulkOptions(batch_size=args.batch_size, min_actors=min_actors,
                          max_actors=max_actors, num_cpus=args.num_cpus, progress=False)
    print(format_batch(bench_batch(args.images, args.model, args.runtime, args.engines,
                                   args.threads, options)))
    return 0


def _bench_job_replicas(args: argparse.Namespace) -> int:
    from benchmarks.job_replicas import bench_job_replicas, format_replicas

    serve_args = [str(part) for flag, value in (("--runtime", args.runtime),
                                                 ("--threads", args.threads))
                  if value is not None for part in (flag, value)]
    bench = bench_job_replicas(args.database_url, args.job_images, args.lease_timeout_s,
                               model_dir=args.model, serve_args=serve_args, rounds=args.rounds)
    print(format_replicas(bench))
    return 0


def _started_server_args(args: argparse.Namespace) -> list[str] | None:
    """`glipv2 serve` flags for the server a bench starts (`--runtime`, `--engines`), or None
    (said why) when they come with `--url`, whose running server keeps its own settings."""
    serve_args = [str(part) for flag, value in (("--runtime", args.runtime),
                                                 ("--engines", args.engines))
                  if value is not None for part in (flag, value)]
    if args.url and (serve_args or args.model):
        print("--model, --runtime and --engines configure the server this command starts; "
              "with --url the running server keeps its own settings", file=sys.stderr)
        return None
    return serve_args


def _bench_captions(args: argparse.Namespace) -> int:
    from benchmarks.captions import bench_captions, format_captions

    serve_args = _started_server_args(args)
    if serve_args is None:
        return 2
    levels = [int(v) for v in args.concurrency.split(",")]
    bench = bench_captions(levels, args.requests, model_dir=args.model, serve_args=serve_args,
                           url=args.url, baseline_url=args.baseline_url,
                           mixed_clients=args.mixed_clients, mixed_requests=args.mixed_requests)
    print(format_captions(bench))
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from benchmarks.soak import bench_soak, format_drain, format_soak

    serve_args = _started_server_args(args)
    if serve_args is None:
        return 2
    minutes, drain = bench_soak(args.minutes, args.concurrency, model_dir=args.model,
                                serve_args=serve_args, url=args.url)
    print(format_soak(minutes, args.concurrency))
    if drain is not None:
        print(format_drain(drain))
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    from benchmarks.report import bench_report

    levels = tuple(int(v) for v in args.concurrency.split(","))
    path = bench_report(Path(args.out), args.model, args.engines, levels, args.requests,
                        runtimes=not args.no_runtimes)
    print(f"wrote {path}")
    return 0


def register(sub: Subcommands) -> None:
    """Add this group's commands to the `glipv2` parser."""
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
    load.add_argument("--labels", help="FIRST,SECOND: the --url and --unbatched-url servers are "
                                       "any two to compare (e.g. 'ray serve,single process'); "
                                       "the report gives FIRST's p50 at 1 client and "
                                       "throughput at 16 clients as ratios to SECOND's")
    load.add_argument("--model", help="model folder for the servers started here")
    load.add_argument("--runtime", choices=list(RuntimeKind),
                      help="runtime of the servers started here (default: serve's)")
    load.add_argument("--engines", help="engine folder for --runtime onnxruntime / tensorrt")
    load.add_argument("--threads", type=int, default=0, help="servers' intra-op threads")
    load.add_argument("--max-batch-size", type=int,
                      help="the batched server's max_batch_size "
                           f"({BatcherConfig.max_batch_size})")
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
    batch_bench = bench_sub.add_parser(
        "batch", help="images/s of glipv2 batch run (Ray Data) vs a /v1/jobs job, same images")
    batch_bench.add_argument("--images", type=int, default=500, help="world images (500)")
    batch_bench.add_argument("--model", help="model folder (both sides)")
    batch_bench.add_argument("--runtime", choices=list(RuntimeKind),
                             help="runtime of both sides (default: serve's)")
    batch_bench.add_argument("--engines", help="engine folder for --runtime onnxruntime")
    batch_bench.add_argument("--threads", type=int,
                             help="compute threads of the server and of each actor (default: "
                                  "the server one per core, an actor its --num-cpus)")
    batch_bench.add_argument("--actors", default="1:",
                             help="actor pool size, N, MIN:MAX or MIN: (as many as fit)")
    batch_bench.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor")
    batch_bench.add_argument("--batch-size", type=int, default=32, help="inputs per actor call")
    batch_bench.set_defaults(func=_bench_batch)
    replicas = bench_sub.add_parser(
        "job-replicas", help="one batch job's inputs/s on 1 vs 2 replicas sharing PostgreSQL, "
                             "and the time to reclaim a killed replica's leases")
    replicas.add_argument("--database-url", required=True,
                          help="postgresql:// URL of a database the servers share (it keeps "
                               "the benchmark's jobs)")
    replicas.add_argument("--model", help="model folder for the servers started here")
    replicas.add_argument("--runtime", choices=list(RuntimeKind),
                          help="their runtime (default: the serve default)")
    replicas.add_argument("--threads", type=int, help="compute threads per server")
    replicas.add_argument("--job-images", type=int, default=200, help="images in the job")
    replicas.add_argument("--lease-timeout-s", type=float, default=30.0,
                          help="GLIPV2_JOB_LEASE_TIMEOUT_S of the servers")
    replicas.add_argument("--rounds", type=int, default=2,
                          help="1-then-2-replica rounds (the ratio uses their means)")
    replicas.set_defaults(func=_bench_job_replicas)
    captions = bench_sub.add_parser(
        "captions", help="caption throughput under concurrency (vs a baseline server), mixed "
                         "traffic statuses")
    captions.add_argument("--url", help="a running server (default: start one here)")
    captions.add_argument("--baseline-url", help="a running server to compare with, level by "
                                                 "level (e.g. an earlier version)")
    captions.add_argument("--model", help="model folder for the server started here")
    captions.add_argument("--runtime", choices=list(RuntimeKind),
                          help="runtime of the server started here (default: serve's)")
    captions.add_argument("--engines", help="engine folder for --runtime onnxruntime")
    captions.add_argument("--concurrency", default="1,4,8,12", help="caption clients per level")
    captions.add_argument("--requests", type=int, default=24, help="captions per level")
    captions.add_argument("--mixed-clients", type=int, default=12,
                          help="clients of the mixed-traffic phase")
    captions.add_argument("--mixed-requests", type=int, default=48,
                          help="requests of the mixed-traffic phase (the four tasks in turn)")
    captions.set_defaults(func=_bench_captions)
    soak = bench_sub.add_parser(
        "soak", help="mixed-task load for minutes: errors by status, RSS and p99 drift")
    soak.add_argument("--url", help="a running server (default: start one here)")
    soak.add_argument("--model", help="model folder for the server started here")
    soak.add_argument("--runtime", choices=list(RuntimeKind),
                      help="runtime of the server started here (default: serve's)")
    soak.add_argument("--engines", help="engine folder for --runtime onnxruntime")
    soak.add_argument("--minutes", type=float, default=10.0, help="how long to load it")
    soak.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    soak.set_defaults(func=_bench_soak)
    report = bench_sub.add_parser(
        "report", help="run the benchmarks, write a Markdown report with PNG plots")
    report.add_argument("--out", default="docs/bench", help="report folder (docs/bench)")
    report.add_argument("--model", help="model folder (default: the embedded model)")
    report.add_argument("--engines", help="exported engines (default: export to a temp dir)")
    report.add_argument("--concurrency", default="1,2,4,8,16,32", help="client counts to measure")
    report.add_argument("--requests", type=int, default=64, help="requests per level")
    report.add_argument("--no-runtimes", action="store_true", help="skip the runtime section")
    report.set_defaults(func=_bench_report)
