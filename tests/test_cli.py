"""Tests for klock_async.cli: --version, and bad values as one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from klock_async import __version__


def _klock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "klock_async", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version_prints_the_package_version() -> None:
    """klock --version prints the package's version and exits 0."""
    result = _klock("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"klock {__version__}")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(("serve", "--port", "99999"), "99999 is not a port", id="port-too-high"),
        pytest.param(("serve", "--port", "-1"), "-1 is not a port", id="port-negative"),
        pytest.param(("serve", "--port", "http"), "not a port number", id="port-not-a-number"),
        pytest.param(("serve", "--log-level", "bogus"), "unknown log level", id="log-level"),
        pytest.param(("serve", "--max-body", "0"), "must be at least 1", id="max-body"),
        pytest.param(("serve", "--token", ""), "--token: must not be empty", id="empty-token"),
        pytest.param(("mcp", "--local-port", "70000"), "70000 is not a port", id="mcp-port"),
        pytest.param(("mcp", "--log-level", "loud"), "unknown log level", id="mcp-log-level"),
        pytest.param(("status", "--token", ""), "must not be empty", id="status-token"),
        pytest.param(("status", "--server", "ftp://x"), "http(s) URL", id="status-url"),
        pytest.param(("frobnicate",), "invalid choice", id="unknown-command"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(args: tuple[str, ...], says: str) -> None:
    """A bad value is refused with one line on stderr and exit status 2, no traceback."""
    result = _klock(*args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert says in lines[0]
    assert lines[0].startswith("klock")
