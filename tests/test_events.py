"""Tests for klock_async.events: typed events, the bounded buffer and klock.events()."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klock_async import (
    CausalViolationError,
    Event,
    Intent,
    Klock,
    KlockError,
    LeaseDied,
    LeaseLostError,
)
from klock_async.events import EVENT_NAMES, EventBuffer
from klock_async.scheduler import Scheduler


async def _collect(klock: Klock, work: object) -> list[Event]:
    """Run ``work(klock)`` with a stream open; close the kernel; return what the stream read."""
    events = klock.events()
    await work(klock)  # type: ignore[operator]
    await klock.aclose()
    return [event async for event in events]


async def _every_change(klock: Klock) -> None:
    old = await klock.register_agent("old", priority=1)
    young = await klock.register_agent("young", priority=2)
    newest = await klock.register_agent("newest", priority=3)
    held = await young.acquire("/f", "MUTATES")
    await held.heartbeat()
    waiter = asyncio.create_task(old.acquire("/f", "MUTATES"))
    await asyncio.create_task(klock.statistics())  # the waiter is queued
    with pytest.raises(LeaseDied):
        await newest.acquire("/f", "CONSUMES", wait=False)
    await held.release()
    granted = await waiter
    await klock.revoke(granted.id)
    short = await young.acquire("/g", "MUTATES", ttl=0.01)
    await klock.backend.wait_ended(short.id, None)
    blocker = await young.acquire("/h", "MUTATES")
    with pytest.raises(TimeoutError):
        await old.acquire("/h", "CONSUMES", timeout=0.01)
    await blocker.release()
    await young.read("/w")
    await old.write("/w")
    with pytest.raises(CausalViolationError):
        await young.write("/w")
    await asyncio.create_task(klock.statistics())


async def test_every_state_change_is_an_event() -> None:
    """Each of the eleven kinds of state change reaches klock.events() as a typed Event."""
    async with Klock() as klock:
        events = await _collect(klock, _every_change)
    names = [event.name for event in events]
    assert set(names) == set(EVENT_NAMES)
    assert [event.id for event in events] == list(range(1, len(events) + 1))
    queued = next(e for e in events if e.name == "request.queued")
    assert (queued.agent_id, queued.resource, queued.predicate) == ("old", "FILE:/f", "MUTATES")
    assert queued.data["blocker_agent_id"] == "young"
    assert queued.data["intents"] == [{"resource": "FILE:/f", "predicate": "MUTATES"}]
    granted = [e for e in events if e.name == "lease.granted" and e.agent_id == "old"]
    assert granted[0].request_id == queued.request_id
    died = next(e for e in events if e.name == "request.died")
    assert (died.agent_id, died.data["blocker_agent_id"]) == ("newest", "old")
    refused = next(e for e in events if e.name == "write.refused")
    assert (refused.agent_id, refused.resource) == ("young", "FILE:/w")
    for event in events:
        assert event.as_dict()["at_ms"] == round(event.at * 1000)
        assert Event.from_dict(event.as_dict()) == replace(event, at=round(event.at * 1000) / 1000)


async def test_lease_events_recorded_unread_are_built_in_full_when_read() -> None:
    """A lease event is recorded as the lease and built when read: with every field the
    change had at the time (the ttl of the grant, not of a later heartbeat)."""
    async with Klock() as klock:
        backend = klock.backend
        assert isinstance(backend, Scheduler)
        backend.event_buffer.retain()  # recorded with nobody reading, as a server does
        agent = await klock.register_agent("coder")
        lease = await agent.acquire("/f", "MUTATES", ttl=30)
        await lease.heartbeat(ttl=60)
        await lease.release()
        await klock.statistics()  # after the one-way release in the mailbox
        events = backend.event_buffer.snapshot()
    by_name = {event.name: event for event in events}
    for name, ttl_ms in (
        ("lease.granted", 30_000),
        ("lease.heartbeated", 60_000),
        ("lease.released", None),
    ):
        event = by_name[name]
        assert (event.agent_id, event.resource, event.predicate) == ("coder", "FILE:/f", "MUTATES")
        assert (event.lease_id, event.token) == (lease.id, lease.token)
        assert event.session_id == lease.info.session_id
        assert event.request_id is not None and event.request_id > 0
        assert event.data == ({} if ttl_ms is None else {"ttl_ms": ttl_ms})
    assert backend.event_buffer.snapshot() == events  # built once, read the same again


async def test_a_resend_leaves_the_recorded_grant_with_its_own_request() -> None:
    """A resent acquire answered with the earlier grant takes the lease over; the grant's
    event, built when read after that, still names the request it was granted to."""
    async with Klock() as klock:
        backend = klock.backend
        assert isinstance(backend, Scheduler)
        backend.event_buffer.retain()
        await klock.register_agent("coder")
        intents = [Intent.of("/f", "MUTATES")]
        (first,) = await backend.acquire("coder", "s", intents, ttl=30, request_key="k-00000001")
        (again,) = await backend.acquire("coder", "s", intents, ttl=30, request_key="k-00000001")
        assert again.id == first.id
        granted = [e for e in backend.event_buffer.snapshot() if e.name == "lease.granted"]
    assert len(granted) == 1
    assert granted[0].request_id == 1  # the kernel numbers requests from 1


async def test_a_kernel_nobody_watches_records_nothing() -> None:
    """Without a reader, the buffer stays off and empty however many leases come and go."""
    async with Klock() as klock:
        backend = klock.backend
        assert isinstance(backend, Scheduler)
        agent = await klock.register_agent("solo")
        for _ in range(100):
            await (await agent.acquire("/f", "MUTATES")).release()
        assert backend.event_buffer.recording is False
        assert backend.event_buffer.snapshot() == []
        async with klock.events():
            assert backend.event_buffer.recording is True
        assert backend.event_buffer.recording is False


async def test_a_lost_lease_block_ends_in_a_revoked_event() -> None:
    """The revocation that makes a lease block raise LeaseLostError is an event."""
    async with Klock() as klock:
        events = klock.events()
        agent = await klock.register_agent("coder")
        with pytest.raises(LeaseLostError):
            async with agent.lease("/f", "MUTATES") as lease:
                await klock.revoke(lease.id)
        await klock.aclose()
        names = [event.name async for event in events]
    assert names == ["agent.registered", "lease.granted", "lease.revoked"]


async def test_a_slow_reader_skips_ahead_and_counts_what_it_missed() -> None:
    """The buffer drops its oldest events; a reader behind them learns how many it missed."""
    buffer = EventBuffer(4)
    stream = buffer.stream()
    for i in range(10):
        buffer.publish("agent.registered", f"a{i}", ts=i)
    assert buffer.dropped == 6
    first = await anext(stream)
    assert (first.id, first.agent_id, stream.dropped) == (7, "a6", 6)
    buffer.close()
    assert [e.id async for e in stream] == [8, 9, 10]


async def test_a_stream_resumes_after_an_event_id() -> None:
    """stream(after=N) replays the buffered events after N, then the new ones."""
    buffer = EventBuffer(retain=True)
    for i in range(5):
        buffer.publish("agent.registered", f"a{i}")
    stream = buffer.stream(after=3)
    buffer.publish("agent.registered", "late")
    buffer.close()
    assert [e.agent_id async for e in stream] == ["a3", "a4", "late"]


def test_capacity_must_be_positive() -> None:
    """A buffer of no events is a typed refusal, not a silent default."""
    with pytest.raises(ValueError, match="positive integer"):
        EventBuffer(0)


@given(
    capacity=st.integers(1, 8),
    steps=st.lists(st.one_of(st.just("read"), st.integers(1, 5)), max_size=40),
)
def test_readers_see_every_event_in_order_or_count_it_dropped(
    capacity: int, steps: list[object]
) -> None:
    """However publishing and reading interleave, read + dropped = published, ids increase."""

    async def scenario() -> None:
        buffer = EventBuffer(capacity)
        stream = buffer.stream()
        seen: list[int] = []
        published = 0
        for step in steps:
            if step == "read":
                if buffer.last_id > (seen[-1] if seen else 0) + stream.dropped:
                    seen.append((await anext(stream)).id)
            else:
                assert isinstance(step, int)
                for _ in range(step):
                    buffer.publish("agent.registered", "a")
                    published += 1
        buffer.close()
        seen += [e.id async for e in stream]
        assert seen == sorted(set(seen))
        assert len(seen) + stream.dropped == published

    asyncio.run(scenario())


async def test_every_waiter_that_leaves_the_queue_says_why() -> None:
    """A queued request that is withdrawn or evicted ends in request.withdrawn with a reason."""
    async with Klock() as klock:
        events = klock.events()
        old = await klock.register_agent("old")
        young = await klock.register_agent("young")
        held = await young.acquire("/f", "MUTATES")
        with pytest.raises(TimeoutError):
            await old.acquire("/f", "MUTATES", timeout=0.01)
        waiter = asyncio.create_task(old.acquire("/f", "MUTATES"))
        await asyncio.create_task(klock.statistics())  # queued
        await klock.evict("old")
        with pytest.raises(KlockError):
            await waiter
        await held.release()
        await asyncio.create_task(klock.statistics())
        await klock.aclose()
        found = [e async for e in events if e.name.startswith("request.")]
    queued = [e.request_id for e in found if e.name == "request.queued"]
    left = {e.request_id: e.data["reason"] for e in found if e.name == "request.withdrawn"}
    assert left == {queued[0]: "caller", queued[1]: "evicted"}
