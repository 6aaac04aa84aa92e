"""The boundary of ``klock serve``: what a request may contain, checked before the kernel sees it.

One declaration per route (:data:`BODIES`, :data:`QUERIES`) says which fields a body or query
string may carry and what each may hold, as JSON Schema. The server refuses anything else with
a 4xx naming the field; ``GET /openapi.json`` is built from the same declarations
(:func:`openapi`), so the published schema and the checks cannot drift apart.

The checks, in the order a request meets them:

- a body must be declared ``Content-Type: application/json`` (a web page can post
  ``text/plain`` across origins without a preflight; it cannot post JSON);
- it must parse as a JSON object nested at most :data:`MAX_JSON_DEPTH` deep, with no ``NaN``
  or ``Infinity``, every string valid Unicode text (a lone UTF-16 surrogate such as
  ``"\\ud800"`` cannot be stored as UTF-8) and every integer within signed 64 bits;
- it may carry only the fields of its route (unknown ones are refused by name);
- each field then has its own type and range (:func:`text`, :func:`priority`, :func:`ttl`, ...).

Limits are module constants, documented in ``docs/server.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from klock_async.errors import (
    HostNotAllowedError,
    InvalidFieldError,
    InvalidRequestError,
    InvalidTTLError,
    MalformedJSONError,
    MissingFieldError,
    OriginNotAllowedError,
    UnsupportedMediaTypeError,
)
from klock_async.model import MAX_PRIORITY, MIN_PRIORITY

__all__ = [
    "BODIES",
    "INTENT_FIELDS",
    "LOOPBACK_HOSTS",
    "MAX_ID_CHARS",
    "MAX_INTENTS",
    "MAX_JSON_DEPTH",
    "MAX_NAME_CHARS",
    "MAX_PAGE",
    "MAX_PATH_CHARS",
    "MAX_PRIORITY",
    "MAX_SYNC_REQUESTS",
    "MAX_TIMEOUT_MS",
    "MAX_TTL_MS",
    "MIN_PRIORITY",
    "QUERIES",
    "Body",
    "OriginGuard",
    "check_text",
    "field_value",
    "id_list",
    "ident",
    "limited",
    "name_field",
    "openapi",
    "optional",
    "optional_ident",
    "parse_body",
    "priority",
    "query_int",
    "shorten",
    "timeout",
    "ttl",
]

MAX_ID_CHARS = 256
"""Longest agent, session, lease or request id (characters)."""
MAX_PATH_CHARS = 4096
"""Longest resource path or clock path (characters)."""
MAX_NAME_CHARS = 64
"""Longest predicate, resource type or isolation level name."""
MAX_INTENTS = 256
"""Most intents in one ``POST /intents`` manifest."""
MAX_SYNC_REQUESTS = 1024
"""Most request ids one ``POST /sync`` may list."""
MAX_JSON_DEPTH = 8
"""Deepest nesting of objects and arrays in a body (the API itself needs 3)."""
MAX_TTL_MS = 86_400_000
"""Longest lease ttl: one day (heartbeat to hold a lease longer)."""
MAX_TIMEOUT_MS = 86_400_000
"""Longest ``timeout_ms`` of a long-poll: one day (omit it to wait without limit)."""
MAX_PAGE = 1000
"""Most items one ``GET /agents`` or ``GET /leases`` answers (the ``limit`` default too)."""

_INT64 = 2**63
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Route declarations (JSON Schema), shared by the checks and GET /openapi.json.

_ID: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}
_PATH: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_PATH_CHARS}
_NAME: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS}
_TTL: dict[str, Any] = {
    "type": ["number", "null"],
    "exclusiveMinimum": 0,
    "maximum": MAX_TTL_MS,
    "description": "milliseconds",
}
_TIMEOUT: dict[str, Any] = {
    "type": ["number", "null"],
    "minimum": 0,
    "maximum": MAX_TIMEOUT_MS,
    "description": "milliseconds; null or absent: no limit",
}
_FLAG: dict[str, Any] = {"type": ["boolean", "null"]}
_OPTIONAL_ID: dict[str, Any] = {**_ID, "type": ["string", "null"]}
_INTENT: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["predicate"],
    "properties": {
        "resource": {**_PATH, "description": "TYPE:path (instead of resource_type + path)"},
        "resource_type": _NAME,
        "resource_path": _PATH,
        "predicate": _NAME,
    },
}
INTENT_FIELDS = frozenset(_INTENT["properties"])
"""The fields of one intent of ``POST /intents``."""
_ACQUIRE_COMMON: dict[str, Any] = {
    "agent_id": _ID,
    "session_id": _OPTIONAL_ID,
    "ttl_ms": _TTL,
    "ttl": {**_TTL, "description": "milliseconds (the Klock v1 name of ttl_ms)"},
    "wait": _FLAG,
    "timeout_ms": _TIMEOUT,
    "isolation": {**_NAME, "type": ["string", "null"]},
    "agent_view": {**_FLAG, "description": "observe in the agent's own view (tool calls)"},
    "request_key": {
        "type": ["string", "null"],
        "pattern": "^[A-Za-z0-9_-]{8,64}$",
        "description": "names this acquire and its resends: a resend with the same key is "
        "answered with the same grant, never granted twice",
    },
}


@dataclass(frozen=True, slots=True)
class Body:
    """The JSON body a route accepts: its fields (JSON Schema) and which are required."""

    properties: Mapping[str, Any]
    required: tuple[str, ...] = ()
    optional: bool = False  # an empty body is fine
    open: bool = False  # other fields are allowed (a hook event in a harness's own schema)
    fields: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", frozenset(self.properties))

    def schema(self) -> dict[str, Any]:
        """The body as a JSON Schema object."""
        return {
            "type": "object",
            "additionalProperties": self.open,
            "required": list(self.required),
            "properties": dict(self.properties),
        }


_PRIORITY: dict[str, Any] = {
    "type": ["integer", "null"],
    "minimum": MIN_PRIORITY,
    "maximum": MAX_PRIORITY,
    "description": "the agent's age: lower is older and wins conflicts",
}
_CLIENT: dict[str, Any] = {
    "client_id": _ID,
    "secret": {**_ID, "description": "the client session's resume secret"},
}
_GRACE = "milliseconds the session outlives its last sign of life (at most the server's)"

BODIES: dict[str, Body] = {
    "POST /agents": Body(
        {
            "agent_id": _ID,
            "priority": _PRIORITY,
            "credential": {
                "type": ["boolean", "null"],
                "description": "hand out a credential (once) that every later request for "
                "this agent must carry in the Klock-Credential header",
            },
        },
        ("agent_id",),
    ),
    "POST /leases": Body(
        {
            **_ACQUIRE_COMMON,
            "resource": _INTENT["properties"]["resource"],
            "resource_type": _NAME,
            "resource_path": _PATH,
            "predicate": _NAME,
        },
        ("agent_id", "predicate"),
    ),
    "POST /intents": Body(
        {
            **_ACQUIRE_COMMON,
            "intents": {"type": "array", "minItems": 1, "maxItems": MAX_INTENTS, "items": _INTENT},
        },
        ("agent_id", "intents"),
    ),
    "DELETE /leases/{lease_id}": Body(
        {
            "agent_id": _OPTIONAL_ID,
            "record_write": _FLAG,
            "lease_id": {**_OPTIONAL_ID, "description": "v1 clients repeat the path's id"},
        },
        optional=True,
    ),
    "POST /leases/{lease_id}/heartbeat": Body(
        {
            "agent_id": _OPTIONAL_ID,
            "ttl_ms": _TTL,
            "ttl": {**_TTL, "description": "milliseconds (the Klock v1 name of ttl_ms)"},
            "lease_id": {**_OPTIONAL_ID, "description": "v1 clients repeat the path's id"},
        },
        optional=True,
    ),
    "POST /leases/{lease_id}/wait": Body({"timeout_ms": _TIMEOUT}, optional=True),
    "POST /leases/{lease_id}/revoke": Body({}, optional=True),
    "POST /sessions/release": Body(
        {"agent_id": _ID, "session_id": _ID}, ("agent_id", "session_id")
    ),
    "POST /evict": Body({"agent_id": _OPTIONAL_ID}, optional=True),
    "POST /clocks/read": Body({"path": _PATH, "agent_id": _ID}, ("path", "agent_id")),
    "POST /clocks/write": Body(
        {"path": _PATH, "agent_id": _ID, "strict": _FLAG}, ("path", "agent_id")
    ),
    "POST /sync": Body(
        {
            "requests": {
                "type": ["array", "null"],
                "maxItems": MAX_SYNC_REQUESTS,
                "items": _ID,
            },
            "timeout_ms": _TIMEOUT,
        },
        optional=True,
    ),
    "POST /withdraw": Body({"request_id": _ID}, ("request_id",)),
    "POST /clients": Body({"grace_ms": {**_TIMEOUT, "description": _GRACE}}, optional=True),
    "POST /clients/heartbeat": Body(_CLIENT, ("client_id", "secret")),
    "POST /clients/close": Body(_CLIENT, ("client_id", "secret")),
    "POST /clients/agents": Body(
        {**_CLIENT, "agent_id": _ID, "priority": _PRIORITY}, ("client_id", "secret", "agent_id")
    ),
    # A coding agent's hook event, in the harness's own schema (docs/coding-agents.md); the
    # hook core checks the fields it uses.
    "POST /hooks/claude-code": Body({}, open=True),
    "POST /hooks/gemini-cli": Body({}, open=True),
}
"""The body of every route that reads one, by ``"METHOD /path"``. A route that reads a body
must be declared here: its fields are what the server accepts and what the OpenAPI lists."""

_LIMIT: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}
_CURSOR: dict[str, Any] = {"type": "string", "maxLength": MAX_ID_CHARS * 2}
QUERIES: dict[str, dict[str, Any]] = {
    "GET /agents": {"limit": _LIMIT, "after": _CURSOR},
    "GET /leases": {
        "limit": _LIMIT,
        "after": {"type": "integer", "minimum": 0},
        "agent_id": _ID,
        "session_id": _ID,
    },
    "DELETE /leases/{lease_id}": {"agent_id": _ID, "record_write": {"type": "boolean"}},
    "POST /leases/{lease_id}/heartbeat": {"agent_id": _ID},
}
"""The query parameters of every route that reads some."""


# --------------------------------------------------------------------------------------------
# Parsing a body.


def _refuse_constant(name: str) -> Any:
    raise MalformedJSONError(f"the body holds {name}, which is not a JSON number")


def parse_body(raw: bytes, content_type: str | None, body: Body) -> dict[str, Any]:
    """Parse and check a request body against its route's declaration.

    Raises:
        UnsupportedMediaTypeError: a non-empty body not declared ``application/json``.
        MalformedJSONError: not a JSON object, too deep, ``NaN``/``Infinity``.
        MissingFieldError: the body is empty and the route needs one.
        InvalidFieldError: an unknown field, a string that is not valid text, an integer
            outside signed 64 bits.
    """
    if not raw.strip():
        if not body.optional:
            raise MalformedJSONError("the request needs a JSON object body")
        if raw:  # an optional body may be left out, not sent blank
            raise MalformedJSONError("a body, when sent, must be a JSON object: send none, or {}")
        return {}
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        shown = content_type if content_type else "none"
        raise UnsupportedMediaTypeError(
            f"the body must be sent as 'Content-Type: application/json' (got {shown}); "
            "other types are refused so that web pages cannot post to this server"
        )
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise MalformedJSONError(
            f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, MalformedJSONError):
            raise
        raise MalformedJSONError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedJSONError(f"the body must be a JSON object, got {type(value).__name__}")
    return check_body(value, body)


def check_body(value: dict[str, Any], body: Body, *, deep: bool = True) -> dict[str, Any]:
    """Check a parsed JSON object against a route's declaration (the session channel's
    arguments are checked by the same declarations as the REST bodies).

    ``deep=False`` checks the fields only, for a parser that refuses lone surrogates itself
    (orjson, on the channel) where every integer used is range-checked by its field's parser.

    Raises:
        MalformedJSONError: nested too deeply.
        InvalidFieldError: an unknown field, a string that is not valid text, an integer
            outside signed 64 bits.
    """
    unknown = () if body.open else value.keys() - body.fields
    if unknown:
        allowed = ", ".join(sorted(body.fields)) or "none"
        raise InvalidFieldError(
            f"unknown field(s) {', '.join(map(repr, sorted(unknown)))}; this endpoint takes: "
            f"{allowed}"
        )
    if deep:
        _check_tree(value)
    return value


def _check_tree(root: dict[str, Any]) -> None:
    """Depth, text and integer range of every value, walked without recursion."""
    stack: list[tuple[Any, str, int]] = [(root, "the body", 1)]
    while stack:
        value, where, depth = stack.pop()
        kind = type(value)
        if kind is str:
            check_text(value, where)
        elif kind is int:
            if not -_INT64 <= value < _INT64:
                raise InvalidFieldError(
                    f"{where} is outside the signed 64-bit integers: {shorten(value)}"
                )
        elif kind is dict or kind is list:
            if depth > MAX_JSON_DEPTH:
                raise MalformedJSONError(
                    f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
                )
            if kind is dict:
                for key, item in value.items():
                    check_text(key, f"a field name in {where}")
                    stack.append((item, key if depth == 1 else f"{where}.{key}", depth + 1))
            else:
                for index, item in enumerate(value):
                    stack.append((item, f"{where}[{index}]", depth + 1))


def check_text(value: str, where: str) -> None:
    """Refuse a string that cannot be stored as UTF-8 (a lone surrogate such as ``\\ud800``).

    Raises:
        InvalidFieldError: the string is not valid Unicode text.
    """
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidFieldError(
            f"{where} is not valid text (it holds a lone UTF-16 surrogate); send UTF-8 text"
        ) from None


def shorten(value: object) -> str:
    """``repr(value)``, cut to about 60 characters for an error message."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:40] + f"... ({len(shown)} characters)"


# --------------------------------------------------------------------------------------------
# Fields.


def field_value(body: Mapping[str, Any], name: str, kind: type[T], what: str) -> T:
    """A required field of the given type.

    Raises:
        MissingFieldError: absent or null.
        InvalidFieldError: of another type.
    """
    if name not in body or body[name] is None:
        raise MissingFieldError(f"field {name!r} is required ({what})")
    value = body[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidFieldError(f"field {name!r} must be {what}, got {shorten(value)}")
    return value


def optional(body: Mapping[str, Any], name: str, kind: type[T], what: str) -> T | None:
    """An optional field (absent or null: None).

    Raises:
        InvalidFieldError: of another type.
    """
    if body.get(name) is None:
        return None
    return field_value(body, name, kind, what)


def limited(value: str, name: str, limit: int) -> str:
    """``value`` if it is at most ``limit`` characters.

    Raises:
        InvalidFieldError: longer.
    """
    if len(value) > limit:
        raise InvalidFieldError(
            f"field {name!r} is {len(value)} characters long; the limit is {limit}"
        )
    return value


def ident(body: Mapping[str, Any], name: str) -> str:
    """A required id (agent, session, request): non-empty text of at most MAX_ID_CHARS.

    Raises:
        MissingFieldError: absent or null.
        InvalidFieldError: not a non-empty string, or too long.
    """
    value = field_value(body, name, str, "a non-empty string")
    if not value.strip():
        raise InvalidFieldError(f"field {name!r} must be a non-empty string")
    return limited(value, name, MAX_ID_CHARS)


def optional_ident(body: Mapping[str, Any], name: str) -> str | None:
    """An optional id (absent or null: None).

    Raises:
        InvalidFieldError: not a non-empty string, or too long.
    """
    if body.get(name) is None:
        return None
    return ident(body, name)


def name_field(body: Mapping[str, Any], name: str, limit: int = MAX_ID_CHARS) -> str:
    """A required string the kernel validates itself (so errors match the embedded kernel).

    Raises:
        MissingFieldError: absent or null.
        InvalidFieldError: not a string, or longer than ``limit``.
    """
    return limited(field_value(body, name, str, "a string"), name, limit)


def priority(body: Mapping[str, Any]) -> int | None:
    """The optional agent priority, within [MIN_PRIORITY, MAX_PRIORITY].

    Raises:
        InvalidFieldError: not an integer, or out of range.
    """
    value = optional(body, "priority", int, "an integer (lower is older)")
    if value is not None and not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidFieldError(
            f"field 'priority' must lie between {MIN_PRIORITY} and {MAX_PRIORITY}, got {value}"
        )
    return value


def ttl(body: Mapping[str, Any], default_ms: float | None) -> float | None:
    """The ttl in seconds from ``ttl_ms`` (or ``ttl``, its Klock v1 name; both in ms).

    ``default_ms`` when neither is given.

    Raises:
        InvalidTTLError: not a number in (0, MAX_TTL_MS], or ``ttl_ms`` and ``ttl`` disagree.
    """
    name = "ttl_ms" if body.get("ttl_ms") is not None else "ttl"
    if body.get(name) is None:
        return None if default_ms is None else default_ms / 1000.0
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidTTLError(f"{name} must be a positive number of milliseconds, got {value!r}")
    if value > MAX_TTL_MS:
        raise InvalidTTLError(
            f"{name} must be at most {MAX_TTL_MS} ms (one day), got {shorten(value)}; heartbeat "
            "the lease to hold it longer"
        )
    if name == "ttl_ms" and body.get("ttl") not in (None, value):
        raise InvalidTTLError(f"ttl_ms {value!r} and ttl {body['ttl']!r} disagree; send ttl_ms")
    return float(value) / 1000.0


def timeout(body: Mapping[str, Any], name: str = "timeout_ms") -> float | None:
    """The optional ``timeout_ms`` (or another duration ``name``) in seconds (None: absent).

    Raises:
        InvalidFieldError: not a number in [0, MAX_TIMEOUT_MS].
    """
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidFieldError(f"field {name!r} must be a number, got {shorten(value)}")
    if not 0 <= value <= MAX_TIMEOUT_MS:
        raise InvalidFieldError(
            f"field {name!r} must lie between 0 and {MAX_TIMEOUT_MS} ms, got {value!r}; "
            "omit it for no limit"
        )
    return float(value) / 1000.0


def id_list(body: Mapping[str, Any], name: str, limit: int) -> list[str]:
    """An optional list of ids (absent: empty).

    Raises:
        InvalidFieldError: not a list of non-empty strings, or too long.
    """
    items = optional(body, name, list, "a list of ids") or []
    if len(items) > limit:
        raise InvalidFieldError(f"field {name!r} lists {len(items)} ids; the limit is {limit}")
    for item in items:
        if not isinstance(item, str) or not item or len(item) > MAX_ID_CHARS:
            raise InvalidFieldError(
                f"field {name!r} must list ids (strings of 1 to {MAX_ID_CHARS} characters)"
            )
    return items


def query_int(value: str | None, name: str, low: int, high: int, default: int) -> int:
    """An integer query parameter within [low, high].

    Raises:
        InvalidFieldError: not an integer, or out of range.
    """
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise InvalidFieldError(
            f"query parameter {name!r} must be an integer, got {shorten(value)}"
        ) from None
    if not low <= number <= high:
        raise InvalidFieldError(
            f"query parameter {name!r} must lie between {low} and {high}, got {number}"
        )
    return number


# --------------------------------------------------------------------------------------------
# The OpenAPI document.

_ENVELOPE: dict[str, Any] = {
    "type": "object",
    "required": ["success", "data", "error"],
    "properties": {
        "success": {"type": "boolean"},
        "data": {},
        "error": {"type": ["string", "null"]},
        "code": {"type": "string"},
        "details": {"type": "object"},
    },
}


_OPERATION_ID = str.maketrans({"/": "_", "{": None, "}": None, ".": "_"})


def openapi(routes: Sequence[tuple[str, str]], *, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (``(method, path)`` pairs).

    Bodies and query parameters come from :data:`BODIES` and :data:`QUERIES`, the same
    declarations the server checks requests against.
    """
    paths: dict[str, dict[str, Any]] = {}
    for method, path in routes:
        key = f"{method} {path}"
        operation: dict[str, Any] = {
            "operationId": method.lower()
            + path.replace("/", "_").replace("{", "").replace("}", ""),
            "responses": {
                "200": {
                    "description": "success",
                    "content": {"application/json": {"schema": _ENVELOPE}},
                },
                "default": {
                    "description": "a refusal: the envelope with a stable 'code'",
                    "content": {"application/json": {"schema": _ENVELOPE}},
                },
            },
        }
        if path == "/openapi.json":
            operation["responses"]["200"] = {
                "description": "this document",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        if path == "/metrics":
            operation["responses"]["200"] = {
                "description": "Prometheus text",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        if path == "/":
            operation["responses"]["200"] = {
                "description": "the live page",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        if path == "/events":
            operation["responses"]["200"] = {
                "description": "Server-Sent Events, named as the events (lease.granted, ...)",
                "content": {"text/event-stream": {"schema": {}}},
            }
        if path.startswith("/hooks/"):
            operation["responses"]["200"] = {
                "description": "the hook's answer, in the harness's own schema",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        parameters = []
        if "{lease_id}" in path:
            parameters.append({"name": "lease_id", "in": "path", "required": True, "schema": _ID})
        for name, schema in QUERIES.get(key, {}).items():
            parameters.append({"name": name, "in": "query", "required": False, "schema": schema})
        if parameters:
            operation["parameters"] = parameters
        body = BODIES.get(key)
        if body is not None:
            operation["requestBody"] = {
                "required": not body.optional,
                "content": {"application/json": {"schema": body.schema()}},
            }
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "klock serve",
            "version": version,
            "description": "The HTTP API of the klock_async coordination server "
            "(see docs/server.md).",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                # An agent registered with a credential; the operator (docs/server.md).
                "credential": {"type": "apiKey", "in": "header", "name": "Klock-Credential"},
                "operator": {"type": "apiKey", "in": "header", "name": "Klock-Operator-Token"},
            },
        },
    }


# --------------------------------------------------------------------------------------------
# Host and Origin: who may talk to the server.

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Host names a server always answers to."""


def _host_name(netloc: str) -> str:
    """The host of ``host[:port]`` or ``[v6]:port``, lower-cased, without the port."""
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")].lower() if "]" in netloc else ""
    return netloc.rpartition(":")[0].lower() if ":" in netloc else netloc.lower()


class OriginGuard:
    """Refuses requests whose ``Host`` the server does not serve, or that a foreign page sent.

    A web page in a browser can send requests to a loopback server; two headers give it away.
    ``Host`` names the host the browser thinks it talks to: a DNS-rebinding page has its own
    name there, so only the configured host names are served. ``Origin`` names the page's
    origin: a request from a page of another origin than the server itself is refused (there
    is no CORS). Clients that are not browsers send no ``Origin``.

    Args:
        allowed_hosts: host names (without port) to serve on top of :data:`LOOPBACK_HOSTS`;
            ``"*"`` serves any.
    """

    def __init__(self, allowed_hosts: Sequence[str] = ()) -> None:
        names = {name.strip().lower().strip("[]") for name in allowed_hosts if name.strip()}
        self.any_host = "*" in names
        self.hosts = frozenset(names | set(LOOPBACK_HOSTS)) - {"*"}

    def check(self, headers: Sequence[tuple[bytes, bytes]]) -> InvalidRequestError | None:
        """The refusal for a request with these raw headers, or None to serve it."""
        host = origin = None
        for name, value in headers:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
        if host is not None and not self.any_host and _host_name(host) not in self.hosts:
            return HostNotAllowedError(
                f"this server does not serve the host {shorten(host)}; connect through one of "
                f"{', '.join(sorted(self.hosts))}, or start it with --allowed-host NAME"
            )
        if origin is not None:
            _, sep, netloc = origin.partition("://")
            if not sep or host is None or netloc.lower() != host.lower():
                return OriginNotAllowedError(
                    f"requests from web pages of another origin ({shorten(origin)}) are refused; "
                    "call the API from a program, not from a browser page"
                )
        return None
