"""The scheduler actor: the one task that owns every agent, lease, queue, counter and clock.

Callers never touch state. They post a message carrying its own reply future to the mailbox
and await the future (pykka's ``Envelope(message, reply_to)``). The actor drains the mailbox
in batches, applies the pure rules of :mod:`klock_async.rules`, and, when a journal is
attached, commits one transaction per batch before it resolves the batch's futures (group
commit). A WAIT is a parked future in the resource's queue, resolved by the release, expiry or
revocation that frees it: nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from klock_async import events as ev
from klock_async import rules
from klock_async.backend import ClockStatus
from klock_async.clocks import IsolationLevel, StaleWrite, VectorClock, VectorClockManager
from klock_async.errors import (
    AcquireTimeoutError,
    AgentExistsError,
    CausalViolationError,
    EvictedError,
    InvalidRequestError,
    InvalidResourceError,
    KernelClosedError,
    KlockError,
    LeaseDied,
    LeaseNotFoundError,
    LeaseWouldWait,
    NotLeaseOwnerError,
    UnknownAgentError,
)
from klock_async.events import EventBuffer, EventStream
from klock_async.ids import new_lease_id
from klock_async.logging import get_logger, info_logger
from klock_async.model import (
    AgentInfo,
    Intent,
    LeaseInfo,
    LeaseState,
    Predicate,
    Resource,
    Statistics,
    to_ms,
    validate_ttl,
)

__all__ = ["Journal", "RecoveredState", "Scheduler"]

_Future = asyncio.Future
# A lease's end mark: empty while the lease is active; the actor appends the final state when
# it ends, and nothing else writes to it. The client side reads it (release_nowait) to learn,
# without asking, that a lease it handed out is gone. (A future would do the same, at several
# times the cost of an empty list, on every grant.)
_EndMark = list[LeaseState]
# What the actor answers a granted request with, per lease: the snapshot and its end mark.
_Grant = tuple[LeaseInfo, _EndMark]
_READ = Predicate.CONSUMES
_SERIALIZABLE = IsolationLevel.SERIALIZABLE
_RELEASED = LeaseState.RELEASED
_GRANTED = rules.Decision.GRANT


# Events. Every state change goes through _emit (directly or through _lease_event and
# _request_event): to the log when the application's logging keeps INFO events, to the
# kernel's event buffer when someone reads it. Callers check Scheduler._observed first, so a
# kernel nobody watches builds no event at all.

# Event attribute -> the field name the log line uses (agent, session, lease, ...).
_LOG_KEYS = {
    "session_id": "session",
    "lease_id": "lease",
    "request_id": "request",
    "blocker_agent_id": "blocker",
    "blocker_lease_id": "blocker_lease",
}


def _emit(logger: Any | None, events: EventBuffer, name: str, agent_id: str, **fields: Any) -> None:
    """Publish one event: to ``logger`` (None: not logged) and to ``events`` when recording."""
    if logger is not None:
        logger.info(name, agent=agent_id, **{_LOG_KEYS.get(k, k): v for k, v in fields.items()})
    if events.recording:
        events.publish(name, agent_id, **fields)


def _lease_event(
    logger: Any | None, events: EventBuffer, name: str, lease: _Lease, **fields: Any
) -> None:
    """One per-lease event with the fields every lease event carries."""
    if lease.request_id:
        fields["request_id"] = lease.request_id
    _emit(
        logger,
        events,
        name,
        lease.agent_id,
        session_id=lease.session_id,
        resource=str(lease.resource),
        predicate=lease.predicate.value,
        token=lease.token,
        lease_id=lease.id,
        **fields,
    )


def _request_event(
    logger: Any | None, events: EventBuffer, name: str, request: _Request, **fields: Any
) -> None:
    """One per-request event: its first intent as resource/predicate, all of them as intents."""
    first = request.intents[0]
    _emit(
        logger,
        events,
        name,
        request.agent_id,
        session_id=request.session_id,
        resource=str(first.resource),
        predicate=first.predicate.value,
        request_id=request.id,
        intents=[
            {"resource": str(i.resource), "predicate": i.predicate.value} for i in request.intents
        ],
        **fields,
    )


def _write_refused(events: EventBuffer, stale: StaleWrite) -> None:
    """The ``write.refused`` event: a warning in the log whatever the level of lease events."""
    fields = {
        "resource": stale.path,
        "agent_clock": stale.agent_clock.as_dict(),
        "path_clock": stale.path_clock.as_dict(),
    }
    get_logger().warning(ev.WRITE_REFUSED, agent=stale.agent_id, **fields)
    if events.recording:
        events.publish(ev.WRITE_REFUSED, stale.agent_id, **fields)


# What rules.wait_die answers when nothing blocks (the common case, decided without a call).
_GRANT: rules.Verdict[Any] = rules.Verdict(rules.Decision.GRANT)
_ENDED_EVENT = {
    LeaseState.RELEASED: ev.LEASE_RELEASED,
    LeaseState.EXPIRED: ev.LEASE_EXPIRED,
    LeaseState.REVOKED: ev.LEASE_REVOKED,
}
_ENDED_COUNTER = {
    LeaseState.RELEASED: "releases",
    LeaseState.EXPIRED: "expiries",
    LeaseState.REVOKED: "revocations",
}

_IDLE_SLOTS = 1024  # empty resource slots kept for reuse (see Scheduler._idle_slot)
_LATER_SWEEP = 1024  # Scheduler._later is swept of ended leases' entries past this size
_NEVER = float("inf")
_HELD_SWEEP = 1024  # the client side's note of held leases is swept of ended ones past this size
_LOST_MEMORY = 4096  # expired or revoked leases whose final state a late watcher can still learn


# --------------------------------------------------------------------------------------------
# Durable journal interface (implemented by klock_async.journal)


@dataclass(slots=True)
class RecoveredState:
    """What a journal hands back on start: enough to continue exactly where it stopped."""

    agents: list[AgentInfo] = field(default_factory=list)
    leases: list[LeaseInfo] = field(default_factory=list)
    last_token: int = 0
    last_agent_ts: int = 0
    path_clocks: dict[str, dict[str, int]] = field(default_factory=dict)
    agent_clocks: dict[str, dict[str, int]] = field(default_factory=dict)
    conflict_count: int = 0


class Journal(Protocol):
    """Durable record of the scheduler's state, written by the actor only.

    The ``record_*`` calls only buffer; :meth:`commit` writes the buffer in one transaction
    and returns when it is durable. The actor resolves a batch's replies only after that.
    """

    def load(self) -> RecoveredState:
        """Read the state left by the previous run."""

    def record_agent(self, agent: AgentInfo) -> None:
        """Buffer a registered agent."""

    def record_lease(self, lease: LeaseInfo) -> None:
        """Buffer a granted or changed lease (insert or replace by id)."""

    def record_clocks(
        self,
        path: str,
        path_clock: VectorClock,
        agent_id: str,
        agent_clock: VectorClock,
        conflict_count: int,
    ) -> None:
        """Buffer the clocks a clock operation changed."""

    def record_counters(self, last_token: int, last_agent_ts: int) -> None:
        """Buffer the highest fencing token and agent age handed out."""

    async def commit(self) -> None:
        """Write everything buffered in one transaction."""

    def close(self) -> None:
        """Release the database."""


# --------------------------------------------------------------------------------------------
# Messages: frozen values, each with its own reply slot.


@dataclass(frozen=True, slots=True)
class _RegisterAgent:
    agent_id: str
    priority: int | None
    reply: asyncio.Future[Any]


# The messages of every acquire+release pair are not frozen: a frozen dataclass's __init__
# sets each field with object.__setattr__ (about 1 us for _Acquire's eight), a plain one with
# a slot store.
@dataclass(slots=True)
class _Acquire:
    """A request for leases, all or none.

    The actor keeps the message itself as the request it decides and queues (``_Request``):
    on arrival it sets ``ts`` to the agent's age, and nothing else ever changes it.
    """

    id: int
    agent_id: str
    session_id: str
    intents: tuple[Intent, ...]
    ttl: float
    wait: bool
    isolation: IsolationLevel
    reply: asyncio.Future[Any]
    ts: int = 0


_Request = _Acquire


@dataclass(frozen=True, slots=True)
class _Withdraw:
    request_id: int
    agent_id: str
    session_id: str


@dataclass(slots=True)  # not frozen: see _Acquire
class _Release:
    lease_id: str
    agent_id: str | None
    record_write: bool
    reply: asyncio.Future[Any]


@dataclass(slots=True)  # not frozen: see _Acquire
class _Drop:
    """A release that wants no answer (see Scheduler.release)."""

    lease_id: str


@dataclass(frozen=True, slots=True)
class _Heartbeat:
    lease_id: str
    agent_id: str | None
    ttl: float | None
    reply: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _ReleaseSession:
    agent_id: str
    session_id: str
    reply: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _Revoke:
    lease_id: str | None
    agent_id: str | None
    reply: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _WatchLease:
    lease_id: str
    reply: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _Query:
    what: str
    reply: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _ClockRead:
    path: str
    agent_id: str
    reply: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _ClockWrite:
    path: str
    agent_id: str
    strict: bool
    reply: asyncio.Future[Any]


# --------------------------------------------------------------------------------------------
# Internal records: mutable, owned by the actor, never handed out.


class _Agent:
    __slots__ = ("id", "ts")

    def __init__(self, agent_id: str, ts: int) -> None:
        self.id = agent_id
        self.ts = ts


class _Lease:
    __slots__ = (
        "agent_id",
        "deadline",
        "ended",
        "expires_at",
        "id",
        "predicate",
        "request_id",
        "resource",
        "session_id",
        "token",
        "ts",
        "ttl",
    )

    def __init__(
        self,
        lease_id: str,
        agent_id: str,
        ts: int,
        session_id: str,
        resource: Resource,
        predicate: Predicate,
        token: int,
        ttl: float,
        expires_at: float,
        deadline: float,
        request_id: int,
        ended: _EndMark,
    ) -> None:
        self.id = lease_id
        self.agent_id = agent_id
        self.ts = ts
        self.session_id = session_id
        self.resource = resource
        self.predicate = predicate
        self.token = token
        self.ttl = ttl
        self.expires_at = expires_at
        self.deadline = deadline
        self.request_id = request_id
        self.ended = ended

    def info(self, state: LeaseState = LeaseState.ACTIVE) -> LeaseInfo:
        # The same frozen value LeaseInfo(...) builds, with its slots set directly: see
        # _INFO_SETTERS.
        info: LeaseInfo = _new_object(LeaseInfo)
        _set_id(info, self.id)
        _set_agent_id(info, self.agent_id)
        _set_session_id(info, self.session_id)
        _set_resource(info, self.resource)
        _set_predicate(info, self.predicate)
        _set_token(info, self.token)
        _set_ttl(info, self.ttl)
        _set_expires_at(info, self.expires_at)
        _set_state(info, state)
        return info


# A LeaseInfo snapshot is taken at every grant and every release. The frozen dataclass's
# generated __init__ sets each field through object.__setattr__ (about 1 us for nine fields);
# calling the slots' own descriptors builds the same frozen value in half the time. The check
# keeps _Lease.info() in step with the fields of LeaseInfo.
_INFO_FIELDS = (
    "id",
    "agent_id",
    "session_id",
    "resource",
    "predicate",
    "token",
    "ttl",
    "expires_at",
    "state",
)
if tuple(f.name for f in fields(LeaseInfo)) != _INFO_FIELDS:  # pragma: no cover - a guard
    raise TypeError("LeaseInfo's fields changed: update _Lease.info() and _INFO_FIELDS")
_new_object = object.__new__
(
    _set_id,
    _set_agent_id,
    _set_session_id,
    _set_resource,
    _set_predicate,
    _set_token,
    _set_ttl,
    _set_expires_at,
    _set_state,
) = _INFO_SETTERS = tuple(LeaseInfo.__dict__[name].__set__ for name in _INFO_FIELDS)


class _Slot:
    """Everything attached to one resource: its active leases and its queued requests."""

    __slots__ = ("leases", "waiters")

    def __init__(self) -> None:
        self.leases: dict[str, _Lease] = {}
        # request id -> (request, the predicate it wants on this resource)
        self.waiters: dict[int, tuple[_Request, Predicate]] = {}


_PENDING = object()  # a handler's answer when the reply is parked (WAIT)


class Scheduler:
    """The embedded scheduler: an actor task plus the client methods that message it.

    It implements :class:`~klock_async.backend.Backend`. Create it inside a running event loop,
    ``await start()``, and ``await aclose()`` when done (the :class:`~klock_async.Klock` facade
    does both).

    Args:
        journal: optional durable journal (server mode); recovered from on start.
        clock: wall-clock source for ``expires_at`` (seconds since the epoch).
    """

    # Invariants (checked by tests through check_invariants()):
    # - every _Lease in _leases is in exactly _slots[lease.resource].leases and in
    #   _sessions[(agent, session)]; released, expired and revoked leases are in none of them;
    # - every queued _Request is in _queued and in the waiters of the slot of each of its
    #   intents, and nowhere else; a request is never both queued and granted;
    # - no two active leases of different sessions conflict (rules.intents_conflict);
    # - every queued request is strictly older than each of its blockers (Wait-Die);
    # - _under[r] is exactly the set of resources with a slot strictly below r;
    # - a slot exists only while it has leases or waiters, or is one of the last _IDLE_SLOTS
    #   emptied (in _idle, in the order they emptied);
    # - _last_token only grows; each grant takes the next value.

    def __init__(
        self, *, journal: Journal | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._journal = journal
        self._wall = clock
        self._agents: dict[str, _Agent] = {}
        self._leases: dict[str, _Lease] = {}
        # Indexes are keyed by Resource.key (the "TYPE:path" string, hashed in C).
        self._slots: dict[str, _Slot] = {}
        self._under: dict[str, set[str]] = {}  # key -> keys with a slot strictly below it
        self._idle: dict[str, Resource] = {}  # empty slots kept for reuse, oldest first
        self._sessions: dict[tuple[str, str], dict[str, _Lease]] = {}
        self._queued: dict[int, _Request] = {}
        # Expiry: a heap of (deadline, lease id), and the deadlines noted since the timer was
        # armed that fall at or after it (the armed timer covers them; they join the heap when
        # it fires). A grant appends to a list instead of pushing onto a heap that its release
        # would leave a stale entry in. Entries of ended or extended leases are dropped lazily.
        self._expiry: list[tuple[float, str]] = []
        self._later: list[tuple[float, str]] = []
        self._later_limit = _LATER_SWEEP
        self._watchers: dict[str, list[asyncio.Future[Any]]] = {}
        # agent -> {lease id: the path clock at the grant of a SERIALIZABLE CONSUMES it holds}.
        # The read joins the agent's clock when its holder releases the lease, not at grant: a
        # grant its caller never saw (withdrawn after a cancel) must not count as a read.
        self._unmerged_reads: dict[str, dict[str, VectorClock]] = {}
        self._lost: dict[str, LeaseInfo] = {}  # the last _LOST_MEMORY expired/revoked leases
        self._clocks = VectorClockManager()
        self._last_token = 0
        self._last_agent_ts = 0
        self._request_ids = itertools.count(1)
        # The logger that keeps INFO events (None: none does) and whether anything observes
        # events (that logger, or a reader of _events); both refreshed at each batch's start.
        self._logger: Any = None
        self._observed = False
        self._events = EventBuffer()
        self._counts = dict.fromkeys(
            (
                "grants",
                "waits",
                "deaths",
                "releases",
                "expiries",
                "revocations",
                "causal_violations",
                "batches",
                "messages",
            ),
            0,
        )
        # Client side: what the actor granted through this object and has not yet been told
        # released, each with its end mark (see release_nowait). Only client code touches it.
        self._held: dict[str, _Grant] = {}
        self._held_limit = _HELD_SWEEP
        self._mailbox: deque[Any] = deque()
        self._outbox: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._wakeup: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NEVER
        self._task: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None  # shutdown after a journal failure
        self._deciding: _Request | None = None  # last request _decide saw; failed on a crash
        self._loop: asyncio.AbstractEventLoop | None = None
        self._now = 0.0  # loop.time() at the start of the current batch
        self._closed = False
        self._handlers: dict[type, Callable[[Any], Any]] = {
            _Acquire: self._on_acquire,
            _Release: self._on_release,
            _Heartbeat: self._on_heartbeat,
            _Withdraw: self._on_withdraw,
            _RegisterAgent: self._on_register,
            _Drop: self._on_drop,
            _ReleaseSession: self._on_release_session,
            _Revoke: self._on_revoke,
            _WatchLease: self._on_watch,
            _Query: self._on_query,
            _ClockRead: self._on_clock_read,
            _ClockWrite: self._on_clock_write,
        }

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Recover from the journal (if any) and start the actor task."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._journal is not None:
            self._recover(self._journal.load())
        self._task = self._loop.create_task(self._run(), name="klock-scheduler")

    async def aclose(self) -> None:
        """Stop the actor; every pending request fails with :class:`KernelClosedError`."""
        if self._closed:
            return
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if task is asyncio.current_task():  # pragma: no cover - defensive
                    raise
        if self._timer is not None:
            self._timer.cancel()
        error = KernelClosedError(
            "the klock kernel shut down before answering; nothing further was granted"
        )
        for msg in self._mailbox:
            reply = getattr(msg, "reply", None)
            if reply is not None and not reply.done():
                reply.set_exception(error)
        self._mailbox.clear()
        for request in self._queued.values():
            if not request.reply.done():
                request.reply.set_exception(error)
        self._queued.clear()
        for futures in self._watchers.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(error)
        self._watchers.clear()
        # Replies still in the outbox belong to a batch whose commit was cut short: they must
        # not claim a grant the journal may not hold (group commit answers only after commit).
        for fut, _, _ in self._outbox:
            if not fut.done():
                fut.set_exception(error)
        self._outbox.clear()
        self._events.close()
        if self._journal is not None:
            self._journal.close()

    # ---------------------------------------------------------------- events

    @property
    def event_buffer(self) -> EventBuffer:
        """The buffer this kernel publishes its events to (see :mod:`klock_async.events`)."""
        return self._events

    def events(self, after: int | None = None) -> EventStream:
        """A stream of this kernel's events from now on, or after the event with id ``after``."""
        return self._events.stream(after)

    def _recover(self, state: RecoveredState) -> None:
        assert self._loop is not None
        for agent in state.agents:
            self._agents[agent.id] = _Agent(agent.id, agent.ts)
        self._last_agent_ts = state.last_agent_ts
        self._last_token = state.last_token
        now_wall, now = self._wall(), self._loop.time()
        for info in state.leases:
            if info.state is not LeaseState.ACTIVE or info.agent_id not in self._agents:
                continue
            lease = _Lease(
                info.id,
                info.agent_id,
                self._agents[info.agent_id].ts,
                info.session_id,
                info.resource,
                info.predicate,
                info.token,
                info.ttl,
                info.expires_at,
                now + (info.expires_at - now_wall),
                0,
                [],
            )
            self._attach(lease)
            # A lease that expired while the server was down ends on the first timer tick.
            self._note_deadline(lease.deadline, lease.id)
            self._last_token = max(self._last_token, info.token)
        self._clocks = VectorClockManager.restore(
            state.path_clocks, state.agent_clocks, state.conflict_count
        )

    # ---------------------------------------------------------------- the actor loop

    def _post(self, msg: Any) -> None:
        if self._closed or self._task is None:
            raise KernelClosedError(
                "the klock kernel is not running; use it inside 'async with Klock()'"
            )
        self._mailbox.append(msg)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _wake(self) -> None:
        self._timer = None
        self._timer_at = _NEVER
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _run(self) -> None:
        try:
            await self._serve()
        except Exception as exc:  # a bug, or a log write that failed: fail callers, never hang
            self._crashed(exc)

    def _crashed(self, exc: Exception) -> None:
        # The log output itself may be what failed (e.g. a closed pipe).
        with contextlib.suppress(Exception):
            get_logger().error("scheduler.crashed", error=repr(exc))
        error = KernelClosedError(
            f"the klock scheduler stopped on an unexpected error ({exc!r}); the request it "
            "was deciding was not granted, and no lease of this kernel holds any longer. "
            "Start a new kernel."
        )
        error.__cause__ = exc
        futures = [fut for fut, _, _ in self._outbox]
        if self._deciding is not None:  # it may have left the queue without an answer
            futures.append(self._deciding.reply)
        for fut in futures:
            if not fut.done():
                fut.set_exception(error)
        self._outbox.clear()
        assert self._loop is not None
        self._closer = self._loop.create_task(self.aclose())

    async def _serve(self) -> None:
        loop = self._loop
        assert loop is not None
        mailbox = self._mailbox
        handlers = self._handlers
        counts = self._counts
        while True:
            # Wait for a message, unless the timer fired while the actor awaited a commit.
            if not mailbox and (self._timer is not None or not (self._expiry or self._later)):
                self._wakeup = _Future(loop=loop)
                await self._wakeup
                self._wakeup = None
            logger = self._logger = info_logger()
            self._observed = logger is not None or self._events.recording
            now = self._now = loop.time()  # the batch's time: grants in it count from here
            # The timer fired, or is due and has not run yet (then the leases end before
            # this batch, not after it).
            fired = self._timer is None and (self._expiry or self._later)
            if fired or self._timer_at <= now:
                self._expire_due(now)
            n = len(mailbox)
            counts["batches"] += 1
            counts["messages"] += n
            for _ in range(n):
                msg = mailbox.popleft()
                try:
                    result = handlers[type(msg)](msg)
                except KlockError as exc:
                    self._fail(msg.reply, exc)
                except Exception:
                    reply = getattr(msg, "reply", None)
                    if reply is not None:
                        self._outbox.append((reply, None, None))  # failed by _crashed
                    raise
                else:
                    if result is not _PENDING:
                        self._reply(msg.reply, result)
            if self._journal is not None:
                try:
                    await self._journal.commit()
                except Exception as exc:  # the disk failed: nothing of this batch is durable
                    self._journal_failed(exc)
                    return
            if self._outbox:
                self._flush()

    def _journal_failed(self, exc: Exception) -> None:
        get_logger().error("journal.failed", error=repr(exc))
        error = KernelClosedError(
            f"the journal could not be written ({exc!r}); the kernel stopped and nothing of "
            "its last batch was granted. Fix the database and restart the server."
        )
        for fut, _, _ in self._outbox:
            if not fut.done():
                fut.set_exception(error)
        self._outbox.clear()
        assert self._loop is not None
        self._closer = self._loop.create_task(self.aclose())

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for fut, value, exc in outbox:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)

    # Without a journal an answer is given at once; with one it waits in the outbox for the
    # batch's commit (group commit: nobody hears of a grant the journal may not hold).

    def _reply(self, fut: asyncio.Future[Any], value: Any) -> None:
        if self._journal is not None:
            self._outbox.append((fut, value, None))
        elif not fut.done():
            fut.set_result(value)

    def _fail(self, fut: asyncio.Future[Any], exc: BaseException) -> None:
        if self._journal is not None:
            self._outbox.append((fut, None, exc))
        elif not fut.done():
            fut.set_exception(exc)

    def _note_deadline(self, deadline: float, lease_id: str) -> None:
        """Have the lease checked for expiry at ``deadline`` (grant, heartbeat, recovery)."""
        if deadline >= self._timer_at:
            later = self._later
            later.append((deadline, lease_id))
            if len(later) > self._later_limit:  # mostly leases released since: drop those
                leases = self._leases
                self._later = [
                    (at, held_id)
                    for at, held_id in later
                    if (lease := leases.get(held_id)) is not None and lease.deadline == at
                ]
                self._later_limit = max(_LATER_SWEEP, 2 * len(self._later))
        else:
            heapq.heappush(self._expiry, (deadline, lease_id))
            self._arm(deadline)

    def _current(self, entry: tuple[float, str]) -> bool:
        """Whether an expiry entry still belongs to an active lease (not ended or extended)."""
        lease = self._leases.get(entry[1])
        return lease is not None and lease.deadline == entry[0]

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_at(at, self._wake)
        self._timer_at = at

    # ---------------------------------------------------------------- client side (Backend)

    def _future(self) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            raise KernelClosedError("the klock kernel was not started; use 'async with Klock()'")
        return _Future(loop=loop)  # what loop.create_future() returns, without its frame

    async def _ask(self, make: Callable[[asyncio.Future[Any]], Any]) -> Any:
        fut = self._future()
        self._post(make(fut))
        return await fut

    async def register_agent(self, agent_id: str, priority: int | None) -> AgentInfo:
        """Register an agent; see :class:`~klock_async.backend.Backend`."""
        result: AgentInfo = await self._ask(lambda f: _RegisterAgent(agent_id, priority, f))
        return result

    async def acquire(
        self,
        agent_id: str,
        session_id: str,
        intents: Sequence[Intent],
        *,
        ttl: float,
        wait: bool = True,
        timeout: float | None = None,
        isolation: IsolationLevel = IsolationLevel.READ_COMMITTED,
    ) -> tuple[LeaseInfo, ...]:
        """Request leases; see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseDied: Wait-Die refused the request.
            LeaseWouldWait: ``wait`` is false and the request would have to queue.
            AcquireTimeoutError: ``timeout`` ran out; the request was withdrawn.
            CausalViolationError: a stale write in a SERIALIZABLE session.
            InvalidRequestError: bad input; nothing changed.
            UnknownAgentError: ``agent_id`` was never registered.
        """
        ttl = validate_ttl(ttl)
        if timeout is not None and not timeout >= 0:
            raise InvalidRequestError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        if not intents:
            raise InvalidResourceError("a request needs at least one (resource, predicate) pair")
        fut = self._future()
        request_id = next(self._request_ids)
        msg = _Acquire(request_id, agent_id, session_id, tuple(intents), ttl, wait, isolation, fut)
        self._post(msg)
        try:
            if timeout is None:
                grants = await fut
                if len(grants) == 1 and len(self._held) < self._held_limit:
                    (grant,) = grants  # _granted_now(), common case
                    info = grant[0]
                    self._held[info.id] = grant
                    return (info,)
                return self._granted_now(grants)
            async with asyncio.timeout(timeout):
                return self._granted_now(await fut)
        except TimeoutError:
            if not fut.done() or fut.cancelled():
                self._withdraw(request_id, agent_id, session_id)
                raise AcquireTimeoutError(
                    f"agent {agent_id!r} waited {timeout}s for "
                    f"{', '.join(f'{i.predicate.value} {i.resource}' for i in intents)} and "
                    "gave up; nothing is held. Retry later or raise the timeout."
                ) from None
        except asyncio.CancelledError:
            self._withdraw(request_id, agent_id, session_id)
            raise
        # Decided in the loop turn that also ran out the timeout (always so for timeout=0 on a
        # free resource): the decision stands.
        return self._granted_now(fut.result())

    def _granted_now(self, grants: tuple[_Grant, ...]) -> tuple[LeaseInfo, ...]:
        """Note what the actor granted (see release) and return the snapshots."""
        held = self._held
        if len(grants) == 1:
            (grant,) = grants
            info = grant[0]
            held[info.id] = grant
            if len(held) <= self._held_limit:
                return (info,)
        else:
            for grant in grants:
                held[grant[0].id] = grant
        if len(held) > self._held_limit:
            # Leases lost while held and never released leave their entry behind: drop the
            # ended ones, at a cost proportional to the entries added since the last sweep.
            for lease_id in [k for k, (_, ended) in held.items() if ended]:
                del held[lease_id]
            self._held_limit = max(_HELD_SWEEP, 2 * len(held))
        return tuple(info for info, _ in grants)

    def _withdraw(self, request_id: int, agent_id: str, session_id: str) -> None:
        if not self._closed:
            self._post(_Withdraw(request_id, agent_id, session_id))

    async def release(
        self, lease_id: str, agent_id: str | None = None, *, record_write: bool = False
    ) -> LeaseInfo:
        """End a lease; see :class:`~klock_async.backend.Backend`.

        Without ``record_write``, a release that :meth:`release_nowait` can make is made that
        way, and answered with the snapshot the grant (or the last heartbeat) gave, in state
        RELEASED.
        """
        held = self._held.get(lease_id)
        if held is not None and not record_write and self.release_nowait(lease_id, agent_id):
            return replace(held[0], state=LeaseState.RELEASED)
        fut = self._future()  # what _ask does, without its closure and extra coroutine
        self._post(_Release(lease_id, agent_id, record_write, fut))
        result: LeaseInfo = await fut
        self._held.pop(lease_id, None)
        return result

    def release_nowait(self, lease_id: str, agent_id: str | None = None) -> bool:
        """Release one-way a lease granted through this object that the actor has not ended.

        The release is posted and the call returns at once. The mailbox is first in, first
        out, so every message posted after it (by any caller) finds the lease released, and
        nobody else can be granted the resource before the release was posted: the holder's
        work was protected until this call. Returns False, posting nothing, for a lease the
        actor already ended (expired or revoked: :meth:`release` then tells the holder it
        was lost), one held by another agent than ``agent_id``, one this object did not
        grant, and always when a journal is attached (a release is answered after its
        commit).
        """
        held = self._held.get(lease_id)
        if held is None or self._journal is not None:
            return False
        info, ended = held
        if ended or (agent_id is not None and agent_id != info.agent_id):
            return False
        self._post(_Drop(lease_id))
        del self._held[lease_id]
        return True

    async def heartbeat(
        self, lease_id: str, agent_id: str | None = None, ttl: float | None = None
    ) -> LeaseInfo:
        """Extend a lease; see :class:`~klock_async.backend.Backend`."""
        if ttl is not None:
            ttl = validate_ttl(ttl)
        result: LeaseInfo = await self._ask(lambda f: _Heartbeat(lease_id, agent_id, ttl, f))
        held = self._held.get(lease_id)
        if held is not None:  # a one-way release answers with the latest snapshot
            self._held[lease_id] = (result, held[1])
        return result

    async def release_session(self, agent_id: str, session_id: str) -> int:
        """Release a session's leases; see :class:`~klock_async.backend.Backend`."""
        result: int = await self._ask(lambda f: _ReleaseSession(agent_id, session_id, f))
        return result

    async def wait_ended(self, lease_id: str, timeout: float | None) -> LeaseInfo | None:
        """Wait for a lease to end; see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseNotFoundError: the lease is not active and was not recently lost (released,
                or never existed); a recently expired or revoked lease returns its final
                snapshot instead.
        """
        fut = self._future()
        self._post(_WatchLease(lease_id, fut))
        if timeout is None:
            result: LeaseInfo = await fut
            return result
        try:
            async with asyncio.timeout(timeout):
                result = await fut
                return result
        except TimeoutError:
            if not fut.done() or fut.cancelled():
                return None
        # Answered in the loop turn that also ran out the timeout (timeout=0 is a poll).
        answered: LeaseInfo = fut.result()
        return answered

    async def revoke(self, lease_id: str) -> LeaseInfo:
        """Revoke one lease; see :class:`~klock_async.backend.Backend`."""
        result: list[LeaseInfo] = await self._ask(lambda f: _Revoke(lease_id, None, f))
        return result[0]

    async def evict(self, agent_id: str) -> int:
        """Revoke an agent's leases; see :class:`~klock_async.backend.Backend`."""
        result: list[LeaseInfo] = await self._ask(lambda f: _Revoke(None, agent_id, f))
        return len(result)

    async def leases(self) -> tuple[LeaseInfo, ...]:
        """Snapshot of the active leases."""
        result: tuple[LeaseInfo, ...] = await self._ask(lambda f: _Query("leases", f))
        return result

    async def agents(self) -> tuple[AgentInfo, ...]:
        """Snapshot of the registered agents."""
        result: tuple[AgentInfo, ...] = await self._ask(lambda f: _Query("agents", f))
        return result

    async def statistics(self) -> Statistics:
        """Snapshot of the counters."""
        result: Statistics = await self._ask(lambda f: _Query("statistics", f))
        return result

    async def clock_read(self, path: str, agent_id: str) -> VectorClock:
        """Read a path's clock as an agent; see :class:`~klock_async.backend.Backend`."""
        result: VectorClock = await self._ask(lambda f: _ClockRead(path, agent_id, f))
        return result

    async def clock_write(self, path: str, agent_id: str, *, strict: bool = True) -> VectorClock:
        """Record a write; see :class:`~klock_async.backend.Backend`."""
        result: VectorClock = await self._ask(lambda f: _ClockWrite(path, agent_id, strict, f))
        return result

    async def clock_status(self) -> ClockStatus:
        """Tracked paths and conflict count."""
        result: ClockStatus = await self._ask(lambda f: _Query("clocks", f))
        return result

    # ---------------------------------------------------------------- handlers

    def _agent(self, agent_id: str) -> _Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            raise UnknownAgentError(
                f"agent {agent_id!r} is not registered; call register_agent({agent_id!r}) first"
            )
        return agent

    def _on_register(self, msg: _RegisterAgent) -> AgentInfo:
        if not isinstance(msg.agent_id, str) or not msg.agent_id.strip():
            raise InvalidRequestError("an agent id must be a non-empty string")
        if msg.priority is not None and (
            isinstance(msg.priority, bool) or not isinstance(msg.priority, int)
        ):
            raise InvalidRequestError(f"priority must be an integer, got {msg.priority!r}")
        agent = self._agents.get(msg.agent_id)
        if agent is not None:
            if msg.priority is not None and msg.priority != agent.ts:
                raise AgentExistsError(
                    f"agent {msg.agent_id!r} is registered already with age {agent.ts}; an "
                    "agent's age never changes (register another id for another priority)"
                )
            return AgentInfo(agent.id, agent.ts)
        if msg.priority is None:
            self._last_agent_ts += 1
            ts = self._last_agent_ts
        else:
            ts = msg.priority
            # Later automatic ages come after every explicit one: two agents that share an age
            # always kill each other, and neither could ever become the oldest.
            self._last_agent_ts = max(self._last_agent_ts, ts)
        agent = self._agents[msg.agent_id] = _Agent(msg.agent_id, ts)
        info = AgentInfo(agent.id, agent.ts)
        if self._journal is not None:
            self._journal.record_agent(info)
            self._journal.record_counters(self._last_token, self._last_agent_ts)
        if self._observed:
            _emit(self._logger, self._events, ev.AGENT_REGISTERED, agent.id, ts=agent.ts)
        return info

    def _on_acquire(self, msg: _Acquire) -> object:
        agent = self._agents.get(msg.agent_id) or self._agent(msg.agent_id)
        if not msg.reply.done():
            msg.ts = agent.ts
            self._decide(msg, True, msg.wait)
        return _PENDING

    def _on_withdraw(self, msg: _Withdraw) -> object:
        request = self._queued.get(msg.request_id)
        if request is not None:
            self._unqueue(request)
            if self._observed:
                _request_event(
                    self._logger, self._events, ev.REQUEST_WITHDRAWN, request, reason="caller"
                )
            self._reevaluate([i.resource for i in request.intents])
            return _PENDING
        # Granted, but the caller stopped waiting before it saw the answer: give it back.
        held = self._sessions.get((msg.agent_id, msg.session_id))
        if held:
            granted = [lease for lease in held.values() if lease.request_id == msg.request_id]
            for lease in granted:
                self._end(lease, LeaseState.RELEASED, seen=False)
            self._reevaluate([lease.resource for lease in granted])
        return _PENDING

    def _on_release(self, msg: _Release) -> LeaseInfo:
        lease = self._owned_lease(msg.lease_id, msg.agent_id)
        if msg.record_write and lease.predicate.writes:
            held_reads = self._held_reads(lease.agent_id)
            if held_reads is not None:  # the write was made from what those leases let it read
                self._clocks.observe(lease.agent_id, held_reads)
            result = self._clocks.write(str(lease.resource), lease.agent_id, strict=False)
            self._journal_clocks(str(lease.resource), lease.agent_id)
            assert not isinstance(result, StaleWrite)
            self._written(str(lease.resource), lease.agent_id, result, lease.session_id)
        info = self._end(lease, LeaseState.RELEASED) or lease.info(LeaseState.RELEASED)
        self._reevaluate((lease.resource,))
        return info

    def _on_drop(self, msg: _Drop) -> object:
        lease = self._leases.get(msg.lease_id)
        if lease is not None:  # else it expired in this batch, after its holder let it go
            self._end(lease, _RELEASED)
            if self._queued:
                self._reevaluate((lease.resource,))
        return _PENDING

    def _on_heartbeat(self, msg: _Heartbeat) -> LeaseInfo:
        lease = self._owned_lease(msg.lease_id, msg.agent_id)
        assert self._loop is not None
        ttl = msg.ttl if msg.ttl is not None else lease.ttl
        lease.ttl = ttl
        lease.expires_at = self._wall() + ttl
        lease.deadline = self._loop.time() + ttl
        self._note_deadline(lease.deadline, lease.id)
        info = lease.info()
        if self._journal is not None:
            self._journal.record_lease(info)
        if self._observed:
            _lease_event(self._logger, self._events, ev.LEASE_HEARTBEATED, lease, ttl_ms=to_ms(ttl))
        return info

    def _on_release_session(self, msg: _ReleaseSession) -> int:
        held = self._sessions.get((msg.agent_id, msg.session_id))
        if not held:
            return 0
        leases = list(held.values())
        for lease in leases:
            self._end(lease, LeaseState.RELEASED)
        self._reevaluate([lease.resource for lease in leases])
        return len(leases)

    def _on_revoke(self, msg: _Revoke) -> list[LeaseInfo]:
        if msg.lease_id is not None:
            lease = self._leases.get(msg.lease_id)
            if lease is None:
                raise LeaseNotFoundError(f"no active lease {msg.lease_id!r} to revoke")
            leases = [lease]
        else:
            assert msg.agent_id is not None
            self._agent(msg.agent_id)
            leases = [lease for lease in self._leases.values() if lease.agent_id == msg.agent_id]
            # An evicted agent's queued requests go too: granted later, nobody would use them.
            for request in [r for r in self._queued.values() if r.agent_id == msg.agent_id]:
                self._unqueue(request)
                if self._observed:
                    _request_event(
                        self._logger, self._events, ev.REQUEST_WITHDRAWN, request, reason="evicted"
                    )
                self._fail(
                    request.reply,
                    EvictedError(
                        f"agent {msg.agent_id!r} was evicted while this request waited; "
                        "nothing is held. Acquire again if the agent is still at work."
                    ),
                )
        infos = [self._end(lease, LeaseState.REVOKED) or lease.info() for lease in leases]
        self._reevaluate([lease.resource for lease in leases])
        return infos

    def _on_watch(self, msg: _WatchLease) -> object:
        if msg.lease_id not in self._leases:
            lost = self._lost.get(msg.lease_id)
            if lost is not None:  # lost before the watch arrived: say how it ended
                return lost
            raise LeaseNotFoundError(f"lease {msg.lease_id!r} is not active")
        watchers = self._watchers.setdefault(msg.lease_id, [])
        watchers[:] = [f for f in watchers if not f.done()]
        watchers.append(msg.reply)
        return _PENDING

    def _on_query(self, msg: _Query) -> Any:
        if msg.what == "leases":
            return tuple(lease.info() for lease in self._leases.values())
        if msg.what == "agents":
            return tuple(AgentInfo(a.id, a.ts) for a in self._agents.values())
        if msg.what == "clocks":
            return ClockStatus(self._clocks.tracked_paths, self._clocks.conflict_count)
        counts = self._counts
        return Statistics(
            agents=len(self._agents),
            leases_active=len(self._leases),
            requests_waiting=len(self._queued),
            grants=counts["grants"],
            waits=counts["waits"],
            deaths=counts["deaths"],
            releases=counts["releases"],
            expiries=counts["expiries"],
            revocations=counts["revocations"],
            causal_violations=counts["causal_violations"],
            batches=counts["batches"],
            messages=counts["messages"],
        )

    def _clock_key(self, path: str) -> str:
        return str(Resource.parse(path))

    def _on_clock_read(self, msg: _ClockRead) -> VectorClock:
        self._agent(msg.agent_id)
        key = self._clock_key(msg.path)
        clock = self._clocks.read(key, msg.agent_id)
        self._journal_clocks(key, msg.agent_id)
        return clock

    def _on_clock_write(self, msg: _ClockWrite) -> VectorClock:
        self._agent(msg.agent_id)
        key = self._clock_key(msg.path)
        result = self._clocks.write(key, msg.agent_id, strict=msg.strict)
        if isinstance(result, StaleWrite):
            self._counts["causal_violations"] += 1
            raise self._violation(result)
        self._journal_clocks(key, msg.agent_id)
        self._written(key, msg.agent_id, result)
        return result

    def _journal_clocks(self, path: str, agent_id: str) -> None:
        if self._journal is not None:
            self._journal.record_clocks(
                path,
                self._clocks.clock_of(path),
                agent_id,
                self._clocks.agent_clock(agent_id),
                self._clocks.conflict_count,
            )

    def _written(
        self, path: str, agent_id: str, clock: VectorClock, session_id: str | None = None
    ) -> None:
        if self._observed:
            _emit(
                self._logger,
                self._events,
                ev.WRITE_RECORDED,
                agent_id,
                session_id=session_id,
                resource=path,
                clock=clock.as_dict(),
            )

    def _violation(self, stale: StaleWrite) -> CausalViolationError:
        _write_refused(self._events, stale)
        return CausalViolationError(
            f"agent {stale.agent_id!r} would overwrite a version of {stale.path} it never read "
            f"(its clock {stale.agent_clock.as_dict()}, the path's clock "
            f"{stale.path_clock.as_dict()}); read it again, redo the change, then write",
            path=stale.path,
            agent_id=stale.agent_id,
            agent_clock=stale.agent_clock.as_dict(),
            path_clock=stale.path_clock.as_dict(),
        )

    def _owned_lease(self, lease_id: str, agent_id: str | None) -> _Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFoundError(
                f"lease {lease_id!r} is not active (never granted, or already released, "
                "expired or revoked); acquire it again if you still need it"
            )
        if agent_id is not None and agent_id != lease.agent_id:
            raise NotLeaseOwnerError(
                f"lease {lease_id!r} belongs to agent {lease.agent_id!r}, not {agent_id!r}; "
                "only its holder may release or extend it"
            )
        return lease

    # ---------------------------------------------------------------- Wait-Die

    def _overlapping(self, resource: Resource) -> list[_Slot]:
        """Slots of ``resource``, its ancestors and its descendants (per-resource indexes)."""
        slots = self._slots
        slot = slots.get(resource.key)
        found = [] if slot is None else [slot]
        for ancestor in resource.up:
            slot = slots.get(ancestor)
            if slot is not None:
                found.append(slot)
        below = self._under.get(resource.key)
        if below:
            found.extend([slots[key] for key in below])
        return found

    def _blockers(self, request: _Request) -> list[_Lease | _Request]:
        found: list[_Lease | _Request] = []
        agent_id, session_id, ts = request.agent_id, request.session_id, request.ts
        compatible = rules.COMPATIBLE
        slots, under = self._slots, self._under
        for intent in request.intents:
            resource = intent.resource
            slot = slots.get(resource.key)
            if (
                (slot is None or not (slot.leases or slot.waiters))
                and resource.key not in under
                and slots.keys().isdisjoint(resource.up)
            ):
                continue  # nothing on the resource, above or below it (the common case)
            allowed = compatible[intent.predicate]
            # What _overlapping() lists, built inline.
            overlapping = [] if slot is None else [slot]
            for ancestor in resource.up:
                slot = slots.get(ancestor)
                if slot is not None:
                    overlapping.append(slot)
            below = under.get(resource.key)
            if below:
                overlapping.extend([slots[key] for key in below])
            for slot in overlapping:
                for lease in slot.leases.values():
                    if lease.predicate in allowed:
                        continue
                    if lease.agent_id == agent_id and lease.session_id == session_id:
                        continue  # reentrancy (KLIS-7)
                    found.append(lease)
                for other, predicate in slot.waiters.values():
                    if other.ts >= ts or predicate in allowed:
                        continue
                    if other.agent_id == agent_id and other.session_id == session_id:
                        continue
                    found.append(other)
        return found

    def _decide(self, request: _Request, new: bool, wait: bool = True) -> bool:
        """Apply Wait-Die to one request; return True when it was granted."""
        self._deciding = request
        blockers = self._blockers(request)
        verdict = rules.wait_die(request.ts, blockers) if blockers else _GRANT
        decision = verdict.decision
        if decision is _GRANTED:
            granted = self._grant(request)
            if granted and new and self._queued:
                # A fresh grant may be older than a waiter it now blocks: that waiter must die,
                # or it would wait for an older holder (a possible wait cycle).
                self._reevaluate([i.resource for i in request.intents])
            return granted
        blocker = verdict.blocker
        assert blocker is not None
        if decision is rules.Decision.WAIT:
            if not new:
                return False
            if not wait:
                self._fail(request.reply, self._would_wait(request, blocker))
                return False
            self._enqueue(request)
            self._counts["waits"] += 1
            if self._observed:
                _request_event(
                    self._logger,
                    self._events,
                    ev.REQUEST_QUEUED,
                    request,
                    blocker_agent_id=blocker.agent_id,
                )
            # A new older waiter: younger conflicting waiters must now die.
            self._reevaluate([i.resource for i in request.intents])
            return False
        if not new:
            self._unqueue(request)
        self._die(request, blocker)
        return False

    def _grant(self, request: _Request) -> bool:
        serializable = request.isolation is _SERIALIZABLE
        if serializable:
            for intent in request.intents:
                if intent.predicate.writes:
                    stale = self._clocks.check_write(
                        str(intent.resource), request.agent_id, self._held_reads(request.agent_id)
                    )
                    if stale is not None:
                        if request.id in self._queued:
                            self._unqueue(request)
                            if self._observed:
                                _request_event(
                                    self._logger,
                                    self._events,
                                    ev.REQUEST_WITHDRAWN,
                                    request,
                                    reason="stale_write",
                                )
                        self._counts["causal_violations"] += 1
                        self._fail(request.reply, self._violation(stale))
                        return False
        ttl = request.ttl
        expires_at, deadline = self._wall() + ttl, self._now + ttl
        infos = []
        for intent in request.intents:
            self._last_token += 1
            lease_id = new_lease_id()
            lease = _Lease(
                lease_id,
                request.agent_id,
                request.ts,
                request.session_id,
                intent.resource,
                intent.predicate,
                self._last_token,
                ttl,
                expires_at,
                deadline,
                request.id,
                [],
            )
            self._attach(lease)
            if deadline >= self._timer_at and len(self._later) < self._later_limit:
                self._later.append((deadline, lease_id))  # _note_deadline(), common case
            else:
                self._note_deadline(deadline, lease_id)
            info = lease.info()
            infos.append((info, lease.ended))
            if serializable and intent.predicate is _READ:
                reads = self._unmerged_reads.setdefault(request.agent_id, {})
                reads[lease.id] = self._clocks.clock_of(str(intent.resource))
            if self._journal is not None:
                self._journal.record_lease(info)
            if self._observed:
                _lease_event(self._logger, self._events, ev.LEASE_GRANTED, lease, ttl_ms=to_ms(ttl))
        if request.id in self._queued:
            # Only now: a waiter's slots hold its new leases, so none is dropped and rebuilt.
            self._unqueue(request)
        self._counts["grants"] += 1
        if self._journal is not None:
            self._journal.record_counters(self._last_token, self._last_agent_ts)
        self._reply(request.reply, tuple(infos))
        return True

    def _die(self, request: _Request, blocker: _Lease | _Request) -> None:
        self._counts["deaths"] += 1
        intent = request.intents[0]
        blocker_lease = blocker.id if isinstance(blocker, _Lease) else None
        where = str(blocker.resource) if isinstance(blocker, _Lease) else "a queued request"
        retry_after = (
            max(0.0, blocker.deadline - self._loop.time())
            if isinstance(blocker, _Lease) and self._loop is not None
            else 0.05
        )
        if self._observed:
            _request_event(
                self._logger,
                self._events,
                ev.REQUEST_DIED,
                request,
                blocker_agent_id=blocker.agent_id,
                blocker_lease_id=blocker_lease,
            )
        self._fail(
            request.reply,
            LeaseDied(
                f"agent {request.agent_id!r} may not wait for {intent.predicate.value} "
                f"{intent.resource}: older or equal agent {blocker.agent_id!r} holds or awaits a "
                f"conflicting intent ({where}). Release what this session holds and retry after "
                "that lease ends; your age is kept, so you cannot starve.",
                agent_id=request.agent_id,
                resource=str(intent.resource),
                predicate=intent.predicate.value,
                blocker_agent_id=blocker.agent_id,
                blocker_lease_id=blocker_lease,
                retry_after=retry_after,
            ),
        )

    def _would_wait(self, request: _Request, blocker: _Lease | _Request) -> LeaseWouldWait:
        intent = request.intents[0]
        wait_time = (
            max(0.0, blocker.deadline - self._loop.time())
            if isinstance(blocker, _Lease) and self._loop is not None
            else 0.0
        )
        return LeaseWouldWait(
            f"{intent.predicate.value} {intent.resource} is held by younger agent "
            f"{blocker.agent_id!r}; nothing was queued. Ask again, or acquire with wait=True.",
            agent_id=request.agent_id,
            resource=str(intent.resource),
            blocker_agent_id=blocker.agent_id,
            wait_time=wait_time,
        )

    def _reevaluate(self, resources: Iterable[Resource]) -> None:
        """Re-run Wait-Die over the queues that overlap ``resources``, oldest first.

        A grant changes the resources it covers, so their queues are re-run in turn until
        nothing changes.
        """
        if not self._queued:  # nothing waits: the common case after a release
            return
        if len(self._queued) == 1:
            # One waiter (a plain hand-off): the candidates are it or nobody, and re-deciding a
            # waiter the change did not touch leaves it waiting (it is older than each of its
            # blockers), so decide it without walking the indexes and sorting.
            (request,) = self._queued.values()
            if not request.reply.done():  # else its caller is gone; a withdraw is on its way
                self._decide(request, new=False)
            return
        dirty = {resource.key: resource for resource in resources}
        while dirty and self._queued:
            candidates: dict[int, _Request] = {}
            for resource in dirty.values():
                for slot in self._overlapping(resource):
                    for request, _ in slot.waiters.values():
                        candidates[request.id] = request
            dirty = {}
            for request in sorted(candidates.values(), key=lambda r: (r.ts, r.id)):
                if request.id not in self._queued:
                    continue
                if request.reply.done():  # its caller is gone; a withdraw is on its way
                    continue
                if self._decide(request, new=False) or request.id not in self._queued:
                    dirty.update((i.resource.key, i.resource) for i in request.intents)

    # ---------------------------------------------------------------- state changes

    def _slot(self, resource: Resource) -> _Slot:
        key = resource.key
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
            under = self._under
            for ancestor in resource.up:
                below = under.get(ancestor)
                if below is None:
                    under[ancestor] = {key}
                else:
                    below.add(key)
        elif not slot.leases and not slot.waiters:
            del self._idle[key]
        return slot

    def _drop_slot_if_empty(self, resource: Resource) -> None:
        slot = self._slots.get(resource.key)
        if slot is not None and not slot.leases and not slot.waiters:
            self._idle_slot(resource)

    def _idle_slot(self, resource: Resource) -> None:
        """Keep the emptied slot of ``resource`` for reuse; drop the oldest idle one past the cap.

        Agents come back to the same files: reusing a slot spares the hierarchy index
        (``_under``) an update per ancestor at every grant and release.
        """
        idle = self._idle
        idle[resource.key] = resource
        if len(idle) > _IDLE_SLOTS:
            oldest = next(iter(idle))
            self._forget_slot(idle.pop(oldest))

    def _forget_slot(self, resource: Resource) -> None:
        key = resource.key
        del self._slots[key]
        under = self._under
        for ancestor in resource.up:
            below = under[ancestor]
            below.discard(key)
            if not below:
                del under[ancestor]

    def _attach(self, lease: _Lease) -> None:
        lease_id = lease.id
        self._leases[lease_id] = lease
        slot = self._slots.get(lease.resource.key)
        if slot is None or (not slot.leases and not slot.waiters):
            slot = self._slot(lease.resource)
        slot.leases[lease_id] = lease
        key = (lease.agent_id, lease.session_id)
        held = self._sessions.get(key)
        if held is None:
            self._sessions[key] = {lease_id: lease}
        else:
            held[lease_id] = lease

    def _enqueue(self, request: _Request) -> None:
        self._queued[request.id] = request
        for intent in request.intents:
            self._slot(intent.resource).waiters[request.id] = (request, intent.predicate)

    def _unqueue(self, request: _Request) -> None:
        del self._queued[request.id]
        for intent in request.intents:
            slot = self._slots.get(intent.resource.key)
            if slot is not None:
                slot.waiters.pop(request.id, None)
                self._drop_slot_if_empty(intent.resource)

    def _held_reads(self, agent_id: str) -> VectorClock | None:
        """The versions read under SERIALIZABLE CONSUMES leases the agent still holds."""
        reads = self._unmerged_reads.get(agent_id)
        if not reads:
            return None
        seen = VectorClock()
        for clock in reads.values():
            seen = seen.merge(clock)
        return seen

    def _end(self, lease: _Lease, state: LeaseState, *, seen: bool = True) -> LeaseInfo | None:
        """End an active lease; ``seen`` is false when its holder never received it.

        Returns the final snapshot when one was needed (journal, watchers, a loss), else None:
        a one-way release wants none, and building it was a tenth of the release's cost.
        """
        reads = self._unmerged_reads.get(lease.agent_id)
        if reads is not None and lease.id in reads:
            clock = reads.pop(lease.id)
            if not reads:
                del self._unmerged_reads[lease.agent_id]
            if seen and state is LeaseState.RELEASED:
                self._clocks.observe(lease.agent_id, clock)
                self._journal_clocks(str(lease.resource), lease.agent_id)
        lease_id = lease.id
        del self._leases[lease_id]
        slot = self._slots[lease.resource.key]
        del slot.leases[lease_id]
        if not slot.leases and not slot.waiters:
            idle = self._idle
            idle[lease.resource.key] = lease.resource  # _idle_slot(), inline
            if len(idle) > _IDLE_SLOTS:
                self._forget_slot(idle.pop(next(iter(idle))))
        key = (lease.agent_id, lease.session_id)
        held = self._sessions[key]
        del held[lease_id]
        if not held:
            del self._sessions[key]
        watchers = self._watchers.pop(lease_id, None)
        info = None
        if watchers is not None or self._journal is not None or state is not _RELEASED:
            info = lease.info(state)
            if self._journal is not None:
                self._journal.record_lease(info)
            if state is not _RELEASED:
                # Its holder may start watching only now (a revocation right after the grant):
                # keep the final snapshot so the watch reports the loss, not "unknown lease".
                lost = self._lost
                lost[lease_id] = info
                if len(lost) > _LOST_MEMORY:
                    del lost[next(iter(lost))]
        lease.ended.append(state)
        self._counts[_ENDED_COUNTER[state]] += 1
        if self._observed:
            _lease_event(self._logger, self._events, _ENDED_EVENT[state], lease)
        for fut in watchers or ():
            self._reply(fut, info)
        return info

    def _expire_due(self, now: float) -> None:
        """End the leases due by ``now`` and arm the timer for the next deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = _NEVER
        heap = self._expiry
        for entry in self._later:
            if self._current(entry):
                heapq.heappush(heap, entry)
        self._later = []
        expired: list[Resource] = []
        while heap and heap[0][0] <= now:
            deadline, lease_id = heapq.heappop(heap)
            lease = self._leases.get(lease_id)
            if lease is None or lease.deadline != deadline:
                continue  # released earlier, or extended by a heartbeat
            self._end(lease, LeaseState.EXPIRED)
            expired.append(lease.resource)
        while heap and not self._current(heap[0]):
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0][0])
        if expired:
            self._reevaluate(expired)

    # ---------------------------------------------------------------- introspection for tests

    def check_invariants(self) -> None:
        """Assert the invariants listed on the class (for tests; walks all state).

        Raises:
            AssertionError: an invariant does not hold.
        """
        for lease in self._leases.values():
            assert self._slots[lease.resource.key].leases[lease.id] is lease
            assert self._sessions[(lease.agent_id, lease.session_id)][lease.id] is lease
        assert sum(len(s.leases) for s in self._slots.values()) == len(self._leases)
        assert sum(len(h) for h in self._sessions.values()) == len(self._leases)
        active = list(self._leases.values())
        for i, a in enumerate(active):
            for b in active[i + 1 :]:
                if (a.agent_id, a.session_id) == (b.agent_id, b.session_id):
                    continue
                assert not rules.intents_conflict(
                    Intent(a.resource, a.predicate), Intent(b.resource, b.predicate)
                ), f"conflicting active leases {a.info()} and {b.info()}"
        queued_ids = set()
        for key, slot in self._slots.items():
            assert bool(slot.leases or slot.waiters) != (key in self._idle), f"slot {key}"
            for rid, (request, _) in slot.waiters.items():
                assert self._queued[rid] is request
                queued_ids.add(rid)
        assert len(self._idle) <= _IDLE_SLOTS
        assert queued_ids == set(self._queued)
        for request in self._queued.values():
            for blocker in self._blockers(request):
                assert request.ts < blocker.ts, "a queued request waits for an older one"
        expected: dict[str, set[str]] = {}
        for slot in self._slots.values():
            held = [lease.resource for lease in slot.leases.values()]
            wanted = [i.resource for r, _ in slot.waiters.values() for i in r.intents]
            found = {r for r in held + wanted if self._slots.get(r.key) is slot}
            (resource,) = found or {self._idle[key] for key, s in self._slots.items() if s is slot}
            assert resource.up == tuple(str(a) for a in resource.ancestors())
            for ancestor in resource.up:
                expected.setdefault(ancestor, set()).add(resource.key)
        assert expected == self._under
        entries = set(self._expiry) | set(self._later)
        for lease in self._leases.values():
            assert (lease.deadline, lease.id) in entries, f"no expiry entry for {lease.id}"
            # Armed no later than every deadline (or fired, and the actor has yet to run).
            assert self._timer is None or self._timer_at <= lease.deadline
        assert self._timer is None or all(d >= self._timer_at for d, _ in self._later)
        tokens = [lease.token for lease in self._leases.values()]
        assert len(tokens) == len(set(tokens))
        assert all(t <= self._last_token for t in tokens)
