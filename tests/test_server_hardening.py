"""``klock serve`` under hostile input, slow sockets, damaged journals and a full disk.

Cases that involve a kill, a disk or sockets run a real ``klock serve`` process
(tests/serverutil.py); the rest run the app on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import structlog
from serverutil import READY_TIMEOUT, ChildServer, serve_in_thread, serve_subprocess

from klock_async.journal import SqliteJournal, backup


def ok(response: httpx.Response) -> Any:
    body = response.json()
    assert response.status_code == 200, body
    return body["data"]


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert response.status_code == status, body
    assert body["success"] is False and body["code"] == code, body
    return body


def lease(agent_id: str, path: str, **fields: Any) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "session_id": f"{agent_id}-s",
        "resource": f"FILE:{path}",
        "predicate": "MUTATES",
        "ttl": 60_000,
        **fields,
    }


def serve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``klock serve`` expecting it to exit by itself (it cannot start)."""
    return subprocess.run(
        [sys.executable, "-m", "klock_async", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("klock serve:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ------------------------------------------------------------------ findings 1 and 2


def test_one_request_cannot_stop_a_journaled_kernel(tmp_path: Path) -> None:
    """Lone surrogates and out-of-range priorities are refused; the --db server keeps serving."""
    with serve_subprocess(tmp_path / "k.db") as child, httpx.Client(base_url=child.url) as http:
        for text in (
            '{"agent_id": "\\ud800"}',
            '{"agent_id": "a", "priority": 9223372036854775808}',
            '{"agent_id": "a", "priority": 9223372036854775807}',
        ):
            response = http.post(
                "/agents", content=text.encode(), headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, response.text
        ok(http.get("/health"))
        ok(http.post("/agents", json={"agent_id": "after"}))
        ok(http.post("/leases", json=lease("after", "/x.py")))


def test_largest_priority_leaves_room_for_later_ages(tmp_path: Path) -> None:
    """After the largest allowed priority, automatic ages still fit, also after a restart."""
    db = tmp_path / "k.db"
    with serve_subprocess(db) as child, httpx.Client(base_url=child.url) as http:
        ok(http.post("/agents", json={"agent_id": "top", "priority": 2**62}))
        ok(http.post("/agents", json={"agent_id": "next"}))
    with serve_subprocess(db) as child, httpx.Client(base_url=child.url) as http:
        data = ok(http.post("/agents", json={"agent_id": "after-restart"}))
        assert data["ts"] == 2**62 + 2
        ok(http.get("/health"))


# ------------------------------------------------------------------ finding 4: sockets


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    sock = socket.create_connection((parts.hostname, parts.port), timeout=READY_TIMEOUT)
    return sock


def _closed_by_server(sock: socket.socket) -> bytes:
    """Read until the server closes the connection (the socket timeout is only a bound)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            received += chunk
    return received


@pytest.fixture
def strict_server() -> Iterator[ChildServer]:
    """A server with a short read timeout and a small connection limit."""
    extra = ["--read-timeout", "0.5", "--keep-alive", "1", "--max-connections", "8"]
    with serve_subprocess(extra=extra) as child:
        yield child


def test_idle_and_slow_sockets_are_closed(strict_server: ChildServer) -> None:
    """Sockets that send nothing, or headers a byte at a time, are closed by the server."""
    idle = _connect(strict_server.url)
    slow = _connect(strict_server.url)
    try:
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
        slow.sendall(request)
        with contextlib.suppress(OSError):
            while True:  # a byte now and then never completes the headers
                slow.sendall(b"a")
                slow.settimeout(0.1)
                with contextlib.suppress(TimeoutError):
                    if slow.recv(1) == b"":
                        break
        slow.settimeout(READY_TIMEOUT)
        assert _closed_by_server(idle) == b""
        assert _closed_by_server(slow) == b""
    finally:
        idle.close()
        slow.close()
    with httpx.Client(base_url=strict_server.url) as http:
        ok(http.get("/health"))


@pytest.fixture
def small_server() -> Iterator[ChildServer]:
    """A server with a small connection limit (and a read timeout no test step reaches)."""
    extra = ["--read-timeout", "60", "--max-connections", "8"]
    with serve_subprocess(extra=extra) as child:
        yield child


def test_connections_beyond_the_limit_are_refused(small_server: ChildServer) -> None:
    """Past --max-connections a new connection gets 503 at once; the others are served."""
    held = [_connect(small_server.url) for _ in range(8)]
    try:
        extra = _connect(small_server.url)
        answer = _closed_by_server(extra)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"too_many_connections" in answer
        # A held connection is served too; once the server closed it, its place is free.
        last = held.pop()
        last.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert _closed_by_server(last).startswith(b"HTTP/1.1 200")
        last.close()
        with httpx.Client(base_url=small_server.url) as http:
            ok(http.get("/health"))
    finally:
        for sock in held:
            sock.close()


# ------------------------------------------------------------------ finding 5: memory


def test_withdrawn_memory_is_bounded() -> None:
    """Ids withdrawn before they arrive are remembered within a count and a size."""
    with serve_in_thread() as running, httpx.Client(base_url=running.url) as http:
        api = running.app.state.klock
        refused(http.post("/withdraw", json={"request_id": "x" * 100_000}), 400, "invalid_field")
        for i in range(api.WITHDRAWN_KEEP + 50):
            ok(http.post("/withdraw", json={"request_id": f"{i:0200d}"}))
        assert len(api._withdrawn) == api.WITHDRAWN_KEEP
        assert api._withdrawn_bytes == sum(map(len, api._withdrawn)) <= api.WITHDRAWN_BYTES
        long_header = {"x-klock-request-id": "r" * 10_000}
        refused(http.get("/health", headers=long_header), 400, "invalid_field")


def test_lists_are_paged() -> None:
    """``GET /agents`` and ``GET /leases`` answer pages with a cursor to the next one."""
    with serve_in_thread() as running, httpx.Client(base_url=running.url) as http:
        for i in range(5):
            ok(http.post("/agents", json={"agent_id": f"p{i}", "priority": i}))
            ok(http.post("/leases", json=lease(f"p{i}", f"/page/{i}.py")))
        seen: dict[str, list[Any]] = {"agents": [], "leases": []}
        for path, key in (("/agents", "agent_id"), ("/leases", "lease_id")):
            params: dict[str, str] = {"limit": "2"}
            while True:
                body = http.get(path, params=params).json()
                seen[path[1:]] += [item[key] for item in body["data"]]
                if body["next"] is None:
                    break
                params["after"] = body["next"]
        assert seen["agents"] == [f"p{i}" for i in range(5)]
        everything = ok(http.get("/leases"))
        assert seen["leases"] == [item["lease_id"] for item in everything]
        refused(http.get("/leases", params={"limit": "1001"}), 400, "invalid_field")
        refused(http.get("/agents", params={"after": "nonsense"}), 400, "invalid_field")


def test_idle_agents_are_retired() -> None:
    """Agents with no lease, no request and no activity for retire_after are forgotten."""
    with (
        serve_in_thread(retire_after=3600.0) as running,
        httpx.Client(base_url=running.url) as http,
    ):
        for agent_id in ("idle", "holder"):
            ok(http.post("/agents", json={"agent_id": agent_id}))
        ok(http.post("/leases", json=lease("holder", "/held.py")))
        api = running.app.state.klock
        loop = api._closing.get_loop()  # the server thread's loop runs the API
        later = asyncio.run_coroutine_threadsafe(_loop_time(), loop).result() + 7200
        retired = asyncio.run_coroutine_threadsafe(api.retire_idle(later), loop).result()
        assert retired == ("idle",)
        assert [a["agent_id"] for a in ok(http.get("/agents"))] == ["holder"]
        refused(http.post("/leases", json=lease("idle", "/x.py")), 404, "unknown_agent")


def test_the_retirement_timer_fires_by_itself() -> None:
    """With retire_after set, an idle agent is retired when its time comes, unasked."""
    retired = threading.Event()

    def spy(logger: object, name: str, event: dict[str, object]) -> dict[str, object]:
        if event["event"] == "agent.retired" and event.get("agent") == "idle":
            retired.set()
        raise structlog.DropEvent

    saved = structlog.get_config()
    structlog.configure(processors=[spy])
    try:
        with (
            serve_in_thread(retire_after=0.05) as running,
            httpx.Client(base_url=running.url) as http,
        ):
            ok(http.post("/agents", json={"agent_id": "idle"}))
            assert retired.wait(READY_TIMEOUT)
            assert ok(http.get("/agents")) == []
    finally:
        structlog.configure(**saved)


async def _loop_time() -> float:
    return asyncio.get_running_loop().time()


# ------------------------------------------------------------------ finding 6: journal files


def test_empty_file_is_refused_unless_init(tmp_path: Path) -> None:
    """An existing zero-length --db is not silently a new journal (tokens would restart)."""
    db = tmp_path / "k.db"
    db.touch()
    line = one_line_error(serve("--db", str(db)))
    assert "empty file" in line and "--init" in line
    with serve_subprocess(db, extra=["--init"]) as child, httpx.Client(base_url=child.url) as h:
        ok(h.get("/health"))


def test_sqlite_file_without_the_schema_is_refused_unless_init(tmp_path: Path) -> None:
    """A SQLite database that is not a journal is refused; --init adds the journal to it."""
    db = tmp_path / "k.db"
    other = sqlite3.connect(db)
    other.execute("CREATE TABLE notes (text TEXT)")
    other.commit()
    other.close()
    line = one_line_error(serve("--db", str(db)))
    assert "not a klock journal" in line


def _journal_with_lease(db: Path) -> None:
    with serve_subprocess(db) as child, httpx.Client(base_url=child.url) as http:
        ok(http.post("/agents", json={"agent_id": "a"}))
        for i in range(3):
            ok(http.post("/leases", json=lease("a", f"/j{i}.py")))
        child.terminate()  # a clean stop: the file alone is the whole journal


def _execute(db: Path, sql: str) -> None:
    connection = sqlite3.connect(db)
    connection.execute(sql)
    connection.commit()
    connection.close()


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param("DROP TABLE leases", "table 'leases' is missing", id="dropped-leases"),
        pytest.param("DELETE FROM agents", "no row in 'agents'", id="lease-without-agent"),
        pytest.param(
            "UPDATE leases SET predicate = 'WRITES'", "unknown predicate", id="bad-predicate"
        ),
        pytest.param(
            "UPDATE leases SET resource = 'DISK:/x'", "resource type", id="bad-resource-type"
        ),
        pytest.param("UPDATE leases SET token = 'seven'", "expected an integer", id="token-text"),
        pytest.param("UPDATE leases SET expires_at = 'soon'", "'soon'", id="expires-soon"),
        pytest.param(
            "INSERT INTO path_clocks VALUES ('FILE:/c', '{oops')", "not JSON", id="clock-json"
        ),
    ],
)
def test_damaged_journal_stops_startup_with_one_line(
    tmp_path: Path, damage: str, expected: str
) -> None:
    """A row or table that does not parse stops ``klock serve`` with one line and exit 2."""
    db = tmp_path / "k.db"
    _journal_with_lease(db)
    _execute(db, damage)
    line = one_line_error(serve("--db", str(db)))
    assert expected in line, line
    assert "row" in line or "table" in line


def test_copy_without_its_wal_is_refused_and_a_backup_is_not(tmp_path: Path) -> None:
    """A copy of a running journal's .db alone is refused; ``klock backup`` makes a good one."""
    db = tmp_path / "k.db"
    with serve_subprocess(db) as child, httpx.Client(base_url=child.url) as http:
        ok(http.post("/agents", json={"agent_id": "a"}))
        tokens = [ok(http.post("/leases", json=lease("a", f"/w{i}.py")))["token"] for i in range(3)]
        plain = tmp_path / "plain-copy.db"
        plain.write_bytes(db.read_bytes())
        result = subprocess.run(
            [sys.executable, "-m", "klock_async", "backup", str(db), str(tmp_path / "b.db")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    line = one_line_error(serve("--db", str(plain)))
    assert "-wal" in line and "klock backup" in line
    with (
        serve_subprocess(tmp_path / "b.db") as child,
        httpx.Client(base_url=child.url) as http,
    ):
        assert [item["token"] for item in ok(http.get("/leases"))] == tokens
        ok(http.post("/leases", json=lease("a", "/w-new.py")))


def test_backup_refuses_to_overwrite(tmp_path: Path) -> None:
    """``backup`` never writes over an existing file."""
    db = tmp_path / "k.db"
    journal = SqliteJournal(db)
    journal.load()
    journal.close()
    (tmp_path / "exists.db").write_bytes(b"keep me")
    with pytest.raises(Exception, match="exists already"):
        backup(db, tmp_path / "exists.db")
    assert (tmp_path / "exists.db").read_bytes() == b"keep me"


# ------------------------------------------------------------------ finding 9: full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, mounted for the test (needs root, as in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        if os.environ.get("KLOCK_REQUIRE_TMPFS"):
            pytest.fail(f"cannot mount a tmpfs: {result.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_ends_the_process_naming_the_cause(small_disk: Path) -> None:
    """On a full disk the batch is refused with 'disk is full' and the process exits 3."""
    db = small_disk / "k.db"
    with serve_subprocess(db) as child, httpx.Client(base_url=child.url, timeout=30) as http:
        ok(http.post("/agents", json={"agent_id": "filler"}))
        filler = small_disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as out:
            while True:
                out.write(b"\0" * 65_536)
                out.flush()
        status, answer = 200, ""
        for i in range(10_000):
            response = http.post("/leases", json=lease("filler", f"/disk/{i:04d}/" + "x" * 400))
            if response.status_code != 200:
                status, answer = response.status_code, response.json()["error"]
                break
        assert status == 503, answer
        assert "full" in answer and "rollback" not in answer
        child.process.wait(READY_TIMEOUT)
        assert child.process.returncode == 3
        stderr = "".join(child.stderr)
        assert "klock serve: the kernel stopped" in stderr and "full" in stderr


# ------------------------------------------------------------------ finding 12: edges


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param(("--token", ""), None, id="flag"),
        pytest.param((), {"KLOCK_TOKEN": ""}, id="environment"),
    ],
)
def test_empty_token_is_refused_with_one_line(
    args: tuple[str, ...], env: dict[str, str] | None
) -> None:
    """An empty token is an error (one line, exit 2) whether given as flag or environment."""
    line = one_line_error(serve(*args, env=env))
    assert "empty" in line and "token" in line


@pytest.mark.parametrize("journaled", [False, True], ids=["memory", "db"])
def test_zero_timeout_on_a_free_resource_is_granted(tmp_path: Path, journaled: bool) -> None:
    """``"wait": true, "timeout_ms": 0`` answers the same with and without a journal."""
    options: dict[str, Any] = {"db": str(tmp_path / "k.db")} if journaled else {}
    with serve_in_thread(**options) as running, httpx.Client(base_url=running.url) as http:
        for agent_id in ("old", "young", "younger"):
            ok(http.post("/agents", json={"agent_id": agent_id}))
        held = ok(http.post("/leases", json=lease("young", "/free.py", wait=True, timeout_ms=0)))
        for agent_id, status, code in (
            ("old", 408, "acquire_timeout"),  # it holds nothing: it would queue
            ("younger", 408, "acquire_timeout"),
        ):
            response = http.post(
                "/leases", json=lease(agent_id, "/free.py", wait=True, timeout_ms=0)
            )
            refused(response, status, code)
        assert [item["lease_id"] for item in ok(http.get("/leases"))] == [held["lease_id"]]
        assert ok(http.get("/statistics"))["requests_waiting"] == 0


def test_crashed_journal_opened_elsewhere_needs_accept_unclosed(tmp_path: Path) -> None:
    """After a crash and another program's visit (which folds the -wal in), the start asks for
    --accept-unclosed, and then continues with every token."""
    db = tmp_path / "k.db"
    with serve_subprocess(db) as child, httpx.Client(base_url=child.url) as http:
        ok(http.post("/agents", json={"agent_id": "a"}))
        token = ok(http.post("/leases", json=lease("a", "/crash.py")))["token"]
        child.kill()
    _execute(
        db, "SELECT COUNT(*) FROM leases"
    )  # e.g. the sqlite3 shell: its clean close deletes the -wal file
    assert not db.with_name("k.db-wal").exists()
    line = one_line_error(serve("--db", str(db)))
    assert "--accept-unclosed" in line
    with (
        serve_subprocess(db, extra=["--accept-unclosed"]) as child,
        httpx.Client(base_url=child.url) as http,
    ):
        assert [item["token"] for item in ok(http.get("/leases"))] == [token]


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    """A startup failure of the socket ends with uvicorn's one line and status 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "klock_async", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert "address already in use" in result.stderr and "Traceback" not in result.stderr
