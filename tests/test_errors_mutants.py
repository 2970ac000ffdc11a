"""The exception tree's attributes, its messages and the status-to-class table, each at its
edges. Found by mutation testing (`nox -s mutation`, CONTRIBUTING.md).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dedalus_async import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    Execution,
    ExecutionFailed,
    ExecutionRef,
    ExecutionResult,
    IdempotencyKeyReusedError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    RequestTimeout,
    ResponseDecodeError,
    ServerError,
    TransportError,
    UnprocessableEntityError,
    WaitTimeout,
)
from dedalus_async._errors import error_for_status

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_transport_error_says_which_request() -> None:
    error = RequestTimeout("timed out", method="GET", path="/v1/x")
    assert (str(error), error.method, error.path) == ("timed out", "GET", "/v1/x")
    plain = TransportError("reset")
    assert (plain.method, plain.path) == ("", "")


def test_api_status_error_keeps_everything_and_describes_it() -> None:
    details = {"field": "command"}
    error = APIStatusError(
        "bad command",
        status=422,
        error_code="INVALID",
        retryable=False,
        details=details,
        request_id="req-1",
        body='{"x": 1}',
        method="POST",
        path="/v1/machines/m/executions",
    )
    assert str(error) == (
        "HTTP 422 INVALID: bad command (POST /v1/machines/m/executions) [request req-1]"
    )
    assert (error.status, error.error_code, error.message) == (422, "INVALID", "bad command")
    assert (error.retryable, error.request_id, error.body) == (False, "req-1", '{"x": 1}')
    assert (error.method, error.path) == ("POST", "/v1/machines/m/executions")
    assert error.details == details
    assert error.details is not details  # a copy: the caller's dict stays theirs


def test_api_status_error_leaves_out_what_it_does_not_know() -> None:
    error = APIStatusError("nope", status=500)
    assert str(error) == "HTTP 500: nope"
    assert (error.error_code, error.retryable, error.request_id) == (None, None, None)
    assert (error.details, error.body, error.method, error.path) == ({}, "", "", "")
    assert APIStatusError("nope", status=500, details={}).details == {}


def test_rate_limited_error_carries_retry_after() -> None:
    error = RateLimitedError("slow down", retry_after=2.5, status=429, method="GET", path="/p")
    assert error.retry_after == 2.5
    assert str(error) == "HTTP 429: slow down (GET /p)"
    assert error.status == 429
    assert RateLimitedError("slow down", status=429).retry_after is None


def test_response_decode_error_fields() -> None:
    error = ResponseDecodeError("bad", field="status", status=200, body="{}")
    assert (str(error), error.field, error.status, error.body) == ("bad", "status", 200, "{}")
    bare = ResponseDecodeError("bad")
    assert (bare.field, bare.status, bare.body) == (None, None, "")


def test_wait_timeout_carries_what_resuming_needs() -> None:
    ref = ExecutionRef(machine_id="m", execution_id="e")
    last = Execution(execution_id="e", machine_id="m", created_at=NOW, status="running")
    error = WaitTimeout("too slow", ref=ref, last=last, timeout=3.0)
    assert (str(error), error.ref, error.last, error.timeout) == ("too slow", ref, last, 3.0)
    assert isinstance(error, TimeoutError)


def _failed(**fields: object) -> ExecutionFailed:
    execution = Execution(
        execution_id="e-1",
        machine_id="m-1",
        created_at=NOW,
        status=str(fields.pop("status", "failed")),
        **fields,  # type: ignore[arg-type]
    )
    return ExecutionFailed(ExecutionResult(execution=execution))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"exit_code": 3}, "execution e-1 on m-1 failed (exit code 3)"),
        ({}, "execution e-1 on m-1 failed (no exit code)"),
        ({"exit_code": 0, "status": "cancelled"}, "execution e-1 on m-1 cancelled (exit code 0)"),
        ({"signal": 9}, "execution e-1 on m-1 failed (no exit code, signal 9)"),
        ({"signal": 0, "exit_code": 1}, "execution e-1 on m-1 failed (exit code 1, signal 0)"),
        (
            {"error_code": "TIMEOUT", "error_message": "took too long"},
            "execution e-1 on m-1 failed (no exit code, TIMEOUT: took too long)",
        ),
        ({"error_message": "gone"}, "execution e-1 on m-1 failed (no exit code: gone)"),
        ({"error_code": "", "error_message": ""}, "execution e-1 on m-1 failed (no exit code)"),
    ],
)
def test_execution_failed_says_how(fields: dict[str, object], message: str) -> None:
    error = _failed(**fields)
    assert str(error) == message
    assert error.result.execution.execution_id == "e-1"


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
        (418, APIStatusError),
        (499, APIStatusError),
        (500, ServerError),
        (503, ServerError),
        (302, APIStatusError),
    ],
)
def test_error_class_by_status(status: int, cls: type[APIStatusError]) -> None:
    assert error_for_status(status, None) is cls
    assert error_for_status(status, "SOMETHING_ELSE") is cls


@pytest.mark.parametrize("status", [400, 409, 422, 500])
def test_a_reused_idempotency_key_wins_over_the_status(status: int) -> None:
    assert error_for_status(status, "IDEMPOTENCY_KEY_REUSED") is IdempotencyKeyReusedError
    assert error_for_status(status, "idempotency_key_reused") is not IdempotencyKeyReusedError
