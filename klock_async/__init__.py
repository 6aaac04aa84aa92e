"""klock_async: a coordination kernel for multi-agent AI systems, on asyncio.

Agents declare intents (``MUTATES src/auth.js``, ``CONSUMES DATABASE_TABLE:users``); one
scheduler actor grants, queues or refuses them with Wait-Die timestamp ordering, and vector
clocks catch stale writes that span several tool calls::

    async with Klock() as klock:
        agent = await klock.register_agent("coder")
        async with agent.lease("src/auth.js", "MUTATES") as lease:
            ...
"""

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
from klock_async.events import Event, EventStream
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

__version__ = "0.1.0"

__all__ = [
    "AcquireTimeoutError",
    "Agent",
    "AgentExistsError",
    "AgentInfo",
    "BodyTooLargeError",
    "CausalViolationError",
    "Event",
    "EventStream",
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
