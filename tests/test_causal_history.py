"""The history checker: random read-think-write schedules against the real kernel.

Each schedule is drawn from its own seed: three SERIALIZABLE sessions (two of them of one
agent) read and write a small tree (a directory ``d`` with files ``d/a`` and ``d/b``, and a file
``e``) by lease blocks, with the other ways a lease ends as steps of their own: a block that
raises, a session that leaves holding a writing lease, a writing lease that expires (the
kernel's clock is virtual) or is revoked, and a write joined by the session's id.

Every step is recorded as a history and checked against a model of file versions: a directory
holds the files named below it plus files nobody named (a version of its own, seen only by
reading the directory or above). A write makes a new version of every file it covers; a writing
lease that expires or is revoked does too, seen by nobody. A write is *fresh* when its session
saw the latest version of every file it covers. The kernel must accept exactly the fresh
writes: an accepted stale write is a lost update, a refused fresh write a needless refusal.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from klock_async import CausalViolationError, IsolationLevel, Klock, LeaseLostError, Session
from klock_async.scheduler import Scheduler

SCHEDULES = int(os.environ.get("KLOCK_HISTORY_SCHEDULES", "10000"))
STEPS = 8

# The files each path covers; "d/" is the directory's files that nobody named.
COVERS = {"d": ("d/", "d/a", "d/b"), "d/a": ("d/a",), "d/b": ("d/b",), "e": ("e",)}
PATHS = tuple(COVERS)


@dataclass
class Model:
    """The versions of the files, and the versions each session saw."""

    version: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COVERS["d"] + ("e",), 0))
    seen: dict[int, dict[str, int]] = field(default_factory=dict)
    last: int = 0

    def read(self, s: int, path: str) -> None:
        for f in COVERS[path]:
            self.seen.setdefault(s, {})[f] = self.version[f]

    def fresh(self, s: int, path: str) -> bool:
        seen = self.seen.get(s, {})
        return all(seen.get(f, 0) == self.version[f] for f in COVERS[path])

    def write(self, s: int | None, path: str) -> None:
        for f in COVERS[path]:
            self.last += 1
            self.version[f] = self.last
            if s is not None:
                self.seen.setdefault(s, {})[f] = self.last


class Boom(Exception):
    """The work inside a lease block failed."""


class Checker:
    def __init__(self, klock: Klock, now: list[float]) -> None:
        self.klock = klock
        self.now = now
        self.writes = {"accepted": 0, "refused": 0}
        self.failures: list[str] = []

    async def run(self, n: int) -> None:
        rng = random.Random(n)
        a = await self.klock.agent("A")
        b = await self.klock.agent("B")
        ser = IsolationLevel.SERIALIZABLE
        sessions = [a.session(isolation=ser), a.session(isolation=ser), b.session(isolation=ser)]
        model = Model()
        history: list[str] = []
        for _ in range(STEPS):
            i = rng.randrange(3)
            s, path = sessions[i], rng.choice(PATHS)
            step = rng.choices(
                ("read", "write", "raise", "exit", "expire", "revoke", "join"),
                (6, 6, 1, 1, 1, 1, 1),
            )[0]
            history.append(f"{step} s{i} {path}")
            target = self.name(path)
            if step == "read":
                async with s.lease(target, "CONSUMES"):
                    model.read(i, path)
            elif step == "raise":
                predicate = rng.choice(("CONSUMES", "MUTATES"))
                history[-1] += f" {predicate}"
                try:
                    async with s.lease(target, predicate):
                        raise Boom
                except Boom:
                    pass  # nothing read or written: the holder says so
                except CausalViolationError:
                    pass  # refused at grant: nothing to check beyond the writes below
            elif step in ("expire", "revoke"):
                if await self.attempt(model, i, s, path, history, step=step):
                    model.write(None, path)  # a possible write, seen by nobody
            else:
                if await self.attempt(model, i, s, path, history, step=step):
                    model.write(i, path)
        for s in sessions:
            await s.release_all()

    async def attempt(
        self, model: Model, i: int, s: Session, path: str, history: list[str], *, step: str
    ) -> bool:
        """Take a writing lease and end it the step's way; check the kernel's decision."""
        fresh = model.fresh(i, path)
        name = self.name(path)
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
                except LeaseLostError:
                    pass
        except CausalViolationError:
            accepted = False
        self.writes["accepted" if accepted else "refused"] += 1
        if accepted != fresh:
            what = "lost update: a stale write accepted" if accepted else "fresh write refused"
            self.failures.append(f"{what}; history {history}")
        return accepted

    def name(self, path: str) -> str:
        return self.prefix + path

    prefix = ""


async def test_history_checker_finds_no_lost_update_and_no_needless_refusal() -> None:
    """Random schedules: the kernel accepts exactly the writes built on the latest versions."""
    now = [1_000.0]
    async with Klock(backend=Scheduler(clock=lambda: now[0])) as klock:
        await klock.register_agent("A")
        await klock.register_agent("B")
        checker = Checker(klock, now)
        for n in range(SCHEDULES):
            checker.prefix = f"/h{n}/"
            await checker.run(n)
            assert not checker.failures, checker.failures[:3]
        assert await klock.leases() == []
    print(
        f"history checker: {SCHEDULES} schedules of {STEPS} steps, "
        f"{checker.writes['accepted']} writes accepted, {checker.writes['refused']} refused"
    )
    assert checker.writes["accepted"] and checker.writes["refused"]
