"""Every benchmark script in benchmarks/ runs with ``--quick`` and prints its table.

No timing is asserted: the figures depend on the machine. This only keeps the scripts working.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    path for path in (ROOT / "benchmarks").glob("*.py") if not path.name.startswith("_")
)  # _serving.py: what the scripts share

# script -> the rows its table must print
ROWS = {
    "contention.py": (
        "agents  implementation",
        "     5  asyncio.Lock",
        "     5  klock",
        "   100  klock",
        "rate at 100 agents / rate at 5 agents: klock",
        "targets:",
    ),
    "kernel.py": (
        "(a) floor: asyncio queue + future round trip",
        "Scheduler round trip doing no work",
        "(b) acquire+release, facade",
        "acquire+release, Scheduler direct",
        "(c) throughput, 100 agents, distinct files",
        "(d) hand-off: release -> waiter running",
        "(e) acquire+release, 100 other leases",
        "acquire+release, 2,000 other leases",
        "(f) acquire+release, logging unconfigured",
        "acquire+release, an events() reader",
    ),
    "hooks.py": (
        "(a) floor: python -c pass",
        "(d) command hook, PreToolUse Edit",
        "(e) HTTP hook, PreToolUse Edit",
    ),
    "marc.py": (
        "1. no coordination",
        "2. leases per tool call",
        "3. SERIALIZABLE sessions",
        "4. one global lock",
        "5. edits declared up front",
    ),
    "failover.py": (
        "(a) pairs/s, 100 agents, SQLite journal (FULL)",
        "(b) pairs/s, 100 agents, PostgreSQL journal",
        "(c) failover, kill -> first grant, 3 kills: p50",
        "targets:",
    ),
    "transport.py": ("(a) built-in HTTP/1.1 client", "(b) httpx"),
    "validation.py": ("POST /agents", "POST /leases", "POST /intents", "POST /clocks/write"),
    "server.py": (
        "(a) embedded, 50 agents",
        "(b) channel, 10 agents",
        "(b) channel, 100 agents",
        "(c) REST, 100 agents",
        "(d) channel + journal, 100 agents",
        "(e) redis-py Lock, no persistence",
        "(e) PostgreSQL advisory locks (asyncpg)",
        "(f) hand-off, channel",
        "(g) SIGKILL -> older agent's grant",
    ),
}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_prints_its_table(script: Path, tmp_path: Path) -> None:
    """The benchmark exits 0 with --quick and prints its table."""
    result = subprocess.run(
        [sys.executable, str(script), "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip(), result.stderr[-4000:]
    for row in ROWS.get(script.name, ()):
        assert row in result.stdout, result.stdout


def test_kernel_benchmark_judges_each_target() -> None:
    """The kernel table prints PASS or MISS for each of its five targets."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel.py"), "--quick", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    verdicts = [line for line in result.stdout.splitlines() if line.endswith(("PASS", "MISS"))]
    assert len(verdicts) == 5, result.stdout


def test_contention_benchmark_judges_each_target() -> None:
    """The contention table prints PASS or MISS for each of its four targets."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "contention.py"),
            "--agents",
            "2,4",
            "--calls",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    verdicts = [line for line in result.stdout.splitlines() if line.endswith(("PASS", "MISS"))]
    assert len(verdicts) == 4, result.stdout
    assert "rate at 4 agents / rate at 2 agents" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--agents", "10,x"], "expected agent counts", id="agents-word"),
        pytest.param(["--agents", "0"], "must be at least 1", id="agents-zero"),
        pytest.param(["--calls", "0"], "must be above 0", id="calls-zero"),
        pytest.param(["--budget", "-1"], "must be above 0", id="budget-negative"),
        pytest.param(["--agents", "10", "--calls", "5"], "must give every agent", id="few-calls"),
    ],
)
def test_contention_benchmark_refuses_bad_options(args: list[str], message: str) -> None:
    """A bad option exits with status 2 and says why; nothing runs."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "contention.py"), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
