"""``Klock.connect(url)``: the facade over a real server, with typed errors and long-polls."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serverutil import ThreadServer, serve_in_thread

from klock_async import (
    AcquireTimeoutError,
    AgentExistsError,
    CausalViolationError,
    InvalidFieldError,
    InvalidPredicateError,
    InvalidRequestError,
    InvalidResourceError,
    InvalidTTLError,
    KernelClosedError,
    Klock,
    LeaseDied,
    LeaseLostError,
    LeaseNotFoundError,
    LeaseState,
    LeaseWouldWait,
    NotLeaseOwnerError,
    TransportError,
    UnknownAgentError,
)
from klock_async.remote import RemoteBackend
from klock_async.server import create_app

_names = itertools.count(1)


def fresh(prefix: str = "agent") -> str:
    return f"{prefix}-{next(_names)}"


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with serve_in_thread() as running:
        yield running


async def test_facade_round_trip(server: ThreadServer) -> None:
    """Agents, leases, sessions and clocks behave through a server as they do embedded."""
    async with Klock.connect(server.url) as klock:
        agent = await klock.register_agent(fresh())
        assert (await klock.agent(agent.id)).ts == agent.ts
        async with agent.lease("src/remote.py", "MUTATES", ttl=30) as lease:
            assert lease.state is LeaseState.ACTIVE
            assert lease.resource.path == "/src/remote.py"
            assert any(info.id == lease.id for info in await klock.leases())
        assert lease.state is LeaseState.RELEASED
        async with agent.session() as session:
            await session.acquire_many([("/rs/a", "MUTATES"), ("/rs/b", "CONSUMES")])
            assert len([i for i in await klock.leases() if i.session_id == session.id]) == 2
        assert not [i for i in await klock.leases() if i.session_id == session.id]
        path = f"/rc/{fresh('file')}"
        await agent.write(path)
        assert await agent.read(path) == (await klock.backend.clock_read(path, agent.id))
        assert f"FILE:{path}" in await klock.tracked_paths()
        stats = await klock.statistics()
        assert stats.grants >= 2


async def test_errors_come_back_typed(server: ThreadServer) -> None:
    """Each kernel error is rebuilt on the client as the same class with the same fields."""
    async with Klock.connect(server.url) as klock:
        old = await klock.register_agent(fresh(), priority=-1_000 - next(_names))
        young = await klock.register_agent(fresh())
        held = await old.acquire("/te/a", "MUTATES")
        with pytest.raises(LeaseDied) as died:
            await young.acquire("/te/a", "CONSUMES", wait=False)
        assert died.value.blocker_agent_id == old.id
        assert died.value.blocker_lease_id == held.id
        assert died.value.resource == "FILE:/te/a"
        mine = await young.acquire("/te/b", "MUTATES")
        with pytest.raises(LeaseWouldWait) as would:
            await old.acquire("/te/b", "MUTATES", wait=False)
        assert would.value.blocker_agent_id == young.id
        with pytest.raises(NotLeaseOwnerError):
            await klock.backend.release(mine.id, old.id)
        with pytest.raises(InvalidRequestError, match="at least one"):
            await klock.backend.acquire(old.id, "s", (), ttl=1, wait=False, timeout=None)
        with pytest.raises(UnknownAgentError):
            await klock.read("/te/a", fresh("ghost"))
        with pytest.raises(AgentExistsError):
            await klock.register_agent(old.id, priority=1)
        with pytest.raises(InvalidTTLError):
            await klock.backend.heartbeat(mine.id, ttl=-1)
        await klock.write("/te/c", old.id)
        with pytest.raises(CausalViolationError) as stale:
            await klock.write("/te/c", young.id)
        assert stale.value.path_clock == {old.id: 1}
        assert not klock.backend.release_nowait(mine.id, mine.agent_id)  # HTTP always answers
        await mine.release()
        with pytest.raises(LeaseNotFoundError):
            await klock.backend.release(mine.id)


async def test_invalid_input_is_refused_before_sending(server: ThreadServer) -> None:
    """Bad predicates, resources and ttls raise on the client as they do embedded."""
    async with Klock.connect(server.url) as klock:
        agent = await klock.register_agent(fresh())
        with pytest.raises(InvalidPredicateError):
            await agent.acquire("/x", "WRITES")
        with pytest.raises(InvalidResourceError):
            await agent.acquire("FOLDER:/x", "MUTATES")
        with pytest.raises(InvalidTTLError):
            await agent.acquire("/x", "MUTATES", ttl=0)
        with pytest.raises(InvalidRequestError):
            await klock.backend.acquire(agent.id, "s", (), ttl=1, wait=True, timeout=-1)


async def test_http_boundary_errors_arrive_typed(server: ThreadServer) -> None:
    """An error raised at the HTTP layer arrives as its own type, an InvalidRequestError."""
    async with Klock.connect(server.url) as klock:
        with pytest.raises(InvalidFieldError) as caught:
            await klock.register_agent("   ")
        assert isinstance(caught.value, InvalidRequestError)


async def test_waiter_is_woken_by_release_from_another_client(server: ThreadServer) -> None:
    """An older agent's acquire long-polls and returns when another process releases."""
    async with Klock.connect(server.url) as holder_side, Klock.connect(server.url) as waiter_side:
        old = await waiter_side.register_agent(fresh())
        young = await holder_side.register_agent(fresh())
        lease = await young.acquire("/wake/a", "MUTATES")
        waiting = asyncio.create_task(old.acquire("/wake/a", "MUTATES"))
        stats = await asyncio.create_task(waiter_side.backend.barrier())  # type: ignore[attr-defined]
        assert stats.requests_waiting >= 1
        assert not waiting.done()
        await lease.release()
        granted = await waiting
        assert granted.agent_id == old.id
        assert granted.token > lease.token
        await granted.release()


async def test_cancelled_waiter_is_withdrawn_before_cancel_returns(server: ThreadServer) -> None:
    """Cancelling a waiting acquire withdraws it on the server before the cancel completes."""
    async with Klock.connect(server.url) as klock:
        old = await klock.register_agent(fresh())
        young = await klock.register_agent(fresh())
        lease = await young.acquire("/cancel/a", "MUTATES")
        waiting = asyncio.create_task(old.acquire("/cancel/a", "MUTATES"))
        before = await asyncio.create_task(klock.backend.barrier())  # type: ignore[attr-defined]
        assert before.requests_waiting >= 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        after = await klock.statistics()
        assert after.requests_waiting == before.requests_waiting - 1
        await lease.release()
        assert [info for info in await klock.leases() if info.agent_id == old.id] == []


async def test_timeout_withdraws(server: ThreadServer) -> None:
    """acquire(timeout=...) raises AcquireTimeoutError and nothing stays queued."""
    async with Klock.connect(server.url) as klock:
        old = await klock.register_agent(fresh())
        young = await klock.register_agent(fresh())
        lease = await young.acquire("/timeout/a", "MUTATES")
        waiting_before = (await klock.statistics()).requests_waiting
        with pytest.raises(AcquireTimeoutError):
            await old.acquire("/timeout/a", "MUTATES", timeout=0.02)
        assert (await klock.statistics()).requests_waiting == waiting_before
        await lease.release()


async def test_wait_ended_long_poll(server: ThreadServer) -> None:
    """wait_ended returns the final snapshot when another client ends the lease."""
    async with Klock.connect(server.url) as one, Klock.connect(server.url) as two:
        agent = await one.register_agent(fresh())
        lease = await agent.acquire("/ended/a", "MUTATES")
        assert await two.backend.wait_ended(lease.id, 0.01) is None
        watching = asyncio.create_task(two.backend.wait_ended(lease.id, None))
        await asyncio.create_task(two.backend.barrier())  # type: ignore[attr-defined]
        await one.revoke(lease.id)
        ended = await watching
        assert ended is not None and ended.state is LeaseState.REVOKED
        assert await lease.wait_lost() is LeaseState.REVOKED


async def test_closing_fails_pending_calls(server: ThreadServer) -> None:
    """aclose() fails a pending waiter with KernelClosedError; later calls fail the same way."""
    async with Klock.connect(server.url) as holder:
        young = await holder.register_agent(fresh())
        lease = await young.acquire("/close/a", "MUTATES")
        klock = Klock.connect(server.url)
        await klock.__aenter__()
        old = await klock.register_agent(fresh(), priority=-1_000 - next(_names))
        waiting = asyncio.create_task(old.acquire("/close/a", "MUTATES"))
        watching = asyncio.create_task(klock.backend.wait_ended(lease.id, None))
        await asyncio.create_task(klock.backend.barrier())  # type: ignore[attr-defined]
        await klock.aclose()
        with pytest.raises(KernelClosedError):
            await waiting
        with pytest.raises(KernelClosedError):
            await watching
        with pytest.raises(KernelClosedError):
            await klock.statistics()
        await lease.release()


async def test_unreachable_server_is_a_transport_error() -> None:
    """Connecting where no server listens raises TransportError naming the URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
        async with Klock.connect(url):
            pass  # pragma: no cover


async def test_not_a_klock_server_is_a_transport_error() -> None:
    """A server that does not speak the klock envelope is reported, not misread."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    other = Starlette(routes=[Route("/statistics", hello)])
    backend = RemoteBackend("http://other", transport=httpx.ASGITransport(app=other))
    with pytest.raises(TransportError, match="no klock envelope"):
        await backend.start()


def test_bad_url_is_refused() -> None:
    """Only http(s) URLs and positive timeouts are accepted."""
    with pytest.raises(InvalidRequestError):
        RemoteBackend("127.0.0.1:3100")
    with pytest.raises(InvalidRequestError):
        RemoteBackend("http://127.0.0.1:3100", timeout=0)


async def test_token_auth() -> None:
    """The right token connects; a missing or wrong one is refused at connect time."""
    with serve_in_thread(token="t0ken") as secured:
        async with Klock.connect(secured.url, token="t0ken") as klock:
            await klock.register_agent("authorised")
        for token in (None, "wrong"):
            with pytest.raises(TransportError, match="token"):
                async with Klock.connect(secured.url, token=token):
                    pass  # pragma: no cover


async def test_through_an_httpx_transport() -> None:
    """RemoteBackend(transport=httpx.ASGITransport(app)) talks to an app in this process."""
    app = create_app(allowed_hosts=["klock"])
    async with app.router.lifespan_context(app):
        backend = RemoteBackend("http://klock", transport=httpx.ASGITransport(app=app))
        async with Klock(backend=backend) as klock:
            old = await klock.register_agent("old")
            young = await klock.register_agent("young")
            lease = await young.acquire("/asgi/a", "MUTATES")
            waiting = asyncio.create_task(old.acquire("/asgi/a", "MUTATES"))
            stats = await asyncio.create_task(backend.barrier())
            assert stats.requests_waiting == 1
            await lease.release()
            assert (await waiting).agent_id == "old"


async def test_idle_connection_closed_by_the_server_is_replaced(server: ThreadServer) -> None:
    """A keep-alive connection the server closed while idle is not reused: the call succeeds."""
    backend = RemoteBackend(server.url)
    await backend.start()
    try:
        await backend.statistics()  # leaves one idle keep-alive connection
        loop = server.app.state.klock._closing.get_loop()

        async def close_all() -> int:
            connections = list(server.server.server_state.connections)
            for connection in connections:
                connection.transport.close()
            return len(connections)

        closed = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close_all(), loop))
        assert closed >= 1
        stats = await backend.statistics()
        assert stats.agents >= 0
    finally:
        await backend.aclose()


# ------------------------------------------------------------------ the facade on both kernels
# The same facade scenarios embedded and through a real server (the kernel_factory fixture).


async def test_lease_block_heartbeats_past_its_ttl(kernel_factory: Any) -> None:
    """A lease block keeps a short-ttl lease alive while inside, then releases it."""
    async with kernel_factory() as klock:
        agent = await klock.register_agent("keeper")
        async with agent.lease("/hb/a", "MUTATES", ttl=0.3) as lease:
            # Three ttls pass inside the block: the keeper's heartbeats hold the lease.
            assert await klock.backend.wait_ended(lease.id, 0.9) is None
            assert lease.state is LeaseState.ACTIVE
        assert lease.state is LeaseState.RELEASED
        assert await klock.leases() == []


async def test_protected_call_waits_in_the_queue(kernel_factory: Any, settle: Any) -> None:
    """A protected tool call queues behind the holder (it holds nothing), then runs."""
    async with kernel_factory() as klock:
        old = await klock.register_agent("old")
        await klock.register_agent("young")
        calls: list[str] = []

        @klock.protected(agent="young", resource="/tool/file", predicate="MUTATES")
        async def edit() -> str:
            calls.append("edit")
            return "done"

        held = await old.acquire("/tool/file", "MUTATES")
        running = asyncio.create_task(edit())
        stats = await settle(klock)
        assert (stats.deaths, stats.requests_waiting) == (0, 1) and not running.done()
        await held.release()
        assert await running == "done"
        assert calls == ["edit"]


async def test_serializable_session_refuses_a_stale_write(kernel_factory: Any) -> None:
    """In a SERIALIZABLE session a write lease on a version never read is refused at grant."""
    async with kernel_factory() as klock:
        writer = await klock.register_agent("writer")
        late = await klock.register_agent("late")
        await writer.write("/ser/f")
        async with late.session(isolation="SERIALIZABLE") as session:
            with pytest.raises(CausalViolationError):
                await session.acquire("/ser/f", "MUTATES")
            assert await klock.leases() == []
            await session.acquire("/ser/f", "CONSUMES")  # a read merges the clock
            lease = await session.acquire("/ser/f", "MUTATES")  # reentrant, now fresh
            await lease.release()
        assert await klock.conflict_count() == 0


async def test_evicted_holder_learns_it_lost_the_lease(kernel_factory: Any) -> None:
    """Evicting an agent revokes its leases; its lease block raises LeaseLostError."""
    async with kernel_factory() as klock:
        agent = await klock.register_agent("crashed")
        with pytest.raises(LeaseLostError):
            async with agent.lease("/evict/a", "MUTATES", ttl=30) as lease:
                assert await klock.evict("crashed") == 1
                assert await lease.wait_lost() is LeaseState.REVOKED
        assert await klock.leases() == []
