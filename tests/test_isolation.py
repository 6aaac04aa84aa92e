"""Tests for vector clocks and isolation levels as seen through the ``Klock`` facade."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from klock_async import (
    CausalViolationError,
    InvalidResourceError,
    IsolationLevel,
    KernelClosedError,
    Klock,
    UnknownAgentError,
    VectorClock,
)

PATH = "src/auth.js"
KEY = "FILE:/src/auth.js"  # how the kernel names the path once normalised


def vc(**counters: int) -> VectorClock:
    return VectorClock(counters)


async def clock_state(klock: Klock) -> tuple[tuple[str, ...], int]:
    return await klock.tracked_paths(), await klock.conflict_count()


# --- raw clock operations: klock.read / klock.write -----------------------------------------


async def test_read_of_untracked_path_returns_empty_clock() -> None:
    """Reading a path nobody wrote returns the empty clock and does not track the path."""
    async with Klock() as klock:
        await klock.register_agent("a1")
        assert await klock.read(PATH, "a1") == VectorClock()
        assert await clock_state(klock) == ((), 0)


async def test_read_merges_path_clock_into_agent_clock() -> None:
    """A read returns the path's clock and merges it into the reader's clock."""
    async with Klock() as klock:
        a1 = await klock.register_agent("a1")
        await klock.register_agent("a2")
        assert await klock.write(PATH, "a2") == vc(a2=1)
        assert await a1.read(PATH) == vc(a2=1)
        # The merge shows in the next write of any path: it carries a2's component.
        assert await klock.write("docs/other.md", "a1") == vc(a1=1, a2=1)
        assert await klock.write(PATH, "a1") == vc(a1=2, a2=1)


async def test_read_and_write_normalise_the_path() -> None:
    """Spellings of one file share one clock; tracked paths use the normalised name."""
    async with Klock() as klock:
        await klock.register_agent("a1")
        await klock.register_agent("a2")
        await klock.write("src/./auth.js", "a1")
        assert await klock.read("/src//lib/../auth.js", "a2") == vc(a1=1)
        assert await klock.tracked_paths() == (KEY,)


async def test_strict_write_of_unseen_version_raises_and_changes_nothing() -> None:
    """A strict write of a version the agent never read names path and clocks; nothing changes."""
    async with Klock() as klock:
        await klock.register_agent("a1")
        await klock.register_agent("a2")
        await klock.register_agent("observer")
        await klock.write("docs/other.md", "a1")  # a1's clock: {a1: 1}
        await klock.write(PATH, "a2")  # the path's clock: {a2: 1}
        before = await clock_state(klock)

        with pytest.raises(CausalViolationError) as info:
            await klock.write(PATH, "a1")

        error = info.value
        assert error.path == KEY
        assert error.agent_id == "a1"
        assert error.agent_clock == {"a1": 1}
        assert error.path_clock == {"a2": 1}
        assert "/src/auth.js" in str(error)
        assert "'a1': 1" in str(error)
        assert "'a2': 1" in str(error)
        assert error.to_payload()["code"] == "causal_violation"
        assert await clock_state(klock) == before
        assert await klock.read(PATH, "observer") == vc(a2=1)
        # a1's clock did not move either: the same write is refused with the same clocks.
        with pytest.raises(CausalViolationError) as again:
            await klock.write(PATH, "a1")
        assert again.value.agent_clock == {"a1": 1}
        assert (await klock.statistics()).causal_violations == 2


async def test_strict_write_after_read_succeeds() -> None:
    """Once the agent has read the latest version, its strict write succeeds."""
    async with Klock() as klock:
        await klock.register_agent("a1")
        await klock.register_agent("a2")
        await klock.write(PATH, "a2")
        await klock.read(PATH, "a1")
        assert await klock.write(PATH, "a1") == vc(a1=1, a2=1)
        assert await clock_state(klock) == ((KEY,), 0)


async def test_non_strict_stale_write_is_counted_and_keeps_path_clock_monotone() -> None:
    """A non-strict stale write succeeds, is counted, and the path's clock only grows."""
    async with Klock() as klock:
        await klock.register_agent("a1")
        await klock.register_agent("a2")
        first = await klock.write(PATH, "a2")
        second = await klock.write(PATH, "a1", strict=False)
        assert second == vc(a1=1, a2=1)
        assert first.happens_before(second)
        assert await klock.conflict_count() == 1
        # A fresh non-strict write (a1 saw everything) is not a conflict.
        third = await klock.write(PATH, "a1", strict=False)
        assert second.happens_before(third)
        assert await clock_state(klock) == ((KEY,), 1)
        assert (await klock.statistics()).causal_violations == 0


@pytest.mark.parametrize(
    ("path", "agent", "error"),
    [
        pytest.param("", "a1", InvalidResourceError, id="empty-path"),
        pytest.param("COLOUR:/x", "a1", InvalidResourceError, id="unknown-type"),
        pytest.param(PATH, "ghost", UnknownAgentError, id="unknown-agent"),
    ],
)
@pytest.mark.parametrize("operation", ["read", "write"])
async def test_bad_clock_input_is_refused_and_changes_nothing(
    operation: str, path: str, agent: str, error: type[Exception]
) -> None:
    """Clock operations with a bad path or an unknown agent raise a typed error, change nothing."""
    async with Klock() as klock:
        await klock.register_agent("a1")
        await klock.write("docs/other.md", "a1")
        before = await clock_state(klock)
        with pytest.raises(error):
            if operation == "read":
                await klock.read(path, agent)
            else:
                await klock.write(path, agent)
        assert await clock_state(klock) == before


async def test_violation_that_cannot_be_logged_fails_callers_instead_of_hanging() -> None:
    """If the kernel cannot write its log (a closed pipe), callers get KernelClosedError."""

    def broken_pipe(logger: object, name: str, event: dict[str, object]) -> dict[str, object]:
        if event["event"] == "write.refused":
            raise BrokenPipeError(32, "Broken pipe")
        raise structlog.DropEvent

    saved = structlog.get_config()
    structlog.configure(processors=[broken_pipe])
    try:
        async with Klock() as klock:
            await klock.register_agent("a1")
            await klock.register_agent("a2")
            await klock.write(PATH, "a2")
            with pytest.raises(KernelClosedError, match="unexpected error") as info:
                await klock.write(PATH, "a1")
            assert isinstance(info.value.__cause__, BrokenPipeError)
            with pytest.raises(KernelClosedError):
                await klock.statistics()
    finally:
        structlog.configure(**saved)


async def test_grant_that_cannot_be_logged_fails_the_waiter_instead_of_hanging() -> None:
    """A queued request whose grant crashes the kernel gets KernelClosedError, as do others."""

    def broken_pipe(logger: object, name: str, event: dict[str, object]) -> dict[str, object]:
        if event["event"] == "lease.granted" and event.get("agent") == "older":
            raise BrokenPipeError(32, "Broken pipe")
        raise structlog.DropEvent

    saved = structlog.get_config()
    structlog.configure(processors=[broken_pipe])
    try:
        async with Klock() as klock:
            older = await klock.register_agent("older")
            younger = await klock.register_agent("younger")
            held = await younger.acquire(PATH, "MUTATES")
            waiter = asyncio.create_task(older.acquire(PATH, "MUTATES"))
            assert (await asyncio.create_task(klock.statistics())).requests_waiting == 1
            await held.release()  # one-way: the actor crashes handing the file on, after it
            with pytest.raises(KernelClosedError, match="unexpected error"):
                await waiter
            with pytest.raises(KernelClosedError):
                await klock.statistics()
    finally:
        structlog.configure(**saved)


# --- SERIALIZABLE sessions and leases ----------------------------------------------------------


async def test_serializable_session_refuses_stale_write_at_grant() -> None:
    """The issue's example: a write after another agent's write is refused and nothing is held."""
    async with Klock() as klock:
        coder = await klock.register_agent("coder")
        other = await klock.register_agent("other")
        async with coder.session(isolation=IsolationLevel.SERIALIZABLE) as s:
            async with s.lease(PATH, "CONSUMES"):
                pass  # the read is recorded at grant
            async with (
                other.session(isolation=IsolationLevel.SERIALIZABLE) as o,
                o.lease(PATH, "MUTATES"),
            ):
                pass  # another agent writes the file in between
            other_clock = await klock.read(PATH, "other")
            with pytest.raises(CausalViolationError) as info:
                async with s.lease(PATH, "MUTATES"):
                    pytest.fail("a stale write must not be granted")
            assert await klock.leases() == []
        error = info.value
        assert (error.path, error.agent_id) == (KEY, "coder")
        assert error.path_clock == other_clock.as_dict() == {"other": 1}
        assert error.agent_clock == {}
        assert await klock.tracked_paths() == (KEY,)
        assert (await klock.statistics()).causal_violations == 1


async def test_serializable_write_after_fresh_read_records_the_write() -> None:
    """A read then a write in a SERIALIZABLE session succeeds and ticks the path's clock."""
    async with Klock() as klock:
        coder = await klock.register_agent("coder")
        await klock.register_agent("observer")
        async with coder.session(isolation="serializable") as s:
            async with s.lease(PATH, "CONSUMES"):
                pass
            async with s.lease(PATH, "MUTATES") as lease:
                assert lease.resource.path == "/src/auth.js"
                assert await klock.tracked_paths() == ()  # recorded only when the block ends
            assert await klock.read(PATH, "observer") == vc(coder=1)
        assert await klock.leases() == []


async def test_failed_block_records_no_write() -> None:
    """A MUTATES block that raises releases its lease without recording a write."""
    async with Klock() as klock:
        coder = await klock.register_agent("coder")
        other = await klock.register_agent("other")
        async with coder.session(isolation=IsolationLevel.SERIALIZABLE) as s:
            with pytest.raises(RuntimeError, match="tool failed"):
                async with s.lease(PATH, "MUTATES"):
                    raise RuntimeError("tool failed")
            assert await klock.leases() == []
        assert await clock_state(klock) == ((), 0)
        # Nothing was recorded, so another agent may still write without reading first.
        assert await klock.write(PATH, other.id) == vc(other=1)


async def test_stale_write_is_checked_when_a_queued_request_is_granted() -> None:
    """An older writer queued behind a younger one is refused at grant once the younger wrote."""
    async with Klock() as klock:
        older = await klock.register_agent("older")
        younger = await klock.register_agent("younger")
        older_read = asyncio.Event()
        queued = asyncio.Event()
        younger_holds = asyncio.Event()
        younger_may_finish = asyncio.Event()

        async def younger_writes() -> None:
            await older_read.wait()
            async with (
                younger.session(isolation=IsolationLevel.SERIALIZABLE) as s,
                s.lease(PATH, "MUTATES"),
            ):
                younger_holds.set()
                await younger_may_finish.wait()

        async def older_writes() -> CausalViolationError:
            async with older.session(isolation=IsolationLevel.SERIALIZABLE) as s:
                async with s.lease(PATH, "CONSUMES"):
                    pass  # read before the younger agent's write
                older_read.set()
                await younger_holds.wait()
                queued.set()  # the acquire below is posted before this task yields
                with pytest.raises(CausalViolationError) as info:
                    async with s.lease(PATH, "MUTATES"):
                        pytest.fail("a stale write must not be granted")
                return info.value

        async with asyncio.TaskGroup() as tg:
            older_task = tg.create_task(older_writes())
            tg.create_task(younger_writes())
            await queued.wait()
            stats = await klock.statistics()
            assert (stats.requests_waiting, stats.leases_active) == (1, 1)
            younger_may_finish.set()
        error = older_task.result()
        assert error.agent_id == "older"
        assert error.path_clock == {"younger": 1}
        assert await klock.leases() == []
        stats = await klock.statistics()
        assert (stats.requests_waiting, stats.causal_violations) == (0, 1)


@pytest.mark.parametrize(
    "level",
    [
        pytest.param(IsolationLevel.SNAPSHOT, id="snapshot"),
        pytest.param(IsolationLevel.READ_COMMITTED, id="read-committed"),
        pytest.param(IsolationLevel.SERIALIZABLE, id="serializable"),
    ],
)
async def test_only_levels_requiring_vector_clocks_record_reads_and_writes(
    level: IsolationLevel,
) -> None:
    """Leases of a session touch the clocks exactly when its level requires vector clocks."""
    async with Klock() as klock:
        coder = await klock.register_agent("coder")
        other = await klock.register_agent("other")
        await klock.write(PATH, other.id)  # a version the coder never read
        async with coder.session(isolation=level) as s:
            assert s.isolation is level
            async with s.lease("docs/notes.md", "CONSUMES"):
                pass
            async with s.lease("docs/notes.md", "MUTATES"):
                pass
            if level.allows_concurrent_writes:
                async with s.lease(PATH, "MUTATES"):
                    pass  # not checked: this level lets stale writes through
            else:
                with pytest.raises(CausalViolationError):
                    async with s.lease(PATH, "MUTATES"):
                        pass
        tracked = ("FILE:/docs/notes.md", KEY) if level.requires_vector_clocks else (KEY,)
        assert await klock.tracked_paths() == tracked
        assert await klock.conflict_count() == 0


@pytest.mark.parametrize(
    "isolation",
    [pytest.param("linearizable", id="unknown"), pytest.param("", id="empty")],
)
async def test_unknown_isolation_level_is_refused(isolation: str) -> None:
    """Sessions and protected() refuse an unknown isolation level with a ValueError."""
    async with Klock() as klock:
        coder = await klock.register_agent("coder")
        with pytest.raises(ValueError, match="unknown isolation level"):
            coder.session(isolation=isolation)
        with pytest.raises(ValueError, match="unknown isolation level"):
            klock.protected(agent="coder", resource=PATH, predicate="MUTATES", isolation=isolation)
        assert await klock.leases() == []


# --- the protected decorator ---------------------------------------------------------------------


class Files:
    """A tiny in-memory file store whose two tools are protected by one kernel."""

    def __init__(self, klock: Klock, isolation: IsolationLevel) -> None:
        self.content: dict[str, str] = {}

        @klock.protected(
            agent=lambda agent, path: agent,
            resource=lambda agent, path: path,
            predicate="CONSUMES",
            isolation=isolation,
        )
        async def read_file(agent: str, path: str) -> str:
            return self.content.get(path, "")

        @klock.protected(
            agent=lambda agent, path, text: agent,
            resource=lambda agent, path, text: path,
            predicate="MUTATES",
            isolation=isolation,
        )
        async def write_file(agent: str, path: str, text: str) -> None:
            self.content[path] = text

        self.read_file = read_file
        self.write_file = write_file


async def test_protected_serializable_turns_stale_write_into_actionable_error() -> None:
    """Under SERIALIZABLE a stale tool write raises an error telling the agent to re-read."""
    async with Klock() as klock:
        await klock.register_agent("a1")
        await klock.register_agent("a2")
        files = Files(klock, IsolationLevel.SERIALIZABLE)

        seen = await files.read_file("a1", PATH)  # a1 reads, then thinks
        theirs = await files.read_file("a2", PATH)
        await files.write_file("a2", PATH, theirs + "a2's line\n")
        with pytest.raises(CausalViolationError, match="read it again") as info:
            await files.write_file("a1", PATH, seen + "a1's line\n")

        assert files.content[PATH] == "a2's line\n"  # nothing was written
        assert "/src/auth.js" in str(info.value)
        assert "'a1'" in str(info.value)
        assert info.value.path_clock == {"a2": 1}
        assert await klock.leases() == []

        # The agent acts on it: read again, redo the change, write.
        seen = await files.read_file("a1", PATH)
        await files.write_file("a1", PATH, seen + "a1's line\n")
        assert files.content[PATH] == "a2's line\na1's line\n"
        assert await klock.read(PATH, "a2") == vc(a1=1, a2=1)
        assert await clock_state(klock) == ((KEY,), 0)


async def test_protected_read_committed_lets_the_stale_write_through() -> None:
    """Without SERIALIZABLE the same two tool calls silently lose the other agent's edit."""
    async with Klock() as klock:
        await klock.register_agent("a1")
        await klock.register_agent("a2")
        files = Files(klock, IsolationLevel.READ_COMMITTED)

        seen = await files.read_file("a1", PATH)
        theirs = await files.read_file("a2", PATH)
        await files.write_file("a2", PATH, theirs + "a2's line\n")
        await files.write_file("a1", PATH, seen + "a1's line\n")

        assert files.content[PATH] == "a1's line\n"  # a2's edit is gone
        assert await clock_state(klock) == ((), 0)
