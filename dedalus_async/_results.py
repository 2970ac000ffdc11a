"""What a finished wait or run hands back: the result record and its telemetry."""

from __future__ import annotations

import attrs

from ._models import Execution, ExecutionOutput, ExecutionStatus

__all__ = ["ExecutionResult", "WaitStats", "has_output", "is_ok"]


def has_output(execution: Execution) -> bool:
    """Whether fetching the output can return anything: not when the server reports both
    sizes as zero (a size it leaves out may be anything)."""
    return execution.stdout_bytes != 0 or execution.stderr_bytes != 0


def is_ok(execution: Execution) -> bool:
    """Succeeded, and the command exited 0 (or the server gave no exit code)."""
    return execution.status == ExecutionStatus.SUCCEEDED and execution.exit_code in (0, None)


@attrs.frozen(kw_only=True)
class WaitStats:
    """How a wait went.

    ``polls``: GETs of the execution made by the wait; ``retries``: requests repeated after
    a transient error; ``slept``: seconds spent sleeping between polls and retries;
    ``elapsed``: seconds from the start of the wait to its end; ``detection_lag``: seconds
    from the server's ``completed_at`` to the moment the wait saw the terminal status (None
    when the server gave no ``completed_at`` or the wait did not end terminal).
    """

    polls: int = 0
    retries: int = 0
    slept: float = 0.0
    elapsed: float = 0.0
    detection_lag: float | None = None


@attrs.frozen(kw_only=True)
class ExecutionResult:
    """The outcome of :meth:`Session.run`: final execution, its output, and how the wait went.

    A non-zero exit code is a result, not an exception (unless ``check=True`` was asked):
    look at :attr:`ok`, :attr:`exit_code` and :attr:`execution.status`.
    """

    execution: Execution
    stdout: str = ""
    stderr: str = ""
    output: ExecutionOutput | None = None
    stats: WaitStats = attrs.field(factory=WaitStats)

    @property
    def exit_code(self) -> int | None:
        """The remote command's exit code, if it exited."""
        return self.execution.exit_code

    @property
    def ok(self) -> bool:
        """True when the execution succeeded and the command exited 0."""
        return is_ok(self.execution)
