"""Property tests: random schedules of many agents against the scheduler.

- Random schedules: agents of distinct and equal ages acquire (one or several intents, in
  fresh or long-lived sessions, waiting or not, with timeouts), release, heartbeat, revoke,
  cancel and let time pass, on a small resource hierarchy. One driver runs them on an event
  loop with a virtual clock (expiries happen exactly when the schedule says), both from a
  drawn list of operations and from a hypothesis state machine; the scheduler's invariants
  are checked after every step.
- Randomised runs of agents that retry after dying (hold-and-wait inside sessions, and the
  ``protected`` decorator): every run must finish, so no deadlock and no lost wake-up.
- Cancellations and zero timeouts racing with the releases that would grant them.

Properties: no two conflicting leases of different sessions are ever active together; every
queued request is strictly older than what blocks it (so no wait cycle can form); fencing tokens
only grow; cancelled and timed-out requests hold nothing; no lease exists that no caller was
handed. Timeouts here only bound a failing run; they never order steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from klock_async import (
    AcquireTimeoutError,
    EvictedError,
    Klock,
    LeaseDied,
    LeaseInfo,
    LeaseNotFoundError,
    LeaseWouldWait,
    NotLeaseOwnerError,
    RetryPolicy,
    Statistics,
)
from klock_async.model import Intent
from klock_async.rules import intents_conflict
from klock_async.scheduler import Scheduler

T = TypeVar("T")

# Ages: "c" and "d" are equally old, so equal-age conflicts happen too.
AGES = {"a": 1, "b": 2, "c": 3, "d": 3, "e": 4, "f": 5}
NAMES = sorted(AGES)
# The root and the directory overlap everything below them; leaves are drawn more often.
RESOURCES = ["FILE:/", "FILE:/src", "FILE:/src/a", "FILE:/src/a", "FILE:/src/b", "FILE:/src/b"]
RESOURCES += ["FILE:/srcx", "SYMBOL:s"]
PREDICATES = ["PROVIDES", "CONSUMES", "CONSUMES", "MUTATES", "DELETES", "DEPENDS_ON", "RENAMES"]

intent_pairs = st.tuples(st.sampled_from(RESOURCES), st.sampled_from(PREDICATES))


def granted_tokens(logs: list[dict[str, Any]]) -> list[int]:
    return [entry["token"] for entry in logs if entry["event"] == "lease.granted"]


def assert_no_conflicts(leases: list[LeaseInfo]) -> None:
    """No two active leases of different sessions conflict (checked from the outside)."""
    for x, y in itertools.combinations(leases, 2):
        if (x.agent_id, x.session_id) == (y.agent_id, y.session_id):
            continue
        assert not intents_conflict(
            Intent(x.resource, x.predicate), Intent(y.resource, y.predicate)
        ), f"conflicting active leases {x} and {y}"


async def _quiesce(klock: Klock) -> Statistics:
    """Statistics once nothing more is in flight: every request decided, every withdraw done.

    A fixpoint, not a poll: two queries in a row with no other message between them.
    """
    while True:
        first = await asyncio.create_task(klock.statistics())
        second = await asyncio.create_task(klock.statistics())
        if second.messages == first.messages + 1:
            return second


# --- random schedules -----------------------------------------------------------------------


class _VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the schedule says so.

    Expiries then happen at a chosen step, and hypothesis replays every schedule exactly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


class _Pending:
    """An acquire running in its own task."""

    def __init__(self, task: asyncio.Task[Any], agent: str, session: str) -> None:
        self.task = task
        self.agent = agent
        self.session = session


class _Driver:
    """Runs schedule operations against a kernel on a virtual-time loop, checking as it goes."""

    def __init__(self) -> None:
        self.loop = _VirtualTimeLoop()
        self.logs_cm = structlog.testing.capture_logs()
        self.logs = self.logs_cm.__enter__()
        # The kernel's clock is the virtual loop's: time passes only when a rule says so.
        self.klock = Klock(backend=Scheduler(clock=self.loop.time))
        self.run(self.klock.__aenter__())
        backend = self.klock.backend
        assert isinstance(backend, Scheduler)
        self.scheduler = backend
        self.sessions = itertools.count(1)
        self.known: dict[str, LeaseInfo] = {}  # every lease a caller was handed, in grant order
        self.pending: list[_Pending] = []
        self.tokens_seen = 0
        self.last_token = 0
        for name, ts in AGES.items():
            self.run(self.klock.register_agent(name, priority=ts))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def step(self) -> None:
        """Let everything in flight be decided, then record what callers were handed."""
        self.run(_quiesce(self.klock))
        still: list[_Pending] = []
        for pending in self.pending:
            if not pending.task.done():
                still.append(pending)
            elif not pending.task.cancelled():
                error = pending.task.exception()
                if error is None:
                    for lease in pending.task.result():
                        self.known[lease.id] = lease.info
                else:
                    assert isinstance(
                        error, LeaseDied | LeaseWouldWait | AcquireTimeoutError | EvictedError
                    ), repr(error)
        self.pending = still

    def pick(self, index: int) -> LeaseInfo | None:
        # Drawn as a number: lease ids are random, drawing them would make the data vary.
        leases = list(self.known.values())
        return leases[index % len(leases)] if leases else None

    # ---------------------------------------------------------------- operations

    def acquire(
        self,
        agent: str,
        pairs: list[tuple[str, str]],
        shared_session: bool,
        wait: bool,
        timeout: float | None,
        ttl: float,
    ) -> None:
        # A shared session is the agent's session "0": it holds and waits across requests.
        session_id = f"{agent}-0" if shared_session else f"{agent}-{next(self.sessions)}"
        session = self.run(self.klock.agent(agent)).session(session_id=session_id)
        acquiring = session.acquire_many(pairs, ttl=ttl, wait=wait, timeout=timeout)
        self.pending.append(_Pending(self.loop.create_task(acquiring), agent, session_id))
        self.step()

    def cancel(self, index: int) -> None:
        if not self.pending:
            return
        pending = self.pending[index % len(self.pending)]
        pending.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            self.run(pending.task)
        self.step()
        # A cancelled request holds nothing: whatever its session holds was handed earlier.
        for lease in self.run(self.klock.leases()):
            if (lease.agent_id, lease.session_id) == (pending.agent, pending.session):
                assert lease.id in self.known, f"cancelled request left {lease}"

    def end_or_extend(self, index: int, how: str) -> None:
        lease = self.pick(index)
        if lease is None:
            return
        backend = self.klock.backend
        with contextlib.suppress(LeaseNotFoundError):  # it may have ended already
            if how == "release":
                self.run(backend.release(lease.id, lease.agent_id))
            elif how == "revoke":
                self.run(backend.revoke(lease.id))
            elif how == "heartbeat":
                self.run(backend.heartbeat(lease.id, lease.agent_id))
            else:
                self.run(backend.release_session(lease.agent_id, lease.session_id))
        self.step()

    def release_someone_elses(self, index: int, other: str) -> None:
        lease = self.pick(index)
        if lease is None or other == lease.agent_id:
            return
        before = self.run(self.klock.leases())
        with contextlib.suppress(LeaseNotFoundError), pytest.raises(NotLeaseOwnerError):
            self.run(self.klock.backend.release(lease.id, other))
        after = self.run(self.klock.leases())
        # The refusal changed nothing; a short lease may have reached its deadline meanwhile.
        assert all(info in before for info in after)
        gone = [info for info in before if info not in after]
        assert all(info.expires_at <= self.loop.time() for info in gone), gone

    def time_passes(self, seconds: float) -> None:
        self.loop.now += seconds  # short leases expire and hand their resources on
        self.step()

    # ---------------------------------------------------------------- checks

    def check(self) -> None:
        self.scheduler.check_invariants()
        in_flight = {(p.agent, p.session) for p in self.pending}
        active = self.run(self.klock.leases())
        assert_no_conflicts(active)
        for lease in active:
            # Every active lease was handed to a caller, or belongs to a session whose request
            # is still waiting. Cancelled and timed-out requests hold nothing.
            assert lease.id in self.known or (lease.agent_id, lease.session_id) in in_flight, (
                f"leaked lease {lease}"
            )
        tokens = granted_tokens(self.logs)
        for token in tokens[self.tokens_seen :]:
            assert token > self.last_token, "fencing tokens went backwards"
            self.last_token = token
        self.tokens_seen = len(tokens)

    def close(self) -> None:
        try:
            # Free everything: every request still queued must then be decided (no request
            # is forgotten). Each round grants or kills the oldest waiters, so it ends.
            for _ in range(len(AGES) * 10):
                if not self.pending:
                    break
                for name in AGES:
                    self.run(self.klock.evict(name))
                self.step()
            assert not self.pending, "requests still waiting with nothing held"
            self.check()
            self.run(self.klock.__aexit__(None, None, None))
            assert not asyncio.all_tasks(self.loop)
        finally:
            self.logs_cm.__exit__(None, None, None)
            self.loop.close()


acquire_ops = st.tuples(
    st.just("acquire"),
    st.sampled_from(NAMES),
    st.lists(intent_pairs, min_size=1, max_size=2),
    st.booleans(),  # in the agent's long-lived session (hold and wait)
    st.sampled_from([True, True, True, False]),  # wait
    st.sampled_from([None, None, None, 0.0]),  # timeout (0: always withdrawn)
    st.sampled_from([30.0, 30.0, 0.05]),  # ttl
)
_OTHER_OPS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "cancel": st.tuples(st.just("cancel"), st.integers(0, 100)),
    "end_or_extend": st.tuples(
        st.just("end_or_extend"),
        st.integers(0, 1000),
        st.sampled_from(["release", "release", "revoke", "heartbeat", "session"]),
    ),
    "release_someone_elses": st.tuples(
        st.just("release_someone_elses"), st.integers(0, 1000), st.sampled_from(NAMES)
    ),
    "time_passes": st.tuples(st.just("time_passes"), st.sampled_from([0.01, 0.1])),
}
# Acquires are half of all operations: queues only form when requests pile up.
operations = st.sampled_from(["acquire"] * 4 + sorted(_OTHER_OPS)).flatmap(
    lambda kind: acquire_ops if kind == "acquire" else _OTHER_OPS[kind]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(operations, min_size=10, max_size=60))
def test_random_schedules_keep_the_invariants(schedule: list[tuple[Any, ...]]) -> None:
    """Random interleavings never break an invariant, leak a lease or lose a request."""
    driver = _Driver()
    try:
        for name, *args in schedule:
            getattr(driver, name)(*args)
            driver.check()
    finally:
        driver.close()


class SchedulerMachine(RuleBasedStateMachine):
    """The same operations, chosen step by step by hypothesis."""

    def __init__(self) -> None:
        super().__init__()
        self.driver = _Driver()

    @rule(op=acquire_ops)
    def acquire(self, op: tuple[Any, ...]) -> None:
        self.driver.acquire(*op[1:])

    @rule(index=st.integers(0, 100))
    def cancel(self, index: int) -> None:
        self.driver.cancel(index)

    @rule(
        index=st.integers(0, 1000),
        how=st.sampled_from(["release", "revoke", "heartbeat", "session"]),
    )
    def end_or_extend(self, index: int, how: str) -> None:
        self.driver.end_or_extend(index, how)

    @rule(index=st.integers(0, 1000), other=st.sampled_from(NAMES))
    def release_someone_elses(self, index: int, other: str) -> None:
        self.driver.release_someone_elses(index, other)

    @rule(seconds=st.sampled_from([0.01, 0.1]))
    def time_passes(self, seconds: float) -> None:
        self.driver.time_passes(seconds)

    @invariant()
    def invariants_hold(self) -> None:
        self.driver.check()

    def teardown(self) -> None:
        self.driver.close()


SchedulerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase


# --- every run with retries finishes ---------------------------------------------------------

jobs = st.lists(intent_pairs, min_size=1, max_size=3)
plans = st.lists(st.lists(jobs, min_size=1, max_size=3), min_size=2, max_size=8)


async def _run_with_retries(plan: list[list[list[tuple[str, str]]]], seed: int) -> None:
    rng = random.Random(seed)
    with structlog.testing.capture_logs() as logs:
        async with Klock() as klock:
            backend = klock.backend
            assert isinstance(backend, Scheduler)
            names = [f"agent-{i}" for i in range(len(plan))]
            for name in names:
                # A few equal ages among distinct ones.
                await klock.register_agent(name, priority=rng.choice([0, 1, 2, 3, 4, 5, 6]))

            async def job(name: str, steps: list[tuple[str, str]]) -> int:
                """Hold-and-wait in a session; on death release, wait for the blocker, retry."""
                agent = await klock.agent(name)
                for attempt in itertools.count():
                    try:
                        async with agent.session() as session:
                            for resource, predicate in steps:
                                await session.acquire(resource, predicate)
                                backend.check_invariants()
                                await asyncio.sleep(0)  # think time
                        return attempt
                    except LeaseDied as died:
                        if died.blocker_lease_id is not None:
                            with contextlib.suppress(LeaseNotFoundError):
                                await klock.backend.wait_ended(died.blocker_lease_id, 0.05)
                        # Jitter: sessions of equal age that hold and wait die against each
                        # other; retrying in lockstep (asyncio is deterministic) would repeat
                        # the same collision forever.
                        await asyncio.sleep(rng.uniform(0, 0.002))
                raise AssertionError("unreachable")

            retry = RetryPolicy(max_retries=10_000, base_delay=0.0005, max_delay=0.005)
            protected = klock.protected(
                agent=lambda name, **_: name,
                resource=lambda resources, **_: resources,
                predicate="MUTATES",
                retry=retry,
            )

            @protected
            async def tool(name: str, resources: list[str]) -> None:
                backend.check_invariants()
                await asyncio.sleep(0)

            calls = []
            for name, agent_jobs in zip(names, plan, strict=True):
                for steps in agent_jobs:
                    calls.append(job(name, steps))
                    calls.append(tool(name, sorted({resource for resource, _ in steps})))
            async with asyncio.timeout(20):  # a failure bound only: a deadlock would hang
                await asyncio.gather(*calls)
            assert await klock.leases() == []
            stats = await klock.statistics()
            assert stats.requests_waiting == 0
            backend.check_invariants()
    tokens = granted_tokens(logs)
    assert tokens == sorted(set(tokens))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans, seed=st.integers(0, 2**32 - 1))
def test_every_run_with_retries_finishes(
    plan: list[list[list[tuple[str, str]]]], seed: int
) -> None:
    """Agents that retry after dying all finish: no deadlock, no lost wake-up."""
    asyncio.run(_run_with_retries(plan, seed))


# --- cancellation and timeouts in bulk -------------------------------------------------------


async def _run_cancellations(plan: list[tuple[int, str, str, int]]) -> None:
    async with Klock() as klock:
        backend = klock.backend
        assert isinstance(backend, Scheduler)
        for name, ts in AGES.items():
            await klock.register_agent(name, priority=ts)
        youngest = await klock.agent("f")
        holders = [await youngest.acquire(r, "MUTATES") for r in ("/src/a", "/srcx")]
        names = sorted(AGES)
        tasks: list[tuple[asyncio.Task[Any], str, int]] = []
        for i, (age_index, resource, predicate, fate) in enumerate(plan):
            session = (await klock.agent(names[age_index])).session(session_id=f"s{i}")
            timeout = 0.0 if fate == 2 else None  # 0: decided at once, or withdrawn
            acquiring = session.acquire(resource, predicate, timeout=timeout)
            tasks.append((asyncio.create_task(acquiring), session.id, fate))
        await _quiesce(klock)
        for task, _, fate in tasks:
            if fate == 1:
                task.cancel()  # a no-op for a task that has its answer already
        # Releasing now grants waiters in the same batches as the withdrawals of the cancels.
        for holder in holders:
            with contextlib.suppress(LeaseNotFoundError):
                await holder.release()
        for task, _, fate in tasks:
            if fate:
                with contextlib.suppress(asyncio.CancelledError, AcquireTimeoutError, LeaseDied):
                    await task
        await _quiesce(klock)

        handed: set[str] = set()
        withdrawn: set[str] = set()
        in_flight: set[str] = set()
        for task, session_id, _ in tasks:
            if not task.done():
                in_flight.add(session_id)
            elif task.cancelled() or isinstance(task.exception(), AcquireTimeoutError):
                withdrawn.add(session_id)
            elif task.exception() is None:
                handed.add(task.result().id)
            else:
                assert isinstance(task.exception(), LeaseDied), repr(task.exception())
        active = await klock.leases()
        assert_no_conflicts(active)
        backend.check_invariants()
        for lease in active:
            # Cancelled and timed-out requests hold nothing; everything held was handed to
            # its caller, or belongs to a request that is still waiting.
            assert lease.session_id not in withdrawn, f"withdrawn request holds {lease}"
            assert lease.id in handed or lease.session_id in in_flight, f"leaked {lease}"

        # Free everything; what still waits must then be decided.
        while not all(task.done() for task, _, _ in tasks):
            for name in AGES:
                await klock.evict(name)
            await _quiesce(klock)
        for task, _, _ in tasks:
            if not task.cancelled() and task.exception() is not None:
                assert isinstance(
                    task.exception(), LeaseDied | AcquireTimeoutError | EvictedError
                ), repr(task.exception())


@settings(max_examples=60, deadline=None)
@given(
    plan=st.lists(
        st.tuples(
            st.integers(0, len(AGES) - 1),
            st.sampled_from(RESOURCES),
            st.sampled_from(PREDICATES),
            st.integers(0, 2),  # 0: left alone, 1: cancelled, 2: timeout=0
        ),
        min_size=1,
        max_size=12,
    )
)
def test_cancelled_and_timed_out_requests_hold_nothing(
    plan: list[tuple[int, str, str, int]],
) -> None:
    """However requests are cancelled or time out around releases, they hold nothing."""
    asyncio.run(_run_cancellations(plan))
