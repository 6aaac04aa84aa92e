"""Value types of the kernel: predicates, resources, intents, leases and agents.

Every type here is a frozen value. Parsing functions validate user input and raise a typed
error instead of guessing: an unknown predicate or resource type never falls back to a default,
so a typo can never turn a write lock into a read lock.
"""

from __future__ import annotations

import enum
import functools
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from klock_async.errors import (
    InvalidPredicateError,
    InvalidRequestError,
    InvalidResourceError,
    InvalidTTLError,
)

__all__ = [
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "AgentInfo",
    "IdentityHashEnum",
    "Intent",
    "LeaseInfo",
    "LeaseState",
    "Predicate",
    "Resource",
    "ResourceType",
    "Statistics",
    "WaitFor",
    "WaiterInfo",
    "lease_info",
    "parse_intents",
    "to_ms",
    "validate_request_key",
    "validate_timeout",
    "validate_ttl",
    "with_state",
]


class IdentityHashEnum(enum.Enum):
    """An enum whose members hash by identity.

    Members are singletons, so identity hashing agrees with equality; it runs in C, where
    Enum's own ``__hash__`` (the hash of the name) is a Python call on every dict lookup, and
    the scheduler looks predicates and states up on every request.
    """

    __hash__ = object.__hash__


class Predicate(IdentityHashEnum):
    """What an agent intends to do with a resource (KLIS-1)."""

    PROVIDES = "PROVIDES"
    CONSUMES = "CONSUMES"
    MUTATES = "MUTATES"
    DELETES = "DELETES"
    DEPENDS_ON = "DEPENDS_ON"
    RENAMES = "RENAMES"

    @property
    def writes(self) -> bool:
        """True for predicates that change the resource (checked causally under SERIALIZABLE)."""
        return self in _WRITING

    @classmethod
    def parse(cls, value: Predicate | str) -> Predicate:
        """Return the predicate named by ``value`` (case-insensitive).

        Raises:
            InvalidPredicateError: ``value`` names no predicate.
        """
        if isinstance(value, Predicate):
            return value
        if isinstance(value, str):
            member = _PREDICATES.get(value) or _PREDICATES.get(value.strip().upper())
            if member is not None:
                return member
        raise InvalidPredicateError(
            f"unknown predicate {value!r}; use one of {', '.join(cls.__members__)}"
        )


_WRITING = frozenset({Predicate.PROVIDES, Predicate.MUTATES, Predicate.DELETES, Predicate.RENAMES})
_PREDICATES = {p.value: p for p in Predicate}  # by name, without building __members__ per call


class ResourceType(IdentityHashEnum):
    """The kind of thing a resource path names."""

    FILE = "FILE"
    SYMBOL = "SYMBOL"
    API_ENDPOINT = "API_ENDPOINT"
    DATABASE_TABLE = "DATABASE_TABLE"
    CONFIG_KEY = "CONFIG_KEY"

    @classmethod
    def parse(cls, value: ResourceType | str) -> ResourceType:
        """Return the resource type named by ``value`` (case-insensitive).

        Raises:
            InvalidResourceError: ``value`` names no resource type.
        """
        if isinstance(value, ResourceType):
            return value
        if isinstance(value, str):
            member = cls.__members__.get(value.strip().upper())
            if member is not None:
                return member
        raise InvalidResourceError(
            f"unknown resource type {value!r}; use one of {', '.join(cls.__members__)}"
        )


@dataclass(frozen=True, slots=True, order=True)
class Resource:
    """A lockable thing: a type and a normalised path, written ``TYPE:path``.

    Resources form a hierarchy by path within one type: ``FILE:/src`` covers
    ``FILE:/src/auth.js``. FILE paths are normalised and always absolute
    (``src/./a.js``, ``/src//a.js`` and ``/src/x/../a.js`` are one resource).
    """

    # ``key`` (the ``TYPE:path`` string) and ``up`` (the keys of its strict ancestors, nearest
    # first) are computed once, at construction. The scheduler keys its indexes by these
    # strings: a str caches its hash and hashes in C, where a Resource key cost a Python-level
    # __hash__ call on every one of the ~30 index lookups of an acquire+release pair.
    type: ResourceType
    path: str
    key: str = field(init=False, repr=False, compare=False)
    up: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prefix = f"{self.type.value}:"
        object.__setattr__(self, "key", prefix + self.path)
        object.__setattr__(self, "up", tuple(prefix + p for p in _ancestor_paths(self.path)))

    def __str__(self) -> str:
        return self.key

    def __hash__(self) -> int:
        # The generated hash of (type, path) would call the enum's hash in Python; the path's
        # hash is cached by the str itself. Equal resources have equal paths.
        return hash(self.path)

    @classmethod
    def of(cls, type: ResourceType | str, path: str) -> Resource:
        """Build a resource from a type and a path, normalising the path.

        Raises:
            InvalidResourceError: unknown type, or an empty path.
        """
        rtype = ResourceType.parse(type)
        if not isinstance(path, str) or not path.strip():
            raise InvalidResourceError(
                f"empty path for a {rtype.value} resource; name the file, symbol, table or key"
            )
        path = path.strip()
        if rtype is ResourceType.FILE:
            path = posixpath.normpath("/" + path)
            if path.startswith("//"):  # normpath keeps a leading double slash (POSIX)
                path = "/" + path.lstrip("/")
        return cls(rtype, path)

    @classmethod
    def parse(cls, value: Resource | str) -> Resource:
        """Parse ``TYPE:path`` or a bare path (a FILE).

        A prefix before the first ``:`` that contains no ``/`` or ``.`` is read as a type name
        and must be a known one: ``FIEL:/src`` is an error, never a file called ``FIEL:/src``.

        Raises:
            InvalidResourceError: unknown type or empty path.
        """
        if isinstance(value, Resource):
            return value
        if not isinstance(value, str):
            raise InvalidResourceError(f"a resource is a 'TYPE:path' string, not {value!r}")
        return _parse_resource(value)

    def ancestors(self) -> tuple[Resource, ...]:
        """The strict ancestors of this resource, nearest first."""
        return _ancestors(self)


# Agents name the same files over and over, and every acquire parses its resources: recent
# parses are kept (normalising a path was the costliest step of validating a request).
# Errors are not cached: a bad string raises each time.
@functools.lru_cache(maxsize=4096)
def _parse_resource(value: str) -> Resource:
    head, sep, tail = value.partition(":")
    if sep and head and "/" not in head and "." not in head:
        try:
            rtype = ResourceType.parse(head)
        except InvalidResourceError:
            raise InvalidResourceError(
                f"unknown resource type {head!r} in {value!r}; use one of "
                f"{', '.join(ResourceType.__members__)} (write FILE:{value} for a file path "
                "that contains a colon)"
            ) from None
        return Resource.of(rtype, tail)
    return Resource.of(ResourceType.FILE, value)


def _ancestor_paths(path: str) -> list[str]:
    """The strict ancestors of ``path``, nearest first (the root ``/`` of absolute paths)."""
    found = []
    while True:
        cut = path.rfind("/")
        if cut < 0:
            break
        if cut == 0:
            if path != "/":
                found.append("/")
            break
        path = path[:cut]
        found.append(path)
    return found


# Callers walk a resource's ancestors as Resources (the rules, tests); recently used resources
# keep theirs. The scheduler uses the cached ``up`` keys instead.
@functools.lru_cache(maxsize=4096)
def _ancestors(resource: Resource) -> tuple[Resource, ...]:
    return tuple(Resource(resource.type, path) for path in _ancestor_paths(resource.path))


@dataclass(frozen=True, slots=True)
class Intent:
    """One (resource, predicate) pair of a request."""

    resource: Resource
    predicate: Predicate

    @classmethod
    def of(cls, resource: Resource | str, predicate: Predicate | str) -> Intent:
        """Validate and build an intent.

        Raises:
            InvalidResourceError: bad resource.
            InvalidPredicateError: bad predicate.
        """
        if cls is Intent and type(resource) is str and type(predicate) is str:
            return _intent_of(resource, predicate)
        return cls(Resource.parse(resource), Predicate.parse(predicate))


# Every acquire validates its (resource, predicate) strings, and agents repeat the same pairs:
# recent ones are kept (a frozen Intent plus two parses cost about 0.9 us). Errors are not
# cached: a bad pair raises each time.
@functools.lru_cache(maxsize=4096)
def _intent_of(resource: str, predicate: str) -> Intent:
    return Intent(Resource.parse(resource), Predicate.parse(predicate))


def parse_intents(
    pairs: Iterable[tuple[Resource | str, Predicate | str] | Intent],
) -> tuple[Intent, ...]:
    """Validate a list of ``(resource, predicate)`` pairs; all must be valid.

    Raises:
        InvalidResourceError: a bad resource, or no pairs at all.
        InvalidPredicateError: a bad predicate.
    """
    try:
        intents = tuple(p if isinstance(p, Intent) else Intent.of(*p) for p in pairs)
    except TypeError:
        raise InvalidResourceError(
            f"a request is a list of (resource, predicate) pairs, not {pairs!r}"
        ) from None
    if not intents:
        raise InvalidResourceError("a request needs at least one (resource, predicate) pair")
    return intents


MIN_PRIORITY = -(2**62)
MAX_PRIORITY = 2**62
"""Explicit agent priorities lie in [MIN_PRIORITY, MAX_PRIORITY]: the ages counted after the
largest one stay far within the signed 64-bit integers a journal stores."""


_REQUEST_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")


def validate_request_key(key: str | None) -> str | None:
    """Return an acquire's request key (None: the acquire has none).

    A request key names one acquire and its resends: 8 to 64 characters of ``A-Z``, ``a-z``,
    ``0-9``, ``-`` and ``_`` (``secrets.token_urlsafe(16)`` makes a good one).

    Raises:
        InvalidRequestError: anything else.
    """
    if key is None or (type(key) is str and _REQUEST_KEY.fullmatch(key) is not None):
        return key
    shown = repr(key) if len(repr(key)) <= 80 else repr(key)[:77] + "..."
    raise InvalidRequestError(
        "a request key is 8 to 64 characters of A-Z, a-z, 0-9, '-' and '_' (e.g. "
        f"secrets.token_urlsafe(16)), got {shown}; send a new random key with each acquire"
    )


def validate_ttl(ttl: float) -> float:
    """Return ``ttl`` as a float number of seconds.

    Raises:
        InvalidTTLError: ``ttl`` is not a positive finite number.
    """
    if type(ttl) is float and 0 < ttl < _INFINITY:  # the common case, checked per acquire
        return ttl
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < _INFINITY:
        raise InvalidTTLError(f"ttl must be a positive number of seconds, got {ttl!r}")
    return float(ttl)


_INFINITY = float("inf")


def validate_timeout(timeout: float | None) -> float | None:
    """Return ``timeout`` (seconds to wait at most) as a float, or None for no limit.

    Raises:
        InvalidRequestError: ``timeout`` is not None and not a finite number >= 0 (a string or
            a bool is refused, never read as a number).
    """
    if timeout is None:
        return None
    if type(timeout) is float and 0 <= timeout < _INFINITY:
        return timeout
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 <= timeout < _INFINITY
    ):
        raise InvalidRequestError(
            f"timeout must be a number of seconds >= 0, or None to wait without limit; "
            f"got {timeout!r}"
        )
    return float(timeout)


class LeaseState(IdentityHashEnum):
    """Where a lease is in its life."""

    ACTIVE = "ACTIVE"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"


def to_ms(seconds: float) -> int:
    """A duration or an instant in seconds as whole milliseconds: the unit of the wire."""
    return round(seconds * 1000.0)


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A snapshot of one lease, as the scheduler saw it when it answered.

    ``token`` is the fencing token: it grows with every grant and never goes backwards, so a
    store can refuse a write that carries a smaller token than one it already accepted.
    ``expires_at`` is wall-clock time (``time.time()`` seconds).
    """

    id: str
    agent_id: str
    session_id: str
    resource: Resource
    predicate: Predicate
    token: int
    ttl: float
    expires_at: float
    state: LeaseState = LeaseState.ACTIVE


# A LeaseInfo is built at every grant (the kernel) and every answer (the channel's client).
# The frozen dataclass's generated __init__ sets each field through object.__setattr__ (about
# 1.3 us for nine fields); the slots' own descriptors build the same frozen value in half the
# time. The check keeps lease_info() in step with the fields of LeaseInfo.
if tuple(f.name for f in fields(LeaseInfo)) != (
    "id",
    "agent_id",
    "session_id",
    "resource",
    "predicate",
    "token",
    "ttl",
    "expires_at",
    "state",
):  # pragma: no cover - a guard
    raise TypeError("LeaseInfo's fields changed: update lease_info()")
_new_object = object.__new__
_set_id = LeaseInfo.__dict__["id"].__set__
_set_agent_id = LeaseInfo.__dict__["agent_id"].__set__
_set_session_id = LeaseInfo.__dict__["session_id"].__set__
_set_resource = LeaseInfo.__dict__["resource"].__set__
_set_predicate = LeaseInfo.__dict__["predicate"].__set__
_set_token = LeaseInfo.__dict__["token"].__set__
_set_ttl = LeaseInfo.__dict__["ttl"].__set__
_set_expires_at = LeaseInfo.__dict__["expires_at"].__set__
_set_state = LeaseInfo.__dict__["state"].__set__


def lease_info(
    lease_id: str,
    agent_id: str,
    session_id: str,
    resource: Resource,
    predicate: Predicate,
    token: int,
    ttl: float,
    expires_at: float,
    state: LeaseState,
) -> LeaseInfo:
    """``LeaseInfo(...)`` of trusted values (no checks are made either way), faster."""
    info: LeaseInfo = _new_object(LeaseInfo)
    _set_id(info, lease_id)
    _set_agent_id(info, agent_id)
    _set_session_id(info, session_id)
    _set_resource(info, resource)
    _set_predicate(info, predicate)
    _set_token(info, token)
    _set_ttl(info, ttl)
    _set_expires_at(info, expires_at)
    _set_state(info, state)
    return info


def with_state(info: LeaseInfo, state: LeaseState) -> LeaseInfo:
    """``dataclasses.replace(info, state=state)``, faster."""
    return lease_info(
        info.id,
        info.agent_id,
        info.session_id,
        info.resource,
        info.predicate,
        info.token,
        info.ttl,
        info.expires_at,
        state,
    )


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """A registered agent. ``ts`` is its age: lower is older, and it never changes.

    ``agent_id`` is the name :class:`LeaseInfo` and the wire use too.
    """

    agent_id: str
    ts: int

    @property
    def id(self) -> str:
        """Deprecated alias of :attr:`agent_id` (its earlier name)."""
        return self.agent_id


@dataclass(frozen=True, slots=True)
class Statistics:
    """A snapshot of the scheduler's counters."""

    agents: int
    leases_active: int
    requests_waiting: int
    grants: int
    waits: int
    deaths: int
    releases: int
    expiries: int
    revocations: int
    causal_violations: int
    batches: int
    messages: int


@dataclass(frozen=True, slots=True)
class WaitFor:
    """One edge of the wait-for graph: what a queued request waits for.

    ``kind`` is ``"lease"`` (an active lease: ``id`` is the lease id) or ``"request"`` (an older
    queued request: ``id`` is its request id); ``resource`` names what it holds or wants.
    """

    kind: str
    id: str | int
    agent_id: str
    resource: str


@dataclass(frozen=True, slots=True)
class WaiterInfo:
    """A snapshot of one queued request.

    ``age`` is its unit's start order (lower is older; an agent's explicit ``priority``, when
    it has one, orders before it), ``waits_for`` its edges in the wait-for graph.
    """

    request_id: int
    agent_id: str
    session_id: str
    age: int
    priority: int | None
    intents: tuple[Intent, ...]
    waits_for: tuple[WaitFor, ...]
