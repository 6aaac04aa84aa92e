"""The facade: ``Klock``, agents, sessions, leases, lease blocks and the ``protected`` decorator.

Written once over :class:`~klock_async.backend.Backend`, so the same code runs embedded
(``async with Klock()``) and against a server (``Klock.connect(url)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import random
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import anyio

from klock_async.backend import Backend
from klock_async.clocks import IsolationLevel, VectorClock
from klock_async.errors import (
    CausalViolationError,
    InvalidRequestError,
    LeaseDied,
    LeaseLostError,
    LeaseNotFoundError,
    RetriesExhaustedError,
)
from klock_async.events import EventStream
from klock_async.ids import new_session_id
from klock_async.logging import get_logger
from klock_async.model import (
    AgentInfo,
    Intent,
    LeaseInfo,
    LeaseState,
    Predicate,
    Resource,
    Statistics,
    WaiterInfo,
    _intent_of,
    parse_intents,
    validate_ttl,
)

__all__ = ["Agent", "Klock", "Lease", "LeaseBlock", "RetryPolicy", "Session"]


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

# Enum members the hot paths compare with: a module global is cheaper to load than a member.
_SERIALIZABLE = IsolationLevel.SERIALIZABLE
_READ_COMMITTED = IsolationLevel.READ_COMMITTED
_ACTIVE = LeaseState.ACTIVE
_RELEASED = LeaseState.RELEASED
_NEVER = float("inf")

DEFAULT_TTL = 30.0
"""Seconds a lease lives without a heartbeat unless a ttl is given."""

IntentLike = tuple[Resource | str, Predicate | str] | Intent


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a protected call retries after Wait-Die made it die.

    Each retry keeps the unit's age (so it cannot starve), first releases what the dying
    session held, then waits until the blocking lease ends, at most a capped, jittered
    exponential backoff: ``min(max_delay, base_delay * 2**attempt)`` times a factor in
    ``[0.5, 1]``. It never busy-polls.

    Args:
        max_retries: retries after the first attempt; then ``RetriesExhaustedError``.
        base_delay: first backoff, in seconds.
        max_delay: cap of the backoff, in seconds.

    Raises:
        InvalidRequestError: a negative retry count or delays that are not
            ``0 < base_delay <= max_delay``.
    """

    max_retries: int = 100
    base_delay: float = 0.01
    max_delay: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise InvalidRequestError(f"max_retries must be an integer, got {self.max_retries!r}")
        if self.max_retries < 0 or not 0 < self.base_delay <= self.max_delay < float("inf"):
            raise InvalidRequestError(
                "RetryPolicy needs max_retries >= 0 and 0 < base_delay <= max_delay, got "
                f"{self.max_retries!r}, {self.base_delay!r}, {self.max_delay!r}"
            )

    def backoff(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (0-based)."""
        cap = min(self.max_delay, self.base_delay * 2.0 ** min(attempt, 64))
        return cap * random.uniform(0.5, 1.0)


class Lease:
    """A granted lease, as handed to its holder.

    The fields are the snapshot taken at grant (``expires_at`` and ``state`` are updated by
    :meth:`heartbeat`, :meth:`release` and loss). ``token`` is the fencing token: pass it to
    the store you write to, which should refuse a token smaller than one it already saw.
    """

    # _info is the latest snapshot the backend gave; _state is what this handle knows of the
    # lease now. They differ after a one-way release (or a loss learned without a snapshot):
    # the final snapshot is built when someone asks for it.
    __slots__ = ("_backend", "_info", "_isolation", "_state")

    def __init__(self, backend: Backend, info: LeaseInfo, isolation: IsolationLevel | None) -> None:
        self._backend = backend
        self._info = info
        self._isolation = isolation
        self._state = info.state

    def __repr__(self) -> str:
        i = self._info
        return (
            f"<Lease {i.predicate.value} {i.resource} agent={i.agent_id!r} token={i.token} "
            f"state={self._state.value}>"
        )

    @property
    def info(self) -> LeaseInfo:
        """The latest snapshot of this lease."""
        if self._info.state is not self._state:
            self._info = dataclasses.replace(self._info, state=self._state)
        return self._info

    @property
    def id(self) -> str:
        """Unguessable lease id (a capability: whoever has it can release the lease)."""
        return self._info.id

    @property
    def agent_id(self) -> str:
        """The holder."""
        return self._info.agent_id

    @property
    def session_id(self) -> str:
        """The holder's session."""
        return self._info.session_id

    @property
    def resource(self) -> Resource:
        """The leased resource."""
        return self._info.resource

    @property
    def predicate(self) -> Predicate:
        """The intent held."""
        return self._info.predicate

    @property
    def token(self) -> int:
        """Fencing token: grows with every grant, never goes backwards."""
        return self._info.token

    @property
    def expires_at(self) -> float:
        """Wall-clock expiry (``time.time()`` seconds), as of the last grant or heartbeat."""
        return self._info.expires_at

    @property
    def state(self) -> LeaseState:
        """ACTIVE, RELEASED, EXPIRED or REVOKED, as far as this handle knows."""
        return self._state

    @property
    def lost(self) -> bool:
        """True when the lease expired or was revoked while held."""
        return self._state in (LeaseState.EXPIRED, LeaseState.REVOKED)

    async def wait_lost(self) -> LeaseState:
        """Wait until the lease is lost (expired or revoked) and return that state.

        Returns as soon as the lease ends in any way; for a released lease that is RELEASED.
        """
        while self._state is LeaseState.ACTIVE:
            try:
                ended = await self._backend.wait_ended(self.id, None)
            except LeaseNotFoundError:
                if self._state is LeaseState.ACTIVE:
                    self._mark(LeaseState.EXPIRED)
                break
            if ended is not None:
                self._mark(ended.state)
        return self._state

    async def _mark_gone(self) -> None:
        """The kernel says the lease is not active: record how it ended, if it still knows.

        A lease the kernel no longer knows is taken as lost (EXPIRED), never as released:
        claiming protection that may not have held would be the worse mistake.
        """
        state = LeaseState.EXPIRED
        with contextlib.suppress(LeaseNotFoundError):
            ended = await self._backend.wait_ended(self.id, 0)
            if ended is not None:
                state = ended.state
        self._mark(state)

    def _mark(self, state: LeaseState) -> None:
        if self._state is LeaseState.ACTIVE:
            self._state = state
            if state is not LeaseState.RELEASED:
                get_logger().warning(
                    "lease.lost",
                    agent=self.agent_id,
                    session=self.session_id,
                    resource=str(self.resource),
                    predicate=self.predicate.value,
                    token=self.token,
                    lease=self.id,
                    state=state.value,
                )

    async def heartbeat(self, ttl: float | None = None) -> None:
        """Push the expiry to now + ttl (the lease's ttl by default).

        Raises:
            LeaseLostError: the lease ended before the heartbeat arrived.
        """
        try:
            self._info = await self._backend.heartbeat(self.id, self.agent_id, ttl)
        except LeaseNotFoundError:
            await self._mark_gone()
            raise self._gone_error() from None

    async def release(self, *, record_write: bool | None = None) -> None:
        """Release the lease.

        Args:
            record_write: None (the default): a writing lease taken SERIALIZABLE records a
                causal write of its path; True records one also for a lease taken otherwise;
                False records none (the holder wrote nothing).

        Raises:
            LeaseNotFoundError: released twice.
            LeaseLostError: the lease had expired or been revoked before the release.
        """
        info = self._info
        if self._state is not _ACTIVE:
            if self._state is _RELEASED:
                raise LeaseNotFoundError(f"lease {info.id!r} was released already")
            raise self._lost_error()
        if record_write is None and self._backend.release_nowait(info.id, info.agent_id):
            self._state = _RELEASED
            return
        try:
            self._info = await self._backend.release(
                info.id, info.agent_id, record_write=record_write
            )
            self._state = self._info.state
        except LeaseNotFoundError:
            await self._mark_gone()
            raise self._gone_error() from None

    def _gone_error(self) -> LeaseNotFoundError | LeaseLostError:
        """The error for a lease the kernel says is not active: released, or lost."""
        if self._state is LeaseState.RELEASED:
            return LeaseNotFoundError(
                f"lease {self.id!r} on {self.predicate.value} {self.resource} was released "
                "already (its session let go of it); acquire it again if you still need it"
            )
        return self._lost_error()

    def _lost_error(self) -> LeaseLostError:
        state = self._state.value
        possible = ""
        if self._isolation in (None, _SERIALIZABLE) and self.predicate.writes:
            possible = (
                f" It counts as a possible write of {self.resource}: every other session must "
                "read it again before writing it."
            )
        return LeaseLostError(
            f"lease on {self.predicate.value} {self.resource} (token {self.token}) was lost "
            f"({state.lower()}) while held: work done after that was not protected.{possible} "
            "Heartbeat more often or use a longer ttl, then read it again and redo the change.",
            lease_id=self.id,
            state=state,
        )


async def _to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to its end even when the caller is cancelled, then re-raise the cancel.

    Releasing must not stop half-way: an anyio scope that is cancelled would cancel every await
    (hence the anyio shield), and a plain ``task.cancel()``, even repeated, is not stopped by an
    anyio shield (hence ``asyncio.shield`` in a loop until the work is done).
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
    result = task.result()
    if cancelled:
        raise asyncio.CancelledError
    return result


class _KeeperSchedule:
    """Starts the keepers of the lease blocks still open ttl/3 after they were entered.

    One event-loop timer serves every block of a kernel: blocks wait in entry order, one queue
    per interval (so each queue is in due order), the timer is armed for the earliest due time,
    and a block that exits before its time just leaves its queue.
    """

    __slots__ = ("_at", "_due", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: dict[float, dict[LeaseBlock, float]] = {}  # interval -> {block: due time}
        self._timer: asyncio.TimerHandle | None = None
        self._at = _NEVER  # when the timer fires

    def add(self, block: LeaseBlock, interval: float) -> None:
        due = self._loop.time() + interval
        queue = self._due.get(interval)
        if queue is None:
            queue = self._due[interval] = {}
        queue[block] = due
        if due < self._at:
            self._arm(due)

    def discard(self, block: LeaseBlock, interval: float) -> None:
        queue = self._due.get(interval)
        if queue is not None:
            queue.pop(block, None)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._at = _NEVER
        now = self._loop.time()
        after = _NEVER
        for interval, queue in list(self._due.items()):
            while queue:
                block, due = next(iter(queue.items()))
                if due > now:
                    after = min(after, due)
                    break
                del queue[block]
                block._start_keepers(self._loop)
            if not queue:
                del self._due[interval]
        if after != _NEVER:
            self._arm(after)


class LeaseBlock:
    """``async with agent.lease(...) as lease``: acquire, keep alive, release.

    While inside, the lease is heartbeated every ttl/3 (by a keeper task started after the
    first ttl/3, so a short block costs no task) and watched for loss. On exit the lease is
    released (recording a causal write under SERIALIZABLE when the block raised nothing). If
    the lease was lost while inside and the block raised nothing, exit raises
    :class:`LeaseLostError`: the work was not protected.
    """

    def __init__(
        self,
        owner: _Acquirer,
        intents: tuple[Intent, ...],
        ttl: float,
        timeout: float | None,
        heartbeat: bool,
        session: Session | str | None = None,
    ) -> None:
        self._owner = owner
        self._session = session
        self._intents = intents
        self._ttl = ttl
        self._timeout = timeout
        self._heartbeat = heartbeat
        self._leases: list[Lease] = []
        self._keepers: list[asyncio.Task[None]] = []
        self._schedule: _KeeperSchedule | None = None  # where it waits for its keepers

    async def __aenter__(self) -> Lease:
        # acquire_many() without parsing again what lease_many() parsed and validated.
        owner = self._owner
        session_id, isolation, agent_view = owner._session_for(self._session)
        backend = owner._klock._backend or owner._klock.backend  # the property raises if unset
        infos = await backend.acquire(
            owner._agent_id,
            session_id,
            self._intents,
            ttl=self._ttl,
            wait=True,
            timeout=self._timeout,
            isolation=isolation,
            agent_view=agent_view,
        )
        if len(infos) == 1:  # the common case, without a comprehension's frame
            self._leases = [Lease(backend, infos[0], isolation)]
        else:
            self._leases = [Lease(backend, info, isolation) for info in infos]
        if self._heartbeat:
            self._schedule = owner._klock._keeper_schedule()
            self._schedule.add(self, self._ttl / 3)
        return self._leases[0]

    def _start_keepers(self, loop: asyncio.AbstractEventLoop) -> None:
        self._schedule = None
        self._keepers = [loop.create_task(self._keep(lease)) for lease in self._leases]

    @property
    def leases(self) -> list[Lease]:
        """All leases of the block (one per intent)."""
        return list(self._leases)

    async def _keep(self, lease: Lease) -> None:
        interval = self._ttl / 3
        backend = lease._backend
        while True:
            try:
                await lease.heartbeat()
            except LeaseLostError:
                return
            try:
                ended = await backend.wait_ended(lease.id, interval)
            except LeaseNotFoundError:
                return  # ended between two checks; release() on exit will tell
            if ended is not None:
                lease._mark(ended.state)
                return

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._schedule is not None:
            self._schedule.discard(self, self._ttl / 3)
            self._schedule = None
        if not self._keepers and self._release_one_way(clean=exc is None):
            return  # the common case: a short block, nothing to record, no await
        for keeper in self._keepers:
            keeper.cancel()
        # Shielded: a caller leaving a cancelled anyio scope (move_on_after, fail_after, a task
        # group) would otherwise be cancelled again at every await below and keep the rest of
        # its leases until they expire.
        lost = await _to_completion(self._release(clean=exc is None))
        if lost is not None and exc is None:
            raise lost

    def _release_one_way(self, *, clean: bool) -> bool:
        """Release every lease without waiting, where the backend can; True when all went.

        A lease that needs an answer (a block that raised, a lease the backend saw end, a
        remote backend) is left to :meth:`_release`, which skips those released here.
        """
        if not clean:
            return False  # a block that raised declares that it wrote nothing: needs an answer
        for lease in self._leases:
            if lease._state is not _ACTIVE:
                return False
            info = lease._info
            if not lease._backend.release_nowait(info.id, info.agent_id):
                return False
            lease._state = _RELEASED
        return True

    async def _release(self, *, clean: bool) -> LeaseLostError | None:
        if self._keepers:
            await asyncio.wait(self._keepers)
            for keeper in self._keepers:
                if not keeper.cancelled():
                    keeper.exception()  # retrieved: a failing transport shows in release()
        lost: LeaseLostError | None = None
        for lease in self._leases:
            if lease.state is not LeaseState.ACTIVE and not lease.lost:
                continue
            try:
                await lease.release(record_write=None if clean else False)
            except LeaseLostError as error:
                lost = lost or error
            except LeaseNotFoundError:
                pass  # its session released it already: nothing is left to let go of
        return lost


class _Acquirer:
    """What agents and sessions share: acquiring intents in some session."""

    def __init__(self, klock: Klock, agent_id: str) -> None:
        self._klock = klock
        self._agent_id = agent_id

    def _session_for_call(self) -> tuple[str, IsolationLevel | None, bool]:
        raise NotImplementedError

    def _session_for(
        self, session: Session | str | None
    ) -> tuple[str, IsolationLevel | None, bool]:
        """The session id, isolation level and view of a request (see ``Backend.acquire``).

        A session named by its id keeps its isolation: the live ``Session`` of that id when
        this process has one, else whatever the kernel knows of it (isolation None).
        """
        if session is None:
            return self._session_for_call()
        if isinstance(session, str) and session.strip():
            known = self._klock._sessions.get((self._agent_id, session))
            if known is None:
                return session, None, False
            session = known
        if isinstance(session, Session):
            if session.agent_id != self._agent_id:
                raise InvalidRequestError(
                    f"session {session.id} belongs to agent {session.agent_id!r}, "
                    f"not {self._agent_id!r}; an agent acquires only in its own sessions"
                )
            return session.id, session.isolation, session._agent_view
        raise InvalidRequestError(
            f"session must be a Session, a non-empty session id or None, not {session!r}"
        )

    async def acquire(
        self,
        resource: Resource | str,
        predicate: Predicate | str,
        *,
        ttl: float | None = None,
        session: Session | str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Lease:
        """Acquire one intent; return the lease once granted.

        Args:
            resource: ``TYPE:path`` or a bare path (a FILE).
            predicate: the intent, e.g. ``"MUTATES"``.
            ttl: seconds the lease lives without a heartbeat (default: the kernel's).
            session: the session to acquire in (a :class:`Session` or its id); by default an
                agent's acquire runs in a session of its own, a session's in that session.
            wait: queue when Wait-Die says WAIT (else raise ``LeaseWouldWait``).
            timeout: seconds to wait at most; then the request is withdrawn.

        Raises:
            LeaseDied: an older agent holds or awaits a conflicting intent (nothing is held).
            LeaseWouldWait: ``wait`` is false and the request would have to queue.
            AcquireTimeoutError: ``timeout`` seconds passed; the request was withdrawn.
            CausalViolationError: a stale write in a SERIALIZABLE session.
            InvalidRequestError: bad resource, predicate or ttl (nothing changed).
            UnknownAgentError: the agent is not registered.
        """
        # acquire_many for one intent, without its list and generator (this is the hot path;
        # the backend validates the ttl).
        if type(resource) is str and type(predicate) is str:
            intent = _intent_of(resource, predicate)  # what Intent.of() does, without its frame
        else:
            intent = Intent.of(resource, predicate)
        if ttl is None:
            ttl = self._klock.default_ttl
        if session is None:
            session_id, isolation, agent_view = self._session_for_call()
        else:
            session_id, isolation, agent_view = self._session_for(session)
        backend = self._klock._backend or self._klock.backend  # the property raises if unset
        (info,) = await backend.acquire(
            self._agent_id,
            session_id,
            (intent,),
            ttl=ttl,
            wait=wait,
            timeout=timeout,
            isolation=isolation,
            agent_view=agent_view,
        )
        return Lease(backend, info, isolation)

    async def acquire_many(
        self,
        intents: Sequence[IntentLike],
        *,
        ttl: float | None = None,
        session: Session | str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> list[Lease]:
        """Acquire several intents atomically: all are granted together, or none.

        Raises:
            The same errors as :meth:`acquire`.
        """
        parsed = parse_intents(intents)
        ttl = validate_ttl(self._klock.default_ttl if ttl is None else ttl)
        session_id, isolation, agent_view = self._session_for(session)
        infos = await self._klock.backend.acquire(
            self._agent_id,
            session_id,
            parsed,
            ttl=ttl,
            wait=wait,
            timeout=timeout,
            isolation=isolation,
            agent_view=agent_view,
        )
        return [Lease(self._klock.backend, info, isolation) for info in infos]

    def lease(
        self,
        resource: Resource | str,
        predicate: Predicate | str,
        *,
        ttl: float | None = None,
        session: Session | str | None = None,
        timeout: float | None = None,
        heartbeat: bool = True,
    ) -> LeaseBlock:
        """An ``async with`` block holding one intent, heartbeated while inside.

        Raises:
            InvalidRequestError: bad resource, predicate or ttl (raised here, before entering).
        """
        return self.lease_many(
            [(resource, predicate)], ttl=ttl, session=session, timeout=timeout, heartbeat=heartbeat
        )

    def lease_many(
        self,
        intents: Sequence[IntentLike],
        *,
        ttl: float | None = None,
        session: Session | str | None = None,
        timeout: float | None = None,
        heartbeat: bool = True,
    ) -> LeaseBlock:
        """An ``async with`` block holding several intents at once (atomic grant).

        Raises:
            InvalidRequestError: bad resource, predicate or ttl (raised here, before entering).
        """
        parsed = parse_intents(intents)
        ttl = validate_ttl(self._klock.default_ttl if ttl is None else ttl)
        self._session_for(session)  # refuse a bad session now, before entering
        return LeaseBlock(self, parsed, ttl, timeout, heartbeat, session)


class Agent(_Acquirer):
    """A registered agent. Its age ``ts`` (lower is older) never changes.

    ``acquire`` and ``lease`` without a session run in a session of their own, so two
    concurrent calls of one agent never merge by reentrancy; use :meth:`session` to group
    intents.
    """

    def __init__(self, klock: Klock, info: AgentInfo) -> None:
        super().__init__(klock, info.agent_id)
        self._info = info

    def __repr__(self) -> str:
        return f"<Agent {self.id!r} ts={self.ts}>"

    @property
    def id(self) -> str:
        """The agent id."""
        return self._info.agent_id

    @property
    def ts(self) -> int:
        """The agent's age: lower is older."""
        return self._info.ts

    def _session_for_call(self) -> tuple[str, IsolationLevel | None, bool]:
        return new_session_id(), _READ_COMMITTED, False

    def session(
        self,
        *,
        isolation: IsolationLevel | str = IsolationLevel.READ_COMMITTED,
        session_id: str | None = None,
    ) -> Session:
        """A unit of work: intents in it never conflict with each other (reentrancy).

        Use it as ``async with agent.session() as s``; leaving it releases everything the
        session holds, also when ``LeaseDied`` escapes (as Wait-Die requires of a dying
        transaction).

        A SERIALIZABLE session is a unit of work of its own: what it read and wrote is not
        shared with the agent's other sessions (see docs/causal.md).

        Raises:
            InvalidIsolationError: unknown isolation level.
        """
        return Session(self._klock, self.id, IsolationLevel.parse(isolation), session_id)

    async def read(self, path: str) -> VectorClock:
        """Record a read of ``path`` in the agent's own view (its clock merges into the agent's)."""
        return await self._klock.read(path, self.id)

    async def write(self, path: str, *, strict: bool = True) -> VectorClock:
        """Record a write of ``path`` by this agent.

        Raises:
            CausalViolationError: strict, and the agent never saw the path's latest version.
        """
        return await self._klock.write(path, self.id, strict=strict)


class Session(_Acquirer):
    """A unit of work of one agent: ``async with agent.session() as s``.

    Attributes:
        id: the session id.
        isolation: the isolation level; SERIALIZABLE adds causal checks to its leases.
    """

    def __init__(
        self,
        klock: Klock,
        agent_id: str,
        isolation: IsolationLevel,
        session_id: str | None = None,
        *,
        agent_view: bool = False,
    ) -> None:
        super().__init__(klock, agent_id)
        self.id = session_id or new_session_id()
        self.isolation = isolation
        # Observe and check in the agent's own view (tool calls that name no session).
        self._agent_view = agent_view
        if isolation is _SERIALIZABLE and not agent_view:
            klock._sessions[(agent_id, self.id)] = self  # joinable by id, while it lives

    def __repr__(self) -> str:
        return f"<Session {self.id} agent={self._agent_id!r} {self.isolation.value}>"

    @property
    def agent_id(self) -> str:
        """The agent that owns the session."""
        return self._agent_id

    def _session_for_call(self) -> tuple[str, IsolationLevel | None, bool]:
        return self.id, self.isolation, self._agent_view

    async def release_all(self) -> int:
        """Release every lease the session holds; return how many."""
        return await self._klock.backend.release_session(self._agent_id, self.id)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await _to_completion(self.release_all())


class Klock:
    """The coordination kernel facade.

    ``async with Klock() as klock`` runs the scheduler embedded in the current event loop;
    ``async with Klock.connect(url) as klock`` talks to a ``klock serve`` server. Both offer
    the same methods.

    Args:
        backend: the scheduler to use (default: a new embedded one).
        default_ttl: seconds a lease lives without heartbeat unless a ttl is given.
    """

    def __init__(self, *, backend: Backend | None = None, default_ttl: float = DEFAULT_TTL) -> None:
        self.default_ttl = validate_ttl(default_ttl)
        self._backend = backend
        self._agents: dict[str, Agent] = {}
        # The live SERIALIZABLE sessions of this process, by (agent, id): a request that names
        # one by its id keeps its isolation even before the kernel heard of the session.
        self._sessions: weakref.WeakValueDictionary[tuple[str, str], Session] = (
            weakref.WeakValueDictionary()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keepers: _KeeperSchedule | None = None

    def _keeper_schedule(self) -> _KeeperSchedule:
        """The schedule that starts lease blocks' keepers, in the running event loop."""
        keepers = self._keepers
        loop = asyncio.get_running_loop()
        if keepers is None or keepers._loop is not loop:
            keepers = self._keepers = _KeeperSchedule(loop)
        return keepers

    @classmethod
    def connect(
        cls,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 30.0,
        grace: float | None = None,
        operator_token: str | None = None,
    ) -> Klock:
        """A facade over a ``klock serve`` server at ``url`` (needs the ``server`` extra).

        Every call goes over one persistent channel (a WebSocket), which is this process's
        client session on the server: when the process dies or the network breaks for
        longer than the grace period, the server releases its leases. ``url`` may name several
        replicas of one server (a list, or URLs separated by commas): the channel goes to the
        leader and moves to the new one when it changes, resuming the same client session.

        Args:
            url: the server, e.g. ``http://127.0.0.1:3100``, or several replicas of it.
            token: the server's bearer token, if it has one.
            timeout: seconds to connect, and to wait for an answer that does not wait by
                design.
            grace: seconds the server keeps this client's leases after the channel broke
                (the client reconnects by itself within it); None: the server's
                ``--grace``, which also bounds it.
            operator_token: the server's ``--operator-token``, for :meth:`revoke` and
                :meth:`evict` of any agent's leases (sent once, when the channel opens).

        Raises:
            ImportError: the server extra is missing (``pip install 'klock-async[server]'``).
        """
        try:
            import websockets  # noqa: F401

            from klock_async.remote import ChannelBackend  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Klock.connect needs the server extra: pip install 'klock-async[server]'"
            ) from exc
        return cls(
            backend=ChannelBackend(
                url, token=token, timeout=timeout, grace=grace, operator_token=operator_token
            )
        )

    @property
    def backend(self) -> Backend:
        """The scheduler interface in use.

        Raises:
            KernelClosedError: the kernel is not started.
        """
        if self._backend is None:
            from klock_async.errors import KernelClosedError

            raise KernelClosedError("the klock kernel is not running; use 'async with Klock()'")
        return self._backend

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the kernel (or its connection) runs in; None before it started.

        Sync code in other threads posts work to it, e.g. with
        ``asyncio.run_coroutine_threadsafe(agent.acquire(...), klock.loop)``.
        """
        return self._loop

    async def __aenter__(self) -> Klock:
        if self._backend is None:
            from klock_async.scheduler import Scheduler

            self._backend = Scheduler()
        await self._backend.start()
        self._loop = asyncio.get_running_loop()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the kernel (embedded) or the connection (remote)."""
        if self._backend is not None:
            await self._backend.aclose()

    async def register_agent(self, agent_id: str, priority: int | None = None) -> Agent:
        """Register an agent and return its handle.

        Its age is the next value of a monotonic counter, or ``priority`` when given (lower is
        older). Registering the same id again returns the same age.

        Raises:
            InvalidRequestError: empty id or a non-integer priority.
            AgentExistsError: the id exists with another priority.
        """
        info = await self.backend.register_agent(agent_id, priority)
        agent = self._agents[agent_id] = Agent(self, info)
        return agent

    async def agent(self, agent_id: str) -> Agent:
        """The handle of a registered agent.

        Raises:
            UnknownAgentError: never registered.
        """
        agent = self._agents.get(agent_id)
        if agent is not None:
            return agent
        from klock_async.errors import UnknownAgentError

        for info in await self.backend.agents():
            if info.agent_id == agent_id:
                agent = self._agents[agent_id] = Agent(self, info)
                return agent
        raise UnknownAgentError(
            f"agent {agent_id!r} is not registered; call register_agent({agent_id!r}) first"
        )

    async def leases(self) -> list[LeaseInfo]:
        """Snapshot of the active leases."""
        return list(await self.backend.leases())

    async def agents(self) -> list[AgentInfo]:
        """Snapshot of the registered agents."""
        return list(await self.backend.agents())

    async def statistics(self) -> Statistics:
        """Snapshot of the scheduler's counters."""
        return await self.backend.statistics()

    async def waiters(self) -> list[WaiterInfo]:
        """The queued requests, oldest first, each with what it waits for.

        Together they are the wait-for graph: a :class:`~klock_async.model.WaitFor` edge
        points at an active lease or at an older queued request.
        """
        return list(await self.backend.waiters())

    def events(self, after: int | None = None) -> EventStream:
        """The kernel's events from now on, as an async iterator of :class:`Event` values.

        ``async with klock.events() as events: async for event in events: ...`` reads every
        state change (``lease.granted``, ``request.queued``, ...) until the kernel closes. A
        reader more than the buffer's capacity (4096 events) behind skips ahead and counts
        the skipped events in ``events.dropped``. ``after`` resumes after the event with that
        id, from what is still buffered. Events are recorded only while a stream is open.

        Raises:
            KernelClosedError: the kernel is not started.
        """
        return self.backend.events(after)

    async def revoke(self, lease_id: str) -> LeaseInfo:
        """Revoke a lease by force; its holder learns it was lost.

        Raises:
            LeaseNotFoundError: no such active lease.
        """
        return await self.backend.revoke(lease_id)

    async def evict(self, agent_id: str) -> int:
        """Revoke every lease of an agent (e.g. one that crashed); return how many.

        Raises:
            UnknownAgentError: never registered.
        """
        return await self.backend.evict(agent_id)

    # ---------------------------------------------------------------- vector clocks

    async def read(self, path: str, agent_id: str) -> VectorClock:
        """Return ``path``'s clock and merge it into the agent's clock.

        Raises:
            UnknownAgentError: never registered.
            InvalidResourceError: bad path.
        """
        return await self.backend.clock_read(path, agent_id)

    async def write(self, path: str, agent_id: str, *, strict: bool = True) -> VectorClock:
        """Record a write of ``path``; return the new clock.

        Raises:
            CausalViolationError: strict, and the path's clock is not <= the agent's clock
                (the agent would overwrite a version it never read); nothing changed.
            UnknownAgentError: never registered.
        """
        return await self.backend.clock_write(path, agent_id, strict=strict)

    async def conflict_count(self) -> int:
        """How many non-strict writes overwrote a version their agent never read."""
        return (await self.backend.clock_status()).conflict_count

    async def tracked_paths(self) -> tuple[str, ...]:
        """Paths that have a clock, sorted."""
        return (await self.backend.clock_status()).tracked_paths

    # ---------------------------------------------------------------- the decorator

    def protected(
        self,
        *,
        agent: str | Callable[..., str],
        resource: str | Callable[..., str | Sequence[str]],
        predicate: Predicate | str,
        ttl: float | None = None,
        isolation: IsolationLevel | str = IsolationLevel.READ_COMMITTED,
        retry: RetryPolicy | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
        """Wrap a coroutine function (a tool call) in a lease.

        Each call runs in a session of its own: it acquires ``predicate`` on the resource(s)
        named by ``resource`` (a string, or a function called with the call's arguments by
        name, ``self`` included for methods), runs, and releases. When Wait-Die makes it die it
        releases, waits for the blocker (see :class:`RetryPolicy`) and retries with the same
        age.

        Args:
            agent: agent id, or a function of the call's arguments returning one.
            resource: resource, or a function of the call's arguments returning one or several.
            predicate: the intent, validated now.
            ttl: lease ttl in seconds (heartbeated while the call runs).
            isolation: SERIALIZABLE adds causal checks: a write of a version the agent never
                read raises ``CausalViolationError`` telling it to re-read.
            retry: retry policy for DIE (default ``RetryPolicy()``).

        Raises:
            InvalidPredicateError: bad predicate (at decoration time).
            InvalidRequestError: a function that is not a coroutine function.
        """
        pred = Predicate.parse(predicate)
        level = IsolationLevel.parse(isolation)
        policy = retry or RetryPolicy()
        if ttl is not None:
            validate_ttl(ttl)
        if isinstance(resource, str):
            Resource.parse(resource)

        def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
            if not inspect.iscoroutinefunction(fn):
                raise InvalidRequestError(
                    f"protected() wraps coroutine functions; {fn!r} is not one"
                )
            signature = inspect.signature(fn)
            params = list(signature.parameters.values())
            names = [p.name for p in params]
            # The call's arguments by name, without Signature.bind when every parameter is a
            # plain positional-or-keyword one and the call gives them all (the common case).
            plain = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
            needs_names = callable(agent) or callable(resource)
            fixed = None if callable(resource) else parse_intents([(resource, pred)])

            def arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
                if plain and len(args) + len(kwargs) == len(names):
                    named = dict(zip(names, args, strict=False))
                    named.update(kwargs)
                    return named
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                return dict(bound.arguments)

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                named = arguments(args, kwargs) if needs_names else {}
                agent_id = agent(**named) if callable(agent) else agent
                if fixed is not None:
                    intents = fixed
                else:
                    target = resource(**named)  # type: ignore[operator]
                    targets = [target] if isinstance(target, str | Resource) else list(target)
                    intents = parse_intents([(t, pred) for t in targets])
                handle = self._agents.get(agent_id) or await self.agent(agent_id)
                return await self._run_protected(
                    handle, intents, ttl, level, policy, lambda: fn(*args, **kwargs)
                )

            return wrapper

        return decorate

    async def _run_protected(
        self,
        agent: Agent,
        intents: tuple[Intent, ...],
        ttl: float | None,
        isolation: IsolationLevel,
        policy: RetryPolicy,
        call: Callable[[], Awaitable[R]],
    ) -> R:
        # One session for every attempt: the unit of work keeps its age across retries. It
        # holds nothing when it asks, so the kernel queues it and never makes it die; a kernel
        # with another policy (an older server) may still refuse it with LeaseDied, and then
        # the retry policy applies.
        # The call's reads and writes belong to the agent's own view, shared by its tool calls:
        # a read in one call and the write in the next are linked.
        session = Session(self, agent.id, isolation, agent_view=True)
        lease_ttl = validate_ttl(self.default_ttl if ttl is None else ttl)
        attempt = 0
        while True:
            try:
                # session.lease_many() without parsing again what the decorator parsed.
                async with LeaseBlock(session, intents, lease_ttl, None, True):
                    return await call()
            except RetriesExhaustedError:
                raise
            except LeaseDied as died:
                if attempt >= policy.max_retries:
                    raise RetriesExhaustedError(
                        f"{died.message} Gave up after {attempt + 1} attempts; raise "
                        "RetryPolicy.max_retries or spread the work over fewer conflicts.",
                        agent_id=died.agent_id,
                        resource=died.resource,
                        predicate=died.predicate,
                        blocker_agent_id=died.blocker_agent_id,
                        blocker_lease_id=died.blocker_lease_id,
                        retry_after=died.retry_after,
                    ) from died
                await self._wait_for_blocker(died, policy.backoff(attempt))
                attempt += 1
            except CausalViolationError as violation:
                raise CausalViolationError(
                    f"{violation.path} changed since agent {violation.agent_id!r} last read it; "
                    "read it again, then redo this change (nothing was written)",
                    path=violation.path,
                    agent_id=violation.agent_id,
                    agent_clock=violation.agent_clock,
                    path_clock=violation.path_clock,
                    session_id=violation.session_id,
                    seen_version=violation.seen_version,
                    version=violation.version,
                ) from None

    async def _wait_for_blocker(self, died: LeaseDied, cap: float) -> None:
        if died.blocker_lease_id is None:
            await asyncio.sleep(cap)  # the blocker is a queued request: capped jittered backoff
            return
        with contextlib.suppress(LeaseNotFoundError):  # ended already: retry now
            await self.backend.wait_ended(died.blocker_lease_id, cap)
        if died.blocker_agent_id == died.agent_id:
            # Sessions of one agent have one age and never wait on each other: spread their
            # retries so they do not collide again the moment the blocker ends.
            await asyncio.sleep(random.uniform(0.0, cap))
