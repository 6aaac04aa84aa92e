"""klock_async: a coordination kernel for multi-agent AI systems, on asyncio.

Agents declare intents (``MUTATES src/auth.js``, ``CONSUMES DATABASE_TABLE:users``); one
scheduler actor grants, queues or refuses them with Wait-Die timestamp ordering, and vector
clocks catch stale writes that span several tool calls::

    async with Klock() as klock:
        agent = await klock.register_agent("coder")
        async with agent.lease("src/auth.js", "MUTATES") as lease:
            ...

Names are imported on first use (PEP 562), so a program that needs one corner of the package
(the ``klock hook`` command runs on every tool call of a coding agent) does not pay for the
rest: ``import klock_async`` itself loads nothing.
"""

import importlib as _importlib

TYPE_CHECKING = False  # what typing.TYPE_CHECKING is, without importing typing (10 ms)
if TYPE_CHECKING:
    from klock_async.api import Agent, Klock, Lease, LeaseBlock, RetryPolicy, Session
    from klock_async.clocks import IsolationLevel, VectorClock, VectorClockManager
    from klock_async.errors import (
        AcquireTimeoutError,
        AgentExistsError,
        BodyTooLargeError,
        CausalViolationError,
        EvictedError,
        InvalidFieldError,
        InvalidPredicateError,
        InvalidRequestError,
        InvalidResourceError,
        InvalidTTLError,
        KernelClosedError,
        KlockError,
        LeaseDied,
        LeaseError,
        LeaseLostError,
        LeaseNotFoundError,
        LeaseWouldWait,
        MalformedJSONError,
        MissingFieldError,
        NotLeaseOwnerError,
        RetriesExhaustedError,
        TransportError,
        UnauthorizedError,
        UnknownAgentError,
    )
    from klock_async.model import (
        AgentInfo,
        Intent,
        LeaseInfo,
        LeaseState,
        Predicate,
        Resource,
        ResourceType,
        Statistics,
    )

del TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "AcquireTimeoutError",
    "Agent",
    "AgentExistsError",
    "AgentInfo",
    "BodyTooLargeError",
    "CausalViolationError",
    "EvictedError",
    "Intent",
    "InvalidFieldError",
    "InvalidPredicateError",
    "InvalidRequestError",
    "InvalidResourceError",
    "InvalidTTLError",
    "IsolationLevel",
    "KernelClosedError",
    "Klock",
    "KlockError",
    "Lease",
    "LeaseBlock",
    "LeaseDied",
    "LeaseError",
    "LeaseInfo",
    "LeaseLostError",
    "LeaseNotFoundError",
    "LeaseState",
    "LeaseWouldWait",
    "MalformedJSONError",
    "MissingFieldError",
    "NotLeaseOwnerError",
    "Predicate",
    "Resource",
    "ResourceType",
    "RetriesExhaustedError",
    "RetryPolicy",
    "Session",
    "Statistics",
    "TransportError",
    "UnauthorizedError",
    "UnknownAgentError",
    "VectorClock",
    "VectorClockManager",
    "__version__",
]

# name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AcquireTimeoutError": "klock_async.errors",
    "Agent": "klock_async.api",
    "AgentExistsError": "klock_async.errors",
    "AgentInfo": "klock_async.model",
    "BodyTooLargeError": "klock_async.errors",
    "CausalViolationError": "klock_async.errors",
    "EvictedError": "klock_async.errors",
    "Intent": "klock_async.model",
    "InvalidFieldError": "klock_async.errors",
    "InvalidPredicateError": "klock_async.errors",
    "InvalidRequestError": "klock_async.errors",
    "InvalidResourceError": "klock_async.errors",
    "InvalidTTLError": "klock_async.errors",
    "IsolationLevel": "klock_async.clocks",
    "KernelClosedError": "klock_async.errors",
    "Klock": "klock_async.api",
    "KlockError": "klock_async.errors",
    "Lease": "klock_async.api",
    "LeaseBlock": "klock_async.api",
    "LeaseDied": "klock_async.errors",
    "LeaseError": "klock_async.errors",
    "LeaseInfo": "klock_async.model",
    "LeaseLostError": "klock_async.errors",
    "LeaseNotFoundError": "klock_async.errors",
    "LeaseState": "klock_async.model",
    "LeaseWouldWait": "klock_async.errors",
    "MalformedJSONError": "klock_async.errors",
    "MissingFieldError": "klock_async.errors",
    "NotLeaseOwnerError": "klock_async.errors",
    "Predicate": "klock_async.model",
    "Resource": "klock_async.model",
    "ResourceType": "klock_async.model",
    "RetriesExhaustedError": "klock_async.errors",
    "RetryPolicy": "klock_async.api",
    "Session": "klock_async.api",
    "Statistics": "klock_async.model",
    "TransportError": "klock_async.errors",
    "UnauthorizedError": "klock_async.errors",
    "UnknownAgentError": "klock_async.errors",
    "VectorClock": "klock_async.clocks",
    "VectorClockManager": "klock_async.clocks",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'klock_async' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
