"""Restart recovery from the SQLite journal: embedded restarts, and a server killed under load."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from serverutil import serve_subprocess

from klock_async import (
    CausalViolationError,
    Intent,
    IsolationLevel,
    KernelClosedError,
    Klock,
    LeaseDied,
    LeaseInfo,
    LeaseNotFoundError,
    LeaseState,
    LeaseWouldWait,
    Predicate,
    Resource,
    TransportError,
    VectorClock,
    rules,
)
from klock_async.journal import SqliteJournal
from klock_async.remote import RemoteBackend
from klock_async.scheduler import Scheduler


def _klock(path: Path, clock: Callable[[], float] = time.time) -> Klock:
    return Klock(backend=Scheduler(journal=SqliteJournal(path, synchronous="NORMAL"), clock=clock))


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    """Agents, active leases, their expiry and tokens, and clocks come back after a restart."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        old = await klock.register_agent("old")
        young = await klock.register_agent("young")
        held = await old.acquire("src/a.py", "MUTATES", ttl=600)
        shared = await young.acquire("DATABASE_TABLE:users", "CONSUMES", ttl=600)
        await klock.read("src/a.py", "young")
        await klock.write("src/a.py", "old")
        before_leases = sorted(await klock.leases(), key=lambda lease: lease.token)
        before_agents = sorted(await klock.agents(), key=lambda agent: agent.ts)
        paths = await klock.tracked_paths()
    async with _klock(db) as klock:
        assert sorted(await klock.leases(), key=lambda lease: lease.token) == before_leases
        assert sorted(await klock.agents(), key=lambda agent: agent.ts) == before_agents
        assert await klock.tracked_paths() == paths
        assert {lease.id for lease in before_leases} == {held.id, shared.id}
        stats = await klock.statistics()
        assert (stats.agents, stats.leases_active) == (2, 2)
        klock.backend.check_invariants()  # type: ignore[attr-defined]


async def test_tokens_continue_above_every_token_ever_issued(tmp_path: Path) -> None:
    """After a restart the next token is above all earlier ones, released leases included."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        agent = await klock.register_agent("a")
        tokens = []
        for i in range(5):
            lease = await agent.acquire(f"src/{i}.py", "MUTATES", ttl=60)
            tokens.append(lease.token)
            await lease.release()
    async with _klock(db) as klock:
        agent = await klock.agent("a")
        lease = await agent.acquire("src/0.py", "MUTATES", ttl=60)
        assert lease.token == max(tokens) + 1


async def test_agent_ages_are_kept(tmp_path: Path) -> None:
    """A recovered agent keeps its age; a new agent gets the next age, never a used one."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        await klock.register_agent("first")
        await klock.register_agent("second")
        await klock.register_agent("explicit", priority=500)
    async with _klock(db) as klock:
        assert (await klock.register_agent("first")).ts == 1
        assert (await klock.register_agent("explicit")).ts == 500
        assert (await klock.register_agent("third")).ts == 501  # after every explicit age


async def test_explicit_priority_still_ranks_first_after_a_restart(tmp_path: Path) -> None:
    """A recovered agent's explicit priority still orders it before every automatic age."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        await klock.register_agent("auto")
        await klock.register_agent("vip", priority=500)
    async with _klock(db) as klock:
        auto, vip = await klock.agent("auto"), await klock.agent("vip")
        held = await auto.acquire("src/a.py", "MUTATES", ttl=600)
        with pytest.raises(LeaseWouldWait):  # older than the holder: it would wait, not die
            await vip.acquire("src/a.py", "MUTATES", wait=False)
        await held.release()


async def test_a_retired_agents_priority_is_forgotten(tmp_path: Path) -> None:
    """Retiring an agent drops its explicit priority from the journal with it."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        await klock.register_agent("vip", priority=500)
        assert await klock.backend.retire_idle_agents(["vip"]) == ("vip",)  # type: ignore[attr-defined]
    async with _klock(db) as klock:
        await klock.register_agent("vip")  # again, without a priority: an automatic age
    async with _klock(db) as klock:
        auto, vip = await klock.register_agent("auto"), await klock.agent("vip")
        held = await auto.acquire("src/a.py", "MUTATES", ttl=600)
        with pytest.raises(LeaseDied):  # younger than the holder's unit: it dies
            await vip.acquire("src/a.py", "MUTATES", wait=False)
        await held.release()


async def test_recovered_lease_still_excludes(tmp_path: Path) -> None:
    """A lease granted before the restart still blocks conflicting requests after it."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        old = await klock.register_agent("old")
        young = await klock.register_agent("young")
        await young.acquire("src/a.py", "MUTATES", ttl=600)
    async with _klock(db) as klock:
        old = await klock.agent("old")
        newer = await klock.register_agent("newer")
        # Recovered leases' units are the oldest after a restart: later units may not pass.
        for agent in (old, newer):
            with pytest.raises(LeaseDied) as died:
                await agent.acquire("src/a.py", "CONSUMES", wait=False)
            assert died.value.blocker_agent_id == "young"


async def test_recovered_lease_can_be_released_by_id(tmp_path: Path) -> None:
    """The lease id handed out before the restart still releases the lease after it."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        agent = await klock.register_agent("a")
        lease = await agent.acquire("src/a.py", "MUTATES", ttl=600)
    async with _klock(db) as klock:
        released = await klock.backend.release(lease.id, "a")
        assert released.state is LeaseState.RELEASED
        assert await klock.leases() == []
    async with _klock(db) as klock:
        assert await klock.leases() == []


async def test_lease_expired_while_down_ends_on_start(tmp_path: Path) -> None:
    """A lease whose expiry passed while the server was down is EXPIRED and its resource free."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        holder = await klock.register_agent("holder")
        await klock.register_agent("other")
        lease = await holder.acquire("src/a.py", "MUTATES", ttl=60)
    later = lambda: time.time() + 3600  # noqa: E731 - the wall clock an hour on
    async with _klock(db, clock=later) as klock:
        assert await klock.leases() == []
        stats = await klock.statistics()
        assert stats.expiries == 1
        other = await klock.agent("other")
        taken = await other.acquire("src/a.py", "MUTATES", ttl=60)
        assert taken.token > lease.token
        with pytest.raises(LeaseNotFoundError):
            await klock.backend.release(lease.id)
    async with _klock(db) as klock:
        assert [info.id for info in await klock.leases()] == [taken.id]


async def test_recovered_lease_expires_on_its_old_deadline(tmp_path: Path) -> None:
    """A recovered lease keeps its expiry and ends when it comes, waking who waits for it."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        agent = await klock.register_agent("a")
        lease = await agent.acquire("src/a.py", "MUTATES", ttl=0.3)
    async with _klock(db) as klock:
        (recovered,) = await klock.leases()
        assert recovered.expires_at == lease.expires_at
        ended = await klock.backend.wait_ended(lease.id, None)
        assert ended is not None
        assert ended.state is LeaseState.EXPIRED


async def test_heartbeat_extension_is_durable(tmp_path: Path) -> None:
    """The expiry pushed by a heartbeat is the one recovered."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        agent = await klock.register_agent("a")
        lease = await agent.acquire("src/a.py", "MUTATES", ttl=5)
        await lease.heartbeat(ttl=900)
        expires_at = lease.expires_at
    async with _klock(db) as klock:
        (recovered,) = await klock.leases()
        assert recovered.expires_at == expires_at
        assert recovered.ttl == 900


async def test_clocks_and_conflicts_survive(tmp_path: Path) -> None:
    """A stale write is still refused after a restart, and the conflict count is kept."""
    db = tmp_path / "k.db"
    async with _klock(db) as klock:
        await klock.register_agent("a")
        await klock.register_agent("b")
        await klock.write("src/f.py", "a")
        await klock.write("src/f.py", "b", strict=False)  # b never read it: a conflict
        await klock.read("src/g.py", "a")
        await klock.write("src/g.py", "b")
    async with _klock(db) as klock:
        assert await klock.conflict_count() == 1
        with pytest.raises(CausalViolationError):
            await klock.write("src/g.py", "a")
        await klock.read("src/g.py", "a")
        clock = await klock.write("src/g.py", "a")
        assert clock.as_dict() == {"a": 2, "b": 2}


# ------------------------------------------------------------------ a crash under load


@dataclass
class _Seen:
    """What the clients were told before the crash."""

    grants: dict[str, LeaseInfo] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)
    releasing: set[str] = field(default_factory=set)  # sent; the answer may have been lost
    clocks: dict[str, list[VectorClock]] = field(default_factory=dict)


async def _load(url: str, agent_id: str, seed: int, seen: _Seen, enough: asyncio.Event) -> None:
    """One client process' worth of traffic: acquire, sometimes release, sometimes write."""
    rng = random.Random(seed)
    backend = RemoteBackend(url, timeout=10)
    await backend.start()
    try:
        for step in itertools.count():
            resource = Resource.parse(f"/crash/{rng.randrange(24)}.py")
            predicate = rng.choice((Predicate.MUTATES, Predicate.CONSUMES))
            ttl = rng.choice((60.0, 60.0, 60.0, 0.2))
            try:
                if step % 7 == 6:
                    path = f"/crash/{rng.randrange(24)}.py"
                    clock = await backend.clock_write(path, agent_id, strict=False)
                    seen.clocks.setdefault(f"FILE:{path}", []).append(clock)
                    continue
                (lease,) = await backend.acquire(
                    agent_id,
                    uuid.uuid4().hex,
                    (Intent(resource, predicate),),
                    ttl=ttl,
                    wait=False,
                    timeout=None,
                    isolation=IsolationLevel.READ_COMMITTED,
                )
            except (LeaseDied, LeaseWouldWait):
                continue
            except (TransportError, KernelClosedError):
                return  # the server is gone
            seen.grants[lease.id] = lease
            if len(seen.grants) >= 150:
                enough.set()
            if rng.random() < 0.6:
                seen.releasing.add(lease.id)
                try:
                    await backend.release(lease.id, agent_id)
                except (TransportError, KernelClosedError):
                    return
                seen.released.add(lease.id)
    finally:
        await backend.aclose()


async def test_sigkill_under_load_loses_no_grant(tmp_path: Path) -> None:
    """SIGKILL mid-load, restart on the same db: every grant seen is there or expired, no token
    repeats, no two conflicting leases are active, and the clocks are intact."""
    db = tmp_path / "klock.db"
    agents = [f"crash-{i}" for i in range(8)]
    seen = _Seen()
    with serve_subprocess(db) as first:
        # Registered without credentials: the clients below act for them from other backends.
        setup = RemoteBackend(first.url, credentials=False)
        await setup.start()
        for agent_id in agents:
            await setup.register_agent(agent_id, None)
        await setup.aclose()
        enough = asyncio.Event()
        clients = [
            asyncio.create_task(_load(first.url, agent_id, seed, seen, enough))
            for seed, agent_id in enumerate(agents)
        ]
        await enough.wait()
        first.kill()  # SIGKILL while the clients keep sending
        await asyncio.gather(*clients)
    assert len(seen.grants) >= 150

    with serve_subprocess(db) as second:
        backend = RemoteBackend(second.url)
        await backend.start()
        try:
            asked = time.time()
            active = {lease.id: lease for lease in await backend.leases()}
            answered = time.time()
            # Every grant a client saw and did not release is active, unless its time is up.
            kept = expired = 0
            for lease_id, granted in seen.grants.items():
                if lease_id in seen.released:
                    assert lease_id not in active, "a confirmed release came back"
                elif lease_id in seen.releasing:
                    continue  # released or not: the answer died with the server
                elif granted.expires_at > answered + 0.01:
                    assert lease_id in active, f"grant {granted} was lost"
                    assert active[lease_id].token == granted.token
                    assert active[lease_id].expires_at == granted.expires_at
                    kept += 1
                elif granted.expires_at < asked - 0.01:
                    assert lease_id not in active, f"{granted} should have expired"
                    expired += 1
            assert kept > 0 and expired > 0
            # No token was handed out twice, and new ones continue above all of them.
            tokens = [lease.token for lease in seen.grants.values()]
            assert len(tokens) == len(set(tokens))
            (fresh_lease,) = await backend.acquire(
                agents[0],
                "after-restart",
                (Intent(Resource.parse("/crash/elsewhere"), Predicate.MUTATES),),
                ttl=60,
                wait=False,
                timeout=None,
                isolation=IsolationLevel.READ_COMMITTED,
            )
            assert fresh_lease.token > max(tokens)
            # No two conflicting leases of different sessions are active.
            held = list(active.values())
            for i, a in enumerate(held):
                for b in held[i + 1 :]:
                    if (a.agent_id, a.session_id) != (b.agent_id, b.session_id):
                        assert not rules.intents_conflict(
                            Intent(a.resource, a.predicate), Intent(b.resource, b.predicate)
                        ), f"conflicting active leases {a} and {b}"
            # Clocks: each path's clock descends from every clock a writer was told.
            status = await backend.clock_status()
            for path, clocks in seen.clocks.items():
                assert path in status.tracked_paths
                recovered = await backend.clock_read(path, agents[0])
                for clock in clocks:
                    assert clock <= recovered
            assert {agent.agent_id for agent in await backend.agents()} == set(agents)
        finally:
            await backend.aclose()
