"""LangChain tools on the kernel: the klock_protected decorator and the file toolkit.

Real langchain-core tools (BaseTool subclasses and StructuredTool), invoked with ``ainvoke``
and ``invoke`` from many concurrent tasks and threads; no language model.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, Field

from klock_async import InvalidRequestError, Klock, KlockError, LeaseState, Predicate
from klock_async.compat import KlockClient
from klock_async.integrations.langchain import (
    KlockConflictError,
    KlockFileToolkit,
    KlockStaleWriteError,
    KlockToolError,
    klock_protected,
)

STALE = "changed since you read it"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "notes.md").write_text("# notes\n", encoding="utf-8")
    return root.resolve()


def _tools(toolkit: KlockFileToolkit) -> dict[str, BaseTool]:
    return {tool.name: tool for tool in toolkit.get_tools()}


async def test_toolkit_tools_are_structured_tools_with_schemas(workspace: Path) -> None:
    """The toolkit gives real StructuredTools with argument schemas the model can see."""
    async with Klock() as klock:
        tools = _tools(KlockFileToolkit(klock, "coder", workspace))
        assert sorted(tools) == [
            "edit_file",
            "list_files",
            "read_file",
            "release_file",
            "write_file",
        ]
        assert all(isinstance(tool, StructuredTool) for tool in tools.values())
        assert set(tools["edit_file"].args) == {"path", "old_text", "new_text"}
        assert set(tools["write_file"].args) == {"path", "content"}
        assert set(tools["list_files"].args) == {"path", "recursive"}
        assert set(tools["read_file"].args) == {"path", "for_update"}
        assert set(tools["release_file"].args) == {"path"}
        assert "read it again" in tools["write_file"].description


async def test_toolkit_round_trip(workspace: Path) -> None:
    """Read, write, edit and list through ainvoke work on the real files."""
    async with Klock() as klock:
        tools = _tools(KlockFileToolkit(klock, "coder", workspace))
        assert await tools["read_file"].ainvoke({"path": "notes.md"}) == "# notes\n"
        await tools["write_file"].ainvoke({"path": "src/a.py", "content": "x = 1\n"})
        answer = await tools["edit_file"].ainvoke(
            {"path": "src/a.py", "old_text": "x = 1", "new_text": "x = 2"}
        )
        assert answer == "edited src/a.py: replaced 1 occurrence"
        assert (workspace / "src/a.py").read_text(encoding="utf-8") == "x = 2\n"
        listing = await tools["list_files"].ainvoke({"path": ".", "recursive": True})
        assert listing == "notes.md\nsrc/\nsrc/a.py"


async def test_many_agents_editing_one_workspace_lose_no_edit(workspace: Path) -> None:
    """Concurrent agents doing read-then-write through ainvoke keep every edit; stale writes
    come back as the re-read message and the agent retries."""
    agents, rounds = 8, 4
    stale_answers = 0

    async with Klock() as klock:

        async def agent(n: int) -> None:
            nonlocal stale_answers
            tools = _tools(KlockFileToolkit(klock, f"agent-{n}", workspace))
            for r in range(rounds):
                while True:
                    text = await tools["read_file"].ainvoke({"path": "notes.md"})
                    await asyncio.sleep(0)  # think
                    answer = await tools["write_file"].ainvoke(
                        {"path": "notes.md", "content": f"{text}- agent {n} round {r}\n"}
                    )
                    if STALE not in answer:
                        break
                    assert "Read it again" in answer
                    stale_answers += 1

        async with asyncio.TaskGroup() as tg:
            for n in range(agents):
                tg.create_task(agent(n))

        text = (workspace / "notes.md").read_text(encoding="utf-8")
        for n in range(agents):
            for r in range(rounds):
                assert text.count(f"- agent {n} round {r}\n") == 1
        assert text.count("\n") == agents * rounds + 1
        assert (await klock.statistics()).causal_violations == stale_answers
        assert await klock.leases() == []


async def test_a_stale_write_is_reported_as_the_reread_message(workspace: Path) -> None:
    """A write after another agent's write returns the re-read message and writes nothing."""
    async with Klock() as klock:
        alice = _tools(KlockFileToolkit(klock, "alice", workspace))
        bob = _tools(KlockFileToolkit(klock, "bob", workspace))
        await alice["read_file"].ainvoke({"path": "notes.md"})
        await bob["read_file"].ainvoke({"path": "notes.md"})
        await bob["edit_file"].ainvoke({"path": "notes.md", "old_text": "notes", "new_text": "B"})
        answer = await alice["write_file"].ainvoke({"path": "notes.md", "content": "alice\n"})
        assert answer.startswith(f"notes.md {STALE}")
        assert "Read it again with read_file" in answer
        assert (workspace / "notes.md").read_text(encoding="utf-8") == "# B\n"

        raising = _tools(KlockFileToolkit(klock, "alice", workspace, handle_tool_error=False))
        with pytest.raises(KlockStaleWriteError) as caught:
            await raising["edit_file"].ainvoke(
                {"path": "notes.md", "old_text": "B", "new_text": "A"}
            )
        assert isinstance(caught.value, ToolException)
        assert caught.value.reason == "STALE"
        assert STALE in str(caught.value)


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        pytest.param("read_file", {"path": "../x"}, "outside the workspace", id="escape"),
        pytest.param("read_file", {"path": "missing.md"}, "does not exist", id="missing"),
        pytest.param(
            "edit_file",
            {"path": "notes.md", "old_text": "absent", "new_text": "x"},
            "was not found",
            id="edit-mismatch",
        ),
        pytest.param("list_files", {"path": "notes.md"}, "is a file", id="list-a-file"),
    ],
)
async def test_refusals_reach_the_model_as_text(
    workspace: Path, tool: str, args: dict[str, Any], expected: str
) -> None:
    """Bad paths and edits come back as a message the model can act on, not a crash."""
    async with Klock() as klock:
        tools = _tools(KlockFileToolkit(klock, "coder", workspace))
        await tools["read_file"].ainvoke({"path": "notes.md"})
        answer = await tools[tool].ainvoke(args)
        assert expected in answer
        raising = _tools(KlockFileToolkit(klock, "coder", workspace, handle_tool_error=False))
        with pytest.raises(KlockToolError, match=expected):
            await raising[tool].ainvoke(args)
    assert (workspace / "notes.md").read_text(encoding="utf-8") == "# notes\n"


async def test_toolkit_tools_work_synchronously_from_threads(workspace: Path) -> None:
    """invoke() from worker threads runs the calls on the kernel's loop; edits are kept."""
    async with Klock() as klock:
        toolkits = [_tools(KlockFileToolkit(klock, f"agent-{n}", workspace)) for n in range(4)]

        def work(tools: dict[str, BaseTool], n: int) -> None:
            for r in range(3):
                while True:
                    text = tools["read_file"].invoke({"path": "notes.md"})
                    answer = tools["write_file"].invoke(
                        {"path": "notes.md", "content": f"{text}{n}.{r}\n"}
                    )
                    if STALE not in answer:
                        break

        await asyncio.gather(*(asyncio.to_thread(work, t, n) for n, t in enumerate(toolkits)))
        lines = (workspace / "notes.md").read_text(encoding="utf-8").splitlines()
        assert sorted(lines[1:]) == sorted(f"{n}.{r}" for n in range(4) for r in range(3))

        with pytest.raises(RuntimeError, match="ainvoke"):
            toolkits[0]["read_file"].invoke({"path": "notes.md"})  # on the loop itself


class _Counter:
    """A shared value updated read-modify-write, the way tools update shared state."""

    def __init__(self) -> None:
        self.value = 0


class _AddInput(BaseModel):
    key: str
    amount: int


def _make_async_tool(klock: Any, agent: str, counter: _Counter, **options: Any) -> BaseTool:
    class AddTool(BaseTool):
        name: str = "add"
        description: str = "Add an amount to a shared counter."
        args_schema: type[BaseModel] = _AddInput

        def _run(self, key: str, amount: int) -> str:  # pragma: no cover - async only
            raise NotImplementedError

        @klock_protected(
            klock_client=klock,
            agent_id=agent,
            session_id="counting",
            resource_type="CONFIG_KEY",
            resource_path_extractor=lambda kwargs: kwargs["key"],
            predicate="MUTATES",
            **options,
        )
        async def _arun(self, key: str, amount: int) -> str:
            seen = counter.value
            await asyncio.sleep(0)  # another call could run here without the lease
            counter.value = seen + amount
            return f"{key} = {counter.value}"

    return AddTool()


async def test_decorated_async_tools_serialise_concurrent_calls() -> None:
    """Agents calling klock_protected _arun tools concurrently through ainvoke lose no update."""
    counter = _Counter()
    async with Klock() as klock:
        # Heavy contention on one key: allow more deaths than the default ten before giving up.
        tools = [_make_async_tool(klock, f"agent-{n}", counter, max_retries=100) for n in range(6)]

        async def agent(tool: BaseTool) -> None:
            for _ in range(10):
                await tool.ainvoke({"key": "total", "amount": 1})

        await asyncio.gather(*(agent(tool) for tool in tools))
        assert counter.value == 60
        assert await klock.leases() == []
        assert {a.agent_id for a in await klock.agents()} == {f"agent-{n}" for n in range(6)}


def _make_sync_tool(klock: Any, agent: str, path: Path, **options: Any) -> BaseTool:
    class AppendTool(BaseTool):
        name: str = "append_line"
        description: str = "Append a line to a file."

        @klock_protected(
            klock,
            agent,
            None,
            "FILE",
            lambda kwargs: str(kwargs["path"]),
            "MUTATES",
            **options,
        )
        def _run(self, path: str, line: str) -> str:
            text = Path(path).read_text(encoding="utf-8")
            Path(path).write_text(text + line + "\n", encoding="utf-8")
            return "ok"

    return AppendTool()


async def test_decorated_sync_tools_work_from_executor_threads(tmp_path: Path) -> None:
    """A sync _run run by ainvoke in executor threads holds the lease while its body runs."""
    target = tmp_path / "log.txt"
    target.write_text("", encoding="utf-8")
    async with Klock() as klock:
        tools = [_make_sync_tool(klock, f"agent-{n}", target, max_retries=100) for n in range(4)]

        async def agent(n: int, tool: BaseTool) -> None:
            for i in range(6):
                answer = await tool.ainvoke({"path": str(target), "line": f"{n}-{i}"})
                assert answer == "ok"

        def blocking_agent(n: int, tool: BaseTool) -> None:
            for i in range(3):
                assert tool.invoke({"path": str(target), "line": f"sync-{n}-{i}"}) == "ok"

        await asyncio.gather(
            *(agent(n, tool) for n, tool in enumerate(tools)),
            *(asyncio.to_thread(blocking_agent, n, tool) for n, tool in enumerate(tools)),
        )
        lines = target.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 4 * 6 + 4 * 3
        assert len(set(lines)) == len(lines)
        assert await klock.leases() == []


_MODULE_KLOCK = Klock()
"""A Klock created before its loop exists, as a module-level tool definition would."""


class _ModuleLevelTool(BaseTool):
    name: str = "touch"
    description: str = "Record a touch."
    touched: list[str] = Field(default_factory=list)

    @klock_protected(_MODULE_KLOCK, "module-agent", "s", "FILE", lambda kw: kw["path"])
    def _run(self, path: str) -> str:
        self.touched.append(path)
        return path


async def test_tools_defined_before_the_kernel_started_find_its_loop() -> None:
    """A sync tool decorated at import time, before the Klock was started, still works."""
    async with _MODULE_KLOCK as klock:
        tool = _ModuleLevelTool()
        assert await tool.ainvoke({"path": "/a"}) == "/a"
        assert tool.touched == ["/a"]
        assert await klock.leases() == []


async def test_a_call_that_keeps_dying_becomes_a_tool_exception(tmp_path: Path) -> None:
    """Over a client that never waits (Klock v1), a call refused past every retry is a DIE
    message for the model; over a Klock the call would queue instead."""
    target = tmp_path / "x.txt"
    target.write_text("", encoding="utf-8")
    with KlockClient() as client:
        client.register_agent("older", priority=1)
        client.register_agent("younger", priority=2)
        tool = _make_sync_tool(client, "younger", target, max_retries=0)
        async_tool = _make_async_tool(client, "younger", _Counter(), max_retries=0)
        held = [
            client.acquire_lease("older", "s", "FILE", str(target), "CONSUMES", 60_000),
            client.acquire_lease("older", "s", "CONFIG_KEY", "total", "CONSUMES", 60_000),
        ]
        with pytest.raises(KlockConflictError) as caught:
            await tool.ainvoke({"path": str(target), "line": "x"})
        with pytest.raises(KlockConflictError):
            await async_tool.ainvoke({"key": "total", "amount": 1})
        error = caught.value
        assert isinstance(error, ToolException)
        assert error.reason == "DIE"
        assert error.agent_id == "younger"
        assert "Nothing was changed" in str(error)
        assert target.read_text(encoding="utf-8") == ""

        tool.handle_tool_error = True
        answer = await tool.ainvoke({"path": str(target), "line": "x"})
        assert "call append_line again" in answer
        for lease in held:
            client.release_lease(lease["lease_id"])


async def test_serializable_tools_report_stale_writes() -> None:
    """With isolation=SERIALIZABLE a write of a version the agent never read is refused."""
    store: dict[str, str] = {"cfg": "v0"}
    async with Klock() as klock:

        def tools_for(agent: str) -> tuple[BaseTool, BaseTool]:
            common: dict[str, Any] = {
                "klock_client": klock,
                "agent_id": agent,
                "session_id": None,
                "resource_type": "CONFIG_KEY",
                "resource_path_extractor": lambda kw: kw["key"],
                "isolation": "SERIALIZABLE",
            }

            class Get(BaseTool):
                name: str = "get"
                description: str = "Read a key."

                def _run(self, key: str) -> str:  # pragma: no cover - async only
                    raise NotImplementedError

                @klock_protected(predicate="CONSUMES", **common)
                async def _arun(self, key: str) -> str:
                    return store[key]

            class Put(BaseTool):
                name: str = "put"
                description: str = "Write a key."

                def _run(self, key: str, value: str) -> str:  # pragma: no cover - async only
                    raise NotImplementedError

                @klock_protected(predicate=Predicate.MUTATES, **common)
                async def _arun(self, key: str, value: str) -> str:
                    store[key] = value
                    return "ok"

            return Get(), Put()

        get_a, put_a = tools_for("a")
        get_b, put_b = tools_for("b")
        await get_a.ainvoke({"key": "cfg"})
        await get_b.ainvoke({"key": "cfg"})
        assert await put_b.ainvoke({"key": "cfg", "value": "b"}) == "ok"
        with pytest.raises(KlockStaleWriteError, match="read it again"):
            await put_a.ainvoke({"key": "cfg", "value": "a"})
        assert store["cfg"] == "b"
        await get_a.ainvoke({"key": "cfg"})
        assert await put_a.ainvoke({"key": "cfg", "value": "a"}) == "ok"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"predicate": "WRITES"}, "unknown predicate", id="predicate"),
        pytest.param({"resource_type": "DISK"}, "unknown resource type", id="resource-type"),
        pytest.param({"ttl_ms": 0}, "ttl_ms", id="ttl"),
        pytest.param({"max_retries": -1}, "max_retries", id="retries"),
        pytest.param({"agent_id": ""}, "agent_id", id="agent"),
        pytest.param({"isolation": "STRICT"}, "STRICT", id="isolation"),
        pytest.param({"klock_client": object()}, "klock_client", id="client"),
        pytest.param({"resource_path_extractor": "path"}, "extractor", id="extractor"),
    ],
)
def test_bad_decorator_arguments_are_refused(options: dict[str, Any], message: str) -> None:
    """Every bad decorator argument is a typed error at decoration time."""
    arguments: dict[str, Any] = {
        "klock_client": Klock(),
        "agent_id": "coder",
        "session_id": None,
        "resource_type": "FILE",
        "resource_path_extractor": lambda kw: kw["path"],
        **options,
    }
    with pytest.raises(InvalidRequestError, match=message):
        klock_protected(**arguments)


async def test_an_extractor_that_fails_is_a_clear_error() -> None:
    """An extractor that raises or returns nothing gives a ValueError naming the arguments."""
    async with Klock() as klock:

        @klock_protected(klock, "coder", None, "FILE", lambda kw: kw["missing"])
        async def broken(path: str) -> str:  # pragma: no cover - never runs
            return path

        @klock_protected(klock, "coder", None, "FILE", lambda kw: "")
        async def empty(path: str) -> str:  # pragma: no cover - never runs
            return path

        with pytest.raises(InvalidRequestError, match=r"extractor raised KeyError.*\['path'\]"):
            await broken("/a")
        with pytest.raises(ValueError, match="could not resolve a resource path"):
            await empty("/a")
        assert await klock.leases() == []


def test_sync_tools_on_the_blocking_compat_client(tmp_path: Path) -> None:
    """With klock_async.compat.KlockClient, sync tools in many threads lose no line."""
    target = tmp_path / "log.txt"
    target.write_text("", encoding="utf-8")
    with KlockClient() as client:
        client.register_agent("agent-0", None)  # registered by hand, as v1 code does
        tools = [_make_sync_tool(client, f"agent-{n}", target, max_retries=500) for n in range(4)]

        def agent(n: int) -> None:
            for i in range(5):
                assert tools[n].invoke({"path": str(target), "line": f"{n}-{i}"}) == "ok"

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(agent, range(4)))
        lines = target.read_text(encoding="utf-8").splitlines()
        assert sorted(lines) == sorted(f"{n}-{i}" for n in range(4) for i in range(5))
        assert client.list_leases() == []


async def test_async_tools_on_the_blocking_compat_client() -> None:
    """An async _arun over the blocking client keeps the lease while it awaits."""
    counter = _Counter()
    with KlockClient() as client:
        tools = [_make_async_tool(client, f"agent-{n}", counter, max_retries=500) for n in range(3)]

        async def agent(tool: BaseTool) -> None:
            for _ in range(5):
                await tool.ainvoke({"key": "total", "amount": 1})

        await asyncio.gather(*(agent(tool) for tool in tools))
        assert counter.value == 15
        assert client.list_leases() == []


def test_a_missing_langchain_core_is_a_clear_import_error() -> None:
    """Without langchain-core the module says which extra to install."""
    code = (
        "import sys; sys.modules['langchain_core'] = None\n"
        "import klock_async.integrations.langchain"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode != 0
    assert "pip install 'klock-async[langchain]'" in result.stderr


def _touch_tool(klock: Klock) -> BaseTool:
    class _Touch(BaseTool):
        name: str = "touch"
        description: str = "Record a touch."
        touched: list[str] = Field(default_factory=list)

        @klock_protected(klock, "thread-agent", "s", "FILE", lambda kw: kw["path"])
        def _run(self, path: str) -> str:
            self.touched.append(path)
            return path

    return _Touch()


async def test_sync_tool_runs_over_every_kernel(kernel_factory: Any) -> None:
    """A sync tool called from a worker thread works on every kernel, remote included."""
    async with kernel_factory() as klock:
        tool = _touch_tool(klock)
        assert await asyncio.to_thread(tool.invoke, {"path": "/remote/a"}) == "/remote/a"
        assert tool.touched == ["/remote/a"]  # type: ignore[attr-defined]
        assert await klock.leases() == []


# --------------------------------------------------------------------------- read for update


async def test_read_for_update_keeps_other_agents_out_until_the_write(workspace: Path) -> None:
    """read_file(for_update=True) holds MUTATES on the file; the agent's write ends the hold."""
    async with Klock() as klock:
        coder = _tools(KlockFileToolkit(klock, "coder", workspace))
        other = await klock.register_agent("other")
        text = await coder["read_file"].ainvoke({"path": "notes.md", "for_update": True})
        assert text == "# notes\n"
        [hold] = await klock.leases()
        assert (hold.agent_id, hold.predicate) == ("coder", Predicate.MUTATES)
        assert str(hold.resource) == f"FILE:{workspace}/notes.md"
        for predicate in ("CONSUMES", "MUTATES"):
            with pytest.raises(KlockError):  # died or would wait: the file is held
                await other.acquire(hold.resource, predicate, wait=False)

        # The agent's own calls on the held file run under its hold.
        assert await coder["read_file"].ainvoke({"path": "notes.md"}) == "# notes\n"
        assert await coder["list_files"].ainvoke({"path": "."}) == "notes.md"
        done = await coder["write_file"].ainvoke({"path": "notes.md", "content": text + "a\n"})
        assert done.startswith("overwrote notes.md")
        assert await klock.leases() == []  # the write ended the hold
        lease = await other.acquire(hold.resource, "CONSUMES", wait=False)
        await lease.release()
        assert (await klock.statistics()).causal_violations == 0


async def test_read_for_update_makes_the_others_stale_write_refused(workspace: Path) -> None:
    """A write built on a read older than a held edit is refused: the hold's write was recorded."""
    async with Klock() as klock:
        alice = _tools(KlockFileToolkit(klock, "alice", workspace))
        bob = _tools(KlockFileToolkit(klock, "bob", workspace))
        seen_by_bob = await bob["read_file"].ainvoke({"path": "notes.md"})
        seen = await alice["read_file"].ainvoke({"path": "notes.md", "for_update": True})
        await alice["edit_file"].ainvoke(
            {"path": "notes.md", "old_text": seen, "new_text": seen + "alice\n"}
        )
        refused = await bob["write_file"].ainvoke({"path": "notes.md", "content": seen_by_bob})
        assert STALE in refused
        assert (workspace / "notes.md").read_text(encoding="utf-8") == "# notes\nalice\n"


async def test_a_reader_waits_for_the_held_edit_and_sees_it(workspace: Path) -> None:
    """Another agent's read of a held file returns only after the holder's write, with it."""
    async with Klock() as klock:
        alice = _tools(KlockFileToolkit(klock, "alice", workspace))
        bob = _tools(KlockFileToolkit(klock, "bob", workspace))
        seen = await alice["read_file"].ainvoke({"path": "notes.md", "for_update": True})
        read = asyncio.create_task(bob["read_file"].ainvoke({"path": "notes.md"}))
        await alice["write_file"].ainvoke({"path": "notes.md", "content": seen + "alice\n"})
        assert await read == "# notes\nalice\n"
        assert await klock.leases() == []


async def test_release_file_gives_a_held_file_up_without_writing(workspace: Path) -> None:
    """release_file ends a read for update; nothing is written, others may use the file."""
    async with Klock() as klock:
        toolkit = KlockFileToolkit(klock, "coder", workspace)
        coder = _tools(toolkit)
        (workspace / "b.md").write_text("b\n", encoding="utf-8")
        for path in ("notes.md", "b.md"):
            await coder["read_file"].ainvoke({"path": path, "for_update": True})
        assert toolkit.updates.held() == ["b.md", "notes.md"]
        assert await coder["release_file"].ainvoke({"path": "b.md"}) == "released b.md"
        assert toolkit.updates.held() == ["notes.md"]
        not_held = await coder["release_file"].ainvoke({"path": "b.md"})
        assert "you hold no read for update of 'b.md'; held: notes.md" in not_held
        assert await coder["release_file"].ainvoke({}) == "released notes.md"
        assert await klock.leases() == []
        assert await coder["release_file"].ainvoke({}) == "held nothing to release"
        assert (await klock.statistics()).causal_violations == 0


async def test_read_for_update_ends_when_its_ttl_passes(workspace: Path) -> None:
    """A hold nobody touches ends at its ttl; a later write of the holder is checked as usual."""
    async with Klock() as klock:
        toolkit = KlockFileToolkit(klock, "alice", workspace, update_ttl=0.05)
        alice = _tools(toolkit)
        bob = _tools(KlockFileToolkit(klock, "bob", workspace))
        seen = await alice["read_file"].ainvoke({"path": "notes.md", "for_update": True})
        lease = await toolkit.updates.lease_of("notes.md")
        assert lease is not None
        assert await lease.wait_lost() is LeaseState.EXPIRED
        text = await bob["read_file"].ainvoke({"path": "notes.md"})
        await bob["write_file"].ainvoke({"path": "notes.md", "content": text + "bob\n"})
        refused = await alice["write_file"].ainvoke({"path": "notes.md", "content": seen + "a\n"})
        assert STALE in refused
        assert toolkit.updates.held() == []
        assert (workspace / "notes.md").read_text(encoding="utf-8") == "# notes\nbob\n"


async def test_read_for_update_of_a_missing_file_holds_nothing(workspace: Path) -> None:
    """A read for update that fails (no such file) gives its hold back at once."""
    async with Klock() as klock:
        toolkit = KlockFileToolkit(klock, "coder", workspace)
        answer = await _tools(toolkit)["read_file"].ainvoke({"path": "nope.md", "for_update": True})
        assert "does not exist" in answer
        assert toolkit.updates.held() == []
        assert await klock.leases() == []


async def test_the_holder_writes_while_an_older_agent_waits(workspace: Path) -> None:
    """An older agent queued on a held file waits; the holder's own write still goes through."""
    async with Klock() as klock:
        older = await klock.register_agent("older")
        holder = _tools(KlockFileToolkit(klock, "holder", workspace, handle_tool_error=False))
        seen = await holder["read_file"].ainvoke({"path": "notes.md", "for_update": True})
        [hold] = await klock.leases()
        posted = asyncio.Event()

        async def wait_for_the_file() -> None:
            posted.set()  # the acquire below posts its request before it first yields
            lease = await older.acquire(hold.resource, "MUTATES")
            await lease.release()

        waiting = asyncio.create_task(wait_for_the_file())
        try:
            await posted.wait()
            assert (await klock.statistics()).requests_waiting == 1  # FIFO mailbox: queued
            await holder["write_file"].ainvoke({"path": "notes.md", "content": seen + "held\n"})
            await waiting
        finally:
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
