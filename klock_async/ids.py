"""Unguessable ids for leases and sessions.

A lease id is a capability (whoever has it can release the lease), and a session id scopes
reentrancy, so both are random. The bytes come from ``os.urandom``, as the ``secrets`` module's
do, but are read for 256 ids at a time and encoded once: a system call and an encoding per id
cost more than the rest of an uncontended acquire's bookkeeping. A forked child starts fresh
pools, so parent and child never hand out the same ids.
"""

from __future__ import annotations

import base64
import os

__all__ = ["new_lease_id", "new_session_id"]

_BATCH = 256
_LEASE_ID_BYTES = 18  # 144 random bits: 24 url-safe characters, no padding
_SESSION_ID_BYTES = 16  # 128 random bits: 32 hex digits, as uuid4().hex


# Ids not yet handed out; new_*_id() pops from the end and refills when empty.
_lease_pool: list[str] = []
_session_pool: list[str] = []


def _refill_lease_ids() -> None:
    width = _LEASE_ID_BYTES * 4 // 3
    text = base64.urlsafe_b64encode(os.urandom(_LEASE_ID_BYTES * _BATCH)).decode("ascii")
    _lease_pool.extend([text[at : at + width] for at in range(0, len(text), width)])


def _refill_session_ids() -> None:
    width = _SESSION_ID_BYTES * 2
    text = os.urandom(_SESSION_ID_BYTES * _BATCH).hex()
    _session_pool.extend([text[at : at + width] for at in range(0, len(text), width)])


def _fresh_pools() -> None:
    _lease_pool.clear()
    _session_pool.clear()


os.register_at_fork(after_in_child=_fresh_pools)


def new_lease_id() -> str:
    """A fresh lease id: 24 url-safe characters carrying 144 random bits."""
    if not _lease_pool:
        _refill_lease_ids()
    return _lease_pool.pop()


def new_session_id() -> str:
    """A fresh session id: 32 hex digits carrying 128 random bits."""
    if not _session_pool:
        _refill_session_ids()
    return _session_pool.pop()
