"""Tests for klock_async.scheduler: the actor, Wait-Die in action, leases, expiry, shutdown.

Ordering never relies on sleeping: ``settle`` returns statistics answered after every ready
task has posted its request, waiters are awaited on their own futures, and loss or expiry is
observed through ``wait_ended``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog.testing

from klock_async import (
    AcquireTimeoutError,
    AgentExistsError,
    AgentInfo,
    InvalidPredicateError,
    InvalidRequestError,
    InvalidResourceError,
    InvalidTTLError,
    KernelClosedError,
    Klock,
    LeaseDied,
    LeaseInfo,
    LeaseLostError,
    LeaseNotFoundError,
    LeaseState,
    LeaseWouldWait,
    NotLeaseOwnerError,
    Statistics,
    UnknownAgentError,
)
from klock_async.api import Agent
from klock_async.model import Intent
from klock_async.scheduler import _IDLE_SLOTS, _LATER_SWEEP, Scheduler


async def settle(klock: Klock) -> Statistics:
    """Statistics answered after every ready task has posted its message (FIFO scheduling)."""
    return await asyncio.create_task(klock.statistics())


def scheduler_of(klock: Klock) -> Scheduler:
    backend = klock.backend
    assert isinstance(backend, Scheduler)
    return backend


def state_of(leases: list[LeaseInfo]) -> set[tuple[str, str, str, str, int]]:
    return {(i.agent_id, i.session_id, str(i.resource), i.predicate.value, i.token) for i in leases}


async def agents(klock: Klock, *names: str) -> list[Agent]:
    """Register agents oldest first: explicit priorities, which order before unit start."""
    return [await klock.register_agent(name, priority=i) for i, name in enumerate(names, 1)]


@pytest.fixture
async def klock() -> AsyncIterator[Klock]:
    # The scheduler is a plain task: no task group or cancel scope is held across the yield.
    async with Klock() as kernel:
        yield kernel
        scheduler_of(kernel).check_invariants()


# --- the trace ------------------------------------------------------------------------------


async def test_trace(klock: Klock) -> None:
    """Younger holds; older waits; a newer agent dies; younger releases; older is granted."""
    older, younger, newer = await agents(klock, "older", "younger", "newer")
    held = await younger.acquire("FILE:/src/auth.js", "MUTATES")

    waiter = asyncio.create_task(older.acquire("src/auth.js", "MUTATES"))
    stats = await settle(klock)
    assert stats.requests_waiting == 1
    assert not waiter.done()
    scheduler_of(klock).check_invariants()

    with pytest.raises(LeaseDied) as died:
        await newer.acquire("src/./auth.js", "MUTATES", wait=False)
    # The oldest blocker is the queued request of the older agent, not the younger holder.
    assert died.value.blocker_agent_id == "older"
    assert died.value.agent_id == "newer"
    assert died.value.resource == "FILE:/src/auth.js"
    assert not waiter.done()

    await held.release()
    lease = await waiter
    assert lease.agent_id == "older"
    assert str(lease.resource) == "FILE:/src/auth.js"
    assert lease.token > held.token
    assert [info.id for info in await klock.leases()] == [lease.id]
    await lease.release()


async def test_newer_agent_dies_naming_the_holder() -> None:
    """With nobody queued, a younger requester that may not wait dies naming the holder."""
    async with Klock() as klock:
        old, young = await agents(klock, "old", "young")
        held = await old.acquire("/f", "MUTATES")
        with pytest.raises(LeaseDied) as died:
            await young.acquire("/f", "CONSUMES", wait=False)
        assert died.value.blocker_agent_id == "old"
        assert died.value.blocker_lease_id == held.id
        assert died.value.predicate == "CONSUMES"
        assert 0 < died.value.retry_after <= held.info.ttl
        assert (await klock.statistics()).deaths == 1


# --- re-evaluation of queues ----------------------------------------------------------------


async def test_younger_waiter_dies_when_an_older_one_queues(klock: Klock) -> None:
    """A new older waiter behind the same holder makes a younger holding unit's waiter die."""
    a, b, c = await agents(klock, "a", "b", "c")
    await c.acquire("/f", "MUTATES")
    b_session = b.session()
    await b_session.acquire("/x", "MUTATES")  # b holds: its request keeps Wait-Die
    b_waits = asyncio.create_task(b_session.acquire("/f", "MUTATES"))
    assert (await settle(klock)).requests_waiting == 1
    a_waits = asyncio.create_task(a.acquire("/f", "MUTATES"))
    with pytest.raises(LeaseDied) as died:
        await b_waits
    assert died.value.blocker_agent_id == "a"
    assert (await settle(klock)).requests_waiting == 1
    assert not a_waits.done()
    scheduler_of(klock).check_invariants()
    await klock.evict("c")
    assert (await a_waits).agent_id == "a"


async def test_compatible_waiters_are_granted_together(klock: Klock) -> None:
    """A release grants every queued reader at once, in age order."""
    a, b, c = await agents(klock, "a", "b", "c")
    held = await c.acquire("/f", "MUTATES")
    readers = [asyncio.create_task(x.acquire("/f", "CONSUMES")) for x in (a, b)]
    assert (await settle(klock)).requests_waiting == 2
    await held.release()
    granted = [await r for r in readers]
    assert [lease.agent_id for lease in granted] == ["a", "b"]
    assert granted[0].token < granted[1].token


async def test_waiter_dies_when_an_older_agent_is_granted(klock: Klock) -> None:
    """A fresh grant to an older agent re-evaluates the queue: a younger holding waiter dies."""
    old, mid, young = await agents(klock, "old", "mid", "young")
    await young.acquire("/f", "CONSUMES")
    mid_session = mid.session()
    await mid_session.acquire("/x", "MUTATES")
    writer = asyncio.create_task(mid_session.acquire("/f", "MUTATES"))
    assert (await settle(klock)).requests_waiting == 1
    # CONSUMES shares /f with the young reader, and the queued writer is younger than "old",
    # so "old" is granted at once; the writer now waits for an older holder and must die.
    reader = await old.acquire("/f", "CONSUMES")
    with pytest.raises(LeaseDied) as died:
        await writer
    assert died.value.blocker_agent_id == "old"
    assert died.value.blocker_lease_id == reader.id
    assert (await settle(klock)).requests_waiting == 0


async def test_fresh_grant_cannot_close_a_wait_cycle(klock: Klock) -> None:
    """Hold-and-wait across two resources never deadlocks: the younger side dies."""
    old, mid, young = await agents(klock, "old", "mid", "young")
    await young.acquire("/a", "CONSUMES")
    async with mid.session() as mid_session:
        await mid_session.acquire("/b", "MUTATES")
        mid_waits = asyncio.create_task(mid_session.acquire("/a", "MUTATES"))
        assert (await settle(klock)).requests_waiting == 1
        async with old.session() as old_session:
            await old_session.acquire("/a", "CONSUMES")
            with pytest.raises(LeaseDied):
                await mid_waits  # it would otherwise wait for "old", who now waits for it
            old_wants_b = asyncio.create_task(old_session.acquire("/b", "MUTATES"))
            assert (await settle(klock)).requests_waiting == 1
            scheduler_of(klock).check_invariants()
            await mid_session.release_all()
            assert (await old_wants_b).agent_id == "old"


async def test_younger_requester_dies_behind_an_older_waiter(klock: Klock) -> None:
    """A request compatible with the holders still dies behind an older conflicting waiter."""
    a, b, c = await agents(klock, "a", "b", "c")
    await b.acquire("/f", "CONSUMES")
    writer = asyncio.create_task(a.acquire("/f", "MUTATES"))
    assert (await settle(klock)).requests_waiting == 1
    with pytest.raises(LeaseDied) as died:
        await c.acquire("/f", "CONSUMES", wait=False)
    assert died.value.blocker_agent_id == "a"
    assert died.value.blocker_lease_id is None
    await klock.evict("b")
    await writer


async def test_multi_holder_wait_and_die(klock: Klock) -> None:
    """Wait only when older than every conflicting holder; die naming the oldest one."""
    a, b, c, d, e = await agents(klock, "a", "b", "c", "d", "e")
    await b.acquire("/f", "CONSUMES")
    await c.acquire("/f", "DEPENDS_ON")
    await e.acquire("/f", "CONSUMES")
    with pytest.raises(LeaseDied) as died:
        await d.acquire("/f", "MUTATES", wait=False)
    assert died.value.blocker_agent_id == "b"
    waiter = asyncio.create_task(a.acquire("/f", "DELETES"))
    assert (await settle(klock)).requests_waiting == 1
    for name in ("b", "e"):
        await klock.evict(name)
        assert (await settle(klock)).requests_waiting == 1  # "c" still holds
    await klock.evict("c")
    assert (await waiter).predicate.value == "DELETES"


async def test_expiry_hands_the_resource_to_the_next_waiter(klock: Klock) -> None:
    """A lease that is not heartbeated expires and its waiter is granted."""
    old, young = await agents(klock, "old", "young")
    held = await young.acquire("/f", "MUTATES", ttl=0.05)
    with structlog.testing.capture_logs() as logs:
        lease = await old.acquire("/f", "MUTATES")  # waits, woken by the expiry
    assert lease.agent_id == "old"
    expired = [e for e in logs if e["event"] == "lease.expired"]
    assert [e["lease"] for e in expired] == [held.id]
    stats = await klock.statistics()
    assert stats.expiries == 1
    assert stats.leases_active == 1
    with pytest.raises(LeaseNotFoundError):
        await klock.backend.heartbeat(held.id, "young")


async def test_revocation_wakes_the_waiter(klock: Klock) -> None:
    """Revoking the holder's lease grants the waiter."""
    old, young = await agents(klock, "old", "young")
    held = await young.acquire("/f", "MUTATES")
    waiter = asyncio.create_task(old.acquire("/f", "MUTATES"))
    await settle(klock)
    ended = asyncio.create_task(klock.backend.wait_ended(held.id, None))
    await settle(klock)
    revoked = await klock.revoke(held.id)
    assert revoked.state is LeaseState.REVOKED
    assert (await ended) == revoked
    assert (await waiter).agent_id == "old"
    with pytest.raises(LeaseNotFoundError):
        await klock.revoke(held.id)


async def test_late_watch_learns_how_a_lease_was_lost(klock: Klock) -> None:
    """Watching a lease that was already revoked or expired reports its final state."""
    (agent,) = await agents(klock, "a")
    revoked = await agent.acquire("/r", "MUTATES")
    await klock.revoke(revoked.id)
    info = await klock.backend.wait_ended(revoked.id, None)
    assert info is not None and info.state is LeaseState.REVOKED
    expiring = await agent.acquire("/e", "MUTATES", ttl=0.01)
    await klock.backend.wait_ended(expiring.id, None)
    info = await klock.backend.wait_ended(expiring.id, None)
    assert info is not None and info.state is LeaseState.EXPIRED
    released = await agent.acquire("/x", "MUTATES")
    await released.release()
    with pytest.raises(LeaseNotFoundError):
        await klock.backend.wait_ended(released.id, None)
    with pytest.raises(LeaseNotFoundError):
        await klock.backend.heartbeat(revoked.id, "a")  # lost is not active


async def test_evict_revokes_every_lease_of_an_agent(klock: Klock) -> None:
    """Evicting an agent ends all its leases and nobody else's."""
    a, b = await agents(klock, "a", "b")
    for path in ("/x", "/y", "/z"):
        await b.acquire(path, "MUTATES")
    mine = await a.acquire("/w", "MUTATES")
    assert await klock.evict("b") == 3
    assert [i.id for i in await klock.leases()] == [mine.id]
    assert (await klock.statistics()).revocations == 3
    with pytest.raises(UnknownAgentError):
        await klock.evict("ghost")


# --- hierarchy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "requested"),
    [
        pytest.param(("/src", "MUTATES"), ("/src/a.js", "CONSUMES"), id="dir-held"),
        pytest.param(("/src/a.js", "CONSUMES"), ("/src", "MUTATES"), id="file-held"),
        pytest.param(("/", "DELETES"), ("/src/lib/a.js", "DEPENDS_ON"), id="root-held"),
        pytest.param(("/src/lib/a.js", "MUTATES"), ("/src", "RENAMES"), id="deep-file-held"),
    ],
)
async def test_hierarchy_conflicts(
    klock: Klock, held: tuple[str, str], requested: tuple[str, str]
) -> None:
    """An intent on a directory conflicts with a clashing intent inside it, both ways."""
    old, young = await agents(klock, "old", "young")
    lease = await young.acquire(*held)
    waiter = asyncio.create_task(old.acquire(*requested))
    assert (await settle(klock)).requests_waiting == 1
    with pytest.raises(LeaseDied):
        await (await klock.register_agent("newest", priority=3)).acquire(*held, wait=False)
    await lease.release()
    assert (await waiter).agent_id == "old"


@pytest.mark.parametrize(
    ("held", "requested"),
    [
        pytest.param(("/src", "MUTATES"), ("/srcx/a.js", "MUTATES"), id="sibling-prefix"),
        pytest.param(("/src", "CONSUMES"), ("/src/a.js", "CONSUMES"), id="readers"),
        pytest.param(("/src/a", "MUTATES"), ("/src/b", "MUTATES"), id="siblings"),
        pytest.param(("FILE:/src", "MUTATES"), ("SYMBOL:/src", "MUTATES"), id="other-type"),
        pytest.param(("SYMBOL:/", "MUTATES"), ("SYMBOL:auth.login", "MUTATES"), id="root-relative"),
    ],
)
async def test_no_conflict(klock: Klock, held: tuple[str, str], requested: tuple[str, str]) -> None:
    """Intents that do not overlap or do not clash are granted side by side."""
    old, young = await agents(klock, "old", "young")
    await old.acquire(*held)
    await young.acquire(*requested, wait=False)
    assert len(await klock.leases()) == 2


# --- sessions, reentrancy, equal ages -------------------------------------------------------


async def test_reentrancy_within_a_session(klock: Klock) -> None:
    """Intents of one agent in one session never conflict with each other."""
    (agent,) = await agents(klock, "a")
    async with agent.session() as session:
        first = await session.acquire("/src", "MUTATES", wait=False)
        second = await session.acquire("/src/a.js", "DELETES", wait=False)
        third = await session.acquire("/src", "MUTATES", wait=False)
        assert len({first.id, second.id, third.id}) == 3
        assert {lease.session_id for lease in (first, second, third)} == {session.id}
    assert await klock.leases() == []


async def test_same_agent_other_session_is_another_unit(klock: Klock) -> None:
    """Sessions of one agent are separate units: the younger one dies when it may not wait."""
    (agent,) = await agents(klock, "a")
    async with agent.session() as s1, agent.session() as s2:
        held = await s1.acquire("/f", "MUTATES")
        with pytest.raises(LeaseDied) as died:
            await s2.acquire("/f", "MUTATES", wait=False)
        assert died.value.blocker_agent_id == "a"
        assert died.value.blocker_lease_id == held.id
        with pytest.raises(LeaseDied):  # a sessionless call is a session of its own
            await agent.acquire("/f", "CONSUMES", wait=False)
        waiter = asyncio.create_task(s2.acquire("/f", "MUTATES"))  # holds nothing: queues
        assert (await settle(klock)).requests_waiting == 1
        await held.release()
        assert (await waiter).session_id == s2.id


async def test_equal_priorities_order_by_unit_start(klock: Klock) -> None:
    """Agents registered with one priority are ordered by when their units started."""
    a = await klock.register_agent("a", priority=7)
    b = await klock.register_agent("b", priority=7)
    await a.acquire("/f", "MUTATES")
    with pytest.raises(LeaseDied):
        await b.acquire("/f", "MUTATES", wait=False)
    assert (await klock.statistics()).requests_waiting == 0


async def test_release_session_releases_everything(klock: Klock) -> None:
    """Releasing a session ends all its leases and wakes its waiters."""
    old, young = await agents(klock, "old", "young")
    async with young.session() as session:
        await session.acquire("/a", "MUTATES")
        await session.acquire("/b", "MUTATES")
        waiter = asyncio.create_task(old.acquire_many([("/a", "CONSUMES"), ("/b", "CONSUMES")]))
        await settle(klock)
        assert await session.release_all() == 2
        assert len(await waiter) == 2
        assert await session.release_all() == 0


# --- atomic multi-resource requests ---------------------------------------------------------


async def test_acquire_many_is_all_or_nothing(klock: Klock) -> None:
    """A request that dies on one resource holds none of the others."""
    old, young, other = await agents(klock, "old", "young", "other")
    await old.acquire("/b", "MUTATES")
    before = await klock.leases()
    with pytest.raises(LeaseDied) as died:
        await young.acquire_many(
            [("/a", "MUTATES"), ("/b", "MUTATES"), ("/c", "MUTATES")], wait=False
        )
    assert died.value.blocker_agent_id == "old"
    assert await klock.leases() == before
    # /a and /c are free: even a younger agent gets them without waiting.
    await other.acquire_many([("/a", "MUTATES"), ("/c", "MUTATES")], wait=False)


async def test_acquire_many_waits_for_all(klock: Klock) -> None:
    """A waiting multi-request holds nothing until every part is free, then gets all at once."""
    old, young, newest = await agents(klock, "old", "young", "newest")
    held = await young.acquire("/b", "MUTATES")
    waiter = asyncio.create_task(old.acquire_many([("/a", "MUTATES"), ("/b", "MUTATES")]))
    assert (await settle(klock)).requests_waiting == 1
    assert [i.id for i in await klock.leases()] == [held.id]
    with pytest.raises(LeaseDied) as died:  # /a is promised to the older waiter
        await newest.acquire("/a", "MUTATES", wait=False)
    assert died.value.blocker_agent_id == "old"
    await held.release()
    leases = await waiter
    assert [str(lease.resource) for lease in leases] == ["FILE:/a", "FILE:/b"]
    assert leases[1].token == leases[0].token + 1
    assert len({lease.session_id for lease in leases}) == 1


# --- leases: tokens, heartbeats -------------------------------------------------------------


async def test_fencing_tokens_strictly_increase(klock: Klock) -> None:
    """Every grant on a resource carries a larger token than the one before."""
    a, b = await agents(klock, "a", "b")
    tokens = []
    for i in range(6):
        lease = await (a if i % 2 else b).acquire("/f", "MUTATES")
        tokens.append(lease.token)
        await lease.release()
        other = await a.acquire(f"/other/{i}", "CONSUMES")
        await other.release()
    assert tokens == sorted(set(tokens))


async def test_heartbeat_keeps_a_lease_alive(klock: Klock) -> None:
    """Heartbeats push the expiry: the lease outlives its original ttl."""
    (agent,) = await agents(klock, "a")
    ttl = 1.0
    lease = await agent.acquire("/f", "MUTATES", ttl=ttl)
    first_expiry = lease.expires_at
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < 1.5 * ttl:
        # The timeout only bounds the observation; None means the lease is still active.
        assert await klock.backend.wait_ended(lease.id, ttl / 4) is None
        await lease.heartbeat()
    assert lease.expires_at > first_expiry
    assert lease.state is LeaseState.ACTIVE
    await lease.heartbeat(ttl=60)
    assert lease.info.ttl == 60
    await lease.release()
    assert (await klock.statistics()).expiries == 0


async def test_heartbeat_errors(klock: Klock) -> None:
    """Heartbeating someone else's lease, an unknown lease or with a bad ttl changes nothing."""
    a, _b = await agents(klock, "a", "b")
    lease = await a.acquire("/f", "MUTATES")
    before = await klock.leases()
    backend = klock.backend
    with pytest.raises(NotLeaseOwnerError):
        await backend.heartbeat(lease.id, "b")
    with pytest.raises(LeaseNotFoundError):
        await backend.heartbeat("no-such-lease", "a")
    with pytest.raises(InvalidTTLError):
        await backend.heartbeat(lease.id, "a", ttl=0)
    assert await klock.leases() == before


# --- withdrawing: timeout, cancellation, wait=False -----------------------------------------


async def test_timeout_withdraws_the_request(klock: Klock) -> None:
    """A timed-out acquire raises AcquireTimeoutError (a TimeoutError) and holds nothing."""
    old, young = await agents(klock, "old", "young")
    held = await young.acquire("/f", "MUTATES")
    with pytest.raises(TimeoutError) as timed_out:
        await old.acquire("/f", "MUTATES", timeout=0.05)
    assert isinstance(timed_out.value, AcquireTimeoutError)
    stats = await settle(klock)
    assert stats.requests_waiting == 0
    scheduler_of(klock).check_invariants()
    await held.release()
    assert await klock.leases() == []


async def test_zero_timeout_takes_an_immediate_answer(klock: Klock) -> None:
    """timeout=0 grants a free resource and withdraws what would wait."""
    old, young, newest = await agents(klock, "old", "young", "newest")
    lease = await young.acquire("/f", "MUTATES", timeout=0)
    assert lease.agent_id == "young"
    with pytest.raises(AcquireTimeoutError):
        await newest.acquire("/f", "MUTATES", timeout=0)  # holds nothing: it would queue
    with pytest.raises(AcquireTimeoutError):
        await old.acquire("/f", "MUTATES", timeout=0)
    stats = await settle(klock)
    assert (stats.requests_waiting, stats.leases_active) == (0, 1)


async def test_zero_timeout_watch_is_a_poll(klock: Klock) -> None:
    """wait_ended(id, 0) answers None for an active lease and raises for an unknown one."""
    (agent,) = await agents(klock, "a")
    lease = await agent.acquire("/f", "MUTATES")
    assert await klock.backend.wait_ended(lease.id, 0) is None
    with pytest.raises(LeaseNotFoundError):
        await klock.backend.wait_ended("no-such-lease", 0)
    await klock.revoke(lease.id)
    ended = await klock.backend.wait_ended(lease.id, 0)
    assert ended is not None and ended.state is LeaseState.REVOKED


async def test_cancelling_the_waiter_withdraws_the_request(klock: Klock) -> None:
    """Cancelling the task awaiting an acquire withdraws it; nothing is granted later."""
    old, young = await agents(klock, "old", "young")
    held = await young.acquire("/f", "MUTATES")
    waiter = asyncio.create_task(old.acquire("/f", "MUTATES"))
    assert (await settle(klock)).requests_waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (await settle(klock)).requests_waiting == 0
    await held.release()
    assert await klock.leases() == []
    assert (await klock.statistics()).grants == 1


async def test_cancel_before_the_release_is_processed(klock: Klock) -> None:
    """A waiter cancelled in the batch that frees its resource gives back what it got."""
    old, young = await agents(klock, "old", "young")
    held = await young.acquire("/f", "MUTATES")
    waiter = asyncio.create_task(old.acquire("/f", "MUTATES"))
    await settle(klock)
    waiter.cancel()  # its reply future is cancelled now; the withdraw follows the release
    await held.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await settle(klock)
    assert await klock.leases() == []
    stats = await klock.statistics()
    assert stats.grants == stats.releases  # nothing leaked
    scheduler_of(klock).check_invariants()


async def test_cancel_after_the_grant_was_sent(klock: Klock) -> None:
    """A grant that reaches a task already cancelled is given back: nothing leaks."""
    old, young = await agents(klock, "old", "young")
    held = await young.acquire("/f", "MUTATES")
    waiter = asyncio.create_task(old.acquire("/f", "MUTATES"))
    await settle(klock)
    # One batch: [statistics, release]. The statistics reply is resolved first, so this task
    # runs before the waiter sees its grant, and cancels it with the grant already sent.
    release = asyncio.create_task(held.release())
    stats = await klock.statistics()
    assert stats.requests_waiting == 1  # answered before the release in the same batch
    assert waiter.done() is False
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await release
    stats = await settle(klock)
    assert stats.grants == 2  # the waiter was granted ...
    assert stats.releases == 2  # ... and its lease was given back
    assert await klock.leases() == []
    scheduler_of(klock).check_invariants()


async def test_wait_false_queues_nothing(klock: Klock) -> None:
    """acquire(wait=False) raises LeaseWouldWait instead of queueing; DIE still dies."""
    old, young, newest = await agents(klock, "old", "young", "newest")
    await young.acquire("/f", "MUTATES")
    with pytest.raises(LeaseWouldWait) as would_wait:
        await old.acquire("/f", "MUTATES", wait=False)
    assert would_wait.value.blocker_agent_id == "young"
    assert would_wait.value.wait_time > 0
    with pytest.raises(LeaseDied):
        await newest.acquire("/f", "MUTATES", wait=False)
    stats = await klock.statistics()
    assert stats.requests_waiting == 0
    assert stats.waits == 0
    assert stats.leases_active == 1


# --- bad input changes nothing --------------------------------------------------------------


async def _snapshot(klock: Klock) -> tuple[list[LeaseInfo], dict[str, Any]]:
    stats = dataclasses.asdict(await klock.statistics())
    del stats["batches"], stats["messages"]
    return await klock.leases(), stats


@pytest.mark.parametrize(
    ("call", "error"),
    [
        pytest.param(
            lambda s: s.acquire("ghost", "s", [Intent.of("/f", "MUTATES")], ttl=1),
            UnknownAgentError,
            id="unknown-agent",
        ),
        pytest.param(
            lambda s: s.acquire("a", "s", [Intent.of("/f", "MUTATES")], ttl=0),
            InvalidTTLError,
            id="ttl-zero",
        ),
        pytest.param(
            lambda s: s.acquire("a", "s", [Intent.of("/f", "MUTATES")], ttl=-1),
            InvalidTTLError,
            id="ttl-negative",
        ),
        pytest.param(
            lambda s: s.acquire("a", "s", [Intent.of("/f", "MUTATES")], ttl=1, timeout=-1),
            InvalidRequestError,
            id="timeout-negative",
        ),
        pytest.param(
            lambda s: s.acquire("a", "s", [], ttl=1), InvalidResourceError, id="no-intents"
        ),
        pytest.param(
            lambda s: s.release("no-such-lease", "a"), LeaseNotFoundError, id="release-unknown"
        ),
        pytest.param(lambda s: s.revoke("no-such-lease"), LeaseNotFoundError, id="revoke-unknown"),
        pytest.param(
            lambda s: s.wait_ended("no-such", None), LeaseNotFoundError, id="watch-unknown"
        ),
        pytest.param(
            lambda s: s.register_agent("", None), InvalidRequestError, id="empty-agent-id"
        ),
        pytest.param(lambda s: s.register_agent("x", "1"), InvalidRequestError, id="bad-priority"),
        pytest.param(
            lambda s: s.register_agent("x", True), InvalidRequestError, id="bool-priority"
        ),
        pytest.param(lambda s: s.register_agent("a", 99), AgentExistsError, id="agent-exists"),
        pytest.param(lambda s: s.evict("ghost"), UnknownAgentError, id="evict-unknown"),
        pytest.param(lambda s: s.clock_read("/f", "ghost"), UnknownAgentError, id="clock-unknown"),
    ],
)
async def test_bad_input_changes_nothing(klock: Klock, call: Any, error: type[Exception]) -> None:
    """Each bad request raises its typed error and leaves the state as it was."""
    a, b = await agents(klock, "a", "b")
    await a.acquire("/f", "MUTATES")
    await b.acquire("/g", "CONSUMES")
    before = await _snapshot(klock)
    with pytest.raises(error):
        await call(klock.backend)
    assert await _snapshot(klock) == before


async def test_facade_bad_input(klock: Klock) -> None:
    """The facade validates predicates, resources and ttl before anything is sent."""
    (a,) = await agents(klock, "a")
    before = await _snapshot(klock)
    with pytest.raises(InvalidPredicateError):
        await a.acquire("/f", "MUTATE")
    with pytest.raises(InvalidResourceError):
        await a.acquire("FIEL:/f", "MUTATES")
    with pytest.raises(InvalidResourceError):
        await a.acquire("   ", "MUTATES")
    with pytest.raises(InvalidTTLError):
        await a.acquire("/f", "MUTATES", ttl=float("nan"))
    with pytest.raises(InvalidResourceError):
        await a.acquire_many([])
    with pytest.raises(UnknownAgentError):
        await klock.agent("ghost")
    assert await _snapshot(klock) == before


async def test_release_twice_and_someone_elses(klock: Klock) -> None:
    """Releasing twice or releasing another agent's lease fails and changes nothing."""
    a, b = await agents(klock, "a", "b")
    mine = await a.acquire("/f", "MUTATES")
    theirs = await b.acquire("/g", "MUTATES")
    before = await _snapshot(klock)
    with pytest.raises(NotLeaseOwnerError):
        await klock.backend.release(theirs.id, "a")
    assert await _snapshot(klock) == before
    await mine.release()
    after_release = await _snapshot(klock)
    with pytest.raises(LeaseNotFoundError):
        await mine.release()
    with pytest.raises(LeaseNotFoundError):
        await klock.backend.release(mine.id, "a")
    assert await _snapshot(klock) == after_release


# --- one-way releases ------------------------------------------------------------------------


async def test_release_is_one_way_and_every_later_message_sees_it(klock: Klock) -> None:
    """release() returns before the actor runs; whatever is asked afterwards finds it done."""
    old, young = await agents(klock, "old", "young")
    lease = await young.acquire("/f", "MUTATES")
    before = await klock.statistics()
    await lease.release()
    assert lease.state is LeaseState.RELEASED
    assert lease.info.state is LeaseState.RELEASED  # the final snapshot, built on demand
    assert (lease.info.id, lease.info.token) == (lease.id, lease.token)
    assert await klock.leases() == []  # posted after the release: FIFO
    assert (await klock.statistics()).releases == before.releases + 1
    again = await old.acquire("/f", "MUTATES", wait=False)  # free at once, nothing queued
    await again.release()


async def test_release_nowait_vouches_only_for_active_leases_it_granted(klock: Klock) -> None:
    """Unknown, someone else's or already ended leases are refused; a refusal changes nothing."""
    backend = scheduler_of(klock)
    a, b = await agents(klock, "a", "b")
    lease = await a.acquire("/f", "MUTATES")
    before = await _snapshot(klock)
    assert not backend.release_nowait("no-such-lease", "a")
    assert not backend.release_nowait(lease.id, "b")
    assert await _snapshot(klock) == before
    await klock.revoke(lease.id)
    assert not backend.release_nowait(lease.id, "a")  # the actor ended it: the holder must learn
    with pytest.raises(LeaseLostError):
        await lease.release()
    assert lease.state is LeaseState.REVOKED
    second = await b.acquire("/f", "MUTATES")
    assert backend.release_nowait(second.id, "b")
    assert not backend.release_nowait(second.id, "b")  # once only
    with pytest.raises(LeaseNotFoundError):
        await backend.release(second.id, "b")  # processed after the one-way release


async def test_an_expired_lease_is_lost_not_released(klock: Klock) -> None:
    """Once the actor has expired a lease, release() says it was lost, not released."""
    (agent,) = await agents(klock, "a")
    lease = await agent.acquire("/f", "MUTATES", ttl=0.01)
    await klock.backend.wait_ended(lease.id, None)
    assert not scheduler_of(klock).release_nowait(lease.id, "a")
    with pytest.raises(LeaseLostError):
        await lease.release()
    assert lease.state is LeaseState.EXPIRED
    assert lease.info.state is LeaseState.EXPIRED


# --- expiry bookkeeping and the resource index ------------------------------------------------


async def test_a_shorter_ttl_granted_later_expires_first(klock: Klock) -> None:
    """A deadline earlier than the armed timer re-arms it; a later one waits behind it."""
    a, b = await agents(klock, "a", "b")
    long = await a.acquire("/long", "MUTATES", ttl=3_600)
    short = await b.acquire("/short", "MUTATES", ttl=0.01)
    ended = await klock.backend.wait_ended(short.id, None)
    assert ended is not None and ended.state is LeaseState.EXPIRED
    assert [i.id for i in await klock.leases()] == [long.id]


async def test_released_leases_leave_no_expiry_entries_behind(klock: Klock) -> None:
    """Many grants behind one armed timer: the entries of released leases are swept."""
    (agent,) = await agents(klock, "a")
    first = await agent.acquire("/first", "MUTATES", ttl=0.2)  # arms the timer
    for _ in range(3 * _LATER_SWEEP):
        lease = await agent.acquire("/f", "MUTATES", ttl=3_600)
        await lease.release()
    await settle(klock)
    scheduler = scheduler_of(klock)
    scheduler.check_invariants()
    assert len(scheduler._table._later) <= _LATER_SWEEP + 1  # white box: the list is bounded
    ended = await klock.backend.wait_ended(first.id, None)
    assert ended is not None and ended.state is LeaseState.EXPIRED


async def test_idle_slots_are_bounded_and_keep_the_hierarchy(klock: Klock) -> None:
    """Past the cap, emptied slots are dropped; directory and file leases still conflict."""
    old, young = await agents(klock, "old", "young")
    for i in range(_IDLE_SLOTS + 50):
        lease = await young.acquire(f"/d{i % 7}/f{i}.py", "MUTATES")
        await lease.release()
    await settle(klock)
    scheduler_of(klock).check_invariants()
    directory = await young.acquire("/d3", "MUTATES")
    with pytest.raises(LeaseWouldWait):
        await old.acquire("/d3/f3.py", "MUTATES", wait=False)
    await directory.release()
    file = await young.acquire("/d3/f3.py", "MUTATES")
    with pytest.raises(LeaseWouldWait):
        await old.acquire("/d3", "MUTATES", wait=False)
    await file.release()
    assert (await old.acquire("/d3", "MUTATES", wait=False)).agent_id == "old"


async def test_register_agent(klock: Klock) -> None:
    """Ages follow registration order; re-registering returns the same age."""
    a, b = await agents(klock, "a", "b")
    assert a.ts < b.ts
    again = await klock.register_agent("a")
    assert again.ts == a.ts
    assert (await klock.register_agent("a", priority=a.ts)).ts == a.ts
    vip = await klock.register_agent("vip", priority=-10)
    assert vip.ts == -10
    c = await klock.register_agent("c")
    assert c.ts == b.ts + 1
    assert {(i.agent_id, i.ts) for i in await klock.agents()} == {
        ("a", a.ts),
        ("b", b.ts),
        ("vip", -10),
        ("c", c.ts),
    }


# --- shutdown -------------------------------------------------------------------------------


async def test_shutdown_fails_pending_requests_and_leaves_no_task() -> None:
    """Leaving Klock() fails waiting requests with KernelClosedError; no task is left behind."""
    before = asyncio.all_tasks()
    async with Klock() as klock:
        old, young = await agents(klock, "old", "young")
        held = await young.acquire("/f", "MUTATES")
        waiter = asyncio.create_task(old.acquire("/f", "MUTATES"))
        watcher = asyncio.create_task(klock.backend.wait_ended(held.id, None))
        assert (await settle(klock)).requests_waiting == 1
    with pytest.raises(KernelClosedError):
        await waiter
    with pytest.raises(KernelClosedError):
        await watcher
    assert asyncio.all_tasks() == before
    with pytest.raises(KernelClosedError):
        await klock.statistics()
    with pytest.raises(KernelClosedError):
        await old.acquire("/f", "MUTATES")


async def test_unstarted_kernel_raises() -> None:
    """Using a kernel outside its async with raises KernelClosedError."""
    klock = Klock()
    with pytest.raises(KernelClosedError):
        await klock.statistics()
    scheduler = Scheduler()
    await scheduler.start()
    await scheduler.aclose()
    await scheduler.aclose()  # idempotent
    with pytest.raises(KernelClosedError):
        await scheduler.leases()


# --- logging --------------------------------------------------------------------------------

_LEASE_FIELDS = {"agent", "session", "resource", "predicate", "token", "lease"}


async def test_every_state_change_is_logged(klock: Klock) -> None:
    """Grants, waits, deaths, releases, expiries and revocations are structlog events."""
    old, young, newest = await agents(klock, "old", "young", "newest")
    with structlog.testing.capture_logs() as logs:
        held = await young.acquire("/f", "MUTATES")
        waiter = asyncio.create_task(old.acquire("/f", "MUTATES"))
        await settle(klock)
        with pytest.raises(LeaseDied):
            await newest.acquire("/f", "CONSUMES", wait=False)
        await held.release()
        granted = await waiter
        await klock.revoke(granted.id)
        short = await young.acquire("/g", "MUTATES", ttl=0.01)
        await klock.backend.wait_ended(short.id, None)
        blocker = await young.acquire("/h", "MUTATES")
        with pytest.raises(AcquireTimeoutError):
            await old.acquire("/h", "CONSUMES", timeout=0.01)
        await blocker.release()
        await settle(klock)  # the withdraw and the release are one-way messages
    by_event: dict[str, list[dict[str, Any]]] = {}
    for entry in logs:
        by_event.setdefault(entry["event"], []).append(entry)
    for event in ("lease.granted", "lease.released", "lease.revoked", "lease.expired"):
        for entry in by_event[event]:
            assert entry.keys() >= _LEASE_FIELDS, entry
    assert [e["token"] for e in by_event["lease.granted"]] == [
        held.token,
        granted.token,
        short.token,
        blocker.token,
    ]
    assert by_event["lease.released"][0]["agent"] == "young"
    assert by_event["lease.released"][0]["resource"] == "FILE:/f"
    assert by_event["lease.released"][0]["predicate"] == "MUTATES"
    assert by_event["lease.released"][0]["session"] == held.session_id
    assert by_event["lease.revoked"][0]["lease"] == granted.id
    assert by_event["lease.expired"][0]["lease"] == short.id
    first_wait, second_wait = by_event["request.queued"]
    assert (first_wait["agent"], first_wait["resource"]) == ("old", "FILE:/f")
    assert (first_wait["predicate"], first_wait["blocker"]) == ("MUTATES", "young")
    assert first_wait["session"] == granted.session_id
    assert (second_wait["resource"], second_wait["predicate"]) == ("FILE:/h", "CONSUMES")
    (withdrawn,) = by_event["request.withdrawn"]
    assert (withdrawn["agent"], withdrawn["resource"], withdrawn["predicate"]) == (
        "old",
        "FILE:/h",
        "CONSUMES",
    )
    assert withdrawn["session"] == second_wait["session"]
    (died,) = by_event["request.died"]
    assert died["agent"] == "newest"
    assert died["resource"] == "FILE:/f"
    assert died["predicate"] == "CONSUMES"
    assert died["blocker"] == "old"
    assert all(e["log_level"] == "info" for e in by_event["lease.granted"])


async def test_statistics_count_events(klock: Klock) -> None:
    """Statistics are a frozen snapshot of the counters."""
    old, young = await agents(klock, "old", "young")
    held = await young.acquire("/f", "MUTATES")
    waiter = asyncio.create_task(old.acquire("/f", "MUTATES"))
    stats = await settle(klock)
    assert (stats.agents, stats.leases_active, stats.requests_waiting) == (2, 1, 1)
    assert (stats.grants, stats.waits, stats.deaths) == (1, 1, 0)
    await held.release()
    await waiter
    later = await klock.statistics()
    assert (later.grants, later.releases, later.requests_waiting) == (2, 1, 0)
    assert stats.grants == 1  # the earlier snapshot did not change
    assert later.batches >= 1 and later.messages >= later.batches


async def test_expires_at_is_the_deadline_the_kernel_enforces() -> None:
    """A lease ends exactly at its advertised expires_at: not a microsecond before, and at it."""
    now = [1_000.0]
    async with Klock(backend=Scheduler(clock=lambda: now[0])) as klock:
        holder, other = await agents(klock, "holder", "other")
        lease = await holder.acquire("/f", "MUTATES", ttl=5)
        assert lease.expires_at == 1_005.0
        waiter = asyncio.create_task(other.acquire("/f", "MUTATES"))
        now[0] = lease.expires_at - 1e-6
        stats = await settle(klock)  # any message runs the kernel at the clock's time
        assert (stats.leases_active, stats.expiries) == (1, 0) and not waiter.done()
        now[0] = lease.expires_at
        assert (await settle(klock)).expiries == 1
        taken = await waiter
        assert taken.token > lease.token
        assert taken.expires_at == lease.expires_at + taken.info.ttl  # granted at the deadline


async def test_one_agent_is_looked_up_without_listing_them_all() -> None:
    """Scheduler.agent answers a registered agent's id and age, and None for an unknown id."""
    async with Klock() as klock:
        backend = klock.backend
        assert isinstance(backend, Scheduler)
        await klock.register_agent("first")
        await klock.register_agent("second")
        assert await backend.agent("second") == AgentInfo("second", 2)
        assert await backend.agent("nobody") is None
