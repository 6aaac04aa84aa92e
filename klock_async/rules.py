"""The pure decision rules: compatibility matrix, resource hierarchy and the Wait-Die verdict.

Plain functions over plain values: no async, no I/O, no state. The scheduler calls them; the
tests check them exhaustively as tables.

Wait-Die is the non-preemptive deadlock-prevention scheme of Rosenkrantz, Stearns and Lewis,
"System Level Concurrency Control for Distributed Database Systems" (ACM TODS 3(2), 1978):
an older requester may wait for younger holders, a younger one dies instead. Every wait edge
points from older to younger, so the wait-for graph has no cycle.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from klock_async.model import Intent, Predicate, Resource

__all__ = [
    "COMPATIBLE",
    "Decision",
    "Verdict",
    "compatible",
    "intents_conflict",
    "overlaps",
    "wait_die",
]

_P = Predicate

# KLIS-1 compatibility: the unordered pairs that may coexist on one resource. Everything not
# listed conflicts. The matrix is symmetric by construction.
_COMPATIBLE_PAIRS = {
    (_P.PROVIDES, _P.CONSUMES),
    (_P.PROVIDES, _P.DEPENDS_ON),
    (_P.CONSUMES, _P.CONSUMES),
    (_P.CONSUMES, _P.DEPENDS_ON),
    (_P.DEPENDS_ON, _P.DEPENDS_ON),
}

COMPATIBLE: dict[Predicate, frozenset[Predicate]] = {
    p: frozenset(q for q in Predicate if (p, q) in _COMPATIBLE_PAIRS or (q, p) in _COMPATIBLE_PAIRS)
    for p in Predicate
}
"""For each predicate, the predicates it may share a resource with."""


def compatible(a: Predicate, b: Predicate) -> bool:
    """True when intents ``a`` and ``b`` may be held together on one resource."""
    return b in COMPATIBLE[a]


def overlaps(a: Resource, b: Resource) -> bool:
    """True when ``a`` and ``b`` are the same resource or one contains the other.

    Only resources of one type form a hierarchy; ``/src`` contains ``/src/a.js`` but not
    ``/srcx``.
    """
    if a.type is not b.type:
        return False
    if a.path == b.path:
        return True
    short, long = (a.path, b.path) if len(a.path) < len(b.path) else (b.path, a.path)
    if short == "/":
        # The root contains absolute paths only (as Resource.ancestors says): SYMBOL:/ does
        # not contain SYMBOL:auth.login.
        return long.startswith("/")
    return long.startswith(short) and long[len(short)] == "/"


def intents_conflict(a: Intent, b: Intent) -> bool:
    """True when the two intents may not be held at once (by different sessions)."""
    return not compatible(a.predicate, b.predicate) and overlaps(a.resource, b.resource)


class Decision(enum.Enum):
    """What Wait-Die does with a request."""

    GRANT = "GRANT"
    WAIT = "WAIT"
    DIE = "DIE"


class _Aged(Protocol):
    @property
    def ts(self) -> int: ...


B = TypeVar("B", bound=_Aged)


@dataclass(frozen=True, slots=True)
class Verdict(Generic[B]):
    """A decision and, for WAIT and DIE, the oldest blocker."""

    decision: Decision
    blocker: B | None = None


def wait_die(ts: int, blockers: Iterable[B]) -> Verdict[B]:
    """Decide a request of age ``ts`` against its blockers.

    Blockers are the active leases that conflict with the request plus the queued requests that
    conflict with it and are older. No blocker: GRANT. Strictly older than every blocker: WAIT.
    Otherwise DIE, naming the oldest blocker. Equal ages never wait on each other.
    """
    oldest: B | None = None
    for blocker in blockers:
        if oldest is None or blocker.ts < oldest.ts:
            oldest = blocker
    if oldest is None:
        return Verdict(Decision.GRANT)
    if ts < oldest.ts:
        return Verdict(Decision.WAIT, oldest)
    return Verdict(Decision.DIE, oldest)
