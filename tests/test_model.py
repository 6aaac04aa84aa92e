"""Tests for klock_async.model: parsing and validation of predicates, resources, intents, ttl."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klock_async.clocks import IsolationLevel
from klock_async.errors import (
    InvalidPredicateError,
    InvalidRequestError,
    InvalidResourceError,
    InvalidTTLError,
)
from klock_async.model import (
    Intent,
    LeaseInfo,
    LeaseState,
    Predicate,
    Resource,
    ResourceType,
    parse_intents,
    validate_ttl,
)
from klock_async.rules import overlaps

# --- predicates -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("MUTATES", Predicate.MUTATES, id="upper"),
        pytest.param("mutates", Predicate.MUTATES, id="lower"),
        pytest.param("Consumes", Predicate.CONSUMES, id="mixed"),
        pytest.param("  depends_on ", Predicate.DEPENDS_ON, id="padded"),
        pytest.param("RENAMES", Predicate.RENAMES, id="renames"),
        pytest.param("deletes", Predicate.DELETES, id="deletes"),
        pytest.param("provides", Predicate.PROVIDES, id="provides"),
        pytest.param(Predicate.MUTATES, Predicate.MUTATES, id="member"),
    ],
)
def test_predicate_parse(text: Any, expected: Predicate) -> None:
    """Predicate names parse case-insensitively."""
    assert Predicate.parse(text) is expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("MUTATE", id="typo-missing-s"),
        pytest.param("MUTATESS", id="typo-extra-s"),
        pytest.param("DEPENDS-ON", id="dash"),
        pytest.param("READ", id="other-vocabulary"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param(None, id="none"),
        pytest.param(3, id="number"),
        pytest.param("mutates\x00", id="nul"),
    ],
)
def test_predicate_typo_is_an_error(text: Any) -> None:
    """An unknown predicate raises a typed error and never falls back to a default."""
    with pytest.raises(InvalidPredicateError, match="unknown predicate"):
        Predicate.parse(text)


def test_invalid_predicate_is_a_value_error() -> None:
    """Bad input errors are ValueErrors too, for callers that catch the builtin."""
    with pytest.raises(ValueError):
        Predicate.parse("MUTATE")
    assert issubclass(InvalidPredicateError, InvalidRequestError)


@pytest.mark.parametrize(
    ("predicate", "writes"),
    [
        pytest.param(p, p not in (Predicate.CONSUMES, Predicate.DEPENDS_ON), id=p.value)
        for p in Predicate
    ],
)
def test_predicate_writes(predicate: Predicate, writes: bool) -> None:
    """Only CONSUMES and DEPENDS_ON leave the resource unchanged."""
    assert predicate.writes is writes


# --- resources ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("src/auth.js", "FILE:/src/auth.js", id="bare-relative"),
        pytest.param("/src/auth.js", "FILE:/src/auth.js", id="bare-absolute"),
        pytest.param("FILE:/src/auth.js", "FILE:/src/auth.js", id="typed"),
        pytest.param("FILE:src/auth.js", "FILE:/src/auth.js", id="typed-relative"),
        pytest.param("file:/src/auth.js", "FILE:/src/auth.js", id="type-lowercase"),
        pytest.param("a/./b", "FILE:/a/b", id="dot"),
        pytest.param("a//b", "FILE:/a/b", id="double-slash"),
        pytest.param("a/x/../b", "FILE:/a/b", id="dotdot"),
        pytest.param("//a", "FILE:/a", id="leading-double-slash"),
        pytest.param("///a", "FILE:/a", id="leading-triple-slash"),
        pytest.param("/../a", "FILE:/a", id="dotdot-above-root"),
        pytest.param("/a/", "FILE:/a", id="trailing-slash"),
        pytest.param("  /a  ", "FILE:/a", id="padded"),
        pytest.param("/", "FILE:/", id="root"),
        pytest.param("FILE:C:/x", "FILE:/C:/x", id="explicit-file-with-colon"),
        pytest.param("SYMBOL:auth.login", "SYMBOL:auth.login", id="symbol"),
        pytest.param("symbol: auth.login ", "SYMBOL:auth.login", id="symbol-padded"),
        pytest.param("DATABASE_TABLE:users", "DATABASE_TABLE:users", id="table"),
        pytest.param("CONFIG_KEY:db.url", "CONFIG_KEY:db.url", id="config-key"),
        pytest.param("API_ENDPOINT:/v1/users", "API_ENDPOINT:/v1/users", id="endpoint"),
        pytest.param("SYMBOL:a//b", "SYMBOL:a//b", id="symbol-not-normalised"),
    ],
)
def test_resource_parse(text: str, expected: str) -> None:
    """Resources parse to TYPE:path; bare paths are FILEs, normalised and absolute."""
    assert str(Resource.parse(text)) == expected


def test_equivalent_spellings_are_one_resource() -> None:
    """Different spellings of one file are equal and hash alike."""
    spellings = [
        "src/auth.js",
        "/src/auth.js",
        "FILE:/src/auth.js",
        "src/./auth.js",
        "src//auth.js",
        "src/lib/../auth.js",
        "FILE:src/auth.js",
    ]
    resources = {Resource.parse(s) for s in spellings}
    assert resources == {Resource(ResourceType.FILE, "/src/auth.js")}


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("FIEL:/x", id="typo-type"),
        pytest.param("FILES:/x", id="plural-type"),
        pytest.param("http://example.com", id="url-like"),
        pytest.param("C:/x", id="drive-letter"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("FILE:", id="type-without-path"),
        pytest.param("SYMBOL:   ", id="type-with-blank-path"),
        pytest.param(None, id="none"),
        pytest.param(42, id="number"),
        pytest.param(b"/x", id="bytes"),
    ],
)
def test_resource_errors(text: Any) -> None:
    """A bad resource raises InvalidResourceError, never a silent FILE."""
    with pytest.raises(InvalidResourceError):
        Resource.parse(text)


def test_resource_of_validates_type_and_path() -> None:
    """Resource.of checks the type name and the path."""
    assert Resource.of("symbol", "x") == Resource(ResourceType.SYMBOL, "x")
    with pytest.raises(InvalidResourceError, match="unknown resource type"):
        Resource.of("FIEL", "/x")
    with pytest.raises(InvalidResourceError, match="empty path"):
        Resource.of(ResourceType.FILE, "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("/src/lib/a.js", ["/src/lib", "/src", "/"], id="deep"),
        pytest.param("/a", ["/"], id="top"),
        pytest.param("/", [], id="root"),
        pytest.param("SYMBOL:auth.login", [], id="symbol-flat"),
        pytest.param("SYMBOL:pkg/mod/f", ["pkg/mod", "pkg"], id="symbol-relative-path"),
    ],
)
def test_ancestors(text: str, expected: list[str]) -> None:
    """Ancestors are the enclosing paths of the same type, nearest first."""
    resource = Resource.parse(text)
    assert [a.path for a in resource.ancestors()] == expected
    assert all(a.type is resource.type for a in resource.ancestors())
    assert resource.up == tuple(a.key for a in resource.ancestors())  # the scheduler's keys


def test_resource_key_is_its_printed_form_and_survives_copies() -> None:
    """``key`` is ``TYPE:path``; copies and pickles rebuild it, and it never enters equality."""
    resource = Resource.parse("src/lib/a.js")
    assert resource.key == str(resource) == "FILE:/src/lib/a.js"
    for clone in (
        copy.copy(resource),
        copy.deepcopy(resource),
        pickle.loads(pickle.dumps(resource)),
        dataclasses.replace(resource),
    ):
        assert clone == resource
        assert (clone.key, clone.up) == (resource.key, resource.up)
    moved = dataclasses.replace(resource, path="/other/b.js")
    assert (moved.key, moved.up) == ("FILE:/other/b.js", ("FILE:/other", "FILE:/"))
    assert "key" not in repr(resource)
    with pytest.raises(TypeError):
        Resource(ResourceType.FILE, "/a", "FILE:/b")  # type: ignore[call-arg]


@pytest.mark.parametrize("members", [Predicate, ResourceType, LeaseState, IsolationLevel])
def test_enum_members_hash_consistently_with_equality(members: Any) -> None:
    """Members hash by identity (in C); lookups by member and by parsed value agree."""
    table = {member: member.value for member in members}
    for member in members:
        assert table[members(member.value)] == member.value
        assert hash(member) == hash(members(member.value))


segments = st.sampled_from(["a", "b", "src", "srcx", ".", "..", "", "x.js"])
paths = st.lists(segments, min_size=1, max_size=5).map("/".join)
prefixes = st.sampled_from(["", "/", "FILE:", "SYMBOL:", "SYMBOL:/", "CONFIG_KEY:"])


@given(prefix=prefixes, path=paths)
def test_parse_is_idempotent(prefix: str, path: str) -> None:
    """Parsing the printed form of a resource gives the same resource."""
    try:
        resource = Resource.parse(prefix + path)
    except InvalidResourceError:
        return
    assert Resource.parse(str(resource)) == resource


@given(a=st.tuples(prefixes, paths), b=st.tuples(prefixes, paths))
def test_overlaps_agrees_with_ancestors(a: tuple[str, str], b: tuple[str, str]) -> None:
    """rules.overlaps and Resource.ancestors describe the same hierarchy (the index uses both)."""
    try:
        ra, rb = Resource.parse("".join(a)), Resource.parse("".join(b))
    except InvalidResourceError:
        return
    by_index = ra == rb or ra in set(rb.ancestors()) or rb in set(ra.ancestors())
    assert overlaps(ra, rb) is by_index
    by_keys = ra.key == rb.key or ra.key in rb.up or rb.key in ra.up
    assert by_keys is by_index


# --- intents and ttl ------------------------------------------------------------------------


def test_parse_intents() -> None:
    """Pairs and Intents mix; every pair is validated."""
    intent = Intent.of("FILE:/b", "consumes")
    parsed = parse_intents([("a", "MUTATES"), intent])
    assert parsed == (Intent(Resource.parse("/a"), Predicate.MUTATES), intent)


@pytest.mark.parametrize(
    ("pairs", "error"),
    [
        pytest.param([], InvalidResourceError, id="empty"),
        pytest.param([("a", "MUTATE")], InvalidPredicateError, id="bad-predicate"),
        pytest.param(
            [("a", "MUTATES"), ("FIEL:/b", "MUTATES")], InvalidResourceError, id="bad-second"
        ),
        pytest.param([("a",)], InvalidResourceError, id="short-pair"),
        pytest.param([("a", "MUTATES", "x")], InvalidResourceError, id="long-pair"),
        pytest.param([42], InvalidResourceError, id="not-a-pair"),
        pytest.param(None, InvalidResourceError, id="none"),
    ],
)
def test_parse_intents_errors(pairs: Any, error: type[Exception]) -> None:
    """A malformed request raises a typed error."""
    with pytest.raises(error):
        parse_intents(pairs)


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        pytest.param(30, 30.0, id="int"),
        pytest.param(0.05, 0.05, id="small-float"),
        pytest.param(1e-9, 1e-9, id="tiny"),
        pytest.param(1e9, 1e9, id="huge"),
    ],
)
def test_validate_ttl(ttl: float, expected: float) -> None:
    """A positive finite ttl comes back as a float."""
    value = validate_ttl(ttl)
    assert value == expected
    assert type(value) is float


@pytest.mark.parametrize(
    "ttl",
    [
        pytest.param(0, id="zero"),
        pytest.param(-0.0, id="negative-zero"),
        pytest.param(-1, id="negative"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param(float("-inf"), id="minus-inf"),
        pytest.param(True, id="bool"),
        pytest.param("5", id="string"),
        pytest.param(None, id="none"),
        pytest.param([5], id="list"),
    ],
)
def test_validate_ttl_errors(ttl: Any) -> None:
    """A ttl that is not a positive finite number raises InvalidTTLError."""
    with pytest.raises(InvalidTTLError, match="ttl must be a positive number"):
        validate_ttl(ttl)


def test_values_are_frozen() -> None:
    """Snapshots handed out cannot be changed by their receiver."""
    info = LeaseInfo("id", "a", "s", Resource.parse("/x"), Predicate.MUTATES, 1, 1.0, 2.0)
    assert info.state is LeaseState.ACTIVE
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.token = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Resource.parse("/x").path = "/y"  # type: ignore[misc]


def test_agent_info_names_the_agent_as_lease_info_does() -> None:
    """AgentInfo.agent_id is the name LeaseInfo uses; id stays as a deprecated alias."""
    from klock_async import AgentInfo, LeaseInfo

    info = AgentInfo("coder", 3)
    assert (info.agent_id, info.id) == ("coder", "coder")
    assert "agent_id" in {f.name for f in dataclasses.fields(AgentInfo)}
    assert "agent_id" in {f.name for f in dataclasses.fields(LeaseInfo)}
