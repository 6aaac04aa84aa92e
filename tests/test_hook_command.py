"""``klock hook``: the command side of the hooks (what it imports, how it speaks HTTP)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

from klock_async.hook_command import HARNESS_NAMES, HookFailure, post
from klock_async.hooks import HARNESSES


def test_harness_names_match_the_core() -> None:
    """The command offers exactly the harnesses the core knows."""
    assert set(HARNESS_NAMES) == set(HARNESSES)


def test_hook_command_imports_only_what_it_needs() -> None:
    """The command path loads no asyncio, HTTP library, typing or kernel module."""
    code = (
        "import sys\n"
        "from klock_async import cli, hook_command\n"
        "heavy = ('asyncio', 'typing', 'http.client', 'httpx', 'structlog', 'anyio',\n"
        "         'klock_async.api', 'klock_async.hooks', 'shutil')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []


def _one_shot_server(answer: bytes) -> tuple[str, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{port}", thread


def test_post_reads_a_chunked_answer() -> None:
    """A chunked response body is put back together."""
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"a"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n'
    )
    url, thread = _one_shot_server(answer)
    assert post(url, "/hooks/claude-code", b"{}", None, 10.0) == (200, b'{"a": 1}')
    thread.join(10)


def test_post_refuses_an_answer_that_is_not_http() -> None:
    """Garbage from the server is a HookFailure (the hook then exits 2)."""
    url, thread = _one_shot_server(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(HookFailure, match="not HTTP"):
        post(url, "/x", b"{}", None, 10.0)
    thread.join(10)


@pytest.mark.parametrize("url", ["https://example.com", "ftp://x", "127.0.0.1:3100"])
def test_post_needs_an_http_url(url: str) -> None:
    """Only http:// URLs are spoken (loopback or a trusted network; TLS needs a proxy)."""
    with pytest.raises(HookFailure, match="http://"):
        post(url, "/x", b"{}", None, 1.0)
