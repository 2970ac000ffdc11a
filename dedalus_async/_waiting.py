"""The wait loop: look at an execution, ask :func:`~dedalus_async._policy.next_poll`, sleep,
until it is done or the deadline passes.

:class:`WaitLoop` is the engine behind :meth:`ExecutionHandle.wait`, ``watch()``,
``Session.run`` and every waiter of a fan-out. Around the loop it keeps the wait's
:class:`~dedalus_async.WaitStats`, turns the end of the deadline into a
:class:`~dedalus_async.WaitTimeout` carrying the last snapshot, and, when asked, deletes
the remote execution of a wait that did not finish (``cancel_remote``).

Time and randomness come from the requester's injected clock and ``random``: the loop
never reads the real clock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import anyio
import attrs

from . import _wire
from ._errors import DedalusError, WaitTimeout
from ._models import Execution, ExecutionRef
from ._policy import Done, GiveUp, PollPolicy, PollState, RetryPolicy, Sleep, next_poll
from ._requester import DeadlineReached, Requester, Tally
from ._results import WaitStats
from ._wire import Response

__all__ = ["WaitLoop", "Watched", "changed_from", "is_terminal"]

logger = logging.getLogger("dedalus_async")
T = TypeVar("T")

# the last look at a wait's deadline: one try, whatever the error
_ONE_TRY = RetryPolicy(max_attempts=1, budget=0.0, min_pause=0.0)


class Watched(Protocol):
    """What the loop reads and updates of the execution it waits for (a handle)."""

    machine_id: str
    execution_id: str
    #: the latest snapshot seen; the loop starts from it and keeps it current
    last: Execution | None
    #: the loop's statistics, set when a wait ends
    stats: WaitStats | None

    @property
    def ref(self) -> ExecutionRef: ...


def is_terminal(snapshot: Execution) -> bool:
    return snapshot.is_terminal


def changed_from(status: str | None) -> Callable[[Execution], bool]:
    """Done when the status differs from ``status`` (or is terminal)."""
    return lambda snapshot: snapshot.status != status or snapshot.is_terminal


class WaitLoop:
    """Waits for executions over one :class:`Requester`; ``new_key`` mints the
    Idempotency-Key of a remote cancel's DELETE."""

    def __init__(
        self,
        requester: Requester,
        *,
        poll: PollPolicy,
        new_key: Callable[[], str],
    ) -> None:
        self.requester = requester
        #: the pacing of waits that pass no policy of their own (replaceable at any time)
        self.poll = poll
        self._new_key = new_key
        self._poll_retry_cache: tuple[RetryPolicy, RetryPolicy] | None = None
        #: where this Session's poll grid sits, as a fraction of a grid step (P3 of
        #: _policy): drawn once, so the waits of one Session share it and Sessions differ
        self.grid_phase = requester.random()

    def deadline(self, seconds: float | None) -> float | None:
        """The monotonic moment ``seconds`` from now (``None``: no deadline)."""
        return None if seconds is None else self.requester.clock.monotonic() + seconds

    async def wait(
        self,
        watched: Watched,
        *,
        timeout: float | None,
        deadline: float | None,
        done_when: Callable[[Execution], bool],
        cancel_remote: bool,
        policy: PollPolicy,
        pause: Callable[[Sleep], Awaitable[Execution | None]] | None = None,
    ) -> Execution:
        """Poll until ``done_when(snapshot)`` or the deadline (then :class:`WaitTimeout`).

        ``timeout`` is only for the message (the deadline decides). ``pause`` replaces the
        sleep between polls: it may return a fresh snapshot it got some other way (fan-out
        reads one list page for many waiters), or None to have this loop GET the execution.
        """
        telemetry = self.requester.telemetry
        if telemetry is None:
            return await self._wait(
                watched, timeout, deadline, done_when, cancel_remote, policy, pause
            )
        before = watched.stats

        def stats() -> WaitStats | None:
            return None if watched.stats is before else watched.stats

        with telemetry.wait_span(watched.machine_id, watched.execution_id, stats) as observe:

            def observed(snapshot: Execution) -> bool:
                observe(snapshot)  # every snapshot the loop judges passes through here
                return done_when(snapshot)

            return await self._wait(
                watched, timeout, deadline, observed, cancel_remote, policy, pause
            )

    async def _wait(
        self,
        watched: Watched,
        timeout: float | None,
        deadline: float | None,
        done_when: Callable[[Execution], bool],
        cancel_remote: bool,
        policy: PollPolicy,
        pause: Callable[[Sleep], Awaitable[Execution | None]] | None,
    ) -> Execution:
        requester = self.requester
        # closing the Session ends the wait at once (see Requester.guard)
        with requester.guard():
            clock = requester.clock
            start = clock.monotonic()
            tally = Tally()
            poll_retry = self.poll_retry()
            state = PollState()
            request = _wire.execution_request("GET", watched.machine_id, watched.execution_id)
            snapshot = watched.last
            finished = False
            try:
                while True:
                    if snapshot is None:
                        tally.polls += 1
                        try:
                            snapshot = await requester.send(
                                request,
                                _wire.decode_execution,
                                deadline=deadline,
                                retry=poll_retry,
                                tally=tally,
                            )
                        except DeadlineReached as reached:
                            assert timeout is not None
                            assert deadline is not None
                            # Retries stopped short of the deadline: use the time left for one
                            # last look at the deadline itself (a wait never gives up early).
                            snapshot = await self._last_look(request, deadline, tally)
                            if snapshot is None:
                                watched.stats = self._stats(tally, start, None)
                                raise _timeout_error(watched, timeout) from reached.error
                        watched.last = snapshot
                    done = done_when(snapshot)
                    expires_in = None
                    if snapshot.expires_at is not None:
                        expires_in = (snapshot.expires_at - clock.now()).total_seconds()
                    now = clock.monotonic()
                    decision, state = next_poll(
                        policy,
                        state,
                        done=done,
                        retry_after_ms=snapshot.retry_after_ms,
                        expires_in=expires_in,
                        remaining=None if deadline is None else deadline - now,
                        rand=requester.random(),
                        # this loop's own sleeps land on the Session's poll grid; a pause
                        # (fan-out) keeps the uniform jitter and schedules by itself
                        grid_offset=(
                            now - self.grid_phase * policy.hint_jitter if pause is None else None
                        ),
                    )
                    if isinstance(decision, Done):
                        finished = True
                        watched.stats = self._stats(tally, start, snapshot)
                        _log_end(watched, snapshot, watched.stats)
                        return snapshot
                    if isinstance(decision, GiveUp):
                        assert timeout is not None
                        watched.stats = self._stats(tally, start, None)
                        raise _timeout_error(watched, timeout)
                    if pause is None:
                        tally.slept += decision.seconds
                        await clock.sleep(decision.seconds)
                        snapshot = None
                    else:
                        before = clock.monotonic()
                        snapshot = await pause(decision)
                        tally.slept += clock.monotonic() - before
                        if snapshot is not None:
                            tally.polls += 1  # a look, even if it cost no request of its own
                            watched.last = snapshot
            finally:
                if not finished and cancel_remote:
                    await self.cancel_remote(watched)

    async def _last_look(
        self, request: _wire.Request, deadline: float, tally: Tally
    ) -> Execution | None:
        """Sleep to the deadline, then GET once (no retry); None if that fails too."""
        requester = self.requester
        clock = requester.clock
        left = deadline - clock.monotonic()
        if left <= 0:
            return None
        tally.slept += left
        await clock.sleep(left)
        tally.polls += 1
        try:
            return await requester.send(
                request, _wire.decode_execution, retry=_ONE_TRY, deadline=deadline, tally=tally
            )
        except (DedalusError, DeadlineReached):
            return None

    async def send_patiently(self, request: _wire.Request, decode: Callable[[Response], T]) -> T:
        """Send ``request`` retrying transient errors the way a wait's polls do: by time (the
        retry policy's ``budget``), not by a count of tries. For the reads that follow or
        finish a wait (the output, a followed event stream), so a short server blip that
        ``wait()`` survives does not fail them either."""
        requester = self.requester
        deadline = requester.clock.monotonic() + requester.retry.budget
        try:
            return await requester.send(request, decode, deadline=deadline, retry=self.poll_retry())
        except DeadlineReached as reached:
            raise reached.error from None

    async def cancel_remote(self, watched: Watched) -> None:
        """DELETE the execution, shielded from the cancellation in progress, time-boxed."""
        if watched.last is not None and watched.last.is_terminal:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.requester.request_timeout):
            try:
                request = _wire.execution_request(
                    "DELETE",
                    watched.machine_id,
                    watched.execution_id,
                    idempotency_key=self._new_key(),
                )
                # not paced: a rate-limit pause of the Session must not keep the cancel
                # from reaching the server (it is one request, and it ends work)
                watched.last = await self.requester.send(
                    request, _wire.decode_execution, paced=False
                )
                logger.debug("cancelled %s remotely", watched.execution_id)
            except DedalusError as exc:
                logger.warning("could not cancel %s remotely: %s", watched.execution_id, exc)

    def poll_retry(self) -> RetryPolicy:
        """The retry policy of a wait's polls: the requester's, bounded by the deadline alone.

        Polls retry transient errors for as long as the deadline allows (P9 of _policy).
        Built once per RetryPolicy (``retry`` may be replaced), not once per wait.
        """
        retry = self.requester.retry
        cached = self._poll_retry_cache
        if cached is None or cached[0] is not retry:
            cached = (retry, attrs.evolve(retry, max_attempts=1 << 30, budget=1e12))
            self._poll_retry_cache = cached
        return cached[1]

    def _stats(self, tally: Tally, start: float, terminal: Execution | None) -> WaitStats:
        clock = self.requester.clock
        lag = None
        if terminal is not None and terminal.completed_at is not None:
            lag = (clock.now() - terminal.completed_at).total_seconds()
        return WaitStats(
            polls=tally.polls,
            retries=tally.retries,
            slept=tally.slept,
            elapsed=clock.monotonic() - start,
            detection_lag=lag,
        )


def _timeout_error(watched: Watched, timeout: float) -> WaitTimeout:
    status = watched.last.status if watched.last is not None else "unseen"
    return WaitTimeout(
        f"execution {watched.execution_id} on {watched.machine_id} was still "
        f"{status!r} after {timeout:g} s; it keeps running remotely unless cancelled: "
        "resume with session.attach(exc.ref).wait()",
        ref=watched.ref,
        last=watched.last,
        timeout=timeout,
    )


def _log_end(watched: Watched, snapshot: Execution, stats: WaitStats) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "wait for %s ended %s: polls=%d retries=%d slept=%.3fs elapsed=%.3fs lag=%s",
            watched.execution_id,
            snapshot.status,
            stats.polls,
            stats.retries,
            stats.slept,
            stats.elapsed,
            "n/a" if stats.detection_lag is None else f"{stats.detection_lag:.3f}s",
        )
