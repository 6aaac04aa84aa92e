"""Shared fixtures: kernels to run the behaviour scenarios against, and ordering helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from klock_async import Klock
from klock_async.model import Statistics

KernelFactory = Callable[..., contextlib.AbstractAsyncContextManager[Klock]]
"""Called with ``Klock`` keyword arguments (e.g. ``default_ttl``); entering it yields a running
``Klock``; leaving it shuts the kernel (and whatever serves it) down."""


@contextlib.asynccontextmanager
async def _embedded(**options: Any) -> AsyncIterator[Klock]:
    async with Klock(**options) as klock:
        yield klock


# Each kernel the scenarios in test_scenarios.py run against. To add a variant (e.g. "remote":
# a real server on a free loopback port and Klock.connect(url)), add its name to the params
# and a branch below returning an async context manager factory of an entered Klock.
@pytest.fixture(params=["embedded", "remote", "channel"])
def kernel_factory(request: pytest.FixtureRequest) -> KernelFactory:
    """A factory of running kernels: ``async with kernel_factory() as klock: ...``."""
    if request.param == "embedded":
        return _embedded
    if request.param == "remote":  # a real uvicorn on a free loopback port, Klock.connect
        from serverutil import remote_kernel

        return remote_kernel
    if request.param == "channel":  # the same server, over the session channel
        from serverutil import channel_kernel

        return channel_kernel
    raise AssertionError(f"unknown kernel variant {request.param!r}")  # pragma: no cover


@pytest.fixture
def settle() -> Callable[[Klock], Awaitable[Statistics]]:
    """``await settle(klock)``: statistics answered after every ready task posted its message.

    Tasks run in the order they were scheduled, so a task created after them posts its query
    after their requests, and the actor answers messages in order: when the statistics come
    back, every request those tasks sent has been decided (granted, queued or refused). No
    sleeping. A backend whose transport does not keep that order (HTTP) offers ``barrier()``,
    which waits until the scheduler has decided every request it sent, then answers the same.
    """

    async def settle(klock: Klock) -> Statistics:
        barrier = getattr(klock.backend, "barrier", None)
        if barrier is None:
            return await asyncio.create_task(klock.statistics())
        result: Statistics = await asyncio.create_task(barrier())
        return result

    return settle


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Any]:
    """One throw-away PostgreSQL cluster for the whole run (see tests/pgutil.py)."""
    from pgutil import REQUIRED, cluster

    with cluster() as server:
        if server is None:
            if REQUIRED:
                pytest.fail("KLOCK_REQUIRE_POSTGRES=1 but no PostgreSQL binaries (pg_ctl) found")
            pytest.skip("no PostgreSQL binaries (pg_ctl); install Debian's postgresql")
        yield server


@pytest.fixture
def pg_url(postgres_cluster: Any) -> str:
    """The URL of a new, empty database in the test cluster."""
    url: str = postgres_cluster.create_database()
    return url
