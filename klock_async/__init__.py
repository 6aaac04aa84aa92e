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
    from klock_async.api import (
        Agent,
        Klock,
        Lease,
        LeaseBlock,
        RetryPolicy,
        Session,
    )
    from klock_async.clocks import (
        IsolationLevel,
        VectorClock,
        VectorClockManager,
    )
    from klock_async.errors import (
        AcquireTimeoutError,
        AgentExistsError,
        BodyTooLargeError,
        CausalViolationError,
        ClientGoneError,
        CredentialRequiredError,
        EvictedError,
        ForeignAgentError,
        HostNotAllowedError,
        IdentityError,
        InvalidCredentialError,
        InvalidFieldError,
        InvalidIsolationError,
        InvalidPredicateError,
        InvalidRequestError,
        InvalidResourceError,
        InvalidTTLError,
        JournalError,
        JournalUnavailableError,
        KernelClosedError,
        KlockError,
        LeadershipLostError,
        LeaseDied,
        LeaseError,
        LeaseLostError,
        LeaseNotFoundError,
        LeaseWouldWait,
        MalformedJSONError,
        MissingFieldError,
        NotLeaderError,
        NotLeaseOwnerError,
        NotYourAgentError,
        OperatorRequiredError,
        OriginNotAllowedError,
        RequestKeyReusedError,
        RequestSupersededError,
        RetriesExhaustedError,
        StrictIdentityError,
        TransportError,
        UnauthorizedError,
        UnknownAgentError,
        UnsupportedMediaTypeError,
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
        WaiterInfo,
        WaitFor,
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
    "ClientGoneError",
    "CredentialRequiredError",
    "Event",
    "EventStream",
    "EvictedError",
    "ForeignAgentError",
    "HostNotAllowedError",
    "IdentityError",
    "Intent",
    "InvalidCredentialError",
    "InvalidFieldError",
    "InvalidIsolationError",
    "InvalidPredicateError",
    "InvalidRequestError",
    "InvalidResourceError",
    "InvalidTTLError",
    "IsolationLevel",
    "JournalError",
    "JournalUnavailableError",
    "KernelClosedError",
    "Klock",
    "KlockError",
    "LeadershipLostError",
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
    "NotLeaderError",
    "NotLeaseOwnerError",
    "NotYourAgentError",
    "OperatorRequiredError",
    "OriginNotAllowedError",
    "Predicate",
    "RequestKeyReusedError",
    "RequestSupersededError",
    "Resource",
    "ResourceType",
    "RetriesExhaustedError",
    "RetryPolicy",
    "Session",
    "Statistics",
    "StrictIdentityError",
    "TransportError",
    "UnauthorizedError",
    "UnknownAgentError",
    "UnsupportedMediaTypeError",
    "VectorClock",
    "VectorClockManager",
    "WaitFor",
    "WaiterInfo",
    "__version__",
]
_EXPORTS: dict[str, str] = {
    "Agent": "klock_async.api",
    "Klock": "klock_async.api",
    "Lease": "klock_async.api",
    "LeaseBlock": "klock_async.api",
    "RetryPolicy": "klock_async.api",
    "Session": "klock_async.api",
    "IsolationLevel": "klock_async.clocks",
    "VectorClock": "klock_async.clocks",
    "VectorClockManager": "klock_async.clocks",
    "AcquireTimeoutError": "klock_async.errors",
    "AgentExistsError": "klock_async.errors",
    "BodyTooLargeError": "klock_async.errors",
    "CausalViolationError": "klock_async.errors",
    "ClientGoneError": "klock_async.errors",
    "Event": "klock_async.events",
    "EventStream": "klock_async.events",
    "EvictedError": "klock_async.errors",
    "ForeignAgentError": "klock_async.errors",
    "HostNotAllowedError": "klock_async.errors",
    "InvalidFieldError": "klock_async.errors",
    "InvalidIsolationError": "klock_async.errors",
    "InvalidPredicateError": "klock_async.errors",
    "InvalidRequestError": "klock_async.errors",
    "InvalidResourceError": "klock_async.errors",
    "InvalidTTLError": "klock_async.errors",
    "JournalError": "klock_async.errors",
    "JournalUnavailableError": "klock_async.errors",
    "KernelClosedError": "klock_async.errors",
    "KlockError": "klock_async.errors",
    "LeadershipLostError": "klock_async.errors",
    "LeaseDied": "klock_async.errors",
    "LeaseError": "klock_async.errors",
    "LeaseLostError": "klock_async.errors",
    "LeaseNotFoundError": "klock_async.errors",
    "LeaseWouldWait": "klock_async.errors",
    "MalformedJSONError": "klock_async.errors",
    "MissingFieldError": "klock_async.errors",
    "NotLeaderError": "klock_async.errors",
    "NotLeaseOwnerError": "klock_async.errors",
    "OriginNotAllowedError": "klock_async.errors",
    "RequestKeyReusedError": "klock_async.errors",
    "RequestSupersededError": "klock_async.errors",
    "RetriesExhaustedError": "klock_async.errors",
    "TransportError": "klock_async.errors",
    "UnauthorizedError": "klock_async.errors",
    "UnknownAgentError": "klock_async.errors",
    "UnsupportedMediaTypeError": "klock_async.errors",
    "CredentialRequiredError": "klock_async.errors",
    "IdentityError": "klock_async.errors",
    "InvalidCredentialError": "klock_async.errors",
    "NotYourAgentError": "klock_async.errors",
    "OperatorRequiredError": "klock_async.errors",
    "StrictIdentityError": "klock_async.errors",
    "AgentInfo": "klock_async.model",
    "Intent": "klock_async.model",
    "LeaseInfo": "klock_async.model",
    "LeaseState": "klock_async.model",
    "Predicate": "klock_async.model",
    "Resource": "klock_async.model",
    "ResourceType": "klock_async.model",
    "Statistics": "klock_async.model",
    "WaitFor": "klock_async.model",
    "WaiterInfo": "klock_async.model",
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
