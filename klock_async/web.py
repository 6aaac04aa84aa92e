"""The server's routes for looking at the kernel: events, the live page, Prometheus metrics.

- ``GET /events``: the kernel's events as Server-Sent Events (``event:`` is the event name,
  ``id:`` its sequence number, ``data:`` its JSON form). A client resumes with
  ``Last-Event-ID`` (or ``?after=ID``) from what the server still buffers; without either the
  stream starts with the next event. ``?after=0`` replays the whole buffer first; the comment
  line ``: live`` marks the end of the replayed events.
- ``GET /``: the live page (one self-contained HTML file shipped in the package: no CDN, no
  build step). It needs no token to load; with ``--token`` it asks for it once and sends it
  in an ``Authorization`` header, never in a URL.
- ``GET /metrics``: the kernel's counters, the HTTP layer's and the process's, exposed by
  ``prometheus_client`` from a registry of this app's own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from klock_async.errors import InvalidFieldError
from klock_async.events import Event, EventBuffer
from klock_async.model import Statistics

if TYPE_CHECKING:
    from klock_async.server import _HttpMetrics

__all__ = ["Metrics", "events_response", "page_response"]

# A comment line after the replayed backlog: what follows happens live (klock status stops here).
_CAUGHT_UP = b": live\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _resume_point(request: Request) -> int | None:
    """The id after which the stream starts: ``Last-Event-ID``, else ``?after=``, else None."""
    raw = request.headers.get("last-event-id")
    name = "Last-Event-ID"
    if raw is None:
        raw, name = request.query_params.get("after"), "after"
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise InvalidFieldError(
            f"{name} must be the id of an event (a whole number >= 0), got {raw!r}"
        )
    return int(raw)


def _sse(event: Event) -> bytes:
    data = json.dumps(event.as_dict(), separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.name}\ndata: {data}\n\n".encode()


def events_response(request: Request, buffer: EventBuffer) -> Response:
    """``GET /events``: a Server-Sent Events stream of ``buffer`` until the kernel closes.

    Raises:
        InvalidFieldError: ``Last-Event-ID`` or ``after`` is not a whole number.
    """
    after = _resume_point(request)
    backlog = buffer.last_id  # events up to this one were buffered before the request
    stream = buffer.stream(after)

    async def body() -> AsyncIterator[bytes]:
        try:
            # The comment sends the headers at once; retry: how soon a browser reconnects.
            yield b": klock events\nretry: 1000\n\n"
            caught_up = after is None or after >= backlog
            if caught_up:
                yield _CAUGHT_UP
            async for event in stream:
                yield _sse(event)
                if not caught_up and event.id >= backlog:
                    caught_up = True
                    yield _CAUGHT_UP
        finally:
            await stream.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)


def page_response() -> Response:
    """``GET /``: the live page."""
    html = resources.files("klock_async").joinpath("static/index.html").read_bytes()
    return Response(
        html,
        media_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-cache",
            # Everything the page needs is inline; it talks only to this server.
            "Content-Security-Policy": (
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src 'self' data:"
            ),
        },
    )


# --------------------------------------------------------------------------------------------
# Metrics


_KERNEL_GAUGES: Sequence[tuple[str, str, str]] = (
    ("agents", "klock_agents", "Registered agents."),
    ("leases_active", "klock_leases_active", "Active leases."),
    ("requests_waiting", "klock_requests_waiting", "Requests queued (WAIT)."),
)
_KERNEL_COUNTERS: Sequence[tuple[str, str, str]] = (
    ("grants", "klock_grants", "Requests granted."),
    ("waits", "klock_waits", "Requests that had to wait."),
    ("deaths", "klock_deaths", "Requests refused by Wait-Die."),
    ("releases", "klock_releases", "Leases released."),
    ("expiries", "klock_expiries", "Leases expired."),
    ("revocations", "klock_revocations", "Leases revoked."),
    ("causal_violations", "klock_causal_violations", "Writes refused as stale (strict)."),
    ("batches", "klock_batches", "Mailbox batches handled."),
    ("messages", "klock_messages", "Messages handled."),
)


class _KernelCollector(Collector):
    """The kernel's and the HTTP layer's figures, from the snapshot taken for this scrape."""

    def __init__(self, http: _HttpMetrics, buckets: Sequence[float]) -> None:
        self._http = http
        self._buckets = buckets
        self.snapshot: tuple[Statistics, int, EventBuffer | None] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.snapshot is None:
            return
        stats, conflicts, events = self.snapshot
        for field, name, text in _KERNEL_GAUGES:
            yield GaugeMetricFamily(name, text, value=getattr(stats, field))
        yield GaugeMetricFamily(
            "klock_long_polls", "HTTP long-polls pending.", value=self._http.long_polls
        )
        for field, name, text in _KERNEL_COUNTERS:
            yield CounterMetricFamily(name, text, value=getattr(stats, field))
        yield CounterMetricFamily(
            "klock_clock_conflicts", "Stale writes let through (non-strict).", value=conflicts
        )
        if events is not None:
            yield CounterMetricFamily(
                "klock_events_dropped",
                "Events pushed out of the event buffer by newer ones.",
                value=events.dropped,
            )
        yield from self._http_metrics()

    def _http_metrics(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "klock_http_requests",
            "HTTP requests answered.",
            labels=("method", "route", "status"),
        )
        for (method, route, status), count in sorted(self._http.requests.items()):
            requests.add_metric((method, route, str(status)), count)
        yield requests
        latency = HistogramMetricFamily(
            "klock_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            labels=("method", "route"),
        )
        for (method, route), hist in sorted(self._http.latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self._buckets, hist.counts, strict=False):
                cumulative += count
                buckets.append((repr(bound), float(cumulative)))
            buckets.append(("+Inf", float(hist.count)))
            latency.add_metric((method, route), buckets, hist.total)
        yield latency


class Metrics:
    """A Prometheus registry of one app: kernel, HTTP and process metrics.

    Args:
        http: the HTTP layer's request counts and latencies.
        buckets: the upper bounds of the latency histogram's buckets (seconds).
    """

    def __init__(self, http: _HttpMetrics, buckets: Sequence[float]) -> None:
        self.registry = CollectorRegistry()
        self._kernel = _KernelCollector(http, buckets)
        self.registry.register(self._kernel)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def response(
        self, stats: Statistics, conflicts: int, events: EventBuffer | None = None
    ) -> Response:
        """The exposition of every metric, the kernel's from this snapshot."""
        self._kernel.snapshot = (stats, conflicts, events)
        try:
            body = generate_latest(self.registry)
        finally:
            self._kernel.snapshot = None
        return Response(body, media_type=CONTENT_TYPE_LATEST)
