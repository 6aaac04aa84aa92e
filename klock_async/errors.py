"""Errors raised by klock_async.

Our exception hierarchy::

    KlockError
    ├── InvalidRequestError            bad input; nothing changed (also a ValueError)
    │   ├── InvalidPredicateError
    │   ├── InvalidResourceError
    │   ├── InvalidTTLError
    │   ├── InvalidIsolationError      unknown isolation level
    │   ├── MalformedJSONError         (HTTP) the body is not a JSON object
    │   ├── MissingFieldError          (HTTP) a required field is absent
    │   ├── InvalidFieldError          (HTTP) a field has the wrong type or value
    │   ├── BodyTooLargeError          (HTTP) the body exceeds the server's limit
    │   ├── UnsupportedMediaTypeError  (HTTP) a body that is not ``application/json``
    │   ├── HostNotAllowedError        (HTTP) a ``Host`` the server does not serve
    │   ├── OriginNotAllowedError      (HTTP) a request from a foreign web page (``Origin``)
    │   └── RequestKeyReusedError      an acquire's request key names another request
    ├── UnknownAgentError              the agent id was never registered
    ├── AgentExistsError               registering an id again with another priority
    ├── LeaseError
    │   ├── LeaseNotFoundError         no such lease, or it is no longer active
    │   ├── NotLeaseOwnerError         the lease belongs to another agent
    │   └── LeaseLostError             a held lease expired or was revoked
    ├── LeaseDied                      Wait-Die refused the request (retry keeps your age)
    │   └── RetriesExhaustedError      a protected call died more often than allowed
    ├── LeaseWouldWait                 acquire(wait=False) would have had to queue
    ├── AcquireTimeoutError            the wait ran out; nothing is held (also a TimeoutError)
    ├── CausalViolationError           a write would overwrite a version never read
    ├── EvictedError                   the agent was evicted while its request waited
    ├── RequestSupersededError         a resend of a queued acquire (same key) took its place
    ├── ClientGoneError                a client session outlived its grace period
    ├── ForeignAgentError              the agent belongs to another client session
    ├── KernelClosedError              the kernel shut down before answering
    ├── JournalUnavailableError        the journal could not record a request (busy)
    ├── JournalError                   a journal file that cannot be used as it is
    │   └── LeadershipLostError        another replica took over; this one commits nothing
    ├── IdentityError                  (HTTP) may not act for this agent; nothing changed
    │   ├── CredentialRequiredError    the agent has a credential; the request carries none
    │   ├── InvalidCredentialError     the credential belongs to no agent
    │   ├── NotYourAgentError          the credential belongs to another agent
    │   ├── OperatorRequiredError      an operator action without the operator token
    │   └── StrictIdentityError        a strict server refuses agents without a credential
    └── TransportError                 the coordination server could not be reached
        ├── UnauthorizedError          (HTTP) no valid bearer token
        └── NotLeaderError             (HTTP) this replica does not lead; names the leader

Every error has a stable ``code`` (used in the HTTP API) and a message that says what happened
and what to do next.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "AcquireTimeoutError",
    "AgentExistsError",
    "BodyTooLargeError",
    "CausalViolationError",
    "ClientGoneError",
    "CredentialRequiredError",
    "EvictedError",
    "ForeignAgentError",
    "HostNotAllowedError",
    "IdentityError",
    "InvalidCredentialError",
    "InvalidFieldError",
    "InvalidIsolationError",
    "InvalidPredicateError",
    "InvalidRequestError",
    "InvalidResourceError",
    "InvalidTTLError",
    "JournalError",
    "JournalUnavailableError",
    "KernelClosedError",
    "KlockError",
    "LeadershipLostError",
    "LeaseDied",
    "LeaseError",
    "LeaseLostError",
    "LeaseNotFoundError",
    "LeaseWouldWait",
    "MalformedJSONError",
    "MissingFieldError",
    "NotLeaderError",
    "NotLeaseOwnerError",
    "NotYourAgentError",
    "OperatorRequiredError",
    "OriginNotAllowedError",
    "RequestKeyReusedError",
    "RequestSupersededError",
    "RetriesExhaustedError",
    "StrictIdentityError",
    "TransportError",
    "UnauthorizedError",
    "UnknownAgentError",
    "UnsupportedMediaTypeError",
    "error_from_payload",
]


class KlockError(Exception):
    """Base class of every klock_async error."""

    code: ClassVar[str] = "klock_error"
    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> dict[str, Any]:
        """Machine-readable fields of this error (JSON-safe)."""
        return {}

    def to_payload(self) -> dict[str, Any]:
        """The JSON form used by the HTTP API."""
        return {"code": self.code, "message": self.message, **self.details()}


class InvalidRequestError(KlockError, ValueError):
    """The request is malformed; nothing was changed."""

    code = "invalid_request"
    status = 400


class InvalidPredicateError(InvalidRequestError):
    """Unknown predicate name."""

    code = "invalid_predicate"


class InvalidResourceError(InvalidRequestError):
    """Unknown resource type, empty path or otherwise unusable resource."""

    code = "invalid_resource"


class InvalidTTLError(InvalidRequestError):
    """The ttl is not a positive number."""

    code = "invalid_ttl"


class InvalidIsolationError(InvalidRequestError):
    """Unknown isolation level name (on every surface: sessions, decorators, HTTP, LangChain)."""

    code = "invalid_isolation"


class UnknownAgentError(KlockError, LookupError):
    """The agent id was never registered."""

    code = "unknown_agent"
    status = 404


class AgentExistsError(KlockError):
    """An agent id is registered already with another priority."""

    code = "agent_exists"
    status = 409


class LeaseError(KlockError):
    """Base class of errors about one lease."""

    code = "lease_error"
    status = 409


class LeaseNotFoundError(LeaseError, LookupError):
    """No active lease has this id (never granted, released, expired or revoked)."""

    code = "lease_not_found"
    status = 404


class NotLeaseOwnerError(LeaseError):
    """The lease belongs to another agent."""

    code = "not_lease_owner"
    status = 403


class LeaseLostError(LeaseError):
    """A lease ended (expired or revoked) while its holder was still working under it.

    Whatever the holder did after the loss was not protected: re-read and redo the work.
    """

    code = "lease_lost"

    def __init__(self, message: str, *, lease_id: str, state: str) -> None:
        super().__init__(message)
        self.lease_id = lease_id
        self.state = state

    def details(self) -> dict[str, Any]:
        return {"lease_id": self.lease_id, "state": self.state}


class LeaseDied(KlockError):
    """Wait-Die refused the request: an older agent holds or awaits a conflicting intent.

    Nothing of the request is held. Retry later with the same agent: its age is kept, so it
    becomes the oldest eventually and cannot starve. ``blocker_lease_id`` names the lease to
    wait for when the blocker is a holder (None when it is a queued request).
    """

    code = "lease_died"
    status = 409

    def __init__(
        self,
        message: str,
        *,
        agent_id: str,
        resource: str,
        predicate: str,
        blocker_agent_id: str,
        blocker_lease_id: str | None,
        retry_after: float,
    ) -> None:
        super().__init__(message)
        self.agent_id = agent_id
        self.resource = resource
        self.predicate = predicate
        self.blocker_agent_id = blocker_agent_id
        self.blocker_lease_id = blocker_lease_id
        self.retry_after = retry_after

    def details(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "resource": self.resource,
            "predicate": self.predicate,
            "blocker_agent_id": self.blocker_agent_id,
            "blocker_lease_id": self.blocker_lease_id,
            "retry_after_ms": round(self.retry_after * 1000),
        }


class RetriesExhaustedError(LeaseDied):
    """A protected call kept dying and ran out of retries."""

    code = "retries_exhausted"


class LeaseWouldWait(KlockError):
    """``acquire(wait=False)`` found an older conflicting holder; nothing was queued."""

    code = "lease_would_wait"
    status = 409

    def __init__(
        self, message: str, *, agent_id: str, resource: str, blocker_agent_id: str, wait_time: float
    ) -> None:
        super().__init__(message)
        self.agent_id = agent_id
        self.resource = resource
        self.blocker_agent_id = blocker_agent_id
        self.wait_time = wait_time

    def details(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "resource": self.resource,
            "blocker_agent_id": self.blocker_agent_id,
            "wait_time_ms": round(self.wait_time * 1000),
        }


class AcquireTimeoutError(KlockError, TimeoutError):
    """The request waited longer than its timeout and was withdrawn; nothing is held."""

    code = "acquire_timeout"
    status = 408


class CausalViolationError(KlockError):
    """A write would overwrite a version of ``path`` that the writing session never read.

    Read the path again (in the same session), redo the change, then write. ``path`` is the
    path written, or the path below it whose newer version was never read; ``seen_version``
    is the version of it the session read (0: never) and ``version`` the latest one.
    ``agent_clock`` and ``path_clock`` are the vector clocks, for ordering.
    """

    code = "causal_violation"
    status = 409

    def __init__(
        self,
        message: str,
        *,
        path: str,
        agent_id: str,
        agent_clock: Mapping[str, int],
        path_clock: Mapping[str, int],
        session_id: str | None = None,
        seen_version: int = 0,
        version: int = 0,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.agent_id = agent_id
        self.agent_clock = dict(agent_clock)
        self.path_clock = dict(path_clock)
        self.session_id = session_id
        self.seen_version = seen_version
        self.version = version

    def details(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "agent_id": self.agent_id,
            "agent_clock": self.agent_clock,
            "path_clock": self.path_clock,
            "session_id": self.session_id,
            "seen_version": self.seen_version,
            "version": self.version,
        }


class EvictedError(KlockError):
    """The agent was evicted (its leases revoked) while this request waited; nothing is held."""

    code = "evicted"
    status = 409


class ClientGoneError(KlockError):
    """The client session was gone longer than its grace period: its requests were withdrawn
    and its leases released; a resume of it is refused."""

    code = "client_gone"
    status = 410


class ForeignAgentError(KlockError):
    """The agent was registered by another client session; only that one may act for it."""

    code = "foreign_agent"
    status = 403


class RequestSupersededError(KlockError):
    """A resend of a queued acquire (the same request key) took its place in the queue.

    Answered to the earlier call only: the resend waits in its place and gets the grant.
    """

    code = "request_superseded"
    status = 409


class KernelClosedError(KlockError):
    """The kernel shut down (or was not started) before it could answer."""

    code = "kernel_closed"
    status = 503


class JournalError(KlockError):
    """A journal file that cannot be used as it is (empty, foreign, damaged, a partial copy).

    Nothing was read from it or written to it; the message names the file and the row.
    """

    code = "journal_error"
    status = 500


class LeadershipLostError(JournalError):
    """Another replica raised the leader term: this one must not commit, answer or grant.

    Its last batch was not written and nothing of it was granted; the replica steps down.
    """

    code = "leadership_lost"
    status = 503


class JournalUnavailableError(KlockError):
    """The journal could not record a batch (its file was locked); nothing of it was granted.

    The kernel keeps running: retry the request.
    """

    code = "journal_unavailable"
    status = 503


class TransportError(KlockError):
    """The coordination server could not be reached or answered nonsense."""

    code = "transport_error"
    status = 502


class UnauthorizedError(TransportError):
    """The request carries no valid ``Authorization: Bearer <token>`` header."""

    code = "unauthorized"
    status = 401


class NotLeaderError(TransportError):
    """This replica does not lead; ``leader`` is the URL of the one that does, if known.

    Nothing of the request was done: send it to the leader (clients given several server
    URLs do that by themselves).
    """

    code = "not_leader"
    status = 503

    def __init__(self, message: str, *, leader: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader

    def details(self) -> dict[str, Any]:
        """The leader's URL (None while no replica leads)."""
        return {"leader": self.leader}


class MalformedJSONError(InvalidRequestError):
    """The body is not a JSON object."""

    code = "malformed_json"


class MissingFieldError(InvalidRequestError):
    """A required field is absent."""

    code = "missing_field"


class InvalidFieldError(InvalidRequestError):
    """A field has the wrong type or an unusable value."""

    code = "invalid_field"


class BodyTooLargeError(InvalidRequestError):
    """The body is larger than the server accepts."""

    code = "body_too_large"
    status = 413


class UnsupportedMediaTypeError(InvalidRequestError):
    """The body is not declared as ``Content-Type: application/json``."""

    code = "unsupported_media_type"
    status = 415


class HostNotAllowedError(InvalidRequestError):
    """The ``Host`` header names a host the server does not serve (DNS rebinding guard)."""

    code = "host_not_allowed"
    status = 421


class OriginNotAllowedError(InvalidRequestError):
    """The request comes from a web page of another origin (``Origin`` header)."""

    code = "origin_not_allowed"
    status = 403


class RequestKeyReusedError(InvalidRequestError):
    """An acquire's request key names a request of other intents, or of another session.

    A request key identifies one acquire and its resends; choose a new one for each acquire.
    """

    code = "request_key_reused"
    status = 409


class IdentityError(KlockError):
    """The request may not act for this agent (or as the operator); nothing changed.

    Agents registered with a credential are acted for only by requests that carry it
    (``Klock-Credential`` header); operator actions need the operator token
    (``Klock-Operator-Token`` header). See the threat model in docs/server.md.
    """

    code = "identity_error"
    status = 403


class CredentialRequiredError(IdentityError):
    """The agent was registered with a credential and the request carries none."""

    code = "credential_required"
    status = 401


class InvalidCredentialError(IdentityError):
    """The request's credential belongs to no agent (mistyped, or its agent was retired)."""

    code = "invalid_credential"
    status = 401


class NotYourAgentError(IdentityError):
    """The request's credential belongs to another agent than the one it acts for."""

    code = "not_your_agent"


class OperatorRequiredError(IdentityError):
    """An operator action (revoke, evict, an explicit priority, another agent's session)
    without the server's operator token, or with a wrong one."""

    code = "operator_required"


class StrictIdentityError(IdentityError):
    """A server started with ``--strict-identity`` refuses agents without a credential."""

    code = "credential_not_requested"


_BY_CODE: dict[str, type[KlockError]] = {}


def _collect(cls: type[KlockError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _collect(sub)


_collect(KlockError)


def error_from_payload(payload: Mapping[str, Any]) -> KlockError:
    """Rebuild the typed error that an HTTP error payload describes.

    Unknown codes become a plain :class:`KlockError` carrying the message.
    """
    code = str(payload.get("code", "klock_error"))
    message = str(payload.get("message", "unknown error"))
    cls = _BY_CODE.get(code, KlockError)
    fields = {k: v for k, v in payload.items() if k not in ("code", "message")}
    # Durations travel as whole milliseconds (``retry_after_ms``); the errors take seconds.
    for key in [k for k, v in fields.items() if k.endswith("_ms") and isinstance(v, int | float)]:
        fields[key.removesuffix("_ms")] = fields.pop(key) / 1000.0
    try:
        return cls(message, **fields)
    except TypeError:
        return KlockError(message) if cls.__init__ is not KlockError.__init__ else cls(message)
