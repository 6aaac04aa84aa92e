"""A driver of the pure lock table on virtual time, for the table's tests: numbers requests,
collects answers by reply name, checks the table's invariants after every step."""

from __future__ import annotations

from typing import Any

from klock_async.clocks import IsolationLevel
from klock_async.locktable import LockTable, Request
from klock_async.model import Intent, LeaseInfo

Pairs = list[tuple[str, str]]


class Driver:
    """A tiny driver: numbers requests, collects answers by reply name, checks invariants."""

    def __init__(self, *agents: str) -> None:
        self.table = LockTable()
        self.now = 0.0
        self.ids = 0
        self.answers: dict[str, Any] = {}
        for agent in agents:
            self.table.register(agent, None)

    def ask(
        self,
        name: str,
        agent: str,
        pairs: Pairs,
        *,
        session: str | None = None,
        wait: bool = True,
        ttl: float = 10.0,
        key: str | None = None,
    ) -> Any:
        """Send a request (its session: ``name`` unless given; ``key``: its request key);
        return its answer if it came at once, else None (queued)."""
        self.ids += 1
        intents = tuple(Intent.of(r, p) for r, p in pairs)
        request = Request(
            self.ids,
            agent,
            session or name,
            intents,
            ttl,
            wait,
            IsolationLevel.READ_COMMITTED,
            name,
        )
        request.key = key
        self.table.acquire(request, self.now)
        self.drain()
        return self.answers.get(name)

    def drain(self) -> None:
        for reply, value in self.table.answers:
            self.answers[reply] = value
        self.table.answers.clear()
        self.table.check_invariants()

    def leases(self, name: str) -> list[LeaseInfo]:
        answer = self.answers[name]
        assert isinstance(answer, tuple), answer
        return [info for info, _ in answer]

    def release(self, name: str) -> None:
        for info in self.leases(name):
            if info.id in self.table.leases:
                self.table.release(info.id, None, False, self.now)
        self.drain()

    def request_id(self, name: str) -> int:
        for request in self.table.queued.values():
            if request.reply == name:
                return request.id
        raise AssertionError(f"{name} is not queued")


def granted(answer: Any) -> bool:
    return isinstance(answer, tuple)
