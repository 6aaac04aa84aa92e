"""Tests for klock_async.rules: the compatibility matrix, the hierarchy and the Wait-Die verdict."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from klock_async.model import Intent, Predicate, Resource
from klock_async.rules import (
    COMPATIBLE,
    Decision,
    compatible,
    intents_conflict,
    overlaps,
    wait_die,
)

PRO, CON, MUT, DEL, DEP, REN = (
    Predicate.PROVIDES,
    Predicate.CONSUMES,
    Predicate.MUTATES,
    Predicate.DELETES,
    Predicate.DEPENDS_ON,
    Predicate.RENAMES,
)

# The KLIS-1 table of DESIGN.md, row by row (T = may coexist on one resource).
_TABLE = {
    PRO: "FTFFTF",
    CON: "TTFFTF",
    MUT: "FFFFFF",
    DEL: "FFFFFF",
    DEP: "TTFFTF",
    REN: "FFFFFF",
}
_COLUMNS = (PRO, CON, MUT, DEL, DEP, REN)

MATRIX = [
    pytest.param(row, col, cells[i] == "T", id=f"{row.value}-{col.value}")
    for row, cells in _TABLE.items()
    for i, col in enumerate(_COLUMNS)
]


def test_matrix_table_is_complete() -> None:
    """The table covers all 36 ordered pairs of predicates."""
    assert len(MATRIX) == 36
    assert set(_TABLE) == set(Predicate)


@pytest.mark.parametrize(("held", "requested", "expected"), MATRIX)
def test_matrix(held: Predicate, requested: Predicate, expected: bool) -> None:
    """Each pair of predicates coexists exactly as the KLIS-1 table says."""
    assert compatible(held, requested) is expected
    assert (requested in COMPATIBLE[held]) is expected


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(a, b, id=f"{a.value}-{b.value}")
        for a, b in itertools.product(Predicate, Predicate)
    ],
)
def test_matrix_is_symmetric(a: Predicate, b: Predicate) -> None:
    """Compatibility does not depend on who asked first."""
    assert compatible(a, b) is compatible(b, a)


@pytest.mark.parametrize("writer", [pytest.param(p, id=p.value) for p in (MUT, DEL, REN)])
def test_exclusive_predicates_conflict_with_everything(writer: Predicate) -> None:
    """MUTATES, DELETES and RENAMES share a resource with nothing, not even themselves."""
    assert COMPATIBLE[writer] == frozenset()


# --- hierarchy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param("FILE:/src/a.js", "FILE:/src/a.js", True, id="same-path"),
        pytest.param("FILE:/src", "FILE:/src/a.js", True, id="ancestor"),
        pytest.param("FILE:/src/a.js", "FILE:/src", True, id="descendant"),
        pytest.param("FILE:/src", "FILE:/src/deep/down/a.js", True, id="far-ancestor"),
        pytest.param("FILE:/src", "FILE:/srcx", False, id="sibling-prefix"),
        pytest.param("FILE:/src", "FILE:/srcx/a.js", False, id="sibling-prefix-child"),
        pytest.param("FILE:/src/a", "FILE:/src/b", False, id="siblings"),
        pytest.param("FILE:/src/a.js", "FILE:/src/a.jsx", False, id="file-prefix"),
        pytest.param("FILE:/", "FILE:/src/a.js", True, id="root-ancestor"),
        pytest.param("FILE:/src/a.js", "FILE:/", True, id="root-descendant"),
        pytest.param("FILE:/", "FILE:/", True, id="root-root"),
        pytest.param("FILE:/src", "SYMBOL:/src", False, id="types-differ-same-path"),
        pytest.param("FILE:/src", "SYMBOL:/src/a", False, id="types-differ-ancestor"),
        pytest.param("CONFIG_KEY:/", "FILE:/x", False, id="types-differ-root"),
        pytest.param("SYMBOL:auth.login", "SYMBOL:auth.login", True, id="symbol-same"),
        pytest.param("SYMBOL:auth.login", "SYMBOL:auth.logout", False, id="symbol-other"),
        pytest.param("API_ENDPOINT:/v1", "API_ENDPOINT:/v1/users", True, id="endpoint-ancestor"),
        pytest.param("DATABASE_TABLE:users", "DATABASE_TABLE:users", True, id="table-same"),
    ],
)
def test_overlaps(a: str, b: str, expected: bool) -> None:
    """Resources overlap when equal or one contains the other, within one type only."""
    ra, rb = Resource.parse(a), Resource.parse(b)
    assert overlaps(ra, rb) is expected
    assert overlaps(rb, ra) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param(
            ("FILE:/src", MUT), ("FILE:/src/a.js", CON), True, id="dir-mutates-file-reads"
        ),
        pytest.param(
            ("FILE:/src/a.js", CON), ("FILE:/src", MUT), True, id="file-reads-dir-mutates"
        ),
        pytest.param(("FILE:/src", CON), ("FILE:/src/a.js", CON), False, id="both-read"),
        pytest.param(("FILE:/src", MUT), ("FILE:/srcx/a.js", MUT), False, id="no-overlap"),
        pytest.param(("FILE:/src", MUT), ("SYMBOL:/src", MUT), False, id="other-type"),
        pytest.param(("FILE:/", DEL), ("FILE:/a/b/c", DEP), True, id="root-delete"),
        pytest.param(("FILE:/a", PRO), ("FILE:/a", PRO), True, id="two-providers"),
        pytest.param(("FILE:/a", PRO), ("FILE:/a/b", DEP), False, id="provider-and-dependent"),
    ],
)
def test_intents_conflict(
    a: tuple[str, Predicate], b: tuple[str, Predicate], expected: bool
) -> None:
    """Two intents conflict when their predicates clash and their resources overlap."""
    ia, ib = Intent.of(*a), Intent.of(*b)
    assert intents_conflict(ia, ib) is expected
    assert intents_conflict(ib, ia) is expected


# --- Wait-Die -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocker:
    name: str
    ts: int


@pytest.mark.parametrize(
    ("ts", "blockers", "decision", "named"),
    [
        pytest.param(5, [], Decision.GRANT, None, id="no-blockers-grant"),
        pytest.param(1, [("h", 2)], Decision.WAIT, "h", id="older-waits"),
        pytest.param(3, [("h", 2)], Decision.DIE, "h", id="younger-dies"),
        pytest.param(2, [("h", 2)], Decision.DIE, "h", id="equal-age-dies"),
        pytest.param(1, [("a", 5), ("b", 3), ("c", 9)], Decision.WAIT, "b", id="older-than-all"),
        pytest.param(4, [("a", 5), ("b", 3), ("c", 9)], Decision.DIE, "b", id="younger-than-one"),
        pytest.param(3, [("a", 5), ("b", 3), ("c", 9)], Decision.DIE, "b", id="equal-to-one"),
        pytest.param(10, [("a", 5), ("b", 3), ("c", 9)], Decision.DIE, "b", id="younger-than-all"),
        pytest.param(6, [("a", 7), ("b", 8), ("c", 2)], Decision.DIE, "c", id="names-oldest-last"),
        pytest.param(0, [("a", 1), ("b", 1)], Decision.WAIT, "a", id="tie-among-blockers"),
        pytest.param(-5, [("a", -1)], Decision.WAIT, "a", id="negative-priorities"),
    ],
)
def test_wait_die(
    ts: int, blockers: list[tuple[str, int]], decision: Decision, named: str | None
) -> None:
    """Wait only when strictly older than every blocker; otherwise die naming the oldest."""
    verdict = wait_die(ts, [Blocker(name, age) for name, age in blockers])
    assert verdict.decision is decision
    if named is None:
        assert verdict.blocker is None
    else:
        assert verdict.blocker is not None
        assert verdict.blocker.name == named


def test_wait_die_accepts_any_iterable() -> None:
    """The verdict reads its blockers once, so a generator works."""
    verdict = wait_die(1, (Blocker(str(i), i) for i in range(2, 6)))
    assert verdict.decision is Decision.WAIT
    assert verdict.blocker == Blocker("2", 2)
