"""Tests for klock_async.clocks: vector clock algebra, isolation levels, the clock manager."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from klock_async.clocks import IsolationLevel, StaleWrite, VectorClock, VectorClockManager

AGENTS = ("a", "b", "c", "d", "e")

entries = st.dictionaries(st.sampled_from(AGENTS), st.integers(0, 5), max_size=len(AGENTS))
clocks = entries.map(VectorClock)
agents = st.sampled_from(AGENTS)


def vc(**counters: int) -> VectorClock:
    return VectorClock(counters)


# --- VectorClock: tables -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        pytest.param(VectorClock({"a": 0}), VectorClock(), id="zero-entry-dropped"),
        pytest.param(VectorClock(None), VectorClock({}), id="none-is-empty"),
        pytest.param(vc(a=1, b=0), vc(a=1), id="zero-among-others"),
        pytest.param(vc(a=1, b=2), vc(b=2, a=1), id="order-irrelevant"),
        pytest.param(VectorClock.from_dict({"a": 3}), vc(a=3), id="from-dict"),
    ],
)
def test_equal_clocks(left: VectorClock, right: VectorClock) -> None:
    """Clocks with the same non-zero counters are equal and hash alike."""
    assert left == right
    assert hash(left) == hash(right)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param({"a": -1}, ValueError, id="negative"),
        pytest.param({"a": 1, "b": -3}, ValueError, id="negative-among-others"),
        pytest.param({"a": 1.0}, TypeError, id="float-counter"),
        pytest.param({"a": "1"}, TypeError, id="str-counter"),
        pytest.param({"a": True}, TypeError, id="bool-counter"),
        pytest.param({1: 1}, TypeError, id="int-agent"),
    ],
)
def test_invalid_entries_are_refused(data: dict[Any, Any], error: type[Exception]) -> None:
    """Negative counters raise ValueError; counters that are not ints raise TypeError."""
    with pytest.raises(error):
        VectorClock(data)
    with pytest.raises(error):
        VectorClock.from_dict(data)


def test_get_defaults_to_zero() -> None:
    """get() returns the counter, or 0 for an agent the clock does not know."""
    clock = vc(a1=3)
    assert clock.get("a1") == 3
    assert clock.get("nobody") == 0


@pytest.mark.parametrize(
    ("clock", "agent", "expected"),
    [
        pytest.param(VectorClock(), "a", vc(a=1), id="from-empty"),
        pytest.param(vc(a=1), "a", vc(a=2), id="existing-agent"),
        pytest.param(vc(a=1), "b", vc(a=1, b=1), id="new-agent"),
    ],
)
def test_tick(clock: VectorClock, agent: str, expected: VectorClock) -> None:
    """tick() increments one agent's counter by one."""
    assert clock.tick(agent) == expected


def test_tick_refuses_non_str_agent() -> None:
    """tick() with an agent id that is not a str raises TypeError."""
    with pytest.raises(TypeError):
        VectorClock().tick(1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        pytest.param(
            VectorClock({"a1": 3, "a2": 1}),
            VectorClock({"a1": 2, "a3": 4}),
            VectorClock({"a1": 3, "a2": 1, "a3": 4}),
            id="design-example",
        ),
        pytest.param(VectorClock(), vc(a=2), vc(a=2), id="empty-left"),
        pytest.param(vc(a=2), VectorClock(), vc(a=2), id="empty-right"),
        pytest.param(vc(a=1, b=5), vc(a=4, b=2), vc(a=4, b=5), id="crossed"),
    ],
)
def test_merge(left: VectorClock, right: VectorClock, expected: VectorClock) -> None:
    """merge() is the component-wise maximum."""
    assert left.merge(right) == expected


@pytest.mark.parametrize(
    ("left", "right", "le", "hb", "concurrent"),
    [
        pytest.param(VectorClock(), VectorClock(), True, False, False, id="empty-equal"),
        pytest.param(vc(a=1), vc(a=1), True, False, False, id="equal"),
        pytest.param(VectorClock(), vc(a=1), True, True, False, id="empty-before"),
        pytest.param(vc(a=1), vc(a=2), True, True, False, id="before"),
        pytest.param(vc(a=1), vc(a=1, b=1), True, True, False, id="before-new-agent"),
        pytest.param(vc(a=2), vc(a=1), False, False, False, id="after"),
        pytest.param(vc(a=1), vc(b=1), False, False, True, id="disjoint-concurrent"),
        pytest.param(vc(a=2, b=1), vc(a=1, b=2), False, False, True, id="crossed-concurrent"),
    ],
)
def test_order(left: VectorClock, right: VectorClock, le: bool, hb: bool, concurrent: bool) -> None:
    """<=, happens_before and is_concurrent follow the component-wise partial order."""
    assert (left <= right) is le
    assert (right >= left) is le
    assert left.happens_before(right) is hb
    assert left.is_concurrent(right) is concurrent


def test_strict_comparisons_are_not_defined() -> None:
    """< is not defined on a partial order; happens_before is the strict order."""
    with pytest.raises(TypeError):
        _ = vc(a=1) < vc(a=2)  # type: ignore[operator]


def test_comparison_with_other_types() -> None:
    """A clock is never equal to a plain dict, and <= against one raises TypeError."""
    assert vc(a=1) != {"a": 1}
    with pytest.raises(TypeError):
        _ = vc(a=1) <= {"a": 1}


@pytest.mark.parametrize(
    ("clock", "expected"),
    [
        pytest.param(VectorClock({"a1": 3, "a2": 1}), "VectorClock({'a1': 3, 'a2': 1})", id="two"),
        pytest.param(
            VectorClock({"a2": 1, "a1": 3}), "VectorClock({'a1': 3, 'a2': 1})", id="sorted"
        ),
        pytest.param(VectorClock(), "VectorClock({})", id="empty"),
    ],
)
def test_repr(clock: VectorClock, expected: str) -> None:
    """repr() shows the sorted counters and evaluates back to an equal clock."""
    assert repr(clock) == expected
    assert eval(repr(clock), {"VectorClock": VectorClock}) == clock


# --- VectorClock: properties ---------------------------------------------------------------


@given(clocks, clocks)
def test_merge_commutative(x: VectorClock, y: VectorClock) -> None:
    """merge() is commutative."""
    assert x.merge(y) == y.merge(x)


@given(clocks, clocks, clocks)
def test_merge_associative(x: VectorClock, y: VectorClock, z: VectorClock) -> None:
    """merge() is associative."""
    assert x.merge(y).merge(z) == x.merge(y.merge(z))


@given(clocks)
def test_merge_idempotent(x: VectorClock) -> None:
    """Merging a clock with itself gives the same clock."""
    assert x.merge(x) == x


@given(clocks, clocks, clocks)
def test_merge_is_least_upper_bound(x: VectorClock, y: VectorClock, z: VectorClock) -> None:
    """merge() descends from both inputs, and from nothing more than needed."""
    merged = x.merge(y)
    assert x <= merged
    assert y <= merged
    if x <= z and y <= z:
        assert merged <= z


@given(clocks, clocks)
def test_le_matches_componentwise_definition(x: VectorClock, y: VectorClock) -> None:
    """x <= y exactly when every agent's counter in x is <= its counter in y."""
    assert (x <= y) is all(x.get(agent) <= y.get(agent) for agent in AGENTS)


@given(clocks, clocks)
def test_le_antisymmetric(x: VectorClock, y: VectorClock) -> None:
    """x <= y and y <= x only for equal clocks."""
    assert (x <= y and y <= x) is (x == y)


@given(clocks)
def test_happens_before_irreflexive(x: VectorClock) -> None:
    """No clock happens before itself."""
    assert not x.happens_before(x)


@given(clocks, clocks)
def test_happens_before_antisymmetric(x: VectorClock, y: VectorClock) -> None:
    """x and y never both happen before each other."""
    assert not (x.happens_before(y) and y.happens_before(x))


@given(clocks, clocks, clocks, agents, agents)
def test_happens_before_transitive(
    x: VectorClock, dy: VectorClock, dz: VectorClock, ay: str, az: str
) -> None:
    """x hb y and y hb z imply x hb z."""
    y = x.merge(dy).tick(ay)
    z = y.merge(dz).tick(az)
    assert x.happens_before(y)
    assert y.happens_before(z)
    assert x.happens_before(z)


@given(clocks, clocks, clocks)
def test_happens_before_transitive_arbitrary(
    x: VectorClock, y: VectorClock, z: VectorClock
) -> None:
    """Transitivity also holds for arbitrary triples that happen to be ordered."""
    if x.happens_before(y) and y.happens_before(z):
        assert x.happens_before(z)


@given(clocks, clocks)
def test_is_concurrent_symmetric(x: VectorClock, y: VectorClock) -> None:
    """is_concurrent() is symmetric."""
    assert x.is_concurrent(y) is y.is_concurrent(x)


@given(clocks)
def test_is_concurrent_irreflexive(x: VectorClock) -> None:
    """No clock is concurrent with itself."""
    assert not x.is_concurrent(x)


@given(clocks, clocks)
def test_exactly_one_relation_holds(x: VectorClock, y: VectorClock) -> None:
    """Exactly one of: equal, x hb y, y hb x, concurrent."""
    relations = [x == y, x.happens_before(y), y.happens_before(x), x.is_concurrent(y)]
    assert relations.count(True) == 1


@given(clocks, agents)
def test_tick_is_strictly_later(x: VectorClock, agent: str) -> None:
    """tick() gives a clock that x happens before, one higher for that agent only."""
    ticked = x.tick(agent)
    assert x.happens_before(ticked)
    assert ticked.get(agent) == x.get(agent) + 1
    assert all(ticked.get(other) == x.get(other) for other in AGENTS if other != agent)


@given(entries)
def test_as_dict_round_trip(data: dict[str, int]) -> None:
    """from_dict(as_dict()) gives an equal clock; as_dict drops zero entries."""
    clock = VectorClock(data)
    assert VectorClock.from_dict(clock.as_dict()) == clock
    assert clock.as_dict() == {agent: n for agent, n in data.items() if n}


@given(clocks, clocks)
def test_hash_consistent_with_eq(x: VectorClock, y: VectorClock) -> None:
    """Equal clocks have equal hashes."""
    if x == y:
        assert hash(x) == hash(y)


# --- VectorClock: immutability -------------------------------------------------------------


@given(clocks, clocks, agents)
def test_methods_return_new_clocks(x: VectorClock, y: VectorClock, agent: str) -> None:
    """tick() and merge() return new objects and leave their inputs unchanged."""
    x_before, y_before = x.as_dict(), y.as_dict()
    ticked = x.tick(agent)
    merged = x.merge(y)
    assert ticked is not x
    assert merged is not x
    assert merged is not y
    assert x.as_dict() == x_before
    assert y.as_dict() == y_before


def test_as_dict_is_a_copy() -> None:
    """Mutating the dict from as_dict() does not change the clock."""
    clock = vc(a=1)
    data = clock.as_dict()
    data["a"] = 99
    data["b"] = 1
    assert clock == vc(a=1)
    assert clock.as_dict() == {"a": 1}


def test_constructor_copies_its_input() -> None:
    """Mutating the mapping passed to the constructor does not change the clock."""
    data = {"a": 1}
    clock = VectorClock(data)
    data["a"] = 99
    assert clock.get("a") == 1


def test_attributes_cannot_be_set_or_deleted() -> None:
    """A clock refuses attribute assignment and deletion."""
    clock = vc(a=1)
    with pytest.raises(AttributeError):
        clock._key = ()
    with pytest.raises(AttributeError):
        clock.extra = 1
    with pytest.raises(AttributeError):
        del clock._key
    assert clock == vc(a=1)


@pytest.mark.parametrize(
    "clone",
    [
        pytest.param(copy.copy, id="copy"),
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(lambda clock: pickle.loads(pickle.dumps(clock)), id="pickle"),
    ],
)
def test_clock_survives_copy_and_pickle(clone: Any) -> None:
    """A clock can be copied and pickled into an equal clock."""
    clock = vc(a=2, b=1)
    assert clone(clock) == clock


# --- IsolationLevel ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "vector_clocks", "intent_locks", "concurrent_writes"),
    [
        pytest.param(IsolationLevel.SNAPSHOT, False, False, True, id="snapshot"),
        pytest.param(IsolationLevel.READ_COMMITTED, False, False, True, id="read-committed"),
        pytest.param(IsolationLevel.SERIALIZABLE, True, True, False, id="serializable"),
    ],
)
def test_isolation_level_flags(
    level: IsolationLevel, vector_clocks: bool, intent_locks: bool, concurrent_writes: bool
) -> None:
    """Only SERIALIZABLE needs vector clocks and intent locks and forbids concurrent writes."""
    assert level.requires_vector_clocks is vector_clocks
    assert level.requires_intent_locks is intent_locks
    assert level.allows_concurrent_writes is concurrent_writes
    assert level.value == level.name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(IsolationLevel.SNAPSHOT, IsolationLevel.SNAPSHOT, id="member"),
        pytest.param("SERIALIZABLE", IsolationLevel.SERIALIZABLE, id="upper"),
        pytest.param("serializable", IsolationLevel.SERIALIZABLE, id="lower"),
        pytest.param("Read_Committed", IsolationLevel.READ_COMMITTED, id="mixed"),
        pytest.param("snapshot", IsolationLevel.SNAPSHOT, id="snapshot"),
    ],
)
def test_isolation_level_parse(value: IsolationLevel | str, expected: IsolationLevel) -> None:
    """parse() accepts a member or its name in any case."""
    assert IsolationLevel.parse(value) is expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("linearizable", id="unknown"),
        pytest.param("READ COMMITTED", id="space"),
        pytest.param(" snapshot", id="padded"),
        pytest.param("\u017fnapshot", id="non-ascii"),  # long s upper-cases to S
        pytest.param(None, id="none"),
        pytest.param(1, id="int"),
    ],
)
def test_isolation_level_parse_refuses_unknown(value: Any) -> None:
    """parse() raises ValueError naming every valid level, with no silent default."""
    with pytest.raises(ValueError, match="unknown isolation level") as info:
        IsolationLevel.parse(value)
    for name in ("SNAPSHOT", "READ_COMMITTED", "SERIALIZABLE"):
        assert name in str(info.value)


# --- StaleWrite ----------------------------------------------------------------------------


def test_stale_write_is_frozen() -> None:
    """StaleWrite is an immutable value."""
    stale = StaleWrite("/f", "a", VectorClock(), vc(b=1))
    with pytest.raises(AttributeError):
        stale.path = "/g"  # type: ignore[misc]
    assert stale == StaleWrite("/f", "a", VectorClock(), vc(b=1))


# --- VectorClockManager --------------------------------------------------------------------


def assert_grown(
    before: tuple[dict[str, dict[str, int]], dict[str, dict[str, int]], int],
    manager: VectorClockManager,
) -> None:
    """Assert the manager's invariants against an earlier snapshot."""
    paths, agents_, conflicts = before
    for path, data in paths.items():
        assert VectorClock(data) <= manager.clock_of(path)
    for agent, data in agents_.items():
        assert VectorClock(data) <= manager.agent_clock(agent)
    assert manager.conflict_count >= conflicts
    assert set(paths) <= set(manager.tracked_paths)


def test_new_manager_is_empty() -> None:
    """A new manager tracks nothing and reports empty clocks."""
    manager = VectorClockManager()
    assert manager.tracked_paths == ()
    assert manager.conflict_count == 0
    assert manager.clock_of("/f") == VectorClock()
    assert manager.agent_clock("a") == VectorClock()
    assert manager.snapshot() == ({}, {}, 0)


def test_read_untracked_path_changes_nothing() -> None:
    """Reading an untracked path returns the empty clock and does not track it."""
    manager = VectorClockManager()
    assert manager.read("/f", "a") == VectorClock()
    assert manager.tracked_paths == ()
    assert manager.snapshot() == ({}, {}, 0)


def test_read_merges_path_clock_into_agent_clock() -> None:
    """read() returns the path's clock and merges it into the reader's clock."""
    manager = VectorClockManager()
    written = manager.write("/f", "a")
    manager.write("/g", "b")
    assert manager.read("/f", "b") == written == vc(a=1)
    assert manager.agent_clock("b") == vc(a=1, b=1)
    assert manager.clock_of("/f") == vc(a=1)


def test_first_write_ticks_writer() -> None:
    """A write of an untracked path succeeds and stores the ticked clock for agent and path."""
    manager = VectorClockManager()
    assert manager.write("/f", "a") == vc(a=1)
    assert manager.clock_of("/f") == vc(a=1)
    assert manager.agent_clock("a") == vc(a=1)
    assert manager.tracked_paths == ("/f",)


def test_strict_write_of_unseen_version_is_stale_and_changes_nothing() -> None:
    """A strict write over a version the agent never saw returns StaleWrite, changing nothing."""
    manager = VectorClockManager()
    manager.write("/f", "a")
    manager.write("/g", "b")
    before = manager.snapshot()
    result = manager.write("/f", "b")
    assert result == StaleWrite("/f", "b", agent_clock=vc(b=1), path_clock=vc(a=1))
    assert manager.snapshot() == before
    assert manager.conflict_count == 0


def test_check_write_is_pure() -> None:
    """check_write() reports staleness without changing any state."""
    manager = VectorClockManager()
    manager.write("/f", "a")
    before = manager.snapshot()
    assert manager.check_write("/f", "b") == StaleWrite("/f", "b", VectorClock(), vc(a=1))
    assert manager.check_write("/f", "a") is None
    assert manager.check_write("/new", "b") is None
    assert manager.snapshot() == before


def test_strict_write_after_read_succeeds_and_ticks() -> None:
    """After reading the current version, a strict write succeeds and happens after it."""
    manager = VectorClockManager()
    first = manager.write("/f", "a")
    manager.read("/f", "b")
    result = manager.write("/f", "b")
    assert isinstance(first, VectorClock)
    assert isinstance(result, VectorClock)
    assert result == vc(a=1, b=1)
    assert first.happens_before(result)
    assert manager.clock_of("/f") == result
    assert manager.agent_clock("b") == result
    assert manager.conflict_count == 0


def test_lost_update_across_two_tool_calls_is_caught() -> None:
    """Read, another agent writes, then write: the second write is stale."""
    manager = VectorClockManager()
    manager.write("/f", "setup")
    manager.read("/f", "a")
    manager.read("/f", "b")
    assert isinstance(manager.write("/f", "b"), VectorClock)
    stale = manager.write("/f", "a")
    assert isinstance(stale, StaleWrite)
    assert stale.path_clock == vc(setup=1, b=1)
    assert stale.agent_clock == vc(setup=1)


def test_non_strict_stale_write_counts_conflict_and_keeps_path_monotone() -> None:
    """A non-strict stale write succeeds, counts a conflict, and the path clock only grows."""
    manager = VectorClockManager()
    manager.write("/f", "a")
    manager.write("/f", "a")
    old = manager.clock_of("/f")
    result = manager.write("/f", "b", strict=False)
    assert result == vc(a=2, b=1)
    assert manager.conflict_count == 1
    new = manager.clock_of("/f")
    assert new == result == manager.agent_clock("b")
    assert new >= old
    assert old.happens_before(new)


def test_non_strict_fresh_write_counts_no_conflict() -> None:
    """A non-strict write that is not stale does not count a conflict."""
    manager = VectorClockManager()
    manager.write("/f", "a", strict=False)
    manager.write("/f", "a", strict=False)
    assert manager.conflict_count == 0
    assert manager.clock_of("/f") == vc(a=2)


def test_tracked_paths_sorted() -> None:
    """tracked_paths lists written paths sorted, each once."""
    manager = VectorClockManager()
    for path in ("/z", "/a", "/m", "/a"):
        manager.read(path, "x")
        manager.write(path, "x")
    manager.read("/unwritten", "x")
    assert manager.tracked_paths == ("/a", "/m", "/z")


def test_snapshot_restore_round_trip() -> None:
    """restore(*snapshot()) rebuilds an equal manager that behaves the same."""
    manager = VectorClockManager()
    manager.write("/f", "a")
    manager.read("/f", "b")
    manager.write("/f", "b")
    manager.write("/g", "c")
    manager.write("/g", "a", strict=False)
    state = manager.snapshot()
    assert state == (
        {"/f": {"a": 1, "b": 1}, "/g": {"a": 2, "c": 1}},
        {"a": {"a": 2, "c": 1}, "b": {"a": 1, "b": 1}, "c": {"c": 1}},
        1,
    )
    restored = VectorClockManager.restore(*state)
    assert restored.snapshot() == state
    assert restored.tracked_paths == manager.tracked_paths
    assert restored.conflict_count == 1
    assert restored.write("/g", "c") == manager.write("/g", "c")


def test_snapshot_shares_nothing() -> None:
    """Mutating a snapshot does not change the manager."""
    manager = VectorClockManager()
    manager.write("/f", "a")
    paths, agents_, _ = manager.snapshot()
    paths["/f"]["a"] = 99
    agents_.clear()
    assert manager.snapshot() == ({"/f": {"a": 1}}, {"a": {"a": 1}}, 0)


@pytest.mark.parametrize(
    ("paths", "agents_", "conflicts", "error"),
    [
        pytest.param({}, {}, -1, ValueError, id="negative-conflicts"),
        pytest.param({"/f": {"a": -1}}, {}, 0, ValueError, id="negative-path-counter"),
        pytest.param({}, {"a": {"a": -1}}, 0, ValueError, id="negative-agent-counter"),
        pytest.param({}, {}, 1.5, TypeError, id="float-conflicts"),
    ],
)
def test_restore_refuses_bad_data(
    paths: dict[str, dict[str, int]],
    agents_: dict[str, dict[str, int]],
    conflicts: Any,
    error: type[Exception],
) -> None:
    """restore() raises on negative or mistyped data."""
    with pytest.raises(error):
        VectorClockManager.restore(paths, agents_, conflicts)


PATHS = ("/a", "/b", "/c")


class ManagerMachine(RuleBasedStateMachine):
    """Random reads and writes keep the manager's invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.manager = VectorClockManager()
        self.before = self.manager.snapshot()

    @rule(path=st.sampled_from(PATHS), agent=agents)
    def read(self, path: str, agent: str) -> None:
        self.before = self.manager.snapshot()
        path_clock = self.manager.read(path, agent)
        assert path_clock == self.manager.clock_of(path)
        assert path_clock <= self.manager.agent_clock(agent)

    @rule(path=st.sampled_from(PATHS), agent=agents, strict=st.booleans())
    def write(self, path: str, agent: str, strict: bool) -> None:
        self.before = self.manager.snapshot()
        expected_stale = self.manager.check_write(path, agent)
        old_path = self.manager.clock_of(path)
        old_agent = self.manager.agent_clock(agent)
        result = self.manager.write(path, agent, strict=strict)
        if strict and expected_stale is not None:
            assert result == expected_stale
            assert self.manager.snapshot() == self.before
            return
        assert isinstance(result, VectorClock)
        assert result == self.manager.clock_of(path) == self.manager.agent_clock(agent)
        assert old_path.happens_before(result)
        assert old_agent.happens_before(result)
        assert result.get(agent) == old_agent.merge(old_path).get(agent) + 1
        grew = 1 if expected_stale is not None else 0
        assert self.manager.conflict_count == self.before[2] + grew

    @invariant()
    def only_grows(self) -> None:
        assert_grown(self.before, self.manager)

    @invariant()
    def snapshot_round_trips(self) -> None:
        state = self.manager.snapshot()
        assert VectorClockManager.restore(*state).snapshot() == state
        assert self.manager.tracked_paths == tuple(sorted(state[0]))


TestManagerInvariants = ManagerMachine.TestCase


def test_observe_merges_a_seen_version_into_the_agent_clock() -> None:
    """``observe`` merges a clock into the agent's clock, which only grows."""
    manager = VectorClockManager()
    assert manager.observe("a", VectorClock({"b": 2})) == VectorClock({"b": 2})
    assert manager.observe("a", VectorClock({"b": 1, "c": 1})) == VectorClock({"b": 2, "c": 1})
    assert manager.agent_clock("a") == VectorClock({"b": 2, "c": 1})


def test_check_write_counts_held_reads_without_recording_them() -> None:
    """A version passed as ``seen`` makes the write fresh for that check only."""
    manager = VectorClockManager()
    manager.write("p", "b")
    assert manager.check_write("p", "a") is not None
    assert manager.check_write("p", "a", VectorClock({"b": 1})) is None
    assert manager.agent_clock("a") == VectorClock()
