"""The durable journal: the scheduler's state in a SQLite file, one transaction per batch.

:class:`SqliteJournal` implements :class:`~klock_async.scheduler.Journal`. The scheduler actor
buffers every change of a mailbox batch with the ``record_*`` calls, then awaits
:meth:`SqliteJournal.commit`, which writes the whole buffer in one transaction on a worker
thread (the event loop keeps serving requests meanwhile) and returns once it is on disk. Only
then does the actor resolve the batch's replies (group commit): a client never sees a grant
that a crash could take back.

What is stored, and why that is enough to continue where the previous run stopped:

- ``agents``: every registered agent and its age (ages never change, so Wait-Die stays fair
  across restarts);
- ``leases``: the *active* leases only, with their wall-clock expiry. A lease that ends is
  deleted in the same transaction that records the end, so the table stays as small as the
  lease table in memory;
- ``meta``: the highest fencing token and agent age ever handed out, and the count of
  non-strict causal conflicts. Tokens continue above ``last_token`` after a restart, also when
  the lease that carried the highest token was released long ago;
- ``path_clocks`` and ``agent_clocks``: the vector clocks, as JSON objects.

The database runs in WAL mode. ``synchronous="FULL"`` (the default) makes every commit survive
a power loss; ``"NORMAL"`` survives a crash of the process (SIGKILL) but may lose the last
commits on a power loss, and is faster.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from klock_async.clocks import VectorClock
from klock_async.model import AgentInfo, LeaseInfo, LeaseState, Predicate, Resource
from klock_async.scheduler import RecoveredState

__all__ = ["SqliteJournal"]

_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    ts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    resource TEXT NOT NULL,
    predicate TEXT NOT NULL,
    token INTEGER NOT NULL,
    ttl REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS path_clocks (
    path TEXT PRIMARY KEY,
    clock TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_clocks (
    agent_id TEXT PRIMARY KEY,
    clock TEXT NOT NULL
);
"""

_SYNCHRONOUS = ("FULL", "NORMAL")


@dataclass(slots=True)
class _Batch:
    """Changes buffered since the last commit; later records of one key replace earlier ones."""

    agents: dict[str, AgentInfo] = field(default_factory=dict)
    leases: dict[str, LeaseInfo] = field(default_factory=dict)
    path_clocks: dict[str, VectorClock] = field(default_factory=dict)
    agent_clocks: dict[str, VectorClock] = field(default_factory=dict)
    meta: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.agents or self.leases or self.path_clocks or self.agent_clocks or self.meta
        )


class SqliteJournal:
    """A durable journal in one SQLite file (WAL mode), written by the scheduler actor only.

    Pass it to :class:`~klock_async.scheduler.Scheduler` (``Scheduler(journal=...)``) or run
    ``klock serve --db PATH``. The scheduler calls :meth:`load` once on start, ``record_*``
    while it handles a batch, :meth:`commit` at the end of each batch and :meth:`close` on
    shutdown. The ``record_*`` calls only buffer; they never touch the file.

    Args:
        path: the database file; created (with its schema) when missing.
        synchronous: ``"FULL"`` (durable across power loss, the default) or ``"NORMAL"``
            (durable across a process crash only, faster).
        timeout: seconds a commit waits for a lock held by another process on the same file
            before it fails.

    Raises:
        ValueError: unknown ``synchronous`` mode.
    """

    def __init__(
        self, path: str | Path, *, synchronous: str = "FULL", timeout: float = 5.0
    ) -> None:
        mode = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if mode not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}"
            )
        self.path = Path(path)
        self._synchronous = mode
        self._timeout = timeout
        self._db: sqlite3.Connection | None = None
        # One worker thread writes, so at most one transaction is ever in flight and close()
        # can wait for it.
        self._writer: ThreadPoolExecutor | None = None
        self._batch = _Batch()
        self._commits = 0

    def __repr__(self) -> str:
        return f"<SqliteJournal {str(self.path)!r} synchronous={self._synchronous}>"

    @property
    def commits(self) -> int:
        """How many transactions were written (empty batches write none)."""
        return self._commits

    # ---------------------------------------------------------------- Journal protocol

    def load(self) -> RecoveredState:
        """Open (or create) the database and read the state left by the previous run.

        Raises:
            sqlite3.DatabaseError: the file is not a klock journal, or is from a newer version.
        """
        db = self._open()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{self.path} was written by a newer klock_async (journal schema {version}, "
                f"this one reads up to {_SCHEMA_VERSION}); upgrade klock_async"
            )
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        agents = [AgentInfo(row[0], row[1]) for row in db.execute("SELECT id, ts FROM agents")]
        leases = [
            LeaseInfo(
                id=row[0],
                agent_id=row[1],
                session_id=row[2],
                resource=Resource.parse(row[3]),
                predicate=Predicate.parse(row[4]),
                token=row[5],
                ttl=row[6],
                expires_at=row[7],
            )
            for row in db.execute(
                "SELECT id, agent_id, session_id, resource, predicate, token, ttl, expires_at "
                "FROM leases ORDER BY token"
            )
        ]
        path_clocks = {
            row[0]: json.loads(row[1]) for row in db.execute("SELECT path, clock FROM path_clocks")
        }
        agent_clocks = {
            row[0]: json.loads(row[1])
            for row in db.execute("SELECT agent_id, clock FROM agent_clocks")
        }
        highest_lease_token = max((lease.token for lease in leases), default=0)
        return RecoveredState(
            agents=agents,
            leases=leases,
            last_token=max(meta.get("last_token", 0), highest_lease_token),
            last_agent_ts=meta.get("last_agent_ts", 0),
            path_clocks=path_clocks,
            agent_clocks=agent_clocks,
            conflict_count=meta.get("conflict_count", 0),
        )

    def record_agent(self, agent: AgentInfo) -> None:
        """Buffer a registered agent."""
        self._batch.agents[agent.agent_id] = agent

    def record_lease(self, lease: LeaseInfo) -> None:
        """Buffer a granted, extended or ended lease (an ended one is deleted on commit)."""
        self._batch.leases[lease.id] = lease

    def record_clocks(
        self,
        path: str,
        path_clock: VectorClock,
        agent_id: str,
        agent_clock: VectorClock,
        conflict_count: int,
    ) -> None:
        """Buffer the clocks a clock operation changed, and the conflict count."""
        batch = self._batch
        if path_clock:
            batch.path_clocks[path] = path_clock
        if agent_clock:
            batch.agent_clocks[agent_id] = agent_clock
        batch.meta["conflict_count"] = conflict_count

    def record_counters(self, last_token: int, last_agent_ts: int) -> None:
        """Buffer the highest fencing token and agent age handed out."""
        meta = self._batch.meta
        meta["last_token"] = last_token
        meta["last_agent_ts"] = last_agent_ts

    async def commit(self) -> None:
        """Write everything buffered since the last commit in one transaction.

        Runs on the journal's worker thread; returns once the transaction is durable. An
        empty buffer writes nothing.

        Raises:
            RuntimeError: the journal was not loaded, or was closed.
            sqlite3.Error: the write failed (the transaction was rolled back).
        """
        if not self._batch:
            return
        batch, self._batch = self._batch, _Batch()
        if self._writer is None:
            raise RuntimeError(f"{self!r} is not open; call load() first")
        loop = asyncio.get_running_loop()
        await asyncio.shield(loop.run_in_executor(self._writer, self._write, batch))

    def close(self) -> None:
        """Wait for a transaction in flight, then close the database. Idempotent."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)
        db, self._db = self._db, None
        if db is not None:
            db.close()

    # ---------------------------------------------------------------- internals

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Used by the loop thread (load, close) and the writer thread (commit), never by both
        # at once: the actor awaits each commit before it records or commits again.
        db = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        self._db = db
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="klock-journal")
        return db

    def _write(self, batch: _Batch) -> None:
        db = self._db
        if db is None:
            raise RuntimeError(f"{self!r} was closed before a commit could be written")
        ended = []
        active = []
        for lease in batch.leases.values():
            if lease.state is LeaseState.ACTIVE:
                active.append(
                    (
                        lease.id,
                        lease.agent_id,
                        lease.session_id,
                        str(lease.resource),
                        lease.predicate.value,
                        lease.token,
                        lease.ttl,
                        lease.expires_at,
                    )
                )
            else:
                ended.append((lease.id,))
        db.execute("BEGIN IMMEDIATE")
        try:
            if batch.agents:
                db.executemany(
                    "INSERT OR REPLACE INTO agents (id, ts) VALUES (?, ?)",
                    [(a.agent_id, a.ts) for a in batch.agents.values()],
                )
            if active:
                db.executemany(
                    "INSERT OR REPLACE INTO leases (id, agent_id, session_id, resource, "
                    "predicate, token, ttl, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    active,
                )
            if ended:
                db.executemany("DELETE FROM leases WHERE id = ?", ended)
            if batch.path_clocks:
                db.executemany(
                    "INSERT OR REPLACE INTO path_clocks (path, clock) VALUES (?, ?)",
                    [(p, _dump(c)) for p, c in batch.path_clocks.items()],
                )
            if batch.agent_clocks:
                db.executemany(
                    "INSERT OR REPLACE INTO agent_clocks (agent_id, clock) VALUES (?, ?)",
                    [(a, _dump(c)) for a, c in batch.agent_clocks.items()],
                )
            if batch.meta:
                # Counters only grow; MAX keeps that true even if an older batch were replayed.
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                    "DO UPDATE SET value = MAX(value, excluded.value)",
                    list(batch.meta.items()),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._commits += 1


def _dump(clock: VectorClock) -> str:
    return json.dumps(clock.as_dict(), sort_keys=True, separators=(",", ":"))
