"""Table tests of the rules written at the top of ``dedalus_async/_policy.py``.

Each test names the rule (R1-R7 for retries, P1-P9 for polling) it checks. No I/O: the
decisions are pure functions of their arguments.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from dedalus_async._policy import (
    Done,
    GiveUp,
    PollDecision,
    PollPolicy,
    PollState,
    RetryPolicy,
    Sleep,
    is_retryable_status,
    next_poll,
    retry_delay,
)

POLICY_FILE = Path(__file__).parent.parent / "dedalus_async" / "_policy.py"


def _retry(policy: RetryPolicy | None = None, **kwargs: Any) -> float | None:
    """retry_delay with neutral defaults, so each row states only what it is about."""
    args: dict[str, Any] = {
        "attempt": 1,
        "retry_after": None,
        "slept": 0.0,
        "remaining": None,
        "rand": 0.5,
    }
    args.update(kwargs)
    return retry_delay(policy or RetryPolicy(), **args)


def _poll(
    policy: PollPolicy | None = None, state: PollState | None = None, **kwargs: Any
) -> tuple[PollDecision, PollState]:
    """next_poll with neutral defaults: not done, no hint, no expiry, no deadline."""
    args: dict[str, Any] = {
        "done": False,
        "retry_after_ms": None,
        "expires_in": None,
        "remaining": None,
        "rand": 0.0,
    }
    args.update(kwargs)
    return next_poll(policy or PollPolicy(), state or PollState(), **args)


# ------------------------------------------------------------------------------ purity


@pytest.mark.parametrize("source", [POLICY_FILE, POLICY_FILE.with_name("_checks.py")])
def test_policy_source_imports_only_stdlib_and_attrs(source: Path) -> None:
    """The policy, and the argument checks it shares, import only stdlib and attrs."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # of our own modules, only the (equally pure) argument checks
                assert node.module == "_checks", node.module
                continue
            assert node.module is not None
            imported.add(node.module.partition(".")[0])
    allowed = (set(sys.stdlib_module_names) - {"asyncio"}) | {"__future__", "attrs"}
    assert imported <= allowed, imported - allowed


def test_policy_module_loads_without_asyncio_or_aiohttp() -> None:
    # The files are loaded on their own, as a package of two modules (the policy and the
    # argument checks it uses), so whatever the package __init__ imports later cannot hide
    # (or cause) an asyncio import from _policy.
    code = (
        "import importlib.util, sys, types\n"
        "package = types.ModuleType('isolated')\n"
        "package.__path__ = []\n"
        "sys.modules['isolated'] = package\n"
        "for name in ('_checks', '_policy'):\n"
        f"    path = {str(POLICY_FILE.parent)!r} + '/' + name + '.py'\n"
        "    spec = importlib.util.spec_from_file_location('isolated.' + name, path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    sys.modules[spec.name] = module\n"
        "    spec.loader.exec_module(module)\n"
        "assert module.next_poll and module.retry_delay\n"
        "leaked = {'asyncio', 'aiohttp', 'dedalus_async'} & set(sys.modules)\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------ RetryPolicy


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.initial_backoff, policy.max_backoff) == (4, 0.25, 8.0)
    assert (policy.multiplier, policy.max_retry_after, policy.budget) == (2.0, 60.0, 60.0)


def test_retry_policy_none_tries_once() -> None:
    assert RetryPolicy.none() == RetryPolicy(max_attempts=1)
    assert _retry(RetryPolicy.none(), attempt=1) is None


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"max_attempts": 0}, ValueError, "RetryPolicy.max_attempts must be >= 1, got 0"),
        ({"max_attempts": 2.0}, TypeError, "RetryPolicy.max_attempts must be an int"),
        ({"max_attempts": True}, TypeError, "RetryPolicy.max_attempts must be an int"),
        ({"initial_backoff": -0.1}, ValueError, "RetryPolicy.initial_backoff must be >= 0"),
        ({"initial_backoff": math.nan}, ValueError, "RetryPolicy.initial_backoff must be finite"),
        ({"initial_backoff": "1"}, TypeError, "RetryPolicy.initial_backoff must be a number"),
        (
            {"max_backoff": 0.1},
            ValueError,
            "RetryPolicy.max_backoff must be >= initial_backoff (0.25), got 0.1",
        ),
        ({"multiplier": 0.5}, ValueError, "RetryPolicy.multiplier must be >= 1"),
        ({"max_retry_after": -1}, ValueError, "RetryPolicy.max_retry_after must be >= 0"),
        ({"budget": math.inf}, ValueError, "RetryPolicy.budget must be finite"),
        pytest.param(
            {"budget": 10**400}, ValueError, "RetryPolicy.budget must be finite", id="huge-int"
        ),
        ({"budget": -1.0}, ValueError, "RetryPolicy.budget must be >= 0"),
    ],
)
def test_retry_policy_validation(
    changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        RetryPolicy(**changes)
    assert message in str(info.value)
    # evolve() goes through the same validators.
    with pytest.raises(error):
        attrs.evolve(RetryPolicy(), **changes)


def test_retry_policy_accepts_ints_and_zeroes() -> None:
    policy = RetryPolicy(initial_backoff=0, max_backoff=0, multiplier=1, budget=0, min_pause=0)
    assert _retry(policy) == 0.0


# the shortest pause (R3a) with rand = 0.5, _retry's default
FLOOR = RetryPolicy().min_pause * 1.5


# ---------------------------------------------------------------- is_retryable_status


@pytest.mark.parametrize(
    ("status", "server_retryable", "expected"),
    [
        # R1: never, whatever the body says
        *[(s, flag, False) for s in (400, 401, 403, 404, 409, 422) for flag in (None, True)],
        # R1: 408, 429, 5xx yes ...
        (408, None, True),
        (429, None, True),
        (500, None, True),
        (502, None, True),
        (503, None, True),
        (599, None, True),
        (429, True, True),
        # ... unless the server explicitly says no
        (429, False, False),
        (503, False, False),
        (408, False, False),
        # R1: other 4xx only on an explicit yes
        (418, None, False),
        (425, None, False),
        (425, True, True),
        (423, False, False),
        # R1: not an error at all
        (200, True, False),
        (304, None, False),
    ],
)
def test_is_retryable_status(status: int, server_retryable: bool | None, expected: bool) -> None:
    assert is_retryable_status(status, server_retryable) is expected


# ------------------------------------------------------------------------ retry_delay


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "expected"),
    [(1, 1, None), (3, 4, 1.0), (4, 4, None), (5, 4, None), (99, 100, 8.0), (10**6, 10, None)],
)
def test_retry_gives_up_after_max_attempts(
    attempt: int, max_attempts: int, expected: float | None
) -> None:
    # R2; rand = 0.5 draws half of the backoff cap
    delay = _retry(RetryPolicy(max_attempts=max_attempts), attempt=attempt, rand=0.5)
    assert delay == (None if expected is None else expected / 2)


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (1, 0.0, 0.05),  # a zero draw still waits the floor (R3a), min_pause * (1 + 0)
        (1, 0.5, 0.125),
        (2, 0.5, 0.25),
        (3, 0.5, 0.5),
        (6, 0.5, 4.0),
        (7, 0.5, 4.0),  # capped: min(8, 0.25 * 2**6 = 16) = 8
        (50, 0.75, 6.0),
        (10**100, 0.5, 4.0),  # no OverflowError, no inf
    ],
)
def test_retry_full_jitter_backoff(attempt: int, rand: float, expected: float) -> None:
    # R4: rand * min(max_backoff, initial_backoff * multiplier ** (attempt - 1))
    policy = RetryPolicy(max_attempts=10**200)
    assert _retry(policy, attempt=attempt, rand=rand) == expected


@pytest.mark.parametrize(
    ("changes", "attempt", "expected"),
    [
        ({"multiplier": 1}, 10**100, 0.125),  # no growth at all, however many tries
        ({"initial_backoff": 0, "max_backoff": 0}, 10**100, FLOOR),  # R3a
        # the power overflows (a budget this large keeps R5 out of the way)
        ({"multiplier": 1e300, "max_backoff": 1e308, "budget": 1e308}, 5, 5e307),
        (
            {
                "initial_backoff": 5e-324,
                "max_backoff": 1e300,
                "multiplier": 1.0000001,
                "budget": 1e308,
            },
            2**70,
            5e299,
        ),
    ],
)
def test_retry_backoff_is_overflow_safe(
    changes: dict[str, Any], attempt: int, expected: float
) -> None:
    # R4, R7
    policy = RetryPolicy(max_attempts=10**200, **changes)
    delay = _retry(policy, attempt=attempt, rand=0.5)
    assert delay == expected
    assert delay is not None
    assert math.isfinite(delay)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        (3.0, 3.0),
        # now, or in the past: now, but never sooner than the floor (R3a; rand = 0.9)
        (0.0, 0.05 * 1.9),
        (-5.0, 0.05 * 1.9),
        (-math.inf, 0.05 * 1.9),
        (60.0, 60.0),  # == max_retry_after is still waited
        (60.001, None),  # longer: give up
        (math.inf, None),
        pytest.param(10**400, None, id="int-too-large-for-a-float"),
        (7, 7.0),
    ],
)
def test_retry_obeys_server_pause(retry_after: float, expected: float | None) -> None:
    # R3 (the budget is raised so that it does not interfere)
    delay = _retry(RetryPolicy(budget=100), retry_after=retry_after, rand=0.9)
    assert delay == expected
    if delay is not None:
        assert type(delay) is float
        assert math.copysign(1.0, delay) == 1.0  # not even -0.0


def test_retry_negative_zero_pause_is_the_floor() -> None:
    delay = _retry(retry_after=-0.0)
    assert delay == FLOOR
    assert delay is not None
    assert math.copysign(1.0, delay) == 1.0


@pytest.mark.parametrize("retry_after", [0.0, -1.0, 0.01])
def test_a_pause_shorter_than_the_floor_waits_the_floor_with_jitter(retry_after: float) -> None:
    # R3a: between min_pause and twice it, by the draw
    policy = RetryPolicy(min_pause=0.1)
    assert _retry(policy, retry_after=retry_after, rand=0.0) == 0.1
    assert _retry(policy, retry_after=retry_after, rand=0.5) == pytest.approx(0.15)
    assert _retry(policy, retry_after=0.5, rand=0.99) == 0.5  # above the floor: as given


@pytest.mark.parametrize("attempt", [4, 40, 400])
def test_a_server_pause_is_retried_beyond_max_attempts_within_the_budget(attempt: int) -> None:
    """R2: an answer that says when to come back is pacing, not failure."""
    assert _retry(attempt=attempt, retry_after=0.1, slept=10.0) == 0.1
    assert _retry(attempt=attempt, retry_after=0.1, slept=59.95) is None  # R5 still holds
    assert _retry(attempt=attempt, retry_after=0.1, remaining=0.1) is None  # R6 too
    assert _retry(attempt=attempt) is None  # without a pause, R2 counts as before


def test_retry_nan_pause_counts_as_absent() -> None:
    # R3: a broken parse falls back to the backoff of R4
    assert _retry(retry_after=math.nan, attempt=2, rand=0.5) == 0.25


@pytest.mark.parametrize(
    ("slept", "retry_after", "expected"),
    [
        (0.0, 30.0, 30.0),
        (30.0, 30.0, 30.0),  # exactly the budget is allowed
        (30.0, 30.5, None),
        (59.9, 0.0, FLOOR),  # "now" waits the floor, and that fits
        (59.95, 0.0, None),  # 59.95 + 0.075 does not
        (59.9, 0.2, None),
        (1000.0, 0.0, None),  # already over the budget: not even a zero pause
    ],
)
def test_retry_budget(slept: float, retry_after: float, expected: float | None) -> None:
    # R5: slept + delay > budget gives up
    assert _retry(slept=slept, retry_after=retry_after) == expected


@pytest.mark.parametrize(
    ("remaining", "retry_after", "expected"),
    [
        (None, 5.0, 5.0),
        (5.01, 5.0, 5.0),
        (5.0, 5.0, None),  # waking exactly at the deadline leaves no time to try
        (4.0, 5.0, None),
        (0.0, 0.0, None),  # the deadline has passed: not even an immediate retry
        (-1.0, 0.0, None),
        (math.inf, 5.0, 5.0),
    ],
)
def test_retry_respects_callers_deadline(
    remaining: float | None, retry_after: float, expected: float | None
) -> None:
    # R6
    assert _retry(remaining=remaining, retry_after=retry_after) == expected


def test_retry_deadline_cut_is_distinguishable() -> None:
    # P9: the session tells "gave up for the deadline" from "gave up" by asking again
    # without the deadline.
    assert _retry(retry_after=5.0, remaining=1.0) is None
    assert _retry(retry_after=5.0, remaining=None) == 5.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rand": 1.0},
        {"rand": -0.1},
        {"rand": math.nan},
        {"attempt": 0},
        {"attempt": -3},
        {"slept": -1.0},
        {"slept": math.nan},
        {"remaining": math.nan},
    ],
)
def test_retry_rejects_programming_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _retry(**kwargs)


# ------------------------------------------------------------------------- PollPolicy


def test_poll_policy_defaults() -> None:
    policy = PollPolicy()
    assert (policy.hint_floor, policy.hint_ceiling, policy.hint_jitter) == (0.05, 30.0, 0.005)
    assert (policy.initial_interval, policy.max_interval) == (0.2, 5.0)
    assert (policy.multiplier, policy.jitter) == (1.5, 0.2)
    assert (policy.timeout, policy.expiry_grace) == (900.0, 0.05)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"hint_floor": 0}, ValueError, "PollPolicy.hint_floor must be > 0, got 0"),
        ({"hint_floor": math.inf}, ValueError, "PollPolicy.hint_floor must be finite"),
        (
            {"hint_ceiling": 0.01},
            ValueError,
            "PollPolicy.hint_ceiling must be >= hint_floor (0.05), got 0.01",
        ),
        ({"hint_jitter": -0.01}, ValueError, "PollPolicy.hint_jitter must be >= 0"),
        ({"initial_interval": 0.0}, ValueError, "PollPolicy.initial_interval must be > 0"),
        (
            {"max_interval": 0.1},
            ValueError,
            "PollPolicy.max_interval must be >= initial_interval (0.2), got 0.1",
        ),
        ({"multiplier": 0.99}, ValueError, "PollPolicy.multiplier must be >= 1"),
        ({"jitter": 1.0}, ValueError, "PollPolicy.jitter must be in [0, 1), got 1.0"),
        ({"jitter": -0.1}, ValueError, "PollPolicy.jitter must be in [0, 1)"),
        ({"timeout": 0}, ValueError, "PollPolicy.timeout must be > 0, got 0"),
        ({"timeout": -5.0}, ValueError, "PollPolicy.timeout must be > 0"),
        ({"timeout": math.inf}, ValueError, "use None to wait forever"),
        ({"timeout": "900"}, TypeError, "PollPolicy.timeout must be a number"),
        ({"expiry_grace": -1}, ValueError, "PollPolicy.expiry_grace must be >= 0"),
        ({"multiplier": False}, TypeError, "PollPolicy.multiplier must be a number"),
    ],
)
def test_poll_policy_validation(
    changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        PollPolicy(**changes)
    assert message in str(info.value)
    with pytest.raises(error):
        attrs.evolve(PollPolicy(), **changes)


def test_poll_policy_wait_forever_is_explicit() -> None:
    assert PollPolicy(timeout=None).timeout is None
    assert attrs.evolve(PollPolicy(), timeout=60).timeout == 60


# -------------------------------------------------------------------------- next_poll


@pytest.mark.parametrize("remaining", [None, 10.0, 0.0, -5.0])
def test_done_wins_even_after_the_deadline(remaining: float | None) -> None:
    # P1
    decision, state = _poll(done=True, remaining=remaining, retry_after_ms=1000, expires_in=-1)
    assert decision == Done()
    assert state == PollState(polls=1)


@pytest.mark.parametrize("remaining", [0.0, -0.0, -1e-9, -100.0])
def test_give_up_once_the_deadline_passed(remaining: float) -> None:
    # P2: the state is unchanged but for the count
    before = PollState(polls=3, backoff_attempt=2, expiry_look_done=False, slept=4.0)
    decision, state = _poll(state=before, remaining=remaining, expires_in=-1.0)
    assert decision == GiveUp()
    assert state == attrs.evolve(before, polls=4)


@pytest.mark.parametrize(
    ("retry_after_ms", "rand", "expected"),
    [
        (1000, 0.0, 1.0),
        (1000, 0.5, 1.0025),  # jitter is added, never subtracted
        (250, 0.0, 0.25),
        (50, 0.0, 0.05),
        (10, 0.0, 0.05),  # below the floor: raised
        (0, 0.0, 0.05),
        (-1000, 0.0, 0.05),
        (30_000, 0.0, 30.0),
        (45_000, 0.0, 30.0),  # above the ceiling: lowered
        pytest.param(10**400, 0.5, 30.0025, id="int-too-large-for-a-float"),
        pytest.param(-(10**400), 0.0, 0.05, id="negative-int-too-large-for-a-float"),
    ],
)
def test_hint_is_clamped_and_jittered_upwards(
    retry_after_ms: int, rand: float, expected: float
) -> None:
    # P3
    decision, state = _poll(retry_after_ms=retry_after_ms, rand=rand)
    assert isinstance(decision, Sleep)
    assert decision.reason == "hint"
    assert decision.seconds == pytest.approx(expected)
    assert state.backoff_attempt == 0


@pytest.mark.parametrize(
    ("retry_after_ms", "grid_offset", "expected"),
    [
        (1000, 0.0, 1.0),  # the hint ends on a grid moment: nothing added
        (1000, 0.001, 1.004),  # 1 ms past a grid moment: 4 ms to the next one
        (1000, 0.004, 1.001),
        (1000, 1000.0037, 1.0013),  # only the offset modulo the step counts
        (1000, -0.0037, 1.0037),  # negative offsets too
        (123, 0.0, 0.125),  # a hint between grid moments waits for the next one
        (10, 0.002, 0.053),  # the floor (50 ms) first, then the grid
        (45_000, 0.0, 30.0),  # the ceiling first
        (1000, 1e-7, 1.0),  # within 1 us of a grid moment (float rounding): on it
        (1000, 2e-6, 1.005 - 2e-6),  # 2 us past: the next moment, a step later
    ],
)
def test_hint_on_a_grid_lands_on_its_next_moment(
    retry_after_ms: int, grid_offset: float, expected: float
) -> None:
    # P3 on a grid: the first grid moment at or after the (clamped) hint; rand is unused
    for rand in (0.0, 0.5, 0.99):
        decision, state = _poll(retry_after_ms=retry_after_ms, rand=rand, grid_offset=grid_offset)
        assert isinstance(decision, Sleep)
        assert decision.reason == "hint"
        assert decision.seconds == pytest.approx(expected, abs=1e-9)
        assert state.backoff_attempt == 0
        assert state.slept == decision.seconds


def test_a_grid_without_jitter_is_the_bare_hint() -> None:
    # P3: hint_jitter=0 has no grid to land on (and no division by a zero step)
    policy = PollPolicy(hint_jitter=0.0)
    for grid_offset in (0.0, 0.0013, -7.5):
        decision, _ = _poll(policy, retry_after_ms=1234, grid_offset=grid_offset, rand=0.7)
        assert decision == Sleep(1.234, "hint")


def test_a_wider_grid_follows_hint_jitter() -> None:
    # P3: grid moments are hint_jitter apart
    policy = PollPolicy(hint_jitter=0.1)
    decision, _ = _poll(policy, retry_after_ms=1000, grid_offset=0.03)
    assert isinstance(decision, Sleep)
    assert decision.seconds == pytest.approx(1.07)
    assert decision.reason == "hint"


def test_the_grid_leaves_backoff_expiry_and_deadline_alone() -> None:
    # P4 without a hint: the grid plays no part; P5 and P7 still cut a gridded hint short
    assert _poll(grid_offset=0.001) == _poll()
    decision, _ = _poll(retry_after_ms=1000, grid_offset=0.001, expires_in=0.5)
    assert decision == Sleep(0.5, "expires_at")
    decision, _ = _poll(retry_after_ms=1000, grid_offset=0.001, remaining=1.002)
    assert decision == Sleep(1.002, "deadline")


@pytest.mark.parametrize("grid_offset", [math.nan, math.inf, -math.inf])
def test_a_grid_offset_must_be_finite(grid_offset: float) -> None:
    with pytest.raises(ValueError, match="grid_offset must be finite"):
        _poll(retry_after_ms=1000, grid_offset=grid_offset)


def test_hint_resets_the_backoff() -> None:
    # P3: a hint puts the backoff back to its start
    decision, state = _poll(state=PollState(backoff_attempt=7), retry_after_ms=2000)
    assert decision == Sleep(2.0, "hint")
    decision, state = _poll(state=state)
    assert decision == Sleep(0.2, "backoff")


def test_backoff_grows_to_its_cap() -> None:
    # P4 with rand = 0: 0.2, 0.3, 0.45, ... up to 5.0
    state = PollState()
    delays: list[float] = []
    for _ in range(12):
        decision, state = _poll(state=state)
        assert isinstance(decision, Sleep)
        assert decision.reason == "backoff"
        delays.append(decision.seconds)
    expected = [min(5.0, 0.2 * 1.5**n) for n in range(12)]
    assert delays == pytest.approx(expected)
    assert delays[-1] == 5.0
    assert state.backoff_attempt == 12


@pytest.mark.parametrize(
    ("backoff_attempt", "rand", "expected"),
    [
        (0, 0.5, 0.2 * 0.9),  # up to 20 % subtracted
        (0, 0.999, 0.2 * (1 - 0.2 * 0.999)),
        (100, 0.5, 4.5),
        (10**100, 0.0, 5.0),  # overflow-safe
    ],
)
def test_backoff_jitter_is_subtracted(backoff_attempt: int, rand: float, expected: float) -> None:
    # P4
    decision, _ = _poll(state=PollState(backoff_attempt=backoff_attempt), rand=rand)
    assert isinstance(decision, Sleep)
    assert decision.reason == "backoff"
    assert decision.seconds == pytest.approx(expected)


def test_hint_is_read_from_every_response() -> None:
    # P3: never only the first
    state = PollState()
    seen: list[tuple[float, str]] = []
    for hint in (1000, None, 3000, 100, None, None):
        decision, state = _poll(state=state, retry_after_ms=hint)
        assert isinstance(decision, Sleep)
        seen.append((decision.seconds, decision.reason))
    assert seen == [
        (1.0, "hint"),
        (0.2, "backoff"),
        (3.0, "hint"),
        (0.1, "hint"),
        (0.2, "backoff"),
        (pytest.approx(0.3), "backoff"),
    ]


@pytest.mark.parametrize(
    ("retry_after_ms", "expires_in", "expected"),
    [
        (2000, 0.5, Sleep(0.5, "expires_at")),  # never sleep past expires_at
        # not below the hint floor: a rolling expires_at just ahead is no busy loop
        (2000, 0.001, Sleep(0.05, "expires_at")),
        (2000, 2.0, Sleep(2.0, "hint")),  # a tie keeps the hint's reason
        (2000, 3.0, Sleep(2.0, "hint")),
        (None, 0.1, Sleep(0.1, "expires_at")),
        (None, math.inf, Sleep(0.2, "backoff")),
    ],
)
def test_expiry_ahead_caps_the_delay(
    retry_after_ms: int | None, expires_in: float, expected: Sleep
) -> None:
    # P5
    decision, state = _poll(retry_after_ms=retry_after_ms, expires_in=expires_in)
    assert decision == expected
    assert not state.expiry_look_done


def test_after_expiry_one_quick_look_then_the_normal_schedule() -> None:
    # P6: the server never flips to expired; it is looked at quickly once, then not hammered
    decision, state = _poll(retry_after_ms=2000, expires_in=0.0)
    assert decision == Sleep(0.05, "after-expiry")
    assert state.expiry_look_done
    decision, state = _poll(state=state, retry_after_ms=2000, expires_in=-0.05)
    assert decision == Sleep(2.0, "hint")
    decision, state = _poll(state=state, expires_in=-10.0)
    assert decision == Sleep(0.2, "backoff")
    # P5 still applies to a later expires_at in the future
    decision, state = _poll(state=state, retry_after_ms=2000, expires_in=1.0)
    assert decision == Sleep(1.0, "expires_at")


def test_after_expiry_look_is_used_up_even_when_the_delay_is_shorter() -> None:
    # P6: a delay already below expiry_grace keeps its reason, and the look is spent
    policy = PollPolicy(expiry_grace=5.0)
    decision, state = _poll(policy, retry_after_ms=1000, expires_in=-1.0)
    assert decision == Sleep(1.0, "hint")
    assert state.expiry_look_done


def test_after_expiry_grace_zero_looks_immediately() -> None:
    decision, _ = _poll(PollPolicy(expiry_grace=0), expires_in=-1.0)
    assert decision == Sleep(0.0, "after-expiry")


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [
        (1.5, Sleep(1.0, "hint")),
        (1.0, Sleep(1.0, "deadline")),  # the last look lands on the deadline
        (0.3, Sleep(0.3, "deadline")),
        (1e-9, Sleep(1e-9, "deadline")),
        (math.inf, Sleep(1.0, "hint")),
    ],
)
def test_deadline_ahead_cuts_the_delay(remaining: float, expected: Sleep) -> None:
    # P7
    decision, _ = _poll(retry_after_ms=1000, remaining=remaining)
    assert decision == expected


def test_deadline_beats_expiry() -> None:
    # P7 after P5/P6: the shortest reason wins, the deadline last
    decision, _ = _poll(retry_after_ms=1000, expires_in=0.5, remaining=0.2)
    assert decision == Sleep(0.2, "deadline")
    decision, _ = _poll(retry_after_ms=1000, expires_in=-1.0, remaining=0.01)
    assert decision == Sleep(0.01, "deadline")


def test_state_counts_polls_and_sleeps() -> None:
    state = PollState()
    for hint in (1000, 2000, None):
        _, state = _poll(state=state, retry_after_ms=hint)
    assert state.polls == 3
    assert state.slept == pytest.approx(3.2)
    assert state.backoff_attempt == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rand": 1.0},
        {"rand": -0.5},
        {"rand": math.nan},
        {"remaining": math.nan},
        {"expires_in": math.nan},
    ],
)
def test_poll_rejects_programming_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _poll(**kwargs)


def test_a_whole_wait_on_a_fake_clock() -> None:
    """The documented example: a sleeping machine wakes, the command runs, succeeds."""
    # (status, retry_after_ms) the server answers at each look; time moves only by sleeps
    script = [
        ("wake_in_progress", 1500),
        ("wake_in_progress", 1500),
        ("queued", 250),
        ("running", None),
        ("running", None),
        ("running", None),
        ("succeeded", None),
    ]
    policy = PollPolicy()
    state = PollState()
    now, deadline = 0.0, 10.0
    sleeps: list[Sleep] = []
    for status, hint in script:
        decision, state = next_poll(
            policy,
            state,
            done=status == "succeeded",
            retry_after_ms=hint,
            expires_in=None,
            remaining=deadline - now,
            rand=0.0,
        )
        if isinstance(decision, Sleep):
            sleeps.append(decision)
            now += decision.seconds
    assert decision == Done()
    assert [(s.seconds, s.reason) for s in sleeps] == [
        (1.5, "hint"),
        (1.5, "hint"),
        (0.25, "hint"),
        (0.2, "backoff"),
        (pytest.approx(0.3), "backoff"),
        (pytest.approx(0.45), "backoff"),
    ]
    assert now == pytest.approx(4.2)
    assert state.polls == 7


def test_a_wait_that_times_out_gives_up_exactly_at_the_deadline() -> None:
    policy = PollPolicy()
    state = PollState()
    now, deadline = 0.0, 2.0
    while True:
        decision, state = next_poll(
            policy,
            state,
            done=False,
            retry_after_ms=700,
            expires_in=None,
            remaining=deadline - now,
            rand=0.0,
        )
        if not isinstance(decision, Sleep):
            break
        now += decision.seconds
    assert decision == GiveUp()
    assert now == deadline
    assert state.polls == 4  # looks at 0, 0.7, 1.4 and 2.0
