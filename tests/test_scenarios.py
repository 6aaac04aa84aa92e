"""Behaviour scenarios written against the ``Klock`` facade only.

They run against every kernel the ``kernel_factory`` fixture offers (see conftest.py), so they
use nothing but the public facade and the transport-neutral backend interface. Ordering uses
the ``settle`` fixture (statistics answered after every request sent so far was decided),
never sleeping; sleeps below only simulate work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import anyio
import pytest

from klock_async import (
    AcquireTimeoutError,
    EvictedError,
    InvalidPredicateError,
    InvalidResourceError,
    InvalidTTLError,
    Klock,
    LeaseDied,
    LeaseLostError,
    LeaseNotFoundError,
    LeaseState,
    LeaseWouldWait,
    NotLeaseOwnerError,
    RetryPolicy,
    Statistics,
    UnknownAgentError,
)

KernelFactory = Callable[[], contextlib.AbstractAsyncContextManager[Klock]]
Settle = Callable[[Klock], Awaitable[Statistics]]


async def test_trace(kernel_factory: KernelFactory, settle: Settle) -> None:
    """Younger holds; older waits; a newer agent that may not wait dies; younger releases;
    older is granted."""
    async with kernel_factory() as klock:
        older = await klock.register_agent("planner", priority=1)
        younger = await klock.register_agent("coder", priority=2)
        newer = await klock.register_agent("reviewer", priority=3)
        held = await younger.acquire("FILE:/src/auth.js", "MUTATES", ttl=30)

        waiter = asyncio.create_task(older.acquire("src/auth.js", "MUTATES"))
        assert (await settle(klock)).requests_waiting == 1
        assert not waiter.done()

        with pytest.raises(LeaseDied) as died:  # a call that may not wait gets the verdict
            await newer.acquire("src/auth.js", "CONSUMES", wait=False)
        assert died.value.blocker_agent_id == "planner"
        assert died.value.resource == "FILE:/src/auth.js"

        await held.release()
        lease = await waiter
        assert (lease.agent_id, str(lease.resource)) == ("planner", "FILE:/src/auth.js")
        assert lease.token > held.token
        await lease.release()
        assert await klock.leases() == []


async def test_atomic_multi_acquire(kernel_factory: KernelFactory, settle: Settle) -> None:
    """Several intents are granted together or not at all."""
    async with kernel_factory() as klock:
        old = await klock.register_agent("old", priority=1)
        young = await klock.register_agent("young", priority=2)
        held = await old.acquire("/b", "MUTATES")
        with pytest.raises(LeaseDied):
            await young.acquire_many([("/a", "MUTATES"), ("/b", "MUTATES")], wait=False)
        assert [i.id for i in await klock.leases()] == [held.id]

        blocker = await young.acquire("/c", "MUTATES")
        waiter = asyncio.create_task(old.acquire_many([("/a", "MUTATES"), ("/c", "CONSUMES")]))
        assert (await settle(klock)).requests_waiting == 1
        assert {i.id for i in await klock.leases()} == {held.id, blocker.id}
        await blocker.release()
        leases = await waiter
        assert [str(lease.resource) for lease in leases] == ["FILE:/a", "FILE:/c"]
        assert len({lease.session_id for lease in leases}) == 1


async def test_session_release(kernel_factory: KernelFactory, settle: Settle) -> None:
    """A session gives back all it holds on exit, also when LeaseDied escapes it."""
    async with kernel_factory() as klock:
        old = await klock.register_agent("old")
        young = await klock.register_agent("young")
        async with young.session() as session:
            await session.acquire("/a", "MUTATES")
            await session.acquire("/a/b.txt", "DELETES")  # reentrant: same session
            assert len(await klock.leases()) == 2
        assert await klock.leases() == []

        blocker = await old.acquire("/z", "MUTATES")
        with pytest.raises(LeaseDied):
            async with young.session() as session:
                await session.acquire("/a", "MUTATES")
                await session.acquire("/z", "MUTATES")
        assert [i.id for i in await klock.leases()] == [blocker.id]


async def test_heartbeat(kernel_factory: KernelFactory) -> None:
    """A lease block keeps its lease past the ttl; an explicit heartbeat pushes the expiry."""
    async with kernel_factory() as klock:
        agent = await klock.register_agent("coder")
        async with agent.lease("/f", "MUTATES", ttl=0.9) as lease:
            await anyio.sleep(2.0)  # simulated work, longer than the ttl
            assert not lease.lost
        assert lease.state is LeaseState.RELEASED
        assert (await klock.statistics()).expiries == 0

        lease = await agent.acquire("/g", "MUTATES", ttl=5)
        first = lease.expires_at
        await lease.heartbeat(ttl=60)
        assert lease.expires_at > first
        (info,) = await klock.leases()
        assert info.expires_at == lease.expires_at


async def test_lost_lease(kernel_factory: KernelFactory) -> None:
    """A lease revoked while held is reported lost, and the block says so on exit."""
    async with kernel_factory() as klock:
        agent = await klock.register_agent("coder")
        with pytest.raises(LeaseLostError):
            async with agent.lease("/f", "MUTATES") as lease:
                await klock.revoke(lease.id)
                assert await lease.wait_lost() is LeaseState.REVOKED


async def test_timeout(kernel_factory: KernelFactory, settle: Settle) -> None:
    """An acquire that runs out of time holds nothing and leaves nothing queued."""
    async with kernel_factory() as klock:
        old = await klock.register_agent("old", priority=1)
        young = await klock.register_agent("young", priority=2)
        held = await young.acquire("/f", "MUTATES")
        with pytest.raises(AcquireTimeoutError):
            await old.acquire("/f", "MUTATES", timeout=0.1)
        assert (await settle(klock)).requests_waiting == 0
        await held.release()
        assert await klock.leases() == []
        free = await old.acquire("/free", "MUTATES", timeout=0)  # a free resource: granted
        await free.release()
        await young.acquire("/g", "MUTATES")
        with pytest.raises(LeaseWouldWait):
            await old.acquire("/g", "MUTATES", wait=False)
        assert (await settle(klock)).requests_waiting == 0


async def test_decorator_read_modify_write(kernel_factory: KernelFactory) -> None:
    """20 concurrent protected read-modify-write calls on one file lose no update."""
    async with kernel_factory() as klock:
        names = [f"agent-{i}" for i in range(20)]
        for name in names:
            await klock.register_agent(name)
        store = {"/notes.md": 0}

        @klock.protected(
            agent=lambda agent, **_: agent,
            resource=lambda path, **_: path,
            predicate="MUTATES",
            retry=RetryPolicy(base_delay=0.001, max_delay=0.05),
        )
        async def append(agent: str, path: str) -> None:
            value = store[path]
            await asyncio.sleep(0)  # think time between the read and the write
            store[path] = value + 1

        await asyncio.gather(*(append(name, "/notes.md") for name in names))
        assert store["/notes.md"] == 20
        assert await klock.leases() == []


async def test_errors(kernel_factory: KernelFactory) -> None:
    """Bad input gets a typed error and changes nothing."""
    async with kernel_factory() as klock:
        a = await klock.register_agent("a")
        b = await klock.register_agent("b")
        mine = await a.acquire("/f", "MUTATES")
        theirs = await b.acquire("/g", "CONSUMES")
        before = await klock.leases()
        with pytest.raises(InvalidPredicateError):
            await a.acquire("/x", "MUTATE")
        with pytest.raises(InvalidResourceError):
            await a.acquire("FIEL:/x", "MUTATES")
        with pytest.raises(InvalidResourceError):
            await a.acquire("", "MUTATES")
        with pytest.raises(InvalidTTLError):
            await a.acquire("/x", "MUTATES", ttl=0)
        with pytest.raises(UnknownAgentError):
            await klock.agent("ghost")
        with pytest.raises(NotLeaseOwnerError):
            await klock.backend.release(theirs.id, "a")
        with pytest.raises(LeaseNotFoundError):
            await klock.revoke("no-such-lease")
        assert await klock.leases() == before
        await mine.release()
        with pytest.raises(LeaseNotFoundError):
            await mine.release()
        assert [i.id for i in await klock.leases()] == [theirs.id]


async def test_eviction_fails_waiting_requests(
    kernel_factory: KernelFactory, settle: Settle
) -> None:
    """Evicting an agent revokes its leases and fails what it still waits for."""
    async with kernel_factory() as klock:
        old = await klock.register_agent("old")
        young = await klock.register_agent("young")
        await old.acquire("/held", "MUTATES")
        held = await young.acquire("/contended", "MUTATES")
        waiter = asyncio.create_task(old.acquire("/contended", "MUTATES"))
        assert (await settle(klock)).requests_waiting == 1
        assert await klock.evict("old") == 1
        with pytest.raises(EvictedError):
            await waiter
        await held.release()
        assert await klock.leases() == []


async def test_waiters_show_the_wait_for_graph(
    kernel_factory: KernelFactory, settle: Settle
) -> None:
    """klock.waiters() lists each queued request with the lease or request it waits for."""
    async with kernel_factory() as klock:
        holder = await klock.register_agent("holder")
        first = await klock.register_agent("first")
        second = await klock.register_agent("second")
        held = await holder.acquire("/w/f", "MUTATES")
        a = asyncio.create_task(first.acquire("/w/f", "MUTATES"))
        await settle(klock)
        b = asyncio.create_task(second.acquire_many([("/w/f", "CONSUMES"), ("/w/g", "MUTATES")]))
        assert (await settle(klock)).requests_waiting == 2
        older, younger = await klock.waiters()
        assert (older.agent_id, younger.agent_id) == ("first", "second")
        assert older.age < younger.age
        assert [(e.kind, e.id, e.agent_id) for e in older.waits_for] == [
            ("lease", held.id, "holder")
        ]
        assert [(e.kind, e.agent_id) for e in younger.waits_for] == [
            ("lease", "holder"),
            ("request", "first"),
        ]
        assert younger.waits_for[1].id == older.request_id
        assert [str(i.resource) for i in younger.intents] == ["FILE:/w/f", "FILE:/w/g"]
        await held.release()
        await (await a).release()
        assert len(await b) == 2
        assert await klock.waiters() == []
