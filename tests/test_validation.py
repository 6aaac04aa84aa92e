"""The boundary of ``klock serve`` (klock_async.validation), through a real server on loopback.

Every refusal is checked against a snapshot of the whole state: a refused request changes
nothing. A hypothesis fuzz sends arbitrary bodies to every route that reads one.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serverutil import ThreadServer, serve_in_thread

from klock_async import validation

_names = itertools.count(1)


def fresh(prefix: str = "agent") -> str:
    return f"{prefix}-v{next(_names)}"


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
    return body["data"]


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert response.status_code == status, body
    assert body["success"] is False and body["code"] == code, body
    return body


def snapshot(http: httpx.Client) -> tuple[Any, ...]:
    stats = ok(http.get("/statistics"))
    for moving in ("batches", "messages"):
        stats.pop(moving)
    return stats, ok(http.get("/leases")), ok(http.get("/agents")), ok(http.get("/clocks"))


def raw_post(http: httpx.Client, path: str, text: str, **headers: str) -> httpx.Response:
    """POST a JSON text as it is (``json=`` would refuse to encode some of these bodies)."""
    return http.post(
        path,
        content=text.encode("utf-8", "surrogatepass"),
        headers={"content-type": "application/json", **headers},
    )


def lease_text(agent_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "session_id": fresh("s"),
        "resource_type": "FILE",
        "resource_path": f"/v/{fresh('f')}.py",
        "predicate": "MUTATES",
        "ttl": 60_000,
        **fields,
    }


# ------------------------------------------------------------------ text and integers


LONE_SURROGATE = "\\ud800"  # as JSON text: the escape, not the character


@pytest.mark.parametrize(
    ("path", "template"),
    [
        pytest.param("/agents", '{"agent_id": "x%s"}', id="agent-id"),
        pytest.param(
            "/leases",
            '{"agent_id": "AGENT", "resource_type": "FILE", "resource_path": "/p%s", '
            '"predicate": "MUTATES"}',
            id="resource-path",
        ),
        pytest.param(
            "/leases",
            '{"agent_id": "AGENT", "session_id": "s%s", "resource": "FILE:/q", '
            '"predicate": "MUTATES"}',
            id="session-id",
        ),
        pytest.param("/clocks/write", '{"agent_id": "AGENT", "path": "/c%s"}', id="clock-path"),
    ],
)
def test_lone_surrogate_is_refused_before_the_kernel(
    http: httpx.Client, path: str, template: str
) -> None:
    """A string holding a lone UTF-16 surrogate is a 400 naming the field; nothing changes."""
    agent_id = fresh()
    ok(http.post("/agents", json={"agent_id": agent_id}))
    before = snapshot(http)
    text = (template % LONE_SURROGATE).replace("AGENT", agent_id)
    body = refused(raw_post(http, path, text), 400, "invalid_field")
    assert "surrogate" in body["error"]
    assert snapshot(http) == before


@pytest.mark.parametrize(
    "priority",
    [
        pytest.param(2**63 - 1, id="int64-max"),
        pytest.param(validation.MAX_PRIORITY + 1, id="above-max"),
        pytest.param(validation.MIN_PRIORITY - 1, id="below-min"),
        pytest.param(2**64, id="beyond-int64"),
        pytest.param(10**400, id="beyond-float"),
    ],
)
def test_priority_out_of_range_is_refused(http: httpx.Client, priority: int) -> None:
    """Priorities outside the documented range are refused: none can overflow later ages."""
    before = snapshot(http)
    text = json.dumps({"agent_id": fresh(), "priority": priority})
    refused(raw_post(http, "/agents", text), 400, "invalid_field")
    assert snapshot(http) == before


def test_priority_at_the_documented_edges_is_accepted(http: httpx.Client) -> None:
    """The smallest and largest documented priorities register; later ages still fit."""
    for priority in (validation.MIN_PRIORITY, validation.MAX_PRIORITY):
        data = ok(http.post("/agents", json={"agent_id": fresh(), "priority": priority}))
        assert data["priority"] == priority
    later = ok(http.post("/agents", json={"agent_id": fresh()}))
    assert validation.MAX_PRIORITY < later["ts"] < 2**63


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        pytest.param("ttl", "1e308", "invalid_ttl", id="ttl-1e308"),
        pytest.param("ttl", str(10**400), "invalid_field", id="ttl-beyond-float"),
        pytest.param("ttl", str(validation.MAX_TTL_MS + 1), "invalid_ttl", id="ttl-above-max"),
        pytest.param("timeout_ms", str(10**400), "invalid_field", id="timeout-beyond-float"),
        pytest.param("timeout_ms", "1e300", "invalid_field", id="timeout-above-max"),
        pytest.param("ttl", "NaN", "malformed_json", id="ttl-nan"),
        pytest.param("ttl", "Infinity", "malformed_json", id="ttl-infinity"),
    ],
)
def test_numbers_out_of_range_are_4xx(
    http: httpx.Client, field: str, value: str, code: str
) -> None:
    """Numbers beyond the documented maximum, or beyond float range, are 400, never 500."""
    agent_id = fresh()
    ok(http.post("/agents", json={"agent_id": agent_id}))
    before = snapshot(http)
    body = lease_text(agent_id, wait=True)
    text = json.dumps(body)[:-1] + f', "{field}": {value}}}'
    refused(raw_post(http, "/leases", text), 400, code)
    assert snapshot(http) == before


def test_deeply_nested_json_is_400(http: httpx.Client) -> None:
    """JSON nested beyond any depth the API uses is refused as malformed, never a 500."""
    before = snapshot(http)
    for depth in (validation.MAX_JSON_DEPTH + 1, 100_000):
        text = '{"agent_id": "x", "priority": ' + "[" * depth + "]" * depth + "}"
        refused(raw_post(http, "/agents", text), 400, "malformed_json")
    assert snapshot(http) == before


@pytest.mark.parametrize("path", ["/evict", "/sync"])
def test_a_blank_optional_body_is_refused(http: httpx.Client, path: str) -> None:
    """A route whose body may be left out refuses one sent blank (whitespace): malformed,
    not an empty object."""
    before = snapshot(http)
    refused(raw_post(http, path, " "), 400, "malformed_json")
    assert snapshot(http) == before


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/agents", {"agent_id": "x" * 257}, id="agent-id"),
        pytest.param("/withdraw", {"request_id": "r" * 100_000}, id="request-id"),
        pytest.param(
            "/intents",
            {"agent_id": "x", "intents": [{"resource": "FILE:/a", "predicate": "CONSUMES"}] * 257},
            id="intents",
        ),
        pytest.param("/sync", {"requests": ["r"] * 1025}, id="sync-requests"),
    ],
)
def test_lengths_beyond_the_limits_are_refused(
    http: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    """Strings and lists longer than the documented limits are 400; nothing is kept."""
    before = snapshot(http)
    refused(http.post(path, json=body), 400, "invalid_field")
    assert snapshot(http) == before


# ------------------------------------------------------------------ fields and media type


def test_unknown_field_is_refused_by_name(http: httpx.Client) -> None:
    """A field the endpoint does not know is a 400 naming it, not silently ignored."""
    agent_id = fresh()
    ok(http.post("/agents", json={"agent_id": agent_id}))
    before = snapshot(http)
    body = refused(http.post("/leases", json=lease_text(agent_id, tll=5)), 400, "invalid_field")
    assert "'tll'" in body["error"]
    intent = {"resource": "FILE:/a", "predicate": "MUTATES", "mode": "x"}
    body = refused(
        http.post("/intents", json={"agent_id": agent_id, "intents": [intent]}),
        400,
        "invalid_field",
    )
    assert "'mode'" in body["error"]
    assert snapshot(http) == before


def test_what_the_v1_sdk_sends_is_accepted(http: httpx.Client) -> None:
    """The Klock v1 bodies (a release repeating its lease id included) are accepted."""
    agent_id = fresh()
    ok(http.post("/agents", json={"agent_id": agent_id, "priority": 10}))
    lease = ok(http.post("/leases", json=lease_text(agent_id)))
    intents = {
        "agent_id": agent_id,
        "session_id": fresh("s"),
        "intents": [
            {"resource_type": "FILE", "resource_path": "/v1/b.py", "predicate": "CONSUMES"}
        ],
    }
    ok(http.post("/intents", json=intents))
    ok(http.post(f"/leases/{lease['lease_id']}/heartbeat"))
    released = http.request(
        "DELETE", f"/leases/{lease['lease_id']}", json={"lease_id": lease["lease_id"]}
    )
    assert ok(released)["released"] is True
    other = http.request("DELETE", f"/leases/{lease['lease_id']}", json={"lease_id": "other"})
    refused(other, 400, "invalid_field")


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("text/plain", id="text-plain"),
        pytest.param("application/x-www-form-urlencoded", id="form"),
        pytest.param("multipart/form-data; boundary=x", id="multipart"),
        pytest.param(None, id="none"),
    ],
)
def test_body_that_is_not_declared_json_is_refused(
    http: httpx.Client, content_type: str | None
) -> None:
    """Only ``application/json`` bodies are read: a web page cannot post the others as JSON."""
    before = snapshot(http)
    headers = {} if content_type is None else {"content-type": content_type}
    response = http.post("/agents", content=b'{"agent_id": "cross-site"}', headers=headers)
    refused(response, 415, "unsupported_media_type")
    assert snapshot(http) == before


# ------------------------------------------------------------------ Host and Origin


def test_cross_site_post_is_refused(http: httpx.Client) -> None:
    """A request shaped like a browser's cross-site post (foreign Origin) changes nothing."""
    agent_id = fresh()
    ok(http.post("/agents", json={"agent_id": agent_id}))
    before = snapshot(http)
    for content_type in ("text/plain", "application/json"):
        response = http.post(
            "/evict",
            content=json.dumps({"agent_id": agent_id}).encode(),
            headers={"content-type": content_type, "origin": "http://evil.example"},
        )
        refused(response, 403, "origin_not_allowed")
    refused(http.get("/leases", headers={"origin": "null"}), 403, "origin_not_allowed")
    assert snapshot(http) == before


def test_same_origin_request_is_served(http: httpx.Client, server: ThreadServer) -> None:
    """A page served by this server itself (same origin) may call it."""
    origin = server.url
    ok(http.get("/health", headers={"origin": origin}))


def test_foreign_host_is_refused(http: httpx.Client) -> None:
    """A Host the server does not serve (DNS rebinding) is refused, ``/health`` included."""
    for path in ("/health", "/leases"):
        refused(http.get(path, headers={"host": "evil.example:3100"}), 421, "host_not_allowed")
    ok(http.get("/health", headers={"host": "localhost:3100"}))
    ok(http.get("/health", headers={"host": "[::1]:3100"}))


def test_allowed_host_is_served() -> None:
    """``allowed_hosts`` (``--allowed-host``) adds names to the loopback ones."""
    with (
        serve_in_thread(allowed_hosts=["klock.internal"]) as running,
        httpx.Client(base_url=running.url) as http,
    ):
        ok(http.get("/health", headers={"host": "klock.internal:3100"}))
        refused(http.get("/health", headers={"host": "other.internal"}), 421, "host_not_allowed")


# ------------------------------------------------------------------ OpenAPI


def test_openapi_document_matches_the_routes(server: ThreadServer, http: httpx.Client) -> None:
    """``GET /openapi.json`` lists exactly the routes served, with their declared bodies."""
    document = ok_raw(http.get("/openapi.json"))
    served = {(m.lower(), p) for m, p in server.app.state.klock.routes}
    listed = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert listed == served
    acquire = document["paths"]["/leases"]["post"]["requestBody"]["content"]
    schema = acquire["application/json"]["schema"]
    assert set(schema["properties"]) == validation.BODIES["POST /leases"].fields
    assert schema["additionalProperties"] is False


def ok_raw(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------ fuzz

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_FIELDS = sorted({name for body in validation.BODIES.values() for name in body.fields})
_BODY = st.dictionaries(st.sampled_from([*_FIELDS, "extra"]), _JSON, max_size=6)
_ROUTES = sorted(key for key in validation.BODIES if "{lease_id}" not in key)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(route=st.sampled_from(_ROUTES), body=_BODY)
def test_fuzzed_bodies_are_4xx_or_ok_and_refusals_change_nothing(
    http: httpx.Client, route: str, body: dict[str, Any]
) -> None:
    """Arbitrary bodies on every route: never a 5xx, and every 4xx leaves the state as it was."""
    method, path = route.split(" ", 1)
    if body.get("wait") is True:
        body["wait"] = False  # a fuzzed long-poll could wait for ever by design
    if path == "/sync" and "timeout_ms" in body:
        body["timeout_ms"] = 0  # a barrier on ids never sent waits its timeout by design
    before = state(http)
    text = json.dumps(body, allow_nan=True)
    response = http.request(
        method, path, content=text.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code < 500, response.text
    payload = response.json()
    if response.status_code >= 400:
        assert payload["success"] is False and payload["code"]
        assert state(http) == before, (route, body, payload)


def state(http: httpx.Client) -> tuple[Any, ...]:
    """The snapshot without the counters a refusal itself adds to (deaths, waits, ...)."""
    stats, *rest = snapshot(http)
    for counter in ("deaths", "waits", "causal_violations"):
        stats.pop(counter)
    return (stats, *rest)


# ------------------------------------------------------------------ schemathesis


def _served_document() -> dict[str, Any]:
    """The document ``GET /openapi.json`` answers (test_openapi_document_matches_the_routes)."""
    from klock_async import __version__
    from klock_async.server import create_app

    routes = create_app().state.klock.routes  # builds the app; starts nothing
    return validation.openapi(routes, version=__version__)


schema = schemathesis.openapi.from_dict(_served_document())


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_openapi_document(server: ThreadServer, case: Any) -> None:
    """Generated requests (valid and invalid) never get a 5xx and answer as documented."""
    body = case.body if isinstance(case.body, dict) else None
    if body is not None:
        # Long-polls and barriers may wait for ever by design: keep a valid request from
        # waiting, and leave invalid values as generated (they must be refused).
        if body.get("wait") is True:
            body["wait"] = False
        timeout = body.get("timeout_ms")
        valid = timeout is None or (
            type(timeout) in (int, float) and 0 <= timeout <= validation.MAX_TIMEOUT_MS
        )
        if valid and case.path in ("/sync", "/leases/{lease_id}/wait"):
            body["timeout_ms"] = 0
    case.call_and_validate(
        base_url=server.url,
        checks=[
            schemathesis.checks.not_a_server_error,
            schemathesis.checks.status_code_conformance,
            schemathesis.checks.content_type_conformance,
            schemathesis.checks.response_schema_conformance,
            schemathesis.checks.negative_data_rejection,
        ],
    )
