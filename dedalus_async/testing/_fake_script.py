"""Scripted executions: what a fake execution does, as a function of elapsed time.

A :class:`Script` is a sequence of non-terminal :class:`Phase` s followed by an
:class:`Outcome`. :class:`ScriptedRunner` plays it **lazily**: nothing runs in the
background; every read of an execution first calls :meth:`ScriptedRunner.refresh`, which
replays whatever the script says happened between the last look and
``clock.monotonic() - record.created_mono``. Fifty thousand idle executions cost nothing,
and a :class:`~dedalus_async.testing.FakeClock` shared with the client moves them exactly.

Timeline of one execution (offsets from ``created_at``; for an execution created on a
sleeping machine, from the moment the machine's wake ended, ``record.ready``):

* phase *i* is entered at the sum of the durations before it, with a ``lifecycle``
  event at that exact moment; while in it, ``retry_after_ms`` is the phase's hint (with
  ``Script(hints="remaining")``: the milliseconds left until the phase ends).
  Phases of duration 0 are skipped without an event; consecutive phases with the same
  status only change the hint (no second event). A phase's ``stdout``/``stderr`` text is
  emitted when the phase is entered (incremental output for event followers).
* at the sum of all durations the outcome happens: its stdout event, then its stderr
  event, then the terminal ``lifecycle`` event, all stamped with that moment, which is
  also ``completed_at`` (the scripted moment, not the moment someone looked).
* ``expires_after`` (seconds): if the outcome is not reached by then the execution becomes
  ``expired`` (``error_code="EXPIRED"``) at exactly that moment. ``expires_at`` is shown
  while the execution is not terminal. Reaching the outcome at the very same moment wins.
* ``timeout_ms`` from the create request counts from the first ``running`` phase; if the
  outcome would come later, the execution ends ``failed`` at the deadline with
  ``signal=9``, ``error_code="TIMEOUT"`` and no exit code (the fake's own choice: the
  real server's behaviour is not documented). Without a ``running`` phase no timeout
  applies.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import attrs

from dedalus_async._clock import Clock, SystemClock
from dedalus_async._models import TERMINAL_STATUSES
from dedalus_async._records import ExecutionRecord, to_millis

__all__ = ["Outcome", "Phase", "Script", "ScriptFactory", "ScriptedRunner"]

#: A function choosing the script of each execution from its create body (a JSON dict).
ScriptFactory = Callable[[dict[str, Any]], "Script"]


def _check_phase_status(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError("Phase status must be a non-empty string")
    if value in TERMINAL_STATUSES:
        raise ValueError(f"Phase status {value!r} is terminal: put it in the Outcome")


def _check_duration(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if math.isnan(value) or value < 0:
        raise ValueError(f"Phase duration must be >= 0 (math.inf for never), got {value!r}")


def _check_terminal(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in TERMINAL_STATUSES:
        raise ValueError(f"Outcome status must be terminal, got {value!r}")


def _check_expiry(_: Any, attribute: attrs.Attribute[float | None], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"expires_after must be > 0 seconds, got {value!r}")


@attrs.frozen
class Phase:
    """A non-terminal stretch of an execution's life.

    ``status`` may be any non-terminal string, including ones the API never documented
    (to test that clients tolerate them). ``duration`` is in seconds; ``math.inf`` means
    the execution stays here until cancelled or expired. ``stdout``/``stderr`` are
    emitted when the phase is entered.
    """

    status: str = attrs.field(validator=_check_phase_status)
    duration: float = attrs.field(validator=_check_duration)
    retry_after_ms: int | None = None
    stdout: str = ""
    stderr: str = ""


@attrs.frozen
class Outcome:
    """How a scripted execution ends.

    ``artifacts`` are names; each gets an ``artifact_id`` when the execution completes.
    """

    status: str = attrs.field(default="succeeded", validator=_check_terminal)
    exit_code: int | None = 0
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    error_code: str | None = None
    error_message: str | None = None
    artifacts: tuple[str, ...] = ()


def _to_phases(value: Sequence[Phase]) -> tuple[Phase, ...]:
    return tuple(value)


#: How a scripted execution's ``retry_after_ms`` is chosen while in a phase with a hint.
HINT_STYLES: Final = ("phase", "remaining")


def _check_hints(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in HINT_STYLES:
        raise ValueError(f"hints must be one of {HINT_STYLES}, got {value!r}")


@attrs.frozen
class Script:
    """Phases, then an outcome; see the module docstring for the exact timeline.

    ``hints`` chooses what ``retry_after_ms`` says while a phase has a hint: ``"phase"``
    (the default) the phase's own ``retry_after_ms``, however long the execution has been
    in it; ``"remaining"`` the milliseconds left until the phase ends (rounded up, at
    least 1), which is what a real server is likely to send. A phase whose hint is
    ``None`` sends none in either style.
    """

    phases: tuple[Phase, ...] = attrs.field(converter=_to_phases)
    outcome: Outcome = attrs.field(factory=Outcome)
    expires_after: float | None = attrs.field(default=None, validator=_check_expiry)
    hints: str = attrs.field(default="phase", validator=_check_hints)

    @property
    def total_duration(self) -> float:
        """Seconds from creation to the outcome (``math.inf`` if never)."""
        return math.fsum(p.duration for p in self.phases)

    @classmethod
    def immediate(cls, outcome: Outcome | None = None) -> Script:
        """Terminal at creation: the create response already carries the outcome."""
        return cls((), outcome or Outcome())

    @classmethod
    def default(
        cls, outcome: Outcome | None = None, *, expires_after: float | None = None
    ) -> Script:
        """``wake_in_progress`` 0.2 s, ``queued`` 0.1 s, ``running`` 0.3 s, then ``outcome``.

        Each phase's ``retry_after_ms`` hint equals its duration.
        """
        return cls(_DEFAULT_PHASES, outcome or Outcome(), expires_after)

    @classmethod
    def running(
        cls,
        seconds: float,
        outcome: Outcome | None = None,
        *,
        retry_after_ms: int | None = None,
        expires_after: float | None = None,
    ) -> Script:
        """``running`` from creation for ``seconds``, then ``outcome``."""
        return cls(
            (Phase("running", seconds, retry_after_ms),), outcome or Outcome(), expires_after
        )

    @classmethod
    def stuck(
        cls,
        status: str = "running",
        *,
        retry_after_ms: int | None = 500,
        expires_after: float | None = None,
    ) -> Script:
        """Stays in ``status`` forever: only DELETE (``cancelled``) or expiry ends it."""
        return cls((Phase(status, math.inf, retry_after_ms),), Outcome(), expires_after)

    @classmethod
    def for_command(cls, command: Sequence[str]) -> Script:
        """The default script when none is configured, so examples look real.

        :meth:`default` timing, and an outcome read from the command: ``echo ARGS...``
        prints ``" ".join(ARGS) + "\\n"`` and exits 0; ``false`` ends ``failed`` with exit
        code 1; ``sleep N`` runs for N seconds instead of 0.3; anything else succeeds
        with exit code 0 and no output. The program is matched by its base name.
        """
        program = os.path.basename(command[0]) if command else ""
        args = list(command[1:])
        if program == "echo":
            return cls.default(Outcome(stdout=" ".join(args) + "\n"))
        if program == "false":
            return _FALSE_SCRIPT
        if program == "sleep" and len(args) == 1:
            try:
                seconds = float(args[0])
            except ValueError:
                seconds = -1.0
            if seconds >= 0 and math.isfinite(seconds):
                return cls((*_DEFAULT_PHASES[:2], Phase("running", seconds, 300)))
        return _DEFAULT_SCRIPT


# Built once: the default factory runs on every create of a benchmark's fan-out.
_DEFAULT_PHASES = (
    Phase("wake_in_progress", 0.2, 200),
    Phase("queued", 0.1, 100),
    Phase("running", 0.3, 300),
)
_DEFAULT_SCRIPT = Script(_DEFAULT_PHASES)
_FALSE_SCRIPT = Script(_DEFAULT_PHASES, Outcome(status="failed", exit_code=1))


def default_script_factory(body: dict[str, Any]) -> Script:
    """The script factory used when none is given: :meth:`Script.for_command`."""
    command = body.get("command")
    return Script.for_command(command if isinstance(command, list) else [])


@attrs.define
class _Progress:
    """How far a record has been played through its script (the runner's state)."""

    script: Script
    # offsets[i] = seconds from creation at which phase i begins
    offsets: tuple[float, ...]
    total: float
    #: where the script's time starts: creation, or the end of the machine's wake
    origin_mono: float
    origin_at: datetime
    next_phase: int = 0
    # The earliest moment the outcome is pre-empted (expiry or timeout), if it is.
    cutoff: float | None = None
    cutoff_kind: str | None = None


class ScriptedRunner:
    """A :class:`~dedalus_async.testing.Runner` that plays :class:`Script` s lazily.

    ``script`` is one script for every execution, or a factory called with each create
    body (a JSON dict); by default :meth:`Script.for_command`. Changing it affects only
    executions created afterwards.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        script: Script | ScriptFactory | None = None,
    ) -> None:
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._factory: ScriptFactory = default_script_factory
        self.set_script(script)

    def set_script(self, script: Script | ScriptFactory | None) -> None:
        """Use ``script`` (or a factory, or ``None`` for the default) for new executions."""
        if script is None:
            self._factory = default_script_factory
        elif isinstance(script, Script):
            fixed = script
            self._factory = lambda _body: fixed
        elif callable(script):
            self._factory = script
        else:
            raise TypeError(f"expected a Script or a callable, got {type(script).__name__}")

    def script_for(self, record: ExecutionRecord) -> Script:
        """The script a new execution will follow."""
        script = self._factory(record.create_body())
        if not isinstance(script, Script):
            raise TypeError(f"script factory returned {type(script).__name__}, not Script")
        return script

    def start(self, record: ExecutionRecord) -> None:
        """Attach the execution's script and play its first moment."""
        script = self.script_for(record)
        offsets: list[float] = []
        elapsed = 0.0
        run_start: float | None = None
        for phase in script.phases:
            offsets.append(elapsed)
            if run_start is None and phase.status == "running" and phase.duration > 0:
                run_start = elapsed
            elapsed += phase.duration
        total = script.total_duration
        origin_mono, origin_at = record.ready or (record.created_mono, record.created_at)
        progress = _Progress(script, tuple(offsets), total, origin_mono, origin_at)
        candidates: list[tuple[float, str]] = []
        if run_start is not None and record.timeout_ms is not None:
            deadline = run_start + record.timeout_ms / 1000
            if deadline < total:
                candidates.append((deadline, "timeout"))
        if script.expires_after is not None:
            record.expires_at = origin_at + timedelta(seconds=script.expires_after)
            if script.expires_after < total:
                candidates.append((script.expires_after, "expired"))
        if candidates:
            # On a tie the command's own timeout wins: it is what actually happened to it.
            progress.cutoff, progress.cutoff_kind = min(
                candidates, key=lambda c: (c[0], c[1] != "timeout")
            )
        record.runner_state = progress
        self.refresh(record)

    def refresh(self, record: ExecutionRecord) -> None:
        """Replay the script up to the clock's current time."""
        progress = record.runner_state
        if not isinstance(progress, _Progress) or record.is_terminal:
            return
        # The nanosecond of slack absorbs float rounding, so that advancing a fake clock by
        # exactly a phase's duration reliably reaches the next phase.
        elapsed = self.clock.monotonic() - progress.origin_mono + 1e-9
        cutoff = progress.cutoff
        cut = cutoff is not None and elapsed >= cutoff
        phases = progress.script.phases
        last_status = record.status if record.events else None
        while progress.next_phase < len(phases):
            index = progress.next_phase
            begin = progress.offsets[index]
            # A phase that would begin exactly at the cutoff never begins.
            if begin > elapsed or (cut and cutoff is not None and begin >= cutoff):
                break
            progress.next_phase += 1
            phase = phases[index]
            if phase.duration <= 0:
                continue
            at = progress.origin_at + timedelta(seconds=begin)
            if phase.status == last_status:
                record.retry_after_ms = phase.retry_after_ms
            else:
                record.transition(phase.status, at, retry_after_ms=phase.retry_after_ms)
                last_status = phase.status
            record.append_output("stdout", phase.stdout, at)
            record.append_output("stderr", phase.stderr, at)
        if cut and cutoff is not None:
            at = progress.origin_at + timedelta(seconds=cutoff)
            if progress.cutoff_kind == "timeout":
                record.finish(
                    "failed",
                    at,
                    signal=9,
                    error_code="TIMEOUT",
                    error_message=f"command exceeded timeout_ms={record.timeout_ms}",
                )
            else:
                record.finish(
                    "expired",
                    at,
                    error_code="EXPIRED",
                    error_message="execution expired before it finished",
                )
        elif elapsed >= progress.total:
            self._complete(record, progress, progress.total)
        if (
            progress.script.hints == "remaining"
            and not record.is_terminal
            and record.retry_after_ms is not None
        ):
            # the time left in the current phase: until the next phase begins, or the
            # outcome (or the cutoff that pre-empts it) happens
            index = progress.next_phase
            ends = progress.offsets[index] if index < len(phases) else progress.total
            if cutoff is not None:
                ends = min(ends, cutoff)
            record.retry_after_ms = max(1, math.ceil((ends - elapsed) * 1000))

    def _complete(self, record: ExecutionRecord, progress: _Progress, offset: float) -> None:
        outcome = progress.script.outcome
        at = progress.origin_at + timedelta(seconds=offset)
        record.append_output("stdout", outcome.stdout, at)
        record.append_output("stderr", outcome.stderr, at)
        if outcome.artifacts:
            record.artifacts = [
                {"artifact_id": "art-" + secrets.token_hex(8), "name": name}
                for name in outcome.artifacts
            ]
        record.finish(
            outcome.status,
            at,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            error_code=outcome.error_code,
            error_message=outcome.error_message,
        )

    def cancel(self, record: ExecutionRecord) -> None:
        """End the execution as ``cancelled`` now (no exit code, no signal)."""
        self.refresh(record)
        record.finish("cancelled", to_millis(self.clock.now()))

    async def aclose(self) -> None:
        """Nothing to release: the scripted runner holds no tasks or processes."""

    def __repr__(self) -> str:
        return f"ScriptedRunner(clock={self.clock!r})"
