"""Tests for the causal layer: observed versions per (session, path) across the resource tree."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from serverutil import remote_kernel, serve_in_thread

from klock_async import (
    CausalViolationError,
    InvalidIsolationError,
    IsolationLevel,
    Klock,
    KlockError,
    LeaseLostError,
    Resource,
    Session,
)
from klock_async.causal import ObservedVersions, View
from klock_async.integrations.langchain import klock_protected
from klock_async.journal import SqliteJournal
from klock_async.scheduler import Scheduler

SER = IsolationLevel.SERIALIZABLE


async def read(session: Session, path: str) -> None:
    async with session.lease(path, "CONSUMES"):
        pass


async def write(session: Session, path: str) -> None:
    async with session.lease(path, "MUTATES"):
        pass


async def two_agents(klock: Klock) -> tuple[Session, Session]:
    a = await klock.register_agent("A")
    b = await klock.register_agent("B")
    return a.session(isolation=SER), b.session(isolation=SER)


# --- one regression test per known hole -------------------------------------------------------


async def test_observations_are_per_path_not_per_agent_clock() -> None:
    """A read of another path written later does not count as a read of the first path."""
    async with Klock() as klock:
        sa, sb = await two_agents(klock)
        await read(sa, "x")
        await write(sb, "x")
        await write(sb, "y")
        await read(sa, "y")  # y's clock covers B's write of x
        with pytest.raises(CausalViolationError):
            await write(sa, "x")


async def test_directory_write_makes_a_file_read_below_it_stale() -> None:
    """A write of a directory is a write of every file below it."""
    async with Klock() as klock:
        sa, sb = await two_agents(klock)
        await read(sa, "src/a")
        await write(sb, "src")
        with pytest.raises(CausalViolationError):
            await write(sa, "src/a")


async def test_file_write_makes_a_directory_read_stale() -> None:
    """A write below a directory changes the directory's version."""
    async with Klock() as klock:
        sa, sb = await two_agents(klock)
        await read(sa, "src")
        await write(sb, "src/a")
        with pytest.raises(CausalViolationError):
            await write(sa, "src")


async def test_directory_read_observes_the_files_below_it() -> None:
    """After reading a directory, a write of a file below it from that read is accepted."""
    async with Klock() as klock:
        sa, sb = await two_agents(klock)
        await write(sb, "src/a")
        await read(sa, "src")
        await write(sa, "src/a")


async def test_session_exit_records_the_write_of_a_lease_it_releases() -> None:
    """A writing lease released by leaving its session is recorded as a write."""
    async with Klock() as klock:
        a = await klock.register_agent("A")
        b = await klock.register_agent("B")
        sb = b.session(isolation=SER)
        await read(sb, "x")
        async with a.session(isolation=SER) as sa:
            await sa.acquire("x", "MUTATES")
        with pytest.raises(CausalViolationError):
            await write(sb, "x")


async def test_joining_a_session_by_id_keeps_its_isolation() -> None:
    """An acquire in a SERIALIZABLE session named by its id is checked as SERIALIZABLE."""
    async with Klock() as klock:
        a = await klock.register_agent("A")
        sa, sb = await two_agents(klock)
        await read(sa, "x")
        await write(sb, "x")
        with pytest.raises(CausalViolationError):
            await a.acquire("x", "MUTATES", session=sa.id)


async def test_joining_an_unused_session_by_id_keeps_its_isolation() -> None:
    """A SERIALIZABLE session joined by id before it asked for anything is still checked."""
    async with Klock() as klock:
        a = await klock.register_agent("A")
        _, sb = await two_agents(klock)
        await write(sb, "x")
        async with a.session(isolation=SER) as sa:
            with pytest.raises(CausalViolationError):
                await a.acquire("x", "MUTATES", session=sa.id)


async def test_two_sessions_of_one_agent_do_not_share_observations() -> None:
    """Two sessions of one agent (two parallel tool calls) cannot lose each other's update."""
    async with Klock() as klock:
        a = await klock.register_agent("A")
        s1, s2 = a.session(isolation=SER), a.session(isolation=SER)
        await read(s1, "x")
        await read(s2, "x")
        await write(s1, "x")
        with pytest.raises(CausalViolationError):
            await write(s2, "x")


async def test_expired_write_lease_counts_as_a_possible_write() -> None:
    """A writing lease that expires counts as a write: later stale writes are refused."""
    now = [1_000.0]
    async with Klock(backend=Scheduler(clock=lambda: now[0])) as klock:
        sa, sb = await two_agents(klock)
        await read(sb, "x")
        with pytest.raises(LeaseLostError, match="possible write") as lost:
            async with sa.lease("x", "MUTATES", ttl=5):
                now[0] += 10
                await klock.statistics()  # any message runs the kernel at the clock's time
        assert "read it again" in str(lost.value)
        with pytest.raises(CausalViolationError):
            await write(sb, "x")


async def test_revoked_write_lease_counts_as_a_possible_write() -> None:
    """A writing lease that is revoked counts as a write: later stale writes are refused."""
    async with Klock() as klock:
        sa, sb = await two_agents(klock)
        await read(sb, "x")
        lease = await sa.acquire("x", "MUTATES")
        await klock.revoke(lease.id)
        with pytest.raises(CausalViolationError):
            await write(sb, "x")
        await write(sa, "x")  # the holder knows what it left there


@pytest.mark.parametrize("value", ["bogus", "", 3])
def test_bad_isolation_value_is_a_typed_error(value: object) -> None:
    """IsolationLevel.parse refuses a bad value with InvalidIsolationError (a KlockError)."""
    with pytest.raises(InvalidIsolationError, match="isolation level") as info:
        IsolationLevel.parse(value)  # type: ignore[arg-type]
    assert isinstance(info.value, KlockError)
    assert info.value.code == "invalid_isolation"


def test_langchain_refuses_a_bad_isolation_with_the_same_error() -> None:
    """klock_protected refuses a bad isolation with InvalidIsolationError at decoration time."""
    with pytest.raises(InvalidIsolationError, match="bogus"):
        klock_protected(
            klock_client=Klock(),
            agent_id="A",
            session_id=None,
            resource_type="FILE",
            resource_path_extractor=lambda kw: str(kw["path"]),
            isolation="bogus",
        )


def test_server_refuses_a_bad_isolation_with_the_same_code() -> None:
    """POST /leases with an unknown isolation answers 400 with code invalid_isolation."""
    with serve_in_thread() as server, httpx.Client(base_url=server.url) as http:
        assert http.post("/agents", json={"agent_id": "A"}).status_code < 300
        body = {"agent_id": "A", "resource": "x", "predicate": "MUTATES", "isolation": "bogus"}
        answer = http.post("/leases", json=body)
        assert answer.status_code == 400
        assert answer.json()["code"] == "invalid_isolation"


async def test_remote_join_by_id_keeps_the_isolation_the_server_knows() -> None:
    """Over HTTP, an acquire naming a SERIALIZABLE session by id only is checked as one."""
    async with remote_kernel() as klock:
        sa, sb = await two_agents(klock)
        await read(sa, "x")
        await write(sb, "x")
        other = Klock(backend=klock.backend)  # another process: it knows no Session object
        a = await other.agent("A")
        with pytest.raises(CausalViolationError):
            await a.acquire("x", "MUTATES", session=sa.id)


async def test_a_restart_makes_every_written_path_unseen(tmp_path: Path) -> None:
    """After a restart every path written before must be read again before a write."""
    db = tmp_path / "k.db"
    async with Klock(backend=Scheduler(journal=SqliteJournal(db))) as klock:
        sa, sb = await two_agents(klock)
        await write(sb, "x")
        await read(sa, "x")  # fresh before the restart; observations are not journaled
        await sb.acquire("y", "MUTATES", ttl=600)  # still held at the restart
    async with Klock(backend=Scheduler(journal=SqliteJournal(db))) as klock:
        a = await klock.agent("A")
        sa = a.session(isolation=SER)
        with pytest.raises(CausalViolationError):
            await write(sa, "x")
        await read(sa, "x")
        await write(sa, "x")
        (held,) = await klock.leases()
        await klock.revoke(held.id)  # its end counts as a write, whatever it was taken as
        with pytest.raises(CausalViolationError):
            await write(sa, "y")  # y had no version before: it has one now


async def test_tool_calls_of_an_agent_share_its_own_view() -> None:
    """A protected read in one call links to the write of a session in the agent's own view."""
    async with Klock() as klock:
        a = await klock.register_agent("A")
        _, sb = await two_agents(klock)
        await write(sb, "x")

        @klock.protected(agent="A", resource="x", predicate="CONSUMES", isolation=SER)
        async def read_x() -> None:
            pass

        await read_x()
        tools = Session(klock, a.id, SER, agent_view=True)  # as the file tools' holds run
        await write(tools, "x")
        own = a.session(isolation=SER)  # a session of its own shares nothing with them
        with pytest.raises(CausalViolationError):
            await write(own, "x")


# --- the pure core: klock_async.causal.ObservedVersions ----------------------------------------

V, W = ("A", "s1"), ("B", "s2")


def r(path: str) -> Resource:
    return Resource.parse(path)


@pytest.mark.parametrize(
    ("steps", "target", "stale"),
    [
        pytest.param([], "/f", None, id="never-written"),
        pytest.param([("w", W, "/f")], "/f", "FILE:/f", id="written-unread"),
        pytest.param([("w", W, "/f"), ("r", V, "/f")], "/f", None, id="read-after-write"),
        pytest.param([("r", V, "/f"), ("w", W, "/f")], "/f", "FILE:/f", id="read-before-write"),
        pytest.param([("w", W, "/d/f"), ("r", V, "/d")], "/d/f", None, id="dir-read-covers-file"),
        pytest.param([("r", V, "/d/f"), ("w", W, "/d")], "/d/f", "FILE:/d/f", id="dir-write"),
        pytest.param([("r", V, "/d"), ("w", W, "/d/f")], "/d", "FILE:/d/f", id="file-below"),
        pytest.param([("w", W, "/d/f"), ("r", V, "/d/f")], "/d", None, id="file-below-read-since"),
        pytest.param(
            [("w", W, "/d"), ("r", V, "/d/f"), ("r", V, "/d/g")],
            "/d",
            "FILE:/d",
            id="dir-written-files-read",
        ),
        pytest.param([("w", W, "/d/f")], "/d/g", None, id="sibling"),
        pytest.param([("w", V, "/f")], "/f", None, id="own-write"),
        pytest.param(
            [("r", V, "/x"), ("w", W, "/x"), ("w", W, "/y"), ("r", V, "/y")],
            "/x",
            "FILE:/x",
            id="other-path-read-later",
        ),
    ],
)
def test_check_table(steps: list[tuple[str, View, str]], target: str, stale: str | None) -> None:
    """A write is stale exactly when a write at, above or below it was never observed."""
    versions = ObservedVersions()
    for op, view, path in steps:
        if op == "r":
            versions.observe(view, r(path))
        else:
            versions.record_write(view, r(path))
    found = versions.check(V, r(target))
    assert (found.path if found else None) == stale
    versions.check_invariants()


def test_held_reads_count_until_their_lease_ends() -> None:
    """A read under a held lease counts for the view's checks, and is forgotten with the hold."""
    versions = ObservedVersions()
    versions.record_write(W, r("/f"))
    versions.hold_read("lease", V, r("/f"))
    assert versions.check(V, r("/f")) is None
    hold = versions.end_hold("lease")
    assert hold is not None and not hold.writes
    assert versions.check(V, r("/f")) is not None  # the caller observes it, if it counts
    versions.check_invariants()
