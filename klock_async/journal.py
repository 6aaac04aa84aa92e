"""The durable journal: the scheduler's state in a database, one transaction per batch.

:class:`BufferedJournal` implements :class:`~klock_async.scheduler.Journal` once for every
database: the scheduler actor buffers every change of a mailbox batch with the ``record_*``
calls, then awaits ``commit``, which writes the whole buffer in one transaction and returns once
it is durable. Only then does the actor resolve the batch's replies (group commit): a client
never sees a grant that a crash could take back. :class:`SqliteJournal` writes a SQLite file on
a worker thread (the event loop keeps serving requests meanwhile);
:class:`~klock_async.postgres.PostgresJournal` writes PostgreSQL, fenced by the leader's term.

Both store the same tables (:data:`TABLES`, rows built by :meth:`_Batch.changes` and read back
by :func:`recover`), so a new kind of record is added once: a ``_Batch`` field, a ``record_*``
method, an entry in :data:`TABLES` with its rows and its parsing in :func:`recover`, and one
``CREATE TABLE`` line per database.

What is stored, and why that is enough to continue where the previous run stopped:

- ``agents``: every registered agent and its age (ages never change, so Wait-Die stays fair
  across restarts); ``priorities``: the agents registered with an explicit priority, which
  orders them before every automatic age;
- ``leases``: the *active* leases only, with their wall-clock expiry and the request key of
  the acquire that was granted them (written by the grant's own commit, so a resend of that
  acquire after a restart or failover is answered with the same leases). A lease that ends is
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
import contextlib
import json
import math
import sqlite3
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from klock_async.clocks import VectorClock
from klock_async.errors import (
    InvalidRequestError,
    JournalError,
    JournalUnavailableError,
    KlockError,
)
from klock_async.model import AgentInfo, LeaseInfo, LeaseState, Predicate, Resource
from klock_async.scheduler import RecoveredState

__all__ = [
    "COLUMNS_ADDED_IN",
    "TABLES",
    "BufferedJournal",
    "Change",
    "SqliteJournal",
    "backup",
    "recover",
]

_TABLES = ("meta", "agents", "leases", "path_clocks", "agent_clocks", "priorities")
_INT64 = 2**63

_SCHEMA_VERSION = 3
_ADDED_IN = {"priorities": 2}
"""Tables added after the first schema, with the version that added them (an older journal
lacks them and gets them created empty)."""
COLUMNS_ADDED_IN = {("leases", "request_key"): 3}
"""Columns added after the first schema, with the version that added them (an older journal
lacks them and gets them added, empty: NULL, in every row). Both databases use it."""

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
    expires_at REAL NOT NULL,
    request_key TEXT
);
CREATE TABLE IF NOT EXISTS client_sessions (
    agent_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS credentials (
    agent_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS path_clocks (
    path TEXT PRIMARY KEY,
    clock TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_clocks (
    agent_id TEXT PRIMARY KEY,
    clock TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS priorities (
    agent_id TEXT PRIMARY KEY,
    priority INTEGER NOT NULL
);
"""

_SYNCHRONOUS = ("FULL", "NORMAL")
INLINE_COMMIT = 0.002
"""Seconds: a SQLite commit that took longer moves the next ones off the event loop (see
:meth:`SqliteJournal.commit`); one on the machine of docs/benchmarks.md takes about 0.1 ms."""

TABLES: dict[str, tuple[str, ...]] = {
    "agents": ("id", "ts"),
    "leases": (
        "id",
        "agent_id",
        "session_id",
        "resource",
        "predicate",
        "token",
        "ttl",
        "expires_at",
        "request_key",
    ),
    "path_clocks": ("path", "clock"),
    "agent_clocks": ("agent_id", "clock"),
    # The server's records, beside the kernel's: the client session that registered an agent
    # (its id and the digest of its resume secret) and the digest of an agent's credential.
    "client_sessions": ("agent_id", "client_id", "digest"),
    "credentials": ("agent_id", "digest"),
    "priorities": ("agent_id", "priority"),
}
"""The journal's record tables and their columns, the key first (``meta`` is apart: counters)."""


@dataclass(frozen=True, slots=True)
class Change:
    """What one commit does to one table: rows to insert or replace, keys to delete."""

    table: str
    upserts: list[tuple[object, ...]]
    deletes: list[str]


@dataclass(slots=True)
class _Batch:
    """Changes buffered since the last commit; later records of one key replace earlier ones."""

    agents: dict[str, AgentInfo] = field(default_factory=dict)
    leases: dict[str, LeaseInfo] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # lease id -> request key (of ``leases``)
    path_clocks: dict[str, VectorClock] = field(default_factory=dict)
    agent_clocks: dict[str, VectorClock] = field(default_factory=dict)
    meta: dict[str, int] = field(default_factory=dict)
    retired: set[str] = field(default_factory=set)
    # agent -> (client id, secret digest) of the client session that registered it; None: ended
    clients: dict[str, tuple[str, str] | None] = field(default_factory=dict)
    # agent -> digest of its credential; None: forgotten
    credentials: dict[str, str | None] = field(default_factory=dict)
    priorities: dict[str, int] = field(default_factory=dict)  # of agents in ``agents``

    def __bool__(self) -> bool:
        return bool(
            self.agents
            or self.leases
            or self.path_clocks
            or self.agent_clocks
            or self.meta
            or self.retired
            or self.clients
            or self.credentials
            or self.priorities
        )

    def under(self, newer: _Batch) -> _Batch:
        """This batch with ``newer`` recorded after it (a failed batch kept for the next)."""
        return _Batch(
            {**self.agents, **newer.agents},
            {**self.leases, **newer.leases},
            {k: v for k, v in self.keys.items() if k not in newer.leases} | newer.keys,
            {**self.path_clocks, **newer.path_clocks},
            {**self.agent_clocks, **newer.agent_clocks},
            {**self.meta, **newer.meta},
            (self.retired - newer.agents.keys()) | newer.retired,
            {**self.clients, **newer.clients},
            {**self.credentials, **newer.credentials},
            {**self.priorities, **newer.priorities},
        )

    def storable(self) -> _Batch:
        """The records a database can store: text that is valid UTF-8, integers within 64 bits."""
        return _Batch(
            {k: a for k, a in self.agents.items() if _fits(a.id, a.ts)},
            {
                k: x
                for k, x in self.leases.items()
                if _fits(x.id, x.agent_id, x.session_id, str(x.resource), x.token)
            },
            {k: v for k, v in self.keys.items() if _fits(v)},
            {k: c for k, c in self.path_clocks.items() if _fits(k, *_flat(c))},
            {k: c for k, c in self.agent_clocks.items() if _fits(k, *_flat(c))},
            {k: v for k, v in self.meta.items() if _fits(v)},
            {k for k in self.retired if _fits(k)},
            {k: c for k, c in self.clients.items() if _fits(k, *(c or ()))},
            {k: d for k, d in self.credentials.items() if _fits(k, d or "")},
            {k: p for k, p in self.priorities.items() if _fits(k, p)},
        )

    def changes(self) -> list[Change]:
        """The batch as rows of :data:`TABLES` (keys within one table are distinct)."""
        active: list[tuple[object, ...]] = []
        ended = []
        for lease in self.leases.values():
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
                        self.keys.get(lease.id),
                    )
                )
            else:
                ended.append(lease.id)
        return [
            Change(
                "agents", [(a.agent_id, a.ts) for a in self.agents.values()], list(self.retired)
            ),
            Change("leases", active, ended),
            Change("path_clocks", [(p, _dump(c)) for p, c in self.path_clocks.items()], []),
            Change("agent_clocks", [(a, _dump(c)) for a, c in self.agent_clocks.items()], []),
            Change(
                "client_sessions",
                [(a, *c) for a, c in self.clients.items() if c is not None],
                [a for a, c in self.clients.items() if c is None],
            ),
            Change(
                "credentials",
                [(a, d) for a, d in self.credentials.items() if d is not None],
                [a for a, d in self.credentials.items() if d is None],
            ),
            Change(
                "priorities",
                list(self.priorities.items()),
                # A retired agent's priority leaves with it; one registered again without a
                # priority keeps none from before.
                [a for a in (self.retired | self.agents.keys()) if a not in self.priorities],
            ),
        ]


def _flat(clock: VectorClock) -> list[str | int]:
    items: list[str | int] = []
    for agent_id, count in clock.as_dict().items():
        items += (agent_id, count)
    return items


def _fits(*values: str | int) -> bool:
    for value in values:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return False
            if "\x00" in value:  # neither PostgreSQL text nor a C string holds it
                return False
        elif not -_INT64 <= value < _INT64:
            return False
    return True


class BufferedJournal:
    """The ``record_*`` half of a journal: buffers a batch that a subclass commits.

    Subclasses implement ``load``, ``commit`` (taking the batch with :meth:`_take`) and
    ``close``. The ``record_*`` calls never touch the database.
    """

    def __init__(self) -> None:
        self._batch = _Batch()
        self._commits = 0
        self._clients: dict[str, tuple[str, str]] = {}
        self._credentials: dict[str, str] = {}
        self.generation = 0
        """How many times the journal was loaded, this load included (0 before ``load``)."""

    @property
    def commits(self) -> int:
        """How many transactions were written (empty batches write none)."""
        return self._commits

    def record_agent(self, agent: AgentInfo, priority: int | None = None) -> None:
        """Buffer a registered agent, with its explicit priority if it was given one."""
        batch = self._batch
        batch.agents[agent.agent_id] = agent
        batch.retired.discard(agent.agent_id)
        if priority is None:
            batch.priorities.pop(agent.agent_id, None)
        else:
            batch.priorities[agent.agent_id] = priority

    def record_retired(self, agent_id: str) -> None:
        """Buffer the removal of a retired agent (it holds no lease), with its credential and
        client session: its id is free again."""
        self._batch.agents.pop(agent_id, None)
        self._batch.priorities.pop(agent_id, None)
        self._batch.retired.add(agent_id)
        self._batch.credentials[agent_id] = None
        self._batch.clients[agent_id] = None

    def record_lease(self, lease: LeaseInfo, request_key: str | None = None) -> None:
        """Buffer a granted, extended or ended lease (an ended one is deleted on commit), with
        the request key of the acquire it was granted to (None: none, or no longer)."""
        batch = self._batch
        batch.leases[lease.id] = lease
        if request_key is not None:
            batch.keys[lease.id] = request_key
        elif batch.keys:
            batch.keys.pop(lease.id, None)

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

    def record_client(self, agent_id: str, client_id: str | None, digest: str) -> None:
        """Buffer the client session that registered ``agent_id`` (``client_id`` None: it
        ended); written by the commit that also writes the agent's registration."""
        self._batch.clients[agent_id] = None if client_id is None else (client_id, digest)

    def record_credential(self, agent_id: str, digest: str | None) -> None:
        """Buffer the digest of an agent's credential (None: forget it); written by the
        commit of the agent's registration, before the secret is handed out."""
        self._batch.credentials[agent_id] = digest

    def client_sessions(self) -> dict[str, tuple[str, str]]:
        """The client session of each agent a client registered, as loaded: agent ->
        (client id, digest of its resume secret)."""
        return dict(self._clients)

    def credentials(self) -> dict[str, str]:
        """The digest of each credentialed agent's credential, as loaded."""
        return dict(self._credentials)

    def _recover_server_rows(
        self, source: object, rows: Mapping[str, Iterable[Sequence[object]]]
    ) -> None:
        """Keep the server's records (client sessions, credentials) of a load.

        Raises:
            JournalError: a row does not parse.
        """
        clients: dict[str, tuple[str, str]] = {}
        for agent_id, client_id, digest in rows.get("client_sessions", ()):
            where = f"{source}: client_sessions row {agent_id!r}"
            clients[_string(agent_id, where)] = (_string(client_id, where), _string(digest, where))
        credentials: dict[str, str] = {}
        for agent_id, digest in rows.get("credentials", ()):
            where = f"{source}: credentials row {agent_id!r}"
            text = _string(digest, where)
            if len(text) != 64:
                raise JournalError(f"{where} is damaged; restore the journal from a backup")
            credentials[_string(agent_id, where)] = text
        self._clients, self._credentials = clients, credentials

    def _take(self) -> _Batch:
        """The buffered batch, leaving an empty buffer behind."""
        batch, self._batch = self._batch, _Batch()
        return batch

    def _keep(self, batch: _Batch) -> None:
        """Put back a batch that failed to commit, to be written with the next one."""
        self._batch = batch.under(self._batch)


def recover(
    source: object, meta: dict[str, int], rows: Mapping[str, Iterable[Sequence[object]]]
) -> RecoveredState:
    """Rebuild the scheduler's state from a journal's rows (columns as in :data:`TABLES`).

    Every row must parse: one that does not stops the load with an error naming ``source`` and
    the row, never a silent drop.

    Raises:
        JournalError: a row does not parse, or a lease belongs to no agent.
    """
    agents = []
    ages: dict[str, int] = {}
    for agent_id, ts in rows["agents"]:
        where = f"agents row {agent_id!r}"
        ages[_string(agent_id, where)] = _integer(ts, where)
        agents.append(AgentInfo(agent_id, ts))  # type: ignore[arg-type]  # checked just above
    keys: dict[str, str] = {}
    leases = sorted((_lease(source, row, ages, keys) for row in rows["leases"]), key=_by_token)
    path_clocks = {
        _string(path, "path_clocks row"): _clock(clock, f"path_clocks row {path!r}")
        for path, clock in rows["path_clocks"]
    }
    agent_clocks = {
        _string(agent_id, "agent_clocks row"): _clock(clock, f"agent_clocks row {agent_id!r}")
        for agent_id, clock in rows["agent_clocks"]
    }
    priorities = {
        _string(agent_id, "priorities row"): _integer(priority, f"priorities row {agent_id!r}")
        for agent_id, priority in rows.get("priorities", ())  # absent from older journals
    }
    unknown = sorted(priorities.keys() - ages.keys())
    if unknown:
        raise JournalError(
            f"{source}: priorities row {unknown[0]!r} belongs to no row in 'agents'; the journal "
            "is damaged: restore it from a backup"
        )
    highest_lease_token = max((lease.token for lease in leases), default=0)
    return RecoveredState(
        agents=agents,
        leases=leases,
        last_token=max(meta.get("last_token", 0), highest_lease_token),
        last_agent_ts=meta.get("last_agent_ts", 0),
        path_clocks=path_clocks,
        agent_clocks=agent_clocks,
        conflict_count=meta.get("conflict_count", 0),
        priorities=priorities,
        request_keys=keys,
    )


def _by_token(lease: LeaseInfo) -> int:
    return lease.token


def _lease(
    source: object, row: Sequence[object], ages: dict[str, int], keys: dict[str, str]
) -> LeaseInfo:
    lease_id, agent_id, session_id, resource, predicate, token, ttl, expires_at, key = row
    where = f"leases row {lease_id!r}"
    if key is not None:
        keys[_string(lease_id, where)] = _string(key, where)
    try:
        info = LeaseInfo(
            id=_string(lease_id, where),
            agent_id=_string(agent_id, where),
            session_id=_string(session_id, where),
            resource=Resource.parse(_string(resource, where)),
            predicate=Predicate.parse(_string(predicate, where)),
            token=_integer(token, where),
            ttl=_real(ttl, where),
            expires_at=_real(expires_at, where),
        )
    except InvalidRequestError as exc:
        raise JournalError(f"{source}: {where}: {exc.message}") from None
    if info.agent_id not in ages:
        raise JournalError(
            f"{source}: {where} belongs to agent {info.agent_id!r}, which has no row in "
            "'agents'; the journal is damaged: restore it from a backup"
        )
    if info.token <= 0 or info.ttl <= 0:
        raise JournalError(f"{source}: {where} has a token or ttl that is not positive")
    return info


class SqliteJournal(BufferedJournal):
    """A durable journal in one SQLite file (WAL mode), written by the scheduler actor only.

    Pass it to :class:`~klock_async.scheduler.Scheduler` (``Scheduler(journal=...)``) or run
    ``klock serve --db PATH``. The scheduler calls :meth:`load` once on start, ``record_*``
    while it handles a batch, :meth:`commit` at the end of each batch and :meth:`close` on
    shutdown. The ``record_*`` calls only buffer; they never touch the file.

    Args:
        path: the database file; created (with its schema) when missing. An existing file
            must be a klock journal, unless ``init``.
        init: also make a journal of an existing file that is empty or a SQLite database
            without the journal's tables (``klock serve --init``).
        accept_unclosed: load a file that a server never closed although its ``-wal`` file
            is gone (``klock serve --accept-unclosed``); refused otherwise, as a copy taken
            without its write-ahead log looks just like that.
        synchronous: ``"FULL"`` (durable across power loss, the default) or ``"NORMAL"``
            (durable across a process crash only, faster).
        timeout: seconds a commit waits for a lock held by another process on the same file
            before it fails.

    Raises:
        ValueError: unknown ``synchronous`` mode.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        timeout: float = 5.0,
        init: bool = False,
        accept_unclosed: bool = False,
    ) -> None:
        mode = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if mode not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}"
            )
        self.path = Path(path)
        self._init = init
        self._unclosed = accept_unclosed
        self._synchronous = mode
        self._timeout = timeout
        self._db: sqlite3.Connection | None = None
        # A commit is written on the event loop while commits are fast (see commit()), else by
        # one worker thread; either way at most one transaction is ever in flight, and close()
        # can wait for it.
        self._writer: ThreadPoolExecutor | None = None
        self._inline = True
        super().__init__()

    def __repr__(self) -> str:
        return f"<SqliteJournal {str(self.path)!r} synchronous={self._synchronous}>"

    # ---------------------------------------------------------------- Journal protocol

    def load(self) -> RecoveredState:
        """Open (or create) the database and read the state left by the previous run.

        Every row must parse: a row that does not stops the load with an error naming it,
        never a silent drop. The journal's generation (one per load) is bumped and the file
        marked open until :meth:`close`.

        Raises:
            JournalError: the file is empty or not a journal (without ``init``), lacks a
                table, has a row that does not parse, or is a copy of a running journal
                taken without its ``-wal`` file.
            sqlite3.DatabaseError: the file is not a SQLite database, or is from a newer
                version.
        """
        had_wal = self._wal_path().exists()  # opening the file creates one
        db = self._open()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{self.path} was written by a newer klock_async (journal schema {version}, "
                f"this one reads up to {_SCHEMA_VERSION}); upgrade klock_async"
            )
        try:
            state, meta = self._read(db)
        except KlockError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise JournalError(f"{self.path}: {exc}") from None
        if meta.get("open") == 1 and not had_wal and not self._unclosed:
            raise JournalError(
                f"{self.path} was in use by a server that never closed it, and its write-ahead "
                f"log {self._wal_path().name} is missing: this looks like a copy taken without "
                "it, which may lack committed leases and fencing tokens. Copy the -wal file "
                "along, or make copies with 'klock backup'. If the file is the original and "
                "complete (another program opened it after a crash), pass --accept-unclosed"
            )
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('generation', 1) ON CONFLICT (key) "
            "DO UPDATE SET value = value + 1"
        )
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('open', 1)")
        db.execute("COMMIT")
        # The main file itself says "open" from now on, so a copy of it alone is recognised.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.generation = meta.get("generation", 0) + 1
        self._moved(inline=True)  # commits start on the loop (see commit())
        return state

    def _wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def _read(self, db: sqlite3.Connection) -> tuple[RecoveredState, dict[str, int]]:
        meta: dict[str, int] = {}
        for key, value in db.execute("SELECT key, value FROM meta"):
            meta[key] = _integer(value, f"meta row {key!r}")
        rows = {
            table: db.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
            for table, columns in TABLES.items()
        }
        state = recover(self.path, meta, rows)
        self._recover_server_rows(self.path, rows)
        return state, meta

    async def commit(self) -> None:
        """Write everything buffered since the last commit in one transaction.

        Returns once the transaction is durable. A commit is written on the event loop itself
        (as Redis writes and syncs its append-only file on its one thread before it answers)
        while commits are fast: a hand-off to a thread and back costs more than the write and
        sync of a small batch. One that takes longer than :data:`INLINE_COMMIT` (a slow disk,
        a checkpoint) moves the next ones to the journal's worker thread, and the loop serves
        other connections meanwhile; they come back to the loop once one is fast again. A
        file locked by another process is waited for on the worker thread only. An empty
        buffer writes nothing.

        Raises:
            RuntimeError: the journal was not loaded, or was closed.
            sqlite3.Error: the write failed (the transaction was rolled back).
        """
        if not self._batch:
            return
        batch = self._take()
        if self._writer is None:
            raise RuntimeError(f"{self!r} is not open; call load() first")
        try:
            started = time.perf_counter()
            if self._inline:
                try:
                    self._write(batch)
                except sqlite3.OperationalError as exc:
                    if not _locked(exc):
                        raise
                    self._moved(inline=False)  # another process holds the lock: wait there
                    await self._write_on_thread(batch)
            else:
                await self._write_on_thread(batch)
            fast = time.perf_counter() - started < INLINE_COMMIT
            if fast != self._inline:
                self._moved(inline=fast)
        except sqlite3.OperationalError as exc:
            if not _locked(exc):
                raise sqlite3.OperationalError(self._explain(exc)) from exc
            self._keep(batch)  # written with the next batch
            raise JournalUnavailableError(
                f"the journal {self.path} is locked by another process ({exc}); nothing of "
                "this request was granted: retry it, and let no other program write the file"
            ) from exc
        except (UnicodeEncodeError, OverflowError, ValueError, sqlite3.InterfaceError) as exc:
            self._keep(batch.storable())
            raise JournalUnavailableError(
                f"a value of this request cannot be stored in the journal ({exc}); nothing of "
                "it was granted"
            ) from exc

    @property
    def inline(self) -> bool:
        """Whether the next commit is written on the event loop (True) or on the journal's
        worker thread (after a slow commit, or a file locked by another process)."""
        return self._inline

    async def _write_on_thread(self, batch: _Batch) -> None:
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        await asyncio.shield(loop.run_in_executor(self._writer, self._write, batch))

    def _moved(self, *, inline: bool) -> None:
        """Switch where commits are written: on the loop a locked file fails at once (the
        loop never sleeps on a lock), on the worker thread it is waited for."""
        self._inline = inline
        assert self._db is not None
        timeout_ms = 0 if inline else round(self._timeout * 1000)
        self._db.execute(f"PRAGMA busy_timeout={timeout_ms}")

    def _explain(self, exc: sqlite3.Error) -> str:
        """The real cause of a failed write, for people."""
        text = str(exc)
        if "full" in text:
            return f"the disk holding {self.path} is full ({text}); free some space"
        if "readonly" in text or "read-only" in text:
            return f"{self.path} has become read-only ({text})"
        if "I/O" in text:
            return f"the disk holding {self.path} failed to write ({text})"
        return f"{self.path}: {text}"

    def close(self) -> None:
        """Wait for a transaction in flight, mark the file closed, close it. Idempotent."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):  # e.g. a full disk: stays marked open
                db.execute("UPDATE meta SET value = 0 WHERE key = 'open'")
            db.close()

    # ---------------------------------------------------------------- internals

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        if not fresh and not self._init and self.path.stat().st_size == 0:
            raise JournalError(
                f"{self.path} is an empty file, not a journal; starting from it would hand out "
                "fencing tokens from 1 again. Pass --init to make it a new journal"
            )
        # Used by the loop thread (load, close) and the writer thread (commit), never by both
        # at once: the actor awaits each commit before it records or commits again.
        db = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute("BEGIN IMMEDIATE")
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            if tables and "meta" not in tables and not self._init:
                raise JournalError(
                    f"{self.path} is a SQLite database but not a klock journal (no 'meta' "
                    "table); pass --init to add the journal's tables to it"
                )
            version = db.execute("PRAGMA user_version").fetchone()[0]
            missing = [
                t for t in _TABLES if t not in tables and _ADDED_IN.get(t, 0) <= max(version, 1)
            ]
            if "meta" in tables and missing:
                raise JournalError(
                    f"{self.path} is a damaged journal: table {missing[0]!r} is missing, and "
                    "with it leases or tokens; restore the file from a backup"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            for (table, column), added in COLUMNS_ADDED_IN.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column in have:
                    continue
                if version and version >= added:
                    raise JournalError(
                        f"{self.path} is a damaged journal: table {table!r} lacks its column "
                        f"{column!r}; restore the file from a backup"
                    )
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")  # older: empty
            if version < _SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            if not tables or "meta" not in tables:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('journal_id', ?)",
                    (uuid.uuid4().int >> 65,),
                )
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
        db.execute("BEGIN IMMEDIATE")
        try:
            for change in batch.changes():
                columns = TABLES[change.table]
                if change.deletes:
                    db.executemany(
                        f"DELETE FROM {change.table} WHERE {columns[0]} = ?",
                        [(key,) for key in change.deletes],
                    )
                if change.upserts:
                    db.executemany(
                        f"INSERT OR REPLACE INTO {change.table} ({', '.join(columns)}) "
                        f"VALUES ({', '.join('?' * len(columns))})",
                        change.upserts,
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
            if db.in_transaction:  # SQLite rolls back by itself on a full disk
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        self._commits += 1


def _locked(exc: sqlite3.OperationalError) -> bool:
    """Whether a write failed on a lock another connection holds."""
    return "locked" in str(exc) or "busy" in str(exc)


def _dump(clock: VectorClock) -> str:
    return json.dumps(clock.as_dict(), sort_keys=True, separators=(",", ":"))


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise JournalError(f"{where}: expected text, found {value!r}")
    return value


def _integer(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JournalError(f"{where}: expected an integer, found {value!r}")
    return value


def _real(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JournalError(f"{where}: expected a number, found {value!r}")
    return float(value)


def _clock(text: object, where: str) -> dict[str, int]:
    try:
        value = json.loads(_string(text, where))
    except ValueError:
        raise JournalError(f"{where}: the clock is not JSON: {text!r}") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in value.items()
    ):
        raise JournalError(f"{where}: the clock is not an object of counts: {text!r}")
    return value


def backup(source: str | Path, target: str | Path) -> None:
    """Copy a journal, live or not, with SQLite's online backup API (``klock backup``).

    The copy holds every committed transaction, whatever is still in the source's write-ahead
    log, and is marked closed, so a server starts from it as from a cleanly stopped journal.
    Copying the ``.db`` file alone is not a backup: committed leases and tokens may still be in
    its ``-wal`` file.

    Raises:
        JournalError: the source is missing or not a journal, or the target exists.
        sqlite3.Error: the copy failed.
    """
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise JournalError(f"{source} does not exist")
    if target.exists():
        raise JournalError(f"{target} exists already; choose a new file for the copy")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        tables = {row[0] for row in src.execute("SELECT name FROM sqlite_master")}
        if "meta" not in tables:
            raise JournalError(f"{source} is not a klock journal")
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("UPDATE meta SET value = 0 WHERE key = 'open'")
            dst.commit()
        finally:
            dst.close()
    finally:
        src.close()
