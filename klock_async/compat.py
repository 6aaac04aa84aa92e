"""Blocking, thread-safe drop-ins for the Klock OSS v1 Python SDK: one import line to move.

::

    from klock_async.compat import KlockClient        # was: from klock import KlockClient
    from klock_async.compat import KlockHttpClient    # was: from klock import KlockHttpClient

Both classes keep the v1 surface: ``register_agent(agent_id, priority)``,
``acquire_lease(agent_id, session_id, resource_type, resource_path, predicate, ttl) -> dict``
(ttl in milliseconds), ``release_lease(lease_id) -> bool``, ``heartbeat_lease(lease_id) ->
bool``, ``list_leases()``, ``active_lease_count()``, ``evict_expired()``, ``close()`` and the
context-manager protocol. ``acquire_lease`` never blocks on a conflict: it answers
``{"success": False, "reason": "WAIT" | "DIE", "wait_time": ms}`` and queues nothing (a WAIT
answer withdraws the request; the caller decides when to ask again), exactly as v1 does.

Each client runs an event loop on a daemon thread of its own; every call is handed to that
loop and the calling thread blocks for the answer, so any number of threads may share one
client. :class:`KlockClient` runs the embedded kernel on that loop (coordination within one
process); :class:`KlockHttpClient` runs a :class:`~klock_async.remote.ChannelBackend` there
(coordination through ``klock serve``, over its session channel).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from klock_async.backend import Backend
from klock_async.clocks import IsolationLevel
from klock_async.errors import (
    InvalidTTLError,
    KernelClosedError,
    LeaseDied,
    LeaseNotFoundError,
    LeaseWouldWait,
)
from klock_async.model import Intent, LeaseInfo, Predicate, Resource, ResourceType

__all__ = ["KlockClient", "KlockHttpClient"]

T = TypeVar("T")


def _ms(seconds: float) -> int:
    return round(seconds * 1000.0)


def _lease_dict(info: LeaseInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "lease_id": info.id,
        "agent_id": info.agent_id,
        "session_id": info.session_id,
        "resource": str(info.resource),
        "predicate": info.predicate.value,
        "token": info.token,
        "expires_at": _ms(info.expires_at),
        "state": info.state.value,
    }


class _LoopThread:
    """An event loop on a daemon thread; coroutines are submitted from any other thread."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a blocking klock client was called from its own event loop thread; "
                "use the async API (klock_async.Klock) inside coroutines"
            )
        try:
            future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the loop was closed by close()
            coro.close()
            raise KernelClosedError("this klock client was closed") from None
        return future.result()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class _BlockingClient:
    """The v1 SDK surface over any :class:`~klock_async.backend.Backend`, thread-safe."""

    def __init__(self, make_backend: Callable[[], Backend], name: str) -> None:
        self._runner = _LoopThread(name)
        self._closed = False

        async def start() -> Backend:
            backend = make_backend()
            await backend.start()
            return backend

        try:
            self._backend = self._runner.run(start())
        except BaseException:
            self._runner.stop()
            raise

    def __enter__(self) -> _BlockingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise KernelClosedError("this klock client was closed")
        return self._runner.run(coro)

    def register_agent(self, agent_id: str, priority: int | None = None) -> None:
        """Register an agent; lower ``priority`` is older and wins conflicts (Wait-Die).

        Without a priority the agent gets the next age. Registering again with the same
        priority does nothing.

        Raises:
            InvalidRequestError: empty id or a non-integer priority.
            AgentExistsError: the id is registered already with another priority.
            KernelClosedError: the client was closed.
        """
        self._call(self._backend.register_agent(agent_id, priority))

    def acquire_lease(
        self,
        agent_id: str,
        session_id: str,
        resource_type: str,
        resource_path: str,
        predicate: str,
        ttl: int | float,
    ) -> dict[str, Any]:
        """Try to take a lease now; never waits. ``ttl`` is in milliseconds.

        Returns ``{"success": True, "lease_id", "agent_id", "session_id", "resource",
        "predicate", "token", "expires_at" (ms)}`` when granted, else ``{"success": False,
        "reason": "WAIT" | "DIE", "wait_time" (ms), "blocker_agent_id", "message"}``: WAIT
        when this agent is older than the holder (ask again later), DIE when it is younger
        (release what the session holds first). Nothing stays queued either way.

        Raises:
            InvalidPredicateError: unknown predicate.
            InvalidResourceError: unknown resource type or empty path.
            InvalidTTLError: ``ttl`` is not a positive number.
            UnknownAgentError: the agent was never registered.
            KernelClosedError: the client was closed.
        """
        intent = Intent(
            Resource.of(ResourceType.parse(resource_type), resource_path),
            Predicate.parse(predicate),
        )
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise InvalidTTLError(f"ttl must be a positive number of milliseconds, got {ttl!r}")
        try:
            (info,) = self._call(
                self._backend.acquire(
                    agent_id,
                    session_id,
                    (intent,),
                    ttl=ttl / 1000.0,
                    wait=False,
                    timeout=None,
                    isolation=IsolationLevel.READ_COMMITTED,
                )
            )
        except LeaseWouldWait as verdict:
            return {
                "success": False,
                "reason": "WAIT",
                "wait_time": _ms(verdict.wait_time),
                "blocker_agent_id": verdict.blocker_agent_id,
                "message": verdict.message,
            }
        except LeaseDied as verdict:
            return {
                "success": False,
                "reason": "DIE",
                "wait_time": _ms(verdict.retry_after),
                "blocker_agent_id": verdict.blocker_agent_id,
                "message": verdict.message,
            }
        return {"success": True, **_lease_dict(info)}

    def release_lease(self, lease_id: str) -> bool:
        """Release a lease by id; False when it is not active (released, expired, unknown).

        Raises:
            KernelClosedError: the client was closed.
        """
        try:
            self._call(self._backend.release(lease_id))
        except LeaseNotFoundError:
            return False
        return True

    def heartbeat_lease(self, lease_id: str) -> bool:
        """Push a lease's expiry by its own ttl; False when it is not active any more.

        Raises:
            KernelClosedError: the client was closed.
        """
        try:
            self._call(self._backend.heartbeat(lease_id))
        except LeaseNotFoundError:
            return False
        return True

    def list_leases(self) -> list[dict[str, Any]]:
        """The active leases, oldest token first (``expires_at`` in milliseconds).

        Raises:
            KernelClosedError: the client was closed.
        """
        leases = self._call(self._backend.leases())
        return [_lease_dict(info) for info in sorted(leases, key=lambda lease: lease.token)]

    def active_lease_count(self) -> int:
        """How many leases are active.

        Raises:
            KernelClosedError: the client was closed.
        """
        return len(self._call(self._backend.leases()))

    def evict_expired(self) -> int:
        """Kept for v1 code: this kernel ends leases on their deadline itself, so returns 0.

        Raises:
            KernelClosedError: the client was closed.
        """
        self._call(self._backend.statistics())
        return 0

    def new_session_id(self) -> str:
        """A fresh session id (any string works; one per unit of work)."""
        return uuid.uuid4().hex

    def close(self) -> None:
        """Stop the client's loop thread (the embedded kernel shuts down). Idempotent.

        Call it once no other thread uses the client any more; later calls raise
        :class:`KernelClosedError`.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run(self._backend.aclose())
        finally:
            self._runner.stop()


class KlockClient(_BlockingClient):
    """The embedded kernel behind the Klock v1 ``KlockClient`` surface, blocking and thread-safe.

    The kernel runs on an event loop of its own on a daemon thread; all threads of the process
    that share this client coordinate through it. Call :meth:`close` (or use ``with``) when
    done.
    """

    def __init__(self) -> None:
        from klock_async.scheduler import Scheduler

        super().__init__(Scheduler, "klock-client")

    def __enter__(self) -> KlockClient:
        return self


class KlockHttpClient(_BlockingClient):
    """A ``klock serve`` server behind the Klock v1 ``KlockHttpClient`` surface.

    Blocking and thread-safe: calls run on an event loop on a daemon thread, over one
    persistent session channel (a WebSocket): when this process dies, the server releases
    its leases after its grace period.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:3100``.
        token: the server's bearer token, if it has one (``api_key`` is the v1 name).
        api_key: same as ``token``.
        timeout_ms: how long a request may take before it fails.

    Raises:
        TransportError: the server cannot be reached, or refuses the token.
        InvalidRequestError: a malformed URL or timeout.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:3100",
        token: str | None = None,
        *,
        api_key: str | None = None,
        timeout_ms: int | float = 30_000,
    ) -> None:
        from klock_async.remote import ChannelBackend

        self.base_url = base_url
        secret = token if token is not None else api_key
        super().__init__(
            # A v1 client: agents without a credential, lease ids as capabilities.
            lambda: ChannelBackend(
                base_url, token=secret, timeout=timeout_ms / 1000.0, credentials=False
            ),
            "klock-http-client",
        )

    def __enter__(self) -> KlockHttpClient:
        return self

    def shutdown(self) -> None:
        """Same as :meth:`close` (the v1 name)."""
        self.close()
