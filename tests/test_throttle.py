"""The Session-wide throttle (rules T1-T7 of dedalus_async._throttle), on a fake clock."""

from __future__ import annotations

import asyncio
import math
import sys

import pytest

from dedalus_async import Session, Throttle
from dedalus_async.testing import FakeClock, FakeDedalus, Fault, Script


async def _take(throttle: Throttle) -> None:
    waiting = throttle.acquire()
    if waiting is not None:
        await waiting


def _fixed(value: float) -> float:
    return value


async def test_unconfigured_throttle_is_a_no_op_until_a_429() -> None:
    """T6: without a rate, acquire() returns None (nothing to await) and never sleeps."""
    clock = FakeClock()
    throttle = Throttle(clock=clock)
    assert not throttle.active
    for _ in range(1000):
        assert throttle.acquire() is None
    assert clock.sleeps == []


def test_unconfigured_acquire_allocates_nothing() -> None:
    """T6: the hot path allocates no memory block (no coroutine, no float, no frame object)."""
    throttle = Throttle()
    acquire = throttle.acquire
    acquire()
    before = sys.getallocatedblocks()
    for _ in range(10_000):
        acquire()
    assert sys.getallocatedblocks() - before < 5


async def test_a_gate_applies_inside_gated_only_and_after_a_pause() -> None:
    """T7: inside gated(), each request also passes the gate, in the current task and the
    tasks it starts, after a 429 pause, never before; outside, the free path is back."""
    clock = FakeClock()
    throttle = Throttle(clock=clock, random=_zero)
    passed: list[tuple[str, float]] = []

    def gate() -> None:
        task = asyncio.current_task()
        assert task is not None
        passed.append((task.get_name(), clock.monotonic()))

    start = clock.monotonic()
    assert throttle.acquire() is None
    with throttle.gated(gate):
        assert throttle.active
        await _take(throttle)
        await asyncio.create_task(_take(throttle), name="started inside")
        throttle.rate_limited(2.0, throttle.epoch)
        await _take(throttle)  # waits out the pause, then passes the gate
    outside = asyncio.create_task(_take(throttle), name="started outside")
    await outside
    assert throttle.acquire() is None
    assert not throttle.active
    me = asyncio.current_task()
    assert me is not None
    assert passed == [
        (me.get_name(), start),
        ("started inside", start),
        (me.get_name(), start + 2.0),
    ]


async def test_a_gate_that_waits_holds_the_request() -> None:
    """T7: the awaitable a gate returns is awaited before acquire's caller may go."""
    clock = FakeClock()
    throttle = Throttle(clock=clock)
    with throttle.gated(lambda: clock.sleep(0.5)):
        start = clock.monotonic()
        await _take(throttle)
        await _take(throttle)
    assert clock.monotonic() - start == pytest.approx(1.0)


async def test_rate_spaces_requests_evenly() -> None:
    """T1: with burst 1, n requests in a row take (n - 1) / rate seconds."""
    clock = FakeClock()
    throttle = Throttle(10.0, clock=clock)
    start = clock.monotonic()
    for _ in range(11):
        await _take(throttle)
    assert clock.monotonic() - start == pytest.approx(1.0)
    assert clock.sleeps == pytest.approx([0.1] * 10)


async def test_burst_lets_that_many_go_at_once_after_a_quiet_spell() -> None:
    """T1: burst=5 lets five go immediately; the sixth waits one interval."""
    clock = FakeClock()
    throttle = Throttle(10.0, burst=5, clock=clock)
    for _ in range(5):
        assert throttle.acquire() is None
    await _take(throttle)
    assert clock.sleeps == pytest.approx([0.1])
    clock.advance(10.0)  # a quiet spell refills the burst
    for _ in range(5):
        assert throttle.acquire() is None


async def test_429_pauses_every_caller_without_a_rate() -> None:
    """T2/T5: a Retry-After pauses the next caller, plus at most a quarter of it as spread."""
    clock = FakeClock()
    throttle = Throttle(clock=clock, random=lambda: 0.5)
    throttle.rate_limited(2.0, throttle.epoch)
    assert throttle.active
    start = clock.monotonic()
    await _take(throttle)
    # the pause, plus half (random 0.5) of the spread of min(1 s, 0.25 * 2 s)
    assert clock.monotonic() - start == pytest.approx(2.0 + 0.25)
    assert throttle.acquire() is None  # the pause is over: back to the free path
    assert not throttle.active


async def test_pause_is_extended_never_shortened() -> None:
    """T2: a later, shorter Retry-After does not shorten the pause in force."""
    clock = FakeClock()
    throttle = Throttle(clock=clock, random=lambda: 0.0)
    throttle.rate_limited(3.0, throttle.epoch)
    until = throttle.paused_until
    throttle.rate_limited(1.0, throttle.epoch)
    assert throttle.paused_until == until
    throttle.rate_limited(5.0, throttle.epoch)
    assert throttle.paused_until == pytest.approx(clock.monotonic() + 5.0)


async def test_huge_retry_after_is_capped() -> None:
    """T2: a Retry-After of days pauses for max_pause at most."""
    clock = FakeClock()
    throttle = Throttle(clock=clock, max_pause=30.0)
    throttle.rate_limited(86_400.0, throttle.epoch)
    assert throttle.paused_until - clock.monotonic() == pytest.approx(30.0)


@pytest.mark.parametrize("retry_after", [None, 0.0, -5.0, math.nan])
async def test_429_without_a_usable_pause_does_not_pause(retry_after: float | None) -> None:
    """T2: no Retry-After, a past one, or NaN: nobody is paused (each request backs off)."""
    throttle = Throttle(clock=FakeClock())
    throttle.rate_limited(retry_after, throttle.epoch)
    assert throttle.acquire() is None
    assert throttle.rate_limited_count == 1


async def test_429_halves_the_rate_once_per_burst() -> None:
    """T3: one cut per tightening; 429s of requests sent before it do not cut again."""
    clock = FakeClock()
    throttle = Throttle(100.0, clock=clock)
    sent_before = throttle.epoch
    throttle.rate_limited(None, sent_before)
    assert throttle.current_rate == pytest.approx(50.0)
    for _ in range(10):  # the rest of the same burst
        throttle.rate_limited(None, sent_before)
    assert throttle.current_rate == pytest.approx(50.0)
    throttle.rate_limited(None, throttle.epoch)  # a request sent after the cut
    assert throttle.current_rate == pytest.approx(25.0)


async def test_rate_never_falls_below_its_floor() -> None:
    """T3: however many 429s, the rate stays at or above rate / 32."""
    throttle = Throttle(64.0, clock=FakeClock())
    for _ in range(50):
        throttle.rate_limited(None, throttle.epoch)
    assert throttle.current_rate == pytest.approx(2.0)


async def test_rate_recovers_linearly_on_successes() -> None:
    """T4: a halved rate is whole again after recovery_time seconds of successes."""
    clock = FakeClock()
    throttle = Throttle(100.0, recovery_time=4.0, clock=clock)
    throttle.rate_limited(None, throttle.epoch)
    assert throttle.recovering
    clock.advance(2.0)
    throttle.succeeded()
    assert throttle.current_rate == pytest.approx(75.0)
    clock.advance(2.0)
    throttle.succeeded()
    assert throttle.current_rate == pytest.approx(100.0)
    assert not throttle.recovering
    clock.advance(10.0)
    throttle.succeeded()
    assert throttle.current_rate == pytest.approx(100.0)


async def test_no_recovery_during_the_pause() -> None:
    """T4: time spent paused does not count as 429-free traffic."""
    clock = FakeClock()
    throttle = Throttle(100.0, recovery_time=4.0, clock=clock)
    throttle.rate_limited(3.0, throttle.epoch)
    clock.advance(2.0)
    throttle.succeeded()
    assert throttle.current_rate == pytest.approx(50.0)


async def test_after_a_pause_requests_resume_one_interval_apart() -> None:
    """T5 with a rate: no burst at the end of a pause; slots follow the cut rate."""
    clock = FakeClock()
    throttle = Throttle(10.0, burst=10, clock=clock)
    throttle.rate_limited(1.0, throttle.epoch)
    start = clock.monotonic()
    times = []
    for _ in range(3):
        await _take(throttle)
        times.append(clock.monotonic() - start)
    # the rate was cut to 5/s: slots at the end of the pause, then 0.2 s apart
    assert times == pytest.approx([1.0, 1.2, 1.4])


async def test_a_slot_taken_before_a_pause_is_void() -> None:
    """T5: a caller already waiting for its slot when a 429 arrives waits out the pause."""
    clock = FakeClock()
    throttle = Throttle(10.0, clock=clock)
    assert throttle.acquire() is None
    waiting = throttle.acquire()  # slot 0.1 s from now
    assert waiting is not None
    throttle.rate_limited(2.0, throttle.epoch)
    start = clock.monotonic()
    await waiting
    assert clock.monotonic() - start >= 2.0


def test_not_bound_to_an_event_loop() -> None:
    """Made outside any loop, one throttle works in two successive event loops."""
    throttle = Throttle(1000.0)
    throttle.rate_limited(0.01, throttle.epoch)

    async def use() -> None:
        for _ in range(3):
            await _take(throttle)

    asyncio.run(use())
    throttle.rate_limited(0.01, throttle.epoch)
    asyncio.run(use())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rate": 0}, ValueError),
        ({"rate": -1.0}, ValueError),
        ({"rate": math.inf}, ValueError),
        ({"rate": math.nan}, ValueError),
        ({"rate": True}, TypeError),
        ({"rate": "10"}, TypeError),
        ({"rate": 10.0, "burst": 0.5}, ValueError),
        ({"max_pause": 0}, ValueError),
        ({"recovery_time": -1}, ValueError),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], error: type[Exception]) -> None:
    """Every setting is checked when the throttle is made."""
    with pytest.raises(error):
        Throttle(**kwargs)  # type: ignore[arg-type]


def test_session_builds_its_throttle() -> None:
    """Session(max_requests_per_second=...) sets the rate; a bad one fails at once."""
    session = Session(api_key="k", base_url="http://127.0.0.1:1", max_requests_per_second=5)
    assert session.throttle.rate == 5.0
    assert Session(api_key="k", base_url="http://127.0.0.1:1").throttle.rate is None
    with pytest.raises(ValueError):
        Session(api_key="k", base_url="http://127.0.0.1:1", max_requests_per_second=0)


async def test_session_pauses_other_callers_after_a_429() -> None:
    """One request's 429 with Retry-After makes the Session's next request wait it out."""
    clock = FakeClock()
    async with FakeDedalus(clock=clock, script=Script.running(100.0)) as fake:
        session = Session(api_key="test-key", base_url=fake.base_url, clock=clock, random=_zero)
        async with session:
            handle = await session.create_execution(
                "dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1", ["sleep", "100"]
            )
            fake.add_fault(Fault(method="GET", status=429, headers={"Retry-After": "7"}))
            await handle.refresh()  # 429, then retried after 7 s
            assert session.throttle.rate_limited_count == 1
            assert 7.0 in clock.sleeps
            assert session.throttle.paused_until == pytest.approx(clock.monotonic())
            # a second caller does not wait: the pause is over
            before = len(clock.sleeps)
            await session.get_execution(
                "dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1", handle.execution_id
            )
            assert len(clock.sleeps) == before


async def test_session_with_a_rate_paces_its_requests() -> None:
    """max_requests_per_second=20: 11 GETs take 0.5 s on the Session's clock."""
    clock = FakeClock()
    async with FakeDedalus(clock=clock, script=Script.running(100.0)) as fake:
        session = Session(
            api_key="test-key",
            base_url=fake.base_url,
            clock=clock,
            max_requests_per_second=20,
        )
        async with session:
            handle = await session.create_execution(
                "dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1", ["sleep", "100"]
            )
            start = clock.monotonic()
            for _ in range(10):
                await handle.refresh()
            assert clock.monotonic() - start == pytest.approx(0.5)


def _zero() -> float:
    return 0.0
