"""Tests for klock_async.failover: the client's list of replicas and what it may resend."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from serverutil import serve_in_thread

from klock_async import InvalidRequestError
from klock_async.compat import KlockHttpClient
from klock_async.failover import ServerList, first_leader, may_resend, parse_urls


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize(
    ("given", "urls"),
    [
        pytest.param("http://a:1", ["http://a:1"], id="one"),
        pytest.param("http://a:1/, http://b:2,", ["http://a:1", "http://b:2"], id="commas"),
        pytest.param(["https://a", "https://a/"], ["https://a"], id="list-duplicates"),
    ],
)
def test_urls_are_parsed_in_order(given: str | list[str], urls: list[str]) -> None:
    """Commas or a list, trailing slashes and duplicates dropped, order kept."""
    assert parse_urls(given) == urls


@pytest.mark.parametrize("given", ["", " , ", "ftp://a", "http://a,b"])
def test_bad_url_lists_are_refused(given: str) -> None:
    """No URL, or one that is not http(s), is a typed error."""
    with pytest.raises(InvalidRequestError):
        parse_urls(given)


def test_follow_and_failed_move_the_current_server() -> None:
    """A named leader becomes current (added if new); a failure moves to the next URL."""
    servers = ServerList("http://a,http://b")
    assert servers.current == "http://a"
    assert servers.failed("http://a") == "http://b"
    assert servers.failed("http://a") == "http://b"  # a stale failure changes nothing
    assert servers.follow("http://c/") == "http://c"
    assert servers.urls == ["http://a", "http://b", "http://c"]


def test_backoff_only_after_every_server_was_tried() -> None:
    """No wait while untried URLs remain; then a growing, bounded wait."""
    servers = ServerList("http://a,http://b")
    servers.failed("http://a")
    assert servers.backoff() == 0.0
    servers.failed("http://b")
    first = servers.backoff()
    servers.failed("http://a")
    servers.failed("http://b")
    assert 0 < first < servers.backoff() <= 0.5
    servers.answered()
    assert servers.backoff() == 0.0


@pytest.mark.parametrize(
    ("method", "path", "reached", "keyed", "resend"),
    [
        pytest.param("POST", "/intents", False, False, True, id="acquire-never-sent"),
        pytest.param("POST", "/intents", True, False, False, id="acquire-maybe-done"),
        pytest.param("POST", "/intents", True, True, True, id="keyed-acquire-maybe-done"),
        pytest.param("POST", "/leases", True, True, True, id="keyed-v1-acquire-maybe-done"),
        pytest.param("DELETE", "/leases/x", True, False, True, id="release-maybe-done"),
        pytest.param("POST", "/leases/x/heartbeat", True, False, True, id="heartbeat"),
        pytest.param("GET", "/leases", True, False, True, id="read"),
        pytest.param("POST", "/agents", True, False, False, id="register-maybe-done"),
        pytest.param("POST", "/leases/x/revoke", True, False, False, id="revoke-maybe-done"),
    ],
)
def test_only_safe_requests_are_resent(
    method: str, path: str, reached: bool, keyed: bool, resend: bool
) -> None:
    """A request that may have been done is resent only if doing it twice is doing it once:
    reads, heartbeats, acquires that carry a request key, and releases (whose resend, finding
    the lease gone, counts as done)."""
    assert may_resend(method, path, reached=reached, keyed=keyed) is resend


def test_blocking_client_moves_past_a_server_that_is_down() -> None:
    """KlockHttpClient given two URLs, the first refusing connections, works on the second."""
    with serve_in_thread() as server:
        client = KlockHttpClient(f"{_closed_port_url()},{server.url}")
        try:
            client.register_agent("a")
            result = client.acquire_lease("a", "s", "FILE", "/x", "MUTATES", 5_000)
        finally:
            client.close()
    assert result["success"] is True


def test_first_leader_skips_a_server_that_is_down() -> None:
    """Among several URLs the first that answers is taken; one URL is taken as it is."""
    closed = _closed_port_url()
    with serve_in_thread() as server:
        assert first_leader(f"{closed},{server.url}") == server.url
    assert first_leader(closed) == closed
    assert first_leader(f"{closed},{_closed_port_url()}") == closed  # none answers: the first


def test_hook_command_moves_past_a_server_that_is_down(tmp_path: Path) -> None:
    """klock hook given two URLs in KLOCK_SERVER_URL, the first refusing connections, asks
    the second."""
    from test_hooks import edit, hook, pre

    with serve_in_thread() as server:
        result = hook(
            f"{_closed_port_url()},{server.url}",
            pre("s1", "Edit", edit(tmp_path / "app.py"), tmp_path),
        )
    assert result.returncode == 0, result.stderr
