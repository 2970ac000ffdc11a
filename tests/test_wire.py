"""The wire format without I/O: request building, validation, and decoding recorded samples."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from multidict import CIMultiDict

from dedalus_async import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    Execution,
    ExecutionStatus,
    IdempotencyKeyReusedError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    ResponseDecodeError,
    ServerError,
    UnprocessableEntityError,
)
from dedalus_async import _wire as wire

SAMPLES = Path(__file__).parent / "samples"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
MACHINE = "dm-95e5a864-0e30-55bf-b0c5-dd9c4df102d1"  # the real form: "dm-" and a UUID


def response(name_or_body: str | bytes, status: int = 200, **headers: str) -> wire.Response:
    body = (
        name_or_body if isinstance(name_or_body, bytes) else (SAMPLES / name_or_body).read_bytes()
    )
    return wire.Response(status, CIMultiDict(headers), body)


# --- decoding samples ----------------------------------------------------------------


def test_full_execution_decodes_every_field() -> None:
    """Every documented field arrives typed, datetimes timezone-aware, lists as tuples."""
    ex = wire.decode_execution(response("execution_full.json"))
    assert ex.execution_id == "exe-0123456789abcdef"
    assert ex.command == ("/bin/bash", "-c", "echo hi")
    assert ex.created_at == datetime(2023, 11, 7, 5, 31, 56, tzinfo=UTC)
    assert ex.started_at is not None
    assert ex.started_at.microsecond == 125000
    assert ex.completed_at is not None
    assert ex.completed_at.utcoffset() == timedelta(0)
    assert ex.env_keys == ("FOO", "BAR")
    assert ex.exit_code == 0
    assert ex.signal is None
    assert ex.stdout_bytes == 3
    assert ex.stdout_truncated is False
    assert ex.artifacts is not None
    assert ex.artifacts[0].name == "report.txt"
    assert ex.is_terminal
    assert ex.status == ExecutionStatus.SUCCEEDED


def test_minimal_execution_needs_only_required_fields() -> None:
    """Optional fields may be missing; a null command is allowed."""
    ex = wire.decode_execution(response("execution_minimal.json"))
    assert ex.command is None
    assert ex.retry_after_ms is None
    assert not ex.is_terminal


def test_uuid_ids_and_hints_decode() -> None:
    """Bare-UUID IDs (the newer SDK's form) and the server hints decode."""
    ex = wire.decode_execution(response("execution_waking.json"))
    assert ex.machine_id == "0b6e2f7a-3c44-4d1e-8f2b-9d5e1c7a4b30"
    assert ex.status == "wake_in_progress"
    assert ex.retry_after_ms == 2000
    assert ex.expires_at == datetime(2023, 11, 7, 5, 41, 56, tzinfo=UTC)


def test_unknown_status_and_fields_of_newer_servers_decode() -> None:
    """An unknown status decodes unchanged and is not terminal; unknown fields are ignored."""
    ex = wire.decode_execution(response("execution_newer_server.json"))
    assert ex.status == "paused_for_maintenance"
    assert not ex.is_terminal


@pytest.mark.parametrize(
    ("sample", "field"),
    [
        ("execution_missing_status.json", "status"),
        ("execution_wrong_type.json", "exit_code"),
        ("execution_bad_date.json", "created_at"),
    ],
)
def test_bad_execution_names_the_field(sample: str, field: str) -> None:
    """A missing or mistyped field raises ResponseDecodeError naming that field."""
    with pytest.raises(ResponseDecodeError) as info:
        wire.decode_execution(response(sample))
    assert info.value.field == field
    assert field in str(info.value)
    assert info.value.status == 200
    assert info.value.body.startswith("{")


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b'{"execution_id": ', b"[]", b"null", b'"x"', b"<html></html>"],
)
def test_non_object_bodies_raise_decode_error(body: bytes) -> None:
    """Anything but a JSON object where an Execution belongs is a ResponseDecodeError."""
    with pytest.raises(ResponseDecodeError):
        wire.decode_execution(response(body))


def test_bool_is_not_an_int_and_int_is_not_a_string() -> None:
    """Strict types: JSON true is not an exit code; a number is not an ID."""
    base = json.loads((SAMPLES / "execution_minimal.json").read_text())
    with pytest.raises(ResponseDecodeError, match="exit_code"):
        wire.decode_execution(response(json.dumps({**base, "exit_code": True}).encode()))
    with pytest.raises(ResponseDecodeError, match="execution_id"):
        wire.decode_execution(response(json.dumps({**base, "execution_id": 7}).encode()))
    with pytest.raises(ResponseDecodeError, match="command"):
        wire.decode_execution(response(json.dumps({**base, "command": ["a", 1]}).encode()))


def test_naive_datetime_is_read_as_utc() -> None:
    """A timestamp without an offset is tolerated and read as UTC."""
    base = json.loads((SAMPLES / "execution_minimal.json").read_text())
    ex = wire.decode_execution(
        response(json.dumps({**base, "created_at": "2023-11-07T05:31:56"}).encode())
    )
    assert ex.created_at.tzinfo is UTC


def test_page_and_end_markers() -> None:
    """Pages decode items and cursor; null items and an empty cursor mean the end."""
    items, cursor = wire.decode_page(response("page_executions.json"), Execution)
    assert [i.execution_id for i in items] == ["exe-1"]
    assert cursor == "c1"
    items, cursor = wire.decode_page(response("page_last_null_items.json"), Execution)
    assert items == []
    assert cursor is None


def test_raw_pages_structure_only_the_items_taken() -> None:
    """raw_page gives a page's items as JSON values with its cursor (the fan-out looks at
    them raw); structure_item checks one, and a bad one is reported with the page's
    status and body, as a decoded page would be."""
    page = response("page_executions.json")
    items, cursor = wire.raw_page(page)
    assert cursor == "c1"
    assert [item["execution_id"] for item in items] == ["exe-1"]
    ex = wire.structure_item(items[0], Execution, page)
    assert type(ex) is Execution
    assert ex.execution_id == "exe-1"
    bad = response(b'{"items": [{"execution_id": "exe-2"}], "next_cursor": null}')
    items, cursor = wire.raw_page(bad)
    assert (items, cursor) == ([{"execution_id": "exe-2"}], None)
    with pytest.raises(ResponseDecodeError) as info:
        wire.structure_item(items[0], Execution, bad)
    assert info.value.status == 200
    assert "exe-2" in str(info.value.body)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"items": {}, "next_cursor": null}', "items"),
        (b'{"items": [], "next_cursor": 5}', "next_cursor"),
    ],
)
def test_malformed_pages(body: bytes, field: str) -> None:
    """A page whose items are not a list, or whose cursor is not a string, is refused."""
    with pytest.raises(ResponseDecodeError) as info:
        wire.decode_page(response(body), Execution)
    assert info.value.field == field


def test_output_and_events() -> None:
    """Output is plain text; events keep order, and an unknown event type decodes."""
    out = wire.decode_output(response("output.json"))
    assert out.stdout == "hello\n"
    assert out.stdout_bytes == 6
    events, cursor = wire.decode_events(response("events_page.json"))
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert events[1].chunk == "hello\n"
    assert events[2].exit_code == 0
    assert events[3].type == "heartbeat"
    assert cursor is None


# --- errors --------------------------------------------------------------------------


def err(name_or_body: str | bytes, status: int, **headers: str) -> APIStatusError:
    return wire.error_from_response(
        response(name_or_body, status, **headers), method="GET", path="/v1/x", now=NOW
    )


def test_api_error_shape() -> None:
    """The {error_code, message, retryable} shape fills the error's attributes."""
    e = err("error_auth_invalid.json", 401, **{"X-Request-Id": "req-42"})
    assert type(e) is AuthenticationError
    assert e.error_code == "AUTH_INVALID"
    assert e.message == "invalid API key"
    assert e.retryable is False
    assert e.request_id == "req-42"
    assert str(e) == "HTTP 401 AUTH_INVALID: invalid API key (GET /v1/x) [request req-42]"


def test_problem_json_shape() -> None:
    """RFC 7807 problem JSON gives the detail as message and its members as details."""
    e = err("error_problem_422.json", 422)
    assert type(e) is UnprocessableEntityError
    assert e.message == "command: must not be empty"
    assert e.details["title"] == "Unprocessable Entity"
    assert e.error_code is None


def test_idempotency_key_reused_by_code_whatever_the_status() -> None:
    """IDEMPOTENCY_KEY_REUSED maps to its own class, with details kept."""
    for status in (400, 409, 422):
        e = err("error_idempotency_reused.json", status)
        assert type(e) is IdempotencyKeyReusedError
        assert e.retryable is False
        assert e.details == {"idempotency_key": "0190c2f7a1b27abc"}


def test_html_body_still_gives_typed_error() -> None:
    """A proxy's HTML page gives the typed error with the status and a body snippet."""
    e = err("error_proxy_502.html", 502, **{"Content-Type": "text/html"})
    assert type(e) is ServerError
    assert e.status == 502
    assert "text/html" in e.message
    assert "Bad Gateway" in e.body


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, UnprocessableEntityError),
        (429, RateLimitedError),
        (500, ServerError),
        (503, ServerError),
        (418, APIStatusError),
    ],
)
def test_status_classes(status: int, cls: type[APIStatusError]) -> None:
    """Each documented status has its class; an empty body is fine."""
    e = err(b"", status)
    assert type(e) is cls
    assert e.status == status


def test_redirect_is_an_error_with_a_reason() -> None:
    """A 3xx is not followed: it becomes an error saying why, whatever its body says."""
    e = err(b"", 307, Location="https://elsewhere.example.com/")
    assert type(e) is APIStatusError
    assert "redirect to https://elsewhere.example.com/" in e.message
    e = err(b'{"message": "Found", "error_code": "MOVED"}', 302)
    assert e.message.startswith("Found; the server answered with a redirect")


def test_rate_limited_carries_retry_after() -> None:
    """429 exposes the server's pause in seconds."""
    e = err(b'{"error_code":"RATE_LIMITED","message":"slow down"}', 429, **{"Retry-After": "3"})
    assert isinstance(e, RateLimitedError)
    assert e.retry_after == 3.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "150"}, 0.15),
        ({"retry-after-ms": "150", "Retry-After": "9"}, 0.15),
        ({"Retry-After": "2"}, 2.0),
        ({"Retry-After": " 1.5 "}, 1.5),
        ({"Retry-After": "Thu, 01 Jan 2026 00:00:30 GMT"}, 30.0),
        ({"Retry-After": "Wed, 31 Dec 2025 23:59:00 GMT"}, -60.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({"retry-after-ms": "x", "Retry-After": "4"}, 4.0),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    """retry-after-ms wins; Retry-After takes seconds or an HTTP date; garbage is None."""
    assert wire.parse_retry_after(CIMultiDict(headers), NOW) == expected


# --- building requests and validating arguments --------------------------------------


def test_create_request_body_is_compact_and_stable() -> None:
    """The create body is serialised once, so retries send identical bytes."""
    req = wire.create_request(
        "dm-95e5a864-0e30-55bf-b0c5-dd9c4df102d1",
        ["echo", "hé"],
        cwd="/tmp",
        env={"A": "1"},
        stdin="in",
        timeout_ms=5000,
        idempotency_key="k",
    )
    assert req.method == "POST"
    assert req.path == "/v1/machines/dm-95e5a864-0e30-55bf-b0c5-dd9c4df102d1/executions"
    assert req.idempotency_key == "k"
    assert (
        req.body
        == (
            '{"command":["echo","hé"],"cwd":"/tmp","env":{"A":"1"},"stdin":"in","timeout_ms":5000}'
        ).encode()
    )
    minimal = wire.create_request(MACHINE, ("true",), idempotency_key="k")
    assert minimal.body == b'{"command":["true"]}'


def test_ids_are_percent_encoded_path_segments() -> None:
    """Unusual but valid IDs are encoded, never interpreted as path syntax."""
    req = wire.execution_request("GET", "dm a?b#c%", "e:1", "/output")
    assert req.path == "/v1/machines/dm%20a%3Fb%23c%25/executions/e%3A1/output"


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        ("", ValueError, "must not be empty"),
        ("a/b", ValueError, "'/'"),
        ("a\nb", ValueError, "control"),
        ("x" * 254, ValueError, "at most 253"),
        ("..", ValueError, "not an ID"),
        (5, TypeError, "must be a str"),
        (None, TypeError, "must be a str"),
    ],
)
def test_bad_ids_are_refused(value: object, error: type[Exception], words: str) -> None:
    """IDs that can never be valid are refused with the field named."""
    with pytest.raises(error) as info:
        wire.check_id("machine_id", value)
    assert "machine_id" in str(info.value)
    assert words in str(info.value)


def test_both_id_forms_are_accepted() -> None:
    """dm- IDs and bare UUIDs both pass, as does a 253-character ID."""
    assert (
        wire.check_id("machine_id", "dm-95e5a864-0e30-55bf-b0c5-dd9c4df102d1")
        == "dm-95e5a864-0e30-55bf-b0c5-dd9c4df102d1"
    )
    assert wire.check_id("machine_id", "0b6e2f7a-3c44-4d1e-8f2b-9d5e1c7a4b30")
    assert wire.check_id("machine_id", "x" * 253)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"command": "ls -la"}, TypeError, "['/bin/sh', '-c', 'ls -la']"),
        ({"command": []}, ValueError, "must not be empty"),
        ({"command": ["ls", 3]}, TypeError, "command[1]"),
        ({"command": 5}, TypeError, "list of strings"),
        ({"command": ["ls"], "env": {"A": 1}}, TypeError, "env['A']"),
        ({"command": ["ls"], "env": {1: "a"}}, TypeError, "env keys"),
        ({"command": ["ls"], "env": {"A=B": "a"}}, ValueError, "env key"),
        ({"command": ["ls"], "env": ["A"]}, TypeError, "env must be a mapping"),
        ({"command": ["ls"], "timeout_ms": 1.5}, TypeError, "timeout_ms=int(seconds * 1000)"),
        ({"command": ["ls"], "timeout_ms": 0}, ValueError, "positive"),
        ({"command": ["ls"], "timeout_ms": True}, TypeError, "timeout_ms"),
        ({"command": ["ls"], "cwd": 3}, TypeError, "cwd"),
        ({"command": ["ls"], "stdin": b"x"}, TypeError, "stdin"),
    ],
)
def test_bad_create_arguments(
    kwargs: dict[str, object], error: type[Exception], words: str
) -> None:
    """Every create argument is checked; the error names the field and the fix."""
    with pytest.raises(error) as info:
        wire.create_request(MACHINE, idempotency_key="k", **kwargs)
    assert words in str(info.value)


def test_env_values_never_appear_in_errors() -> None:
    """A bad env value is refused without echoing it (it may be a secret)."""
    with pytest.raises(TypeError) as info:
        wire.check_env({"TOKEN": b"sekrit-value"})
    assert "sekrit" not in str(info.value)


@pytest.mark.parametrize("key", ["", "has space", "é", "x" * 256, "a\nb"])
def test_bad_idempotency_keys(key: str) -> None:
    """Caller keys must be 1-255 visible ASCII characters."""
    with pytest.raises(ValueError, match="idempotency_key"):
        wire.check_idempotency_key(key)


def test_compact_uuid7_shape() -> None:
    """12 hex of Unix ms, a 7, 19 random hex: 32 lowercase hex digits."""
    key = wire.new_idempotency_key(0x0190C2F7A1B2, (1 << 76) - 1)
    assert key == "0190c2f7a1b2" + "7" + "f" * 19
    assert len(wire.new_idempotency_key(1, 0)) == 32
    assert wire.new_idempotency_key(1, 0) == "000000000001" + "7" + "0" * 19


def test_page_request_params() -> None:
    """Page requests carry limit and cursor only when given."""
    assert wire.page_request("/p", limit=None, cursor=None).params is None
    assert wire.page_request("/p", limit=5, cursor="c2").params == {"limit": "5", "cursor": "c2"}
    with pytest.raises(ValueError, match="limit"):
        wire.check_limit(0)
    with pytest.raises(TypeError, match="limit"):
        wire.check_limit("5")
