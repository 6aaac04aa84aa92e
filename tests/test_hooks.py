"""Coding-agent hooks as real processes: ``klock hook`` and ``POST /hooks/...`` on ``klock serve``.

Payloads follow Claude Code's (and Gemini CLI's) documented hook schema. One real server runs
for the module; every test uses session ids and files of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

READY_TIMEOUT = 30.0
"""Seconds a server or a log line may take (a bound, not a wait)."""


@dataclass
class Server:
    """A ``klock serve --log-level info`` child process and its stderr lines."""

    url: str
    lines: queue.Queue[str]

    def wait_for_log(self, *needles: str) -> str:
        """Block until the server logs a line containing every needle; return it."""
        while True:
            line = self.lines.get(timeout=READY_TIMEOUT)
            if all(needle in line for needle in needles):
                return line


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    command = [sys.executable, "-m", "klock_async", "serve", "--port", "0", "--log-level", "info"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in process.stderr], daemon=True)
    reader.start()
    try:
        ready = process.stdout.readline()
        assert "listening on " in ready, ready
        yield Server(ready.rsplit("listening on ", 1)[1].strip(), lines)
    finally:
        process.kill()
        process.wait(READY_TIMEOUT)
        reader.join(READY_TIMEOUT)
        process.stdout.close()
        process.stderr.close()


def _session() -> str:
    return str(uuid.uuid4())


def _event(session: str, name: str, cwd: Path, **fields: Any) -> dict[str, Any]:
    return {
        "session_id": session,
        "transcript_path": str(cwd / f"{session}.jsonl"),
        "cwd": str(cwd),
        "permission_mode": "default",
        "hook_event_name": name,
        **fields,
    }


def pre(session: str, tool: str, tool_input: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """A PreToolUse event as Claude Code sends it."""
    fields = {"tool_name": tool, "tool_input": tool_input, "tool_use_id": "toolu_01" + session[:8]}
    return _event(session, "PreToolUse", cwd, **fields)


def post(session: str, tool: str, tool_input: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """A PostToolUse event as Claude Code sends it."""
    event = pre(session, tool, tool_input, cwd)
    event["hook_event_name"] = "PostToolUse"
    event["tool_response"] = {"filePath": tool_input.get("file_path"), "success": True}
    return event


def end(session: str, cwd: Path) -> dict[str, Any]:
    """A SessionEnd event."""
    return _event(session, "SessionEnd", cwd, reason="exit")


def edit(path: Path) -> dict[str, Any]:
    """The tool_input of an Edit of ``path``."""
    return {"file_path": str(path), "old_string": "a", "new_string": "b", "replace_all": False}


def _command(harness: str, options: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "klock_async", "hook", harness, *options]


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "KLOCK_SERVER_URL": url}


def hook(
    url: str, event: dict[str, Any] | str, *options: str, harness: str = "claude-code"
) -> subprocess.CompletedProcess[str]:
    """Run ``klock hook HARNESS`` with the event on stdin, as the harness does."""
    stdin = event if isinstance(event, str) else json.dumps(event)
    return subprocess.run(
        _command(harness, options),
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(url),
        timeout=120,
        check=False,
    )


def _leases(url: str, session: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/leases", params={"agent_id": session})
    leases: list[dict[str, Any]] = response.json()["data"]
    return leases


# ------------------------------------------------------------------ two sessions, one file


def test_second_session_waits_then_proceeds_after_first_ends(
    server: Server, tmp_path: Path
) -> None:
    """An edit of a held file waits in the queue and is allowed once the holder's session ends."""
    first, second = _session(), _session()
    target = tmp_path / "app.py"
    assert hook(server.url, pre(first, "Edit", edit(target), tmp_path)).returncode == 0
    with subprocess.Popen(
        _command("claude-code", ("--wait", "60")),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(server.url),
    ) as waiting:
        assert waiting.stdin is not None and waiting.stderr is not None
        waiting.stdin.write(json.dumps(pre(second, "Edit", edit(target), tmp_path)))
        waiting.stdin.close()
        try:
            server.wait_for_log("hook.waiting", second)  # queued behind the first session
            assert hook(server.url, end(first, tmp_path)).returncode == 0
            assert waiting.wait(READY_TIMEOUT) == 0, waiting.stderr.read()
        finally:
            if waiting.poll() is None:
                waiting.kill()
    assert [lease["resource_path"] for lease in _leases(server.url, second)] == [str(target)]


def test_wait_zero_denies_at_once_naming_the_holder(server: Server, tmp_path: Path) -> None:
    """With --wait 0 an edit of a held file exits 2 with one sentence naming who holds it."""
    first, second = _session(), _session()
    target = tmp_path / "app.py"
    assert (
        hook(
            server.url, pre(first, "Write", {"file_path": str(target), "content": ""}, tmp_path)
        ).returncode
        == 0
    )
    denied = hook(server.url, pre(second, "Edit", edit(target), tmp_path), "--wait", "0")
    assert denied.returncode == 2
    assert f"app.py is still being changed by Claude Code session {first[:8]}" in denied.stderr
    assert "retry this change later" in denied.stderr
    assert hook(server.url, end(first, tmp_path)).returncode == 0
    assert (
        hook(server.url, pre(second, "Edit", edit(target), tmp_path), "--wait", "0").returncode == 0
    )


def test_wait_runs_out_then_denies(server: Server, tmp_path: Path) -> None:
    """An edit that waited --wait seconds without the file freeing up is refused."""
    first, second = _session(), _session()
    target = tmp_path / "nb.ipynb"
    notebook = {"notebook_path": str(target), "new_source": "x = 1", "cell_id": "c1"}
    assert hook(server.url, pre(first, "NotebookEdit", notebook, tmp_path)).returncode == 0
    denied = hook(server.url, pre(second, "NotebookEdit", notebook, tmp_path), "--wait", "0.2")
    assert denied.returncode == 2
    assert "after waiting 0.2 s, nb.ipynb is still being changed" in denied.stderr


# ------------------------------------------------------------------ reads and stale edits


def test_stale_edit_denied_after_another_sessions_write(server: Server, tmp_path: Path) -> None:
    """An edit of a file another session changed since this one read it: "re-read it first"."""
    first, second = _session(), _session()
    target = tmp_path / "auth.py"
    target.write_text("a\n")
    read = {"file_path": str(target)}
    assert hook(server.url, pre(first, "Read", read, tmp_path)).returncode == 0
    assert hook(server.url, pre(second, "Read", read, tmp_path)).returncode == 0
    assert hook(server.url, pre(second, "Edit", edit(target), tmp_path)).returncode == 0
    assert hook(server.url, post(second, "Edit", edit(target), tmp_path)).returncode == 0
    assert hook(server.url, end(second, tmp_path)).returncode == 0
    stale = hook(server.url, pre(first, "Edit", edit(target), tmp_path))
    assert stale.returncode == 2
    assert f"auth.py was changed by Claude Code session {second[:8]}" in stale.stderr
    assert "re-read it first" in stale.stderr
    assert _leases(server.url, first) == []  # refused: nothing held
    assert hook(server.url, pre(first, "Read", read, tmp_path)).returncode == 0
    assert hook(server.url, pre(first, "Edit", edit(target), tmp_path)).returncode == 0


def test_grep_naming_a_file_counts_as_a_read(server: Server, tmp_path: Path) -> None:
    """Grep on a file records a read; Grep on a directory does not."""
    first, second = _session(), _session()
    target = tmp_path / "conf.toml"
    target.write_text("x = 1\n")
    assert (
        hook(
            server.url, pre(second, "Write", {"file_path": str(target), "content": "y"}, tmp_path)
        ).returncode
        == 0
    )
    assert (
        hook(
            server.url, post(second, "Write", {"file_path": str(target), "content": "y"}, tmp_path)
        ).returncode
        == 0
    )
    assert hook(server.url, end(second, tmp_path)).returncode == 0
    grep_dir = {"pattern": "x", "path": str(tmp_path)}
    assert hook(server.url, pre(first, "Grep", grep_dir, tmp_path)).returncode == 0
    assert hook(server.url, pre(first, "Edit", edit(target), tmp_path)).returncode == 2
    grep_file = {"pattern": "x", "path": str(target)}
    assert hook(server.url, pre(first, "Grep", grep_file, tmp_path)).returncode == 0
    assert hook(server.url, pre(first, "Edit", edit(target), tmp_path)).returncode == 0


def test_own_edits_keep_one_lease_for_hold_seconds(server: Server, tmp_path: Path) -> None:
    """A run of edits of one file is never stale to itself and keeps one lease of ttl --hold."""
    session = _session()
    target = tmp_path / "run.py"
    for _ in range(2):
        assert (
            hook(
                server.url, pre(session, "Edit", edit(target), tmp_path), "--hold", "90"
            ).returncode
            == 0
        )
        assert (
            hook(
                server.url, post(session, "Edit", edit(target), tmp_path), "--hold", "90"
            ).returncode
            == 0
        )
    leases = _leases(server.url, session)
    assert [(lease["resource_path"], lease["predicate"], lease["ttl"]) for lease in leases] == [
        (str(target), "MUTATES", 90_000)
    ]


def test_session_end_releases_everything(server: Server, tmp_path: Path) -> None:
    """SessionEnd releases every file the session holds; an unknown session ends quietly."""
    session = _session()
    for name in ("a.py", "b.py"):
        assert (
            hook(server.url, pre(session, "Edit", edit(tmp_path / name), tmp_path)).returncode == 0
        )
    assert len(_leases(server.url, session)) == 2
    assert hook(server.url, end(session, tmp_path)).returncode == 0
    assert _leases(server.url, session) == []
    assert hook(server.url, end(_session(), tmp_path)).returncode == 0


# ------------------------------------------------------------------ Bash, best effort


def test_bash_redirection_to_held_file_denied(server: Server, tmp_path: Path) -> None:
    """A shell redirection into a file another session holds is refused like an edit."""
    first, second = _session(), _session()
    held = tmp_path / "app.py"
    assert hook(server.url, pre(first, "Edit", edit(held), tmp_path)).returncode == 0
    command = {"command": "echo 'x = 1' > app.py", "description": "overwrite app.py"}
    denied = hook(server.url, pre(second, "Bash", command, tmp_path), "--wait", "0")
    assert denied.returncode == 2
    assert "app.py is still being changed" in denied.stderr


def test_bash_writes_take_leases(server: Server, tmp_path: Path) -> None:
    """Files a command writes (here a heredoc and sed -i) are leased until its hold ends."""
    first, second = _session(), _session()
    command = {"command": "cat <<EOF > notes.md\nhi\nEOF\nsed -i 's/a/b/' setup.cfg"}
    assert hook(server.url, pre(second, "Bash", command, tmp_path)).returncode == 0
    assert hook(server.url, post(second, "Bash", command, tmp_path)).returncode == 0
    paths = sorted(lease["resource_path"] for lease in _leases(server.url, second))
    assert paths == [str(tmp_path / "notes.md"), str(tmp_path / "setup.cfg")]
    denied = hook(
        server.url, pre(first, "Edit", edit(tmp_path / "setup.cfg"), tmp_path), "--wait", "0"
    )
    assert denied.returncode == 2


def test_unparsable_bash_is_let_through_and_logged(server: Server, tmp_path: Path) -> None:
    """A command the parser cannot read is allowed, and the server logs it."""
    session = _session()
    assert hook(server.url, pre(session, "Bash", {"command": "echo ( "}, tmp_path)).returncode == 0
    server.wait_for_log("hook.shell_unresolved", session)


# ------------------------------------------------------------------ failing closed


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_no_server_fails_closed(tmp_path: Path) -> None:
    """Without a server the hook exits 2 with the reason (never 1, which would allow the edit)."""
    url = f"http://127.0.0.1:{_closed_port()}"
    result = hook(url, pre(_session(), "Edit", edit(tmp_path / "a.py"), tmp_path))
    assert result.returncode == 2
    assert (
        "klock could not check this call, so it is blocked: no klock server answers"
        in result.stderr
    )


def test_fail_open_allows_with_a_warning(tmp_path: Path) -> None:
    """--fail-open turns a klock failure into exit 0 and a warning for the user."""
    url = f"http://127.0.0.1:{_closed_port()}"
    result = hook(url, pre(_session(), "Edit", edit(tmp_path / "a.py"), tmp_path), "--fail-open")
    assert result.returncode == 0
    assert "let through" in json.loads(result.stdout)["systemMessage"]


@pytest.mark.parametrize(
    "stdin",
    [
        pytest.param("not json", id="not-json"),
        pytest.param("{}", id="no-event-name"),
        pytest.param(
            json.dumps(
                {
                    "session_id": "s",
                    "hook_event_name": "PreToolUse",
                    "tool_name": "Edit",
                    "tool_input": {},
                }
            ),
            id="no-file",
        ),
    ],
)
def test_bad_payload_fails_closed(server: Server, stdin: str) -> None:
    """A payload that is not a hook event is refused with exit 2 and a reason."""
    result = hook(server.url, stdin)
    assert result.returncode == 2
    assert result.stderr.startswith("klock could not check this call, so it is blocked:")


# ------------------------------------------------------------------ HTTP hooks


def test_http_hook_denies_in_claude_codes_format(server: Server, tmp_path: Path) -> None:
    """``POST /hooks/claude-code`` answers a refusal as a PreToolUse permission decision."""
    first, second = _session(), _session()
    target = tmp_path / "app.py"
    assert (
        httpx.post(
            f"{server.url}/hooks/claude-code", json=pre(first, "Edit", edit(target), tmp_path)
        ).json()
        == {}
    )
    response = httpx.post(
        f"{server.url}/hooks/claude-code",
        params={"wait": "0"},
        json=pre(second, "MultiEdit", {"file_path": str(target), "edits": []}, tmp_path),
    )
    assert response.status_code == 200
    output = response.json()["hookSpecificOutput"]
    assert output["hookEventName"] == "PreToolUse"
    assert output["permissionDecision"] == "deny"
    assert "still being changed by Claude Code session" in output["permissionDecisionReason"]


def test_http_hook_failure_blocks_unless_fail_open(server: Server, tmp_path: Path) -> None:
    """An HTTP hook that cannot check the call refuses it (200 + deny); fail_open=1 allows it."""
    event = pre(_session(), "Edit", {"file_path": ""}, tmp_path)
    blocked = httpx.post(f"{server.url}/hooks/claude-code", json=event).json()
    assert blocked["hookSpecificOutput"]["permissionDecision"] == "deny"
    assert "could not check this call" in blocked["hookSpecificOutput"]["permissionDecisionReason"]
    allowed = httpx.post(f"{server.url}/hooks/claude-code", params={"fail_open": "1"}, json=event)
    assert set(allowed.json()) == {"systemMessage"}


def test_http_hook_bad_options_are_refused(server: Server, tmp_path: Path) -> None:
    """A negative wait is a typed 400 error, not a silent default."""
    event = pre(_session(), "Edit", edit(tmp_path / "a.py"), tmp_path)
    response = httpx.post(
        f"{server.url}/hooks/claude-code", params={"wait": "-1", "mode": "command"}, json=event
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_field"


# ------------------------------------------------------------------ Gemini CLI


def test_gemini_cli_write_of_held_file_denied(server: Server, tmp_path: Path) -> None:
    """Gemini CLI's BeforeTool on write_file takes the same lease; a held file exits 2."""
    first, second = _session(), _session()
    target = tmp_path / "main.go"
    write = {"file_path": str(target), "content": "package main"}

    def before(session: str) -> dict[str, Any]:
        event = _event(session, "BeforeTool", tmp_path, tool_name="write_file", tool_input=write)
        event["timestamp"] = "2026-01-01T00:00:00Z"
        return event

    assert hook(server.url, before(first), harness="gemini-cli").returncode == 0
    denied = hook(server.url, before(second), "--wait", "0", harness="gemini-cli")
    assert denied.returncode == 2
    assert f"Gemini CLI session {first[:8]}" in denied.stderr


def test_session_holding_files_is_refused_instead_of_waiting(
    server: Server, tmp_path: Path
) -> None:
    """A younger session that holds a file is refused at once (Wait-Die), never waits holding."""
    older, younger = _session(), _session()
    assert hook(server.url, pre(older, "Edit", edit(tmp_path / "a.py"), tmp_path)).returncode == 0
    assert hook(server.url, pre(younger, "Edit", edit(tmp_path / "b.py"), tmp_path)).returncode == 0
    denied = hook(
        server.url, pre(younger, "Edit", edit(tmp_path / "a.py"), tmp_path), "--wait", "60"
    )
    assert denied.returncode == 2
    assert "this session holds other files, so it may not wait" in denied.stderr


def test_a_lease_that_ended_is_taken_again(server: Server, tmp_path: Path) -> None:
    """A remembered lease that ended (here revoked) is acquired anew at the next edit."""
    session = _session()
    target = tmp_path / "app.py"
    assert hook(server.url, pre(session, "Edit", edit(target), tmp_path)).returncode == 0
    (lease,) = _leases(server.url, session)
    assert httpx.post(f"{server.url}/leases/{lease['lease_id']}/revoke").status_code == 200
    assert hook(server.url, post(session, "Edit", edit(target), tmp_path)).returncode == 0
    assert _leases(server.url, session) == []  # the write was recorded; nothing to push
    assert hook(server.url, pre(session, "Edit", edit(target), tmp_path)).returncode == 0
    (again,) = _leases(server.url, session)
    assert again["lease_id"] != lease["lease_id"]
    server.wait_for_log("hook.write_unleased", session)


def test_hook_leases_keep_the_most_recent_sessions() -> None:
    """The remembered leases are bounded: the least recently active session is forgotten."""
    from klock_async.hooks import HookLeases
    from klock_async.model import Resource

    leases = HookLeases(keep=2)
    leases.of("a")[Resource.parse("/x")] = "lease-a"
    leases.of("b")
    leases.of("a")  # a is the most recent again
    leases.of("c")  # b goes
    assert leases.of("a") == {Resource.parse("/x"): "lease-a"}
    assert leases.of("b") == {}
    leases.forget("a")
    assert leases.of("a") == {}


def test_hook_starts_a_local_server_when_none_answers(tmp_path: Path) -> None:
    """Without a URL and with nothing on the local port, the hook starts a server and uses it."""
    port = str(_closed_port())
    env = {k: v for k, v in os.environ.items() if k != "KLOCK_SERVER_URL"}
    env["TMPDIR"] = str(tmp_path)  # the started server's log goes there
    result = subprocess.run(
        _command("claude-code", ("--local-port", port)),
        input=json.dumps(pre(_session(), "Edit", edit(tmp_path / "a.py"), tmp_path)),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    started = result.stderr.split("(pid ", 1)
    pid = int(started[1].split(",", 1)[0]) if len(started) == 2 else None
    try:
        assert result.returncode == 0, result.stderr
        assert f"started a local klock server at http://127.0.0.1:{port}" in result.stderr
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["data"]["active_leases"] == 1
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)


# ------------------------------------------------------------------ the core against a model

SESSIONS = ["s1", "s2", "s3"]
FILES = ["/w/a.py", "/w/b.py"]
hook_ops = st.lists(
    st.tuples(
        st.sampled_from(["read", "edit", "bash", "end"]),
        st.sampled_from(SESSIONS),
        st.sampled_from(FILES),
    ),
    min_size=1,
    max_size=40,
)


async def _run_against_model(ops: list[tuple[str, str, str]]) -> None:
    from klock_async.hooks import CLAUDE_CODE, HookCore, HookOptions
    from klock_async.scheduler import Scheduler

    scheduler = Scheduler()
    await scheduler.start()
    core = HookCore(scheduler, CLAUDE_CODE, HookOptions(wait=0, hold=3600))
    cwd = Path("/w")
    version = dict.fromkeys(FILES, 0)  # writes so far
    seen: dict[tuple[str, str], int] = {}  # the version a session last read or wrote
    holder: dict[str, str] = {}  # file -> the session holding it
    try:
        for op, session, path in ops:
            if op == "end":
                await core.handle(end(session, cwd))
                holder = {f: s for f, s in holder.items() if s != session}
                continue
            if op == "read":
                assert (await core.handle(pre(session, "Read", {"file_path": path}, cwd))).allow
                seen[(session, path)] = version[path]
                continue
            if op == "edit":
                tool, tool_input = "Edit", edit(Path(path))
            else:
                tool, tool_input = "Bash", {"command": f"echo x >> {path}"}
            answer = await core.handle(pre(session, tool, tool_input, cwd))
            other = holder.get(path, session) != session
            stale = (
                op == "edit"
                and holder.get(path) != session
                and seen.get((session, path), 0) != version[path]
            )
            assert answer.allow == (not other and not stale), (op, session, path, answer)
            if answer.allow:
                assert (await core.handle(post(session, tool, tool_input, cwd))).allow
                holder[path] = session
                version[path] += 1
                seen[(session, path)] = version[path]
            mutates = [
                (info.resource.path, info.agent_id)
                for info in await scheduler.leases()
                if info.predicate.value == "MUTATES"
            ]
            assert sorted(set(mutates)) == sorted(holder.items())  # one holder per file
    finally:
        await scheduler.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=hook_ops)
def test_hooks_match_the_model(ops: list[tuple[str, str, str]]) -> None:
    """Edits are allowed exactly when nobody else holds the file and its latest version was seen."""
    asyncio.run(_run_against_model(ops))


def test_edit_of_a_file_another_session_wrote_and_this_one_never_read_is_refused() -> None:
    """A session's edit of a file that another session wrote since is refused unless it read it."""
    asyncio.run(
        _run_against_model(
            [
                ("edit", "s1", "/w/a.py"),
                ("edit", "s1", "/w/b.py"),
                ("read", "s2", "/w/b.py"),
                ("end", "s1", "/w/a.py"),
                ("edit", "s2", "/w/a.py"),
            ]
        )
    )
