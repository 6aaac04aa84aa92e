"""Protected file tools on a workspace root: read, write, edit and list, for one agent.

Every call goes through the kernel. A read holds CONSUMES on the file, a write or an edit holds
MUTATES, a listing holds CONSUMES on the directory, and each call runs in a SERIALIZABLE session
of its own, so:

- two agents never write the same file at once, and a reader never sees half a write;
- a write of a file whose latest version the agent never read (another agent wrote it after the
  agent's last ``read_file``, or the agent never read it at all) is refused with a
  :class:`~klock_async.errors.CausalViolationError` that tells the agent to read the file again.
  Creating a file nobody wrote through the tools is not stale;
- Wait-Die deaths are retried with the kernel's :class:`~klock_async.api.RetryPolicy` (the call's
  unit of work keeps its age, so it cannot starve).

Paths are relative to the workspace root (absolute paths inside the root are accepted too).
Anything that resolves outside the root (``..``, another absolute path, a symlink that leads
out) is refused with :class:`PathOutsideWorkspaceError`. File I/O runs in worker threads through
:mod:`anyio`, so the event loop never blocks on the disk.

:class:`ReadForUpdate` adds a read that keeps MUTATES on the file until the agent writes it,
gives it up or lets its ttl pass, so the thinking between a read and a write is never wasted
on a stale write.

Both the LangChain toolkit and the MCP server are built on :class:`WorkspaceFiles`::

    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", "/path/to/repo")
        text = await files.read_file("src/auth.py")
        await files.edit_file("src/auth.py", "return None", "return user")

Errors (all are :class:`~klock_async.errors.InvalidRequestError`, so nothing was changed)::

    FileToolError
    ├── PathOutsideWorkspaceError   the path resolves outside the workspace root
    ├── WorkspaceFileNotFoundError  no such file
    └── EditMismatchError           old_text not found, or found more than once
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread

from klock_async.api import Klock, Lease, RetryPolicy, Session
from klock_async.clocks import IsolationLevel
from klock_async.errors import (
    CausalViolationError,
    InvalidRequestError,
    KlockError,
    LeaseDied,
    LeaseLostError,
    LeaseNotFoundError,
    UnknownAgentError,
)
from klock_async.model import Predicate, Resource, ResourceType, validate_ttl
from klock_async.rules import overlaps

__all__ = [
    "EditMismatchError",
    "FileToolError",
    "PathOutsideWorkspaceError",
    "ReadForUpdate",
    "WorkspaceFileNotFoundError",
    "WorkspaceFiles",
    "WorkspacePath",
]

T = TypeVar("T")

DEFAULT_MAX_ENTRIES = 1000
"""How many entries ``list_files`` returns at most before it says how many it left out."""


class FileToolError(InvalidRequestError):
    """A file tool refused the request; nothing was changed."""

    code = "file_tool_error"


class PathOutsideWorkspaceError(FileToolError):
    """The path resolves outside the workspace root (``..``, absolute path, symlink)."""

    code = "path_outside_workspace"
    status = 403


class WorkspaceFileNotFoundError(FileToolError):
    """The file (or directory) does not exist in the workspace."""

    code = "file_not_found"
    status = 404


class EditMismatchError(FileToolError):
    """``old_text`` does not occur in the file exactly once."""

    code = "edit_mismatch"
    status = 409


@dataclass(frozen=True, slots=True)
class WorkspacePath:
    """A path inside the workspace, resolved once.

    Attributes:
        relative: the path as the agent sees it: POSIX, relative to the root, ``.`` for the root.
        absolute: the resolved path on disk (symlinks followed).
        resource: the kernel resource leased for it (``FILE:`` + the absolute path).
    """

    relative: str
    absolute: Path
    resource: Resource


async def _call(resource: str, op: Callable[[], Awaitable[Any]]) -> Any:
    return await op()


def _resource_of(resource: str, op: Callable[[], Awaitable[Any]]) -> str:
    return resource


class WorkspaceFiles:
    """Protected file tools on one workspace root, for one agent.

    The agent is registered on first use unless it is registered already. Each call runs in a
    SERIALIZABLE session of its own (so two concurrent calls of the same agent are serialised
    too), or, when ``session=`` is given, inside that session: its other leases then cover the
    call (no conflict with itself), and a Wait-Die death is raised instead of retried, because
    a dying session must give up what it holds before it tries again.

    Args:
        klock: the kernel facade (embedded or connected to a server).
        agent_id: the agent that makes the calls.
        root: the workspace root; must be an existing directory.
        ttl: lease ttl in seconds (heartbeated while a call runs; default: the kernel's).
        retry: retry policy for Wait-Die deaths (default ``RetryPolicy()``).
        encoding: text encoding of the files.
        max_entries: most entries ``list_files`` returns.

    Raises:
        InvalidRequestError: empty agent id, bad ttl or max_entries.
        FileToolError: the root is not an existing directory.
    """

    def __init__(
        self,
        klock: Klock,
        agent_id: str,
        root: str | os.PathLike[str],
        *,
        ttl: float | None = None,
        retry: RetryPolicy | None = None,
        encoding: str = "utf-8",
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if not isinstance(agent_id, str) or not agent_id.strip():
            raise InvalidRequestError("agent_id must be a non-empty string naming the agent")
        if ttl is not None:
            validate_ttl(ttl)
        if not isinstance(max_entries, int) or max_entries < 1:
            raise InvalidRequestError(
                f"max_entries must be a positive integer, not {max_entries!r}"
            )
        real = Path(os.path.realpath(os.fspath(root)))
        if not real.is_dir():
            raise FileToolError(f"workspace root {os.fspath(root)!r} is not an existing directory")
        self._klock = klock
        self.agent_id = agent_id
        self.root = real
        self.encoding = encoding
        self.max_entries = max_entries
        self._ttl = ttl
        self._registered = False
        protect = klock.protected
        policy = retry or RetryPolicy()
        serializable = IsolationLevel.SERIALIZABLE
        self._reading = protect(
            agent=agent_id,
            resource=_resource_of,
            predicate=Predicate.CONSUMES,
            ttl=ttl,
            isolation=serializable,
            retry=policy,
        )(_call)
        self._writing = protect(
            agent=agent_id,
            resource=_resource_of,
            predicate=Predicate.MUTATES,
            ttl=ttl,
            isolation=serializable,
            retry=policy,
        )(_call)

    def __repr__(self) -> str:
        return f"<WorkspaceFiles agent={self.agent_id!r} root={str(self.root)!r}>"

    # ------------------------------------------------------------------ paths

    async def resolve(self, path: str) -> WorkspacePath:
        """Resolve ``path`` (relative to the root, or absolute inside it) to a workspace path.

        Symlinks are followed, so a link that leads out of the workspace is refused.

        Raises:
            FileToolError: the path is not a non-empty string.
            PathOutsideWorkspaceError: the path resolves outside the workspace root.
        """
        if not isinstance(path, str) or not path.strip() or "\x00" in path:
            raise FileToolError(
                f"a path is a non-empty string relative to the workspace root, not {path!r}"
            )
        given = Path(path.strip())
        candidate = given if given.is_absolute() else self.root / given
        resolved = await _resolved(candidate, path)
        if resolved != self.root and not resolved.is_relative_to(self.root):
            raise PathOutsideWorkspaceError(
                f"{path!r} is outside the workspace; use a path relative to the workspace root "
                "that stays inside it"
            )
        relative = resolved.relative_to(self.root).as_posix()
        resource = Resource.of(ResourceType.FILE, resolved.as_posix())
        return WorkspacePath(relative=relative or ".", absolute=resolved, resource=resource)

    # ------------------------------------------------------------------ tools

    async def read_file(self, path: str, *, session: Session | None = None) -> str:
        """Return the text of a file, holding CONSUMES on it (records the read causally).

        Raises:
            PathOutsideWorkspaceError: the path leads outside the workspace.
            WorkspaceFileNotFoundError: no such file.
            FileToolError: a directory, not text in the workspace encoding, or unreadable.
            LeaseDied: ``session`` was given and an older agent holds a conflicting lease.
            RetriesExhaustedError: the call kept dying and ran out of retries.
        """
        target = await self._file_target(path)
        return await self._guard(
            target, Predicate.CONSUMES, lambda: self._read_text(target), session
        )

    async def write_file(self, path: str, content: str, *, session: Session | None = None) -> str:
        """Write ``content`` to a file (creating it and its directories), holding MUTATES.

        Returns a one-line summary for the agent.

        Raises:
            CausalViolationError: the file changed since this agent read it (or it never read
                it): read it again, then redo the change. Nothing was written.
            PathOutsideWorkspaceError: the path leads outside the workspace.
            FileToolError: content is not a string, or the file cannot be written.
            LeaseDied: ``session`` was given and an older agent holds a conflicting lease.
            RetriesExhaustedError: the call kept dying and ran out of retries.
        """
        if not isinstance(content, str):
            raise FileToolError(f"content must be a string, not {type(content).__name__}")
        target = await self._file_target(path)

        async def write() -> str:
            try:
                existed = await anyio.Path(target.absolute).exists()
            except OSError as exc:
                raise FileToolError(f"cannot write {target.relative}: {exc.strerror}") from None
            await self._write_text(target, content)
            verb = "overwrote" if existed else "created"
            size = len(content)
            return f"{verb} {target.relative} ({size} character{'' if size == 1 else 's'})"

        return await self._guard(target, Predicate.MUTATES, write, session)

    async def edit_file(
        self, path: str, old_text: str, new_text: str, *, session: Session | None = None
    ) -> str:
        """Replace the one occurrence of ``old_text`` in a file by ``new_text``, holding MUTATES.

        Returns a one-line summary for the agent.

        Raises:
            CausalViolationError: the file changed since this agent read it (or it never read
                it): read it again, then redo the edit. Nothing was written.
            EditMismatchError: ``old_text`` occurs zero times or more than once.
            WorkspaceFileNotFoundError: no such file.
            PathOutsideWorkspaceError: the path leads outside the workspace.
            FileToolError: empty ``old_text``, identical texts, or an unreadable file.
            LeaseDied: ``session`` was given and an older agent holds a conflicting lease.
            RetriesExhaustedError: the call kept dying and ran out of retries.
        """
        if not isinstance(old_text, str) or not isinstance(new_text, str):
            raise FileToolError("old_text and new_text must be strings")
        if not old_text:
            raise FileToolError(
                "old_text is empty; copy the exact text to replace from read_file "
                "(use write_file to create or overwrite a whole file)"
            )
        if old_text == new_text:
            raise FileToolError("old_text and new_text are the same; there is nothing to change")
        target = await self._file_target(path)

        async def edit() -> str:
            text = await self._read_text(target)
            found = text.count(old_text)
            if found == 0:
                raise EditMismatchError(
                    f"old_text was not found in {target.relative}; read the file again and copy "
                    "the exact text to replace (whitespace included). Nothing was changed."
                )
            if found > 1:
                raise EditMismatchError(
                    f"old_text occurs {found} times in {target.relative}; include more of the "
                    "surrounding lines so that it occurs exactly once. Nothing was changed."
                )
            await self._write_text(target, text.replace(old_text, new_text, 1))
            return f"edited {target.relative}: replaced 1 occurrence"

        return await self._guard(target, Predicate.MUTATES, edit, session)

    async def list_files(
        self, path: str = ".", *, recursive: bool = False, session: Session | None = None
    ) -> list[str]:
        """List a directory of the workspace, holding CONSUMES on it.

        Entries are paths relative to the workspace root, sorted, directories ending in ``/``.
        Recursive listings do not descend into symlinked directories. When there are more than
        ``max_entries``, the last line says how many were left out.

        Raises:
            PathOutsideWorkspaceError: the path leads outside the workspace.
            WorkspaceFileNotFoundError: no such directory.
            FileToolError: the path is a file, or the directory cannot be read.
            LeaseDied: ``session`` was given and an older agent holds a conflicting lease.
            RetriesExhaustedError: the call kept dying and ran out of retries.
        """
        target = await self.resolve(path)

        async def listing() -> list[str]:
            try:
                return await anyio.to_thread.run_sync(
                    _list_directory, target.absolute, self.root, recursive, self.max_entries
                )
            except FileNotFoundError:
                raise WorkspaceFileNotFoundError(
                    f"{target.relative} does not exist in the workspace"
                ) from None
            except NotADirectoryError:
                raise FileToolError(
                    f"{target.relative} is a file, not a directory; use read_file"
                ) from None
            except OSError as exc:
                raise FileToolError(f"cannot list {target.relative}: {exc.strerror}") from None

        return await self._guard(target, Predicate.CONSUMES, listing, session)

    # ------------------------------------------------------------------ internals

    async def _file_target(self, path: str) -> WorkspacePath:
        target = await self.resolve(path)
        if target.absolute == self.root:
            raise FileToolError("that is the workspace root, a directory; name a file inside it")
        return target

    async def _ensure_agent(self) -> None:
        if self._registered:
            return
        try:
            await self._klock.agent(self.agent_id)
        except UnknownAgentError:
            await self._klock.register_agent(self.agent_id)
        self._registered = True

    async def _guard(
        self,
        target: WorkspacePath,
        predicate: Predicate,
        op: Callable[[], Awaitable[T]],
        session: Session | None,
    ) -> T:
        await self._ensure_agent()
        try:
            if session is None:
                run = self._reading if predicate is Predicate.CONSUMES else self._writing
                return cast(T, await run(str(target.resource), op))
            if session.agent_id != self.agent_id:
                raise InvalidRequestError(
                    f"session {session.id!r} belongs to agent {session.agent_id!r}, "
                    f"not to {self.agent_id!r}"
                )
            async with session.lease(target.resource, predicate, ttl=self._ttl):
                return await op()
        except CausalViolationError as violation:
            raise CausalViolationError(
                f"{target.relative} changed since you read it (another agent wrote it after your "
                "last read, or you never read it). Read it again with read_file, then redo your "
                "change on the new content. Nothing was written.",
                path=violation.path,
                agent_id=violation.agent_id,
                agent_clock=violation.agent_clock,
                path_clock=violation.path_clock,
                session_id=violation.session_id,
                seen_version=violation.seen_version,
                version=violation.version,
            ) from None

    async def _still_inside(self, target: WorkspacePath) -> None:
        """Resolve the path again right before the I/O, under the lease.

        A directory swapped for a symlink after the first check must not lead the call out of
        the workspace.

        Raises:
            PathOutsideWorkspaceError: the path now resolves elsewhere.
        """
        if await _resolved(target.absolute, target.relative) != target.absolute:
            raise PathOutsideWorkspaceError(
                f"{target.relative} changed into a link while the call waited; nothing was done"
            )

    async def _read_text(self, target: WorkspacePath) -> str:
        await self._still_inside(target)
        try:
            return await anyio.Path(target.absolute).read_text(encoding=self.encoding)
        except FileNotFoundError:
            raise WorkspaceFileNotFoundError(
                f"{target.relative} does not exist in the workspace; list_files shows what there "
                "is, write_file creates a file"
            ) from None
        except IsADirectoryError:
            raise FileToolError(f"{target.relative} is a directory; use list_files") from None
        except UnicodeDecodeError:
            raise FileToolError(
                f"{target.relative} is not {self.encoding} text; these tools edit text files only"
            ) from None
        except OSError as exc:
            raise FileToolError(f"cannot read {target.relative}: {exc.strerror}") from None

    async def _write_text(self, target: WorkspacePath, content: str) -> None:
        file = anyio.Path(target.absolute)
        try:
            # Checked first, then created one level at a time, each level checked as it is
            # made: a component swapped for a symlink cannot lead a mkdir out of the workspace.
            await self._still_inside(target)
            await anyio.to_thread.run_sync(_make_parents, self.root, target)
            await self._still_inside(target)
            await anyio.to_thread.run_sync(_refuse_hard_link, target)
            await file.write_text(content, encoding=self.encoding)
        except IsADirectoryError:
            raise FileToolError(f"{target.relative} is a directory; name a file") from None
        except OSError as exc:
            raise FileToolError(f"cannot write {target.relative}: {exc.strerror}") from None


async def _resolved(path: Path, shown: str) -> Path:
    """``path`` with every symlink followed; any OS error as a :class:`FileToolError`."""
    try:
        return Path(await anyio.Path(path).resolve())
    except RuntimeError:  # a symlink loop (Python < 3.13)
        raise FileToolError(f"{shown!r} leads into a loop of symbolic links") from None
    except OSError as exc:
        raise FileToolError(f"cannot use the path {shown!r}: {exc.strerror or exc}") from None


def _make_parents(root: Path, target: WorkspacePath) -> None:
    """Create the missing directories above ``target``, one level at a time (worker thread).

    Raises:
        PathOutsideWorkspaceError: a level is a symbolic link (it could lead out).
        FileToolError: a level is a file, or cannot be created.
    """
    current = root
    for part in target.absolute.parent.relative_to(root).parts:
        current = current / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(current)
        info = os.lstat(current)
        if stat.S_ISLNK(info.st_mode):
            raise PathOutsideWorkspaceError(
                f"{current.relative_to(root).as_posix()} became a symbolic link while the call "
                "waited; nothing was written"
            )
        if not stat.S_ISDIR(info.st_mode):
            raise FileToolError(
                f"{current.relative_to(root).as_posix()} is a file, so {target.relative} cannot "
                "be created under it"
            )


def _refuse_hard_link(target: WorkspacePath) -> None:
    """Refuse to write a file that has other names (worker thread).

    A hard link in the workspace may be another name of a file outside it: writing through it
    would change that file.

    Raises:
        FileToolError: the file has more than one hard link.
    """
    try:
        info = os.lstat(target.absolute)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        raise FileToolError(
            f"{target.relative} has {info.st_nlink} hard links: it may be the same file as one "
            "outside the workspace, so it is not written. Copy it to a file of its own first."
        )


def _list_directory(directory: Path, root: Path, recursive: bool, limit: int) -> list[str]:
    """Walk ``directory`` (in a worker thread); paths relative to ``root``, sorted."""
    entries: list[str] = []
    pending = [directory]  # the first scandir raises FileNotFoundError / NotADirectoryError
    while pending:
        current = pending.pop()
        with os.scandir(current) as scan:
            for entry in scan:
                is_dir = entry.is_dir(follow_symlinks=False)
                relative = Path(entry.path).relative_to(root).as_posix()
                entries.append(relative + "/" if is_dir else relative)
                if recursive and is_dir:
                    pending.append(Path(entry.path))
    entries.sort()
    if len(entries) > limit:
        left_out = len(entries) - limit
        return [*entries[:limit], f"... {left_out} more entries not shown; list a subdirectory"]
    return entries


# ---------------------------------------------------------------------- read for update

DEFAULT_UPDATE_TTL = 60.0
"""Seconds a read for update keeps its file while the agent does not touch it."""


@dataclass(slots=True)
class _Hold:
    target: WorkspacePath
    lease: Lease


class ReadForUpdate:
    """Read for update: a read that keeps MUTATES on the file until the agent writes it.

    A read-think-write edit through the plain tools can be refused at the write, after the
    thinking, because another agent wrote the file meanwhile. :meth:`read_file` instead takes
    MUTATES on the file *before* it reads and keeps it (a *hold*) until the same agent writes
    that file (:meth:`written`, called by the tools after a successful write or edit), gives it
    up (:meth:`release`), or ``ttl`` seconds pass without a tool call of the agent on the file
    (each one renews the hold); nobody else can read or write the file meanwhile, so the write
    that ends the hold is never stale. A write after the hold ended is checked as usual.

    Holds are taken in one session of the agent (READ_COMMITTED: taking a hold is not a write,
    the file is read under it), and the agent's tool calls on a held file run in the same
    session with SERIALIZABLE isolation (:meth:`session_for`), observing in the agent's own
    view, so the read and the write are recorded as every file tool's are. While the session
    holds nothing, a Wait-Die death is retried once the blocking lease has ended (the session,
    and its age, are kept); once it holds something, a death is raised: the agent must give up
    what it holds before it waits for more.

    Args:
        files: the agent's workspace tools.
        holds: the session the holds are taken in (default: a new READ_COMMITTED session of
            the agent); tool calls on held files run in a SERIALIZABLE session of the same id.
        ttl: seconds a hold lasts without a tool call of the agent on its file.
        retry: how a death is retried while the session holds nothing (default
            ``RetryPolicy()``).
        holds_others: tells whether the session holds leases besides these holds (e.g. the
            explicit leases of an MCP session); default: never.

    Raises:
        InvalidRequestError: a bad ttl, or a session of another agent.
    """

    def __init__(
        self,
        files: WorkspaceFiles,
        *,
        holds: Session | None = None,
        ttl: float = DEFAULT_UPDATE_TTL,
        retry: RetryPolicy | None = None,
        holds_others: Callable[[], bool] | None = None,
    ) -> None:
        self._ttl = validate_ttl(ttl)
        if holds is not None and holds.agent_id != files.agent_id:
            raise InvalidRequestError(
                f"session {holds.id!r} belongs to agent {holds.agent_id!r}, not to "
                f"{files.agent_id!r}"
            )
        self.files = files
        self._holds_session = holds or Session(
            files._klock, files.agent_id, IsolationLevel.READ_COMMITTED
        )
        self.session = Session(
            files._klock,
            files.agent_id,
            IsolationLevel.SERIALIZABLE,
            session_id=self._holds_session.id,
            agent_view=True,  # reads and writes count in the agent's own view, as every tool's
        )
        self._retry = retry or RetryPolicy()
        self._holds_others = holds_others or (lambda: False)
        self._held: dict[Resource, _Hold] = {}

    @property
    def ttl(self) -> float:
        """Seconds a hold lasts without a tool call of the agent on its file."""
        return self._ttl

    def held(self) -> list[str]:
        """The files this agent holds for update (paths relative to the root), sorted.

        A hold whose ttl passed is listed until the agent next touches the file or calls
        :meth:`release`.
        """
        return sorted(hold.target.relative for hold in self._held.values())

    async def lease_of(self, path: str) -> Lease | None:
        """The lease of this agent's hold on ``path``, if it holds the file for update.

        Raises:
            FileToolError: the path is not a non-empty string.
            PathOutsideWorkspaceError: the path leads outside the workspace.
        """
        hold = self._held.get((await self.files.resolve(path)).resource)
        return hold.lease if hold is not None else None

    async def read_file(self, path: str) -> str:
        """Take MUTATES on a file (waiting for it), then return its text; keep the lease.

        Reading a file already held reads it again under the same hold.

        Raises:
            PathOutsideWorkspaceError: the path leads outside the workspace.
            WorkspaceFileNotFoundError: no such file (nothing is held then).
            FileToolError: a directory, not text in the workspace encoding, or unreadable.
            LeaseDied: this agent holds other files and an older agent holds or awaits this
                one (write or release what you hold, then read again), or the request kept
                dying through every retry of the policy.
        """
        target = await self.files._file_target(path)
        await self.files._ensure_agent()
        fresh = not await self._alive(target.resource)
        if fresh:
            lease = await self._hold(target)
            self._held[target.resource] = _Hold(target, lease)
        try:
            return await self.files.read_file(path, session=self.session)
        except BaseException:
            if fresh:
                with anyio.CancelScope(shield=True):
                    await self._drop(target.resource)
            raise

    async def session_for(self, path: str) -> Session | None:
        """The session to run a tool call on ``path`` in: the holds' session when a live hold
        overlaps the path (so the call does not collide with the agent's own hold), else None.
        """
        if not self._held:
            return None
        try:
            target = (await self.files.resolve(path)).resource
        except KlockError:
            return None  # the tool itself reports the bad path
        for resource in list(self._held):
            if overlaps(resource, target) and await self._alive(resource):
                return self.session
        return None

    async def written(self, path: str) -> None:
        """The agent wrote ``path``: end its hold (the write was recorded by the tool)."""
        if not self._held:
            return
        try:
            resource = (await self.files.resolve(path)).resource
        except KlockError:
            return
        await self._drop(resource)

    async def release(self, path: str | None = None) -> list[str]:
        """Give up the hold on ``path``, or every hold when ``path`` is None; nothing is written.

        Returns:
            The paths released (relative to the root), sorted; those whose ttl had passed are
            left out.

        Raises:
            FileToolError: ``path`` is not held by this agent.
            PathOutsideWorkspaceError: the path leads outside the workspace.
        """
        if path is None:
            resources = list(self._held)
        else:
            resource = (await self.files.resolve(path)).resource
            if resource not in self._held:
                raise FileToolError(
                    f"you hold no read for update of {path!r}; held: "
                    f"{', '.join(self.held()) or 'none'}"
                )
            resources = [resource]
        released = []
        for resource in resources:
            relative = self._held[resource].target.relative
            if await self._drop(resource):
                released.append(relative)
        return sorted(released)

    async def release_lease(self, lease_id: str) -> str | None:
        """Give up the hold whose lease id is ``lease_id``; return its path, None if no hold has
        that id (or its ttl had passed)."""
        for resource, hold in list(self._held.items()):
            if hold.lease.id == lease_id:
                return hold.target.relative if await self._drop(resource) else None
        return None

    async def _hold(self, target: WorkspacePath) -> Lease:
        attempt = 0
        while True:
            try:
                return await self._holds_session.acquire(
                    target.resource, Predicate.MUTATES, ttl=self._ttl
                )
            except LeaseDied as died:
                if self._held or self._holds_others() or attempt >= self._retry.max_retries:
                    raise
                await _wait_for_blocker(self.files._klock, died, self._retry.backoff(attempt))
                attempt += 1

    async def _alive(self, resource: Resource) -> bool:
        """Whether the hold on ``resource`` is still active (and renew it); forget it if not."""
        hold = self._held.get(resource)
        if hold is None:
            return False
        try:
            await hold.lease.heartbeat()  # renews it: the agent is at work on the file
        except (LeaseLostError, LeaseNotFoundError):
            del self._held[resource]
            return False
        return True

    async def _drop(self, resource: Resource) -> bool:
        """Release the hold on ``resource``; return whether it was still active."""
        hold = self._held.pop(resource, None)
        if hold is None:
            return False
        try:
            await hold.lease.release(record_write=False)
        except (LeaseLostError, LeaseNotFoundError):
            return False  # the ttl passed: nothing to give up
        return True


async def _wait_for_blocker(klock: Klock, died: LeaseDied, cap: float) -> None:
    """Wait until the lease that made a request die has ended, at most ``cap`` seconds."""
    if died.blocker_lease_id is None:
        await anyio.sleep(cap)  # the blocker is a queued request: a capped backoff
        return
    with contextlib.suppress(LeaseNotFoundError):  # ended already: retry now
        await klock.backend.wait_ended(died.blocker_lease_id, cap)
