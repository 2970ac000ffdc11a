"""dedalus_async: the asyncio-native client for the Dedalus Machines executions API.

Architecture in one sentence: a pure core (models, conversion, wire format, polling and
retry policy, errors) and one thin aiohttp transport, driven by two engines (a request
with retries, the wait loop) behind a small Session facade; handles and fan-out use the
engines, the command line and the testing kit use the public API.

::

    async with dedalus_async.Session() as session:
        machine_id = "dm-0199a8f2-6c1e-7d3a-9b42-5e8f1a2b3c4d"
        result = await session.run(machine_id, ["uname", "-a"], timeout=60)
        print(result.exit_code, result.stdout)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._clock import Clock, SystemClock
from ._config import DEFAULT_BASE_URL
from ._durable import RetryExecution
from ._errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    BatchChangedError,
    ConfigurationError,
    ConflictError,
    DedalusError,
    ExecutionFailed,
    IdempotencyKeyReusedError,
    JournalError,
    LeaseLostError,
    MachineFailed,
    MachineStateError,
    MachineWaitTimeout,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    RequestTimeout,
    ResponseDecodeError,
    ServerError,
    SessionClosedError,
    StaleReservationError,
    TransportError,
    UnprocessableEntityError,
    WaitTimeout,
)
from ._fanout import Completed, ExecutionRequest, Progress
from ._handle import EventStream, ExecutionHandle
from ._journal import Batch, JobRecord, JobState, Journal, SQLiteJournal
from ._machines import MachineHandle
from ._models import (
    MACHINE_TARGETS,
    TERMINAL_STATUSES,
    ArtifactRef,
    Execution,
    ExecutionEvent,
    ExecutionOutput,
    ExecutionRef,
    ExecutionStatus,
    LifecycleStatus,
    LogCapture,
    LogPublication,
    LogReadToken,
    LogStatus,
    Machine,
    MachinePhase,
)
from ._policy import USE_POLICY_DEFAULT, PollPolicy, RetryPolicy, UsePolicyDefault
from ._postgres import PostgresJournal
from ._results import ExecutionResult, WaitStats
from ._session import Session
from ._throttle import Throttle
from ._version import __version__
from ._workers import WorkSummary, submit_batch, work_batch

if TYPE_CHECKING:
    from ._local import LocalBackend


def __dir__() -> list[str]:
    # the public API (LocalBackend included, though it loads lazily), not this module's
    # imports and private submodules
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    # LocalBackend pulls in aiohttp's server side; load it only for those who use it
    if name == "LocalBackend":
        from ._local import LocalBackend

        return LocalBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_BASE_URL",
    "MACHINE_TARGETS",
    "TERMINAL_STATUSES",
    "USE_POLICY_DEFAULT",
    "APIStatusError",
    "ArtifactRef",
    "AuthenticationError",
    "BadRequestError",
    "Batch",
    "BatchChangedError",
    "Clock",
    "Completed",
    "ConfigurationError",
    "ConflictError",
    "DedalusError",
    "EventStream",
    "Execution",
    "ExecutionEvent",
    "ExecutionFailed",
    "ExecutionHandle",
    "ExecutionOutput",
    "ExecutionRef",
    "ExecutionRequest",
    "ExecutionResult",
    "ExecutionStatus",
    "IdempotencyKeyReusedError",
    "JobRecord",
    "JobState",
    "Journal",
    "JournalError",
    "LeaseLostError",
    "LifecycleStatus",
    "LocalBackend",
    "LogCapture",
    "LogPublication",
    "LogReadToken",
    "LogStatus",
    "Machine",
    "MachineFailed",
    "MachineHandle",
    "MachinePhase",
    "MachineStateError",
    "MachineWaitTimeout",
    "NotFoundError",
    "PermissionDeniedError",
    "PollPolicy",
    "PostgresJournal",
    "Progress",
    "RateLimitedError",
    "RequestTimeout",
    "ResponseDecodeError",
    "RetryExecution",
    "RetryPolicy",
    "SQLiteJournal",
    "ServerError",
    "Session",
    "SessionClosedError",
    "StaleReservationError",
    "SystemClock",
    "Throttle",
    "TransportError",
    "UnprocessableEntityError",
    "UsePolicyDefault",
    "WaitStats",
    "WaitTimeout",
    "WorkSummary",
    "__version__",
    "submit_batch",
    "work_batch",
]
