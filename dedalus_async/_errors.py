"""The exception tree, split by whose problem it is.

::

    DedalusError
    ├── ConfigurationError (ValueError)    the Session cannot be built as asked
    ├── SessionClosedError (RuntimeError)  used outside ``async with`` / after close
    ├── TransportError                     could not talk to the server
    │   └── RequestTimeout (TimeoutError)  one HTTP request took longer than request_timeout
    ├── APIStatusError                     the server said no (HTTP status >= 300)
    │   ├── BadRequestError                400
    │   ├── AuthenticationError            401
    │   ├── PermissionDeniedError          403
    │   ├── NotFoundError                  404
    │   ├── ConflictError                  409
    │   ├── UnprocessableEntityError       422
    │   ├── RateLimitedError               429 (.retry_after)
    │   ├── ServerError                    5xx
    │   └── IdempotencyKeyReusedError      error_code IDEMPOTENCY_KEY_REUSED, any status
    ├── ResponseDecodeError                the response made no sense
    ├── WaitTimeout (TimeoutError)         the wait's deadline passed first
    ├── ExecutionFailed                    run(check=True) and the command ended badly
    ├── MachineWaitTimeout (TimeoutError)  a machine's wait: the deadline passed first
    ├── MachineStateError                  the machine can no longer reach the phase waited for
    │   └── MachineFailed                  ... because it is in the ``failed`` phase
    └── JournalError                       a batch journal cannot be used as asked
        ├── BatchChangedError (ValueError) the requests differ from the journaled batch
        ├── StaleReservationError          a create sent too long ago to re-send safely
        └── LeaseLostError                 a worker's lease on a job ran out (work_batch)

Invalid arguments are plain :class:`TypeError` / :class:`ValueError`, raised before any
request is sent. No message here ever contains the API key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._models import Execution, ExecutionRef, Machine
    from ._results import ExecutionResult

__all__ = [
    "APIStatusError",
    "AuthenticationError",
    "BadRequestError",
    "BatchChangedError",
    "ConfigurationError",
    "ConflictError",
    "DedalusError",
    "ExecutionFailed",
    "IdempotencyKeyReusedError",
    "JournalError",
    "LeaseLostError",
    "MachineFailed",
    "MachineStateError",
    "MachineWaitTimeout",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "RequestTimeout",
    "ResponseDecodeError",
    "ServerError",
    "SessionClosedError",
    "StaleReservationError",
    "TransportError",
    "UnprocessableEntityError",
    "WaitTimeout",
    "error_for_status",
]


class DedalusError(Exception):
    """Root of every error this library raises on purpose.

    ``idempotency_key`` is set on an error that ended a create: the key the create was
    sent (and retried) under. The server may have stored the execution before the error;
    creating again with ``idempotency_key=`` that key returns it instead of a second one.
    """

    idempotency_key: str | None = None


class ConfigurationError(DedalusError, ValueError):
    """The Session was given (or found in the environment) settings it cannot use.

    ``field`` names the setting at fault as the Session's argument (``"base_url"``,
    ``"org_id"``, ...), or is ``None``: a caller that takes the setting some other way (the
    command line: a flag, an environment variable) can say it in its own words.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SessionClosedError(DedalusError, RuntimeError):
    """The Session is not open: enter ``async with Session(...)`` first, or it was closed."""


class TransportError(DedalusError):
    """The request did not get an HTTP response: connection refused, reset, cut short.

    ``method`` and ``path`` say which request.
    """

    def __init__(self, message: str, *, method: str = "", path: str = "") -> None:
        super().__init__(message)
        self.method = method
        self.path = path


class RequestTimeout(TransportError, TimeoutError):
    """One HTTP request took longer than the Session's ``request_timeout``."""


class APIStatusError(DedalusError):
    """The server answered with an error status.

    Attributes: ``status`` (HTTP status), ``error_code`` and ``message`` (from either error
    body shape), ``retryable`` (the server's own word, when it gave one), ``details``,
    ``request_id`` (from the response headers, for support), ``body`` (the raw body text,
    truncated) and ``method``/``path`` of the request.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_code: str | None = None,
        retryable: bool | None = None,
        details: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        body: str = "",
        method: str = "",
        path: str = "",
    ) -> None:
        self.status = status
        self.error_code = error_code
        self.message = message
        self.retryable = retryable
        self.details = dict(details) if details else {}
        self.request_id = request_id
        self.body = body
        self.method = method
        self.path = path
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f" ({self.method} {self.path})" if self.method else ""
        code = f" {self.error_code}" if self.error_code else ""
        rid = f" [request {self.request_id}]" if self.request_id else ""
        return f"HTTP {self.status}{code}: {self.message}{where}{rid}"


class BadRequestError(APIStatusError):
    """HTTP 400: the request was malformed."""


class AuthenticationError(APIStatusError):
    """HTTP 401: the API key is missing or invalid."""


class PermissionDeniedError(APIStatusError):
    """HTTP 403: the key may not do this (check the organisation)."""


class NotFoundError(APIStatusError):
    """HTTP 404: no such machine or execution."""


class ConflictError(APIStatusError):
    """HTTP 409: the machine or execution is in a state that forbids this."""


class UnprocessableEntityError(APIStatusError):
    """HTTP 422: the request was well-formed but its values were refused."""


class RateLimitedError(APIStatusError):
    """HTTP 429. ``retry_after`` is the server's requested pause in seconds, if it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)


class ServerError(APIStatusError):
    """HTTP 5xx: the server failed; usually worth retrying."""


class IdempotencyKeyReusedError(APIStatusError):
    """The Idempotency-Key was already used for a different request body. Never retried:
    use a new key for a new request, or send the original body again."""


class ResponseDecodeError(DedalusError):
    """The response was not what the API promises: bad JSON, a missing or mistyped field.

    ``field`` names the offending field path when known; ``status`` is the HTTP status.
    """

    def __init__(
        self, message: str, *, field: str | None = None, status: int | None = None, body: str = ""
    ) -> None:
        super().__init__(message)
        self.field = field
        self.status = status
        self.body = body


class WaitTimeout(DedalusError, TimeoutError):
    """The wait's deadline passed before the execution reached the wanted status.

    The remote execution is **not** cancelled. ``last`` is the latest snapshot seen (None
    if not a single poll succeeded) and ``ref`` is what :meth:`Session.attach` needs to
    resume waiting, here or in another process.
    """

    def __init__(
        self, message: str, *, ref: ExecutionRef, last: Execution | None, timeout: float
    ) -> None:
        super().__init__(message)
        self.ref = ref
        self.last = last
        self.timeout = timeout


class ExecutionFailed(DedalusError):
    """``run(check=True)`` and the execution did not succeed with exit code 0.

    ``result`` holds everything: the final execution, stdout, stderr and exit code.
    """

    def __init__(self, result: ExecutionResult) -> None:
        ex = result.execution
        how = f"exit code {ex.exit_code}" if ex.exit_code is not None else "no exit code"
        if ex.signal is not None:
            how += f", signal {ex.signal}"
        if ex.error_code:
            how += f", {ex.error_code}"
        if ex.error_message:
            how += f": {ex.error_message}"
        super().__init__(f"execution {ex.execution_id} on {ex.machine_id} {ex.status} ({how})")
        self.result = result


class MachineWaitTimeout(DedalusError, TimeoutError):
    """A machine's wait passed its deadline before the machine reached ``until``.

    ``last`` is the latest snapshot seen (None if not one look succeeded): where it stood.
    The machine keeps going towards its desired state; wait again to follow it.
    """

    def __init__(
        self, message: str, *, machine_id: str, until: str, last: Machine | None, timeout: float
    ) -> None:
        super().__init__(message)
        self.machine_id = machine_id
        self.until = until
        self.last = last
        self.timeout = timeout


class MachineStateError(DedalusError):
    """The machine reached a phase from which the one waited for (``until``) cannot come
    without a new request: destroyed while waiting for ``running``, for instance.

    ``machine`` is the snapshot that ended the wait.
    """

    def __init__(self, message: str, *, machine: Machine, until: str) -> None:
        super().__init__(message)
        self.machine = machine
        self.until = until


class MachineFailed(MachineStateError):
    """The machine is in the ``failed`` phase (``machine.status.last_error`` says why, when
    the server said); a wait on it ends at once with this."""


class JournalError(DedalusError):
    """A batch journal cannot be used: unreadable, not a journal, written by a newer
    version, or failing to write. ``path`` names the store when it has one."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class BatchChangedError(JournalError, ValueError):
    """The requests given differ from the batch the journal holds under that name (a job
    added, removed or changed): resuming would mix two batches. Run the same requests
    again, or use another batch name or journal for the new ones."""


class StaleReservationError(JournalError):
    """A job's create was sent longer ago than the journal's ``reservation_max_age`` and
    its answer never came back. The server may have forgotten its Idempotency-Key by now,
    so sending it again could run the command twice: it is reported instead.

    ``job``, ``idempotency_key``, ``machine_id`` and ``sent_at`` (Unix seconds) say which
    create to look for among the machine's executions.
    """

    def __init__(
        self,
        message: str,
        *,
        job: str,
        idempotency_key: str,
        machine_id: str,
        sent_at: float,
        path: str | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.job = job
        self.idempotency_key = idempotency_key
        self.machine_id = machine_id
        self.sent_at = sent_at


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitedError,
}

IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"


def error_for_status(status: int, error_code: str | None) -> type[APIStatusError]:
    """The exception class for an error response."""
    if error_code == IDEMPOTENCY_KEY_REUSED:
        return IdempotencyKeyReusedError
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, APIStatusError)


class LeaseLostError(JournalError):
    """A worker's lease on a job of a shared batch ran out, and another worker may have
    taken the job over: this worker's write of its record was refused (fenced by the
    lease's owner token), and the worker drops the job."""
