"""Bad input: Hypothesis fuzzing of the decoders, and wrong arguments everywhere.

* Decoding any JSON value, any near-valid Execution, or any bytes gives a model or a
  :class:`ResponseDecodeError`, never another exception; ``error_from_response`` always
  gives an :class:`APIStatusError`. Both JSON back ends are fuzzed: orjson (the ``fast``
  extra) and the standard library's ``json`` (used when orjson is absent).
* ``decode(encode(x)) == x`` for generated valid Executions, outputs, events and refs.
* Every public function or constructor given a wrong type or value raises a clear
  TypeError/ValueError naming the argument, before any request is sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from unittest import mock
from urllib.parse import unquote

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from dedalus_async import (
    APIStatusError,
    ArtifactRef,
    Execution,
    ExecutionEvent,
    ExecutionOutput,
    ExecutionRef,
    PollPolicy,
    RateLimitedError,
    ResponseDecodeError,
    RetryPolicy,
    Session,
)
from dedalus_async import _wire as wire
from dedalus_async._errors import error_for_status
from dedalus_async.testing import FakeClock, FakeDedalus

from .conftest import API_KEY

MACHINE = "dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0"  # the real form: "dm-" and a UUID

NOW = datetime(2026, 1, 1, tzinfo=UTC)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# For the many parametrized copies of one property, and the costly composite strategies.
LIGHT = settings(FUZZ, max_examples=50)
LOADERS = {"orjson": orjson.loads, "json": json.loads}


@contextmanager
def loader(name: str) -> Iterator[None]:
    """Decode with the named JSON back end (the module picks orjson when it is installed)."""
    with mock.patch.object(wire, "_loads", LOADERS[name]):
        yield


def response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> wire.Response:
    return wire.Response(status, CIMultiDict(headers or {}), body)


# --- strategies ------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text())
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
int64 = st.integers(-(2**63), 2**63 - 1)
# What a well-behaved server sends: no NaN or Infinity, integers within int64.
strict_json_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(), st.booleans(), int64, st.floats(allow_nan=False, allow_infinity=False), st.text()
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
datetimes = st.builds(
    lambda dt, tz: dt.replace(tzinfo=tz),
    st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)),
    offsets,
)


def rfc3339(dt: datetime, zulu: bool) -> str:
    """RFC 3339 text of an aware datetime: ``Z`` for UTC when asked, else ``+hh:mm``."""
    offset = dt.utcoffset()
    assert offset is not None
    minutes = int(offset.total_seconds() // 60)
    if minutes == 0 and zulu:
        zone = "Z"
    else:
        sign = "+" if minutes >= 0 else "-"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond:06d}{zone}"


EXECUTION_FIELDS = {a.name for a in Execution.__attrs_attrs__}
# what the official SDK (0.6.0) requires of an Execution; `command` is optional there
REQUIRED = ("execution_id", "machine_id", "created_at", "status")


@st.composite
def executions(draw: st.DrawFn) -> tuple[dict[str, Any], Execution]:
    """A valid Execution and its wire dict (optional fields absent, null or set; unknown
    fields of a newer server added)."""
    text = st.text(max_size=30)
    optional: dict[str, st.SearchStrategy[Any]] = {
        "started_at": datetimes,
        "completed_at": datetimes,
        "cwd": text,
        "env_keys": st.lists(text, max_size=4).map(tuple),
        "exit_code": int64,
        "signal": int64,
        "error_code": text,
        "error_message": text,
        "stdout_bytes": int64,
        "stderr_bytes": int64,
        "stdout_truncated": st.booleans(),
        "stderr_truncated": st.booleans(),
        "retry_after_ms": int64,
        "expires_at": datetimes,
        "artifacts": st.lists(st.builds(ArtifactRef, text, text), max_size=3).map(tuple),
    }
    fields: dict[str, Any] = {
        "execution_id": draw(st.text(min_size=1, max_size=40)),
        "machine_id": draw(st.text(min_size=1, max_size=40)),
        "command": draw(st.none() | st.lists(text, max_size=5).map(tuple)),
        "created_at": draw(datetimes),
        "status": draw(
            st.sampled_from(["queued", "running", "succeeded", "failed", "expired"]) | text
        ),
    }
    wire_dict: dict[str, Any] = {}
    for name, strategy in optional.items():
        how = draw(st.sampled_from(["absent", "null", "set"]))
        if how == "set":
            fields[name] = draw(strategy)
        elif how == "null":
            wire_dict[name] = None
    zulu = draw(st.booleans())
    for name, value in fields.items():
        if isinstance(value, datetime):
            wire_dict[name] = rfc3339(value, zulu)
        elif name == "artifacts":
            wire_dict[name] = [{"artifact_id": a.artifact_id, "name": a.name} for a in value]
        elif isinstance(value, tuple):
            wire_dict[name] = list(value)
        else:
            wire_dict[name] = value
    extra = draw(
        st.dictionaries(
            st.text(max_size=12).filter(lambda k: k not in EXECUTION_FIELDS),
            strict_json_values,
            max_size=3,
        )
    )
    wire_dict.update(extra)
    return wire_dict, Execution(**fields)


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[dict[str, Any], str, str]:
    """A valid Execution's wire dict with exactly one field deleted or replaced by any
    JSON value; returns it with what was done and to which field."""
    wire_dict, _ = draw(executions())
    name = draw(st.sampled_from(sorted(EXECUTION_FIELDS)))
    how = draw(st.sampled_from(["delete", "replace"]))
    mutated = dict(wire_dict)
    if how == "delete":
        mutated.pop(name, None)
    else:
        mutated[name] = draw(json_values)
    return mutated, how, name


def dumps(value: Any) -> bytes:
    # allow_nan: NaN and Infinity are what a sloppy server sends; the decoder must cope
    return json.dumps(value, allow_nan=True).encode()


# --- decoders never raise anything but ResponseDecodeError -----------------------------

DECODERS: dict[str, Callable[[wire.Response], object]] = {
    "execution": wire.decode_execution,
    "output": wire.decode_output,
    "page": lambda r: wire.decode_page(r, Execution),
    "events": wire.decode_events,
}


def decodes_or_refuses(decoder: str, body: bytes) -> object | None:
    """Run a decoder; a ResponseDecodeError is an answer (None), anything else escapes."""
    try:
        return DECODERS[decoder](response(body))
    except ResponseDecodeError:
        return None


@pytest.mark.parametrize("backend", list(LOADERS))
@pytest.mark.parametrize("decoder", list(DECODERS))
@LIGHT
@given(value=json_values)
def test_any_json_decodes_or_is_a_decode_error(backend: str, decoder: str, value: Any) -> None:
    """Any JSON value (NaN, huge ints, nesting included) decodes or is ResponseDecodeError."""
    with loader(backend):
        decodes_or_refuses(decoder, dumps(value))


@pytest.mark.parametrize("backend", list(LOADERS))
@pytest.mark.parametrize("decoder", list(DECODERS))
@LIGHT
@given(body=st.binary(max_size=300))
@example(body=b"\xef\xbb\xbf{}")
@example(body=b"\xff\xfe{\x00}\x00")
@example(body=b'{"a": "\\ud800"}')
@example(body=b"1e400")
def test_any_bytes_decode_or_are_a_decode_error(backend: str, decoder: str, body: bytes) -> None:
    """Arbitrary bytes as a body decode or are ResponseDecodeError."""
    with loader(backend):
        decodes_or_refuses(decoder, body)


@pytest.mark.parametrize("backend", list(LOADERS))
@FUZZ
@given(case=near_valid())
def test_near_valid_execution_decodes_or_names_the_field(
    backend: str, case: tuple[dict[str, Any], str, str]
) -> None:
    """An Execution with one field deleted or replaced decodes, or is ResponseDecodeError;
    deleting a required field is always refused and the error names that field."""
    mutated, how, name = case
    with loader(backend):
        result = decodes_or_refuses("execution", dumps(mutated))
        if how == "delete" and name in REQUIRED:
            with pytest.raises(ResponseDecodeError) as info:
                wire.decode_execution(response(dumps(mutated)))
            assert info.value.field == name
        elif result is not None:
            assert isinstance(result, Execution)


@pytest.mark.parametrize("backend", list(LOADERS))
@pytest.mark.parametrize("depth", [100, 5_000, 100_000])
def test_deep_nesting_is_a_decode_error(backend: str, depth: int) -> None:
    """A body nested absurdly deep (a hostile proxy) is ResponseDecodeError for every
    decoder and still a typed APIStatusError as an error body, never RecursionError."""
    bodies = [b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth]
    with loader(backend):
        for body in bodies:
            for decoder in DECODERS:
                decodes_or_refuses(decoder, body)
            error = wire.error_from_response(response(body, 502), method="GET", path="/x", now=NOW)
            assert isinstance(error, APIStatusError)


# --- error responses ---------------------------------------------------------------------

header_names = st.sampled_from(
    ["retry-after", "Retry-After", "retry-after-ms", "content-type", "x-request-id", "x-other"]
)
http_dates = st.builds(
    "{}, {:02d} {} {} {:02d}:{:02d}:{:02d} {}".format,
    st.sampled_from(["Mon", "Tue", "Sun", "Xyz"]),
    st.integers(0, 99),
    st.sampled_from(["Jan", "Feb", "Dec", "Foo"]),
    st.one_of(st.integers(0, 3000), st.integers(0, 10**30)),
    st.integers(0, 10**20),
    st.integers(0, 99),
    st.integers(0, 99),
    st.sampled_from(["GMT", "+0000", "-2359", "+9999999999999999999", "UT", ""]),
)
header_values = st.one_of(
    st.text(max_size=40),
    http_dates,
    st.floats().map(str),
    st.integers().map(str),
)
OVERFLOWING_DATE = "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"


@FUZZ
@given(
    status=st.integers(300, 999),
    headers=st.dictionaries(header_names, header_values, max_size=4),
    body=st.one_of(json_values.map(dumps), st.binary(max_size=200)),
)
@example(status=429, headers={"Retry-After": OVERFLOWING_DATE}, body=b"")
@example(
    status=503, headers={"Retry-After": "Mon, 01 Jan 2026 00:00:00 +9999999999999999999"}, body=b""
)
@example(status=429, headers={"retry-after-ms": "1e400"}, body=b"{}")
@example(status=409, headers={}, body=b'{"error_code": "IDEMPOTENCY_KEY_REUSED", "details": []}')
@example(status=422, headers={}, body=b'{"title": 5, "detail": "", "status": "x"}')
@example(status=400, headers={}, body=b'{"code": "BAD", "error": "no", "details": {"a": 1}}')
def test_error_responses_always_give_a_typed_error(
    status: int, headers: dict[str, str], body: bytes
) -> None:
    """Any error status, headers and body give an APIStatusError of the class the status
    (or error code) calls for, never an exception; a 429's retry_after is finite or None."""
    error = wire.error_from_response(
        response(body, status, headers), method="GET", path="/p", now=NOW
    )
    assert isinstance(error, APIStatusError)
    assert type(error) is error_for_status(status, error.error_code)
    assert error.status == status
    assert str(error).startswith(f"HTTP {status}")
    if isinstance(error, RateLimitedError) and error.retry_after is not None:
        assert math.isfinite(error.retry_after)


@FUZZ
@given(headers=st.dictionaries(header_names, header_values, max_size=3))
@example(headers={"Retry-After": OVERFLOWING_DATE})
def test_parse_retry_after_is_a_finite_number_or_none(headers: dict[str, str]) -> None:
    """Whatever the headers say, the parsed pause is a finite number of seconds or None."""
    pause = wire.parse_retry_after(CIMultiDict(headers), NOW)
    assert pause is None or math.isfinite(pause)


# --- decode(encode(x)) == x --------------------------------------------------------------


@pytest.mark.parametrize("backend", list(LOADERS))
@FUZZ
@given(case=executions())
def test_execution_round_trips(backend: str, case: tuple[dict[str, Any], Execution]) -> None:
    """A valid Execution encoded as the API sends it decodes back to itself, offsets kept."""
    wire_dict, expected = case
    with loader(backend):
        decoded = wire.decode_execution(response(json.dumps(wire_dict).encode()))
    assert decoded == expected
    for name in ("created_at", "started_at", "completed_at", "expires_at"):
        got, want = getattr(decoded, name), getattr(expected, name)
        assert (got is None) == (want is None)
        if got is not None:
            assert got.utcoffset() == want.utcoffset()


@LIGHT
@given(items=st.lists(executions(), max_size=3), cursor=st.none() | st.text(max_size=10))
def test_page_round_trips(
    items: list[tuple[dict[str, Any], Execution]], cursor: str | None
) -> None:
    """A page of valid Executions decodes to those Executions and its cursor ("" is None)."""
    body = json.dumps({"items": [d for d, _ in items], "next_cursor": cursor}).encode()
    decoded, next_cursor = wire.decode_page(response(body), Execution)
    assert decoded == [e for _, e in items]
    assert next_cursor == (cursor or None)


@FUZZ
@given(
    output=st.builds(
        ExecutionOutput,
        execution_id=st.text(min_size=1),
        stdout=st.none() | st.text(),
        stderr=st.none() | st.text(),
        stdout_bytes=st.none() | int64,
        stderr_bytes=st.none() | int64,
        stdout_truncated=st.none() | st.booleans(),
        stderr_truncated=st.none() | st.booleans(),
    )
)
def test_output_round_trips(output: ExecutionOutput) -> None:
    """A valid /output body decodes back to the same ExecutionOutput."""
    body = json.dumps({a.name: getattr(output, a.name) for a in ExecutionOutput.__attrs_attrs__})
    assert wire.decode_output(response(body.encode())) == output


@FUZZ
@given(
    events=st.lists(
        st.builds(
            ExecutionEvent,
            at=datetimes,
            sequence=int64,
            type=st.sampled_from(["lifecycle", "stdout", "stderr"]) | st.text(),
            chunk=st.none() | st.text(),
            status=st.none() | st.text(),
            exit_code=st.none() | int64,
        ),
        max_size=5,
    )
)
def test_events_round_trip(events: list[ExecutionEvent]) -> None:
    """A page of valid events decodes back to the same events."""
    items = [
        {
            "at": rfc3339(e.at, zulu=True),
            "sequence": e.sequence,
            "type": e.type,
            "chunk": e.chunk,
            "status": e.status,
            "exit_code": e.exit_code,
        }
        for e in events
    ]
    decoded, cursor = wire.decode_events(response(json.dumps({"items": items}).encode()))
    assert decoded == events
    assert cursor is None


@FUZZ
@given(
    ref=st.builds(
        ExecutionRef,
        machine_id=st.text(),
        execution_id=st.text(),
        idempotency_key=st.none() | st.text(),
    )
)
def test_execution_ref_round_trips(ref: ExecutionRef) -> None:
    """to_json/from_json and to_dict/from_dict give the same ExecutionRef back."""
    assert ExecutionRef.from_json(ref.to_json()) == ref
    assert ExecutionRef.from_dict(ref.to_dict()) == ref


# --- wrong arguments: pure constructors and functions ----------------------------------


@FUZZ
@given(data=json_values)
def test_execution_ref_from_dict_of_anything(data: Any) -> None:
    """from_dict of any JSON value is an ExecutionRef or a TypeError/ValueError (never a
    KeyError or AttributeError)."""
    try:
        ref = ExecutionRef.from_dict(data)
    except (TypeError, ValueError):
        pass
    else:
        assert isinstance(ref.machine_id, str)
        assert isinstance(ref.execution_id, str)


@FUZZ
@given(text=st.one_of(st.text(), json_values.map(json.dumps), st.binary()))
def test_execution_ref_from_json_of_anything(text: str | bytes) -> None:
    """from_json of any text is an ExecutionRef or a TypeError/ValueError."""
    with suppress(TypeError, ValueError):
        assert isinstance(ExecutionRef.from_json(text), ExecutionRef)


@pytest.mark.parametrize("value", [5, None, [], 1.5, b"{}"])
def test_execution_ref_from_wrong_types_names_it(value: Any) -> None:
    """from_dict/from_json given something that is not a dict/str say what they wanted."""
    with pytest.raises((TypeError, ValueError)) as info:
        ExecutionRef.from_dict(value)
    assert "ExecutionRef" in str(info.value)
    if not isinstance(value, bytes):
        with pytest.raises((TypeError, ValueError)) as info:
            ExecutionRef.from_json(value)
        assert "ExecutionRef" in str(info.value)


not_a_number = st.one_of(
    st.text(max_size=5),
    st.binary(max_size=5),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.complex_numbers(allow_nan=False, allow_infinity=False).filter(lambda c: c.imag != 0),
)
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
POLICY_FIELDS = [(RetryPolicy, a.name) for a in RetryPolicy.__attrs_attrs__] + [
    (PollPolicy, a.name) for a in PollPolicy.__attrs_attrs__
]


@pytest.mark.parametrize(
    ("cls", "field"), POLICY_FIELDS, ids=[f"{c.__name__}.{f}" for c, f in POLICY_FIELDS]
)
@LIGHT
@given(
    value=st.one_of(not_a_number, not_finite, st.floats(max_value=-1e-9), st.integers(max_value=-1))
)
def test_policy_field_refuses_bad_values_by_name(
    cls: type[RetryPolicy] | type[PollPolicy], field: str, value: Any
) -> None:
    """Every policy field refuses a non-number, a non-finite or a negative value with a
    TypeError/ValueError naming Class.field."""
    with pytest.raises((TypeError, ValueError)) as info:
        cls(**{field: value})
    assert f"{cls.__name__}.{field}" in str(info.value)


@FUZZ
@given(value=st.one_of(st.text(), json_values, st.binary()))
@example(value="a/b")
@example(value="..")
@example(value="x" * 254)
@example(value="dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0\r\nHost: evil")
def test_ids_are_validated_and_encoded_as_one_segment(value: Any) -> None:
    """Any value as an ID is refused naming the argument, or becomes one percent-encoded
    path segment that decodes back to exactly the ID."""
    try:
        segment = wire.check_id("machine_id", value)
    except (TypeError, ValueError) as exc:
        refused: Exception | None = exc
    else:
        refused = None
    if refused is not None:
        assert "machine_id" in str(refused)
        return
    assert isinstance(value, str)
    assert "/" not in segment
    assert segment not in ("", ".", "..")
    assert unquote(segment) == value


@FUZZ
@given(
    command=st.one_of(json_values, st.lists(st.text(), min_size=1, max_size=3)),
    env=st.one_of(
        st.none(), json_values, st.dictionaries(st.text(max_size=6), st.text(), max_size=3)
    ),
    cwd=st.one_of(st.none(), st.text(), json_values),
    timeout_ms=st.one_of(st.none(), st.integers(), json_values),
)
def test_create_request_is_valid_or_names_the_argument(
    command: Any, env: Any, cwd: Any, timeout_ms: Any
) -> None:
    """Any create arguments build a request whose body says exactly what was asked, or
    raise a TypeError/ValueError naming the argument (and never echoing an env value)."""
    try:
        request = wire.create_request(
            MACHINE,
            command,
            env=env,
            cwd=cwd,
            timeout_ms=timeout_ms,
            idempotency_key="k",
        )
    except (TypeError, ValueError) as exc:
        message = str(exc)
        assert any(name in message for name in ("command", "env", "cwd", "timeout_ms"))
        if isinstance(env, dict):
            keys = repr(list(env))
            for value in env.values():
                if isinstance(value, str) and len(value) >= 4 and value not in keys:
                    assert value not in message
        return
    assert request.body is not None
    sent = json.loads(request.body)
    assert sent["command"] == list(command)
    assert sent.get("env") == env
    assert sent.get("cwd") == cwd
    assert sent.get("timeout_ms") == timeout_ms


# --- wrong arguments: the Session, before any request ------------------------------------

BAD_SESSION_ARGS: list[Any] = [
    pytest.param({"api_key": 5}, "api_key", id="api_key-int"),
    pytest.param({"api_key": ""}, "api_key", id="api_key-empty"),
    pytest.param({"api_key": "key\r\nX-Evil: 1"}, "api_key", id="api_key-crlf"),
    pytest.param({"base_url": 5}, "base_url", id="base_url-int"),
    pytest.param({"base_url": "ftp://example.com"}, "base_url", id="base_url-scheme"),
    pytest.param({"org_id": 5}, "org_id", id="org_id-int"),
    pytest.param({"org_id": "org\r\nX-Evil: 1"}, "org_id", id="org_id-crlf"),
    pytest.param({"auth_scheme": "basic"}, "auth_scheme", id="auth_scheme"),
    pytest.param({"request_timeout": "5"}, "request_timeout", id="request_timeout-str"),
    pytest.param({"request_timeout": math.nan}, "request_timeout", id="request_timeout-nan"),
    pytest.param({"request_timeout": -1}, "request_timeout", id="request_timeout-negative"),
    pytest.param({"retry": 3}, "retry", id="retry-int"),
    pytest.param({"retry": PollPolicy()}, "retry", id="retry-pollpolicy"),
    pytest.param({"poll": "fast"}, "poll", id="poll-str"),
    pytest.param({"poll": RetryPolicy()}, "poll", id="poll-retrypolicy"),
    pytest.param({"client_session": "http"}, "client_session", id="client_session-str"),
    pytest.param({"clock": object()}, "clock", id="clock-object"),
    pytest.param({"random": 0.5}, "random", id="random-float"),
    pytest.param({"max_connections": 0}, "max_connections", id="max_connections-zero"),
    pytest.param({"max_connections": "10"}, "max_connections", id="max_connections-str"),
    pytest.param({"max_requests_per_second": "5"}, "max_requests_per_second", id="max_rps-str"),
    pytest.param({"max_requests_per_second": -1}, "max_requests_per_second", id="max_rps-neg"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_SESSION_ARGS)
def test_session_refuses_bad_arguments_when_built(kwargs: dict[str, Any], name: str) -> None:
    """Session(...) refuses every wrong argument at construction, naming it."""
    arguments: dict[str, Any] = {"api_key": API_KEY, "base_url": "http://127.0.0.1:1"}
    arguments.update(kwargs)
    with pytest.raises((TypeError, ValueError)) as info:
        Session(**arguments)
    assert name in str(info.value)
    assert API_KEY not in str(info.value)


@pytest.fixture
async def quiet() -> AsyncIterator[tuple[FakeDedalus, Session]]:
    """A fake and an open Session on it; the test asserts the fake received nothing."""
    clock = FakeClock()
    async with (
        FakeDedalus(api_key=API_KEY, clock=clock) as fake,
        Session(API_KEY, base_url=fake.base_url, clock=clock) as session,
    ):
        yield fake, session


async def _call(
    session: Session, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Call one public operation to completion (iterators are iterated)."""
    if method == "list_executions":
        _ = [e async for e in session.list_executions(*args, **kwargs)]
    elif method == "iter_events":
        _ = [e async for e in session.iter_events(*args, **kwargs)]
    elif method == "wait":
        await session.execution(MACHINE, "exe-1").wait(*args, **kwargs)
    elif method == "watch":
        _ = [s async for s in session.execution(MACHINE, "exe-1").watch(*args, **kwargs)]
    elif method in ("execution", "attach"):
        getattr(session, method)(*args, **kwargs)
    else:
        await getattr(session, method)(*args, **kwargs)


BAD_CALLS: list[Any] = [
    ("create_execution", (5, ["x"]), {}, "machine_id"),
    ("create_execution", ("", ["x"]), {}, "machine_id"),
    ("create_execution", ("x" * 254, ["x"]), {}, "machine_id"),
    ("create_execution", ("dm\n1", ["x"]), {}, "machine_id"),
    ("create_execution", ("..", ["x"]), {}, "machine_id"),
    ("create_execution", (MACHINE, "ls -l"), {}, "command"),
    ("create_execution", (MACHINE, b"ls"), {}, "command"),
    ("create_execution", (MACHINE, ["ls", 5]), {}, "command[1]"),
    ("create_execution", (MACHINE, []), {}, "command"),
    ("create_execution", (MACHINE, 5), {}, "command"),
    ("create_execution", (MACHINE, ["x"]), {"cwd": 5}, "cwd"),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"env": ["A=1"]},
        "env",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"env": {"A": 1}},
        "env",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"env": {1: "a"}},
        "env",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"env": {"": "v"}},
        "env",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"env": {"A=B": "v"}},
        "env",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"stdin": b"bytes"},
        "stdin",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"timeout_ms": 1.5},
        "timeout_ms",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"timeout_ms": 0},
        "timeout_ms",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"timeout_ms": True},
        "timeout_ms",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"idempotency_key": 5},
        "idempotency_key",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"idempotency_key": "a b"},
        "idempotency_key",
    ),
    (
        "create_execution",
        (MACHINE, ["x"]),
        {"idempotency_key": ""},
        "idempotency_key",
    ),
    ("get_execution", (MACHINE, None), {}, "execution_id"),
    ("get_execution", (MACHINE, "a/b"), {}, "execution_id"),
    ("delete_execution", ("", "exe-1"), {}, "machine_id"),
    ("delete_execution", (MACHINE, "\x00"), {}, "execution_id"),
    ("get_output", (MACHINE, 7), {}, "execution_id"),
    ("list_executions", (MACHINE,), {"limit": 0}, "limit"),
    ("list_executions", (MACHINE,), {"limit": "10"}, "limit"),
    ("list_executions", (MACHINE,), {"limit": True}, "limit"),
    ("list_executions", ("dm/1",), {}, "machine_id"),
    ("iter_events", (MACHINE, "exe/1"), {}, "execution_id"),
    ("iter_events", (MACHINE, "exe-1"), {"cursor": 5}, "cursor"),
    ("execution", (None, "exe-1"), {}, "machine_id"),
    ("execution", (MACHINE, ""), {}, "execution_id"),
    ("attach", ("dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0/exe-1",), {}, "ref"),
    ("attach", ({"machine_id": MACHINE},), {}, "execution_id"),
    ("attach", ({"machine_id": 5, "execution_id": "e"},), {}, "machine_id"),
    ("attach", ({"machine_id": "", "execution_id": "e"},), {}, "machine_id"),
    (
        "attach",
        (
            {
                "machine_id": MACHINE,
                "execution_id": "e",
                "idempotency_key": 5,
            },
        ),
        {},
        "idempotency_key",
    ),
    ("run", (MACHINE, "ls"), {}, "command"),
    ("run", (MACHINE, ["x"]), {"env": {"A": None}}, "env"),
    ("run", (MACHINE, ["x"]), {"timeout": "5"}, "timeout"),
    ("run", (MACHINE, ["x"]), {"timeout": -1}, "timeout"),
    ("run", (MACHINE, ["x"]), {"timeout": math.nan}, "timeout"),
    ("run", (MACHINE, ["x"]), {"poll": "fast"}, "poll"),
    ("wait", (), {"timeout": "5"}, "timeout"),
    ("wait", (), {"timeout": 0}, "timeout"),
    ("wait", (), {"timeout": math.nan}, "timeout"),
    ("wait", (), {"timeout": True}, "timeout"),
    ("wait", (), {"timeout": math.inf}, "timeout"),
    ("wait", (), {"until": "succeeded"}, "until"),
    ("wait", (), {"until": []}, "until"),
    ("wait", (), {"until": [5]}, "until"),
    ("wait", (), {"until": 5}, "until"),
    ("wait", (), {"poll": "fast"}, "poll"),
    ("watch", (), {"timeout": "5"}, "timeout"),
]


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "name"),
    BAD_CALLS,
    ids=[f"{m}-{n}-{i}" for i, (m, _, _, n) in enumerate(BAD_CALLS)],
)
async def test_bad_arguments_fail_before_any_request(
    quiet: tuple[FakeDedalus, Session],
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str,
) -> None:
    """Every public operation refuses a wrong argument with a TypeError/ValueError naming
    it, and the server never hears of the call."""
    fake, session = quiet
    with pytest.raises((TypeError, ValueError)) as info:
        await _call(session, method, args, kwargs)
    assert name in str(info.value)
    assert fake.requests == []
    assert fake.create_count == 0


@pytest.mark.parametrize("backend", list(LOADERS))
@FUZZ
@given(value=json_values)
def test_any_json_error_body_gives_an_api_status_error(backend: str, value: Any) -> None:
    """An error body of any JSON gives an APIStatusError keeping the body's text."""
    body = dumps(value)
    with loader(backend):
        error = wire.error_from_response(response(body, 500), method="GET", path="/", now=NOW)
    assert isinstance(error, APIStatusError)
    assert error.body == body[:2000].decode("utf-8", "replace")
