"""Edge cases at the kernel's borders: cancellation during release, shutdown during a commit,
eviction of a waiting agent, age assignment and retry-policy limits."""

from __future__ import annotations

import asyncio

import pytest

from klock_async import (
    CausalViolationError,
    EvictedError,
    InvalidRequestError,
    IsolationLevel,
    KernelClosedError,
    Klock,
    RetryPolicy,
)
from klock_async.clocks import VectorClock
from klock_async.model import AgentInfo, Intent, LeaseInfo
from klock_async.scheduler import RecoveredState, Scheduler


async def test_a_second_cancel_during_release_still_releases() -> None:
    """A lease block cancelled twice while it releases leaves nothing held."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        inside = asyncio.Event()

        async def work() -> None:
            async with agent.lease("f", "MUTATES", ttl=30):
                inside.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(work())
        await inside.wait()
        task.cancel()
        for _ in range(2):  # let __aexit__ start its release
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await klock.leases() == []


async def test_a_second_cancel_during_session_exit_still_releases() -> None:
    """A session cancelled twice while it releases leaves nothing held."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        inside = asyncio.Event()

        async def work() -> None:
            async with agent.session() as session:
                await session.acquire("f", "MUTATES")
                await session.acquire("g", "MUTATES")
                inside.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(work())
        await inside.wait()
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await klock.leases() == []


class _GatedJournal:
    """A journal whose commit of a grant waits until the test opens a gate."""

    def __init__(self, *, hold: bool = True) -> None:
        self.hold = hold  # gate the commits that carry a lease
        self.hold_all = False  # gate every commit
        self.committing = asyncio.Event()
        self.gate = asyncio.Event()
        self.durable: list[object] = []
        self._buffer: list[object] = []

    def load(self) -> RecoveredState:
        return RecoveredState()

    def record_agent(self, agent: AgentInfo, priority: int | None = None) -> None:
        self._buffer.append(agent)

    def record_lease(self, lease: LeaseInfo) -> None:
        self._buffer.append(lease)

    def record_clocks(
        self, path: str, path_clock: VectorClock, agent_id: str, agent_clock: VectorClock, n: int
    ) -> None:
        pass

    def record_counters(self, last_token: int, last_agent_ts: int) -> None:
        pass

    async def commit(self) -> None:
        if self.hold_all or (
            self.hold and any(isinstance(item, LeaseInfo) for item in self._buffer)
        ):
            self.committing.set()
            await self.gate.wait()
        self.durable += self._buffer
        self._buffer = []

    def close(self) -> None:
        pass


async def test_shutdown_during_a_commit_answers_no_grant() -> None:
    """Closing while a grant's batch is being committed tells its caller nothing was granted."""
    journal = _GatedJournal()
    scheduler = Scheduler(journal=journal)
    await scheduler.start()
    await scheduler.register_agent("a", None)
    acquire = asyncio.create_task(scheduler.acquire("a", "s", [Intent.of("f", "MUTATES")], ttl=10))
    await journal.committing.wait()
    await scheduler.aclose()
    with pytest.raises(KernelClosedError):
        await acquire
    assert not any(isinstance(item, LeaseInfo) for item in journal.durable)


async def test_a_deadline_passing_during_a_commit_still_ends_the_lease() -> None:
    """The expiry timer can fire while the actor awaits a commit; the actor must not then idle.

    The waiter's batch is the last message; its commit is held open until after the holder's
    deadline. Nothing else is ever posted, so only the actor's own timer can hand the file on.
    """
    journal = _GatedJournal(hold=False)
    async with Klock(backend=Scheduler(journal=journal)) as klock:
        old = await klock.register_agent("old")
        young = await klock.register_agent("young")
        await young.acquire("f", "MUTATES", ttl=0.05)
        # Timers run in order of their time: this one runs after the lease's expiry timer.
        asyncio.get_running_loop().call_later(0.1, journal.gate.set)
        journal.hold_all = True
        waiter = asyncio.create_task(old.acquire("f", "MUTATES"))
        await journal.committing.wait()
        async with asyncio.timeout(10):  # a safety net: with the bug, the waiter waits forever
            lease = await waiter
        assert lease.agent_id == "old"


async def test_eviction_fails_the_agents_queued_requests() -> None:
    """Evicting an agent also withdraws what it waits for, so nothing is granted to it later."""
    async with Klock() as klock:
        old = await klock.register_agent("old")
        young = await klock.register_agent("young")
        held = await young.acquire("f", "MUTATES")
        waiting = asyncio.create_task(old.acquire("f", "MUTATES"))
        # A task made after the acquire posts its query after it: the kernel answers in order.
        assert (await asyncio.create_task(klock.statistics())).requests_waiting == 1
        await klock.evict("old")
        with pytest.raises(EvictedError):
            await waiting
        await held.release()
        assert await klock.leases() == []
        assert (await klock.statistics()).requests_waiting == 0


async def test_automatic_ages_come_after_explicit_priorities() -> None:
    """An agent registered without a priority is younger than every explicit priority."""
    async with Klock() as klock:
        first = await klock.register_agent("a", priority=1)
        second = await klock.register_agent("b")
        high = await klock.register_agent("c", priority=200)
        last = await klock.register_agent("d")
        assert (first.ts, second.ts, high.ts, last.ts) == (1, 2, 200, 201)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"max_retries": -1}, id="negative-retries"),
        pytest.param({"max_retries": 1.5}, id="float-retries"),
        pytest.param({"base_delay": 0}, id="zero-delay"),
        pytest.param({"base_delay": 3, "max_delay": 1}, id="base-above-cap"),
        pytest.param({"max_delay": float("inf")}, id="infinite-cap"),
    ],
)
def test_retry_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    """A retry policy with impossible limits is refused when it is made."""
    with pytest.raises(InvalidRequestError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_backoff_stays_capped_after_many_attempts() -> None:
    """The backoff of a very late retry is the cap, not an overflow."""
    policy = RetryPolicy(max_retries=5000, max_delay=1.0)
    assert 0.5 <= policy.backoff(1100) <= 1.0


async def test_a_read_its_caller_never_received_does_not_count() -> None:
    """A SERIALIZABLE read granted to a caller that was cancelled before it saw the lease is
    not a read: the agent's later strict write of that path is still refused as stale."""
    journal = _GatedJournal(hold=False)
    async with Klock(backend=Scheduler(journal=journal)) as klock:
        reader = await klock.register_agent("reader")
        writer = await klock.register_agent("writer")
        held = await writer.acquire("f", "MUTATES")
        await klock.write("f", "writer")  # a version the reader never saw

        async def read() -> None:
            async with reader.session(isolation=IsolationLevel.SERIALIZABLE) as session:
                await session.acquire("f", "CONSUMES")

        reading = asyncio.create_task(read())
        assert (await asyncio.create_task(klock.statistics())).requests_waiting == 1
        journal.hold = True
        releasing = asyncio.create_task(held.release())
        await journal.committing.wait()  # the read is granted; its answer waits for the commit
        reading.cancel()
        journal.gate.set()
        await releasing
        with pytest.raises(asyncio.CancelledError):
            await reading
        assert await klock.leases() == []
        with pytest.raises(CausalViolationError):
            await klock.write("f", "reader")
