"""What the command line writes: one-line notes on stderr with secrets masked, JSON lines on
stdout, the result objects of ``run --json`` and ``run-many``, and the progress line.

Models become JSON through the library's own converter
(:func:`~dedalus_async._convert.unstructure`), so what is printed is what the decoder reads
back.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import IO, Any, Final

import attrs

from dedalus_async._convert import unstructure
from dedalus_async._errors import StaleReservationError, WaitTimeout
from dedalus_async._fanout import Completed, Progress
from dedalus_async._models import Execution, ExecutionEvent
from dedalus_async._records import format_time
from dedalus_async._results import execution_ok

__all__ = [
    "PROG",
    "Context",
    "ProgressLine",
    "RedactingFormatter",
    "completed_document",
    "event_document",
    "event_line",
    "json_line",
    "result_document",
]

PROG: Final = "dedalus-async"


@attrs.define
class Context:
    """What every subcommand needs: where to write, what to hide, whether to debug."""

    debug: bool = False
    secrets: set[str] = attrs.Factory(set)
    stdout: IO[bytes] = attrs.field(factory=lambda: sys.stdout.buffer)
    stderr: IO[str] = attrs.field(factory=lambda: sys.stderr)
    stderr_bytes: IO[bytes] = attrs.field(factory=lambda: sys.stderr.buffer)

    def redact(self, text: str) -> str:
        """``text`` with every known secret replaced by ``***``."""
        for secret in self.secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def note(self, message: str) -> None:
        """One line on stderr, prefixed with the program name."""
        line = " ".join(self.redact(message).split("\n"))
        self.stderr.write(f"{PROG}: {line}\n")
        self.stderr.flush()

    def error(self, message: str) -> None:
        """One ``error:`` line on stderr."""
        self.note(f"error: {message}")

    def write_json(self, document: dict[str, Any]) -> None:
        """One JSON document on one line of stdout."""
        self.stdout.write(json_line(document))
        self.stdout.flush()

    def write_model(self, model: attrs.AttrsInstance) -> None:
        """A model of the API on one line of stdout, as the API spells it."""
        self.write_json(unstructure(model))


class RedactingFormatter(logging.Formatter):
    """Log lines (tracebacks included) with secrets masked."""

    def __init__(self, ctx: Context, fmt: str) -> None:
        super().__init__(fmt)
        self._ctx = ctx

    def format(self, record: logging.LogRecord) -> str:
        return self._ctx.redact(super().format(record))


def event_line(event: ExecutionEvent) -> str:
    """``events``' text line: ``#SEQ TIME TYPE`` and what the event carries, on one line
    (a chunk as a JSON string, so its newlines cannot break the line)."""
    parts = [f"#{event.sequence}", format_time(event.at), event.type]
    if event.chunk is not None:
        parts.append(json.dumps(event.chunk, ensure_ascii=False))
    if event.status is not None:
        parts.append(event.status)
    for name in ("exit_code", "signal", "error_code"):
        value = getattr(event, name)
        if value is not None:
            parts.append(f"{name}={value}")
    if event.error_message is not None:
        parts.append(json.dumps(event.error_message, ensure_ascii=False))
    return " ".join(parts) + "\n"


def event_document(event: ExecutionEvent, cursor: str | None) -> dict[str, Any]:
    """``events --json``' line: the event as the API spells it, and ``cursor``, where
    ``--cursor`` continues after it."""
    return {**unstructure(event), "cursor": cursor}


def json_line(document: dict[str, Any]) -> bytes:
    """``document`` (already JSON-ready) as one line of UTF-8 JSON."""
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    return text.encode() + b"\n"


def result_document(
    execution: Execution | None,
    *,
    stdout: str = "",
    stderr: str = "",
    error: BaseException | None = None,
) -> dict[str, Any]:
    """``{"ok", "execution", "stdout", "stderr", "error"}``: how one execution went."""
    return {
        "ok": error is None and execution is not None and execution_ok(execution),
        "execution": None if execution is None else unstructure(execution),
        "stdout": stdout,
        "stderr": stderr,
        "error": None if error is None else {"type": type(error).__name__, "message": str(error)},
    }


def completed_document(item: Completed) -> dict[str, Any]:
    """The line ``run-many`` writes for one finished request."""
    error = item.error
    if error is None:
        result = item.result
        document = result_document(result.execution, stdout=result.stdout, stderr=result.stderr)
    elif isinstance(error, WaitTimeout):
        document = result_document(error.last, error=error)
        # the command line's own words, not the library's Python advice
        ref = error.ref
        document["error"]["message"] = (
            f"execution {ref.execution_id} did not finish within {error.timeout:g} s; it keeps "
            f"running (dedalus-async get {ref.machine_id} {ref.execution_id})"
        )
    elif isinstance(error, StaleReservationError):
        document = result_document(None, error=error)
        document["error"]["message"] = (
            f"job {error.job!r}: its create was reserved at {error.sent_at:.0f} (Unix time, "
            f"and may have been sent) under Idempotency-Key {error.idempotency_key}, and no "
            "answer came back; the "
            "server may have forgotten the key, so it is not sent again. Look for it with "
            f"`dedalus-async list {error.machine_id}`, or run again with a larger "
            "--reservation-max-age to send it anyway"
        )
    else:
        document = result_document(None, error=error)
    return {"index": item.index, **document}


class ProgressLine:
    """A one-line counter on stderr, redrawn in place; silent unless stderr is a TTY."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.enabled = stream.isatty()
        self.not_ok = 0
        #: the indexes whose lines were written (kept up to date when run-many is stopped)
        self.written: set[int] = set()
        self._last: Progress | None = None

    @property
    def last(self) -> Progress | None:
        """The latest progress reported (None before the first)."""
        return self._last

    def __call__(self, progress: Progress | None = None) -> None:
        if progress is not None:
            self._last = progress
        p = self._last
        if self.enabled and p is not None:
            self._stream.write(
                f"\r{PROG}: {p.finished}/{p.total} done, {self.not_ok} not ok, "
                f"{p.in_flight} running\x1b[K"
            )
            self._stream.flush()

    def close(self) -> None:
        if self.enabled and self._last is not None:
            self._stream.write("\n")
            self._stream.flush()
