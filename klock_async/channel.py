"""The session channel: one WebSocket per client process, and the client sessions it keeps.

A remote client process opens one WebSocket to ``GET /channel`` on the server's port and sends
every call as a JSON message with an id; many calls are in flight at once and each answer
names the call it answers. A waiting acquire is answered when the scheduler grants it: the
grant is pushed as that call's answer. The wire format is documented in docs/server.md
("The session channel").

Every channel is a *client session* on the server: an id and a resume secret, handed out once
by the first message (``hello``). The session outlives its connection by a grace period
(``klock serve --grace``, at most that per client): a client that reconnects within it, with
the secret, resumes the same session, its calls still running and their answers kept for it.
When the grace runs out, the server withdraws the session's queued requests and releases its
agents' leases through the scheduler, each a recorded event with ``reason: client_gone``.
REST clients open a client session with ``POST /clients`` and keep it alive by heartbeat.

An agent registered over a channel gets a credential (:mod:`klock_async.identity`), handed out
in the answer to ``register``: the channel acts for its agents without sending it, any other
channel or REST request for them must carry it (identity's refusals). An agent without a
credential that a client session registered (a REST client session, or an id registered
before without one) answers only to that session
(:class:`~klock_async.errors.ForeignAgentError`). ``hello`` may carry the operator token, which
then covers the session's revoke and evict calls as the ``Klock-Operator-Token`` header does.

The handlers call the same scheduler operations as the REST endpoints and parse their
arguments with the same helpers and declarations (:mod:`klock_async.validation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from starlette.requests import Request
from starlette.responses import Response
from websockets.http11 import Request as Upgrade

from klock_async import validation
from klock_async.errors import (
    ClientGoneError,
    ForeignAgentError,
    InvalidFieldError,
    KernelClosedError,
    KlockError,
    MalformedJSONError,
    TransportError,
    UnauthorizedError,
)
from klock_async.identity import Action, Caller, new_credential
from klock_async.identity import digest as credential_digest
from klock_async.logging import get_logger
from klock_async.model import Intent, LeaseInfo, LeaseState, Predicate, Resource, ResourceType
from klock_async.server import (
    _agent_json,
    _clock_json,
    _flag,
    _intents,
    _ok,
    _statistics_json,
    _timeout,
    _ttl,
    _waiter_json,
    bearer_refusal,
    session_of,
)
from klock_async.websocket import ServerWire

if TYPE_CHECKING:
    from klock_async.server import _Api

__all__ = ["GRACE", "REASON", "ChannelHub", "ClientSession", "ClientSessions"]

GRACE = 5.0
"""Default seconds a client session outlives its channel (``klock serve --grace``)."""
REASON = "client_gone"
"""The ``reason`` of the events of a client session that ran out of grace."""
KEEP_ANSWERS = 256
"""Answers a connected session keeps for the case its connection breaks with them on the
wire (the most recent ones); while it has no connection, it keeps every answer."""

_Body = validation.Body
_B = validation.BODIES


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


_encode = orjson.dumps  # answers go out as binary frames of UTF-8 JSON
# Answers written as soon as this many are queued, rather than at the end of the turn: the
# client starts on them while the server decides the rest (benchmarks/server.py, 2 cores:
# 100 agents 21,600 pairs/s against 11,800 with one frame per turn; 10 agents 11,700 against
# 9,200).
_CHUNK = 8


# An enum's .value is a Python-level property; these lookups hash members by identity, in C.
_TYPE_NAMES = {member: member.value for member in ResourceType}
_PREDICATE_NAMES = {member: member.value for member in Predicate}
_STATE_NAMES = {member: member.value for member in LeaseState}


def _lease_wire(info: LeaseInfo) -> dict[str, Any]:
    """A lease as the channel sends it: the REST form without its Klock v1 duplicates."""
    resource = info.resource
    return {
        "lease_id": info.id,
        "agent_id": info.agent_id,
        "session_id": info.session_id,
        "resource_type": _TYPE_NAMES[resource.type],
        "resource_path": resource.path,
        "predicate": _PREDICATE_NAMES[info.predicate],
        "token": info.token,
        "ttl_ms": info.ttl * 1000.0,
        "expires_at_ms": info.expires_at * 1000.0,
        "state": _STATE_NAMES[info.state],
    }


# --------------------------------------------------------------------------------------------
# Client sessions.


class ClientSession:
    """One client process (or REST client) as the server knows it.

    Invariants: ``connection`` is None exactly when the grace timer runs (or the session
    ended); every id in ``agents`` maps to this session in the registry while it lives.
    """

    def __init__(self, client_id: str, digest: str, grace: float, *, rest: bool) -> None:
        self.id = client_id
        self.digest = digest
        self.grace = grace
        self.rest = rest
        self.agents: set[str] = set()
        # Leases granted to it for agents it did not register (released with it as well).
        self.leases: dict[str, str] = {}
        self.calls: dict[int, asyncio.Task[None] | _Step] = {}
        self.kept: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.highest = 0
        self.connection: _Connection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False
        self.operator = False  # its hello carried the server's operator token

    def answer(self, call_id: int, payload: dict[str, Any]) -> None:
        """Send an answer, and keep it for a client that may not have received it."""
        kept = self.kept
        kept[call_id] = payload
        connection = self.connection
        if connection is not None:
            while len(kept) > KEEP_ANSWERS:
                kept.popitem(last=False)
            connection.push(payload)


class ClientSessions:
    """The server's client sessions: opened, resumed, kept alive and ended after grace."""

    def __init__(self, api: _Api, grace: float) -> None:
        self.api = api
        self.grace = grace
        self._sessions: dict[str, ClientSession] = {}
        self._owners: dict[str, ClientSession] = {}
        self._ending: set[asyncio.Task[int]] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, grace_ms: float | None, *, rest: bool) -> tuple[ClientSession, str]:
        """A new session; returns it and its resume secret (given out only here)."""
        grace = self.grace if grace_ms is None else min(self.grace, grace_ms / 1000.0)
        secret = secrets.token_urlsafe(24)
        session = ClientSession(secrets.token_urlsafe(12), _digest(secret), grace, rest=rest)
        self._sessions[session.id] = session
        get_logger().info("client.opened", client=session.id, grace_s=grace, rest=rest)
        return session, secret

    def resume(self, client_id: str, secret: str) -> ClientSession:
        """The session ``client_id``, proven by its secret.

        Raises:
            ClientGoneError: no such session (it ran out of grace, or never existed here).
            UnauthorizedError: the secret is wrong.
        """
        session = self._sessions.get(client_id)
        if session is None:
            raise ClientGoneError(
                f"client session {client_id!r} is gone (its grace period ran out and its "
                "leases were released, or this server never had it); open a new session and "
                "acquire again"
            )
        if not hmac.compare_digest(session.digest, _digest(secret)):
            raise UnauthorizedError(
                f"wrong secret for client session {client_id!r}; pass the secret its opening "
                "answer gave"
            )
        return session

    def check(self, agent_id: str, session: ClientSession | None) -> None:
        """Refuse an operation for an agent that another client session registered.

        ``session`` None is a REST request outside any session: refused for agents of a
        channel, allowed for those of a REST client session.

        Raises:
            ForeignAgentError: the agent belongs to another session.
        """
        owner = self._owners.get(agent_id)
        if owner is None or owner is session or (session is None and owner.rest):
            return
        raise ForeignAgentError(
            f"agent {agent_id!r} was registered by another client session; only that client "
            "may act for it. Use an agent id of your own"
        )

    async def claim(self, session: ClientSession, agent_id: str) -> None:
        """Make ``agent_id`` belong to ``session`` (durably, with a journal)."""
        if agent_id in session.agents:
            return
        self._owners[agent_id] = session
        session.agents.add(agent_id)
        journal = self.api.journal
        if journal is not None:  # written by the commit of the agent's registration
            journal.record_client(agent_id, session.id, session.digest)

    def forget(self, agent_ids: Iterable[str]) -> None:
        """Retired agents: their ids belong to no client session any more (free for anyone)."""
        journal = self.api.journal
        for agent_id in agent_ids:
            session = self._owners.pop(agent_id, None)
            if session is not None:
                session.agents.discard(agent_id)
                if journal is not None:  # written by the next commit
                    journal.record_client(agent_id, None, "")

    def attach(self, session: ClientSession, connection: _Connection) -> None:
        """A channel (re)connected to ``session``: the grace timer stops."""
        previous = session.connection
        if previous is not None:
            previous.close()  # a stale connection the client gave up on
        session.connection = connection
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None

    def detach(self, session: ClientSession, connection: _Connection) -> None:
        """A channel closed: the session ends unless the client is back within its grace."""
        if session.connection is connection:
            session.connection = None
            self.arm(session)

    def arm(self, session: ClientSession) -> None:
        """(Re)start the grace period of a session without a connection."""
        if session.ended:
            return
        if session.timer is not None:
            session.timer.cancel()
        loop = asyncio.get_running_loop()
        session.timer = loop.call_later(session.grace, self._due, session)

    def _due(self, session: ClientSession) -> None:
        session.timer = None
        task = asyncio.get_running_loop().create_task(self.end(session))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def end(self, session: ClientSession, reason: str = REASON) -> int:
        """End a session: withdraw its queued requests, release its leases; return how many."""
        if session.ended or session.connection is not None:
            return 0
        session.ended = True
        self._sessions.pop(session.id, None)
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        journal = self.api.journal
        for agent_id in session.agents:
            if self._owners.get(agent_id) is session:
                del self._owners[agent_id]
                if journal is not None:  # written by the commit of the release
                    journal.record_client(agent_id, None, "")
        released = 0
        with contextlib.suppress(KlockError):
            released = await self.api.backend.release_client(
                session.agents, tuple(session.leases), reason
            )
        for task in list(session.calls.values()):
            task.cancel()  # calls for agents it did not register: withdrawn
        get_logger().info(
            "client.ended",
            client=session.id,
            reason=reason,
            agents=sorted(session.agents),
            leases_released=released,
        )
        return released

    def recover(self, rows: Mapping[str, tuple[str, str]]) -> None:
        """The sessions a journal recorded, each given one grace period to come back."""
        for agent_id, (client_id, digest) in rows.items():
            session = self._sessions.get(client_id)
            if session is None:
                session = ClientSession(client_id, digest, self.grace, rest=False)
                self._sessions[client_id] = session
                self.arm(session)
            session.agents.add(agent_id)
            self._owners[agent_id] = session
        if rows:
            get_logger().info("client.recovered", clients=len(self._sessions), agents=len(rows))

    def live(self) -> list[ClientSession]:
        """The sessions that have not ended."""
        return list(self._sessions.values())

    def close(self) -> None:
        """Stop every grace timer (the server is stopping)."""
        for session in self._sessions.values():
            if session.timer is not None:
                session.timer.cancel()
                session.timer = None
        for task in self._ending:
            task.cancel()


# --------------------------------------------------------------------------------------------
# One connection.


class _Connection(ServerWire):
    """A channel's WebSocket: uvicorn's ``ws`` setting, given every connection it upgrades.

    uvicorn parses the HTTP upgrade request and hands the connection over (the request's
    bytes first); from there this protocol speaks WebSocket itself (:class:`ServerWire`, on
    websockets' Sans-I/O layer): a message is dispatched in the transport's callback, and no
    task is woken per frame. Only ``GET /channel`` is served, to clients the front door would
    let in (token, origin). The first message must be ``hello``.

    Answers are written as one frame per event-loop turn, or per ``_CHUNK`` answers when a
    turn has more (see :meth:`push`).
    """

    hub: ClassVar[ChannelHub]

    def __init__(self, config: Any, server_state: Any, app_state: Any = None, **_: Any) -> None:
        super().__init__(max_size=config.ws_max_size, ping_interval=config.ws_ping_interval or 0.0)
        self._connections: set[Any] = server_state.connections
        self.session: ClientSession | None = None
        self.out: list[dict[str, Any]] = []
        self.scheduled = False  # a flush at the end of this turn is scheduled
        self.closing = False
        self.closing_code = 1001
        self.closing_reason = ""
        self.done: asyncio.Future[None] = self._loop.create_future()

    # ------------------------------------------------------------ uvicorn's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        super().connection_lost(exc)
        self.ended()
        if self.session is not None:
            self.hub.sessions.detach(self.session, self)

    def shutdown(self) -> None:
        """uvicorn is stopping: close (the hub closed its channels already, answers first)."""
        self.close(1012, "the server is restarting")

    # ------------------------------------------------------------ the WebSocket

    def _refuse(self, request: Upgrade) -> tuple[int, bytes] | None:
        path = request.path.partition("?")[0]
        if path != "/channel":
            return 404, _encode(_refusal("not_found", f"no WebSocket at {path}; use /channel"))
        error = self.hub.refuse(request)
        if error is None:
            return None
        # 403 whatever the reason (clients of earlier releases read it as "refused"); the body
        # says which.
        return 403, _encode(_refusal(error.code, error.message))

    def _message(self, data: bytes) -> None:
        session = self.session
        if session is None:
            self.hub.hello(self, data)
        else:
            self.hub.dispatch(session, self, data)

    # ------------------------------------------------------------ answers

    def push(self, payload: dict[str, Any]) -> None:
        """Queue an answer. A full chunk is written at once: the client works on it while
        the server decides the rest of the turn's calls (the two processes overlap)."""
        out = self.out
        out.append(payload)
        if len(out) >= _CHUNK:
            self._write()
        elif not self.scheduled:
            self.scheduled = True
            self._loop.call_soon(self._flush)

    def close(self, code: int = 1001, reason: str = "replaced by a newer connection") -> None:
        """Close once what is queued is written (at the end of this turn)."""
        self.closing = True
        self.closing_code = code
        self.closing_reason = reason
        if not self.scheduled:
            self.scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        if self.out or self.closing:
            self._write()

    def _write(self) -> None:
        """Write what is queued (a JSON array when more than one answer), then close if asked."""
        out, self.out = self.out, []
        if out:
            self.write(_encode(out[0] if len(out) == 1 else out))
        if self.closing:
            super().close(self.closing_code, self.closing_reason)
            self.ended()

    def ended(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _refusal(code: str, message: str) -> dict[str, Any]:
    """A refused upgrade's body: the REST API's error form."""
    return {"success": False, "data": None, "error": message, "code": code, "details": {}}


# --------------------------------------------------------------------------------------------
# The operations.

Handler = Callable[["ChannelHub", ClientSession, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class _Op:
    body: validation.Body
    handler: Handler
    timed: bool = False  # takes a ``timeout_ms``


class _Step:
    """A call's coroutine driven without a task of its own, started at once.

    The channel's calls await one scheduler future and answer; a task per call would cost
    its creation and an extra turn of the event loop before the call reaches the scheduler.
    This steps the coroutine at once and again whenever the future it awaits is done, as a
    task does (eager start, as ``asyncio.eager_task_factory`` of Python 3.12). Calls that use
    ``asyncio.timeout`` (which needs a current task) run as tasks instead.
    """

    __slots__ = ("_cancel", "_coro", "_ended", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self._coro = coro
        self._waiting: asyncio.Future[Any] | None = None
        self._cancel = False
        self._ended: asyncio.Future[None] | None = None
        self._step(None)

    def _step(self, _: object) -> None:
        self._waiting = None
        try:
            if self._cancel:
                self._cancel = False
                yielded = self._coro.throw(asyncio.CancelledError())
            else:
                yielded = self._coro.send(None)
        except StopIteration:  # _run answers every outcome itself
            self._finish()
            return
        except BaseException:  # KeyboardInterrupt and the like: not the call's to keep
            self._finish()
            raise
        if yielded is None:  # a bare yield (asyncio.sleep(0)): step again next turn
            asyncio.get_running_loop().call_soon(self._step, None)
            return
        yielded._asyncio_future_blocking = False
        self._waiting = yielded
        yielded.add_done_callback(self._step)

    def cancel(self) -> None:
        """Throw CancelledError into the call where it waits, as ``Task.cancel`` does."""
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.cancel()
        else:
            self._cancel = True

    def _finish(self) -> None:
        self._coro = None  # type: ignore[assignment]
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def done(self) -> bool:
        return self._coro is None

    async def wait(self) -> None:
        """Return once the call has answered."""
        if self.done():
            return
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
        await self._ended


_EMPTY = _Body({}, optional=True)
_LEASE_ID = _B["POST /withdraw"].properties["request_id"]


def _caller(hub: ChannelHub, session: ClientSession, agent_id: str | None) -> Caller:
    """The session as identity's rules see it: the holder of the credentials of the agents
    it registered, and the operator if its hello carried the token."""
    own = (
        agent_id is not None
        and agent_id in session.agents
        and hub.api.identities.credentialed(agent_id)
    )
    return Caller(agent_id if own else None, session.operator)


def _authorize(hub: ChannelHub, session: ClientSession, action: Action, agent_id: str) -> None:
    """Identity's rules for ``agent_id`` (credentials, operator), then the client session's
    for an agent without a credential that another session registered."""
    hub.api.identities.authorize(action, agent_id, _caller(hub, session, agent_id))
    if not (session.operator and action in _OPERATOR_ACTIONS):
        hub.sessions.check(agent_id, session)


_OPERATOR_ACTIONS = frozenset((Action.RELEASE, Action.SESSION_RELEASE, Action.REVOKE, Action.EVICT))


async def _lease_holder(hub: ChannelHub, lease_id: str) -> str | None:
    for info in await hub.api.backend.leases():
        if info.id == lease_id:
            return info.agent_id
    return None


async def _register(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    agent_id = validation.ident(args, "agent_id")
    priority = validation.priority(args)
    sessions = hub.sessions
    api = hub.api
    identities = api.identities
    exists = False
    if not identities.credentialed(agent_id):
        exists = await api.backend.agent(agent_id) is not None
    # A new id gets a credential (unless the call says "credential": false, as Klock v1
    # clients do); an id registered before without one stays without (the Klock v1 rules for
    # it), and one with a credential is this session's or refused.
    issue = identities.authorize_registration(
        agent_id,
        _caller(hub, session, agent_id),
        wants_credential=not exists and _flag(args, "credential", True),
        priority=priority,
        exists=exists,
    )
    sessions.check(agent_id, session)  # without a credential: another session's agent
    if not issue:
        await sessions.claim(session, agent_id)
        info = await api.backend.register_agent(agent_id, priority)
        api.touch(agent_id)
        data = {**_agent_json(info), "client_id": session.id}
        if identities.credentialed(agent_id):
            data["credentialed"] = True
        return data
    secret = new_credential()
    stored = credential_digest(secret)
    identities.add(agent_id, stored)  # taken now: a concurrent registration is refused
    journal = api.journal
    if journal is not None:  # in the commit of the registration, before the answer
        journal.record_credential(agent_id, stored)
    await sessions.claim(session, agent_id)
    try:
        info = await api.backend.register_agent(agent_id, priority)
    except BaseException:
        identities.forget((agent_id,))
        if journal is not None:
            journal.record_credential(agent_id, None)
        raise
    api.touch(agent_id)
    get_logger().info("agent.credential_issued", agent=agent_id, client=session.id)
    return {
        **_agent_json(info),
        "client_id": session.id,
        "credentialed": True,
        "credential": secret,
    }


def _one_intent(args: dict[str, Any]) -> tuple[Intent, ...]:
    """The intents of an acquire; one ``{"resource", "predicate"}`` pair (the common call)
    through the kernel's cache of parsed pairs, anything else through the REST parser."""
    items = args.get("intents")
    if type(items) is list and len(items) == 1:
        item = items[0]
        if type(item) is dict and len(item) == 2:
            resource = item.get("resource")
            predicate = item.get("predicate")
            if (
                type(resource) is str
                and type(predicate) is str
                and len(resource) <= validation.MAX_PATH_CHARS
                and len(predicate) <= validation.MAX_NAME_CHARS
            ):
                return (Intent.of(resource, predicate),)
    return _intents(args)


async def _acquire(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    agent_id = validation.name_field(args, "agent_id")
    session_id = session_of(args)
    intents = _one_intent(args)
    api = hub.api
    call, wait, timeout = api.acquire_call(args, agent_id, session_id, intents)
    _authorize(hub, session, Action.ACQUIRE, agent_id)
    backend = api.backend
    api.touch(agent_id)
    if wait and timeout == 0:
        infos = await api._decided_now(call, agent_id, intents)
    else:
        infos = await call()
    if agent_id not in session.agents:
        for info in infos:
            session.leases[info.id] = agent_id
        if session.ended:  # granted as the session ended: give it back
            with contextlib.suppress(KlockError):
                await backend.release_client((), [info.id for info in infos], REASON)
    return {"session_id": session_id, "leases": [_lease_wire(info) for info in infos]}


async def _holder(
    hub: ChannelHub, session: ClientSession, args: dict[str, Any], action: Action, lease_id: str
) -> str | None:
    """The agent a call on a lease acts for (None: any holder, the Klock v1 rule). A lease id
    is no capability for an agent with a credential."""
    agent_id = validation.optional_ident(args, "agent_id")
    if agent_id is not None:
        _authorize(hub, session, action, agent_id)
        return agent_id
    if session.operator and action is Action.RELEASE:
        return None
    if not hub.api.identities.checks_leases:
        return None
    holder = await _lease_holder(hub, lease_id)
    if holder is not None:
        _authorize(hub, session, action, holder)
    return holder


async def _release(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    lease_id = validation.ident(args, "lease_id")
    agent_id = await _holder(hub, session, args, Action.RELEASE, lease_id)
    # Absent: the kernel decides (a SERIALIZABLE writing lease records its write).
    record_write = _flag(args, "record_write", False) if "record_write" in args else None
    info = await hub.api.backend.release(lease_id, agent_id, record_write=record_write)
    session.leases.pop(lease_id, None)
    return _lease_wire(info)


async def _heartbeat(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    lease_id = validation.ident(args, "lease_id")
    agent_id = await _holder(hub, session, args, Action.HEARTBEAT, lease_id)
    ttl = _ttl(args, default_ms=None)
    return _lease_wire(await hub.api.backend.heartbeat(lease_id, agent_id, ttl))


async def _release_session(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    agent_id = validation.ident(args, "agent_id")
    session_id = validation.ident(args, "session_id")
    _authorize(hub, session, Action.SESSION_RELEASE, agent_id)
    return {"released": await hub.api.backend.release_session(agent_id, session_id)}


async def _wait_ended(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    lease_id = validation.ident(args, "lease_id")
    ended = await hub.api.backend.wait_ended(lease_id, _timeout(args))
    return {"ended": ended is not None, "lease": None if ended is None else _lease_wire(ended)}


async def _revoke(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    lease_id = validation.ident(args, "lease_id")
    holder = await _lease_holder(hub, lease_id)
    if holder is not None:
        _authorize(hub, session, Action.REVOKE, holder)
    return _lease_wire(await hub.api.backend.revoke(lease_id))


async def _evict(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    agent_id = validation.ident(args, "agent_id")
    _authorize(hub, session, Action.EVICT, agent_id)
    return {"evicted": await hub.api.backend.evict(agent_id)}


async def _leases(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    return [_lease_wire(info) for info in await hub.api.backend.leases()]


async def _agents(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    return [_agent_json(info) for info in await hub.api.backend.agents()]


async def _statistics(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    return _statistics_json(await hub.api.backend.statistics())


async def _waiters(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    return [_waiter_json(info) for info in await hub.api.backend.waiters()]


async def _clock_read(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    path = validation.name_field(args, "path", validation.MAX_PATH_CHARS)
    agent_id = validation.name_field(args, "agent_id")
    _authorize(hub, session, Action.CLOCK, agent_id)
    clock = await hub.api.backend.clock_read(path, agent_id)
    return _clock_json(str(Resource.parse(path)), clock)


async def _clock_write(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    path = validation.name_field(args, "path", validation.MAX_PATH_CHARS)
    agent_id = validation.name_field(args, "agent_id")
    strict = _flag(args, "strict", True)
    _authorize(hub, session, Action.CLOCK, agent_id)
    clock = await hub.api.backend.clock_write(path, agent_id, strict=strict)
    return _clock_json(str(Resource.parse(path)), clock)


async def _clock_status(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    status = await hub.api.backend.clock_status()
    return {"tracked_paths": list(status.tracked_paths), "conflict_count": status.conflict_count}


async def _withdraw(hub: ChannelHub, session: ClientSession, args: dict[str, Any]) -> Any:
    call = validation.field_value(args, "call", int, "the id of a call of this channel")
    task = session.calls.get(call)
    if task is None:
        return {"call": call, "withdrawn": False}  # answered already (or never sent)
    # Cancelling the call makes the scheduler withdraw it (and give back a grant it made in
    # the same instant); the call then answers ``withdrawn``.
    task.cancel()
    if isinstance(task, _Step):
        await task.wait()
    else:
        await asyncio.wait((task,))
    return {"call": call, "withdrawn": session.kept.get(call, {}).get("ok") is False}


OPS: dict[str, _Op] = {
    "register": _Op(_B["POST /agents"], _register),
    "acquire": _Op(_B["POST /intents"], _acquire, timed=True),
    "release": _Op(_B["DELETE /leases/{lease_id}"], _release),
    "heartbeat": _Op(_B["POST /leases/{lease_id}/heartbeat"], _heartbeat),
    "release_session": _Op(_B["POST /sessions/release"], _release_session),
    "wait_ended": _Op(
        _Body({**_B["POST /leases/{lease_id}/wait"].properties, "lease_id": _LEASE_ID}),
        _wait_ended,
        timed=True,
    ),
    "revoke": _Op(_Body({"lease_id": _LEASE_ID}), _revoke),
    "evict": _Op(_B["POST /evict"], _evict),
    "leases": _Op(_EMPTY, _leases),
    "agents": _Op(_EMPTY, _agents),
    "statistics": _Op(_EMPTY, _statistics),
    "waiters": _Op(_EMPTY, _waiters),
    "clock_read": _Op(_B["POST /clocks/read"], _clock_read),
    "clock_write": _Op(_B["POST /clocks/write"], _clock_write),
    "clock_status": _Op(_EMPTY, _clock_status),
    "withdraw": _Op(_Body({"call": {"type": "integer"}}), _withdraw),
}
"""Every operation of the channel, with the declaration its arguments are checked against."""

_HELLO = _Body(
    {
        **_B["POST /clients/heartbeat"].properties,
        "grace_ms": _B["POST /clients"].properties["grace_ms"],
        "pending": {"type": "array", "items": {"type": "integer"}},
        "operator_token": {
            "type": "string",
            "description": "the server's operator token: the session's revoke and evict calls "
            "are the operator's",
        },
    },
    optional=True,
)


def _error(call_id: int | None, error: KlockError) -> dict[str, Any]:
    return {"id": call_id, "ok": False, "error": error.to_payload()}


class _Withdrawn(KlockError):
    code = "withdrawn"
    status = 499


class ChannelHub:
    """The channel endpoint and the REST endpoints of client sessions, over one ``_Api``."""

    def __init__(self, api: _Api, grace: float = GRACE) -> None:
        self.api = api
        self.sessions = ClientSessions(api, grace)
        self.stopping = False

    def begin_shutdown(self) -> None:
        """Answer every pending call ``kernel_closed`` and close the channels (code 1012:
        the client reconnects, to the successor of this server)."""
        self.stopping = True
        for session in self.sessions.live():
            for call in list(session.calls.values()):
                call.cancel()
            if session.connection is not None:
                session.connection.close(1012, "the server is restarting")

    async def drained(self, bound: float = 1.0) -> None:
        """Wait (at most ``bound`` seconds) until the channels closed by
        :meth:`begin_shutdown` have written their last answers."""
        closing = [
            session.connection.done
            for session in self.sessions.live()
            if session.connection is not None
        ]
        if closing:
            await asyncio.wait(closing, timeout=bound)

    # ------------------------------------------------------------ the WebSocket

    def protocol(self) -> type[asyncio.Protocol]:
        """The class of this hub's channel connections, for uvicorn's ``ws`` setting."""
        return type("Channel", (_Connection,), {"hub": self})

    def refuse(self, request: Upgrade) -> KlockError | None:
        """Why a channel may not open (a foreign page, no token), or None: the front door's
        rules for an upgrade request."""
        headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in request.headers.raw_items()
        ]
        token = self.api.token
        return self.api.origin_guard.check(headers) or bearer_refusal(
            headers, None if token is None else f"Bearer {token}".encode()
        )

    def hello(self, connection: _Connection, text: str | bytes) -> None:
        """The first message of a channel: open or resume its session, or refuse and close."""
        call_id: int | None = None
        try:
            value = _parse(text)
            if not isinstance(value, dict) or value.get("op") != "hello":
                raise InvalidFieldError(
                    'the first message of a channel must be {"id": 0, "op": "hello", '
                    '"args": {...}}; see docs/server.md'
                )
            call_id = value.get("id") if type(value.get("id")) is int else None
            refusal = self.api.not_leader()
            if refusal is not None:  # a follower: the client goes to the leader it names
                raise refusal
            args = _args(value)
            validation.check_body(args, _HELLO)
            pending = args.get("pending") or []
            if not isinstance(pending, list) or any(type(i) is not int for i in pending):
                raise InvalidFieldError("field 'pending' must be a list of call ids")
            grace = _timeout(args, "grace_ms")
            client_id = validation.optional_ident(args, "client_id")
            token = args.get("operator_token")
            # A wrong token is refused (operator_required), as in the REST header.
            operator = token is not None and self.api.identities.caller(None, token).operator
            data: dict[str, Any]
            if client_id is None:
                session, secret = self.sessions.open(
                    None if grace is None else grace * 1000.0, rest=False
                )
                data = {"client_id": session.id, "secret": secret, "resumed": False}
            else:
                session = self.sessions.resume(client_id, validation.ident(args, "secret"))
                data = {"client_id": session.id, "resumed": True}
        except KlockError as error:
            connection.write(_encode(_error(call_id, error)))
            ServerWire.close(connection, 1008, error.code)  # now, not at the end of the turn
            return
        session.operator = operator
        data["grace_ms"] = session.grace * 1000.0
        # Calls the server never received (lost with the old connection): resend them.
        data["unknown"] = [i for i in pending if i > session.highest]
        data["pending"] = [i for i in pending if i <= session.highest]
        connection.session = session
        self.sessions.attach(session, connection)
        connection.push({"id": call_id, "ok": True, "data": data})
        for call_id in data["pending"]:
            kept = session.kept.get(call_id)
            if kept is not None:
                connection.push(kept)
            elif call_id not in session.calls:  # answered, and no longer kept
                connection.push(
                    _error(
                        call_id,
                        TransportError(
                            "the answer to this call was lost with the connection; look at "
                            "the state (leases, agents) before you retry it"
                        ),
                    )
                )

    def dispatch(self, session: ClientSession, connection: _Connection, text: str | bytes) -> None:
        try:
            value = _parse(text)
        except KlockError as error:
            connection.push(_error(None, error))
            return
        for item in value if isinstance(value, list) else (value,):
            self._call(session, connection, item)

    def _call(self, session: ClientSession, connection: _Connection, item: Any) -> None:
        if not isinstance(item, dict) or type(item.get("id")) is not int:
            connection.push(
                _error(None, InvalidFieldError('a call is {"id": <integer>, "op", "args"}'))
            )
            return
        call_id: int = item["id"]
        if call_id <= session.highest:
            connection.push(
                _error(
                    call_id,
                    InvalidFieldError(
                        f"call id {call_id} is not above {session.highest}, the highest this "
                        "session used; number calls upwards"
                    ),
                )
            )
            return
        session.highest = call_id
        try:
            op = OPS.get(item.get("op"))  # type: ignore[arg-type]
            if op is None:
                raise InvalidFieldError(
                    f"unknown operation {validation.shorten(item.get('op'))}; one of: "
                    f"{', '.join(sorted(OPS))}"
                )
            args = validation.check_body(_args(item), op.body, deep=False)  # see _parse
        except KlockError as error:
            session.answer(call_id, _error(call_id, error))
            return
        coro = self._run(session, call_id, op, args)
        if op.timed and args.get("timeout_ms") is not None:
            # asyncio.timeout needs a task of its own: the general path.
            session.calls[call_id] = asyncio.get_running_loop().create_task(coro)
        else:
            session.calls[call_id] = _Step(coro)

    async def _run(self, session: ClientSession, call_id: int, op: _Op, args: Any) -> None:
        try:
            data = await op.handler(self, session, args)
        except KlockError as error:
            payload = _error(call_id, error)
        except asyncio.CancelledError:
            if self.stopping:
                payload = _error(
                    call_id,
                    KernelClosedError(
                        "the server shut down while the call waited; retry against its successor"
                    ),
                )
            else:
                payload = _error(
                    call_id,
                    _Withdrawn("the call was withdrawn (by its client, or its session ended)"),
                )
        except Exception as exc:  # a bug: answer, keep serving
            get_logger().error("server.error", op=op.handler.__name__, error=repr(exc))
            payload = _error(call_id, TransportError("internal server error; see the server log"))
        else:
            payload = {"id": call_id, "ok": True, "data": data}
        finally:
            session.calls.pop(call_id, None)
        session.answer(call_id, payload)

    # ------------------------------------------------------------ REST client sessions

    async def rest_open(self, request: Request) -> Response:
        body = await self.api._body(request, required=False)
        grace_ms = _timeout(body, "grace_ms")
        session, secret = self.sessions.open(
            None if grace_ms is None else grace_ms * 1000.0, rest=True
        )
        self.sessions.arm(session)  # alive as long as heartbeats come within the grace
        return _ok(
            {"client_id": session.id, "secret": secret, "grace_ms": session.grace * 1000.0},
            201,
        )

    def _rest_session(self, body: Mapping[str, Any]) -> ClientSession:
        client_id = validation.ident(body, "client_id")
        session = self.sessions.resume(client_id, validation.ident(body, "secret"))
        session.rest = True  # a session recovered from the journal does not say which it is
        return session

    async def rest_heartbeat(self, request: Request) -> Response:
        session = self._rest_session(await self.api._body(request))
        if session.connection is None:
            self.sessions.arm(session)
        return _ok({"client_id": session.id, "grace_ms": session.grace * 1000.0})

    async def rest_close(self, request: Request) -> Response:
        session = self._rest_session(await self.api._body(request))
        connection = session.connection
        if connection is not None:
            raise InvalidFieldError(
                f"client session {session.id!r} has a channel open; close the channel instead"
            )
        released = await self.sessions.end(session, reason="client_closed")
        return _ok({"client_id": session.id, "released": released})

    async def rest_register(self, request: Request) -> Response:
        body = await self.api._body(request)
        agent_id = validation.ident(body, "agent_id")
        priority = validation.priority(body)
        session = self._rest_session(body)
        self.sessions.check(agent_id, session)
        await self.sessions.claim(session, agent_id)
        info = await self.api.backend.register_agent(agent_id, priority)
        self.api.touch(agent_id)
        return _ok({**_agent_json(info), "client_id": session.id})


def _parse(text: str | bytes) -> Any:
    """A channel frame's JSON; orjson refuses lone surrogates and NaN, as REST's checks do."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSONError(f"a channel message is not valid JSON: {exc}") from None


def _args(item: Mapping[str, Any]) -> dict[str, Any]:
    args = item.get("args")
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise InvalidFieldError(f"'args' must be an object, got {validation.shorten(args)}")
    return args
