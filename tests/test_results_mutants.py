"""The two rules about a finished execution (`_results`), each at its edges; and the real
clock (`_clock`). Found by mutation testing (`nox -s mutation`, CONTRIBUTING.md).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from dedalus_async import Execution, ExecutionResult
from dedalus_async._clock import SystemClock
from dedalus_async._results import execution_ok, may_have_output

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _execution(status: str = "succeeded", **fields: object) -> Execution:
    return Execution(
        execution_id="e",
        machine_id="m",
        created_at=NOW,
        status=status,
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("status", "exit_code", "ok"),
    [
        ("succeeded", 0, True),
        ("succeeded", None, True),  # no exit code reported: the status decides
        ("succeeded", 1, False),
        ("succeeded", -1, False),
        ("failed", 0, False),
        ("failed", None, False),
        ("running", None, False),
    ],
)
def test_ok_needs_success_and_exit_code_zero_or_none(
    status: str, exit_code: int | None, ok: bool
) -> None:
    execution = _execution(status, exit_code=exit_code)
    assert execution_ok(execution) is ok
    assert ExecutionResult(execution=execution).ok is ok


@pytest.mark.parametrize(
    ("stdout_bytes", "stderr_bytes", "expected"),
    [
        (0, 0, False),  # the only case with nothing to fetch
        (0, None, True),  # an unknown size may be anything
        (None, 0, True),
        (None, None, True),
        (1, 0, True),
        (0, 1, True),
    ],
)
def test_output_is_skipped_only_when_both_sizes_are_zero(
    stdout_bytes: int | None, stderr_bytes: int | None, expected: bool
) -> None:
    execution = _execution(stdout_bytes=stdout_bytes, stderr_bytes=stderr_bytes)
    assert may_have_output(execution) is expected


def test_system_clock_now_is_utc_and_current() -> None:
    before = datetime.now(UTC)
    now = SystemClock().now()
    after = datetime.now(UTC)
    assert now.tzinfo is UTC
    assert before <= now <= after


def test_system_clock_sleeps_for_real_on_the_monotonic_clock() -> None:
    clock = SystemClock()
    start = clock.monotonic()
    assert abs(start - time.monotonic()) < 1.0
    asyncio.run(clock.sleep(0.02))
    assert clock.monotonic() - start >= 0.02
    assert repr(clock) == "SystemClock()"
