"""Edges of the retry and poll schedules found by mutation testing (`nox -s mutation`).

A base of exactly 1.0 s (``initial_backoff=1.0``, ``initial_interval=1.0``) is where a
mutant of the zero-base shortcut in ``_grow`` (``base == 1.0`` instead of ``0.0``) turns
every sleep into 0: a busy loop. The code is right; these tests say so.
"""

from __future__ import annotations

import pytest

from dedalus_async._policy import PollPolicy, PollState, RetryPolicy, Sleep, next_poll, retry_delay


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
