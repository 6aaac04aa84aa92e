"""Tests for klock_async.ids: lease and session ids are unguessable and never repeat."""

from __future__ import annotations

import os
import string

from klock_async.ids import new_lease_id, new_session_id

_URL_SAFE = set(string.ascii_letters + string.digits + "-_")


def test_ids_have_their_documented_shape_and_do_not_repeat() -> None:
    """24 url-safe characters per lease id, 32 hex digits per session id, none repeated."""
    lease_ids = [new_lease_id() for _ in range(3_000)]  # several refills of the pool
    session_ids = [new_session_id() for _ in range(3_000)]
    assert all(len(i) == 24 and set(i) <= _URL_SAFE for i in lease_ids)
    assert all(len(i) == 32 and set(i) <= set(string.hexdigits.lower()) for i in session_ids)
    assert len(set(lease_ids)) == len(lease_ids)
    assert len(set(session_ids)) == len(session_ids)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    """The pools are dropped in a forked child, which reads fresh random bytes."""
    new_lease_id(), new_session_id()  # the parent's pools now hold unspent ids
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write_end, f"{new_lease_id()} {new_session_id()}".encode())
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    with os.fdopen(read_end) as pipe:
        child_lease, child_session = pipe.read().split()
    assert child_lease != new_lease_id()
    assert child_session != new_session_id()
