"""The throttle's whole life on a fake clock: rate, burst, cut, pause, recovery, release.

Each test drives one throttle sequentially (one caller at a time), where the schedule is
exact, and checks it against the rules T1-T6 of dedalus_async._throttle written out as
arithmetic. Found by mutation testing (`nox -s mutation`): these are the paths the
example tests in test_throttle.py never reached.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedalus_async import Throttle
from dedalus_async.testing import FakeClock

rates = st.floats(min_value=0.5, max_value=1000.0)
bursts = st.integers(min_value=1, max_value=8)
pauses = st.floats(min_value=0.01, max_value=30.0)
fractions = st.floats(min_value=0.0, max_value=1.0)


def _run(coroutine: object) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


async def _times(throttle: Throttle, clock: FakeClock, n: int) -> list[float]:
    """When each of n requests in a row is let go, relative to now."""
    start = clock.monotonic()
    times = []
    for _ in range(n):
        waiting = throttle.acquire()
        if waiting is not None:
            await waiting
        times.append(clock.monotonic() - start)
    return times


def _schedule(rate: float, burst: float, n: int, offset: float = 0.0) -> list[float]:
    """T1 written out: after a quiet spell, `burst` go at once, then one per 1 / rate."""
    return [offset + max(0.0, (k - (burst - 1)) / rate) for k in range(n)]


@settings(max_examples=40, deadline=None)
@given(rate=rates, burst=bursts, n=st.integers(min_value=1, max_value=12))
def test_rate_and_burst_follow_the_schedule(rate: float, burst: int, n: int) -> None:
    """T1: after a quiet spell `burst` requests go at once, the rest 1 / rate apart."""
    clock = FakeClock()
    throttle = Throttle(rate, burst=burst, clock=clock)

    async def main() -> None:
        assert await _times(throttle, clock, n) == pytest.approx(_schedule(rate, burst, n))
        # a quiet spell long enough refills the burst
        clock.advance(burst / rate + 1.0)
        assert await _times(throttle, clock, n) == pytest.approx(_schedule(rate, burst, n))

    _run(main())


@settings(max_examples=40, deadline=None)
@given(rate=rates, burst=bursts, pause=pauses, recovery=st.floats(0.5, 20.0))
def test_whole_life_cut_pause_recovery_burst(
    rate: float, burst: int, pause: float, recovery: float
) -> None:
    """T2-T5 then T1 again: a 429 pauses everyone and halves the rate; the schedule
    restarts at the end of the pause one request at a time (no burst); successes bring the
    rate back linearly over recovery_time, and with it the burst."""
    clock = FakeClock()
    throttle = Throttle(rate, burst=burst, recovery_time=recovery, clock=clock)

    async def main() -> None:
        throttle.rate_limited(pause, throttle.epoch)
        assert throttle.epoch == 1
        assert throttle.recovering
        assert throttle.current_rate == pytest.approx(rate / 2)
        assert throttle.paused_until == pytest.approx(clock.monotonic() + pause)
        # released at the end of the pause, then at the cut rate, no burst
        times = await _times(throttle, clock, 3)
        assert times == pytest.approx([pause + k * 2 / rate for k in range(3)])
        # recovery: linear from the end of the pause, whole again after recovery_time
        end_of_pause = throttle.paused_until
        clock.advance(recovery / 4)
        throttle.succeeded()
        climbed = clock.monotonic() - end_of_pause
        expected = min(rate, rate / 2 + 0.5 * rate * climbed / recovery)
        assert throttle.current_rate == pytest.approx(expected)
        assert throttle.recovering == (expected < rate)
        clock.advance(recovery)
        throttle.succeeded()
        assert throttle.current_rate == rate
        assert not throttle.recovering
        # whole again: the burst is back after a quiet spell (past the last cut-rate slot)
        clock.advance((burst + 2) / rate + 1.0)
        assert await _times(throttle, clock, burst + 2) == pytest.approx(
            _schedule(rate, burst, burst + 2)
        )

    _run(main())


@settings(max_examples=30, deadline=None)
@given(rate=rates, fraction=st.floats(0.05, 0.95))
def test_slots_are_spaced_by_the_climbing_rate(rate: float, fraction: float) -> None:
    """T4: while the rate climbs back, requests are spaced by the rate in force."""
    recovery = 4.0
    clock = FakeClock()
    throttle = Throttle(rate, recovery_time=recovery, clock=clock)

    async def main() -> None:
        throttle.rate_limited(None, throttle.epoch)  # a cut without a pause
        clock.advance(fraction * recovery)
        throttle.succeeded()
        climbed = rate / 2 + 0.5 * rate * fraction
        assert throttle.current_rate == pytest.approx(climbed)
        clock.advance(10.0)  # let any earlier slot pass; succeeded() is not called again
        times = await _times(throttle, clock, 3)
        assert times == pytest.approx([0.0, 1 / climbed, 2 / climbed])

    _run(main())


@settings(max_examples=30, deadline=None)
@given(pause=pauses, u=fractions)
def test_release_without_a_rate_is_spread(pause: float, u: float) -> None:
    """T5 without a rate: the first caller after a 429 waits the pause plus u times a
    quarter of it (at most 1 s); once the pause is over, the fast path is back."""
    clock = FakeClock()
    throttle = Throttle(clock=clock, random=lambda: u)

    async def main() -> None:
        throttle.rate_limited(pause, throttle.epoch)
        assert throttle.active
        assert throttle.epoch == 1
        assert await _times(throttle, clock, 1) == pytest.approx([pause + u * min(1.0, pause / 4)])
        assert throttle.acquire() is None
        assert throttle.active is False

    _run(main())


async def test_the_schedule_restarts_at_the_end_of_a_pause() -> None:
    """T5: slots handed out far ahead before a 429 are void; the next caller goes at the
    end of the pause, not after the void slots."""
    clock = FakeClock()
    throttle = Throttle(10.0, clock=clock)
    for _ in range(30):  # 30 slots taken: the schedule runs 3 s ahead
        waiting = throttle.acquire()
        if asyncio.iscoroutine(waiting):
            waiting.close()  # its holder gave up
    throttle.rate_limited(1.0, throttle.epoch)
    assert await _times(throttle, clock, 2) == pytest.approx([1.0, 1.2])


async def test_a_stale_429_without_retry_after_changes_nothing() -> None:
    """T3: a 429 from a request sent before the last cut, without Retry-After, neither
    cuts again nor voids anyone's slot; it is only counted."""
    clock = FakeClock()
    throttle = Throttle(10.0, clock=clock)
    old = throttle.epoch
    throttle.rate_limited(None, old)
    assert (throttle.epoch, throttle.current_rate) == (1, 5.0)
    throttle.rate_limited(None, old)
    assert (throttle.epoch, throttle.current_rate, throttle.rate_limited_count) == (1, 5.0, 2)
    assert repr(throttle) == "<Throttle 5/s rate_limited=2>"


async def test_two_429s_in_a_row_while_a_waiter_holds_a_slot() -> None:
    """T3/T5: a waiter whose slot is voided twice queues again under the newest schedule
    and goes at the end of the last pause (it does not loop forever)."""
    clock = FakeClock()
    throttle = Throttle(10.0, clock=clock)
    assert throttle.acquire() is None
    waiting = throttle.acquire()
    assert waiting is not None
    start = clock.monotonic()
    throttle.rate_limited(1.0, throttle.epoch)
    throttle.rate_limited(3.0, throttle.epoch)
    assert throttle.epoch == 2
    assert throttle.current_rate == pytest.approx(2.5)
    await asyncio.wait_for(waiting, timeout=5.0)
    assert clock.monotonic() - start == pytest.approx(3.0)
    # the next slot follows one interval (at 2.5/s) later
    assert await _times(throttle, clock, 1) == pytest.approx([0.4])


async def test_a_voided_waiter_whose_new_slot_is_now_goes_at_once() -> None:
    """T5: after a pause without a rate, a voided waiter that finds the pause over goes."""
    clock = FakeClock()
    throttle = Throttle(clock=clock, random=lambda: 0.0)
    throttle.rate_limited(1.0, throttle.epoch)
    waiting = throttle.acquire()
    assert waiting is not None
    throttle.rate_limited(0.5, throttle.epoch)  # shorter: does not extend, nothing voided
    assert throttle.epoch == 1
    await asyncio.wait_for(waiting, timeout=5.0)
    assert clock.sleeps == [1.0]


async def test_the_rate_stops_at_exactly_its_floor() -> None:
    """T3: the floor is rate / 32; once there, a 429 without a pause tightens nothing."""
    throttle = Throttle(64.0, clock=FakeClock())
    for _ in range(10):
        throttle.rate_limited(None, throttle.epoch)
    assert throttle.current_rate == 2.0
    assert throttle.epoch == 5  # 64 -> 32 -> 16 -> 8 -> 4 -> 2
    assert repr(throttle) == "<Throttle 2/s rate_limited=10>"


def test_no_usable_pause_without_a_rate_leaves_the_fast_path() -> None:
    """T2/T6: a 429 with Retry-After 0 or none, and no rate: nothing tightens."""
    throttle = Throttle(clock=FakeClock())
    for retry_after in (0.0, None, -1.0, math.nan):
        throttle.rate_limited(retry_after, throttle.epoch)
    assert (throttle.epoch, throttle.active, throttle.paused_until) == (0, False, -math.inf)
    assert repr(throttle) == "<Throttle unlimited rate_limited=4>"


def test_no_recovery_before_or_at_the_end_of_the_pause() -> None:
    """T4: successes during the pause, and exactly at its end, do not grow the rate."""
    clock = FakeClock()
    throttle = Throttle(10.0, clock=clock)
    throttle.rate_limited(2.0, throttle.epoch)
    throttle.succeeded()
    clock.advance(2.0)
    throttle.succeeded()
    assert throttle.current_rate == 5.0
    clock.advance(1.0)
    throttle.succeeded()
    assert throttle.current_rate == pytest.approx(6.0)  # slope 0.5 * 10 / 5 per second


def test_succeeded_without_a_cut_changes_nothing() -> None:
    """T4: nothing to recover: the rate and the schedule stay as they are."""
    clock = FakeClock()
    throttle = Throttle(10.0, burst=3, clock=clock)
    throttle.succeeded()
    assert (throttle.current_rate, throttle.recovering) == (10.0, False)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rate": 0}, ValueError, r"^rate must be a positive finite number, got 0$"),
        ({"rate": "10"}, TypeError, r"^rate must be a number, got '10'$"),
        ({"rate": 10.0, "burst": 0.5}, ValueError, r"^burst must be >= 1, got 0\.5$"),
        ({"burst": "2"}, TypeError, r"^burst must be a number, got '2'$"),
        ({"max_pause": 0}, ValueError, r"^max_pause must be a positive finite number, got 0$"),
        ({"recovery_time": -1}, ValueError, r"^recovery_time must be a positive finite"),
    ],
)
def test_setting_errors_name_the_setting(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """The error a user reads names the setting and the value."""
    with pytest.raises(error, match=message):
        Throttle(**kwargs)  # type: ignore[arg-type]


def test_burst_of_exactly_one_is_allowed() -> None:
    """burst=1 (no burst) is the boundary and is accepted."""
    assert Throttle(10.0, burst=1).acquire() is None


async def test_a_429_that_does_not_extend_the_pause_does_not_tighten() -> None:
    """T2: a later 429 ending exactly when the pause already ends changes nothing: no new
    epoch (nobody's slot is void), and the release keeps the first pause's spread."""
    clock = FakeClock()
    throttle = Throttle(clock=clock, random=lambda: 0.5)
    end = clock.monotonic() + 2.0
    throttle.rate_limited(2.0, throttle.epoch)
    assert (throttle.epoch, throttle.paused_until) == (1, end)
    clock.advance(1.0)
    throttle.rate_limited(1.0, throttle.epoch)  # ends at the same time
    assert (throttle.epoch, throttle.paused_until) == (1, end)
    assert throttle.rate_limited_count == 2
    # the first caller now waits the rest of the pause plus half of 2.0 / 4
    assert await _times(throttle, clock, 1) == pytest.approx([1.0 + 0.5 * 0.5])


async def test_defaults_cap_the_pause_at_60_s_and_draw_real_random_numbers() -> None:
    """T2/T5 with the defaults: a Retry-After of an hour pauses everyone for 60 s, and the
    release is spread by the real random generator (no `random=` given)."""
    clock = FakeClock()
    throttle = Throttle(clock=clock)
    start = clock.monotonic()
    throttle.rate_limited(3600.0, throttle.epoch)
    assert throttle.paused_until == start + 60.0
    (waited,) = await _times(throttle, clock, 1)
    assert 60.0 <= waited <= 61.0  # the pause plus up to min(1 s, 60 / 4)
