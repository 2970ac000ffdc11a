"""Server-side execution state, shared by the executions server and every runner behind it.

An :class:`ExecutionRecord` is the mutable truth about one execution. A :class:`Runner`
moves it through its statuses with :meth:`ExecutionRecord.transition` (non-terminal
statuses), :meth:`ExecutionRecord.append_output` (stdout/stderr chunks) and
:meth:`ExecutionRecord.finish` (the one terminal transition); each of them appends to the
record's event log, so the ``/events`` endpoint needs no bookkeeping of its own. The
server turns a record into wire JSON with :meth:`ExecutionRecord.to_json` and
:meth:`ExecutionRecord.output_json`.

Nothing here knows about HTTP, so the test kit's scripted runner and the local backend's
runner, which starts real subprocesses, share the same transitions. Production code: the
test kit (:mod:`dedalus_async.testing`) builds on this module, never the other way round.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import attrs

from dedalus_async._models import TERMINAL_STATUSES

__all__ = [
    "EventRecord",
    "ExecutionRecord",
    "RecordStore",
    "Runner",
    "format_time",
    "parse_time",
    "to_millis",
]


def format_time(dt: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with milliseconds: ``2026-01-01T00:00:00.250Z``."""
    if dt.utcoffset():
        dt = dt.astimezone(UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """The aware datetime :func:`format_time` wrote (any RFC 3339 offset is read)."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError(f"a timestamp without a time zone: {text!r}")
    return dt.astimezone(UTC)


def to_millis(dt: datetime) -> datetime:
    """``dt`` in UTC, truncated to whole milliseconds (the precision the wire carries).

    Timestamps are stored at wire precision so that what a test computes from a record
    (``created_at + 0.6 s``) is exactly what the client parses back.
    """
    dt = dt.astimezone(UTC)
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


def _utf8_len(text: str) -> int:
    # ASCII is the common case and len() is O(1); only encode when it is not.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _cap_utf8(text: str, cap: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits in ``cap`` bytes."""
    if text.isascii():
        return text[:cap]
    # "ignore" drops a multi-byte character cut in half by the cap.
    return text.encode("utf-8", "surrogatepass")[:cap].decode("utf-8", "ignore")


_OUTCOME_FIELDS = ("exit_code", "signal", "error_code", "error_message")
_EVENT_OPTIONAL = ("chunk", "status", *_OUTCOME_FIELDS)


def _put_present(out: dict[str, Any], source: object, names: tuple[str, ...]) -> None:
    # the wire leaves out optional fields that have no value
    for name in names:
        value = getattr(source, name)
        if value is not None:
            out[name] = value


@attrs.frozen
class EventRecord:
    """One entry of an execution's event log (``sequence`` starts at 1)."""

    at: datetime
    sequence: int
    type: str
    chunk: str | None = None
    status: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    error_code: str | None = None
    error_message: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The wire form; fields that are ``None`` are left out."""
        out: dict[str, Any] = {
            "at": format_time(self.at),
            "sequence": self.sequence,
            "type": self.type,
        }
        _put_present(out, self, _EVENT_OPTIONAL)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EventRecord:
        """The event :meth:`to_json` wrote (a store reads its records back with it)."""
        return cls(
            parse_time(data["at"]),
            data["sequence"],
            data["type"],
            **{name: data[name] for name in _EVENT_OPTIONAL if name in data},
        )


@attrs.define(eq=False)
class ExecutionRecord:
    """The server's mutable state for one execution.

    ``env`` (values included) and ``stdin`` are kept server-side only; the wire shows
    ``env_keys``. Output accumulates through :meth:`append_output` only, which also keeps
    the byte counts and the event log consistent. ``runner_state`` belongs to whichever
    :class:`Runner` started the record.
    """

    execution_id: str
    machine_id: str
    command: tuple[str, ...]
    created_at: datetime
    created_mono: float
    cwd: str | None = None
    env: dict[str, str] | None = attrs.field(default=None, repr=False)
    stdin: str | None = attrs.field(default=None, repr=False)
    timeout_ms: int | None = None
    idempotency_key: str | None = None
    org_id: str | None = None
    creation_request_id: str | None = None
    creation_trace_id: str | None = None
    #: the wire ``log_capture`` object; ``None``: derived from the status (see
    #: :meth:`log_capture_json`). A runner that captures no logs sets its own.
    log_capture: dict[str, str] | None = None
    status: str = "queued"
    started_at: datetime | None = None
    completed_at: datetime | None = None
    exit_code: int | None = None
    signal: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after_ms: int | None = None
    expires_at: datetime | None = None
    artifacts: list[dict[str, str]] | None = None
    #: the cap its output was kept under, when it differs from the serving server's (a
    #: record another process ran, read back from a :class:`RecordStore`); ``None``: the
    #: server's own
    output_cap: int | None = None
    events: list[EventRecord] = attrs.field(factory=list, repr=False)
    #: when the machine was ready to run it, for an execution that waited for a wake
    #: (monotonic, wall clock); ``None``: ready at creation. A runner starts its clock here.
    ready: tuple[float, datetime] | None = None
    runner_state: Any = attrs.field(default=None, repr=False)
    stdout_bytes: int = attrs.field(default=0, init=False)
    stderr_bytes: int = attrs.field(default=0, init=False)
    # The chunks of each stream, the very strings the events hold: output is stored once.
    # Joined on every read and never cached (a cached join would be a second copy next to
    # the events'); ``str +=`` instead would copy the whole output on every append.
    _stdout_parts: list[str] = attrs.field(factory=list, init=False, repr=False)
    _stderr_parts: list[str] = attrs.field(factory=list, init=False, repr=False)

    @classmethod
    def restore(
        cls, *, events: list[EventRecord], stdout_bytes: int, stderr_bytes: int, **fields: Any
    ) -> ExecutionRecord:
        """A record rebuilt from what a :class:`RecordStore` kept: ``fields`` as saved, the
        output from its events' chunks (stored once, as in a live record)."""
        record = cls(events=list(events), **fields)
        for event in record.events:
            if event.chunk is not None:
                if event.type == "stdout":
                    record._stdout_parts.append(event.chunk)
                elif event.type == "stderr":
                    record._stderr_parts.append(event.chunk)
        record.stdout_bytes = stdout_bytes
        record.stderr_bytes = stderr_bytes
        return record

    @property
    def is_terminal(self) -> bool:
        """True once the status is terminal; the record never changes after that."""
        return self.status in TERMINAL_STATUSES

    @property
    def stdout(self) -> str:
        """Everything written to stdout so far (uncapped): its events' chunks joined."""
        return "".join(self._stdout_parts)

    @property
    def stderr(self) -> str:
        """Everything written to stderr so far (uncapped): its events' chunks joined."""
        return "".join(self._stderr_parts)

    def create_body(self) -> dict[str, Any]:
        """The create request this record was made from, as the JSON dict a client sent."""
        body: dict[str, Any] = {"command": list(self.command)}
        if self.cwd is not None:
            body["cwd"] = self.cwd
        if self.env is not None:
            body["env"] = dict(self.env)
        if self.stdin is not None:
            body["stdin"] = self.stdin
        if self.timeout_ms is not None:
            body["timeout_ms"] = self.timeout_ms
        return body

    def _event(self, type_: str, at: datetime, **fields: Any) -> None:
        self.events.append(EventRecord(at, len(self.events) + 1, type_, **fields))

    def transition(self, status: str, at: datetime, *, retry_after_ms: int | None = None) -> bool:
        """Enter a non-terminal ``status`` at ``at`` and log a lifecycle event.

        ``retry_after_ms`` replaces the current hint (``None`` clears it). Entering
        ``running`` for the first time sets ``started_at``. Returns False (and changes
        nothing) when the record is already terminal, so a runner racing a cancel is safe.
        """
        if status in TERMINAL_STATUSES:
            raise ValueError(f"{status!r} is terminal: use finish()")
        if self.is_terminal:
            return False
        self.status = status
        self.retry_after_ms = retry_after_ms
        if status == "running" and self.started_at is None:
            self.started_at = at
        self._event("lifecycle", at, status=status)
        return True

    def append_output(self, stream: str, chunk: str, at: datetime) -> bool:
        """Append ``chunk`` to ``stream`` (``"stdout"`` or ``"stderr"``) and log it.

        Empty chunks are ignored. Returns False once the record is terminal.
        """
        if self.is_terminal:
            return False
        if not chunk:
            return True
        if stream == "stdout":
            self._stdout_parts.append(chunk)
            self.stdout_bytes += _utf8_len(chunk)
        elif stream == "stderr":
            self._stderr_parts.append(chunk)
            self.stderr_bytes += _utf8_len(chunk)
        else:
            raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        self._event(stream, at, chunk=chunk)
        return True

    def finish(
        self,
        status: str,
        at: datetime,
        *,
        exit_code: int | None = None,
        signal: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> bool:
        """Make the record terminal at ``at`` and log the final lifecycle event.

        Clears ``retry_after_ms``. A record that has an exit code or a signal must have
        started, so ``started_at`` is filled in when it is still missing. Returns False
        (and changes nothing) when the record was already terminal.
        """
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"{status!r} is not a terminal status")
        if self.is_terminal:
            return False
        self.status = status
        self.completed_at = at
        self.retry_after_ms = None
        self.exit_code = exit_code
        self.signal = signal
        self.error_code = error_code
        self.error_message = error_message
        if self.started_at is None and (exit_code is not None or signal is not None):
            self.started_at = at
        self._event(
            "lifecycle",
            at,
            status=status,
            exit_code=exit_code,
            signal=signal,
            error_code=error_code,
            error_message=error_message,
        )
        return True

    def to_json(self, output_cap: int) -> dict[str, Any]:
        """The Execution object as the API sends it; ``None`` fields are left out.

        Output sizes appear once the command started (or the record is terminal);
        ``expires_at`` only while the record is not terminal.
        """
        if self.output_cap is not None:
            output_cap = self.output_cap
        out: dict[str, Any] = {
            "execution_id": self.execution_id,
            "machine_id": self.machine_id,
            "command": list(self.command),
            "created_at": format_time(self.created_at),
            "status": self.status,
        }
        terminal = self.status in TERMINAL_STATUSES
        if self.started_at is not None:
            out["started_at"] = format_time(self.started_at)
        if self.completed_at is not None:
            out["completed_at"] = format_time(self.completed_at)
        if self.cwd is not None:
            out["cwd"] = self.cwd
        if self.env is not None:
            out["env_keys"] = sorted(self.env)
        _put_present(out, self, _OUTCOME_FIELDS)
        if terminal or self.started_at is not None:
            out["stdout_bytes"] = self.stdout_bytes
            out["stderr_bytes"] = self.stderr_bytes
            out["stdout_truncated"] = self.stdout_bytes > output_cap
            out["stderr_truncated"] = self.stderr_bytes > output_cap
        if self.retry_after_ms is not None:
            out["retry_after_ms"] = self.retry_after_ms
        if self.expires_at is not None and not terminal:
            out["expires_at"] = format_time(self.expires_at)
        if self.artifacts is not None:
            out["artifacts"] = [dict(a) for a in self.artifacts]
        out["log_capture"] = self.log_capture_json()
        if self.creation_request_id is not None:
            out["creation_request_id"] = self.creation_request_id
        if self.creation_trace_id is not None:
            out["creation_trace_id"] = self.creation_trace_id
        return out

    def log_capture_json(self) -> dict[str, str]:
        """The wire ``log_capture``: the runner's own, else ``pending`` until the
        execution ends and then no state (complete; nothing lost)."""
        if self.log_capture is not None:
            return dict(self.log_capture)
        return {} if self.status in TERMINAL_STATUSES else {"state": "pending"}

    def output_json(self, output_cap: int) -> dict[str, Any]:
        """The ``/output`` body: each stream capped at ``output_cap`` UTF-8 bytes.

        ``*_bytes`` is the full size before the cap; the kept part is the head.
        """
        if self.output_cap is not None:
            output_cap = self.output_cap
        return {
            "execution_id": self.execution_id,
            "stdout": _cap_utf8(self.stdout, output_cap),
            "stderr": _cap_utf8(self.stderr, output_cap),
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
            "stdout_truncated": self.stdout_bytes > output_cap,
            "stderr_truncated": self.stderr_bytes > output_cap,
        }


class RecordStore(Protocol):
    """Where a server finds records it does not hold in memory: those another process ran
    and kept (the local backend's records on disk, :mod:`dedalus_async._store`).

    The server asks it only for what its memory lacks, and tells it what it deletes; the
    runner, which knows when a record changes, is the one that saves.
    """

    def find(self, machine_id: str, execution_id: str) -> ExecutionRecord | None:
        """The stored record of that execution on that machine, or ``None``."""
        ...

    def machine_records(self, machine_id: str) -> list[ExecutionRecord]:
        """The stored records of the machine the server's memory may lack, oldest first."""
        ...

    def remove(self, record: ExecutionRecord) -> None:
        """Forget a deleted execution (it must not come back)."""
        ...


@runtime_checkable
class Runner(Protocol):
    """Plays executions for :class:`~dedalus_async._server.ExecutionsServer`.

    The server owns HTTP, idempotency and storage; the runner owns what an execution
    does, through the record's :meth:`~ExecutionRecord.transition`,
    :meth:`~ExecutionRecord.append_output` and :meth:`~ExecutionRecord.finish`, stamped
    with ``to_millis(clock.now())``. All methods are called on the event loop thread and
    must not block; a runner with background work (processes, tasks) updates records from
    them and stops them in :meth:`aclose`.
    """

    def start(self, record: ExecutionRecord) -> None:
        """Called right after a create, before the response is sent."""
        ...

    def refresh(self, record: ExecutionRecord) -> None:
        """Bring ``record`` up to date; called before every read of it."""
        ...

    def cancel(self, record: ExecutionRecord) -> None:
        """Stop a non-terminal execution (DELETE); must leave it ``cancelled``."""
        ...

    async def aclose(self) -> None:
        """Release whatever the runner holds (called by ``ExecutionsServer.aclose``)."""
        ...
