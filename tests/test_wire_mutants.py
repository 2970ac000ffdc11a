"""Boundaries and user-facing messages of the wire format, found by mutation testing.

Each test pins a limit exactly at its edge (the largest value allowed, the smallest value
refused) or the text of an error a user reads (`nox -s mutation`, CONTRIBUTING.md).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from multidict import CIMultiDict

from dedalus_async import APIStatusError, BadRequestError, NotFoundError
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
