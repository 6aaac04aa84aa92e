"""The server's transport layer: uvicorn's HTTP protocol held by ``_ConnectionGuard`` (no
subclass), its read timer, and connections upgraded to WebSocket, which it leaves alone."""

from __future__ import annotations

import asyncio
import contextlib
import json

from serverutil import serve_in_thread
from websockets.asyncio.client import connect

from klock_async import server as server_module


def _upgraded(port: int) -> list[server_module._ConnectionGuard]:
    """The upgraded connections of the server on ``port`` (other tests' servers may have
    some of their own in the same process)."""
    return [
        guard
        for (server, _), guard in list(server_module._GUARDS.items())
        if server is not None
        and int(server[1]) == port
        and guard._transport.get_protocol() is not guard
    ]


async def test_an_upgraded_connection_outlives_the_read_timer() -> None:
    """The read timer of a connection upgraded to WebSocket closes nothing; the guard lets go."""
    stack = contextlib.ExitStack()
    running = await asyncio.to_thread(stack.enter_context, serve_in_thread())
    try:
        loop = running.server.servers[0].get_loop()
        url = running.url.replace("http://", "ws://") + "/channel"
        async with connect(url) as ws:
            await ws.send(json.dumps({"id": 0, "op": "hello"}))
            assert json.loads(await ws.recv())["ok"]
            (guard,) = _upgraded(int(running.url.rsplit(":", 1)[1]))

            async def time_out() -> None:
                guard._timed_out()  # what the timer does when read_timeout has passed

            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(time_out(), loop))
            await ws.send(json.dumps({"id": 1, "op": "statistics"}))
            answer = json.loads(await ws.recv())
            assert answer["id"] == 1 and answer["ok"]
            assert guard not in server_module._GUARDS.values()
    finally:
        await asyncio.to_thread(stack.close)


async def test_a_plain_connection_is_closed_by_the_read_timer() -> None:
    """The same timer on a connection that has no request in flight closes it."""
    stack = contextlib.ExitStack()
    running = await asyncio.to_thread(stack.enter_context, serve_in_thread())
    try:
        loop = running.server.servers[0].get_loop()
        host, port = running.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        sockname = writer.get_extra_info("sockname")[:2]
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")  # answered: the server has the connection
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)

        async def time_out() -> None:
            for (_, client), guard in list(server_module._GUARDS.items()):
                if client == (str(sockname[0]), int(sockname[1])):
                    guard._timed_out()

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(time_out(), loop))
        assert await reader.read() == b""  # closed by the server
        writer.close()
    finally:
        await asyncio.to_thread(stack.close)
