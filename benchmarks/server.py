"""Benchmark of ``klock serve`` over loopback, beside the embedded kernel and peers, in one run.

Prints one table, every figure from this one run on this machine:

(a) throughput of the embedded kernel: N agents in concurrent tasks, each acquiring and
    releasing a file of its own through the facade (``agent.acquire`` then
    ``lease.release()``); pairs per second;
(b) the same N agents through ``Klock.connect(url)`` (the session channel: one WebSocket for
    the whole process) against ``klock serve`` in another process on 127.0.0.1, no journal,
    at N = 10 and 100, with the CPU time each side spent per pair; and the same 100 agents
    spread over 4 client processes (one channel each);
(c) the same over the REST API (``RemoteBackend``: two HTTP requests per pair), N = 100;
(d) the channel against ``klock serve --db`` (SQLite journal, ``synchronous=FULL``: every
    batch is on disk before its replies go out), N = 10 and 100;
(e) peers, when installed (else the row says "not installed"): redis-py's asyncio ``Lock``
    on a local ``redis-server`` without persistence and with ``appendfsync always`` (one
    client, its connection pool), and PostgreSQL advisory locks (``pg_advisory_lock`` /
    ``pg_advisory_unlock``) through an asyncpg pool of N connections on a throw-away
    cluster; each with N concurrent tasks, each locking a key of its own;
(f) hand-off latency: an older agent is queued behind a younger holder; from the holder
    calling ``release()`` to the waiter's ``acquire`` returning; embedded, over the channel
    (holder and waiter on two client processes' channels), and over REST (long-poll);
(g) liveness: a client process holding 10 leases (ttl 300 s) is killed with SIGKILL while an
    older agent of another process waits for one of its files; from the kill to the older
    agent's grant, against a server run with ``--grace 1``.

Throughputs are the median of the repetitions, latencies the median (and 95th percentile) of
all hand-offs. Ratios of the klock rows are to the peer named in the row's target. The load
average printed with the table tells how busy the machine was: the server, the clients and
the peers share its cores with everything else running.

Run from the repository root (peers need ``pip install -e '.[bench]'`` and the
``redis-server`` and ``postgresql`` binaries)::

    python benchmarks/server.py            # full run, about two minutes
    python benchmarks/server.py --quick    # small sizes (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from _serving import klock_serve, throughput

from klock_async import Klock
from klock_async.remote import RemoteBackend

_clock = time.perf_counter

COUNTS = (10, 100)
SPREAD = 4  # client processes of the multi-process row
TARGET_REDIS = 1.5  # channel / redis-py Lock (no persistence), and --db / appendfsync always
TARGET_PG = {10: 0.6, 100: 1.0}  # channel / PostgreSQL advisory locks
TARGET_HANDOFF_US = 200.0
GRACE = 1.0  # the --grace of the liveness row


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each measurement does."""

    reps: int
    seconds: float
    handoffs: int


FULL = Sizes(reps=3, seconds=2.0, handoffs=300)
QUICK = Sizes(reps=1, seconds=0.3, handoffs=10)


def configure_logging() -> None:
    """Drop INFO events cheaply, as a production set-up does."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )


# ------------------------------------------------------------------------------ processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(scratch: Path, *options: str) -> Iterator[int]:
    """A ``redis-server`` on a free loopback port; ready once it says so on stdout."""
    port = _free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(scratch)]
    process = subprocess.Popen(
        [*command, "--save", "", *options], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError(f"redis-server exited with {process.wait()}")
        yield port
    finally:
        process.terminate()
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def postgres_cluster(scratch: Path, connections: int) -> Iterator[int]:
    """A throw-away PostgreSQL cluster (initdb + pg_ctl) run by an unprivileged user."""
    data = scratch / "pgdata"
    data.mkdir()
    port = _free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(scratch, "nobody")
        shutil.chown(data, "nobody")
        prefix = ["runuser", "-u", "nobody", "--"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}
    subprocess.run([*prefix, "initdb", "-D", str(data), "-A", "trust", "-U", "bench"], **quiet)
    options = (
        f"-p {port} -k {scratch} -c listen_addresses=127.0.0.1 "
        f"-c max_connections={connections + 20}"
    )
    pg_ctl = [*prefix, "pg_ctl", "-D", str(data), "-l", str(scratch / "log")]
    subprocess.run([*pg_ctl, "-o", options, "-w", "start"], **quiet)
    try:
        yield port
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], **{**quiet, "check": False})


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[Klock]:
    async with Klock.connect(url) as klock:
        yield klock


# ------------------------------------------------------------------------------ measurements


async def loop_pairs(clients: int, seconds: float, pair: Callable[[int], Awaitable[None]]) -> float:
    """``clients`` tasks calling ``pair(i)`` until ``seconds`` pass; pairs per second."""
    done = 0
    stop = _clock() + seconds

    async def work(i: int) -> None:
        nonlocal done
        while _clock() < stop:
            await pair(i)
            done += 1

    start = _clock()
    await asyncio.gather(*(work(i) for i in range(clients)))
    return done / (_clock() - start)


async def redis_lock_pairs(port: int, clients: int, seconds: float) -> float:
    """redis-py's asyncio ``Lock``: acquire + release of a key per task."""
    import redis.asyncio as redis

    client = redis.Redis(port=port, max_connections=clients + 4)
    try:
        locks = [client.lock(f"bench:{i}", timeout=30) for i in range(clients)]
        await locks[0].acquire()  # loads the release script once
        await locks[0].release()

        async def pair(i: int) -> None:
            await locks[i].acquire()
            await locks[i].release()

        return await loop_pairs(clients, seconds, pair)
    finally:
        await client.aclose()


async def pg_lock_pairs(port: int, clients: int, seconds: float) -> float:
    """PostgreSQL session advisory locks through an asyncpg pool of ``clients`` connections."""
    import asyncpg

    pool = await asyncpg.create_pool(
        host="127.0.0.1",
        port=port,
        user="bench",
        database="postgres",
        min_size=clients,
        max_size=clients,
    )
    try:
        connections = [await pool.acquire() for _ in range(clients)]

        async def pair(i: int) -> None:
            conn = connections[i]
            await conn.execute("SELECT pg_advisory_lock($1)", i)
            await conn.execute("SELECT pg_advisory_unlock($1)", i)

        try:
            return await loop_pairs(clients, seconds, pair)
        finally:
            for conn in connections:
                await pool.release(conn)
    finally:
        await pool.close()


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


# A client process of the benchmark: AGENTS agents over its one channel, pairs for SECONDS
# once told to start (a line on stdin); prints its pair count.
WORKER = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[4])
from server import throughput, configure_logging
from klock_async import Klock

async def main(url, agents, seconds):
    async with Klock.connect(url) as klock:
        for i in range(agents):
            await klock.register_agent(f"{sys.argv[5]}-agent-{i}")
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        pairs, total = await throughput(klock, agents, seconds, sys.argv[5])
        print(total, flush=True)

configure_logging()
asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""


def spread_pairs(url: str, processes: int, agents: int, seconds: float, tag: str) -> float:
    """``agents`` agents spread over ``processes`` client processes; total pairs per second."""
    here = str(Path(__file__).resolve().parent)
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                url,
                str(agents // processes),
                str(seconds),
                here,
                f"{tag}p{n}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(processes)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        total = 0
        for child in children:
            assert child.stdout is not None
            total += int(child.stdout.readline())
        return total / seconds
    finally:
        for child in children:
            child.kill()
            child.wait(30)


HOLDER = r"""
import asyncio, sys
from klock_async import Klock

async def main(url):
    async with Klock.connect(url) as klock:
        agent = await klock.register_agent("doomed")
        for i in range(10):
            await agent.acquire(f"/kill/{i}.py", "MUTATES", ttl=300)
        print("holding", flush=True)
        await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


async def kill_to_grant(url: str) -> float:
    """Seconds from SIGKILL of a client holding 10 leases to an older agent's grant."""
    async with connected(url) as klock:
        older = await klock.register_agent("kill-older")
        child = subprocess.Popen(  # noqa: ASYNC220 - started once, read from a thread
            [sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            line = await asyncio.to_thread(child.stdout.readline)
            assert line.strip() == "holding", line
            waiting = asyncio.create_task(older.acquire("/kill/3.py", "MUTATES", ttl=30))
            await klock.backend.barrier()  # type: ignore[attr-defined]
            killed = _clock()
            child.send_signal(signal.SIGKILL)
            lease = await waiting
            granted = _clock()
            await lease.release()
            return granted - killed
        finally:
            child.kill()
            child.wait(30)
            if child.stdout is not None:
                child.stdout.close()


@dataclass
class Results:
    embedded: list[float] = field(default_factory=list)
    channel: dict[int, list[float]] = field(default_factory=dict)
    spread: list[float] = field(default_factory=list)
    rest: list[float] = field(default_factory=list)
    journal: dict[int, list[float]] = field(default_factory=dict)
    server_cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    peers: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    handoff_embedded: list[float] = field(default_factory=list)
    handoff_channel: list[float] = field(default_factory=list)
    handoff_rest: list[float] = field(default_factory=list)
    kill: float = 0.0


def _missing_peer(binary: str, module: str) -> str | None:
    if shutil.which(binary) is None:
        return f"not installed ({binary})"
    try:
        __import__(module)
    except ImportError:
        return f"not installed ({module}: pip install -e '.[bench]')"
    return None


async def measure_peers(sizes: Sizes, scratch: Path, results: Results) -> None:
    for name, options in (
        ("redis", ("--appendonly", "no")),
        ("redis-always", ("--appendonly", "yes", "--appendfsync", "always")),
    ):
        missing = _missing_peer("redis-server", "redis")
        if missing:
            results.missing[name] = missing
            continue
        runs = results.peers.setdefault(name, {})
        with redis_server(scratch, *options) as port:
            for _ in range(sizes.reps):
                for n in COUNTS:
                    runs.setdefault(n, []).append(await redis_lock_pairs(port, n, sizes.seconds))
    missing = _missing_peer("pg_ctl", "asyncpg")
    if missing:
        results.missing["postgres"] = missing
        return
    runs = results.peers.setdefault("postgres", {})
    with (
        tempfile.TemporaryDirectory() as pg_scratch,  # its own, for the unprivileged user
        postgres_cluster(Path(pg_scratch), max(COUNTS)) as port,
    ):
        for _ in range(sizes.reps):
            for n in COUNTS:
                runs.setdefault(n, []).append(await pg_lock_pairs(port, n, sizes.seconds))


async def measure(sizes: Sizes) -> Results:
    results = Results()
    with (
        tempfile.TemporaryDirectory() as scratch,
        klock_serve() as plain,
        klock_serve("--db", str(Path(scratch) / "k.db")) as durable,
    ):
        for rep in range(sizes.reps):
            async with Klock() as klock:
                pairs, _ = await throughput(klock, 50, sizes.seconds, f"e{rep}")
                results.embedded.append(pairs)
            for n in COUNTS:
                async with connected(plain.url) as klock:
                    server0, client0 = plain.cpu_seconds(), time.process_time()
                    pairs, total = await throughput(klock, n, sizes.seconds, f"c{n}r{rep}")
                    results.channel.setdefault(n, []).append(pairs)
                    if n == max(COUNTS):
                        results.server_cpu.append((plain.cpu_seconds() - server0) / total)
                        results.client_cpu.append((time.process_time() - client0) / total)
                async with connected(durable.url) as klock:
                    pairs, _ = await throughput(klock, n, sizes.seconds, f"j{n}r{rep}")
                    results.journal.setdefault(n, []).append(pairs)
            results.spread.append(
                await asyncio.to_thread(
                    spread_pairs, plain.url, SPREAD, max(COUNTS), sizes.seconds, f"s{rep}"
                )
            )
            async with Klock(backend=RemoteBackend(plain.url)) as klock:
                pairs, _ = await throughput(klock, max(COUNTS), sizes.seconds, f"h{rep}")
                results.rest.append(pairs)
        async with Klock() as klock:
            results.handoff_embedded = await handoffs(klock, klock, sizes.handoffs, "he")
        async with connected(plain.url) as holder, connected(plain.url) as waiter:
            results.handoff_channel = await handoffs(holder, waiter, sizes.handoffs, "hc")
        async with (
            Klock(backend=RemoteBackend(plain.url)) as holder,
            Klock(backend=RemoteBackend(plain.url)) as waiter,
        ):
            results.handoff_rest = await handoffs(holder, waiter, sizes.handoffs, "hr")
        await measure_peers(sizes, Path(scratch), results)
    with klock_serve("--grace", str(GRACE)) as short:
        results.kill = await kill_to_grant(short.url)
    return results


# ------------------------------------------------------------------------------ the table


def _p50(samples: list[float]) -> float:
    return statistics.median(samples)


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(results: Results, sizes: Sizes, load: tuple[float, float, float]) -> str:
    embedded = _p50(results.embedded)
    peer = {
        name: {n: _p50(samples) for n, samples in runs.items()}
        for name, runs in results.peers.items()
    }
    rows: list[tuple[str, str, str, str, str]] = [
        ("(a) embedded, 50 agents", f"{embedded:,.0f} pairs/s", "", "", ""),
    ]
    for n in COUNTS:
        channel = _p50(results.channel[n])
        redis = peer.get("redis", {}).get(n)
        pg = peer.get("postgres", {}).get(n)
        rows.append((f"(b) channel, {n} agents", f"{channel:,.0f} pairs/s", "", "", ""))
        if redis is not None:
            ratio = channel / redis
            rows.append(
                (
                    "    / redis-py Lock",
                    f"{ratio:.2f}x",
                    f"{ratio:.2f}",
                    f">= {TARGET_REDIS}x",
                    _verdict(ratio >= TARGET_REDIS),
                )
            )
        if pg is not None:
            ratio = channel / pg
            rows.append(
                (
                    "    / PostgreSQL advisory",
                    f"{ratio:.2f}x",
                    f"{ratio:.2f}",
                    f">= {TARGET_PG[n]}x",
                    _verdict(ratio >= TARGET_PG[n]),
                )
            )
    server_us = _p50(results.server_cpu) * 1e6
    client_us = _p50(results.client_cpu) * 1e6
    rows.append(
        (
            f"    CPU per pair at {max(COUNTS)}: server / client",
            f"{server_us:,.0f} / {client_us:,.0f} us",
            "",
            "",
            "",
        )
    )
    rows.append(
        (
            f"(b) channel, {max(COUNTS)} agents in {SPREAD} processes",
            f"{_p50(results.spread):,.0f} pairs/s",
            "",
            "",
            "",
        )
    )
    rest = _p50(results.rest)
    rows.append(
        (
            f"(c) REST, {max(COUNTS)} agents",
            f"{rest:,.0f} pairs/s",
            f"{rest / _p50(results.channel[max(COUNTS)]):.2f}",
            "(ratio: to the channel)",
            "",
        )
    )
    for n in COUNTS:
        journal = _p50(results.journal[n])
        rows.append((f"(d) channel + journal, {n} agents", f"{journal:,.0f} pairs/s", "", "", ""))
        always = peer.get("redis-always", {}).get(n)
        if always is not None:
            ratio = journal / always
            rows.append(
                (
                    "    / redis appendfsync always",
                    f"{ratio:.2f}x",
                    f"{ratio:.2f}",
                    f">= {TARGET_REDIS}x",
                    _verdict(ratio >= TARGET_REDIS),
                )
            )
    for name, label in (
        ("redis", "redis-py Lock, no persistence"),
        ("redis-always", "redis-py Lock, appendfsync always"),
        ("postgres", "PostgreSQL advisory locks (asyncpg)"),
    ):
        if name in results.missing:
            rows.append((f"(e) {label}", results.missing[name], "", "", ""))
            continue
        for n in COUNTS:
            rows.append((f"(e) {label}, {n}", f"{peer[name][n]:,.0f} pairs/s", "", "", ""))
    he = _p50(results.handoff_embedded)
    hc = _p50(results.handoff_channel)
    hr = _p50(results.handoff_rest)
    rows += [
        (
            "(f) hand-off, embedded",
            f"{he * 1e6:,.0f} us (p95 {_p95(results.handoff_embedded) * 1e6:,.0f})",
            "",
            "",
            "",
        ),
        (
            "(f) hand-off, channel",
            f"{hc * 1e6:,.0f} us (p95 {_p95(results.handoff_channel) * 1e6:,.0f})",
            "",
            f"p50 <= {TARGET_HANDOFF_US:,.0f} us",
            _verdict(hc * 1e6 <= TARGET_HANDOFF_US),
        ),
        (
            "(f) hand-off, REST long-poll",
            f"{hr * 1e6:,.0f} us (p95 {_p95(results.handoff_rest) * 1e6:,.0f})",
            "",
            "",
            "",
        ),
        (
            f"(g) SIGKILL -> older agent's grant, grace {GRACE:g} s",
            f"{results.kill * 1000:,.0f} ms",
            "",
            f"<= {(GRACE + 1) * 1000:,.0f} ms",
            _verdict(results.kill <= GRACE + 1),
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    header = ("measurement", "figure", "ratio", "target", "")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    out = [
        f"klock serve over loopback, embedded and peers — Python {platform.python_version()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"{sizes.reps} repetition(s) of {sizes.seconds:g} s per throughput; "
        f"{sizes.handoffs} hand-offs",
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
