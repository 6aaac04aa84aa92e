"""Tests for ``klock demo`` (``python -m klock_async demo``), run as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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
    result = demo(*SMALL)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("MARC, the Multi-Agent Race Condition")
    assert "4 agents each make 3 edits to 2 shared files" in out
    assert re.search(r"^mode +intended +lost +lost % +makespan +vs mode 4", out, re.M)
    for mode in Mode:
        assert re.search(rf"^{re.escape(mode.label)} +12 +\d+ ", out, re.M), mode
    assert re.search(r"^3\. SERIALIZABLE sessions +12 +0 +0\.0 %", out, re.M)
    assert re.search(r"^4\. one global lock +12 +0 +0\.0 % .* 1\.00x", out, re.M)
    verdicts = [line for line in out.splitlines() if line.startswith("Verdict: ")]
    assert len(verdicts) == 1
    assert "with SERIALIZABLE sessions 0 were lost" in verdicts[0]
    assert result.stderr == ""  # lease events are not shown by default


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
    ],
)
def test_demo_refuses_bad_options(args: list[str], message: str) -> None:
    """A bad option exits with status 2 and says which option and why; nothing runs."""
    result = demo(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
