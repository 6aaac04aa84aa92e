"""The lock table: every agent, unit of work, lease and queued request, and the decisions on them.

A synchronous state machine in the manner of sans-I/O protocol cores (h11, wsproto): no asyncio,
no I/O, no clock reads. Time is an argument of every call that needs it. The scheduler actor
(:mod:`klock_async.scheduler`) drives it from its mailbox and keeps only the futures, the timer
and the journal commit; tests drive it directly, on virtual time, and explore it exhaustively.

Answers that are not the immediate result of a call (a queued request granted by a release, a
request that dies because an older one passed it, a watcher told that a lease ended) are
passed to :attr:`LockTable.answer` as ``(reply, value)`` pairs, where ``reply`` is whatever
opaque handle the caller put on the request or watch (the actor's future) and ``value`` is the
result or a :class:`~klock_async.errors.KlockError` instance. By default they are appended to
:attr:`LockTable.answers`, which the driver drains; a driver may deliver each one instead.

The rules (DESIGN.md, "Wait-Die, exactly"; the argument is in docs/kernel.md):

- A request whose intents are all covered by leases its own session (unit) holds is granted at
  once, whatever is queued (reentrancy).
- Blockers of a request R: the active leases of other units that conflict with R, and the
  queued requests of other units that conflict with R and are older than R. A younger waiter
  never blocks an older request: the older one passes it.
- No blocker: GRANT. Otherwise a request of a unit that holds nothing (empty-handed) queues and
  never dies; a request of a holding unit WAITs when it is older than every blocker and DIEs
  otherwise; a request with ``wait=False`` never queues (LeaseDied or LeaseWouldWait).
- Every change re-decides the queues it touches, oldest first, and hands freed resources to
  the next compatible waiters in the same step. A grant or a new waiter that is older than a
  queued request of a holding unit it conflicts with makes that request die.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from klock_async import rules
from klock_async.backend import ClockStatus
from klock_async.causal import ObservedVersions, StaleVersion, View
from klock_async.clocks import IsolationLevel, StaleWrite, VectorClock, VectorClockManager
from klock_async.errors import (
    AgentExistsError,
    CausalViolationError,
    ClientGoneError,
    EvictedError,
    InvalidRequestError,
    KlockError,
    LeaseDied,
    LeaseNotFoundError,
    LeaseWouldWait,
    NotLeaseOwnerError,
    RequestKeyReusedError,
    RequestSupersededError,
    UnknownAgentError,
)
from klock_async.ids import new_lease_id
from klock_async.model import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    AgentInfo,
    Intent,
    LeaseInfo,
    LeaseState,
    Predicate,
    Resource,
    Statistics,
    WaiterInfo,
    WaitFor,
    lease_info,
)

__all__ = ["PRIORITY_MAX", "PRIORITY_MIN", "Journal", "LockTable", "RecoveredState", "Request"]

PRIORITY_MIN = MIN_PRIORITY
PRIORITY_MAX = MAX_PRIORITY
_RANK_AUTO = 2**64  # agents without an explicit priority rank after every explicit one
_SEQ_BITS = 64
_SEQ_MASK = 2**_SEQ_BITS - 1

_READ = Predicate.CONSUMES
_SERIALIZABLE = IsolationLevel.SERIALIZABLE
_READ_COMMITTED = IsolationLevel.READ_COMMITTED
_RELEASED = LeaseState.RELEASED
_COMPATIBLE = rules.COMPATIBLE
# Predicates that conflict with every predicate: nothing younger can pass a waiter holding one.
_EXCLUSIVE = frozenset(p for p in Predicate if not _COMPATIBLE[p])
_NEVER = float("inf")
_ENDED_COUNTER = {
    LeaseState.RELEASED: "releases",
    LeaseState.EXPIRED: "expiries",
    LeaseState.REVOKED: "revocations",
}
_IDLE_SLOTS = 1024  # empty resource slots kept for reuse (see LockTable._idle_slot)
_LATER_SWEEP = 1024  # LockTable._later is swept of ended leases' entries past this size
_LOST_MEMORY = 4096  # ended leases whose final state a late watcher can still learn
_RETRYING_MEMORY = 65536  # ages of units that died and hold nothing, kept for their retry


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
    priorities: dict[str, int] = field(default_factory=dict)  # agents' explicit priorities
    request_keys: dict[str, str] = field(default_factory=dict)  # lease id -> its request key


class Journal(Protocol):
    """Durable record of the lock table's state (implemented by klock_async.journal).

    The ``record_*`` calls only buffer, so the lock table may call them and stay free of I/O;
    :meth:`commit` writes the buffer in one transaction and is called by the actor only, which
    resolves a batch's replies after it returns.
    """

    def load(self) -> RecoveredState:
        """Read the state left by the previous run."""

    def record_agent(self, agent: AgentInfo, priority: int | None = None) -> None:
        """Buffer a registered agent, with its explicit priority if it was given one."""

    def record_lease(self, lease: LeaseInfo, request_key: str | None = None) -> None:
        """Buffer a granted or changed lease (insert or replace by id), with the request key
        of the acquire that was granted it (None: none, or no longer)."""

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

    def record_retired(self, agent_id: str) -> None:
        """Buffer the removal of a retired agent."""

    async def commit(self) -> None:
        """Write everything buffered in one transaction."""

    def close(self) -> None:
        """Release the database."""


# --------------------------------------------------------------------------------------------
# Records: mutable, owned by the table, never handed out.


# Not frozen: the actor builds one per acquire, and a frozen dataclass's __init__ costs about
# 1 us more for these fields. The table sets ``ts`` and ``holding``; nothing else changes.
@dataclass(slots=True)
class Request:
    """A request for leases, all or none; ``reply`` is the driver's opaque answer handle."""

    id: int
    agent_id: str
    session_id: str
    intents: tuple[Intent, ...]
    ttl: float
    wait: bool
    isolation: IsolationLevel | None  # None: the session's own (set on arrival)
    reply: Any
    ts: int = 0  # the unit's age (lower is older), set on arrival
    holding: bool = False  # queued while its unit held leases (set while queued)
    agent_view: bool = False  # observe in the agent's own view, not the session's
    key: str | None = None  # the client's request key: its resends are answered, not redone


class _Agent:
    __slots__ = ("id", "priority", "rank", "ts")

    def __init__(self, agent_id: str, ts: int, priority: int | None) -> None:
        self.id = agent_id
        self.ts = ts
        self.priority = priority
        # Its units' ages are rank | start order: an explicit priority ranks first.
        self.rank = (_RANK_AUTO if priority is None else priority - PRIORITY_MIN) << _SEQ_BITS


class _Unit:
    """A unit of work (an agent's session): its age, its leases and its queued requests."""

    __slots__ = ("age", "key", "leases", "queued")

    def __init__(self, key: tuple[str, str], age: int) -> None:
        self.key = key
        self.age = age
        self.leases: dict[str, _Lease] = {}
        self.queued: dict[int, Request] = {}


class _Lease:
    __slots__ = (
        "agent_id",
        "deadline",
        "ended",
        "id",
        "key",
        "predicate",
        "request_id",
        "resource",
        "session_id",
        "token",
        "ts",
        "ttl",
        "unit",
    )

    def __init__(
        self,
        lease_id: str,
        unit: _Unit,
        resource: Resource,
        predicate: Predicate,
        token: int,
        ttl: float,
        deadline: float,
        request_id: int,
    ) -> None:
        self.id = lease_id
        self.unit = unit
        self.agent_id, self.session_id = unit.key
        self.ts = unit.age
        self.resource = resource
        self.predicate = predicate
        self.token = token
        self.ttl = ttl
        self.deadline = deadline  # also its expires_at: the table's time is the wall clock
        self.request_id = request_id
        self.key: str | None = None  # the request key of its grant, while it names the grant
        # The end mark: empty while active; the table appends the final state when the lease
        # ends, and nothing else writes to it. The client side reads it (release_nowait).
        self.ended: list[LeaseState] = []

    def info(self, state: LeaseState = LeaseState.ACTIVE) -> LeaseInfo:
        return lease_info(
            self.id,
            self.agent_id,
            self.session_id,
            self.resource,
            self.predicate,
            self.token,
            self.ttl,
            self.deadline,
            state,
        )


class _Slot:
    """Everything attached to one resource: its active leases and its queue, oldest first."""

    __slots__ = ("holding", "leases", "order", "waiters")

    def __init__(self) -> None:
        self.holding = 0  # queued requests of holding units (none: nobody here can die)
        self.leases: dict[str, _Lease] = {}
        # The queue: (age, request id) sorted, and request id -> (request, the predicates it
        # may share this resource with: the intersection over its intents on the resource).
        self.order: list[tuple[int, int]] = []
        self.waiters: dict[int, tuple[Request, frozenset[Predicate]]] = {}


def _view(agent_id: str, session_id: str, agent_view: bool) -> View:
    """The view a request observes and checks in: its session's, or the agent's own."""
    return (agent_id, "" if agent_view else session_id)


def _allowed(predicates: Iterable[Predicate]) -> frozenset[Predicate]:
    allowed: frozenset[Predicate] | None = None
    for predicate in predicates:
        compat = _COMPATIBLE[predicate]
        allowed = compat if allowed is None else allowed & compat
    assert allowed is not None
    return allowed


def _covers(held: Predicate, wanted: Predicate) -> bool:
    """Whether holding ``held`` makes a lease of ``wanted`` change nothing for anyone else.

    True when everything that may coexist with ``held`` may also coexist with ``wanted``.
    """
    return _COMPATIBLE[held] <= _COMPATIBLE[wanted]


def _signature(intents: Iterable[Intent]) -> tuple[tuple[str, Predicate], ...]:
    """What a request key must name again on a resend: the intents, in order."""
    return tuple((intent.resource.key, intent.predicate) for intent in intents)


Observer = Callable[..., None]
"""``observer(event, lease=..., request=..., **fields)``: told of every state change."""


class LockTable:
    """The pure lock table. See the module docstring for the rules.

    Args:
        journal: buffering interface of a durable journal, or None.
        observer: called with each state change (``"lease.granted"``, ...) when not None.
    """

    # Invariants (checked by check_invariants(); tests assert them after every step):
    # - every _Lease in _leases is in exactly _slots[resource].leases and in its unit's leases;
    #   ended leases are in none of them;
    # - every queued Request is in _queued, in its unit's queued, and in the order and waiters
    #   of the slot of each of its resources, and nowhere else;
    # - no two active leases of different units conflict (rules.intents_conflict);
    # - a queued request of a holding unit is strictly older than each of its blockers;
    # - a unit is in _units exactly while it holds a lease or has a queued request;
    # - _under[r] is exactly the set of resources with a slot strictly below r;
    # - a slot exists only while it has leases or waiters, or is one of the last _IDLE_SLOTS
    #   emptied (in _idle, in the order they emptied);
    # - _last_token only grows; each grant takes the next value.
    # - _keys[(agent, key)] is either the one queued request of that agent with that key, or
    #   the leases of one grant, all active and carrying the key; no other lease carries it.

    def __init__(self, *, journal: Journal | None = None, observer: Observer | None = None) -> None:
        self.journal = journal
        self.observer = observer
        # Told of every refused stale write, observed or not (a warning for people).
        self.on_refused: Callable[[StaleWrite], None] | None = None
        self.answers: list[tuple[Any, Any]] = []
        # Where each answer goes: kept in ``answers`` by default; a driver that can deliver
        # at once (the actor, resolving a future) sets its own.
        self.answer: Callable[[tuple[Any, Any]], None] = self.answers.append
        self.agents: dict[str, _Agent] = {}
        self.units: dict[tuple[str, str], _Unit] = {}
        self._retrying: dict[tuple[str, str], int] = {}
        self.leases: dict[str, _Lease] = {}
        # Indexes are keyed by Resource.key (the "TYPE:path" string, hashed in C).
        self._slots: dict[str, _Slot] = {}
        self._under: dict[str, set[str]] = {}  # key -> keys with a slot strictly below it
        self._idle: dict[str, Resource] = {}  # empty slots kept for reuse, oldest first
        self.queued: dict[int, Request] = {}
        self._holding = 0  # how many queued requests are of holding units
        self._freed: list[Resource] = []  # resources of requests that died while queued
        # Expiry: a heap of (deadline, lease id), and the deadlines noted at or after the
        # deadline the driver armed its timer for (they join the heap when it fires). A grant
        # appends to a list instead of pushing onto a heap that its release would leave a stale
        # entry in. Entries of ended or extended leases are dropped lazily.
        self._expiry: list[tuple[float, str]] = []
        self._later: list[tuple[float, str]] = []
        self._later_limit = _LATER_SWEEP
        self.armed = _NEVER  # the deadline the driver's timer is armed for
        self.rearm = False  # a deadline fell before ``armed``: call next_deadline()
        self._watchers: dict[str, list[Any]] = {}
        # Request keys: (agent, key) -> its queued request, or the leases of its grant.
        self._keys: dict[tuple[str, str], Request | list[_Lease]] = {}
        # What SERIALIZABLE views observed, and the leases whose end is a read or a write.
        self.causal = ObservedVersions()
        self._lost: dict[str, LeaseInfo] = {}  # the last _LOST_MEMORY leases ended by others
        self.clocks = VectorClockManager()
        self.last_token = 0
        self.last_agent_ts = 0
        self._last_unit = 0
        self.counts = dict.fromkeys(
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

    # ---------------------------------------------------------------- recovery

    def recover(self, state: RecoveredState, now: float) -> None:
        """Load the state a journal recovered (before any other call)."""
        for agent in state.agents:
            priority = state.priorities.get(agent.agent_id)
            self.agents[agent.agent_id] = _Agent(agent.agent_id, agent.ts, priority)
        self.last_agent_ts = state.last_agent_ts
        self.last_token = state.last_token
        # Units come back in grant order: their ages are fresh, and older grants stay older.
        for info in sorted(state.leases, key=lambda i: i.token):
            if info.state is not LeaseState.ACTIVE:
                continue
            if info.agent_id not in self.agents:
                raise InvalidRequestError(
                    f"journal lease {info.id!r} names agent {info.agent_id!r}, which the "
                    "journal does not hold"
                )
            unit = self._unit(info.agent_id, info.session_id)
            lease = _Lease(
                info.id, unit, info.resource, info.predicate, info.token, info.ttl,
                info.expires_at, 0,
            )  # fmt: skip
            self._attach(lease)
            key = state.request_keys.get(info.id)
            if key is not None:
                lease.key = key
                grant = self._keys.setdefault((info.agent_id, key), [])
                assert isinstance(grant, list)
                grant.append(lease)
            # A lease that expired while the server was down ends on the first expiry.
            self._note_deadline(lease.deadline, lease.id)
            self.last_token = max(self.last_token, info.token)
        self.clocks = VectorClockManager.restore(
            state.path_clocks, state.agent_clocks, state.conflict_count
        )
        self._recover_versions(state)

    # ---------------------------------------------------------------- agents and units

    def register(self, agent_id: str, priority: int | None) -> AgentInfo:
        """Register an agent (idempotent for the same priority).

        Raises:
            InvalidRequestError: empty id, or a priority that is not a signed 64-bit integer.
            AgentExistsError: the id is registered with another priority.
        """
        if not isinstance(agent_id, str) or not agent_id.strip():
            raise InvalidRequestError("an agent id must be a non-empty string")
        if priority is not None and (
            isinstance(priority, bool)
            or not isinstance(priority, int)
            or not PRIORITY_MIN <= priority <= PRIORITY_MAX
        ):
            raise InvalidRequestError(
                f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, "
                f"got {priority!r}"
            )
        agent = self.agents.get(agent_id)
        if agent is not None:
            if priority is not None and priority != agent.ts:
                raise AgentExistsError(
                    f"agent {agent_id!r} is registered already with age {agent.ts}; an "
                    "agent's age never changes (register another id for another priority)"
                )
            return AgentInfo(agent.id, agent.ts)
        if priority is None:
            self.last_agent_ts += 1
            ts = self.last_agent_ts
        else:
            ts = priority
            # Later automatic ages come after every explicit one.
            self.last_agent_ts = max(self.last_agent_ts, ts)
        agent = self.agents[agent_id] = _Agent(agent_id, ts, priority)
        info = AgentInfo(agent.id, agent.ts)
        if self.journal is not None:
            self.journal.record_agent(info, priority)
            self.journal.record_counters(self.last_token, self.last_agent_ts)
        if self.observer is not None:
            self.observer("agent.registered", agent=agent.id, ts=agent.ts)
        return info

    def _agent(self, agent_id: str) -> _Agent:
        agent = self.agents.get(agent_id)
        if agent is None:
            raise UnknownAgentError(
                f"agent {agent_id!r} is not registered; call register_agent({agent_id!r}) first"
            )
        return agent

    def _unit(self, agent_id: str, session_id: str) -> _Unit:
        """The unit of (agent, session), created with its age on its first request.

        The age orders units for Wait-Die: an agent's explicit priority first, then the order
        in which units started. A unit that died and holds nothing keeps its age for its retry.
        """
        key = (agent_id, session_id)
        unit = self.units.get(key)
        if unit is not None:
            return unit
        age = self._retrying.pop(key, None) if self._retrying else None
        if age is None:
            self._last_unit += 1
            age = self.agents[agent_id].rank | self._last_unit
        unit = self.units[key] = _Unit(key, age)
        return unit

    def _unit_idle(self, unit: _Unit) -> None:
        if not unit.leases and not unit.queued:
            del self.units[unit.key]

    # ---------------------------------------------------------------- acquire

    def acquire(self, request: Request, now: float) -> None:
        """Decide a new request; its answer (now or later) goes to :attr:`answer`.

        A request with a :attr:`Request.key` that names a grant of the same agent is answered
        with that grant's leases; one that names a queued request takes its place (the earlier
        one is answered :class:`RequestSupersededError`).

        Raises:
            UnknownAgentError: the agent was never registered (nothing changed).
            RequestKeyReusedError: the key names a request of other intents or another
                session (nothing changed).
        """
        if request.agent_id not in self.agents:
            self._agent(request.agent_id)
        if request.key is not None and self._keyed(request, now):
            return
        if request.isolation is not _READ_COMMITTED:
            self._join(request)
        unit = self._unit(request.agent_id, request.session_id)
        request.ts = unit.age
        if unit.leases and self._covered(request, unit):
            if not self._grant(request, unit, now):
                self._unit_idle(unit)
            return
        blockers = self._blockers(request)
        if not blockers:
            if self._grant(request, unit, now):
                if self._holding:
                    self._passed(request)
                if self._freed:
                    self._reevaluate((), now)
            else:
                self._unit_idle(unit)
            return
        if request.wait and not unit.leases:
            # Empty-handed: it queues whatever the verdict (the common case under contention).
            self._enqueue(request, unit)
            self.counts["waits"] += 1
            if self.observer is not None:
                oldest = rules.wait_die(request.ts, blockers).blocker
                assert oldest is not None
                self.observer("request.queued", request=request, blocker=oldest.agent_id)
            if self._holding:
                self._passed(request)
            if self._freed:
                self._reevaluate((), now)
            return
        verdict = rules.wait_die(request.ts, blockers)
        blocker = verdict.blocker
        assert blocker is not None
        if not request.wait:
            if verdict.decision is rules.Decision.DIE:
                self._die(request, blocker, now)
            else:
                self.answer((request.reply, self._would_wait(request, blocker, now)))
            self._unit_idle(unit)
            return
        if unit.leases and verdict.decision is rules.Decision.DIE:
            self._die(request, blocker, now)
            self._unit_idle(unit)
            return
        self._enqueue(request, unit)
        self.counts["waits"] += 1
        if self.observer is not None:
            self.observer("request.queued", request=request, blocker=blocker.agent_id)
        self._passed(request)
        if self._freed:
            self._reevaluate((), now)

    def _keyed(self, request: Request, now: float) -> bool:
        """Decide a request by its key: True when answered, False to decide it as new."""
        assert request.key is not None
        found = self._keys.get((request.agent_id, request.key))
        if found is None:
            return False
        if isinstance(found, Request):
            session_id, intents = found.session_id, _signature(found.intents)
        else:
            session_id, intents = (
                found[0].session_id,
                _signature(Intent(lease.resource, lease.predicate) for lease in found),
            )
        if session_id != request.session_id or intents != _signature(request.intents):
            raise RequestKeyReusedError(
                f"request key {request.key!r} of agent {request.agent_id!r} names another "
                f"request (session {session_id!r}, other intents); nothing was changed. Send a "
                "new key with each acquire, and the same key only with its resends"
            )
        if isinstance(found, list):  # granted before: the same leases, nothing granted again
            for lease in found:
                lease.request_id = request.id  # the resend's now: the first call's withdrawal
                # (its caller left) must not give back what the resend was answered
            self.answer((request.reply, tuple((lease.info(), lease.ended) for lease in found)))
            return True
        # Queued: the resend takes the earlier request's place, which is answered superseded.
        self._unqueue(found)
        if self.observer is not None:
            self.observer("request.withdrawn", request=found, reason="superseded")
        self.answer(
            (
                found.reply,
                RequestSupersededError(
                    f"a resend of this acquire (request key {request.key!r}) took its place; "
                    "the resend gets the answer"
                ),
            )
        )
        if not request.wait:  # it is not to queue: decided as new (its unit keeps its age)
            self._reevaluate([i.resource for i in found.intents], now)
            return False
        if request.isolation is not _READ_COMMITTED:
            self._join(request)
        unit = self._unit(request.agent_id, request.session_id)
        request.ts = unit.age
        self._enqueue(request, unit)  # the same unit, age and intents: the same place
        return True

    def _covered(self, request: Request, unit: _Unit) -> bool:
        """Whether the unit's own leases already cover every intent of ``request``."""
        for intent in request.intents:
            resource = intent.resource
            for lease in unit.leases.values():
                held = lease.resource
                if (held.key == resource.key or held.key in resource.up) and _covers(
                    lease.predicate, intent.predicate
                ):
                    break
            else:
                return False
        return True

    def _overlapping(self, resource: Resource) -> list[_Slot]:
        """Slots of ``resource``, its ancestors and its descendants (per-resource indexes)."""
        slots = self._slots
        key = resource.key
        slot = slots.get(key)
        if key not in self._under and slots.keys().isdisjoint(resource.up):
            return [] if slot is None else [slot]  # nothing above or below (the common case)
        found = [] if slot is None else [slot]
        for ancestor in resource.up:
            slot = slots.get(ancestor)
            if slot is not None:
                found.append(slot)
        below = self._under.get(resource.key)
        if below:
            found.extend([slots[key] for key in below])
        return found

    def _blockers(self, request: Request, *, every: bool = False) -> list[_Lease | Request]:
        """Conflicting leases of other units, and conflicting older waiters of other units.

        Decisions need only the oldest blocker: per queue the oldest conflicting waiter is the
        first one found, and the scan stops there. ``every`` lists them all (the wait-for graph).
        """
        found: list[_Lease | Request] = []
        agent_id, session_id, ts = request.agent_id, request.session_id, request.ts
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
            allowed = _COMPATIBLE[intent.predicate]
            for slot in self._overlapping(resource):
                for lease in slot.leases.values():
                    if lease.predicate in allowed:
                        continue
                    if lease.agent_id == agent_id and lease.session_id == session_id:
                        continue  # reentrancy (KLIS-7)
                    found.append(lease)
                waiters = slot.waiters
                for age, rid in slot.order:
                    if age >= ts:
                        break  # younger waiters never block an older request
                    other, other_allowed = waiters[rid]
                    if intent.predicate in other_allowed:
                        continue
                    if other.agent_id == agent_id and other.session_id == session_id:
                        continue
                    found.append(other)
                    if not every:
                        break  # the queue is sorted: this is its oldest blocker
        return found

    def _passed(self, request: Request) -> None:
        """``request`` was granted or queued ahead of younger waiters: those of holding units
        that conflict with it must die (a holding unit never waits for an older request).
        """
        if not self._holding:
            return  # no queued request of a holding unit: nobody can die (the common case)
        ts, unit_key = request.ts, (request.agent_id, request.session_id)
        doomed: dict[int, tuple[Request, Intent]] = {}
        for intent in request.intents:
            for slot in self._overlapping(intent.resource):
                order = slot.order
                if not slot.holding or order[-1][0] <= ts:
                    continue  # no holding unit waits here, or none younger (the common cases)
                waiters = slot.waiters
                for _, rid in order[bisect.bisect_right(order, (ts, request.id)) :]:
                    other, other_allowed = waiters[rid]
                    if (
                        other.holding
                        and intent.predicate not in other_allowed
                        and (other.agent_id, other.session_id) != unit_key
                    ):
                        doomed[rid] = (other, intent)
        unit = self.units.get(unit_key)
        for other, intent in doomed.values():
            if other.id in self.queued:
                blocker: _Lease | Request = request
                if request.id not in self.queued and unit is not None:  # granted: name the lease
                    for lease in unit.leases.values():
                        if lease.request_id == request.id and lease.resource == intent.resource:
                            blocker = lease
                self._kill(other, blocker, None)

    def _kill(self, request: Request, blocker: _Lease | Request, now: float | None) -> None:
        """A queued request of a holding unit dies; what it waited for is re-decided."""
        self._unqueue(request)
        self._die(request, blocker, now)
        self._freed.extend(intent.resource for intent in request.intents)

    # ---------------------------------------------------------------- grant and refuse

    def _grant(self, request: Request, unit: _Unit, now: float) -> bool:
        """Grant every intent of ``request``; False when a causal check refused it instead."""
        serializable = request.isolation is _SERIALIZABLE
        if serializable and not self._causally_fresh(request):
            return False
        ttl = request.ttl
        deadline = now + ttl
        answer = []
        journal = self.journal
        observer = self.observer
        for intent in request.intents:
            self.last_token += 1
            lease_id = new_lease_id()
            lease = _Lease(
                lease_id, unit, intent.resource, intent.predicate, self.last_token, ttl,
                deadline, request.id,
            )  # fmt: skip
            self._attach(lease)
            if deadline >= self.armed and len(self._later) < self._later_limit:
                self._later.append((deadline, lease_id))  # _note_deadline(), common case
            else:
                self._note_deadline(deadline, lease_id)
            info = lease.info()
            answer.append((info, lease.ended))
            if serializable:
                self._hold_causal(request, lease_id, intent)
            if journal is not None:
                if request.key is None:
                    journal.record_lease(info)
                else:
                    journal.record_lease(info, request.key)
            if observer is not None:
                observer("lease.granted", lease=lease)
        if request.id in self.queued:
            # Only now: a waiter's slots hold its new leases, so none is dropped and rebuilt.
            self._unqueue(request)
        if request.key is not None:
            self._key_granted(request, answer)
        self.counts["grants"] += 1
        if journal is not None:
            journal.record_counters(self.last_token, self.last_agent_ts)
        self.answer((request.reply, tuple(answer)))
        if unit.queued:
            self._now_holding(unit, now)
        return True

    def _key_granted(self, request: Request, answer: list[tuple[LeaseInfo, Any]]) -> None:
        """Its key names the grant's leases from now on (journaled with them)."""
        assert request.key is not None
        grant = [self.leases[info.id] for info, _ in answer]
        for lease in grant:
            lease.key = request.key
        self._keys[(request.agent_id, request.key)] = grant

    def _key_ended(self, lease: _Lease) -> None:
        """A lease of a keyed grant ended: the key is spent, and names none of the rest."""
        assert lease.key is not None
        grant = self._keys.pop((lease.agent_id, lease.key), None)
        lease.key = None
        for other in grant if isinstance(grant, list) else ():
            if other.key is not None:
                other.key = None
                if self.journal is not None:
                    self.journal.record_lease(other.info())  # without its key

    def _now_holding(self, unit: _Unit, now: float) -> None:
        """The unit was granted leases while other requests of it wait (two concurrent calls in
        one session): those follow the holding rules from now on, and die unless older than
        every blocker.
        """
        for other in list(unit.queued.values()):
            if other.holding or other.id not in self.queued:
                continue
            self._set_holding(other, True)
            verdict = rules.wait_die(other.ts, self._blockers(other))
            if verdict.decision is rules.Decision.DIE:
                assert verdict.blocker is not None
                self._kill(other, verdict.blocker, now)

    def _causally_fresh(self, request: Request) -> bool:
        view = _view(request.agent_id, request.session_id, request.agent_view)
        for intent in request.intents:
            if intent.predicate.writes:
                stale = self.causal.check(view, intent.resource)
                if stale is not None:
                    if request.id in self.queued:
                        self._unqueue(request)
                        if self.observer is not None:
                            self.observer(
                                "request.withdrawn", request=request, reason="stale_write"
                            )
                    self.counts["causal_violations"] += 1
                    self.answer((request.reply, self._violation(stale, view)))
                    return False
        return True

    def _die(self, request: Request, blocker: _Lease | Request, now: float | None) -> None:
        self.counts["deaths"] += 1
        unit = self.units.get((request.agent_id, request.session_id))
        if unit is not None and unit.leases:
            # Its retry (after the retry helper releases what the unit holds) keeps the age.
            self._retrying[unit.key] = unit.age
            if len(self._retrying) > _RETRYING_MEMORY:
                del self._retrying[next(iter(self._retrying))]
        intent = request.intents[0]
        blocker_lease = blocker.id if isinstance(blocker, _Lease) else None
        where = str(blocker.resource) if isinstance(blocker, _Lease) else "a queued request"
        retry_after = (
            max(0.0, blocker.deadline - now) if isinstance(blocker, _Lease) and now else 0.0
        )
        if self.observer is not None:
            self.observer(
                "request.died",
                request=request,
                blocker=blocker.agent_id,
                blocker_lease=blocker_lease,
            )
        if unit is not None and unit.leases:
            message = (
                f"agent {request.agent_id!r} may not wait for {intent.predicate.value} "
                f"{intent.resource} while its session holds other leases: older agent "
                f"{blocker.agent_id!r} holds or awaits a conflicting intent ({where}). "
                "Release what this session holds and retry; the session keeps its age, "
                "so it cannot starve."
            )
        else:  # empty-handed: only a request made with wait=False dies
            message = (
                f"agent {request.agent_id!r} asked for {intent.predicate.value} "
                f"{intent.resource} with wait=False, and older agent {blocker.agent_id!r} "
                f"holds or awaits a conflicting intent ({where}); nothing was queued. Retry "
                "later, or acquire with wait=True to queue behind it."
            )
        self.answer(
            (
                request.reply,
                LeaseDied(
                    message,
                    agent_id=request.agent_id,
                    resource=str(intent.resource),
                    predicate=intent.predicate.value,
                    blocker_agent_id=blocker.agent_id,
                    blocker_lease_id=blocker_lease,
                    retry_after=retry_after,
                ),
            )
        )

    def _would_wait(self, request: Request, blocker: _Lease | Request, now: float) -> KlockError:
        intent = request.intents[0]
        wait_time = max(0.0, blocker.deadline - now) if isinstance(blocker, _Lease) else 0.0
        return LeaseWouldWait(
            f"{intent.predicate.value} {intent.resource} is held or awaited by younger agent "
            f"{blocker.agent_id!r}; nothing was queued. Ask again, or acquire with wait=True.",
            agent_id=request.agent_id,
            resource=str(intent.resource),
            blocker_agent_id=blocker.agent_id,
            wait_time=wait_time,
        )

    # ---------------------------------------------------------------- queues

    def _enqueue(self, request: Request, unit: _Unit) -> None:
        self.queued[request.id] = request
        unit.queued[request.id] = request
        if request.key is not None:
            self._keys[(request.agent_id, request.key)] = request
        request.holding = holding = bool(unit.leases)
        self._holding += holding
        intents = request.intents
        if len(intents) == 1:  # the common case: the predicates it may share with are its own
            allowed = {intents[0].resource.key: _COMPATIBLE[intents[0].predicate]}
        else:
            by_resource: dict[str, list[Predicate]] = {}
            for intent in intents:
                by_resource.setdefault(intent.resource.key, []).append(intent.predicate)
            allowed = {key: _allowed(predicates) for key, predicates in by_resource.items()}
        entry = (request.ts, request.id)
        for intent in intents:
            slot = self._slot(intent.resource)
            if request.id in slot.waiters:
                continue  # a resource named twice: one entry, the predicates combined
            slot.waiters[request.id] = (request, allowed[intent.resource.key])
            slot.holding += holding
            order = slot.order
            if not order or order[-1] < entry:
                order.append(entry)  # the youngest so far (the common case)
            else:
                bisect.insort(order, entry)

    def _unqueue(self, request: Request) -> None:
        del self.queued[request.id]
        unit = self.units[(request.agent_id, request.session_id)]
        del unit.queued[request.id]
        if request.key is not None and self._keys.get((request.agent_id, request.key)) is request:
            del self._keys[(request.agent_id, request.key)]
        self._holding -= request.holding
        entry = (request.ts, request.id)
        for intent in request.intents:
            slot = self._slots.get(intent.resource.key)
            if slot is not None and slot.waiters.pop(request.id, None) is not None:
                slot.holding -= request.holding
                order = slot.order
                if order[0] == entry:
                    del order[0]  # the oldest leaves (the common case)
                else:
                    del order[bisect.bisect_left(order, entry)]
                if not order and not slot.leases:
                    self._idle_slot(intent.resource)  # _drop_slot_if_empty(), inline

    def _set_holding(self, request: Request, holding: bool) -> None:
        """Reclassify a queued request (its unit came to hold leases, or let go of all)."""
        if request.holding is holding:
            return
        request.holding = holding
        self._holding += 1 if holding else -1
        for key in {intent.resource.key for intent in request.intents}:
            self._slots[key].holding += 1 if holding else -1

    def _reevaluate(self, resources: Iterable[Resource], now: float) -> None:
        """Re-decide the queues that overlap ``resources``, oldest first, until nothing changes.

        Per slot only the head of the queue can change: the waiters up to and including the
        first one that wants the resource exclusively (every younger waiter of another unit
        conflicts with it, and none of them may pass it), and the other waiters of that one's
        unit (a unit's requests never block each other; they share its age, so they follow it
        in the queue).
        """
        if not self.queued:  # nothing waits: the common case after a release
            self._freed.clear()
            return
        if type(resources) is tuple and len(resources) == 1 and self._hand_off(resources[0], now):
            return
        dirty: dict[str, Resource] = {}
        for resource in resources:  # a loop, not a comprehension: no frame of its own
            dirty[resource.key] = resource
        while (dirty or self._freed) and self.queued:
            if self._freed:
                dirty.update((r.key, r) for r in self._freed)
                self._freed.clear()
            candidates: dict[int, Request] = {}
            for resource in dirty.values():
                for slot in self._overlapping(resource):
                    waiters = slot.waiters
                    exclusive = None  # the age of the first exclusive waiter, once found
                    for age, rid in slot.order:
                        if exclusive is not None and age != exclusive:
                            break
                        request, allowed = waiters[rid]
                        candidates[rid] = request
                        if not allowed and exclusive is None:
                            exclusive = age
            dirty = {}
            if len(candidates) == 1:
                ordered: Iterable[Request] = candidates.values()  # the common case: no sort
            else:
                ordered = sorted(candidates.values(), key=lambda r: (r.ts, r.id))
            for request in ordered:
                if request.id not in self.queued:
                    continue
                if self._redecide(request, now):
                    dirty.update((i.resource.key, i.resource) for i in request.intents)

    def _hand_off(self, resource: Resource, now: float) -> bool:
        """Re-evaluation's common case, decided directly; False (nothing done) when not it.

        The case: ``resource`` has a queue and nothing above or below it, and the head of the
        queue wants it alone and exclusively, with no other request of its unit behind it. Then
        only the head can change (every other waiter conflicts with it and is younger), and
        nothing older than it waits here: its blockers are the conflicting leases of other
        units on the resource. Still blocked, it stays (a holding one was older than each of
        them). Else it is granted, and what its grant may free is re-evaluated in general.
        """
        key = resource.key
        slots = self._slots
        slot = slots.get(key)
        if (
            slot is None
            or not slot.order
            or self._freed
            or key in self._under
            or not slots.keys().isdisjoint(resource.up)
        ):
            return False
        order = slot.order
        age, rid = order[0]
        request, allowed = slot.waiters[rid]
        if allowed or len(request.intents) != 1 or (len(order) > 1 and order[1][0] == age):
            return False
        unit_key = (request.agent_id, request.session_id)
        for lease in slot.leases.values():
            if lease.unit.key != unit_key:
                return True  # still blocked: nothing changes
        unit = self.units[unit_key]
        granted = self._grant(request, unit, now)
        if granted and self._holding:
            self._passed(request)
        if not unit.leases and not unit.queued:
            del self.units[unit_key]  # _unit_idle(), inline
        if not granted or unit.queued or self._freed:
            self._reevaluate([resource], now)  # the general path
        return True

    def _redecide(self, request: Request, now: float) -> bool:
        """Re-decide a queued request; True when it left the queue in a way that may free
        others (it died, or a causal check refused it, or it was granted while other requests
        of its unit wait).

        A grant frees no other unit's waiter: every waiter of another unit its queued entry
        blocked, its new leases block alike (the same intents on the same resources).
        """
        blockers = self._blockers(request)
        unit = self.units[(request.agent_id, request.session_id)]
        if not blockers:
            granted = self._grant(request, unit, now)
            if granted and self._holding:
                self._passed(request)
            if not unit.leases and not unit.queued:
                del self.units[unit.key]  # _unit_idle(), inline
            # A grant frees only the unit's own other waiters (its leases do not block them):
            # those may sit behind it in a queue whose head alone was re-decided.
            return not granted or bool(unit.queued)
        if request.holding:
            verdict = rules.wait_die(request.ts, blockers)
            if verdict.decision is rules.Decision.DIE:
                assert verdict.blocker is not None
                self._kill(request, verdict.blocker, now)
                self._unit_idle(unit)
                return True
        return False

    def withdraw(self, request_id: int, agent_id: str, session_id: str, now: float) -> None:
        """The caller stopped waiting: unqueue the request, or give back what it was granted."""
        request = self.queued.get(request_id)
        if request is not None:
            unit = self.units[(request.agent_id, request.session_id)]
            self._unqueue(request)
            self._unit_idle(unit)
            if self.observer is not None:
                self.observer("request.withdrawn", request=request, reason="caller")
            self._reevaluate([i.resource for i in request.intents], now)
            return
        # Granted, but the caller stopped waiting before it saw the answer: give it back.
        holder = self.units.get((agent_id, session_id))
        if holder is not None and holder.leases:
            granted = [x for x in holder.leases.values() if x.request_id == request_id]
            for lease in granted:
                self._end(lease, LeaseState.RELEASED, seen=False)
            self._reevaluate([lease.resource for lease in granted], now)

    # ---------------------------------------------------------------- lease life

    def owned(self, lease_id: str, agent_id: str | None) -> _Lease:
        """The active lease ``lease_id``, checked against its holder.

        Raises:
            LeaseNotFoundError: not active.
            NotLeaseOwnerError: held by another agent.
        """
        lease = self.leases.get(lease_id)
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

    def release(
        self, lease_id: str, agent_id: str | None, record_write: bool | None, now: float
    ) -> LeaseInfo:
        """End a lease its holder lets go of; record a causal write when asked.

        Raises:
            LeaseNotFoundError: not active.
            NotLeaseOwnerError: held by another agent.
        """
        lease = self.owned(lease_id, agent_id)
        if record_write is False:  # the holder declares its work under the lease did not happen
            self.causal.end_hold(lease.id)
        elif record_write and lease.predicate.writes and lease.id not in self.causal.held:
            # A lease outside SERIALIZABLE whose holder says it wrote: the agent's own view.
            self.causal.hold_write(lease.id, (lease.agent_id, ""), lease.resource)
        info = self._end(lease, LeaseState.RELEASED) or lease.info(LeaseState.RELEASED)
        self._reevaluate((lease.resource,), now)
        return info

    def drop(self, lease_id: str, now: float) -> None:
        """A one-way release: end the lease if it is still active (else it ended already)."""
        lease = self.leases.get(lease_id)
        if lease is not None:
            self._end(lease, _RELEASED)
            if self.queued:
                self._reevaluate((lease.resource,), now)

    def heartbeat(
        self, lease_id: str, agent_id: str | None, ttl: float | None, now: float
    ) -> LeaseInfo:
        """Push a lease's deadline to ``now + ttl`` (its own ttl by default).

        Raises:
            LeaseNotFoundError: not active.
            NotLeaseOwnerError: held by another agent.
        """
        lease = self.owned(lease_id, agent_id)
        if ttl is not None:
            lease.ttl = ttl
        lease.deadline = now + lease.ttl
        self._note_deadline(lease.deadline, lease.id)
        info = lease.info()
        if self.journal is not None:
            if lease.key is None:
                self.journal.record_lease(info)
            else:
                self.journal.record_lease(info, lease.key)
        if self.observer is not None:
            self.observer("lease.heartbeated", lease=lease)
        return info

    def release_session(self, agent_id: str, session_id: str, now: float) -> int:
        """Release every lease of one unit; return how many."""
        unit = self.units.get((agent_id, session_id))
        if unit is None or not unit.leases:
            return 0
        leases = list(unit.leases.values())
        for lease in leases:
            self._end(lease, LeaseState.RELEASED, remember=True)
        self._reevaluate([lease.resource for lease in leases], now)
        return len(leases)

    def revoke(self, lease_id: str, now: float) -> LeaseInfo:
        """End one lease by force.

        Raises:
            LeaseNotFoundError: not active.
        """
        lease = self.leases.get(lease_id)
        if lease is None:
            raise LeaseNotFoundError(f"no active lease {lease_id!r} to revoke")
        info = self._end(lease, LeaseState.REVOKED) or lease.info(LeaseState.REVOKED)
        self._reevaluate([lease.resource], now)
        return info

    def evict(self, agent_id: str, now: float) -> int:
        """Revoke an agent's leases and refuse its queued requests; return how many leases.

        Raises:
            UnknownAgentError: never registered.
        """
        self._agent(agent_id)
        leases = [lease for lease in self.leases.values() if lease.agent_id == agent_id]
        for request in [r for r in self.queued.values() if r.agent_id == agent_id]:
            self._unqueue(request)
            if self.observer is not None:
                self.observer("request.withdrawn", request=request, reason="evicted")
            self.answer(
                (
                    request.reply,
                    EvictedError(
                        f"agent {agent_id!r} was evicted while this request waited; nothing "
                        "is held. Acquire again if the agent is still at work."
                    ),
                )
            )
        for lease in leases:
            self._end(lease, LeaseState.REVOKED)
        for unit in [u for u in self.units.values() if u.key[0] == agent_id]:
            self._unit_idle(unit)
        self._reevaluate([lease.resource for lease in leases], now)
        return len(leases)

    def release_client(
        self, agent_ids: Collection[str], lease_ids: Iterable[str], reason: str, now: float
    ) -> int:
        """A client is gone: refuse its agents' queued requests and release their leases.

        ``agent_ids`` are the agents the client registered, ``lease_ids`` further leases it
        was granted for agents it did not register. Every change is an event carrying
        ``reason``. Returns how many leases were released.
        """
        freed: list[Resource] = []
        for request in [r for r in self.queued.values() if r.agent_id in agent_ids]:
            self._unqueue(request)
            freed += [intent.resource for intent in request.intents]
            if self.observer is not None:
                self.observer("request.withdrawn", request=request, reason=reason)
            self.answers.append(
                (
                    request.reply,
                    ClientGoneError(
                        f"the client of agent {request.agent_id!r} was gone longer than its "
                        "grace period; this request was withdrawn and nothing is held"
                    ),
                )
            )
        leases = [lease for lease in self.leases.values() if lease.agent_id in agent_ids]
        leases += [
            lease
            for lease_id in lease_ids
            if (lease := self.leases.get(lease_id)) is not None and lease.agent_id not in agent_ids
        ]
        for lease in leases:
            self._end(lease, LeaseState.RELEASED, remember=True, reason=reason)
        for unit in [u for u in self.units.values() if u.key[0] in agent_ids]:
            self._unit_idle(unit)
        self._reevaluate(freed + [lease.resource for lease in leases], now)
        return len(leases)

    def watch(self, lease_id: str, reply: Any) -> LeaseInfo | None:
        """Answer ``reply`` when the lease ends; a lease that ended already answers now.

        Raises:
            LeaseNotFoundError: not active and not recently ended.
        """
        if lease_id not in self.leases:
            lost = self._lost.get(lease_id)
            if lost is not None:
                return lost
            raise LeaseNotFoundError(f"lease {lease_id!r} is not active")
        self._watchers.setdefault(lease_id, []).append(reply)
        return None

    def unwatch(self, lease_id: str, reply: Any) -> None:
        """Forget a watch whose caller stopped waiting."""
        watchers = self._watchers.get(lease_id)
        if watchers is not None:
            watchers[:] = [w for w in watchers if w is not reply]
            if not watchers:
                del self._watchers[lease_id]

    def expire(self, now: float) -> None:
        """End the leases due by ``now``."""
        heap = self._expiry
        for entry in self._later:
            if self._current(entry):
                heapq.heappush(heap, entry)
        self._later = []
        self.armed = _NEVER  # next_deadline() arms again
        expired: list[Resource] = []
        while heap and heap[0][0] <= now:
            deadline, lease_id = heapq.heappop(heap)
            lease = self.leases.get(lease_id)
            if lease is None or lease.deadline != deadline:
                continue  # released earlier, or extended by a heartbeat
            self._end(lease, LeaseState.EXPIRED)
            expired.append(lease.resource)
        if expired:
            self._reevaluate(expired, now)

    def next_deadline(self) -> float:
        """The earliest deadline the driver must wake for (inf when none); it is now armed.

        The driver calls it after :meth:`expire` and whenever :attr:`rearm` is set (a deadline
        fell before the armed one). Deadlines at or after the armed one wait in a list until
        the next :meth:`expire`.
        """
        heap = self._expiry
        while heap and not self._current(heap[0]):
            heapq.heappop(heap)
        if self._later and (not heap or heap[0][0] > self.armed):
            # The armed deadline is gone: the list may hold earlier ones than the heap's top.
            for entry in self._later:
                if self._current(entry):
                    heapq.heappush(heap, entry)
            self._later = []
        self.armed = heap[0][0] if heap else _NEVER
        self.rearm = False
        return self.armed

    def _note_deadline(self, deadline: float, lease_id: str) -> None:
        """Have the lease checked for expiry at ``deadline`` (grant, heartbeat, recovery)."""
        if deadline >= self.armed:
            later = self._later
            later.append((deadline, lease_id))
            if len(later) > self._later_limit:  # mostly leases released since: drop those
                self._later = [entry for entry in later if self._current(entry)]
                self._later_limit = max(_LATER_SWEEP, 2 * len(self._later))
        else:
            heapq.heappush(self._expiry, (deadline, lease_id))
            self.rearm = True

    def _current(self, entry: tuple[float, str]) -> bool:
        """Whether an expiry entry still belongs to an active lease (not ended or extended)."""
        lease = self.leases.get(entry[1])
        return lease is not None and lease.deadline == entry[0]

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
            self._forget_slot(idle.pop(next(iter(idle))))

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
        self.leases[lease_id] = lease
        key = lease.resource.key
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slot(lease.resource)
        elif not slot.leases and not slot.waiters:
            del self._idle[key]  # an idle slot in use again (_slot(), inline)
        slot.leases[lease_id] = lease
        lease.unit.leases[lease_id] = lease

    def _end(
        self,
        lease: _Lease,
        state: LeaseState,
        *,
        seen: bool = True,
        remember: bool = False,
        reason: str | None = None,
    ) -> LeaseInfo | None:
        """End an active lease; ``seen`` is false when its holder never received it.

        Returns the final snapshot when one was needed (journal, watchers, a loss, or
        ``remember``: a release its holder did not make itself), else None: a one-way release
        wants none, and building it was a tenth of the release's cost.
        """
        held = self.causal.held
        if held and lease.id in held:
            self._causal_end(lease, state, seen)
        lease_id = lease.id
        del self.leases[lease_id]
        resource = lease.resource
        slot = self._slots[resource.key]
        del slot.leases[lease_id]
        if not slot.leases and not slot.waiters:
            idle = self._idle
            idle[resource.key] = resource  # _idle_slot(), inline
            if len(idle) > _IDLE_SLOTS:
                self._forget_slot(idle.pop(next(iter(idle))))
        if lease.key is not None:
            self._key_ended(lease)
        unit = lease.unit
        del unit.leases[lease_id]
        if not unit.leases:
            if not unit.queued:
                del self.units[unit.key]
            else:  # its queued requests are empty-handed again: they never die
                for request in unit.queued.values():
                    self._set_holding(request, False)
        watchers = self._watchers.pop(lease_id, None) if self._watchers else None
        info = None
        if watchers is not None or self.journal is not None or state is not _RELEASED or remember:
            info = lease.info(state)
            if self.journal is not None:
                self.journal.record_lease(info)
            if state is not _RELEASED or remember:
                # Its holder may ask only now (a revocation right after the grant, a release
                # of a lease its session already let go of): keep the final snapshot.
                lost = self._lost
                lost[lease_id] = info
                if len(lost) > _LOST_MEMORY:
                    del lost[next(iter(lost))]
        lease.ended.append(state)
        self.counts[_ENDED_COUNTER[state]] += 1
        if self.observer is not None:
            if reason is None:
                self.observer(f"lease.{state.value.lower()}", lease=lease)
            else:
                self.observer(f"lease.{state.value.lower()}", lease=lease, reason=reason)
        for reply in watchers or ():
            self.answer((reply, info))
        return info

    def retire(self, agent_ids: Iterable[str]) -> tuple[str, ...]:
        """Forget those of ``agent_ids`` that hold no lease and have no request waiting.

        A retired agent is unknown afterwards (registering it again gives it a new age); its
        vector clock is kept, so a later agent of the same id still cannot overwrite a version
        it never read.
        """
        busy = {agent_id for agent_id, _ in self.units}
        retired = []
        for agent_id in agent_ids:
            if agent_id in self.agents and agent_id not in busy:
                del self.agents[agent_id]
                retired.append(agent_id)
                if self.journal is not None:
                    self.journal.record_retired(agent_id)
                if self.observer is not None:
                    self.observer("agent.retired", agent=agent_id)
        return tuple(retired)

    def give_back(self, lease_ids: Iterable[str], now: float) -> None:
        """End, as never seen by their holders, leases whose grant could not be made durable."""
        freed = []
        for lease_id in lease_ids:
            lease = self.leases.get(lease_id)
            if lease is not None:
                self._end(lease, LeaseState.RELEASED, seen=False)
                freed.append(lease.resource)
        self._reevaluate(freed, now)

    # ---------------------------------------------------------------- clocks

    def clock_read(self, path: str, agent_id: str) -> VectorClock:
        """Return the path's clock and merge it into the agent's clock.

        Raises:
            UnknownAgentError: never registered.
            InvalidResourceError: bad path.
        """
        self._agent(agent_id)
        resource = Resource.parse(path)
        key = str(resource)
        self.causal.observe((agent_id, ""), resource)
        clock = self.clocks.read(key, agent_id)
        self._journal_clocks(key, agent_id)
        return clock

    def clock_write(self, path: str, agent_id: str, strict: bool) -> VectorClock:
        """Record a write of ``path`` by the agent.

        Raises:
            CausalViolationError: strict, and the agent never saw the latest version.
            UnknownAgentError: never registered.
            InvalidResourceError: bad path.
        """
        self._agent(agent_id)
        resource = Resource.parse(path)
        key = str(resource)
        view = (agent_id, "")
        stale = self.causal.check(view, resource)
        if stale is not None and strict:
            self.counts["causal_violations"] += 1
            raise self._violation(stale, view)
        if stale is not None:
            self.clocks.note_conflict()
        self.causal.record_write(view, resource)
        result = self.clocks.record(key, agent_id)
        self._journal_clocks(key, agent_id)
        self._written(key, agent_id, result)
        return result

    def _written(
        self, path: str, agent_id: str, clock: VectorClock, session_id: str | None = None
    ) -> None:
        if self.observer is not None:
            self.observer(
                "write.recorded",
                agent=agent_id,
                session_id=session_id,
                resource=path,
                clock=clock.as_dict(),
            )

    def _journal_clocks(self, path: str, agent_id: str) -> None:
        if self.journal is not None:
            self.journal.record_clocks(
                path,
                self.clocks.clock_of(path),
                agent_id,
                self.clocks.agent_clock(agent_id),
                self.clocks.conflict_count,
            )

    def _violation(self, stale: StaleVersion, view: View) -> CausalViolationError:
        agent_id, session_id = view
        agent_clock = self.clocks.agent_clock(agent_id)
        path_clock = self.clocks.clock_of(stale.path)
        if self.on_refused is not None:
            self.on_refused(StaleWrite(stale.path, agent_id, agent_clock, path_clock))
        seen = f"version {stale.seen}" if stale.seen else "no version"
        where = f"session {session_id!r} of agent" if session_id else "agent"
        return CausalViolationError(
            f"{where} {agent_id!r} would overwrite version {stale.latest} of {stale.path}, "
            f"having read {seen} of it (vector clocks: the agent's {agent_clock.as_dict()}, "
            f"the path's {path_clock.as_dict()}); read it again, redo the change, then write",
            path=stale.path,
            agent_id=agent_id,
            agent_clock=agent_clock.as_dict(),
            path_clock=path_clock.as_dict(),
            session_id=session_id or None,
            seen_version=stale.seen,
            version=stale.latest,
        )

    # ---------------------------------------------------------------- causal (SERIALIZABLE)

    def _join(self, request: Request) -> None:
        """Settle the isolation of a request that did not say READ_COMMITTED.

        A request that names no level joins its session as it is: SERIALIZABLE when a request
        of that session said so. A SERIALIZABLE request in its own view declares its session.
        """
        causal = self.causal
        if request.isolation is None:
            serializable = causal.is_serializable(request.agent_id, request.session_id)
            request.isolation = _SERIALIZABLE if serializable else _READ_COMMITTED
        elif request.isolation is _SERIALIZABLE and not request.agent_view:
            causal.declare(request.agent_id, request.session_id)

    def _hold_causal(self, request: Request, lease_id: str, intent: Intent) -> None:
        """A SERIALIZABLE lease was granted: note what its end records."""
        view = _view(request.agent_id, request.session_id, request.agent_view)
        if intent.predicate.writes:
            self.causal.hold_write(lease_id, view, intent.resource)
        elif intent.predicate is _READ:
            self.causal.hold_read(lease_id, view, intent.resource)

    def _causal_end(self, lease: _Lease, state: LeaseState, seen: bool) -> None:
        """A lease with a causal meaning ended: record its read or its write.

        A read counts when its holder released it. A write counts however the lease ended: a
        release (explicit, block exit, session exit) is the holder's write; an expiry or a
        revocation is a possible write, since nobody can tell whether the holder wrote before
        it lost the lease. Either way the holder's view observes it (it knows the content:
        what it read, or what it wrote; nobody else could write meanwhile) and every other
        view must read the path again. A grant its caller never received counts as nothing.
        """
        hold = self.causal.end_hold(lease.id)
        assert hold is not None
        if not seen:
            return
        view, resource = hold.view, hold.resource
        key = str(resource)
        if not hold.writes:
            if state is LeaseState.RELEASED:
                assert view is not None
                self.causal.observe(view, resource, hold.seq)
                self.clocks.read(key, lease.agent_id)
                self._journal_clocks(key, lease.agent_id)
            return
        self.causal.record_write(view, resource)
        clock = self.clocks.record(key, lease.agent_id)
        self._journal_clocks(key, lease.agent_id)
        self._written(key, lease.agent_id, clock, lease.session_id)

    def _recover_versions(self, state: RecoveredState) -> None:
        """Versions and observations are not journaled: after a restart every path written
        before counts as written again, seen by no view, and every active writing lease as a
        write to be recorded when it ends (its isolation was not journaled either).
        """
        self.causal.restore([Resource.parse(path) for path in state.path_clocks])
        for lease in self.leases.values():
            if lease.predicate.writes:
                self.causal.hold_write(lease.id, None, lease.resource)

    # ---------------------------------------------------------------- snapshots

    def lease_infos(self) -> tuple[LeaseInfo, ...]:
        """Snapshot of the active leases."""
        return tuple(lease.info() for lease in self.leases.values())

    def agent_infos(self) -> tuple[AgentInfo, ...]:
        """Snapshot of the registered agents."""
        return tuple(AgentInfo(a.id, a.ts) for a in self.agents.values())

    def clock_status(self) -> ClockStatus:
        """Tracked paths and conflict count."""
        return ClockStatus(self.clocks.tracked_paths, self.clocks.conflict_count)

    def statistics(self) -> Statistics:
        """Snapshot of the counters."""
        counts = self.counts
        return Statistics(
            agents=len(self.agents),
            leases_active=len(self.leases),
            requests_waiting=len(self.queued),
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

    def waiters(self) -> tuple[WaiterInfo, ...]:
        """The queued requests, oldest first, each with what it waits for (the wait-for graph).

        A request waits for the active leases of other units that conflict with it and for
        the older queued requests of other units that conflict with it.
        """
        found = []
        for request in sorted(self.queued.values(), key=lambda r: (r.ts, r.id)):
            waits_for = []
            for blocker in self._blockers(request, every=True):
                if isinstance(blocker, _Lease):
                    waits_for.append(
                        WaitFor("lease", blocker.id, blocker.agent_id, str(blocker.resource))
                    )
                else:
                    resources = ", ".join(str(i.resource) for i in blocker.intents)
                    waits_for.append(WaitFor("request", blocker.id, blocker.agent_id, resources))
            found.append(
                WaiterInfo(
                    request_id=request.id,
                    agent_id=request.agent_id,
                    session_id=request.session_id,
                    age=request.ts & _SEQ_MASK,
                    priority=self.agents[request.agent_id].priority,
                    intents=request.intents,
                    waits_for=tuple(dict.fromkeys(waits_for)),
                )
            )
        return tuple(found)

    # ---------------------------------------------------------------- invariants

    def check_invariants(self) -> None:
        """Assert the invariants listed on the class (for tests; walks all state).

        Raises:
            AssertionError: an invariant does not hold.
        """
        for lease in self.leases.values():
            assert self._slots[lease.resource.key].leases[lease.id] is lease
            assert self.units[(lease.agent_id, lease.session_id)].leases[lease.id] is lease
        assert sum(len(s.leases) for s in self._slots.values()) == len(self.leases)
        assert sum(len(u.leases) for u in self.units.values()) == len(self.leases)
        assert sum(len(u.queued) for u in self.units.values()) == len(self.queued)
        for unit in self.units.values():
            assert unit.leases or unit.queued, f"idle unit {unit.key}"
        active = list(self.leases.values())
        for i, a in enumerate(active):
            for b in active[i + 1 :]:
                if a.unit is b.unit:
                    continue
                assert not rules.intents_conflict(
                    Intent(a.resource, a.predicate), Intent(b.resource, b.predicate)
                ), f"conflicting active leases {a.info()} and {b.info()}"
        queued_ids = set()
        for key, slot in self._slots.items():
            assert bool(slot.leases or slot.waiters) != (key in self._idle), f"slot {key}"
            assert slot.order == sorted(slot.order)
            assert {rid for _, rid in slot.order} == set(slot.waiters)
            assert slot.holding == sum(r.holding for r, _ in slot.waiters.values())
            for rid, (request, _) in slot.waiters.items():
                assert self.queued[rid] is request
                queued_ids.add(rid)
        assert len(self._idle) <= _IDLE_SLOTS
        assert self._holding == sum(r.holding for r in self.queued.values())
        assert queued_ids == set(self.queued)
        for request in self.queued.values():
            unit = self.units[(request.agent_id, request.session_id)]
            assert unit.queued[request.id] is request and request.ts == unit.age
            blockers = self._blockers(request, every=True)
            assert blockers, f"request {request.id} waits for nothing"
            if unit.leases:
                for blocker in blockers:
                    assert request.ts < blocker.ts, "a holding unit waits for an older one"
        expected: dict[str, set[str]] = {}
        for key in self._slots:
            resource = Resource.parse(key)
            for ancestor in resource.up:
                expected.setdefault(ancestor, set()).add(key)
        assert expected == self._under
        entries = set(self._expiry) | set(self._later)
        for lease in self.leases.values():
            assert (lease.deadline, lease.id) in entries, f"no expiry entry for {lease.id}"
        assert self.causal.held.keys() <= self.leases.keys(), "a causal hold outlived its lease"
        self.causal.check_invariants()
        keyed = 0
        for (agent_id, key), found in self._keys.items():
            if isinstance(found, Request):
                assert self.queued.get(found.id) is found and found.key == key
                assert found.agent_id == agent_id
            else:
                assert found, f"key {key!r} names no lease"
                for lease in found:
                    assert self.leases.get(lease.id) is lease and lease.key == key
                    assert lease.agent_id == agent_id
                keyed += len(found)
        assert keyed == sum(lease.key is not None for lease in self.leases.values())
        tokens = [lease.token for lease in self.leases.values()]
        assert len(tokens) == len(set(tokens))
        assert all(t <= self.last_token for t in tokens)
