"""Tests for klock_async.status: klock status against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys

from serverutil import serve_in_thread

from klock_async import Klock
from klock_async.remote import RemoteBackend

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # the terminal control sequences of a live view


async def test_status_shows_holders_waiters_and_the_wait_for_edge() -> None:
    """klock status prints the holder, the queued waiter and who waits for whom, then exits."""
    stack = contextlib.ExitStack()
    running = await asyncio.to_thread(stack.enter_context, serve_in_thread(token="s3cret"))
    try:
        async with Klock(backend=RemoteBackend(running.url, token="s3cret")) as klock:
            old = await klock.register_agent("planner")
            young = await klock.register_agent("coder")
            held = await young.acquire("src/auth.py", "MUTATES")
            waiter = asyncio.create_task(old.acquire("src/auth.py", "MUTATES"))
            await klock.backend.barrier()  # type: ignore[attr-defined]  # the waiter is queued
            command = [sys.executable, "-m", "klock_async", "status", "--server", running.url]
            result = await asyncio.to_thread(
                subprocess.run,
                command,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env={"KLOCK_TOKEN": "s3cret", "COLUMNS": "200", "PATH": ""},
            )
            await held.release()
            await (await waiter).release()
    finally:
        await asyncio.to_thread(stack.close)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "coder MUTATES #1" in out
    assert "planner MUTATES" in out
    assert "wait-for graph" in out
    graph = out[out.index("wait-for graph (GET /waiters)") :].splitlines()
    (edge,) = [line for line in graph if line.strip("│ ").startswith("planner")]
    assert "coder" in edge and "MUTATES FILE:/src/auth.py" in edge
    assert "grants 1" in out and "waiting 1" in out


async def test_top_follows_the_events_live() -> None:
    """klock top shows a waiter that queues after it started, then the hand-over to it."""
    stack = contextlib.ExitStack()
    running = await asyncio.to_thread(stack.enter_context, serve_in_thread())
    top = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "klock_async", "top", "--server", running.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "200", "PATH": ""},
    )
    assert top.stdout is not None

    def read_until(*needles: str) -> str:
        seen = ""
        assert top.stdout is not None
        for line in top.stdout:
            seen += _ANSI.sub("", line)
            if all(needle in seen for needle in needles):
                return seen
        raise AssertionError(f"klock top ended before showing {needles}: {seen}")

    try:
        await asyncio.to_thread(read_until, "wait-for graph")
        async with Klock(backend=RemoteBackend(running.url)) as klock:
            old = await klock.register_agent("planner")
            young = await klock.register_agent("coder")
            held = await young.acquire("src/top.py", "MUTATES")
            waiter = asyncio.create_task(old.acquire("src/top.py", "MUTATES"))
            shown = await asyncio.to_thread(read_until, "coder MUTATES #1", "planner MUTATES")
            assert "waiting 1" in shown
            await held.release()
            granted = await waiter
            await asyncio.to_thread(read_until, "planner MUTATES #2")
            await granted.release()
    finally:
        top.terminate()
        await asyncio.to_thread(top.wait, 30)
        top.stdout.close()
        assert top.stderr is not None
        top.stderr.close()
        await asyncio.to_thread(stack.close)


def test_the_servers_wait_for_graph_follows_events_until_it_is_read_again() -> None:
    """Between two reads of GET /waiters (klock top reads it at most four times a second, on
    events), a request that queues, is granted or leaves shows at once: the view does not
    wait for the next read, which may come only with the next event."""
    from klock_async.status import View

    view = View(agents={"a": 1, "b": 2}, served=[])
    queued = {
        "name": "request.queued",
        "agent_id": "a",
        "request_id": 3,
        "intents": [{"resource": "FILE:/x", "predicate": "MUTATES"}],
        "blocker_agent_id": "b",
    }
    view.apply(queued)
    assert [(w["agent_id"], w["waits_for"]) for w in view.waiters()] == [("a", ["b"])]
    view.apply(
        {
            "name": "lease.granted",
            "agent_id": "a",
            "request_id": 3,
            "lease_id": "L",
            "resource": "FILE:/x",
            "predicate": "MUTATES",
            "token": 2,
        }
    )
    assert view.waiters() == []
    view.apply({**queued, "request_id": 4})
    view.apply({"name": "request.withdrawn", "agent_id": "a", "request_id": 4})
    assert view.waiters() == []


def test_the_view_takes_the_servers_wait_for_graph_when_it_has_one() -> None:
    """With GET /waiters the view shows its edges, not the ones it would derive from events."""
    from klock_async.status import View

    view = View(agents={"a": 1, "b": 2, "c": 3})
    view.apply(
        {
            "name": "request.queued",
            "agent_id": "a",
            "request_id": 9,
            "intents": [{"resource": "FILE:/x", "predicate": "MUTATES"}],
            "blocker_agent_id": "c",
        }
    )
    assert [(w["agent_id"], w["waits_for"]) for w in view.waiters()] == [("a", ["c"])]
    view.served = [
        {
            "request_id": 17,
            "agent_id": "a",
            "session_id": "s",
            "age": 42,
            "intents": [{"resource": "FILE:/src/a.py", "predicate": "MUTATES"}],
            "waits_for": [
                {"kind": "lease", "id": "L", "agent_id": "b", "resource": "FILE:/src/a.py"},
                {"kind": "request", "id": 12, "agent_id": "c"},
            ],
        }
    ]
    assert [(w["agent_id"], w["waits_for"]) for w in view.waiters()] == [("a", ["b", "c"])]
    text = str(view.render("http://127.0.0.1:3100").renderables[3].title)
    assert text == "wait-for graph (GET /waiters)"
