"""The ``credentials`` table of a SQLite journal file, read and written on its own connection.

``klock serve`` no longer uses it: the journal itself keeps the digests (``credentials``: agent
id, hex SHA-256, in :data:`klock_async.journal.TABLES`) and writes them in the commit of the
agent's registration, on SQLite and PostgreSQL alike. The table is the same, so a file written
through this store opens with every identity. It stays for tools that read or repair a file's
credentials without loading the journal.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from klock_async.errors import JournalError

__all__ = ["CredentialStore"]

_SCHEMA = "CREATE TABLE IF NOT EXISTS credentials (agent_id TEXT PRIMARY KEY, digest TEXT NOT NULL)"


class CredentialStore:
    """The ``credentials`` table of a journal file.

    Args:
        path: the journal file (opened after the journal created it).
        synchronous: ``"FULL"`` or ``"NORMAL"``, as the journal's.
        timeout: seconds a write waits for the journal's own transaction to end.
    """

    def __init__(
        self, path: str | Path, *, synchronous: str = "FULL", timeout: float = 5.0
    ) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(
            self.path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(_SCHEMA)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="klock-credentials")

    def load(self) -> dict[str, str]:
        """Agent id -> credential digest, as stored.

        Raises:
            JournalError: a row that is not two strings of the right form.
        """
        stored: dict[str, str] = {}
        for agent_id, digest in self._db.execute("SELECT agent_id, digest FROM credentials"):
            if not isinstance(agent_id, str) or not isinstance(digest, str) or len(digest) != 64:
                raise JournalError(
                    f"{self.path}: credentials row {agent_id!r} is damaged; restore the file "
                    "from a backup"
                )
            stored[agent_id] = digest
        return stored

    def close_after_load(self) -> None:
        """Check that every stored row parses, then close (``klock serve``'s start-up probe).

        Raises:
            JournalError: a damaged row.
        """
        try:
            self.load()
        finally:
            self.close()

    async def put(self, agent_id: str, digest: str) -> None:
        """Store a credential digest durably (returns after the commit)."""
        await self._run(
            "INSERT OR REPLACE INTO credentials (agent_id, digest) VALUES (?, ?)",
            [(agent_id, digest)],
        )

    async def delete(self, agent_ids: Iterable[str]) -> None:
        """Drop the credentials of retired agents."""
        rows = [(agent_id,) for agent_id in agent_ids]
        if rows:
            await self._run("DELETE FROM credentials WHERE agent_id = ?", rows)

    async def _run(self, statement: str, rows: Sequence[tuple[str, ...]]) -> None:
        def write() -> None:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(statement, rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        await asyncio.get_running_loop().run_in_executor(self._writer, write)

    def close(self) -> None:
        """Wait for a write in flight, then close. Idempotent."""
        self._writer.shutdown(wait=True)
        self._db.close()
