"""The history checker: random read-think-write schedules against the real kernel.

Each schedule is drawn from its own seed: three SERIALIZABLE sessions (two of them of agent A,
one of agent B) and agent A's own view (``klock.read`` / ``klock.write``, as its tool calls
use) read and write a small tree (a directory ``d`` with files ``d/a`` and ``d/b``, and a file
``e``). Besides plain reads and writes under lease blocks, the other ways a lease ends are
steps of their own: a write made while the session still holds its read, a block that raises,
a session that leaves holding a writing lease, a writing lease that expires (the kernel's
clock is virtual) or is revoked, a write joined by the session's id, and a request cancelled
while it waits or just after it was granted.

Every step is recorded as a history and checked against a model of file versions. A directory
holds the files named below it plus files nobody named (``d/``, seen only by reading the
directory). A write makes a new version of every file it covers, seen by its writer; a writing
lease that expires or is revoked does too (a possible write). A write is *fresh* when its
view saw the latest version of every file it covers. The kernel must accept exactly the fresh
writes: an accepted stale write is a lost update, a refused fresh write a needless refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from dataclasses import dataclass, field

import pytest

from klock_async import (
    CausalViolationError,
    IsolationLevel,
    Klock,
    LeaseLostError,
    Session,
)
from klock_async.scheduler import Scheduler

SCHEDULES = int(os.environ.get("KLOCK_HISTORY_SCHEDULES", "10000"))
"""Schedules per run (at least 10,000 in CI)."""
STEPS = 8

# The files each path covers; "d/" stands for the directory's files that nobody named.
COVERS = {"d": ("d/", "d/a", "d/b"), "d/a": ("d/a",), "d/b": ("d/b",), "e": ("e",)}
PATHS = tuple(COVERS)
OVERLAPPING = {
    "d": ("d", "d/a", "d/b"),
    "d/a": ("d", "d/a"),
    "d/b": ("d", "d/b"),
    "e": ("e",),
}
AGENT_VIEW = 3  # the index of agent A's own view in a schedule
STEP_WEIGHTS = {
    "read": 6,
    "write": 6,
    "raise": 1,
    "exit": 1,
    "expire": 1,
    "revoke": 1,
    "join": 1,
    "cancel": 1,
    "upgrade": 1,
}


@dataclass
class Model:
    """The versions of the files, and the versions each view saw."""

    version: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("d/", "d/a", "d/b", "e"), 0)
    )
    seen: dict[int, dict[str, int]] = field(default_factory=dict)
    last: int = 0

    def read(self, view: int, path: str) -> None:
        for f in COVERS[path]:
            self.seen.setdefault(view, {})[f] = self.version[f]

    def fresh(self, view: int, path: str) -> bool:
        seen = self.seen.get(view, {})
        return all(seen.get(f, 0) == self.version[f] for f in COVERS[path])

    def write(self, view: int, path: str) -> None:
        for f in COVERS[path]:
            self.last += 1
            self.version[f] = self.last
            self.seen.setdefault(view, {})[f] = self.last


class Boom(Exception):
    """The work inside a lease block failed."""


@dataclass
class Schedule:
    """One schedule's sessions, model and history."""

    n: int
    sessions: list[Session]
    model: Model = field(default_factory=Model)
    history: list[str] = field(default_factory=list)

    def name(self, path: str) -> str:
        return f"/h{self.n}/{path}"


class Checker:
    """Runs schedules on one kernel (each on paths of its own) and collects failures."""

    def __init__(self, klock: Klock, now: list[float]) -> None:
        self.klock = klock
        self.now = now
        self.decisions = {"accepted": 0, "refused": 0}
        self.cancels = {"while waiting": 0, "after its answer": 0}
        self.failures: list[str] = []

    async def run(self, n: int) -> None:
        rng = random.Random(n)
        a = await self.klock.agent("A")
        b = await self.klock.agent("B")
        ser = IsolationLevel.SERIALIZABLE
        sessions = [a.session(isolation=ser), a.session(isolation=ser), b.session(isolation=ser)]
        schedule = Schedule(n, sessions)
        for _ in range(STEPS):
            i = rng.randrange(4)
            path = rng.choice(PATHS)
            steps = ("read", "write") if i == AGENT_VIEW else tuple(STEP_WEIGHTS)
            step = rng.choices(steps, [STEP_WEIGHTS[s] for s in steps])[0]
            schedule.history.append(f"{step} v{i} {path}")
            await self.step(schedule, rng, step, i, path)
        for session in sessions:
            await session.release_all()
        if n % 500 == 0:  # the walk over all state grows with every schedule run
            backend = self.klock.backend
            assert isinstance(backend, Scheduler)
            backend.check_invariants()

    async def step(
        self, schedule: Schedule, rng: random.Random, step: str, i: int, path: str
    ) -> None:
        model, target = schedule.model, schedule.name(path)
        if i == AGENT_VIEW:
            if step == "read":
                await self.klock.read(target, "A")
                model.read(i, path)
            else:
                fresh = model.fresh(i, path)
                try:
                    await self.klock.write(target, "A")
                except CausalViolationError:
                    self.decide(schedule, False, fresh)
                else:
                    self.decide(schedule, True, fresh)
                    model.write(i, path)
            return
        s = schedule.sessions[i]
        if step == "read":
            async with s.lease(target, "CONSUMES"):
                model.read(i, path)
        elif step == "raise":
            predicate = rng.choice(("CONSUMES", "MUTATES"))
            schedule.history[-1] += f" {predicate}"
            with contextlib.suppress(Boom, CausalViolationError):
                async with s.lease(target, predicate):
                    raise Boom  # nothing read or written: the block says so
        elif step == "cancel":
            await self.cancel(schedule, rng, i, path)
        elif step == "upgrade":  # read, then write while the read lease is still held
            async with s.lease(target, "CONSUMES"):
                model.read(i, path)
                if await self.attempt(schedule, s, i, path, "write"):
                    model.write(i, path)
        elif await self.attempt(schedule, s, i, path, step):
            model.write(i, path)  # for expire and revoke: a possible write

    def decide(self, schedule: Schedule, accepted: bool, fresh: bool) -> None:
        self.decisions["accepted" if accepted else "refused"] += 1
        if accepted != fresh:
            what = "lost update: a stale write accepted" if accepted else "fresh write refused"
            self.failures.append(f"{what}; schedule {schedule.n}: {schedule.history}")

    async def attempt(self, schedule: Schedule, s: Session, i: int, path: str, step: str) -> bool:
        """Take a writing lease and end it the step's way; check the kernel's decision."""
        fresh = schedule.model.fresh(i, path)
        name = schedule.name(path)
        accepted = True
        try:
            if step == "write":
                async with s.lease(name, "MUTATES"):
                    pass
            elif step == "join":
                lease = await self.klock._agents[s.agent_id].acquire(name, "MUTATES", session=s.id)
                await lease.release()
            elif step == "exit":
                await s.acquire(name, "MUTATES")
                await s.release_all()
            elif step == "revoke":
                lease = await s.acquire(name, "MUTATES")
                await self.klock.revoke(lease.id)
            else:  # expire
                lease = await s.acquire(name, "MUTATES", ttl=1)
                self.now[0] += 2
                await self.klock.statistics()  # any message runs the kernel at the clock's time
                try:
                    await lease.release()
                    raise AssertionError("an expired lease was released")
                except LeaseLostError as lost:
                    assert "possible write" in str(lost)
        except CausalViolationError:
            accepted = False
        self.decide(schedule, accepted, fresh)
        return accepted

    async def cancel(self, schedule: Schedule, rng: random.Random, i: int, path: str) -> None:
        """Another session writes ``path`` while view ``i`` asks for an overlapping path and is
        cancelled, while it waits or just after the kernel answered it: the cancelled request
        counts as nothing, the other write is checked and recorded as usual.
        """
        j = rng.choice([k for k in range(3) if k != i])
        other = rng.choice(OVERLAPPING[path])
        predicate = rng.choice(("CONSUMES", "MUTATES"))
        granted_first = rng.random() < 0.5
        when = "after the kernel answered it" if granted_first else "while waiting"
        schedule.history[-1] += f" {predicate} {other} while v{j} writes {path}, cancelled {when}"
        s, holder = schedule.sessions[i], schedule.sessions[j]
        fresh = schedule.model.fresh(j, path)
        try:
            lease = await holder.acquire(schedule.name(path), "MUTATES")
        except CausalViolationError:
            self.decide(schedule, False, fresh)
            return
        self.decide(schedule, True, fresh)
        waiter = asyncio.create_task(s.acquire(schedule.name(other), predicate))
        await self.klock.statistics()  # the waiter posts its request before this answer...
        stats = await self.klock.statistics()  # ...so this one finds it queued
        assert stats.requests_waiting == 1, schedule.history
        if granted_first:
            await lease.release()  # decides the waiter (granted or refused) before it resumes
            waiter.cancel()  # so it never sees the answer: a grant is given back unseen
        else:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            await lease.release()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        assert waiter.cancelled(), schedule.history
        self.cancels["after its answer" if granted_first else "while waiting"] += 1
        schedule.model.write(j, path)
        assert (await self.klock.statistics()).requests_waiting == 0


async def test_history_checker_finds_no_lost_update_and_no_needless_refusal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Random schedules: the kernel accepts exactly the writes built on the latest versions."""
    now = [1_000.0]
    async with Klock(backend=Scheduler(clock=lambda: now[0])) as klock:
        await klock.register_agent("A")
        await klock.register_agent("B")
        checker = Checker(klock, now)
        for n in range(SCHEDULES):
            await checker.run(n)
            assert not checker.failures, checker.failures[:3]
        assert await klock.leases() == []
    accepted, refused = checker.decisions["accepted"], checker.decisions["refused"]
    with capsys.disabled():  # shown in every run, captured or not
        print(
            f"\nhistory checker: {SCHEDULES} schedules of {STEPS} steps ran, "
            f"{accepted} writes accepted and {refused} refused, all as the model says; "
            f"cancelled requests: {checker.cancels}"
        )
    assert accepted and refused
