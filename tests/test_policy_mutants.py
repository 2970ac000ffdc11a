"""Edges of the retry and poll schedules found by mutation testing (`nox -s mutation`).

A base of exactly 1.0 s (``initial_backoff=1.0``, ``initial_interval=1.0``) is where a
mutant of the zero-base shortcut in ``_grow`` (``base == 1.0`` instead of ``0.0``) turns
every sleep into 0: a busy loop. The code is right; these tests say so.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from dedalus_async._policy import (
    USE_POLICY_DEFAULT,
    PollPolicy,
    PollState,
    RetryPolicy,
    Sleep,
    is_in_progress,
    is_retryable_status,
    next_poll,
    resolve_timeout,
    retry_delay,
)


@pytest.mark.parametrize(("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0)])
def test_retry_backoff_from_a_base_of_one_second(attempt: int, expected: float) -> None:
    """R4: rand * min(max_backoff, 1.0 * 2 ** (attempt - 1)): never a zero sleep."""
    policy = RetryPolicy(max_attempts=10, initial_backoff=1.0, multiplier=2.0, max_backoff=4.0)
    delay = retry_delay(
        policy, attempt=attempt, retry_after=None, slept=0.0, remaining=None, rand=0.5
    )
    assert delay == 0.5 * expected


def test_retry_backoff_from_a_zero_base_is_the_floor() -> None:
    policy = RetryPolicy(initial_backoff=0.0, max_backoff=0.0, min_pause=0.0)
    assert (
        retry_delay(policy, attempt=1, retry_after=None, slept=0.0, remaining=None, rand=0.9) == 0.0
    )
    with_floor = RetryPolicy(initial_backoff=0.0, max_backoff=0.0)  # R3a
    assert retry_delay(
        with_floor, attempt=1, retry_after=None, slept=0.0, remaining=None, rand=0.9
    ) == pytest.approx(0.095)


@pytest.mark.parametrize("backoff_attempt", [0, 1, 3])
def test_poll_backoff_from_a_base_of_one_second(backoff_attempt: int) -> None:
    """P4: min(max_interval, 1.0 * 1.5 ** n) * (1 - jitter * rand), never zero."""
    policy = PollPolicy(initial_interval=1.0, max_interval=3.0, multiplier=1.5, jitter=0.2)
    state = PollState(backoff_attempt=backoff_attempt)
    decision, after = next_poll(
        policy, state, done=False, retry_after_ms=None, expires_in=None, remaining=None, rand=0.5
    )
    assert decision == Sleep(min(3.0, 1.5**backoff_attempt) * 0.9, "backoff")
    assert after.backoff_attempt == backoff_attempt + 1


@pytest.mark.parametrize(
    ("status", "server_retryable", "retry"),
    [
        (399, True, False),  # not an error, whatever the body says
        (400, True, False),
        (408, None, True),
        (429, None, True),
        (429, False, False),  # the server knows best
        (418, None, False),
        (418, True, True),
        (500, None, True),
        (599, None, True),
        (600, None, False),  # not a 5xx
        (503, False, False),
        (409, True, False),
    ],
)
def test_retryable_status_edges(status: int, server_retryable: bool | None, retry: bool) -> None:
    """R1, in its order."""
    assert is_retryable_status(status, server_retryable) is retry


@pytest.mark.parametrize(
    ("status", "error_code", "in_progress"),
    [
        (409, "REQUEST_IN_PROGRESS", True),
        (409, "still_processing", True),  # any case
        (409, "CONCURRENT_REQUEST", True),
        (409, "MACHINE_BUSY", False),
        (409, None, False),
        (409, "", False),
        (400, "IN_PROGRESS", False),  # only a 409
    ],
)
def test_in_progress_is_a_409_with_a_marker(
    status: int, error_code: str | None, in_progress: bool
) -> None:
    """R1: the one 409 worth another try under the same Idempotency-Key."""
    assert is_in_progress(status, error_code) is in_progress


def test_resolve_timeout() -> None:
    policy = PollPolicy(timeout=12.0)
    assert resolve_timeout(USE_POLICY_DEFAULT, policy) == 12.0
    assert resolve_timeout(USE_POLICY_DEFAULT, PollPolicy(timeout=None)) is None
    assert resolve_timeout(None, policy) is None  # no deadline
    assert resolve_timeout(3, policy) == 3.0
    with pytest.raises(TypeError, match=r"^poll must be a PollPolicy, not dict$"):
        resolve_timeout(3, {})  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"^timeout must be positive finite seconds \(or None for no deadline\)"
    ):
        resolve_timeout(0, policy)
    assert repr(USE_POLICY_DEFAULT) == "USE_POLICY_DEFAULT"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"slept": math.nan}, r"^slept must not be NaN$"),
        ({"remaining": math.nan}, r"^remaining must not be NaN$"),
        ({"rand": 1.0}, r"^rand must be in \[0, 1\), got 1.0$"),
        ({"rand": -0.1}, r"^rand must be in \[0, 1\), got -0.1$"),
        ({"attempt": 0}, r"^attempt counts from 1, got 0$"),
        ({"slept": -1.0}, r"^slept must be >= 0, got -1.0$"),
    ],
)
def test_retry_delay_names_the_bad_argument(arguments: dict[str, Any], message: str) -> None:
    call: dict[str, Any] = {
        "attempt": 1,
        "retry_after": None,
        "slept": 0.0,
        "remaining": None,
        "rand": 0.5,
    }
    with pytest.raises(ValueError, match=message):
        retry_delay(RetryPolicy(), **(call | arguments))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"expires_in": math.nan}, r"^expires_in must not be NaN$"),
        ({"remaining": math.nan}, r"^remaining must not be NaN$"),
        ({"rand": 1.5}, r"^rand must be in \[0, 1\), got 1.5$"),
    ],
)
def test_next_poll_names_the_bad_argument(arguments: dict[str, Any], message: str) -> None:
    call: dict[str, Any] = {
        "done": False,
        "retry_after_ms": None,
        "expires_in": None,
        "remaining": None,
        "rand": 0.5,
    }
    with pytest.raises(ValueError, match=message):
        next_poll(PollPolicy(), PollState(), **(call | arguments))


def test_an_infinite_poll_timeout_names_the_field_and_the_fix() -> None:
    with pytest.raises(ValueError) as caught:
        PollPolicy(timeout=math.inf)
    assert str(caught.value) == (
        "PollPolicy.timeout must be finite (use None to wait forever), got inf"
    )


def test_expiry_grace_equal_to_the_backoff_keeps_the_backoff_reason() -> None:
    """P6 shortens only a longer sleep: at a tie the backoff stands (the look is spent)."""
    policy = PollPolicy(initial_interval=0.05, jitter=0.0, expiry_grace=0.05)
    decision, after = next_poll(
        policy,
        PollState(),
        done=False,
        retry_after_ms=None,
        expires_in=-1.0,
        remaining=None,
        rand=0.5,
    )
    assert decision == Sleep(0.05, "backoff")
    assert after.expiry_look_done
