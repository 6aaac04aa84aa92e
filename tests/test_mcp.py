"""``klock mcp`` driven by the mcp SDK's own client: in-process and over stdio.

The stdio tests spawn ``python -m klock_async mcp --root ...`` the way a coding agent does, and
talk to it with ``mcp.ClientSession`` over ``stdio_client``. Two clients share a kernel through
a real ``klock serve`` child process on a free loopback port.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TextIO

import anyio
import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client
from mcp.types import CallToolResult, TextContent

from klock_async import Klock, KlockError
from klock_async.integrations.mcp import EMBEDDED_ENV, AgentTools, create_server

STALE = "changed since you read it"
TOOLS = {
    "acquire",
    "edit_file",
    "heartbeat",
    "list_files",
    "list_leases",
    "read_file",
    "release",
    "write_file",
}


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / "notes.md").write_text("# notes\n", encoding="utf-8")
    (root / "src" / "app.py").write_text("x = 1\n", encoding="utf-8")
    return root.resolve()


def _text(result: CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, TextContent))


def _ok(result: CallToolResult) -> str:
    assert not result.is_error, _text(result)
    return _text(result)


@contextlib.asynccontextmanager
async def _stdio(
    root: Path, *options: str, env: dict[str, str] | None = None, errlog: TextIO | None = None
) -> AsyncIterator[ClientSession]:
    """An MCP client session with a ``klock mcp`` child process, as a coding agent runs it."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "klock_async", "mcp", "--root", str(root), *options],
        env=env or {},
    )
    async with (
        stdio_client(params, errlog=errlog or sys.stderr) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


@contextlib.contextmanager
def _klock_serve(log: Path) -> Iterator[str]:
    """``klock serve`` as a child process on a free loopback port; yields its URL once ready.

    Ready when it prints its ``listening on URL`` line; stopped with SIGTERM afterwards.
    """
    with open(log, "w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "klock_async", "serve", "--port", "0", "--log-level", "warning"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        assert process.stdout is not None
        with process, process.stdout:
            try:
                line = process.stdout.readline()
                assert "listening on " in line, log.read_text(encoding="utf-8")
                yield line.rsplit("listening on ", 1)[1].strip()
            finally:
                process.terminate()
                process.wait()


EMBEDDED = {EMBEDDED_ENV: "1"}


# ------------------------------------------------------------------------- in-process


async def test_tools_in_process(workspace: Path) -> None:
    """The server's tools work through the SDK client connected in-process."""
    async with Klock() as klock:
        agent = await klock.register_agent("coder")
        tools = AgentTools(klock, agent, workspace)
        async with Client(create_server(tools)) as client:
            listed = await client.list_tools()
            assert {tool.name for tool in listed.tools} == TOOLS
            assert _ok(await client.call_tool("read_file", {"path": "notes.md"})) == "# notes\n"
            await client.call_tool("write_file", {"path": "notes.md", "content": "new\n"})
            assert (workspace / "notes.md").read_text(encoding="utf-8") == "new\n"
            listing = _ok(await client.call_tool("list_files", {"recursive": True}))
            assert listing.splitlines() == ["notes.md", "src/", "src/app.py"]


async def test_lease_tools_in_process(workspace: Path) -> None:
    """acquire, heartbeat, list_leases and release manage explicit leases on workspace paths."""
    async with Klock() as klock:
        coder = await klock.register_agent("coder")
        other = await klock.register_agent("other")
        tools = AgentTools(klock, coder, workspace)
        async with Client(create_server(tools)) as client:
            acquired = await client.call_tool(
                "acquire", {"resource": "src/app.py", "predicate": "MUTATES", "ttl_seconds": 5}
            )
            lease = acquired.structured_content
            assert lease is not None
            assert lease["resource"] == "FILE:src/app.py"
            assert lease["mine"] is True
            [info] = await klock.leases()
            assert str(info.resource) == f"FILE:{workspace}/src/app.py"

            # The agent's own file tools run under its lease; other agents are kept out.
            await client.call_tool("read_file", {"path": "src/app.py"})
            _ok(
                await client.call_tool(
                    "edit_file", {"path": "src/app.py", "old_text": "1", "new_text": "2"}
                )
            )
            with pytest.raises(Exception, match="older agent 'coder'"):
                await other.acquire(info.resource, "CONSUMES", wait=False)

            beat = await client.call_tool("heartbeat", {"ttl_seconds": 30})
            assert beat.structured_content is not None
            assert beat.structured_content["leases"][0]["ttl_seconds"] == 30
            leases = (await client.call_tool("list_leases", {})).structured_content
            assert leases is not None and [x["lease_id"] for x in leases["leases"]] == [
                lease["lease_id"]
            ]
            released = await client.call_tool("release", {"lease_id": lease["lease_id"]})
            assert released.structured_content == {"released": 1, "lease_id": lease["lease_id"]}
            assert await klock.leases() == []

            again = await client.call_tool("release", {"lease_id": lease["lease_id"]})
            assert again.is_error and "holds no lease" in _text(again)
            outside = await client.call_tool(
                "acquire", {"resource": "../x", "predicate": "MUTATES"}
            )
            assert outside.is_error and "outside the workspace" in _text(outside)
            bad = await client.call_tool("acquire", {"resource": "a.txt", "predicate": "WRITES"})
            assert bad.is_error and "unknown predicate" in _text(bad)
            table = await client.call_tool(
                "acquire", {"resource": "DATABASE_TABLE:users", "predicate": "CONSUMES"}
            )
            assert _ok(table) and table.structured_content is not None
            assert table.structured_content["resource"] == "DATABASE_TABLE:users"
            assert (await client.call_tool("release", {})).structured_content == {"released": 1}
            assert await klock.leases() == []


async def test_acquire_description_states_wait_die(workspace: Path) -> None:
    """The acquire tool tells the model who waits and who is refused, as the kernel decides."""
    async with Klock() as klock:
        tools = AgentTools(klock, await klock.register_agent("coder"), workspace)
        async with Client(create_server(tools)) as client:
            listed = {tool.name: tool for tool in (await client.list_tools()).tools}
    text = " ".join((listed["acquire"].description or "").split())
    assert "if you hold no lease, your request waits in the queue until its turn" in text
    assert "and is never refused" in text
    assert (
        "if you already hold leases and ask for more, you wait when you are older than every "
        "conflicting holder, and are refused at once (LeaseDied) when you are younger" in text
    )
    assert "With wait=false you get the lease or a refusal at once, never a wait" in text
    assert "held by an older agent" not in text  # the opposite of Wait-Die


async def test_read_for_update_in_process(workspace: Path) -> None:
    """read_file with for_update holds MUTATES until the agent writes the file or releases it."""
    async with Klock() as klock:
        coder = await klock.register_agent("coder")
        other = await klock.register_agent("other")
        tools = AgentTools(klock, coder, workspace)
        async with Client(create_server(tools)) as client:
            listed = {tool.name: tool for tool in (await client.list_tools()).tools}
            assert "for_update" in listed["read_file"].input_schema["properties"]
            text = _ok(
                await client.call_tool("read_file", {"path": "notes.md", "for_update": True})
            )
            assert text == "# notes\n"
            leases = (await client.call_tool("list_leases", {})).structured_content
            assert leases is not None
            [hold] = leases["leases"]
            assert (hold["resource"], hold["predicate"], hold["mine"]) == (
                "FILE:notes.md",
                "MUTATES",
                True,
            )
            [info] = await klock.leases()
            with pytest.raises(KlockError):  # died or would wait: the file is held
                await other.acquire(info.resource, "CONSUMES", wait=False)
            # The agent's own calls on the held file run under its hold; the edit ends it.
            assert _ok(await client.call_tool("read_file", {"path": "notes.md"})) == text
            _ok(
                await client.call_tool(
                    "edit_file", {"path": "notes.md", "old_text": "notes", "new_text": "N"}
                )
            )
            assert await klock.leases() == []

            # release by id gives a held file up without writing it; release() gives up all.
            _ok(await client.call_tool("read_file", {"path": "notes.md", "for_update": True}))
            [info] = await klock.leases()
            released = await client.call_tool("release", {"lease_id": info.id})
            assert released.structured_content == {"released": 1, "lease_id": info.id}
            _ok(await client.call_tool("read_file", {"path": "src/app.py", "for_update": True}))
            assert (await client.call_tool("release", {})).structured_content == {"released": 1}
            assert await klock.leases() == []
        assert (await klock.statistics()).causal_violations == 0
    assert (workspace / "notes.md").read_text(encoding="utf-8") == "# N\n"


async def test_read_for_update_makes_another_agents_stale_write_refused(workspace: Path) -> None:
    """A write built on a read older than an edit made under a read for update is refused."""
    async with Klock() as klock:
        alice = AgentTools(klock, await klock.register_agent("alice"), workspace)
        bob = AgentTools(klock, await klock.register_agent("bob"), workspace)
        async with Client(create_server(alice)) as a, Client(create_server(bob)) as b:
            seen_by_bob = _ok(await b.call_tool("read_file", {"path": "notes.md"}))
            seen = _ok(await a.call_tool("read_file", {"path": "notes.md", "for_update": True}))
            _ok(await a.call_tool("write_file", {"path": "notes.md", "content": seen + "a\n"}))
            stale = await b.call_tool("write_file", {"path": "notes.md", "content": seen_by_bob})
            assert stale.is_error and STALE in _text(stale)
    assert (workspace / "notes.md").read_text(encoding="utf-8") == "# notes\na\n"


# ------------------------------------------------------------------------- stdio, embedded


async def test_stdio_server_serves_the_file_tools(workspace: Path) -> None:
    """Over stdio the server lists its tools, edits real files and refuses escaping paths."""
    outside = workspace.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n", encoding="utf-8")
    os.symlink(outside, workspace / "link")
    async with _stdio(workspace, "--agent", "coder", env=EMBEDDED) as session:
        listed = await session.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS
        assert _ok(await session.call_tool("read_file", {"path": "src/app.py"})) == "x = 1\n"
        edited = await session.call_tool(
            "edit_file", {"path": "src/app.py", "old_text": "x = 1", "new_text": "x = 2"}
        )
        assert _ok(edited) == "edited src/app.py: replaced 1 occurrence"
        await session.call_tool("write_file", {"path": "docs/new.md", "content": "hi\n"})
        assert (workspace / "docs/new.md").read_text(encoding="utf-8") == "hi\n"
        for path in ("../outside/secret.txt", str(outside / "secret.txt"), "link/secret.txt"):
            for tool, arguments in [
                ("read_file", {"path": path}),
                ("write_file", {"path": path, "content": "pwned"}),
                ("edit_file", {"path": path, "old_text": "secret", "new_text": "pwned"}),
            ]:
                refused = await session.call_tool(tool, arguments)
                assert refused.is_error, (tool, path)
                assert "outside the workspace" in _text(refused)
        mismatch = await session.call_tool(
            "edit_file", {"path": "src/app.py", "old_text": "nope", "new_text": "x"}
        )
        assert mismatch.is_error and "was not found" in _text(mismatch)
    assert (outside / "secret.txt").read_text(encoding="utf-8") == "secret\n"
    assert (workspace / "src/app.py").read_text(encoding="utf-8") == "x = 2\n"


# ------------------------------------------------------------------------- stdio, shared kernel


async def test_two_clients_editing_one_file_lose_nothing(workspace: Path, tmp_path: Path) -> None:
    """Two coding agents, each with its own klock mcp process on one klock serve, keep every
    edit: a stale write comes back as an error telling the agent to read again."""
    rounds = 6
    with _klock_serve(tmp_path / "serve.log") as url:

        async def agent(name: str) -> int:
            refusals = 0
            async with _stdio(workspace, "--server", url, "--agent", name) as session:
                for r in range(rounds):
                    while True:
                        text = _ok(await session.call_tool("read_file", {"path": "notes.md"}))
                        answer = await session.call_tool(
                            "write_file", {"path": "notes.md", "content": f"{text}{name} {r}\n"}
                        )
                        if not answer.is_error:
                            break
                        assert STALE in _text(answer) and "Read it again" in _text(answer)
                        refusals += 1
            return refusals

        results: dict[str, int] = {}

        async def run(name: str) -> None:
            results[name] = await agent(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "alice")
            tg.start_soon(run, "bob")

        lines = (workspace / "notes.md").read_text(encoding="utf-8").splitlines()
        assert sorted(lines[1:]) == sorted(
            f"{n} {r}" for n in ("alice", "bob") for r in range(rounds)
        )
        async with Klock.connect(url) as klock:
            assert {a.agent_id for a in await klock.agents()} == {"alice", "bob"}
            assert await klock.leases() == []
            assert (await klock.statistics()).causal_violations == sum(results.values())


async def test_a_stale_write_returns_a_reread_error(workspace: Path, tmp_path: Path) -> None:
    """A write of a file another agent changed since this one read it is an error that says to
    read it again; after reading, the write goes through."""
    with _klock_serve(tmp_path / "serve.log") as url:
        async with (
            _stdio(workspace, "--server", url, "--agent", "alice") as alice,
            _stdio(workspace, "--server", url, "--agent", "bob") as bob,
        ):
            await alice.call_tool("read_file", {"path": "notes.md"})
            await bob.call_tool("read_file", {"path": "notes.md"})
            _ok(await bob.call_tool("write_file", {"path": "notes.md", "content": "bob\n"}))
            stale = await alice.call_tool("write_file", {"path": "notes.md", "content": "alice\n"})
            assert stale.is_error
            assert f"notes.md {STALE}" in _text(stale)
            assert "Read it again with read_file" in _text(stale)
            assert (workspace / "notes.md").read_text(encoding="utf-8") == "bob\n"

            # An explicit lease keeps the other agent out until it is released; the write made
            # under it is one the other agent has not seen.
            lease = await alice.call_tool(
                "acquire", {"resource": "notes.md", "predicate": "MUTATES"}
            )
            assert _ok(lease)
            seen = (await bob.call_tool("list_leases", {})).structured_content
            assert seen is not None
            assert [(x["agent_id"], x["mine"]) for x in seen["leases"]] == [("alice", False)]
            text = _ok(await alice.call_tool("read_file", {"path": "notes.md"}))
            _ok(await alice.call_tool("write_file", {"path": "notes.md", "content": text + "a\n"}))
            _ok(await alice.call_tool("release", {}))
            late = await bob.call_tool(
                "edit_file", {"path": "notes.md", "old_text": "bob", "new_text": "B"}
            )
            assert late.is_error and STALE in _text(late)
            await bob.call_tool("read_file", {"path": "notes.md"})
            _ok(
                await bob.call_tool(
                    "edit_file", {"path": "notes.md", "old_text": "bob", "new_text": "B"}
                )
            )
        assert (workspace / "notes.md").read_text(encoding="utf-8") == "B\na\n"


async def test_read_for_update_over_a_shared_server(workspace: Path, tmp_path: Path) -> None:
    """Through klock serve, a read for update shows as the agent's MUTATES lease until its write,
    and the other agent's write from an older read is refused."""
    with _klock_serve(tmp_path / "serve.log") as url:
        async with (
            _stdio(workspace, "--server", url, "--agent", "alice") as alice,
            _stdio(workspace, "--server", url, "--agent", "bob") as bob,
        ):
            old = _ok(await bob.call_tool("read_file", {"path": "notes.md"}))
            text = _ok(await alice.call_tool("read_file", {"path": "notes.md", "for_update": True}))
            seen = (await bob.call_tool("list_leases", {})).structured_content
            assert seen is not None
            assert [(x["agent_id"], x["predicate"], x["resource"]) for x in seen["leases"]] == [
                ("alice", "MUTATES", "FILE:notes.md")
            ]
            _ok(await alice.call_tool("write_file", {"path": "notes.md", "content": text + "a\n"}))
            after = (await bob.call_tool("list_leases", {})).structured_content
            assert after == {"agent": "bob", "leases": []}
            stale = await bob.call_tool("write_file", {"path": "notes.md", "content": old + "b\n"})
            assert stale.is_error and STALE in _text(stale)
    assert (workspace / "notes.md").read_text(encoding="utf-8") == "# notes\na\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_without_a_url_it_starts_or_finds_the_local_server(
    workspace: Path, tmp_path: Path
) -> None:
    """The first client starts a local klock serve (URL and pid on stderr); the next one finds
    and shares it."""
    port = _free_port()
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    try:
        with open(first_log, "w") as first_err, open(second_log, "w") as second_err:  # noqa: ASYNC230
            async with (
                _stdio(workspace, "--local-port", str(port), "--agent", "a", errlog=first_err) as a,
            ):
                started = first_log.read_text(encoding="utf-8")
                match = re.search(r"started a local klock server at (\S+) \(pid (\d+)", started)
                assert match, started
                assert match[1] == f"http://127.0.0.1:{port}"
                async with _stdio(
                    workspace, "--local-port", str(port), "--agent", "b", errlog=second_err
                ) as b:
                    found = second_log.read_text(encoding="utf-8")
                    assert f"using the local klock server at http://127.0.0.1:{port}" in found
                    await a.call_tool("read_file", {"path": "notes.md"})
                    await b.call_tool("read_file", {"path": "notes.md"})
                    _ok(await b.call_tool("write_file", {"path": "notes.md", "content": "b\n"}))
                    stale = await a.call_tool("write_file", {"path": "notes.md", "content": "a\n"})
                    assert stale.is_error and STALE in _text(stale)  # one kernel for both
    finally:
        started = re.search(r"\(pid (\d+), log (.+)\)", first_log.read_text(encoding="utf-8"))
        if started:  # the server outlives its clients by design: stop the one this test made
            os.kill(int(started[1]), signal.SIGTERM)
            await anyio.Path(started[2]).unlink(missing_ok=True)


def test_a_missing_mcp_sdk_is_a_clear_error() -> None:
    """Without the mcp SDK, 'klock mcp' says which extra to install."""
    code = "import sys; sys.modules['mcp'] = None\nfrom klock_async.cli import main\nmain(['mcp'])"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 2
    assert "pip install 'klock-async[mcp]'" in result.stderr


async def test_the_server_reports_the_package_version() -> None:
    """The MCP initialize answer names the server klock and its version the package's."""
    from klock_async import __version__

    async with Klock() as klock:
        agent = await klock.register_agent("coder")
        tools = AgentTools(klock, agent, Path("."))
        async with Client(create_server(tools)) as client:
            assert (client.server_info.name, client.server_info.version) == ("klock", __version__)


def _mcp_manage(flag: str, tmp_path: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "klock_async", "mcp", flag],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.stderr == ""
    return result.stdout


def test_a_started_local_server_can_be_listed_and_stopped(tmp_path: Path) -> None:
    """klock mcp --status lists the server klock mcp started; --stop ends it."""
    from klock_async.integrations.mcp import _is_klock_serve

    port = _free_port()
    start = (
        "import anyio\n"
        "from klock_async.integrations.mcp import ensure_local_server\n"
        f"print(anyio.run(ensure_local_server, {port}))"
    )
    started = subprocess.run(
        [sys.executable, "-c", start],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    url = started.stdout.strip()
    (record,) = tmp_path.glob("klock-*/serve-*.json")
    pid = json.loads(record.read_text(encoding="utf-8"))["pid"]
    try:
        listed = _mcp_manage("--status", tmp_path)
        assert f"{url}: running, pid {pid}" in listed
        stopped = _mcp_manage("--stop", tmp_path)
        assert f"{url}: stopped (pid {pid})" in stopped
        assert not _is_klock_serve(pid)
        assert not record.exists()
        after = _mcp_manage("--status", tmp_path)
        assert after.startswith("no local klock server started by klock mcp")
    finally:
        if _is_klock_serve(pid):
            os.kill(pid, signal.SIGKILL)


async def test_a_refusal_names_the_file_as_the_grant_does(workspace: Path) -> None:
    """A lease shows FILE:src/app.py; the Wait-Die refusal on it says FILE:src/app.py too."""
    async with Klock() as klock:
        old = await klock.register_agent("old")
        young = await klock.register_agent("young")
        old_tools, young_tools = (
            AgentTools(klock, old, workspace),
            AgentTools(klock, young, workspace),
        )
        async with Client(create_server(old_tools)) as a, Client(create_server(young_tools)) as b:
            granted = await a.call_tool(
                "acquire", {"resource": "src/app.py", "predicate": "MUTATES"}
            )
            assert granted.structured_content is not None
            assert granted.structured_content["resource"] == "FILE:src/app.py"
            await b.call_tool("acquire", {"resource": "notes.md", "predicate": "MUTATES"})
            refused = await b.call_tool(
                "acquire", {"resource": "src/app.py", "predicate": "MUTATES", "wait": False}
            )
            assert refused.is_error
            assert "FILE:src/app.py" in _text(refused)
            assert str(workspace) not in _text(refused)
            await a.call_tool("release", {})
            await b.call_tool("release", {})
