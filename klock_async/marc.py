"""MARC, the Multi-Agent Race Condition: a seeded simulation of agents losing each other's edits.

``N`` agents each make ``K`` edits to a small in-memory repository of ``F`` shared files. An
edit is what a coding agent does with two tool calls: ``read_file``, think, then ``write_file``
of the whole file (the content it read plus one unique marker line). When another agent writes
the same file between the two calls, the second write silently replaces the first: both tool
calls "succeeded" and an edit is gone. At the end, counting the markers that survived tells how
many intended edits were lost.

The same plan (which file each edit touches, how long each agent thinks) runs in five modes:

1. :attr:`Mode.NO_COORDINATION`: tool calls go straight to the files.
2. :attr:`Mode.PER_CALL_LEASES`: each tool call holds its own lease (``read_file`` under
   CONSUMES, ``write_file`` under MUTATES). Two writes never interleave, yet edits are still
   lost, because the read and the write are separate calls.
3. :attr:`Mode.SERIALIZABLE`: the same protected tools in SERIALIZABLE isolation. The kernel
   refuses a write of a version the agent never read
   (:class:`~klock_async.errors.CausalViolationError`); the agent re-reads and redoes the edit.
   Wait-Die deaths are retried by the decorator's retry policy. Nothing is lost.
4. :attr:`Mode.GLOBAL_LOCK`: one ``asyncio.Lock`` held around every whole edit, outside the
   kernel. Correct, but serial: the baseline the makespans are compared with.
5. :attr:`Mode.DECLARED_UP_FRONT`: each edit declares its file before reading it: it takes
   MUTATES on the file, reads, thinks and writes under that one lease (read for update), and
   the read and the write are recorded in the agent's own view as a SERIALIZABLE edit's
   are. Nobody can write the file in between, so no write is refused and no thinking is
   redone; edits of different files run in parallel.

Everything is deterministic except the interleaving itself: each agent draws its plan from
``random.Random`` seeded with the scenario seed and its id, so a seed always gives the same
edits and think times. No model, no network; think times are a few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from klock_async.api import Klock, RetryPolicy, Session
from klock_async.clocks import IsolationLevel
from klock_async.errors import CausalViolationError, LeaseDied, LeaseNotFoundError
from klock_async.model import Predicate

__all__ = [
    "COLUMNS",
    "Edit",
    "Mode",
    "ModeResult",
    "Progress",
    "Repo",
    "Scenario",
    "explain_columns",
    "format_table",
    "plan",
    "run_all",
    "run_mode",
    "verdict",
]

ReadFile = Callable[[str, str], Awaitable[list[str]]]
"""``read_file(agent, path) -> lines``: a tool call."""

WriteFile = Callable[[str, str, list[str]], Awaitable[None]]
"""``write_file(agent, path, lines)``: a tool call that replaces the whole file."""

Guard = Callable[[str, str], AbstractAsyncContextManager[object]]
"""``guard(agent, path)``: what an edit holds from its read through its write."""

Progress = Callable[["Mode", int], None]
"""``progress(mode, edits_done)``: called when a mode starts (0) and after each finished edit."""

# Retries of a dying tool call wait for the blocking lease to end, so they are cheap; the
# simulation must never give up on an edit, or a lost edit would hide behind an error.
_RETRY = RetryPolicy(max_retries=1_000_000, base_delay=0.001, max_delay=0.05)


class Mode(enum.Enum):
    """The five ways the agents are coordinated, in table order."""

    NO_COORDINATION = "no coordination"
    PER_CALL_LEASES = "leases per tool call"
    SERIALIZABLE = "SERIALIZABLE sessions"
    GLOBAL_LOCK = "one global lock"
    DECLARED_UP_FRONT = "edits declared up front"

    @property
    def number(self) -> int:
        """The mode's number in the table, 1 to 5."""
        return list(Mode).index(self) + 1

    @property
    def label(self) -> str:
        """``"3. SERIALIZABLE sessions"``: number and name, as printed in the table."""
        return f"{self.number}. {self.value}"


@dataclass(frozen=True, slots=True)
class Scenario:
    """The size and seed of one simulation.

    Args:
        agents: number of agents, each editing concurrently with the others.
        files: number of shared files the edits are spread over.
        edits: edits per agent.
        seed: seed of every agent's plan.
        think_min: shortest think time between an edit's read and its write, in seconds.
        think_max: longest think time, in seconds.

    Raises:
        ValueError: a count below 1, a non-integer count or seed, or think times that are
            negative, not finite or not ordered.
    """

    agents: int = 6
    files: int = 3
    edits: int = 5
    seed: int = 0
    think_min: float = 0.002
    think_max: float = 0.010

    def __post_init__(self) -> None:
        for name in ("agents", "files", "edits", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("agents", "files", "edits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("think_min", "think_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.think_max < self.think_min:
            raise ValueError(
                f"think_max ({self.think_max}) must not be below think_min ({self.think_min})"
            )

    @property
    def agent_ids(self) -> tuple[str, ...]:
        """The agents' ids, oldest first: ``agent-00``, ``agent-01``, ..."""
        width = max(2, len(str(self.agents - 1)))
        return tuple(f"agent-{i:0{width}d}" for i in range(self.agents))

    @property
    def paths(self) -> tuple[str, ...]:
        """The shared files: ``src/module_0.py``, ``src/module_1.py``, ..."""
        return tuple(f"src/module_{i}.py" for i in range(self.files))

    @property
    def intended(self) -> int:
        """How many edits the agents intend to make in total."""
        return self.agents * self.edits


@dataclass(frozen=True, slots=True)
class Edit:
    """One planned edit: read ``path``, think ``think`` seconds, write it back plus ``marker``.

    Attributes:
        path: the file to edit.
        think: seconds between the read and the write.
        marker: the unique line the edit appends; present at the end iff the edit survived.
    """

    path: str
    think: float
    marker: str


def _rng(scenario: Scenario, agent_id: str, purpose: str) -> random.Random:
    # A str seed is hashed with SHA-512, so the stream does not depend on PYTHONHASHSEED.
    return random.Random(f"marc/{scenario.seed}/{agent_id}/{purpose}")


def plan(scenario: Scenario) -> dict[str, tuple[Edit, ...]]:
    """Return every agent's edits, in order; the same scenario always gives the same plan.

    Args:
        scenario: size and seed.

    Returns:
        Agent id -> that agent's edits.
    """
    plans: dict[str, tuple[Edit, ...]] = {}
    for agent_id in scenario.agent_ids:
        rng = _rng(scenario, agent_id, "plan")
        plans[agent_id] = tuple(
            Edit(
                path=rng.choice(scenario.paths),
                think=rng.uniform(scenario.think_min, scenario.think_max),
                marker=f"# {agent_id} edit {k}",
            )
            for k in range(scenario.edits)
        )
    return plans


class Repo:
    """An in-memory repository, touched only through its two tool calls.

    Args:
        paths: the files, each created with a one-line header.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self._files: dict[str, list[str]] = {path: [f"# {path}"] for path in paths}

    async def read_file(self, agent: str, path: str) -> list[str]:
        """Tool call: return the lines of ``path`` (a copy).

        Args:
            agent: the calling agent (tools know who calls them).
            path: the file.

        Returns:
            The file's lines.

        Raises:
            KeyError: no such file.
        """
        lines = list(self._files[path])
        await asyncio.sleep(0)  # a tool call is I/O: let others run
        return lines

    async def write_file(self, agent: str, path: str, lines: list[str]) -> None:
        """Tool call: replace the whole content of ``path`` with ``lines``.

        Args:
            agent: the calling agent.
            path: the file.
            lines: the new content.

        Raises:
            KeyError: no such file.
        """
        if path not in self._files:
            raise KeyError(path)
        await asyncio.sleep(0)
        self._files[path] = list(lines)

    def snapshot(self) -> dict[str, tuple[str, ...]]:
        """Return every file's current lines (not a tool call: for counting at the end)."""
        return {path: tuple(lines) for path, lines in self._files.items()}


@dataclass(frozen=True, slots=True)
class ModeResult:
    """What one mode did to the plan.

    Attributes:
        mode: the mode.
        intended: edits the agents made (agents x edits each).
        lost: edits whose marker is missing at the end.
        makespan: seconds from the first tool call to the last agent finishing.
        redone: edits redone because their write was refused after the thinking (a stale
            write, :class:`~klock_async.errors.CausalViolationError`): each one is another
            read and another think.
        deaths: requests Wait-Die refused (``deaths`` of the kernel's statistics), each one
            retried after the blocker ended; 0 for the modes without a kernel.
        causal_violations: stale writes the kernel refused.
    """

    mode: Mode
    intended: int
    lost: int
    makespan: float
    redone: int
    deaths: int
    causal_violations: int

    @property
    def lost_percent(self) -> float:
        """Lost edits as a percentage of the intended ones."""
        return 100.0 * self.lost / self.intended if self.intended else 0.0


def _count_lost(plans: Mapping[str, Sequence[Edit]], repo: Repo) -> int:
    present = {line for lines in repo.snapshot().values() for line in lines}
    return sum(1 for edits in plans.values() for edit in edits if edit.marker not in present)


def _agent_of(agent: str, **_: object) -> str:
    return agent


def _path_of(path: str, **_: object) -> str:
    return path


def _unguarded(agent: str, path: str) -> AbstractAsyncContextManager[object]:
    return contextlib.nullcontext()


async def run_mode(
    mode: Mode,
    scenario: Scenario,
    *,
    repo: Repo | None = None,
    progress: Progress | None = None,
) -> ModeResult:
    """Run the scenario's plan in one mode and count the lost edits.

    Modes 2, 3 and 5 start a kernel of their own (``async with Klock()``) for the run.

    Args:
        mode: how the agents are coordinated.
        scenario: size and seed.
        repo: the repository to edit, e.g. to inspect it afterwards (default: a fresh one with
            the scenario's files). It must hold every path of the scenario.
        progress: called with the mode and 0 when the run starts, then with the number of
            finished edits after each edit.

    Returns:
        The counts and the makespan.

    Raises:
        KeyError: ``repo`` lacks a path of the scenario.
    """
    plans = plan(scenario)
    repo = Repo(scenario.paths) if repo is None else repo
    report = _counter(mode, progress)
    deaths = violations = 0
    if mode is Mode.NO_COORDINATION:
        redone, makespan = await _drive(
            scenario, plans, repo.read_file, repo.write_file, _unguarded, report
        )
    elif mode is Mode.GLOBAL_LOCK:
        lock = asyncio.Lock()
        redone, makespan = await _drive(
            scenario, plans, repo.read_file, repo.write_file, lambda agent, path: lock, report
        )
    else:
        async with Klock() as klock:
            agents = [await klock.register_agent(agent_id) for agent_id in scenario.agent_ids]
            if mode is Mode.DECLARED_UP_FRONT:
                declared = _DeclaredEdits(klock, repo, {a.id: a.session() for a in agents})
                redone, makespan = await _drive(
                    scenario, plans, declared.read_file, declared.write_file, declared.hold, report
                )
            else:
                read_file, write_file = _protected_tools(klock, repo, mode)
                redone, makespan = await _drive(
                    scenario, plans, read_file, write_file, _unguarded, report
                )
            stats = await klock.statistics()
        deaths, violations = stats.deaths, stats.causal_violations
    return ModeResult(
        mode=mode,
        intended=scenario.intended,
        lost=_count_lost(plans, repo),
        makespan=makespan,
        redone=redone,
        deaths=deaths,
        causal_violations=violations,
    )


def _counter(mode: Mode, progress: Progress | None) -> Callable[[], None]:
    """A callback for each finished edit that reports the running count to ``progress``."""
    if progress is None:
        return lambda: None
    done = 0
    progress(mode, 0)

    def finished() -> None:
        nonlocal done
        done += 1
        progress(mode, done)

    return finished


def _protected_tools(klock: Klock, repo: Repo, mode: Mode) -> tuple[ReadFile, WriteFile]:
    """Modes 2 and 3: each tool call holds its own lease, in a session of its own."""
    isolation = (
        IsolationLevel.SERIALIZABLE if mode is Mode.SERIALIZABLE else IsolationLevel.READ_COMMITTED
    )
    read_file = klock.protected(
        agent=_agent_of,
        resource=_path_of,
        predicate=Predicate.CONSUMES,
        isolation=isolation,
        retry=_RETRY,
    )(repo.read_file)
    write_file = klock.protected(
        agent=_agent_of,
        resource=_path_of,
        predicate=Predicate.MUTATES,
        isolation=isolation,
        retry=_RETRY,
    )(repo.write_file)
    return read_file, write_file


class _DeclaredEdits:
    """Mode 5: each edit holds MUTATES on its file from before its read until after its write.

    Every agent takes its holds in one session of its own, kept across edits and retries (the
    unit's age is kept). The read is recorded in the agent's own view under the hold, and the
    release records the write, as a SERIALIZABLE edit's leases do; the hold itself is taken
    READ_COMMITTED, because taking it is not a write: the file is read under it.
    """

    def __init__(self, klock: Klock, repo: Repo, sessions: Mapping[str, Session]) -> None:
        self._klock = klock
        self._repo = repo
        self._sessions = sessions

    @contextlib.asynccontextmanager
    async def hold(self, agent: str, path: str) -> AsyncIterator[object]:
        """Hold MUTATES on ``path`` for one whole edit; the release records the write."""
        session = self._sessions[agent]
        attempt = 0
        while True:
            try:
                lease = await session.acquire(path, Predicate.MUTATES)
                break
            except LeaseDied as died:  # the session holds nothing: wait for the blocker, retry
                await _wait_for(self._klock, died, _RETRY.backoff(attempt))
                attempt += 1
        written = False
        try:
            yield lease
            written = True
        finally:
            await lease.release(record_write=written)

    async def read_file(self, agent: str, path: str) -> list[str]:
        """Record the read in the agent's own view, then read (the caller holds the file)."""
        await self._klock.read(path, agent)
        return await self._repo.read_file(agent, path)

    async def write_file(self, agent: str, path: str, lines: list[str]) -> None:
        """Write (the caller holds the file; its release records the write)."""
        await self._repo.write_file(agent, path, lines)


async def _wait_for(klock: Klock, died: LeaseDied, cap: float) -> None:
    """Wait until the lease that made a request die has ended, at most ``cap`` seconds."""
    if died.blocker_lease_id is None:
        await asyncio.sleep(cap)  # the blocker is a queued request: a capped backoff
        return
    with contextlib.suppress(LeaseNotFoundError):  # ended already: retry now
        await klock.backend.wait_ended(died.blocker_lease_id, cap)


async def _drive(
    scenario: Scenario,
    plans: Mapping[str, Sequence[Edit]],
    read_file: ReadFile,
    write_file: WriteFile,
    guard: Guard,
    finished: Callable[[], None],
) -> tuple[int, float]:
    """Run every agent at once; return the edits redone and the makespan."""
    redone = 0

    async def agent(agent_id: str, edits: Sequence[Edit]) -> None:
        nonlocal redone
        rethink = _rng(scenario, agent_id, "rethink")
        for edit in edits:
            think = edit.think
            while True:
                async with guard(agent_id, edit.path):
                    lines = await read_file(agent_id, edit.path)
                    await asyncio.sleep(think)  # the model thinking: simulated work
                    try:
                        await write_file(agent_id, edit.path, [*lines, edit.marker])
                    except CausalViolationError:
                        # Someone wrote the file since our read: nothing was written.
                        # Re-read, think again, redo the edit.
                        redone += 1
                        think = rethink.uniform(scenario.think_min, scenario.think_max)
                        continue
                break
            finished()

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for agent_id, edits in plans.items():
            tg.create_task(agent(agent_id, edits), name=f"marc-{agent_id}")
    return redone, time.perf_counter() - started


async def run_all(scenario: Scenario, *, progress: Progress | None = None) -> list[ModeResult]:
    """Run the five modes one after the other on the same plan.

    Args:
        scenario: size and seed.
        progress: passed on to :func:`run_mode` for each mode.

    Returns:
        One result per mode, in table order.
    """
    return [await run_mode(mode, scenario, progress=progress) for mode in Mode]


COLUMNS = (
    ("intended", "edits the agents made (agents x edits each); each one 'succeeded'"),
    ("lost", "edits whose marker is missing at the end: silently overwritten"),
    ("makespan", "seconds from the start to the last agent finishing"),
    ("vs mode 4", "makespan divided by the makespan of mode 4, one global lock"),
    ("redone", "edits redone because their write was refused after the thinking"),
    ("deaths", "requests Wait-Die refused and retried once the blocker ended"),
    ("violations", "stale writes the kernel refused (each one redone)"),
)
"""The table's columns after ``mode``, each with a one-line explanation."""


def format_table(results: Sequence[ModeResult]) -> str:
    """Format results as an aligned text table.

    Columns: mode, intended edits, lost edits, lost %, makespan, makespan relative to mode 4
    (``-`` when mode 4 is not among the results), redone edits, deaths, causal violations.

    Args:
        results: results, usually from :func:`run_all`.

    Returns:
        The table, one line per result after a header and a rule, without a final newline.
    """
    baseline = next((r.makespan for r in results if r.mode is Mode.GLOBAL_LOCK), None)
    header = (
        "mode",
        "intended",
        "lost",
        "lost %",
        "makespan",
        "vs mode 4",
        "redone",
        "deaths",
        "violations",
    )
    rows = [header]
    for r in results:
        relative = f"{r.makespan / baseline:.2f}x" if baseline else "-"
        rows.append(
            (
                r.mode.label,
                str(r.intended),
                str(r.lost),
                f"{r.lost_percent:.1f} %",
                f"{r.makespan:.3f} s",
                relative,
                str(r.redone),
                str(r.deaths),
                str(r.causal_violations),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        return "  ".join((first, *rest))

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def explain_columns() -> str:
    """Return what each column of :func:`format_table` means, one line per column."""
    width = max(len(name) for name, _ in COLUMNS)
    return "\n".join(f"  {name:<{width}}  {meaning}" for name, meaning in COLUMNS)


def verdict(results: Sequence[ModeResult]) -> str:
    """Return a one-line summary of the results.

    Args:
        results: results of the modes, as from :func:`run_all`.

    Returns:
        What was lost without the causal checks, what was lost and redone with them and with
        edits declared up front, and how their makespans compare with the global lock's.
    """
    by_mode = {r.mode: r for r in results}
    parts = []
    unprotected = [by_mode[m] for m in (Mode.NO_COORDINATION, Mode.PER_CALL_LEASES) if m in by_mode]
    if unprotected:
        worst = max(unprotected, key=lambda r: r.lost)
        parts.append(
            "without causal checks no edit vanished"
            if worst.lost == 0
            else f"without causal checks up to {worst.lost} of {worst.intended} edits "
            f"({worst.lost_percent:.0f} %) vanished"
        )
    serial = by_mode.get(Mode.GLOBAL_LOCK)
    for mode, name in (
        (Mode.SERIALIZABLE, "with SERIALIZABLE sessions"),
        (Mode.DECLARED_UP_FRONT, "with edits declared up front"),
    ):
        result = by_mode.get(mode)
        if result is not None:
            parts.append(f"{name} {_outcome(result)}{_speed(result, serial)}")
    return "; ".join(parts) + "." if parts else "no results."


def _outcome(result: ModeResult) -> str:
    lost = "no edit was lost" if result.lost == 0 else f"{result.lost} edits were lost"
    if result.redone == 0:
        return f"{lost} and none redone"
    return f"{lost}, {result.redone} redone"


def _speed(result: ModeResult, serial: ModeResult | None) -> str:
    if serial is None or result.makespan <= 0 or serial.makespan <= 0:
        return ""
    speedup = serial.makespan / result.makespan
    if speedup >= 1:
        return f", {speedup:.1f}x faster than one global lock"
    return f", {1 / speedup:.1f}x slower than one global lock"
