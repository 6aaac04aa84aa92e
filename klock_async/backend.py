"""The transport-neutral interface between the facade and a scheduler.

The embedded :class:`~klock_async.scheduler.Scheduler` implements it by posting messages to its
actor; :class:`~klock_async.remote.RemoteBackend` implements it with HTTP requests to
``klock serve``. The facade in :mod:`klock_async.api` (agents, sessions, lease blocks, the
decorator, retries) is written once over this interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from klock_async.clocks import IsolationLevel, VectorClock
from klock_async.events import EventStream
from klock_async.model import AgentInfo, Intent, LeaseInfo, Statistics, WaiterInfo

__all__ = ["Backend", "ClockStatus"]


@dataclass(frozen=True, slots=True)
class ClockStatus:
    """A snapshot of the vector-clock manager: paths tracked and non-strict conflicts."""

    tracked_paths: tuple[str, ...]
    conflict_count: int


class Backend(Protocol):
    """What the facade needs from a scheduler, local or remote.

    Every method either returns a fresh snapshot or raises a
    :class:`~klock_async.errors.KlockError`; none returns live internals.
    """

    async def start(self) -> None:
        """Start (or connect to) the scheduler."""

    async def aclose(self) -> None:
        """Stop: fail every pending request with ``KernelClosedError`` and leave no task."""

    async def register_agent(self, agent_id: str, priority: int | None) -> AgentInfo:
        """Register ``agent_id`` (idempotent for the same priority) and return its age."""

    async def acquire(
        self,
        agent_id: str,
        session_id: str,
        intents: Sequence[Intent],
        *,
        ttl: float,
        wait: bool,
        timeout: float | None,
        isolation: IsolationLevel | None,
        agent_view: bool = False,
    ) -> tuple[LeaseInfo, ...]:
        """Grant all ``intents`` together (one lease each, same order) or raise.

        ``isolation`` None joins the session as it is (SERIALIZABLE when a request of it said
        so, else READ_COMMITTED). ``agent_view``: a SERIALIZABLE request observes and is checked
        in the agent's own view (shared by its tool calls that name no session), not the
        session's.

        Raises ``LeaseDied`` on DIE, ``LeaseWouldWait`` when ``wait`` is false and the verdict
        is WAIT, ``AcquireTimeoutError`` when ``timeout`` runs out (the request is withdrawn),
        ``CausalViolationError`` for a stale write in a SERIALIZABLE session. Cancelling the
        caller withdraws the request; nothing is leaked.
        """

    async def release(
        self, lease_id: str, agent_id: str | None = None, *, record_write: bool | None = None
    ) -> LeaseInfo:
        """End an active lease.

        A writing lease taken SERIALIZABLE records a causal write of its path when it ends;
        ``record_write`` True records one also for a lease taken otherwise, False records none
        (the holder declares it wrote nothing, e.g. its work failed before it wrote).
        """

    def release_nowait(self, lease_id: str, agent_id: str) -> bool:
        """Release without waiting for an answer, when the backend can vouch it will succeed.

        True: the release is on its way, and every request made after this call finds the
        lease released. False: the backend cannot tell that the lease is still active and held
        by ``agent_id`` (or must answer releases, e.g. after a commit); nothing was done, and
        the caller uses :meth:`release`, which also tells whether the lease was lost.
        """

    async def heartbeat(
        self, lease_id: str, agent_id: str | None = None, ttl: float | None = None
    ) -> LeaseInfo:
        """Push the expiry of an active lease to now + ttl (the lease's own ttl by default)."""

    async def release_session(self, agent_id: str, session_id: str) -> int:
        """Release every lease of one session; return how many."""

    async def wait_ended(self, lease_id: str, timeout: float | None) -> LeaseInfo | None:
        """Wait until the lease is no longer active; return its final snapshot.

        Returns None when ``timeout`` runs out first. A lease that expired or was revoked
        before the watch arrived returns its final snapshot at once (while the scheduler
        still remembers it). Raises ``LeaseNotFoundError`` at once when the lease is not
        active otherwise (released, long gone, or never granted).
        """

    async def revoke(self, lease_id: str) -> LeaseInfo:
        """End a lease by force (state REVOKED) and wake what waited for it."""

    async def evict(self, agent_id: str) -> int:
        """Revoke every lease of an agent; return how many."""

    async def leases(self) -> tuple[LeaseInfo, ...]:
        """Snapshot of the active leases."""

    async def agents(self) -> tuple[AgentInfo, ...]:
        """Snapshot of the registered agents."""

    async def statistics(self) -> Statistics:
        """Snapshot of the counters."""

    async def waiters(self) -> tuple[WaiterInfo, ...]:
        """Snapshot of the queued requests, oldest first, with what each waits for."""

    async def clock_read(self, path: str, agent_id: str) -> VectorClock:
        """Return the path's clock and merge it into the agent's clock."""

    async def clock_write(self, path: str, agent_id: str, *, strict: bool) -> VectorClock:
        """Record a write of ``path`` by the agent; strict raises ``CausalViolationError``."""

    async def clock_status(self) -> ClockStatus:
        """Tracked paths and the count of non-strict conflicting writes."""

    def events(self, after: int | None = None) -> EventStream:
        """A stream of the kernel's events from now on, or after the event with id ``after``."""
