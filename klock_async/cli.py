"""The ``klock`` command: ``demo``, ``serve``, ``mcp``, ``backup``, ``hook`` and ``init``.

Each subcommand lives in its own module and registers its arguments here; optional parts are
imported only when their subcommand runs, with a clear message when their extra is missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# subcommand -> (module, extra that provides its dependencies, one-line help)
_COMMANDS = {
    "demo": ("klock_async.demo", None, "show agents losing edits without klock, and not with it"),
    "serve": ("klock_async.server", "server", "run the coordination server (HTTP + journal)"),
    "mcp": ("klock_async.integrations.mcp", "mcp", "run the MCP server for coding agents"),
    "hook": ("klock_async.hook_command", None, "answer a coding agent's hook event (stdin)"),
    "init": ("klock_async.init_command", None, "install the hooks in a coding agent's settings"),
    "backup": ("klock_async.backup", None, "copy a journal safely, also while a server uses it"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``klock`` command line; return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="klock", description="klock_async: a coordination kernel for multi-agent AI systems"
    )
    # prog given: argparse would otherwise build a help formatter (and import shutil) to find it
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog="klock")
    # Only the chosen subcommand's module is imported: `klock serve` must not load the MCP SDK.
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    for name, (module_name, extra, help_text) in _COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            cmd.set_defaults(_missing=(exc, extra))
            continue
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    args = parser.parse_args(args_list)
    missing_info = getattr(args, "_missing", None)
    if missing_info is not None:
        error, extra = missing_info
        hint = f" (pip install 'klock-async[{extra}]')" if extra else ""
        parser.exit(2, f"klock {args.command}: a dependency is missing: {error}{hint}\n")
    status: int = args._run(args)
    return status
