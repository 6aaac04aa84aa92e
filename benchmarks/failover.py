"""Benchmark of replicas on PostgreSQL: journal throughput beside SQLite, and failover times.

Prints one table, every figure from this one run on this machine:

(a) throughput of ``klock serve --db FILE`` (SQLite journal, ``synchronous=FULL``): 100
    agents in concurrent tasks of one ``Klock.connect`` client, each acquiring and releasing
    a file of its own; pairs per second (median of the repetitions);
(b) the same against ``klock serve --db postgresql://...`` (one replica, so it leads) on a
    throw-away PostgreSQL cluster with its default durability (every commit flushed);
(c) failover: two replicas, a client given both URLs taking and giving back a lease in a
    loop; the leader is killed (SIGKILL) and the time from the kill to the client's first
    grant from the new leader is taken; the killed replica is started again as a follower
    and the next kill hits the new leader. Default settings (``--leader-ttl 5``);
(d) a paused leader (SIGSTOP, as a long pause or a partition looks): the time from the pause
    to the follower's ``leader.elected`` log line; it waits for the lease to expire.

Targets (from the replicas' design): (b) >= 0.5 x (a); failover p50 <= 3 s, max <= 10 s.

Needs PostgreSQL's binaries (Debian's ``postgresql`` package); the cluster runs in a
temporary directory, as the ``postgres`` user when run as root. Run from the repository root::

    python benchmarks/failover.py            # full run: 3 x 3 s of throughput, 20 kills
    python benchmarks/failover.py --quick    # a few seconds, 3 kills (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _serving import throughput as pair_throughput
from pgutil import Cluster, Replica, cluster  # the tests' cluster utilities

from klock_async import Klock, KlockError

_clock = time.perf_counter

AGENTS = 100
TARGET_RATIO = 0.5
TARGET_P50 = 3.0
TARGET_MAX = 10.0


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each measurement does."""

    reps: int
    seconds: float
    kills: int
    pauses: int


FULL = Sizes(reps=3, seconds=3.0, kills=20, pauses=3)
QUICK = Sizes(reps=1, seconds=0.5, kills=3, pauses=1)


@dataclass
class Results:
    sqlite: list[float] = field(default_factory=list)
    postgres: list[float] = field(default_factory=list)
    failovers: list[float] = field(default_factory=list)
    pauses: list[float] = field(default_factory=list)


def configure_logging() -> None:
    """Drop INFO events cheaply, as a production set-up does."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )


@contextlib.contextmanager
def klock_serve(db: str) -> Iterator[str]:
    """``klock serve --db DB`` at log level warning; its URL."""
    replica = Replica(db, log_level="warning")
    try:
        yield replica.listening()
    finally:
        replica.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            replica.process.wait(30)
        replica.stop()


async def throughput(url: str, seconds: float, tag: str) -> float:
    """100 agents, each acquiring and releasing its own file for ``seconds``; pairs/s."""
    async with Klock.connect(url) as klock:
        rate, _ = await pair_throughput(klock, AGENTS, seconds, tag)
        return rate


async def failovers(db: str, kills: int) -> list[float]:
    """Seconds from SIGKILL of the leader to the client's first grant by the next one."""
    samples: list[float] = []
    leader = Replica(db)
    leader.listening()
    leader.wait_for("leader.elected")
    standby = Replica(db)
    standby.listening()
    await asyncio.to_thread(standby.wait_for, "leader.following")
    try:
        async with Klock.connect([leader.url, standby.url], timeout=30.0) as klock:
            agent = await klock.register_agent("probe")
            for _ in range(kills):
                killed = _clock()
                leader.process.send_signal(signal.SIGKILL)
                while True:  # the probe: one request after another until one is granted
                    try:
                        lease = await agent.acquire("FILE:/bench/probe.py", "MUTATES", ttl=30)
                    except KlockError:
                        continue  # the old leader's connection broke mid-request
                    samples.append(_clock() - killed)
                    await lease.release()
                    break
                await asyncio.to_thread(leader.stop)
                await asyncio.to_thread(standby.wait_for, "leader.elected")
                leader, standby = standby, Replica(db)
                standby.listening()
                await asyncio.to_thread(standby.wait_for, "leader.following")
                backend = klock.backend
                servers = getattr(backend, "servers", None)
                if servers is not None:
                    servers.follow(standby.url)  # known to the client, as a third URL would be
                    servers.follow(leader.url)
    finally:
        leader.stop()
        standby.stop()
    return samples


def paused_failover(db: str) -> float:
    """Seconds from SIGSTOP of the leader to the follower's election."""
    leader = Replica(db)
    leader.listening()
    leader.wait_for("leader.elected")
    standby = Replica(db)
    try:
        standby.listening()
        standby.wait_for("leader.following")
        paused = _clock()
        leader.process.send_signal(signal.SIGSTOP)
        standby.wait_for("leader.elected")
        return _clock() - paused
    finally:
        leader.process.send_signal(signal.SIGCONT)
        leader.stop()
        standby.stop()


async def measure(sizes: Sizes, pg: Cluster) -> Results:
    results = Results()
    with (
        tempfile.TemporaryDirectory() as scratch,
        klock_serve(str(Path(scratch) / "k.db")) as sqlite_url,
        klock_serve(pg.create_database()) as pg_url,
    ):
        for rep in range(sizes.reps):
            results.sqlite.append(await throughput(sqlite_url, sizes.seconds, f"s{rep}"))
            results.postgres.append(await throughput(pg_url, sizes.seconds, f"p{rep}"))
    results.failovers = await failovers(pg.create_database(), sizes.kills)
    results.pauses = [paused_failover(pg.create_database()) for _ in range(sizes.pauses)]
    return results


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(results: Results, sizes: Sizes, load: tuple[float, float, float]) -> str:
    sqlite = statistics.median(results.sqlite)
    postgres = statistics.median(results.postgres)
    ratio = postgres / sqlite
    times = results.failovers
    p50, p95, worst = statistics.median(times), _percentile(times, 0.95), max(times)
    lines = [
        f"klock_async replicas benchmark - python {platform.python_version()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "",
        f"{'measurement':<58}{'value':>14}",
        f"{'(a) pairs/s, 100 agents, SQLite journal (FULL)':<58}{sqlite:>14,.0f}",
        f"{'(b) pairs/s, 100 agents, PostgreSQL journal':<58}{postgres:>14,.0f}",
        f"{'    PostgreSQL / SQLite':<58}{ratio:>13.2f}x",
        f"{f'(c) failover, kill -> first grant, {len(times)} kills: p50':<58}{p50:>13.3f}s",
        f"{'    p95':<58}{p95:>13.3f}s",
        f"{'    max':<58}{worst:>13.3f}s",
        f"{f'(d) pause -> follower elected, {len(results.pauses)} pauses: median':<58}"
        f"{statistics.median(results.pauses):>13.3f}s",
        "",
        "targets:",
        f"  PostgreSQL >= {TARGET_RATIO}x SQLite at 100 agents: {ratio:.2f}x"
        f"  {_verdict(ratio >= TARGET_RATIO)}",
        f"  failover p50 <= {TARGET_P50:g} s: {p50:.3f} s  {_verdict(p50 <= TARGET_P50)}",
        f"  failover max <= {TARGET_MAX:g} s: {worst:.3f} s  {_verdict(worst <= TARGET_MAX)}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--kills", type=int, default=None, help="failovers to time")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.kills is not None:
        sizes = Sizes(sizes.reps, sizes.seconds, max(1, args.kills), sizes.pauses)
    configure_logging()
    with cluster(durable=True) as pg:
        if pg is None:
            print("no PostgreSQL binaries (Debian's postgresql package): nothing measured")
            return 1 if os.environ.get("KLOCK_REQUIRE_POSTGRES") == "1" else 0
        results = asyncio.run(measure(sizes, pg))
    print(render(results, sizes, os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
