"""The HTTP transport: :class:`RemoteBackend` talks to a ``klock serve`` server.

``Klock.connect(url)`` wraps it in the same facade as the embedded kernel, so agents, sessions,
lease blocks with auto-heartbeat, the ``protected`` decorator and clocks work unchanged across
processes and machines. Errors come back typed: the server sends each error's ``code`` and
fields, and :func:`~klock_async.errors.error_from_payload` rebuilds the same exception the
embedded kernel would have raised.

A waiting acquire is one long-poll (``POST /intents`` with ``"wait": true``), answered by the
same future as an embedded waiter: nothing polls. Cancelling the caller withdraws the request:
the client asks the server to withdraw it and returns only once the server confirmed, and a
grant that crossed the withdrawal on the wire is released, so nothing leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import re
import secrets
import socket
import ssl
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from klock_async.backend import ClockStatus
from klock_async.clocks import IsolationLevel, VectorClock
from klock_async.errors import (
    ClientGoneError,
    InvalidCredentialError,
    InvalidRequestError,
    KernelClosedError,
    KlockError,
    LeaseError,
    LeaseNotFoundError,
    NotLeaderError,
    TransportError,
    error_from_payload,
)
from klock_async.events import Event, EventStream
from klock_async.failover import ServerList, may_resend
from klock_async.logging import get_logger
from klock_async.model import (
    AgentInfo,
    Intent,
    LeaseInfo,
    LeaseState,
    Predicate,
    Resource,
    ResourceType,
    Statistics,
    WaiterInfo,
    WaitFor,
    lease_info,
    validate_timeout,
    validate_ttl,
    with_state,
)

if TYPE_CHECKING:
    from klock_async.websocket import Wire

__all__ = ["ChannelBackend", "RemoteBackend"]

_REQUEST_ID = "x-klock-request-id"
_CREDENTIAL = "klock-credential"
_OPERATOR = "klock-operator-token"
_ABANDON_SECONDS = 5.0  # longest a cancelled acquire waits for the server to confirm
_PAGE = 1000  # items per page of GET /leases and GET /agents (the server's most)
_LEASES_KEPT = 65_536  # most lease entries a client keeps (oldest dropped)


class _RequestKeys:
    """New request keys, one per acquire (see ``validate_request_key``): a random prefix per
    client (96 bits, drawn once) and a count, unique without a random draw per acquire."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_urlsafe(12) + "-"
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return self._prefix + str(next(self._count))


# Enum members by value: a dict lookup costs a fraction of calling the enum class.
_TYPES = {member.value: member for member in ResourceType}
_PREDICATES = {member.value: member for member in Predicate}
_STATES = {member.value: member for member in LeaseState}


@functools.lru_cache(maxsize=4096)
def _resource(type_name: str, path: str) -> Resource:
    """A resource of an answer; agents hold the same ones over and over (built once each)."""
    return Resource(_TYPES[type_name], path)


def _lease(data: Mapping[str, Any]) -> LeaseInfo:
    return lease_info(
        data["lease_id"],
        data["agent_id"],
        data["session_id"],
        _resource(data["resource_type"], data["resource_path"]),
        _PREDICATES[data["predicate"]],
        data["token"],
        data["ttl_ms"] / 1000.0,
        data["expires_at_ms"] / 1000.0,
        _STATES[data["state"]],
    )


def _dumps(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _statistics(data: Mapping[str, Any]) -> Statistics:
    return Statistics(**{name: data[name] for name in Statistics.__dataclass_fields__})


def _waiter(data: Mapping[str, Any]) -> WaiterInfo:
    return WaiterInfo(
        request_id=int(data["request_id"]),
        agent_id=str(data["agent_id"]),
        session_id=str(data["session_id"]),
        age=int(data["age"]),
        priority=data["priority"],
        intents=tuple(Intent.of(i["resource"], i["predicate"]) for i in data["intents"]),
        waits_for=tuple(
            WaitFor(str(e["kind"]), e["id"], str(e["agent_id"]), str(e["resource"]))
            for e in data["waits_for"]
        ),
    )


_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # what RFC 9110 bars from field values


def _header_value(value: str, name: str) -> str:
    """A header value that cannot end its header early: no CR, LF, NUL or other control
    character, Latin-1 only.

    Raises:
        InvalidRequestError: otherwise (a token with CR/LF would inject headers).
    """
    if _CONTROL.search(value) or not _latin1(value):
        raise InvalidRequestError(
            f"the {name} contains a line break, a control character or a character HTTP "
            "headers cannot carry; "
            "pass the exact secret"
        )
    return value


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _proxied(url: str) -> bool:
    """Whether the environment (``HTTP_PROXY``/``HTTPS_PROXY``, ``NO_PROXY``) routes ``url``
    through a proxy. A loopback server never is: no proxy can reach this machine's loopback."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return False
    proxies = urllib.request.getproxies()
    if parts.scheme not in proxies and "all" not in proxies:
        return False
    return not urllib.request.proxy_bypass(parts.netloc)


class _Http1:
    """A lean HTTP/1.1 client: one keep-alive connection per concurrent request, no pooling
    limits, JSON bodies with Content-Length. Cancelling a request closes its connection, which
    is how the server learns that a long-poll's caller left.

    A request that finds its reused connection closed by the server (no byte of an answer)
    is sent again on a new one only if it is safe (``GET``): a ``POST`` may have been
    carried out, so it fails with the error instead. Idle connections are reused for
    ``_IDLE_SECONDS`` at most, well within the server's keep-alive, so that is rare.
    """

    _IDLE_MAX = 256
    _IDLE_SECONDS = 2.0
    _RETRIED = frozenset(("GET", "HEAD"))

    def __init__(self, url: str, token: str | None, connect_timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            raise InvalidRequestError(f"the server URL names no host: {url!r}")
        self._host = parts.hostname
        https = parts.scheme == "https"
        self._port = parts.port or (443 if https else 80)
        self._ssl = ssl.create_default_context() if https else None
        self._path = parts.path.rstrip("/")
        netloc = parts.netloc.rpartition("@")[2]
        fixed = f"Host: {netloc}\r\nUser-Agent: klock-async\r\nAccept: application/json\r\n"
        if token:
            fixed += f"Authorization: Bearer {_header_value(token, 'token')}\r\n"
        self._fixed = fixed.encode("latin-1")
        self._connect_timeout = connect_timeout
        # (reader, writer, loop time it became idle), most recent last
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._open: set[asyncio.StreamWriter] = set()
        self._closed = False

    async def send(
        self,
        method: str,
        target: str,
        body: bytes | None,
        request_id: str,
        read_timeout: float | None,
        credential: str | None = None,
        operator: str | None = None,
    ) -> tuple[int, bytes]:
        head = (
            f"{method} {self._path}{target} HTTP/1.1\r\n".encode("latin-1")
            + self._fixed
            + f"{_REQUEST_ID}: {request_id}\r\n".encode("latin-1")
        )
        if credential is not None:
            head += f"{_CREDENTIAL}: {_header_value(credential, 'credential')}\r\n".encode(
                "latin-1"
            )
        if operator is not None:
            head += f"{_OPERATOR}: {operator}\r\n".encode("latin-1")
        if body is None:
            data = head + b"Content-Length: 0\r\n\r\n"
        else:
            data = (
                head
                + b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
        while True:
            reader, writer, reused = await self._checkout()
            try:
                writer.write(data)
                if read_timeout is None:
                    status, content, keep = await _read_response(reader)
                else:
                    async with asyncio.timeout(read_timeout):
                        status, content, keep = await _read_response(reader)
            except _Stale:
                self._discard(writer)
                if reused and method in self._RETRIED:
                    continue  # the server had closed this idle connection: use a new one
                raise ConnectionResetError(
                    "the server closed the connection before answering"
                    + ("" if method in self._RETRIED else f"; {method} not sent again")
                ) from None
            except BaseException:
                self._discard(writer)  # unknown state: never reuse (and tell the server)
                raise
            if keep and len(self._idle) < self._IDLE_MAX:
                self._idle.append((reader, writer, asyncio.get_running_loop().time()))
            else:
                self._discard(writer)
            return status, content

    async def _checkout(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        if self._closed:
            raise ConnectionAbortedError("the client was closed")
        fresh_since = asyncio.get_running_loop().time() - self._IDLE_SECONDS
        while self._idle:
            reader, writer, idle_since = self._idle.pop()
            if reader.at_eof() or writer.is_closing() or idle_since < fresh_since:
                self._discard(writer)
                continue
            return reader, writer, True
        async with asyncio.timeout(self._connect_timeout):
            reader, writer = await asyncio.open_connection(
                self._host, self._port, ssl=self._ssl, limit=1 << 20
            )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._open.add(writer)
        return reader, writer, False

    def _discard(self, writer: asyncio.StreamWriter) -> None:
        self._open.discard(writer)
        writer.close()

    async def aclose(self) -> None:
        self._closed = True
        self._idle.clear()
        writers, self._open = self._open, set()
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Stale(Exception):
    """The connection ended before any byte of the response arrived."""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Read one HTTP/1.1 response; return (status, body, keep the connection)."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise _Stale() from None
        raise
    lines = raw.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status = int(rest[:3])
    length = -1
    chunked = False
    keep = version == b"HTTP/1.1"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            token = value.strip().lower()
            keep = token == b"keep-alive" or (keep and token != b"close")
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:  # the last chunk; then trailer fields, each a line, and a blank line
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, b"".join(parts), keep
    if length >= 0:
        return status, await reader.readexactly(length) if length else b"", keep
    return status, await reader.read(), False


class _Httpx:
    """Requests through an httpx transport (for ``RemoteBackend(transport=...)``)."""

    def __init__(self, url: str, token: str | None, transport: Any, timeout: float) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._httpx = httpx
        self._timeout = timeout
        self._client = httpx.AsyncClient(base_url=url, headers=headers, transport=transport)

    async def send(
        self,
        method: str,
        target: str,
        body: bytes | None,
        request_id: str,
        read_timeout: float | None,
        credential: str | None = None,
        operator: str | None = None,
    ) -> tuple[int, bytes]:
        headers = {_REQUEST_ID: request_id}
        if credential is not None:
            headers[_CREDENTIAL] = _header_value(credential, "credential")
        if operator is not None:
            headers[_OPERATOR] = operator
        if body is not None:
            headers["Content-Type"] = "application/json"
        response = await self._client.request(
            method,
            target,
            content=body,
            headers=headers,
            timeout=self._httpx.Timeout(self._timeout, read=read_timeout),
        )
        return response.status_code, response.content

    async def aclose(self) -> None:
        await self._client.aclose()


class RemoteBackend:
    """The :class:`~klock_async.backend.Backend` of a ``klock serve`` server, over HTTP.

    Use it through ``Klock.connect(url)``. One instance may be shared by any number of tasks
    of one event loop; each concurrent request uses a keep-alive HTTP/1.1 connection of its
    own (a lean client: a general-purpose pool costs more per request than the server spends
    on it).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:3100``; or the URLs of several
            replicas (a list, or one string separated by commas): requests go to the leader,
            and move to the next replica when one cannot be reached (see
            :mod:`klock_async.failover`).
        token: the bearer token the server was started with, if any.
        timeout: seconds to wait for an answer to a request that does not wait by design
            (long-polls wait as long as they were asked to, plus this much).
        transport: an ``httpx.AsyncBaseTransport`` to send requests through instead of TCP
            (e.g. ``httpx.ASGITransport(app)`` to talk to an app in the same process).
        credentials: register agents with a credential (the default): only this client can
            then act for them. False registers them as a Klock v1 client does, without one:
            anyone holding the server's token may then act for them (and a lease id is a
            capability); a server started with ``--strict-identity`` refuses that.
        operator_token: the server's operator token (``klock serve --operator-token``), sent
            with :meth:`revoke` and :meth:`evict` only.

    Raises:
        InvalidRequestError: the URL is not ``http(s)://host...`` or the timeout is not positive.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: Any = None,
        credentials: bool = True,
        operator_token: str | None = None,
    ) -> None:
        if not isinstance(url, str | list | tuple):
            raise InvalidRequestError(
                f"the server URL must start with http:// or https://: {url!r}"
            )
        self.servers = ServerList(url)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise InvalidRequestError(f"timeout must be a positive number of seconds: {timeout!r}")
        if transport is not None and len(self.servers) > 1:
            raise InvalidRequestError("a transport serves one server URL, not several")
        self._token = None if token is None else _header_value(token, "token")
        self._timeout = float(timeout)
        self._transport = transport
        self._ask_credentials = credentials
        self._operator = None if operator_token is None else _header_value(operator_token, "token")
        self._wire: _Http1 | _Httpx | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it runs in, once started
        self._closed = False
        self._prefix = secrets.token_hex(6) + "-"
        self._ids = itertools.count(1)
        # request id -> (is a long-poll, done): what barrier() waits for.
        self._inflight: dict[str, tuple[bool, asyncio.Future[None]]] = {}
        self._polls: set[asyncio.Task[Any]] = set()
        # The credentials the server handed out for the agents this client registered, and
        # each lease granted here: its agent (a release may name no agent: the v1 API), and
        # its snapshot for a resent release that finds it gone.
        self._credentials: dict[str, str] = {}
        self._leases: dict[str, LeaseInfo] = {}
        self._request_key = _RequestKeys()

    def __repr__(self) -> str:
        return f"<RemoteBackend {self.url}>"

    @property
    def url(self) -> str:
        """The base URL of the server requests go to now (the leader, among replicas)."""
        return self.servers.current

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect and check that the server answers (and takes the token).

        Raises:
            TransportError: the server cannot be reached, or refuses the token.
        """
        if self._wire is not None:
            return
        if self._closed:
            raise KernelClosedError("this remote backend was closed; create a new one")
        self._loop = asyncio.get_running_loop()
        self._wire = self._connect()
        try:
            await self.statistics()
        except BaseException:
            wire, self._wire = self._wire, None
            await wire.aclose()
            raise

    async def aclose(self) -> None:
        """Close the connections; pending calls fail with :class:`KernelClosedError`."""
        if self._closed:
            return
        self._closed = True
        for poll in list(self._polls):
            poll.cancel()
        wire, self._wire = self._wire, None
        if wire is not None:
            await wire.aclose()

    # ---------------------------------------------------------------- plumbing

    def _connect(self) -> _Http1 | _Httpx:
        if self._transport is not None:
            return _Httpx(self.url, self._token, self._transport, self._timeout)
        if _proxied(self.url):  # httpx speaks to proxies (HTTP_PROXY, NO_PROXY, ...)
            return _Httpx(self.url, self._token, None, self._timeout)
        return _Http1(self.url, self._token, self._timeout)

    async def _switch(self, wire: _Http1 | _Httpx, url: str, leader: str | None) -> None:
        """Send requests to ``leader``, or to the next replica after ``url`` failed."""
        if self._wire is not wire or self._closed:
            return  # another request switched already
        if leader is not None:
            self.servers.follow(leader)
        else:
            self.servers.failed(url)
        if self.url != url:
            self._wire = self._connect()
            await wire.aclose()
        delay = self.servers.backoff()
        if delay:
            await asyncio.sleep(delay)  # every replica refused or failed: back off, then retry

    def _check_open(self) -> _Http1 | _Httpx:
        wire = self._wire
        if wire is None:
            if self._closed:
                raise KernelClosedError("the connection to the klock server was closed")
            raise KernelClosedError("not connected; use 'async with Klock.connect(url)'")
        return wire

    async def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
        long_poll: bool = False,
        wait_for: float | None = 0.0,
        request_id: str | None = None,
        agent_id: str | None = None,
        operator: bool = False,
        keyed: bool = False,
    ) -> Any:
        """Send one request and return the envelope's ``data``, or raise the typed error.

        ``wait_for`` is how long the server may keep the request by design (None: forever);
        ``agent_id`` the agent it acts for, whose credential it carries (if it has one);
        ``operator``: an operator action, which carries the operator token (if given);
        ``keyed``: an acquire that carries a request key.

        A request that may be sent again (:func:`~klock_async.failover.may_resend`) is, when
        the connection broke: to the next replica, or once more to a lone server. A release
        resent that way and answered "lease not found" was done by its first send: it returns
        None.
        """
        rid = request_id or self._track(long_poll)
        read = None if wait_for is None else wait_for + self._timeout
        target = path if not params else f"{path}?{urllib.parse.urlencode(params)}"
        payload = None if body is None else _dumps(body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout  # for finding a leader, on top of the answer
        resent = False  # sent again after a connection broke: it may have been done
        try:
            while True:
                wire = self._check_open()
                url = self.url
                try:
                    status, content = await self._send(
                        wire, method, target, payload, rid, read, agent_id, operator
                    )
                except TransportError as exc:  # no answer: try the next replica, if any
                    reached = not isinstance(exc.__cause__, ConnectionRefusedError)
                    if self._closed or not may_resend(method, path, reached=reached, keyed=keyed):
                        raise
                    if len(self.servers) == 1:
                        broke = isinstance(exc.__cause__, OSError | EOFError)  # not a timeout
                        if resent or not reached or not broke:
                            raise
                        resent = True  # a lone server: once more, on a new connection
                        continue
                    await self._switch(wire, url, None)
                    if loop.time() > deadline:
                        raise
                    resent = resent or reached
                    continue
                try:
                    result = self._unwrap(status, content, method, path)
                except NotLeaderError as exc:  # a follower did nothing: go to the leader
                    if loop.time() > deadline:
                        raise
                    await self._switch(wire, url, exc.leader)
                    continue
                except LeaseNotFoundError:
                    if resent and method == "DELETE":
                        return None  # the release's first send released it
                    raise
                self.servers.answered()
                return result
        finally:
            self._inflight.pop(rid)[1].set_result(None)

    async def _send(
        self,
        wire: _Http1 | _Httpx,
        method: str,
        target: str,
        payload: bytes | None,
        rid: str,
        read: float | None,
        agent_id: str | None,
        operator: bool,
    ) -> tuple[int, bytes]:
        path = target.partition("?")[0]
        credential = None if agent_id is None else self._credentials.get(agent_id)
        token = self._operator if operator else None
        try:
            return await wire.send(method, target, payload, rid, read, credential, token)
        except TimeoutError:
            raise TransportError(
                f"the klock server at {self.url} did not answer {method} {path} within "
                f"{read}s; it may be overloaded or stuck"
            ) from None
        except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
            if self._closed:
                raise KernelClosedError("the connection to the klock server was closed") from None
            raise TransportError(
                f"cannot reach the klock server at {self.url} ({type(exc).__name__}: {exc}); "
                "is 'klock serve' running there?"
            ) from exc
        except Exception as exc:  # an httpx transport's own errors
            if self._closed:
                raise KernelClosedError("the connection to the klock server was closed") from None
            raise TransportError(
                f"the request {method} {path} to {self.url} failed: {type(exc).__name__}: {exc}"
            ) from None

    def _track(self, long_poll: bool) -> str:
        """Register a request as sent (synchronously, so a barrier behind it sees it)."""
        rid = self._prefix + str(next(self._ids))
        self._inflight[rid] = (long_poll, asyncio.get_running_loop().create_future())
        return rid

    def _unwrap(self, status: int, content: bytes, method: str, path: str) -> Any:
        try:
            envelope = json.loads(content)
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict) or "success" not in envelope:
            raise TransportError(
                f"{self.url} answered {method} {path} with HTTP {status} and no klock "
                "envelope; is it a klock server?"
            )
        if envelope["success"]:
            return envelope.get("data")
        raise self._error(status, envelope)

    def _error(self, status: int, envelope: Mapping[str, Any]) -> KlockError:
        message = str(envelope.get("error") or "the server refused the request")
        code = str(envelope.get("code") or "klock_error")
        details = envelope.get("details")
        payload = {"code": code, "message": message}
        if isinstance(details, Mapping):
            payload.update(details)
        error = error_from_payload(payload)
        if type(error) is not KlockError:
            return error
        # Codes that exist only at the HTTP boundary (malformed_json, missing_field, ...).
        if status in (400, 413, 422):
            return InvalidRequestError(f"{message} ({code})")
        if status == 401:
            return TransportError(
                f"the klock server at {self.url} refused the request ({message}); pass "
                "token=... as the server was started with"
            )
        return TransportError(f"the klock server at {self.url} answered {status} {code}: {message}")

    async def _poll(
        self,
        rid: str,
        method: str,
        path: str,
        body: Mapping[str, Any],
        wait_for: float | None,
        agent_id: str,
    ) -> Any:
        """A long-poll in its own task, so a cancelled caller can still collect its answer."""
        loop = asyncio.get_running_loop()
        inner = loop.create_task(
            self._call(
                method,
                path,
                body,
                long_poll=True,
                wait_for=wait_for,
                request_id=rid,
                agent_id=agent_id,
                keyed="request_key" in body,
            )
        )
        self._polls.add(inner)
        inner.add_done_callback(self._polls.discard)
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            if inner.done() and self._closed:
                raise KernelClosedError(
                    "the connection to the klock server was closed while the request waited"
                ) from None
            await asyncio.shield(self._abandon(rid, inner, agent_id))
            raise

    async def _abandon(self, rid: str, inner: asyncio.Task[Any], agent_id: str) -> None:
        """The caller gave up: withdraw the request and give back a grant that crossed it.

        Bounded, so a cancel never hangs on a stuck server: past the bound the connection is
        dropped, which makes the server withdraw the request on its own.
        """
        try:
            async with asyncio.timeout(min(self._timeout, _ABANDON_SECONDS)):
                with contextlib.suppress(KlockError):
                    await self._call("POST", "/withdraw", {"request_id": rid}, agent_id=agent_id)
                result = await inner
        except (KlockError, TimeoutError, asyncio.CancelledError):
            inner.cancel()
            return
        leases = result.get("leases", ()) if isinstance(result, Mapping) else ()
        for data in leases:
            with contextlib.suppress(KlockError):
                await self._call(
                    "DELETE",
                    f"/leases/{data['lease_id']}",
                    params={"agent_id": data["agent_id"]},
                    agent_id=data["agent_id"],
                )

    async def barrier(self) -> Statistics:
        """Wait until the scheduler has decided every request this client sent so far.

        Requests that answer at once are awaited; long-polls still pending (queued waiters)
        are confirmed by the server as handed to the scheduler. The statistics returned are
        taken after all of them: the remote counterpart of posting a query behind them.

        Raises:
            TransportError: the server cannot be reached.
        """
        pending = list(self._inflight.items())
        short = [done for long_poll, done in (entry for _, entry in pending) if not long_poll]
        polls = [rid for rid, (long_poll, _) in pending if long_poll]
        if short:
            await asyncio.wait(short)
        data = await self._call(
            "POST", "/sync", {"requests": polls, "timeout_ms": self._timeout * 1000}
        )
        return _statistics(data)

    # ---------------------------------------------------------------- Backend

    async def register_agent(self, agent_id: str, priority: int | None) -> AgentInfo:
        """Register an agent with a credential; see :class:`~klock_async.backend.Backend`.

        The server hands the credential out once; this client keeps it and sends it with
        every later request for the agent, so no other client can act for it.

        Raises:
            InvalidRequestError: empty id or non-integer priority.
            AgentExistsError: the id exists with another priority.
            CredentialRequiredError: another client registered the id (it holds the
                credential); use another id.
            OperatorRequiredError: a priority on a server that reserves them to its operator.
            TransportError: the server cannot be reached.
        """
        body: dict[str, Any] = {"agent_id": agent_id, "priority": priority}
        if self._ask_credentials:
            body["credential"] = True
        try:
            data = await self._call("POST", "/agents", body, agent_id=agent_id)
        except InvalidCredentialError:
            # The server forgot the agent (no --db, or it retired it): ask for a new one.
            self._credentials.pop(agent_id, None)
            data = await self._call("POST", "/agents", body, agent_id=agent_id)
        credential = data.get("credential")
        if isinstance(credential, str):
            self._credentials[agent_id] = credential
        return AgentInfo(data["agent_id"], data["ts"])

    def _granted(self, data: Mapping[str, Any]) -> LeaseInfo:
        info = _lease(data)
        leases = self._leases
        leases[info.id] = info
        if len(leases) > _LEASES_KEPT:  # leases that ended without a release from here
            del leases[next(iter(leases))]
        return info

    def _holder(self, lease_id: str, agent_id: str | None) -> str | None:
        if agent_id is not None:
            return agent_id
        info = self._leases.get(lease_id)
        return None if info is None else info.agent_id

    async def acquire(
        self,
        agent_id: str,
        session_id: str,
        intents: Sequence[Intent],
        *,
        ttl: float,
        wait: bool = True,
        timeout: float | None = None,
        isolation: IsolationLevel | None = IsolationLevel.READ_COMMITTED,
        agent_view: bool = False,
    ) -> tuple[LeaseInfo, ...]:
        """Request leases; see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseDied: Wait-Die refused the request.
            LeaseWouldWait: ``wait`` is false and the request would have to queue.
            AcquireTimeoutError: ``timeout`` ran out; the request was withdrawn.
            CausalViolationError: a stale write in a SERIALIZABLE session.
            InvalidRequestError: bad input; nothing changed.
            UnknownAgentError: ``agent_id`` was never registered.
            TransportError: the server cannot be reached.
        """
        ttl = validate_ttl(ttl)
        timeout = validate_timeout(timeout)
        self._check_open()
        body = {
            "agent_id": agent_id,
            "session_id": session_id,
            "intents": [
                {"resource": str(intent.resource), "predicate": intent.predicate.value}
                for intent in intents
            ],
            "ttl_ms": ttl * 1000.0,
            "wait": wait,
            "timeout_ms": None if timeout is None else timeout * 1000.0,
        }
        if isolation is not None:
            body["isolation"] = isolation.value
        if agent_view:
            body["agent_view"] = True
        # The same key on every resend of this call: the server grants it once.
        body["request_key"] = self._request_key()
        if wait:
            data = await self._poll(self._track(True), "POST", "/intents", body, timeout, agent_id)
        else:
            data = await self._call("POST", "/intents", body, agent_id=agent_id, keyed=True)
        return tuple(self._granted(lease) for lease in data["leases"])

    def release_nowait(self, lease_id: str, agent_id: str) -> bool:
        """Always False: only the server can vouch that a lease is still active.

        A one-way release over HTTP could not tell the holder that its lease was lost, so
        the facade uses :meth:`release` (the server releases in one request either way).
        """
        return False

    async def release(
        self, lease_id: str, agent_id: str | None = None, *, record_write: bool | None = None
    ) -> LeaseInfo:
        """End a lease; see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseNotFoundError: not active.
            NotLeaseOwnerError: ``agent_id`` is not the holder.
            TransportError: the server cannot be reached.
        """
        query = [] if record_write is None else [f"record_write={str(record_write).lower()}"]
        holder = self._holder(lease_id, agent_id)
        if holder is not None:  # named, the server checks the holder without a lookup
            query.append(f"agent_id={urllib.parse.quote(holder, safe='')}")
        target = f"/leases/{_segment(lease_id)}" + ("?" + "&".join(query) if query else "")
        try:
            data = await self._call("DELETE", target, agent_id=holder)
        except LeaseError:
            self._leases.pop(lease_id, None)
            raise
        known = self._leases.pop(lease_id, None)
        if data is None:  # resent after the connection broke, and done by the first send
            if known is None:
                raise LeaseNotFoundError(
                    f"lease {lease_id!r} is not active: the connection broke while it was "
                    "being released, and the server no longer has it (released then, or ended)"
                )
            return with_state(known, LeaseState.RELEASED)
        return _lease(data)

    async def heartbeat(
        self, lease_id: str, agent_id: str | None = None, ttl: float | None = None
    ) -> LeaseInfo:
        """Extend a lease; see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseNotFoundError: not active.
            NotLeaseOwnerError: ``agent_id`` is not the holder.
            InvalidTTLError: bad ttl.
            TransportError: the server cannot be reached.
        """
        body: dict[str, Any] = {}
        holder = self._holder(lease_id, agent_id)
        if holder is not None:
            body["agent_id"] = holder
        if ttl is not None:
            body["ttl_ms"] = validate_ttl(ttl) * 1000.0
        data = await self._call(
            "POST",
            f"/leases/{_segment(lease_id)}/heartbeat",
            body,
            agent_id=holder,
        )
        return _lease(data)

    async def release_session(self, agent_id: str, session_id: str) -> int:
        """Release a session's leases; see :class:`~klock_async.backend.Backend`.

        Raises:
            TransportError: the server cannot be reached.
        """
        data = await self._call(
            "POST",
            "/sessions/release",
            {"agent_id": agent_id, "session_id": session_id},
            agent_id=agent_id,
        )
        return int(data["released"])

    async def wait_ended(self, lease_id: str, timeout: float | None) -> LeaseInfo | None:
        """Wait for a lease to end (one long-poll); see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseNotFoundError: the lease is not active.
            TransportError: the server cannot be reached.
        """
        if timeout is not None and not timeout >= 0:
            raise InvalidRequestError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        self._check_open()
        body = {"timeout_ms": None if timeout is None else timeout * 1000.0}
        # A cancelled caller just drops the connection: the server forgets the watch.
        data = await self._call(
            "POST", f"/leases/{_segment(lease_id)}/wait", body, long_poll=True, wait_for=timeout
        )
        return None if not data["ended"] else _lease(data["lease"])

    async def revoke(self, lease_id: str) -> LeaseInfo:
        """Revoke a lease; see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseNotFoundError: not active.
            TransportError: the server cannot be reached.
        """
        known = self._leases.pop(lease_id, None)
        holder = None if known is None else known.agent_id
        return _lease(
            await self._call(
                "POST", f"/leases/{_segment(lease_id)}/revoke", agent_id=holder, operator=True
            )
        )

    async def evict(self, agent_id: str) -> int:
        """Revoke an agent's leases; see :class:`~klock_async.backend.Backend`.

        Raises:
            UnknownAgentError: never registered.
            TransportError: the server cannot be reached.
        """
        data = await self._call(
            "POST", "/evict", {"agent_id": agent_id}, agent_id=agent_id, operator=True
        )
        return int(data["evicted"])

    async def leases(self) -> tuple[LeaseInfo, ...]:
        """Snapshot of the active leases.

        Raises:
            TransportError: the server cannot be reached.
        """
        leases: list[LeaseInfo] = []
        params = {"limit": str(_PAGE)}
        while True:  # pages of _PAGE; more than one page is not one atomic snapshot
            page = await self._call("GET", "/leases", params=params)
            leases.extend(_lease(data) for data in page)
            if len(page) < _PAGE:
                return tuple(leases)
            params["after"] = str(page[-1]["token"])

    async def agents(self) -> tuple[AgentInfo, ...]:
        """Snapshot of the registered agents.

        Raises:
            TransportError: the server cannot be reached.
        """
        agents: list[AgentInfo] = []
        params = {"limit": str(_PAGE)}
        while True:  # pages of _PAGE; more than one page is not one atomic snapshot
            page = await self._call("GET", "/agents", params=params)
            agents.extend(AgentInfo(d["agent_id"], d["ts"]) for d in page)
            if len(page) < _PAGE:
                return tuple(agents)
            params["after"] = f"{page[-1]['ts']}:{page[-1]['agent_id']}"

    async def statistics(self) -> Statistics:
        """Snapshot of the counters.

        Raises:
            TransportError: the server cannot be reached.
        """
        return _statistics(await self._call("GET", "/statistics"))

    async def waiters(self) -> tuple[WaiterInfo, ...]:
        """Snapshot of the queued requests and what each waits for.

        Raises:
            TransportError: the server cannot be reached.
        """
        data = await self._call("GET", "/waiters")
        return tuple(_waiter(item) for item in data["waiters"])

    async def clock_read(self, path: str, agent_id: str) -> VectorClock:
        """Read a path's clock as an agent; see :class:`~klock_async.backend.Backend`.

        Raises:
            UnknownAgentError: never registered.
            InvalidResourceError: bad path.
            TransportError: the server cannot be reached.
        """
        data = await self._call(
            "POST", "/clocks/read", {"path": path, "agent_id": agent_id}, agent_id=agent_id
        )
        return VectorClock(data["clock"])

    async def clock_write(self, path: str, agent_id: str, *, strict: bool = True) -> VectorClock:
        """Record a write; see :class:`~klock_async.backend.Backend`.

        Raises:
            CausalViolationError: strict, and the agent never saw the path's latest version.
            UnknownAgentError: never registered.
            TransportError: the server cannot be reached.
        """
        data = await self._call(
            "POST",
            "/clocks/write",
            {"path": path, "agent_id": agent_id, "strict": strict},
            agent_id=agent_id,
        )
        return VectorClock(data["clock"])

    def events(self, after: int | None = None) -> EventStream:
        """The server's events (``GET /events``) from now on, or after the event ``after``.

        The connection opens on the first read; it ends (the iteration stops) when the
        server shuts down or the connection breaks.
        """
        self._check_open()
        return _RemoteEvents(self, after)

    async def clock_status(self) -> ClockStatus:
        """Tracked paths and conflict count.

        Raises:
            TransportError: the server cannot be reached.
        """
        data = await self._call("GET", "/clocks")
        return ClockStatus(tuple(data["tracked_paths"]), int(data["conflict_count"]))


class _RemoteEvents(EventStream):
    """``GET /events`` read as Server-Sent Events, one :class:`Event` per message."""

    def __init__(self, backend: RemoteBackend, after: int | None) -> None:
        self._backend = backend
        self._after = after
        self._client: Any = None
        self._response: Any = None
        self._lines: AsyncIterator[str] | None = None
        self._open = True
        self.dropped = 0

    async def _connect(self) -> AsyncIterator[str]:
        import httpx

        backend = self._backend
        headers = {"Accept": "text/event-stream"}
        if backend._token:
            headers["Authorization"] = f"Bearer {backend._token}"
        if self._after is not None:
            headers["Last-Event-ID"] = str(self._after)
        self._client = httpx.AsyncClient(
            transport=backend._transport,
            timeout=httpx.Timeout(None, connect=backend._timeout),
            # The environment's proxies only where they apply (never to loopback), as for
            # every other request of the backend.
            trust_env=_proxied(backend.url),
        )
        try:
            request = self._client.build_request("GET", backend.url + "/events", headers=headers)
            self._response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await self.aclose()
            raise TransportError(f"cannot read events from {backend.url}: {exc}") from exc
        if self._response.status_code != 200:
            content = await self._response.aread()
            await self.aclose()
            backend._unwrap(self._response.status_code, content, "GET", "/events")
        self._lines = self._response.aiter_lines()
        return self._lines

    async def __anext__(self) -> Event:
        lines = self._lines
        if lines is None:
            if not self._open:
                raise StopAsyncIteration
            lines = await self._connect()
        import httpx

        data: list[str] = []
        while True:
            try:
                line = await anext(lines)
            except (StopAsyncIteration, httpx.HTTPError):  # the server stopped, or the network
                await self.aclose()
                raise StopAsyncIteration from None
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:
                event = Event.from_dict(json.loads("\n".join(data)))
                if self._after is not None and event.id > self._after + 1:
                    self.dropped += event.id - self._after - 1
                self._after = event.id
                return event

    async def aclose(self) -> None:
        """Close the connection."""
        self._open = False
        self._lines = None
        response, self._response = self._response, None
        if response is not None:
            await response.aclose()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _lease_id(lease_id: str) -> str:
    """A lease id as a call names it.

    Raises:
        InvalidRequestError: not a non-empty string.
    """
    if type(lease_id) is not str or not lease_id:
        raise InvalidRequestError(f"a lease id is a non-empty string, got {lease_id!r}")
    return lease_id


def _segment(lease_id: str) -> str:
    """A lease id as one URL path segment (ids are URL-safe; anything else is escaped)."""
    return urllib.parse.quote(_lease_id(lease_id), safe="")


# ------------------------------------------------------------------------------------------------
# The session channel.

_PING_INTERVAL = 1.0  # seconds between the client's pings; one unanswered for as long: reconnect
_RECONNECT_FIRST = 0.02  # seconds before the first reconnect attempt, doubled up to _MAX
_RECONNECT_MAX = 0.5
_CHANNEL_FRAME = 1 << 24  # largest frame read (a full leases list of a big server)
# Calls written as soon as this many are queued, rather than at the end of the turn: the
# server starts on them while the client goes on (as the server does with its answers).
_CHUNK = 8


def _refusal_of(body: bytes | bytearray | None) -> tuple[str, str] | None:
    """The code and message of a refused upgrade's body (the REST error form), if it has one."""
    try:
        value = json.loads(body or b"")
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("code"), str):
        return value["code"], str(value.get("error", ""))
    return None


class _Pending:
    """A call sent on the channel and not answered yet."""

    __slots__ = ("again", "future", "message")

    def __init__(self, message: dict[str, Any], future: asyncio.Future[Any]) -> None:
        self.message = message
        self.future = future
        self.again = False  # sent once more under a new id, its first answer lost


class ChannelBackend:
    """The session channel to a ``klock serve`` server: one WebSocket for every call.

    The client process holds one client session on the server, kept alive by the channel
    (pings both ways). When the connection breaks, the backend reconnects by itself with the
    session's resume secret and resends what the server never received; calls in flight
    keep waiting meanwhile. When it cannot reconnect within the grace period, the server has
    released the session's leases, and every call fails with :class:`ClientGoneError`.

    ``Klock.connect(url)``, the blocking clients and ``klock mcp`` use it; the REST API
    (:class:`RemoteBackend`) stays for curl, the Klock v1 SDK and the browser.

    Args:
        url: the server, e.g. ``http://127.0.0.1:3100`` (the channel is ``ws://.../channel``);
            or the URLs of several replicas (a list, or one string separated by commas): the
            channel goes to the leader and, when it is lost, to the new leader, where it
            resumes the same client session (see :mod:`klock_async.failover`).
        token: the server's bearer token, if it has one.
        timeout: seconds to connect, and to wait for an answer to a call that does not wait
            by design (waiting calls wait as long as they were asked to, plus this much).
        grace: seconds the server keeps this client's session (and leases) after the channel
            broke; None: the server's own (``klock serve --grace``), which also bounds it.
        operator_token: the server's operator token (``klock serve --operator-token``), sent
            in the channel's ``hello``: this client's revoke and evict calls are then the
            operator's.
        credentials: register agents with a credential (the default); False registers them
            as a Klock v1 client does, without one (a lease id is then a capability for them).

    Raises:
        InvalidRequestError: a malformed URL, timeout or grace.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 30.0,
        grace: float | None = None,
        operator_token: str | None = None,
        credentials: bool = True,
    ) -> None:
        self._rest = RemoteBackend(
            url,
            token=token,
            timeout=timeout,
            operator_token=operator_token,
            credentials=credentials,
        )
        self._operator = operator_token
        self._ask_credentials = credentials
        self.credentials: dict[str, str] = {}
        """The credential the server handed out for each agent this client registered (the
        channel acts for them without sending it; REST requests for them need it)."""
        if grace is not None and (
            isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 < grace < 86_400
        ):
            raise InvalidRequestError(f"grace must be a positive number of seconds: {grace!r}")
        self.servers = self._rest.servers
        self._token = token
        self._timeout = float(timeout)
        self._grace = grace
        self.client_id: str | None = None
        """The client session's id on the server, once connected."""
        self.grace: float | None = None
        """The grace period the server granted this client (seconds), once connected."""
        self._secret: str | None = None
        self._ids = itertools.count(1)
        self._calls: dict[int, _Pending] = {}
        self._out: list[dict[str, Any]] = []  # calls of this turn, not written yet
        self._flushing = False  # a write at the end of the turn is scheduled
        self._encode: Callable[[Any], bytes] = _dumps  # orjson's, once connected
        self._decode: Callable[[bytes | str], Any] = json.loads
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._gone: KlockError | None = None  # why every call fails from now on
        # Leases granted here: their agent, for releases that name none, and their snapshot
        # for a resent release that finds the lease gone.
        self._held: dict[str, LeaseInfo] = {}
        self._request_key = _RequestKeys()
        self._resent: set[str] = set()  # leases whose release was sent again to a new server
        self._reconnects = 0
        self._ws: Wire | None = None  # the open connection
        # The answer deadlines of calls that do not wait by design, in the order they were
        # sent (so also of their deadlines): one timer, at the oldest, serves them all.
        self._deadlines: deque[tuple[float, int]] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<ChannelBackend {self.url} client={self.client_id}>"

    @property
    def url(self) -> str:
        """The base URL of the server the channel goes to now (the leader, among replicas)."""
        return self.servers.current

    @property
    def _ws_url(self) -> str:
        scheme, rest = self.url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/channel"

    @property
    def reconnects(self) -> int:
        """How many times the channel was reopened after a break."""
        return self._reconnects

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the channel and the client session.

        Raises:
            TransportError: the server cannot be reached, or refuses the token.
        """
        if self._runner is not None:
            return
        if self._closed:
            raise KernelClosedError("this channel was closed; create a new backend")
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.get_running_loop().create_task(self._run(ready))
        try:
            await ready
        except BaseException:
            runner, self._runner = self._runner, None
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
            raise

    async def aclose(self) -> None:
        """Close the channel (the server then ends the session after its grace; leases a
        lease block still holds are released by the block itself first)."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(KernelClosedError("the connection to the klock server was closed"))
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._deadlines.clear()
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner

    def _fail_all(self, error: KlockError) -> None:
        calls, self._calls = self._calls, {}
        for pending in calls.values():
            if not pending.future.done():
                pending.future.set_exception(error)
                pending.future.exception()  # retrieved: a caller that left is not an error

    # ---------------------------------------------------------------- the connection

    async def _connect(self) -> Wire:
        from klock_async.websocket import open_wire

        headers = {"User-Agent": "klock-async"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return await open_wire(
            self._ws_url,
            headers=headers,
            timeout=self._timeout,
            max_size=_CHANNEL_FRAME,
            ping_interval=_PING_INTERVAL,
        )

    async def _hello(self, ws: Wire) -> list[int]:
        """Open or resume the session; return the ids of the calls to send (again)."""
        pending = sorted(self._calls)
        args: dict[str, Any] = {"pending": pending}
        if self.client_id is not None:
            args["client_id"] = self.client_id
            args["secret"] = self._secret
        elif self._grace is not None:
            args["grace_ms"] = self._grace * 1000.0
        if self._operator is not None:
            args["operator_token"] = self._operator
        ws.write(_dumps_text({"id": 0, "op": "hello", "args": args}).encode())
        async with asyncio.timeout(self._timeout):
            value = json.loads(await ws.recv())
        # The answer to hello may come with kept answers of calls made before the break.
        answer, *kept = value if isinstance(value, list) else (value,)
        if not answer.get("ok"):
            raise self._error(answer.get("error"))
        data = answer["data"]
        if self.client_id is None:
            self.client_id = data["client_id"]
            self._secret = data["secret"]
        self.grace = data["grace_ms"] / 1000.0
        for item in kept:
            self._answer(item)
        # What the server never received, and what was called while the hello was out.
        unknown = set(data["unknown"])
        for call_id in unknown:
            resent = self._calls.get(call_id)
            if resent is not None and resent.message["op"] == "release":  # it may be done
                self._resent.add(resent.message["args"]["lease_id"])
        last = pending[-1] if pending else 0
        return [i for i in sorted(self._calls) if i in unknown or i > last]

    async def _run(self, ready: asyncio.Future[None]) -> None:
        """Keep the channel open: connect, serve, reconnect within the grace.

        Among several replicas, a server that cannot be reached or that answers ``not_leader``
        sends the channel on to the next URL (or to the leader it names), within ``timeout``
        on start and within the grace afterwards; the new leader resumes the client session.
        """
        loop = asyncio.get_running_loop()
        servers = self.servers
        started = loop.time()
        lost_at: float | None = None
        delay = _RECONNECT_FIRST
        last: KlockError | None = None

        def out_of_time() -> bool:
            if not ready.done():
                return len(servers) == 1 or loop.time() - started > self._timeout
            assert lost_at is not None and self.grace is not None
            return loop.time() - lost_at > self.grace

        def fail(error: KlockError, *, lost: bool = True) -> None:
            """Stop trying: ``start`` raises ``error``, or every call fails from now on: with
            ClientGoneError when the channel was ``lost`` for the grace, else with ``error``
            (the server refused the session)."""
            if not ready.done():
                ready.set_exception(error)
            elif lost:
                self._give_up(
                    ClientGoneError(
                        f"the channel to {self.url} broke and could not be reopened within the "
                        f"grace period ({self.grace:g}s; last error: {error.message}); the "
                        "server released this client's leases"
                    )
                )
            else:
                self._give_up(error)

        async def pause() -> None:
            nonlocal delay
            if len(servers) > 1:
                wait = servers.backoff()
            else:
                wait, delay = delay, min(delay * 2, _RECONNECT_MAX)
            if wait:
                await asyncio.sleep(wait)  # a reconnect delay, not a synchronisation

        while True:
            url = self.url
            try:
                ws = await self._connect()
            except Exception as exc:
                last = self._connect_error(exc)
                servers.failed(url)
                if out_of_time():
                    fail(last)
                    return
                await pause()
                continue
            try:
                try:
                    unknown = await self._hello(ws)
                except NotLeaderError as exc:  # a follower: on to the leader it names
                    last = exc
                    if exc.leader is not None:
                        servers.follow(exc.leader)
                    else:
                        servers.failed(url)
                    if len(servers) == 1 and ready.done():
                        lost_at = lost_at if lost_at is not None else loop.time()
                    if out_of_time():
                        fail(exc)
                        return
                    await pause()
                    continue
                except (KlockError, TimeoutError, ValueError, KeyError) as exc:
                    fail(
                        exc if isinstance(exc, KlockError) else TransportError(repr(exc)),
                        lost=False,
                    )
                    return
                except Exception as exc:  # the connection broke again: as if it never opened
                    last = self._connect_error(exc)
                    get_logger().debug("channel.hello_failed", error=repr(exc))
                    servers.failed(url)
                    if out_of_time():
                        fail(last)
                        return
                    await pause()
                    continue
                servers.answered()
                if ready.done():
                    self._reconnects += 1
                    get_logger().info("channel.resumed", client=self.client_id, url=self.url)
                else:
                    ready.set_result(None)
                lost_at = None
                delay = _RECONNECT_FIRST
                self._out = [self._calls[i].message for i in unknown]
                self._ws = ws
                try:
                    await self._serve(ws)
                finally:
                    self._ws = None
                if self._closed:
                    return
                lost_at = loop.time()
                get_logger().info("channel.lost", client=self.client_id, url=self.url)
            finally:
                with contextlib.suppress(Exception):
                    await ws.close()

    def _give_up(self, error: KlockError) -> None:
        self._gone = error
        self._fail_all(error)

    def _connect_error(self, exc: Exception) -> TransportError:
        from websockets.exceptions import InvalidStatus

        if isinstance(exc, InvalidStatus):
            status = exc.response.status_code
            refusal = _refusal_of(exc.response.body)
            if status == 403 and refusal is not None:  # the server says why
                code, message = refusal
                return TransportError(
                    f"the klock server at {self.url} refused the channel (HTTP 403, {code}): "
                    f"{message}"
                )
            if status == 403:
                return TransportError(
                    f"the klock server at {self.url} refused the channel (HTTP 403): a wrong or "
                    "missing token (pass token=... as the server was started with), or a "
                    "host name it does not serve (klock serve --allowed-host)"
                )
            return TransportError(
                f"{self.url} answered the channel with HTTP {status}; is it a klock server "
                "recent enough to have one?"
            )
        return TransportError(
            f"cannot reach the klock server at {self.url} ({type(exc).__name__}: {exc}); "
            "is 'klock serve' running there?"
        )

    async def _serve(self, ws: Wire) -> None:
        """Take answers as they arrive and send what is queued, until the connection ends."""
        import orjson

        self._encode, self._decode = orjson.dumps, orjson.loads
        ws.serve(self._received)
        self._flush()  # the calls to send (again) after the hello
        await asyncio.shield(ws.closed)  # a cancelled caller leaves it to the wire's close

    def _received(self, data: bytes | str) -> None:
        try:
            value = self._decode(data)
            for answer in value if type(value) is list else (value,):
                self._answer(answer)
        except Exception as exc:  # the server sent nonsense: start over on a new connection
            get_logger().warning("channel.bad_answer", error=repr(exc), url=self.url)
            ws = self._ws
            if ws is not None:
                ws.abort()

    def _flush(self) -> None:
        """Write the calls queued in this turn as one frame (a JSON array when several)."""
        self._flushing = False
        self._write_out()

    def _write_out(self) -> None:
        out, self._out = self._out, []
        ws = self._ws
        if out and ws is not None:  # else: resent after the next hello (see _hello)
            ws.write(self._encode(out[0] if len(out) == 1 else out))

    def _answer(self, answer: dict[str, Any]) -> None:
        pending = self._calls.pop(answer["id"], None) if answer.get("id") is not None else None
        if pending is None:
            if not answer.get("ok", True):
                get_logger().warning("channel.error", error=answer.get("error"))
            return
        future = pending.future
        if future.done():
            return
        if answer["ok"]:
            future.set_result(answer["data"])
        elif not self._again(pending, answer["error"]):
            future.set_exception(self._error(answer["error"]))

    def _again(self, pending: _Pending, error: Any) -> bool:
        """Send a keyed acquire once more when the server lost its answer (answered, but the
        answer went with a broken connection and was no longer kept for the resume): its
        request key gets the same grant back, never a second one."""
        message = pending.message
        if (
            pending.again
            or message["op"] != "acquire"
            or "request_key" not in message["args"]
            or not isinstance(error, Mapping)
            or error.get("code") != TransportError.code
        ):
            return False
        pending.again = True
        call_id = next(self._ids)
        message = pending.message = {**message, "id": call_id}
        self._calls[call_id] = pending
        self._answer_by(call_id)
        self._queue(message)
        return True

    def _error(self, payload: Any) -> KlockError:
        if not isinstance(payload, Mapping):
            return TransportError(f"{self.url} sent a malformed error: {payload!r}")
        error = error_from_payload(payload)
        if type(error) is KlockError and payload.get("code") == "internal":
            return TransportError(error.message)
        return error

    # ---------------------------------------------------------------- calls

    def _check_open(self) -> None:
        if self._gone is not None:
            raise self._gone
        if self._runner is None:
            if self._closed:
                raise KernelClosedError("the connection to the klock server was closed")
            raise KernelClosedError("not connected; use 'async with Klock.connect(url)'")

    def _send(self, op: str, args: dict[str, Any]) -> tuple[int, asyncio.Future[Any]]:
        self._check_open()
        call_id = next(self._ids)
        message = {"id": call_id, "op": op, "args": args}
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = _Pending(message, future)
        self._queue(message)
        return call_id, future

    def _queue(self, message: dict[str, Any]) -> None:
        """Write ``message`` with the others of this turn (at once when a chunk is full)."""
        out = self._out
        out.append(message)
        if len(out) >= _CHUNK:  # the server starts on these while this turn goes on
            self._write_out()
        elif not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _call(self, op: str, args: dict[str, Any]) -> Any:
        """Send one call and return its answer's data, or raise its typed error (a
        :class:`TransportError` when no answer comes within the backend's timeout)."""
        call_id, future = self._send(op, args)
        self._answer_by(call_id)
        return await future

    def _answer_by(self, call_id: int) -> None:
        """Fail the call if its answer has not come within the backend's timeout."""
        calls = self._calls
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in calls:  # answered
            deadlines.popleft()
        loop = asyncio.get_running_loop()
        deadlines.append((loop.time() + self._timeout, call_id))
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(deadlines[0][0], self._overdue)

    def _overdue(self) -> None:
        """Fail the calls whose answer is overdue; wait for the next deadline."""
        self._deadline_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        calls = self._calls
        deadlines = self._deadlines
        while deadlines:
            at, call_id = deadlines[0]
            pending = calls.get(call_id)
            if pending is not None and not pending.future.done():
                if at > now:
                    self._deadline_timer = loop.call_at(at, self._overdue)
                    return
                del calls[call_id]
                pending.future.set_exception(
                    TransportError(
                        f"the klock server at {self.url} did not answer "
                        f"{pending.message['op']} within {self._timeout:g}s; it may be "
                        "overloaded or stuck"
                    )
                )
            deadlines.popleft()

    async def _long(self, op: str, args: dict[str, Any]) -> Any:
        """A call that may wait long: cancelling the caller withdraws it on the server."""
        call_id, future = self._send(op, args)
        sent = self._calls[call_id]
        try:
            return await future
        except asyncio.CancelledError:
            call_id = sent.message["id"]  # a new one if it was sent again (see _again)
            pending = self._calls.get(call_id)
            if pending is not None and pending.future.cancelled():
                # The caller's cancellation cancelled the future: the answer, which tells
                # whether the call was granted before its withdrawal, goes to a new one.
                future = pending.future = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._abandon(call_id, future))
            raise

    async def _abandon(self, call_id: int, future: asyncio.Future[Any]) -> None:
        """Withdraw a call whose caller left, and give back a grant that crossed it."""
        try:
            async with asyncio.timeout(min(self._timeout, _ABANDON_SECONDS)):
                if not future.done():
                    with contextlib.suppress(KlockError):
                        await self._call("withdraw", {"call": call_id})
                data = await future
        except (KlockError, TimeoutError, asyncio.CancelledError):
            self._calls.pop(call_id, None)
            return
        for lease in data.get("leases", ()) if isinstance(data, Mapping) else ():
            with contextlib.suppress(KlockError):
                await self._call("release", {"lease_id": lease["lease_id"]})

    async def barrier(self) -> Statistics:
        """Wait until the scheduler has decided every call this client sent so far.

        The channel delivers calls in order and the server hands them to the scheduler in
        that order, so statistics asked for now are taken after all of them.
        """
        return await self.statistics()

    # ---------------------------------------------------------------- Backend

    async def register_agent(self, agent_id: str, priority: int | None) -> AgentInfo:
        """Register an agent; it belongs to this client session from now on.

        Raises:
            InvalidRequestError: empty id or non-integer priority.
            AgentExistsError: the id exists with another priority.
            ForeignAgentError: another client session registered the id.
            TransportError: the server cannot be reached.
        """
        args: dict[str, Any] = {"agent_id": agent_id, "priority": priority}
        if not self._ask_credentials:
            args["credential"] = False
        data = await self._call("register", args)
        credential = data.get("credential")
        if isinstance(credential, str):
            self.credentials[agent_id] = credential
            self._rest._credentials[agent_id] = credential  # REST calls of this client
        return AgentInfo(data["agent_id"], data["ts"])

    async def acquire(
        self,
        agent_id: str,
        session_id: str,
        intents: Sequence[Intent],
        *,
        ttl: float,
        wait: bool = True,
        timeout: float | None = None,
        isolation: IsolationLevel | None = None,
        agent_view: bool = False,
    ) -> tuple[LeaseInfo, ...]:
        """Request leases; see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseDied: Wait-Die refused the request.
            LeaseWouldWait: ``wait`` is false and the request would have to queue.
            AcquireTimeoutError: ``timeout`` ran out; the request was withdrawn.
            CausalViolationError: a stale write in a SERIALIZABLE session.
            InvalidRequestError: bad input; nothing changed.
            UnknownAgentError: ``agent_id`` was never registered.
            ForeignAgentError: another client session registered ``agent_id``.
            TransportError: the server cannot be reached.
        """
        ttl = validate_ttl(ttl)
        timeout = validate_timeout(timeout)
        args = {
            "agent_id": agent_id,
            "session_id": session_id,
            "intents": [
                {"resource": str(intent.resource), "predicate": intent.predicate.value}
                for intent in intents
            ],
            "ttl_ms": ttl * 1000.0,
            "wait": wait,
            "timeout_ms": None if timeout is None else timeout * 1000.0,
        }
        if isolation is not None:  # absent: join the session as the server knows it
            args["isolation"] = isolation.value
        if agent_view:
            args["agent_view"] = True
        # Resent as it is to a new leader: the server grants the key once.
        args["request_key"] = self._request_key()
        if wait:
            data = await self._long("acquire", args)
        else:
            data = await self._call("acquire", args)
        leases = tuple(_lease(lease) for lease in data["leases"])
        held = self._held
        for info in leases:
            held[info.id] = info
        while len(held) > _LEASES_KEPT:  # leases that ended without a release from here
            del held[next(iter(held))]
        return leases

    def release_nowait(self, lease_id: str, agent_id: str) -> bool:
        """Always False: the holder learns from the answer whether its lease was lost."""
        return False

    async def release(
        self, lease_id: str, agent_id: str | None = None, *, record_write: bool | None = None
    ) -> LeaseInfo:
        """End a lease; see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseNotFoundError: not active.
            NotLeaseOwnerError: ``agent_id`` is not the holder.
            TransportError: the server cannot be reached.
        """
        known = self._held.get(lease_id)
        holder = agent_id if agent_id is not None or known is None else known.agent_id
        args: dict[str, Any] = {"lease_id": _lease_id(lease_id)}
        if record_write is not None:  # absent: the kernel decides
            args["record_write"] = record_write
        if holder is not None:
            args["agent_id"] = holder
        try:
            data = await self._call("release", args)
        except LeaseNotFoundError:
            resent = args["lease_id"] in self._resent
            self._resent.discard(args["lease_id"])
            if not resent or known is None:
                raise
            data = None  # resent to a new leader: the first send released it
        if self._resent:
            self._resent.discard(args["lease_id"])
        self._held.pop(lease_id, None)
        if data is None:
            assert known is not None
            return with_state(known, LeaseState.RELEASED)
        return _lease(data)

    async def heartbeat(
        self, lease_id: str, agent_id: str | None = None, ttl: float | None = None
    ) -> LeaseInfo:
        """Extend a lease; see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseNotFoundError: not active.
            NotLeaseOwnerError: ``agent_id`` is not the holder.
            InvalidTTLError: bad ttl.
            TransportError: the server cannot be reached.
        """
        known = self._held.get(lease_id)
        holder = agent_id if agent_id is not None or known is None else known.agent_id
        args: dict[str, Any] = {"lease_id": _lease_id(lease_id)}
        if holder is not None:
            args["agent_id"] = holder
        if ttl is not None:
            args["ttl_ms"] = validate_ttl(ttl) * 1000.0
        return _lease(await self._call("heartbeat", args))

    async def release_session(self, agent_id: str, session_id: str) -> int:
        """Release a session's leases; see :class:`~klock_async.backend.Backend`."""
        data = await self._call("release_session", {"agent_id": agent_id, "session_id": session_id})
        return int(data["released"])

    async def wait_ended(self, lease_id: str, timeout: float | None) -> LeaseInfo | None:
        """Wait for a lease to end; see :class:`~klock_async.backend.Backend`.

        Raises:
            LeaseNotFoundError: the lease is not active.
            TransportError: the server cannot be reached.
        """
        if timeout is not None and not timeout >= 0:
            raise InvalidRequestError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        args = {
            "lease_id": _lease_id(lease_id),
            "timeout_ms": None if timeout is None else timeout * 1000.0,
        }
        data = await self._long("wait_ended", args)
        return None if not data["ended"] else _lease(data["lease"])

    async def revoke(self, lease_id: str) -> LeaseInfo:
        """Revoke a lease; see :class:`~klock_async.backend.Backend`."""
        return _lease(await self._call("revoke", {"lease_id": _lease_id(lease_id)}))

    async def evict(self, agent_id: str) -> int:
        """Revoke an agent's leases; see :class:`~klock_async.backend.Backend`."""
        return int((await self._call("evict", {"agent_id": agent_id}))["evicted"])

    async def leases(self) -> tuple[LeaseInfo, ...]:
        """Snapshot of the active leases (one atomic snapshot)."""
        return tuple(_lease(data) for data in await self._call("leases", {}))

    async def agents(self) -> tuple[AgentInfo, ...]:
        """Snapshot of the registered agents."""
        return tuple(AgentInfo(d["agent_id"], d["ts"]) for d in await self._call("agents", {}))

    async def statistics(self) -> Statistics:
        """Snapshot of the counters."""
        return _statistics(await self._call("statistics", {}))

    async def waiters(self) -> tuple[WaiterInfo, ...]:
        """Snapshot of the queued requests and what each waits for."""
        return tuple(_waiter(item) for item in await self._call("waiters", {}))

    async def clock_read(self, path: str, agent_id: str) -> VectorClock:
        """Read a path's clock as an agent; see :class:`~klock_async.backend.Backend`."""
        data = await self._call("clock_read", {"path": path, "agent_id": agent_id})
        return VectorClock(data["clock"])

    async def clock_write(self, path: str, agent_id: str, *, strict: bool = True) -> VectorClock:
        """Record a write; see :class:`~klock_async.backend.Backend`."""
        data = await self._call(
            "clock_write", {"path": path, "agent_id": agent_id, "strict": strict}
        )
        return VectorClock(data["clock"])

    async def clock_status(self) -> ClockStatus:
        """Tracked paths and conflict count."""
        data = await self._call("clock_status", {})
        return ClockStatus(tuple(data["tracked_paths"]), int(data["conflict_count"]))

    def events(self, after: int | None = None) -> EventStream:
        """The server's events (``GET /events``, Server-Sent Events) from now on, or after
        the event ``after``."""
        self._check_open()
        return _RemoteEvents(self._rest, after)


def _dumps_text(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"))
