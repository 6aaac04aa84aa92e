"""Benchmark of the embedded kernel's hot path, measured against a bare asyncio floor.

Prints one table, every figure from this one run on this machine:

(a) the floor: a bare asyncio round trip (a task puts ``(msg, future)`` on an
    ``asyncio.Queue``; a server task gets it and sets the future's result), and, for
    reference, one message through the Scheduler actor that does no work;
(b) one uncontended acquire+release pair through the public facade
    (``agent.acquire(...)`` then ``lease.release()``), and the same pair sent straight to the
    ``Scheduler`` backend (``acquire`` then the one-way ``release_nowait``), which shows what
    the facade itself costs;
(c) throughput: 100 agents in concurrent tasks, each acquiring and releasing its own file, as
    time per pair over the floor (a ratio, so that a slower machine does not fail it);
(d) hand-off latency: an older agent waits behind a younger holder; the time from calling
    ``release()`` to the waiter's task running again;
(e) one acquire+release pair while 100, and while 100,000, other leases are held;
(f) the pair of (b) with logging left unconfigured (the library then builds no event at all),
    and with a reader of ``klock.events()`` draining every event in a task of its own.

Each figure is the median of several repetitions; each repetition runs the floor next to
every other measurement, so that noise hits both, and every ratio is the median of the
per-repetition ratios. Lease events are logged through a structlog filtering logger set to
WARNING, so the kernel's ``lease.*`` events are dropped cheaply, as in a production set-up.

Run from the repository root::

    python benchmarks/kernel.py            # full run, about half a minute
    python benchmarks/kernel.py --quick    # a few seconds, small sizes (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import structlog

from klock_async import Agent, Intent, Klock, Predicate, Resource
from klock_async.scheduler import Scheduler

_clock = time.perf_counter


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each measurement does per repetition."""

    reps: int
    round_trips: int
    pairs: int
    agents: int
    pairs_per_agent: int
    handoffs: int
    few_held: int
    many_held: int


FULL = Sizes(
    reps=7,
    round_trips=20_000,
    pairs=10_000,
    agents=100,
    pairs_per_agent=200,
    handoffs=1_000,
    few_held=100,
    many_held=100_000,
)
QUICK = Sizes(
    reps=2,
    round_trips=200,
    pairs=100,
    agents=100,
    pairs_per_agent=3,
    handoffs=20,
    few_held=100,
    many_held=2_000,
)


def configure_logging() -> None:
    """Drop INFO events cheaply, as a production set-up does."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )


# ------------------------------------------------------------------------------ measurements
# Each returns seconds per operation (or, for throughput, seconds per pair).


async def floor_round_trip(n: int) -> float:
    """(a) A bare asyncio queue + future round trip."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, asyncio.Future[int]]] = asyncio.Queue()

    async def server() -> None:
        while True:
            msg, reply = await queue.get()
            reply.set_result(msg)

    task = loop.create_task(server())
    try:
        start = _clock()
        for i in range(n):
            reply: asyncio.Future[int] = loop.create_future()
            queue.put_nowait((i, reply))
            await reply
        return (_clock() - start) / n
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def scheduler_round_trip(n: int) -> float:
    """One message through the Scheduler actor that does no work (``agents()``, none known).

    This is the actor's own floor: a pair is one such round trip (the acquire) plus a one-way
    release message and the kernel's work.
    """
    scheduler = Scheduler()
    await scheduler.start()
    try:
        start = _clock()
        for _ in range(n):
            await scheduler.agents()
        return (_clock() - start) / n
    finally:
        await scheduler.aclose()


async def facade_pair(klock: Klock, n: int, *, agent_id: str = "solo") -> float:
    """(b) ``agent.acquire(...)`` then ``lease.release()``, uncontended."""
    agent = await klock.register_agent(agent_id)
    resource = f"FILE:/repo/pkg0/{agent_id}.py"
    start = _clock()
    for _ in range(n):
        lease = await agent.acquire(resource, "MUTATES")
        await lease.release()
    return (_clock() - start) / n


async def scheduler_pair(n: int) -> float:
    """(b) The same pair sent straight to the Scheduler backend (no facade).

    The release is the one-way ``release_nowait`` the facade's ``lease.release()`` makes.
    """
    scheduler = Scheduler()
    await scheduler.start()
    try:
        await scheduler.register_agent("solo", None)
        intents = (Intent(Resource.parse("FILE:/repo/pkg0/solo.py"), Predicate.MUTATES),)
        start = _clock()
        for _ in range(n):
            (info,) = await scheduler.acquire("solo", "session", intents, ttl=30.0)
            scheduler.release_nowait(info.id, "solo")
        return (_clock() - start) / n
    finally:
        await scheduler.aclose()


async def throughput(agents: int, pairs_per_agent: int) -> float:
    """(c) Concurrent agents, each acquiring and releasing a file of its own."""
    async with Klock() as klock:
        handles = [await klock.register_agent(f"agent-{i}") for i in range(agents)]
        go = asyncio.Event()

        async def work(index: int) -> None:
            agent = handles[index]
            resource = f"FILE:/repo/pkg{index}/mod.py"
            await go.wait()
            for _ in range(pairs_per_agent):
                lease = await agent.acquire(resource, "MUTATES")
                await lease.release()

        tasks = [asyncio.create_task(work(i)) for i in range(agents)]
        start = _clock()
        go.set()
        await asyncio.gather(*tasks)
        return (_clock() - start) / (agents * pairs_per_agent)


async def handoff(n: int) -> float:
    """(d) From the holder calling release() to the queued older waiter running again."""
    async with Klock() as klock:
        older = await klock.register_agent("older")
        younger = await klock.register_agent("younger")
        resource = "FILE:/repo/pkg0/shared.py"
        total = 0.0
        for _ in range(n):
            held = await younger.acquire(resource, "MUTATES")
            posted = asyncio.Event()
            waiter = asyncio.create_task(_wait_for_grant(older, resource, posted))
            await posted.wait()
            # The mailbox is FIFO: once this snapshot is answered, the request is queued.
            stats = await klock.statistics()
            assert stats.requests_waiting == 1, stats
            start = _clock()
            await held.release()
            total += await waiter - start
        return total / n


async def _wait_for_grant(agent: Agent, resource: str, posted: asyncio.Event) -> float:
    posted.set()  # the acquire below posts its request before it first yields
    lease = await agent.acquire(resource, "MUTATES")
    resumed = _clock()
    await lease.release()
    return resumed


class HeldKernel:
    """A running kernel in which one agent holds ``count`` leases on files of a tree."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.klock = Klock()

    async def start(self) -> None:
        """Start the kernel and take the leases (in batches of atomic requests)."""
        await self.klock.__aenter__()
        holder = await self.klock.register_agent("holder")
        batch = 1_000
        for first in range(0, self.count, batch):
            intents = [
                (f"FILE:/repo/pkg{i % 100}/mod{i}.py", "MUTATES")
                for i in range(first, min(first + batch, self.count))
            ]
            await holder.session().acquire_many(intents, ttl=3_600.0)
        stats = await self.klock.statistics()
        assert stats.leases_active == self.count, stats

    async def aclose(self) -> None:
        """Stop the kernel."""
        await self.klock.aclose()


# ------------------------------------------------------------------------------ the run


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table."""

    label: str
    seconds: float  # per operation (for throughput: per pair)
    ratio: float  # median of the per-repetition ratios to the floor (or to row (e) 100)
    target: str
    passed: bool | None


def _median(values: list[float]) -> float:
    return statistics.median(values)


async def run(sizes: Sizes) -> list[Row]:
    """Run every measurement ``sizes.reps`` times, interleaved with the floor."""
    few, many = HeldKernel(sizes.few_held), HeldKernel(sizes.many_held)
    await few.start()
    await many.start()
    keys = (
        "floor",
        "actor",
        "facade",
        "scheduler",
        "throughput",
        "handoff",
        "few",
        "many",
        "unconfigured",
        "events",
    )
    samples: dict[str, list[float]] = {key: [] for key in keys}
    try:
        # One untimed pass warms caches, code paths and allocators.
        await floor_round_trip(sizes.round_trips // 10 + 1)
        async with Klock() as klock:
            await facade_pair(klock, sizes.pairs // 10 + 1)
        for rep in range(sizes.reps):
            probe = f"probe-{rep}"
            for key, measurement in (
                ("floor", floor_round_trip(sizes.round_trips)),
                ("actor", scheduler_round_trip(sizes.round_trips)),
                ("facade", _facade_in_new_kernel(sizes.pairs)),
                ("scheduler", scheduler_pair(sizes.pairs)),
                ("throughput", throughput(sizes.agents, sizes.pairs_per_agent)),
                ("handoff", handoff(sizes.handoffs)),
                ("few", facade_pair(few.klock, sizes.pairs, agent_id=probe)),
                ("many", facade_pair(many.klock, sizes.pairs, agent_id=probe)),
                ("unconfigured", _facade_unconfigured(sizes.pairs)),
                ("events", _facade_with_reader(sizes.pairs)),
            ):
                gc.collect()
                samples[key].append(await measurement)
    finally:
        await few.aclose()
        await many.aclose()

    floors = samples["floor"]

    def to_floor(key: str) -> float:
        return _median([s / f for s, f in zip(samples[key], floors, strict=True)])

    facade_ratio = to_floor("facade")
    throughput_pairs = 1.0 / _median(samples["throughput"])
    throughput_ratio = to_floor("throughput")
    handoff_ratio = to_floor("handoff")
    growth = _median([m / f for m, f in zip(samples["many"], samples["few"], strict=True)])
    quiet = _median(
        [u / f for u, f in zip(samples["unconfigured"], samples["facade"], strict=True)]
    )
    return [
        Row("(a) floor: asyncio queue + future round trip", _median(floors), 1.0, "", None),
        Row(
            "    Scheduler round trip doing no work",
            _median(samples["actor"]),
            to_floor("actor"),
            "(the actor's own floor)",
            None,
        ),
        Row(
            "(b) acquire+release, facade",
            _median(samples["facade"]),
            facade_ratio,
            "<= 2.5 floors",
            facade_ratio <= 2.5,
        ),
        Row(
            "    acquire+release, Scheduler direct",
            _median(samples["scheduler"]),
            to_floor("scheduler"),
            "(facade cost = row above - this)",
            None,
        ),
        Row(
            f"(c) throughput, {sizes.agents} agents, distinct files, per pair",
            _median(samples["throughput"]),
            throughput_ratio,
            f"<= 1.5 floors ({throughput_pairs:,.0f} pairs/s)",
            throughput_ratio <= 1.5,
        ),
        Row(
            "(d) hand-off: release -> waiter running",
            _median(samples["handoff"]),
            handoff_ratio,
            "< 3 floors",
            handoff_ratio < 3.0,
        ),
        Row(
            f"(e) acquire+release, {sizes.few_held:,} other leases",
            _median(samples["few"]),
            to_floor("few"),
            "",
            None,
        ),
        Row(
            f"    acquire+release, {sizes.many_held:,} other leases",
            _median(samples["many"]),
            to_floor("many"),
            f"<= 1.3 x the row above (got {growth:.2f})",
            growth <= 1.3,
        ),
        Row(
            "(f) acquire+release, logging unconfigured",
            _median(samples["unconfigured"]),
            to_floor("unconfigured"),
            f"<= 1.1 x row (b) (got {quiet:.2f})",
            quiet <= 1.1,
        ),
        Row(
            "    acquire+release, an events() reader",
            _median(samples["events"]),
            to_floor("events"),
            "(what recording and reading events cost)",
            None,
        ),
    ]


async def _facade_in_new_kernel(n: int) -> float:
    async with Klock() as klock:
        return await facade_pair(klock, n)


async def _facade_unconfigured(n: int) -> float:
    structlog.reset_defaults()  # as in a program that never configured logging
    try:
        return await _facade_in_new_kernel(n)
    finally:
        configure_logging()


async def _facade_with_reader(n: int) -> float:
    async with Klock() as klock, klock.events() as events:
        seen = 0

        async def drain() -> None:
            nonlocal seen
            async for _ in events:
                seen += 1

        reader = asyncio.create_task(drain())
        try:
            return await facade_pair(klock, n)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def render(rows: list[Row], sizes: Sizes, command: str) -> str:
    """The table, preceded by what was run and where."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"klock_async kernel benchmark: {command}",
        f"machine: {os.cpu_count()} CPUs (nproc), {platform.machine()}, "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()}, load average {load} (1, 5, 15 min) at the end of the run",
        f"repetitions: {sizes.reps} (each figure is their median; each ratio is the median of "
        "the per-repetition ratios)",
        "logging: structlog filtering bound logger at WARNING, cache_logger_on_first_use=True "
        "(lease.* INFO events are dropped)",
        "",
    ]
    header = f"{'measurement':<46} {'time/op':>10} {'x floor':>8}  {'target':<40} result"
    lines += [header, "-" * len(header)]
    for row in rows:
        result = "" if row.passed is None else ("PASS" if row.passed else "MISS")
        lines.append(
            f"{row.label:<46} {row.seconds * 1e6:>8.2f}us {row.ratio:>8.2f}  "
            f"{row.target:<40} {result}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 7)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.reps is not None:
        if args.reps < 1:
            parser.error("--reps must be at least 1")
        sizes = dataclasses.replace(sizes, reps=args.reps)
    configure_logging()
    rows = asyncio.run(run(sizes))
    command = "python benchmarks/kernel.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    print(render(rows, sizes, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
