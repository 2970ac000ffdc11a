"""Hypothesis properties of the pure decisions in ``dedalus_async/_policy.py``.

Each test states its claim in its docstring. Whole waits are simulated on a float that
stands for the clock: it moves only by the sleeps the policy decides.
"""

from __future__ import annotations

import itertools
import math

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from dedalus_async._policy import (
    Done,
    GiveUp,
    PollPolicy,
    PollState,
    RetryPolicy,
    Sleep,
    next_poll,
    retry_delay,
)

# ------------------------------------------------------------------------- strategies

rands = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
# Hints as the wire could carry them: realistic, zero and negative, and absurdly large.
hints = st.one_of(st.none(), st.integers(-10_000, 120_000), st.integers())
finite = st.floats(allow_nan=False, allow_infinity=False)
small_counts = st.integers(min_value=0, max_value=60)
any_counts = st.one_of(small_counts, st.integers(min_value=0))


def _seconds(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)


@st.composite
def poll_policies(draw: st.DrawFn, *, fast: bool = False) -> PollPolicy:
    """Any valid PollPolicy; ``fast`` keeps the shortest sleep >= 0.025 s so that a
    simulated wait of up to a minute takes a few thousand steps at most."""
    low = 0.05 if fast else 1e-6
    floor = draw(_seconds(low, 5.0))
    initial = draw(_seconds(low, 5.0))
    return PollPolicy(
        hint_floor=floor,
        hint_ceiling=floor + draw(_seconds(0.0, 60.0)),
        hint_jitter=draw(_seconds(0.0, 1.0)),
        initial_interval=initial,
        max_interval=initial + draw(_seconds(0.0, 30.0)),
        multiplier=draw(_seconds(1.0, 4.0)),
        jitter=draw(_seconds(0.0, 0.5 if fast else 0.99)),
        timeout=draw(st.none() | _seconds(0.001, 3600.0)),
        expiry_grace=draw(_seconds(0.0, 1.0)),
    )


@st.composite
def poll_states(draw: st.DrawFn) -> PollState:
    """Any reachable-looking PollState, including huge backoff counters."""
    return PollState(
        polls=draw(any_counts),
        backoff_attempt=draw(any_counts),
        expiry_look_done=draw(st.booleans()),
        slept=draw(_seconds(0.0, 1e6)),
    )


@st.composite
def retry_policies(draw: st.DrawFn) -> RetryPolicy:
    """Any valid RetryPolicy, with attempt limits from 1 to astronomically many."""
    initial = draw(_seconds(0.0, 10.0))
    return RetryPolicy(
        max_attempts=draw(st.integers(min_value=1, max_value=30) | st.integers(min_value=1)),
        initial_backoff=initial,
        max_backoff=initial + draw(_seconds(0.0, 100.0)),
        multiplier=draw(_seconds(1.0, 1e6)),
        max_retry_after=draw(_seconds(0.0, 300.0)),
        budget=draw(_seconds(0.0, 600.0)),
        min_pause=draw(_seconds(0.0, 1.0)),
    )


def _clamped_hint(policy: PollPolicy, retry_after_ms: int) -> float:
    # The reference reading of P3, written independently of the module's arithmetic.
    if retry_after_ms <= policy.hint_floor * 1000:
        return policy.hint_floor
    if retry_after_ms >= policy.hint_ceiling * 1000:
        return policy.hint_ceiling
    return retry_after_ms / 1000


# ------------------------------------------------------------------ single poll steps


@given(
    policy=poll_policies(),
    state=poll_states(),
    retry_after_ms=hints,
    expires_in=st.none() | finite,
    remaining=st.none() | finite,
    rand=rands,
)
def test_poll_delay_is_bounded(
    policy: PollPolicy,
    state: PollState,
    retry_after_ms: int | None,
    expires_in: float | None,
    remaining: float | None,
    rand: float,
) -> None:
    """A sleep is finite, in [0, ceiling + hint_jitter] after a hint, [0, max_interval] without."""
    decision, _ = next_poll(
        policy,
        state,
        done=False,
        retry_after_ms=retry_after_ms,
        expires_in=expires_in,
        remaining=remaining,
        rand=rand,
    )
    if isinstance(decision, Sleep):
        assert math.isfinite(decision.seconds)
        assert decision.seconds >= 0
        if retry_after_ms is not None:
            assert decision.seconds <= policy.hint_ceiling + policy.hint_jitter
        else:
            assert decision.seconds <= policy.max_interval
        if remaining is not None:
            assert decision.seconds <= remaining
    else:
        assert isinstance(decision, GiveUp)
        assert remaining is not None
        assert remaining <= 0


@given(
    policy=poll_policies(),
    retry_after_ms=st.integers(-10_000, 120_000),
    grid_offset=_seconds(-1e4, 1e4),
    rand=rands,
)
def test_a_gridded_hint_lands_on_the_grid(
    policy: PollPolicy, retry_after_ms: int, grid_offset: float, rand: float
) -> None:
    """With a grid, a look after a hint goes out on a grid moment (grid_offset + sleep is a
    whole number of hint_jitter steps), the first one at or after the clamped hint."""
    step = policy.hint_jitter
    decision, _ = next_poll(
        policy,
        PollState(),
        done=False,
        retry_after_ms=retry_after_ms,
        expires_in=None,
        remaining=None,
        rand=rand,
        grid_offset=grid_offset,
    )
    assert isinstance(decision, Sleep)
    hint = _clamped_hint(policy, retry_after_ms)
    if step < 1e-3:  # below float precision at these offsets: only the bounds hold
        assert hint <= decision.seconds <= hint + step
        return
    assert hint <= decision.seconds < hint + step
    steps = (grid_offset + decision.seconds) / step
    assert abs(steps - round(steps)) * step < 1e-6


@given(
    policy=poll_policies(),
    state=poll_states(),
    retry_after_ms=st.integers(),
    expires_in=st.none() | finite,
    remaining=st.none() | finite,
    rand=rands,
    grid_offset=st.none() | _seconds(-1e6, 1e6),
)
def test_hint_is_honoured(
    policy: PollPolicy,
    state: PollState,
    retry_after_ms: int,
    expires_in: float | None,
    remaining: float | None,
    rand: float,
    grid_offset: float | None,
) -> None:
    """No look comes before the clamped hint, unless expiry or the deadline comes first,
    and none later than the hint's jitter after it, with or without a grid."""
    decision, after = next_poll(
        policy,
        state,
        done=False,
        retry_after_ms=retry_after_ms,
        expires_in=expires_in,
        remaining=remaining,
        rand=rand,
        grid_offset=grid_offset,
    )
    if not isinstance(decision, Sleep):
        return
    hint = _clamped_hint(policy, retry_after_ms)
    cuts = [hint]
    if expires_in is not None and expires_in > 0:
        cuts.append(expires_in)
    if expires_in is not None and expires_in <= 0 and not state.expiry_look_done:
        cuts.append(policy.expiry_grace)
    if remaining is not None:
        cuts.append(remaining)
    assert decision.seconds >= min(cuts)
    assert decision.seconds <= hint + policy.hint_jitter
    if decision.reason == "hint":
        assert decision.seconds >= hint
    assert after.backoff_attempt == 0


@given(
    policy=poll_policies(),
    state=poll_states(),
    retry_after_ms=hints,
    expires_in=st.none() | finite,
    remaining=st.none() | finite,
    rand=rands,
)
def test_done_means_done(
    policy: PollPolicy,
    state: PollState,
    retry_after_ms: int | None,
    expires_in: float | None,
    remaining: float | None,
    rand: float,
) -> None:
    """A snapshot that satisfies the wait always ends it with Done, whatever else is true."""
    decision, _ = next_poll(
        policy,
        state,
        done=True,
        retry_after_ms=retry_after_ms,
        expires_in=expires_in,
        remaining=remaining,
        rand=rand,
    )
    assert decision == Done()


@given(policy=poll_policies(), rand=rands, steps=st.integers(1, 80))
def test_backoff_never_shrinks_without_hints(policy: PollPolicy, rand: float, steps: int) -> None:
    """Without hints and with the same draw, each backoff is at least the one before it."""
    state = PollState()
    previous = 0.0
    for _ in range(steps):
        decision, state = next_poll(
            policy,
            state,
            done=False,
            retry_after_ms=None,
            expires_in=None,
            remaining=None,
            rand=rand,
        )
        assert isinstance(decision, Sleep)
        assert decision.seconds >= previous
        previous = decision.seconds


# ---------------------------------------------------------------------- whole waits


@attrs.frozen
class Snapshot:
    """What the fake server answers at one look (its expires_at on the fake clock)."""

    done: bool
    retry_after_ms: int | None
    expires_at: float | None


def _snapshots(done: st.SearchStrategy[bool]) -> st.SearchStrategy[Snapshot]:
    return st.builds(
        Snapshot,
        done=done,
        retry_after_ms=hints,
        expires_at=st.none() | _seconds(-10.0, 100.0),
    )


snapshots = _snapshots(st.booleans())
running = _snapshots(st.just(False))
finished = _snapshots(st.just(True))


@attrs.frozen
class Outcome:
    """How a simulated wait ended and what it did on the way."""

    decision: Done | GiveUp
    now: float
    sleeps: list[Sleep]
    looks: int


# No simulated wait may need more looks than this: it would mean the schedule stalls.
_MAX_LOOKS = 20_000


def _simulate(
    policy: PollPolicy,
    script: list[Snapshot],
    deadline: float | None,
    draws: list[float],
) -> Outcome:
    """Run one wait: the i-th look sees script[i] (the last one repeats forever)."""
    now = 0.0
    state = PollState()
    sleeps: list[Sleep] = []
    for look in range(_MAX_LOOKS):
        snapshot = script[min(look, len(script) - 1)]
        remaining = None if deadline is None else deadline - now
        expires_in = None if snapshot.expires_at is None else snapshot.expires_at - now
        decision, state = next_poll(
            policy,
            state,
            done=snapshot.done,
            retry_after_ms=snapshot.retry_after_ms,
            expires_in=expires_in,
            remaining=remaining,
            rand=draws[look % len(draws)],
        )
        if not isinstance(decision, Sleep):
            return Outcome(decision, now, sleeps, look + 1)
        # P5: a sleep never carries us past an expires_at that was still ahead, but for
        # the hint floor (an expiry closer than that waits the floor: no busy loop).
        if expires_in is not None and expires_in > 0:
            assert decision.seconds <= max(expires_in, policy.hint_floor)
        sleeps.append(decision)
        now += decision.seconds
    raise AssertionError(f"the wait did not end after {_MAX_LOOKS} looks")


@settings(deadline=None)
@given(
    policy=poll_policies(fast=True),
    script=st.lists(snapshots, min_size=1, max_size=30),
    deadline=_seconds(0.0, 60.0),
    draws=st.lists(rands, min_size=1, max_size=10),
)
def test_a_wait_ends_on_time(
    policy: PollPolicy, script: list[Snapshot], deadline: float, draws: list[float]
) -> None:
    """A wait ends Done at the first done look, else GiveUp at the deadline; it never oversleeps."""
    outcome = _simulate(policy, script, deadline, draws)
    first_done = next((i for i, s in enumerate(script) if s.done), None)
    # The clock is the sum of the sleeps, and it never passes the deadline (beyond the
    # rounding of one float addition).
    assert math.fsum(s.seconds for s in outcome.sleeps) <= deadline + 1e-9
    assert outcome.now <= deadline + 1e-9
    if isinstance(outcome.decision, GiveUp):
        # Not before the deadline: remaining <= 0 means now >= deadline exactly.
        assert outcome.now >= deadline
        assert first_done is None or first_done > outcome.looks - 1
    else:
        assert outcome.looks - 1 == first_done
    # P6: at most one quick look after an expiry in the whole wait.
    assert sum(s.reason == "after-expiry" for s in outcome.sleeps) <= 1


@settings(deadline=None)
@given(
    policy=poll_policies(fast=True),
    script=st.lists(running, min_size=1, max_size=30),
    deadline=_seconds(0.0, 60.0),
    draws=st.lists(rands, min_size=1, max_size=10),
)
def test_a_wait_that_never_finishes_gives_up_at_the_deadline(
    policy: PollPolicy, script: list[Snapshot], deadline: float, draws: list[float]
) -> None:
    """When nothing finishes, the wait ends with GiveUp and the fake clock reads the deadline."""
    outcome = _simulate(policy, script, deadline, draws)
    assert outcome.decision == GiveUp()
    assert math.isclose(outcome.now, deadline, rel_tol=1e-12, abs_tol=1e-12)
    if deadline > 0:
        assert outcome.sleeps
        assert outcome.sleeps[-1].reason == "deadline" or outcome.now == deadline


@settings(deadline=None)
@given(
    policy=poll_policies(fast=True),
    script=st.lists(running, max_size=30),
    last=finished,
    draws=st.lists(rands, min_size=1, max_size=10),
)
def test_a_wait_without_deadline_runs_until_done(
    policy: PollPolicy, script: list[Snapshot], last: Snapshot, draws: list[float]
) -> None:
    """With no deadline a wait never gives up: it ends Done at the first done snapshot."""
    outcome = _simulate(policy, [*script, last], None, draws)
    assert outcome.decision == Done()
    assert outcome.looks == len(script) + 1


@settings(deadline=None)
@given(
    policy=poll_policies(fast=True),
    expires_at=_seconds(0.0, 30.0),
    hint=hints,
    draws=st.lists(rands, min_size=1, max_size=10),
)
def test_expiry_is_looked_at_then_not_hammered(
    policy: PollPolicy, expires_at: float, hint: int | None, draws: list[float]
) -> None:
    """An execution stuck past expires_at: a look at it, one quick look, then the usual cadence."""
    script = [Snapshot(done=False, retry_after_ms=hint, expires_at=expires_at)]
    outcome = _simulate(policy, script, expires_at + 60.0, draws)
    times = [0.0]
    for sleep in outcome.sleeps:
        times.append(times[-1] + sleep.seconds)
    after = [t for t in times if t >= expires_at]
    # A look lands on expires_at, or at most the hint floor after it (P5)...
    assert after[0] - expires_at <= policy.hint_floor + 1e-9
    # ... the next one comes at most expiry_grace later (the deadline is a minute away) ...
    assert after[1] - after[0] <= policy.expiry_grace + 1e-9
    # ... and from then on looks are at least the shortest normal delay apart, but for the
    # last sleep, which the deadline may cut short.
    shortest = min(policy.hint_floor, policy.initial_interval * (1 - policy.jitter))
    gaps = [b - a for a, b in itertools.pairwise(after[1:-1])]
    assert all(gap >= shortest - 1e-9 for gap in gaps)


# --------------------------------------------------------------------------- retries


@given(
    policy=retry_policies(),
    attempt=any_counts.map(lambda n: n + 1),
    retry_after=st.none() | st.floats() | st.integers(),
    slept=_seconds(0.0, 1e6),
    remaining=st.none() | finite,
    rand=rands,
)
def test_retry_delay_is_bounded(
    policy: RetryPolicy,
    attempt: int,
    retry_after: float | None,
    slept: float,
    remaining: float | None,
    rand: float,
) -> None:
    """A retry delay is finite, >= 0, within budget and its cap, and ends before the deadline."""
    delay = retry_delay(
        policy,
        attempt=attempt,
        retry_after=retry_after,
        slept=slept,
        remaining=remaining,
        rand=rand,
    )
    paced = retry_after is not None and retry_after == retry_after  # not NaN
    if attempt >= policy.max_attempts and not paced:
        assert delay is None  # R2 counts only the errors the server gave no pause for
    if delay is None:
        return
    assert math.isfinite(delay)
    floor = policy.min_pause * (1 + rand)
    assert delay >= floor  # R3a: never a busy loop
    assert slept + delay <= policy.budget
    if paced:
        assert retry_after is not None
        assert max(0.0, retry_after) <= policy.max_retry_after
        assert delay == max(float(max(0.0, retry_after)), floor)
    else:
        assert delay <= max(policy.max_backoff, floor)
    if remaining is not None:
        assert delay < remaining


@given(
    policy=retry_policies(),
    pauses=st.lists(st.none() | _seconds(-5.0, 100.0), min_size=1, max_size=40),
    deadline=st.none() | _seconds(0.0, 300.0),
    draws=st.lists(rands, min_size=1, max_size=10),
)
def test_a_retried_request_stays_within_its_limits(
    policy: RetryPolicy,
    pauses: list[float | None],
    deadline: float | None,
    draws: list[float],
) -> None:
    """Retried to the end: <= max_attempts tries after errors without a pause (R2), any
    number after server pauses, <= budget slept, all before the deadline."""
    # Zero delays are legal (min_pause = 0, rand = 0, initial_backoff = 0), so a loop that
    # runs long must have small limits to end quickly.
    policy = attrs.evolve(
        policy,
        max_attempts=min(policy.max_attempts, 50),
        min_pause=max(policy.min_pause, 0.05),
        budget=min(policy.budget, 100.0),
    )
    now, attempt = 0.0, 1
    while True:
        pause = pauses[(attempt - 1) % len(pauses)]
        delay = retry_delay(
            policy,
            attempt=attempt,
            retry_after=pause,
            slept=now,
            remaining=None if deadline is None else deadline - now,
            rand=draws[attempt % len(draws)],
        )
        if delay is None:
            break
        assert delay >= policy.min_pause  # R3a: the loop moves time on
        now += delay
        attempt += 1
        if pause is None:
            assert attempt <= policy.max_attempts
    assert now <= policy.budget + 1e-9
    if deadline is not None:
        assert now < deadline or now == 0.0


@given(policy=retry_policies(), rand=rands, attempt=st.integers(1, 200))
def test_retry_backoff_never_shrinks(policy: RetryPolicy, rand: float, attempt: int) -> None:
    """With the same draw and no server pause, a later try never backs off less than an earlier."""
    policy = attrs.evolve(policy, max_attempts=10**9, budget=1e18)
    first = retry_delay(
        policy, attempt=attempt, retry_after=None, slept=0.0, remaining=None, rand=rand
    )
    later = retry_delay(
        policy, attempt=attempt + 1, retry_after=None, slept=0.0, remaining=None, rand=rand
    )
    assert first is not None
    assert later is not None
    assert later >= first


@given(
    attempt=st.integers(min_value=1),
    max_attempts=st.integers(min_value=1),
    multiplier=_seconds(1.0, 1e300),
    rand=rands,
)
def test_retry_backoff_never_overflows(
    attempt: int, max_attempts: int, multiplier: float, rand: float
) -> None:
    """Any attempt number, however large, gives a finite delay within the cap or None."""
    policy = RetryPolicy(max_attempts=max_attempts, multiplier=multiplier, budget=1e6)
    delay = retry_delay(
        policy, attempt=attempt, retry_after=None, slept=0.0, remaining=None, rand=rand
    )
    assert delay is None or 0.0 <= delay <= policy.max_backoff
