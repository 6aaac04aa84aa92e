"""``klock mcp``: a stdio MCP server that makes coding agents coordinate through klock.

Needs the ``mcp`` extra (``pip install 'klock-async[mcp]'``); built on the official ``mcp``
Python SDK (2.x, ``MCPServer``).

Each server process serves one MCP client session, and that session is one agent (``--agent``,
or an id made of the host name and process id). Its tools:

- ``read_file``, ``write_file``, ``edit_file``, ``list_files``: the protected file tools of
  :mod:`klock_async.integrations.files` on the workspace root given by ``--root``. An agent that
  uses them gets leases and causal checks without knowing: a write of a file another agent
  changed since this agent read it is refused with "read it again". Paths outside the root are
  refused. ``read_file(path, for_update=true)`` reads for update: the agent keeps MUTATES on the
  file until it writes or edits it, releases it, or the hold's ttl passes without a call on it.
- ``acquire``, ``release``, ``heartbeat``, ``list_leases``: explicit leases, for work that spans
  several calls (a refactoring across files) or resources that are not files. File tools called
  while the agent holds an overlapping lease run inside that lease.

Several coding agents coordinate only if their servers share one kernel:

- ``klock mcp --server URL`` connects to a running ``klock serve`` (token: ``--token`` or
  ``KLOCK_TOKEN``);
- without ``--server`` it finds the local server on ``127.0.0.1:--local-port`` (default 3100),
  or starts one there (a detached ``klock serve``, shared by every agent on the machine) and
  logs its URL and pid on stderr; ``klock mcp --status`` lists the servers it started and
  ``klock mcp --stop`` stops them;
- ``KLOCK_MCP_EMBEDDED=1`` runs a kernel inside the process instead, for a single client.

stdout carries the protocol: every log line goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

try:
    import httpx
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError as _missing:  # pragma: no cover - depends on the environment
    raise ImportError("klock mcp needs the mcp extra: pip install 'klock-async[mcp]'") from _missing

from klock_async import __version__
from klock_async.api import Agent, Klock, Lease, RetryPolicy, Session
from klock_async.clocks import IsolationLevel
from klock_async.errors import InvalidResourceError, KlockError, LeaseDied, LeaseNotFoundError
from klock_async.integrations.files import DEFAULT_UPDATE_TTL, ReadForUpdate, WorkspaceFiles
from klock_async.model import LeaseInfo, Resource, ResourceType
from klock_async.rules import overlaps

__all__ = [
    "DEFAULT_LOCAL_PORT",
    "EMBEDDED_ENV",
    "AgentTools",
    "add_arguments",
    "create_server",
    "ensure_local_server",
    "run",
    "serve_stdio",
]

T = TypeVar("T")

EMBEDDED_ENV = "KLOCK_MCP_EMBEDDED"
"""Set to 1 to run an embedded kernel instead of finding or starting a local server."""

DEFAULT_LOCAL_PORT = 3100
"""Loopback port of the shared local ``klock serve`` (the port ``klock serve`` uses)."""

DEFAULT_LEASE_TTL = 60.0
"""Seconds an explicit lease lives without a heartbeat unless the agent asks otherwise."""

SERVER_START_TIMEOUT = 30.0
"""Seconds a local ``klock serve`` may take to start (a bound, not a wait)."""

_INSTRUCTIONS = """\
Files in this workspace may be edited by other agents at the same time. Use these tools for
files: read_file before you change a file; write_file and edit_file refuse to overwrite a file
that changed since you read it, and tell you to read it again: do so, then redo your change on
the new content. For work that spans several calls, acquire a lease (MUTATES to change,
CONSUMES to read), heartbeat it if the work takes longer than its ttl, and release it when done.
"""


def _stderr(message: str) -> None:
    print(f"klock mcp: {message}", file=sys.stderr, flush=True)


class AgentTools:
    """The tools of one MCP session: one agent, its workspace and its explicit leases.

    Explicit leases and reads for update live in one session of the agent; file tools that
    touch a resource overlapping one of them run inside that session (so they do not collide
    with the agent's own lease), the others in a session of their own with Wait-Die retries.
    Releasing a writing lease records a write, so other agents re-read what the agent may have
    changed under it; a read for update ends when the agent writes or edits its file.

    Args:
        klock: the kernel facade.
        agent: the registered agent this session acts as.
        root: the workspace root.
        ttl: lease ttl of file tool calls in seconds (default: the kernel's).
        retry: retry policy of file tool calls.
        update_ttl: seconds a read for update keeps its file without a call on it.

    Raises:
        FileToolError: the root is not an existing directory.
    """

    def __init__(
        self,
        klock: Klock,
        agent: Agent,
        root: str | os.PathLike[str],
        *,
        ttl: float | None = None,
        retry: RetryPolicy | None = None,
        update_ttl: float = DEFAULT_UPDATE_TTL,
    ) -> None:
        self.klock = klock
        self.agent = agent
        self.files = WorkspaceFiles(klock, agent.id, root, ttl=ttl, retry=retry)
        # One session id, two isolation levels: explicit leases are taken READ_COMMITTED (taking
        # a lease is not a write, so it is not checked against the clocks), file tools run in
        # the same session SERIALIZABLE (their reads and writes are checked as everywhere).
        self._leases = agent.session(isolation=IsolationLevel.READ_COMMITTED)
        self.session = Session(
            klock,
            agent.id,
            IsolationLevel.SERIALIZABLE,
            session_id=self._leases.id,
            agent_view=True,  # reads and writes count in the agent's own view, as every tool's
        )
        self._held: dict[str, Lease] = {}
        self.updates = ReadForUpdate(
            self.files,
            holds=self._leases,
            ttl=update_ttl,
            retry=retry,
            holds_others=lambda: bool(self._held),
        )

    async def aclose(self) -> int:
        """Release every explicit lease and read for update still held; return how many."""
        holds = len(await self.updates.release())
        held, self._held = list(self._held.values()), {}
        released = 0
        for lease in held:
            with contextlib.suppress(KlockError):  # lost meanwhile: nothing to release
                await lease.release(record_write=lease.predicate.writes)
                released += 1
        return holds + released + await self.session.release_all()

    # ------------------------------------------------------------------ file tools

    async def read_file(self, path: str, for_update: bool = False) -> str:
        """Read a text file of the workspace (records the read for causal checks).

        With ``for_update`` the agent keeps MUTATES on the file until it writes or edits it,
        releases it, or the hold's ttl passes without a call on it.

        Raises:
            ToolError: a refusal, with what to do next.
        """
        if for_update:
            return await _answer(self.updates.read_file(path))
        session = await self._session_for(path)
        return await _answer(self.files.read_file(path, session=session))

    async def write_file(self, path: str, content: str) -> str:
        """Create or overwrite a file; refused if it changed since this agent read it.

        Raises:
            ToolError: a refusal, with what to do next.
        """
        session = await self._session_for(path)
        done = await _answer(self.files.write_file(path, content, session=session))
        await self.updates.written(path)
        return done

    async def edit_file(self, path: str, old_text: str, new_text: str) -> str:
        """Replace the one occurrence of old_text by new_text; refused if the file is stale.

        Raises:
            ToolError: a refusal, with what to do next.
        """
        session = await self._session_for(path)
        done = await _answer(self.files.edit_file(path, old_text, new_text, session=session))
        await self.updates.written(path)
        return done

    async def list_files(self, path: str = ".", recursive: bool = False) -> str:
        """List a workspace directory, one entry a line, directories ending in ``/``.

        Raises:
            ToolError: a refusal, with what to do next.
        """
        session = await self._session_for(path)
        entries = await _answer(self.files.list_files(path, recursive=recursive, session=session))
        return "\n".join(entries) if entries else "(empty directory)"

    # ------------------------------------------------------------------ lease tools

    async def acquire(
        self,
        resource: str,
        predicate: str,
        ttl_seconds: float = DEFAULT_LEASE_TTL,
        wait: bool = True,
        timeout_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Acquire a lease and keep it until ``release`` (heartbeat it before its ttl ends).

        A bare path or ``FILE:path`` names a file of the workspace (relative to the root).

        Raises:
            ToolError: a refusal, with what to do next.
        """
        target = await _answer(self._resource(resource))
        try:
            lease = await self._leases.acquire(
                target, predicate, ttl=ttl_seconds, wait=wait, timeout=timeout_seconds
            )
        except LeaseDied as died:
            raise ToolError(
                f"{died.message} Nothing is held by this request: release your other leases "
                "if you are done with them, then call acquire again."
            ) from None
        except KlockError as error:
            raise ToolError(error.message) from None
        self._held[lease.id] = lease
        return self._describe(lease.info)

    async def release(self, lease_id: str | None = None) -> dict[str, Any]:
        """Release one lease by id, or every lease this agent holds when no id is given.

        Raises:
            ToolError: no such lease held by this agent.
        """
        if lease_id is None:
            count = await self.aclose()
            return {"released": count}
        lease = self._held.pop(lease_id, None)
        if lease is None and await self.updates.release_lease(lease_id) is not None:
            return {"released": 1, "lease_id": lease_id}
        if lease is None:
            raise ToolError(
                f"this agent holds no lease {lease_id!r}; list_leases shows the active ones"
            )
        try:
            # Whatever the agent changed under a writing lease, by these tools or others, is a
            # version the other agents have not seen.
            await lease.release(record_write=lease.predicate.writes)
        except KlockError as error:
            raise ToolError(error.message) from None
        return {"released": 1, "lease_id": lease_id}

    async def heartbeat(
        self, lease_id: str | None = None, ttl_seconds: float | None = None
    ) -> dict[str, Any]:
        """Extend one lease (or every lease this agent holds) to now + ttl.

        Raises:
            ToolError: the lease is unknown or was lost (expired or revoked).
        """
        leases = list(self._held.values()) if lease_id is None else [self._held.get(lease_id)]
        extended = []
        for lease in leases:
            if lease is None:
                raise ToolError(
                    f"this agent holds no lease {lease_id!r}; list_leases shows the active ones"
                )
            try:
                await lease.heartbeat(ttl_seconds)
            except KlockError as error:
                self._held.pop(lease.id, None)
                raise ToolError(error.message) from None
            extended.append(self._describe(lease.info))
        return {"leases": extended}

    async def list_leases(self) -> dict[str, Any]:
        """Every active lease in the kernel (all agents); ``mine`` marks this agent's."""
        infos = await self.klock.leases()
        active = {info.id for info in infos}
        for stale in [lease_id for lease_id in self._held if lease_id not in active]:
            del self._held[stale]  # expired or revoked meanwhile
        return {"agent": self.agent.id, "leases": [self._describe(info) for info in infos]}

    # ------------------------------------------------------------------ internals

    def _describe(self, info: LeaseInfo) -> dict[str, Any]:
        resource = info.resource
        shown = str(resource)
        root = self.files.root.as_posix()
        if resource.type is ResourceType.FILE and (
            resource.path == root or resource.path.startswith(root + "/")
        ):
            shown = "FILE:" + (resource.path[len(root) + 1 :] or ".")
        return {
            "lease_id": info.id,
            "agent_id": info.agent_id,
            "mine": info.agent_id == self.agent.id,
            "resource": shown,
            "predicate": info.predicate.value,
            "token": info.token,
            "ttl_seconds": info.ttl,
            "expires_at": info.expires_at,
        }

    async def _resource(self, name: str) -> Resource:
        """A workspace file for bare paths and FILE:, other types as given."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidResourceError("name a resource: a workspace path, or TYPE:path")
        head, sep, tail = name.partition(":")
        if sep and head.strip().upper() == "FILE":
            return (await self.files.resolve(tail)).resource
        parsed = Resource.parse(name)
        if parsed.type is ResourceType.FILE:
            return (await self.files.resolve(name)).resource
        return parsed

    async def _session_for(self, path: str) -> Session | None:
        """The explicit-lease session when one of its leases or reads for update covers
        ``path``, else None."""
        if not self._held:
            return await self.updates.session_for(path)
        try:
            target = (await self.files.resolve(path)).resource
        except KlockError:
            return None  # the tool itself reports the bad path
        for lease in self._held.values():
            if overlaps(lease.resource, target):
                return self.session
        return await self.updates.session_for(path)


async def _answer(call: Awaitable[T]) -> T:
    """Await a tool call; a kernel refusal becomes a ToolError the model reads."""
    try:
        return await call
    except LeaseDied as died:
        raise ToolError(
            f"{died.message} Nothing was changed. If you hold leases you no longer need, "
            "release them; then call the tool again."
        ) from None
    except LeaseNotFoundError as error:
        raise ToolError(error.message) from None
    except KlockError as error:
        raise ToolError(error.message) from None


def create_server(tools: AgentTools, *, name: str = "klock") -> MCPServer[Any]:
    """The MCP server exposing ``tools`` (one agent's file and lease tools).

    Use it in-process (``mcp.Client(server)``) or over stdio (:func:`serve_stdio`).
    """
    server: MCPServer[Any] = MCPServer(
        name,
        version=__version__,
        instructions=_INSTRUCTIONS,
        log_level="WARNING",
        warn_on_duplicate_tools=True,
    )
    text_tools: list[tuple[Callable[..., Awaitable[Any]], str]] = [
        (
            tools.read_file,
            "Read a text file of the workspace (path relative to the workspace root). Read a "
            "file before you change it. With for_update=true the file stays yours (other "
            "agents wait) until you write or edit it, release it, or a while passes without "
            "you touching it, so your change cannot be refused as stale: use it for files you "
            "mean to change.",
        ),
        (
            tools.write_file,
            "Create or overwrite a text file with its complete new content. Refused, with "
            "nothing written, if another agent changed the file since you read it: read it "
            "again, then redo your change.",
        ),
        (
            tools.edit_file,
            "Replace the one exact occurrence of old_text by new_text in a file. Refused, with "
            "nothing written, if another agent changed the file since you read it: read it "
            "again, then redo your edit.",
        ),
        (
            tools.list_files,
            "List a directory of the workspace (default: the root), one entry a line; "
            "directories end in /.",
        ),
    ]
    root = tools.files.root.as_posix()
    for fn, description in text_tools:
        server.add_tool(_as_named(fn, root), description=description, structured_output=False)
    lease_tools: list[tuple[Callable[..., Awaitable[Any]], str]] = [
        (
            tools.acquire,
            "Acquire a lease on a resource until you release it: a workspace path (or "
            "FILE:path), or SYMBOL:name, API_ENDPOINT:..., DATABASE_TABLE:..., CONFIG_KEY:... "
            "Predicates: CONSUMES to read, MUTATES to change, DELETES, RENAMES, PROVIDES, "
            "DEPENDS_ON. When another agent holds a conflicting lease: if you hold no lease, "
            "your request waits in the queue until its turn and is never refused; if you "
            "already hold leases and ask for more, you wait when you are older than every "
            "conflicting holder, and are refused at once (LeaseDied) when you are younger: "
            "then release what you hold and ask again. With wait=false you get the lease or a "
            "refusal at once, never a wait; timeout_seconds bounds a wait. Heartbeat before "
            "ttl_seconds end.",
        ),
        (
            tools.release,
            "Release a lease by id (also a read for update), or all your leases and reads for "
            "update when no id is given.",
        ),
        (
            tools.heartbeat,
            "Extend a lease (or all your leases) so that it does not expire while you work.",
        ),
        (tools.list_leases, "List every active lease of every agent; 'mine' marks yours."),
    ]
    for fn, description in lease_tools:
        server.add_tool(_as_named(fn, root), description=description, structured_output=True)
    return server


def _as_named(fn: Callable[..., Awaitable[T]], root: str) -> Callable[..., Awaitable[T]]:
    """``fn`` with its refusals naming workspace files as its answers do (``FILE:src/a.py``).

    The kernel names a file by its absolute path; the tools answer with the path the agent
    gave, relative to the workspace root, and so must the refusals.
    """

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except ToolError as error:
            raise ToolError(str(error).replace(f"FILE:{root}/", "FILE:")) from None

    return call


# --------------------------------------------------------------------------- kernels


def _local_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


async def _answers_health(url: str, token: str | None) -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx.AsyncClient(timeout=5.0, headers=headers) as client:
            response = await client.get(f"{url}/health")
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("success") is True


def _state_dir() -> Path:
    """Where started local servers leave their log and their record (``serve-PORT.*``)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"klock-{uid}"


def _spawn_local_server(port: int) -> tuple[subprocess.Popen[bytes], Path]:
    """Start a detached ``klock serve`` on loopback; its stderr goes to a log file."""
    log_dir = _state_dir()
    log_dir.mkdir(mode=0o700, exist_ok=True)
    log_path = log_dir / f"serve-{port}.log"
    command = [
        sys.executable,
        "-m",
        "klock_async",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # outlive this process and its terminal
        )
    return process, log_path


async def ensure_local_server(port: int = DEFAULT_LOCAL_PORT, *, token: str | None = None) -> str:
    """Find the ``klock serve`` on ``127.0.0.1:port``, or start one there; return its URL.

    A started server is detached (it outlives this process, so the agents of the machine
    share it); its URL, pid and log file are written on stderr. Two processes racing to start
    it end up sharing the one that won.

    Raises:
        RuntimeError: no server answers there and none could be started.
    """
    url = _local_url(port)
    if await _answers_health(url, token):
        _stderr(f"using the local klock server at {url}")
        return url
    process, log_path = await anyio.to_thread.run_sync(_spawn_local_server, port)
    assert process.stdout is not None
    try:
        with anyio.fail_after(SERVER_START_TIMEOUT):
            line = await anyio.to_thread.run_sync(process.stdout.readline, abandon_on_cancel=True)
    except TimeoutError:
        process.kill()
        raise RuntimeError(
            f"the local klock server did not start within {SERVER_START_TIMEOUT:g} s; "
            f"see {log_path}"
        ) from None
    process.stdout.close()
    if b"listening on " in line:
        url = line.decode().rsplit("listening on ", 1)[1].strip()
        _stderr(f"started a local klock server at {url} (pid {process.pid}, log {log_path})")
        record = {"url": url, "pid": process.pid, "log": str(log_path)}
        log_path.with_suffix(".json").write_text(json.dumps(record), encoding="utf-8")
        return url
    await anyio.to_thread.run_sync(process.wait)
    if await _answers_health(url, token):  # another agent started it first
        _stderr(f"using the local klock server at {url}")
        return url
    raise RuntimeError(
        f"could not start a local klock server on port {port} (exit status "
        f"{process.returncode}; see {log_path}); start one with 'klock serve' and pass --server"
    )


@contextlib.asynccontextmanager
async def _kernel(args: argparse.Namespace) -> AsyncIterator[Klock]:
    token = args.token if args.token is not None else os.environ.get("KLOCK_TOKEN") or None
    if args.server:
        url = args.server
    elif os.environ.get(EMBEDDED_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        _stderr(f"{EMBEDDED_ENV} is set: running an embedded kernel for this client only")
        async with Klock() as klock:
            yield klock
        return
    else:
        url = await ensure_local_server(args.local_port, token=token)
    async with Klock.connect(url, token=token) as klock:
        yield klock


# --------------------------------------------------------------------------------------------
# klock mcp --status / --stop: the local servers klock mcp started.


def _started_servers() -> list[tuple[Path, dict[str, Any], bool]]:
    """Each record of a started local server: its file, its fields, whether it still runs."""
    found = []
    for path in sorted(_state_dir().glob("serve-*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((path, record, _is_klock_serve(pid)))
    return found


def _is_klock_serve(pid: int) -> bool:
    """Whether ``pid`` is alive and is a ``klock serve`` (not a recycled pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():  # not Linux: trust the record
        return True
    try:
        words = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return b"klock_async" in words and b"serve" in words


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait (without polling: a pidfd on Linux) until ``pid`` exits; False on timeout."""
    if not hasattr(os, "pidfd_open"):  # pragma: no cover - not Linux
        return not _is_klock_serve(pid)
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def local_servers(stop: bool) -> int:
    """``klock mcp --status`` (list) or ``--stop`` (SIGTERM and wait); return the exit status."""
    records = _started_servers()
    if not records:
        print(f"no local klock server started by klock mcp (records in {_state_dir()})")
        return 0
    status = 0
    for path, record, running in records:
        pid, url = int(record["pid"]), record.get("url", "?")
        if not running:
            print(f"{url}: pid {pid} is not running any more; record removed")
            path.unlink(missing_ok=True)
        elif not stop:
            print(f"{url}: running, pid {pid}, log {record.get('log', '?')}")
        else:
            os.kill(pid, signal.SIGTERM)
            if _wait_gone(pid, SERVER_START_TIMEOUT):
                print(f"{url}: stopped (pid {pid})")
                path.unlink(missing_ok=True)
            else:
                print(f"{url}: pid {pid} did not stop within {SERVER_START_TIMEOUT:g} s")
                status = 1
    return status


def _default_agent_id() -> str:
    return f"mcp-{socket.gethostname()}-{os.getpid()}"


async def serve_stdio(args: argparse.Namespace) -> None:
    """Serve one MCP client on stdin/stdout until it disconnects, then release its leases."""
    agent_id = args.agent or _default_agent_id()
    async with _kernel(args) as klock:
        agent = await klock.register_agent(agent_id, args.priority)
        tools = AgentTools(klock, agent, args.root, ttl=args.ttl)
        _stderr(f"agent {agent.id!r} (age {agent.ts}) on workspace {tools.files.root}")
        try:
            await create_server(tools).run_stdio_async()
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(KlockError):
                    await tools.aclose()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``klock mcp``."""
    from klock_async.cli import log_level, nonempty, port

    parser.add_argument(
        "--root", default=".", help="workspace root the file tools work in (default: .)"
    )
    parser.add_argument(
        "--agent", default=None, help="agent id (default: mcp-HOSTNAME-PID, one per session)"
    )
    parser.add_argument(
        "--priority", type=int, default=None, help="explicit agent age: lower is older"
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("KLOCK_SERVER_URL") or None,
        help="URL of a running 'klock serve' (default: $KLOCK_SERVER_URL, else the local one)",
    )
    parser.add_argument(
        "--token",
        type=nonempty,
        default=None,
        help="bearer token of the server (default: $KLOCK_TOKEN)",
    )
    parser.add_argument(
        "--local-port",
        type=port,
        default=DEFAULT_LOCAL_PORT,
        help=f"port of the local server found or started without --server (default "
        f"{DEFAULT_LOCAL_PORT})",
    )
    parser.add_argument(
        "--ttl", type=float, default=None, help="lease ttl of file tool calls, in seconds"
    )
    parser.add_argument(
        "--log-level", type=log_level, default="warning", help="debug, info, warning or error"
    )
    manage = parser.add_mutually_exclusive_group()
    manage.add_argument(
        "--status",
        action="store_true",
        help="list the local klock servers that klock mcp started, then exit",
    )
    manage.add_argument(
        "--stop", action="store_true", help="stop the local klock servers it started, then exit"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``klock mcp`` until the client disconnects; return the exit status."""
    from klock_async.logging import configure

    if args.status or args.stop:
        return local_servers(stop=args.stop)

    configure(args.log_level)  # stderr: stdout carries the protocol
    if not Path(args.root).is_dir():
        _stderr(f"the workspace root {args.root!r} is not a directory")
        return 2
    try:
        anyio.run(serve_stdio, args)
    except KlockError as error:
        _stderr(error.message)
        return 1
    except (RuntimeError, OSError) as error:
        _stderr(str(error))
        return 1
    return 0
