"""The credentials table of a journal file: what is put is loaded again, deletes stick, and a
damaged row is an error naming it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from klock_async.credential_store import CredentialStore
from klock_async.errors import JournalError
from klock_async.identity import digest
from klock_async.journal import SqliteJournal


def _journal(path: Path) -> None:
    journal = SqliteJournal(path)
    journal.load()
    journal.close()


async def test_digests_survive_reopening(tmp_path: Path) -> None:
    """Digests put are loaded by a store opened later on the same file; deleted ones are gone."""
    path = tmp_path / "klock.db"
    _journal(path)
    store = CredentialStore(path)
    await store.put("a", digest("secret-a"))
    await store.put("b", digest("secret-b"))
    await store.delete(["b"])
    store.close()
    again = CredentialStore(path)
    try:
        assert again.load() == {"a": digest("secret-a")}
    finally:
        again.close()
    _journal(path)  # the journal still opens its file with the extra table


def test_a_damaged_row_is_named(tmp_path: Path) -> None:
    """A digest that is not 64 hex characters stops the load with the row's agent id."""
    path = tmp_path / "klock.db"
    _journal(path)
    CredentialStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO credentials VALUES ('broken', 'xyz')")
    store = CredentialStore(path)
    with pytest.raises(JournalError, match="'broken'"):
        store.close_after_load()
