"""Tests for klock_async.postgres: the PostgreSQL journal on its own, against a real server."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgutil import Cluster

from klock_async import JournalError, LeadershipLostError
from klock_async.clocks import VectorClock
from klock_async.leader import LeaderLease
from klock_async.model import AgentInfo, LeaseInfo, LeaseState, Predicate, Resource
from klock_async.postgres import SCHEMA_VERSION, PostgresJournal, prepare_schema, redact


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


async def _leading(url: str) -> tuple[LeaderLease, PostgresJournal]:
    """A journal of a replica that won the lease."""
    await prepare_schema(url)
    lease = LeaderLease(url, advertise="http://127.0.0.1:1", ttl=30.0)
    journal = PostgresJournal(url)
    await journal.prepare(await lease.campaign())
    return lease, journal


async def test_empty_database_loads_empty_state(pg_url: str) -> None:
    """A new database gets the journal's tables and starts with nothing and counters at 0."""
    lease, journal = await _leading(pg_url)
    state = journal.load()
    await journal.aclose()
    await lease.aclose()
    assert (state.agents, state.leases, state.path_clocks, state.agent_clocks) == ([], [], {}, {})
    assert (state.last_token, state.last_agent_ts, state.conflict_count) == (0, 0, 0)


async def test_committed_batch_is_read_back_by_the_next_leader(pg_url: str) -> None:
    """Everything committed comes back to the replica that leads next, under a higher term."""
    lease, journal = await _leading(pg_url)
    journal.load()
    journal.record_agent(AgentInfo("a", 1))
    journal.record_agent(AgentInfo("b", 7))
    journal.record_lease(_lease("x", 1))
    journal.record_lease(_lease("y", 2))
    journal.record_lease(_lease("z", 3))
    journal.record_counters(3, 1)
    journal.record_clocks("FILE:/p", VectorClock({"a": 1}), "a", VectorClock({"a": 1}), 0)
    journal.record_clocks("FILE:/q", VectorClock({"b": 2}), "b", VectorClock({"b": 2}), 3)
    await journal.commit()
    journal.record_lease(_lease("z", 3, LeaseState.RELEASED))
    journal.record_retired("b")
    await journal.commit()
    assert journal.commits == 2
    await journal.aclose()
    await lease.resign()

    lease2, again = await _leading(pg_url)
    state = again.load()
    await again.aclose()
    await lease2.aclose()
    assert lease2.term == lease.term + 1
    assert state.agents == [AgentInfo("a", 1)]
    assert state.leases == [_lease("x", 1), _lease("y", 2)]
    assert (state.last_token, state.last_agent_ts, state.conflict_count) == (3, 1, 3)
    assert state.path_clocks == {"FILE:/p": {"a": 1}, "FILE:/q": {"b": 2}}


async def test_explicit_priorities_are_read_back_by_the_next_leader(pg_url: str) -> None:
    """Explicit priorities come back to the next leader; a retired agent's leaves with it."""
    lease, journal = await _leading(pg_url)
    journal.load()
    journal.record_agent(AgentInfo("vip", 1), priority=500)
    journal.record_agent(AgentInfo("gone", 2), priority=400)
    journal.record_agent(AgentInfo("auto", 3))
    await journal.commit()
    journal.record_retired("gone")
    await journal.commit()
    await journal.aclose()
    await lease.resign()

    lease2, again = await _leading(pg_url)
    state = again.load()
    await again.aclose()
    await lease2.aclose()
    assert state.priorities == {"vip": 500}


async def test_commit_after_another_replica_took_over_writes_nothing(
    pg_url: str, postgres_cluster: Cluster
) -> None:
    """A fenced write: once the term moved on, a commit is refused and writes no row."""
    lease, journal = await _leading(pg_url)
    journal.load()
    journal.record_agent(AgentInfo("a", 1))
    await journal.commit()
    # Another replica raises the term (as its takeover does).
    postgres_cluster.sql(pg_url, "UPDATE klock_leader SET term = term + 1")
    journal.record_lease(_lease("x", 1))
    journal.record_counters(1, 1)
    with pytest.raises(LeadershipLostError, match="another replica leads now"):
        await journal.commit()
    with pytest.raises(LeadershipLostError):  # and it stays refused
        await journal.commit()
    await journal.aclose()
    await lease.aclose()
    rows = postgres_cluster.sql(pg_url, "SELECT count(*) FROM klock_leases")
    assert rows == "0"


async def test_foreign_tables_are_refused_without_init(
    pg_url: str, postgres_cluster: Cluster
) -> None:
    """A database holding other tables is not made a journal unless asked (--init)."""
    postgres_cluster.sql(pg_url, "CREATE TABLE orders (id int)")
    with pytest.raises(JournalError, match=r"no klock journal.*pass --init"):
        await prepare_schema(pg_url)
    await prepare_schema(pg_url, init=True)
    await prepare_schema(pg_url)  # a journal now


async def test_journal_table_with_other_columns_is_refused(
    pg_url: str, postgres_cluster: Cluster
) -> None:
    """A klock_ table that is not the journal's is named, never written to."""
    await prepare_schema(pg_url)
    postgres_cluster.sql(pg_url, "ALTER TABLE klock_leases DROP COLUMN ttl")
    with pytest.raises(JournalError, match="klock_leases has columns"):
        await prepare_schema(pg_url)


def test_redact_hides_the_password() -> None:
    """URLs in logs and errors never show a password."""
    assert redact("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


async def test_older_journal_gets_the_tables_added_since(
    pg_url: str, postgres_cluster: Cluster
) -> None:
    """An older schema gains the tables added since; a current one missing one is damaged."""
    await prepare_schema(pg_url)
    postgres_cluster.sql(pg_url, "DROP TABLE klock_agent_clocks")
    with pytest.raises(JournalError, match="damaged klock journal: table klock_agent_clocks"):
        await prepare_schema(pg_url)
    postgres_cluster.sql(pg_url, "UPDATE klock_meta SET value = 0 WHERE key = 'schema_version'")
    await prepare_schema(pg_url)
    version = postgres_cluster.sql(
        pg_url, "SELECT value FROM klock_meta WHERE key = 'schema_version'"
    )
    assert version == str(SCHEMA_VERSION)
    assert postgres_cluster.sql(pg_url, "SELECT count(*) FROM klock_agent_clocks") == "0"
    assert postgres_cluster.sql(pg_url, "SELECT count(*) FROM klock_priorities") == "0"


_STEPS = st.lists(
    st.tuples(st.sampled_from(["take", "commit"]), st.sampled_from(["a", "b"])), max_size=10
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=_STEPS)
def test_only_the_current_term_commits_in_any_interleaving(
    pg_url: str, postgres_cluster: Cluster, steps: list[tuple[str, str]]
) -> None:
    """In any order of two replicas' takeovers and commits, only the current term's commits land."""
    asyncio.run(prepare_schema(pg_url))
    postgres_cluster.sql(pg_url, "TRUNCATE klock_agents; UPDATE klock_leader SET term = 0")

    async def run() -> tuple[set[str], set[str]]:
        leases = {name: LeaderLease(pg_url, advertise=f"http://{name}:1") for name in "ab"}
        journals: dict[str, PostgresJournal] = {}
        current = None  # who holds the term in the database
        committed: set[str] = set()
        for i, (step, name) in enumerate(steps):
            if step == "take":
                conn = await leases[name]._session()
                seen = await conn.fetchval("SELECT term FROM klock_leader")
                assert await leases[name]._take(conn, seen, ended=True)
                if name in journals:
                    await journals[name].aclose()
                journal = journals[name] = PostgresJournal(pg_url)
                await journal.prepare(leases[name].term)
                journal.load()
                current = name
            elif name in journals:
                journals[name].record_agent(AgentInfo(f"agent{i}", i))
                if name == current:
                    await journals[name].commit()
                    committed.add(f"agent{i}")
                else:
                    with pytest.raises(LeadershipLostError):
                        await journals[name].commit()
        for journal in journals.values():
            await journal.aclose()
        for lease in leases.values():
            await lease.aclose()
        rows = postgres_cluster.sql(pg_url, "SELECT string_agg(id, ',') FROM klock_agents")
        return committed, set(filter(None, rows.split(",")))

    committed, stored = asyncio.run(run())
    assert stored == committed


async def test_request_key_survives_a_failover(pg_url: str) -> None:
    """A lease's request key is committed with the lease and read back by the next leader."""
    lease, journal = await _leading(pg_url)
    journal.load()
    journal.record_agent(AgentInfo("a", 1))
    journal.record_lease(_lease("x", 1), "key-of-x")
    journal.record_lease(_lease("y", 2))
    await journal.commit()
    await journal.aclose()
    await lease.aclose()
    lease, journal = await _leading(pg_url)
    state = journal.load()
    await journal.aclose()
    await lease.aclose()
    assert [x.id for x in state.leases] == ["x", "y"]
    assert state.request_keys == {"x": "key-of-x"}


async def test_older_journal_gains_the_request_key_column(
    pg_url: str, postgres_cluster: Cluster
) -> None:
    """A journal of schema 2 (leases without request keys) gains the column, keeping its rows;
    one of schema 3 without it is refused."""
    await prepare_schema(pg_url)
    postgres_cluster.sql(pg_url, "ALTER TABLE klock_leases DROP COLUMN request_key")
    with pytest.raises(JournalError, match="klock_leases has columns"):
        await prepare_schema(pg_url)
    postgres_cluster.sql(
        pg_url,
        "INSERT INTO klock_agents VALUES ('a', 1); "
        "INSERT INTO klock_leases VALUES ('old', 'a', 's', 'FILE:/o', 'MUTATES', 1, 30, 9e9); "
        "UPDATE klock_meta SET value = 2 WHERE key = 'schema_version'",
    )
    lease, journal = await _leading(pg_url)
    state = journal.load()
    journal.record_lease(_lease("new", 2), "k")
    await journal.commit()
    await journal.aclose()
    await lease.aclose()
    assert [x.id for x in state.leases] == ["old"]
    assert (
        postgres_cluster.sql(pg_url, "SELECT request_key FROM klock_leases WHERE id = 'new'") == "k"
    )
    version = postgres_cluster.sql(
        pg_url, "SELECT value FROM klock_meta WHERE key = 'schema_version'"
    )
    assert version == str(SCHEMA_VERSION) == "3"
