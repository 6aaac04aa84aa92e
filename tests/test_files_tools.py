"""The protected workspace file tools, on real files in a temporary directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
import structlog

from klock_async import (
    CausalViolationError,
    InvalidRequestError,
    IsolationLevel,
    Klock,
    LeaseDied,
)
from klock_async.integrations.files import (
    EditMismatchError,
    FileToolError,
    PathOutsideWorkspaceError,
    ReadForUpdate,
    WorkspaceFileNotFoundError,
    WorkspaceFiles,
)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text("print('hi')\n", encoding="utf-8")
    (root / "README.md").write_text("# demo\n", encoding="utf-8")
    return root.resolve()


async def test_read_write_edit_list_round_trip(workspace: Path) -> None:
    """Each tool does what it says on real files and releases its lease afterwards."""
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        assert await files.read_file("src/app.py") == "print('hi')\n"
        assert await files.write_file("src/new/mod.py", "x = 1\n") == (
            "created src/new/mod.py (6 characters)"
        )
        assert (workspace / "src/new/mod.py").read_text(encoding="utf-8") == "x = 1\n"
        assert await files.edit_file("src/new/mod.py", "x = 1", "x = 2") == (
            "edited src/new/mod.py: replaced 1 occurrence"
        )
        assert await files.read_file(str(workspace / "src/new/mod.py")) == "x = 2\n"
        assert await files.list_files() == ["README.md", "src/"]
        assert await files.list_files("src", recursive=True) == [
            "src/app.py",
            "src/new/",
            "src/new/mod.py",
        ]
        assert await klock.leases() == []
        assert [a.agent_id for a in await klock.agents()] == ["coder"]


async def test_stale_write_is_refused_with_a_reread_message(workspace: Path) -> None:
    """A write based on a read made stale by another agent's write is refused until a re-read."""
    async with Klock() as klock:
        alice = WorkspaceFiles(klock, "alice", workspace)
        bob = WorkspaceFiles(klock, "bob", workspace)
        seen = await alice.read_file("README.md")
        await bob.read_file("README.md")
        await bob.write_file("README.md", "# bob was here\n")
        with pytest.raises(CausalViolationError) as caught:
            await alice.write_file("README.md", seen + "alice\n")
        message = str(caught.value)
        assert "README.md changed since you read it" in message
        assert "Read it again" in message
        assert "Nothing was written" in message
        assert (workspace / "README.md").read_text(encoding="utf-8") == "# bob was here\n"
        assert await klock.leases() == []

        fresh = await alice.read_file("README.md")
        await alice.write_file("README.md", fresh + "alice\n")
        assert (workspace / "README.md").read_text(encoding="utf-8") == "# bob was here\nalice\n"


async def test_stale_edit_is_refused_too(workspace: Path) -> None:
    """An edit after another agent's write is refused until the agent reads the file again."""
    async with Klock() as klock:
        alice = WorkspaceFiles(klock, "alice", workspace)
        bob = WorkspaceFiles(klock, "bob", workspace)
        await alice.read_file("src/app.py")
        await bob.read_file("src/app.py")
        await bob.edit_file("src/app.py", "hi", "hello")
        with pytest.raises(CausalViolationError, match="changed since you read it"):
            await alice.edit_file("src/app.py", "print", "log")
        assert (workspace / "src/app.py").read_text(encoding="utf-8") == "print('hello')\n"
        await alice.read_file("src/app.py")
        await alice.edit_file("src/app.py", "print", "log")
        assert (workspace / "src/app.py").read_text(encoding="utf-8") == "log('hello')\n"


async def test_writing_a_file_never_read_depends_on_who_wrote_it(workspace: Path) -> None:
    """Overwriting another agent's file unseen is stale; creating a file or overwriting one
    nobody wrote through the tools is not."""
    async with Klock() as klock:
        alice = WorkspaceFiles(klock, "alice", workspace)
        bob = WorkspaceFiles(klock, "bob", workspace)
        await bob.write_file("notes.txt", "bob's notes\n")  # brand new: fine
        await alice.write_file("src/app.py", "untracked before\n")  # only on disk: fine
        with pytest.raises(CausalViolationError, match=r"notes\.txt changed since you read it"):
            await alice.write_file("notes.txt", "alice's notes\n")
        assert (workspace / "notes.txt").read_text(encoding="utf-8") == "bob's notes\n"


async def test_the_same_agent_can_write_again_without_rereading(workspace: Path) -> None:
    """An agent's own write counts as seen: it may write the file again at once."""
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        await files.write_file("a.txt", "1\n")
        await files.write_file("a.txt", "2\n")
        await files.edit_file("a.txt", "2", "3")
        assert (workspace / "a.txt").read_text(encoding="utf-8") == "3\n"


async def test_many_agents_lose_no_edit(workspace: Path) -> None:
    """Agents doing read-think-write and edits concurrently keep every change when they re-read
    after a refusal."""
    agents, rounds = 6, 5
    (workspace / "shared.txt").write_text("END\n", encoding="utf-8")
    refusals = 0

    async with Klock() as klock:

        async def agent(n: int) -> None:
            nonlocal refusals
            files = WorkspaceFiles(klock, f"agent-{n}", workspace)
            for r in range(rounds):
                marker = f"agent-{n}-round-{r}"
                while True:
                    text = await files.read_file("shared.txt")
                    await anyio.lowlevel.checkpoint()  # think: another agent may write meanwhile
                    try:
                        if r % 2:
                            await files.edit_file("shared.txt", "END", f"{marker}\nEND")
                        else:
                            await files.write_file("shared.txt", f"{marker}\n{text}")
                        break
                    except CausalViolationError:
                        refusals += 1

        async with anyio.create_task_group() as tg:
            for n in range(agents):
                tg.start_soon(agent, n)

        text = (workspace / "shared.txt").read_text(encoding="utf-8")
        for n in range(agents):
            for r in range(rounds):
                assert text.count(f"agent-{n}-round-{r}\n") == 1
        assert text.count("\n") == agents * rounds + 1
        assert await klock.leases() == []
        assert (await klock.statistics()).causal_violations == refusals


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("../outside.txt", id="dotdot"),
        pytest.param("src/../../outside.txt", id="dotdot-inside"),
        pytest.param("/etc/passwd", id="absolute-elsewhere"),
        pytest.param("link-out/secret.txt", id="symlinked-dir"),
        pytest.param("file-link", id="symlinked-file"),
    ],
)
async def test_paths_outside_the_workspace_are_refused(workspace: Path, path: str) -> None:
    """Paths that resolve outside the root are refused for every tool, and nothing is written."""
    outside = workspace.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n", encoding="utf-8")
    os.symlink(outside, workspace / "link-out")
    os.symlink(outside / "secret.txt", workspace / "file-link")
    before = sorted(p.name for p in workspace.parent.iterdir())
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        with pytest.raises(PathOutsideWorkspaceError, match="outside the workspace"):
            await files.read_file(path)
        with pytest.raises(PathOutsideWorkspaceError):
            await files.write_file(path, "pwned\n")
        with pytest.raises(PathOutsideWorkspaceError):
            await files.edit_file(path, "secret", "pwned")
        with pytest.raises(PathOutsideWorkspaceError):
            await files.list_files(path)
        assert await klock.leases() == []
    assert (outside / "secret.txt").read_text(encoding="utf-8") == "secret\n"
    assert sorted(p.name for p in workspace.parent.iterdir()) == before


async def test_symlinks_inside_the_workspace_are_followed(workspace: Path) -> None:
    """A symlink that stays inside the root is the file it points to (one lease, one clock)."""
    os.symlink(workspace / "src" / "app.py", workspace / "alias.py")
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        assert (await files.resolve("alias.py")).relative == "src/app.py"
        assert await files.read_file("alias.py") == "print('hi')\n"


@pytest.mark.parametrize(
    ("old", "new", "error", "message"),
    [
        pytest.param("missing", "x", EditMismatchError, "was not found", id="not-found"),
        pytest.param("a", "b", EditMismatchError, "occurs 3 times", id="ambiguous"),
        pytest.param("", "x", FileToolError, "old_text is empty", id="empty-old"),
        pytest.param("banana", "banana", FileToolError, "the same", id="no-change"),
    ],
)
async def test_bad_edits_change_nothing(
    workspace: Path, old: str, new: str, error: type[Exception], message: str
) -> None:
    """An edit whose old_text is missing, ambiguous or empty is refused and leaves the file."""
    (workspace / "fruit.txt").write_text("banana\n", encoding="utf-8")
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        await files.read_file("fruit.txt")
        with pytest.raises(error, match=message):
            await files.edit_file("fruit.txt", old, new)
        assert (workspace / "fruit.txt").read_text(encoding="utf-8") == "banana\n"
        assert await klock.leases() == []
        assert await klock.tracked_paths() == ()  # no write was recorded


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        pytest.param(
            "read-missing", WorkspaceFileNotFoundError, "does not exist", id="read-missing"
        ),
        pytest.param(
            "edit-missing", WorkspaceFileNotFoundError, "does not exist", id="edit-missing"
        ),
        pytest.param("read-dir", FileToolError, "is a directory", id="read-dir"),
        pytest.param("read-root", FileToolError, "workspace root", id="read-root"),
        pytest.param("list-file", FileToolError, "is a file", id="list-file"),
        pytest.param(
            "list-missing", WorkspaceFileNotFoundError, "does not exist", id="list-missing"
        ),
        pytest.param("read-binary", FileToolError, "not utf-8 text", id="read-binary"),
        pytest.param("empty-path", FileToolError, "non-empty string", id="empty-path"),
        pytest.param("write-non-str", FileToolError, "must be a string", id="write-non-str"),
        pytest.param("write-dir", FileToolError, "is a directory", id="write-dir"),
    ],
)
async def test_bad_requests_get_typed_errors(
    workspace: Path, call: str, error: type[Exception], message: str
) -> None:
    """Missing files, directories, binary files and bad arguments get clear typed errors."""
    (workspace / "blob.bin").write_bytes(b"\xff\xfe\x00")
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        calls = {
            "read-missing": lambda: files.read_file("nope.txt"),
            "edit-missing": lambda: files.edit_file("nope.txt", "a", "b"),
            "read-dir": lambda: files.read_file("src"),
            "read-root": lambda: files.read_file("."),
            "list-file": lambda: files.list_files("README.md"),
            "list-missing": lambda: files.list_files("nope"),
            "read-binary": lambda: files.read_file("blob.bin"),
            "empty-path": lambda: files.read_file("  "),
            "write-non-str": lambda: files.write_file("a.txt", 42),  # type: ignore[arg-type]
            "write-dir": lambda: files.write_file("src", "x"),
        }
        with pytest.raises(error, match=message) as caught:
            await calls[call]()
        assert isinstance(caught.value, InvalidRequestError)
        assert await klock.leases() == []
    assert not (workspace / "nope.txt").exists()
    assert not (workspace / "a.txt").exists()


def test_bad_construction_is_refused(workspace: Path) -> None:
    """A root that is not a directory, an empty agent id or a bad limit are refused at once."""
    klock = Klock()
    with pytest.raises(FileToolError, match="not an existing directory"):
        WorkspaceFiles(klock, "coder", workspace / "README.md")
    with pytest.raises(FileToolError, match="not an existing directory"):
        WorkspaceFiles(klock, "coder", workspace / "missing")
    with pytest.raises(InvalidRequestError, match="agent_id"):
        WorkspaceFiles(klock, " ", workspace)
    with pytest.raises(InvalidRequestError, match="max_entries"):
        WorkspaceFiles(klock, "coder", workspace, max_entries=0)
    with pytest.raises(InvalidRequestError, match="ttl"):
        WorkspaceFiles(klock, "coder", workspace, ttl=-1)


async def test_long_listings_say_what_they_left_out(workspace: Path) -> None:
    """A listing longer than max_entries ends with a line saying how many entries are missing."""
    for i in range(5):
        (workspace / "src" / f"m{i}.py").write_text("", encoding="utf-8")
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace, max_entries=3)
        listing = await files.list_files("src")
        assert listing == [
            "src/app.py",
            "src/m0.py",
            "src/m1.py",
            "... 3 more entries not shown; list a subdirectory",
        ]


async def test_a_call_waits_in_the_queue_for_the_holder(workspace: Path) -> None:
    """A write of a file an older agent reads waits in the queue, never dies, then succeeds."""
    queued = anyio.Event()

    def notice(logger: object, name: str, event: dict[str, object]) -> dict[str, object]:
        if event["event"] == "request.queued":
            queued.set()
        raise structlog.DropEvent

    saved = structlog.get_config()
    structlog.configure(processors=[notice])
    try:
        async with Klock() as klock:
            older = await klock.register_agent("older")
            files = WorkspaceFiles(klock, "younger", workspace)
            done = anyio.Event()

            async def write() -> None:
                await files.write_file("README.md", "# younger\n")
                done.set()

            async with (
                anyio.create_task_group() as tg,
                older.lease(f"FILE:{workspace}/README.md", "CONSUMES"),
            ):
                tg.start_soon(write)
                await queued.wait()
                assert not done.is_set()
                assert (workspace / "README.md").read_text(encoding="utf-8") == "# demo\n"
            assert done.is_set()
            assert (workspace / "README.md").read_text(encoding="utf-8") == "# younger\n"
            assert (await klock.statistics()).deaths == 0
    finally:
        structlog.configure(**saved)


async def test_calls_inside_a_session_reuse_its_leases(workspace: Path) -> None:
    """With session=, a call runs under the session's own leases; others are kept out until
    the session ends, and a death is raised rather than retried."""
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        await files.read_file("README.md")  # registers "coder" first: it is the older agent
        other = await klock.register_agent("other")
        coder = await klock.agent("coder")
        readme = (await files.resolve("README.md")).resource
        async with coder.session(isolation=IsolationLevel.SERIALIZABLE) as session:
            held = await session.acquire(readme, "MUTATES")
            text = await files.read_file("README.md", session=session)
            await files.write_file("README.md", text + "more\n", session=session)
            with pytest.raises(LeaseDied):
                await other.acquire(readme, "CONSUMES", wait=False)
            assert [lease.id for lease in await klock.leases()] == [held.id]
            await held.release()
        assert await klock.leases() == []

        older = await klock.register_agent("oldest", priority=-1)
        async with (
            older.lease(readme, "CONSUMES"),
            coder.session(isolation=IsolationLevel.SERIALIZABLE) as session,
        ):
            await session.acquire("FILE:/elsewhere", "MUTATES")  # the session holds: Wait-Die
            with pytest.raises(LeaseDied):
                await files.write_file("README.md", "x", session=session)
        other_files = WorkspaceFiles(klock, "other", workspace)
        async with coder.session() as session:
            with pytest.raises(InvalidRequestError, match="belongs to agent 'coder'"):
                await other_files.read_file("README.md", session=session)


async def test_a_directory_swapped_for_a_link_after_the_check_is_refused(
    workspace: Path, tmp_path: Path
) -> None:
    """A directory replaced by a symlink out of the workspace between the path check and the
    write is caught by the check made again under the lease; nothing is written outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace / "sub").mkdir()
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        target = await files.resolve("sub/a.txt")
        (workspace / "sub").rmdir()
        (workspace / "sub").symlink_to(outside, target_is_directory=True)
        with pytest.raises(PathOutsideWorkspaceError):
            await files._write_text(target, "escaped")
    assert not (outside / "a.txt").exists()


# --------------------------------------------------------------------------- read for update


async def test_read_for_update_refuses_bad_options(workspace: Path) -> None:
    """A bad ttl or a session of another agent is refused when the holder is made."""
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        other = await klock.register_agent("other")
        for ttl in (0, -1.0, float("nan")):
            with pytest.raises(InvalidRequestError):
                ReadForUpdate(files, ttl=ttl)
        with pytest.raises(InvalidRequestError, match="belongs to agent 'other'"):
            ReadForUpdate(files, holds=other.session())


async def test_read_for_update_holds_until_written(workspace: Path) -> None:
    """The hold is one MUTATES lease of the agent; written() ends it, a second read reuses it."""
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        updates = ReadForUpdate(files)
        assert await updates.read_file("src/app.py") == "print('hi')\n"
        assert await updates.read_file("src/app.py") == "print('hi')\n"  # the same hold
        [hold] = await klock.leases()
        assert (hold.agent_id, hold.predicate.value) == ("coder", "MUTATES")
        lease = await updates.lease_of("src/app.py")
        assert lease is not None and lease.id == hold.id
        assert await updates.session_for("README.md") is None
        session = await updates.session_for("src")  # the directory overlaps the held file
        assert session is updates.session and session.isolation is IsolationLevel.SERIALIZABLE
        await files.write_file("src/app.py", "print('bye')\n", session=session)
        await updates.written("src/app.py")
        assert updates.held() == [] and await klock.leases() == []
        assert await updates.lease_of("src/app.py") is None


async def test_read_for_update_while_holding_dies_instead_of_waiting(workspace: Path) -> None:
    """An agent that holds a file and asks for one an older agent holds gets LeaseDied at once."""
    async with Klock() as klock:
        older = await klock.register_agent("older", priority=-1)
        updates = ReadForUpdate(WorkspaceFiles(klock, "coder", workspace))
        await updates.read_file("README.md")
        taken = await older.acquire(f"FILE:{workspace}/src/app.py", "MUTATES")
        with pytest.raises(LeaseDied):
            await updates.read_file("src/app.py")
        assert updates.held() == ["README.md"]  # what it held is kept: the caller decides
        await taken.release()
        assert await updates.read_file("src/app.py") == "print('hi')\n"
        assert await updates.release() == ["README.md", "src/app.py"]
        assert await klock.leases() == []


async def test_release_of_a_file_not_held_says_what_is_held(workspace: Path) -> None:
    """release(path) of a file the agent does not hold is a FileToolError naming what it holds."""
    async with Klock() as klock:
        updates = ReadForUpdate(WorkspaceFiles(klock, "coder", workspace))
        await updates.read_file("README.md")
        not_held = re.escape("no read for update of 'src/app.py'; held: README.md")
        with pytest.raises(FileToolError, match=not_held):
            await updates.release("src/app.py")
        assert await updates.release("README.md") == ["README.md"]


async def test_a_hard_link_is_not_written_through(workspace: Path, tmp_path: Path) -> None:
    """A file with another name (maybe outside the workspace) is refused for writes, saying why."""
    outside = tmp_path / "secret.txt"
    outside.write_text("outside\n", encoding="utf-8")
    os.link(outside, workspace / "linked.txt")
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        await files.read_file("linked.txt")
        with pytest.raises(FileToolError, match="hard links"):
            await files.write_file("linked.txt", "overwritten\n")
        with pytest.raises(FileToolError, match="hard links"):
            await files.edit_file("linked.txt", "outside", "changed")
    assert outside.read_text(encoding="utf-8") == "outside\n"


async def test_no_directory_is_made_outside_when_a_component_becomes_a_link(
    workspace: Path, tmp_path: Path
) -> None:
    """A path component swapped for a symlink while the tool waits: no mkdir runs outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace / "sub").mkdir()
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        target = await files.resolve("sub/deeper/deepest/a.txt")
        (workspace / "sub").rmdir()
        (workspace / "sub").symlink_to(outside, target_is_directory=True)
        with pytest.raises(PathOutsideWorkspaceError):
            await files._write_text(target, "escaped")
    assert list(outside.iterdir()) == []


async def test_new_directories_are_made_one_level_at_a_time(workspace: Path) -> None:
    """Missing directories above a new file are created, inside the workspace only."""
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        await files.write_file("a/b/c/new.txt", "x")
        with pytest.raises(FileToolError, match="is a file"):
            await files.write_file("README.md/under/file.txt", "x")
    assert (workspace / "a" / "b" / "c" / "new.txt").read_text(encoding="utf-8") == "x"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param("loop", id="symlink-loop"),
        pytest.param("long", id="name-too-long"),
    ],
)
async def test_os_errors_of_a_path_are_file_tool_errors(workspace: Path, make: str) -> None:
    """A symlink loop or a 5,000-character name is a FileToolError, not a RuntimeError/OSError."""
    if make == "loop":
        (workspace / "loop").symlink_to(workspace / "loop")
        path = "loop/file.txt"
    else:
        path = "x" * 5000
    async with Klock() as klock:
        files = WorkspaceFiles(klock, "coder", workspace)
        for call in (
            files.read_file(path),
            files.write_file(path, "x"),
            files.list_files(path),
        ):
            with pytest.raises(FileToolError):
                await call
