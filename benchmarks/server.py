"""Benchmark of ``klock serve`` over loopback, beside the embedded kernel in the same run.

Prints one table, every figure from this one run on this machine:

(a) throughput of the embedded kernel: 50 agents in concurrent tasks, each acquiring and
    releasing a file of its own through the facade (``agent.acquire`` then
    ``lease.release()``); pairs per second;
(b) the same 50 agents through ``Klock.connect(url)`` against ``klock serve`` in another
    process on 127.0.0.1 (no journal), with the CPU time each side spent per pair;
(c) the same against ``klock serve --db`` (SQLite journal, ``synchronous=FULL``: every batch
    is on disk before its replies go out);
(d) hand-off latency, embedded: an older agent is queued behind a younger holder; from the
    holder calling ``release()`` to the waiter's ``acquire`` returning;
(e) the same over HTTP: the waiter long-polls from one client, the holder releases from
    another; from calling ``release()`` to the waiter's long-poll returning.

Throughputs are the median of the repetitions, latencies the median (and 95th percentile) of
all hand-offs. The target from the server's issue is (b) >= 3,000 pairs/s on 2 cores. The
load average printed with the table tells how busy the machine was: the server and the
clients share its cores with everything else running.

Run from the repository root::

    python benchmarks/server.py            # full run, about 40 seconds
    python benchmarks/server.py --quick    # a few seconds, small sizes (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from klock_async import Agent, Klock

_clock = time.perf_counter

AGENTS = 50
TARGET_PAIRS = 3_000.0


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each measurement does."""

    reps: int
    seconds: float
    handoffs: int


FULL = Sizes(reps=3, seconds=3.0, handoffs=300)
QUICK = Sizes(reps=1, seconds=0.4, handoffs=10)


def configure_logging() -> None:
    """Drop INFO events cheaply, as a production set-up does."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )


# ------------------------------------------------------------------------------ the server


@dataclass
class ServerProcess:
    """``klock serve`` running as a child process."""

    url: str
    process: subprocess.Popen[str]

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (Linux)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def klock_serve(*extra: str) -> Iterator[ServerProcess]:
    """Start ``python -m klock_async serve --port 0``; read its URL from its ready line."""
    command = [sys.executable, "-m", "klock_async", "serve", "--port", "0"]
    command += ["--log-level", "warning", *extra]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        url = ""
        for line in process.stdout:  # blocks until the server prints its ready line
            if "listening on " in line:
                url = line.rsplit("listening on ", 1)[1].strip()
                break
        if not url:
            raise RuntimeError(f"klock serve exited with {process.wait()}")
        yield ServerProcess(url, process)
    finally:
        process.terminate()
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[Klock]:
    async with Klock.connect(url) as klock:
        yield klock


# ------------------------------------------------------------------------------ measurements


async def throughput(klock: Klock, seconds: float, tag: str) -> tuple[float, int]:
    """50 agents, each acquiring and releasing its own file for ``seconds``.

    Returns pairs per second and the number of pairs.
    """
    agents = [await klock.register_agent(f"{tag}-agent-{i}") for i in range(AGENTS)]
    done = 0
    stop = 0.0

    async def work(agent: Agent, i: int) -> None:
        nonlocal done
        resource = f"FILE:/bench/{tag}/{i}.py"
        while _clock() < stop:
            lease = await agent.acquire(resource, "MUTATES", ttl=30)
            await lease.release()
            done += 1

    start = _clock()
    stop = start + seconds
    await asyncio.gather(*(work(agent, i) for i, agent in enumerate(agents)))
    return done / (_clock() - start), done


async def handoffs(holder_side: Klock, waiter_side: Klock, n: int, tag: str) -> list[float]:
    """Seconds from ``release()`` by the holder to the older waiter's acquire returning."""
    older = await waiter_side.register_agent(f"{tag}-older")
    younger = await holder_side.register_agent(f"{tag}-younger")
    barrier = getattr(waiter_side.backend, "barrier", None)
    resource = f"FILE:/bench/{tag}/handoff.py"
    samples = []
    for _ in range(n):
        held = await younger.acquire(resource, "MUTATES", ttl=30)
        returned = 0.0

        async def wait() -> None:
            nonlocal returned
            lease = await older.acquire(resource, "MUTATES", ttl=30)
            returned = _clock()
            await lease.release()

        waiter = asyncio.create_task(wait())
        # Queued for sure before the release: the server's barrier, or a query behind it.
        await asyncio.create_task(barrier() if barrier else waiter_side.statistics())
        released = _clock()
        await held.release()
        await waiter
        samples.append(returned - released)
    return samples


@dataclass
class Results:
    embedded: list[float]
    remote: list[float]
    journal: list[float]
    server_cpu: list[float]
    client_cpu: list[float]
    handoff_embedded: list[float]
    handoff_remote: list[float]


async def measure(sizes: Sizes) -> Results:
    results = Results([], [], [], [], [], [], [])
    with (
        tempfile.TemporaryDirectory() as scratch,
        klock_serve() as plain,
        klock_serve("--db", str(Path(scratch) / "k.db")) as durable,
    ):
        for rep in range(sizes.reps):
            async with Klock() as klock:
                results.embedded.append((await throughput(klock, sizes.seconds, f"e{rep}"))[0])
            async with connected(plain.url) as klock:
                server0, client0 = plain.cpu_seconds(), time.process_time()
                pairs, total = await throughput(klock, sizes.seconds, f"r{rep}")
                results.remote.append(pairs)
                results.server_cpu.append((plain.cpu_seconds() - server0) / total)
                results.client_cpu.append((time.process_time() - client0) / total)
            async with connected(durable.url) as klock:
                results.journal.append((await throughput(klock, sizes.seconds, f"j{rep}"))[0])
        async with Klock() as klock:
            results.handoff_embedded = await handoffs(klock, klock, sizes.handoffs, "he")
        async with connected(plain.url) as holder, connected(plain.url) as waiter:
            results.handoff_remote = await handoffs(holder, waiter, sizes.handoffs, "hr")
    return results


# ------------------------------------------------------------------------------ the table


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def render(results: Results, sizes: Sizes, load: tuple[float, float, float]) -> str:
    embedded = statistics.median(results.embedded)
    remote = statistics.median(results.remote)
    journal = statistics.median(results.journal)
    he = statistics.median(results.handoff_embedded)
    hr = statistics.median(results.handoff_remote)
    server_us = statistics.median(results.server_cpu) * 1e6
    client_us = statistics.median(results.client_cpu) * 1e6
    verdict = "PASS" if remote >= TARGET_PAIRS else "MISS"
    rows = [
        ("(a) throughput, 50 agents, embedded", f"{embedded:,.0f} pairs/s", "1.00", "", ""),
        (
            "(b) throughput, 50 agents, remote (loopback)",
            f"{remote:,.0f} pairs/s",
            f"{remote / embedded:.3f}",
            ">= 3,000 pairs/s",
            verdict,
        ),
        (
            "    CPU per pair: server / client",
            f"{server_us:,.0f} / {client_us:,.0f} us",
            "",
            "",
            "",
        ),
        (
            "(c) throughput, 50 agents, remote + journal",
            f"{journal:,.0f} pairs/s",
            f"{journal / embedded:.3f}",
            "",
            "",
        ),
        (
            "(d) hand-off, embedded: release -> waiter",
            f"{he * 1e6:,.0f} us (p95 {_p95(results.handoff_embedded) * 1e6:,.0f})",
            "1.00",
            "",
            "",
        ),
        (
            "(e) hand-off, remote: release -> long-poll",
            f"{hr * 1e6:,.0f} us (p95 {_p95(results.handoff_remote) * 1e6:,.0f})",
            f"{hr / he:,.1f}",
            "",
            "",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    header = ("measurement", "figure", "ratio", "target", "")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    out = [
        f"klock serve over loopback vs embedded — Python {platform.python_version()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"{sizes.reps} repetition(s) of {sizes.seconds:g} s per throughput; "
        f"{sizes.handoffs} hand-offs; ratios are to the embedded row of the same kind",
        "",
        line(header).rstrip(),
        line(tuple("-" * w for w in widths)),
        *(line(row).rstrip() for row in rows),
    ]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    configure_logging()
    load = os.getloadavg()
    results = asyncio.run(measure(sizes))
    print(render(results, sizes, load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
