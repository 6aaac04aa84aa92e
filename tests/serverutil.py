"""Real ``klock serve`` servers for tests, on free loopback ports.

Two ways, both waiting for readiness without polling:

- :func:`serve_in_thread`: the app in uvicorn on a thread of this process with its own event
  loop; ready when the server's ``on_ready`` callback fires (after the socket listens).
- :func:`serve_subprocess`: ``python -m klock_async serve --port 0 --db PATH`` as a child
  process; ready when it prints its ``listening on URL`` line on stdout.

:func:`remote_kernel` is the "remote" variant of the ``kernel_factory`` fixture: a fresh
server per kernel, so every scenario starts from an empty state as it does embedded;
:func:`channel_kernel` is the "channel" variant, the same over the session channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klock_async import Klock
from klock_async.remote import ChannelBackend, RemoteBackend
from klock_async.server import Server, create_app, server_config

READY_TIMEOUT = 30.0
"""Seconds a server may take to start before the test fails (a bound, not a wait)."""


@dataclass
class ThreadServer:
    """A server running on a thread of the test process."""

    url: str
    server: Server
    thread: threading.Thread
    app: Any

    def stop(self) -> None:
        """Shut down gracefully and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(READY_TIMEOUT)
        assert not self.thread.is_alive(), "the server thread did not stop"


@contextlib.contextmanager
def serve_in_thread(
    wrap: Callable[[Any], Any] | None = None, **app_options: Any
) -> Iterator[ThreadServer]:
    """Run ``create_app(**app_options)`` under uvicorn on 127.0.0.1, port chosen by the OS.

    ``wrap``, when given, is applied to the app (an ASGI middleware of the test's own).
    """
    app = create_app(**app_options)
    if wrap is not None:
        app = wrap(app)
    config = server_config(app, port=0)
    ready: queue.Queue[str] = queue.Queue()
    server = Server(config, on_ready=ready.put)
    errors: list[BaseException] = []

    def main() -> None:
        try:
            server.run()
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
        finally:
            ready.put("")  # unblock the waiter if startup failed

    thread = threading.Thread(target=main, name="klock-test-server", daemon=True)
    thread.start()
    url = ready.get(timeout=READY_TIMEOUT)
    if not url:
        thread.join(READY_TIMEOUT)
        raise RuntimeError(f"the test server did not start: {errors!r}")
    handle = ThreadServer(url, server, thread, app)
    try:
        yield handle
    finally:
        if thread.is_alive():
            handle.stop()


@dataclass
class ChildServer:
    """``klock serve`` running as a child process."""

    url: str
    process: subprocess.Popen[str]
    stderr: list[str] = field(default_factory=list)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, without any shutdown code running."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(READY_TIMEOUT)

    def terminate(self) -> int:
        """SIGTERM: a graceful shutdown; return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(READY_TIMEOUT)


def _drain(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


@contextlib.contextmanager
def serve_subprocess(
    db: Path | None = None, *, extra: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[ChildServer]:
    """Start ``python -m klock_async serve`` on a free port; stop it (SIGKILL) on exit."""
    command = [
        sys.executable,
        "-m",
        "klock_async",
        "serve",
        "--port",
        "0",
        "--log-level",
        "warning",
    ]
    if db is not None:
        command += ["--db", str(db)]
    command += list(extra)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    handle = ChildServer("", process)
    assert process.stdout is not None and process.stderr is not None
    lines: queue.Queue[str] = queue.Queue()

    def read_stdout() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put("")

    readers = [
        threading.Thread(target=_drain, args=(process.stderr, handle.stderr), daemon=True),
        threading.Thread(target=read_stdout, daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        while True:
            line = lines.get(timeout=READY_TIMEOUT)
            if not line:
                process.wait(READY_TIMEOUT)
                raise RuntimeError(
                    f"klock serve exited with {process.returncode}: {''.join(handle.stderr)}"
                )
            if "listening on " in line:
                handle.url = line.rsplit("listening on ", 1)[1].strip()
                break
        yield handle
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(READY_TIMEOUT)
        for reader in readers:  # both end at the pipes' EOF, now that the process is gone
            reader.join(READY_TIMEOUT)
        process.stdout.close()
        process.stderr.close()


@contextlib.asynccontextmanager
async def remote_kernel(**options: Any) -> AsyncIterator[Klock]:
    """A server of its own (fresh state) on a thread, and a ``Klock`` connected to it.

    ``options`` are ``Klock`` keyword arguments (e.g. ``default_ttl``). Starting and stopping
    the server run off the event loop, so the test's loop is never blocked.
    """
    stack = contextlib.ExitStack()
    server = await asyncio.to_thread(stack.enter_context, serve_in_thread())
    try:
        async with Klock(backend=RemoteBackend(server.url), **options) as klock:
            yield klock
    finally:
        await asyncio.to_thread(stack.close)


@contextlib.asynccontextmanager
async def channel_kernel(**options: Any) -> AsyncIterator[Klock]:
    """As :func:`remote_kernel`, connected over the session channel (``Klock.connect``)."""
    stack = contextlib.ExitStack()
    server = await asyncio.to_thread(stack.enter_context, serve_in_thread())
    try:
        async with Klock(backend=ChannelBackend(server.url), **options) as klock:
            yield klock
    finally:
        await asyncio.to_thread(stack.close)
