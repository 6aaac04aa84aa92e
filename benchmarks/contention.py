"""Contention benchmark: many agents on one hot file, klock against a dict of asyncio.Lock.

For each size (10, 100 and 1,000 agents by default) every agent makes calls of a tool
protected with ``klock.protected(..., predicate="MUTATES")`` on one shared file, its body one
event-loop checkpoint (``await asyncio.sleep(0)``); in the same run, the same calls take an
``asyncio.Lock`` from a dict keyed by path instead. Per size and implementation the table
prints the calls completed, failed (an exception such as ``RetriesExhaustedError``) and left
unfinished when the phase's time budget ran out; pairs per second (completed calls over the
phase's wall time); klock's rate over the lock's; the process's CPU time per completed call
(``time.process_time()`` over the phase: what a call costs, whatever else runs on the machine);
deaths per grant (``klock.statistics()``:
``deaths / grants``); and the p50 / p99 latency of a completed call, from its start to its
return, retries included. A last row divides the largest size's rate by the smallest's.

Each protected call runs in a unit of work of its own that holds nothing when it asks for the
file, so every death counted here is the death of an empty-handed request.

Every phase is bounded: a fixed number of calls per size, and a time budget after which the
calls still running are cancelled and counted as unfinished, so the whole run ends in well
under a minute whatever the kernel does. The targets printed at the end (klock at least 0.3x
the lock at every size, no deaths, no failed or unfinished call, the largest size's rate at
least 0.5x the smallest's) are judged PASS or MISS on this run; they are targets, not tests.

Run from the repository root::

    python benchmarks/contention.py            # 10 / 100 / 1,000 agents, 4,000 calls each
    python benchmarks/contention.py --quick    # small sizes, a few seconds (smoke test)
    python benchmarks/contention.py --agents 10,1000 --calls 2000 --budget 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from klock_async import Klock

_clock = time.perf_counter

HOT_FILE = "FILE:/repo/src/hot.py"

FULL_AGENTS = (10, 100, 1000)
FULL_CALLS = 4000
FULL_BUDGET = 10.0
QUICK_AGENTS = (5, 20, 100)
QUICK_CALLS = 200
QUICK_BUDGET = 3.0

# Targets of the kernel's contention work (printed as PASS/MISS, never asserted).
TARGET_RATIO = 0.3
TARGET_SCALING = 0.5


@dataclass(frozen=True, slots=True)
class Phase:
    """What one implementation did at one size."""

    implementation: str
    agents: int
    calls: int
    completed: int
    failed: int
    unfinished: int
    seconds: float
    latencies: tuple[float, ...]
    cpu: float = 0.0  # the process's CPU seconds over the phase (time.process_time)
    grants: int | None = None
    deaths: int | None = None
    failure: str = ""  # the first failure's type and message, for the notes

    @property
    def rate(self) -> float:
        """Completed calls per second of the phase's wall time."""
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_pair(self) -> float | None:
        """CPU seconds of the whole process per completed call (None when none completed)."""
        return self.cpu / self.completed if self.completed else None

    @property
    def deaths_per_grant(self) -> float | None:
        """Wait-Die deaths per lease granted (None for the lock)."""
        if self.deaths is None or self.grants is None:
            return None
        return self.deaths / self.grants if self.grants else float(self.deaths)

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the completed calls' latencies, in seconds."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def configure_logging() -> None:
    """Drop INFO events cheaply, as a production set-up does."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )


async def body() -> None:
    """The tool's work: one checkpoint."""
    await asyncio.sleep(0)


def _per_agent(calls: int, agents: int) -> list[int]:
    """Spread ``calls`` over ``agents`` as evenly as possible."""
    share, extra = divmod(calls, agents)
    return [share + (1 if i < extra else 0) for i in range(agents)]


async def _drive(
    name: str,
    agents: int,
    calls: int,
    budget: float,
    call: Callable[[str], Awaitable[None]],
    agent_ids: Sequence[str],
) -> Phase:
    """Run every agent's calls at once until done or ``budget`` seconds passed."""
    latencies: list[float] = []
    failures: list[BaseException] = []
    go = asyncio.Event()

    async def agent(agent_id: str, count: int) -> None:
        await go.wait()
        for _ in range(count):
            started = _clock()
            try:
                await call(agent_id)
            except Exception as exc:  # counted and reported, never hidden
                failures.append(exc)
                continue
            latencies.append(_clock() - started)

    tasks = [
        asyncio.create_task(agent(agent_id, count))
        for agent_id, count in zip(agent_ids, _per_agent(calls, agents), strict=True)
    ]
    gc.collect()
    started = _clock()
    cpu_started = time.process_time()
    go.set()
    _, pending = await asyncio.wait(tasks, timeout=budget)
    seconds = _clock() - started
    cpu = time.process_time() - cpu_started
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    first = failures[0] if failures else None
    return Phase(
        implementation=name,
        agents=agents,
        calls=calls,
        completed=len(latencies),
        failed=len(failures),
        unfinished=calls - len(latencies) - len(failures),
        seconds=seconds,
        latencies=tuple(latencies),
        cpu=cpu,
        failure=f"{type(first).__name__}: {first}" if first is not None else "",
    )


async def lock_phase(agents: int, calls: int, budget: float) -> Phase:
    """The baseline: the same calls under an ``asyncio.Lock`` from a dict keyed by path."""
    locks: dict[str, asyncio.Lock] = {}

    async def call(agent_id: str) -> None:
        lock = locks.get(HOT_FILE)
        if lock is None:
            lock = locks[HOT_FILE] = asyncio.Lock()
        async with lock:
            await body()

    ids = [f"agent-{i}" for i in range(agents)]
    return await _drive("asyncio.Lock", agents, calls, budget, call, ids)


async def klock_phase(agents: int, calls: int, budget: float) -> Phase:
    """The calls through a ``protected(..., predicate="MUTATES")`` tool on the hot file."""
    async with Klock() as klock:
        ids = [f"agent-{i}" for i in range(agents)]
        for agent_id in ids:
            await klock.register_agent(agent_id)

        @klock.protected(agent=lambda agent_id: agent_id, resource=HOT_FILE, predicate="MUTATES")
        async def tool(agent_id: str) -> None:
            await body()

        phase = await _drive("klock", agents, calls, budget, tool, ids)
        stats = await klock.statistics()
    return Phase(
        implementation=phase.implementation,
        agents=phase.agents,
        calls=phase.calls,
        completed=phase.completed,
        failed=phase.failed,
        unfinished=phase.unfinished,
        seconds=phase.seconds,
        latencies=phase.latencies,
        cpu=phase.cpu,
        grants=stats.grants,
        deaths=stats.deaths,
        failure=phase.failure,
    )


async def run(sizes: Sequence[int], calls: int, budget: float) -> list[tuple[Phase, Phase]]:
    """For each size, the lock's phase then klock's, one after the other."""
    await lock_phase(10, 100, budget)  # warm caches and allocators, untimed
    async with Klock():
        pass
    pairs = []
    for agents in sizes:
        lock = await lock_phase(agents, calls, budget)
        kernel = await klock_phase(agents, calls, budget)
        pairs.append((lock, kernel))
    return pairs


# ------------------------------------------------------------------------------ the table


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def _row(phase: Phase, ratio: str) -> tuple[str, ...]:
    dpg = phase.deaths_per_grant
    cpu = phase.cpu_per_pair
    return (
        str(phase.agents),
        phase.implementation,
        f"{phase.completed:,}",
        f"{phase.failed:,}",
        f"{phase.unfinished:,}",
        f"{phase.rate:,.0f}",
        ratio,
        "-" if cpu is None else f"{cpu * 1e6:.1f} us",
        "-" if dpg is None else f"{dpg:.2f}",
        _ms(phase.percentile(0.50)),
        _ms(phase.percentile(0.99)),
    )


def _align(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return [line(rows[0]), rule, *(line(row) for row in rows[1:])]


def render(pairs: Sequence[tuple[Phase, Phase]], calls: int, budget: float, command: str) -> str:
    """The table, what was run and where, the scaling row and the targets."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"klock_async contention benchmark: {command}",
        f"machine: {os.cpu_count()} CPUs (nproc), {platform.machine()}, "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()}, load average {load} (1, 5, 15 min) at the end of the run",
        f"one hot file ({HOT_FILE}); {calls:,} calls per size spread over the agents; body: one "
        f"checkpoint; time budget {budget:g} s per phase (calls still running then are "
        "cancelled and counted as unfinished)",
        "logging: structlog filtering bound logger at WARNING (lease.* INFO events are dropped)",
        "",
    ]
    header = (
        "agents",
        "implementation",
        "done",
        "failed",
        "unfinished",
        "pairs/s",
        "x lock",
        "CPU/pair",
        "deaths/grant",
        "p50",
        "p99",
    )
    rows: list[tuple[str, ...]] = [header]
    for lock, kernel in pairs:
        ratio = kernel.rate / lock.rate if lock.rate else 0.0
        rows.append(_row(lock, "1"))
        rows.append(_row(kernel, f"{ratio:.4f}" if ratio < 0.01 else f"{ratio:.3f}"))
    lines += _align(rows)
    (small_lock, small), (large_lock, large) = pairs[0], pairs[-1]
    scaling = large.rate / small.rate if small.rate else 0.0
    lock_scaling = large_lock.rate / small_lock.rate if small_lock.rate else 0.0
    lines += [
        "",
        f"rate at {large.agents:,} agents / rate at {small.agents:,} agents: "
        f"klock {scaling:.4f}x, asyncio.Lock {lock_scaling:.3f}x",
    ]
    failures = [k for _, k in pairs if k.failure]
    for kernel in failures:
        lines.append(f"first failure at {kernel.agents:,} agents: {kernel.failure}")
    lines += ["", *_targets(pairs, scaling)]
    return "\n".join(lines)


def _targets(pairs: Sequence[tuple[Phase, Phase]], scaling: float) -> list[str]:
    kernels = [kernel for _, kernel in pairs]
    worst_ratio = min(k.rate / lock.rate if lock.rate else 0.0 for lock, k in pairs)
    deaths = sum(k.deaths or 0 for k in kernels)
    failed = sum(k.failed + k.unfinished for k in kernels)
    checks = [
        (
            f"klock >= {TARGET_RATIO} x asyncio.Lock at every size (worst {worst_ratio:.4f})",
            worst_ratio >= TARGET_RATIO,
        ),
        (f"no death of an empty-handed request (got {deaths:,})", deaths == 0),
        (f"no failed or unfinished call (got {failed:,})", failed == 0),
        (
            f"rate at {kernels[-1].agents:,} agents >= {TARGET_SCALING} x rate at "
            f"{kernels[0].agents:,} (got {scaling:.4f})",
            scaling >= TARGET_SCALING,
        ),
    ]
    width = max(len(text) for text, _ in checks)
    return ["targets:"] + [
        f"  {text:<{width}}  {'PASS' if passed else 'MISS'}" for text, passed in checks
    ]


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected agent counts like 10,100,1000, got {text!r}"
        ) from None
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"agent counts must be at least 1, got {text!r}")
    return sizes


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the phases and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument(
        "--agents", type=_sizes, default=None, help="agent counts, comma-separated (10,100,1000)"
    )
    parser.add_argument(
        "--calls", type=_positive(int), default=None, help="calls per size (default 4000)"
    )
    parser.add_argument(
        "--budget", type=_positive(float), default=None, help="seconds per phase (default 10)"
    )
    args = parser.parse_args(argv)
    sizes = args.agents or (QUICK_AGENTS if args.quick else FULL_AGENTS)
    calls = int(args.calls or (QUICK_CALLS if args.quick else FULL_CALLS))
    budget = float(args.budget or (QUICK_BUDGET if args.quick else FULL_BUDGET))
    if calls < max(sizes):
        parser.error(f"--calls ({calls}) must give every agent a call (at least {max(sizes)})")
    configure_logging()
    pairs = asyncio.run(run(sizes, calls, budget))
    command = "python benchmarks/contention.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    print(render(pairs, calls, budget, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
