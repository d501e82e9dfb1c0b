"""`glipv2`: the project's one command-line entry point.

Each group of commands lives in its own module and registers itself, as the app composes its
routers: `cli.model` (convert, detect, world, train, tune-prompt, eval, calibrate),
`cli.engines` (export, build-engines), `cli.serving` (serve, jobs), `cli.batch` (batch run:
bulk inference on Ray Data) and `cli.bench`.
Handlers import what they run when they run, so `glipv2 --help` starts at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cli import batch, bench, engines, model, serving


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glipv2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (model, engines, bench, serving, batch):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
