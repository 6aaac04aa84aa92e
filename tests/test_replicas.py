"""Replicas of ``klock serve`` on one PostgreSQL database: real processes, a real server.

Each test starts its replicas as child processes (tests/pgutil.py) on a fresh database of the
session's throw-away cluster, and waits for their log lines ("leader.elected"), never sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgutil import READY_TIMEOUT, Cluster, Replica

from klock_async import KlockError, TransportError
from klock_async.model import Intent, LeaseInfo
from klock_async.remote import ChannelBackend, RemoteBackend

TTL = "1"  # --leader-ttl of these tests: a paused leader is replaced within about a second


@contextlib.contextmanager
def _replica(url: str, *extra: str) -> Iterator[Replica]:
    replica = Replica(url, "--leader-ttl", TTL, *extra)
    try:
        replica.listening()
        yield replica
    finally:
        replica.stop()


def _serve_once(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "klock_async", "serve", "--port", "0", "--db", url, *extra],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
    )


def _raw_request(url: str, method: str, path: str, body: dict[str, object]) -> socket.socket:
    """Send one HTTP request on a new connection and return the socket (answer unread)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    data = json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=READY_TIMEOUT)
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json"
        f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    with sock:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_empty_database_is_initialised(pg_url: str, postgres_cluster: Cluster) -> None:
    """A replica started on an empty database creates the journal and leads in term 1."""
    with _replica(pg_url) as replica:
        assert "term=1" in replica.wait_for("leader.elected")
    tables = postgres_cluster.sql(
        pg_url,
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
        "WHERE schemaname = 'public'",
    )
    assert tables == (
        "klock_agent_clocks,klock_agents,klock_client_sessions,klock_credentials,klock_leader,"
        "klock_leases,klock_meta,klock_path_clocks,klock_priorities"
    )


def test_foreign_schema_is_refused_with_one_line(pg_url: str, postgres_cluster: Cluster) -> None:
    """A database with other tables and no journal stops the replica with one line, status 2."""
    postgres_cluster.sql(pg_url, "CREATE TABLE orders (id int)")
    done = _serve_once(pg_url)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("klock serve: cannot use --db: ")
    assert "pass --init" in lines[0]
    assert (
        postgres_cluster.sql(pg_url, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'klock%'")
        == "0"
    )


def test_follower_redirects_to_the_leader(pg_url: str) -> None:
    """A follower answers 307 with the leader's URL (503 on /health) and does nothing."""
    with _replica(pg_url) as leader:
        leader.wait_for("leader.elected")
        with _replica(pg_url) as follower:
            follower.wait_for("leader.following")
            sock = _raw_request(follower.url, "POST", "/agents", {"agent_id": "a"})
            answer = _read_all(sock).decode()
            health = _read_all(_raw_request(follower.url, "GET", "/health", {})).decode()
    assert health.startswith("HTTP/1.1 503")
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 307")
    assert f"location: {leader.url}/agents" in head.lower()
    assert json.loads(body)["details"] == {"leader": leader.url}


async def test_follower_channel_refuses_with_not_leader_naming_the_leader(pg_url: str) -> None:
    """A follower's /channel answers hello not_leader naming the leader; a channel given the
    follower goes on to the leader."""
    from websockets.asyncio.client import connect

    with _replica(pg_url) as leader:
        leader.wait_for("leader.elected")
        with _replica(pg_url) as follower:
            await asyncio.to_thread(follower.wait_for, "leader.following")
            ws_url = "ws://" + follower.url.split("://", 1)[1] + "/channel"
            async with connect(ws_url) as ws:
                await ws.send(json.dumps({"id": 0, "op": "hello", "args": {}}))
                answer = json.loads(await ws.recv())
            backend = ChannelBackend(follower.url, timeout=10.0)
            await backend.start()
            info = await backend.register_agent("a", None)
            url = backend.url
            await backend.aclose()
    assert answer["ok"] is False
    assert answer["error"]["code"] == "not_leader"
    assert answer["error"]["leader"] == leader.url
    assert info.agent_id == "a"
    assert url == leader.url


async def test_channel_resumes_its_session_on_the_new_leader(pg_url: str) -> None:
    """SIGKILL of the leader: a channel given both replicas reconnects to the new leader and
    resumes its client session there, with its agent's credential and lease."""
    with _replica(pg_url) as first:
        first.wait_for("leader.elected")
        with _replica(pg_url) as second:
            await asyncio.to_thread(second.wait_for, "leader.following")
            backend = ChannelBackend([first.url, second.url], timeout=10.0)
            await backend.start()
            await backend.register_agent("a", None)
            (lease,) = await backend.acquire(
                "a", "s", [Intent.of("kept.txt", "MUTATES")], ttl=120.0
            )
            client_id = backend.client_id
            await asyncio.to_thread(first.stop)  # SIGKILL
            await asyncio.to_thread(second.wait_for, "leader.elected")
            held = await backend.heartbeat(lease.id, "a", None)
            url = backend.url
            released = await backend.release(lease.id, "a")
            await backend.aclose()
    assert url == second.url
    assert backend.client_id == client_id
    assert held.token == lease.token
    assert released.id == lease.id


async def _client_loop(
    backend: RemoteBackend,
    agent: str,
    resource: str,
    holders: dict[str, str | None],
    grants: dict[str, list[int]],
    counts: dict[str, int],
    stop: asyncio.Event,
    progress: asyncio.Event,
    goal: list[int],
) -> None:
    """Take and give back a lease on ``resource`` until told to stop; retry what fails."""
    while not stop.is_set():
        try:
            (lease,) = await backend.acquire(
                agent, f"{agent}-s", [Intent.of(resource, "MUTATES")], ttl=3.0, timeout=30.0
            )
        except (TransportError, KlockError):
            continue  # the leader went away mid-request: ask again (the new one decides)
        assert holders[resource] is None, f"{resource} granted to {agent} while held"
        holders[resource] = agent
        grants[resource].append(lease.token)
        counts["total"] += 1
        counts[agent] = counts.get(agent, 0) + 1
        if counts["total"] >= goal[0]:
            progress.set()
        await asyncio.sleep(0)  # a moment of holding it, for the others to queue behind
        holders[resource] = None  # stops using it before it asks to give it back
        with contextlib.suppress(TransportError, KlockError):
            await backend.release(lease.id, agent)


async def test_leader_killed_under_load_loses_no_grant(pg_url: str) -> None:
    """SIGKILL of the leader under load: held leases survive, one leader grants, tokens grow."""
    with _replica(pg_url) as first:
        first.wait_for("leader.elected")
        with _replica(pg_url) as second:
            urls = [first.url, second.url]
            holder = RemoteBackend(urls, timeout=10.0)
            await holder.start()
            await holder.register_agent("holder", None)
            held: list[LeaseInfo] = []
            for k in range(3):
                held += await holder.acquire(
                    "holder", "h", [Intent.of(f"held/{k}", "MUTATES")], ttl=120.0
                )
            clients = [RemoteBackend(urls, timeout=10.0) for _ in range(12)]
            for i, client in enumerate(clients):
                await client.start()
                await client.register_agent(f"c{i}", None)
            resources = [f"shared/{r}" for r in range(4)]
            holders: dict[str, str | None] = dict.fromkeys(resources)
            grants: dict[str, list[int]] = {r: [] for r in resources}
            counts = {"total": 0}
            stop, progress = asyncio.Event(), asyncio.Event()
            goal = [40]
            tasks = [
                asyncio.create_task(
                    _client_loop(
                        c, f"c{i}", resources[i % 4], holders, grants, counts, stop, progress, goal
                    )
                )
                for i, c in enumerate(clients)
            ]
            await progress.wait()
            before = {r: list(tokens) for r, tokens in grants.items()}
            granted_before = dict(counts)
            await asyncio.to_thread(first.stop)  # SIGKILL
            await asyncio.to_thread(second.wait_for, "leader.elected")
            agents = [f"c{i}" for i in range(len(clients))]
            goal[0] = counts["total"] + 40
            # Every client carries on: at least 40 more grants, and a new one for each client.
            while counts["total"] < goal[0] or any(
                counts.get(a, 0) <= granted_before.get(a, 0) for a in agents
            ):
                progress.clear()
                goal[0] = max(goal[0], counts["total"] + 1)
                await progress.wait()
            stop.set()
            await asyncio.gather(*tasks)
            after = await holder.leases()
            for client in [holder, *clients]:
                await client.aclose()
    # No acknowledged grant lost: the leases held across the kill are there, unchanged.
    survivors = {lease.id: lease.token for lease in after if lease.agent_id == "holder"}
    assert survivors == {lease.id: lease.token for lease in held}
    for resource, tokens in grants.items():
        # One leader at a time: grants on a resource are serial, their tokens strictly grow,
        # across the failover too.
        assert tokens == sorted(set(tokens)), resource
        assert len(tokens) > len(before[resource]), f"no grant on {resource} after the kill"


async def test_paused_leader_commits_nothing_after_a_takeover(
    pg_url: str, postgres_cluster: Cluster
) -> None:
    """SIGSTOP, takeover, SIGCONT: the old leader refuses what it was sent and exits."""
    with _replica(pg_url) as first:
        first.wait_for("leader.elected")
        backend = RemoteBackend(first.url, timeout=10.0)
        await backend.start()
        await backend.register_agent("a", None)
        await backend.aclose()
        with _replica(pg_url) as second:
            first.process.send_signal(signal.SIGSTOP)
            try:
                # Sent to the paused leader: the kernel queues it until the process runs again.
                sock = _raw_request(
                    first.url,
                    "POST",
                    "/intents",
                    {
                        "agent_id": "a",
                        "session_id": "s",
                        "intents": [{"resource": "paused", "predicate": "MUTATES"}],
                        "wait": False,
                    },
                )
                assert "term=2" in await asyncio.to_thread(second.wait_for, "leader.elected")
            finally:
                first.process.send_signal(signal.SIGCONT)
            answer = await asyncio.to_thread(_read_all, sock)
            status = await asyncio.to_thread(first.process.wait, READY_TIMEOUT)
            rows = postgres_cluster.sql(pg_url, "SELECT count(*) FROM klock_leases")
            backend = RemoteBackend(second.url, timeout=10.0)
            await backend.start()
            leases = await backend.leases()
            await backend.aclose()
    assert not answer.startswith(b"HTTP/1.1 200"), answer
    assert status == 3
    assert "another replica" in first.output()
    assert rows == "0"
    assert leases == ()


async def test_database_restart_leader_waits_and_resumes(
    pg_url: str, postgres_cluster: Cluster
) -> None:
    """While PostgreSQL restarts the leader holds requests, then answers them; nothing lost."""
    with _replica(pg_url) as replica:
        replica.wait_for("leader.elected")
        backend = RemoteBackend(replica.url, timeout=60.0)
        await backend.start()
        await backend.register_agent("a", None)
        (first,) = await backend.acquire("a", "s", [Intent.of("one", "MUTATES")], ttl=120.0)
        await asyncio.to_thread(postgres_cluster.stop)
        try:
            pending = asyncio.create_task(
                backend.acquire("a", "s", [Intent.of("two", "MUTATES")], ttl=120.0)
            )
            # The commit found the database gone.
            await asyncio.to_thread(replica.wait_for, "journal.waiting")
        finally:
            await asyncio.to_thread(postgres_cluster.start)
        (second,) = await pending
        leases = await backend.leases()
        await backend.aclose()
        term = postgres_cluster.sql(pg_url, "SELECT term FROM klock_leader")
    assert second.token > first.token
    assert {lease.id for lease in leases} == {first.id, second.id}
    assert term == "1"  # the same leader carried on


@pytest.mark.parametrize("value", ["http://a:1,http://b:2", "http://a:1, http://b:2/"])
def test_comma_separated_urls_name_every_replica(value: str) -> None:
    """KLOCK_SERVER_URL may hold several replicas separated by commas."""
    assert RemoteBackend(value).servers.urls == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        pytest.param(("--leader-ttl", "0"), "must be positive", id="leader-ttl"),
        pytest.param(("--advertise-url", "node1:3100"), "must start with http", id="advertise"),
    ],
)
def test_bad_replica_options_stop_with_one_line(option: tuple[str, str], message: str) -> None:
    """A bad --leader-ttl or --advertise-url stops klock serve with one line, status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "klock_async", "serve", *option],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert message in line


# ------------------------------------------------------------------ resends across a failover


def _answer_of(sock: socket.socket) -> tuple[str, dict[str, object]]:
    """The status line and JSON body of the answer waiting on ``sock``."""
    head, _, body = _read_all(sock).decode().partition("\r\n\r\n")
    return head.split("\r\n", 1)[0], json.loads(body)


async def test_grant_committed_but_never_read_is_answered_again_by_the_new_leader(
    pg_url: str, postgres_cluster: Cluster
) -> None:
    """An acquire granted and committed by the leader, whose answer the client never read
    before the leader was SIGKILLed: its resend (same request key) to the new leader gets the
    same lease, token and all, and nothing is granted twice."""
    body = {
        "agent_id": "a",
        "session_id": "s",
        "intents": [{"resource": "one", "predicate": "MUTATES"}],
        "ttl_ms": 120_000,
        "request_key": "resend-me-once-0001",
    }
    with _replica(pg_url) as first:
        first.wait_for("leader.elected")
        with _replica(pg_url) as second:
            await asyncio.to_thread(second.wait_for, "leader.following")
            setup = RemoteBackend(first.url, timeout=10.0, credentials=False)
            await setup.start()
            await setup.register_agent("a", None)
            await setup.aclose()
            sent = _raw_request(first.url, "POST", "/intents", body)
            # The answer is in this socket's buffer, so it was committed: read none of it yet.
            await asyncio.to_thread(sent.recv, 1, socket.MSG_PEEK)
            await asyncio.to_thread(first.stop)  # SIGKILL
            assert "term=2" in await asyncio.to_thread(second.wait_for, "leader.elected")
            await asyncio.to_thread(second.wait_for, "server.started")  # serving
            again = _answer_of(_raw_request(second.url, "POST", "/intents", body))
            other = _answer_of(
                _raw_request(
                    second.url,
                    "POST",
                    "/intents",
                    {**body, "intents": [{"resource": "two", "predicate": "MUTATES"}]},
                )
            )
            rows = postgres_cluster.sql(
                pg_url, "SELECT count(*), min(request_key) FROM klock_leases"
            )
    first_status, first_answer = _answer_of(sent)
    status, answer = again
    assert first_status == status == "HTTP/1.1 200 OK", answer
    assert answer["data"] == first_answer["data"]
    assert other[0].startswith("HTTP/1.1 409")
    assert other[1]["code"] == "request_key_reused"
    assert rows == "1|resend-me-once-0001"


@pytest.mark.parametrize("kind", [RemoteBackend, ChannelBackend])
async def test_waiting_acquire_carries_on_across_the_kill(
    pg_url: str, kind: type[RemoteBackend] | type[ChannelBackend]
) -> None:
    """An acquire queued on the leader when it is SIGKILLed is resent to the new leader (no
    TransportError) and granted there once, when the lease it waits for is released."""
    with _replica(pg_url) as first:
        first.wait_for("leader.elected")
        with _replica(pg_url) as second:
            await asyncio.to_thread(second.wait_for, "leader.following")
            urls = [first.url, second.url]
            holder = RemoteBackend(urls, timeout=10.0)
            waiter = kind(urls, timeout=10.0)
            for backend, agent in ((holder, "holder"), (waiter, "waiter")):
                await backend.start()
                await backend.register_agent(agent, None)
            (held,) = await holder.acquire("holder", "h", [Intent.of("x", "MUTATES")], ttl=120.0)
            pending = asyncio.create_task(
                waiter.acquire("waiter", "w", [Intent.of("x", "MUTATES")], ttl=120.0)
            )
            await asyncio.to_thread(first.wait_for, "request.queued")  # on the leader
            await asyncio.to_thread(first.stop)  # SIGKILL
            await asyncio.to_thread(second.wait_for, "leader.elected")
            await holder.release(held.id, "holder")
            (granted,) = await pending
            leases = await holder.leases()
            for backend in (holder, waiter):
                await backend.aclose()
    assert granted.token > held.token
    assert [(x.agent_id, x.id) for x in leases] == [("waiter", granted.id)]


async def _strict_client_loop(
    backend: RemoteBackend | ChannelBackend,
    agent: str,
    resource: str,
    holders: dict[str, str | None],
    grants: dict[str, list[int]],
    counts: dict[str, int],
    stop: asyncio.Event,
    progress: asyncio.Event,
    goal: list[int],
) -> None:
    """Take and give back a lease on ``resource`` until told to stop; any error fails."""
    while not stop.is_set():
        (lease,) = await backend.acquire(
            agent, f"{agent}-s", [Intent.of(resource, "MUTATES")], ttl=120.0, timeout=30.0
        )
        assert holders[resource] is None, f"{resource} granted to {agent} while held"
        holders[resource] = agent
        grants[resource].append(lease.token)
        counts["total"] += 1
        counts[agent] = counts.get(agent, 0) + 1
        if counts["total"] >= goal[0]:
            progress.set()
        await asyncio.sleep(0)  # a moment of holding it, for the others to queue behind
        holders[resource] = None
        released = await backend.release(lease.id, agent)
        assert released.id == lease.id


async def test_leader_killed_under_load_clients_see_no_error(pg_url: str) -> None:
    """SIGKILL of the leader under the load of REST and channel clients: no client sees an
    error (acquires and releases in flight are resent), and no call leaves a lease behind."""
    with _replica(pg_url) as first:
        first.wait_for("leader.elected")
        with _replica(pg_url) as second:
            urls = [first.url, second.url]
            clients: list[RemoteBackend | ChannelBackend] = [
                (RemoteBackend if i % 2 else ChannelBackend)(urls, timeout=10.0) for i in range(8)
            ]
            for i, client in enumerate(clients):
                await client.start()
                await client.register_agent(f"c{i}", None)
            resources = [f"shared/{r}" for r in range(3)]
            holders: dict[str, str | None] = dict.fromkeys(resources)
            grants: dict[str, list[int]] = {r: [] for r in resources}
            counts = {"total": 0}
            stop, progress = asyncio.Event(), asyncio.Event()
            goal = [40]
            tasks = [
                asyncio.create_task(
                    _strict_client_loop(
                        c, f"c{i}", resources[i % 3], holders, grants, counts, stop, progress, goal
                    )
                )
                for i, c in enumerate(clients)
            ]
            await progress.wait()
            granted_before = dict(counts)
            await asyncio.to_thread(first.stop)  # SIGKILL
            await asyncio.to_thread(second.wait_for, "leader.elected")
            agents = [f"c{i}" for i in range(len(clients))]
            goal[0] = counts["total"] + 40
            while counts["total"] < goal[0] or any(
                counts.get(a, 0) <= granted_before.get(a, 0) for a in agents
            ):
                progress.clear()
                goal[0] = max(goal[0], counts["total"] + 1)
                await progress.wait()
            stop.set()
            await asyncio.gather(*tasks)  # raises the first error any client saw
            left = await clients[1].leases()
            for client in clients:
                await client.aclose()
    assert left == ()  # every grant was released once: none was granted twice for one call
    for resource, tokens in grants.items():
        assert tokens == sorted(set(tokens)), resource


# ------------------------------------------------------------------ one-server commands


def test_status_hook_and_init_find_the_leader_among_the_replicas(
    pg_url: str, tmp_path: Path
) -> None:
    """klock status, klock hook and klock init --http, given the follower first in a
    comma-separated list (as KLOCK_SERVER_URL may hold), talk to the leader."""
    from test_hooks import edit, hook, pre

    with _replica(pg_url) as leader:
        leader.wait_for("leader.elected")
        leader.wait_for("server.started")
        with _replica(pg_url) as follower:
            follower.wait_for("leader.following")
            urls = f"{follower.url},{leader.url}"
            status = subprocess.run(
                [sys.executable, "-m", "klock_async", "status", "--server", urls],
                capture_output=True,
                text=True,
                timeout=READY_TIMEOUT,
                env={**os.environ, "COLUMNS": "200"},
            )
            checked = hook(urls, pre("s1", "Edit", edit(tmp_path / "app.py"), tmp_path))
            init = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "klock_async",
                    "init",
                    "claude-code",
                    "--project-dir",
                    str(tmp_path),
                    "--http",
                    "--server",
                    urls,
                ],
                capture_output=True,
                text=True,
                timeout=READY_TIMEOUT,
            )
    assert status.returncode == 0, status.stderr
    assert leader.url in status.stdout
    assert checked.returncode == 0, checked.stderr
    assert init.returncode == 0, init.stderr
    settings = json.loads((tmp_path / ".claude" / "settings.json").read_text(encoding="utf-8"))
    entry = settings["hooks"]["PreToolUse"][0]["hooks"][0]
    assert entry["url"] == f"{leader.url}/hooks/claude-code"


async def test_channel_release_resent_to_the_new_leader_counts_as_done(pg_url: str) -> None:
    """A release sent to a leader that never handled it (paused, then replaced and killed) is
    resent on the new leader; there the lease has run out (its ttl is shorter than the
    takeover), and "lease not found" in answer to the resend counts as done."""
    with _replica(pg_url) as first:
        first.wait_for("leader.elected")
        with _replica(pg_url) as second:
            await asyncio.to_thread(second.wait_for, "leader.following")
            backend = ChannelBackend([first.url, second.url], timeout=10.0)
            await backend.start()
            await backend.register_agent("a", None)
            (lease,) = await backend.acquire("a", "s", [Intent.of("x", "MUTATES")], ttl=0.05)
            first.process.send_signal(signal.SIGSTOP)
            try:
                release = asyncio.create_task(backend.release(lease.id, "a"))
                await asyncio.to_thread(second.wait_for, "leader.elected")
            finally:
                first.process.send_signal(signal.SIGKILL)
                first.process.send_signal(signal.SIGCONT)
            released = await release
            leases = await backend.leases()
            await backend.aclose()
    assert (released.id, released.state.value) == (lease.id, "RELEASED")
    assert leases == ()
