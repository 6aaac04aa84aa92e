"""The client's HTTP/1.1 path (``_Http1``): every way a response can end, stale kept-alive
connections, header values, proxies.

The klock server always answers with Content-Length, so the other framings are served by a
small scripted HTTP server on a loopback port; each script reads the requests it gets and
writes exact bytes back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from serverutil import serve_in_thread

from klock_async.errors import InvalidRequestError, TransportError
from klock_async.remote import RemoteBackend, _Http1

OK = b'{"success":true,"data":{"n":1},"error":null}'
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Seen"], Awaitable[None]]


@dataclass
class Seen:
    """What the scripted server received."""

    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


async def read_request(reader: asyncio.StreamReader, seen: Seen) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    seen.requests.append(head.split(b" ", 1)[0])
    return head


def fixed(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        try:
            await script(reader, writer, seen)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


async def test_chunked_response_with_trailers_keeps_the_connection_in_step() -> None:
    """A chunked answer with trailer fields is read whole; the next answer on the same
    connection is read from its first byte."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        await read_request(reader, seen)
        half = len(OK) // 2
        writer.write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"
            + b"%x;ext=1\r\n%s\r\n" % (half, OK[:half])
            + b"%x\r\n%s\r\n" % (len(OK) - half, OK[half:])
            + b"0\r\nx-checksum: abc\r\nx-other: def\r\n\r\n"
        )
        await read_request(reader, seen)
        writer.write(fixed(b'{"second":true}'))
        await writer.drain()
        await reader.read()

    async with scripted(script) as (url, seen):
        wire = _Http1(url, None, 5.0)
        try:
            assert await wire.send("GET", "/a", None, "r1", 5.0) == (200, OK)
            assert await wire.send("GET", "/b", None, "r2", 5.0) == (200, b'{"second":true}')
        finally:
            await wire.aclose()
    assert seen.connections == 1


async def test_close_delimited_response_is_read_to_the_end() -> None:
    """An answer without length ends with the connection; the next request opens another."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        await read_request(reader, seen)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + OK)
        await writer.drain()

    async with scripted(script) as (url, seen):
        wire = _Http1(url, None, 5.0)
        try:
            assert await wire.send("GET", "/a", None, "r1", 5.0) == (200, OK)
            assert await wire.send("GET", "/b", None, "r2", 5.0) == (200, OK)
        finally:
            await wire.aclose()
    assert seen.connections == 2


def _stale_after_first(seen_answers: list[int]) -> Script:
    """Answer the first request of the first connection, then drop the next unanswered;
    every later connection answers."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        await read_request(reader, seen)
        writer.write(fixed(OK))
        await writer.drain()
        seen_answers.append(seen.connections)
        if seen.connections == 1:
            await read_request(reader, seen)  # the reused connection: closed, no answer
            return
        await reader.read()

    return script


async def test_a_safe_request_on_a_stale_connection_is_sent_again() -> None:
    """A GET whose kept-alive connection was closed unanswered is retried on a new one."""
    async with scripted(_stale_after_first([])) as (url, seen):
        wire = _Http1(url, None, 5.0)
        try:
            await wire.send("GET", "/a", None, "r1", 5.0)
            assert await wire.send("GET", "/b", None, "r2", 5.0) == (200, OK)
        finally:
            await wire.aclose()
    assert seen.requests == [b"GET", b"GET", b"GET"]


async def test_post_on_a_stale_connection_is_not_sent_again() -> None:
    """POST /intents whose connection closed unanswered fails; it is never sent twice."""
    async with scripted(_stale_after_first([])) as (url, seen):
        wire = _Http1(url, None, 5.0)
        try:
            await wire.send("GET", "/a", None, "r1", 5.0)
            with pytest.raises(ConnectionResetError, match="not sent again"):
                await wire.send("POST", "/intents", b"{}", "r2", 5.0)
        finally:
            await wire.aclose()
    assert seen.requests == [b"GET", b"POST"]


@pytest.mark.parametrize("bad", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\0b", "\u2603"])
async def test_header_values_with_line_breaks_are_refused(bad: str) -> None:
    """A token or credential that would inject a header is a typed error; nothing is sent."""
    with pytest.raises(InvalidRequestError):
        RemoteBackend("http://127.0.0.1:9", token=bad)
    async with scripted(_stale_after_first([])) as (url, seen):
        wire = _Http1(url, None, 5.0)
        try:
            with pytest.raises(InvalidRequestError):
                await wire.send("GET", "/a", None, "r1", 5.0, credential=bad)
        finally:
            await wire.aclose()
    assert seen.requests == []


async def test_http_proxy_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTP_PROXY set, requests go through the proxy (here the server itself, which
    takes absolute-form targets): a host that does not resolve is reached."""
    with serve_in_thread(allowed_hosts=["klock.invalid"]) as server:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, server.url)
        backend = RemoteBackend("http://klock.invalid:9", timeout=10)
        await backend.start()
        try:
            assert (await backend.statistics()).agents == 0
        finally:
            await backend.aclose()
        monkeypatch.setenv("NO_PROXY", "klock.invalid")
        bypassed = RemoteBackend("http://klock.invalid:9", timeout=10)
        with pytest.raises(TransportError):
            await bypassed.start()


async def test_a_loopback_server_is_never_proxied(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY set to a dead address does not keep a client from a loopback server, its
    event stream (GET /events) included."""
    with serve_in_thread() as server:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")
        backend = RemoteBackend(server.url, timeout=10)
        await backend.start()
        try:
            await backend.register_agent("near", None)
            stream = backend.events(after=0)
            try:
                event = await anext(aiter(stream))
            finally:
                await stream.aclose()
            assert event.agent_id == "near"
        finally:
            await backend.aclose()
