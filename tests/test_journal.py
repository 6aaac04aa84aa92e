"""Tests for klock_async.journal: the SQLite journal on its own and under the scheduler."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from klock_async import JournalError, JournalUnavailableError, Klock
from klock_async.clocks import VectorClock
from klock_async.journal import SqliteJournal
from klock_async.model import AgentInfo, LeaseInfo, LeaseState, Predicate, Resource
from klock_async.scheduler import RecoveredState, Scheduler


def _lease(lease_id: str, token: int, state: LeaseState = LeaseState.ACTIVE) -> LeaseInfo:
    return LeaseInfo(
        id=lease_id,
        agent_id="a",
        session_id="s",
        resource=Resource.parse(f"src/{lease_id}.py"),
        predicate=Predicate.MUTATES,
        token=token,
        ttl=30.0,
        expires_at=1_000_000.0 + token,
        state=state,
    )


def _load(path: Path) -> RecoveredState:
    journal = SqliteJournal(path)
    try:
        return journal.load()
    finally:
        journal.close()


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def test_fresh_file_loads_empty_state(tmp_path: Path) -> None:
    """A new database starts with no agents, leases or clocks and counters at zero."""
    journal = SqliteJournal(tmp_path / "sub" / "k.db")
    state = journal.load()
    journal.close()
    assert (state.agents, state.leases, state.path_clocks, state.agent_clocks) == ([], [], {}, {})
    assert (state.last_token, state.last_agent_ts, state.conflict_count) == (0, 0, 0)
    assert _rows(tmp_path / "sub" / "k.db", "PRAGMA journal_mode") == [("wal",)]


async def test_committed_batch_is_read_back(tmp_path: Path) -> None:
    """Everything recorded and committed comes back from a new journal on the same file."""
    path = tmp_path / "k.db"
    journal = SqliteJournal(path)
    journal.load()
    journal.record_agent(AgentInfo("a", 1))
    journal.record_agent(AgentInfo("b", 7))
    journal.record_lease(_lease("x", 1))
    journal.record_lease(_lease("y", 2))
    journal.record_counters(2, 1)
    journal.record_clocks("FILE:/p", VectorClock({"a": 1}), "a", VectorClock({"a": 1}), 0)
    journal.record_clocks("FILE:/q", VectorClock({"b": 2}), "b", VectorClock({"b": 2}), 3)
    await journal.commit()
    journal.close()

    again = SqliteJournal(path)
    state = again.load()
    again.close()
    assert sorted(state.agents, key=lambda a: a.agent_id) == [AgentInfo("a", 1), AgentInfo("b", 7)]
    assert state.leases == [_lease("x", 1), _lease("y", 2)]
    assert (state.last_token, state.last_agent_ts, state.conflict_count) == (2, 1, 3)
    assert state.path_clocks == {"FILE:/p": {"a": 1}, "FILE:/q": {"b": 2}}
    assert state.agent_clocks == {"a": {"a": 1}, "b": {"b": 2}}


async def test_ended_leases_are_trimmed(tmp_path: Path) -> None:
    """A released, expired or revoked lease is deleted; the token counter still remembers it."""
    path = tmp_path / "k.db"
    journal = SqliteJournal(path)
    journal.load()
    for token, lease_id in enumerate(("r", "e", "v", "kept"), start=1):
        journal.record_agent(AgentInfo("a", 1))
        journal.record_lease(_lease(lease_id, token))
    journal.record_counters(4, 0)
    await journal.commit()
    journal.record_lease(_lease("r", 1, LeaseState.RELEASED))
    journal.record_lease(_lease("e", 2, LeaseState.EXPIRED))
    journal.record_lease(_lease("v", 3, LeaseState.REVOKED))
    await journal.commit()
    journal.close()
    assert _rows(path, "SELECT id FROM leases") == [("kept",)]
    state = _load(path)
    assert [lease.id for lease in state.leases] == ["kept"]
    assert state.last_token == 4


async def test_counters_never_go_backwards(tmp_path: Path) -> None:
    """A smaller counter recorded later does not lower the stored one."""
    path = tmp_path / "k.db"
    journal = SqliteJournal(path)
    journal.load()
    journal.record_counters(10, 5)
    await journal.commit()
    journal.record_counters(3, 2)
    await journal.commit()
    journal.close()
    state = _load(path)
    assert (state.last_token, state.last_agent_ts) == (10, 5)


async def test_empty_batch_writes_no_transaction(tmp_path: Path) -> None:
    """A batch that changed nothing costs no write."""
    journal = SqliteJournal(tmp_path / "k.db")
    journal.load()
    await journal.commit()
    assert journal.commits == 0
    journal.record_agent(AgentInfo("a", 1))
    await journal.commit()
    await journal.commit()
    assert journal.commits == 1
    journal.close()
    journal.close()  # idempotent


async def test_last_record_of_a_batch_wins(tmp_path: Path) -> None:
    """A lease granted and released within one batch leaves no row behind."""
    path = tmp_path / "k.db"
    journal = SqliteJournal(path)
    journal.load()
    journal.record_lease(_lease("x", 1))
    journal.record_lease(_lease("x", 1, LeaseState.RELEASED))
    await journal.commit()
    journal.close()
    assert _rows(path, "SELECT COUNT(*) FROM leases") == [(0,)]


@pytest.mark.parametrize(
    "mode",
    [pytest.param("fast", id="unknown-word"), pytest.param("OFF", id="not-durable")],
)
def test_bad_synchronous_mode_is_refused(tmp_path: Path, mode: str) -> None:
    """Only FULL and NORMAL are accepted: a journal that is not durable is refused."""
    with pytest.raises(ValueError, match="synchronous"):
        SqliteJournal(tmp_path / "k.db", synchronous=mode)


async def test_commit_before_load_is_refused(tmp_path: Path) -> None:
    """Committing a journal that was never opened says so."""
    journal = SqliteJournal(tmp_path / "k.db")
    journal.record_agent(AgentInfo("a", 1))
    with pytest.raises(RuntimeError, match="not open"):
        await journal.commit()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database from a newer schema version is not misread."""
    path = tmp_path / "k.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    journal = SqliteJournal(path)
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        journal.load()
    journal.close()


async def test_older_journal_without_priorities_opens_and_gains_the_table(
    tmp_path: Path,
) -> None:
    """A journal of schema 1 (no priorities table) keeps its agents and stores priorities after."""
    path = tmp_path / "k.db"
    journal = SqliteJournal(path)
    journal.load()
    journal.record_agent(AgentInfo("old", 1))
    await journal.commit()
    journal.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE priorities")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    journal = SqliteJournal(path)
    state = journal.load()
    assert (state.agents, state.priorities) == ([AgentInfo("old", 1)], {})
    journal.record_agent(AgentInfo("vip", 2), priority=500)
    await journal.commit()
    journal.close()
    assert _load(path).priorities == {"vip": 500}
    assert _rows(path, "PRAGMA user_version") == [(3,)]


def test_current_journal_without_priorities_is_damaged(tmp_path: Path) -> None:
    """A journal of the current schema that lacks the priorities table is refused."""
    path = tmp_path / "k.db"
    SqliteJournal(path).load()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE priorities")
    db.commit()
    db.close()
    journal = SqliteJournal(path, accept_unclosed=True)
    with pytest.raises(JournalError, match="'priorities' is missing"):
        journal.load()
    journal.close()


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    """A file that is not a SQLite database is an error, not an empty journal."""
    path = tmp_path / "k.db"
    path.write_bytes(b"this is not a database" * 100)
    journal = SqliteJournal(path)
    with pytest.raises(sqlite3.DatabaseError):
        journal.load()
    journal.close()


async def test_reply_comes_after_commit(tmp_path: Path) -> None:
    """When acquire returns, the grant is already in the database (group commit)."""
    path = tmp_path / "k.db"
    journal = SqliteJournal(path)
    async with Klock(backend=Scheduler(journal=journal)) as klock:
        agent = await klock.register_agent("a")
        assert _rows(path, "SELECT id, ts FROM agents") == [("a", 1)]
        lease = await agent.acquire("src/x.py", "MUTATES", ttl=30)
        assert _rows(path, "SELECT id, token FROM leases") == [(lease.id, lease.token)]
        assert _rows(path, "SELECT value FROM meta WHERE key = 'last_token'") == [(lease.token,)]
        assert not klock.backend.release_nowait(lease.id, "a")  # answered after the commit
        await lease.release()
        assert _rows(path, "SELECT COUNT(*) FROM leases") == [(0,)]
        await klock.write("src/x.py", "a")
        assert _rows(path, "SELECT path, clock FROM path_clocks") == [("FILE:/src/x.py", '{"a":1}')]


async def test_one_transaction_per_batch(tmp_path: Path) -> None:
    """Many requests posted together are written in fewer transactions than requests."""
    journal = SqliteJournal(tmp_path / "k.db", synchronous="NORMAL")
    async with Klock(backend=Scheduler(journal=journal)) as klock:
        agent = await klock.register_agent("a")
        before = journal.commits
        leases = await asyncio.gather(
            *(agent.acquire(f"src/{i}.py", "MUTATES", ttl=30) for i in range(50))
        )
        stats = await klock.statistics()
        assert len({lease.token for lease in leases}) == 50
        assert journal.commits - before < 50
        assert stats.grants == 50


async def test_locked_journal_fails_the_batch_and_keeps_the_kernel(tmp_path: Path) -> None:
    """A commit that finds the file locked fails its batch's callers; later batches go on."""
    path = tmp_path / "k.db"
    journal = SqliteJournal(path, timeout=0)
    async with Klock(backend=Scheduler(journal=journal)) as klock:
        agent = await klock.register_agent("a")
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(JournalUnavailableError, match="locked"):
                await agent.acquire("src/x.py", "MUTATES", ttl=30)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert list(await klock.leases()) == []  # the grant nobody saw was given back
        lease = await agent.acquire("src/x.py", "MUTATES", ttl=30)
        assert lease.token == 2
    assert _rows(path, "SELECT id, token FROM leases") == [(lease.id, 2)]
    assert _rows(path, "SELECT id FROM agents") == [("a",)]


async def test_unstorable_value_fails_the_batch_and_keeps_the_kernel(tmp_path: Path) -> None:
    """A value SQLite cannot store (a lone surrogate) fails its batch; the kernel goes on."""
    path = tmp_path / "k.db"
    async with Klock(backend=Scheduler(journal=SqliteJournal(path))) as klock:
        with pytest.raises(JournalUnavailableError, match="cannot be stored"):
            await klock.register_agent("bad-\ud800")
        agent = await klock.register_agent("good")
        await agent.acquire("src/x.py", "MUTATES", ttl=30)
    assert _rows(path, "SELECT id FROM agents") == [("good",)]


@pytest.mark.parametrize(
    "resource",
    [
        pytest.param("FILE:/src/a:b.py", id="file-with-colon"),
        pytest.param("SYMBOL:pkg.mod:Class.method", id="symbol-with-colons"),
        pytest.param("CONFIG_KEY:db.pool.size", id="config-key"),
        pytest.param("API_ENDPOINT:/v1/users/{id}", id="endpoint"),
        pytest.param("DATABASE_TABLE:public.users", id="table"),
    ],
)
async def test_resources_round_trip(tmp_path: Path, resource: str) -> None:
    """Every resource type and odd path comes back from the journal as the same resource."""
    path = tmp_path / "k.db"
    lease = LeaseInfo(
        id="x",
        agent_id="a",
        session_id="s",
        resource=Resource.parse(resource),
        predicate=Predicate.DEPENDS_ON,
        token=1,
        ttl=0.5,
        expires_at=123.25,
    )
    journal = SqliteJournal(path)
    journal.load()
    journal.record_agent(AgentInfo("a", 1))
    journal.record_lease(lease)
    await journal.commit()
    journal.close()
    assert _load(path).leases == [lease]


async def test_retired_agents_leave_the_journal_and_busy_ones_stay(tmp_path: Path) -> None:
    """Retiring forgets idle agents (also in the journal) and keeps holders and waiters."""
    path = tmp_path / "k.db"
    async with Klock(backend=Scheduler(journal=SqliteJournal(path))) as klock:
        idle = await klock.register_agent("idle")
        holder = await klock.register_agent("holder")
        waiter = await klock.register_agent("waiter")  # never used: idle, but not named
        older = await klock.register_agent("older", priority=-1)  # older: it waits
        await holder.acquire("src/held.py", "MUTATES", ttl=30)
        waiting = asyncio.create_task(older.acquire("src/held.py", "MUTATES", ttl=30))
        scheduler = klock.backend
        assert isinstance(scheduler, Scheduler)
        # A task created after the waiting one posts after it: the request is queued by then.
        retire = scheduler.retire_idle_agents(["idle", "holder", "older", "nobody"])
        retired = await asyncio.create_task(retire)
        assert retired == ("idle",)
        assert {a.id for a in await klock.agents()} == {"holder", "waiter", "older"}
        waiting.cancel()
        del idle, waiter
    assert sorted(_rows(path, "SELECT id FROM agents")) == [("holder",), ("older",), ("waiter",)]


async def test_credentials_and_client_sessions_are_read_back(tmp_path: Path) -> None:
    """Credential digests and client sessions are committed with the batch and read back;
    a retired agent's go with it."""
    path = tmp_path / "klock.db"
    journal = SqliteJournal(path)
    journal.load()
    journal.record_credential("a", "0" * 64)
    journal.record_credential("b", "1" * 64)
    journal.record_client("a", "client-1", "digest-1")
    await journal.commit()
    journal.record_retired("b")
    await journal.commit()
    journal.close()
    again = SqliteJournal(path)
    again.load()
    assert again.credentials() == {"a": "0" * 64}
    assert again.client_sessions() == {"a": ("client-1", "digest-1")}
    again.close()


async def test_journal_without_credential_tables_opens(tmp_path: Path) -> None:
    """A journal written before credentials and client sessions were journaled opens, and
    gains their tables."""
    path = tmp_path / "klock.db"
    journal = SqliteJournal(path)
    journal.load()
    journal.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE credentials")
        db.execute("DROP TABLE client_sessions")
    db.close()
    again = SqliteJournal(path)
    again.load()
    assert again.credentials() == {}
    again.record_credential("a", "2" * 64)
    await again.commit()
    again.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT agent_id, digest FROM credentials").fetchall()
    db.close()
    assert rows == [("a", "2" * 64)]


async def test_request_key_survives_a_restart(tmp_path: Path) -> None:
    """A lease's request key is written with the lease and comes back on load."""
    path = tmp_path / "k.db"
    journal = SqliteJournal(path)
    journal.load()
    journal.record_agent(AgentInfo("a", 1))
    journal.record_lease(_lease("x", 1), "key-of-x")
    journal.record_lease(_lease("y", 2))
    await journal.commit()
    journal.close()
    state = _load(path)
    assert [lease.id for lease in state.leases] == ["x", "y"]
    assert state.request_keys == {"x": "key-of-x"}


async def test_request_key_is_cleared_by_a_later_record(tmp_path: Path) -> None:
    """A lease recorded again without its key (the key was spent) loses it in the journal."""
    path = tmp_path / "k.db"
    journal = SqliteJournal(path)
    journal.load()
    journal.record_agent(AgentInfo("a", 1))
    journal.record_lease(_lease("x", 1), "k")
    await journal.commit()
    journal.record_lease(_lease("x", 1))
    await journal.commit()
    journal.close()
    assert _load(path).request_keys == {}


async def test_older_journal_gains_the_request_key_column(tmp_path: Path) -> None:
    """A journal of schema 2 (leases without request keys) keeps its leases and gains the
    column."""
    path = tmp_path / "k.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE agents (id TEXT PRIMARY KEY, ts INTEGER NOT NULL);
        CREATE TABLE leases (id TEXT PRIMARY KEY, agent_id TEXT NOT NULL,
            session_id TEXT NOT NULL, resource TEXT NOT NULL, predicate TEXT NOT NULL,
            token INTEGER NOT NULL, ttl REAL NOT NULL, expires_at REAL NOT NULL);
        CREATE TABLE client_sessions (agent_id TEXT PRIMARY KEY, client_id TEXT NOT NULL,
            digest TEXT NOT NULL);
        CREATE TABLE credentials (agent_id TEXT PRIMARY KEY, digest TEXT NOT NULL);
        CREATE TABLE path_clocks (path TEXT PRIMARY KEY, clock TEXT NOT NULL);
        CREATE TABLE agent_clocks (agent_id TEXT PRIMARY KEY, clock TEXT NOT NULL);
        CREATE TABLE priorities (agent_id TEXT PRIMARY KEY, priority INTEGER NOT NULL);
        INSERT INTO meta VALUES ('last_token', 1);
        INSERT INTO agents VALUES ('a', 1);
        INSERT INTO leases VALUES ('old', 'a', 's', 'FILE:/src/old.py', 'MUTATES', 1, 30.0, 9e9);
        PRAGMA user_version=2;
        """
    )
    db.close()
    journal = SqliteJournal(path)
    state = journal.load()
    assert [lease.id for lease in state.leases] == ["old"]
    assert state.request_keys == {}
    journal.record_lease(_lease("new", 2), "k")
    await journal.commit()
    journal.close()
    assert _load(path).request_keys == {"new": "k"}
    assert _rows(path, "PRAGMA user_version") == [(3,)]


def test_current_journal_without_the_request_key_column_is_damaged(tmp_path: Path) -> None:
    """A journal of the current schema whose leases table lacks request_key is refused."""
    path = tmp_path / "k.db"
    _load(path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE leases DROP COLUMN request_key")
    db.commit()
    db.close()
    journal = SqliteJournal(path)
    with pytest.raises(JournalError, match="lacks its column 'request_key'"):
        journal.load()
    journal.close()


async def test_a_lock_is_waited_for_on_the_worker_thread_not_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit written on the loop fails at once on a locked file and waits on the worker
    thread instead: the loop goes on meanwhile (here it releases the lock itself)."""
    from klock_async import journal as journal_module

    monkeypatch.setattr(journal_module, "INLINE_COMMIT", 3600.0)  # no commit counts as slow
    path = tmp_path / "k.db"
    journal = SqliteJournal(path, timeout=30)
    journal.load()
    assert journal.inline
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        journal.record_agent(AgentInfo("a", 1))
        commit = asyncio.ensure_future(journal.commit())
        # Runs only if the loop is free while the commit waits: were it blocked for the
        # busy timeout, the commit would fail after 30 s instead.
        asyncio.get_running_loop().call_soon(blocker.execute, "ROLLBACK")
        await commit
    finally:
        blocker.close()
    assert _rows(path, "SELECT id FROM agents") == [("a",)]
    assert journal.inline  # the lock is gone: commits are written on the loop again
    journal.record_agent(AgentInfo("b", 1))
    await journal.commit()
    assert journal.inline
    journal.close()
    assert _rows(path, "SELECT id FROM agents ORDER BY id") == [("a",), ("b",)]


async def test_a_slow_commit_moves_the_next_ones_to_the_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit slower than INLINE_COMMIT sends the next ones to the worker thread; one
    fast enough there brings them back to the loop. Every batch is written either way."""
    from klock_async import journal as journal_module

    path = tmp_path / "k.db"
    journal = SqliteJournal(path)
    journal.load()
    monkeypatch.setattr(journal_module, "INLINE_COMMIT", 0.0)  # every commit is slow
    journal.record_agent(AgentInfo("a", 1))
    await journal.commit()
    assert not journal.inline
    journal.record_agent(AgentInfo("b", 1))
    await journal.commit()  # on the thread
    assert not journal.inline
    monkeypatch.setattr(journal_module, "INLINE_COMMIT", 3600.0)  # every commit is fast
    journal.record_agent(AgentInfo("c", 1))
    await journal.commit()  # still on the thread: fast, so the next is on the loop
    assert journal.inline
    journal.close()
    assert _rows(path, "SELECT id FROM agents ORDER BY id") == [("a",), ("b",), ("c",)]
