"""The blocking Klock v1 drop-ins: ``KlockClient`` (embedded) and ``KlockHttpClient``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from serverutil import ThreadServer, serve_in_thread

from klock_async import (
    AgentExistsError,
    InvalidPredicateError,
    InvalidResourceError,
    InvalidTTLError,
    KernelClosedError,
    TransportError,
    UnknownAgentError,
)
from klock_async.compat import KlockClient, KlockHttpClient

Client = KlockClient | KlockHttpClient


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with serve_in_thread(token="compat-token") as running:
        yield running


@pytest.fixture(params=["embedded", "http"])
def client(request: pytest.FixtureRequest, server: ThreadServer) -> Iterator[Client]:
    made: Client
    if request.param == "embedded":
        made = KlockClient()
    else:
        made = KlockHttpClient(server.url, token="compat-token")
    with made:
        yield made


_serial = iter(range(1, 1_000_000))


def names(n: int) -> list[str]:
    """Agent ids unused by other tests (the HTTP variant shares one server)."""
    return [f"compat-{next(_serial)}" for _ in range(n)]


def path() -> str:
    return f"/compat/{next(_serial)}.ts"


def test_grant_has_the_v1_shape(client: Client) -> None:
    """A granted lease is a dict with success, lease_id, agent_id, resource, expires_at (ms)."""
    (agent,) = names(1)
    client.register_agent(agent, 100 + next(_serial))
    target = path()
    before_ms = time.time() * 1000
    result = client.acquire_lease(agent, "s1", "FILE", target, "MUTATES", 60000)
    assert result["success"] is True
    assert result["agent_id"] == agent
    assert result["resource"] == f"FILE:{target}"
    assert result["predicate"] == "MUTATES"
    assert isinstance(result["lease_id"], str) and result["lease_id"]
    assert isinstance(result["token"], int)
    assert isinstance(result["expires_at"], int)
    assert before_ms + 59_000 < result["expires_at"] < before_ms + 61_000
    listed = [lease for lease in client.list_leases() if lease["lease_id"] == result["lease_id"]]
    assert len(listed) == 1 and listed[0]["state"] == "ACTIVE"
    assert client.release_lease(result["lease_id"]) is True
    assert client.release_lease(result["lease_id"]) is False


def test_junior_dies(client: Client) -> None:
    """A younger agent meeting an older holder gets reason DIE and a wait_time in ms."""
    senior, junior = names(2)
    client.register_agent(senior, 1)
    client.register_agent(junior, 2)
    target = path()
    held = client.acquire_lease(senior, "s1", "FILE", target, "MUTATES", 60000)
    result = client.acquire_lease(junior, "s2", "FILE", target, "MUTATES", 60000)
    assert result["success"] is False
    assert result["reason"] == "DIE"
    assert 0 < result["wait_time"] <= 60000
    assert result["blocker_agent_id"] == senior
    other = client.acquire_lease(junior, "s2", "FILE", path(), "MUTATES", 60000)
    assert other["success"] is True
    assert client.release_lease(held["lease_id"])
    assert client.release_lease(other["lease_id"])


def test_senior_gets_wait_and_the_request_is_withdrawn(client: Client) -> None:
    """A WAIT answer queues nothing: after the holder leaves, a younger agent is not blocked."""
    senior, holder, late = names(3)
    client.register_agent(senior, 10)
    client.register_agent(holder, 20)
    client.register_agent(late, 30)
    target = path()
    held = client.acquire_lease(holder, "h", "FILE", target, "MUTATES", 60000)
    result = client.acquire_lease(senior, "s", "FILE", target, "MUTATES", 60000)
    assert result["success"] is False and result["reason"] == "WAIT"
    assert result["wait_time"] > 0
    assert client.release_lease(held["lease_id"])
    # Had the senior's request stayed queued, the younger agent would have to die here.
    taken = client.acquire_lease(late, "l", "FILE", target, "MUTATES", 60000)
    assert taken["success"] is True
    assert client.release_lease(taken["lease_id"])


def test_heartbeat(client: Client) -> None:
    """heartbeat_lease extends an active lease and is False for one that ended."""
    (agent,) = names(1)
    client.register_agent(agent, 5)
    lease = client.acquire_lease(agent, "s", "FILE", path(), "MUTATES", 1000)
    assert client.heartbeat_lease(lease["lease_id"]) is True
    assert client.release_lease(lease["lease_id"])
    assert client.heartbeat_lease(lease["lease_id"]) is False
    assert client.heartbeat_lease("never-granted") is False


def test_counts(client: Client) -> None:
    """active_lease_count counts; evict_expired is 0 (leases end on their deadline)."""
    (agent,) = names(1)
    client.register_agent(agent, 5)
    before = client.active_lease_count()
    lease = client.acquire_lease(agent, "s", "FILE", path(), "CONSUMES", 60000)
    assert client.active_lease_count() == before + 1
    assert client.evict_expired() == 0
    assert client.release_lease(lease["lease_id"])


@pytest.mark.parametrize(
    ("args", "error"),
    [
        pytest.param(("FILE", "/a", "WRITES", 1000), InvalidPredicateError, id="predicate"),
        pytest.param(("FOLDER", "/a", "MUTATES", 1000), InvalidResourceError, id="resource-type"),
        pytest.param(("FILE", "", "MUTATES", 1000), InvalidResourceError, id="empty-path"),
        pytest.param(("FILE", "/a", "MUTATES", 0), InvalidTTLError, id="ttl-zero"),
        pytest.param(("FILE", "/a", "MUTATES", "60000"), InvalidTTLError, id="ttl-string"),
    ],
)
def test_bad_input_raises_and_changes_nothing(
    client: Client, args: tuple[object, ...], error: type[Exception]
) -> None:
    """Bad input raises a typed error (not a failure dict) and leaves the leases as they were."""
    (agent,) = names(1)
    client.register_agent(agent, 5)
    before = client.list_leases()
    with pytest.raises(error):
        client.acquire_lease(agent, "s", *args)  # type: ignore[arg-type]
    assert client.list_leases() == before


def test_unknown_agent_and_age_conflict(client: Client) -> None:
    """An unregistered agent and a second priority for one id are errors."""
    (agent,) = names(1)
    with pytest.raises(UnknownAgentError):
        client.acquire_lease(agent, "s", "FILE", path(), "MUTATES", 1000)
    client.register_agent(agent, 7)
    client.register_agent(agent, 7)
    with pytest.raises(AgentExistsError):
        client.register_agent(agent, 8)


def test_threads_share_one_client_safely(client: Client) -> None:
    """Many threads on one client: leases on one resource never overlap, tokens never repeat."""
    agents = names(8)
    for priority, agent in enumerate(agents, start=1):
        client.register_agent(agent, 1000 + next(_serial) * 10 + priority)
    target = path()
    inside = threading.Lock()  # observes overlap; never blocks a correct run
    tokens: list[int] = []

    def work(agent: str) -> int:
        held = 0
        for attempt in range(25):
            result = client.acquire_lease(
                agent, f"{agent}-{attempt}", "FILE", target, "MUTATES", 5000
            )
            if not result["success"]:
                continue
            assert inside.acquire(blocking=False), "two holders at once"
            tokens.append(result["token"])
            inside.release()
            assert client.release_lease(result["lease_id"])
            held += 1
        return held

    with ThreadPoolExecutor(max_workers=len(agents)) as pool:
        held = sum(pool.map(work, agents))
    assert held == len(tokens) > 0
    assert len(set(tokens)) == len(tokens)
    assert not [lease for lease in client.list_leases() if lease["resource"] == f"FILE:{target}"]


def test_closed_client_refuses_calls() -> None:
    """After close() (or leaving ``with``) every call raises KernelClosedError."""
    with KlockClient() as client:
        client.register_agent("a", 1)
    with pytest.raises(KernelClosedError):
        client.list_leases()
    client.close()  # idempotent


def test_http_client_needs_a_reachable_server(server: ThreadServer) -> None:
    """A wrong token or no server fails at construction with TransportError."""
    with pytest.raises(TransportError, match="token"):
        KlockHttpClient(server.url, token="wrong")
    with pytest.raises(TransportError):
        KlockHttpClient("http://127.0.0.1:9", timeout_ms=2000)


def test_http_client_takes_the_v1_api_key_name(server: ThreadServer) -> None:
    """``api_key=`` (the v1 name) works as the token; shutdown() closes (v1 name)."""
    client = KlockHttpClient(server.url, api_key="compat-token")
    (agent,) = names(1)
    client.register_agent(agent, 3)
    client.shutdown()
    with pytest.raises(KernelClosedError):
        client.register_agent(agent, 3)


def test_embedded_and_http_clients_share_a_server(server: ThreadServer) -> None:
    """Two HTTP clients (two processes in real life) coordinate through the same server."""
    with (
        KlockHttpClient(server.url, token="compat-token") as one,
        KlockHttpClient(server.url, token="compat-token") as two,
    ):
        senior, junior = names(2)
        one.register_agent(senior, 1)
        two.register_agent(junior, 2)
        target = path()
        held = one.acquire_lease(senior, "s", "FILE", target, "MUTATES", 60000)
        assert two.acquire_lease(junior, "j", "FILE", target, "MUTATES", 60000)["reason"] == "DIE"
        assert two.release_lease(held["lease_id"])  # the lease id is a capability
        assert two.acquire_lease(junior, "j", "FILE", target, "MUTATES", 60000)["success"]
