"""What the benchmark scripts share: a child ``klock serve`` and the pair-throughput loop.

Not a benchmark itself (``tests/test_benchmarks.py`` runs every ``benchmarks/*.py`` but those
whose name starts with ``_``); the scripts import it from their own folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from klock_async import Agent, Klock

_clock = time.perf_counter


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
def klock_serve(
    *extra: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Iterator[ServerProcess]:
    """Start ``python -m klock_async serve --port 0`` at log level warning, with ``extra``
    options; its URL is read from its ready line."""
    command = [sys.executable, "-m", "klock_async", "serve", "--port", "0"]
    command += ["--log-level", "warning", *extra]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=None if env is None else dict(env),
        cwd=cwd,
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


async def throughput(klock: Klock, agents: int, seconds: float, tag: str) -> tuple[float, int]:
    """``agents`` agents, each acquiring and releasing its own file for ``seconds``.

    Returns pairs per second and the number of pairs.
    """
    team = [await klock.register_agent(f"{tag}-agent-{i}") for i in range(agents)]
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
    await asyncio.gather(*(work(agent, i) for i, agent in enumerate(team)))
    return done / (_clock() - start), done
