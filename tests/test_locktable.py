"""Tests for klock_async.locktable: the pure lock table, driven directly on virtual time.

Each test states one rule of DESIGN.md ("Wait-Die, exactly"); the table is checked against its
invariants after every step.
"""

from __future__ import annotations

from typing import Any

import pytest
from tabledriver import Driver, granted

from klock_async.errors import (
    InvalidRequestError,
    LeaseDied,
    LeaseNotFoundError,
    LeaseWouldWait,
    UnknownAgentError,
)
from klock_async.locktable import PRIORITY_MAX

# --- empty-handed requests queue, never die -------------------------------------------------


def test_a_unit_that_holds_nothing_queues_instead_of_dying() -> None:
    """A younger lone request queues behind an older holder and an older waiter."""
    d = Driver("a", "b", "c")
    assert granted(d.ask("held", "a", [("/f", "MUTATES")]))
    assert d.ask("second", "b", [("/f", "MUTATES")]) is None
    assert d.ask("third", "c", [("/f", "CONSUMES")]) is None
    assert d.table.counts["deaths"] == 0
    d.release("held")
    assert granted(d.answers["second"]) and "third" not in d.answers
    d.release("second")
    assert granted(d.answers["third"])


def test_the_queue_is_served_in_age_order() -> None:
    """Waiters are granted oldest unit first, one exclusive waiter at a time (direct hand-off)."""
    d = Driver("a", "b")
    assert granted(d.ask("held", "a", [("/f", "MUTATES")]))
    for i in range(5):
        assert d.ask(f"w{i}", "b", [("/f", "MUTATES")]) is None
    for i in range(5):
        d.release("held" if i == 0 else f"w{i - 1}")
        assert granted(d.answers[f"w{i}"])
        assert all(f"w{j}" not in d.answers for j in range(i + 1, 5))


def test_compatible_waiters_are_granted_together() -> None:
    """A release hands the resource to every compatible waiter at the head of the queue."""
    d = Driver("a", "b")
    assert granted(d.ask("held", "a", [("/f", "MUTATES")]))
    for i in range(3):
        assert d.ask(f"r{i}", "b", [("/f", "CONSUMES")]) is None
    assert d.ask("writer", "b", [("/f", "MUTATES")]) is None
    assert d.ask("late", "b", [("/f", "CONSUMES")]) is None
    d.release("held")
    assert all(granted(d.answers[f"r{i}"]) for i in range(3))
    assert "writer" not in d.answers and "late" not in d.answers  # the writer is older


# --- holding units keep Wait-Die --------------------------------------------------------------


def test_a_holding_unit_older_than_the_holder_waits() -> None:
    """A unit that holds leases waits for a younger holder."""
    d = Driver("a", "b")
    assert granted(d.ask("s1", "a", [("/x", "MUTATES")], session="old"))
    assert granted(d.ask("young", "b", [("/f", "MUTATES")]))
    assert d.ask("s2", "a", [("/f", "MUTATES")], session="old") is None
    d.release("young")
    assert granted(d.answers["s2"])


def test_a_holding_unit_younger_than_the_holder_dies() -> None:
    """A unit that holds leases dies facing an older holder, naming it."""
    d = Driver("a", "b")
    assert granted(d.ask("old", "a", [("/f", "MUTATES")]))
    assert granted(d.ask("s1", "b", [("/x", "MUTATES")], session="young"))
    died = d.ask("s2", "b", [("/f", "MUTATES")], session="young")
    assert isinstance(died, LeaseDied)
    assert died.blocker_agent_id == "a"
    assert died.blocker_lease_id == d.leases("old")[0].id


def test_a_holding_unit_never_waits_behind_an_older_empty_handed_waiter() -> None:
    """Facing an older queued request of a unit that holds nothing, a holding unit dies."""
    d = Driver("a", "b", "c")
    assert granted(d.ask("holder", "a", [("/f", "MUTATES")]))
    assert d.ask("empty", "b", [("/f", "MUTATES")]) is None  # older unit than c's session
    assert granted(d.ask("s1", "c", [("/x", "MUTATES")], session="young"))
    assert isinstance(d.ask("s2", "c", [("/f", "MUTATES")], session="young"), LeaseDied)


def test_a_holding_unit_passes_a_younger_empty_handed_waiter() -> None:
    """An older holding unit is granted ahead of a younger waiter that holds nothing."""
    d = Driver("a", "b")
    assert granted(d.ask("s1", "a", [("/x", "MUTATES")], session="old"))
    assert granted(d.ask("holder", "b", [("/f", "MUTATES")]))
    assert d.ask("empty", "b", [("/f", "MUTATES")]) is None
    assert d.ask("s2", "a", [("/f", "MUTATES")], session="old") is None  # waits for holder
    d.release("holder")
    assert granted(d.answers["s2"]) and "empty" not in d.answers


def test_an_older_waiter_makes_a_younger_holding_waiter_die() -> None:
    """A new older request queued ahead of a holding unit's waiter makes that waiter die."""
    d = Driver("a", "b", "c")
    assert granted(d.ask("s1", "a", [("/x", "MUTATES")], session="older"))
    assert granted(d.ask("t1", "b", [("/y", "MUTATES")], session="younger"))
    assert granted(d.ask("holder", "c", [("/f", "MUTATES")]))
    # younger is older than the holder's unit? No: the holder started last, so both wait.
    assert d.ask("t2", "b", [("/f", "MUTATES")], session="younger") is None
    assert d.ask("s2", "a", [("/f", "MUTATES")], session="older") is None
    died = d.answers["t2"]
    assert isinstance(died, LeaseDied) and died.blocker_agent_id == "a"


def test_wait_false_gets_the_classic_verdict() -> None:
    """wait=False never queues: younger than a blocker dies, older would wait."""
    d = Driver("a", "b")
    assert granted(d.ask("old", "a", [("/f", "MUTATES")]))
    assert isinstance(d.ask("young", "b", [("/f", "CONSUMES")], wait=False), LeaseDied)
    assert granted(d.ask("s1", "b", [("/x", "MUTATES")], session="older-unit"))
    d.release("old")
    assert granted(d.ask("holder", "a", [("/f", "MUTATES")]))
    would = d.ask("s2", "b", [("/f", "MUTATES")], session="older-unit", wait=False)
    assert isinstance(would, LeaseWouldWait)
    assert not d.table.queued


def test_died_message_of_an_empty_handed_wait_false_request_names_no_held_leases() -> None:
    """LeaseDied for a wait=False request of a unit that holds nothing says it did not wait."""
    d = Driver("a", "b")
    assert granted(d.ask("old", "a", [("/f", "MUTATES")]))
    died = d.ask("young", "b", [("/f", "CONSUMES")], wait=False)
    assert isinstance(died, LeaseDied)
    assert "holds other leases" not in died.message
    assert "wait=False" in died.message and "nothing was queued" in died.message


def test_died_message_of_a_holding_request_says_what_its_session_holds() -> None:
    """LeaseDied for a request of a unit that holds leases says so, with or without wait."""
    d = Driver("a", "b")
    assert granted(d.ask("old", "a", [("/f", "MUTATES")]))
    assert granted(d.ask("s1", "b", [("/x", "MUTATES")], session="young"))
    for wait in (True, False):
        died = d.ask(f"s2-{wait}", "b", [("/f", "MUTATES")], session="young", wait=wait)
        assert isinstance(died, LeaseDied)
        assert "while its session holds other leases" in died.message


# --- reentrancy and request shapes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "wanted"),
    [
        pytest.param("MUTATES", "MUTATES", id="same-exclusive"),
        pytest.param("MUTATES", "CONSUMES", id="read-under-write"),
        pytest.param("CONSUMES", "CONSUMES", id="same-shared"),
        pytest.param("DELETES", "MUTATES", id="exclusive-covers-exclusive"),
    ],
)
def test_a_request_covered_by_its_own_session_is_granted_whatever_is_queued(
    held: str, wanted: str
) -> None:
    """Reentrancy: a holder uses its own lease even after an older unit queued on it."""
    d = Driver("a", "b")
    assert granted(d.ask("w0", "a", [("/x", "MUTATES")], session="older"))
    assert granted(d.ask("young1", "b", [("/f", held)], session="young"))
    assert d.ask("waiter", "a", [("/f", "MUTATES")], session="older") is None
    assert granted(d.ask("young2", "b", [("/f", wanted)], session="young"))
    assert d.table.counts["deaths"] == 0


def test_a_directory_lease_covers_its_files() -> None:
    """A MUTATES lease on a directory covers a request for a file below it."""
    d = Driver("a", "b")
    assert granted(d.ask("dir", "a", [("/src", "MUTATES")], session="s"))
    assert d.ask("other", "b", [("/src/a.py", "CONSUMES")]) is None
    assert granted(d.ask("file", "a", [("/src/a.py", "MUTATES")], session="s"))


def test_an_upgrade_is_not_covered() -> None:
    """Holding CONSUMES does not cover MUTATES: the upgrade is decided like any request."""
    d = Driver("a", "b")
    assert granted(d.ask("r1", "a", [("/f", "CONSUMES")], session="s"))
    assert granted(d.ask("r2", "b", [("/f", "CONSUMES")]))
    assert d.ask("up", "a", [("/f", "MUTATES")], session="s") is None  # older: waits
    d.release("r2")
    assert granted(d.answers["up"])


def test_a_resource_named_twice_is_queued_with_both_predicates() -> None:
    """A queued request naming one resource twice blocks as its strongest intent."""
    d = Driver("a", "b", "c")
    assert granted(d.ask("holder", "a", [("/f", "CONSUMES")]))
    assert d.ask("both", "b", [("/f", "MUTATES"), ("/f", "CONSUMES")]) is None
    assert d.ask("reader", "c", [("/f", "CONSUMES")]) is None  # may not pass the writer
    (waiter,) = [w for w in d.table.waiters() if w.agent_id == "c"]
    assert [edge.agent_id for edge in waiter.waits_for] == ["b"]
    d.release("holder")
    assert granted(d.answers["both"]) and "reader" not in d.answers
    assert len(d.leases("both")) == 2


def test_a_waiter_behind_an_exclusive_waiter_of_its_own_unit_is_granted_once_free() -> None:
    """A queued request is re-decided when freed, also behind its own unit's exclusive waiter."""
    d = Driver("w", "v", "u")
    assert granted(d.ask("w-holds", "w", [("/f", "MUTATES")]))
    assert granted(d.ask("v-holds", "v", [("/g", "MUTATES")]))
    both = [("/f", "MUTATES"), ("/g", "MUTATES")]
    assert d.ask("exclusive", "u", both, session="u") is None
    assert d.ask("reader", "u", [("/f", "CONSUMES")], session="u") is None
    d.release("w-holds")  # the reader waited for this lease only (its own unit never blocks it)
    assert granted(d.answers["reader"])


def test_all_or_nothing() -> None:
    """A multi-resource request is granted whole or waits whole."""
    d = Driver("a", "b")
    assert granted(d.ask("b-held", "a", [("/b", "MUTATES")]))
    assert d.ask("pair", "b", [("/a", "MUTATES"), ("/b", "MUTATES")]) is None
    assert not [lease for lease in d.table.leases.values() if lease.agent_id == "b"]
    d.release("b-held")
    assert [str(info.resource) for info in d.leases("pair")] == ["FILE:/a", "FILE:/b"]


# --- ages of units of work --------------------------------------------------------------------


def test_a_unit_is_as_old_as_its_first_request_not_its_agent() -> None:
    """A young agent's unit that started first is older than an old agent's later unit."""
    d = Driver("old", "young")
    assert granted(d.ask("y1", "young", [("/x", "MUTATES")], session="ys"))
    assert granted(d.ask("o1", "old", [("/f", "MUTATES")], session="os"))
    # the young agent's unit is older: it waits for the old agent's younger unit
    assert d.ask("y2", "young", [("/f", "MUTATES")], session="ys") is None


def test_a_unit_that_died_keeps_its_age_for_its_retry() -> None:
    """After LeaseDied and releasing everything, the retry has the unit's first age."""
    d2 = Driver("a", "b")
    assert granted(d2.ask("old", "a", [("/f", "MUTATES")], session="first"))
    assert granted(d2.ask("s1", "b", [("/x", "MUTATES")], session="u"))
    age = d2.table.units[("b", "u")].age
    assert isinstance(d2.ask("s2", "b", [("/f", "MUTATES")], session="u"), LeaseDied)
    d2.release("s1")  # the retry helper lets go of everything
    assert ("b", "u") not in d2.table.units
    assert d2.ask("retry", "b", [("/f", "MUTATES")], session="u") is None
    assert d2.table.units[("b", "u")].age == age


def test_an_old_agent_that_keeps_working_cannot_starve_a_young_one() -> None:
    """Every new unit of a long-lived agent is younger than a waiting unit: it queues behind."""
    d = Driver("old", "young")
    assert granted(d.ask("o0", "old", [("/f", "MUTATES")]))
    assert d.ask("y", "young", [("/f", "MUTATES")]) is None
    for i in range(1, 4):  # the old agent keeps starting units of work
        assert d.ask(f"o{i}", "old", [("/f", "MUTATES")]) is None
    d.release("o0")
    assert granted(d.answers["y"])


def test_an_explicit_priority_orders_first() -> None:
    """Agents registered with a priority are older than every automatic age (Klock v1)."""
    d = Driver("auto")
    d.table.register("vip", 5)
    assert granted(d.ask("a1", "auto", [("/x", "MUTATES")], session="s"))
    assert granted(d.ask("v1", "vip", [("/f", "MUTATES")], session="v"))
    died = d.ask("a2", "auto", [("/f", "MUTATES")], session="s")
    assert isinstance(died, LeaseDied) and died.blocker_agent_id == "vip"


@pytest.mark.parametrize(
    "priority",
    [
        pytest.param(PRIORITY_MAX + 1, id="above-int64"),
        pytest.param(-(2**63) - 1, id="below-int64"),
        pytest.param(True, id="bool"),
        pytest.param("1", id="string"),
    ],
)
def test_priority_out_of_range_is_refused(priority: Any) -> None:
    """A priority that is not a signed 64-bit integer is refused and changes nothing."""
    d = Driver()
    with pytest.raises(InvalidRequestError):
        d.table.register("x", priority)
    assert not d.table.agents


# --- expiry, withdrawal, waiters ---------------------------------------------------------------


def test_expiry_hands_the_resource_on_at_its_deadline() -> None:
    """A lease ends exactly at its deadline (never before) and the next waiter gets it."""
    d = Driver("a", "b")
    d.ask("short", "a", [("/f", "MUTATES")], ttl=5.0)
    assert d.ask("next", "b", [("/f", "MUTATES")]) is None
    deadline = d.leases("short")[0].expires_at
    assert deadline == 5.0
    d.table.expire(deadline - 1e-6)
    d.drain()
    assert "next" not in d.answers
    d.table.expire(deadline)
    d.drain()
    assert granted(d.answers["next"])


def test_withdrawn_waiter_leaves_no_trace() -> None:
    """A withdrawn request leaves the queue and its unit; the next waiter moves up."""
    d = Driver("a", "b", "c")
    d.ask("held", "a", [("/f", "MUTATES")])
    assert d.ask("w1", "b", [("/f", "MUTATES")]) is None
    assert d.ask("w2", "c", [("/f", "MUTATES")]) is None
    d.table.withdraw(d.request_id("w1"), "b", "w1", d.now)
    d.drain()
    assert ("b", "w1") not in d.table.units
    d.release("held")
    assert granted(d.answers["w2"])


def test_waiters_show_the_wait_for_graph() -> None:
    """waiters() lists queued requests oldest first with the leases and requests they wait for."""
    d = Driver("a", "b", "c")
    d.ask("held", "a", [("/f", "MUTATES")])
    d.ask("w1", "b", [("/f", "MUTATES")])
    d.ask("w2", "c", [("/f", "CONSUMES"), ("/g", "MUTATES")])
    first, second = d.table.waiters()
    assert (first.agent_id, second.agent_id) == ("b", "c")
    assert first.age < second.age
    held_id = d.leases("held")[0].id
    assert [(e.kind, e.id) for e in first.waits_for] == [("lease", held_id)]
    assert [(e.kind, e.agent_id) for e in second.waits_for] == [("lease", "a"), ("request", "b")]
    assert [str(i.resource) for i in second.intents] == ["FILE:/f", "FILE:/g"]


def test_unknown_agent_changes_nothing() -> None:
    """A request of an unregistered agent raises and leaves no unit behind."""
    d = Driver()
    with pytest.raises(UnknownAgentError):
        d.ask("x", "ghost", [("/f", "MUTATES")])
    assert not d.table.units


def test_released_by_session_is_remembered() -> None:
    """A lease its session released is remembered as RELEASED for a late watcher."""
    d = Driver("a")
    d.ask("s1", "a", [("/f", "MUTATES")], session="s")
    (info,) = d.leases("s1")
    assert d.table.release_session("a", "s", d.now) == 1
    ended = d.table.watch(info.id, "w")
    assert ended is not None and ended.state.value == "RELEASED"
    with pytest.raises(LeaseNotFoundError):
        d.table.release(info.id, "a", False, d.now)
