"""``klock backup``: a consistent copy of a journal, also while ``klock serve`` writes it.

Copying the ``.db`` file alone is not a backup: committed leases and fencing tokens may still be
in its ``-wal`` file, and a server started from such a copy would hand out tokens again. This
command uses SQLite's online backup API (:func:`klock_async.journal.backup`).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the arguments of ``klock backup``."""
    parser.add_argument("source", help="the journal (the --db of klock serve)")
    parser.add_argument("target", help="a new file for the copy")


def run(args: argparse.Namespace) -> int:
    """Copy the journal; return the exit status (2 with one line on stderr on failure)."""
    from klock_async.errors import KlockError
    from klock_async.journal import backup

    try:
        backup(args.source, args.target)
    except (KlockError, sqlite3.Error, OSError) as exc:
        print(f"klock backup: {exc}", file=sys.stderr)
        return 2
    print(f"klock backup: {args.source} copied to {args.target}")
    return 0
