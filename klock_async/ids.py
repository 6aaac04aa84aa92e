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
from collections.abc import Iterator

__all__ = ["new_lease_id", "new_session_id"]

_BATCH = 256
_LEASE_ID_BYTES = 18  # 144 random bits: 24 url-safe characters, no padding
_SESSION_ID_BYTES = 16  # 128 random bits: 32 hex digits, as uuid4().hex


def _lease_ids() -> Iterator[str]:
    width = _LEASE_ID_BYTES * 4 // 3
    while True:
        text = base64.urlsafe_b64encode(os.urandom(_LEASE_ID_BYTES * _BATCH)).decode("ascii")
        for at in range(0, len(text), width):
            yield text[at : at + width]


def _session_ids() -> Iterator[str]:
    width = _SESSION_ID_BYTES * 2
    while True:
        text = os.urandom(_SESSION_ID_BYTES * _BATCH).hex()
        for at in range(0, len(text), width):
            yield text[at : at + width]


_lease_pool = _lease_ids()
_session_pool = _session_ids()


def _fresh_pools() -> None:
    global _lease_pool, _session_pool
    _lease_pool, _session_pool = _lease_ids(), _session_ids()


os.register_at_fork(after_in_child=_fresh_pools)


def new_lease_id() -> str:
    """A fresh lease id: 24 url-safe characters carrying 144 random bits."""
    return next(_lease_pool)


def new_session_id() -> str:
    """A fresh session id: 32 hex digits carrying 128 random bits."""
    return next(_session_pool)
