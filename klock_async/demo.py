"""``klock demo``: agents losing each other's edits, then not, in a few seconds.

Runs the MARC simulation (:mod:`klock_async.marc`) at a small size and prints a short
explanation, the table of the five modes, what its columns mean and a one-line verdict.
Progress goes to stderr, so stdout holds only the report. No model, no network.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
import time
from typing import TextIO

from klock_async.logging import configure
from klock_async.marc import (
    Mode,
    Scenario,
    explain_columns,
    format_table,
    run_all,
    verdict,
)

__all__ = ["ProgressLine", "add_arguments", "run"]

_LOG_LEVELS = ("debug", "info", "warning", "error")

PROGRESS_AFTER = 2.0
"""Seconds after which ``--progress auto`` starts reporting progress on stderr."""

SAFE_MODES = (Mode.SERIALIZABLE, Mode.GLOBAL_LOCK, Mode.DECLARED_UP_FRONT)
"""The modes that must lose no edit."""


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the demo's options on its subcommand parser.

    Args:
        parser: the ``demo`` subcommand's parser.
    """
    parser.add_argument("--agents", type=_count, default=6, help="concurrent agents (default 6)")
    parser.add_argument("--files", type=_count, default=3, help="shared files (default 3)")
    parser.add_argument("--edits", type=_count, default=5, help="edits per agent (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plan (default 0)")
    parser.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default="error",
        help=(
            "kernel log events to show on stderr (default error; warning adds one line per "
            "stale write refused in mode 3, info every lease)"
        ),
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help=(
            "progress of each mode on stderr: auto once the run takes longer than "
            f"{PROGRESS_AFTER:g} s (default), always, or never; stdout keeps only the report"
        ),
    )


class ProgressLine:
    """Progress of the modes on a text stream (stderr), never on stdout.

    On a terminal it keeps one line up to date (``3. SERIALIZABLE sessions: 412 of 1000
    edits``); elsewhere (a pipe, a log file) it writes a line when it first sees a mode running
    and one when the mode has finished. With a delay
    it stays silent until that many seconds have passed since it was created, so short runs
    print nothing.

    Args:
        stream: where to write.
        intended: edits per mode.
        after: seconds before anything is shown (0: at once).
    """

    def __init__(self, stream: TextIO, intended: int, *, after: float = 0.0) -> None:
        self._stream = stream
        self._intended = intended
        self._tty = stream.isatty()
        self._start = time.monotonic()
        self._after = after
        self._mode_started = self._start
        self._last_draw = 0.0
        self._drawn = False
        self._announced: Mode | None = None

    def __call__(self, mode: Mode, done: int) -> None:
        """Report that ``done`` edits of ``mode`` are finished (0: the mode starts)."""
        now = time.monotonic()
        if done == 0:
            self._mode_started = now
        if now - self._start < self._after:
            return
        if self._tty:
            if done == self._intended or now - self._last_draw >= 0.1:
                self._last_draw = now
                self._draw(f"{mode.label}: {done} of {self._intended} edits")
            if done == self._intended:
                self._draw(f"{mode.label}: done in {now - self._mode_started:.1f} s")
                self._stream.write("\n")
                self._drawn = False
        elif done == self._intended:
            self._stream.write(
                f"{mode.label}: {done} edits done in {now - self._mode_started:.1f} s\n"
            )
            self._announced = mode
        elif self._announced is not mode:
            self._stream.write(f"{mode.label}: running, {done} of {self._intended} edits done\n")
            self._announced = mode
        self._stream.flush()

    def _draw(self, text: str) -> None:
        self._stream.write(f"\r\x1b[2K{text}")  # carriage return, clear the line
        self._drawn = True

    def close(self) -> None:
        """End an unfinished terminal line."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def _introduction(scenario: Scenario) -> str:
    story = (
        f"{scenario.agents} agents each make {scenario.edits} edits to {scenario.files} shared "
        "files. Every edit is two tool calls, as a coding agent makes them: read_file, think "
        "(a few milliseconds here), then write_file with the whole new content plus one marker "
        "line. When another agent writes the file in between, the later write silently "
        "replaces it: both calls succeeded, yet an edit is gone. The markers left at the end "
        "show how many edits survived."
    )
    return f"""\
MARC, the Multi-Agent Race Condition

{textwrap.fill(story, width=88)}

The same seeded plan (seed {scenario.seed}) runs five ways:
  {Mode.NO_COORDINATION.label}: tool calls go straight to the files;
  {Mode.PER_CALL_LEASES.label}: read under CONSUMES, write under MUTATES, one lease per call;
  {Mode.SERIALIZABLE.label}: the same leases plus vector clocks; a write of a version the
     agent never read is refused, so the agent re-reads and redoes the edit;
  {Mode.GLOBAL_LOCK.label}: one lock held around every whole edit (correct but serial);
  {Mode.DECLARED_UP_FRONT.label}: each edit takes MUTATES on its file before reading it and
     keeps it through the write (read for update): nothing to refuse, nothing to redo.
"""


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed options; return the exit status.

    Args:
        args: options from :func:`add_arguments`.

    Returns:
        0 when no safe mode (SERIALIZABLE sessions, the global lock, edits declared up front)
        lost an edit, else 1.
    """
    configure(args.log_level)
    scenario = Scenario(agents=args.agents, files=args.files, edits=args.edits, seed=args.seed)
    print(_introduction(scenario), flush=True)
    progress = None
    if args.progress != "never":
        after = PROGRESS_AFTER if args.progress == "auto" else 0.0
        progress = ProgressLine(sys.stderr, scenario.intended, after=after)
    try:
        results = asyncio.run(run_all(scenario, progress=progress))
    finally:
        if progress is not None:
            progress.close()
    print(format_table(results))
    print()
    print("Columns:")
    print(explain_columns())
    print()
    print(f"Verdict: {verdict(results)}")
    safe = [r for r in results if r.mode in SAFE_MODES]
    return 0 if all(r.lost == 0 for r in safe) else 1
