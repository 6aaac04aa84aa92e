"""The ``klock`` command: ``demo``, ``serve``, ``mcp``, ``backup``, ``hook``, ``init``,
``status`` and ``top``.

Each subcommand lives in its own module and registers its arguments here; optional parts are
imported only when their subcommand runs, with a clear message when their extra is missing.
A bad value is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hook command)
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = ["log_level", "main", "nonempty", "port", "positive_int"]

# subcommand -> (module, extra that provides its dependencies, one-line help)
_COMMANDS = {
    "demo": ("klock_async.demo", None, "show agents losing edits without klock, and not with it"),
    "serve": ("klock_async.server", "server", "run the coordination server (HTTP + journal)"),
    "mcp": ("klock_async.integrations.mcp", "mcp", "run the MCP server for coding agents"),
    "hook": ("klock_async.hook_command", None, "answer a coding agent's hook event (stdin)"),
    "init": ("klock_async.init_command", None, "install the hooks in a coding agent's settings"),
    "backup": ("klock_async.backup", None, "copy a journal safely, also while a server uses it"),
    "status": ("klock_async.status", "server", "show a server's agents, leases and waiters"),
    "top": ("klock_async.status", "server", "the same view as status, kept live"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``klock serve: --port: ...``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 0 (any free) to 65535")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def log_level(text: str) -> str:
    """An argparse type: debug, info, warning or error (any case)."""
    if text.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}: use debug, info, warning or error"
        )
    return text.lower()


def nonempty(text: str) -> str:
    """An argparse type: any text but the empty string."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``klock`` command line; return the exit status."""
    from klock_async import __version__

    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(
        prog="klock", description="klock_async: a coordination kernel for multi-agent AI systems"
    )
    parser.add_argument("--version", action="version", version=f"klock {__version__}")
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
