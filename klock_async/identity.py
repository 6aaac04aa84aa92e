"""Who may act for an agent: credentials, the operator token and the rules (pure, no I/O).

An agent registered with a request for a credential gets a secret once; the server keeps only
its SHA-256 digest. From then on a request acts for that agent only when it carries the secret
(``Klock-Credential`` header), whatever ``agent_id`` it names. Operator actions (revoke,
evict, an explicit priority, acting on another agent's leases or session) need the operator
token (``Klock-Operator-Token`` header), a secret distinct from the agents' bearer token.
Agents registered without a credential (Klock v1 clients) keep the v1 rules: whoever holds the
bearer token may act for them, unless the server is strict.

The secrets are 256-bit random strings, so one unsalted SHA-256 is enough to store them: nobody
can search that space, and a fast digest keeps every request cheap. Digests are compared with
:func:`hmac.compare_digest`. The server calls :class:`Identities` from its event loop only.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from klock_async.errors import (
    CredentialRequiredError,
    InvalidCredentialError,
    NotYourAgentError,
    OperatorRequiredError,
    StrictIdentityError,
)

__all__ = [
    "ANONYMOUS",
    "CREDENTIAL_HEADER",
    "OPERATOR_HEADER",
    "Action",
    "Caller",
    "Identities",
    "digest",
    "new_credential",
]

CREDENTIAL_HEADER = "klock-credential"
"""The header that carries an agent's credential."""
OPERATOR_HEADER = "klock-operator-token"
"""The header that carries the operator token."""
_PREFIX = "kc_"


def new_credential() -> str:
    """A fresh agent credential: ``kc_`` and 43 URL-safe characters (256 random bits)."""
    return _PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """The stored form of a credential or token (hex SHA-256)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class Action(enum.Enum):
    """What a request does for an agent."""

    ACQUIRE = "acquire"
    RELEASE = "release"
    HEARTBEAT = "heartbeat"
    SESSION_RELEASE = "release a session of"
    CLOCK = "use the clocks of"
    REVOKE = "revoke a lease of"
    EVICT = "evict"


_OPERATOR_MAY = frozenset((Action.RELEASE, Action.SESSION_RELEASE, Action.REVOKE, Action.EVICT))
"""What the operator may do for any agent."""
_OPERATOR_ONLY = frozenset((Action.REVOKE, Action.EVICT))
"""What needs the operator token whenever the server has one."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: the agent its credential belongs to, and whether it is the operator."""

    agent_id: str | None = None
    operator: bool = False


ANONYMOUS = Caller()


class Identities:
    """The credential digests of the agents, and who may do what.

    Args:
        operator_token: the operator's secret; None: no operator (revoke and evict then act
            only on agents without a credential, or on a caller's own leases).
        strict: refuse agents without a credential (``klock serve --strict-identity``).
        digests: agent id -> credential digest, as stored by a previous run.
    """

    def __init__(
        self,
        *,
        operator_token: str | None = None,
        strict: bool = False,
        digests: Mapping[str, str] | None = None,
    ) -> None:
        if operator_token is not None and not operator_token:
            raise ValueError("an empty operator token would make anyone the operator")
        self._operator = None if operator_token is None else digest(operator_token)
        self.strict = strict
        self._digests: dict[str, str] = {}
        self._agents: dict[str, str] = {}  # digest -> agent id
        for agent_id, stored in (digests or {}).items():
            self.add(agent_id, stored)

    @property
    def has_operator(self) -> bool:
        """Whether the server has an operator token."""
        return self._operator is not None

    @property
    def checks_leases(self) -> bool:
        """Whether a request without a credential must be checked against a lease's holder
        (some agent has a credential, or the server is strict)."""
        return self.strict or bool(self._digests)

    @property
    def count(self) -> int:
        """How many agents have a credential."""
        return len(self._digests)

    def credentialed(self, agent_id: str) -> bool:
        """Whether ``agent_id`` was registered with a credential."""
        return agent_id in self._digests

    def add(self, agent_id: str, stored: str) -> None:
        """Record the credential digest of ``agent_id`` (a new one, or one loaded)."""
        old = self._digests.get(agent_id)
        if old is not None:
            self._agents.pop(old, None)
        self._digests[agent_id] = stored
        self._agents[stored] = agent_id

    def forget(self, agent_ids: Iterable[str]) -> None:
        """Drop the credentials of retired agents (their ids are free again)."""
        for agent_id in agent_ids:
            stored = self._digests.pop(agent_id, None)
            if stored is not None:
                self._agents.pop(stored, None)

    # ------------------------------------------------------------------ who is asking

    def caller(self, credential: str | None, operator_token: str | None) -> Caller:
        """Identify the sender of a request from its two headers (None: absent).

        Raises:
            InvalidCredentialError: a credential that belongs to no agent.
            OperatorRequiredError: an operator token that is not the server's.
        """
        operator = False
        if operator_token is not None:
            expected = self._operator
            if expected is None or not hmac.compare_digest(digest(operator_token), expected):
                raise OperatorRequiredError(
                    "the operator token of this request is not the server's (klock serve "
                    "--operator-token, or KLOCK_OPERATOR_TOKEN); send the right one, or none"
                )
            operator = True
        if credential is None:
            return Caller(None, operator) if operator else ANONYMOUS
        given = digest(credential)
        agent_id = self._agents.get(given)
        if agent_id is None or not hmac.compare_digest(self._digests[agent_id], given):
            raise InvalidCredentialError(
                "the credential of this request belongs to no agent (mistyped, or its agent "
                "was retired); register the agent again to get a new one"
            )
        return Caller(agent_id, operator)

    # ------------------------------------------------------------------ the rules

    def authorize(self, action: Action, agent_id: str, caller: Caller) -> None:
        """Check that ``caller`` may do ``action`` for the agent ``agent_id``.

        Raises:
            OperatorRequiredError: revoke or evict without the operator token on a server
                that has one.
            CredentialRequiredError: the agent has a credential, the request carries none.
            NotYourAgentError: the request's credential is another agent's.
            StrictIdentityError: a strict server, an agent without a credential.
        """
        if caller.operator and action in _OPERATOR_MAY:
            return
        if action in _OPERATOR_ONLY and self._operator is not None:
            raise OperatorRequiredError(
                f"only the operator may {action.value} agent {agent_id!r} on this server; "
                "send its operator token (Klock-Operator-Token header)"
            )
        if agent_id in self._digests:
            if caller.agent_id is None:
                raise CredentialRequiredError(
                    f"agent {agent_id!r} has a credential: a request to {action.value} it must "
                    "carry it (Klock-Credential header); nothing changed"
                )
            if caller.agent_id != agent_id:
                raise NotYourAgentError(
                    f"the request's credential is agent {caller.agent_id!r}'s; it may not "
                    f"{action.value} agent {agent_id!r}; nothing changed"
                )
            return
        if caller.agent_id is not None:
            raise NotYourAgentError(
                f"the request's credential is agent {caller.agent_id!r}'s; it may not "
                f"{action.value} agent {agent_id!r}; nothing changed"
            )
        if self.strict:
            raise StrictIdentityError(
                f"agent {agent_id!r} has no credential and this server accepts only agents "
                "with one (--strict-identity); register it with a credential"
            )

    def authorize_registration(
        self,
        agent_id: str,
        caller: Caller,
        *,
        wants_credential: bool,
        priority: int | None,
        exists: bool,
    ) -> bool:
        """Check a registration; return whether a new credential is to be issued.

        ``exists``: the id is registered already (asked of the kernel only when it matters:
        a request for a credential for an id that has none).

        Raises:
            CredentialRequiredError: the id has a credential; the request carries none.
            NotYourAgentError: the id has another credential, or was registered without one
                and the request asks for one (it is someone else's).
            OperatorRequiredError: an explicit priority without the operator token, on a
                server that reserves priorities to its operator (it has an operator token, or
                is strict).
            StrictIdentityError: a strict server, a registration without a credential.
        """
        if agent_id in self._digests:
            # Its holder (or the operator) registers it again: idempotent, no new secret. The
            # kernel refuses another priority than the one it has.
            if caller.agent_id != agent_id and not (caller.agent_id is None and caller.operator):
                self.authorize(Action.ACQUIRE, agent_id, caller)  # raises the refusal
            return False
        privileged = self._operator is not None or self.strict
        if priority is not None and not caller.operator and privileged:
            raise OperatorRequiredError(
                f"an explicit priority ({priority}) ranks agent {agent_id!r} before every "
                "agent without one: only the operator may give one (Klock-Operator-Token "
                "header); register without a priority"
            )
        if caller.agent_id is not None:
            raise NotYourAgentError(
                f"the request's credential is agent {caller.agent_id!r}'s; it may not register "
                f"agent {agent_id!r}; send no credential to register a new agent"
            )
        if wants_credential:
            if exists:
                raise NotYourAgentError(
                    f"agent {agent_id!r} was registered without a credential, by another "
                    "client; register another id to get a credential"
                )
            return True
        if self.strict:
            raise StrictIdentityError(
                f"this server accepts only agents with a credential (--strict-identity); "
                f'register {agent_id!r} with "credential": true'
            )
        return False
