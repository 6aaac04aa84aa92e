"""Tests for ``klock demo`` (``python -m klock_async demo``), run as a user runs it."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from klock_async.demo import ProgressLine
from klock_async.marc import Mode

SMALL = ["--agents", "4", "--files", "2", "--edits", "3"]


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "klock_async", "demo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_demo_prints_the_table_and_a_verdict() -> None:
    """The demo explains, prints one row per mode and a verdict, and exits 0."""
    result = demo(*SMALL, "--progress", "never")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("MARC, the Multi-Agent Race Condition")
    assert "4 agents each make 3 edits to 2 shared files" in out
    assert re.search(
        r"^mode +intended +lost +lost % +makespan +vs mode 4 +redone +deaths +violations$",
        out,
        re.M,
    )
    for mode in Mode:
        assert re.search(rf"^{re.escape(mode.label)} +12 +\d+ ", out, re.M), mode
    assert re.search(r"^3\. SERIALIZABLE sessions +12 +0 +0\.0 %", out, re.M)
    assert re.search(r"^4\. one global lock +12 +0 +0\.0 % .* 1\.00x", out, re.M)
    assert re.search(r"^5\. edits declared up front +12 +0 +0\.0 % .* 0 +\d+ +0$", out, re.M)
    verdicts = [line for line in out.splitlines() if line.startswith("Verdict: ")]
    assert len(verdicts) == 1
    assert "with SERIALIZABLE sessions no edit was lost" in verdicts[0]
    assert "with edits declared up front no edit was lost and none redone" in verdicts[0]
    assert result.stderr == ""  # lease events are not shown by default


def test_demo_explains_its_columns() -> None:
    """After the table, each column gets one line saying what it counts."""
    out = demo(*SMALL).stdout
    legend = out[out.index("Columns:\n") :].splitlines()[1:8]
    names = [re.split(r" {2,}", line.strip())[0] for line in legend]
    assert names == ["intended", "lost", "makespan", "vs mode 4", "redone", "deaths", "violations"]


def test_demo_shows_progress_on_stderr_only() -> None:
    """With --progress always, each mode's progress goes to stderr; stdout is the same report."""
    quiet = demo(*SMALL, "--progress", "never")
    shown = demo(*SMALL, "--progress", "always")
    assert shown.returncode == quiet.returncode == 0, shown.stderr
    assert quiet.stderr == ""
    for mode in Mode:
        assert f"{mode.label}: running, " in shown.stderr, mode
        finished = rf"^{re.escape(mode.label)}: 12 edits done in [\d.]+ s$"
        assert re.search(finished, shown.stderr, re.M), mode

    def report(out: str) -> list[str]:  # the lines that do not hold measured figures
        return [line for line in out.splitlines() if not re.match(r"^\d\. |Verdict: ", line)]

    assert report(shown.stdout) == report(quiet.stdout)


def test_progress_line_keeps_one_terminal_line_up_to_date() -> None:
    """On a terminal the progress is one line redrawn in place, ended when the mode is done."""
    controller, terminal = os.openpty()
    with os.fdopen(controller, "rb", buffering=0) as screen:
        with os.fdopen(terminal, "w") as stream:
            progress = ProgressLine(stream, 2)
            for done in (0, 1, 2):
                progress(Mode.SERIALIZABLE, done)
            progress.close()
        received = b""
        while True:  # everything written, up to the end of the closed terminal
            try:
                chunk = screen.read(4096)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            received += chunk
    shown = received.decode()
    assert "\r\x1b[2K3. SERIALIZABLE sessions: 0 of 2 edits" in shown
    assert re.search(r"3\. SERIALIZABLE sessions: done in [\d.]+ s\r?\n$", shown)


def test_progress_line_waits_for_its_delay() -> None:
    """Before its delay has passed, the progress line writes nothing."""
    stream = io.StringIO()
    progress = ProgressLine(stream, 2, after=3600.0)
    for done in (0, 1, 2):
        progress(Mode.GLOBAL_LOCK, done)
    progress.close()
    assert stream.getvalue() == ""


def test_demo_log_level_shows_refused_stale_writes() -> None:
    """With --log-level warning, each stale write refused in mode 3 is logged on stderr."""
    result = demo(*SMALL, "--log-level", "warning")
    assert result.returncode == 0, result.stderr
    assert "write.refused" in result.stderr
    assert "lease.granted" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--agents", "0"], "--agents: must be at least 1", id="no-agents"),
        pytest.param(["--files", "two"], "--files: expected a whole number", id="word"),
        pytest.param(["--edits", "-3"], "--edits: must be at least 1", id="negative"),
        pytest.param(["--seed", "x"], "--seed: invalid int value", id="seed"),
        pytest.param(["--log-level", "loud"], "--log-level: invalid choice", id="log-level"),
        pytest.param(["--progress", "sometimes"], "--progress: invalid choice", id="progress"),
    ],
)
def test_demo_refuses_bad_options(args: list[str], message: str) -> None:
    """A bad option exits with status 2 and says which option and why; nothing runs."""
    result = demo(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
