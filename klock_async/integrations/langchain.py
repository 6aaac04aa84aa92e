"""LangChain integration: the ``klock_protected`` tool decorator and protected file tools.

Needs the ``langchain`` extra (``pip install 'klock-async[langchain]'``).

``klock_protected`` takes the parameters of Klock's LangChain integration (``klock_client``,
``agent_id``, ``session_id``, ``resource_type``, ``resource_path_extractor``, ``predicate``,
``ttl_ms``, ``max_retries``) and wraps a tool's sync ``_run`` or async ``_arun`` in a lease::

    class WriteFileTool(BaseTool):
        name: str = "write_file"
        description: str = "Write a file"

        @klock_protected(
            klock_client=klock,  # a Klock, or a blocking klock_async.compat client
            agent_id="coder",
            session_id="refactor",
            resource_type="FILE",
            resource_path_extractor=lambda kwargs: kwargs["path"],
            predicate="MUTATES",
        )
        async def _arun(self, path: str, content: str) -> str: ...

With a :class:`~klock_async.api.Klock` underneath, a waiting request waits in the kernel's queue
(no polling), a Wait-Die death is retried ``max_retries`` times keeping the age of the call's
unit of work, and what still fails reaches the model as a :class:`KlockConflictError` (a
LangChain ``ToolException``) whose message says what happened and what to do.
:class:`KlockFileToolkit` gives an agent ready-made read, write, edit and list tools on a
workspace (see :mod:`klock_async.integrations.files`), where a stale write comes back as "file
changed since you read it; read it again".

Errors raised to LangChain::

    ToolException                 (langchain_core)
    └── KlockToolError            a protected tool call was refused; nothing was changed
        └── KlockConflictError    another agent was in the way (reason: DIE, WAIT, ...)
            └── KlockStaleWriteError  the file changed since the agent read it (reason: STALE)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

try:
    from langchain_core.tools import BaseTool, StructuredTool, ToolException
    from pydantic import BaseModel, Field
except ImportError as _missing:  # pragma: no cover - depends on the environment
    raise ImportError(
        "klock_async.integrations.langchain needs langchain-core: "
        "pip install 'klock-async[langchain]'"
    ) from _missing

from klock_async.api import Klock, RetryPolicy
from klock_async.clocks import IsolationLevel
from klock_async.errors import (
    AcquireTimeoutError,
    CausalViolationError,
    InvalidRequestError,
    KlockError,
    LeaseDied,
    LeaseLostError,
    UnknownAgentError,
)
from klock_async.integrations.files import DEFAULT_UPDATE_TTL, ReadForUpdate, WorkspaceFiles
from klock_async.model import Predicate, Resource, ResourceType

__all__ = [
    "BlockingKlockClient",
    "EditFileInput",
    "KlockConflictError",
    "KlockFileToolkit",
    "KlockStaleWriteError",
    "KlockToolError",
    "ListFilesInput",
    "ReadFileInput",
    "ReleaseFileInput",
    "WriteFileInput",
    "klock_protected",
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

DEFAULT_TTL_MS = 60_000
"""Lease ttl of a protected call when none is given, in milliseconds (as in Klock)."""

DEFAULT_MAX_RETRIES = 10
"""Retries of a protected call after a Wait-Die death when none is given (as in Klock)."""


# --------------------------------------------------------------------------- errors


class KlockToolError(ToolException):
    """A protected tool call was refused by the kernel; nothing was changed.

    The message is written for the model: what happened and what to do next. ``error`` is the
    kernel error behind it.
    """

    def __init__(self, message: str, *, error: KlockError | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error = error


class KlockConflictError(KlockToolError):
    """Another agent was in the way of a protected tool call.

    Attributes:
        agent_id: the agent whose call was refused.
        resource_path: the resource it asked for.
        reason: ``DIE`` (Wait-Die refused it, retries ran out), ``WAIT`` (a blocking client
            answered WAIT every time), ``WAIT_TIMEOUT`` (a wait ran out), ``STALE`` (the
            resource changed since the agent read it) or ``LEASE_LOST`` (the lease ended while
            the tool ran).
        wait_time_ms: how long the kernel suggested to wait, when it said.
    """

    def __init__(
        self,
        message: str,
        *,
        agent_id: str,
        resource_path: str,
        reason: str,
        wait_time_ms: int | None = None,
        error: KlockError | None = None,
    ) -> None:
        super().__init__(message, error=error)
        self.agent_id = agent_id
        self.resource_path = resource_path
        self.reason = reason
        self.wait_time_ms = wait_time_ms


class KlockStaleWriteError(KlockConflictError):
    """The resource changed since the agent last read it; read it again, then redo the change."""


def _tool_error(error: KlockError, agent_id: str, resource: str, tool: str) -> KlockToolError:
    """Translate a kernel error into the exception the model reads."""
    if isinstance(error, CausalViolationError):
        return KlockStaleWriteError(
            error.message,
            agent_id=agent_id,
            resource_path=error.path,
            reason="STALE",
            error=error,
        )
    if isinstance(error, LeaseDied):
        blocker = (
            "another call of yours"
            if error.blocker_agent_id == agent_id
            else f"agent {error.blocker_agent_id!r}, older than you,"
        )
        return KlockConflictError(
            f"Tool {tool} could not run: {blocker} kept working on {error.resource} "
            f"({error.predicate} refused for {agent_id!r}) through every retry. Nothing was "
            "changed. Work on something else for a while or let the other work finish, then "
            f"call {tool} again.",
            agent_id=agent_id,
            resource_path=error.resource,
            reason="DIE",
            wait_time_ms=round(error.retry_after * 1000),
            error=error,
        )
    if isinstance(error, AcquireTimeoutError):
        return KlockConflictError(
            f"Tool {tool} gave up waiting for {resource}: another agent held it too long. "
            f"Nothing was changed. Call {tool} again later.",
            agent_id=agent_id,
            resource_path=resource,
            reason="WAIT_TIMEOUT",
            error=error,
        )
    if isinstance(error, LeaseLostError):
        return KlockConflictError(
            f"Tool {tool} ran longer than its lease on {resource}, so another agent may have "
            "changed it meanwhile. Read it again and redo the change.",
            agent_id=agent_id,
            resource_path=resource,
            reason="LEASE_LOST",
            error=error,
        )
    return KlockToolError(f"Tool {tool} was refused: {error.message}", error=error)


# --------------------------------------------------------------------------- kernel loops


def _kernel_loop(klock: Klock) -> asyncio.AbstractEventLoop:
    # Sync tools run in worker threads; a Klock lives in the event loop that started it.
    loop = klock.loop
    if loop is None or loop.is_closed():
        raise RuntimeError(
            "a sync tool needs a running Klock: enter it first (async with Klock() / "
            "Klock.connect(url)), call the tool with ainvoke, or use a blocking client "
            "(klock_async.compat.KlockClient or KlockHttpClient)"
        )
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError(
            "a sync tool was called on the event loop that runs the Klock, where waiting for a "
            "lease would block the kernel itself; call the tool with ainvoke instead"
        )
    return loop


def _call_in_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


def _run_sync_body_under(
    loop: asyncio.AbstractEventLoop,
    hold: Callable[[Callable[[], Awaitable[Any]]], Coroutine[Any, Any, Any]],
    body: Callable[[], T],
) -> T:
    """Run ``body`` in this thread while ``hold`` keeps the lease in the kernel's loop.

    ``hold(inner)`` acquires, awaits ``inner()`` and releases; ``inner`` tells this thread the
    lease is granted and waits until the body has finished here, so the lease is released only
    after the body, and a body that raised records no write.
    """
    granted: concurrent.futures.Future[asyncio.Future[Any]] = concurrent.futures.Future()

    async def inner() -> Any:
        finished = asyncio.get_running_loop().create_future()
        if granted.done():  # pragma: no cover - the body never raises LeaseDied (see below)
            raise RuntimeError("a protected sync body was retried after it ran")
        granted.set_result(finished)
        return await finished

    outer = asyncio.run_coroutine_threadsafe(hold(inner), loop)
    concurrent.futures.wait([granted, outer], return_when=concurrent.futures.FIRST_COMPLETED)
    if not granted.done():
        return cast(T, outer.result())  # refused before the grant: raises the kernel error
    finished = granted.result()
    try:
        value = body()
    except Exception as exc:
        failure: Exception = exc
        if isinstance(exc, LeaseDied):  # a nested call died: do not rerun this body
            failure = KlockToolError(str(exc), error=exc)
        loop.call_soon_threadsafe(_settle, finished, None, failure)
    except BaseException:  # KeyboardInterrupt, SystemExit: release, then let it go on
        loop.call_soon_threadsafe(_settle, finished, None, RuntimeError("the tool was interrupted"))
        raise
    else:
        loop.call_soon_threadsafe(_settle, finished, value, None)
    return cast(T, outer.result())


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():  # pragma: no cover - cancelled while the body ran
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


# --------------------------------------------------------------------------- blocking clients


@runtime_checkable
class BlockingKlockClient(Protocol):
    """The blocking client surface of the Klock v1 SDK (``klock_async.compat`` implements it).

    ``acquire_lease`` answers ``{"success": True, "lease_id": ...}`` or ``{"success": False,
    "reason": "WAIT" | "DIE", "wait_time": ms}`` without waiting.
    """

    def acquire_lease(
        self,
        agent_id: str,
        session_id: str,
        resource_type: str,
        resource_path: str,
        predicate: str,
        ttl: int,
    ) -> dict[str, Any]:
        """Ask for a lease; never waits."""

    def release_lease(self, lease_id: str) -> bool:
        """Release a lease."""


def _call_session(session_id: str | None, agent_id: str) -> str:
    """A session of its own for one call, named after the work it belongs to."""
    return f"{session_id or agent_id}/{uuid.uuid4().hex[:12]}"


def _v1_acquire(
    client: BlockingKlockClient,
    agent_id: str,
    session_id: str,
    resources: Sequence[Resource],
    predicate: Predicate,
    ttl_ms: int,
    policy: RetryPolicy,
    tool: str,
) -> list[str]:
    """Acquire every resource through a v1 client, retrying WAIT and DIE; all or nothing."""
    attempt = 0
    while True:
        held: list[str] = []
        refusal: dict[str, Any] | None = None
        refused: Resource | None = None
        for resource in resources:
            args = (agent_id, session_id, resource.type.value, resource.path, predicate.value)
            try:
                answer = client.acquire_lease(*args, ttl_ms)
            except UnknownAgentError:
                register = getattr(client, "register_agent", None)
                if register is None:
                    raise
                register(agent_id, None)  # first use: the next age, as with a Klock
                answer = client.acquire_lease(*args, ttl_ms)
            if answer.get("success"):
                held.append(str(answer["lease_id"]))
                continue
            refusal, refused = answer, resource
            break
        if refusal is None:
            return held
        for lease_id in held:  # a dying request keeps nothing (Wait-Die)
            client.release_lease(lease_id)
        reason = str(refusal.get("reason") or "CONFLICT")
        wait_ms = refusal.get("wait_time")
        if attempt >= policy.max_retries:
            raise KlockConflictError(
                f"Tool {tool} could not get {predicate.value} on {refused} for {agent_id!r}: the "
                f"kernel answered {reason} {attempt + 1} times. Nothing was changed. Let the other "
                f"agent finish, then call {tool} again.",
                agent_id=agent_id,
                resource_path=str(refused),
                reason=reason,
                wait_time_ms=int(wait_ms) if isinstance(wait_ms, int | float) else None,
            )
        delay = policy.backoff(attempt)
        if isinstance(wait_ms, int | float) and wait_ms > 0:
            delay = min(delay, wait_ms / 1000)
        # The v1 protocol withdraws a WAIT: the caller chooses when to ask again.
        time.sleep(delay)
        attempt += 1


# --------------------------------------------------------------------------- the decorator


def _named_arguments(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    bound.apply_defaults()
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif name != "self" and kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


def klock_protected(
    klock_client: Klock | BlockingKlockClient,
    agent_id: str,
    session_id: str | None,
    resource_type: ResourceType | str,
    resource_path_extractor: Callable[[dict[str, Any]], str | Sequence[str]],
    predicate: Predicate | str = "MUTATES",
    ttl_ms: int = DEFAULT_TTL_MS,
    max_retries: int = DEFAULT_MAX_RETRIES,
    *,
    isolation: IsolationLevel | str = IsolationLevel.READ_COMMITTED,
) -> Callable[[F], F]:
    """Protect a tool method (sync ``_run`` or async ``_arun``) with a lease.

    Each call acquires ``predicate`` on ``resource_type:path`` for every path the extractor
    returns (all at once), runs the method, and releases. The agent is registered on first use.

    Args:
        klock_client: a :class:`~klock_async.api.Klock` (embedded or connected), or a blocking
            Klock v1 client such as ``klock_async.compat.KlockClient``.
        agent_id: the agent making the call.
        session_id: a name for the work, kept for compatibility with Klock (a blocking client
            names its per-call sessions after it). Every call runs in a session of its own, so
            two concurrent calls of one agent are serialised and a call that dies gives up only
            its own leases.
        resource_type: FILE, SYMBOL, API_ENDPOINT, DATABASE_TABLE or CONFIG_KEY.
        resource_path_extractor: called with the call's arguments by name (``self`` left out);
            returns the resource path, or several.
        predicate: the intent (``MUTATES`` by default).
        ttl_ms: lease ttl in milliseconds (heartbeated while a call runs on a Klock).
        max_retries: retries after Wait-Die refused the call; then :class:`KlockConflictError`.
        isolation: SERIALIZABLE adds causal checks: a write of a version the agent never read
            raises :class:`KlockStaleWriteError` (needs a Klock).

    Raises:
        InvalidRequestError: bad resource type, predicate, ttl_ms, max_retries or isolation, an
            empty agent id, or a client that is neither a Klock nor a blocking client.
    """
    rtype = ResourceType.parse(resource_type)
    pred = Predicate.parse(predicate)
    level = IsolationLevel.parse(isolation)
    if not isinstance(agent_id, str) or not agent_id.strip():
        raise InvalidRequestError("agent_id must be a non-empty string naming the agent")
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
        raise InvalidRequestError(f"ttl_ms must be a positive integer, got {ttl_ms!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise InvalidRequestError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    if not callable(resource_path_extractor):
        raise InvalidRequestError("resource_path_extractor must be a function of the arguments")
    policy = RetryPolicy(max_retries=max_retries)
    if isinstance(klock_client, Klock):
        runner = klock_client.protected(
            agent=agent_id,
            resource=_resource_of,
            predicate=pred,
            ttl=ttl_ms / 1000,
            isolation=level,
            retry=policy,
        )(_call)
    elif isinstance(klock_client, BlockingKlockClient):
        if level is IsolationLevel.SERIALIZABLE:
            raise InvalidRequestError(
                "SERIALIZABLE needs a Klock (async facade); a blocking v1 client has no clocks"
            )
        runner = None
    else:
        raise InvalidRequestError(
            f"klock_client must be a Klock or a blocking Klock client, not {klock_client!r}"
        )

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        def resources_for(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Resource]:
            named = _named_arguments(signature, args, kwargs)
            try:
                found = resource_path_extractor(named)
            except Exception as exc:
                raise InvalidRequestError(
                    "klock_protected: resource_path_extractor raised "
                    f"{type(exc).__name__}: {exc}; it must return the resource path for the "
                    f"tool's arguments {sorted(named)}"
                ) from exc
            paths = [found] if isinstance(found, str) else list(found or ())
            if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
                raise InvalidRequestError(
                    "klock_protected could not resolve a resource path from the tool arguments "
                    f"(the extractor returned {found!r})"
                )
            return [Resource.of(rtype, p) for p in paths]

        def label(resources: list[Resource]) -> str:
            return ", ".join(str(r) for r in resources)

        def tool_name(args: tuple[Any, ...]) -> str:
            owner = args[0] if args else None
            name = getattr(owner, "name", None) if isinstance(owner, BaseTool) else None
            return name if isinstance(name, str) and name else fn.__name__

        async def ensure_agent(klock: Klock) -> None:
            try:
                await klock.agent(agent_id)
            except UnknownAgentError:
                await klock.register_agent(agent_id)

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                resources = resources_for(args, kwargs)
                if runner is None:
                    client = cast(BlockingKlockClient, klock_client)
                    leases = await asyncio.to_thread(
                        _v1_acquire,
                        client,
                        agent_id,
                        _call_session(session_id, agent_id),
                        resources,
                        pred,
                        ttl_ms,
                        policy,
                        tool_name(args),
                    )
                    try:
                        return await fn(*args, **kwargs)
                    finally:
                        for lease_id in leases:
                            await asyncio.to_thread(client.release_lease, lease_id)
                klock = cast(Klock, klock_client)
                try:
                    await ensure_agent(klock)
                    return await runner([str(r) for r in resources], lambda: fn(*args, **kwargs))
                except KlockToolError:
                    raise
                except (LeaseDied, CausalViolationError, AcquireTimeoutError, LeaseLostError) as e:
                    raise _tool_error(e, agent_id, label(resources), tool_name(args)) from e

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            resources = resources_for(args, kwargs)
            if runner is None:
                client = cast(BlockingKlockClient, klock_client)
                leases = _v1_acquire(
                    client,
                    agent_id,
                    _call_session(session_id, agent_id),
                    resources,
                    pred,
                    ttl_ms,
                    policy,
                    tool_name(args),
                )
                try:
                    return fn(*args, **kwargs)
                finally:
                    for lease_id in leases:
                        client.release_lease(lease_id)
            klock = cast(Klock, klock_client)
            loop = _kernel_loop(klock)
            targets = [str(r) for r in resources]

            async def hold(inner: Callable[[], Awaitable[Any]]) -> Any:
                await ensure_agent(klock)
                return await runner(targets, inner)

            try:
                return _run_sync_body_under(loop, hold, lambda: fn(*args, **kwargs))
            except KlockToolError:
                raise
            except (LeaseDied, CausalViolationError, AcquireTimeoutError, LeaseLostError) as e:
                raise _tool_error(e, agent_id, label(resources), tool_name(args)) from e

        return cast(F, sync_wrapper)

    return decorate


async def _call(resource: list[str], op: Callable[[], Awaitable[Any]]) -> Any:
    return await op()


def _resource_of(resource: list[str], op: Callable[[], Awaitable[Any]]) -> list[str]:
    return resource


# --------------------------------------------------------------------------- the toolkit


class ReadFileInput(BaseModel):
    """Arguments of ``read_file``."""

    path: str = Field(description="File path relative to the workspace root.")
    for_update: bool = Field(
        default=False,
        description=(
            "True when you intend to change the file: nobody else can read or change it until "
            "you write it, release it with release_file, or its time runs out."
        ),
    )


class WriteFileInput(BaseModel):
    """Arguments of ``write_file``."""

    path: str = Field(description="File path relative to the workspace root.")
    content: str = Field(description="The complete new content of the file.")


class EditFileInput(BaseModel):
    """Arguments of ``edit_file``."""

    path: str = Field(description="File path relative to the workspace root.")
    old_text: str = Field(description="Exact text to replace; must occur exactly once in the file.")
    new_text: str = Field(description="Text to put in its place.")


class ListFilesInput(BaseModel):
    """Arguments of ``list_files``."""

    path: str = Field(default=".", description="Directory relative to the workspace root.")
    recursive: bool = Field(default=False, description="List subdirectories too.")


class ReleaseFileInput(BaseModel):
    """Arguments of ``release_file``."""

    path: str | None = Field(
        default=None,
        description="A file you read for update; leave it out to release every such file.",
    )


_DESCRIPTIONS = {
    "read_file": (
        "Read a text file of the workspace. Read a file before you change it: a write or edit "
        "of a file that changed since you last read it is refused. With for_update=true the "
        "file stays yours (other agents wait) until you write or edit it, release it with "
        "release_file, or a while passes without you touching it, so your change cannot be "
        "refused; use it when you mean to change the file, and only for files you will change."
    ),
    "write_file": (
        "Create or overwrite a text file of the workspace with the complete new content. If "
        "another agent changed the file since you read it, nothing is written and you are "
        "told to read it again."
    ),
    "edit_file": (
        "Replace one exact occurrence of old_text by new_text in a file of the workspace. If "
        "another agent changed the file since you read it, nothing is written and you are "
        "told to read it again."
    ),
    "list_files": "List the files and directories of a workspace directory (directories end in /).",
    "release_file": (
        "Give up a file you read with for_update=true without changing it (or every such file "
        "when no path is given), so that other agents can use it."
    ),
}


class KlockFileToolkit:
    """Protected read, write, edit, list and release tools on a workspace, for one agent.

    The tools are LangChain ``StructuredTool`` objects with argument schemas; call them with
    ``ainvoke`` (or ``invoke`` from a thread other than the Klock's event loop). They run
    through :class:`~klock_async.integrations.files.WorkspaceFiles`: leases on every call, a
    SERIALIZABLE session per call, Wait-Die retries, and paths confined to the root. A refusal
    (stale write, bad path, missing file, edit mismatch) reaches the model as the tool's answer
    when ``handle_tool_error`` is true, otherwise as a :class:`KlockToolError`.

    ``read_file(path, for_update=True)`` reads for update
    (:class:`~klock_async.integrations.files.ReadForUpdate`): the agent keeps MUTATES on the
    file until it writes or edits it, gives it up with ``release_file``, or ``update_ttl``
    seconds pass without a call on the file; tool calls on a held file run under that hold.

    Args:
        klock: the kernel facade; create the toolkit inside the event loop it runs in.
        agent_id: the agent that uses the tools (registered on first use).
        root: the workspace root directory.
        ttl: lease ttl in seconds (default: the kernel's).
        retry: retry policy for Wait-Die deaths.
        handle_tool_error: give refusals back to the model as text instead of raising.
        update_ttl: seconds a read for update keeps its file without a call on it.

    Raises:
        InvalidRequestError: empty agent id, bad ttl or update_ttl.
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
        handle_tool_error: bool = True,
        update_ttl: float = DEFAULT_UPDATE_TTL,
    ) -> None:
        self.files = WorkspaceFiles(klock, agent_id, root, ttl=ttl, retry=retry)
        self.updates = ReadForUpdate(self.files, ttl=update_ttl, retry=retry)
        self._klock = klock
        self._handle_tool_error = handle_tool_error

    @property
    def agent_id(self) -> str:
        """The agent that uses the tools."""
        return self.files.agent_id

    def get_tools(self) -> list[BaseTool]:
        """The tools: ``read_file``, ``write_file``, ``edit_file``, ``list_files`` and
        ``release_file``."""
        files, updates = self.files, self.updates

        async def read_file(path: str, for_update: bool = False) -> str:
            if for_update:
                return await self._guarded("read_file", path, updates.read_file(path))
            session = await updates.session_for(path)
            return await self._guarded("read_file", path, files.read_file(path, session=session))

        async def write_file(path: str, content: str) -> str:
            session = await updates.session_for(path)
            done = await self._guarded(
                "write_file", path, files.write_file(path, content, session=session)
            )
            await updates.written(path)
            return done

        async def edit_file(path: str, old_text: str, new_text: str) -> str:
            session = await updates.session_for(path)
            done = await self._guarded(
                "edit_file", path, files.edit_file(path, old_text, new_text, session=session)
            )
            await updates.written(path)
            return done

        async def list_files(path: str = ".", recursive: bool = False) -> str:
            session = await updates.session_for(path)
            entries = await self._guarded(
                "list_files", path, files.list_files(path, recursive=recursive, session=session)
            )
            return "\n".join(entries) if entries else "(empty directory)"

        async def release_file(path: str | None = None) -> str:
            released = await self._guarded("release_file", path or ".", updates.release(path))
            return f"released {', '.join(released)}" if released else "held nothing to release"

        schemas: dict[str, type[BaseModel]] = {
            "read_file": ReadFileInput,
            "write_file": WriteFileInput,
            "edit_file": EditFileInput,
            "list_files": ListFilesInput,
            "release_file": ReleaseFileInput,
        }
        tools: list[BaseTool] = []
        for coroutine in (read_file, write_file, edit_file, list_files, release_file):
            name = coroutine.__name__
            tools.append(
                StructuredTool.from_function(
                    func=self._blocking(coroutine),
                    coroutine=coroutine,
                    name=name,
                    description=_DESCRIPTIONS[name],
                    args_schema=schemas[name],
                    handle_tool_error=self._handle_tool_error,
                )
            )
        return tools

    async def _guarded(self, tool: str, path: str, call: Coroutine[Any, Any, T]) -> T:
        try:
            return await call
        except KlockError as error:
            raise _tool_error(error, self.agent_id, path, tool) from error

    def _blocking(self, coroutine: Callable[..., Coroutine[Any, Any, str]]) -> Callable[..., str]:
        klock = self._klock

        @functools.wraps(coroutine)
        def run(*args: Any, **kwargs: Any) -> str:
            return _call_in_loop(_kernel_loop(klock), coroutine(*args, **kwargs))

        return run
