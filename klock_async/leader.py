"""The leader lease: which of several ``klock serve`` replicas on one PostgreSQL database leads.

The lease is one row, ``klock_leader``: a *term* (raised by every takeover), the holder, its
URL (where followers send clients) and an expiry in database time. The leader renews the
expiry every third of the lease's ttl, and holds a session-level advisory lock named by its
term, taken before the term was raised. A follower takes over by raising the term in one
``UPDATE ... WHERE term = <seen>``, when

- the lease expired (database time, so no two machines' clocks are compared), or
- it obtained the advisory lock of the term it saw: PostgreSQL frees that lock the moment the
  leader's session ends (its process died, or the server noticed its connection drop), so a
  crashed leader is replaced at once, not after the ttl.

Safety never rests on the lease or any clock: every commit of the leader's journal reads the
row ``FOR SHARE`` and checks its term in the same transaction
(:class:`~klock_async.postgres.PostgresJournal`), and the leader answers a request only after
its batch committed. Two replicas may believe for a moment that they lead (a paused leader
that wakes up); only the one whose term is in the row can commit, so only one grants. The
argument is written out in docs/server.md ("Running replicas").

Followers do not poll: each waits on the term's advisory lock with a ``lock_timeout`` set to
the lease's remaining time, and reads the row again when either happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import socket
from typing import TYPE_CHECKING

from klock_async.logging import get_logger
from klock_async.postgres import _reconnect_errors, close, connect, redact

if TYPE_CHECKING:
    import asyncpg

__all__ = ["LEADER_TTL", "LeaderLease"]

LEADER_TTL = 5.0
"""Default seconds a leader's lease lasts without renewal (``klock serve --leader-ttl``)."""

_LOCK_SPACE = 0x6B6C6F63 << 32  # "kloc": the advisory locks of the terms


def _term_lock(term: int) -> int:
    """The advisory lock the leader of ``term`` holds on its lease session."""
    return _LOCK_SPACE | (term & 0xFFFFFFFF)


class LeaderLease:
    """This replica's side of the leader lease.

    Args:
        url: the PostgreSQL URL of the shared journal.
        advertise: the URL clients reach this replica at (shown to them by the followers).
        ttl: seconds the lease lasts without renewal; renewed every ``ttl / 3``.

    Raises:
        ValueError: ``ttl`` is not a positive number of seconds.
    """

    def __init__(self, url: str, *, advertise: str, ttl: float = LEADER_TTL) -> None:
        if not 0 < ttl < math.inf:
            raise ValueError(f"the leader ttl must be a positive number of seconds, got {ttl!r}")
        self.url = url
        self.advertise = advertise
        self.ttl = ttl
        self.holder = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self.term = 0
        """The term this replica leads in (0 while it never led)."""
        self.leader: str | None = None
        """The leader's URL as last read (None: no live leader known)."""
        self._conn: asyncpg.Connection | None = None
        self._locked = False  # this session holds the advisory lock of self.term
        self._reconnect = _reconnect_errors()

    def __repr__(self) -> str:
        return f"<LeaderLease {redact(self.url)} holder={self.holder} term={self.term}>"

    async def campaign(self) -> int:
        """Wait until this replica leads; return its new term.

        Reconnects by itself while the database is down.
        """
        delay = 0.05
        while True:
            try:
                if await self._try_take():
                    return self.term
                delay = 0.05
            except self._reconnect as exc:
                await self._lost_connection(exc)
                await asyncio.sleep(delay)  # backing off from a database that is down
                delay = min(delay * 2, 1.0)

    async def keep(self) -> None:
        """Renew the lease every ``ttl / 3``; return when another replica took over."""
        delay = 0.05
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if not await self._renew():
                    get_logger().warning("leader.deposed", holder=self.holder, term=self.term)
                    return
                delay = 0.05
            except self._reconnect as exc:
                await self._lost_connection(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def aclose(self) -> None:
        """Close the lease's session (which frees the advisory lock). Idempotent."""
        conn, self._conn = self._conn, None
        self._locked = False
        if conn is not None:
            await close(conn)

    async def resign(self) -> None:
        """Give the lease up at once (a clean shutdown): end it now and close the session."""
        conn = self._conn
        if conn is not None and self.term:
            with contextlib.suppress(*self._reconnect):
                await conn.execute(
                    "UPDATE klock_leader SET expires_at = '-infinity', url = '' "
                    "WHERE id = 1 AND term = $1",
                    self.term,
                )
        await self.aclose()

    # ---------------------------------------------------------------- internals

    async def _session(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.url)
            self._locked = False
        return self._conn

    async def _lost_connection(self, exc: BaseException) -> None:
        get_logger().warning("leader.database_unreachable", error=str(exc), holder=self.holder)
        await self.aclose()

    async def _try_take(self) -> bool:
        """One round of the campaign: take over if allowed, else wait for a reason to look."""
        conn = await self._session()
        row = await conn.fetchrow(
            "SELECT term, url, expires_at <= now() AS expired, "
            "EXTRACT(EPOCH FROM GREATEST(expires_at, now()) - now())::float8 AS remaining "
            "FROM klock_leader WHERE id = 1"
        )
        if row is None:
            raise RuntimeError("klock_leader has no row; the schema check should have made it")
        seen: int = row["term"]
        leader = None if row["expired"] else (row["url"] or None)
        if leader is not None and leader != self.leader:
            get_logger().info("leader.following", holder=self.holder, leader=leader, term=seen)
        self.leader = leader
        if row["expired"]:
            return await self._take(conn, seen, ended=False)
        import asyncpg

        # Wake when the leader's session ends (its lock is freed) or its lease runs out.
        await conn.execute(f"SET lock_timeout = {math.ceil(row['remaining'] * 1000) + 20}")
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", _term_lock(seen))
        except asyncpg.LockNotAvailableError:
            return False
        finally:
            await conn.execute("SET lock_timeout = 0")
        # Only a signal: the leader of `seen` is gone.
        await conn.execute("SELECT pg_advisory_unlock($1)", _term_lock(seen))
        return await self._take(conn, seen, ended=True)

    async def _take(self, conn: asyncpg.Connection, seen: int, *, ended: bool) -> bool:
        """Raise the term from ``seen``, if the lease expired or its holder's session ended."""
        lock = _term_lock(seen + 1)
        # Held before the new term is visible, so a follower that sees it finds it held.
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
            return False  # another replica is taking over right now
        term = await conn.fetchval(
            "UPDATE klock_leader SET term = term + 1, holder = $2, url = $3, "
            "expires_at = now() + make_interval(secs => $4) "
            "WHERE id = 1 AND term = $1 AND (expires_at <= now() OR $5) RETURNING term",
            seen,
            self.holder,
            self.advertise,
            self.ttl,
            ended,
        )
        if term is None:  # another replica was faster, or the leader renewed meanwhile
            await conn.execute("SELECT pg_advisory_unlock($1)", lock)
            return False
        self.term = term
        self._locked = True
        self.leader = self.advertise
        get_logger().info("leader.elected", holder=self.holder, term=term, url=self.advertise)
        return True

    async def _renew(self) -> bool:
        conn = await self._session()
        if not self._locked:  # a new session (the database restarted): take the lock again
            self._locked = bool(
                await conn.fetchval("SELECT pg_try_advisory_lock($1)", _term_lock(self.term))
            )
        term = await conn.fetchval(
            "UPDATE klock_leader SET expires_at = now() + make_interval(secs => $2) "
            "WHERE id = 1 AND term = $1 RETURNING term",
            self.term,
            self.ttl,
        )
        return term is not None
