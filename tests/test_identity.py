"""Agents that cannot be impersonated: credentials, the operator token, strict identity.

Every impersonation attack measured on the server before credentials existed is replayed
here against an agent registered with a credential: each gets a typed refusal and changes
nothing. The rules themselves (klock_async.identity) are checked directly first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverutil import ThreadServer, serve_in_thread, serve_subprocess

from klock_async import Klock, KlockError
from klock_async.errors import (
    CredentialRequiredError,
    InvalidCredentialError,
    NotYourAgentError,
    OperatorRequiredError,
    StrictIdentityError,
)
from klock_async.identity import ANONYMOUS, Action, Caller, Identities, digest, new_credential
from klock_async.remote import RemoteBackend

TOKEN = "agents-token"
OPERATOR = "operator-token"
_names = itertools.count()


def fresh(prefix: str = "agent") -> str:
    return f"{prefix}-{next(_names)}"


def ok(response: httpx.Response) -> Any:
    body = response.json()
    assert response.status_code == 200, body
    return body["data"]


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert response.status_code == status, body
    assert body["success"] is False and body["code"] == code, body
    return body


def as_agent(credential: str) -> dict[str, str]:
    return {"Klock-Credential": credential}


OPERATOR_HEADERS = {"Klock-Operator-Token": OPERATOR}


# ------------------------------------------------------------------ the rules (pure)


def test_credentials_are_unguessable_and_stored_as_digests() -> None:
    """Each credential is fresh, 256 random bits; only its digest is kept."""
    one, two = new_credential(), new_credential()
    assert one != two and len(one) >= 43 and one.startswith("kc_")
    identities = Identities()
    identities.add("a", digest(one))
    assert identities.caller(one, None) == Caller("a")
    assert one not in repr(identities.__dict__)
    with pytest.raises(InvalidCredentialError):
        identities.caller(two, None)


VICTIM, OTHER, OPS = Caller("victim"), Caller("other"), Caller(None, operator=True)
R, H, A, S, C = (
    Action.RELEASE,
    Action.HEARTBEAT,
    Action.ACQUIRE,
    Action.SESSION_RELEASE,
    Action.CLOCK,
)
REVOKE, EVICT = Action.REVOKE, Action.EVICT

# (action, agent acted for, caller, server has an operator token, strict) -> refusal or None
RULES = [
    # an agent with a credential: its own credential only
    pytest.param(R, "victim", VICTIM, False, False, None, id="own-release"),
    pytest.param(A, "victim", VICTIM, True, True, None, id="own-acquire-strict"),
    pytest.param(R, "victim", ANONYMOUS, False, False, CredentialRequiredError, id="anon-release"),
    pytest.param(H, "victim", ANONYMOUS, False, False, CredentialRequiredError, id="anon-beat"),
    pytest.param(S, "victim", ANONYMOUS, True, False, CredentialRequiredError, id="anon-session"),
    pytest.param(C, "victim", ANONYMOUS, False, False, CredentialRequiredError, id="anon-clock"),
    pytest.param(A, "victim", OTHER, False, False, NotYourAgentError, id="other-acquire"),
    pytest.param(H, "victim", OTHER, False, False, NotYourAgentError, id="other-beat"),
    # revoke and evict: the operator's when it has a token, else the agent's own
    pytest.param(REVOKE, "victim", VICTIM, True, False, OperatorRequiredError, id="own-revoke-op"),
    pytest.param(REVOKE, "victim", VICTIM, False, False, None, id="own-revoke"),
    pytest.param(EVICT, "victim", OTHER, False, False, NotYourAgentError, id="other-evict"),
    pytest.param(EVICT, "v1", ANONYMOUS, True, False, OperatorRequiredError, id="v1-evict-op"),
    pytest.param(EVICT, "v1", ANONYMOUS, False, False, None, id="v1-evict"),
    # the operator: revoke, evict, release, session release; never acquire or heartbeat
    pytest.param(REVOKE, "victim", OPS, True, False, None, id="ops-revoke"),
    pytest.param(EVICT, "victim", OPS, True, True, None, id="ops-evict-strict"),
    pytest.param(R, "victim", OPS, True, False, None, id="ops-release"),
    pytest.param(S, "victim", OPS, True, False, None, id="ops-session"),
    pytest.param(A, "victim", OPS, True, False, CredentialRequiredError, id="ops-acquire"),
    pytest.param(H, "victim", OPS, True, False, CredentialRequiredError, id="ops-beat"),
    # agents without a credential: the v1 rules, unless strict; a credential binds to its agent
    pytest.param(R, "v1", ANONYMOUS, True, False, None, id="v1-release"),
    pytest.param(A, "v1", ANONYMOUS, False, True, StrictIdentityError, id="v1-strict"),
    pytest.param(A, "v1", VICTIM, False, False, NotYourAgentError, id="credential-for-v1"),
]


@pytest.mark.parametrize(("action", "agent", "caller", "operator", "strict", "refusal"), RULES)
def test_who_may_act_for_an_agent(
    action: Action,
    agent: str,
    caller: Caller,
    operator: bool,
    strict: bool,
    refusal: type[Exception] | None,
) -> None:
    """Each caller may do exactly what the threat model says, and nothing else."""
    identities = Identities(operator_token=OPERATOR if operator else None, strict=strict)
    identities.add("victim", digest("v"))
    identities.add("other", digest("o"))
    if refusal is None:
        identities.authorize(action, agent, caller)
    else:
        with pytest.raises(refusal):
            identities.authorize(action, agent, caller)


def test_a_wrong_operator_token_is_refused() -> None:
    """A wrong operator token is an error, not a silent anonymous request."""
    identities = Identities(operator_token=OPERATOR)
    assert identities.caller(None, OPERATOR) == OPS
    with pytest.raises(OperatorRequiredError):
        identities.caller(None, "not-the-token")
    with pytest.raises(OperatorRequiredError):
        Identities().caller(None, OPERATOR)  # a server without an operator


# (agent, caller, asks a credential, priority, operator token, strict, exists) -> issue/refusal
REGISTRATIONS = [
    pytest.param("new", ANONYMOUS, True, None, False, False, False, True, id="new-credential"),
    pytest.param("new", ANONYMOUS, False, None, False, False, False, False, id="new-v1"),
    pytest.param("new", ANONYMOUS, False, 5, False, False, False, False, id="v1-priority"),
    pytest.param(
        "new", ANONYMOUS, True, -1, True, False, False, OperatorRequiredError, id="priority-op"
    ),
    pytest.param(
        "new", ANONYMOUS, False, 5, False, True, False, OperatorRequiredError, id="priority-strict"
    ),
    pytest.param("new", OPS, True, -1, True, False, False, True, id="operator-priority"),
    pytest.param(
        "new", ANONYMOUS, False, None, False, True, False, StrictIdentityError, id="strict"
    ),
    pytest.param("victim", VICTIM, True, None, False, False, True, False, id="again-own"),
    pytest.param(
        "victim",
        ANONYMOUS,
        True,
        -(10**9),
        False,
        False,
        True,
        CredentialRequiredError,
        id="hijack",
    ),
    pytest.param("victim", OTHER, False, None, False, False, True, NotYourAgentError, id="other"),
    pytest.param("v1", ANONYMOUS, True, None, False, False, True, NotYourAgentError, id="take-v1"),
    pytest.param("new", VICTIM, True, None, False, False, False, NotYourAgentError, id="as-other"),
]


@pytest.mark.parametrize(
    ("agent", "caller", "wants", "priority", "operator", "strict", "exists", "outcome"),
    REGISTRATIONS,
)
def test_who_may_register_an_agent(
    agent: str,
    caller: Caller,
    wants: bool,
    priority: int | None,
    operator: bool,
    strict: bool,
    exists: bool,
    outcome: bool | type[Exception],
) -> None:
    """A registration issues a credential, keeps the v1 rules, or is refused, typed."""
    identities = Identities(operator_token=OPERATOR if operator else None, strict=strict)
    identities.add("victim", digest("v"))
    identities.add("other", digest("o"))
    kwargs = {"wants_credential": wants, "priority": priority, "exists": exists}
    if isinstance(outcome, bool):
        assert identities.authorize_registration(agent, caller, **kwargs) is outcome
    else:
        with pytest.raises(outcome):
            identities.authorize_registration(agent, caller, **kwargs)


# ------------------------------------------------------------------ the attacks, over HTTP


@dataclass
class World:
    """A victim with a credential holding MUTATES on a file; an attacker with the token."""

    http: httpx.Client
    victim: str
    credential: str
    session: str
    path: str
    lease_id: str

    def snapshot(self) -> Any:
        leases = ok(self.http.get("/leases"))
        agents = ok(self.http.get("/agents"))
        return (
            sorted((x["lease_id"], x["agent_id"], x["expires_at_ms"]) for x in leases),
            sorted((x["agent_id"], x["ts"]) for x in agents),
        )


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with serve_in_thread(token=TOKEN, operator_token=OPERATOR) as running:
        yield running


@pytest.fixture(scope="module")
def no_operator() -> Iterator[ThreadServer]:
    with serve_in_thread(token=TOKEN) as running:
        yield running


def _world(url: str) -> Iterator[World]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, headers=headers) as http:
        victim = fresh("victim")
        data = ok(http.post("/agents", json={"agent_id": victim, "credential": True}))
        assert data["credentialed"] is True and data["agent_id"] == victim
        credential = data["credential"]
        session, path = fresh("session"), f"/src/{fresh('file')}.py"
        body = {
            "agent_id": victim,
            "session_id": session,
            "intents": [{"resource": f"FILE:{path}", "predicate": "MUTATES"}],
            "ttl_ms": 300_000,
        }
        granted = ok(http.post("/intents", json=body, headers=as_agent(credential)))
        yield World(http, victim, credential, session, path, granted["leases"][0]["lease_id"])


@pytest.fixture
def world(server: ThreadServer) -> Iterator[World]:
    yield from _world(server.url)


@pytest.fixture
def world_without_operator(no_operator: ThreadServer) -> Iterator[World]:
    yield from _world(no_operator.url)


def test_the_credential_is_handed_out_once(world: World) -> None:
    """Registering the id again, even with its credential, hands out no new secret."""
    again = ok(
        world.http.post(
            "/agents",
            json={"agent_id": world.victim, "credential": True},
            headers=as_agent(world.credential),
        )
    )
    assert "credential" not in again and again["credentialed"] is True


def test_lease_id_from_the_list_releases_nothing(world: World) -> None:
    """DELETE with a lease id read from GET /leases: refused, the lease stays."""
    before = world.snapshot()
    listed = [x["lease_id"] for x in ok(world.http.get("/leases")) if x["agent_id"] == world.victim]
    assert listed == [world.lease_id]
    refused(world.http.delete(f"/leases/{world.lease_id}"), 401, "credential_required")
    refused(
        world.http.delete(f"/leases/{world.lease_id}", params={"agent_id": world.victim}),
        401,
        "credential_required",
    )
    assert world.snapshot() == before


def test_blocker_lease_id_releases_nothing(world: World) -> None:
    """The blocker_lease_id of a refusal is no capability either."""
    attacker = fresh("attacker")
    ok(world.http.post("/agents", json={"agent_id": attacker}))
    body = {
        "agent_id": attacker,
        "session_id": "s",
        "resource": f"FILE:{world.path}",
        "predicate": "MUTATES",
    }
    verdict = world.http.post("/leases", json=body).json()
    blocker = verdict["details"]["blocker_lease_id"]
    assert blocker == world.lease_id
    before = world.snapshot()
    refused(world.http.delete(f"/leases/{blocker}"), 401, "credential_required")
    refused(
        world.http.delete(f"/leases/{blocker}", params={"agent_id": attacker}),
        403,
        "not_lease_owner",
    )
    assert world.snapshot() == before


def _hook_events(agent_id: str, path: str) -> list[dict[str, Any]]:
    """A coding agent's hook events for the session ``agent_id``: an edit of ``path``, the
    session's end."""
    return [
        {
            "hook_event_name": "PreToolUse",
            "session_id": agent_id,
            "tool_name": "Edit",
            "tool_input": {"file_path": path},
            "cwd": "/",
        },
        {"hook_event_name": "SessionEnd", "session_id": agent_id, "cwd": "/"},
    ]


def test_a_hook_naming_an_agent_with_a_credential_changes_nothing(world: World) -> None:
    """A hook event whose session id is a credentialed agent's acts for nobody: the hook
    endpoint holds only the bearer token. Refused typed (command form) or denied (the
    harness's own form); the victim's lease and session stay."""
    before = world.snapshot()
    for event in _hook_events(world.victim, world.path):
        refused(
            world.http.post("/hooks/claude-code", params={"mode": "command"}, json=event),
            401,
            "credential_required",
        )
    denied = world.http.post("/hooks/claude-code", json=_hook_events(world.victim, "/x.py")[0])
    output = denied.json()["hookSpecificOutput"]
    assert output["permissionDecision"] == "deny"
    assert "credential" in output["permissionDecisionReason"]
    assert world.snapshot() == before


def test_another_agents_credential_releases_nothing(world: World) -> None:
    """An attacker with a credential of its own cannot use it for the victim."""
    attacker = fresh("attacker")
    own = ok(world.http.post("/agents", json={"agent_id": attacker, "credential": True}))
    headers = as_agent(own["credential"])
    before = world.snapshot()
    refused(world.http.delete(f"/leases/{world.lease_id}", headers=headers), 403, "not_lease_owner")
    refused(
        world.http.delete(
            f"/leases/{world.lease_id}", params={"agent_id": world.victim}, headers=headers
        ),
        403,
        "not_your_agent",
    )
    refused(
        world.http.post(f"/leases/{world.lease_id}/heartbeat", json={"ttl": 1}, headers=headers),
        403,
        "not_lease_owner",
    )
    assert world.snapshot() == before


def test_heartbeat_to_one_millisecond_is_refused(world: World) -> None:
    """A heartbeat with ttl=1 ms (to let the lease lapse) is refused; the deadline stays."""
    before = world.snapshot()
    refused(
        world.http.post(f"/leases/{world.lease_id}/heartbeat", json={"ttl": 1}),
        401,
        "credential_required",
    )
    refused(
        world.http.post(
            f"/leases/{world.lease_id}/heartbeat", json={"ttl": 1, "agent_id": world.victim}
        ),
        401,
        "credential_required",
    )
    assert world.snapshot() == before


def test_revoke_needs_the_operator(world: World) -> None:
    """Revoke without the operator token, or with a wrong one, is refused."""
    before = world.snapshot()
    refused(world.http.post(f"/leases/{world.lease_id}/revoke"), 403, "operator_required")
    refused(
        world.http.post(
            f"/leases/{world.lease_id}/revoke", headers={"Klock-Operator-Token": TOKEN}
        ),
        403,
        "operator_required",
    )
    assert world.snapshot() == before
    revoked = ok(world.http.post(f"/leases/{world.lease_id}/revoke", headers=OPERATOR_HEADERS))
    assert revoked["state"] == "REVOKED"


def test_evict_needs_the_operator(world: World) -> None:
    """Evicting the victim without the operator token is refused; the operator may."""
    before = world.snapshot()
    refused(world.http.post("/evict", json={"agent_id": world.victim}), 403, "operator_required")
    refused(
        world.http.post(
            "/evict", json={"agent_id": world.victim}, headers=as_agent(world.credential)
        ),
        403,
        "operator_required",
    )
    assert world.snapshot() == before
    assert ok(
        world.http.post("/evict", json={"agent_id": world.victim}, headers=OPERATOR_HEADERS)
    ) == {"agent_id": world.victim, "evicted": 1}


def test_without_an_operator_revoke_and_evict_need_the_credential(
    world_without_operator: World,
) -> None:
    """On a server without an operator token only the holder revokes or evicts itself."""
    world = world_without_operator
    before = world.snapshot()
    refused(world.http.post(f"/leases/{world.lease_id}/revoke"), 401, "credential_required")
    refused(world.http.post("/evict", json={"agent_id": world.victim}), 401, "credential_required")
    refused(
        world.http.post(f"/leases/{world.lease_id}/revoke", headers=OPERATOR_HEADERS),
        403,
        "operator_required",
    )
    assert world.snapshot() == before
    ok(world.http.post(f"/leases/{world.lease_id}/revoke", headers=as_agent(world.credential)))


def test_session_release_is_refused(world: World) -> None:
    """Releasing the victim's session needs its credential (or the operator)."""
    body = {"agent_id": world.victim, "session_id": world.session}
    before = world.snapshot()
    refused(world.http.post("/sessions/release", json=body), 401, "credential_required")
    assert world.snapshot() == before
    released = ok(world.http.post("/sessions/release", json=body, headers=OPERATOR_HEADERS))
    assert released["released"] == 1


def test_acquire_in_the_victims_session_is_refused(world: World) -> None:
    """MUTATES in the victim's own session (reentrant!) is refused: one writer stays."""
    body = {
        "agent_id": world.victim,
        "session_id": world.session,
        "intents": [{"resource": f"FILE:{world.path}", "predicate": "MUTATES"}],
    }
    before = world.snapshot()
    refused(world.http.post("/intents", json=body), 401, "credential_required")
    refused(
        world.http.post("/leases", json={**body.pop("intents")[0], **body}),
        401,
        "credential_required",
    )
    assert world.snapshot() == before
    writers = [x for x in ok(world.http.get("/leases")) if x["resource_path"] == world.path]
    assert len(writers) == 1


def test_registration_under_the_victims_id_is_refused(world: World) -> None:
    """Registering the victim's id again (priority -1e9 or none) needs its credential."""
    before = world.snapshot()
    for body in (
        {"agent_id": world.victim, "priority": -1_000_000_000},
        {"agent_id": world.victim},
        {"agent_id": world.victim, "credential": True},
    ):
        refused(world.http.post("/agents", json=body), 401, "credential_required")
    assert world.snapshot() == before


def test_priority_is_the_operators(world: World) -> None:
    """A new agent with priority -1e9 (to win every conflict) needs the operator token."""
    attacker = fresh("attacker")
    before = world.snapshot()
    for body in (
        {"agent_id": attacker, "priority": -1_000_000_000},
        {"agent_id": attacker, "priority": -1_000_000_000, "credential": True},
    ):
        refused(world.http.post("/agents", json=body), 403, "operator_required")
    assert world.snapshot() == before
    ok(
        world.http.post(
            "/agents", json={"agent_id": attacker, "priority": 5}, headers=OPERATOR_HEADERS
        )
    )


def test_clock_writes_and_reads_for_the_victim_are_refused(world: World) -> None:
    """Clock operations name an agent too: without its credential, refused."""
    for route in ("/clocks/read", "/clocks/write"):
        body = {"path": world.path, "agent_id": world.victim}
        refused(world.http.post(route, json=body), 401, "credential_required")
        ok(world.http.post(route, json=body, headers=as_agent(world.credential)))


def test_a_mistyped_credential_is_refused(world: World) -> None:
    """A credential that belongs to nobody is refused before anything is done."""
    before = world.snapshot()
    refused(
        world.http.delete(f"/leases/{world.lease_id}", headers=as_agent(new_credential())),
        401,
        "invalid_credential",
    )
    assert world.snapshot() == before


def test_the_victims_waiting_request_cannot_be_withdrawn(
    world: World, server: ThreadServer
) -> None:
    """POST /withdraw of a credentialed agent's long-poll needs its credential."""
    import threading

    waiter = fresh("waiter")
    own = ok(world.http.post("/agents", json={"agent_id": waiter, "credential": True}))
    body = {
        "agent_id": waiter,
        "session_id": "w",
        "intents": [{"resource": f"FILE:{world.path}", "predicate": "MUTATES"}],
        "wait": True,
        "timeout_ms": 60_000,
    }
    answers: list[httpx.Response] = []
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "x-klock-request-id": f"victim-poll-{waiter}",
        **as_agent(own["credential"]),
    }

    def poll() -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            answers.append(http.post("/intents", json=body))

    thread = threading.Thread(target=poll)
    thread.start()
    ok(world.http.post("/sync", json={"requests": [f"victim-poll-{waiter}"]}))
    withdraw = {"request_id": f"victim-poll-{waiter}"}
    refused(world.http.post("/withdraw", json=withdraw), 401, "credential_required")
    assert [w["agent_id"] for w in ok(world.http.get("/waiters"))["waiters"]] == [waiter]
    ok(world.http.delete(f"/leases/{world.lease_id}", headers=as_agent(world.credential)))
    thread.join(60)
    assert answers and answers[0].status_code == 200, answers


def test_v1_agents_keep_the_v1_rules(world: World) -> None:
    """An agent registered without a credential: the lease id stays a capability."""
    v1 = fresh("v1")
    data = ok(world.http.post("/agents", json={"agent_id": v1}))
    assert data == {"agent_id": v1, "priority": data["ts"], "ts": data["ts"]}
    body = {"agent_id": v1, "session_id": "s", "resource": f"FILE:/{v1}", "predicate": "MUTATES"}
    lease_id = ok(world.http.post("/leases", json=body))["lease_id"]
    assert ok(world.http.delete(f"/leases/{lease_id}"))["released"] is True


def test_a_v1_id_cannot_be_taken_over_with_a_credential(world: World) -> None:
    """Asking a credential for an id a v1 client registered is refused (it is theirs)."""
    v1 = fresh("v1")
    ok(world.http.post("/agents", json={"agent_id": v1}))
    refused(
        world.http.post("/agents", json={"agent_id": v1, "credential": True}), 403, "not_your_agent"
    )


# ------------------------------------------------------------------ strict, restarts, clients


def test_strict_identity_refuses_v1_registrations() -> None:
    """klock serve --strict-identity: registering without a credential is a typed refusal."""
    with (
        serve_subprocess(extra=["--strict-identity"]) as child,
        httpx.Client(base_url=child.url) as http,
    ):
        refused(http.post("/agents", json={"agent_id": "v1"}), 403, "credential_not_requested")
        assert ok(http.get("/agents")) == []
        data = ok(http.post("/agents", json={"agent_id": "a", "credential": True}))
        assert data["credential"]
        # A hook acts for an agent without a credential (its session id): refused as well.
        for event in _hook_events("hook-session", "/src/a.py"):
            refused(
                http.post("/hooks/claude-code", params={"mode": "command"}, json=event),
                403,
                "credential_not_requested",
            )
        assert [agent["agent_id"] for agent in ok(http.get("/agents"))] == ["a"]
        assert ok(http.get("/leases")) == []


def test_identities_survive_a_restart(tmp_path: Path) -> None:
    """The credential digests are kept in the journal file: after a kill, still enforced."""
    db = tmp_path / "klock.db"
    with serve_subprocess(db) as child, httpx.Client(base_url=child.url) as http:
        credential = ok(http.post("/agents", json={"agent_id": "a", "credential": True}))[
            "credential"
        ]
        body = {"agent_id": "a", "session_id": "s", "resource": "FILE:/r", "predicate": "MUTATES"}
        lease_id = ok(http.post("/leases", json=body, headers=as_agent(credential)))["lease_id"]
        child.kill()
    with serve_subprocess(db) as child, httpx.Client(base_url=child.url) as http:
        refused(http.delete(f"/leases/{lease_id}"), 401, "credential_required")
        refused(http.post("/agents", json={"agent_id": "a"}), 401, "credential_required")
        ok(http.delete(f"/leases/{lease_id}", headers=as_agent(credential)))


def test_operator_token_must_differ_from_the_agents_token() -> None:
    """An operator token equal to the agents' token would make every agent the operator."""
    with pytest.raises(ValueError, match="distinct"):
        serve_in_thread(token=TOKEN, operator_token=TOKEN).__enter__()


async def test_remote_clients_cannot_act_for_each_others_agents(no_operator: ThreadServer) -> None:
    """Two Python clients: the second cannot register, release or heartbeat the first's agent."""
    async with (
        Klock(backend=RemoteBackend(no_operator.url, token=TOKEN)) as one,
        Klock(backend=RemoteBackend(no_operator.url, token=TOKEN)) as two,
    ):
        name = fresh("remote")
        agent = await one.register_agent(name)
        lease = await agent.acquire(f"/remote/{name}.py", "MUTATES")
        with pytest.raises(CredentialRequiredError):
            await two.register_agent(name)
        with pytest.raises(CredentialRequiredError):
            await two.backend.release(lease.id)
        with pytest.raises(CredentialRequiredError):
            await two.backend.heartbeat(lease.id, name, 0.001)
        await lease.release()


async def _loop_time() -> float:
    return asyncio.get_running_loop().time()


async def test_a_retired_agents_credential_goes_with_it(tmp_path: Path) -> None:
    """Retiring an idle agent frees its id (and its stored digest); its client registers it
    again and gets a new credential."""
    db = tmp_path / "klock.db"
    stack = contextlib.ExitStack()
    running = await asyncio.to_thread(
        stack.enter_context, serve_in_thread(db=str(db), retire_after=3600.0)
    )
    try:
        backend = RemoteBackend(running.url)
        async with Klock(backend=backend) as klock:
            await klock.register_agent("idle")
            first = backend._credentials["idle"]
            api = running.app.state.klock
            loop = api._closing.get_loop()  # the server thread's loop runs the API

            def retire() -> tuple[str, ...]:
                later = asyncio.run_coroutine_threadsafe(_loop_time(), loop).result() + 7200
                return asyncio.run_coroutine_threadsafe(api.retire_idle(later), loop).result()

            assert await asyncio.to_thread(retire) == ("idle",)
            with sqlite3.connect(db) as conn:
                assert conn.execute("SELECT agent_id FROM credentials").fetchall() == []
            await klock.register_agent("idle")
            assert backend._credentials["idle"] != first
            lease = await (await klock.agent("idle")).acquire("/retired.py", "MUTATES")
            await lease.release()
    finally:
        await asyncio.to_thread(stack.close)


async def test_a_retired_agent_of_a_channel_is_free_for_another_client() -> None:
    """An agent a channel registered and left idle is retired: its id is free again, so
    another client registers it (no foreign_agent) and its old client no longer acts for it."""
    stack = contextlib.ExitStack()
    running = await asyncio.to_thread(stack.enter_context, serve_in_thread(retire_after=3600.0))
    try:
        async with Klock.connect(running.url) as first, Klock.connect(running.url) as second:
            await first.register_agent("drifter")
            api = running.app.state.klock
            loop = api._closing.get_loop()  # the server thread's loop runs the API

            def retire() -> tuple[str, ...]:
                later = asyncio.run_coroutine_threadsafe(_loop_time(), loop).result() + 7200
                return asyncio.run_coroutine_threadsafe(api.retire_idle(later), loop).result()

            assert await asyncio.to_thread(retire) == ("drifter",)
            agent = await second.register_agent("drifter")
            lease = await agent.acquire("/drift.py", "MUTATES", ttl=30)
            with pytest.raises(KlockError):
                await first.backend.release(lease.id, "drifter")
            await lease.release()
    finally:
        await asyncio.to_thread(stack.close)


async def test_the_python_client_revokes_and_evicts_as_the_operator(server: ThreadServer) -> None:
    """RemoteBackend(operator_token=...) revokes another client's lease and evicts its agent;
    without the token the same calls are refused."""
    async with (
        Klock(backend=RemoteBackend(server.url, token=TOKEN)) as agents,
        Klock(backend=RemoteBackend(server.url, token=TOKEN)) as bystander,
        Klock(backend=RemoteBackend(server.url, token=TOKEN, operator_token=OPERATOR)) as ops,
    ):
        name = fresh("managed")
        agent = await agents.register_agent(name)
        first = await agent.acquire(f"/ops/{name}-1.py", "MUTATES")
        await agent.acquire(f"/ops/{name}-2.py", "MUTATES")
        with pytest.raises(OperatorRequiredError):
            await bystander.backend.revoke(first.id)
        with pytest.raises(OperatorRequiredError):
            await bystander.backend.evict(name)
        assert (await ops.backend.revoke(first.id)).state.value == "REVOKED"
        assert await ops.backend.evict(name) == 1


def test_operator_token_options_are_checked() -> None:
    """An operator token equal to the agents' token, or blank, stops klock serve (exit 2)."""
    for args, env in (
        (["--token", TOKEN, "--operator-token", TOKEN], {}),
        (["--token", TOKEN], {"KLOCK_OPERATOR_TOKEN": TOKEN}),
        ([], {"KLOCK_OPERATOR_TOKEN": "  "}),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "klock_async", "serve", "--port", "0", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **env},
        )
        assert result.returncode == 2, result.stderr
        assert "operator token" in result.stderr and "Traceback" not in result.stderr


def test_a_damaged_credential_row_stops_startup_with_one_line(tmp_path: Path) -> None:
    """A credentials row that does not parse is named in one line; the server does not start."""
    db = tmp_path / "klock.db"
    with serve_subprocess(db) as child, httpx.Client(base_url=child.url) as http:
        ok(http.post("/agents", json={"agent_id": "a", "credential": True}))
        child.terminate()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE credentials SET digest = 'short'")
    result = subprocess.run(
        [sys.executable, "-m", "klock_async", "serve", "--port", "0", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "credentials row 'a'" in result.stderr and "Traceback" not in result.stderr
