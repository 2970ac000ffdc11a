"""Frozen records of the executions API.

The models know nothing about JSON: :mod:`dedalus_async._convert` turns wire dicts into
them. Field names are the API's own. Server enumerations are open sets: ``status`` is a
plain ``str`` so that a value this library has never heard of still decodes (and counts as
not terminal); :class:`ExecutionStatus` names the known ones.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

__all__ = [
    "MACHINE_TARGETS",
    "TERMINAL_STATUSES",
    "ArtifactRef",
    "Execution",
    "ExecutionEvent",
    "ExecutionOutput",
    "ExecutionRef",
    "ExecutionStatus",
    "LifecycleStatus",
    "LogCapture",
    "LogPublication",
    "LogReadToken",
    "LogStatus",
    "Machine",
    "MachinePhase",
]


class ExecutionStatus(enum.StrEnum):
    """The statuses the API documents. Members compare equal to their string values."""

    WAKE_IN_PROGRESS = "wake_in_progress"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


#: Statuses after which an execution never changes again.
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {
        ExecutionStatus.SUCCEEDED,
        ExecutionStatus.FAILED,
        ExecutionStatus.CANCELLED,
        ExecutionStatus.EXPIRED,
    }
)


@attrs.frozen
class ArtifactRef:
    """A file the execution produced."""

    artifact_id: str
    name: str


@attrs.frozen(kw_only=True)
class LogCapture:
    """How much of an execution's output the server's log capture holds.

    ``state`` is ``"pending"``, ``"incomplete"`` or ``"unavailable"`` (an open set: other
    values decode unchanged); ``None`` when the server reports no particular state.
    ``lost_bytes`` and ``unconfirmed_bytes`` travel as decimal strings on the wire and are
    ints here.
    """

    state: str | None = None
    code: str | None = None
    lost_bytes: int | None = None
    unconfirmed_bytes: int | None = None


@attrs.frozen(kw_only=True)
class Execution:
    """One snapshot of an execution, as the server reported it.

    ``log_capture`` is always sent by the current API; it is ``None`` only from a server
    that predates it. ``creation_request_id`` and ``creation_trace_id`` identify the
    request that created the execution (quote them in a support request).
    """

    execution_id: str
    machine_id: str
    created_at: datetime
    status: str
    command: tuple[str, ...] | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    cwd: str | None = None
    env_keys: tuple[str, ...] | None = None
    exit_code: int | None = None
    signal: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    stdout_truncated: bool | None = None
    stderr_truncated: bool | None = None
    retry_after_ms: int | None = None
    expires_at: datetime | None = None
    artifacts: tuple[ArtifactRef, ...] | None = None
    log_capture: LogCapture | None = None
    creation_request_id: str | None = None
    creation_trace_id: str | None = None

    @property
    def is_terminal(self) -> bool:
        """True once the status is ``succeeded``, ``failed``, ``cancelled`` or ``expired``.

        An unknown status is not terminal: a waiter keeps looking until its deadline.
        """
        return self.status in TERMINAL_STATUSES

    @property
    def ref(self) -> ExecutionRef:
        """The reference needed to find this execution again."""
        return ExecutionRef(machine_id=self.machine_id, execution_id=self.execution_id)


@attrs.frozen(kw_only=True)
class ExecutionOutput:
    """Captured stdout and stderr of an execution (plain text, not base64)."""

    execution_id: str
    stdout: str | None = None
    stderr: str | None = None
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    stdout_truncated: bool | None = None
    stderr_truncated: bool | None = None


@attrs.frozen(kw_only=True)
class ExecutionEvent:
    """One entry of an execution's ordered event log.

    ``type`` is ``"lifecycle"`` (``status`` and friends are set), ``"stdout"`` or
    ``"stderr"`` (``chunk`` holds the text); other values decode unchanged.
    """

    at: datetime
    sequence: int
    type: str
    chunk: str | None = None
    status: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    error_code: str | None = None
    error_message: str | None = None


@attrs.frozen(kw_only=True)
class LogPublication:
    """Where publication of the execution's logs to their stream stands.

    ``state`` is ``"active"``, ``"finishing"``, ``"failed"`` or ``"closed"`` (an open set).
    """

    complete: bool
    queued_messages: int
    state: str
    code: str | None = None


@attrs.frozen(kw_only=True)
class LogStatus:
    """The answer of ``GET .../logs`` and ``POST .../logs/reauthorize``."""

    execution_id: str
    capture: LogCapture
    code: str | None = None
    publication: LogPublication | None = None
    stream_id: str | None = None


@attrs.frozen(kw_only=True)
class LogReadToken:
    """A short-lived credential to read an execution's log stream.

    ``access_token`` is a secret: it is left out of the repr.
    """

    access_token: str = attrs.field(repr=False)
    base_url: str
    execution_id: str
    expires_at: datetime
    stream_id: str
    token_type: str


@attrs.frozen(kw_only=True)
class ExecutionRef:
    """A small, serializable pointer to an execution: store it, wait on it later.

    ``idempotency_key`` is set when this process created the execution: re-sending the
    same create with the same key returns the same execution instead of a second one.
    """

    machine_id: str
    execution_id: str
    idempotency_key: str | None = None

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        out = {"machine_id": self.machine_id, "execution_id": self.execution_id}
        if self.idempotency_key is not None:
            out["idempotency_key"] = self.idempotency_key
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecutionRef:
        """Read a dict made by :meth:`to_dict` (unknown keys are ignored)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"ExecutionRef.from_dict needs a dict, not {type(data).__name__}")
        try:
            machine_id = data["machine_id"]
            execution_id = data["execution_id"]
        except KeyError as exc:
            raise ValueError(f"ExecutionRef needs {exc.args[0]!r}") from None
        key = data.get("idempotency_key")
        for name, value in (("machine_id", machine_id), ("execution_id", execution_id)):
            if not isinstance(value, str):
                raise TypeError(f"ExecutionRef {name} must be a str, not {type(value).__name__}")
        if key is not None and not isinstance(key, str):
            raise TypeError("ExecutionRef idempotency_key must be a str or absent")
        return cls(machine_id=machine_id, execution_id=execution_id, idempotency_key=key)

    def to_json(self) -> str:
        """The reference as a JSON string."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ExecutionRef:
        """Read a string made by :meth:`to_json`."""
        if not isinstance(text, str | bytes):
            raise TypeError(f"ExecutionRef.from_json needs a str, not {type(text).__name__}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"ExecutionRef JSON is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("ExecutionRef JSON must be an object")
        return cls.from_dict(data)


# --- machines ------------------------------------------------------------------------


class MachinePhase(enum.StrEnum):
    """The phases of a machine the API documents (an open set, like execution statuses)."""

    ACCEPTED = "accepted"
    PLACEMENT_PENDING = "placement_pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    SLEEPING = "sleeping"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"


#: The phases a machine can be asked to reach (its ``desired_state``), and so waited for.
MACHINE_TARGETS: frozenset[str] = frozenset(
    {MachinePhase.RUNNING, MachinePhase.SLEEPING, MachinePhase.DESTROYED}
)


@attrs.frozen(kw_only=True)
class LifecycleStatus:
    """Where a machine's lifecycle stands (``status`` of ``GET /v1/machines/{id}``, and
    each event of its status stream).

    ``revision`` changes with every transition. The official types require every field
    but ``last_error`` and the memory details; only ``phase`` is required here, so that an
    older or newer server still decodes.
    """

    phase: str
    reason: str | None = None
    retryable: bool | None = None
    revision: str | None = None
    last_transition_at: datetime | None = None
    last_progress_at: datetime | None = None
    last_error: str | None = None
    memory_configured_mib: int | None = None
    memory_assigned_mib: int | None = None
    memory_target_mib: int | None = None
    memory_resize_state: str | None = None
    memory_last_autoresized_at: datetime | None = None


@attrs.frozen(kw_only=True)
class Machine:
    """One snapshot of a machine, as the server reported it.

    The API answers in two shapes: ``GET`` nests the lifecycle in ``status``, the other
    calls (create, update, sleep, wake, delete, list) put ``phase`` at the top level. Both
    decode to this: ``phase`` is always set (from ``status`` when the top level has none)
    and ``status`` only when the server sent it. ``revision`` is ``status.revision`` or,
    without a ``status``, the answer's ``ETag``.
    """

    machine_id: str
    phase: str
    desired_state: str | None = None
    vcpu: float | None = None
    memory_mib: int | None = None
    storage_gib: int | None = None
    autosleep_seconds: int | None = None
    created_at: datetime | None = None
    status: LifecycleStatus | None = None
    revision: str | None = None

    @property
    def is_failed(self) -> bool:
        """True when the machine is in the ``failed`` phase."""
        return self.phase == MachinePhase.FAILED
