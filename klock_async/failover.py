"""The client's side of replicas: several server URLs, and which of them leads.

``Klock.connect``, the blocking clients and ``klock mcp`` take one server URL or several
(a list, or one string separated by commas, as ``KLOCK_SERVER_URL`` may hold). A transport
keeps one :class:`ServerList` and asks it where to send a request, and tells it what happened:

- a replica answered ``not_leader`` naming the leader: :meth:`ServerList.follow` (the request
  was not done; send it there);
- a replica answered ``not_leader`` naming none (an election is under way), or a server could
  not be reached: :meth:`ServerList.failed` moves to the next URL, and
  :meth:`ServerList.backoff` says how long to wait once every URL was tried.

Which requests may be sent again is the transport's decision (:func:`may_resend`): any request
a replica refused as a follower, or that never reached a server (the connection was refused);
after a connection broke mid-request, only requests that change nothing or that are the same
when done twice: reads, heartbeats, acquires that carry a request key (the server answers a
resend with the grant the key already got) and releases (a resend that finds the lease gone
counts as done).
"""

from __future__ import annotations

from collections.abc import Sequence

from klock_async.errors import InvalidRequestError

__all__ = ["ServerList", "first_leader", "may_resend", "parse_urls"]

_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 0.5


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """The server URLs in ``urls`` (a list, or one string separated by commas), in order.

    Raises:
        InvalidRequestError: no URL, or one that is not ``http(s)://...``.
    """
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    found: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidRequestError(f"a server URL must be text, got {item!r}")
        url = item.strip().rstrip("/")
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise InvalidRequestError(
                f"the server URL must start with http:// or https://: {item.strip()!r}"
            )
        if url not in found:
            found.append(url)
    if not found:
        raise InvalidRequestError(f"no server URL given: {urls!r}")
    return found


def may_resend(method: str, path: str, *, reached: bool, keyed: bool = False) -> bool:
    """Whether a request may be sent again, to the same server or another one.

    ``reached`` is False when the request certainly never reached a server (the connection
    was refused, or a follower refused it); then anything may be resent. Otherwise only
    requests that done twice are done once: reads, heartbeats, an acquire that carries a
    request key (``keyed``: the server answers its resend with the grant the key got, and
    grants nothing twice), and a release (the transport counts "lease not found" in answer
    to its resend as done).
    """
    if not reached or method == "GET" or path.endswith("/heartbeat"):
        return True
    if method == "DELETE":
        return path.startswith("/leases/")
    return keyed and method == "POST" and path in ("/intents", "/leases")


def first_leader(
    urls: str | Sequence[str], *, token: str | None = None, timeout: float = 5.0
) -> str:
    """The leader among ``urls``, for a command that talks to one server (``klock status``).

    Asks each URL in turn for ``GET /health``: the first that answers 200 leads; a follower
    names the leader (503 ``not_leader``, ``details.leader``), which is taken at its word. One
    URL is returned as it is, without a request. When no URL answers, the first one is
    returned: the caller's own request then says what failed.

    Raises:
        InvalidRequestError: no URL, or one that is not ``http(s)://...``.
    """
    import json
    import urllib.error
    import urllib.request

    servers = parse_urls(urls)
    if len(servers) == 1:
        return servers[0]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for url in servers:
        request = urllib.request.Request(f"{url}/health", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return url
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    body = json.loads(exc.read())
                except ValueError:
                    continue
            details = body.get("details") if isinstance(body, dict) else None
            leader = details.get("leader") if isinstance(details, dict) else None
            if isinstance(leader, str) and leader.startswith(("http://", "https://")):
                return leader.rstrip("/")
            if exc.code != 503:
                return url  # it answers, and is no follower (a wrong token, say): let it say so
        except (OSError, ValueError):
            continue  # unreachable: the next one
    return servers[0]


class ServerList:
    """Several replicas of one klock server, and the one believed to lead.

    Args:
        urls: one URL, several separated by commas, or a list.

    Raises:
        InvalidRequestError: no URL, or one that is not ``http(s)://...``.
    """

    def __init__(self, urls: str | Sequence[str]) -> None:
        self.urls = parse_urls(urls)
        self._index = 0
        self._tried = 0  # URLs failed in a row since the last answer from a leader
        self._delay = _BACKOFF_FIRST

    def __repr__(self) -> str:
        return f"<ServerList {self.current} of {len(self.urls)}>"

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def current(self) -> str:
        """The URL requests go to now."""
        return self.urls[self._index]

    def answered(self) -> None:
        """The current server answered as the leader: forget past failures."""
        self._tried = 0
        self._delay = _BACKOFF_FIRST

    def follow(self, leader: str) -> str:
        """A replica named ``leader``: requests go there from now on (added if unknown)."""
        url = leader.rstrip("/")
        if url not in self.urls:
            self.urls.append(url)
        self._index = self.urls.index(url)
        self._tried += 1  # replicas pointing at each other (stale) must not spin
        return url

    def failed(self, url: str) -> str:
        """``url`` could not serve: move on to the next URL (if it still is the current one)."""
        if url == self.current:
            self._index = (self._index + 1) % len(self.urls)
            self._tried += 1
        return self.current

    def backoff(self) -> float:
        """Seconds to wait before the next try: 0 until every URL was tried, then growing."""
        if self._tried < len(self.urls):
            return 0.0
        delay = self._delay
        self._delay = min(self._delay * 2, _BACKOFF_MAX)
        self._tried = 0
        return delay
