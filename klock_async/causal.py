"""Observed versions: what each SERIALIZABLE session saw of each path, across the resource tree.

The check that guards against lost updates. Every recorded write of a path takes the next
number of one kernel-wide sequence; a *view* (a SERIALIZABLE session, or an agent's own view
shared by its tool calls that name no session) records, per path it read, the sequence number
it read at. A write is fresh when the view saw every write that touched what the write covers.

The resource tree:

- reading a directory observes every path below it at that moment;
- writing a directory is a write of every path below it, and is checked against every one of
  them (a write below the directory that the view never saw makes it stale);
- writing a path below a directory changes the directory's version.

So a write of ``w`` is stale exactly when some recorded write of a path ``k`` overlapping ``w``
(``k`` is ``w``, an ancestor of it, or below it) has a number greater than what the view
observed of the path both cover (``w`` when ``k`` is above or at ``w``, else ``k``); the view
observed a path up to the highest number it read that path or any ancestor of it at.

Pure and owned by the scheduler task: no async, no I/O, no locks.
"""

from __future__ import annotations

from dataclasses import dataclass

from klock_async.model import Resource

__all__ = ["ObservedVersions", "StaleVersion", "View"]

View = tuple[str, str]
"""``(agent id, session id)``; the agent's own view has the session id ``""``."""

_VIEW_MEMORY = 65536  # views (and SERIALIZABLE sessions) remembered, least recently used dropped


@dataclass(frozen=True, slots=True)
class StaleVersion:
    """A write refused because its view never saw the latest version of a path it covers.

    Attributes:
        path: the path whose version the view never saw (the written path or one below it).
        seen: the version of ``path`` the view observed (0: never read it).
        latest: the version of ``path`` now.
    """

    path: str
    seen: int
    latest: int


class ObservedVersions:
    """Versions of paths and what each view observed of them.

    Owned by the scheduler task alone; not thread-safe.
    """

    __slots__ = ("_below", "_resources", "_sessions", "_views", "_written", "held", "seq")

    # Invariants:
    # - seq only grows; every recorded write takes seq + 1;
    # - _written[k] <= seq, and _below[a] is exactly the written keys strictly below a;
    # - an observation never exceeds seq, and a view's observation of a key only grows;
    # - held maps a lease id to what its end records (see hold_read / hold_write).
    seq: int
    _written: dict[str, int]
    _resources: dict[str, Resource]
    _below: dict[str, set[str]]
    _views: dict[View, dict[str, int]]
    _sessions: dict[View, str]
    held: dict[str, tuple[View | None, Resource, int, bool]]

    def __init__(self) -> None:
        self.seq = 0
        self._written = {}
        self._resources = {}
        self._below = {}
        self._views = {}
        self._sessions = {}
        # lease id -> (view, resource, sequence number at grant, writes): a read under a
        # held CONSUMES lease (observed when released), or a writing lease (recorded however
        # it ends; ``view`` None for a lease recovered from a journal).
        self.held = {}

    # ---------------------------------------------------------------- sessions

    def declare(self, agent_id: str, session_id: str) -> None:
        """Remember that the session is SERIALIZABLE (for requests that join it by id)."""
        key = (agent_id, session_id)
        self._sessions.pop(key, None)
        self._sessions[key] = session_id
        if len(self._sessions) > _VIEW_MEMORY:
            del self._sessions[next(iter(self._sessions))]

    def is_serializable(self, agent_id: str, session_id: str) -> bool:
        """Whether a request of the session made since the last `declare` said SERIALIZABLE."""
        return (agent_id, session_id) in self._sessions

    # ---------------------------------------------------------------- versions

    def version(self, resource: Resource) -> int:
        """The version of ``resource``: the last recorded write at, above or below it (0: none)."""
        written = self._written
        latest = max((written.get(k, 0) for k in (resource.key, *resource.up)), default=0)
        for k in self._below.get(resource.key, ()):
            latest = max(latest, written[k])
        return latest

    def observed(self, view: View, resource: Resource) -> int:
        """The version of ``resource`` the view observed: its read of it or of an ancestor."""
        seen = self._views.get(view)
        if not seen:
            return 0
        return max((seen.get(k, 0) for k in (resource.key, *resource.up)), default=0)

    def check(self, view: View, resource: Resource) -> StaleVersion | None:
        """Whether a write of ``resource`` in ``view`` would be stale; changes nothing.

        Reads under read leases the view still holds count as observed.
        """
        written = self._written
        above = max((written.get(k, 0) for k in (resource.key, *resource.up)), default=0)
        below = self._below.get(resource.key)
        if not above and not below:
            return None  # nobody wrote it, above or below: no read needed
        seen = self._views.get(view, {})
        if self.held:
            pending = self.pending_reads(view)
            if pending:
                seen = {**seen, **{k: max(s, seen.get(k, 0)) for k, s in pending.items()}}
        at = max((seen.get(k, 0) for k in (resource.key, *resource.up)), default=0)
        if above > at:
            return StaleVersion(resource.key, at, self.version(resource))
        for k in sorted(below or ()):
            latest = written[k]
            if latest > at:
                under = self._resources[k]
                seen_k = max(at, max((seen.get(u, 0) for u in (k, *under.up)), default=0))
                if latest > seen_k:
                    return StaleVersion(k, seen_k, self.version(under))
        return None

    def observe(self, view: View, resource: Resource, seq: int | None = None) -> None:
        """Record that the view read ``resource`` (and everything below it) at ``seq`` (now)."""
        seen = self._views.pop(view, None)
        if seen is None:
            seen = {}
            if len(self._views) >= _VIEW_MEMORY:
                del self._views[next(iter(self._views))]
        self._views[view] = seen
        at = self.seq if seq is None else seq
        if at > seen.get(resource.key, 0):
            seen[resource.key] = at

    def record_write(self, view: View | None, resource: Resource) -> int:
        """Record a write of ``resource``; the writing view (if any) observes it.

        Returns:
            The new version of ``resource``.
        """
        self.seq += 1
        key = resource.key
        if key not in self._resources:
            self._resources[key] = resource
            for ancestor in resource.up:
                self._below.setdefault(ancestor, set()).add(key)
        self._written[key] = self.seq
        if view is not None:
            self.observe(view, resource)
        return self.seq

    # ---------------------------------------------------------------- leases

    def hold_read(self, lease_id: str, view: View, resource: Resource) -> None:
        """A SERIALIZABLE CONSUMES lease was granted: its release observes the version now."""
        self.held[lease_id] = (view, resource, self.seq, False)

    def hold_write(self, lease_id: str, view: View | None, resource: Resource) -> None:
        """A writing lease was granted whose end, however it comes, records a write."""
        self.held[lease_id] = (view, resource, self.seq, True)

    def pending_reads(self, view: View) -> dict[str, int]:
        """The reads under read leases the view still holds (they count for its checks)."""
        found: dict[str, int] = {}
        for v, resource, seq, writes in self.held.values():
            if v == view and not writes and seq > found.get(resource.key, 0):
                found[resource.key] = seq
        return found

    def restore(self, paths: list[Resource]) -> None:
        """After a restart: every path written before counts as written by nobody now.

        Observations are not journaled, so no view has seen these versions: every session
        reads a path again before it writes it.
        """
        for resource in paths:
            self.record_write(None, resource)
