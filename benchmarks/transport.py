"""Benchmark of the Python client's HTTP path: the built-in HTTP/1.1 client against httpx.

Prints one table, every figure from this one run on this machine. One ``klock serve`` (no
journal) runs in another process on 127.0.0.1; 50 agents in concurrent tasks of this process
each acquire and release a file of their own through ``Klock.connect``-style facades:

(a) through ``RemoteBackend``'s own HTTP/1.1 client (one keep-alive connection per request
    in flight), agents registered with credentials (the default);
(b) through httpx (``RemoteBackend(transport=httpx.AsyncHTTPTransport(...))``, its pool
    allowed twice as many connections as agents);
(c) as (a), agents registered without credentials (``credentials=False``, as a Klock v1
    client does): what the credential checks cost;
(d) with ``--baseline DIR``: as (c), against a second ``klock serve`` started from the source
    tree DIR (an earlier commit, e.g. ``git archive <commit> | tar -x -C DIR``), running at
    the same time: the server before and after a change, in one run.

For each: pairs per second (median of the repetitions, run alternately) and the CPU time per
pair of this client process and of the server process. The client path is chosen on the
client CPU per pair at equal server work; the load average printed with the table tells how
busy the machine was.

Run from the repository root::

    python benchmarks/transport.py                  # full run, about a minute
    python benchmarks/transport.py --baseline DIR   # and the server of another tree
    python benchmarks/transport.py --quick          # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog
from _serving import ServerProcess, klock_serve, throughput

from klock_async import Klock
from klock_async.remote import RemoteBackend

AGENTS = 50


def serve(source: Path | None) -> contextlib.AbstractContextManager[ServerProcess]:
    """``klock serve`` of this tree, or of the source tree ``source``."""
    if source is None:
        return klock_serve()
    # ``-m`` puts the working directory first on the path
    return klock_serve(env={**os.environ, "PYTHONPATH": str(source)}, cwd=source)


@dataclass
class Row:
    rates: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)


NAMES = {
    "http1": "(a) built-in HTTP/1.1 client",
    "httpx": f"(b) httpx {httpx.__version__}",
    "v1": "(c) built-in, agents without credential",
    "baseline": "(d) as (c), --baseline server",
}


def backend(kind: str, url: str) -> RemoteBackend:
    if kind == "http1":
        return RemoteBackend(url)
    if kind in ("v1", "baseline"):
        return RemoteBackend(url, credentials=False)
    limits = httpx.Limits(max_connections=AGENTS * 2, max_keepalive_connections=AGENTS * 2)
    return RemoteBackend(url, transport=httpx.AsyncHTTPTransport(limits=limits))


async def measure(reps: int, seconds: float, baseline: Path | None) -> dict[str, Row]:
    rows = {kind: Row() for kind in NAMES if kind != "baseline" or baseline is not None}
    with contextlib.ExitStack() as stack:
        current = stack.enter_context(serve(None))
        servers = {kind: current for kind in rows}
        if baseline is not None:
            servers["baseline"] = stack.enter_context(serve(baseline))
        for rep in range(reps):
            for kind, row in rows.items():
                server = servers[kind]
                async with Klock(backend=backend(kind, server.url)) as klock:
                    server0, client0 = server.cpu_seconds(), time.process_time()
                    rate, pairs = await throughput(klock, AGENTS, seconds, f"{kind}{rep}")
                    row.rates.append(rate)
                    row.client_cpu.append((time.process_time() - client0) / pairs)
                    row.server_cpu.append((server.cpu_seconds() - server0) / pairs)
    return rows


def table(rows: dict[str, Row], reps: int, seconds: float) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    base = statistics.median(rows["http1"].rates)
    base_cpu = statistics.median(rows["http1"].client_cpu)
    lines = [
        f"client HTTP path, 50 agents over loopback - Python {platform.python_version()}, "
        f"{os.cpu_count()} cores, load average {load}",
        f"{reps} repetition(s) of {seconds:g} s, run alternately; ratios are to (a)",
        "",
        f"{'client':<40}  {'pairs/s':>9}  {'ratio':>5}  {'client CPU/pair':>15}  "
        f"{'ratio':>5}  {'server CPU/pair':>15}",
        "-" * 100,
    ]
    for kind, row in rows.items():
        rate = statistics.median(row.rates)
        client = statistics.median(row.client_cpu)
        server = statistics.median(row.server_cpu)
        lines.append(
            f"{NAMES[kind]:<40}  {rate:>9,.0f}  {rate / base:>5.2f}  "
            f"{client * 1e6:>12,.0f} us  {client / base_cpu:>5.2f}  {server * 1e6:>12,.0f} us"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="DIR",
        help="also run the server of this source tree (an earlier commit), same run",
    )
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )
    reps, seconds = (1, 0.3) if args.quick else (5, 3.0)
    rows: Any = asyncio.run(measure(reps, seconds, args.baseline))
    print(table(rows, reps, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
