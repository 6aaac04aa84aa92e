"""The PostgreSQL journal: the scheduler's state in a database shared by replicas.

:class:`PostgresJournal` stores the same tables as the SQLite journal (``klock_`` prefixed,
rows from :data:`~klock_async.journal.TABLES`), with the same group commit: the actor awaits
:meth:`PostgresJournal.commit`, one transaction per batch, before it answers the batch. Every
transaction first reads the leader row ``FOR SHARE`` and checks that it still carries this
replica's term (a *fenced write*, see :mod:`klock_async.leader`): a replica that another took
over from commits nothing, and so grants nothing, whatever its own clock or memory says.

A commit that loses its connection (the database restarts, the network drops) reconnects and
writes the same batch again until it is durable: a batch only inserts, replaces and deletes
rows by key and raises counters with ``GREATEST``, so writing it twice is writing it once. The
requests of the batch wait meanwhile; none is answered before its commit.

Needs the ``postgres`` extra (``pip install 'klock-async[postgres]'``: asyncpg).
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from klock_async.errors import (
    JournalError,
    JournalUnavailableError,
    KlockError,
    LeadershipLostError,
)
from klock_async.journal import (
    COLUMNS_ADDED_IN,
    TABLES,
    BufferedJournal,
    _Batch,
    _integer,
    recover,
)
from klock_async.scheduler import RecoveredState

if TYPE_CHECKING:
    import asyncpg

__all__ = ["PostgresJournal", "is_postgres_url", "redact"]

SCHEMA_VERSION = 3  # 2: client_sessions, credentials and priorities; 3: leases.request_key

_TYPES: dict[str, tuple[str, ...]] = {
    "agents": ("text", "bigint"),
    "leases": ("text", "text", "text", "text", "text", "bigint", "float8", "float8", "text"),
    "path_clocks": ("text", "text"),
    "agent_clocks": ("text", "text"),
    "client_sessions": ("text", "text", "text"),
    "credentials": ("text", "text"),
    "priorities": ("text", "bigint"),
}
_LEADER_COLUMNS = ("id", "term", "holder", "url", "expires_at")


def _schema() -> dict[str, list[str]]:
    """The statements that create each table of the journal."""
    statements = {
        "klock_meta": ["CREATE TABLE klock_meta (key text PRIMARY KEY, value bigint NOT NULL)"]
    }
    for table, columns in TABLES.items():
        typed = [
            f"{c} {t}" if (table, c) in COLUMNS_ADDED_IN else f"{c} {t} NOT NULL"
            for c, t in zip(columns, _TYPES[table], strict=True)
        ]
        typed[0] = f"{columns[0]} {_TYPES[table][0]} PRIMARY KEY"
        statements[f"klock_{table}"] = [f"CREATE TABLE klock_{table} ({', '.join(typed)})"]
    # The leader lease (klock_async.leader): one row, its term raised by every takeover.
    statements["klock_leader"] = [
        "CREATE TABLE klock_leader (id int PRIMARY KEY CHECK (id = 1), term bigint NOT NULL, "
        "holder text NOT NULL, url text NOT NULL, expires_at timestamptz NOT NULL)",
        "INSERT INTO klock_leader VALUES (1, 0, '', '', '-infinity')",
    ]
    return statements


def _expected_columns() -> dict[str, tuple[str, ...]]:
    expected = {"klock_meta": ("key", "value"), "klock_leader": _LEADER_COLUMNS}
    expected |= {f"klock_{table}": columns for table, columns in TABLES.items()}
    return expected


# Taken inside the transaction that checks or creates the schema, so replicas that start
# together against an empty database create it once.
_SCHEMA_LOCK = 0x6B6C6F636B00  # "klock\0"

# Errors after which the connection is gone or unusable: reconnect and try again.
_RECONNECT: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)


def _reconnect_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (
        *_RECONNECT,
        asyncpg.PostgresConnectionError,  # class 08: connection exceptions
        asyncpg.InterfaceError,  # the connection was closed under us
        asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, cannot connect now
    )


def is_postgres_url(db: str | None) -> bool:
    """Whether ``--db`` names a PostgreSQL database rather than a SQLite file."""
    return db is not None and db.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = urllib.parse.quote(parts.username or "")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


async def connect(url: str, *, timeout: float = 5.0) -> asyncpg.Connection:
    """One connection to the database, its errors turned into a line for people.

    Raises:
        ImportError: asyncpg is not installed (the ``postgres`` extra).
        OSError: the server cannot be reached (asyncpg's own errors pass through too).
    """
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - the extra is part of the test setup
        raise ImportError(
            "a PostgreSQL --db needs asyncpg: pip install 'klock-async[postgres]'"
        ) from None
    connection: asyncpg.Connection = await asyncpg.connect(url, timeout=timeout)
    return connection


async def close(conn: asyncpg.Connection) -> None:
    """Close a connection: politely if the server answers within a second, else at once."""
    try:
        async with asyncio.timeout(1.0):
            await conn.close()
    except Exception:  # a broken connection: drop it
        conn.terminate()
        await asyncio.sleep(0)  # lets the transport close its socket


async def prepare_schema(url: str, *, init: bool = False) -> None:
    """Create the journal's tables in an empty database, or check the ones there.

    Raises:
        JournalError: the database holds other tables and no journal (without ``init``), a
            journal table is missing or has other columns, or the journal is newer.
    """
    conn = await connect(url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await _check_or_create(conn, url, init)
    finally:
        await conn.close()


async def _check_or_create(conn: asyncpg.Connection, url: str, init: bool) -> None:
    rows = await conn.fetch(
        "SELECT c.relname AS table, a.attname AS column FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema() "
        "LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY c.relname, a.attnum"
    )
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["table"], []).append(row["column"])
    where = redact(url)
    expected = _expected_columns()
    if "klock_meta" not in found:
        if found and not init:
            raise JournalError(
                f"{where} holds tables ({', '.join(sorted(found)[:3])}) but no klock journal "
                "(no table klock_meta); point --db at an empty database, or pass --init to "
                "add the journal's tables to this one"
            )
        clash = sorted(set(found) & set(expected))
        if clash:
            raise JournalError(
                f"{where} has a table {clash[0]} that is not a klock journal's; drop or rename "
                "it, or use another database"
            )
        for statements in _schema().values():
            for statement in statements:
                await conn.execute(statement)
        await conn.executemany(
            "INSERT INTO klock_meta (key, value) VALUES ($1, $2)",
            [("schema_version", SCHEMA_VERSION), ("journal_id", secrets.randbits(62))],
        )
        return
    version = await conn.fetchval("SELECT value FROM klock_meta WHERE key = 'schema_version'")
    if version is None or version > SCHEMA_VERSION:
        raise JournalError(
            f"{where} was written by a newer klock_async (journal schema {version}, this one "
            f"reads up to {SCHEMA_VERSION}); upgrade klock_async"
        )
    schema = _schema()
    for table, columns in expected.items():
        if table not in found and version < SCHEMA_VERSION:  # a kind of record added since
            for statement in schema[table]:
                await conn.execute(statement)
        elif table not in found:
            raise JournalError(
                f"{where} is a damaged klock journal: table {table} is missing, and with it "
                "leases or tokens; restore the database from a backup"
            )
        elif tuple(found[table]) != columns and not await _add_columns(
            conn, table, found[table], version
        ):
            raise JournalError(
                f"{where}: table {table} has columns ({', '.join(found[table])}), not a klock "
                f"journal's ({', '.join(columns)}); use another database"
            )
    if version < SCHEMA_VERSION:
        await conn.execute(
            "UPDATE klock_meta SET value = $1 WHERE key = 'schema_version'", SCHEMA_VERSION
        )


async def _add_columns(
    conn: asyncpg.Connection, table: str, found: list[str], version: int
) -> bool:
    """Add the columns an older journal's ``table`` lacks; False if it differs otherwise."""
    name = table.removeprefix("klock_")
    added = [
        column for (t, column), since in COLUMNS_ADDED_IN.items() if t == name and version < since
    ]
    if tuple(found) + tuple(added) != TABLES[name]:
        return False
    types = dict(zip(TABLES[name], _TYPES[name], strict=True))
    for column in added:
        await conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {types[column]}")
    return True


class PostgresJournal(BufferedJournal):
    """A durable journal in a PostgreSQL database, written by the leader's actor only.

    The server uses it as ``klock serve --db postgresql://...``: the replica that wins the
    leader lease calls :meth:`prepare` with its term, then starts a
    :class:`~klock_async.scheduler.Scheduler` on it, whose ``load`` returns what
    :meth:`prepare` read. Every :meth:`commit` is fenced by that term.

    Args:
        url: a ``postgresql://`` URL (libpq form; the password may also come from the
            ``PGPASSWORD`` variable or a ``.pgpass`` file).
        connect_timeout: seconds one connection attempt may take.
        on_wait: called with the error while a commit waits for the database to come back.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        on_wait: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self.term = 0
        """The leader term this journal writes under (set by :meth:`prepare`)."""
        self._connect_timeout = connect_timeout
        self._on_wait = on_wait
        self._conn: asyncpg.Connection | None = None
        self._state: RecoveredState | None = None
        self._closed = False
        self._reconnect = _reconnect_errors()

    def __repr__(self) -> str:
        return f"<PostgresJournal {redact(self.url)} term={self.term}>"

    async def prepare(self, term: int) -> None:
        """Read the state to serve under ``term`` (right after the term was raised to it).

        Raises:
            JournalError: a row does not parse, or the schema is not a journal's.
            LeadershipLostError: the term was raised again meanwhile.
        """
        self.term = term
        conn = await self._connection()
        async with conn.transaction(isolation="repeatable_read"):
            await self._check_term(conn)
            meta = {
                key: _integer(value, f"klock_meta row {key!r}")
                for key, value in await conn.fetch("SELECT key, value FROM klock_meta")
            }
            rows = {
                table: [
                    tuple(row)
                    for row in await conn.fetch(f"SELECT {', '.join(columns)} FROM klock_{table}")
                ]
                for table, columns in TABLES.items()
            }
        self._state = recover(redact(self.url), meta, rows)
        self._recover_server_rows(redact(self.url), rows)
        self.generation = term

    # ---------------------------------------------------------------- Journal protocol

    def load(self) -> RecoveredState:
        """The state :meth:`prepare` read (the scheduler calls this once, on start).

        Raises:
            RuntimeError: :meth:`prepare` was not awaited first.
        """
        state, self._state = self._state, None
        if state is None:
            raise RuntimeError(f"{self!r}: await prepare(term) before starting the scheduler")
        return state

    async def commit(self) -> None:
        """Write everything buffered since the last commit in one fenced transaction.

        Returns once the transaction is durable; while the database cannot be reached it
        keeps trying (the batch's requests wait). An empty buffer writes nothing.

        Raises:
            LeadershipLostError: another replica raised the term; nothing was written.
            JournalUnavailableError: a value cannot be stored; nothing of the batch was
                granted, the rest of it is written with the next batch.
        """
        if self._closed:
            raise LeadershipLostError(f"{self!r} was closed; this replica no longer leads")
        if not self._batch:
            return
        batch = self._take()
        delay = 0.05
        while True:
            try:
                conn = await self._connection()
                await self._write(conn, batch)
                return
            except KlockError:
                raise
            except self._reconnect as exc:
                await self._drop()
                if self._closed:
                    raise LeadershipLostError(f"{self!r} was closed while it waited") from exc
                if self._on_wait is not None:
                    self._on_wait(exc)
                # Backing off from a database that is down, not waiting for our own state.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except (UnicodeEncodeError, OverflowError, ValueError) as exc:
                self._keep(batch.storable())
                raise JournalUnavailableError(
                    f"a value of this request cannot be stored in the journal ({exc}); "
                    "nothing of it was granted"
                ) from exc
            except Exception as exc:
                import asyncpg

                if not isinstance(exc, asyncpg.DataError):
                    raise
                self._keep(batch.storable())
                raise JournalUnavailableError(
                    f"a value of this request cannot be stored in the journal ({exc}); "
                    "nothing of it was granted"
                ) from exc

    def close(self) -> None:
        """Commit nothing any more; the connection is closed by :meth:`aclose`."""
        self._closed = True

    async def aclose(self) -> None:
        """Commit nothing any more and close the connection. Idempotent."""
        self._closed = True
        await self._drop()

    # ---------------------------------------------------------------- internals

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.url, timeout=self._connect_timeout)
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await close(conn)

    async def _check_term(self, conn: asyncpg.Connection) -> None:
        # FOR SHARE: a takeover's UPDATE of the row waits for this transaction, and this one
        # waits for a takeover in flight and then reads its term. Either this batch commits
        # before the new leader reads the state, or it is refused.
        term = await conn.fetchval("SELECT term FROM klock_leader WHERE id = 1 FOR SHARE")
        if term != self.term:
            self._closed = True
            raise LeadershipLostError(
                f"another replica leads now (term {term}, this one had {self.term}); this "
                "replica committed nothing of its last batch and steps down"
            )

    async def _write(self, conn: asyncpg.Connection, batch: _Batch) -> None:
        statements: list[tuple[str, list[Any]]] = []
        for change in batch.changes():
            table, columns, types = change.table, TABLES[change.table], _TYPES[change.table]
            if change.deletes:
                statements.append(
                    (
                        f"DELETE FROM klock_{table} WHERE {columns[0]} = ANY($1::text[])",
                        [change.deletes],
                    )
                )
            if change.upserts:
                arrays = [list(values) for values in zip(*change.upserts, strict=True)]
                unnest = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
                update = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns[1:])
                statements.append(
                    (
                        f"INSERT INTO klock_{table} ({', '.join(columns)}) "
                        f"SELECT * FROM unnest({unnest}) "
                        f"ON CONFLICT ({columns[0]}) DO UPDATE SET {update}",
                        arrays,
                    )
                )
        if batch.meta:
            keys, values = zip(*batch.meta.items(), strict=True)
            statements.append(
                (
                    "INSERT INTO klock_meta (key, value) SELECT * FROM unnest($1::text[], "
                    "$2::bigint[]) ON CONFLICT (key) DO UPDATE SET value = "
                    "GREATEST(klock_meta.value, EXCLUDED.value)",
                    [list(keys), list(values)],
                )
            )
        async with conn.transaction():
            await self._check_term(conn)
            for sql, args in statements:
                await conn.execute(sql, *args)
        self._commits += 1
