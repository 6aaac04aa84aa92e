"""The scheduler actor: the one task that drives the lock table.

Callers never touch state. They post a message carrying its own reply future to the mailbox
and await the future (pykka's ``Envelope(message, reply_to)``). The actor drains the mailbox
in batches and hands each message to the pure :class:`~klock_async.locktable.LockTable`, which
decides; the actor keeps only the mailbox, the futures, the expiry timer and, when a journal is
attached, the commit of one transaction per batch before it resolves the batch's futures (group
commit). A WAIT is a parked future in the table's queue, resolved by the release, expiry or
revocation that frees it: nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from klock_async import events as ev
from klock_async.backend import ClockStatus
from klock_async.clocks import IsolationLevel, StaleWrite, VectorClock
from klock_async.errors import (
    AcquireTimeoutError,
    InvalidResourceError,
    JournalUnavailableError,
    KernelClosedError,
    KlockError,
)
from klock_async.events import Event, EventBuffer, EventStream
from klock_async.locktable import (
    _IDLE_SLOTS,
    _LATER_SWEEP,
    Journal,
    LockTable,
    RecoveredState,
    Request,
    _Lease,
)
from klock_async.logging import get_logger, info_logger
from klock_async.model import (
    AgentInfo,
    Intent,
    LeaseInfo,
    LeaseState,
    Statistics,
    WaiterInfo,
    to_ms,
    validate_request_key,
    validate_timeout,
    validate_ttl,
    with_state,
)

__all__ = ["Journal", "RecoveredState", "Scheduler"]
__all__ += []  # _IDLE_SLOTS and _LATER_SWEEP are re-exported for the tests


_Future = asyncio.Future
# A lease's end mark: empty while the lease is active; the table appends the final state when
# it ends, and nothing else writes to it. The client side reads it (release_nowait) to learn,
# without asking, that a lease it handed out is gone.
_EndMark = list[LeaseState]
# What the actor answers a granted request with, per lease: the snapshot and its end mark.
_Grant = tuple[LeaseInfo, _EndMark]
_NEVER = float("inf")
_HELD_SWEEP = 1024  # the client side's note of held leases is swept of ended ones past this size
_IDLE_SLOTS = _IDLE_SLOTS
_LATER_SWEEP = _LATER_SWEEP


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


def _emit(
    logger: Any | None, events: EventBuffer | None, name: str, agent_id: str, **fields: Any
) -> None:
    """Publish one event: to ``logger`` (None: not logged) and to ``events`` when recording
    (None: recorded elsewhere)."""
    if logger is not None:
        logger.info(name, agent=agent_id, **{_LOG_KEYS.get(k, k): v for k, v in fields.items()})
    if events is not None and events.recording:
        events.publish(name, agent_id, **fields)


def _lease_fields(lease: _Lease, request_id: int) -> dict[str, Any]:
    """The fields every lease event carries (``request_id``: the lease's at the time; a
    resent request takes its grant over)."""
    fields: dict[str, Any] = {
        "session_id": lease.session_id,
        "resource": str(lease.resource),
        "predicate": lease.predicate.value,
        "token": lease.token,
        "lease_id": lease.id,
    }
    if request_id:
        fields["request_id"] = request_id
    return fields


def _lease_event(
    logger: Any | None, events: EventBuffer, name: str, lease: _Lease, **fields: Any
) -> None:
    """One per-lease event: logged now, recorded as the lease and built when read (see
    ``EventBuffer.defer``: of a lease, only its request id may change later)."""
    if logger is not None:
        fields_now = _lease_fields(lease, lease.request_id)
        _emit(logger, None, name, lease.agent_id, **fields_now, **fields)
    if events.recording:
        events.defer(_lease_as_event, name, lease, lease.request_id, fields)


def _lease_as_event(
    event_id: int, at: float, name: str, lease: _Lease, request_id: int, fields: dict[str, Any]
) -> Event:
    """The event of :func:`_lease_event`, built when first read."""
    values = _lease_fields(lease, request_id)
    return Event(event_id, name, at, lease.agent_id, **values, data=fields)


def _request_event(
    logger: Any | None, events: EventBuffer, name: str, request: Request, **fields: Any
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


_WITH_TTL = frozenset({ev.LEASE_GRANTED, ev.LEASE_HEARTBEATED})


class _Publisher:
    """The lock table's observer while anything observes: its changes as events.

    The table names its changes (``lease.granted``, ``request.queued``, ...) and passes the
    lease or request concerned; this turns them into the events of :mod:`klock_async.events`,
    to the log and to the event buffer.
    """

    __slots__ = ("events", "logger")

    def __init__(self, events: EventBuffer) -> None:
        self.events = events
        self.logger: Any = None

    def __call__(self, name: str, *, lease: Any = None, request: Any = None, **fields: Any) -> None:
        if lease is not None:
            if name in _WITH_TTL:
                fields["ttl_ms"] = to_ms(lease.ttl)
            _lease_event(self.logger, self.events, name, lease, **fields)
        elif request is not None:
            if "blocker" in fields:
                fields["blocker_agent_id"] = fields.pop("blocker")
            if "blocker_lease" in fields:
                fields["blocker_lease_id"] = fields.pop("blocker_lease")
            _request_event(self.logger, self.events, name, request, **fields)
        else:
            _emit(self.logger, self.events, name, fields.pop("agent"), **fields)


# --------------------------------------------------------------------------------------------
# Messages: values with their own reply slot (an acquire is the table's Request itself).


@dataclass(frozen=True, slots=True)
class _RegisterAgent:
    agent_id: str
    priority: int | None
    reply: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _Withdraw:
    request_id: int
    agent_id: str
    session_id: str


@dataclass(slots=True)  # not frozen: built on every release (see Request)
class _Release:
    lease_id: str
    agent_id: str | None
    record_write: bool | None
    reply: asyncio.Future[Any]


@dataclass(slots=True)
class _Drop:
    """A release that wants no answer (see Scheduler.release_nowait)."""

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
class _Unwatch:
    lease_id: str
    reply: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _Query:
    what: str
    reply: asyncio.Future[Any]
    agent_id: str = ""  # of the "agent" query


@dataclass(frozen=True, slots=True)
class _RetireAgents:
    agent_ids: tuple[str, ...]
    reply: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _ReleaseClient:
    agent_ids: frozenset[str]
    lease_ids: tuple[str, ...]
    reason: str
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


_PENDING = object()  # a handler's answer when the reply comes through the table's answer


class Scheduler:
    """The embedded scheduler: an actor task driving a :class:`LockTable`, plus the client
    methods that message it.

    It implements :class:`~klock_async.backend.Backend`. Create it inside a running event loop,
    ``await start()``, and ``await aclose()`` when done (the :class:`~klock_async.Klock` facade
    does both).

    Args:
        journal: optional durable journal (server mode); recovered from on start.
        clock: the kernel's time in seconds since the epoch (default ``time.time``). Deadlines
            are kept in it, so a lease's ``expires_at`` is exactly when the kernel ends it; a
            test may pass a virtual clock (expiry then happens at the first message after the
            clock passed a deadline, or when the timer the kernel set fires).
    """

    def __init__(
        self, *, journal: Journal | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._journal = journal
        self._clock = clock
        self._table = LockTable(journal=journal)
        self._events = EventBuffer()
        self._publisher = _Publisher(self._events)
        self._table.on_refused = lambda stale: _write_refused(self._events, stale)
        self._table.answer = self._deliver  # answers are delivered as the table decides them
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
        self.failure: KernelClosedError | None = None  # why the kernel stopped by itself
        self._deciding: Request | None = None  # the request being decided; failed on a crash
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._request_ids = itertools.count(1)
        table = self._table
        # Handlers of every message but the two of each pair (Request, _Drop: see _serve).
        self._handlers: dict[type, Callable[[Any, float], Any]] = {
            _Release: lambda m, now: table.release(m.lease_id, m.agent_id, m.record_write, now),
            _Heartbeat: lambda m, now: table.heartbeat(m.lease_id, m.agent_id, m.ttl, now),
            _Withdraw: self._on_withdraw,
            _RegisterAgent: lambda m, now: table.register(m.agent_id, m.priority),
            _ReleaseSession: lambda m, now: table.release_session(m.agent_id, m.session_id, now),
            _Revoke: self._on_revoke,
            _WatchLease: self._on_watch,
            _Unwatch: self._on_unwatch,
            _Query: self._on_query,
            _RetireAgents: lambda m, now: table.retire(m.agent_ids),
            _ReleaseClient: lambda m, now: table.release_client(
                m.agent_ids, m.lease_ids, m.reason, now
            ),
            _ClockRead: lambda m, now: table.clock_read(m.path, m.agent_id),
            _ClockWrite: lambda m, now: table.clock_write(m.path, m.agent_id, m.strict),
        }

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Recover from the journal (if any) and start the actor task."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._journal is not None:
            self._table.recover(self._journal.load(), self._clock())
            self._table.next_deadline()  # the first batch ends what expired while stopped
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
        futures = [getattr(msg, "reply", None) for msg in self._mailbox]
        futures += [request.reply for request in self._table.queued.values()]
        futures += [reply for replies in self._table._watchers.values() for reply in replies]
        # Replies still in the outbox belong to a batch whose commit was cut short: they must
        # not claim a grant the journal may not hold (group commit answers only after commit).
        futures += [fut for fut, _, _ in self._outbox]
        for fut in futures:
            if fut is not None and not fut.done():
                fut.set_exception(error)
        self._mailbox.clear()
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
        # Waiters: the crash may have come in the middle of a hand-off.
        futures += [request.reply for request in self._table.queued.values()]
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
        table = self._table
        counts = table.counts
        while True:
            # Wait for a message, unless the timer fired while the actor awaited a commit.
            if not mailbox and (self._timer is not None or table.armed == _NEVER):
                self._wakeup = _Future(loop=loop)
                await self._wakeup
                self._wakeup = None
            # Events are built only while something observes them: a logger that keeps INFO
            # events, or a reader of the event buffer (both looked up once per batch).
            logger = self._publisher.logger = info_logger()
            table.observer = (
                self._publisher if logger is not None or self._events.recording else None
            )
            now = self._clock()  # the batch's time: grants in it count from here
            if now >= table.armed:
                table.expire(now)
                table.next_deadline()
            n = len(mailbox)
            counts["batches"] += 1
            counts["messages"] += n
            for _ in range(n):
                msg = mailbox.popleft()
                try:
                    # The two messages of every pair go to the table without a handler's frame.
                    kind = type(msg)
                    if kind is _Drop:
                        table.drop(msg.lease_id, now)
                        result = _PENDING
                    elif kind is Request:
                        if not msg.reply.done():  # else its caller is gone; a withdraw follows
                            self._deciding = msg
                            table.acquire(msg, now)
                        result = _PENDING
                    else:
                        result = handlers[kind](msg, now)
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
            self._deciding = None
            if table.rearm:
                table.next_deadline()
            if table.armed != self._timer_at:
                self._arm(table.armed, now)
            while self._journal is not None:
                try:
                    await self._journal.commit()
                    break
                except Exception as exc:  # nothing of this batch is durable
                    if self._journal_failed(exc, now):
                        return  # the disk failed: the kernel stopped
                    if not self._outbox:  # else: commit the grants the give-backs made
                        break
            if self._outbox:
                self._flush()

    def _deliver(self, answer: tuple[asyncio.Future[Any], Any]) -> None:
        """Deliver what the table decides besides the handlers' own results, as it decides it."""
        fut, value = answer
        if self._journal is not None:  # group commit: after the batch's commit
            if isinstance(value, KlockError):
                self._outbox.append((fut, None, value))
            else:
                self._outbox.append((fut, value, None))
        elif not fut.done():
            if isinstance(value, KlockError):
                fut.set_exception(value)
            else:
                fut.set_result(value)

    def _arm(self, at: float, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at != _NEVER:
            assert self._loop is not None
            self._timer = self._loop.call_later(max(0.0, at - now), self._wake)

    def _journal_failed(self, exc: Exception, now: float) -> bool:
        """Fail the batch's requests; stop the kernel (return True) only if the disk failed.

        A :class:`JournalUnavailableError` (the file was locked, or a value could not be
        stored) keeps the kernel running: the journal kept the batch's records to write with
        the next one, and the grants the failed requests would have seen are given back.
        """
        if isinstance(exc, JournalUnavailableError):
            get_logger().warning("journal.unavailable", error=str(exc))
            outbox, self._outbox = self._outbox, []
            granted = []
            for fut, value, _ in outbox:
                if not fut.done():
                    fut.set_exception(exc)
                for grant in value if isinstance(value, tuple) else ():
                    if isinstance(grant, tuple) and isinstance(grant[0], LeaseInfo):
                        granted.append(grant[0].id)  # an acquire's answer
            self._table.give_back(granted, now)
            return False
        get_logger().error("journal.failed", error=str(exc))
        error = KernelClosedError(
            f"the journal could not be written: {exc}. The kernel stopped and nothing of its "
            "last batch was granted; restart the server once the database is writable."
        )
        error.__cause__ = exc
        self.failure = error
        for fut, _, _ in self._outbox:
            if not fut.done():
                fut.set_exception(error)
        self._outbox.clear()
        assert self._loop is not None
        self._closer = self._loop.create_task(self.aclose())
        return True

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
        isolation: IsolationLevel | None = IsolationLevel.READ_COMMITTED,
        agent_view: bool = False,
        request_key: str | None = None,
    ) -> tuple[LeaseInfo, ...]:
        """Request leases; see :class:`~klock_async.backend.Backend`.

        ``request_key`` (see :func:`~klock_async.model.validate_request_key`) names this
        acquire and its resends: a resend with the same key is answered with the leases the
        key was granted (while they are active) and never granted twice; a resend of a request
        still queued takes its place.

        Raises:
            LeaseDied: Wait-Die refused the request.
            LeaseWouldWait: ``wait`` is false and the request would have to queue.
            AcquireTimeoutError: ``timeout`` ran out; the request was withdrawn.
            CausalViolationError: a stale write in a SERIALIZABLE session.
            InvalidRequestError: bad input; nothing changed.
            RequestKeyReusedError: ``request_key`` names another request; nothing changed.
            RequestSupersededError: a resend with the same key took this request's place.
            UnknownAgentError: ``agent_id`` was never registered.
        """
        ttl = validate_ttl(ttl)
        if timeout is not None:
            timeout = validate_timeout(timeout)
        if not intents:
            raise InvalidResourceError("a request needs at least one (resource, predicate) pair")
        if self._task is None or self._closed:
            self._post(self._future())  # not started or closed: raises the error that says so
        fut: asyncio.Future[Any] = _Future(loop=self._loop)  # _future(), _post(): inline
        request_id = next(self._request_ids)
        msg = Request(request_id, agent_id, session_id, tuple(intents), ttl, wait, isolation, fut)
        if agent_view:
            msg.agent_view = True
        if request_key is not None:
            msg.key = validate_request_key(request_key)
        self._mailbox.append(msg)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
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
        self, lease_id: str, agent_id: str | None = None, *, record_write: bool | None = None
    ) -> LeaseInfo:
        """End a lease; see :class:`~klock_async.backend.Backend`.

        With ``record_write`` None, a release that :meth:`release_nowait` can make is made that
        way, and answered with the snapshot the grant (or the last heartbeat) gave, in state
        RELEASED.
        """
        held = self._held.get(lease_id)
        if held is not None and record_write is None and self.release_nowait(lease_id, agent_id):
            return with_state(held[0], LeaseState.RELEASED)
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
        if self._task is None or self._closed:
            self._post(None)  # raises the error that says so
        self._mailbox.append(_Drop(lease_id))  # _post(), inline: the hot path
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
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
                if not self._closed:
                    self._post(_Unwatch(lease_id, fut))
                return None
        # Answered in the loop turn that also ran out the timeout (timeout=0 is a poll).
        answered: LeaseInfo = fut.result()
        return answered

    async def revoke(self, lease_id: str) -> LeaseInfo:
        """Revoke one lease; see :class:`~klock_async.backend.Backend`."""
        result: LeaseInfo = await self._ask(lambda f: _Revoke(lease_id, None, f))
        return result

    async def evict(self, agent_id: str) -> int:
        """Revoke an agent's leases; see :class:`~klock_async.backend.Backend`."""
        result: int = await self._ask(lambda f: _Revoke(None, agent_id, f))
        return result

    async def leases(self) -> tuple[LeaseInfo, ...]:
        """Snapshot of the active leases."""
        result: tuple[LeaseInfo, ...] = await self._ask(lambda f: _Query("leases", f))
        return result

    async def agents(self) -> tuple[AgentInfo, ...]:
        """Snapshot of the registered agents."""
        result: tuple[AgentInfo, ...] = await self._ask(lambda f: _Query("agents", f))
        return result

    async def agent(self, agent_id: str) -> AgentInfo | None:
        """The registered agent ``agent_id``, or None (without a snapshot of all of them)."""
        result: AgentInfo | None = await self._ask(lambda f: _Query("agent", f, agent_id))
        return result

    async def waiters(self) -> tuple[WaiterInfo, ...]:
        """Snapshot of the queued requests and what each waits for (the wait-for graph)."""
        result: tuple[WaiterInfo, ...] = await self._ask(lambda f: _Query("waiters", f))
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

    def _on_withdraw(self, msg: _Withdraw, now: float) -> object:
        self._table.withdraw(msg.request_id, msg.agent_id, msg.session_id, now)
        return _PENDING

    def _on_unwatch(self, msg: _Unwatch, now: float) -> object:
        self._table.unwatch(msg.lease_id, msg.reply)
        return _PENDING

    def _on_revoke(self, msg: _Revoke, now: float) -> Any:
        if msg.lease_id is not None:
            return self._table.revoke(msg.lease_id, now)
        assert msg.agent_id is not None
        return self._table.evict(msg.agent_id, now)

    def _on_watch(self, msg: _WatchLease, now: float) -> Any:
        ended = self._table.watch(msg.lease_id, msg.reply)
        return _PENDING if ended is None else ended

    def _on_query(self, msg: _Query, now: float) -> Any:
        table = self._table
        if msg.what == "leases":
            return table.lease_infos()
        if msg.what == "agents":
            return table.agent_infos()
        if msg.what == "agent":
            agent = table.agents.get(msg.agent_id)
            return None if agent is None else AgentInfo(agent.id, agent.ts)
        if msg.what == "clocks":
            return table.clock_status()
        if msg.what == "waiters":
            return table.waiters()
        return table.statistics()

    # ---------------------------------------------------------------- agent retirement

    async def retire_idle_agents(self, agent_ids: Iterable[str]) -> tuple[str, ...]:
        """Forget those of ``agent_ids`` that hold no lease and have no request waiting.

        The caller decides which agents were idle long enough (``klock serve --retire-after``);
        the actor only refuses to retire one that is busy now (see ``LockTable.retire``).

        Returns:
            The ids that were retired.
        """
        ids = tuple(agent_ids)
        result: tuple[str, ...] = await self._ask(lambda f: _RetireAgents(ids, f))
        return result

    async def release_client(
        self, agent_ids: Iterable[str], lease_ids: Iterable[str], reason: str
    ) -> int:
        """A client is gone: withdraw its agents' queued requests, release their leases.

        ``lease_ids`` are further leases granted to the client for agents it did not
        register. Each change is a recorded event with ``reason`` (``lease.released``,
        ``request.withdrawn``); the queued requests are answered with ``ClientGoneError``.

        Returns:
            How many leases were released.
        """
        agents = frozenset(agent_ids)
        leases = tuple(lease_ids)
        result: int = await self._ask(lambda f: _ReleaseClient(agents, leases, reason, f))
        return result

    # ---------------------------------------------------------------- introspection for tests

    def check_invariants(self) -> None:
        """Assert the lock table's invariants (for tests; walks all state).

        Raises:
            AssertionError: an invariant does not hold.
        """
        self._table.check_invariants()
        # Armed no later than every deadline (or fired, and the actor has yet to run).
        for lease in self._table.leases.values():
            assert self._table.armed <= lease.deadline or self._table.rearm
