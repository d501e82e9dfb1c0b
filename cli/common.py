"""What the command groups share: the type of the `glipv2` sub-command registry."""

from __future__ import annotations

import argparse

# argparse has no public name for what `add_subparsers` returns.
Subcommands = argparse._SubParsersAction  # type: ignore[type-arg]  # generic only in typeshed
