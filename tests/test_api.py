"""Tests for klock_async.api: leases, lease blocks, sessions, the protected decorator, retries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import pytest
import structlog.testing

from klock_async import (
    InvalidPredicateError,
    InvalidRequestError,
    InvalidResourceError,
    InvalidTTLError,
    Klock,
    LeaseDied,
    LeaseLostError,
    LeaseNotFoundError,
    LeaseState,
    Predicate,
    Resource,
    RetryPolicy,
    Statistics,
    UnknownAgentError,
)
from klock_async.scheduler import Scheduler

FAST = RetryPolicy(base_delay=0.001, max_delay=0.02)


async def settle(klock: Klock) -> Statistics:
    """Statistics answered after every ready task has posted its message (FIFO scheduling)."""
    return await asyncio.create_task(klock.statistics())


def check(klock: Klock) -> None:
    backend = klock.backend
    assert isinstance(backend, Scheduler)
    backend.check_invariants()


# --- Lease ----------------------------------------------------------------------------------


async def test_lease_fields() -> None:
    """A lease carries an unguessable id, its owner, intent, fencing token and expiry."""
    async with Klock() as klock:
        agent = await klock.register_agent("coder")
        before = time.time()
        lease = await agent.acquire("src/auth.js", "mutates", ttl=30)
        after = time.time()
        assert lease.agent_id == "coder"
        assert lease.resource == Resource.parse("FILE:/src/auth.js")
        assert lease.predicate is Predicate.MUTATES
        assert lease.state is LeaseState.ACTIVE
        assert not lease.lost
        assert isinstance(lease.token, int) and lease.token >= 1
        assert before + 30 <= lease.expires_at <= after + 30
        assert lease.session_id
        assert "MUTATES FILE:/src/auth.js" in repr(lease)
        ids = {lease.id}
        for i in range(200):
            other = await agent.acquire(f"/f{i}", "CONSUMES")
            ids.add(other.id)
        assert len(ids) == 201
        assert all(len(i) >= 20 for i in ids)  # >= 120 random bits, URL-safe
        assert all(i.replace("-", "").replace("_", "").isalnum() for i in ids)
        await lease.release()
        assert lease.state is LeaseState.RELEASED


async def test_lease_release_twice() -> None:
    """Releasing a lease handle twice raises LeaseNotFoundError."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        lease = await agent.acquire("/f", "MUTATES")
        await lease.release()
        with pytest.raises(LeaseNotFoundError):
            await lease.release()


async def test_lease_handle_learns_how_it_was_lost() -> None:
    """Releasing or heartbeating a lost lease raises LeaseLostError with the real state."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        revoked = await agent.acquire("/r", "MUTATES")
        await klock.revoke(revoked.id)
        with pytest.raises(LeaseLostError) as lost:
            await revoked.release()
        assert lost.value.state == "REVOKED"
        assert revoked.state is LeaseState.REVOKED
        expiring = await agent.acquire("/e", "MUTATES", ttl=0.01)
        assert await klock.backend.wait_ended(expiring.id, None) is not None
        with pytest.raises(LeaseLostError) as lost:
            await expiring.heartbeat()
        assert lost.value.state == "EXPIRED"
        with pytest.raises(LeaseLostError):
            await expiring.release()


async def test_klock_validates_default_ttl() -> None:
    """A bad default ttl is refused when the facade is built."""
    with pytest.raises(InvalidTTLError):
        Klock(default_ttl=0)
    async with Klock(default_ttl=5) as klock:
        lease = await (await klock.register_agent("a")).acquire("/f", "MUTATES")
        assert lease.info.ttl == 5


# --- lease blocks ---------------------------------------------------------------------------


async def test_lease_block_heartbeats_by_itself() -> None:
    """A lease block outlives its ttl while the body works: the keeper heartbeats it."""
    async with Klock() as klock:
        agent = await klock.register_agent("coder")
        async with agent.lease("/f", "MUTATES", ttl=0.6) as lease:
            first_expiry = lease.expires_at
            await anyio.sleep(1.5)  # simulated work, 2.5 times the ttl
            assert lease.state is LeaseState.ACTIVE
            assert [i.id for i in await klock.leases()] == [lease.id]
        assert lease.state is LeaseState.RELEASED
        assert lease.expires_at > first_expiry
        stats = await klock.statistics()
        assert (stats.expiries, stats.releases, stats.leases_active) == (0, 1, 0)


async def test_lease_blocks_of_several_ttls_share_the_keeper_schedule() -> None:
    """Blocks of different ttls open together are each heartbeated; one that left early is not."""
    async with Klock() as klock:
        agent = await klock.register_agent("coder")
        async with agent.lease("/short", "MUTATES", ttl=0.6):
            pass  # left long before its keeper was due: nothing starts for it
        async with (
            agent.lease("/a", "MUTATES", ttl=0.6) as a,
            agent.lease("/b", "MUTATES", ttl=0.9) as b,
        ):
            await anyio.sleep(1.8)  # simulated work, twice the longer ttl
            assert a.state is LeaseState.ACTIVE and b.state is LeaseState.ACTIVE
        stats = await klock.statistics()
        assert (stats.expiries, stats.releases, stats.leases_active) == (0, 3, 0)


async def test_lease_block_detects_revocation() -> None:
    """A revoked lease is reported by wait_lost, and leaving the block raises LeaseLostError."""
    async with Klock() as klock:
        agent = await klock.register_agent("coder")
        with pytest.raises(LeaseLostError) as lost:
            async with agent.lease("/f", "MUTATES") as lease:
                await klock.revoke(lease.id)
                assert await lease.wait_lost() is LeaseState.REVOKED
                assert lease.lost
        assert lost.value.state == "REVOKED"
        assert lost.value.lease_id == lease.id
        with pytest.raises(LeaseLostError):
            await lease.heartbeat()
        assert await klock.leases() == []


async def test_lease_block_detects_expiry_without_heartbeat() -> None:
    """With heartbeat off, a lease outliving its ttl is lost and the block says so."""
    async with Klock() as klock:
        agent = await klock.register_agent("coder")
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(LeaseLostError, match="expired"),
        ):
            async with agent.lease("/f", "MUTATES", ttl=0.05, heartbeat=False) as lease:
                assert await lease.wait_lost() is LeaseState.EXPIRED
        assert [e["state"] for e in logs if e["event"] == "lease.lost"] == ["EXPIRED"]


async def test_lease_block_body_error_wins_over_loss() -> None:
    """When the body raises, that error propagates, not the loss."""
    async with Klock() as klock:
        agent = await klock.register_agent("coder")
        with pytest.raises(KeyError):
            async with agent.lease("/f", "MUTATES") as lease:
                await klock.revoke(lease.id)
                raise KeyError("body")
        assert await klock.leases() == []


async def test_lease_many_block() -> None:
    """A block over several intents holds them all and releases them all."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        block = agent.lease_many([("/a", "MUTATES"), ("SYMBOL:auth.login", "RENAMES")])
        async with block as first:
            assert [str(lease.resource) for lease in block.leases] == [
                "FILE:/a",
                "SYMBOL:auth.login",
            ]
            assert first is block.leases[0]
            assert len(await klock.leases()) == 2
        assert await klock.leases() == []


async def test_lease_block_validates_early() -> None:
    """A bad intent or ttl raises when the block is built, before anything is sent."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        with pytest.raises(InvalidPredicateError):
            agent.lease("/f", "MUTATE")
        with pytest.raises(InvalidTTLError):
            agent.lease("/f", "MUTATES", ttl=-1)
        with pytest.raises(InvalidResourceError):
            agent.lease("", "MUTATES")


async def test_lease_block_cancelled_by_an_anyio_scope_gives_everything_back() -> None:
    """Leaving a cancelled anyio scope releases every lease of the block at once."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        with anyio.move_on_after(0.05) as scope:
            async with agent.lease_many([("/x", "MUTATES"), ("/y", "MUTATES")]):
                await anyio.sleep(5)  # simulated work, cut short by the scope
        assert scope.cancelled_caught
        assert await klock.leases() == []
        with anyio.move_on_after(0.05):
            async with agent.session() as session:
                await session.acquire("/z", "MUTATES")
                await anyio.sleep(5)  # simulated work, cut short by the scope
        assert await klock.leases() == []
        check(klock)


async def test_lease_block_cancelled_by_asyncio_timeout() -> None:
    """asyncio.timeout around a block raises TimeoutError and leaves nothing held."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), agent.lease("/w", "MUTATES"):
                await asyncio.sleep(5)  # simulated work, cut short by the timeout
        assert await klock.leases() == []


async def test_cancelled_task_inside_a_block_releases() -> None:
    """Cancelling a task that holds a lease block releases its leases; nothing is left."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        entered = asyncio.Event()

        async def work() -> None:
            async with agent.lease_many([("/p", "MUTATES"), ("/q", "CONSUMES")]):
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(work())
        await entered.wait()
        assert len(await klock.leases()) == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await klock.leases() == []


# --- sessions -------------------------------------------------------------------------------


async def test_session_releases_everything_on_exit() -> None:
    """Leaving a session releases every lease taken through it."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        other = await agent.acquire("/other", "MUTATES")
        async with agent.session() as session:
            await session.acquire("/a", "MUTATES")
            await session.acquire_many([("/b", "CONSUMES"), ("/c", "DEPENDS_ON")])
            assert len(await klock.leases()) == 4
        assert [i.id for i in await klock.leases()] == [other.id]


async def test_session_releases_everything_when_lease_died_escapes() -> None:
    """A session that dies gives back what it held, so the older waiter can proceed."""
    async with Klock() as klock:
        old = await klock.register_agent("old")
        young = await klock.register_agent("young")
        blocker = await old.acquire("/b", "MUTATES")
        old_waits: asyncio.Task[Any] | None = None
        with pytest.raises(LeaseDied) as died:
            async with young.session() as session:
                await session.acquire("/a", "MUTATES")
                old_waits = asyncio.create_task(old.acquire("/a", "MUTATES"))
                assert (await settle(klock)).requests_waiting == 1
                await session.acquire("/b", "MUTATES")
        assert died.value.blocker_lease_id == blocker.id
        assert old_waits is not None
        assert (await old_waits).agent_id == "old"
        assert {i.agent_id for i in await klock.leases()} == {"old"}
        check(klock)


async def test_session_id_and_isolation() -> None:
    """A session has an id of its own or the one given, and validates its isolation."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        assert agent.session().id != agent.session().id
        session = agent.session(session_id="task-42", isolation="serializable")
        assert session.id == "task-42"
        assert session.agent_id == "a"
        assert session.isolation.value == "SERIALIZABLE"
        with pytest.raises(ValueError):
            agent.session(isolation="SNAPSHOTTED")


# --- agents ---------------------------------------------------------------------------------


async def test_agent_handles() -> None:
    """klock.agent finds agents registered through any handle; unknown ids raise."""
    async with Klock() as klock:
        await klock.backend.register_agent("direct", None)
        agent = await klock.agent("direct")
        assert agent.id == "direct"
        assert agent.ts == 1
        assert "direct" in repr(agent)
        with pytest.raises(UnknownAgentError):
            await klock.agent("ghost")


# --- protected ------------------------------------------------------------------------------


async def test_protected_takes_the_resource_from_the_arguments() -> None:
    """The decorated call runs under a lease on the resource its arguments name."""
    async with Klock() as klock:
        await klock.register_agent("coder")
        seen: list[list[str]] = []

        @klock.protected(agent="coder", resource=lambda path, **_: path, predicate="MUTATES")
        async def write_file(path: str, content: str) -> str:
            seen.append([f"{i.predicate.value} {i.resource}" for i in await klock.leases()])
            return content.upper()

        assert await write_file("src/./auth.js", content="x") == "X"
        assert seen == [["MUTATES FILE:/src/auth.js"]]
        assert await klock.leases() == []
        assert write_file.__name__ == "write_file"


async def test_protected_several_resources_and_agent_from_arguments() -> None:
    """Resource and agent functions see every argument, defaults included."""
    async with Klock() as klock:
        await klock.register_agent("mover")
        held: list[set[str]] = []

        @klock.protected(
            agent=lambda who, **_: who,
            resource=lambda src, dst, **_: [src, dst],
            predicate="RENAMES",
        )
        async def move(src: str, dst: str, who: str = "mover") -> None:
            held.append({str(i.resource) for i in await klock.leases()})

        await move("/a", "/b")
        assert held == [{"FILE:/a", "FILE:/b"}]
        with pytest.raises(UnknownAgentError):
            await move("/a", "/b", who="ghost")
        with pytest.raises(InvalidResourceError):
            await move("FIEL:/a", "/b")
        assert await klock.leases() == []


async def test_protected_works_on_methods() -> None:
    """A framework tool's async _arun method can be protected; self is an argument."""
    async with Klock() as klock:
        await klock.register_agent("coder")

        class EditTool:
            name = "edit"

            def __init__(self) -> None:
                self.calls: list[str] = []

            @klock.protected(
                agent="coder", resource=lambda self, path, **_: path, predicate="MUTATES"
            )
            async def _arun(self, path: str) -> str:
                held = [str(i.resource) for i in await klock.leases()]
                self.calls.append(path)
                return f"{self.name}:{held}"

        tool = EditTool()
        assert await tool._arun("/src/a.py") == "edit:['FILE:/src/a.py']"
        assert await tool._arun(path="/src/b.py") == "edit:['FILE:/src/b.py']"
        assert tool.calls == ["/src/a.py", "/src/b.py"]


async def test_protected_validates_at_decoration_time() -> None:
    """A bad predicate, resource, ttl or a plain function is refused when decorating."""
    async with Klock() as klock:
        with pytest.raises(InvalidPredicateError):
            klock.protected(agent="a", resource="/f", predicate="MUTATE")
        with pytest.raises(InvalidResourceError):
            klock.protected(agent="a", resource="FIEL:/f", predicate="MUTATES")
        with pytest.raises(InvalidTTLError):
            klock.protected(agent="a", resource="/f", predicate="MUTATES", ttl=0)
        decorate = klock.protected(agent="a", resource="/f", predicate="MUTATES")

        def not_a_coroutine() -> None: ...

        with pytest.raises(InvalidRequestError):
            decorate(not_a_coroutine)  # type: ignore[arg-type]


async def test_protected_call_queues_and_never_dies() -> None:
    """A protected call holds nothing when it asks: it waits in the queue, never dies, then runs."""
    async with Klock() as klock:
        old = await klock.register_agent("old")
        await klock.register_agent("young")
        blocker = await old.acquire("/f", "MUTATES")
        runs: list[str] = []

        @klock.protected(agent="young", resource="/f", predicate="MUTATES", retry=FAST)
        async def edit() -> None:
            runs.append("young")

        with structlog.testing.capture_logs() as logs:
            call = asyncio.create_task(edit())
            stats = await settle(klock)
            assert (stats.requests_waiting, stats.deaths) == (1, 0)
            assert runs == []
            await blocker.release()
            await call
        assert runs == ["young"]
        assert not [e for e in logs if e["event"] == "request.died"]
        (waited,) = [e for e in logs if e["event"] == "request.queued"]
        assert (waited["agent"], waited["blocker"]) == ("young", "old")


async def test_many_protected_calls_on_one_file_all_complete() -> None:
    """A hundred concurrent protected calls on one hot file all run, one at a time, none dies."""
    async with Klock() as klock:
        for i in range(100):
            await klock.register_agent(f"a{i}")
        inside = 0
        most = 0

        @klock.protected(agent=lambda i: f"a{i}", resource="/hot", predicate="MUTATES")
        async def edit(i: int) -> None:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0)  # the tool's work
            inside -= 1

        await asyncio.gather(*(edit(i % 100) for i in range(300)))
        stats = await klock.statistics()
        assert most == 1
        assert stats.deaths == 0 and stats.grants == 300


def test_retry_policy_backoff_is_capped_and_jittered() -> None:
    """Backoff doubles from base_delay, is capped at max_delay and jittered down to half."""
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0)
    for attempt, cap in [(0, 0.1), (1, 0.2), (3, 0.8), (4, 1.0), (50, 1.0)]:
        delays = [policy.backoff(attempt) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)


ReadModifyWrite = Callable[[str, str], Coroutine[Any, Any, None]]


def _counter_tool(store: dict[str, int]) -> ReadModifyWrite:
    async def increment(agent: str, path: str) -> None:
        value = store[path]
        await asyncio.sleep(0)  # think time between the read and the write
        store[path] = value + 1

    return increment


async def test_unprotected_read_modify_write_loses_updates() -> None:
    """Without klock the same 50 concurrent read-modify-write calls lose updates."""
    store = {"/counter": 0}
    increment = _counter_tool(store)
    await asyncio.gather(*(increment(f"agent-{i}", "/counter") for i in range(50)))
    assert store["/counter"] < 50


@pytest.mark.parametrize(
    "agent_of",
    [
        pytest.param(lambda i: f"agent-{i}", id="50-agents"),
        pytest.param(lambda i: "solo", id="one-agent-50-calls"),
    ],
)
async def test_protected_read_modify_write_loses_no_update(agent_of: Callable[[int], str]) -> None:
    """50 concurrent protected read-modify-write calls on one file lose no update."""
    async with Klock() as klock:
        names = [agent_of(i) for i in range(50)]
        for name in dict.fromkeys(names):
            await klock.register_agent(name)
        store = {"/counter": 0}
        increment = klock.protected(
            agent=lambda agent, **_: agent,
            resource=lambda path, **_: path,
            predicate="MUTATES",
            retry=FAST,
        )(_counter_tool(store))
        await asyncio.gather(*(increment(name, "/counter") for name in names))
        assert store["/counter"] == 50
        stats = await klock.statistics()
        assert (stats.grants, stats.releases, stats.leases_active) == (50, 50, 0)
        assert stats.requests_waiting == 0
        check(klock)


async def test_acquire_takes_a_session_by_handle_or_id() -> None:
    """``acquire(session=...)`` joins that session: its intents are reentrant and released
    with it; another agent's session or an empty id is refused."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        other = await klock.register_agent("b")
        async with agent.session() as session:
            first = await agent.acquire("f", "MUTATES", session=session)
            second = await agent.acquire("f", "MUTATES", session=session.id)
            assert first.session_id == second.session_id == session.id
            with pytest.raises(InvalidRequestError):
                await other.acquire("g", "MUTATES", session=session)
            with pytest.raises(InvalidRequestError):
                await agent.acquire("g", "MUTATES", session="")
        assert await klock.leases() == []


async def test_release_after_the_session_released_says_not_found() -> None:
    """Releasing or heartbeating a lease its session already released is LeaseNotFoundError."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        async with agent.session() as session:
            lease = await session.acquire("/f", "MUTATES")
            other = await session.acquire("/g", "MUTATES")
            assert await session.release_all() == 2
            with pytest.raises(LeaseNotFoundError, match="released already"):
                await lease.release()
            with pytest.raises(LeaseNotFoundError, match="released already"):
                await other.heartbeat()
        assert lease.state is LeaseState.RELEASED


@pytest.mark.parametrize(
    "timeout",
    [
        pytest.param("1", id="string"),
        pytest.param(True, id="bool"),
        pytest.param(-1, id="negative"),
    ],
)
async def test_acquire_timeout_must_be_a_number(timeout: object) -> None:
    """A timeout that is not a number of seconds is a typed error, never read as one."""
    async with Klock() as klock:
        agent = await klock.register_agent("a")
        with pytest.raises(InvalidRequestError, match="timeout"):
            await agent.acquire("/f", "MUTATES", timeout=timeout)  # type: ignore[arg-type]
        assert await klock.leases() == []
