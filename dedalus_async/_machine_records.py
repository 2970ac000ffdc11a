"""Server-side machine state: phases over time, without the network.

A :class:`MachineRecord` is the mutable truth about one machine, played **lazily** like a
scripted execution: nothing runs in the background; :meth:`MachineRecord.advance` replays
what happened up to a moment of the server's clock, each transition stamped with the exact
moment it happened. The rules (the server's choices where the API documents none):

S1. *Create.* ``placement_pending`` for ``timings.placement`` s, then ``starting`` for
    ``timings.start`` s, then ``running``. A phase of zero duration begins and ends at the
    same moment, so with zero timings the create has converged when it is answered (HTTP
    200; else 202).
S2. *Steering.* A machine in a settled phase (``running``, ``sleeping``) whose
    ``desired_state`` differs moves at once: ``running`` → ``stopping``
    (``timings.stop`` s) → ``sleeping``; ``sleeping`` → ``starting`` (``timings.wake``
    s, a wake) → ``running``. A sleep asked while starting, or a wake while stopping, is
    remembered in ``desired_state`` and applied once the current phase ends.
S3. *Autosleep.* A running machine that wants to run, has ``autosleep_seconds`` > 0 and no
    execution in progress falls asleep (S2) ``autosleep_seconds`` after its last activity
    (an execution created or finished, a wake).
S4. *Destroy.* From any phase: ``destroying`` for ``timings.destroy`` s, then
    ``destroyed``; nothing moves it after that.
S5. *Failure* (injected by tests: :meth:`MachineRecord.fail_next`): the next ``starting``
    phase (of a create, of a wake, or either) ends in ``failed`` with ``last_error``
    instead of ``running``. A failed machine stays failed until destroyed.
S6. *Revision.* ``revision`` grows by one on every change of phase, desired state or
    size; every phase change is kept in ``history``, the status stream's events.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, Final, Literal, Protocol

import attrs

from ._records import format_time, to_millis

__all__ = ["FailWhen", "MachineRecord", "MachineStore", "MachineTimings", "parse_autosleep"]

#: Phases in which a machine stays until asked to move (S2); the rest end by themselves.
SETTLED: Final = frozenset({"running", "sleeping", "failed", "destroyed"})
_UNITS: Final = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_AUTOSLEEP = re.compile(r"never|[0-9]{1,10}|(?:[0-9]{1,10}[wdhms]){1,5}")
_GROUP = re.compile(r"([0-9]+)([wdhms])")


def parse_autosleep(text: object) -> int | None:
    """Seconds of an ``autosleep`` value (``never`` is 0), or None if it is not one."""
    if not isinstance(text, str) or _AUTOSLEEP.fullmatch(text) is None:
        return None
    if text == "never":
        return 0
    if text.isdigit():
        return int(text)
    return sum(int(n) * _UNITS[unit] for n, unit in _GROUP.findall(text))


@attrs.frozen(kw_only=True)
class MachineTimings:
    """How long each transitional phase lasts, in seconds (rules S1-S4)."""

    placement: float = 0.5
    start: float = 1.5
    wake: float = 2.0
    stop: float = 1.0
    destroy: float = 1.0


FailWhen = Literal["start", "wake", "any"]


@attrs.define(eq=False)
class MachineRecord:
    """The server's mutable state for one machine; see the module docstring for its rules."""

    machine_id: str
    vcpu: float
    memory_mib: int
    storage_gib: int
    autosleep_seconds: int
    created_at: datetime
    created_mono: float
    timings: MachineTimings = attrs.Factory(MachineTimings)
    phase: str = "accepted"
    desired_state: str = "running"
    reason: str = "created"
    revision: int = 0
    last_transition_at: datetime | None = None
    last_error: str | None = None
    retryable: bool = False
    #: monotonic moment the current transitional phase ends (None in a settled phase)
    phase_until: float | None = None
    #: monotonic moment of the last activity (S3)
    last_active: float = 0.0
    #: a failure armed by :meth:`fail_next` (S5)
    failure: tuple[FailWhen, str] | None = None
    #: every lifecycle payload, one per phase change, in order (the stream's events)
    history: list[dict[str, Any]] = attrs.field(factory=list, repr=False)
    #: monotonic moment the machine last entered ``running``
    running_since: float | None = None
    #: how the server first met it: ``"api"`` (a create, or steered through the API
    #: since) or ``"execution"`` (an execution created on an id it did not know)
    origin: str = "api"
    _waking: bool = False

    def at(self, mono: float) -> datetime:
        """The wall-clock time of a moment of the server's monotonic clock."""
        return to_millis(self.created_at + timedelta(seconds=mono - self.created_mono))

    # -- transitions -------------------------------------------------------------------

    def begin(self, now: float) -> None:
        """Start the create's phases (S1) at ``now``."""
        self.last_active = now
        self._enter("placement_pending", now, self.timings.placement, "created")

    def begin_running(self, now: float) -> None:
        """Start already running (a machine the server meets first through an execution)."""
        self.last_active = now
        self.running_since = now
        self._enter("running", now, None, "converged")

    def begin_settled(self, phase: str, now: float) -> None:
        """Start in a settled phase that is also the desired state (``running``,
        ``sleeping`` or ``destroyed``): a machine read back from where it was kept."""
        self.desired_state = phase
        self.last_active = now
        if phase == "running":
            self.running_since = now
        self._enter(phase, now, None, "converged")

    def _enter(self, phase: str, mono: float, duration: float | None, reason: str) -> None:
        self.phase = phase
        self.reason = reason
        self.phase_until = None if duration is None else mono + duration
        self.revision += 1
        self.last_transition_at = self.at(mono)
        self.history.append(self.lifecycle_json())

    def advance(self, now: float, *, busy: bool = False, idle_since: float | None = None) -> None:
        """Replay every transition due by ``now`` (S1-S5). ``busy``: an execution of the
        machine is in progress; ``idle_since``: when its last execution finished."""
        if idle_since is not None and idle_since > self.last_active:
            self.last_active = idle_since
        while True:
            until = self.phase_until
            if until is not None and now + 1e-9 >= until:
                self._complete(until)
                continue
            if (
                self.phase == "running"
                and self.desired_state == "running"
                and self.autosleep_seconds > 0
                and not busy
                and now + 1e-9 >= self.last_active + self.autosleep_seconds
            ):
                moment = self.last_active + self.autosleep_seconds
                self.desired_state = "sleeping"
                self._enter("stopping", moment, self.timings.stop, "idle_timeout")
                continue
            return

    def _complete(self, mono: float) -> None:
        phase = self.phase
        if phase == "placement_pending":
            self._enter("starting", mono, self.timings.start, "placed")
        elif phase == "starting":
            failure = self.failure
            kind = "wake" if self._waking else "start"
            self._waking = False
            if failure is not None and failure[0] in (kind, "any"):
                self.failure = None
                self.last_error = failure[1]
                self.retryable = False
                self._enter("failed", mono, None, f"{kind}_failed")
            else:
                self._enter("running", mono, None, "converged")
                self.last_active = mono
                self.running_since = mono
        elif phase == "stopping":
            self._enter("sleeping", mono, None, "converged")
        elif phase == "destroying":
            self._enter("destroyed", mono, None, "converged")
        else:  # pragma: no cover - only transitional phases have an end
            self.phase_until = None
        self._steer(mono)

    def _steer(self, mono: float) -> bool:
        """S2: leave a settled phase the desired state differs from; True if it moved."""
        if self.phase == "running" and self.desired_state == "sleeping":
            self._enter("stopping", mono, self.timings.stop, "sleep_requested")
            return True
        if self.phase == "sleeping" and self.desired_state == "running":
            self._waking = True
            self.last_active = mono
            self._enter("starting", mono, self.timings.wake, "wake_requested")
            return True
        return False

    def want(self, state: str, now: float) -> None:
        """Ask for ``running``, ``sleeping`` or ``destroyed`` (S2, S4) at ``now``."""
        if state == "destroyed":
            if self.phase not in ("destroying", "destroyed"):
                self.desired_state = state
                self._enter("destroying", now, self.timings.destroy, "destroy_requested")
            return
        if self.desired_state != state:
            self.desired_state = state
            self.revision += 1
        if state == "running":
            self.last_active = now
        self._steer(now)

    def fail_next(self, error: str, when: FailWhen = "any") -> None:
        """Arm S5: the next ``starting`` phase of this kind ends in ``failed``."""
        self.failure = (when, error)

    def fail_now(self, error: str, now: float) -> None:
        """Fail the machine at once, whatever it was doing."""
        self.last_error = error
        self.retryable = False
        self._enter("failed", now, None, "failed")

    def seconds_to_running(self, now: float) -> float | None:
        """Seconds until a machine on its way up is running (None: it is not on its way)."""
        if self.desired_state != "running" or self.phase in SETTLED:
            return None
        left = (self.phase_until or now) - now
        if self.phase == "placement_pending":
            left += self.timings.start
        return max(left, 0.0)

    @property
    def settled(self) -> bool:
        """In the desired state, failed or destroyed: a status stream closes here."""
        return self.phase == self.desired_state or self.phase in ("failed", "destroyed")

    # -- wire forms --------------------------------------------------------------------

    def lifecycle_json(self) -> dict[str, Any]:
        """The ``LifecycleStatus`` object; ``None`` fields are left out."""
        at = format_time(self.last_transition_at or self.created_at)
        out: dict[str, Any] = {
            "phase": self.phase,
            "reason": self.reason,
            "retryable": self.retryable,
            "revision": str(self.revision),
            "last_transition_at": at,
            "last_progress_at": at,
            "memory_configured_mib": self.memory_mib,
        }
        if self.last_error is not None:
            out["last_error"] = self.last_error
        return out

    def _size_json(self) -> dict[str, Any]:
        return {
            "autosleep_seconds": self.autosleep_seconds,
            "desired_state": self.desired_state,
            "machine_id": self.machine_id,
            "memory_mib": self.memory_mib,
            "storage_gib": self.storage_gib,
            "vcpu": self.vcpu,
        }

    def to_json(self) -> dict[str, Any]:
        """The flat ``Machine`` (create, update, sleep, wake, delete answers)."""
        return {**self._size_json(), "phase": self.phase}

    def detail_json(self) -> dict[str, Any]:
        """The ``GET /v1/machines/{id}`` answer: the lifecycle nested in ``status``."""
        return {**self._size_json(), "status": self.lifecycle_json()}

    def list_item_json(self) -> dict[str, Any]:
        """One item of ``GET /v1/machines``."""
        return {**self.to_json(), "created_at": format_time(self.created_at)}


class MachineStore(Protocol):
    """Where a server's machines outlive its process (the local backend's folders).

    The server asks it for a machine its memory lacks, tells it of every change, and lists
    what it holds beside what memory holds. Called on the event loop: it must not block
    for long (a few small files).
    """

    def load(self, machine_id: str) -> MachineRecord | None:
        """The kept machine, as a new record in a settled phase, or ``None``."""
        ...

    def machine_ids(self) -> list[str]:
        """The ids of every kept machine (in no particular order)."""
        ...

    def save(self, machine: MachineRecord) -> None:
        """Keep the machine as it now is (created, resized, asked to sleep or wake)."""
        ...

    def destroy(self, machine: MachineRecord) -> None:
        """The machine was destroyed: wipe its storage, keep that it was destroyed."""
        ...
