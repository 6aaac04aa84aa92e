"""The session channel's WebSocket: the client's, and the server's.

Two client implementations of one small interface (:class:`Wire`): frames are written the
moment the caller has one, and messages are handed to a callback as they arrive.

- :class:`DirectWire`: websockets' Sans-I/O protocol on an asyncio transport, for servers
  reached directly. A message is handled in the transport's own callback, and a frame goes
  out in the caller's step: no reader or writer task to wake per frame (one turn of the event
  loop less each way; docs/benchmarks.md has the figures).
- :class:`LibraryWire`: websockets' own asyncio client, for servers reached through a proxy
  (``HTTPS_PROXY``, ``ALL_PROXY``, ...), which it speaks to.

Both keep the connection alive with pings: one not answered within the ping interval ends it.

The server's side is :class:`ServerWire`, on the same Sans-I/O layer and with the same pings:
``klock serve`` gives it the connections uvicorn upgrades (see :mod:`klock_async.channel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

__all__ = ["DirectWire", "LibraryWire", "ServerWire", "Wire", "open_wire", "proxied"]

OnMessage = Callable[[bytes | str], None]
_CLOSE_SECONDS = 1.0  # how long a closing handshake may take before the connection is cut


class Wire:
    """One WebSocket connection of the channel.

    Messages received before :meth:`serve` are kept for :meth:`recv`; from :meth:`serve` on,
    each goes to the callback as it arrives. :attr:`closed` is done once the connection is
    gone, however it ended.
    """

    closed: asyncio.Future[None]

    def write(self, data: bytes) -> None:
        """Send one binary frame now (dropped once the connection is closing)."""
        raise NotImplementedError

    async def recv(self) -> bytes | str:
        """The next message, before :meth:`serve` was called."""
        raise NotImplementedError

    def serve(self, on_message: OnMessage) -> None:
        """Hand every message from now on (and those kept) to ``on_message``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close the connection (a closing handshake, cut short after a second)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Cut the connection at once, without a closing handshake (as a broken network)."""
        raise NotImplementedError


class _Endpoint(asyncio.Protocol):
    """websockets' Sans-I/O protocol on an asyncio transport: what both sides share.

    Messages are handed on in the transport's own callback and frames written in the
    caller's step. Pings keep the connection alive: one not answered within the ping interval
    cuts it (not while reading is paused because the peer does not read what is written).
    Subclasses say what a handshake event means (:meth:`_handshake`) and where a message goes
    (:meth:`_message`).
    """

    def __init__(self, protocol: Protocol, ping_interval: float) -> None:
        self._protocol = protocol
        self._ping_interval = ping_interval
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self._parts: list[bytes] = []  # a fragmented message so far
        self._ping: bytes | None = None  # the ping waiting for its pong
        self._keepalive: asyncio.TimerHandle | None = None
        self._cut: asyncio.TimerHandle | None = None
        self._paused = False  # reading paused: the peer does not read what is written

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the interface without deriving from asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        protocol = self._protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        self._send_pending()
        for event in events:
            if type(event) is Frame:
                self._frame(event)
            else:
                self._handshake(event)
        if protocol.close_expected() and self._cut is None:
            self._cut_later()

    def eof_received(self) -> bool | None:
        self._protocol.receive_eof()
        self._send_pending()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for timer in (self._keepalive, self._cut):
            if timer is not None:
                timer.cancel()
        self._keepalive = self._cut = None
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        # The peer reads less than is written to it: read nothing more from it (no new calls
        # to answer) until it has caught up.
        if self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and self._paused:
            self._paused = False
            self._transport.resume_reading()

    # ------------------------------------------------------------ both sides

    def write(self, data: bytes) -> None:
        """Send one binary frame now (dropped once the connection is closing)."""
        if self._protocol.state is State.OPEN and self._transport is not None:
            self._protocol.send_binary(data)
            self._send_pending()

    def abort(self) -> None:
        """Cut the connection at once, without a closing handshake (as a broken network)."""
        if self._transport is not None:
            self._transport.abort()

    def _handshake(self, event: object) -> None:
        raise NotImplementedError

    def _message(self, data: bytes) -> None:
        raise NotImplementedError

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.BINARY or opcode is Opcode.TEXT or opcode is Opcode.CONT:
            if not frame.fin:
                self._parts.append(bytes(frame.data))
                return
            data = bytes(frame.data)
            if self._parts:
                data = b"".join((*self._parts, data))
                self._parts = []
            self._message(data)
        elif opcode is Opcode.PONG and bytes(frame.data) == self._ping:
            self._ping = None

    def _send_pending(self) -> None:
        transport = self._transport
        if transport is None:
            return
        chunks = self._protocol.data_to_send()
        if not chunks:
            return
        if chunks[-1] == b"":  # the end of the stream: half-close
            data = b"".join(chunks[:-1])
            if data:
                transport.write(data)
            if transport.can_write_eof():
                transport.write_eof()
            return
        transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _start_pings(self) -> None:
        if self._ping_interval > 0:  # 0: no pings (the peer's, if any, are still answered)
            self._keepalive = self._loop.call_later(self._ping_interval, self._beat)

    def _beat(self) -> None:
        """Every ping interval: a ping still unanswered ends the connection; else ping."""
        self._keepalive = None
        transport = self._transport
        if transport is None:
            return
        if self._ping is not None and not self._paused:
            transport.abort()  # the peer is gone (or cut off)
            return
        if self._protocol.state is State.OPEN and self._ping is None:
            self._ping = os.urandom(4)
            self._protocol.send_ping(self._ping)
            self._send_pending()
        self._keepalive = self._loop.call_later(self._ping_interval, self._beat)

    def _cut_later(self) -> None:
        def cut() -> None:
            if self._transport is not None:
                self._transport.abort()

        self._cut = self._loop.call_later(_CLOSE_SECONDS, cut)


class DirectWire(_Endpoint, Wire):
    """A WebSocket on websockets' Sans-I/O :class:`~websockets.client.ClientProtocol`."""

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str],
        max_size: int,
        ping_interval: float,
    ) -> None:
        self._uri = parse_uri(url)
        super().__init__(ClientProtocol(self._uri, max_size=max_size), ping_interval)
        self._client = cast(ClientProtocol, self._protocol)
        self._headers = headers
        self.opened: asyncio.Future[None] = self._loop.create_future()
        self._kept: list[bytes | str] = []
        self._arrived: asyncio.Future[None] | None = None
        self._on_message: OnMessage | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        request = self._client.connect()
        for name, value in self._headers.items():
            if name in request.headers:  # e.g. websockets' own User-Agent
                del request.headers[name]
            request.headers[name] = value
        self._client.send_request(request)
        self._send_pending()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.opened.done():
            self.opened.set_exception(
                self._protocol.handshake_exc
                or ConnectionError(f"the connection closed during the handshake ({exc!r})")
            )
            self.opened.exception()  # retrieved: open_wire raises it
        self._wake()

    # ------------------------------------------------------------ Wire

    async def recv(self) -> bytes | str:
        while not self._kept:
            if self.closed.done():
                raise ConnectionError("the WebSocket closed before an answer came")
            self._arrived = self._loop.create_future()
            await self._arrived
        return self._kept.pop(0)

    def serve(self, on_message: OnMessage) -> None:
        kept, self._kept = self._kept, []
        self._on_message = on_message
        for message in kept:
            on_message(message)

    async def close(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(1000)
            self._send_pending()
        try:
            if not self.closed.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CLOSE_SECONDS):
                        await asyncio.shield(self.closed)
        finally:
            if self._transport is not None:  # no answer in time (or the closer was cancelled)
                self._transport.abort()

    # ------------------------------------------------------------ internals

    def _handshake(self, event: object) -> None:
        if not isinstance(event, Response) or self.opened.done():
            return
        failure = self._protocol.handshake_exc
        if failure is not None:
            self.opened.set_exception(failure)
            self.opened.exception()
            return
        self.opened.set_result(None)
        self._start_pings()

    def _message(self, data: bytes) -> None:
        on_message = self._on_message
        if on_message is not None:
            on_message(data)
        else:
            self._kept.append(data)
            self._wake()

    def _wake(self) -> None:
        arrived, self._arrived = self._arrived, None
        if arrived is not None and not arrived.done():
            arrived.set_result(None)


class ServerWire(_Endpoint):
    """The server's side of a WebSocket, on websockets' Sans-I/O
    :class:`~websockets.server.ServerProtocol`, for a connection whose HTTP upgrade request
    arrives as its first bytes (as uvicorn hands over an upgraded connection).

    :meth:`_refuse` may refuse the handshake request; once accepted, :meth:`_opened` is
    called, then :meth:`_message` with each message. :attr:`closed` is done once the
    connection is gone.
    """

    def __init__(self, *, max_size: int, ping_interval: float) -> None:
        super().__init__(ServerProtocol(max_size=max_size), ping_interval)
        self._server = cast(ServerProtocol, self._protocol)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (what is written before goes out first); the
        connection is cut if the client does not finish it within a second."""
        if self._protocol.state is State.OPEN and self._transport is not None:
            self._protocol.send_close(code, reason)
            self._send_pending()
            if self._cut is None:
                self._cut_later()

    def _handshake(self, event: object) -> None:
        if not isinstance(event, Request):
            return
        server = self._server
        refusal = self._refuse(event)
        if refusal is None:
            response = server.accept(event)
        else:
            status, body = refusal
            response = server.reject(status, "")
            response.body = body
            del response.headers["Content-Type"]
            del response.headers["Content-Length"]
            response.headers["Content-Type"] = "application/json"
            response.headers["Content-Length"] = str(len(body))
        server.send_response(response)
        self._send_pending()
        if response.status_code != 101:  # refused, or not a valid WebSocket handshake
            if self._transport is not None:
                self._transport.close()
            return
        self._start_pings()
        self._opened()

    def _refuse(self, request: Request) -> tuple[int, bytes] | None:
        """The status and JSON body refusing ``request``, or None to accept it."""
        return None

    def _opened(self) -> None:
        """The handshake succeeded: messages may come."""


class LibraryWire(Wire):
    """A WebSocket on websockets' asyncio client (which speaks to proxies)."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        self._out: list[bytes] = []
        self._more = asyncio.Event()
        self._writer = loop.create_task(self._write())
        self._reader: asyncio.Task[None] | None = None

    def write(self, data: bytes) -> None:
        self._out.append(data)
        self._more.set()

    async def recv(self) -> bytes | str:
        message: bytes | str = await self._connection.recv()
        return message

    def serve(self, on_message: OnMessage) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read(on_message))

    async def close(self) -> None:
        for task in (self._writer, self._reader):
            if task is not None:
                task.cancel()
        with contextlib.suppress(Exception):
            await self._connection.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        self._connection.transport.abort()

    async def _read(self, on_message: OnMessage) -> None:
        try:
            async for message in self._connection:
                on_message(message)
        except Exception:  # the connection broke: closed says so
            pass
        finally:
            if not self.closed.done():
                self.closed.set_result(None)

    async def _write(self) -> None:
        try:
            while True:
                await self._more.wait()
                self._more.clear()
                out, self._out = self._out, []
                for data in out:
                    await self._connection.send(data)
        except Exception:  # the connection broke: the reader ends too
            with contextlib.suppress(Exception):
                await self._connection.close()


def proxied(url: str) -> bool:
    """Whether websockets would reach ``url`` through a proxy of the environment (``ws``,
    ``socks``, ``https`` or ``http`` ones, unless ``NO_PROXY`` says otherwise). A loopback
    server never is: no proxy can reach this machine's loopback."""
    uri = parse_uri(url)
    if uri.host == "localhost" or uri.host.startswith("127.") or uri.host in ("::1", "[::1]"):
        return False
    if urllib.request.proxy_bypass(f"{uri.host}:{uri.port}"):
        return False
    proxies = urllib.request.getproxies()
    schemes = ("wss", "socks", "https") if uri.secure else ("ws", "socks", "https", "http")
    return any(proxies.get(scheme) for scheme in schemes)


async def open_wire(
    url: str,
    *,
    headers: Mapping[str, str],
    timeout: float,
    max_size: int,
    ping_interval: float,
) -> Wire:
    """Open the channel's WebSocket to ``url`` (``ws://`` or ``wss://``).

    Raises:
        websockets.exceptions.InvalidStatus: the server refused the upgrade (e.g. 401).
        OSError, TimeoutError: the server cannot be reached in ``timeout`` seconds.
    """
    if proxied(url):
        from websockets.asyncio.client import connect

        connection = await connect(
            url,
            additional_headers={k: v for k, v in headers.items() if k != "User-Agent"},
            compression=None,
            open_timeout=timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_interval,
            close_timeout=_CLOSE_SECONDS,
            max_size=max_size,
            max_queue=None,
            user_agent_header=headers.get("User-Agent"),
        )
        return LibraryWire(connection)
    wire = DirectWire(url, headers=headers, max_size=max_size, ping_interval=ping_interval)
    uri = parse_uri(url)
    context = ssl.create_default_context() if uri.secure else None
    loop = asyncio.get_running_loop()
    transport: Any = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: wire, uri.host, uri.port, ssl=context
            )
            await wire.opened
    except BaseException:
        if transport is not None:
            transport.abort()
        raise
    return wire
