"""The durable journal: the scheduler's state in a SQLite file, one transaction per batch.

:class:`SqliteJournal` implements :class:`~klock_async.scheduler.Journal`. The scheduler actor
buffers every change of a mailbox batch with the ``record_*`` calls, then awaits
:meth:`SqliteJournal.commit`, which writes the whole buffer in one transaction on a worker
thread (the event loop keeps serving requests meanwhile) and returns once it is on disk. Only
then does the actor resolve the batch's replies (group commit): a client never sees a grant
that a crash could take back.

What is stored, and why that is enough to continue where the previous run stopped:

- ``agents``: every registered agent and its age (ages never change, so Wait-Die stays fair
  across restarts); ``priorities``: the agents registered with an explicit priority, which
  orders them before every automatic age;
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
import contextlib
import json
import math
import sqlite3
import uuid
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

__all__ = ["SqliteJournal", "backup"]

_TABLES = ("meta", "agents", "leases", "path_clocks", "agent_clocks")
_INT64 = 2**63

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
CREATE TABLE IF NOT EXISTS priorities (
    agent_id TEXT PRIMARY KEY,
    priority INTEGER NOT NULL
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
    retired: set[str] = field(default_factory=set)
    priorities: dict[str, int] = field(default_factory=dict)  # of agents in ``agents``

    def __bool__(self) -> bool:
        return bool(
            self.agents
            or self.leases
            or self.path_clocks
            or self.agent_clocks
            or self.meta
            or self.retired
        )

    def under(self, newer: _Batch) -> _Batch:
        """This batch with ``newer`` recorded after it (a failed batch kept for the next)."""
        return _Batch(
            {**self.agents, **newer.agents},
            {**self.leases, **newer.leases},
            {**self.path_clocks, **newer.path_clocks},
            {**self.agent_clocks, **newer.agent_clocks},
            {**self.meta, **newer.meta},
            (self.retired - newer.agents.keys()) | newer.retired,
            {**self.priorities, **newer.priorities},
        )

    def storable(self) -> _Batch:
        """The records SQLite can store: text that is valid UTF-8, integers within 64 bits."""
        return _Batch(
            {k: a for k, a in self.agents.items() if _fits(a.id, a.ts)},
            {
                k: x
                for k, x in self.leases.items()
                if _fits(x.id, x.agent_id, x.session_id, str(x.resource), x.token)
            },
            {k: c for k, c in self.path_clocks.items() if _fits(k, *_flat(c))},
            {k: c for k, c in self.agent_clocks.items() if _fits(k, *_flat(c))},
            {k: v for k, v in self.meta.items() if _fits(v)},
            {k for k in self.retired if _fits(k)},
            {k: p for k, p in self.priorities.items() if _fits(k, p)},
        )


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
        elif not -_INT64 <= value < _INT64:
            return False
    return True


class SqliteJournal:
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
        # One worker thread writes, so at most one transaction is ever in flight and close()
        # can wait for it.
        self._writer: ThreadPoolExecutor | None = None
        self._batch = _Batch()
        self._commits = 0
        self.generation = 0
        """How many times the file was loaded, this load included (0 before :meth:`load`)."""

    def __repr__(self) -> str:
        return f"<SqliteJournal {str(self.path)!r} synchronous={self._synchronous}>"

    @property
    def commits(self) -> int:
        """How many transactions were written (empty batches write none)."""
        return self._commits

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
        return state

    def _wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def _read(self, db: sqlite3.Connection) -> tuple[RecoveredState, dict[str, int]]:
        meta: dict[str, int] = {}
        for key, value in db.execute("SELECT key, value FROM meta"):
            meta[key] = _integer(value, f"meta row {key!r}")
        agents = []
        ages: dict[str, int] = {}
        for agent_id, ts in db.execute("SELECT id, ts FROM agents"):
            where = f"agents row {agent_id!r}"
            ages[_string(agent_id, where)] = _integer(ts, where)
            agents.append(AgentInfo(agent_id, ts))
        priorities = {
            _string(agent_id, "priorities row"): _integer(priority, f"priorities row {agent_id!r}")
            for agent_id, priority in db.execute("SELECT agent_id, priority FROM priorities")
        }
        leases = [
            self._lease(row, ages)
            for row in db.execute(
                "SELECT id, agent_id, session_id, resource, predicate, token, ttl, expires_at "
                "FROM leases ORDER BY token"
            )
        ]
        path_clocks = {
            _string(path, "path_clocks row"): _clock(clock, f"path_clocks row {path!r}")
            for path, clock in db.execute("SELECT path, clock FROM path_clocks")
        }
        agent_clocks = {
            _string(agent_id, "agent_clocks row"): _clock(clock, f"agent_clocks row {agent_id!r}")
            for agent_id, clock in db.execute("SELECT agent_id, clock FROM agent_clocks")
        }
        highest_lease_token = max((lease.token for lease in leases), default=0)
        state = RecoveredState(
            agents=agents,
            leases=leases,
            last_token=max(meta.get("last_token", 0), highest_lease_token),
            last_agent_ts=meta.get("last_agent_ts", 0),
            path_clocks=path_clocks,
            agent_clocks=agent_clocks,
            conflict_count=meta.get("conflict_count", 0),
            priorities=priorities,
        )
        return state, meta

    def _lease(self, row: tuple[object, ...], ages: dict[str, int]) -> LeaseInfo:
        lease_id, agent_id, session_id, resource, predicate, token, ttl, expires_at = row
        where = f"leases row {lease_id!r}"
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
            raise JournalError(f"{self.path}: {where}: {exc.message}") from None
        if info.agent_id not in ages:
            raise JournalError(
                f"{self.path}: {where} belongs to agent {info.agent_id!r}, which has no row in "
                "'agents'; the journal is damaged: restore it from a backup"
            )
        if info.token <= 0 or info.ttl <= 0:
            raise JournalError(f"{self.path}: {where} has a token or ttl that is not positive")
        return info

    def record_agent(self, agent: AgentInfo, priority: int | None = None) -> None:
        """Buffer a registered agent, with its explicit priority if it was given one."""
        self._batch.agents[agent.agent_id] = agent
        self._batch.retired.discard(agent.agent_id)
        if priority is not None:
            self._batch.priorities[agent.agent_id] = priority

    def record_retired(self, agent_id: str) -> None:
        """Buffer the removal of a retired agent (it holds no lease)."""
        self._batch.agents.pop(agent_id, None)
        self._batch.priorities.pop(agent_id, None)
        self._batch.retired.add(agent_id)

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
        try:
            await asyncio.shield(loop.run_in_executor(self._writer, self._write, batch))
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise sqlite3.OperationalError(self._explain(exc)) from exc
            self._batch = batch.under(self._batch)  # written with the next batch
            raise JournalUnavailableError(
                f"the journal {self.path} is locked by another process ({exc}); nothing of "
                "this request was granted: retry it, and let no other program write the file"
            ) from exc
        except (UnicodeEncodeError, OverflowError, ValueError, sqlite3.InterfaceError) as exc:
            self._batch = batch.storable().under(self._batch)
            raise JournalUnavailableError(
                f"a value of this request cannot be stored in the journal ({exc}); nothing of "
                "it was granted"
            ) from exc

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
            missing = [t for t in _TABLES if t not in tables]
            if "meta" in tables and missing:
                raise JournalError(
                    f"{self.path} is a damaged journal: table {missing[0]!r} is missing, and "
                    "with it leases or tokens; restore the file from a backup"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:
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
            if batch.retired:
                db.executemany("DELETE FROM agents WHERE id = ?", [(a,) for a in batch.retired])
                db.executemany(
                    "DELETE FROM priorities WHERE agent_id = ?", [(a,) for a in batch.retired]
                )
            if batch.agents:
                db.executemany(
                    "INSERT OR REPLACE INTO agents (id, ts) VALUES (?, ?)",
                    [(a.agent_id, a.ts) for a in batch.agents.values()],
                )
            if batch.priorities:
                db.executemany(
                    "INSERT OR REPLACE INTO priorities (agent_id, priority) VALUES (?, ?)",
                    list(batch.priorities.items()),
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
            if db.in_transaction:  # SQLite rolls back by itself on a full disk
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        self._commits += 1


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
