"""The channel's WebSocket (klock_async.websocket): real servers, a real proxy."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from serverutil import serve_in_thread, serve_subprocess

from klock_async import Klock, TransportError
from klock_async.remote import ChannelBackend
from klock_async.websocket import DirectWire, LibraryWire, proxied


async def test_an_idle_channel_answers_the_servers_pings() -> None:
    """A channel left idle for several of the server's ping intervals (1 s) is still the
    same connection: the client answered every ping."""
    with serve_in_thread() as server:
        backend = ChannelBackend(server.url)
        async with Klock(backend=backend) as klock:
            await klock.register_agent("idle")
            wire = backend._ws
            assert isinstance(wire, DirectWire)
            await asyncio.sleep(3.5)  # idle time: three pings of the server
            assert (await klock.statistics()).agents == 1
            assert backend._ws is wire and backend.reconnects == 0


async def test_the_client_finds_a_frozen_server_by_its_pings_and_resumes() -> None:
    """A server that stops answering (SIGSTOP) is found by the client's own pings: the
    connection is cut and, once the server runs again, the same client session resumes."""
    with serve_subprocess(extra=["--grace", "30"]) as server:
        backend = ChannelBackend(server.url, timeout=30)
        async with Klock(backend=backend) as klock:
            agent = await klock.register_agent("steady")
            lease = await agent.acquire("/frozen.py", "MUTATES", ttl=300)
            wire = backend._ws
            assert wire is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                await asyncio.wait_for(asyncio.shield(wire.closed), 10)  # cut by a ping
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert {info.id for info in await backend.leases()} == {lease.id}
            assert backend.reconnects == 1
            await lease.release()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction of a tunnel until it ends."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def connect_proxy(target_port: int) -> AsyncIterator[tuple[int, list[str]]]:
    """An HTTP proxy that tunnels every CONNECT to 127.0.0.1:target_port (whatever host the
    request names); yields its port and the CONNECT lines it served."""
    seen: list[str] = []

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0].decode())
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    proxy = await asyncio.start_server(tunnel, "127.0.0.1", 0)
    try:
        yield proxy.sockets[0].getsockname()[1], seen
    finally:
        proxy.close()


async def test_a_server_behind_a_tls_proxy_is_reached_over_wss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``https://`` makes the channel a ``wss://`` WebSocket (a server behind a proxy that
    terminates TLS): the client verifies the certificate against the system's trust store
    (here a CA of the test's own, given by SSL_CERT_FILE), and refuses one it cannot verify."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with serve_in_thread() as server:
        port = int(server.url.rsplit(":", 1)[1])

        async def terminate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

        proxy = await asyncio.start_server(terminate, "127.0.0.1", 0, ssl=context)
        try:
            url = f"https://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
            with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
                async with Klock.connect(url, timeout=10):
                    pass  # the test's CA is not trusted yet
            trusted = tmp_path / "ca.pem"
            ca.cert_pem.write_to_path(str(trusted))
            monkeypatch.setenv("SSL_CERT_FILE", str(trusted))
            backend = ChannelBackend(url, timeout=10)
            async with Klock(backend=backend) as klock:
                assert isinstance(backend._ws, DirectWire)
                agent = await klock.register_agent("tls")
                lease = await agent.acquire("/tls.py", "MUTATES", ttl=30)
                assert [info.id for info in await klock.leases()] == [lease.id]
                await lease.release()
        finally:
            proxy.close()


async def test_a_server_behind_a_proxy_is_reached_through_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a proxy in the environment, the channel goes through it (websockets' own client,
    which speaks to proxies); NO_PROXY and loopback servers go direct."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    with serve_in_thread(allowed_hosts=["klock.invalid"]) as server:
        port = int(server.url.rsplit(":", 1)[1])
        async with connect_proxy(port) as (proxy_port, seen):
            for name in ("HTTP_PROXY", "http_proxy"):
                monkeypatch.setenv(name, f"http://127.0.0.1:{proxy_port}")
            url = f"http://klock.invalid:{port}"
            assert proxied(url.replace("http", "ws", 1))
            assert not proxied(server.url.replace("http", "ws", 1))
            backend = ChannelBackend(url, timeout=10)
            async with Klock(backend=backend) as klock:
                agent = await klock.register_agent("far")
                lease = await agent.acquire("/proxied.py", "MUTATES", ttl=30)
                await lease.release()
                assert isinstance(backend._ws, LibraryWire)
            assert seen == [f"CONNECT klock.invalid:{port} HTTP/1.1"]
            monkeypatch.setenv("NO_PROXY", "klock.invalid")
            assert not proxied(url.replace("http", "ws", 1))


def test_the_channel_runs_on_uvloop() -> None:
    """A client whose event loop is uvloop's (whose transports do not derive from
    asyncio.Transport) opens the channel and takes and releases a lease."""
    uvloop = pytest.importorskip("uvloop")

    async def main(url: str) -> str:
        async with Klock.connect(url) as klock:
            agent = await klock.register_agent("on-uvloop")
            lease = await agent.acquire("/uvloop.py", "MUTATES", ttl=30)
            await lease.release()
            return type(klock.backend._ws).__name__  # type: ignore[attr-defined]

    with serve_in_thread() as server:
        assert uvloop.run(main(server.url)) == "DirectWire"
