"""Machines as this process knows them: :class:`MachineHandle` and the machine wait.

A machine moves through phases (``placement_pending``, ``starting``, ``running``,
``stopping``, ``sleeping``, ``destroying``, ``destroyed``, or ``failed``) towards its
``desired_state`` (``running``, ``sleeping`` or ``destroyed``). A wait on it runs on the
same pure schedule as an execution's (:func:`~dedalus_async._policy.next_poll`, rules
P1-P9: backoff, an honest deadline, polls retried within it) and judges every snapshot
with these rules:

M1. *Reached.* The phase is the one waited for: the wait returns that snapshot.
M2. *Failed.* The phase is ``failed``: :class:`~dedalus_async.MachineFailed`, at once.
M3. *Out of reach.* Waiting for ``running`` or ``sleeping`` while the machine is
    ``destroying`` or ``destroyed``: :class:`~dedalus_async.MachineStateError`, at once
    (nothing but a new machine can come of it).
M4. Anything else (an unknown phase too) is "not yet": look again, until the deadline, which
    ends the wait with :class:`~dedalus_async.MachineWaitTimeout` saying where it stood.

The machine API sends no polling hint today, so the schedule is the backoff of P4. Where
the server has the status stream (``GET /v1/machines/{id}/status/stream``, server-sent
events) and the transport can stream, each look that is "not yet" is followed by the
stream rather than a sleep:

M5. *Stream.* Every event is a lifecycle snapshot, judged by M1-M4 like a look. The
    stream ends by the deadline; an event that arrives past it is not taken (the deadline
    passed first). The server closes the stream once the machine settles: the wait then
    goes on with the schedule's next sleep and look. A dropped stream is resumed at once
    (after 0.1 s, 0.2 s, 0.3 s: three drops in a row at most, then the schedule's sleep
    and look) with ``Last-Event-ID``, the id of the last event seen, so no change is
    missed; a new look starts a new following, from the current state. A stream
    answered 404, 405 or 501 is not there: this handle polls from then on; a 5xx or 429
    answer ends this following (the schedule's sleep and look come next); any other
    error ends the wait. Streams are
    followed on the system clock only: their events come at the server's pace, in real
    time, which an injected clock (a test's fake one) neither measures nor moves.

A machine asleep is not "out of reach" of ``running``: someone may wake it (an execution
created on it does); :meth:`MachineHandle.wait` does not wake it, ``ensure_running`` does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, Protocol

import attrs

from . import _wire
from ._clock import SystemClock
from ._errors import (
    APIStatusError,
    MachineFailed,
    MachineStateError,
    MachineWaitTimeout,
    ResponseDecodeError,
    TransportError,
)
from ._models import LifecycleStatus, Machine, MachinePhase
from ._policy import (
    USE_POLICY_DEFAULT,
    Done,
    GiveUp,
    PollPolicy,
    PollState,
    UsePolicyDefault,
    next_poll,
    resolve_timeout,
)
from ._requester import DeadlineReached, Requester, Tally
from ._results import WaitStats
from ._waiting import WaitLoop

__all__ = ["MachineClient", "MachineHandle", "judge"]

logger = logging.getLogger("dedalus_async")

_GONE = frozenset({MachinePhase.DESTROYING, MachinePhase.DESTROYED})
# a stream endpoint answered so is not there (M5): poll instead
_NO_STREAM = frozenset({404, 405, 501})
# M5: drops in a row (no event between them) resumed before the schedule takes over, and
# the pause before each resume (times the drops so far), in seconds
_MAX_DROPS = 3
_DROP_PAUSE = 0.1


class MachineClient(Protocol):
    """The calls a machine handle makes (a :class:`~dedalus_async.Session` has them)."""

    async def get_machine(self, machine_id: str) -> Machine: ...

    async def wake_machine(self, machine_id: str) -> Machine: ...

    async def sleep_machine(self, machine_id: str) -> Machine: ...

    async def delete_machine(self, machine_id: str) -> Machine: ...


def judge(snapshot: Machine, until: str) -> bool:
    """Rules M1-M4: True when ``snapshot`` ends the wait for ``until``; raises when the
    machine can no longer get there."""
    phase = snapshot.phase
    if phase == until:  # M1
        return True
    if phase == MachinePhase.FAILED:  # M2
        why = snapshot.status.last_error if snapshot.status is not None else None
        raise MachineFailed(
            f"machine {snapshot.machine_id} failed while waiting for {until!r}"
            + (f": {why}" if why else "")
            + "; delete it and create a new one (or wake it, if the failure is retryable)",
            machine=snapshot,
            until=until,
        )
    if until != MachinePhase.DESTROYED and phase in _GONE:  # M3
        raise MachineStateError(
            f"machine {snapshot.machine_id} is {phase!r}: it will never be {until!r}",
            machine=snapshot,
            until=until,
        )
    return False  # M4


def settled(snapshot: Machine) -> bool:
    """The machine is where it was asked to be, or can go nowhere: a watch ends here."""
    phase = snapshot.phase
    return phase == snapshot.desired_state or phase in (
        MachinePhase.FAILED,
        MachinePhase.DESTROYED,
    )


class MachineHandle:
    """One machine, as this process knows it.

    ``last`` is the latest snapshot seen (from the create, a refresh, a wake or a wait);
    ``stats`` describes the most recent wait. ``await handle`` is
    ``await handle.wait(until="running")``.
    """

    __slots__ = ("_client", "_loop", "_streams", "last", "machine_id", "stats")

    def __init__(self, client: MachineClient, loop: WaitLoop, machine_id: str) -> None:
        self._client = client
        self._loop = loop
        self.machine_id = machine_id
        self.last: Machine | None = None
        self.stats: WaitStats | None = None
        # M5: whether the status stream may be there
        self._streams = True

    def __repr__(self) -> str:
        phase = self.last.phase if self.last else "unknown"
        return f"<MachineHandle {self.machine_id} {phase}>"

    async def refresh(self) -> Machine:
        """Fetch the machine's current state (and remember it as :attr:`last`)."""
        self.last = await self._client.get_machine(self.machine_id)
        return self.last

    async def wake(self) -> Machine:
        """Ask a sleeping machine to wake (:meth:`wait` for ``running`` to know it did)."""
        self.last = await self._client.wake_machine(self.machine_id)
        return self.last

    async def sleep(self) -> Machine:
        """Ask a running machine to sleep (files under ``/home/machine`` are kept)."""
        self.last = await self._client.sleep_machine(self.machine_id)
        return self.last

    async def delete(self) -> Machine:
        """Destroy the machine and wipe its storage."""
        self.last = await self._client.delete_machine(self.machine_id)
        return self.last

    async def wait(
        self,
        until: str = "running",
        *,
        timeout: float | UsePolicyDefault | None = USE_POLICY_DEFAULT,
        poll: PollPolicy | None = None,
    ) -> Machine:
        """Look at the machine until its phase is ``until`` (``"running"``, ``"sleeping"``
        or ``"destroyed"``) and return that snapshot.

        Ends at once with :class:`~dedalus_async.MachineFailed` when the machine fails,
        and with :class:`~dedalus_async.MachineStateError` when it can no longer get there
        (destroyed while waiting for ``running``). ``timeout`` (seconds) defaults to the
        poll policy's, ``None`` waits forever; on the deadline:
        :class:`~dedalus_async.MachineWaitTimeout`, with the last snapshot seen. This only
        watches: it does not wake a sleeping machine (``session.ensure_running`` does).
        """
        target = _wire.check_machine_target(until)
        policy = poll or self._loop.poll
        seconds = resolve_timeout(timeout, policy)
        return await self._wait(lambda snapshot: judge(snapshot, target), target, seconds, policy)

    def __await__(self) -> Generator[Any, None, Machine]:
        return self.wait().__await__()

    async def watch(
        self,
        *,
        timeout: float | UsePolicyDefault | None = USE_POLICY_DEFAULT,
        poll: PollPolicy | None = None,
    ) -> AsyncIterator[Machine]:
        """Yield a snapshot each time the phase changes (the first one too); end once the
        machine is in its desired state, failed or destroyed. Same pacing and deadline as
        :meth:`wait` (one deadline for it all)."""
        policy = poll or self._loop.poll
        seconds = resolve_timeout(timeout, policy)
        deadline = self._loop.deadline(seconds)
        snapshot = await self._wait(lambda _: True, "any phase", seconds, policy, deadline)
        yield snapshot
        while not settled(snapshot):
            left = _phase_left(snapshot.phase)
            snapshot = await self._wait(left, "a new phase", seconds, policy, deadline)
            yield snapshot

    async def _wait(
        self,
        done_when: Callable[[Machine], bool],
        until: str,
        timeout: float | None,
        policy: PollPolicy,
        deadline: float | None = None,
    ) -> Machine:
        """Poll until ``done_when`` (which may raise) or the deadline (rules P1-P9)."""
        loop = self._loop
        requester = loop.requester
        with requester.guard():  # closing the Session ends the wait at once
            clock = requester.clock
            if deadline is None:
                deadline = loop.deadline(timeout)
            start = clock.monotonic()
            tally = Tally()
            state = PollState()
            request = _wire.machine_request("GET", self.machine_id)
            while True:
                tally.polls += 1
                try:
                    snapshot = await requester.send(
                        request,
                        _wire.decode_machine,
                        deadline=deadline,
                        retry=loop.poll_retry(),
                        tally=tally,
                    )
                except DeadlineReached as reached:
                    self.stats = _stats(tally, clock.monotonic() - start)
                    raise self._timeout(until, timeout) from reached.error
                self.last = snapshot
                try:
                    done = done_when(snapshot)
                    if not done and self._streams and _streams_on(requester):
                        followed = await self._follow(done_when, deadline, tally)
                        if followed is not None:
                            snapshot, done = followed, True
                except MachineStateError:
                    self.stats = _stats(tally, clock.monotonic() - start)
                    raise
                decision, state = next_poll(
                    policy,
                    state,
                    done=done,
                    retry_after_ms=None,  # the machine API sends no hint: P4's backoff
                    expires_in=None,
                    remaining=None if deadline is None else deadline - clock.monotonic(),
                    rand=requester.random(),
                )
                if isinstance(decision, Done | GiveUp):
                    self.stats = _stats(tally, clock.monotonic() - start)
                    if isinstance(decision, GiveUp):
                        raise self._timeout(until, timeout)
                    logger.debug(
                        "machine %s is %s after %d looks",
                        self.machine_id,
                        snapshot.phase,
                        tally.polls,
                    )
                    return snapshot
                tally.slept += decision.seconds
                await clock.sleep(decision.seconds)

    async def _follow(
        self, done_when: Callable[[Machine], bool], deadline: float | None, tally: Tally
    ) -> Machine | None:
        """M5: follow the status stream until ``done_when`` (which may raise), resuming it
        after a drop; ``None`` when it ended, passed the deadline, dropped too often, or
        is not there."""
        requester = self._loop.requester
        clock = requester.clock
        request = _wire.machine_request("GET", self.machine_id, "/status/stream")
        # one following: it starts at the current state (the look just taken) and every
        # resume goes on after the last event seen, so none is missed nor replayed
        events = _wire.ServerSentEvents()
        drops = 0
        while True:
            resume = events.last_id
            headers = {"Last-Event-ID": resume} if resume is not None else None
            tally.polls += 1
            try:
                async with requester.stream(request, headers=headers, deadline=deadline) as stream:
                    async for line in stream.lines():
                        event = events.feed(line)
                        if event is None:
                            continue
                        drops = 0
                        if deadline is not None and clock.monotonic() > deadline:
                            return None  # it came after the deadline: the wait ended first
                        snapshot = self._snapshot(event.data)
                        if snapshot is not None and done_when(snapshot):
                            return snapshot
                return None  # the server closed it: the machine settled
            except APIStatusError as exc:
                if exc.status in _NO_STREAM:
                    logger.debug(
                        "machine %s: no status stream (HTTP %d): polling",
                        self.machine_id,
                        exc.status,
                    )
                    self._streams = False
                    return None
                if exc.status == 429 or exc.status >= 500:
                    return None  # the schedule's next look and stream, after its sleep
                raise
            except (TransportError, ResponseDecodeError) as exc:
                drops += 1
                left = None if deadline is None else deadline - clock.monotonic()
                if drops > _MAX_DROPS or (left is not None and left <= 0):
                    return None
                logger.debug(
                    "machine %s: the status stream dropped (%s); resuming after event %s",
                    self.machine_id,
                    exc,
                    events.last_id,
                )
                pause = _DROP_PAUSE * drops
                await clock.sleep(pause if left is None else min(pause, left))
                tally.slept += pause if left is None else min(pause, left)

    def _snapshot(self, data: str) -> Machine | None:
        """The machine as one stream event shows it (remembered as :attr:`last`); ``None``
        for an event that is no lifecycle."""
        try:
            lifecycle = _wire.decode_lifecycle(data.encode())
        except ResponseDecodeError as exc:
            logger.debug("machine %s: skipping a stream event: %s", self.machine_id, exc)
            return None
        self.last = _with_lifecycle(self.machine_id, self.last, lifecycle)
        return self.last

    def _timeout(self, until: str, timeout: float | None) -> MachineWaitTimeout:
        assert timeout is not None  # only a deadline ends a wait this way
        last = self.last
        where = f"still {last.phase!r}" if last is not None else "never seen"
        if last is not None and last.desired_state:
            where += f" (desired state {last.desired_state!r})"
        return MachineWaitTimeout(
            f"machine {self.machine_id} was {where} after {timeout:g} s of waiting for "
            f"{until!r}; wait again to keep following it",
            machine_id=self.machine_id,
            until=until,
            last=last,
            timeout=timeout,
        )


def _phase_left(phase: str) -> Callable[[Machine], bool]:
    """Done when the phase differs from ``phase`` (or the machine has settled)."""
    return lambda snapshot: snapshot.phase != phase or settled(snapshot)


def _streams_on(requester: Requester) -> bool:
    """M5 applies: a transport that can stream, and real time."""
    return requester.can_stream and isinstance(requester.clock, SystemClock)


def _with_lifecycle(machine_id: str, last: Machine | None, lifecycle: LifecycleStatus) -> Machine:
    """The machine as a stream event shows it: the last snapshot's size and desired state,
    this event's lifecycle."""
    if last is None:
        return Machine(
            machine_id=machine_id,
            phase=lifecycle.phase,
            status=lifecycle,
            revision=lifecycle.revision,
        )
    return attrs.evolve(last, phase=lifecycle.phase, status=lifecycle, revision=lifecycle.revision)


def _stats(tally: Tally, elapsed: float) -> WaitStats:
    return WaitStats(polls=tally.polls, retries=tally.retries, slept=tally.slept, elapsed=elapsed)
