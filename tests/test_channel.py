"""The session channel and client sessions: real servers, real client processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverutil import serve_in_thread, serve_subprocess
from websockets.asyncio.client import ClientConnection, connect

from klock_async import (
    AcquireTimeoutError,
    ClientGoneError,
    CredentialRequiredError,
    Event,
    ForeignAgentError,
    Intent,
    IsolationLevel,
    KernelClosedError,
    Klock,
    LeaseState,
    OperatorRequiredError,
    TransportError,
)
from klock_async.remote import ChannelBackend, RemoteBackend
from klock_async.websocket import DirectWire

# A client process: N client sessions (one Klock.connect each), each registering an agent and
# acquiring LEASES files with ttl 300 s; prints one JSON line saying what it holds, then
# waits to be killed.
CLIENT = r"""
import asyncio, json, sys
from klock_async import Klock

async def main(url, sessions, leases):
    held = []
    klocks = []
    for s in range(sessions):
        klock = Klock.connect(url)
        await klock.__aenter__()
        klocks.append(klock)
        agent = await klock.register_agent(f"doomed-{s}")
        ids = []
        for i in range(leases):
            lease = await agent.acquire(f"/kill/{s}/{i}.py", "MUTATES", ttl=300)
            ids.append(lease.id)
        backend = klock.backend
        held.append({"client_id": backend.client_id, "secret": backend._secret, "leases": ids})
    print(json.dumps(held), flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


@contextlib.contextmanager
def client_process(url: str, sessions: int, leases: int) -> Iterator[subprocess.Popen[str]]:
    """Start the client process; SIGKILL it on exit if it still runs."""
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT, url, str(sessions), str(leases)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
        assert child.stdout is not None
        child.stdout.close()


async def holdings(child: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """What the client process holds, read from its one line of output."""
    assert child.stdout is not None
    line = await asyncio.to_thread(child.stdout.readline)
    assert line, "the client process exited before it held its leases"
    held: list[dict[str, Any]] = json.loads(line)
    return held


async def events_until(klock: Klock, name: str, agent_id: str) -> list[Event]:
    """Every buffered event up to the first ``name`` of ``agent_id`` (from event 1 on)."""
    seen = []
    stream = klock.events(after=0)
    try:
        async for event in stream:
            seen.append(event)
            if event.name == name and event.agent_id == agent_id:
                return seen
    finally:
        await stream.aclose()
    raise AssertionError(f"the event stream ended before {name} of {agent_id}")


@contextlib.asynccontextmanager
async def raw_channel(url: str) -> AsyncIterator[ClientConnection]:
    """A bare WebSocket to the channel, to speak the wire format by hand."""
    async with connect(url.replace("http://", "ws://") + "/channel", compression=None) as ws:
        yield ws


async def call(ws: ClientConnection, message: Any) -> Any:
    await ws.send(json.dumps(message))
    return json.loads(await ws.recv())


# ------------------------------------------------------------------------------ liveness


async def test_killed_client_leases_go_to_an_older_agent_after_grace() -> None:
    """A client killed with SIGKILL holding 10 leases (ttl 300 s): after the grace period the
    server releases them (reason client_gone) and an older waiting agent gets the file."""
    with serve_subprocess(extra=["--grace", "1"]) as server:
        async with Klock.connect(server.url) as klock:
            older = await klock.register_agent("older")
            with client_process(server.url, 1, 10) as child:
                (held,) = await holdings(child)
                waiting = asyncio.create_task(older.acquire("/kill/0/3.py", "MUTATES", ttl=30))
                await klock.backend.barrier()  # type: ignore[attr-defined]
                assert not waiting.done()  # queued behind the younger holder
                child.send_signal(signal.SIGKILL)
                lease = await asyncio.wait_for(waiting, 60)  # a bound, not a measurement
            assert lease.resource.path == "/kill/0/3.py"
            seen = await events_until(klock, "lease.granted", "older")
    released = [e for e in seen if e.name == "lease.released" and e.agent_id == "doomed-0"]
    assert sorted(e.lease_id for e in released) == sorted(held["leases"])
    assert {e.data.get("reason") for e in released} == {"client_gone"}


async def test_frozen_client_is_found_by_pings_and_loses_its_leases() -> None:
    """A client process that stops answering (SIGSTOP: its socket stays open) misses the
    server's pings; after the grace its leases go to an older waiting agent."""
    with serve_subprocess(extra=["--grace", "1"]) as server:
        async with Klock.connect(server.url) as klock:
            older = await klock.register_agent("older")
            with client_process(server.url, 1, 2) as child:
                (held,) = await holdings(child)
                waiting = asyncio.create_task(older.acquire("/kill/0/1.py", "MUTATES", ttl=30))
                await klock.backend.barrier()  # type: ignore[attr-defined]
                child.send_signal(signal.SIGSTOP)
                try:
                    lease = await asyncio.wait_for(waiting, 60)  # a bound, not a measurement
                finally:
                    child.send_signal(signal.SIGKILL)
            seen = await events_until(klock, "lease.granted", "older")
    assert lease.resource.path == "/kill/0/1.py"
    released = [e for e in seen if e.name == "lease.released" and e.agent_id == "doomed-0"]
    assert sorted(e.lease_id for e in released) == sorted(held["leases"])
    assert {e.data.get("reason") for e in released} == {"client_gone"}


async def test_channel_resumes_after_a_break_within_grace() -> None:
    """A channel that breaks reconnects by itself with its secret: same session, its leases
    kept, a waiting acquire answered, calls made meanwhile sent after the resume."""
    with serve_in_thread(grace=60) as server:
        backend = ChannelBackend(server.url)
        async with Klock(backend=backend) as klock, Klock.connect(server.url) as other:
            older = await klock.register_agent("older")
            younger = await other.register_agent("younger")
            kept = await older.acquire("/resume/a.py", "MUTATES", ttl=300)
            blocker = await younger.acquire("/resume/b.py", "MUTATES", ttl=300)
            waiting = asyncio.create_task(older.acquire("/resume/b.py", "MUTATES", ttl=300))
            await backend.barrier()
            client_id = backend.client_id
            backend._ws.abort()  # the network breaks
            stats = asyncio.create_task(backend.statistics())  # sent once it is back
            await blocker.release()
            granted = await waiting
            assert (await stats).leases_active >= 1
            assert backend.reconnects == 1
            assert backend.client_id == client_id
            active = {info.id for info in await backend.leases()}
            assert {kept.id, granted.id} <= active
            await kept.release()
            await granted.release()
            seen = await events_until(klock, "lease.released", "older")
    assert not [e for e in seen if e.data.get("reason") == "client_gone"]


async def test_a_keyed_acquire_whose_answer_was_lost_is_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grant's answer goes down with the connection and the server no longer keeps it
    for the resume (here it keeps none): the client sends the acquire again with its request
    key and gets the same lease back; nothing is granted twice."""
    from klock_async import channel as channel_module

    monkeypatch.setattr(channel_module, "KEEP_ANSWERS", 0)
    with serve_in_thread(grace=60) as server:
        backend = ChannelBackend(server.url)
        async with Klock(backend=backend) as klock, Klock.connect(server.url) as other:
            agent = await klock.register_agent("lost-answer")
            wire = backend._ws
            assert isinstance(wire, DirectWire) and wire._transport is not None
            wire._transport.pause_reading()  # the answer will stay unread in the socket
            acquiring = asyncio.create_task(agent.acquire("/lost/a.py", "MUTATES", ttl=300))
            granted = await events_until(other, "lease.granted", "lost-answer")
            wire.abort()  # the connection breaks with the answer on it
            lease = await acquiring
            assert lease.id == granted[-1].lease_id
            assert backend.reconnects == 1
            leases = [info for info in await other.leases() if info.agent_id == "lost-answer"]
            assert [info.id for info in leases] == [lease.id]
            await lease.release()


async def test_closed_channel_withdraws_queued_requests_after_grace() -> None:
    """A client gone with a request queued: the request is withdrawn (reason client_gone)
    and the resource goes to the next waiter."""
    with serve_in_thread(grace=60) as server:
        async with Klock.connect(server.url) as klock:
            holder = await klock.register_agent("holder")
            held = await holder.acquire("/gone/a.py", "MUTATES", ttl=300)
            gone = ChannelBackend(server.url, grace=0.05)
            async with Klock(backend=gone) as doomed:
                agent = await doomed.register_agent("queued")
                queued = asyncio.create_task(agent.acquire("/gone/a.py", "MUTATES", ttl=300))
                await gone.barrier()
                gone._ws.abort()  # the connection is gone...
                assert gone._runner is not None
                gone._runner.cancel()  # ...and the client never comes back
                seen = await events_until(klock, "request.withdrawn", "queued")
            with pytest.raises(KernelClosedError):
                await queued
            assert seen[-1].data["reason"] == "client_gone"
            assert (await klock.backend.statistics()).requests_waiting == 0
            await held.release()


async def test_recovered_client_sessions_get_one_grace_period(tmp_path: Path) -> None:
    """After a restart with a journal, a client session that comes back within the grace
    keeps its leases; one that does not loses them (reason client_gone)."""
    db = tmp_path / "journal.db"
    with (
        serve_subprocess(db, extra=["--grace", "5"]) as first,
        client_process(first.url, 2, 2) as child,
    ):
        back, lost = await holdings(child)
        first.kill()
    with serve_subprocess(db, extra=["--grace", "5"]) as second:
        async with raw_channel(second.url) as ws:
            hello = {"client_id": back["client_id"], "secret": back["secret"]}
            answer = await call(ws, {"id": 0, "op": "hello", "args": hello})
            assert answer["ok"] and answer["data"]["resumed"], answer
            rest = RemoteBackend(second.url)
            await rest.start()
            try:
                for lease_id in lost["leases"]:
                    final = await rest.wait_ended(lease_id, timeout=60)
                    assert final is not None and final.state is LeaseState.RELEASED
                answer = await call(ws, {"id": 1, "op": "leases"})
                active = {lease["lease_id"] for lease in answer["data"]}
                assert active == set(back["leases"])
            finally:
                await rest.aclose()


# ------------------------------------------------------------------------------ REST sessions


async def test_rest_client_session_ends_without_heartbeats() -> None:
    """A REST client session with no heartbeat within its grace ends: its agents' leases are
    released (reason client_gone); a heartbeat of it then answers client_gone."""
    with serve_in_thread(grace=60) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            opened = (await http.post("/clients", json={"grace_ms": 50})).json()["data"]
            assert opened["grace_ms"] == 50
            auth = {"client_id": opened["client_id"], "secret": opened["secret"]}
            answer = await http.post("/clients/agents", json={**auth, "agent_id": "curl"})
            assert answer.status_code == 200, answer.text
            lease = (
                await http.post(
                    "/leases",
                    json={
                        "agent_id": "curl",
                        "resource": "/rest/a.py",
                        "predicate": "MUTATES",
                        "ttl_ms": 300_000,
                    },
                )
            ).json()["data"]
            ended = await http.post(f"/leases/{lease['lease_id']}/wait", json={}, timeout=60)
            assert ended.json()["data"]["lease"]["state"] == "RELEASED"
            late = await http.post("/clients/heartbeat", json=auth)
            assert late.status_code == 410 and late.json()["code"] == "client_gone"
            wrong = await http.post("/clients/heartbeat", json={**auth, "secret": "nope"})
            assert wrong.status_code == 410
        async with Klock(backend=RemoteBackend(server.url)) as klock:
            seen = await events_until(klock, "lease.released", "curl")
    assert seen[-1].data["reason"] == "client_gone"


async def test_rest_client_session_heartbeat_and_close() -> None:
    """A heartbeat with the secret keeps a REST session; a wrong secret is refused; closing
    it releases its agents' leases at once (reason client_closed)."""
    with serve_in_thread(grace=60) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            opened = (await http.post("/clients", json={})).json()["data"]
            auth = {"client_id": opened["client_id"], "secret": opened["secret"]}
            await http.post("/clients/agents", json={**auth, "agent_id": "curl"})
            await http.post(
                "/leases", json={"agent_id": "curl", "resource": "/r.py", "predicate": "MUTATES"}
            )
            beat = await http.post("/clients/heartbeat", json=auth)
            assert beat.status_code == 200 and beat.json()["data"]["grace_ms"] == 60_000
            wrong = await http.post("/clients/heartbeat", json={**auth, "secret": "x"})
            assert wrong.status_code == 401 and wrong.json()["code"] == "unauthorized"
            closed = await http.post("/clients/close", json=auth)
            assert closed.json()["data"]["released"] == 1
            assert (await http.get("/leases")).json()["data"] == []


# ------------------------------------------------------------------------------ identity


async def test_agent_of_a_channel_answers_only_to_its_credential() -> None:
    """An agent registered over a channel gets a credential: the channel acts for it without
    sending it; another channel, or a REST request without it, is refused
    (credential_required), and nothing changes; a REST request carrying it is served."""
    with serve_in_thread() as server:
        async with Klock.connect(server.url) as mine, Klock.connect(server.url) as thief:
            owner = await mine.register_agent("owner")
            lease = await owner.acquire("/own.py", "MUTATES", ttl=300)
            before = await mine.backend.leases()
            stolen = thief.backend
            intent = Intent.of("/own.py", "MUTATES")
            attempts = [
                stolen.register_agent("owner", None),
                stolen.acquire(
                    "owner",
                    "s",
                    [intent],
                    ttl=1,
                    wait=False,
                    timeout=None,
                    isolation=IsolationLevel.READ_COMMITTED,
                ),
                stolen.release(lease.id, "owner"),
                stolen.release(lease.id),
                stolen.heartbeat(lease.id, "owner", 0.001),
                stolen.release_session("owner", lease.info.session_id),
                stolen.clock_write("/own.py", "owner", strict=False),
                stolen.revoke(lease.id),
                stolen.evict("owner"),
            ]
            for attempt in attempts:
                with pytest.raises(CredentialRequiredError):
                    await attempt
            rest = RemoteBackend(server.url)
            await rest.start()
            try:
                with pytest.raises(CredentialRequiredError):
                    await rest.register_agent("owner", None)
                with pytest.raises(CredentialRequiredError):
                    await rest.release(lease.id, "owner")
            finally:
                await rest.aclose()
            assert await mine.backend.leases() == before
            channel = mine.backend
            assert isinstance(channel, ChannelBackend)
            credential = channel.credentials["owner"]
            async with httpx.AsyncClient(base_url=server.url) as http:
                answer = await http.post(
                    f"/leases/{lease.id}/heartbeat",
                    json={"agent_id": "owner"},
                    headers={"Klock-Credential": credential},
                )
            assert answer.status_code == 200, answer.text
            await lease.release()


async def test_agent_of_a_rest_client_session_answers_only_to_it() -> None:
    """An agent without a credential that a REST client session registered is refused to a
    channel (foreign_agent): identity has no rule for it."""
    with serve_in_thread() as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            opened = (await http.post("/clients", json={})).json()["data"]
            answer = await http.post(
                "/clients/agents",
                json={
                    "agent_id": "rest-agent",
                    "client_id": opened["client_id"],
                    "secret": opened["secret"],
                },
            )
            assert answer.status_code == 200, answer.text
        async with Klock.connect(server.url) as other:
            with pytest.raises(ForeignAgentError):
                await other.backend.register_agent("rest-agent", None)


async def test_operator_token_in_hello_covers_revoke_and_evict() -> None:
    """A channel whose hello carries the operator token may revoke and evict any agent's
    leases; a wrong token is refused at hello (operator_required)."""
    with serve_in_thread(operator_token="op-secret") as server:
        async with Klock.connect(server.url) as mine:
            owner = await mine.register_agent("owner")
            lease = await owner.acquire("/own.py", "MUTATES", ttl=300)
            wrong = ChannelBackend(server.url, operator_token="not-it")
            with pytest.raises(OperatorRequiredError):
                await wrong.start()
            await wrong.aclose()
            plain = ChannelBackend(server.url)
            await plain.start()
            with pytest.raises(OperatorRequiredError):
                await plain.revoke(lease.id)
            await plain.aclose()
            operator = ChannelBackend(server.url, operator_token="op-secret")
            await operator.start()
            revoked = await operator.revoke(lease.id)
            again = await owner.acquire("/again.py", "MUTATES", ttl=300)
            evicted = await operator.evict("owner")
            await operator.aclose()
    assert revoked.id == lease.id
    assert evicted == 1
    assert again.id


async def test_connect_takes_the_operator_token() -> None:
    """Klock.connect(operator_token=...) revokes and evicts another client's agents."""
    with serve_in_thread(operator_token="op-secret") as server:
        async with Klock.connect(server.url) as mine:
            owner = await mine.register_agent("owner")
            lease = await owner.acquire("/own.py", "MUTATES", ttl=300)
            async with Klock.connect(server.url, operator_token="op-secret") as operator:
                revoked = await operator.revoke(lease.id)
                evicted = await operator.evict("owner")
            async with Klock.connect(server.url) as plain:
                with pytest.raises(OperatorRequiredError):
                    await plain.evict("owner")
    assert revoked.id == lease.id
    assert evicted == 0  # revoked already: nothing left to evict


# ------------------------------------------------------------------------------ the wire


async def test_channel_refuses_malformed_calls_with_typed_codes() -> None:
    """Bad JSON, an unknown operation, a reused id, unknown arguments and bad values each get
    an error with the REST code; the channel keeps serving."""
    with serve_in_thread() as server:
        async with raw_channel(server.url) as ws:
            hello = await call(ws, {"id": 0, "op": "hello"})
            assert hello["ok"] and set(hello["data"]) >= {"client_id", "secret", "grace_ms"}
            cases = [
                ("{not json", None, "malformed_json"),
                ({"id": 1, "op": "fly"}, 1, "invalid_field"),
                ({"id": 1, "op": "statistics"}, 1, "invalid_field"),
                (
                    {"id": 2, "op": "register", "args": {"agent_id": "a", "x": 1}},
                    2,
                    "invalid_field",
                ),
                ({"id": 3, "op": "register", "args": {}}, 3, "missing_field"),
                (
                    {
                        "id": 4,
                        "op": "acquire",
                        "args": {
                            "agent_id": "a",
                            "intents": [{"resource": "/a", "predicate": "OWNS"}],
                        },
                    },
                    4,
                    "invalid_predicate",
                ),
                ({"id": 5, "op": "release", "args": {"lease_id": "nope"}}, 5, "lease_not_found"),
                (
                    '{"id": 6, "op": "register", "args": {"agent_id": "\\ud800"}}',
                    None,
                    "malformed_json",
                ),
                (
                    {"id": 7, "op": "register", "args": {"agent_id": "a", "priority": 2**63}},
                    7,
                    "invalid_field",
                ),
            ]
            for message, call_id, code in cases:
                text = message if isinstance(message, str) else json.dumps(message)
                await ws.send(text)
                answer = json.loads(await ws.recv())
                assert answer["id"] == call_id and not answer["ok"], answer
                assert answer["error"]["code"] == code, answer
            batch = [
                {"id": 8, "op": "register", "args": {"agent_id": "a"}},
                {"id": 9, "op": "statistics"},
            ]
            await ws.send(json.dumps(batch))
            answers: list[Any] = []
            while len(answers) < 2:
                value = json.loads(await ws.recv())
                answers += value if isinstance(value, list) else [value]
            assert sorted(a["id"] for a in answers) == [8, 9]
            assert all(a["ok"] for a in answers)


async def test_channel_needs_hello_first_and_the_token() -> None:
    """A channel must open with hello; a server with a token refuses a channel without it."""
    with serve_in_thread(token="s3cret") as server:
        with pytest.raises(TransportError, match="403, unauthorized"):
            async with Klock.connect(server.url):
                pass
        async with Klock.connect(server.url, token="s3cret") as klock:
            await klock.register_agent("fine")
        headers = {"Authorization": "Bearer s3cret"}
        url = server.url.replace("http://", "ws://") + "/channel"
        async with connect(url, additional_headers=headers) as ws:
            answer = await call(ws, {"id": 1, "op": "statistics"})
            assert answer["error"]["code"] == "invalid_field"
        async with connect(url, additional_headers=headers) as ws:
            answer = await call(
                ws, {"id": 0, "op": "hello", "args": {"client_id": "made-up", "secret": "x"}}
            )
            assert answer["error"]["code"] == "client_gone"


async def test_channel_from_a_foreign_page_is_refused() -> None:
    """A WebSocket opened by a page of another origin is refused before any call."""
    from websockets.exceptions import InvalidStatus

    with serve_in_thread() as server:
        url = server.url.replace("http://", "ws://") + "/channel"
        with pytest.raises(InvalidStatus, match="403"):
            async with connect(url, origin="http://evil.example"):  # type: ignore[arg-type]
                pass


async def test_a_websocket_on_another_path_is_refused() -> None:
    """Only /channel speaks WebSocket: an upgrade elsewhere is a 404 with the REST error
    body, and a refused channel's body says why (here: no token)."""
    from websockets.exceptions import InvalidStatus

    with serve_in_thread(token="s3cret") as server:
        base = server.url.replace("http://", "ws://")
        headers = {"Authorization": "Bearer s3cret"}
        with pytest.raises(InvalidStatus, match="404") as raised:
            async with connect(base + "/leases", additional_headers=headers):
                pass
        assert json.loads(raised.value.response.body)["code"] == "not_found"
        with pytest.raises(InvalidStatus, match="403") as raised:
            async with connect(base + "/channel"):
                pass
        assert json.loads(raised.value.response.body)["code"] == "unauthorized"


async def test_resume_of_an_unknown_session_fails_every_call() -> None:
    """A client whose session the server no longer has fails its calls with
    ClientGoneError instead of acting under a new identity."""
    with serve_in_thread(grace=60) as server:
        backend = ChannelBackend(server.url)
        async with Klock(backend=backend) as klock:
            await klock.register_agent("lost")
            backend.client_id = "forgotten"  # as if the server had ended it
            backend._ws.abort()
            with pytest.raises(ClientGoneError):
                await backend.statistics()
            with pytest.raises(ClientGoneError):
                await backend.statistics()


async def test_cancelled_and_timed_out_acquires_over_the_channel_leave_nothing() -> None:
    """A waiting acquire cancelled by its caller (stepped without a task) and one whose
    timeout runs out (run as a task) are both withdrawn; the holder's release then frees
    the file for good."""
    with serve_in_thread() as server:
        async with Klock.connect(server.url) as klock:
            holder = await klock.register_agent("holder")
            waiter = await klock.register_agent("waiter")
            held = await holder.acquire("/w.py", "MUTATES", ttl=300)
            cancelled = asyncio.create_task(waiter.acquire("/w.py", "MUTATES", ttl=300))
            await klock.backend.barrier()  # type: ignore[attr-defined]
            assert (await klock.backend.statistics()).requests_waiting == 1
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            with pytest.raises(AcquireTimeoutError):
                await waiter.acquire("/w.py", "MUTATES", ttl=300, timeout=0.05)
            stats = await klock.backend.statistics()
            assert stats.requests_waiting == 0 and stats.leases_active == 1
            await held.release()
            assert (await klock.backend.statistics()).leases_active == 0


async def test_shutdown_answers_pending_channel_calls() -> None:
    """Stopping the server answers a waiting acquire on a channel with kernel_closed."""
    with serve_in_thread() as running:
        async with Klock.connect(running.url) as klock:
            old = await klock.register_agent("old")
            young = await klock.register_agent("young")
            await young.acquire("/shutdown/a", "MUTATES", ttl=300)
            pending = asyncio.create_task(old.acquire("/shutdown/a", "MUTATES", ttl=300))
            await klock.backend.barrier()  # type: ignore[attr-defined]
            await asyncio.to_thread(running.stop)
            with pytest.raises(KernelClosedError):
                await pending


async def test_channel_acquire_parses_every_intent_form() -> None:
    """One (resource, predicate) pair (the cached path), several pairs, and the
    resource_type + resource_path form (the REST parser) each grant the same way."""
    with serve_in_thread() as server:
        async with raw_channel(server.url) as ws:
            await call(ws, {"id": 0, "op": "hello"})
            await call(ws, {"id": 1, "op": "register", "args": {"agent_id": "a"}})
            forms = [
                [{"resource": "/one.py", "predicate": "MUTATES"}],
                [
                    {"resource": "/two.py", "predicate": "MUTATES"},
                    {"resource": "SYMBOL:f", "predicate": "CONSUMES"},
                ],
                [{"resource_type": "FILE", "resource_path": "three.py", "predicate": "MUTATES"}],
            ]
            got = []
            for n, intents in enumerate(forms, start=2):
                answer = await call(
                    ws, {"id": n, "op": "acquire", "args": {"agent_id": "a", "intents": intents}}
                )
                assert answer["ok"], answer
                got += [(x["resource_type"], x["resource_path"]) for x in answer["data"]["leases"]]
    assert got == [("FILE", "/one.py"), ("FILE", "/two.py"), ("SYMBOL", "f"), ("FILE", "/three.py")]


async def test_client_resumes_by_itself_after_a_server_restart(tmp_path: Path) -> None:
    """A server killed and restarted on the same port and journal: the client reconnects
    with its secret by itself, its session and leases are still there."""
    db = tmp_path / "journal.db"
    with socket.socket() as probe:  # a free port for both runs
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    extra = ["--grace", "30", "--port", str(port)]
    first = contextlib.ExitStack()
    server = first.enter_context(serve_subprocess(db, extra=extra))
    backend = ChannelBackend(server.url, grace=30)
    try:
        async with Klock(backend=backend) as klock:
            agent = await klock.register_agent("survivor")
            lease = await agent.acquire("/restart/a.py", "MUTATES", ttl=300)
            client_id = backend.client_id
            server.kill()
            first.close()
            with serve_subprocess(db, extra=extra):
                active = await backend.leases()  # waits for the reconnect
                assert [info.id for info in active] == [lease.id]
                assert backend.client_id == client_id and backend.reconnects == 1
                await lease.release()
    finally:
        first.close()


async def test_client_grace_is_bounded_by_the_server() -> None:
    """A client may ask for a shorter grace than the server's, never a longer one."""
    with serve_in_thread(grace=2) as server:
        shorter = ChannelBackend(server.url, grace=0.5)
        longer = ChannelBackend(server.url, grace=60)
        async with Klock(backend=shorter), Klock(backend=longer):
            assert shorter.grace == 0.5
            assert longer.grace == 2


async def test_start_fails_when_the_peer_closes_before_hello_is_answered() -> None:
    """A WebSocket peer that closes without answering hello makes start() raise
    TransportError instead of waiting for ever."""
    from websockets.asyncio.server import ServerConnection, serve

    async def close_at_once(ws: ServerConnection) -> None:
        await ws.close()

    async with serve(close_at_once, "127.0.0.1", 0) as peer:
        port = next(iter(peer.sockets)).getsockname()[1]
        backend = ChannelBackend(f"http://127.0.0.1:{port}", timeout=10)
        with pytest.raises(TransportError):
            await backend.start()
        await backend.aclose()


async def test_resume_resends_kept_answers_and_reports_lost_ones() -> None:
    """On resume, a pending call's kept answer is sent again; one whose answer is no longer
    kept (more than 256 answers later) is answered transport_error, never left hanging;
    a pending id the server never received is listed as unknown."""
    with serve_in_thread() as server:
        async with raw_channel(server.url) as ws:
            opened = (await call(ws, {"id": 0, "op": "hello"}))["data"]
            assert (await call(ws, {"id": 1, "op": "statistics"}))["ok"]
            assert (await call(ws, {"id": 2, "op": "statistics"}))["ok"]
            batch = [{"id": i, "op": "statistics"} for i in range(3, 303)]
            await ws.send(json.dumps(batch))
            answered = 0
            while answered < len(batch):
                value = json.loads(await ws.recv())
                answered += len(value) if isinstance(value, list) else 1
        resume = {"client_id": opened["client_id"], "secret": opened["secret"]}
        async with raw_channel(server.url) as ws:
            await ws.send(
                json.dumps({"id": 0, "op": "hello", "args": {**resume, "pending": [1, 302, 400]}})
            )
            answers: dict[Any, Any] = {}
            while len(answers) < 3:
                value = json.loads(await ws.recv())
                for item in value if isinstance(value, list) else [value]:
                    answers[item["id"]] = item
    assert answers[0]["data"]["resumed"] and answers[0]["data"]["unknown"] == [400]
    assert answers[302]["ok"]
    assert answers[1]["error"]["code"] == "transport_error"


async def test_a_call_the_server_does_not_answer_fails_after_the_timeout() -> None:
    """Calls sent to a stopped server (SIGSTOP) fail with TransportError once their own
    timeout has passed, each from when it was sent; the channel serves again after SIGCONT."""
    with serve_subprocess() as server:
        async with Klock.connect(server.url, timeout=0.5) as klock:
            await klock.register_agent("patient")
            server.process.send_signal(signal.SIGSTOP)
            try:
                first = asyncio.create_task(klock.statistics())
                await asyncio.sleep(0.2)  # the second call is sent later: its deadline too
                second = asyncio.create_task(klock.statistics())
                with pytest.raises(TransportError, match="did not answer statistics"):
                    await first
                with pytest.raises(TransportError, match="did not answer statistics"):
                    await second
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert (await klock.statistics()).agents == 1


async def test_a_turn_of_many_answers_is_written_in_chunks() -> None:
    """Twenty calls in one frame are answered in several frames of at most eight answers
    (the client can start on the first while the server decides the rest), every call once."""
    with serve_in_thread() as server:
        async with raw_channel(server.url) as ws:
            await call(ws, {"id": 0, "op": "hello"})
            await ws.send(json.dumps([{"id": i, "op": "statistics"} for i in range(1, 21)]))
            frames: list[list[Any]] = []
            while sum(len(frame) for frame in frames) < 20:
                value = json.loads(await ws.recv())
                frames.append(value if isinstance(value, list) else [value])
    assert sorted(a["id"] for frame in frames for a in frame) == list(range(1, 21))
    assert all(a["ok"] for frame in frames for a in frame)
    assert len(frames) >= 3 and max(len(frame) for frame in frames) <= 8


async def test_the_channel_client_keeps_a_bounded_note_of_its_leases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client's note of the leases it holds keeps the newest (leases that end without a
    release from it would otherwise pile up); a lease dropped from it is still released."""
    import klock_async.remote as remote

    monkeypatch.setattr(remote, "_LEASES_KEPT", 3)
    with serve_in_thread() as server:
        backend = ChannelBackend(server.url)
        async with Klock(backend=backend) as klock:
            agent = await klock.register_agent("keeper")
            leases = [await agent.acquire(f"/kept/{i}.py", "MUTATES", ttl=30) for i in range(5)]
            assert list(backend._held) == [lease.id for lease in leases[2:]]
            for lease in leases:
                await lease.release()
            assert await backend.leases() == ()
