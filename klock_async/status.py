"""``klock status`` (one table, then exit) and ``klock top`` (the same view, kept live).

Both read a running ``klock serve``: ``GET /agents``, ``/leases`` and ``/statistics`` for the
state, ``GET /waiters`` for the wait-for graph when the server has it, and otherwise the
``request.*`` and ``lease.*`` events of ``GET /events`` (replayed from the server's buffer,
then followed live by ``klock top``). The page at ``GET /`` shows the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from klock_async.errors import InvalidRequestError
from klock_async.failover import first_leader

__all__ = ["View", "add_arguments", "run"]


def _overlaps(a: str, b: str) -> bool:
    return a == b or b.startswith(a.rstrip("/") + "/") or a.startswith(b.rstrip("/") + "/")


@dataclass
class View:
    """What the server holds and who waits for whom, kept up to date by events."""

    agents: dict[str, int] = field(default_factory=dict)  # agent id -> age (ts)
    leases: dict[str, dict[str, Any]] = field(default_factory=dict)  # lease id -> lease JSON
    derived: dict[int, dict[str, Any]] = field(default_factory=dict)  # request id -> waiter
    served: list[dict[str, Any]] | None = None  # GET /waiters, when the server has it
    stats: dict[str, Any] = field(default_factory=dict)

    def apply(self, event: dict[str, Any]) -> None:
        """Follow one event (its JSON form, as ``GET /events`` sends it)."""
        name = event["name"]
        if name == "agent.registered":
            self.agents.setdefault(event["agent_id"], event.get("ts", 0))
        elif name == "lease.granted":
            self.leases[event["lease_id"]] = event
            self._left(event.get("request_id", -1))
        elif name in ("lease.released", "lease.expired", "lease.revoked"):
            self.leases.pop(event["lease_id"], None)
        elif name == "request.queued":
            self.derived[event["request_id"]] = event
            if self.served is not None:  # as the event says, until GET /waiters is read again
                blocker = event.get("blocker_agent_id")
                self.served.append(
                    {
                        "request_id": event["request_id"],
                        "agent_id": event["agent_id"],
                        "intents": event.get("intents", []),
                        "waits_for": [{"agent_id": blocker}] if blocker else [],
                        "age": self.agents.get(event["agent_id"], 0),
                    }
                )
        elif name in ("request.withdrawn", "request.died"):
            self._left(event["request_id"])

    def _left(self, request_id: int) -> None:
        """A request left the queue (granted, withdrawn or refused)."""
        self.derived.pop(request_id, None)
        if self.served is not None:
            self.served = [w for w in self.served if w.get("request_id") != request_id]

    def waiters(self) -> list[dict[str, Any]]:
        """Every waiting request, oldest agent first, with the agents it waits for."""
        if self.served is not None:
            found = [
                {
                    "agent_id": w["agent_id"],
                    "intents": w["intents"],
                    "waits_for": sorted({b["agent_id"] for b in w["waits_for"]}),
                    "age": w["age"],
                }
                for w in self.served
            ]
        else:
            found = []
            for w in self.derived.values():
                blockers = {
                    lease["agent_id"]
                    for intent in w.get("intents", [])
                    for lease in self.leases.values()
                    if lease["agent_id"] != w["agent_id"]
                    and _overlaps(lease["resource"], intent["resource"])
                }
                if not blockers and w.get("blocker_agent_id"):
                    blockers.add(w["blocker_agent_id"])
                found.append(
                    {
                        "agent_id": w["agent_id"],
                        "intents": w.get("intents", []),
                        "waits_for": sorted(blockers),
                        "age": self.agents.get(w["agent_id"], 0),
                    }
                )
        return sorted(found, key=lambda w: w["age"])

    def render(self, url: str) -> Group:
        """The tables: counters, agents, resources with holders and queues, waiters."""
        s = self.stats
        waiters = self.waiters()
        source = "GET /waiters" if self.served is not None else "derived from events"
        counters = Text(
            f"{url}   grants {s.get('grants', 0)}   waits {s.get('waits', 0)}   "
            f"deaths {s.get('deaths', 0)}   expiries {s.get('expiries', 0)}   "
            f"refused stale writes {s.get('causal_violations', 0)}   "
            f"leases {len(self.leases)}   waiting {len(waiters)}",
            style="bold",
        )
        agents = _table("agents (lower age is older)")
        for column in ("agent", "age", "leases"):
            agents.add_column(column)
        held: dict[str, int] = {}
        for lease in self.leases.values():
            held[lease["agent_id"]] = held.get(lease["agent_id"], 0) + 1
        for agent_id, ts in sorted(self.agents.items(), key=lambda item: item[1]):
            agents.add_row(agent_id, str(ts), str(held.get(agent_id, 0)))
        resources = _table("resources")
        for column in ("resource", "held by", "queue (oldest first)"):
            resources.add_column(column)
        slots: dict[str, tuple[list[str], list[str]]] = {}
        for lease in self.leases.values():
            slots.setdefault(lease["resource"], ([], []))[0].append(
                f"{lease['agent_id']} {lease['predicate']} #{lease['token']}"
            )
        for w in waiters:
            for intent in w["intents"]:
                slots.setdefault(intent["resource"], ([], []))[1].append(
                    f"{w['agent_id']} {intent['predicate']}"
                )
        for resource, (holders, queue) in sorted(slots.items()):
            resources.add_row(resource, ", ".join(holders), ", ".join(queue))
        graph = _table(f"wait-for graph ({source})")
        for column in ("waiter", "waits for", "wants"):
            graph.add_column(column)
        for w in waiters:
            wants = ", ".join(f"{i['predicate']} {i['resource']}" for i in w["intents"])
            graph.add_row(w["agent_id"], ", ".join(w["waits_for"]), wants)
        return Group(counters, agents, resources, graph)


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", min_width=len(title))


class _Client:
    def __init__(self, url: str, token: str | None, prog: str) -> None:
        self.prog = prog
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def get(self, path: str) -> Any:
        response = self.http.get(path)
        if response.status_code == 404 and path == "/waiters":
            return None
        body = response.json()
        if response.status_code != 200:
            raise SystemExit(
                f"{self.prog}: {self.url}{path} answered {response.status_code}: "
                f"{body.get('error', body)}"
            )
        return body.get("data", body) if isinstance(body, dict) and "success" in body else body

    def load(self, view: View) -> None:
        for agent in self.get("/agents"):
            view.agents[agent["agent_id"]] = agent["ts"]
        view.leases = {lease["lease_id"]: lease for lease in self.get("/leases")}
        view.stats = self.get("/statistics")
        served = self.get("/waiters")
        view.served = None if served is None else served["waiters"]

    def events(self, after: int) -> Iterator[dict[str, Any] | None]:
        """Events from the server's buffer after ``after``; None marks the start of live ones."""
        with self.http.stream(
            "GET", "/events", params={"after": after}, timeout=httpx.Timeout(None, connect=30)
        ) as stream:
            data: list[str] = []
            for line in stream.iter_lines():
                if line == ": live":
                    yield None
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``klock status`` and ``klock top``."""
    from klock_async.cli import nonempty

    parser.add_argument(
        "--server",
        default=os.environ.get("KLOCK_SERVER_URL") or "http://127.0.0.1:3100",
        help="URL of the klock serve to look at, or the URLs of its replicas separated by "
        "commas (the leader is looked at) (default: $KLOCK_SERVER_URL, else "
        "http://127.0.0.1:3100)",
    )
    parser.add_argument(
        "--token", type=nonempty, default=None, help="its bearer token (default: $KLOCK_TOKEN)"
    )


def run(args: argparse.Namespace) -> int:
    """Print the view once (status) or keep it live until interrupted (top)."""
    token = args.token if args.token is not None else os.environ.get("KLOCK_TOKEN") or None
    try:
        server = first_leader(args.server, token=token)  # among replicas: the leader
    except InvalidRequestError as exc:
        print(
            f"klock {args.command}: --server must be an http(s) URL, or several separated by "
            f"commas ({exc.message})",
            file=sys.stderr,
        )
        return 2
    client = _Client(server, token, f"klock {args.command}")
    view = View()
    try:
        client.load(view)
        events = client.events(after=0)
        if view.served is None:  # derive the waiters from the buffered events
            for event in events:
                if event is None:
                    break
                view.apply(event)
            client.load(view)  # the state again: the events only add the waiters
        if args.command == "status":
            Console().print(view.render(client.url))
            return 0
        return _top(client, view, events)
    except httpx.HTTPError as exc:
        print(f"klock {args.command}: cannot reach {server}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _top(client: _Client, view: View, events: Iterator[dict[str, Any] | None]) -> int:
    refreshed = 0.0
    with Live(view.render(client.url), auto_refresh=False, screen=False) as live:
        live.refresh()
        for event in events:
            if event is not None:
                view.apply(event)
            now = time.monotonic()
            if now - refreshed > 0.25:  # counters and /waiters: at most four times a second
                refreshed = now
                view.stats = client.get("/statistics")
                if view.served is not None:
                    view.served = client.get("/waiters")["waiters"]
            live.update(view.render(client.url), refresh=True)
    print("klock top: the server closed the event stream", file=sys.stderr)
    return 0
