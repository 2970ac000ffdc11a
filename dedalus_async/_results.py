"""What a finished wait or run hands back: the result record and its telemetry, and the two
rules about a finished execution that every user of it shares (did it go well, is there
output to fetch)."""

from __future__ import annotations

import attrs

from ._models import Execution, ExecutionOutput, ExecutionStatus

__all__ = ["ExecutionResult", "WaitStats", "execution_ok", "may_have_output"]


def execution_ok(execution: Execution) -> bool:
    """True when the execution succeeded and the command exited 0 (or gave no exit code)."""
    return execution.status == ExecutionStatus.SUCCEEDED and execution.exit_code in (0, None)


def may_have_output(execution: Execution) -> bool:
    """False only when the server reports both output sizes as zero: then ``GET /output``
    has nothing to return and is not worth a request (an unknown size may be anything)."""
    return execution.stdout_bytes != 0 or execution.stderr_bytes != 0


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
    # the output is data, not a description: the repr gives its size, once
    stdout: str = attrs.field(default="", repr=lambda text: f"<{len(text)} characters>")
    stderr: str = attrs.field(default="", repr=lambda text: f"<{len(text)} characters>")
    output: ExecutionOutput | None = attrs.field(default=None, repr=False)
    stats: WaitStats = attrs.field(factory=WaitStats)

    @property
    def exit_code(self) -> int | None:
        """The remote command's exit code, if it exited."""
        return self.execution.exit_code

    @property
    def ok(self) -> bool:
        """True when the execution succeeded and the command exited 0."""
        return execution_ok(self.execution)
