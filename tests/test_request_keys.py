"""Request keys in the pure lock table: an acquire and its resends are decided once.

A client gives each acquire a key and sends the same key with every resend of it (after a
failover or a broken connection); the table answers a resend with what the key already named.
Driven directly on virtual time; the invariants are checked after every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tabledriver import Driver as TableDriver
from tabledriver import Pairs

from klock_async.errors import (
    InvalidRequestError,
    LeaseDied,
    LeaseWouldWait,
    RequestKeyReusedError,
    RequestSupersededError,
    UnknownAgentError,
)
from klock_async.journal import SqliteJournal
from klock_async.model import Intent
from klock_async.scheduler import Scheduler


class Driver(TableDriver):
    """The table's test driver with one session for every request unless told otherwise:
    a resend names the session of the call it repeats."""

    def ask(  # type: ignore[override]
        self,
        name: str,
        agent: str,
        pairs: Pairs,
        *,
        key: str | None,
        session: str = "s",
        wait: bool = True,
    ) -> Any:
        return super().ask(name, agent, pairs, session=session, wait=wait, key=key)


def test_same_key_twice_answers_the_same_grant() -> None:
    """A resend of a granted acquire gets the same leases (ids, tokens); nothing new is held."""
    d = Driver("a")
    d.ask("first", "a", [("x", "MUTATES"), ("y", "CONSUMES")], key="k1")
    d.ask("again", "a", [("x", "MUTATES"), ("y", "CONSUMES")], key="k1")
    assert d.leases("again") == d.leases("first")
    assert len(d.table.leases) == 2
    assert d.table.last_token == 2
    assert d.table.counts["grants"] == 1


def test_withdrawal_of_the_first_call_keeps_what_its_resend_was_answered() -> None:
    """The first call's caller leaves after its resend was answered: the grant stays."""
    d = Driver("a")
    d.ask("first", "a", [("x", "MUTATES")], key="k1")
    first_id = d.ids
    d.ask("again", "a", [("x", "MUTATES")], key="k1")
    d.table.withdraw(first_id, "a", "s", d.now)
    d.drain()
    assert [x.id for x in d.table.leases.values()] == [d.leases("again")[0].id]
    d.table.withdraw(d.ids, "a", "s", d.now)  # the resend's caller leaves too: given back
    d.drain()
    assert not d.table.leases


def test_keys_are_per_agent() -> None:
    """Two agents may use the same key: each gets a grant of its own."""
    d = Driver("a", "b")
    d.ask("a1", "a", [("x", "CONSUMES")], key="k1")
    d.ask("b1", "b", [("x", "CONSUMES")], key="k1")
    assert d.leases("a1")[0].id != d.leases("b1")[0].id


def test_same_key_while_queued_takes_the_queued_place() -> None:
    """A resend of a queued acquire replaces it: the earlier call is answered superseded, the
    resend waits in its place and is granted once; one lease, one token."""
    d = Driver("holder", "a")
    d.ask("held", "holder", [("x", "MUTATES")], key=None, session="h")
    assert d.ask("first", "a", [("x", "MUTATES")], key="k1") is None
    assert d.ask("again", "a", [("x", "MUTATES")], key="k1") is None
    assert isinstance(d.answers["first"], RequestSupersededError)
    assert len(d.table.queued) == 1
    d.table.release(d.leases("held")[0].id, None, False, d.now)
    d.drain()
    (lease,) = d.leases("again")
    assert [x.id for x in d.table.leases.values()] == [lease.id]
    assert d.ask("third", "a", [("x", "MUTATES")], key="k1") is not None
    assert d.leases("third") == [lease]


def test_resend_without_wait_of_a_queued_acquire_is_decided_anew() -> None:
    """A resend with wait=False of a queued acquire withdraws it and is decided as new."""
    d = Driver("holder", "a")
    d.ask("held", "holder", [("x", "MUTATES")], key=None, session="h")
    assert d.ask("first", "a", [("x", "MUTATES")], key="k1") is None
    answer = d.ask("again", "a", [("x", "MUTATES")], key="k1", wait=False)
    assert isinstance(d.answers["first"], RequestSupersededError)
    assert isinstance(answer, LeaseDied | LeaseWouldWait)
    assert not d.table.queued


@pytest.mark.parametrize(
    ("pairs", "session"),
    [
        pytest.param([("x", "CONSUMES")], "s", id="other-predicate"),
        pytest.param([("z", "MUTATES")], "s", id="other-resource"),
        pytest.param([("x", "MUTATES"), ("z", "MUTATES")], "s", id="more-intents"),
        pytest.param([("x", "MUTATES")], "other", id="other-session"),
    ],
)
def test_key_reused_for_another_request_is_refused(pairs: Pairs, session: str) -> None:
    """A key that names a grant of other intents (or another session) is refused; nothing
    changes."""
    d = Driver("a")
    d.ask("first", "a", [("x", "MUTATES")], key="k1")
    before = (dict(d.table.leases), d.table.last_token, dict(d.table.counts))
    with pytest.raises(RequestKeyReusedError):
        d.ask("again", "a", pairs, key="k1", session=session)
    assert (dict(d.table.leases), d.table.last_token, dict(d.table.counts)) == before
    d.table.check_invariants()


def test_key_reused_for_another_queued_request_is_refused() -> None:
    """A key that names a queued request of other intents is refused; the request stays."""
    d = Driver("holder", "a")
    d.ask("held", "holder", [("x", "MUTATES")], key=None, session="h")
    d.ask("first", "a", [("x", "MUTATES")], key="k1")
    with pytest.raises(RequestKeyReusedError):
        d.ask("again", "a", [("y", "MUTATES")], key="k1")
    assert "first" not in d.answers
    assert len(d.table.queued) == 1


def test_unknown_agent_with_a_key_changes_nothing() -> None:
    """An unknown agent is refused before its key is looked at."""
    d = Driver("a")
    with pytest.raises(UnknownAgentError):
        d.ask("first", "ghost", [("x", "MUTATES")], key="k1")
    assert not d.table.units


def test_key_is_forgotten_when_its_grant_ends() -> None:
    """Once every lease of a keyed grant ended, the key asks for a new grant."""
    d = Driver("a")
    d.ask("first", "a", [("x", "MUTATES")], key="k1")
    d.table.release(d.leases("first")[0].id, None, False, d.now)
    d.ask("again", "a", [("x", "MUTATES")], key="k1")
    assert d.leases("again")[0].token == d.leases("first")[0].token + 1


def test_partly_ended_grant_spends_its_key() -> None:
    """When one lease of a keyed grant ends, the key no longer names the rest of it."""
    d = Driver("a")
    d.ask("first", "a", [("x", "MUTATES"), ("y", "MUTATES")], key="k1")
    x, y = d.leases("first")
    d.table.release(x.id, None, False, d.now)
    d.drain()
    assert d.table.leases[y.id].key is None
    d.ask("again", "a", [("x", "MUTATES"), ("y", "MUTATES")], key="k1")
    assert {info.id for info in d.leases("again")}.isdisjoint({x.id, y.id})


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["ask", "ask", "ask-nowait", "release", "expire"]),
        st.sampled_from(["a", "b"]),
        st.sampled_from(["k1", "k2"]),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_duplicated_acquires_never_hold_two_grants_for_one_key(
    ops: list[tuple[str, str, str]],
) -> None:
    """Any interleaving of duplicated acquires, releases and expiries: at most one grant per
    (agent, key) is held, and every answer to a key names that grant."""
    d = Driver("a", "b")
    resource = {"k1": "x", "k2": "y"}
    for step, (op, agent, key) in enumerate(ops):
        if op.startswith("ask"):
            name = f"{agent}-{key}-{step}"
            d.ask(name, agent, [(resource[key], "MUTATES")], key=key, wait=op == "ask")
        elif op == "release":
            for lease in list(d.table.leases.values()):
                if lease.agent_id == agent and lease.key == key:
                    d.table.release(lease.id, None, False, d.now)
            d.drain()
        else:
            d.now += 11.0
            d.table.expire(d.now)
            d.drain()
        held: dict[tuple[str, str | None], list[str]] = {}
        for lease in d.table.leases.values():
            if lease.key is not None:
                held.setdefault((lease.agent_id, lease.key), []).append(lease.id)
        assert all(len(ids) == 1 for ids in held.values()), held
        for (owner, k), ids in held.items():
            # Nothing but that one lease was granted for the key and is still active.
            granted = {
                info.id
                for name, answer in d.answers.items()
                if name.startswith(f"{owner}-{k}-") and isinstance(answer, tuple)
                for info, _ in answer
                if info.id in d.table.leases
            }
            assert granted == set(ids)


# ------------------------------------------------------------------ the scheduler and journal


@contextlib.asynccontextmanager
async def _kernel(path: Path | None = None) -> AsyncIterator[Scheduler]:
    kernel = Scheduler(journal=None if path is None else SqliteJournal(path))
    await kernel.start()
    try:
        yield kernel
    finally:
        await kernel.aclose()


async def test_key_is_decided_by_the_scheduler_and_survives_a_restart(tmp_path: Path) -> None:
    """A keyed grant journaled to SQLite answers a resend of its acquire after a restart."""
    path = tmp_path / "k.db"
    intents = [Intent.of("src/a.py", "MUTATES"), Intent.of("src/b.py", "CONSUMES")]
    async with _kernel(path) as kernel:
        await kernel.register_agent("a", None)
        first = await kernel.acquire("a", "s", intents, ttl=600.0, request_key="k" * 22)
        again = await kernel.acquire("a", "s", intents, ttl=600.0, request_key="k" * 22)
    async with _kernel(path) as kernel:
        resent = await kernel.acquire("a", "s", intents, ttl=600.0, request_key="k" * 22)
        with pytest.raises(RequestKeyReusedError):
            await kernel.acquire("a", "s", intents[:1], ttl=600.0, request_key="k" * 22)
        leases = await kernel.leases()
        stats = await kernel.statistics()
    assert first == again == resent
    assert {x.id for x in leases} == {x.id for x in first}
    assert stats.grants == 0  # after the restart: nothing granted again


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("short", id="too-short"),
        pytest.param("x" * 65, id="too-long"),
        pytest.param("has space here", id="space"),
        pytest.param("slash/in/the/key", id="slash"),
        pytest.param(12345678, id="not-text"),
    ],
)
async def test_malformed_request_key_is_refused(key: Any) -> None:
    """A request key that is not 8 to 64 of A-Z a-z 0-9 - _ is refused; nothing changes."""
    async with _kernel() as kernel:
        await kernel.register_agent("a", None)
        with pytest.raises(InvalidRequestError, match="request key"):
            await kernel.acquire("a", "s", [Intent.of("x", "MUTATES")], ttl=5.0, request_key=key)
        assert await kernel.leases() == ()


def test_clients_make_valid_keys_of_their_own() -> None:
    """Each client's keys are valid request keys, new for every acquire, and its own."""
    from klock_async.model import validate_request_key
    from klock_async.remote import _RequestKeys

    first, second = _RequestKeys(), _RequestKeys()
    keys = [first() for _ in range(3)] + [second() for _ in range(3)]
    assert len(set(keys)) == 6
    assert all(validate_request_key(key) == key for key in keys)


# ------------------------------------------------------------------ over HTTP and the channel


def test_rest_acquire_with_a_key_is_granted_once() -> None:
    """POST /intents with a request_key: a resend answers the same lease; a malformed key is
    400 invalid_field and a key reused for other intents 409 request_key_reused; without a
    session_id the session is named after the key."""
    import httpx
    from serverutil import serve_in_thread

    body = {
        "agent_id": "a",
        "intents": [{"resource": "x", "predicate": "MUTATES"}],
        "request_key": "rest-key-000001",
    }
    with serve_in_thread() as server, httpx.Client(base_url=server.url) as http:
        http.post("/agents", json={"agent_id": "a"})
        first = http.post("/intents", json=body)
        again = http.post("/intents", json=body)
        bad = http.post("/intents", json={**body, "request_key": "no spaces allowed"})
        other = http.post(
            "/intents", json={**body, "intents": [{"resource": "y", "predicate": "MUTATES"}]}
        )
        leases = http.get("/leases").json()["data"]
    assert first.status_code == again.status_code == 200
    assert again.json()["data"]["leases"] == first.json()["data"]["leases"]
    assert first.json()["data"]["session_id"] == "key-rest-key-000001"
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_field")
    assert (other.status_code, other.json()["code"]) == (409, "request_key_reused")
    assert [lease["lease_id"] for lease in leases] == [
        lease["lease_id"] for lease in first.json()["data"]["leases"]
    ]


async def test_channel_acquire_with_a_key_is_granted_once() -> None:
    """The channel's acquire takes the same request_key: a resend answers the same lease."""
    from serverutil import serve_in_thread
    from websockets.asyncio.client import connect

    stack = contextlib.ExitStack()
    server = await asyncio.to_thread(stack.enter_context, serve_in_thread())
    args = {
        "agent_id": "a",
        "session_id": "s",
        "intents": [{"resource": "x", "predicate": "MUTATES"}],
        "request_key": "channel-key-0001",
    }
    try:
        async with connect("ws://" + server.url.split("://", 1)[1] + "/channel") as ws:
            calls = [
                {"id": 0, "op": "hello", "args": {}},
                {"id": 1, "op": "register", "args": {"agent_id": "a"}},
                {"id": 2, "op": "acquire", "args": args},
                {"id": 3, "op": "acquire", "args": args},
            ]
            answers = {}
            for call in calls:
                await ws.send(json.dumps(call))
                while call["id"] not in answers:
                    for answer in _items(json.loads(await ws.recv())):
                        answers[answer["id"]] = answer
    finally:
        await asyncio.to_thread(stack.close)
    assert answers[2]["ok"] and answers[3]["ok"], answers
    assert answers[3]["data"]["leases"] == answers[2]["data"]["leases"]


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# ------------------------------------------------------------------ a connection that breaks


class _AnswerDropper:
    """A TCP relay in front of a real server that, once per listed request kind, forwards the
    request, reads the server's whole answer and then closes the client's connection without
    it: the request was done, and its client never hears of it."""

    def __init__(self, target: str, drop: list[str]) -> None:
        host, port = target.split("://", 1)[1].split(":")
        self._target = (host, int(port))
        self._drop = drop
        self.dropped: list[str] = []
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> _AnswerDropper:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @staticmethod
    async def _message(reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return head + (await reader.readexactly(length) if length else b"")

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        try:
            while True:
                request = await self._message(reader)
                up_writer.write(request)
                answer = await self._message(up_reader)
                line = request.split(b"\r\n", 1)[0].decode()
                kind = next((k for k in self._drop if line.startswith(k)), None)
                if kind is not None:
                    self._drop.remove(kind)
                    self.dropped.append(line)
                    writer.transport.abort()  # done by the server, never answered
                    return
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_writer.close()
            writer.close()


async def test_lone_server_resends_what_a_broken_connection_lost() -> None:
    """A lone server: the answers to an acquire and to a release are lost with their
    connections; the client sends each once more, and gets the same lease (granted once),
    then counts the release whose resend finds the lease gone as done."""
    from serverutil import serve_in_thread

    from klock_async.remote import RemoteBackend

    stack = contextlib.ExitStack()
    server = await asyncio.to_thread(stack.enter_context, serve_in_thread())
    try:
        async with _AnswerDropper(server.url, ["POST /intents", "DELETE /leases/"]) as relay:
            backend = RemoteBackend(relay.url, timeout=10.0)
            await backend.start()
            await backend.register_agent("a", None)
            (lease,) = await backend.acquire("a", "s", [Intent.of("x", "MUTATES")], ttl=60.0)
            held = await backend.leases()
            released = await backend.release(lease.id, "a")
            left = await backend.leases()
            stats = await backend.statistics()
            await backend.aclose()
            dropped = relay.dropped
    finally:
        await asyncio.to_thread(stack.close)
    assert [x.split(" ")[0] for x in dropped] == ["POST", "DELETE"]
    assert [x.id for x in held] == [lease.id]
    assert (released.id, released.state.value) == (lease.id, "RELEASED")
    assert left == ()
    assert stats.grants == 1
