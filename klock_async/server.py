"""``klock serve``: the scheduler behind an HTTP API, with an optional SQLite journal.

The ASGI app (Starlette, served by uvicorn) owns one :class:`~klock_async.scheduler.Scheduler`.
Its handlers only translate: JSON in, one scheduler call, JSON out. Every state change still
goes through the scheduler actor, so HTTP clients and embedded callers obey exactly the same
rules, and a long-polling ``POST /leases`` with ``"wait": true`` is resolved by the same future
as an embedded waiter.

The API is a superset of the Klock OSS v1 REST contract (same paths, field names and envelope
``{"success", "data", "error"}``, ttl in milliseconds, ``reason``/``wait_time`` on a refused
lease), so v1 clients keep working. Every endpoint is documented with examples in
``docs/server.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import hmac
import json
import math
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from klock_async import validation
from klock_async.clocks import IsolationLevel, VectorClock
from klock_async.errors import (
    AcquireTimeoutError,
    BodyTooLargeError,
    InvalidFieldError,
    InvalidRequestError,
    KernelClosedError,
    KlockError,
    LeaseDied,
    LeaseWouldWait,
    MalformedJSONError,
    NotLeaderError,
    StrictIdentityError,
    UnauthorizedError,
)
from klock_async.identity import (
    ANONYMOUS,
    Action,
    Caller,
    Identities,
    digest,
    new_credential,
)
from klock_async.journal import BufferedJournal
from klock_async.leader import LEADER_TTL, LeaderLease
from klock_async.logging import get_logger
from klock_async.model import (
    AgentInfo,
    Intent,
    LeaseInfo,
    Predicate,
    Resource,
    ResourceType,
    Statistics,
    WaiterInfo,
    validate_request_key,
)
from klock_async.postgres import PostgresJournal, is_postgres_url, prepare_schema, redact
from klock_async.scheduler import Journal, Scheduler
from klock_async.web import Metrics, events_response, page_response

__all__ = [
    "Server",
    "add_arguments",
    "create_app",
    "run",
    "server_config",
]


DEFAULT_PORT = 3100
GRACE = 5.0
"""Default of ``klock serve --grace``: seconds a client session outlives its channel."""
DEFAULT_TTL_MS = 30_000
"""Lease ttl when a request names none (milliseconds)."""
MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted by default; larger ones get 413 ``body_too_large``."""

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Routing errors (the HTTP-boundary errors clients can see live in klock_async.errors).


class _RouteError(KlockError):
    """No such endpoint, or not with this method."""

    def __init__(self, message: str, *, code: str, status: int) -> None:
        super().__init__(message)
        self._code = code
        self._status = status

    def to_payload(self) -> dict[str, Any]:
        return {"code": self._code, "message": self.message}


class _ClientGone(Exception):
    """The client closed the connection while its long-poll was pending."""


# --------------------------------------------------------------------------------------------
# JSON encoding: the wire form of the kernel's values.


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def _ms(seconds: float) -> int | float:
    value = seconds * 1000.0
    rounded = round(value)
    return rounded if abs(value - rounded) < 1e-6 else round(value, 3)


def _lease_json(info: LeaseInfo) -> dict[str, Any]:
    """The JSON form of a lease.

    Durations and instants are whole milliseconds, named so (``ttl_ms``,
    ``expires_at_ms``); ``ttl`` and ``expires_at`` are the same values under their Klock v1
    names (deprecated: kept for v1 clients).
    """
    return {
        "lease_id": info.id,
        "id": info.id,
        "agent_id": info.agent_id,
        "session_id": info.session_id,
        "resource": str(info.resource),
        "resource_type": info.resource.type.value,
        "resource_path": info.resource.path,
        "predicate": info.predicate.value,
        "token": info.token,
        "ttl_ms": _ms(info.ttl),
        "expires_at_ms": round(info.expires_at * 1000.0),
        "ttl": _ms(info.ttl),
        "expires_at": round(info.expires_at * 1000.0),
        "state": info.state.value,
    }


def _agent_json(info: AgentInfo) -> dict[str, Any]:
    return {"agent_id": info.agent_id, "priority": info.ts, "ts": info.ts}


def _waiter_json(info: WaiterInfo) -> dict[str, Any]:
    return {
        "request_id": info.request_id,
        "agent_id": info.agent_id,
        "session_id": info.session_id,
        "age": info.age,
        "priority": info.priority,
        "intents": [
            {"resource": str(i.resource), "predicate": i.predicate.value} for i in info.intents
        ],
        "waits_for": [
            {"kind": e.kind, "id": e.id, "agent_id": e.agent_id, "resource": e.resource}
            for e in info.waits_for
        ],
    }


def _statistics_json(stats: Statistics) -> dict[str, Any]:
    return {
        "agents": stats.agents,
        "leases_active": stats.leases_active,
        "requests_waiting": stats.requests_waiting,
        "grants": stats.grants,
        "waits": stats.waits,
        "deaths": stats.deaths,
        "releases": stats.releases,
        "expiries": stats.expiries,
        "revocations": stats.revocations,
        "causal_violations": stats.causal_violations,
        "batches": stats.batches,
        "messages": stats.messages,
    }


class _JSONResponse(Response):
    """A JSON response with its two headers built directly (the hot path's answer)."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int = 200) -> None:
        self.body = body
        self.status_code = status_code
        self.background = None
        self.raw_headers = [
            (b"content-length", str(len(body)).encode("latin-1")),
            (b"content-type", b"application/json"),
        ]


def _ok(data: Any, status: int = 200) -> Response:
    return _JSONResponse(_dumps({"success": True, "data": data, "error": None}), status)


_PAGE = validation.MAX_PAGE


def _paged(items: list[Any], cursor: str | None) -> Response:
    """A page of a list: ``data`` is the list (as v1 clients read it), ``next`` the cursor of
    the following page (``?after=``), null on the last page."""
    return _JSONResponse(_dumps({"success": True, "data": items, "error": None, "next": cursor}))


def _agent_key(info: AgentInfo) -> tuple[int, str]:
    return (info.ts, info.agent_id)


def _agent_cursor(value: str | None) -> tuple[int, str] | None:
    if value is None:
        return None
    ts, sep, agent_id = value.partition(":")
    try:
        return (int(ts), agent_id) if sep else _bad_cursor(value)
    except ValueError:
        return _bad_cursor(value)


def _bad_cursor(value: str) -> tuple[int, str]:
    raise InvalidFieldError(
        f"query parameter 'after' must be the 'next' cursor of a previous page, got {value!r}"
    )


def _error_response(error: KlockError, status: int | None = None) -> Response:
    payload = error.to_payload()
    code = payload.pop("code")
    message = payload.pop("message")
    body: dict[str, Any] = {
        "success": False,
        "data": None,
        "error": message,
        "code": code,
        "details": payload,
    }
    # The fields Klock v1 clients read on a refused lease.
    # (wait_time is in milliseconds, the same value as details.retry_after_ms or wait_time_ms.)
    if isinstance(error, LeaseDied):
        body["reason"] = "DIE"
        body["wait_time"] = payload["retry_after_ms"]
    elif isinstance(error, LeaseWouldWait):
        body["reason"] = "WAIT"
        body["wait_time"] = payload["wait_time_ms"]
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, UnauthorizedError) else None
    if isinstance(error, _RouteError):
        status = error._status
    return Response(
        _dumps(body),
        status_code=status or error.status,
        media_type="application/json",
        headers=headers,
    )


# --------------------------------------------------------------------------------------------
# Request parsing: every check raises a typed InvalidRequestError before the scheduler is asked.


_field = validation.field_value
_optional = validation.optional
_text = validation.ident
_optional_text = validation.optional_ident
_name = validation.name_field


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = _optional(body, name, bool, "true or false")
    return default if value is None else value


def _ttl(body: Mapping[str, Any], default_ms: float | None = DEFAULT_TTL_MS) -> float | None:
    """The ttl in seconds from a millisecond field, at most one day."""
    return validation.ttl(body, default_ms)


_timeout = validation.timeout


_LEVELS = {level.value: level for level in IsolationLevel}


def _isolation(body: Mapping[str, Any]) -> IsolationLevel | None:
    """The request's isolation level; None (absent) joins the session as it is."""
    name = body.get("isolation")
    if type(name) is str and name in _LEVELS:  # the common case, spelled exactly
        return _LEVELS[name]
    name = _optional(body, "isolation", str, "an isolation level name")
    if name is None:
        return None
    validation.limited(name, "isolation", validation.MAX_NAME_CHARS)
    return IsolationLevel.parse(name)


def _request_key(body: Mapping[str, Any]) -> str | None:
    """An acquire's ``request_key`` (None: absent).

    Raises:
        InvalidFieldError: not a request key.
    """
    try:
        return validate_request_key(body.get("request_key"))
    except InvalidRequestError as exc:
        raise InvalidFieldError(f"field 'request_key': {exc.message}") from None


def session_of(body: Mapping[str, Any]) -> str:
    """An acquire's session: the one it names; else, with a request key, one named after the
    key (so that its resends land in the same session); else a new one."""
    session_id = _optional_text(body, "session_id")
    if session_id:
        return session_id
    key = _request_key(body)
    return uuid.uuid4().hex if key is None else f"key-{key}"


def _intent(item: Any, where: str, *, alone: bool = True) -> Intent:
    """One intent; ``alone`` when ``item`` is an intent object (not a whole lease request)."""
    if not isinstance(item, Mapping):
        raise InvalidFieldError(f"{where} must be an object, got {validation.shorten(item)}")
    unknown = item.keys() - validation.INTENT_FIELDS if alone else ()
    if unknown:
        raise InvalidFieldError(
            f"{where} has unknown field(s) {', '.join(map(repr, sorted(unknown)))}; an intent "
            f"takes: {', '.join(sorted(validation.INTENT_FIELDS))}"
        )
    predicate = _name(item, "predicate", validation.MAX_NAME_CHARS)
    if item.get("resource") is not None:
        resource = Resource.parse(_name(item, "resource", validation.MAX_PATH_CHARS))
    else:
        rtype = _name(item, "resource_type", validation.MAX_NAME_CHARS)
        path = _name(item, "resource_path", validation.MAX_PATH_CHARS)
        resource = Resource.of(ResourceType.parse(rtype), path)
    return Intent(resource, Predicate.parse(predicate))


def _intents(body: Mapping[str, Any]) -> tuple[Intent, ...]:
    """The ``intents`` list of a request for several leases at once."""
    items = _field(body, "intents", list, "a non-empty list of intents")
    if not items:
        raise InvalidFieldError("field 'intents' must list at least one intent")
    if len(items) > validation.MAX_INTENTS:
        raise InvalidFieldError(
            f"field 'intents' lists {len(items)} intents; the limit is {validation.MAX_INTENTS}"
        )
    return tuple(_intent(item, f"intents[{i}]") for i, item in enumerate(items))


def _query_agent(request: Request, body: Mapping[str, Any]) -> str | None:
    """The optional ``agent_id`` of a release or heartbeat: query string, then body."""
    value = request.query_params.get("agent_id")
    if value is not None:
        if not value.strip():
            raise InvalidFieldError("query parameter 'agent_id' must be a non-empty string")
        return validation.limited(value, "agent_id", validation.MAX_ID_CHARS)
    return _optional_text(body, "agent_id")


def _query_id(value: str | None, name: str) -> str | None:
    if value is not None and not 0 < len(value) <= validation.MAX_ID_CHARS:
        raise InvalidFieldError(
            f"query parameter {name!r} must be 1 to {validation.MAX_ID_CHARS} characters long"
        )
    return value


def _path_lease_id(request: Request, body: Mapping[str, Any]) -> str:
    """The lease id of the path; a v1 body may repeat it, and must then agree."""
    lease_id: str = request.path_params["lease_id"]
    validation.limited(lease_id, "lease_id", validation.MAX_ID_CHARS)
    repeated = _optional_text(body, "lease_id")
    if repeated is not None and repeated != lease_id:
        raise InvalidFieldError(
            f"field 'lease_id' ({repeated!r}) names another lease than the path ({lease_id!r})"
        )
    return lease_id


def _query_flag(request: Request, name: str, body: Mapping[str, Any]) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return _flag(body, name, False)
    lowered = value.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise InvalidFieldError(f"query parameter {name!r} must be true or false, got {value!r}")


# --------------------------------------------------------------------------------------------
# Metrics: counters of the HTTP layer; the kernel's own counters come from statistics().

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Histogram:
    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_BUCKETS, seconds)] += 1
        self.count += 1
        self.total += seconds


class _HttpMetrics:
    """Request counts and latency per route; touched only on the event loop thread."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], _Histogram] = {}
        self.long_polls = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.latency.get((method, route))
        if histogram is None:
            histogram = self.latency[(method, route)] = _Histogram()
        histogram.observe(seconds)


# --------------------------------------------------------------------------------------------
# The guard: authentication, body size, metrics. A plain ASGI middleware (no per-request task).


Endpoint = Callable[[Request], Awaitable[Response]]
# Answered without a token: the health check, and the page, which holds no data and asks for
# the token itself.
_OPEN_PATHS = frozenset(("/health", "/"))


def bearer_refusal(
    headers: Sequence[tuple[bytes, bytes]], expected: bytes | None
) -> UnauthorizedError | None:
    """The refusal of a request without the bearer token ``expected`` (``b"Bearer ..."``;
    None: the server has no token), given its raw headers, or None."""
    if expected is None:
        return None
    given = next((value for name, value in headers if name == b"authorization"), b"")
    if hmac.compare_digest(given, expected):
        return None
    return UnauthorizedError(
        "this server needs 'Authorization: Bearer <token>'; pass the token the server was "
        "started with (klock serve --token, or KLOCK_TOKEN)"
    )


class _FrontDoor:
    """Authentication, body limit, metrics, and direct dispatch of the API's own routes.

    The API's routes are looked up in two dicts (static paths, and the operations on
    ``/leases/{lease_id}``), which costs far less per request than walking the route list;
    anything else falls through to the Starlette app behind, which answers 404 or 405.
    """

    def __init__(self, app: ASGIApp, api: _Api, table: Sequence[tuple[str, str, Endpoint]]) -> None:
        self.app = app
        self.api = api
        token = api.token
        self.expected = f"Bearer {token}".encode() if token else None
        self.static: dict[tuple[str, str], tuple[str, Endpoint]] = {}
        self.lease_ops: dict[tuple[str, str], tuple[str, Endpoint]] = {}
        prefix = "/leases/{lease_id}"
        for method, path, endpoint in table:
            if path.startswith(prefix):
                self.lease_ops[(method, path[len(prefix) + 1 :])] = (path, endpoint)
            else:
                self.static[(method, path)] = (path, endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (the channel's WebSocket never comes here)
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        method = scope["method"]
        path = scope["path"]
        route = self.static.get((method, path))
        if route is None and path.startswith("/leases/"):
            lease_id, _, op = path[8:].partition("/")
            if lease_id:
                route = self.lease_ops.get((method, op))
                if route is not None:
                    scope["path_params"] = {"lease_id": lease_id}
        label = "unmatched" if route is None else route[0]
        scope["klock.route"] = f"{method} {label}"
        guard = _GUARDS.get((scope.get("server"), scope.get("client")))
        if guard is not None:
            receive = guard.request_started(scope, receive)
        try:
            refusal = self._refuse(scope) or self.api.not_leading(scope)
            if refusal is not None:
                await refusal(scope, receive, send_status)
            elif route is None:
                await self.app(scope, receive, send_status)
            else:
                await self._serve(route[1], scope, receive, send_status)
        finally:
            if guard is not None:
                guard.request_ended()
            self.api.http.observe(method, label, status, time.perf_counter() - started)

    async def _serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await endpoint(Request(scope, receive, send))
        except Exception as exc:  # a bug: answer 500, keep serving
            get_logger().error("server.error", path=scope["path"], error=repr(exc))
            response = _error_response(
                _RouteError(
                    "internal server error; see the server log", code="internal", status=500
                )
            )
        await response(scope, receive, send)

    def _refuse(self, scope: Scope) -> Response | None:
        refusal = self.api.origin_guard.check(scope["headers"])
        if refusal is not None:
            return _error_response(refusal)
        if scope["path"] not in _OPEN_PATHS:
            unauthorized = bearer_refusal(scope["headers"], self.expected)
            if unauthorized is not None:
                return _error_response(unauthorized)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return _error_response(MalformedJSONError("bad Content-Length header"))
                if size > self.api.max_body_bytes:
                    return _error_response(self.api.too_large())
            elif name == b"x-klock-request-id" and len(value) > validation.MAX_ID_CHARS:
                return _error_response(
                    InvalidFieldError(
                        f"header 'x-klock-request-id' is {len(value)} bytes long; the limit is "
                        f"{validation.MAX_ID_CHARS}"
                    )
                )
        return None


# --------------------------------------------------------------------------------------------
# The handlers.


class _Arrivals:
    """Which long-poll requests (by client request id) have been handed to the scheduler.

    ``POST /sync`` waits here, so a client can be sure its pending long-polls were decided
    (granted, queued or refused) before it asks for a snapshot: a barrier without polling.
    """

    KEEP = 16_384  # ids are at most validation.MAX_ID_CHARS long: a few MB at most

    def __init__(self) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}

    def arrived(self, request_id: str) -> None:
        self._seen[request_id] = None
        if len(self._seen) > self.KEEP:
            self._seen.popitem(last=False)
        for fut in self._waiting.pop(request_id, ()):
            if not fut.done():
                fut.set_result(None)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._seen

    async def wait(self, request_ids: Sequence[str]) -> None:
        """Wait until every listed request has been handed to the scheduler."""
        loop = asyncio.get_running_loop()
        futures = []
        for rid in request_ids:
            if rid in self._seen:
                continue
            fut: asyncio.Future[None] = loop.create_future()
            self._waiting.setdefault(rid, []).append(fut)
            futures.append((rid, fut))
        try:
            for _, fut in futures:
                await fut
        finally:
            for rid, fut in futures:
                waiting = self._waiting.get(rid)
                if waiting is not None and fut in waiting:
                    waiting.remove(fut)
                    if not waiting:
                        del self._waiting[rid]


class _Api:
    """The endpoints; each turns one request into one scheduler call."""

    REQUEST_ID_HEADER: ClassVar[str] = "x-klock-request-id"

    def __init__(
        self,
        *,
        db: str | None,
        token: str | None,
        synchronous: str,
        max_body_bytes: int,
        allowed_hosts: Sequence[str] = (),
        retire_after: float | None = None,
        init: bool = False,
        leader_ttl: float = LEADER_TTL,
        advertise_url: str | None = None,
        operator_token: str | None = None,
        strict_identity: bool = False,
        grace: float = GRACE,
    ) -> None:
        from klock_async.channel import ChannelHub

        self.db = db
        self.replicated = is_postgres_url(db)  # one of several replicas on PostgreSQL
        self.leader_ttl = leader_ttl
        self._advertise = advertise_url
        self._listening: asyncio.Future[None] | None = None  # done once the socket listens
        self.lease: LeaderLease | None = None
        self._pg_journal: PostgresJournal | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self.identities = Identities(operator_token=operator_token, strict=strict_identity)
        self.journal: BufferedJournal | None = None  # the journal the kernel runs on, if any
        self.channel = ChannelHub(self, grace)
        self.origin_guard = validation.OriginGuard(allowed_hosts)
        self.retire_after = retire_after
        self.init = init
        self.dead: str | None = None  # why the kernel stopped by itself
        self.on_dead: Callable[[str], None] | None = None
        self.routes: list[tuple[str, str]] = []
        # agent id -> loop time of the last request that named it, least recent first
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._retire_timer: asyncio.TimerHandle | None = None
        self.token = token
        self.synchronous = synchronous
        self.max_body_bytes = max_body_bytes
        self.http = _HttpMetrics()
        self.prometheus = Metrics(self.http, _BUCKETS)
        self.arrivals = _Arrivals()
        # Pending long-polls by client request id, and ids withdrawn before they arrived.
        self._polls: dict[str, asyncio.Task[Any]] = {}
        self._poll_agents: dict[str, str] = {}  # request id -> credentialed agent it waits for
        self._withdrawn: OrderedDict[str, None] = OrderedDict()
        self._withdrawn_bytes = 0
        self._scheduler: Scheduler | None = None
        self._closing: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        self._closing = loop.create_future()
        self._listening = loop.create_future()
        if self._advertise is not None:
            self._listening.set_result(None)
        if self.replicated:
            async with self._replica():
                yield
            return
        journal = None
        if self.db is not None:
            from klock_async.journal import SqliteJournal

            journal = SqliteJournal(self.db, synchronous=self.synchronous, init=self.init)
        watcher = await self._start_kernel(journal)
        try:
            yield
        finally:
            self.begin_shutdown()
            await self._stop_kernel(watcher)

    async def _start_kernel(self, journal: Journal | None) -> asyncio.Task[None]:
        """Start the scheduler on ``journal``; return the task that watches it."""
        scheduler = Scheduler(journal=journal)
        scheduler.event_buffer.retain()  # GET /events resumes from it
        await scheduler.start()
        self._scheduler = scheduler
        if isinstance(journal, BufferedJournal):
            # The journal keeps the credentials' digests and the client sessions too.
            self.journal = journal
            for agent_id, stored in journal.credentials().items():
                self.identities.add(agent_id, stored)
            # Each recovered client session gets one grace period to come back.
            self.channel.sessions.recover(journal.client_sessions())
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(self._watch_kernel(scheduler))
        stats = await scheduler.statistics()
        if self.retire_after is not None:
            now = loop.time()
            for agent in await scheduler.agents():
                self._seen[agent.agent_id] = now
            self._arm_retirement()
        get_logger().info(
            "server.started",
            db=None if self.db is None else redact(self.db),
            generation=getattr(journal, "generation", None),
            agents=stats.agents,
            leases_active=stats.leases_active,
            auth=self.token is not None,
            credentialed_agents=self.identities.count,
            operator=self.identities.has_operator,
            strict_identity=self.identities.strict,
        )
        return watcher

    async def _stop_kernel(self, watcher: asyncio.Task[None] | None) -> None:
        self.channel.sessions.close()
        if self._retire_timer is not None:
            self._retire_timer.cancel()
        if watcher is not None:
            watcher.cancel()
        if self._scheduler is not None:
            await self._scheduler.aclose()
        get_logger().info("server.stopped")

    # ------------------------------------------------------------ replicas (PostgreSQL)

    def listening(self, url: str) -> None:
        """The server accepts connections at ``url`` (the replica advertises it to clients)."""
        if self._advertise is None:
            self._advertise = url
        if self._listening is not None and not self._listening.done():
            self._listening.set_result(None)

    @contextlib.asynccontextmanager
    async def _replica(self) -> AsyncIterator[None]:
        """Serve as one of several replicas: redirect to the leader until this one leads."""
        assert self.db is not None
        await prepare_schema(self.db, init=self.init)
        loop = asyncio.get_running_loop()
        leading = loop.create_task(self._lead(self.db), name="klock-leader")
        watcher: list[asyncio.Task[None]] = []
        self._watchers = watcher
        try:
            yield
        finally:
            self.begin_shutdown()
            leading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leading
            await self._stop_kernel(watcher[0] if watcher else None)
            journal, lease = self._pg_journal, self.lease
            if journal is not None:
                await journal.aclose()
            if lease is not None and self.dead is None:
                await lease.resign()  # a follower takes over at once
            elif lease is not None:
                await lease.aclose()

    async def _lead(self, db: str) -> None:
        """Campaign for the leader lease, serve while it holds, stop when deposed."""
        try:
            assert self._listening is not None
            await self._listening
            assert self._advertise is not None
            lease = self.lease = LeaderLease(db, advertise=self._advertise, ttl=self.leader_ttl)
            term = await lease.campaign()
            journal = self._pg_journal = PostgresJournal(db, on_wait=_journal_waits)
            await journal.prepare(term)
            self._watchers.append(await self._start_kernel(journal))
            scheduler = self._scheduler
            assert scheduler is not None and scheduler._task is not None
            keeper = asyncio.get_running_loop().create_task(lease.keep())
            try:
                await asyncio.wait((keeper, scheduler._task), return_when="FIRST_COMPLETED")
            finally:
                keeper.cancel()
            if keeper.done() and not keeper.cancelled() and self.dead is None:
                journal.close()  # commits nothing from now on
                self._died(
                    f"another replica took over the leadership (this one led in term {term}); "
                    "it committed nothing since and stops: restart it to serve as a follower"
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._died(f"the replica could not lead: {exc}")

    def _died(self, reason: str) -> None:
        if self.dead is not None:
            return
        self.dead = reason
        get_logger().error("server.kernel_died", reason=reason)
        if self.on_dead is not None:
            self.on_dead(reason)

    def not_leader(self) -> NotLeaderError | None:
        """Why this replica does not serve (it follows, or none leads); None: it leads."""
        if not self.replicated or (self._scheduler is not None and self.dead is None):
            return None
        lease = self.lease
        leader = None if lease is None else lease.leader
        if leader == self._advertise:
            leader = None  # this replica itself, deposed or not yet serving
        if leader is None:
            return NotLeaderError(
                "no replica leads at the moment (an election is under way); retry shortly",
                leader=None,
            )
        return NotLeaderError(
            f"this replica does not lead; send the request to the leader at {leader}",
            leader=leader,
        )

    def not_leading(self, scope: Scope) -> Response | None:
        """A follower's answer: a redirect to the leader, or 503 while none leads."""
        error = self.not_leader()
        if error is None:
            return None
        leader = error.leader
        if leader is None:
            return _error_response(error)
        if scope["path"] == "/health":
            return _error_response(error)  # load balancers: only the leader is healthy
        response = _error_response(error, 307)
        query = scope.get("query_string", b"").decode("latin-1")
        response.headers["location"] = leader + scope["path"] + (f"?{query}" if query else "")
        return response

    async def _watch_kernel(self, scheduler: Scheduler) -> None:
        """Report a kernel that stopped by itself (a failed disk, a bug): the process must end."""
        actor = scheduler._task  # the actor task of the scheduler this API started
        assert actor is not None
        await asyncio.wait((actor,))
        closing = self._closing
        if closing is not None and closing.done():
            return  # a shutdown we asked for
        self._died(str(scheduler.failure or "the scheduler stopped on an unexpected error"))

    # ------------------------------------------------------------ agent retirement

    def touch(self, agent_id: str) -> None:
        """Note a request naming ``agent_id`` (it is not idle)."""
        if self.retire_after is not None:
            seen = self._seen
            seen[agent_id] = asyncio.get_running_loop().time()
            seen.move_to_end(agent_id)
            self._arm_retirement()

    def _arm_retirement(self) -> None:
        if self._retire_timer is not None or not self._seen or self.retire_after is None:
            return
        loop = asyncio.get_running_loop()
        due = next(iter(self._seen.values())) + self.retire_after
        self._retire_timer = loop.call_at(due, lambda: loop.create_task(self._retire_due()))

    async def _retire_due(self) -> None:
        self._retire_timer = None
        with contextlib.suppress(KlockError):
            await self.retire_idle(asyncio.get_running_loop().time())
        self._arm_retirement()

    async def retire_idle(self, now: float) -> tuple[str, ...]:
        """Retire the agents no request named for ``retire_after`` seconds before ``now``.

        The kernel keeps those that hold a lease or wait; they count as seen ``now``.
        """
        assert self.retire_after is not None
        cutoff = now - self.retire_after
        due = []
        for agent_id, seen in self._seen.items():
            if seen > cutoff:
                break
            due.append(agent_id)
        if not due:
            return ()
        retired = await self.backend.retire_idle_agents(due)
        for agent_id in retired:
            self._seen.pop(agent_id, None)
        gone = [agent_id for agent_id in retired if self.identities.credentialed(agent_id)]
        if gone:  # a retired agent's id is free again, for anyone
            self.identities.forget(gone)  # the journal dropped their digests with them
        self.channel.sessions.forget(retired)  # and bound to no client session
        for agent_id in set(due) - set(retired):
            if agent_id in self._seen:  # busy: idle again from now on at the earliest
                self._seen[agent_id] = now
                self._seen.move_to_end(agent_id)
        return retired

    def begin_shutdown(self) -> None:
        """End pending long-polls (they answer 503 ``kernel_closed``); new ones are refused."""
        closing = self._closing
        if closing is not None and not closing.done():
            closing.set_result(None)
        self.channel.begin_shutdown()
        if self._scheduler is not None:
            self._scheduler.event_buffer.close()  # ends the /events streams

    @property
    def backend(self) -> Scheduler:
        if self.dead is not None:
            raise KernelClosedError(f"the kernel stopped: {self.dead}; the server is exiting")
        scheduler = self._scheduler
        if scheduler is None:
            raise KernelClosedError("the server is not running yet (or any more)")
        return scheduler

    def too_large(self) -> BodyTooLargeError:
        return BodyTooLargeError(
            f"request body larger than {self.max_body_bytes} bytes; split the request"
        )

    # ------------------------------------------------------------ plumbing

    async def _body(self, request: Request, *, required: bool = True) -> dict[str, Any]:
        """Read the body and check it against its route's declaration (validation.BODIES).

        ``required`` is the route's own declaration; it stays for readability at call sites.
        """
        chunks = []
        size = 0
        receive = request.receive
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientGone()  # disconnected before the body was complete
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self.too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        declared = validation.BODIES[request.scope["klock.route"]]
        assert declared.optional is not required, request.scope["klock.route"]
        return validation.parse_body(raw, request.headers.get("content-type"), declared)

    async def _long_poll(
        self, request: Request, call: Callable[[], Awaitable[T]], *, give_back: bool = True
    ) -> T:
        """Run a call that may wait long; withdraw it when the client leaves or we shut down.

        The call runs in a child task whose first step marks the request as arrived and posts
        it to the scheduler, so ``POST /sync`` can order itself after it. A grant that crossed
        the client's leaving is given back, unless ``give_back`` is false (a keyed acquire: its
        resend is answered with that grant).
        """
        closing = self._closing
        if closing is None or closing.done():
            raise KernelClosedError("the server is shutting down; retry against its successor")
        request_id = request.headers.get(self.REQUEST_ID_HEADER)
        if request_id is not None and request_id in self._withdrawn:
            raise _ClientGone()  # withdrawn before it arrived

        async def posted() -> T:
            if request_id is not None:
                self.arrivals.arrived(request_id)
            return await call()

        loop = asyncio.get_running_loop()
        work = loop.create_task(posted())
        gone = loop.create_task(_disconnected(request.receive))
        if request_id is not None:
            self._polls[request_id] = work
        self.http.long_polls += 1
        first: asyncio.Future[None] = loop.create_future()

        def wake(_: object) -> None:
            if not first.done():
                first.set_result(None)

        work.add_done_callback(wake)
        gone.add_done_callback(wake)
        closing.add_done_callback(wake)
        try:
            await first
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            self.http.long_polls -= 1
            closing.remove_done_callback(wake)  # the server-wide future outlives this request
            gone.cancel()
            if request_id is not None:
                self._polls.pop(request_id, None)
        if work.cancelled():
            raise _ClientGone()  # withdrawn by POST /withdraw
        if work.done():
            if gone.done() and not gone.cancelled() and work.exception() is None and give_back:
                await self._give_back(work.result())  # granted just as the client left
            return work.result()
        work.cancel()
        await asyncio.wait((work,))  # the scheduler has the withdrawal once the call ended
        if not work.cancelled() and work.exception() is None and give_back:
            await self._give_back(work.result())  # granted while being withdrawn
        if closing.done():
            raise KernelClosedError("the server shut down while the request was waiting")
        raise _ClientGone()

    async def _give_back(self, result: object) -> None:
        infos = result if isinstance(result, tuple) else ()
        for info in infos:
            if isinstance(info, LeaseInfo):
                with contextlib.suppress(KlockError):
                    await self.backend.release(info.id, info.agent_id)

    # ------------------------------------------------------------ identity

    def _caller(self, request: Request) -> Caller:
        """Who sent the request, from its ``Klock-Credential`` and ``Klock-Operator-Token``.

        Raises:
            InvalidCredentialError: a credential that belongs to no agent.
            OperatorRequiredError: a wrong operator token.
        """
        credential = operator = None
        for name, value in request.scope["headers"]:
            if name == b"klock-credential":
                credential = value.decode("latin-1")
            elif name == b"klock-operator-token":
                operator = value.decode("latin-1")
        if credential is None and operator is None:
            return ANONYMOUS
        return self.identities.caller(credential, operator)

    _OPERATOR_ACTS = frozenset(
        (Action.RELEASE, Action.SESSION_RELEASE, Action.REVOKE, Action.EVICT)
    )  # what the operator may do for an agent of any client session

    def _authorize(self, request: Request, action: Action, agent_id: str) -> Caller:
        caller = self._caller(request)
        self.identities.authorize(action, agent_id, caller)
        if caller.agent_id != agent_id and not (caller.operator and action in self._OPERATOR_ACTS):
            self.channel.sessions.check(agent_id, None)
        return caller

    def _check_client(self, request: Request, agent_id: str | None) -> None:
        """Refuse a request for an agent without a credential of a client session (identity
        checked agents with one already)."""
        if agent_id is not None and not self.identities.credentialed(agent_id):
            self.channel.sessions.check(agent_id, None)

    async def _holder(self, lease_id: str) -> str | None:
        """The agent holding an active lease; None when it is not active."""
        for info in await self.backend.leases():
            if info.id == lease_id:
                return info.agent_id
        return None

    async def _acting_agent(
        self, request: Request, action: Action, lease_id: str, declared: str | None
    ) -> str | None:
        """Check a request on a lease by id; return the agent id the scheduler must check
        the holder against (None: any holder, as for Klock v1 clients).

        A lease id is no capability for an agent with a credential: the request must carry
        that credential (or, to release, the operator token).
        """
        caller = self._caller(request)
        identities = self.identities
        if caller.agent_id is not None:
            if declared is not None and declared != caller.agent_id:
                identities.authorize(action, declared, caller)  # refused: not its agent
            return caller.agent_id  # the scheduler refuses another holder's lease
        if caller.operator and action is Action.RELEASE:
            return declared
        if declared is not None:
            identities.authorize(action, declared, caller)
            return declared
        if not identities.checks_leases:
            return None  # no agent has a credential: the v1 rules
        holder = await self._holder(lease_id)
        if holder is not None:
            identities.authorize(action, holder, caller)
        return holder

    # ------------------------------------------------------------ endpoints

    async def health(self, request: Request) -> Response:
        stats = await self.backend.statistics()
        return _ok({"status": "ok", "active_leases": stats.leases_active})

    async def metrics(self, request: Request) -> Response:
        stats = await self.backend.statistics()
        clocks = await self.backend.clock_status()
        return self.prometheus.response(stats, clocks.conflict_count, self.backend.event_buffer)

    async def events(self, request: Request) -> Response:
        return events_response(request, self.backend.event_buffer)

    async def page(self, request: Request) -> Response:
        return page_response()

    async def statistics(self, request: Request) -> Response:
        return _ok(_statistics_json(await self.backend.statistics()))

    async def waiters(self, request: Request) -> Response:
        return _ok({"waiters": [_waiter_json(w) for w in await self.backend.waiters()]})

    async def openapi(self, request: Request) -> Response:
        from klock_async import __version__

        return _JSONResponse(_dumps(validation.openapi(self.routes, version=__version__)))

    async def register_agent(self, request: Request) -> Response:
        body = await self._body(request)
        agent_id = _text(body, "agent_id")
        priority = validation.priority(body)
        wants = _flag(body, "credential", False)
        caller = self._caller(request)
        identities = self.identities
        exists = False
        if wants and caller.agent_id is None and not identities.credentialed(agent_id):
            exists = await self.backend.agent(agent_id) is not None
        issue = identities.authorize_registration(
            agent_id, caller, wants_credential=wants, priority=priority, exists=exists
        )
        if caller.agent_id != agent_id:  # an agent without a credential of a client session
            self.channel.sessions.check(agent_id, None)
        if not issue:
            info = await self.backend.register_agent(agent_id, priority)
            self.touch(agent_id)
            data = _agent_json(info)  # the v1 shape, unless the agent has a credential
            if identities.credentialed(agent_id):
                data["credentialed"] = True
            return _ok(data)
        secret = new_credential()
        stored = digest(secret)
        identities.add(agent_id, stored)  # taken now: a concurrent registration is refused
        journal = self.journal
        if journal is not None:  # in the commit of the registration, before the answer
            journal.record_credential(agent_id, stored)
        try:
            info = await self.backend.register_agent(agent_id, priority)
        except BaseException:
            identities.forget((agent_id,))
            if journal is not None:
                journal.record_credential(agent_id, None)
            raise
        self.touch(agent_id)
        get_logger().info("agent.credential_issued", agent=agent_id)
        return _ok({**_agent_json(info), "credentialed": True, "credential": secret})

    async def list_agents(self, request: Request) -> Response:
        """One page of the agents, oldest first; ``next`` is the cursor of the following page."""
        query = request.query_params
        limit = validation.query_int(query.get("limit"), "limit", 1, validation.MAX_PAGE, _PAGE)
        after = _agent_cursor(query.get("after"))
        agents = sorted((await self.backend.agents()), key=lambda a: (a.ts, a.id))
        start = 0 if after is None else bisect.bisect_right(agents, after, key=_agent_key)
        page = agents[start : start + limit]
        more = start + limit < len(agents)
        cursor = f"{page[-1].ts}:{page[-1].id}" if more else None
        return _paged([_agent_json(info) for info in page], cursor)

    async def acquire(self, request: Request) -> Response:
        body = await self._body(request)
        agent_id = _name(body, "agent_id")
        self._authorize(request, Action.ACQUIRE, agent_id)
        session_id = session_of(body)
        intent = _intent(body, "the request", alone=False)
        infos = await self._acquire(request, body, agent_id, session_id, (intent,))
        return _ok(_lease_json(infos[0]))

    async def declare_intents(self, request: Request) -> Response:
        body = await self._body(request)
        agent_id = _name(body, "agent_id")
        self._authorize(request, Action.ACQUIRE, agent_id)
        session_id = session_of(body)
        intents = _intents(body)
        infos = await self._acquire(request, body, agent_id, session_id, intents)
        return _ok(
            {
                "agent_id": agent_id,
                "session_id": session_id,
                "status": "Granted",
                "conflicts": [],
                "leases": [_lease_json(info) for info in infos],
            }
        )

    async def _acquire(
        self,
        request: Request,
        body: Mapping[str, Any],
        agent_id: str,
        session_id: str,
        intents: tuple[Intent, ...],
    ) -> tuple[LeaseInfo, ...]:
        call, wait, timeout = self.acquire_call(body, agent_id, session_id, intents)
        self._check_client(request, agent_id)
        self.touch(agent_id)
        if wait and timeout == 0:
            return await self._decided_now(call, agent_id, intents)
        if wait:
            # A keyed acquire granted as its connection closed keeps the grant for its resend.
            give_back = body.get("request_key") is None
            request_id = request.headers.get(self.REQUEST_ID_HEADER)
            if request_id is None or not self.identities.credentialed(agent_id):
                return await self._long_poll(request, call, give_back=give_back)
            self._poll_agents[request_id] = agent_id  # only this agent may withdraw it
            try:
                return await self._long_poll(request, call, give_back=give_back)
            finally:
                self._poll_agents.pop(request_id, None)
        return await call()

    def acquire_call(
        self,
        body: Mapping[str, Any],
        agent_id: str,
        session_id: str,
        intents: tuple[Intent, ...],
    ) -> tuple[Callable[[], Awaitable[tuple[LeaseInfo, ...]]], bool, float | None]:
        """Parse the options every acquire has (REST and channel alike) and bind the kernel
        call; return it with the request's ``wait`` and ``timeout``.

        Raises:
            InvalidRequestError: a bad option; nothing changed.
        """
        ttl = _ttl(body)
        assert ttl is not None
        wait = _flag(body, "wait", False)
        timeout = _timeout(body)
        isolation = _isolation(body)
        agent_view = _flag(body, "agent_view", False)
        request_key = _request_key(body)
        backend = self.backend
        # No time to wait: decided now by _decided_now, which withdraws it if queued; a timer
        # of zero would be used up by the journal's commit alone.
        kernel_timeout = None if wait and timeout == 0 else timeout

        def call() -> Awaitable[tuple[LeaseInfo, ...]]:
            return backend.acquire(
                agent_id,
                session_id,
                intents,
                ttl=ttl,
                wait=wait,
                timeout=kernel_timeout,
                isolation=isolation,
                agent_view=agent_view,
                request_key=request_key,
            )

        return call, wait, timeout

    async def _decided_now(
        self,
        call: Callable[[], Awaitable[tuple[LeaseInfo, ...]]],
        agent_id: str,
        intents: tuple[Intent, ...],
    ) -> tuple[LeaseInfo, ...]:
        """A waiting acquire with no time to wait: granted or refused now, else withdrawn.

        The acquire is posted, then a query behind it; the scheduler answers in order, so once
        the query is answered the acquire was decided, and if it is still pending it was
        queued. Without this, the journal's commit alone would use up a zero timeout.

        Raises:
            AcquireTimeoutError: the request would have had to wait.
        """

        async def acquire() -> tuple[LeaseInfo, ...]:
            return await call()

        loop = asyncio.get_running_loop()
        work: asyncio.Task[tuple[LeaseInfo, ...]] = loop.create_task(acquire())
        await loop.create_task(self.backend.statistics())  # posted after the acquire
        if not work.done():
            work.cancel()  # withdraws it (and gives back a grant made meanwhile)
            await asyncio.wait((work,))
            if work.cancelled():
                raise AcquireTimeoutError(
                    f"agent {agent_id!r} waited 0s for "
                    f"{', '.join(f'{i.predicate.value} {i.resource}' for i in intents)} and "
                    "gave up; nothing is held. Retry later or raise the timeout."
                )
        return work.result()

    async def release(self, request: Request) -> Response:
        body = await self._body(request, required=False)
        lease_id = _path_lease_id(request, body)
        declared = _query_agent(request, body)
        given = "record_write" in request.query_params or body.get("record_write") is not None
        record_write = _query_flag(request, "record_write", body) if given else None
        agent_id = await self._acting_agent(request, Action.RELEASE, lease_id, declared)
        self._check_client(request, agent_id)
        info = await self.backend.release(lease_id, agent_id, record_write=record_write)
        self.touch(info.agent_id)
        return _ok({"released": True, **_lease_json(info)})

    async def heartbeat(self, request: Request) -> Response:
        body = await self._body(request, required=False)
        lease_id = _path_lease_id(request, body)
        declared = _query_agent(request, body)
        ttl = _ttl(body, default_ms=None)
        agent_id = await self._acting_agent(request, Action.HEARTBEAT, lease_id, declared)
        self._check_client(request, agent_id)
        info = await self.backend.heartbeat(lease_id, agent_id, ttl)
        self.touch(info.agent_id)
        return _ok(_lease_json(info))

    async def wait_ended(self, request: Request) -> Response:
        body = await self._body(request, required=False)
        timeout = _timeout(body)
        lease_id = _path_lease_id(request, body)
        backend = self.backend
        ended = await self._long_poll(request, lambda: backend.wait_ended(lease_id, timeout))
        return _ok(
            {"ended": ended is not None, "lease": None if ended is None else _lease_json(ended)}
        )

    async def revoke(self, request: Request) -> Response:
        body = await self._body(request, required=False)
        lease_id = _path_lease_id(request, body)
        caller = self._caller(request)
        identities = self.identities
        if not caller.operator and (
            identities.has_operator or identities.checks_leases or caller.agent_id is not None
        ):
            holder = await self._holder(lease_id)
            if holder is not None:
                identities.authorize(Action.REVOKE, holder, caller)
        info = await self.backend.revoke(lease_id)
        return _ok(_lease_json(info))

    async def list_leases(self, request: Request) -> Response:
        """One page of the active leases, oldest token first; ``next`` is the next cursor."""
        query = request.query_params
        limit = validation.query_int(query.get("limit"), "limit", 1, validation.MAX_PAGE, _PAGE)
        after = validation.query_int(query.get("after"), "after", 0, 2**63 - 1, 0)
        agent_id = _query_id(query.get("agent_id"), "agent_id")
        session_id = _query_id(query.get("session_id"), "session_id")
        leases = sorted(
            (
                info
                for info in await self.backend.leases()
                if info.token > after
                and (agent_id is None or info.agent_id == agent_id)
                and (session_id is None or info.session_id == session_id)
            ),
            key=lambda lease: lease.token,
        )
        page = leases[:limit]
        cursor = str(page[-1].token) if len(leases) > limit else None
        return _paged([_lease_json(info) for info in page], cursor)

    async def release_session(self, request: Request) -> Response:
        body = await self._body(request)
        agent_id = _text(body, "agent_id")
        session_id = _text(body, "session_id")
        self._authorize(request, Action.SESSION_RELEASE, agent_id)
        count = await self.backend.release_session(agent_id, session_id)
        self.touch(agent_id)
        return _ok({"agent_id": agent_id, "session_id": session_id, "released": count})

    async def evict(self, request: Request) -> Response:
        body = await self._body(request, required=False)
        agent_id = _optional_text(body, "agent_id")
        if agent_id is None:
            # Klock v1 "evict expired": this kernel ends leases on their deadline already.
            return _ok({"evicted": 0})
        self._authorize(request, Action.EVICT, agent_id)
        count = await self.backend.evict(agent_id)
        return _ok({"agent_id": agent_id, "evicted": count})

    async def clock_read(self, request: Request) -> Response:
        body = await self._body(request)
        path = _name(body, "path", validation.MAX_PATH_CHARS)
        agent_id = _name(body, "agent_id")
        self._authorize(request, Action.CLOCK, agent_id)
        clock = await self.backend.clock_read(path, agent_id)
        self.touch(agent_id)
        # Answer the tracked name (TYPE:normalised/path); the scheduler accepted the path.
        return _ok(_clock_json(str(Resource.parse(path)), clock))

    async def clock_write(self, request: Request) -> Response:
        body = await self._body(request)
        path = _name(body, "path", validation.MAX_PATH_CHARS)
        agent_id = _name(body, "agent_id")
        strict = _flag(body, "strict", True)
        self._authorize(request, Action.CLOCK, agent_id)
        clock = await self.backend.clock_write(path, agent_id, strict=strict)
        self.touch(agent_id)
        return _ok(_clock_json(str(Resource.parse(path)), clock))

    async def clock_status(self, request: Request) -> Response:
        status = await self.backend.clock_status()
        return _ok(
            {"tracked_paths": list(status.tracked_paths), "conflict_count": status.conflict_count}
        )

    async def withdraw(self, request: Request) -> Response:
        body = await self._body(request)
        request_id = _text(body, "request_id")
        owner = self._poll_agents.get(request_id)
        if owner is not None:
            self._authorize(request, Action.ACQUIRE, owner)
        work = self._polls.get(request_id)
        if work is not None:
            # Cancelling the call makes the scheduler withdraw it (and give back a grant it
            # made in the same instant); once awaited, that withdrawal is in its mailbox.
            work.cancel()
            await asyncio.wait((work,))
            return _ok({"request_id": request_id, "withdrawn": work.cancelled()})
        if request_id in self.arrivals:
            return _ok({"request_id": request_id, "withdrawn": False})  # answered already
        self._remember_withdrawn(request_id)
        return _ok({"request_id": request_id, "withdrawn": True})

    async def hook(self, request: Request) -> Response:
        from klock_async.hooks import answer_http

        body = await self._body(request)
        harness = request.url.path.rsplit("/", 1)[1]
        backend = self.backend
        query = request.query_params
        caller = self._caller(request)
        identities = self.identities
        sessions = self.channel.sessions

        def authorize(agent_id: str) -> None:
            # A hook acts for its session's agent with the bearer token alone: never for an
            # agent with a credential, or one a client session registered.
            if identities.strict:
                raise StrictIdentityError(
                    "coding-agent hooks act for agents without a credential (their session "
                    "ids), which this server refuses (--strict-identity); point the hooks at "
                    "a server started without --strict-identity"
                )
            identities.authorize(Action.ACQUIRE, agent_id, caller)
            sessions.check(agent_id, None)

        form, answer = await self._long_poll(
            request, lambda: answer_http(backend, harness, query, body, authorize)
        )
        return _ok(answer) if form == "command" else _JSONResponse(_dumps(answer))

    WITHDRAWN_KEEP: ClassVar[int] = 4096
    """Most ids withdrawn before they arrived that the server remembers (oldest forgotten)."""
    WITHDRAWN_BYTES: ClassVar[int] = 1 << 20
    """Most characters of such ids it remembers, all together."""

    def _remember_withdrawn(self, request_id: str) -> None:
        withdrawn = self._withdrawn
        if request_id in withdrawn:
            return
        withdrawn[request_id] = None
        self._withdrawn_bytes += len(request_id)
        while len(withdrawn) > self.WITHDRAWN_KEEP or self._withdrawn_bytes > self.WITHDRAWN_BYTES:
            oldest, _ = withdrawn.popitem(last=False)
            self._withdrawn_bytes -= len(oldest)

    async def sync(self, request: Request) -> Response:
        body = await self._body(request, required=False)
        ids = validation.id_list(body, "requests", validation.MAX_SYNC_REQUESTS)
        timeout = _timeout(body)
        try:
            async with asyncio.timeout(30.0 if timeout is None else timeout):
                await self.arrivals.wait(ids)
        except TimeoutError:
            raise InvalidFieldError(
                "some listed requests never reached the server (sent elsewhere, or failed "
                "before sending)"
            ) from None
        return _ok(_statistics_json(await self.backend.statistics()))


def _journal_waits(exc: BaseException) -> None:
    get_logger().warning(
        "journal.waiting",
        error=str(exc) or type(exc).__name__,
        hint="the database cannot be reached; requests wait until it is back",
    )


def _clock_json(path: str, clock: VectorClock) -> dict[str, Any]:
    return {"path": path, "clock": clock.as_dict()}


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _endpoint(
    handler: Callable[[Request], Awaitable[Response]], arrivals: _Arrivals
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except KlockError as error:
            response = _error_response(error)
        except _ClientGone:
            response = _error_response(
                _RouteError(
                    "the request was withdrawn (its client left or withdrew it)",
                    code="withdrawn",
                    status=499,
                )
            )
        # A request refused before it reached the scheduler (bad input, say) is done with
        # too: a barrier that lists it must not wait for it.
        request_id = request.headers.get(_Api.REQUEST_ID_HEADER)
        if request_id is not None:
            arrivals.arrived(request_id)
        return response

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _error_response(
            _RouteError(
                f"{request.method} is not allowed on {request.url.path}",
                code="method_not_allowed",
                status=405,
            )
        )
    return _error_response(
        _RouteError(
            f"no endpoint {request.method} {request.url.path}; see docs/server.md",
            code="not_found",
            status=exc.status_code,
        )
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    get_logger().error("server.error", path=request.url.path, error=repr(exc))
    return _error_response(
        _RouteError("internal server error; see the server log", code="internal", status=500)
    )


def create_app(
    *,
    db: str | None = None,
    token: str | None = None,
    synchronous: str = "FULL",
    max_body_bytes: int = MAX_BODY_BYTES,
    allowed_hosts: Sequence[str] = (),
    retire_after: float | None = None,
    init: bool = False,
    leader_ttl: float = LEADER_TTL,
    advertise_url: str | None = None,
    operator_token: str | None = None,
    strict_identity: bool = False,
    grace: float = GRACE,
) -> Starlette:
    """Build the ASGI app: one scheduler, started and stopped with the app's lifespan.

    Args:
        db: SQLite journal path, or a ``postgresql://`` URL shared by replicas of which one
            leads (see :mod:`klock_async.leader`); None keeps state in memory only.
        token: when set, every request except ``GET /health`` needs
            ``Authorization: Bearer <token>``.
        synchronous: journal durability, ``"FULL"`` or ``"NORMAL"`` (see
            :class:`~klock_async.journal.SqliteJournal`).
        max_body_bytes: larger request bodies are refused with 413.
        allowed_hosts: host names served on top of the loopback ones (``Host`` header);
            ``"*"`` serves any.
        retire_after: seconds after which an agent with no lease, no waiting request and no
            request naming it is forgotten; None keeps agents for ever.
        init: make a journal of an existing ``db`` file that is empty or has no journal
            tables (otherwise refused).
        leader_ttl: with a PostgreSQL ``db``: seconds the leader lease lasts unrenewed.
        advertise_url: with a PostgreSQL ``db``: the URL clients reach this replica at
            (default: the address it listens on).
        operator_token: the secret of operator actions (``Klock-Operator-Token`` header):
            revoke, evict, explicit priorities, acting on another agent's leases; distinct
            from ``token``. None: no operator (see the threat model in docs/server.md).
        strict_identity: refuse agents registered without a credential.
        grace: seconds a client session outlives its channel (or last REST heartbeat)
            before its requests are withdrawn and its leases released; clients may ask
            for less.

    Raises:
        ValueError: ``max_body_bytes`` is not positive, ``token`` or ``operator_token`` is
            empty, or the two tokens are the same.
    """
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes!r}")
    if token is not None and not token:
        raise ValueError("an empty token would let anyone in; pass None for no auth")
    if operator_token is not None and (not operator_token or operator_token == token):
        raise ValueError(
            "the operator token must be a non-empty secret distinct from the agents' token"
        )
    if retire_after is not None and not 0 < retire_after < math.inf:
        raise ValueError(f"retire_after must be a positive number of seconds, got {retire_after!r}")
    if not 0 < grace < math.inf:
        raise ValueError(f"grace must be a positive number of seconds, got {grace!r}")
    api = _Api(
        db=db,
        token=token,
        synchronous=synchronous,
        max_body_bytes=max_body_bytes,
        allowed_hosts=allowed_hosts,
        retire_after=retire_after,
        init=init,
        leader_ttl=leader_ttl,
        advertise_url=advertise_url,
        operator_token=operator_token,
        strict_identity=strict_identity,
        grace=grace,
    )
    table: list[tuple[str, str, Endpoint]] = [
        ("GET", "/", api.page),
        ("GET", "/health", api.health),
        ("GET", "/events", api.events),
        ("GET", "/metrics", api.metrics),
        ("GET", "/statistics", api.statistics),
        ("GET", "/waiters", api.waiters),
        ("POST", "/agents", api.register_agent),
        ("GET", "/agents", api.list_agents),
        ("POST", "/leases", api.acquire),
        ("GET", "/leases", api.list_leases),
        ("DELETE", "/leases/{lease_id}", api.release),
        ("POST", "/leases/{lease_id}/heartbeat", api.heartbeat),
        ("POST", "/leases/{lease_id}/wait", api.wait_ended),
        ("POST", "/leases/{lease_id}/revoke", api.revoke),
        ("POST", "/intents", api.declare_intents),
        ("POST", "/sessions/release", api.release_session),
        ("POST", "/evict", api.evict),
        ("GET", "/clocks", api.clock_status),
        ("POST", "/clocks/read", api.clock_read),
        ("POST", "/clocks/write", api.clock_write),
        ("POST", "/sync", api.sync),
        ("POST", "/withdraw", api.withdraw),
        ("POST", "/clients", api.channel.rest_open),
        ("POST", "/clients/heartbeat", api.channel.rest_heartbeat),
        ("POST", "/clients/close", api.channel.rest_close),
        ("POST", "/clients/agents", api.channel.rest_register),
        ("POST", "/hooks/claude-code", api.hook),
        ("POST", "/hooks/gemini-cli", api.hook),
        ("GET", "/openapi.json", api.openapi),
    ]
    api.routes = [(method, path) for method, path, _ in table]
    table = [(method, path, _endpoint(handler, api.arrivals)) for method, path, handler in table]
    routes: list[BaseRoute] = [
        Route(path, endpoint, methods=[method]) for method, path, endpoint in table
    ]
    app = Starlette(
        routes=routes,
        lifespan=api.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    app.add_middleware(_FrontDoor, api=api, table=table)
    app.state.klock = api
    return app


# --------------------------------------------------------------------------------------------
# Running it.


class Server(uvicorn.Server):
    """A uvicorn server that says when it accepts connections and ends long-polls on exit.

    Args:
        config: the uvicorn configuration; its app is one built by :func:`create_app`.
        on_ready: called with the base URL once the socket accepts connections.
    """

    def __init__(
        self, config: uvicorn.Config, *, on_ready: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self.url: str | None = None
        self.failure: str | None = None
        """Why the kernel stopped by itself; the process then exits with status 3."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start the app and listen; then announce the URL."""
        await super().startup(sockets=sockets)
        if self.should_exit:
            return
        api = getattr(getattr(self.config.app, "state", None), "klock", None)
        if isinstance(api, _Api):
            api.on_dead = self._kernel_died
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        if isinstance(api, _Api):
            api.listening(self.url)
        get_logger().info("server.ready", url=self.url)
        if self._on_ready is not None:
            self._on_ready(self.url)

    def _kernel_died(self, reason: str) -> None:
        self.failure = reason
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End pending long-polls first, so a graceful shutdown does not wait for them."""
        app = self.config.app
        api = getattr(getattr(app, "state", None), "klock", None)
        if isinstance(api, _Api):
            api.begin_shutdown()
            await api.channel.drained()  # channels' last answers go out before they close
        await super().shutdown(sockets=sockets)


READ_TIMEOUT = 10.0
"""Seconds a client has to send a whole request (headers and body) once it connects or
starts one; then the connection is closed."""
KEEP_ALIVE = 5.0
"""Seconds an idle keep-alive connection stays open between requests."""
MAX_CONNECTIONS = 1000
PING_INTERVAL = 1.0
"""Seconds between the server's pings on a channel; one unanswered for as long closes it."""
"""Most connections open at once; more are answered 503 and closed at once."""

_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def _full_response(limit: int) -> bytes:
    body = _dumps(
        {
            "success": False,
            "data": None,
            "error": f"the server has {limit} connections open, its limit; retry shortly",
            "code": "too_many_connections",
            "details": {},
        }
    )
    return _FULL % (len(body), body)


_Address = tuple[Any, ...]
_GUARDS: dict[tuple[_Address | None, _Address | None], _ConnectionGuard] = {}
"""The guard of every open connection of this process, by (server address, client address):
the ASGI scope's ``server`` and ``client``, so the front door can find its connection."""


def _address(info: Any) -> _Address | None:
    """An address as the ASGI scope gives it: (host, port)."""
    if isinstance(info, list | tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


class _ConnectionGuard(asyncio.Protocol):
    """uvicorn's own HTTP protocol, held (not subclassed), with a read timeout and a limit.

    uvicorn takes any ``asyncio.Protocol`` class as its ``http`` setting and builds it with
    its keyword arguments; this one builds uvicorn's automatic choice (httptools when
    installed, else h11) with the same arguments and hands it every event of the transport,
    and the transport itself behind :class:`_CorkedWrites`.

    On top it closes a connection that does not deliver a whole request within
    ``read_timeout`` of opening or of its previous response (uvicorn times out only idle
    keep-alive connections, and restarts that timer on any byte: a client that never finishes
    its headers, or sends a byte now and then, would hold its socket for ever), and answers
    ``503 too_many_connections`` at once past ``max_connections``. The front door tells it
    when a request arrived whole and when its response ended (``_GUARDS``).
    """

    read_timeout: ClassVar[float] = READ_TIMEOUT
    max_connections: ClassVar[int] = MAX_CONNECTIONS
    full: ClassVar[bytes] = b""

    def __init__(self, **options: Any) -> None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        self._inner = AutoHTTPProtocol(**options)
        self._connections: set[Any] = options["server_state"].connections
        self._loop = asyncio.get_running_loop()
        self._transport: Any = None
        self._key: tuple[_Address | None, _Address | None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Requests of this connection the app is handling: the next one may begin (and be
        # long: a long-poll, an event stream) before the app is done with the previous one.
        self._active = 0

    def connection_made(self, transport: Any) -> None:
        self._transport = transport  # uvloop's transports are not asyncio.Transport instances
        self._inner.connection_made(_CorkedWrites(transport, self._loop))
        if len(self._connections) > self.max_connections:
            transport.write(self.full)
            transport.close()
            return
        key = (
            _address(transport.get_extra_info("sockname")),
            _address(transport.get_extra_info("peername")),
        )
        self._key = key
        _GUARDS[key] = self
        self.arm()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self._forget()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def arm(self) -> None:
        """Start counting: a whole request must arrive within ``read_timeout``."""
        if self._timer is None:
            self._timer = self._loop.call_later(self.read_timeout, self._timed_out)

    def request_started(self, scope: Scope, receive: Receive) -> Receive:
        """The headers of a request arrived: stop counting once its body has arrived too."""
        self._active += 1
        for name, value in scope["headers"]:
            if (name == b"content-length" and value != b"0") or name == b"transfer-encoding":
                break
        else:
            self.disarm()  # no body
            return receive

        async def watched() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                self.disarm()
            return message

        return watched

    def request_ended(self) -> None:
        """The app is done with a request: the next one must arrive whole in time too."""
        self._active -= 1
        if self._active == 0:
            self.arm()

    def disarm(self) -> None:
        """A whole request arrived (or the connection ended)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        if transport.get_protocol() is not self:
            # An upgraded connection (a WebSocket): its protocol is another now, which times
            # it and hears of its end; the front door never sees it again.
            self._forget()
        elif not transport.is_closing():
            transport.close()

    def _forget(self) -> None:
        if self._key is not None and _GUARDS.get(self._key) is self:
            del _GUARDS[self._key]


class _CorkedWrites(asyncio.Transport):
    """A transport that sends what is written in one step of the event loop in one write.

    uvicorn writes a response's status line and headers, then its body: two writes, and with
    TCP_NODELAY two segments and two wake-ups of the client. This one keeps the first write
    until the loop's next turn and joins a second one to it. Every method of the public
    ``asyncio.Transport`` interface is passed on explicitly.
    """

    __slots__ = ("_loop", "_pending", "_through", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: bytes | None = None
        # Once upgraded (a WebSocket: its frames are written whole), writes go straight on.
        self._through = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._through:
            self._transport.write(data)
            return
        pending = self._pending
        if pending is None:
            self._pending = bytes(data)
            self._loop.call_soon(self._flush)
        else:
            self._pending = None
            self._transport.write(pending + data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not self._transport.is_closing():
            self._transport.write(pending)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return bool(self._transport.can_write_eof())

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._flush()
        self._through = True  # uvicorn hands an upgraded connection to another protocol
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._transport.get_protocol()
        return protocol

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return bool(self._transport.is_reading())

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return int(self._transport.get_write_buffer_size()) + len(self._pending or b"")

    def get_write_buffer_limits(self) -> tuple[int, int]:
        high, low = self._transport.get_write_buffer_limits()
        return int(high), int(low)


def _guarded_protocol(read_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """The protocol class of one server's settings."""
    return type(
        "ConnectionGuard",
        (_ConnectionGuard,),
        {
            "read_timeout": read_timeout,
            "max_connections": max_connections,
            "full": _full_response(max_connections),
        },
    )


def _channel_protocol(app: ASGIApp) -> type[asyncio.Protocol] | str:
    """uvicorn's ``ws`` setting: the channel's own protocol for an app of :func:`create_app`
    (WebSocket upgrades go to its channel hub, not to the ASGI app)."""
    api = getattr(getattr(app, "state", None), "klock", None)
    if isinstance(api, _Api):
        return api.channel.protocol()
    return "none"


def server_config(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    read_timeout: float = READ_TIMEOUT,
    keep_alive: float = KEEP_ALIVE,
    max_connections: int = MAX_CONNECTIONS,
) -> uvicorn.Config:
    """The uvicorn configuration ``klock serve`` runs ``app`` with.

    No access log (the kernel logs lease events), no proxy headers, long-polls ended within
    5 s of a shutdown, a request read within ``read_timeout`` seconds, idle keep-alive
    connections closed after ``keep_alive`` seconds, and at most ``max_connections`` at once
    (:class:`_ConnectionGuard`).

    Raises:
        ValueError: a timeout or the connection limit is not positive.
    """
    if not (0 < read_timeout < math.inf and 0 < keep_alive < math.inf and max_connections > 0):
        raise ValueError(
            "read_timeout, keep_alive and max_connections must be positive, got "
            f"{read_timeout!r}, {keep_alive!r}, {max_connections!r}"
        )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_guarded_protocol(read_timeout, max_connections),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=max(1, round(keep_alive)),
        proxy_headers=False,
        server_header=False,
        # The session channel (klock_async.channel): pings both ways find a silent peer.
        ws=_channel_protocol(app),
        ws_ping_interval=PING_INTERVAL,
        ws_ping_timeout=PING_INTERVAL,
    )


def _positive(kind: type[float] | type[int], *, zero: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not (value >= 0 if zero else value > 0) or not value < math.inf:
            raise argparse.ArgumentTypeError(
                f"must be {'0 or more' if zero else 'positive'}, got {text}"
            )
        return value

    return parse


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"must start with http:// or https://, got {text!r}")
    return text.rstrip("/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``klock serve``."""
    from klock_async.cli import log_level, nonempty, port, positive_int

    parser.add_argument("--host", default="127.0.0.1", help="interface (default: loopback)")
    parser.add_argument(
        "--port",
        type=port,
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0: any free)",
    )
    parser.add_argument(
        "--db",
        default=None,
        help="SQLite journal file, or a postgresql:// URL shared by replicas (one leads); "
        "without it state is lost",
    )
    parser.add_argument(
        "--leader-ttl",
        type=_positive(float),
        default=LEADER_TTL,
        help="with a postgresql:// --db: seconds the leader lease lasts unrenewed "
        f"(default {LEADER_TTL:g})",
    )
    parser.add_argument(
        "--advertise-url",
        type=_http_url,
        default=None,
        metavar="URL",
        help="with a postgresql:// --db: the URL clients reach this replica at, given to them "
        "by the other replicas (default: the address it listens on)",
    )
    parser.add_argument(
        "--init",
        action="store_true",
        help="make a journal of an existing --db file that is empty or not a journal yet",
    )
    parser.add_argument(
        "--accept-unclosed",
        action="store_true",
        help="start from a --db that a crashed server left without its -wal file (see docs)",
    )
    parser.add_argument(
        "--token",
        type=nonempty,
        default=None,
        help="require 'Authorization: Bearer TOKEN' (default: $KLOCK_TOKEN, else no auth)",
    )
    parser.add_argument(
        "--operator-token",
        type=nonempty,
        default=None,
        help="secret of operator actions (revoke, evict, priorities, another agent's leases), "
        "sent as 'Klock-Operator-Token' (default: $KLOCK_OPERATOR_TOKEN, else no operator)",
    )
    parser.add_argument(
        "--strict-identity",
        action="store_true",
        help="refuse agents registered without a credential (Klock v1 clients)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name clients use to reach this server, on top of the loopback names "
        "(repeatable; '*' for any)",
    )
    parser.add_argument(
        "--sync",
        choices=("full", "normal"),
        default="full",
        help="journal durability: full survives power loss, normal only a process crash",
    )
    parser.add_argument(
        "--max-body",
        type=positive_int,
        default=MAX_BODY_BYTES,
        help="largest request body in bytes",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive(int),
        default=MAX_CONNECTIONS,
        help=f"most connections at once (default {MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--read-timeout",
        type=_positive(float),
        default=READ_TIMEOUT,
        help=f"seconds to send a whole request (default {READ_TIMEOUT:g})",
    )
    parser.add_argument(
        "--keep-alive",
        type=_positive(float),
        default=KEEP_ALIVE,
        help=f"seconds an idle connection stays open (default {KEEP_ALIVE:g})",
    )
    parser.add_argument(
        "--grace",
        type=_positive(float),
        default=GRACE,
        help="seconds a client session outlives its channel before its leases are released "
        f"(default {GRACE:g}; clients may ask for less)",
    )
    parser.add_argument(
        "--retire-after",
        type=_positive(float, zero=True),
        default=RETIRE_AFTER,
        help="seconds after which an idle agent (no lease, no request) is forgotten "
        f"(default {RETIRE_AFTER:g}; 0: never)",
    )
    parser.add_argument(
        "--log-level", type=log_level, default="info", help="debug, info, warning or error"
    )
    parser.add_argument("--log-json", action="store_true", help="log JSON lines")


RETIRE_AFTER = 86_400.0
"""Default of ``--retire-after``: an agent no request named for a day is forgotten."""


def _fail(message: str) -> int:
    import sys

    print(f"klock serve: {message}", file=sys.stderr, flush=True)
    return 2


def _raise_file_limit(needed: int) -> None:
    """Let the process open ``needed`` descriptors if the hard limit allows it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft < needed:
            get_logger().warning(
                "server.file_limit",
                limit=soft,
                max_connections=needed - _SPARE_FILES,
                hint="lower --max-connections or raise the limit (ulimit -n)",
            )


_SPARE_FILES = 64  # descriptors besides connections: the journal, logs, pipes


def _check_postgres(url: str, init: bool) -> str | None:
    """Why the PostgreSQL ``--db`` cannot be used, in one line (None: it can)."""
    try:
        asyncio.run(prepare_schema(url, init=init))
    except ImportError as exc:
        return str(exc)
    except KlockError as exc:
        return f"cannot use --db: {exc}"
    except Exception as exc:  # asyncpg's own errors: refused, unknown database, bad password
        return f"cannot use --db {redact(url)}: {type(exc).__name__}: {exc}"
    return None


# The youngest generation is collected after this many allocations (Python's default: 700).
_GC_YOUNG = 10_000


def _tune_collector() -> None:
    """Tune the cyclic garbage collector for a long-running server, once it has started.

    A server allocates a few objects per call that mostly die young, and keeps a long-lived
    event history that turns over all the time; with Python's defaults the collector took
    13 % of the server's CPU under load (measured with ``perf``), with these 1 %. Objects
    of the start-up (modules, routes, settings) are frozen out of every collection.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG, middle, old)


def run(args: argparse.Namespace) -> int:
    """Run ``klock serve`` until interrupted; return the exit status.

    0 after a requested shutdown, 2 when it cannot start (bad option, unusable journal), 3
    when the kernel stopped by itself (a failed disk): a supervisor should restart it.
    """
    from klock_async.logging import configure

    configure(args.log_level, json=args.log_json)
    if args.token is not None:
        token: str | None = args.token
    else:
        token = os.environ.get("KLOCK_TOKEN")
    if token is not None and not token.strip():
        return _fail(
            "an empty token would let anyone in; give a real one (--token or KLOCK_TOKEN), "
            "or unset KLOCK_TOKEN to run without authentication"
        )
    operator_token = args.operator_token
    if operator_token is None:
        operator_token = os.environ.get("KLOCK_OPERATOR_TOKEN")
    if operator_token is not None and (not operator_token.strip() or operator_token == token):
        return _fail(
            "the operator token must be a real secret, distinct from the agents' token "
            "(--operator-token or KLOCK_OPERATOR_TOKEN)"
        )
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        get_logger().warning(
            "server.unauthenticated",
            host=args.host,
            hint="anyone who reaches this address can take and release leases; set --token",
        )
    allowed = list(args.allowed_host)
    if args.host not in ("0.0.0.0", "::", ""):
        allowed.append(args.host)
    elif not allowed:
        get_logger().warning(
            "server.loopback_names_only",
            host=args.host,
            hint="requests naming this machine by another name or address get 421; list the "
            "names clients use with --allowed-host",
        )
    if is_postgres_url(args.db):
        failure = _check_postgres(args.db, args.init)
        if failure is not None:
            return _fail(failure)
    elif args.db is not None:
        # Fail fast, with one line instead of a traceback, on a journal that cannot be used.
        import sqlite3

        from klock_async.journal import SqliteJournal

        probe = SqliteJournal(
            args.db,
            synchronous=args.sync.upper(),
            init=args.init,
            accept_unclosed=args.accept_unclosed,
        )
        try:
            probe.load()  # the credentials' and client sessions' rows too
        except (OSError, sqlite3.Error, KlockError) as exc:
            return _fail(f"cannot use --db {args.db}: {exc}")
        finally:
            probe.close()
    app = create_app(
        db=args.db,
        token=token,
        synchronous=args.sync.upper(),
        max_body_bytes=args.max_body,
        allowed_hosts=allowed,
        retire_after=args.retire_after or None,
        init=args.init,
        leader_ttl=args.leader_ttl,
        advertise_url=args.advertise_url,
        operator_token=operator_token,
        strict_identity=args.strict_identity,
        grace=args.grace,
    )
    _raise_file_limit(args.max_connections + _SPARE_FILES)
    config = server_config(
        app,
        host=args.host,
        port=args.port,
        read_timeout=args.read_timeout,
        keep_alive=args.keep_alive,
        max_connections=args.max_connections,
    )

    def announce(url: str) -> None:
        _tune_collector()
        print(f"klock serve: listening on {url}", flush=True)

    server = Server(config, on_ready=announce)
    try:
        server.run()
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C
        return 130
    except SystemExit as exc:  # uvicorn could not start (its one-line error is logged)
        if exc.code in (0, None):
            return 0
        return 2
    if server.failure is not None:
        _fail(f"the kernel stopped: {server.failure}")
        return 3
    return 0 if server.started else 1
