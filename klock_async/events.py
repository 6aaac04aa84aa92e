"""Kernel events: one typed value per state change, and the bounded buffer they are read from.

The scheduler actor publishes an :class:`Event` for every change of state (an agent
registered, a lease granted, released, expired, revoked or heartbeated, a request queued,
withdrawn or refused by Wait-Die, a write recorded or refused as stale). They are read with
``klock.events()`` (embedded or remote) and, in server mode, as Server-Sent Events from
``GET /events``; ``klock status``, ``klock top`` and the page at ``GET /`` are built on them.

The buffer is a ring: it keeps the last ``capacity`` events and drops the oldest, counting
what it dropped. A reader that falls further behind than that skips ahead and learns how many
events it missed (:attr:`EventStream.dropped`); nothing ever blocks the actor. When nobody
reads and nobody asked to keep a history, the buffer records nothing (the actor checks one
attribute per state change), so the kernel pays nothing for events no one wants.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

__all__ = [
    "AGENT_REGISTERED",
    "EVENT_NAMES",
    "LEASE_EXPIRED",
    "LEASE_GRANTED",
    "LEASE_HEARTBEATED",
    "LEASE_RELEASED",
    "LEASE_REVOKED",
    "REQUEST_DIED",
    "REQUEST_QUEUED",
    "REQUEST_WITHDRAWN",
    "WRITE_RECORDED",
    "WRITE_REFUSED",
    "Event",
    "EventBuffer",
    "EventStream",
]

AGENT_REGISTERED: Final = "agent.registered"
LEASE_GRANTED: Final = "lease.granted"
LEASE_RELEASED: Final = "lease.released"
LEASE_EXPIRED: Final = "lease.expired"
LEASE_REVOKED: Final = "lease.revoked"
LEASE_HEARTBEATED: Final = "lease.heartbeated"
REQUEST_QUEUED: Final = "request.queued"
REQUEST_WITHDRAWN: Final = "request.withdrawn"
REQUEST_DIED: Final = "request.died"
WRITE_REFUSED: Final = "write.refused"
WRITE_RECORDED: Final = "write.recorded"

EVENT_NAMES: Final = (
    AGENT_REGISTERED,
    LEASE_GRANTED,
    LEASE_RELEASED,
    LEASE_EXPIRED,
    LEASE_REVOKED,
    LEASE_HEARTBEATED,
    REQUEST_QUEUED,
    REQUEST_WITHDRAWN,
    REQUEST_DIED,
    WRITE_REFUSED,
    WRITE_RECORDED,
)
"""Every event name the kernel publishes, in the order of a lease's life."""

DEFAULT_CAPACITY: Final = 4096


@dataclass(frozen=True, slots=True)
class Event:
    """One change of the kernel's state.

    Attributes:
        id: position in the kernel's event sequence (1, 2, ...); ``Last-Event-ID`` on the wire.
        name: one of :data:`EVENT_NAMES`, e.g. ``"lease.granted"``.
        at: wall-clock time of the change (``time.time()`` seconds).
        agent_id: the agent the change is about.
        session_id: its session, when the change concerns one.
        resource: the resource (``TYPE:path``, as leases show it), when there is one.
        predicate: the predicate (``MUTATES``, ...), when there is one.
        lease_id: the lease, for ``lease.*`` events and a death caused by a lease.
        token: the lease's fencing token, for ``lease.*`` events.
        request_id: the request, for ``request.*`` events and the lease it was granted as.
        data: further fields of this kind of event (read-only), e.g. ``resources`` of a
            multi-resource request, ``blocker_agent_id`` of a wait or a death, ``ts`` of an
            agent, ``ttl_ms`` of a grant or heartbeat.
    """

    id: int
    name: str
    at: float
    agent_id: str
    session_id: str | None = None
    resource: str | None = None
    predicate: str | None = None
    lease_id: str | None = None
    token: int | None = None
    request_id: int | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: ``at_ms`` (integer milliseconds) instead of ``at``; no None fields."""
        out: dict[str, Any] = {"id": self.id, "name": self.name, "at_ms": round(self.at * 1000)}
        for key in ("agent_id", "session_id", "resource", "predicate", "lease_id", "token"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.request_id is not None:
            out["request_id"] = self.request_id
        out.update(self.data)
        return out

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Event:
        """The event :meth:`as_dict` gave this JSON form of."""
        fields = dict(payload)
        event_id, name, at_ms = fields.pop("id"), fields.pop("name"), fields.pop("at_ms")
        agent_id = fields.pop("agent_id")
        known = {key: fields.pop(key) for key in _ATTRIBUTES if key in fields}
        return cls(event_id, name, at_ms / 1000.0, agent_id, **known, data=fields)


class EventBuffer:
    """The last ``capacity`` events of one kernel, written by its actor, read by streams.

    Args:
        capacity: events kept; older ones are dropped (and counted in :attr:`dropped`).
        retain: record even while no stream reads (a server keeps a history to resume from).

    Raises:
        ValueError: ``capacity`` is not a positive integer.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, *, retain: bool = False) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        # Events, and events not built yet: (id, at, render, args), built by render(id, at,
        # *args) when first read (see defer).
        self._events: deque[Event | _Deferred] = deque(maxlen=capacity)
        self._next_id = 1
        self._dropped = 0
        self._retain = retain
        self._readers = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self.recording = retain
        """Whether :meth:`publish` keeps events (read by the actor before building one)."""

    @property
    def dropped(self) -> int:
        """Events pushed out of the buffer by newer ones since the kernel started."""
        return self._dropped

    @property
    def last_id(self) -> int:
        """The id of the newest event published (0 before the first)."""
        return self._next_id - 1

    def publish(self, name: str, agent_id: str, **fields: Any) -> None:
        """Record one event now (a no-op unless :attr:`recording`) and wake the streams.

        ``fields`` are :class:`Event` attributes; any other keyword goes into ``data``.
        """
        if not self.recording:
            return
        data = {k: fields.pop(k) for k in [k for k in fields if k not in _ATTRIBUTES]}
        self._append(Event(self._next_id, name, time.time(), agent_id, **fields, data=data))

    def defer(self, render: Callable[..., Event], *args: Any) -> None:
        """Record one event now, built by ``render(id, at, *args)`` only when read.

        The kernel's hot path records the change (a lease and the event's name) and leaves
        the building of the event, its strings and its dictionary, to the readers: most
        recorded events are pushed out of the buffer unread. ``args`` must not change
        afterwards in what ``render`` reads of them.
        """
        if self.recording:
            self._append((self._next_id, time.time(), render, args))

    def _append(self, entry: Event | _Deferred) -> None:
        self._next_id += 1
        events = self._events
        if len(events) == self.capacity:
            self._dropped += 1
        events.append(entry)
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def snapshot(self, after: int = 0) -> list[Event]:
        """The buffered events with an id greater than ``after``, oldest first."""
        events = self._events
        if not events or self._next_id - 1 <= after:
            return []
        first = events[0]
        first_id = first[0] if type(first) is tuple else first.id  # type: ignore[union-attr]
        out = []
        for i in range(max(0, after - first_id + 1), len(events)):
            entry = events[i]
            if type(entry) is tuple:
                event_id, at, render, args = entry
                entry = events[i] = render(event_id, at, *args)
            out.append(entry)
        return out  # type: ignore[return-value]

    def stream(self, after: int | None = None) -> EventStream:
        """A reader of the events published from now on, or after the event with id ``after``.

        ``after`` resumes a stream (``Last-Event-ID``): events still in the buffer with a
        greater id come first; those already dropped are counted in the stream's ``dropped``.
        """
        return _BufferStream(self, self.last_id if after is None else after)

    def retain(self) -> None:
        """Record from now on even while no stream reads, so that readers can resume."""
        self._retain = self.recording = True

    def close(self) -> None:
        """End every stream once it has read what is buffered (the kernel shut down)."""
        self._closed = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _attach(self) -> None:
        self._readers += 1
        self.recording = True

    def _detach(self) -> None:
        self._readers -= 1
        self.recording = self._retain or self._readers > 0

    async def _wait(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter


# An event recorded by EventBuffer.defer: (id, at, render, args).
_Deferred = tuple[int, float, Callable[..., Event], tuple[Any, ...]]

_ATTRIBUTES = frozenset(("session_id", "resource", "predicate", "lease_id", "token", "request_id"))


class EventStream(abc.ABC):
    """An async iterator over a kernel's events, oldest first; ends when the kernel closes.

    Use it as ``async with klock.events() as events: async for event in events: ...``; leaving
    the block (or :meth:`aclose`) stops the recording (embedded) or the connection (remote)
    the stream asked for.
    """

    dropped: int
    """Events this stream missed because it fell more than the buffer's capacity behind."""

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> Event:
        """The next event; waits for one."""

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop reading."""


class _BufferStream(EventStream):
    """A reader of an :class:`EventBuffer` in the kernel's own event loop."""

    def __init__(self, buffer: EventBuffer, after: int) -> None:
        self._buffer = buffer
        self._after = after
        self._pending: deque[Event] = deque()
        self._open = True
        self.dropped = 0
        buffer._attach()

    async def __anext__(self) -> Event:
        while not self._pending:
            if not self._open:
                raise StopAsyncIteration
            buffer = self._buffer
            events = buffer.snapshot(self._after)
            if events:
                missed = events[0].id - self._after - 1
                if missed > 0:
                    self.dropped += missed
                self._pending.extend(events)
                self._after = events[-1].id
                break
            if buffer._closed:
                await self.aclose()
                raise StopAsyncIteration
            await buffer._wait()
        return self._pending.popleft()

    async def aclose(self) -> None:
        """Stop reading; the buffer stops recording when no stream is left (unless retained)."""
        if self._open:
            self._open = False
            self._buffer._detach()
