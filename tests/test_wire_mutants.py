"""Boundaries and user-facing messages of the wire format, found by mutation testing.

Each test pins a limit exactly at its edge (the largest value allowed, the smallest value
refused) or the text of an error a user reads (`nox -s mutation`, CONTRIBUTING.md).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from multidict import CIMultiDict

from dedalus_async import (
    APIStatusError,
    BadRequestError,
    Execution,
    ExecutionOutput,
    LogCapture,
    LogReadToken,
    LogStatus,
    NotFoundError,
    RateLimitedError,
    ResponseDecodeError,
)
from dedalus_async import _wire as wire

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _error(status: int, body: bytes, **headers: str) -> APIStatusError:
    response = wire.Response(status, CIMultiDict(headers), body)
    return wire.error_from_response(response, method="GET", path="/v1/x", now=NOW)


@pytest.mark.parametrize("dots", [".", ".."])
def test_dot_ids_are_refused(dots: str) -> None:
    """'.' and '..' would make the path /v1/machines/./executions: not an ID."""
    with pytest.raises(ValueError, match=rf"^machine_id '{dots}' is not an ID$"):
        wire.check_id("machine_id", dots)


def test_id_length_boundary() -> None:
    """253 characters is the longest ID; 254 is refused, saying how long it was."""
    assert wire.check_id("machine_id", "m" * 253) == "m" * 253
    assert wire.check_id("machine_id", "é" * 253) == "%C3%A9" * 253
    with pytest.raises(ValueError, match=r"^machine_id is 254 characters long; at most 253"):
        wire.check_id("machine_id", "m" * 254)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (3, TypeError, r"^execution_id must be a str, not int$"),
        ("", ValueError, r"^execution_id must not be empty$"),
        ("a/b", ValueError, r"^execution_id must not contain '/'"),
        ("a\nb", ValueError, r"^execution_id must not contain control characters$"),
    ],
)
def test_id_errors(value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        wire.check_id("execution_id", value)


def test_idempotency_key_length_boundary() -> None:
    """255 visible ASCII characters is the longest key; 256 is refused."""
    assert wire.check_idempotency_key("k" * 255) == "k" * 255
    with pytest.raises(ValueError, match=r"^idempotency_key must be 1-255 visible ASCII"):
        wire.check_idempotency_key("k" * 256)
    with pytest.raises(TypeError, match=r"^idempotency_key must be a str, not bytes$"):
        wire.check_idempotency_key(b"k")


def test_timeout_ms_boundary() -> None:
    """1 ms is the shortest time limit; 0 is refused; a float gets the seconds hint."""
    request = wire.create_request("m", ["true"], timeout_ms=1, idempotency_key="k")
    assert request.body == b'{"command":["true"],"timeout_ms":1}'
    with pytest.raises(
        ValueError, match=r"^timeout_ms must be a positive number of milliseconds, got 0$"
    ):
        wire.check_timeout_ms(0)
    with pytest.raises(TypeError, match=r"not float: for seconds, use timeout_ms=int\("):
        wire.check_timeout_ms(1.5)
    with pytest.raises(TypeError, match=r"^timeout_ms must be an int \(milliseconds\), not str$"):
        wire.check_timeout_ms("1")


def test_limit_boundary() -> None:
    """limit=1 is the smallest page; 0 is refused; the page request carries it as text."""
    assert wire.check_limit(1) == 1
    with pytest.raises(ValueError, match=r"^limit must be at least 1, got 0$"):
        wire.check_limit(0)
    request = wire.page_request("/v1/x", limit=1, cursor=None)
    assert request.params == {"limit": "1"}
    assert wire.page_request("/v1/x", limit=None, cursor="").params is None


def test_error_body_with_code_instead_of_error_code() -> None:
    """Some error bodies name the code `code`: it is read, and kept out of details."""
    error = _error(404, b'{"code": "machine_not_found", "message": "no such machine"}')
    assert isinstance(error, NotFoundError)
    assert error.error_code == "machine_not_found"
    assert str(error) == "HTTP 404 machine_not_found: no such machine (GET /v1/x)"
    assert error.details == {}


def test_error_code_wins_over_code() -> None:
    error = _error(404, b'{"error_code": "a", "code": "b", "message": "m"}')
    assert error.error_code == "a"


@pytest.mark.parametrize(("status", "redirect"), [(300, True), (399, True), (400, False)])
def test_only_3xx_gain_the_redirect_hint(status: int, redirect: bool) -> None:
    """A 3xx is explained as a redirect that is not followed; a 400 is not a redirect."""
    error = _error(status, b'{"message": "bad"}', location="https://elsewhere.example/x")
    message = str(error)
    assert message.startswith(f"HTTP {status}: bad")
    assert ("the server answered with a redirect to https://elsewhere.example/x" in message) is (
        redirect
    )
    if status == 400:
        assert isinstance(error, BadRequestError)


def test_redirect_without_location_and_body() -> None:
    message = str(_error(302, b""))
    assert message == (
        "HTTP 302: the server answered with a redirect, which is not followed "
        "(credentials are never sent to another location); check base_url (GET /v1/x)"
    )


def test_error_without_a_json_body_says_what_came() -> None:
    message = str(_error(502, b"<html>bad gateway</html>", **{"content-type": "text/html"}))
    assert message.startswith(
        "HTTP 502: error response without a JSON error body (text/html, 24 bytes)"
    )


def _response(body: bytes, status: int = 200) -> wire.Response:
    return wire.Response(status, CIMultiDict(), body)


def test_page_request_is_a_get_of_the_path() -> None:
    request = wire.page_request("/v1/machines/m/executions", limit=None, cursor=None)
    assert request == wire.Request("GET", "/v1/machines/m/executions", None, None, None)
    assert wire.check_limit(None) is None


@pytest.mark.parametrize(
    ("body", "message", "field"),
    [
        (b"[]", "expected a page object, got list", None),
        (b'{"items": {}}', "page items must be a list, got dict", "items"),
        (
            b'{"items": [], "next_cursor": 5}',
            "next_cursor must be a string, got int",
            "next_cursor",
        ),
    ],
)
def test_malformed_page_messages(body: bytes, message: str, field: str | None) -> None:
    with pytest.raises(ResponseDecodeError) as caught:
        wire.decode_page(_response(body, 203), Execution)
    assert (str(caught.value), caught.value.field, caught.value.status) == (message, field, 203)


def test_a_bad_item_of_a_page_says_the_status_and_body() -> None:
    body = b'{"items": [{"execution_id": 5}], "next_cursor": null}'
    with pytest.raises(ResponseDecodeError) as caught:
        wire.decode_page(_response(body, 206), Execution)
    assert (caught.value.status, caught.value.body) == (206, body.decode())


@pytest.mark.parametrize(
    ("decode", "body", "expected"),
    [
        (
            wire.decode_output,
            b'{"execution_id": "e", "stdout": "out", "stdout_bytes": 3}',
            ExecutionOutput(execution_id="e", stdout="out", stdout_bytes=3),
        ),
        (
            wire.decode_log_status,
            b'{"execution_id": "e", "capture": {"lost_bytes": "7"}, "stream_id": "s"}',
            LogStatus(execution_id="e", capture=LogCapture(lost_bytes=7), stream_id="s"),
        ),
        (
            wire.decode_log_token,
            b'{"access_token": "t", "base_url": "https://l", "execution_id": "e", '
            b'"expires_at": "2026-01-01T00:00:00Z", "stream_id": "s", "token_type": "Bearer"}',
            LogReadToken(
                access_token="t",
                base_url="https://l",
                execution_id="e",
                expires_at=NOW,
                stream_id="s",
                token_type="Bearer",
            ),
        ),
    ],
)
def test_each_decoder_reads_its_model(decode: Any, body: bytes, expected: object) -> None:
    assert decode(_response(body)) == expected
    # and a wrong body is refused with the response's status and body attached
    with pytest.raises(ResponseDecodeError) as caught:
        decode(_response(b'{"execution_id": 1}', 299))
    assert (caught.value.status, caught.value.body) == (299, '{"execution_id": 1}')


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"title": "Bad thing"}', "Bad thing"),
        (b'{"error": "went wrong"}', "went wrong"),
        (b'{"message": "", "detail": "d", "title": "t"}', "d"),  # an empty one is skipped
        (b'{"title": "t", "error": "e"}', "t"),
        (b'{"message": 5, "error": "e"}', "e"),  # only strings are messages
    ],
)
def test_message_from_any_of_the_usual_keys(body: bytes, message: str) -> None:
    assert _error(422, body).message == message


def test_problem_extras_become_details_without_the_known_members() -> None:
    """RFC 7807: extra members are the details; the members read elsewhere are not."""
    body = (
        b'{"error_code": "E", "code": "C", "message": "m", "retryable": true, '
        b'"status": 422, "title": "T", "field": "command"}'
    )
    error = _error(422, body)
    assert error.details == {"title": "T", "field": "command"}
    assert (error.error_code, error.retryable) == ("E", True)


def test_details_member_wins_and_retryable_must_be_a_bool() -> None:
    error = _error(500, b'{"details": {"a": 1}, "retryable": "yes", "b": 2}')
    assert error.details == {"a": 1}
    assert error.retryable is None
    assert _error(500, b"{}").retryable is None
    assert _error(500, b'{"retryable": false}').retryable is False


def test_a_long_redirect_location_is_cut_at_200_characters() -> None:
    location = "https://elsewhere.example/" + "x" * 300
    message = str(_error(301, b"", location=location))
    assert f"redirect to {location[:200]}, which" in message


def test_timeout_ms_upper_boundary() -> None:
    """2**53 - 1 ms is the longest limit sent; one more is refused, saying why."""
    assert wire.check_timeout_ms(wire.MAX_TIMEOUT_MS) == 2**53 - 1
    with pytest.raises(ValueError) as caught:
        wire.check_timeout_ms(2**53)
    assert str(caught.value) == (
        "timeout_ms must be at most 9007199254740991 (2**53 - 1, the largest integer every "
        "JSON reader keeps exactly), got 9007199254740992"
    )


def test_idempotency_key_keeps_only_76_random_bits() -> None:
    key = wire.new_idempotency_key(2**48 + 0xABC, 2**76 + 2**75 + 0xDEF)
    assert key == "000000000abc" + "7" + "8" + "0" * 15 + "def"


def test_execution_request_names_the_bad_id() -> None:
    with pytest.raises(ValueError, match=r"^machine_id must not be empty$"):
        wire.execution_request("GET", "", "e")
    with pytest.raises(ValueError, match=r"^execution_id must not be empty$"):
        wire.execution_request("GET", "m", "")


def test_a_mutating_request_needs_and_carries_its_key() -> None:
    with pytest.raises(ValueError, match=r"^a DELETE request needs an Idempotency-Key$"):
        wire.execution_request("DELETE", "m", "e")
    request = wire.execution_request("POST", "m", "e", "/cancel", idempotency_key="k")
    assert request == wire.Request("POST", "/v1/machines/m/executions/e/cancel", None, None, "k")
    assert wire.execution_request("GET", "m", "e").idempotency_key is None


def test_bodies_that_are_not_utf8_are_shown_with_replacement_characters() -> None:
    body = b'{"message": "bad \xff"'  # cut short: not JSON, and not UTF-8 either
    error = _error(500, body)
    assert error.body == '{"message": "bad \ufffd"'
    with pytest.raises(ResponseDecodeError) as caught:
        wire.decode_execution(_response(body))
    assert caught.value.body == '{"message": "bad \ufffd"'


SURROGATE = "has a lone surrogate at position 1, which UTF-8 cannot carry: decode bytes with "
FIX = "errors='replace' (or fix the text) before sending"


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"command": ["a\ud800"]}, "command[0]"),
        ({"command": ["ls", "a\udfff"]}, "command[1]"),
        ({"command": ["ls"], "env": {"a\ud800": "v"}}, "an env key"),
        ({"command": ["ls"], "env": {"A": "v\ud800"}}, "env['A']"),
        ({"command": ["ls"], "cwd": "/\ud800"}, "cwd"),
        ({"command": ["ls"], "stdin": "x\ud800"}, "stdin"),
    ],
)
def test_a_lone_surrogate_is_named_where_it_is(arguments: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError) as caught:
        wire.create_request("m", idempotency_key="k", **arguments)
    assert str(caught.value) == f"{name} {SURROGATE}{FIX}"


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (
            {"command": "ls -l"},
            TypeError,
            "command must be a list of strings (argv, no shell), not a string: pass "
            "['ls -l'] for a single program, or ['/bin/sh', '-c', 'ls -l'] for a shell line",
        ),
        ({"command": 5}, TypeError, "command must be a list of strings, not int"),
        (
            {"command": []},
            ValueError,
            "command must not be empty: give at least the program to run",
        ),
        ({"command": ["ls", 3]}, TypeError, "command[1] must be a str, not int"),
        (
            {"command": ["", "x"]},
            ValueError,
            "command[0] must name the program to run, not be an empty string",
        ),
        (
            {"command": ["ls"], "env": ["A"]},
            TypeError,
            "env must be a mapping of str to str, not list",
        ),
        ({"command": ["ls"], "env": {1: "v"}}, TypeError, "env keys must be str, got int"),
        ({"command": ["ls"], "env": {"A": b"v"}}, TypeError, "env['A'] must be a str, not bytes"),
        (
            {"command": ["ls"], "env": {"A\x00B": "v"}},
            ValueError,
            "env key 'A\\x00B' is not a valid variable name",
        ),
        ({"command": ["ls"], "cwd": 3}, TypeError, "cwd must be a str or None, not int"),
        ({"command": ["ls"], "stdin": b"x"}, TypeError, "stdin must be a str or None, not bytes"),
    ],
)
def test_create_argument_messages(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        wire.create_request("m", idempotency_key="k", **arguments)
    assert str(caught.value) == message


def test_create_request_names_the_machine_id() -> None:
    with pytest.raises(ValueError, match=r"^machine_id must not be empty$"):
        wire.create_request("", ["ls"], idempotency_key="k")


def test_a_bad_idempotency_key_says_how_to_get_a_good_one() -> None:
    with pytest.raises(ValueError) as caught:
        wire.check_idempotency_key("a b")
    assert str(caught.value) == (
        "idempotency_key must be 1-255 visible ASCII characters (no spaces); "
        "omit it to get a fresh compact UUIDv7"
    )


def test_a_body_that_is_not_json() -> None:
    with pytest.raises(ResponseDecodeError) as caught:
        wire.decode_execution(_response(b"<html>", 201))
    assert str(caught.value).startswith("response body is not valid JSON (HTTP 201, 6 bytes): ")
    assert (caught.value.status, caught.value.body) == (201, "<html>")


def test_an_id_with_a_lone_surrogate_is_named() -> None:
    with pytest.raises(ValueError, match=r"^execution_id has a lone surrogate at position 1"):
        wire.check_id("execution_id", "é\ud800")


def test_a_429_keeps_its_message_and_reads_a_retry_after_date() -> None:
    error = _error(
        429, b'{"message": "slow down"}', **{"retry-after": "Thu, 01 Jan 2026 00:00:30 GMT"}
    )
    assert isinstance(error, RateLimitedError)
    assert (error.message, error.retry_after) == ("slow down", 30.0)
    assert str(error) == "HTTP 429: slow down (GET /v1/x)"


def test_an_error_without_body_or_content_type() -> None:
    assert str(_error(500, b"")) == (
        "HTTP 500: error response without a JSON error body (no content type, 0 bytes) (GET /v1/x)"
    )
