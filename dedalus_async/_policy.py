"""Pure decisions: when to try a request again, and when to look at an execution again.

Nothing here does I/O, reads a clock or draws a random number. The session passes in
everything a decision depends on (the attempt number, what the server said, the seconds
left before the caller's deadline, one uniform draw ``rand`` in ``[0, 1)``) and gets back
a number or a small record saying what to do. The rules below are the specification; the
tests in ``tests/test_policy.py`` check them one by one, without an event loop.

Retrying one request (:func:`retry_delay`, :func:`is_retryable_status`)
----------------------------------------------------------------------

R1. *What is retried.* Transport errors (could not connect, connection reset, one request
    timed out) are always retryable; the session knows them by their type, no function
    here decides. For an HTTP error, :func:`is_retryable_status` decides, in this order:

    - 400, 401, 403, 404, 409 and 422: never, whatever the body says. Another try cannot
      change a bad request, a bad key, a missing resource or a machine in the wrong state
      (retrying a 409 is the pitfall of the generated SDKs);
    - a body that says ``"retryable": false``: not retried, the server knows best;
    - 408, 429 and every 5xx: retried;
    - any other status >= 400: only when the body says ``"retryable": true``;
    - below 400: never (not an error).

    A create (POST) is retried only under the same ``Idempotency-Key`` with the same body;
    that is the session's job. One 409 is retried after all (:func:`is_in_progress`): on a
    request sent under an Idempotency-Key, a 409 whose error code says the first request
    with that key is still being processed (the IETF idempotency-key draft's answer to a
    concurrent retry). Trying again with the same key gets the first request's answer.
R2. *How many tries.* ``max_attempts`` counts every try of one logical request, the first
    included. After try number ``max_attempts`` fails: give up (the error propagates).
    Except when the server said when to come back (R3): such an answer is pacing, not
    failure, and is retried for as long as the budget (R5) and the deadline (R6) allow,
    however many tries that takes (a 2 s storm of 429s must not exhaust four tries).
R3. *How long, when the server says.* A server pause (``Retry-After`` or
    ``retry-after-ms``, parsed to seconds by the caller) is obeyed as given. One in the
    past (negative) means now: 0. One longer than ``max_retry_after`` is not waited out:
    give up at once rather than hang, and never retry earlier than the server asked.
R3a. *Floor.* No pause is shorter than ``min_pause * (1 + rand)`` (50-100 ms by default),
    whatever the server or the backoff says: ``Retry-After: 0`` (or negative, or a date in
    the past) gives at most one try per ``min_pause``, never a busy loop.
    A NaN (a broken parse) counts as no pause at all.
R4. *How long, otherwise:* "full jitter" exponential backoff,
    ``rand * min(max_backoff, initial_backoff * multiplier ** (attempt - 1))``. The
    growth is capped before it can overflow, so any attempt number is safe.
R5. *Budget.* The sleeps of one logical request add up to at most ``budget`` seconds:
    give up rather than pass it (``slept + delay > budget``).
R6. *Deadline.* With a caller's deadline ``remaining`` seconds away, give up rather than
    sleep until or past it (``delay >= remaining``): a try that cannot start before the
    deadline is pointless.
R7. A delay is never negative, NaN or infinite, nor below the floor of R3a.

Polling an execution until it is done (:func:`next_poll`, :class:`PollState`)
----------------------------------------------------------------------------

:func:`next_poll` is called after every successful GET of the execution and answers
:class:`Sleep`, :class:`Done` or :class:`GiveUp`, together with the next
:class:`PollState`. Start a wait with ``PollState()``.

P1. *Done first.* If the snapshot satisfies the wait (terminal, or in the caller's
    ``until`` set: the caller decides), the answer is :class:`Done`, even when the
    deadline has already passed: a result in hand is never thrown away for a timeout.
P2. *Deadline passed.* Otherwise, ``remaining <= 0`` gives :class:`GiveUp` (the session
    raises ``WaitTimeout``).
P3. *Server hint.* When the latest response carries ``retry_after_ms`` (any int: 0,
    negative and huge included) it is obeyed:
    ``clamp(retry_after_ms / 1000, hint_floor, hint_ceiling) + jitter``, the jitter in
    ``[0, hint_jitter]``. It is only ever added, so we never look before the (clamped)
    hint. The hint is read from every response, never only the first, and it resets the
    backoff of P4 to its start. The jitter is one of two kinds:

    - *on a grid* when the caller passes ``grid_offset`` (every wait of a Session does):
      the look goes out at the first moment of the caller's poll grid at or after the
      hint. The grid's moments are ``hint_jitter`` apart; ``grid_offset`` is the seconds
      from one of them to now (only its value modulo ``hint_jitter`` counts). Looks of one
      Session due within the same ``hint_jitter`` window go out together, in one wake-up
      of the event loop (spread-out looks each pay for their own: PROFILE.md); Sessions
      place their grids at random, so pollers of many processes woken by one event are
      spread over the window and do not stampede. Within one Session, a herd is metered
      by its connection pool.
    - *uniform*, ``rand * hint_jitter``, without a grid.
P4. *No hint:* exponential backoff, quick for a short job and gentle for a long one,
    ``min(max_interval, initial_interval * multiplier ** n) * (1 - jitter * rand)`` where
    ``n`` counts the responses without a hint since the last hint (0 for the first). The
    growth is capped before it can overflow.
P5. *Expiry ahead.* If ``expires_at`` is in the future, never sleep past it without
    looking: ``delay = min(delay, max(expires_in, hint_floor))`` (reason ``"expires_at"``).
    The floor keeps a rolling ``expires_at`` just ahead (now + 2 ms on every response)
    from turning the wait into a busy loop: the look lands at most ``hint_floor`` late.
P6. *Expiry passed, still not done:* look again soon, once per wait:
    ``delay = min(delay, expiry_grace)`` (reason ``"after-expiry"``). After that the
    normal schedule applies, so a server whose status never flips to ``expired`` is not
    hammered. (P5 still applies to any later ``expires_at`` in the future.)
P7. *Deadline ahead.* If the delay reaches or passes the deadline, sleep exactly the time
    left (reason ``"deadline"``): the last look lands on the deadline and the call after
    it gives up by P2. So the total sleep never passes the deadline, and a wait never
    gives up before it.
P8. A sleep is never negative, NaN or infinite. It is at most ``hint_ceiling +
    hint_jitter`` after a hint and at most ``max_interval`` without one.
P9. *Errors while polling.* There is no separate function: a GET of a wait that fails is
    retried by :func:`retry_delay` (R1-R7) with ``remaining`` set to the time left before
    the wait's deadline, so retries never overrun it. How many tries a wait allows is the
    session's choice: lifting ``max_attempts`` and ``budget`` for polls lets a wait outlive
    a server blip, still bounded by its deadline. When :func:`retry_delay` gives up, the
    wait ends with that error; when it gave up only because of the deadline (the same call
    with ``remaining=None`` would have slept), the session should raise ``WaitTimeout``
    from the error instead, so that "timed out" and "failed" never look alike. After a GET
    succeeds again, the poll schedule resumes where it was.

Every input is checked: ``rand`` outside ``[0, 1)``, a NaN ``remaining``, ``slept`` or
``expires_in``, a ``grid_offset`` that is not finite, and ``attempt < 1`` are programming
errors and raise :class:`ValueError`.
Policies validate their fields on construction; change one with :func:`attrs.evolve`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, Literal, TypeAlias, final

import attrs

from ._checks import check_seconds, is_int, is_number

__all__ = [
    "USE_POLICY_DEFAULT",
    "Done",
    "GiveUp",
    "PollDecision",
    "PollPolicy",
    "PollState",
    "RetryPolicy",
    "Sleep",
    "SleepReason",
    "UsePolicyDefault",
    "is_in_progress",
    "is_retryable_status",
    "next_poll",
    "resolve_timeout",
    "retry_delay",
]

# --------------------------------------------------------------------------- validation

_Validator: TypeAlias = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _field_name(instance: object, attribute: attrs.Attribute[Any]) -> str:
    # "RetryPolicy.max_attempts" tells the user which knob is wrong, even via evolve().
    return f"{type(instance).__name__}.{attribute.name}"


def _number(requirement: str, ok: Callable[[Any, float], bool]) -> _Validator:
    """A validator: a finite real number (not a bool) for which ``ok(instance, value)``."""

    def validate(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        name = _field_name(instance, attribute)
        # bool is an int subclass; True seconds is always a mistake.
        if not is_number(value):
            raise TypeError(f"{name} must be a number, got {value!r}")
        try:
            as_float = float(value)
        except OverflowError:
            # An int beyond the float range would overflow later, in the arithmetic.
            as_float = math.inf
        if not math.isfinite(as_float):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if not ok(instance, value):
            raise ValueError(f"{name} must be {requirement}, got {value!r}")

    return validate


def _not_below(other: str) -> _Validator:
    """A validator: a finite number no smaller than the (already validated) field ``other``."""

    def validate(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        bound = getattr(instance, other)
        # Name the other field and its value: the mistake may be in either of the two.
        _number(f">= {other} ({bound!r})", lambda _, v: v >= bound)(instance, attribute, value)

    return validate


def _count(minimum: int) -> _Validator:
    """A validator: an int (not a bool) of at least ``minimum``."""

    def validate(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        name = _field_name(instance, attribute)
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")

    return validate


def _optional_timeout(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    # inf is refused so that "wait forever" has exactly one spelling, None, and is never
    # reached by accident through arithmetic.
    if value is None:
        return
    name = _field_name(instance, attribute)
    if isinstance(value, float) and math.isinf(value):
        raise ValueError(f"{name} must be finite (use None to wait forever), got {value!r}")
    _number("> 0", lambda _, v: v > 0)(instance, attribute, value)


def _check_rand(rand: float) -> None:
    # A draw outside [0, 1) would make jitter negative or enlarge the delay past its cap.
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1), got {rand!r}")


def _check_not_nan(name: str, value: float | None) -> None:
    # NaN compares false with everything, so it would silently skip every rule.
    # "value != value" rather than math.isnan(): an int too large for a float is fine here.
    if value is not None and value != value:
        raise ValueError(f"{name} must not be NaN")


# Clamping the exponent keeps a huge Python int (attempt 10**100) from being converted to
# a float. It cannot change the answer: for the smallest multiplier above 1 a float holds
# (1 + 2.2e-16), multiplier ** 2**63 is about e**2048, while cap / base is at most about
# e**1454 for finite positive floats, so the cap has been reached long before.
_MAX_EXPONENT = 2**63


def _grow(base: float, multiplier: float, exponent: int, cap: float) -> float:
    """``min(cap, base * multiplier ** exponent)``, never raising and never infinite.

    Assumes what the policies validate: ``0 <= base <= cap`` finite, ``multiplier >= 1``,
    ``exponent >= 0``.
    """
    if base == 0.0:
        # 0 * anything is 0, and the overflow branch below would wrongly answer cap.
        return 0.0
    try:
        grown = base * multiplier ** min(exponent, _MAX_EXPONENT)
    except OverflowError:
        # float ** raises rather than returning inf; past the largest float is past cap.
        return cap
    # base * a large finite power may still round to inf; min() turns that into cap.
    return min(cap, grown)


# ------------------------------------------------------------------------------- retry


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How one logical request is retried: rules R1-R7 of this module.

    The defaults try 4 times, sleeping a random part of 0.25 s, 0.5 s, then 1 s between
    tries (the cap grows to 8 s at most), obey a server's pause of up to 60 s, and sleep
    at most 60 s in all. Use :meth:`none` for no retries and :func:`attrs.evolve` to
    change one field.
    """

    #: Total tries of one logical request, the first included.
    max_attempts: int = attrs.field(default=4, validator=_count(1))
    #: Seconds; the cap on the first backoff (full jitter draws in ``[0, cap)``).
    initial_backoff: float = attrs.field(
        default=0.25, validator=_number(">= 0", lambda _, v: v >= 0)
    )
    #: Seconds; the backoff cap stops growing here.
    max_backoff: float = attrs.field(default=8.0, validator=_not_below("initial_backoff"))
    #: Growth of the backoff cap per try.
    multiplier: float = attrs.field(default=2.0, validator=_number(">= 1", lambda _, v: v >= 1))
    #: Seconds; a server-requested pause longer than this is not waited out: give up.
    max_retry_after: float = attrs.field(
        default=60.0, validator=_number(">= 0", lambda _, v: v >= 0)
    )
    #: Seconds one logical request may spend sleeping between its tries, in total.
    budget: float = attrs.field(default=60.0, validator=_number(">= 0", lambda _, v: v >= 0))
    #: Seconds; the shortest pause between two tries (R3a), with up to as much again of
    #: jitter: no server answer can make the retries a busy loop.
    min_pause: float = attrs.field(default=0.05, validator=_number(">= 0", lambda _, v: v >= 0))

    @classmethod
    def none(cls) -> RetryPolicy:
        """A policy that never retries: one try only."""
        return cls(max_attempts=1)


def retry_delay(
    policy: RetryPolicy,
    *,
    attempt: int,
    retry_after: float | None,
    slept: float,
    remaining: float | None,
    rand: float,
) -> float | None:
    """Seconds to sleep before the next try, or ``None`` to give up (rules R2-R7).

    Call it after try number ``attempt`` (1-based) failed with a retryable error.
    ``retry_after`` is the server's requested pause in seconds, if any; ``slept`` the
    seconds already slept between earlier tries of this request; ``remaining`` the seconds
    left before the caller's own deadline (``None``: no deadline); ``rand`` a uniform draw
    in ``[0, 1)``.
    """
    _check_rand(rand)
    _check_not_nan("slept", slept)
    _check_not_nan("remaining", remaining)
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt!r}")
    if slept < 0:
        raise ValueError(f"slept must be >= 0, got {slept!r}")

    paced = retry_after is not None and retry_after == retry_after  # (NaN != NaN)
    if attempt >= policy.max_attempts and not paced:  # R2
        return None
    if paced:  # R3
        assert retry_after is not None
        # max(0.0, x) rather than max(x, 0.0): for x == -0.0 the first argument wins,
        # and a "-0.0" sleep would look negative in logs.
        pause = max(0.0, retry_after)
        # Compared before float(): an int too large for a float is simply too long.
        if pause > policy.max_retry_after:
            return None
        delay = float(pause)
    else:  # R4
        delay = rand * _grow(
            policy.initial_backoff, policy.multiplier, attempt - 1, policy.max_backoff
        )
    delay = max(delay, policy.min_pause * (1.0 + rand))  # R3a
    if slept + delay > policy.budget:  # R5
        return None
    if remaining is not None and delay >= remaining:  # R6
        return None
    return delay


# Error codes of a 409 that mean "the request with this key is still being processed" (R1).
_IN_PROGRESS_MARKERS = ("IN_PROGRESS", "PROCESSING", "CONCURRENT")


def is_in_progress(status: int, error_code: str | None) -> bool:
    """A 409 saying the first request under the same Idempotency-Key is still being
    processed (rule R1): worth another try with that key, unlike every other 409."""
    if status != 409 or not error_code:
        return False
    code = error_code.upper()
    return any(marker in code for marker in _IN_PROGRESS_MARKERS)


# HTTP statuses that another try cannot fix, whatever the body claims (R1).
_NEVER_RETRY = frozenset({400, 401, 403, 404, 409, 422})


def is_retryable_status(status: int, server_retryable: bool | None) -> bool:
    """Whether an HTTP error status is worth another try (rule R1).

    ``server_retryable`` is the error body's ``retryable`` field (``None`` when the body
    had none). 400/401/403/404/409/422 never; otherwise an explicit ``false`` wins; 408,
    429 and 5xx yes; any other status >= 400 only on an explicit ``true``.
    """
    if status < 400 or status in _NEVER_RETRY:
        return False
    if server_retryable is not None:
        return server_retryable
    return status in (408, 429) or 500 <= status <= 599


# -------------------------------------------------------------------------------- poll


@attrs.frozen(kw_only=True)
class PollPolicy:
    """The cadence of a wait: rules P1-P8 of this module.

    Change a field with :func:`attrs.evolve`, e.g. ``attrs.evolve(policy, timeout=60)``.
    All durations are in seconds.
    """

    #: A server hint below this (0 and negative included) is raised to it.
    hint_floor: float = attrs.field(default=0.05, validator=_number("> 0", lambda _, v: v > 0))
    #: A server hint above this is lowered to it.
    hint_ceiling: float = attrs.field(default=30.0, validator=_not_below("hint_floor"))
    #: Up to this much is added to a hint, so many pollers do not stampede: a Session's
    #: waits look on a grid of moments this far apart, placed at random per Session (P3),
    #: so its looks due together share one wake-up while Sessions spread out. Small: it
    #: adds up over the polls of one wait, and every millisecond of it is detection lag.
    hint_jitter: float = attrs.field(default=0.005, validator=_number(">= 0", lambda _, v: v >= 0))
    #: Without a hint: the first backoff.
    initial_interval: float = attrs.field(default=0.2, validator=_number("> 0", lambda _, v: v > 0))
    #: Without a hint: the backoff stops growing here.
    max_interval: float = attrs.field(default=5.0, validator=_not_below("initial_interval"))
    #: Without a hint: growth of the backoff per response.
    multiplier: float = attrs.field(default=1.5, validator=_number(">= 1", lambda _, v: v >= 1))
    #: Without a hint: up to this fraction of the backoff is subtracted at random.
    jitter: float = attrs.field(
        default=0.2, validator=_number("in [0, 1)", lambda _, v: 0 <= v < 1)
    )
    #: The default deadline of a wait; ``None`` waits forever (only when asked for).
    timeout: float | None = attrs.field(default=900.0, validator=_optional_timeout)
    #: After ``expires_at`` passes with the execution not done, look again this soon, once.
    expiry_grace: float = attrs.field(default=0.05, validator=_number(">= 0", lambda _, v: v >= 0))


@final
class UsePolicyDefault:
    """The type of :data:`USE_POLICY_DEFAULT`: an argument left to the policy.

    Used where ``None`` already means something: ``wait(timeout=None)`` waits forever,
    ``wait()`` (``timeout=USE_POLICY_DEFAULT``) uses :attr:`PollPolicy.timeout`.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "USE_POLICY_DEFAULT"


#: "Not given: use the poll policy's value" (the default of every ``timeout=`` of a wait).
USE_POLICY_DEFAULT: Final = UsePolicyDefault()


def resolve_timeout(timeout: float | UsePolicyDefault | None, policy: PollPolicy) -> float | None:
    """A wait's deadline in seconds from now (``None``: none), checking both arguments."""
    if not isinstance(policy, PollPolicy):
        raise TypeError(f"poll must be a PollPolicy, not {type(policy).__name__}")
    if isinstance(timeout, UsePolicyDefault):
        return policy.timeout
    return check_seconds("timeout", timeout, none_means="no deadline")


@attrs.frozen(kw_only=True)
class PollState:
    """What a wait remembers between two looks. Start a wait with ``PollState()``."""

    #: Responses seen so far (calls of :func:`next_poll`).
    polls: int = 0
    #: Responses without a hint since the last hint: the backoff exponent ``n`` of P4.
    backoff_attempt: int = 0
    #: Whether the quick look after ``expires_at`` passed (P6) has been scheduled.
    expiry_look_done: bool = False
    #: Total seconds of the sleeps decided so far.
    slept: float = 0.0


#: Why a :class:`Sleep` lasts what it lasts: the rule that set the delay last.
SleepReason: TypeAlias = Literal["hint", "backoff", "expires_at", "after-expiry", "deadline"]


@attrs.frozen
class Sleep:
    """Sleep ``seconds``, then GET the execution again."""

    seconds: float
    reason: SleepReason


@attrs.frozen
class Done:
    """The snapshot satisfies the wait: return it."""


@attrs.frozen
class GiveUp:
    """The deadline has passed with the execution not done: raise ``WaitTimeout``."""


#: What :func:`next_poll` decides.
PollDecision: TypeAlias = Sleep | Done | GiveUp


def _hint_seconds(retry_after_ms: int) -> float:
    try:
        return retry_after_ms / 1000
    except OverflowError:
        # An int too large for a float is beyond any ceiling (or floor) anyway.
        return math.inf if retry_after_ms > 0 else -math.inf


# A hint that ends this close before a grid moment (float rounding of the grid arithmetic,
# far below a clock's resolution) is on it: the look is not put off by a whole grid step.
_ON_GRID = 1e-6


def next_poll(
    policy: PollPolicy,
    state: PollState,
    *,
    done: bool,
    retry_after_ms: int | None,
    expires_in: float | None,
    remaining: float | None,
    rand: float,
    grid_offset: float | None = None,
) -> tuple[PollDecision, PollState]:
    """Decide what follows a successful GET of the execution (rules P1-P8).

    ``done``: the snapshot satisfies the wait (decided by the caller).
    ``retry_after_ms``: the hint of this, the latest, response (``None`` if absent).
    ``expires_in``: seconds from now until the snapshot's ``expires_at``, negative once it
    has passed (``None`` if absent). ``remaining``: seconds left before the wait's
    deadline (``None``: no deadline). ``rand``: a uniform draw in ``[0, 1)``.
    ``grid_offset``: seconds since a moment of the caller's poll grid (``None``: no grid,
    the hint's jitter is uniform; see P3).
    """
    _check_rand(rand)
    _check_not_nan("expires_in", expires_in)
    _check_not_nan("remaining", remaining)
    if grid_offset is not None and not math.isfinite(grid_offset):
        raise ValueError(f"grid_offset must be finite, got {grid_offset!r}")
    polls = state.polls + 1

    if done:  # P1
        return Done(), attrs.evolve(state, polls=polls)
    if remaining is not None and remaining <= 0:  # P2
        return GiveUp(), attrs.evolve(state, polls=polls)

    reason: SleepReason
    if retry_after_ms is not None:  # P3
        hinted = min(max(_hint_seconds(retry_after_ms), policy.hint_floor), policy.hint_ceiling)
        step = policy.hint_jitter
        if grid_offset is None or not step:
            delay = hinted + rand * step
        else:
            # the next grid moment at or after the hint
            jitter = (-(grid_offset + hinted)) % step
            if step - jitter < _ON_GRID:
                # on the grid but for float rounding: now, not one whole step later
                jitter = 0.0
            delay = hinted + jitter
        reason = "hint"
        backoff_attempt = 0
    else:  # P4
        grown = _grow(
            policy.initial_interval, policy.multiplier, state.backoff_attempt, policy.max_interval
        )
        delay = grown * (1.0 - policy.jitter * rand)
        reason = "backoff"
        backoff_attempt = state.backoff_attempt + 1

    expiry_look_done = state.expiry_look_done
    if expires_in is not None:
        if expires_in > 0:  # P5
            if expires_in < delay:
                delay, reason = max(float(expires_in), min(delay, policy.hint_floor)), "expires_at"
        elif not expiry_look_done:  # P6
            expiry_look_done = True
            if policy.expiry_grace < delay:
                delay, reason = float(policy.expiry_grace), "after-expiry"

    if remaining is not None and delay >= remaining:  # P7
        delay, reason = float(remaining), "deadline"

    return Sleep(delay, reason), PollState(
        polls=polls,
        backoff_attempt=backoff_attempt,
        expiry_look_done=expiry_look_done,
        slept=state.slept + delay,
    )
