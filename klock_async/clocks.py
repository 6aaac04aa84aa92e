"""Vector clocks and isolation levels: catching stale writes that span tool calls.

Per-call locks cannot prevent the lost update that spans two tool calls of one agent
(read a file, think, write the file): between the two calls another agent may write the
same file, and the first agent then overwrites a version it never saw. Vector clocks make
that visible. Every path and every agent carries a clock; reading a path merges the path's
clock into the agent's clock, and a write is *stale* when the path's clock is not
component-wise ``<=`` the writer's clock.

The clock algebra is the one of Fidge ("Timestamps in Message-Passing Systems That
Preserve the Partial Ordering", 1988) and Mattern ("Virtual Time and Global States of
Distributed Systems", 1989): ``merge`` is the component-wise maximum, ``happens_before`` the
strict component-wise order, and two clocks neither of which descends from the other are
concurrent.

The kernel orders writes with these clocks (``/clocks``, ``write.recorded``, the clocks in a
``CausalViolationError``), but the check that refuses a stale write is per (session, path),
across the resource tree: :mod:`klock_async.causal`. `VectorClockManager.check_write` is the
clock-level comparison, kept for callers of the clocks alone.

Everything here is pure: no async, no I/O, no logging. `VectorClock` is an immutable
value, safe to share across threads; `VectorClockManager` is mutable state owned by the
scheduler task alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NoReturn

from klock_async.errors import InvalidIsolationError
from klock_async.model import IdentityHashEnum

__all__ = ["IsolationLevel", "StaleWrite", "VectorClock", "VectorClockManager"]


class VectorClock:
    """An immutable vector clock: a counter per agent, absent agents counting zero.

    Zero entries are dropped, so ``VectorClock({"a": 0}) == VectorClock()``. Every method
    returns a new clock and leaves this one unchanged, so a clock can be shared across
    tasks and threads without locks.

    Clocks are partially ordered: ``x <= y`` means every component of ``x`` is ``<=`` the
    same component of ``y`` (``y`` descends from ``x``); ``x >= y`` works by reflection.
    ``<`` and ``>`` are deliberately not defined, since the order is partial: use
    `happens_before` and `is_concurrent`.

    Args:
        entries: Counter per agent id. ``None`` gives the empty clock.

    Raises:
        TypeError: If an agent id is not a ``str`` or a counter is not an ``int``.
        ValueError: If a counter is negative.
    """

    __slots__ = ("_counters", "_key")

    # _counters: read-only view of a private dict sorted by agent id, zero entries dropped.
    # _key: the same entries as a tuple of (agent, counter) pairs, for equality and hash.
    _counters: Mapping[str, int]
    _key: tuple[tuple[str, int], ...]

    def __init__(self, entries: Mapping[str, int] | None = None) -> None:
        counters: dict[str, int] = {}
        if entries is not None:
            for agent, counter in entries.items():
                if not isinstance(agent, str):
                    raise TypeError(
                        f"vector clock agent ids must be str, got {agent!r}; "
                        "pass a mapping of agent id to counter"
                    )
                if isinstance(counter, bool) or not isinstance(counter, int):
                    raise TypeError(
                        f"vector clock counter for {agent!r} must be an int, got {counter!r}"
                    )
                if counter < 0:
                    raise ValueError(
                        f"vector clock counter for {agent!r} is negative ({counter}); "
                        "counters start at 0 and only grow"
                    )
                if counter:
                    counters[agent] = counter
        self._init(counters)

    @classmethod
    def _trusted(cls, counters: dict[str, int]) -> VectorClock:
        # Fast path for clocks built from already validated clocks (tick, merge): no
        # checks, and `counters` must hold no zero entries and not be shared.
        clock = object.__new__(cls)
        clock._init(counters)
        return clock

    def _init(self, counters: dict[str, int]) -> None:
        ordered = dict(sorted(counters.items()))
        object.__setattr__(self, "_counters", MappingProxyType(ordered))
        object.__setattr__(self, "_key", tuple(ordered.items()))

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> VectorClock:
        """Build a clock from plain data, e.g. the output of `as_dict` after JSON.

        Args:
            data: Counter per agent id.

        Returns:
            The clock holding those counters.

        Raises:
            TypeError: If an agent id is not a ``str`` or a counter is not an ``int``.
            ValueError: If a counter is negative.
        """
        return cls(data)

    def get(self, agent: str) -> int:
        """Return the counter of ``agent``, 0 when the clock has no entry for it.

        Args:
            agent: The agent id.

        Returns:
            The agent's counter.
        """
        return self._counters.get(agent, 0)

    def tick(self, agent: str) -> VectorClock:
        """Return a new clock with ``agent``'s counter one higher.

        Args:
            agent: The agent id whose event this is.

        Returns:
            A clock that strictly happens after this one.

        Raises:
            TypeError: If ``agent`` is not a ``str``.
        """
        if not isinstance(agent, str):
            raise TypeError(f"vector clock agent ids must be str, got {agent!r}")
        counters = dict(self._counters)
        counters[agent] = counters.get(agent, 0) + 1
        return VectorClock._trusted(counters)

    def merge(self, other: VectorClock) -> VectorClock:
        """Return the component-wise maximum of this clock and ``other``.

        The result is the least clock that descends from both.

        Args:
            other: The clock to merge with.

        Returns:
            A new clock.
        """
        counters = dict(self._counters)
        for agent, counter in other._counters.items():
            if counter > counters.get(agent, 0):
                counters[agent] = counter
        return VectorClock._trusted(counters)

    def happens_before(self, other: VectorClock) -> bool:
        """Return whether this clock strictly precedes ``other``.

        Args:
            other: The clock to compare with.

        Returns:
            True when ``self <= other`` and ``self != other``.
        """
        return self._key != other._key and self._descends_to(other)

    def is_concurrent(self, other: VectorClock) -> bool:
        """Return whether neither clock descends from the other.

        Equal clocks are not concurrent.

        Args:
            other: The clock to compare with.

        Returns:
            True when neither ``self <= other`` nor ``other <= self``.
        """
        return not self._descends_to(other) and not other._descends_to(self)

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a fresh plain dict, sorted by agent id.

        Mutating the result does not affect the clock.

        Returns:
            Counter per agent id, without zero entries.
        """
        return dict(self._counters)

    def _descends_to(self, other: VectorClock) -> bool:
        # Every component of self is <= the same component of other. Zero entries are
        # never stored, so checking self's entries is enough.
        theirs = other._counters
        return all(counter <= theirs.get(agent, 0) for agent, counter in self._key)

    def __le__(self, other: object) -> bool:
        """Return whether every component of this clock is ``<=`` that of ``other``."""
        if not isinstance(other, VectorClock):
            return NotImplemented
        return self._descends_to(other)

    def __eq__(self, other: object) -> bool:
        """Return whether both clocks hold the same non-zero counters."""
        if not isinstance(other, VectorClock):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        """Hash consistent with equality."""
        return hash(self._key)

    def __repr__(self) -> str:
        """Return e.g. ``VectorClock({'a1': 3, 'a2': 1})``."""
        return f"VectorClock({dict(self._counters)!r})"

    def __reduce__(self) -> tuple[type[VectorClock], tuple[dict[str, int]]]:
        # Pickle and copy through the constructor: the mapping proxy cannot be pickled
        # and __setattr__ refuses the default slot-by-slot restore.
        return (VectorClock, (self.as_dict(),))

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError(f"VectorClock is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"VectorClock is immutable; cannot delete {name!r}")


_EMPTY = VectorClock()


class IsolationLevel(IdentityHashEnum):
    """How much a session is protected from other sessions' writes.

    Only SERIALIZABLE tracks vector clocks and takes intent locks; it refuses a write
    of a path whose current version the session never saw.
    """

    SNAPSHOT = "SNAPSHOT"
    READ_COMMITTED = "READ_COMMITTED"
    SERIALIZABLE = "SERIALIZABLE"

    @property
    def requires_vector_clocks(self) -> bool:
        """Whether reads and writes are recorded in the vector clocks."""
        return self is IsolationLevel.SERIALIZABLE

    @property
    def requires_intent_locks(self) -> bool:
        """Whether leases are checked strictly against the vector clocks at grant."""
        return self is IsolationLevel.SERIALIZABLE

    @property
    def allows_concurrent_writes(self) -> bool:
        """Whether a write may overwrite a version the writer never saw."""
        return self is not IsolationLevel.SERIALIZABLE

    @classmethod
    def parse(cls, value: IsolationLevel | str) -> IsolationLevel:
        """Return the level for an `IsolationLevel` or its name, case-insensitively.

        Args:
            value: A member, or a name such as ``"serializable"``.

        Returns:
            The matching member.

        Raises:
            InvalidIsolationError: If ``value`` names no level (also a ``ValueError``). There
                is no default.
        """
        if isinstance(value, IsolationLevel):
            return value
        if isinstance(value, str) and value.isascii():
            member = cls.__members__.get(value.upper())
            if member is not None:
                return member
        valid = ", ".join(cls.__members__)
        raise InvalidIsolationError(
            f"unknown isolation level {value!r}; use one of {valid} (any case)"
        )


@dataclass(frozen=True, slots=True)
class StaleWrite:
    """A write refused because the writer never saw the path's current version.

    The caller turns this into its own error (``CausalViolationError``).

    Attributes:
        path: The path the agent tried to write.
        agent_id: The writing agent.
        agent_clock: The agent's clock at the time of the check.
        path_clock: The path's clock, which does not descend to ``agent_clock``.
    """

    path: str
    agent_id: str
    agent_clock: VectorClock
    path_clock: VectorClock


class VectorClockManager:
    """Vector clocks per path and per agent, detecting writes of unseen versions.

    Owned by the scheduler task: only that task calls it, so it takes no locks and is
    not thread-safe. Paths and agent ids are used as given; validating them is the
    caller's job.
    """

    __slots__ = ("_agents", "_conflict_count", "_paths")

    # Invariants:
    # - path clocks only grow: a path's new clock always descends from its old one,
    #   because a write stores the writer's clock merged with the path's clock;
    # - agent clocks only grow: they change only by merge and tick;
    # - conflict_count only grows: it counts non-strict stale writes;
    # - a path is tracked once written (or restored), never by a read;
    # - after a write, the path's clock equals the writer's clock.
    _paths: dict[str, VectorClock]
    _agents: dict[str, VectorClock]
    _conflict_count: int

    def __init__(self) -> None:
        self._paths = {}
        self._agents = {}
        self._conflict_count = 0

    @property
    def conflict_count(self) -> int:
        """Number of stale writes let through by non-strict `write` calls."""
        return self._conflict_count

    @property
    def tracked_paths(self) -> tuple[str, ...]:
        """The paths with a clock, sorted."""
        return tuple(sorted(self._paths))

    def clock_of(self, path: str) -> VectorClock:
        """Return the clock of ``path``, empty when the path is not tracked.

        Args:
            path: The path.

        Returns:
            The path's current clock.
        """
        return self._paths.get(path, _EMPTY)

    def agent_clock(self, agent_id: str) -> VectorClock:
        """Return the clock of ``agent_id``, empty when the agent has no clock yet.

        Args:
            agent_id: The agent.

        Returns:
            The agent's current clock.
        """
        return self._agents.get(agent_id, _EMPTY)

    def read(self, path: str, agent_id: str) -> VectorClock:
        """Record that ``agent_id`` read ``path``: merge the path's clock into the agent's.

        Reading an untracked path does not start tracking it.

        Args:
            path: The path read.
            agent_id: The reading agent.

        Returns:
            The path's clock (empty when untracked).
        """
        path_clock = self._paths.get(path)
        if path_clock is None:
            return _EMPTY
        agent_clock = self._agents.get(agent_id, _EMPTY)
        if not path_clock <= agent_clock:
            self._agents[agent_id] = agent_clock.merge(path_clock)
        return path_clock

    def check_write(
        self, path: str, agent_id: str, seen: VectorClock | None = None
    ) -> StaleWrite | None:
        """Return whether a write of ``path`` by ``agent_id`` would be stale. Changes nothing.

        Args:
            path: The path to be written.
            agent_id: The writing agent.
            seen: versions the agent holds but that are not merged into its clock yet (reads
                under leases it still holds); counted as seen for this check only.

        Returns:
            A `StaleWrite` when the path's clock is not ``<=`` the agent's clock (the
            agent would overwrite a version it never saw), else ``None``.
        """
        path_clock = self._paths.get(path)
        if path_clock is None:
            return None
        agent_clock = self._agents.get(agent_id, _EMPTY)
        if seen is not None:
            agent_clock = agent_clock.merge(seen)
        if path_clock <= agent_clock:
            return None
        return StaleWrite(path, agent_id, agent_clock, path_clock)

    def observe(self, agent_id: str, clock: VectorClock) -> VectorClock:
        """Merge a version the agent has seen (e.g. a path clock taken at a read) into its clock.

        Returns:
            The agent's new clock.
        """
        agent_clock = self._agents.get(agent_id, _EMPTY)
        merged = agent_clock.merge(clock)
        if merged != agent_clock:
            self._agents[agent_id] = merged
        return merged

    def write(self, path: str, agent_id: str, *, strict: bool = True) -> VectorClock | StaleWrite:
        """Record that ``agent_id`` wrote ``path``.

        The writer's clock, merged with the path's clock and ticked for the writer,
        becomes both the agent's and the path's clock.

        Args:
            path: The path written.
            agent_id: The writing agent.
            strict: Refuse a stale write instead of counting it as a conflict.

        Returns:
            The new clock of the agent and the path; or, when ``strict`` and the write is
            stale, the `StaleWrite`, in which case nothing changed.
        """
        stale = self.check_write(path, agent_id)
        agent_clock = self._agents.get(agent_id, _EMPTY)
        if stale is not None:
            if strict:
                return stale
            self._conflict_count += 1
            # Merge so the path's clock keeps growing even over an unseen version.
            agent_clock = agent_clock.merge(stale.path_clock)
        new_clock = agent_clock.tick(agent_id)
        self._agents[agent_id] = new_clock
        self._paths[path] = new_clock
        return new_clock

    def note_conflict(self) -> None:
        """Count a write let through over a version its writer never saw."""
        self._conflict_count += 1

    def record(self, path: str, agent_id: str) -> VectorClock:
        """Record a write already found fresh (by the observed versions): never a conflict.

        The writer's clock, merged with the path's clock and ticked for the writer, becomes
        both the agent's and the path's clock.

        Returns:
            The new clock of the agent and the path.
        """
        agent_clock = self._agents.get(agent_id, _EMPTY)
        path_clock = self._paths.get(path)
        if path_clock is not None:
            agent_clock = agent_clock.merge(path_clock)
        new_clock = agent_clock.tick(agent_id)
        self._agents[agent_id] = new_clock
        self._paths[path] = new_clock
        return new_clock

    def snapshot(
        self,
    ) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]], int]:
        """Return the state as plain data for the durable journal.

        Returns:
            Path clocks and agent clocks (each sorted by key, as plain dicts) and the
            conflict count; fresh objects that share nothing with the manager.
        """
        paths = {path: self._paths[path].as_dict() for path in sorted(self._paths)}
        agents = {agent: self._agents[agent].as_dict() for agent in sorted(self._agents)}
        return paths, agents, self._conflict_count

    @classmethod
    def restore(
        cls,
        paths: Mapping[str, Mapping[str, int]],
        agents: Mapping[str, Mapping[str, int]],
        conflict_count: int,
    ) -> VectorClockManager:
        """Rebuild a manager from the output of `snapshot`.

        Args:
            paths: Clock per path, as plain data.
            agents: Clock per agent, as plain data.
            conflict_count: The conflict count.

        Returns:
            A manager in the snapshotted state.

        Raises:
            TypeError: If a clock holds a non-``str`` agent id or a non-``int`` counter.
            ValueError: If a counter or ``conflict_count`` is negative.
        """
        if isinstance(conflict_count, bool) or not isinstance(conflict_count, int):
            raise TypeError(f"conflict_count must be an int, got {conflict_count!r}")
        if conflict_count < 0:
            raise ValueError(f"conflict_count is negative ({conflict_count}); it only grows from 0")
        manager = cls()
        manager._paths = {path: VectorClock(data) for path, data in paths.items()}
        manager._agents = {agent: VectorClock(data) for agent, data in agents.items()}
        manager._conflict_count = conflict_count
        return manager
