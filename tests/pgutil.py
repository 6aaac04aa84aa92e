"""A throw-away PostgreSQL cluster for tests: initdb in a temporary directory, a free port.

The binaries are Debian's (``/usr/lib/postgresql/<version>/bin``) or the first ``pg_ctl`` on
``PATH``. PostgreSQL refuses to run as root, so under root the cluster belongs to the
``postgres`` user (created by Debian's package). ``pg_ctl -w`` returns once the server accepts
connections, so nothing polls for readiness.

Without binaries the tests that need the cluster skip, unless ``KLOCK_REQUIRE_POSTGRES=1``
(CI sets it), where they fail.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REQUIRED = os.environ.get("KLOCK_REQUIRE_POSTGRES") == "1"


def binaries() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version)
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    return None if found is None else Path(found).parent


def _version(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Cluster:
    """One PostgreSQL server in a temporary directory; a fresh database per test."""

    def __init__(self, bin_dir: Path, *, durable: bool = False) -> None:
        self.bin = bin_dir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="klock-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            owner = pwd.getpwnam(self.user)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    def _run(self, *command: str) -> None:
        prefix: Sequence[str] = ("runuser", "-u", self.user, "--") if self.user else ()
        subprocess.run(
            [*prefix, *command], check=True, capture_output=True, text=True, cwd=self.root
        )

    def start(self) -> None:
        """initdb (the first time) and start; returns once it accepts connections."""
        if not self.data.exists():
            self._run(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            )
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
        options += "-c max_connections=300"
        if not self.durable:  # tests: a crash of the machine need not be survived
            options += " -c fsync=off -c full_page_writes=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        """Stop the server (fast: sessions are cut, everything committed is kept)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL of a database of this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = "t" + uuid.uuid4().hex[:12]
        self._run(
            str(self.bin / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-qc",
            f"CREATE DATABASE {name}",
        )
        return self.url(name)

    def sql(self, url: str, statement: str) -> str:
        """Run one statement with psql; its unaligned output."""
        prefix: Sequence[str] = ("runuser", "-u", self.user, "--") if self.user else ()
        done = subprocess.run(
            [*prefix, str(self.bin / "psql"), url, "-XAtqc", statement],
            check=True,
            capture_output=True,
            text=True,
            cwd=self.root,
        )
        return done.stdout.strip()

    def destroy(self) -> None:
        """Stop the server if it runs and remove its directory."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def cluster(*, durable: bool = False) -> Iterator[Cluster | None]:
    """A started cluster, or None when there are no binaries (and they are not required).

    ``durable``: PostgreSQL's defaults (every commit flushed); else fsync is off.
    """
    bin_dir = binaries()
    if bin_dir is None:
        yield None
        return
    server = Cluster(bin_dir, durable=durable)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


READY_TIMEOUT = 60.0
"""Seconds a replica may take to print an awaited line before the test fails (a bound)."""


class Replica:
    """``klock serve --db postgresql://...`` as a child process whose log lines can be awaited.

    Lines of stderr (structlog's console output, level info) arrive on a queue read by
    :meth:`wait_for`, so a test waits for "leader.elected" instead of polling anything.
    """

    def __init__(self, url: str, *extra: str, log_level: str = "info") -> None:
        command = [
            sys.executable,
            "-m",
            "klock_async",
            "serve",
            "--port",
            "0",
            "--db",
            url,
            "--log-level",
            log_level,
            *extra,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._stderr: queue.Queue[str] = queue.Queue()
        self._stdout: queue.Queue[str] = queue.Queue()
        self._readers = [
            threading.Thread(target=_pump, args=(self.process.stdout, self._stdout), daemon=True),
            threading.Thread(target=_pump, args=(self.process.stderr, self._stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.url = ""

    def listening(self) -> str:
        """Wait for the ``listening on URL`` line; the URL."""
        while True:
            line = self._stdout.get(timeout=READY_TIMEOUT)
            if not line:
                raise RuntimeError(f"klock serve exited: {self.output()}")
            if "listening on " in line:
                self.url = line.rsplit("listening on ", 1)[1].strip()
                return self.url

    def wait_for(self, text: str) -> str:
        """Wait for a line of stderr containing ``text``; that line."""
        while True:
            line = self._stderr.get(timeout=READY_TIMEOUT)
            if not line:
                raise RuntimeError(f"no line with {text!r}; klock serve said: {self.output()}")
            self.lines.append(line)
            if text in line:
                return line

    def output(self) -> str:
        """Everything it wrote to stderr so far (after it exited: all of it)."""
        with contextlib.suppress(queue.Empty):
            while True:
                line = self._stderr.get_nowait()
                if line:
                    self.lines.append(line)
        return "".join(self.lines)

    def stop(self) -> None:
        """SIGKILL it if it still runs, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(READY_TIMEOUT)
        for reader in self._readers:
            reader.join(READY_TIMEOUT)
        assert self.process.stdout is not None and self.process.stderr is not None
        self.process.stdout.close()
        self.process.stderr.close()


def _pump(stream: Any, sink: queue.Queue[str]) -> None:
    for line in stream:
        sink.put(line)
    sink.put("")


@contextlib.contextmanager
def replicas(url: str, count: int, *extra: str) -> Iterator[list[Replica]]:
    """``count`` replicas on one database, each listening; all killed on exit."""
    started: list[Replica] = []
    try:
        for _ in range(count):
            replica = Replica(url, *extra)
            started.append(replica)
            replica.listening()
        yield started
    finally:
        for replica in started:
            replica.stop()
