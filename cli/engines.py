"""`glipv2` commands that build engines: export (ONNX + manifest), build-engines (TensorRT)."""

from __future__ import annotations

import argparse
import sys

from cli.common import Subcommands


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


def register(sub: Subcommands) -> None:
    """Add this group's commands to the `glipv2` parser."""
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
