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

__all__ = ["Hold", "ObservedVersions", "StaleVersion", "View"]

View = tuple[str, str]
"""``(agent id, session id)``; the agent's own view has the session id ``""``."""

_VIEW_MEMORY = 65536  # views (and SERIALIZABLE sessions) remembered, least recently used dropped


@dataclass(frozen=True, slots=True)
class Hold:
    """What the end of a lease records.

    Attributes:
        view: the view it observes or writes in; None for a writing lease recovered from a
            journal (its isolation and view were not journaled).
        resource: the leased resource.
        seq: the sequence number at grant (what a read observes).
        writes: a writing lease (records a write) or a read lease (records a read).
    """

    view: View | None
    resource: Resource
    seq: int
    writes: bool


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

    __slots__ = (
        "_below",
        "_reads",
        "_resources",
        "_sessions",
        "_views",
        "_written",
        "held",
        "seq",
    )

    # Invariants:
    # - seq only grows; every recorded write takes seq + 1;
    # - _written[k] <= seq, and _below[a] is exactly the written keys strictly below a;
    # - an observation never exceeds seq, and a view's observation of a key only grows;
    # - held maps a lease id to what its end records (see hold_read / hold_write), and
    #   _reads[v] holds exactly the read entries of held whose view is v (none empty).
    seq: int
    _written: dict[str, int]
    _resources: dict[str, Resource]
    _below: dict[str, set[str]]
    _views: dict[View, dict[str, int]]
    _sessions: dict[View, None]
    held: dict[str, Hold]
    _reads: dict[View, dict[str, Hold]]

    def __init__(self) -> None:
        self.seq = 0
        self._written = {}
        self._resources = {}
        self._below = {}
        self._views = {}
        self._sessions = {}  # the SERIALIZABLE sessions, least recently declared first
        self.held = {}
        self._reads = {}

    # ---------------------------------------------------------------- sessions

    def declare(self, agent_id: str, session_id: str) -> None:
        """Remember that the session is SERIALIZABLE (for requests that join it by id)."""
        key = (agent_id, session_id)
        self._sessions.pop(key, None)
        self._sessions[key] = None
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
        reads = self._reads.get(view)
        if reads:  # reads under leases the view still holds count too
            seen = dict(seen)
            for hold in reads.values():
                key = hold.resource.key
                seen[key] = max(seen.get(key, 0), hold.seq)
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
        hold = self.held[lease_id] = Hold(view, resource, self.seq, writes=False)
        self._reads.setdefault(view, {})[lease_id] = hold

    def hold_write(self, lease_id: str, view: View | None, resource: Resource) -> None:
        """A writing lease was granted whose end, however it comes, records a write."""
        self.held[lease_id] = Hold(view, resource, self.seq, writes=True)

    def end_hold(self, lease_id: str) -> Hold | None:
        """Forget what the lease's end records, and return it (None: nothing)."""
        hold = self.held.pop(lease_id, None)
        if hold is not None and not hold.writes:
            assert hold.view is not None
            reads = self._reads[hold.view]
            del reads[lease_id]
            if not reads:
                del self._reads[hold.view]
        return hold

    def check_invariants(self) -> None:
        """Assert the invariants listed on the class (for tests; walks all state).

        Raises:
            AssertionError: an invariant does not hold.
        """
        assert all(0 < seq <= self.seq for seq in self._written.values())
        below: dict[str, set[str]] = {}
        for key in self._written:
            for ancestor in self._resources[key].up:
                below.setdefault(ancestor, set()).add(key)
        assert below == self._below
        for seen in self._views.values():
            assert all(0 < seq <= self.seq for seq in seen.values())
        reads: dict[View, dict[str, Hold]] = {}
        for lease_id, hold in self.held.items():
            assert hold.seq <= self.seq
            if not hold.writes:
                assert hold.view is not None
                reads.setdefault(hold.view, {})[lease_id] = hold
        assert reads == self._reads

    def restore(self, paths: list[Resource]) -> None:
        """After a restart: every path written before counts as written by nobody now.

        Observations are not journaled, so no view has seen these versions: every session
        reads a path again before it writes it.
        """
        for resource in paths:
            self.record_write(None, resource)
