"""The HTTP API of ``klock serve``, through a real uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serverutil import ThreadServer, serve_in_thread

_names = itertools.count(1)


def fresh(prefix: str = "agent") -> str:
    """An id no other test of this module uses (the module shares one server)."""
    return f"{prefix}-{next(_names)}"


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with serve_in_thread() as running:
        yield running


@pytest.fixture
def http(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def ok(response: httpx.Response) -> Any:
    body = response.json()
    assert response.status_code == 200, body
    assert body["success"] is True and body["error"] is None
    return body["data"]


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert response.status_code == status, body
    assert body["success"] is False and body["data"] is None
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"]
    return body


def register(http: httpx.Client, priority: int | None = None) -> str:
    agent_id = fresh()
    ok(http.post("/agents", json={"agent_id": agent_id, "priority": priority}))
    return agent_id


def lease_body(
    agent_id: str, path: str, predicate: str = "MUTATES", **extra: Any
) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "session_id": extra.pop("session_id", fresh("session")),
        "resource_type": "FILE",
        "resource_path": path,
        "predicate": predicate,
        "ttl": extra.pop("ttl", 60_000),
        **extra,
    }


def snapshot(http: httpx.Client) -> tuple[Any, ...]:
    """Everything a refused request must leave unchanged."""
    stats = ok(http.get("/statistics"))
    for moving in ("batches", "messages"):
        stats.pop(moving)
    return stats, ok(http.get("/leases")), ok(http.get("/agents")), ok(http.get("/clocks"))


# ------------------------------------------------------------------ the Klock v1 contract


def test_health_reports_ok(http: httpx.Client) -> None:
    """GET /health answers the v1 envelope with status and active lease count."""
    data = ok(http.get("/health"))
    assert data["status"] == "ok"
    assert isinstance(data["active_leases"], int)


def test_register_agent_answers_v1_shape(http: httpx.Client) -> None:
    """POST /agents answers agent_id and priority; the same call again is idempotent."""
    agent_id = fresh()
    first = ok(http.post("/agents", json={"agent_id": agent_id, "priority": 900}))
    assert first == {"agent_id": agent_id, "priority": 900, "ts": 900}
    assert ok(http.post("/agents", json={"agent_id": agent_id, "priority": 900})) == first
    listed = ok(http.get("/agents"))
    assert first in listed


def test_register_agent_without_priority_gets_next_age(http: httpx.Client) -> None:
    """Without a priority the agent's age is the next value of the counter."""
    a = ok(http.post("/agents", json={"agent_id": fresh()}))
    b = ok(http.post("/agents", json={"agent_id": fresh()}))
    assert b["ts"] > a["ts"]


def test_register_agent_again_with_other_priority_is_refused(http: httpx.Client) -> None:
    """An agent's age never changes: another priority is a 409 conflict."""
    agent_id = register(http, priority=5000)
    before = snapshot(http)
    refused(http.post("/agents", json={"agent_id": agent_id, "priority": 1}), 409, "agent_exists")
    assert snapshot(http) == before


def test_acquire_answers_v1_shape_with_token(http: httpx.Client) -> None:
    """POST /leases answers lease_id, agent_id, resource, expires_at in ms, and the token."""
    agent_id = register(http)
    before_ms = time.time() * 1000
    data = ok(http.post("/leases", json=lease_body(agent_id, "src/./a.py", ttl=60_000)))
    assert data["lease_id"] == data["id"]
    assert data["agent_id"] == agent_id
    assert data["resource"] == "FILE:/src/a.py"
    assert data["predicate"] == "MUTATES"
    assert data["state"] == "ACTIVE"
    assert data["ttl"] == 60_000
    assert isinstance(data["expires_at"], int)
    assert before_ms + 59_000 < data["expires_at"] < before_ms + 61_000
    assert isinstance(data["token"], int) and data["token"] > 0
    listed = [lease for lease in ok(http.get("/leases")) if lease["id"] == data["id"]]
    assert listed == [data]


def test_younger_agent_dies_with_v1_reason(http: httpx.Client) -> None:
    """A younger agent meeting an older holder gets 409 with reason DIE and a wait_time."""
    old, young = register(http), register(http)
    held = ok(http.post("/leases", json=lease_body(old, "src/die.py")))
    before = snapshot(http)
    body = refused(http.post("/leases", json=lease_body(young, "src/die.py")), 409, "lease_died")
    assert body["reason"] == "DIE"
    assert body["wait_time"] > 0
    assert body["details"]["blocker_agent_id"] == old
    assert body["details"]["blocker_lease_id"] == held["lease_id"]
    assert snapshot(http)[1:] == before[1:]


def test_older_agent_gets_wait_and_nothing_is_queued(http: httpx.Client) -> None:
    """Without "wait": true an older agent gets reason WAIT and no request stays queued."""
    old, young = register(http, priority=-10), register(http)
    ok(http.post("/leases", json=lease_body(young, "src/wait.py")))
    body = refused(
        http.post("/leases", json=lease_body(old, "src/wait.py")), 409, "lease_would_wait"
    )
    assert body["reason"] == "WAIT"
    assert body["wait_time"] > 0
    assert ok(http.get("/statistics"))["requests_waiting"] == 0


def _durations(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (field path, value) of a JSON value whose name says it is a time or a duration."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key in ("ttl", "expires_at", "wait_time", "retry_after") or key.endswith(
                ("_ms", "_s")
            ):
                yield where, item
            yield from _durations(item, where)


def test_every_duration_on_the_wire_is_whole_milliseconds_named_so(
    http: httpx.Client,
) -> None:
    """Grants and both refusals carry durations as integer *_ms fields, none in seconds."""
    old, young, newest = register(http, priority=-10), register(http), register(http)
    held = ok(http.post("/leases", json=lease_body(young, "src/units.py", ttl=None, ttl_ms=1234)))
    died = refused(http.post("/leases", json=lease_body(newest, "src/units.py")), 409, "lease_died")
    waits = refused(
        http.post("/leases", json=lease_body(old, "src/units.py")), 409, "lease_would_wait"
    )
    assert (held["ttl_ms"], held["ttl"]) == (1234, 1234)
    assert held["expires_at_ms"] == held["expires_at"]
    assert died["wait_time"] == died["details"]["retry_after_ms"]
    assert waits["wait_time"] == waits["details"]["wait_time_ms"]
    for body in (held, died, waits):
        for where, value in _durations(body):
            assert where.endswith("_ms") or where in ("ttl", "expires_at", "wait_time"), where
            assert isinstance(value, int) and not isinstance(value, bool), (where, value)
    ok(http.delete(f"/leases/{held['lease_id']}"))  # the server is shared: expire nothing later


def test_ttl_ms_and_its_v1_name_must_agree(http: httpx.Client) -> None:
    """A request naming ttl_ms and a different ttl is refused, not resolved by a guess."""
    agent_id = register(http)
    refused(
        http.post("/leases", json=lease_body(agent_id, "src/ttl.py", ttl=5000, ttl_ms=6000)),
        400,
        "invalid_ttl",
    )


def test_release_by_id_is_a_capability(http: httpx.Client) -> None:
    """DELETE /leases/{id} without agent_id releases (v1); a second release is 404."""
    agent_id = register(http)
    lease = ok(http.post("/leases", json=lease_body(agent_id, "src/rel.py")))
    data = ok(http.delete(f"/leases/{lease['lease_id']}"))
    assert data["released"] is True
    assert data["state"] == "RELEASED"
    refused(http.delete(f"/leases/{lease['lease_id']}"), 404, "lease_not_found")


def test_release_by_another_agent_is_refused(http: httpx.Client) -> None:
    """Naming an agent other than the holder is 403 not_lease_owner and changes nothing."""
    owner, other = register(http), register(http)
    lease = ok(http.post("/leases", json=lease_body(owner, "src/own.py")))
    before = snapshot(http)
    url = f"/leases/{lease['lease_id']}"
    refused(http.delete(url, params={"agent_id": other}), 403, "not_lease_owner")
    refused(http.post(f"{url}/heartbeat", json={"agent_id": other}), 403, "not_lease_owner")
    assert snapshot(http) == before
    assert ok(http.delete(url, params={"agent_id": owner}))["state"] == "RELEASED"


def test_heartbeat_pushes_expiry(http: httpx.Client) -> None:
    """POST /leases/{id}/heartbeat extends by the lease's ttl, or by a ttl given in ms."""
    agent_id = register(http)
    lease = ok(http.post("/leases", json=lease_body(agent_id, "src/hb.py", ttl=1_000)))
    url = f"/leases/{lease['lease_id']}/heartbeat"
    longer = ok(http.post(url, json={"agent_id": agent_id, "ttl": 600_000}))
    assert longer["ttl"] == 600_000
    assert longer["expires_at"] > lease["expires_at"] + 500_000
    again = ok(http.post(url))  # v1 clients send no body
    assert again["ttl"] == 600_000
    refused(http.post("/leases/no-such-lease/heartbeat"), 404, "lease_not_found")


def test_intents_are_granted_together(http: httpx.Client) -> None:
    """POST /intents grants a whole manifest atomically and lists one lease per intent."""
    agent_id = register(http)
    session = fresh("session")
    data = ok(
        http.post(
            "/intents",
            json={
                "agent_id": agent_id,
                "session_id": session,
                "intents": [
                    {"resource_type": "FILE", "resource_path": "/m/a.py", "predicate": "MUTATES"},
                    {"resource": "DATABASE_TABLE:users", "predicate": "CONSUMES"},
                ],
            },
        )
    )
    assert data["status"] == "Granted" and data["conflicts"] == []
    assert [lease["resource"] for lease in data["leases"]] == [
        "FILE:/m/a.py",
        "DATABASE_TABLE:users",
    ]
    assert len({lease["token"] for lease in data["leases"]}) == 2


def test_intents_conflict_grants_nothing(http: httpx.Client) -> None:
    """A manifest with one conflicting intent is refused whole: none of it is held."""
    old, young = register(http), register(http)
    ok(http.post("/leases", json=lease_body(old, "/atomic/b.py")))
    before = snapshot(http)
    refused(
        http.post(
            "/intents",
            json={
                "agent_id": young,
                "session_id": fresh("session"),
                "intents": [
                    {"resource": "FILE:/atomic/a.py", "predicate": "MUTATES"},
                    {"resource": "FILE:/atomic/b.py", "predicate": "MUTATES"},
                ],
            },
        ),
        409,
        "lease_died",
    )
    assert snapshot(http)[1:] == before[1:]


def test_release_session(http: httpx.Client) -> None:
    """POST /sessions/release ends every lease of one session and says how many."""
    agent_id = register(http)
    session = fresh("session")
    for path in ("/s/a", "/s/b"):
        ok(http.post("/leases", json=lease_body(agent_id, path, session_id=session)))
    other = ok(http.post("/leases", json=lease_body(agent_id, "/s/c")))
    body = {"agent_id": agent_id, "session_id": session}
    assert ok(http.post("/sessions/release", json=body))["released"] == 2
    assert [lease["id"] for lease in ok(http.get("/leases", params={"agent_id": agent_id}))] == [
        other["id"]
    ]


def test_evict(http: httpx.Client) -> None:
    """POST /evict with an agent revokes its leases; with no body it evicts nothing (v1)."""
    agent_id = register(http)
    for path in ("/e/a", "/e/b"):
        ok(http.post("/leases", json=lease_body(agent_id, path)))
    assert ok(http.post("/evict"))["evicted"] == 0
    assert ok(http.post("/evict", json={"agent_id": agent_id}))["evicted"] == 2
    assert ok(http.get("/leases", params={"agent_id": agent_id})) == []
    refused(http.post("/evict", json={"agent_id": fresh()}), 404, "unknown_agent")


def test_revoke(http: httpx.Client) -> None:
    """POST /leases/{id}/revoke ends a lease by force (state REVOKED)."""
    agent_id = register(http)
    lease = ok(http.post("/leases", json=lease_body(agent_id, "/r/a")))
    assert ok(http.post(f"/leases/{lease['id']}/revoke"))["state"] == "REVOKED"
    refused(http.post(f"/leases/{lease['id']}/revoke"), 404, "lease_not_found")


def test_clocks(http: httpx.Client) -> None:
    """Clock read and write over HTTP, with a stale strict write refused as 409."""
    a, b = register(http), register(http)
    path = f"/clock/{fresh('file')}.py"
    written = ok(http.post("/clocks/write", json={"path": path, "agent_id": a}))
    assert written["clock"] == {a: 1}
    before = snapshot(http)
    body = refused(
        http.post("/clocks/write", json={"path": path, "agent_id": b}), 409, "causal_violation"
    )
    assert body["details"]["path_clock"] == {a: 1}
    assert snapshot(http)[1:] == before[1:]
    assert ok(http.post("/clocks/read", json={"path": path, "agent_id": b}))["clock"] == {a: 1}
    assert ok(http.post("/clocks/write", json={"path": path, "agent_id": b}))["clock"] == {
        a: 1,
        b: 1,
    }
    status = ok(http.get("/clocks"))
    assert f"FILE:{path}" in status["tracked_paths"]
    conflicts = status["conflict_count"]
    ok(http.post("/clocks/write", json={"path": path, "agent_id": a, "strict": False}))
    assert ok(http.get("/clocks"))["conflict_count"] == conflicts + 1


def test_metrics_in_prometheus_text(http: httpx.Client) -> None:
    """GET /metrics parses with prometheus_client: kernel, HTTP and process metrics."""
    agent_id = register(http)
    lease = ok(http.post("/leases", json=lease_body(agent_id, "/metrics/a")))
    ok(http.delete(f"/leases/{lease['id']}"))
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    values = {
        sample.name: sample.value
        for family in families.values()
        for sample in family.samples
        if not sample.labels
    }
    for name in (
        "klock_leases_active",
        "klock_requests_waiting",
        "klock_grants_total",
        "klock_waits_total",
        "klock_deaths_total",
        "klock_expiries_total",
        "klock_causal_violations_total",
        "klock_events_dropped_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert name in values, name
    assert values["klock_grants_total"] >= 1
    assert families["klock_http_request_duration_seconds"].type == "histogram"
    assert "python_gc_collections" in families
    buckets = {
        (s.labels["method"], s.labels["route"], s.labels["le"]): s.value
        for s in families["klock_http_request_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert buckets[("POST", "/leases", "+Inf")] >= 1
    assert ("DELETE", "/leases/{lease_id}", "+Inf") in buckets


# ------------------------------------------------------------------ bad input changes nothing


BAD_REQUESTS = [
    pytest.param("POST", "/agents", b"{not json", 400, "malformed_json", id="malformed-json"),
    pytest.param("POST", "/agents", b"[1, 2]", 400, "malformed_json", id="json-array"),
    pytest.param("POST", "/agents", b"", 400, "malformed_json", id="empty-body"),
    pytest.param("POST", "/agents", {}, 400, "missing_field", id="missing-agent-id"),
    pytest.param("POST", "/agents", {"agent_id": 7}, 400, "invalid_field", id="agent-id-number"),
    pytest.param("POST", "/agents", {"agent_id": " "}, 400, "invalid_field", id="agent-id-blank"),
    pytest.param(
        "POST",
        "/agents",
        {"agent_id": "x", "priority": "1"},
        400,
        "invalid_field",
        id="priority-string",
    ),
    pytest.param(
        "POST",
        "/agents",
        {"agent_id": "x", "priority": True},
        400,
        "invalid_field",
        id="priority-bool",
    ),
    pytest.param("POST", "/leases", {"predicate": "MUTATES"}, 400, "missing_field", id="no-agent"),
    pytest.param(
        "POST",
        "/leases",
        {"AGENT": "predicate", "predicate": "WRITES"},
        400,
        "invalid_predicate",
        id="unknown-predicate",
    ),
    pytest.param(
        "POST",
        "/leases",
        {"AGENT": "type", "resource_type": "FOLDER"},
        400,
        "invalid_resource",
        id="unknown-resource-type",
    ),
    pytest.param(
        "POST",
        "/leases",
        {"AGENT": "path", "resource_path": ""},
        400,
        "invalid_resource",
        id="empty-path",
    ),
    pytest.param(
        "POST",
        "/leases",
        {"AGENT": "path", "resource_path": None},
        400,
        "missing_field",
        id="no-path",
    ),
    pytest.param("POST", "/leases", {"AGENT": "ttl", "ttl": 0}, 400, "invalid_ttl", id="ttl-zero"),
    pytest.param(
        "POST", "/leases", {"AGENT": "ttl", "ttl": -5}, 400, "invalid_ttl", id="ttl-negative"
    ),
    pytest.param(
        "POST", "/leases", {"AGENT": "ttl", "ttl": "60000"}, 400, "invalid_ttl", id="ttl-string"
    ),
    pytest.param(
        "POST", "/leases", {"AGENT": "ttl", "ttl": True}, 400, "invalid_ttl", id="ttl-bool"
    ),
    pytest.param(
        "POST", "/leases", {"AGENT": "wait", "wait": "yes"}, 400, "invalid_field", id="wait-string"
    ),
    pytest.param(
        "POST",
        "/leases",
        {"AGENT": "timeout", "wait": True, "timeout_ms": -1},
        400,
        "invalid_field",
        id="timeout-negative",
    ),
    pytest.param(
        "POST",
        "/leases",
        {"AGENT": "iso", "isolation": "STRICT"},
        400,
        "invalid_isolation",
        id="unknown-isolation",
    ),
    pytest.param(
        "POST",
        "/leases",
        {"AGENT": "unknown", "agent_id": "nobody-registered-this"},
        404,
        "unknown_agent",
        id="unknown-agent",
    ),
    pytest.param(
        "POST",
        "/intents",
        {"agent_id": "x", "intents": []},
        400,
        "invalid_field",
        id="intents-empty",
    ),
    pytest.param(
        "POST",
        "/intents",
        {"agent_id": "x", "intents": "FILE:/a"},
        400,
        "invalid_field",
        id="intents-not-list",
    ),
    pytest.param(
        "POST",
        "/intents",
        {"agent_id": "x", "intents": ["FILE:/a"]},
        400,
        "invalid_field",
        id="intent-not-object",
    ),
    pytest.param(
        "DELETE", "/leases/no-such-lease", None, 404, "lease_not_found", id="unknown-lease"
    ),
    pytest.param(
        "POST",
        "/leases/no-such-lease/heartbeat",
        {"ttl": 0},
        400,
        "invalid_ttl",
        id="heartbeat-ttl-zero",
    ),
    pytest.param(
        "POST", "/sessions/release", {"agent_id": "x"}, 400, "missing_field", id="no-session"
    ),
    pytest.param("POST", "/clocks/write", {"agent_id": "x"}, 400, "missing_field", id="no-path"),
    pytest.param(
        "POST",
        "/clocks/read",
        {"path": "/a", "agent_id": "nobody-registered-this"},
        404,
        "unknown_agent",
        id="clock-unknown-agent",
    ),
    pytest.param("GET", "/nowhere", None, 404, "not_found", id="unknown-route"),
    pytest.param("PUT", "/agents", None, 405, "method_not_allowed", id="wrong-method"),
    pytest.param("POST", "/agents", b"x" * (2 << 20), 413, "body_too_large", id="oversized"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD_REQUESTS)
def test_bad_request_is_refused_and_changes_nothing(
    http: httpx.Client, method: str, path: str, body: Any, status: int, code: str
) -> None:
    """Each malformed request gets its 4xx code and leaves every piece of state as it was."""
    if isinstance(body, dict) and "AGENT" in body:
        # A lease request complete but for the one field under test.
        del body["AGENT"]
        template = lease_body(register(http), "/bad/input.py")
        body = {**template, **body}
    before = snapshot(http)
    if isinstance(body, bytes):
        response = http.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )
    elif body is None:
        response = http.request(method, path)
    else:
        response = http.request(method, path, json=body)
    refused(response, status, code)
    assert snapshot(http) == before


def test_oversized_body_without_length_is_refused(http: httpx.Client) -> None:
    """A chunked body that grows past the limit is refused with 413 as it streams in."""
    before = snapshot(http)

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b" " * 65_536

    refused(http.post("/agents", content=chunks()), 413, "body_too_large")
    assert snapshot(http) == before


# ------------------------------------------------------------------ long-polls


async def test_long_poll_is_woken_by_a_release(server: ThreadServer) -> None:
    """A waiting POST /leases returns the moment another client releases the holder."""
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as waiter,
        httpx.AsyncClient(base_url=server.url, timeout=30) as holder,
    ):
        old, young = fresh(), fresh()
        await holder.post("/agents", json={"agent_id": old})
        await holder.post("/agents", json={"agent_id": young})
        held = (await holder.post("/leases", json=lease_body(young, "/lp/a"))).json()["data"]
        rid = fresh("request")
        pending = asyncio.create_task(
            waiter.post(
                "/leases",
                json=lease_body(old, "/lp/a", wait=True),
                headers={"x-klock-request-id": rid},
            )
        )
        # The server's own barrier: answers once the waiter is in the scheduler's queue.
        synced = (await holder.post("/sync", json={"requests": [rid]})).json()["data"]
        assert synced["requests_waiting"] >= 1
        assert not pending.done()
        await holder.delete(f"/leases/{held['id']}")
        granted = ok(await pending)
        assert granted["agent_id"] == old
        assert granted["token"] > held["token"]


async def test_long_poll_times_out_and_leaves_nothing(server: ThreadServer) -> None:
    """A long-poll with timeout_ms answers 408 acquire_timeout and its request is gone."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        old, young = fresh(), fresh()
        await http.post("/agents", json={"agent_id": old})
        await http.post("/agents", json={"agent_id": young})
        await http.post("/leases", json=lease_body(young, "/lp/timeout"))
        response = await http.post(
            "/leases", json=lease_body(old, "/lp/timeout", wait=True, timeout_ms=20)
        )
        refused(response, 408, "acquire_timeout")
        stats = (await http.get("/statistics")).json()["data"]
        assert stats["requests_waiting"] == 0


async def test_disconnect_withdraws_the_long_poll(server: ThreadServer) -> None:
    """Closing the connection of a waiting request makes the server withdraw it."""
    api = server.app.state.klock
    loop = api._closing.get_loop()  # the server's event loop (another thread)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        old, young = fresh(), fresh()
        await http.post("/agents", json={"agent_id": old})
        await http.post("/agents", json={"agent_id": young})
        held = (await http.post("/leases", json=lease_body(young, "/lp/gone"))).json()["data"]
        rid = fresh("request")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as leaving:
            pending = asyncio.create_task(
                leaving.post(
                    "/leases",
                    json=lease_body(old, "/lp/gone", wait=True),
                    headers={"x-klock-request-id": rid},
                )
            )
            synced = (await http.post("/sync", json={"requests": [rid]})).json()["data"]
            assert synced["requests_waiting"] == 1
            work = asyncio.run_coroutine_threadsafe(_poll_task(api, rid), loop).result()
            pending.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await pending
        # Wait, on the server's loop, for that long-poll's call to end (withdrawn).
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_finished(work), loop))
        stats = (await http.get("/statistics")).json()["data"]
        assert stats["requests_waiting"] == 0
        await http.delete(f"/leases/{held['id']}")
        leases = (await http.get("/leases", params={"agent_id": old})).json()["data"]
        assert leases == []


async def _poll_task(api: Any, rid: str) -> asyncio.Task[Any]:
    task: asyncio.Task[Any] = api._polls[rid]
    return task


async def _finished(task: asyncio.Task[Any]) -> None:
    await asyncio.wait([task])


async def test_wait_for_a_lease_to_end(server: ThreadServer) -> None:
    """POST /leases/{id}/wait returns the final state when the lease ends, or times out."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        agent_id = fresh()
        await http.post("/agents", json={"agent_id": agent_id})
        lease = (await http.post("/leases", json=lease_body(agent_id, "/w/a"))).json()["data"]
        url = f"/leases/{lease['id']}/wait"
        timed_out = ok(await http.post(url, json={"timeout_ms": 10}))
        assert timed_out == {"ended": False, "lease": None}
        rid = fresh("request")
        waiting = asyncio.create_task(http.post(url, headers={"x-klock-request-id": rid}))
        await http.post("/sync", json={"requests": [rid]})
        await http.post(f"/leases/{lease['id']}/revoke")
        ended = ok(await waiting)
        assert ended["ended"] is True and ended["lease"]["state"] == "REVOKED"
        released = (await http.post("/leases", json=lease_body(agent_id, "/w/b"))).json()["data"]
        await http.delete(f"/leases/{released['id']}")
        refused(await http.post(f"/leases/{released['id']}/wait"), 404, "lease_not_found")


async def test_withdraw_endpoint_confirms(server: ThreadServer) -> None:
    """POST /withdraw ends a pending long-poll before it answers; its caller gets 499."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        old, young = fresh(), fresh()
        await http.post("/agents", json={"agent_id": old})
        await http.post("/agents", json={"agent_id": young})
        await http.post("/leases", json=lease_body(young, "/wd/a"))
        rid = fresh("request")
        pending = asyncio.create_task(
            http.post(
                "/leases",
                json=lease_body(old, "/wd/a", wait=True),
                headers={"x-klock-request-id": rid},
            )
        )
        await http.post("/sync", json={"requests": [rid]})
        answer = ok(await http.post("/withdraw", json={"request_id": rid}))
        assert answer == {"request_id": rid, "withdrawn": True}
        stats = (await http.get("/statistics")).json()["data"]
        assert stats["requests_waiting"] == 0
        refused(await pending, 499, "withdrawn")
        # Withdrawn before it arrived: refused as soon as it does.
        early = fresh("request")
        assert ok(await http.post("/withdraw", json={"request_id": early}))["withdrawn"] is True
        late = await http.post(
            "/leases",
            json=lease_body(old, "/wd/a", wait=True),
            headers={"x-klock-request-id": early},
        )
        refused(late, 499, "withdrawn")


# ------------------------------------------------------------------ auth


def test_token_is_required_when_configured() -> None:
    """With a token every request needs the bearer header (401 otherwise); /health is open."""
    with serve_in_thread(token="s3cret") as secured, httpx.Client(base_url=secured.url) as http:
        assert ok(http.get("/health"))["status"] == "ok"
        response = http.post("/agents", json={"agent_id": "intruder"})
        refused(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        refused(http.get("/leases", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        refused(http.get("/metrics", headers={"Authorization": "s3cret"}), 401, "unauthorized")
        good = {"Authorization": "Bearer s3cret"}
        assert ok(http.get("/agents", headers=good)) == []  # the intruder was not registered
        ok(http.post("/agents", json={"agent_id": "friend"}, headers=good))
        assert [a["agent_id"] for a in ok(http.get("/agents", headers=good))] == ["friend"]


def test_empty_token_is_refused() -> None:
    """An empty token would let anyone in: creating the app refuses it."""
    from klock_async.server import create_app

    with pytest.raises(ValueError, match="empty token"):
        create_app(token="")


# ------------------------------------------------------------------ lifecycle


def test_restart_keeps_leases_tokens_agents_and_clocks(tmp_path: Path) -> None:
    """A server restarted on the same --db serves the same leases, agents and clocks."""
    db = str(tmp_path / "klock.db")
    with serve_in_thread(db=db) as first, httpx.Client(base_url=first.url) as http:
        ok(http.post("/agents", json={"agent_id": "a"}))
        ok(http.post("/agents", json={"agent_id": "b", "priority": 77}))
        kept = ok(http.post("/leases", json=lease_body("a", "/restart/kept")))
        gone = ok(http.post("/leases", json=lease_body("b", "/restart/gone")))
        ok(http.delete(f"/leases/{gone['id']}"))
        ok(http.post("/clocks/write", json={"path": "/restart/kept", "agent_id": "a"}))
        before = snapshot(http)
    with serve_in_thread(db=db) as second, httpx.Client(base_url=second.url) as http:
        after = snapshot(http)
        assert after[1:] == before[1:]
        assert ok(http.get("/leases")) == [kept]
        # b's explicit priority still ranks it before every automatic age: older, it would wait.
        kept_body = lease_body("b", "/restart/kept")
        refused(http.post("/leases", json=kept_body), 409, "lease_would_wait")
        fresh_lease = ok(http.post("/leases", json=lease_body("b", "/restart/other")))
        assert fresh_lease["token"] > gone["token"] > kept["token"]
        assert ok(http.delete(f"/leases/{kept['id']}", params={"agent_id": "a"}))["released"]


async def test_shutdown_ends_pending_long_polls() -> None:
    """Stopping the server answers a pending long-poll with 503 kernel_closed at once."""
    with serve_in_thread() as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            await http.post("/agents", json={"agent_id": "old"})
            await http.post("/agents", json={"agent_id": "young"})
            await http.post("/leases", json=lease_body("young", "/shutdown/a"))
            pending = asyncio.create_task(
                http.post(
                    "/leases",
                    json=lease_body("old", "/shutdown/a", wait=True),
                    headers={"x-klock-request-id": "r1"},
                )
            )
            await http.post("/sync", json={"requests": ["r1"]})
            await asyncio.to_thread(running.stop)
            refused(await pending, 503, "kernel_closed")


def test_response_is_the_v1_envelope_for_every_error_field(http: httpx.Client) -> None:
    """Error bodies carry success, data, error (text), code and details, all JSON."""
    body = http.get("/nowhere").json()
    assert set(body) == {"success", "data", "error", "code", "details"}
    assert json.dumps(body)


def test_sync_does_not_wait_for_a_refused_request(http: httpx.Client) -> None:
    """A tagged long-poll refused before reaching the scheduler counts as arrived for /sync."""
    rid = fresh("request")
    body = lease_body(register(http), "/sync/refused", wait=True, isolation="NONSENSE")
    refused(
        http.post("/leases", json=body, headers={"x-klock-request-id": rid}),
        400,
        "invalid_isolation",
    )
    assert "requests_waiting" in ok(
        http.post("/sync", json={"requests": [rid], "timeout_ms": 5000})
    )


def test_serve_refuses_an_unusable_journal(tmp_path: Path) -> None:
    """``klock serve --db`` on a file that is not a journal exits 2 with a one-line reason."""
    import subprocess
    import sys

    bad = tmp_path / "not-a-db"
    bad.write_bytes(b"this is not a database" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "klock_async", "serve", "--port", "0", "--db", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot use --db" in result.stderr and "not a database" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_takes_the_token_from_the_environment() -> None:
    """``klock serve`` without --token uses KLOCK_TOKEN from its environment."""
    from serverutil import serve_subprocess

    with (
        serve_subprocess(env={"KLOCK_TOKEN": "from-env"}) as child,
        httpx.Client(base_url=child.url) as http,
    ):
        refused(http.get("/leases"), 401, "unauthorized")
        assert ok(http.get("/leases", headers={"Authorization": "Bearer from-env"})) == []
        # Graceful shutdown, then uvicorn re-raises SIGTERM so the exit says why it stopped.
        assert child.terminate() in (0, -signal.SIGTERM)
