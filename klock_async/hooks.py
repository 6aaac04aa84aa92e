"""Coordination enforced by a coding agent's harness: the core behind ``klock hook``.

Coding agents (Claude Code, Gemini CLI) run hooks around every tool call: a command that reads
the event as JSON on stdin, or (Claude Code) an HTTP hook that POSTs the same JSON. A hook
before a tool call can refuse it. :class:`HookCore` turns those events into kernel calls, so a
model that edits with its built-in tools coordinates without knowing:

- before an edit (Claude Code: Edit, MultiEdit, Write, NotebookEdit), the session acquires
  MUTATES on the file, waiting up to ``wait`` seconds in the queue; then the edit is allowed,
  or refused with one sentence for the model naming who holds the file. The acquire runs in a
  SERIALIZABLE session, so an edit of a file another session changed since this session last
  read it is refused too ("re-read it first"), before anything reaches the disk;
- before a read (Read; Grep and Glob when they name a file), the session records the version it
  is about to see (a clock read);
- after an edit, the write is recorded (the file's version moves on) and the lease is kept
  ``hold`` seconds after the session's last edit of the file, so one session's run of edits is
  not interleaved with another's;
- before a shell command (Bash), the files it writes (:mod:`klock_async.shell`) are leased the
  same way, best effort: what cannot be parsed is let through and logged;
- at the end of a session, everything it holds is released. A session that vanishes without
  saying so loses its leases by their ttl (``hold``), which every edit of the file renews.

The agent is the harness's ``session_id`` (its age is when the server first saw it), and the
kernel session is the same id. The core is transport-neutral: ``POST /hooks/claude-code`` on
``klock serve`` runs it next to the scheduler, and ``klock hook claude-code`` forwards an event
there in one round trip (:mod:`klock_async.hook_command`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from klock_async.backend import Backend
from klock_async.clocks import IsolationLevel
from klock_async.errors import (
    AcquireTimeoutError,
    CausalViolationError,
    InvalidFieldError,
    KlockError,
    LeaseDied,
    LeaseNotFoundError,
    LeaseWouldWait,
    MissingFieldError,
    UnknownAgentError,
)
from klock_async.model import Intent, LeaseInfo, Predicate, Resource, ResourceType
from klock_async.rules import overlaps

__all__ = [
    "CLAUDE_CODE",
    "DEFAULT_HOLD",
    "DEFAULT_WAIT",
    "GEMINI_CLI",
    "HARNESSES",
    "Harness",
    "HookAnswer",
    "HookCore",
    "HookLeases",
    "HookOptions",
    "answer_http",
]

_log = structlog.get_logger("klock_async")

DEFAULT_WAIT = 30.0
"""Seconds an edit waits in the queue for another session's lease before it is refused."""
DEFAULT_HOLD = 60.0
"""Seconds a session keeps a file after its last edit of it (the lease's ttl)."""


@dataclass(frozen=True, slots=True)
class HookOptions:
    """How the hooks behave.

    Attributes:
        wait: seconds an edit waits for another session's lease (0: refuse at once).
        hold: seconds a session keeps a file after its last edit of it.
        fail_open: when klock itself fails, allow the call with a warning instead of
            refusing it.

    Raises:
        InvalidFieldError: ``wait`` negative or ``hold`` not positive (or not finite).
    """

    wait: float = DEFAULT_WAIT
    hold: float = DEFAULT_HOLD
    fail_open: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.wait) and self.wait >= 0):
            raise InvalidFieldError(f"wait must be a number of seconds >= 0, not {self.wait!r}")
        if not (math.isfinite(self.hold) and self.hold > 0):
            raise InvalidFieldError(f"hold must be a number of seconds > 0, not {self.hold!r}")


@dataclass(frozen=True, slots=True)
class HookAnswer:
    """What the hook tells the harness.

    Attributes:
        allow: False refuses the tool call (only meaningful before it runs).
        reason: for a refusal, one sentence for the model: what happened and what to do.
        warning: a note for the user (a fail-open failure, a command that could not be parsed).
    """

    allow: bool = True
    reason: str | None = None
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The harness-neutral JSON form (what ``klock hook`` reads)."""
        return {"allow": self.allow, "reason": self.reason, "warning": self.warning}


class HookLeases:
    """Which lease each session holds on each file it edited: a hint, checked on every use.

    The kernel's lease table stays the truth: a remembered lease is only heartbeated, and one
    that ended (:class:`~klock_async.errors.LeaseNotFoundError`) is forgotten and acquired
    again. The hint spares each hook call a snapshot of every active lease. It keeps the
    ``keep`` most recently active sessions; a session it forgot costs one extra lease (the
    old one ends by its ttl).
    """

    def __init__(self, keep: int = 4096) -> None:
        self.keep = keep
        self._sessions: OrderedDict[str, dict[Resource, str]] = OrderedDict()

    def of(self, session: str) -> dict[Resource, str]:
        """The session's remembered leases (a live dict: the caller updates it)."""
        held = self._sessions.get(session)
        if held is None:
            held = self._sessions[session] = {}
            if len(self._sessions) > self.keep:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(session)
        return held

    def forget(self, session: str) -> None:
        """Drop what is remembered of the session (it ended)."""
        self._sessions.pop(session, None)


@dataclass(frozen=True, slots=True)
class Harness:
    """One coding agent's hook schema: its event names, tool names and answer format.

    Attributes:
        name: the name in ``klock hook NAME`` and ``/hooks/NAME``.
        label: how messages name one of its sessions ("Claude Code session").
        before_tool, after_tool, session_end: its event names.
        edit_tools: tool name -> the ``tool_input`` fields that may name the edited file.
        read_tools: tool name -> the ``tool_input`` fields that may name the file read.
        search_tools: the same for tools that read a file or a directory (Grep, Glob): only a
            path that is an existing file counts as a read.
        shell_tools: tool name -> the ``tool_input`` field holding the command.
    """

    name: str
    label: str
    before_tool: str
    after_tool: str
    session_end: str
    edit_tools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    read_tools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    search_tools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    shell_tools: Mapping[str, str] = field(default_factory=dict)

    def render(self, answer: HookAnswer, event_name: str) -> dict[str, Any]:
        """The JSON body the harness reads from an HTTP hook (or a command's stdout)."""
        body: dict[str, Any] = {}
        if answer.warning:
            body["systemMessage"] = answer.warning
        if not answer.allow:
            if self.name == "claude-code" and event_name == self.before_tool:
                body["hookSpecificOutput"] = {
                    "hookEventName": event_name,
                    "permissionDecision": "deny",
                    "permissionDecisionReason": answer.reason,
                }
            else:
                body["decision"] = "deny" if event_name == self.before_tool else "block"
                body["reason"] = answer.reason
        return body


CLAUDE_CODE = Harness(
    name="claude-code",
    label="Claude Code session",
    before_tool="PreToolUse",
    after_tool="PostToolUse",
    session_end="SessionEnd",
    edit_tools={
        "Edit": ("file_path",),
        "MultiEdit": ("file_path",),
        "Write": ("file_path",),
        "NotebookEdit": ("notebook_path",),
    },
    read_tools={"Read": ("file_path",)},
    search_tools={"Grep": ("path",), "Glob": ("path",)},
    shell_tools={"Bash": "command"},
)
"""Claude Code's hooks (see docs/coding-agents.md for the version of the reference)."""

GEMINI_CLI = Harness(
    name="gemini-cli",
    label="Gemini CLI session",
    before_tool="BeforeTool",
    after_tool="AfterTool",
    session_end="SessionEnd",
    edit_tools={"write_file": ("file_path",), "replace": ("file_path",)},
    read_tools={"read_file": ("file_path", "absolute_path")},
    shell_tools={"run_shell_command": "command"},
)
"""Gemini CLI's command hooks (see docs/coding-agents.md)."""

HARNESSES: Mapping[str, Harness] = {h.name: h for h in (CLAUDE_CODE, GEMINI_CLI)}
"""Every harness ``klock hook`` and ``/hooks/NAME`` know, by name."""


def _text(event: Mapping[str, Any], name: str) -> str:
    value = event.get(name)
    if value is None:
        raise MissingFieldError(f"the hook event has no {name!r}; is this a hook payload?")
    if not isinstance(value, str) or not value.strip():
        raise InvalidFieldError(f"the hook event's {name!r} must be a non-empty string")
    return value


class HookCore:
    """Turns one harness's hook events into kernel calls for its sessions.

    Args:
        backend: the scheduler (``klock serve`` passes its own).
        harness: whose events these are.
        options: wait, hold and fail-open.
        leases: the sessions' remembered leases, shared by the calls on one backend (a fresh
            one by default).
        authorize: called with a session's agent id before anything is done for it; raises
            the refusal when the event's sender may not act for that agent (``klock serve``
            refuses agents with a credential, those of a client session, and every agent
            when it is strict).
    """

    def __init__(
        self,
        backend: Backend,
        harness: Harness,
        options: HookOptions,
        leases: HookLeases | None = None,
        authorize: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        self.harness = harness
        self.options = options
        self.leases = HookLeases() if leases is None else leases
        self.authorize = authorize

    async def handle(self, event: Mapping[str, Any]) -> HookAnswer:
        """Answer one event.

        Raises:
            MissingFieldError, InvalidFieldError: the event is not a hook payload of this
                harness; nothing was changed.
            KlockError: the kernel failed (the caller decides between failing closed and open).
        """
        h = self.harness
        name = _text(event, "hook_event_name")
        session = _text(event, "session_id")
        if self.authorize is not None:
            self.authorize(session)
        if name == h.session_end:
            return await self._end(session)
        if name not in (h.before_tool, h.after_tool):
            return HookAnswer()
        tool = _text(event, "tool_name")
        tool_input = event.get("tool_input")
        if not isinstance(tool_input, Mapping):
            raise InvalidFieldError("the hook event's 'tool_input' must be an object")
        cwd = event.get("cwd")
        cwd = cwd if isinstance(cwd, str) and os.path.isabs(cwd) else None
        before = name == h.before_tool
        if tool in h.edit_tools:
            path = self._path(tool_input, h.edit_tools[tool], cwd, required=True)
            assert path is not None
            paths: Sequence[str] = (path,)
            if before:
                return await self._take(session, paths, check_reads=True, cwd=cwd)
            return await self._wrote(session, paths)
        if tool in h.read_tools or tool in h.search_tools:
            fields = h.read_tools.get(tool) or h.search_tools[tool]
            path = self._path(tool_input, fields, cwd, required=False)
            if (
                before
                and path is not None
                and (tool in h.read_tools or await anyio.Path(path).is_file())
            ):
                await self._read(session, path)
            return HookAnswer()
        if tool in h.shell_tools:
            return await self._shell(session, tool_input, h.shell_tools[tool], cwd, before)
        return HookAnswer()

    # ------------------------------------------------------------------ events

    async def _end(self, session: str) -> HookAnswer:
        # Each edit's write was recorded after the tool call: the holds it leaves record none.
        released = 0
        for lease_id in list(self.leases.of(session).values()):
            with contextlib.suppress(LeaseNotFoundError):  # its hold ran out already
                await self.backend.release(lease_id, session, record_write=False)
                released += 1
        self.leases.forget(session)
        with contextlib.suppress(UnknownAgentError):  # a session that never edited anything
            released += await self.backend.release_session(session, session)
        _log.info("hook.session_end", agent=session, released=released)
        return HookAnswer()

    async def _read(self, session: str, path: str) -> None:
        await self.backend.register_agent(session, None)
        await self.backend.clock_read(str(Resource.of(ResourceType.FILE, path)), session)

    async def _shell(
        self,
        session: str,
        tool_input: Mapping[str, Any],
        key: str,
        cwd: str | None,
        before: bool,
    ) -> HookAnswer:
        command = tool_input.get(key)
        if not isinstance(command, str):
            raise InvalidFieldError(f"the shell tool's {key!r} must be a string")
        if cwd is None:
            _log.warning("hook.shell_skipped", agent=session, reason="no absolute cwd")
            return HookAnswer()
        try:
            from klock_async.shell import write_targets

            writes = write_targets(command, cwd)
        except ImportError:
            _log.warning(
                "hook.shell_skipped",
                agent=session,
                reason="the shell parser is missing: pip install 'klock-async[hooks]'",
            )
            return HookAnswer()
        if not writes.parsed or writes.unresolved:
            _log.warning(
                "hook.shell_unresolved",
                agent=session,
                command=command,
                parsed=writes.parsed,
                unresolved=list(writes.unresolved),
            )
        if not writes.paths:
            return HookAnswer()
        if before:
            return await self._take(session, writes.paths, check_reads=False, cwd=cwd)
        return await self._wrote(session, writes.paths)

    async def _take(
        self, session: str, paths: Sequence[str], *, check_reads: bool, cwd: str | None
    ) -> HookAnswer:
        """Hold MUTATES on every path for ``hold`` seconds, or say why not."""
        backend = self.backend
        options = self.options
        await backend.register_agent(session, None)
        resources = [Resource.of(ResourceType.FILE, path) for path in paths]
        held = self.leases.of(session)
        missing = []
        for resource in resources:
            lease_id = held.get(resource)
            if lease_id is None:
                missing.append(resource)
                continue
            try:  # ours already: nobody else wrote it since, so no read check either
                await backend.heartbeat(lease_id, session, options.hold)
            except LeaseNotFoundError:
                held.pop(resource, None)  # it ended (its hold ran out, or it was revoked)
                missing.append(resource)
        if not missing:
            return HookAnswer()
        isolation = IsolationLevel.SERIALIZABLE if check_reads else IsolationLevel.READ_COMMITTED
        intents = tuple(Intent(resource, Predicate.MUTATES) for resource in missing)
        try:
            granted = await self._acquire(session, intents, isolation)
        except CausalViolationError as stale:
            return self._stale(session, stale, cwd)
        except AcquireTimeoutError:
            return await self._held(session, missing, cwd, waited=True)
        except (LeaseDied, LeaseWouldWait):
            return await self._held(session, missing, cwd, waited=False)
        for info in granted:
            held[info.resource] = info.id
            _log.info(
                "hook.leased",
                agent=session,
                resource=str(info.resource),
                predicate=info.predicate.value,
                token=info.token,
            )
        return HookAnswer()

    async def _acquire(
        self,
        session: str,
        intents: tuple[Intent, ...],
        isolation: IsolationLevel,
    ) -> tuple[LeaseInfo, ...]:
        """Acquire now, or wait up to ``wait`` seconds in the queue.

        A session that holds other files and dies (Wait-Die) is refused at once: it must not
        wait while holding. One that holds nothing waits for the lease that blocks it to end
        and asks again, until its time runs out (its age is kept, so it cannot starve).
        """
        backend = self.backend
        options = self.options
        try:  # the common case answers at once; only a conflict waits (and says so)
            return await backend.acquire(
                session,
                session,
                intents,
                ttl=options.hold,
                wait=False,
                timeout=None,
                isolation=isolation,
                agent_view=True,  # reads and writes are recorded in the agent's own view
            )
        except (LeaseDied, LeaseWouldWait):
            if options.wait <= 0:
                raise
        _log.info(
            "hook.waiting",
            agent=session,
            resources=[str(intent.resource) for intent in intents],
            predicate=Predicate.MUTATES.value,
            wait=options.wait,
        )
        clock = anyio.current_time
        deadline = clock() + options.wait
        while True:
            try:
                return await backend.acquire(
                    session,
                    session,
                    intents,
                    ttl=options.hold,
                    wait=True,
                    timeout=max(deadline - clock(), 1e-3),
                    isolation=isolation,
                    agent_view=True,
                )
            except LeaseDied as died:
                if died.blocker_lease_id is None or await self._holds_any(session):
                    raise
                left = deadline - clock()
                if left <= 0:
                    raise AcquireTimeoutError(f"waited {options.wait:g} s in vain") from None
                with contextlib.suppress(LeaseNotFoundError):  # ended already: ask again
                    await backend.wait_ended(died.blocker_lease_id, left)

    async def _wrote(self, session: str, paths: Sequence[str]) -> HookAnswer:
        """Record the writes and keep each file ``hold`` seconds from now."""
        backend = self.backend
        await backend.register_agent(session, None)
        resources = [Resource.of(ResourceType.FILE, path) for path in paths]
        for resource in resources:
            await backend.clock_write(str(resource), session, strict=False)
        held = self.leases.of(session)
        for resource in resources:
            lease_id = held.get(resource)
            try:
                if lease_id is None:
                    raise LeaseNotFoundError(f"no lease of {session} on {resource}")
                await backend.heartbeat(lease_id, session, self.options.hold)
            except LeaseNotFoundError:  # e.g. it ran out while a permission prompt was open
                held.pop(resource, None)
                _log.warning("hook.write_unleased", agent=session, resource=str(resource))
        return HookAnswer()

    # ------------------------------------------------------------------ lookups and messages

    async def _holds_any(self, session: str) -> bool:
        """Whether the session holds any lease (a snapshot: only on the contended path)."""
        return any(info.agent_id == session for info in await self.backend.leases())

    def _path(
        self,
        tool_input: Mapping[str, Any],
        fields: tuple[str, ...],
        cwd: str | None,
        *,
        required: bool,
    ) -> str | None:
        for name in fields:
            value = tool_input.get(name)
            if value is None:
                continue
            if not isinstance(value, str) or not value.strip() or "\x00" in value:
                raise InvalidFieldError(f"the tool's {name!r} must be a non-empty path")
            if not os.path.isabs(value):
                if cwd is None:
                    raise InvalidFieldError(
                        f"the tool's {name!r} is relative ({value!r}) and the event has no "
                        "absolute 'cwd' to resolve it against"
                    )
                value = os.path.join(cwd, value)
            return os.path.normpath(value)
        if required:
            raise MissingFieldError(f"the tool input names no file (expected one of {fields})")
        return None

    def _show(self, resource: Resource | str, cwd: str | None) -> str:
        path = resource.path if isinstance(resource, Resource) else Resource.parse(resource).path
        if cwd is not None and path.startswith(cwd.rstrip("/") + "/"):
            return os.path.relpath(path, cwd)
        return path

    def _who(self, agent_id: str) -> str:
        return f"{self.harness.label} {agent_id[:8]}"

    async def _held(
        self, session: str, wanted: Sequence[Resource], cwd: str | None, *, waited: bool
    ) -> HookAnswer:
        holders = [
            info
            for info in await self.backend.leases()
            if info.agent_id != session and any(overlaps(info.resource, r) for r in wanted)
        ]
        if waited:
            advice = "work on something else and retry this change later"
            prefix = f"after waiting {self.options.wait:g} s, "
        elif self.options.wait > 0:
            advice = "this session holds other files, so it may not wait: retry this change later"
            prefix = ""
        else:
            advice = "work on something else and retry this change later"
            prefix = ""
        if holders:
            holder = min(holders, key=lambda info: info.expires_at)
            until = time.strftime("%H:%M:%S", time.gmtime(holder.expires_at))
            what = (
                f"{self._show(holder.resource, cwd)} is still being changed by "
                f"{self._who(holder.agent_id)}, which holds it until about {until} UTC"
            )
        else:
            names = ", ".join(self._show(r, cwd) for r in wanted)
            what = f"{names} is still claimed by another session"
        _log.info("hook.denied", agent=session, resources=[str(r) for r in wanted], why="held")
        return HookAnswer(allow=False, reason=f"klock: {prefix}{what}; {advice}.")

    def _stale(self, session: str, stale: CausalViolationError, cwd: str | None) -> HookAnswer:
        writers = sorted(
            agent
            for agent, count in stale.path_clock.items()
            if agent != session and count > stale.agent_clock.get(agent, 0)
        )
        by = f" by {self._who(writers[0])}" if writers else " by another session"
        reason = (
            f"klock: {self._show(stale.path, cwd)} was changed{by} since this session last read "
            "it; re-read it first, then redo this change on its current content."
        )
        _log.info("hook.denied", agent=session, resource=stale.path, why="stale")
        return HookAnswer(allow=False, reason=reason)


def _number(query: Mapping[str, str], name: str, default: float) -> float:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidFieldError(f"query parameter {name!r} must be a number, not {raw!r}") from None


def _flag(query: Mapping[str, str], name: str) -> bool:
    raw = query.get(name, "0").lower()
    if raw not in ("0", "1", "true", "false"):
        raise InvalidFieldError(f"query parameter {name!r} must be 1 or 0, not {raw!r}")
    return raw in ("1", "true")


async def answer_http(
    backend: Backend,
    harness_name: str,
    query: Mapping[str, str],
    event: Mapping[str, Any],
    authorize: Callable[[str], None] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Answer ``POST /hooks/NAME``: return ``(form, body)``.

    Query parameters: ``wait`` and ``hold`` (seconds), ``fail_open`` (1 or 0), and ``mode``:
    ``command`` answers the harness-neutral :meth:`HookAnswer.as_dict` (what ``klock hook``
    reads; form ``"command"``), anything else the harness's own JSON (form ``"native"``). In
    native form every failure becomes an answer, since an HTTP hook that fails lets the call
    through: a refusal, or with ``fail_open=1`` an allowance with a warning. ``authorize``:
    see :class:`HookCore`.

    Raises:
        InvalidFieldError: unknown harness or bad query parameters.
        KlockError: in command form, whatever the core raised (``klock hook`` exits 2 on it).
    """
    harness = HARNESSES.get(harness_name)
    if harness is None:
        raise InvalidFieldError(f"no hooks for {harness_name!r}; known: {sorted(HARNESSES)}")
    options = HookOptions(
        wait=_number(query, "wait", DEFAULT_WAIT),
        hold=_number(query, "hold", DEFAULT_HOLD),
        fail_open=_flag(query, "fail_open"),
    )
    core = HookCore(backend, harness, options, _leases_of(backend), authorize)
    if query.get("mode") == "command":
        return "command", (await core.handle(event)).as_dict()
    event_name = event.get("hook_event_name")
    try:
        answer = await core.handle(event)
    except KlockError as error:
        answer = _failure(error.message, options.fail_open)
    except Exception as error:  # a bug must not let an edit through unchecked
        _log.error("hook.error", error=repr(error))
        answer = _failure(f"internal error {error!r}", options.fail_open)
    return "native", harness.render(answer, event_name if isinstance(event_name, str) else "")


_LEASES: weakref.WeakKeyDictionary[Backend, HookLeases] = weakref.WeakKeyDictionary()


def _leases_of(backend: Backend) -> HookLeases:
    """The remembered leases of the hooks served by ``backend`` (one set per scheduler)."""
    leases = _LEASES.get(backend)
    if leases is None:
        leases = _LEASES[backend] = HookLeases()
    return leases


def _failure(message: str, fail_open: bool) -> HookAnswer:
    if fail_open:
        return HookAnswer(warning=f"klock could not check this call ({message}); let through.")
    return HookAnswer(
        allow=False,
        reason=f"klock could not check this call, so it is blocked: {message}. Retry it, and "
        "tell the user if this persists.",
    )
