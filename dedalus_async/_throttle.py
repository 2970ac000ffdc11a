"""A Session-wide request throttle: an optional rate limit that adapts to HTTP 429.

Every request a :class:`~dedalus_async.Session` sends passes :meth:`Throttle.acquire`
first, and every answer is reported back (:meth:`Throttle.succeeded`,
:meth:`Throttle.rate_limited`). The rules:

T1. *Rate.* With a configured ``rate`` (requests per second), requests are spaced
    ``1 / rate`` apart on the Session's clock; after a quiet spell up to ``burst`` may go
    back to back. Slots are handed out in the order callers ask (a "generic cell rate"
    schedule: one float of state, no queue, no task).
T2. *Pause.* A 429 carrying ``Retry-After`` pauses *every* caller of the Session until it
    has passed (at most ``max_pause`` seconds): the server asked the client, not one
    request, to back off. A later 429 can extend the pause, never shorten it.
T3. *Cut.* With a configured rate, a 429 halves the effective rate (multiplicative
    decrease, never below ``rate / 32``). Requests already in flight when the rate was cut
    answer from before the cut; their 429s extend the pause but do not cut again, so one
    burst of rejections costs one halving, not one per request.
T4. *Recovery.* After a cut the effective rate climbs back linearly while requests
    succeed (additive increase): a halved rate is whole again after ``recovery_time``
    seconds without a 429.
T5. *Release.* When a pause ends, waiting callers do not all fire at once: with a rate
    they take slots from the (cut) schedule, starting at the end of the pause; without
    one each waits an extra random fraction of the pause (up to a quarter, at most 1 s).
T6. *No rate configured:* only T2 and T5 apply. Until a 429 arrives, :meth:`acquire` is a
    single attribute test (no allocation, no await): the Session's hot path pays nothing.
T7. *Gate.* Inside :meth:`gated` (a context manager: the current task and the tasks it
    starts), a request that has passed T1-T5 also passes the given gate: a callable that
    returns ``None`` (go) or an awaitable (go once it completes). The workers of a batch
    use it for their shared requests-per-second ceiling (:mod:`~dedalus_async._workers`,
    W9). Passing the throttle first means a request that waited out a pause takes its
    gate's slot only then, not before.

Nothing here is bound to an event loop: the state is plain numbers, waiting is the
injected clock's ``sleep``. So one Session (and its throttle) can be created outside any
loop, e.g. before a FastAPI lifespan or a pytest fixture's loop starts.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import random as _random
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, TypeAlias

from ._checks import is_number
from ._clock import Clock, SystemClock

__all__ = ["Throttle", "check_rate"]

# T3: how far one 429 cuts the rate, and the floor it never goes below (rate / 32).
_DECREASE: Final = 0.5
_FLOOR_DIVISOR: Final = 32.0
# T5, without a rate: the release after a pause is spread over this fraction of it...
_SPREAD_FRACTION: Final = 0.25
# ...but never over more than this many seconds.
_MAX_SPREAD: Final = 1.0
# A wait shorter than this is rounding residue of the schedule's sums, not a wait.
_EPSILON: Final = 1e-9

#: T7: what a gate is: ``None`` to go now, or an awaitable to wait for first.
Gate: TypeAlias = Callable[[], Awaitable[None] | None]
# T7: the gate of the current task (and of the tasks it started), set by Throttle.gated
_GATE: contextvars.ContextVar[Gate | None] = contextvars.ContextVar("dedalus_gate", default=None)


def _positive(name: str, value: object) -> float:
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_rate(value: object, name: str = "rate") -> float | None:
    """Validate a requests-per-second ceiling (``None``: no ceiling); ``name`` is the
    argument to name in the error."""
    return None if value is None else _positive(name, value)


class Throttle:
    """Paces a Session's requests: an optional rate limit, plus backing off on HTTP 429.

    ``rate`` is the ceiling in requests per second (``None``: no ceiling, only 429 pauses);
    ``burst`` how many requests may go back to back after a quiet spell; ``max_pause`` caps
    a server's ``Retry-After``; ``recovery_time`` is how long a halved rate takes to climb
    back. The module docstring states the rules (T1-T7).

    A Session makes one from ``Session(max_requests_per_second=...)`` and exposes it as
    ``session.throttle``; all of the Session's callers share it.
    """

    __slots__ = (
        "_burst",
        "_burst_tolerance",
        "_clock",
        "_floor",
        "_gates",
        "_interval",
        "_last_growth",
        "_random",
        "_slope",
        "_spread",
        "_tat",
        "active",
        "current_rate",
        "epoch",
        "max_pause",
        "paused_until",
        "rate",
        "rate_limited_count",
        "recovering",
        "recovery_time",
    )

    def __init__(
        self,
        rate: float | None = None,
        *,
        burst: float = 1.0,
        max_pause: float = 60.0,
        recovery_time: float = 5.0,
        clock: Clock | None = None,
        random: Callable[[], float] | None = None,
    ) -> None:
        #: The configured ceiling in requests per second, or ``None``.
        self.rate: float | None = check_rate(rate)
        burst = _positive("burst", burst)
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        #: Seconds; the longest pause a ``Retry-After`` can impose on everyone.
        self.max_pause: float = _positive("max_pause", max_pause)
        #: Seconds of 429-free traffic after which a halved rate is whole again.
        self.recovery_time: float = _positive("recovery_time", recovery_time)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._random = random if random is not None else _random.random
        #: The rate in force now (after cuts); ``None`` without a configured rate.
        self.current_rate: float | None = self.rate
        #: Monotonic time (on the clock) before which nobody sends; 0 when never paused.
        self.paused_until: float = -math.inf
        #: Bumped each time the throttle tightens (cut or pause); see :meth:`rate_limited`.
        self.epoch: int = 0
        #: How many 429 answers were reported.
        self.rate_limited_count: int = 0
        #: True while a cut rate is climbing back (T4).
        self.recovering: bool = False
        #: False only while there is nothing to enforce (no rate, no pause): the fast path.
        self.active: bool = self.rate is not None
        # T1 state: the "theoretical arrival time" of the next request, the spacing, and
        # how far ahead of it a burst may run.
        self._tat = -math.inf
        self._interval = 0.0 if self.rate is None else 1.0 / self.rate
        self._burst = burst
        self._burst_tolerance = (burst - 1.0) * self._interval
        self._floor = 0.0 if self.rate is None else self.rate / _FLOOR_DIVISOR
        self._slope = 0.0 if self.rate is None else 0.5 * self.rate / self.recovery_time
        self._last_growth = -math.inf
        self._spread = 0.0
        # T7: how many gated() blocks are open (while any is, acquire looks for a gate)
        self._gates = 0

    def __repr__(self) -> str:
        rate = "unlimited" if self.current_rate is None else f"{self.current_rate:g}/s"
        return f"<Throttle {rate} rate_limited={self.rate_limited_count}>"

    # --- before a request ---------------------------------------------------------------

    def acquire(self) -> Awaitable[None] | None:
        """Take a slot for one request.

        Returns ``None`` when the request may go now (the common case: no allocation, no
        await), else an awaitable that completes when it may go::

            waiting = throttle.acquire()
            if waiting is not None:
                await waiting
        """
        if not self.active:
            return None
        delay = self._reserve(self._clock.monotonic())
        gate = _GATE.get() if self._gates else None
        if delay <= _EPSILON:
            return None if gate is None else gate()
        if gate is None:
            return self._wait(delay, self.epoch)
        return self._wait_then(delay, self.epoch, gate)

    @contextlib.contextmanager
    def gated(self, gate: Gate) -> Iterator[None]:
        """T7: within the block (in the current task and the tasks started in it), every
        request of this throttle's Session also passes ``gate`` before it goes."""
        token = _GATE.set(gate)
        self._gates += 1
        self.active = True
        try:
            yield
        finally:
            self._gates -= 1
            _GATE.reset(token)

    def _reserve(self, now: float) -> float:
        """Seconds until the caller may send; takes a slot of the schedule if there is one."""
        if self.rate is None:
            left = self.paused_until - now
            if left > 0:
                # T5 without a rate: spread the release so the pause does not end in a herd
                return left + self._random() * self._spread
            # the pause is over: nothing else to enforce, unless a gate is in use (T7)
            self.active = self._gates > 0
            return 0.0
        # T1, generic cell rate: the slot is the theoretical arrival time, less what a
        # burst may run ahead, but never before now or before the end of a pause.
        earliest = max(now, self.paused_until)
        tat = max(self._tat, earliest)
        self._tat = tat + self._interval
        return max(earliest, tat - self._burst_tolerance) - now

    async def _wait_then(self, delay: float, epoch: int, gate: Gate) -> None:
        await self._wait(delay, epoch)
        waiting = gate()
        if waiting is not None:
            await waiting

    async def _wait(self, delay: float, epoch: int) -> None:
        clock = self._clock
        while True:
            await clock.sleep(delay)
            if self.epoch == epoch:
                return
            # The throttle tightened while we slept: the slot we held belongs to a schedule
            # that no longer exists. Queue again under the new one (T3, T5).
            epoch = self.epoch
            delay = self._reserve(clock.monotonic())
            if delay <= _EPSILON:
                return

    # --- after a response ---------------------------------------------------------------

    def succeeded(self) -> None:
        """Report a response that was not a 429: lets a cut rate climb back (T4)."""
        if not self.recovering:
            return
        now = self._clock.monotonic()
        if now <= self._last_growth:
            return  # still inside the pause that came with the cut
        assert self.rate is not None
        assert self.current_rate is not None
        grown = self.current_rate + self._slope * (now - self._last_growth)
        self._last_growth = now
        self.current_rate = min(grown, self.rate)
        self._interval = 1.0 / self.current_rate
        if grown >= self.rate:
            self.recovering = False
            self._burst_tolerance = (self._burst - 1.0) * self._interval  # whole again

    def rate_limited(self, retry_after: float | None, epoch: int) -> None:
        """Report a 429: pause everyone for ``retry_after`` seconds and cut the rate.

        ``epoch`` is the value :attr:`epoch` had when the rejected request was sent: a
        request sent before the last tightening reports a rejection the throttle has
        already reacted to, so it may extend the pause but does not cut the rate again.
        """
        self.rate_limited_count += 1
        now = self._clock.monotonic()
        tightened = False
        if retry_after is not None and retry_after == retry_after and retry_after > 0:
            pause = min(retry_after, self.max_pause)
            if now + pause > self.paused_until:
                self.paused_until = now + pause
                self._spread = min(_MAX_SPREAD, _SPREAD_FRACTION * pause)
                tightened = True
        if (
            self.rate is not None
            and self.current_rate is not None
            and epoch == self.epoch
            and self.current_rate > self._floor
        ):
            self.current_rate = max(self._floor, self.current_rate * _DECREASE)
            self._interval = 1.0 / self.current_rate
            self._burst_tolerance = 0.0  # T5: no burst right after being told to slow down
            self.recovering = True
            tightened = True
        if tightened:
            self.epoch += 1
            self.active = True
            restart = max(now, self.paused_until)
            self._last_growth = restart
            if self.rate is not None:
                # Outstanding slots are void (their holders queue again): the schedule
                # restarts at the end of the pause, one request at a time.
                self._tat = restart
