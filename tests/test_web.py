"""Tests for klock_async.web: GET /events, the page at GET / and their token handling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverutil import ThreadServer, serve_in_thread

from klock_async import Klock
from klock_async.remote import RemoteBackend


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with serve_in_thread() as running:
        yield running


def _read_events(lines: Iterator[str], count: int) -> list[tuple[str, str, dict[str, Any]]]:
    """The next ``count`` Server-Sent Events as (id, event name, data)."""
    found: list[tuple[str, str, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                found.append((fields["id"], fields["event"], json.loads(fields["data"])))
                if len(found) == count:
                    return found
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    raise AssertionError(f"the stream ended after {found}")


def test_events_are_server_sent_events_named_after_the_change(server: ThreadServer) -> None:
    """GET /events streams each change with event: its name, id: its number, data: JSON."""
    with (
        httpx.Client(base_url=server.url, timeout=30) as http,
        http.stream("GET", "/events") as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines).startswith(": ")  # the stream is attached: act now
        http.post("/agents", json={"agent_id": "sse-a"})
        lease = http.post(
            "/leases",
            json={
                "agent_id": "sse-a",
                "resource_type": "FILE",
                "resource_path": "/sse",
                "predicate": "MUTATES",
            },
        )
        lease_id = lease.json()["data"]["lease_id"]
        http.delete(f"/leases/{lease_id}")
        events = _read_events(lines, 3)
    assert [name for _, name, _ in events] == [
        "agent.registered",
        "lease.granted",
        "lease.released",
    ]
    ids = [int(event_id) for event_id, _, _ in events]
    assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
    granted = events[1][2]
    assert (granted["agent_id"], granted["resource"], granted["lease_id"]) == (
        "sse-a",
        "FILE:/sse",
        lease_id,
    )
    assert granted["ttl_ms"] == 30_000
    assert isinstance(granted["at_ms"], int)


def test_last_event_id_resumes_from_the_buffer(server: ThreadServer) -> None:
    """A reconnect with Last-Event-ID gets the events after that id that it missed."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("GET", "/events") as stream:
            lines = stream.iter_lines()
            next(lines)
            http.post("/agents", json={"agent_id": "resume-a"})
            ((first_id, _, _),) = _read_events(lines, 1)
        http.post("/agents", json={"agent_id": "resume-b"})
        http.post("/agents", json={"agent_id": "resume-c"})
        with http.stream("GET", "/events", headers={"Last-Event-ID": first_id}) as stream:
            missed = _read_events(stream.iter_lines(), 2)
    assert [data["agent_id"] for _, _, data in missed] == ["resume-b", "resume-c"]
    assert int(missed[0][0]) == int(first_id) + 1


def test_a_bad_last_event_id_is_refused(server: ThreadServer) -> None:
    """Last-Event-ID that is not an event id is a 400 with a typed code, not a guess."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.get("/events", headers={"Last-Event-ID": "yesterday"})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_field"
    assert "Last-Event-ID" in response.json()["error"]


async def test_remote_events_read_the_server_stream(server: ThreadServer) -> None:
    """Klock.connect(url).events() yields the same typed events as the embedded kernel."""
    async with (
        Klock(backend=RemoteBackend(server.url)) as klock,
        klock.events(after=0) as events,
    ):
        agent = await klock.register_agent("remote-events")
        async with agent.lease("/remote/events", "MUTATES"):
            pass
        mine = []
        async for event in events:
            if event.agent_id == "remote-events":
                mine.append(event)
            if event.name == "lease.released" and event.agent_id == "remote-events":
                break
    assert [e.name for e in mine] == ["agent.registered", "lease.granted", "lease.released"]
    assert mine[1].resource == "FILE:/remote/events"
    assert mine[1].token == mine[2].token


def test_the_page_is_served_without_a_token_and_holds_no_data() -> None:
    """With --token, GET / loads without it (it asks for it), while /events needs it."""
    with (
        serve_in_thread(token="s3cret") as running,
        httpx.Client(base_url=running.url, timeout=30) as http,
    ):
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<script" in page.text and "http://" not in page.text.replace(
            "http://www.w3.org", ""
        )
        assert http.get("/events").status_code == 401


# --------------------------------------------------------------------------------------------
# The page in a real headless Chromium (Debian's chromium and chromium-driver).

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_REQUIRED = os.environ.get("KLOCK_REQUIRE_BROWSER") == "1"
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "live-view.png"


class _HideWaiters:
    """An ASGI wrapper that answers 404 to GET /waiters: a server without the wait-for route."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.state  # Server.shutdown finds the API through it

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/waiters":
            body = b'{"success":false,"data":null,"error":"no such endpoint","code":"not_found"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 404,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        if BROWSER_REQUIRED:
            pytest.fail("KLOCK_REQUIRE_BROWSER=1 but chromium or chromedriver is missing")
        pytest.skip(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _has_waiters_route(url: str) -> bool:
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": "Bearer s3cret"}) as http:
        return http.get("/waiters").status_code != 404


@pytest.mark.parametrize("waiters", ["served", "hidden"])
async def test_the_page_shows_a_holder_and_its_waiter_live(
    browser: Any, waiters: str, tmp_path: Path
) -> None:
    """A lease and a queued waiter appear on the page within a second, with the wait edge."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wrap = _HideWaiters if waiters == "hidden" else None
    stack = contextlib.ExitStack()
    running = await asyncio.to_thread(
        stack.enter_context, serve_in_thread(wrap=wrap, token="s3cret")
    )
    try:
        served = await asyncio.to_thread(_has_waiters_route, running.url)
        if waiters == "served" and not served:
            pytest.skip("this server has no GET /waiters")

        def open_page() -> None:
            browser.get(running.url + "/")
            WebDriverWait(browser, 30).until(
                lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "login"
            )
            assert "s3cret" not in browser.current_url
            browser.find_element(By.ID, "token").send_keys("s3cret")
            browser.find_element(By.CSS_SELECTOR, "#login button").click()
            WebDriverWait(browser, 30).until(
                lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "live"
            )

        await asyncio.to_thread(open_page)
        async with Klock(backend=RemoteBackend(running.url, token="s3cret")) as klock:
            old = await klock.register_agent("planner")
            young = await klock.register_agent("coder")
            held = await young.acquire("src/auth.py", "MUTATES")
            waiter = asyncio.create_task(old.acquire("src/auth.py", "MUTATES"))
            await klock.backend.barrier()  # type: ignore[attr-defined]  # the waiter is queued

            def both_shown() -> None:
                # The page follows the event stream: both appear within a second.
                expected_source = "(from /waiters)" if served else "(derived from events)"

                def shown(d: Any) -> bool:
                    if not (
                        d.find_elements(By.CSS_SELECTOR, '[data-holder="coder"]')
                        and d.find_elements(By.CSS_SELECTOR, '[data-waiter="planner"]')
                        and d.find_elements(By.CSS_SELECTOR, '[data-node="planner"]')
                        and d.find_elements(By.CSS_SELECTOR, '[data-node="coder"]')
                    ):
                        return False
                    row = d.find_element(By.CSS_SELECTOR, '[data-resource$="src/auth.py"]').text
                    source = d.find_element(By.ID, "graph-source").text
                    return (
                        "coder MUTATES" in row
                        and "planner MUTATES" in row
                        and source == expected_source
                    )

                # The page re-renders as events arrive: an element read between two renders
                # is stale, and is read again.
                WebDriverWait(
                    browser,
                    1.0,
                    poll_frequency=0.02,
                    ignored_exceptions=(StaleElementReferenceException,),
                ).until(shown)
                browser.save_screenshot(str(tmp_path / f"live-view-{waiters}.png"))
                if waiters == "hidden" and os.environ.get("KLOCK_UPDATE_SCREENSHOT") == "1":
                    browser.save_screenshot(str(DOCS_SCREENSHOT))  # the one in docs/server.md
                assert "s3cret" not in browser.current_url

            try:
                await asyncio.to_thread(both_shown)
            finally:
                await held.release()
                await (await waiter).release()
        assert (tmp_path / f"live-view-{waiters}.png").stat().st_size > 0
    finally:
        await asyncio.to_thread(stack.close)
