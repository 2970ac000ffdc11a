"""One request, with retries: the engine every call of a Session goes through.

:class:`Requester` sends a :class:`~dedalus_async._wire.Request` over a :class:`Transport`
until it succeeds, fails for good, or its retries run out, following
:func:`~dedalus_async._policy.retry_delay` (rules R1-R7 of ``_policy``) and pacing every
attempt through the Session's :class:`~dedalus_async.Throttle`. It also owns the
transport's lifecycle (new → open → closed).

Only what is safe to repeat is repeated: every request is either read-only, or carries an
Idempotency-Key that every retry re-sends with the same body bytes (``_wire`` refuses to
build a mutating request without one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from . import _wire
from ._clock import Clock
from ._errors import (
    APIStatusError,
    DedalusError,
    RateLimitedError,
    ResponseDecodeError,
    SessionClosedError,
    TransportError,
)
from ._policy import RetryPolicy, is_in_progress, is_retryable_status, retry_delay
from ._throttle import Throttle
from ._wire import Request, Response

if TYPE_CHECKING:
    from ._telemetry import Telemetry

__all__ = [
    "DeadlineReached",
    "Guard",
    "Requester",
    "Stream",
    "StreamingTransport",
    "Tally",
    "Transport",
]

logger = logging.getLogger("dedalus_async")
T = TypeVar("T")


class Transport(Protocol):
    """What sends the bytes: :class:`~dedalus_async._transport.AiohttpTransport` by default.

    The seam for custom transports and tests (``Session(transport=...)``): ``send`` returns
    the response whatever its status, and raises :class:`~dedalus_async.TransportError`
    (or a subclass) when no response came. The key and the other headers are the
    transport's to add.
    """

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def send(self, request: Request, *, timeout: float | None = None) -> Response: ...


class Stream(Protocol):
    """A response read as it arrives (what :meth:`StreamingTransport.stream` yields).

    ``lines`` yields the body line by line, each with its end of line, and raises
    :class:`~dedalus_async.TransportError` when the connection drops before the end;
    ``read`` reads the whole (error) body instead.
    """

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes: ...

    def lines(self) -> AsyncIterator[bytes]: ...


@runtime_checkable
class StreamingTransport(Protocol):
    """A :class:`Transport` that can also hand a response over as it arrives (the machine
    status stream): :class:`~dedalus_async._transport.AiohttpTransport` does. Without it,
    machine waits poll.

    ``headers`` are added to the request's; ``timeout`` bounds the whole response (the
    caller's deadline), ``read_timeout`` the wait for each next byte. Errors as for
    ``send``.
    """

    def stream(
        self,
        request: Request,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> AbstractAsyncContextManager[Stream]: ...


class DeadlineReached(Exception):
    """Raised by :meth:`Requester.send` when only the caller's deadline ended its retries
    (rule P9 of ``_policy``): the caller reports its own timeout, caused by ``error``."""

    def __init__(self, error: DedalusError) -> None:
        super().__init__(str(error))
        self.error = error


class Tally:
    """Mutable counts of one wait; :meth:`Requester.send` adds its retries and sleeps."""

    __slots__ = ("polls", "retries", "slept")

    def __init__(self) -> None:
        self.polls = 0
        self.retries = 0
        self.slept = 0.0


class Requester:
    """Sends requests with retries over one transport; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        *,
        clock: Clock,
        random: Callable[[], float],
        throttle: Throttle,
        retry: RetryPolicy,
        request_timeout: float,
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.random = random
        self.throttle = throttle
        #: the retry policy of calls that pass none (replaceable at any time)
        self.retry = retry
        self.request_timeout = request_timeout
        self.state: Literal["new", "open", "closed"] = "new"
        #: spans and metrics, when OpenTelemetry is configured (set by Session.open)
        self.telemetry: Telemetry | None = None
        # the tasks in a call (and how deeply), and those closing cancelled (see Guard)
        self._calls: dict[asyncio.Task[Any], int] = {}
        self._closing: set[asyncio.Task[Any]] = set()

    # --- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self.state != "new":
            raise SessionClosedError(f"Session is already {self.state}; make a new one")
        await self.transport.open()
        self.state = "open"

    async def aclose(self) -> None:
        if self.state == "open":
            self.state = "closed"
            current = asyncio.current_task()
            for task in self._calls:
                if task is not current and not task.done():
                    # every wait, stream and retry in progress ends now
                    self._closing.add(task)
                    task.cancel()
            await self.transport.aclose()
        self.state = "closed"

    def guard(self) -> Guard:
        """``with requester.guard():`` around a call that may sleep or retry: closing the
        Session ends it at once with :class:`~dedalus_async.SessionClosedError`."""
        self.check_open()
        return Guard(self)

    def check_open(self) -> None:
        if self.state != "open":
            if self.state == "new":
                raise SessionClosedError(
                    "Session is not open: use `async with Session(...) as session:`"
                )
            raise SessionClosedError("Session is closed; make a new one")

    # --- one request -----------------------------------------------------------------

    @property
    def can_stream(self) -> bool:
        """True when the transport can hand responses over as they arrive."""
        return isinstance(self.transport, StreamingTransport)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        request: Request,
        *,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[Stream]:
        """Open ``request`` as a stream, paced like every request; one attempt, no retry
        (the caller decides what a drop means). A status of 300 or more raises its typed
        error. The stream ends by ``deadline`` (on the clock's monotonic scale), and a
        stream silent for the request timeout counts as dropped."""
        self.check_open()
        transport = self.transport
        if not isinstance(transport, StreamingTransport):
            raise TypeError(f"{type(transport).__name__} cannot stream responses")
        waiting = self.throttle.acquire()
        if waiting is not None:
            with Guard(self):
                await waiting
        clock = self.clock
        timeout = None if deadline is None else max(deadline - clock.monotonic(), 0.001)
        with Guard(self):
            async with transport.stream(
                request, headers=headers, timeout=timeout, read_timeout=self.request_timeout
            ) as stream:
                logger.debug("%s %s -> %d (stream)", request.method, request.path, stream.status)
                if stream.status >= 300:
                    response = Response(stream.status, stream.headers, await stream.read())
                    raise _wire.error_from_response(
                        response, method=request.method, path=request.path, now=clock.now()
                    )
                self.throttle.succeeded()
                yield stream

    async def send(
        self,
        request: Request,
        decode: Callable[[Response], T],
        *,
        deadline: float | None = None,
        retry: RetryPolicy | None = None,
        tally: Tally | None = None,
        paced: bool = True,
    ) -> T:
        """Send ``request`` until it succeeds, a permanent error comes, or retries run out.

        ``deadline`` (on the clock's monotonic scale) bounds the retries and each attempt's
        timeout; when it alone stopped them, :class:`DeadlineReached` is raised instead of
        the last error. Retries and their sleeps are added to ``tally``. Closing the
        Session ends it with :class:`~dedalus_async.SessionClosedError`: a request in
        flight fails as the transport closes, and no retry follows; a pause before a retry
        (or in the throttle) is cut short. ``paced=False`` skips the Session-wide pace
        (the throttle): for the one DELETE that stops remote work when a call is
        cancelled, which must not wait out a rate-limit pause the server asked for.
        """
        self.check_open()
        policy = retry or self.retry
        clock = self.clock
        throttle = self.throttle
        telemetry = self.telemetry
        attempt = 0
        slept = 0.0
        while True:
            attempt += 1
            if paced:
                # the Session-wide pace: go now unless a rate or a 429 pause applies
                if deadline is not None and throttle.paused_until > deadline:
                    # a pause the server asked of the whole Session outlasts this call:
                    # end it now, not after the pause (T2 caps the pause; the deadline us)
                    raise DeadlineReached(
                        _paused_error(request, throttle.paused_until - clock.monotonic())
                    )
                waiting = throttle.acquire()
                if waiting is not None:
                    with Guard(self):
                        await waiting
            epoch = throttle.epoch
            timeout: float | None = None
            if deadline is not None:
                # a request may not run far past the caller's deadline, but it gets a
                # fair chance to complete even when the deadline is right now
                timeout = min(self.request_timeout, max(deadline - clock.monotonic(), 1.0))
            retry_after: float | None = None
            try:
                if telemetry is None:
                    response = await self.transport.send(request, timeout=timeout)
                else:
                    response = await telemetry.send(self.transport.send, request, timeout, attempt)
                if logger.isEnabledFor(logging.DEBUG):  # one line per request (--debug)
                    logger.debug("%s %s -> %d", request.method, request.path, response.status)
                if response.status < 300:
                    throttle.succeeded()
                    return decode(response)
                error: DedalusError = _wire.error_from_response(
                    response, method=request.method, path=request.path, now=clock.now()
                )
                assert isinstance(error, APIStatusError)
                if isinstance(error, RateLimitedError):
                    # the whole Session slows down, not only this request
                    throttle.rate_limited(error.retry_after, epoch)
                    if telemetry is not None:
                        telemetry.rate_limited()
                if not is_retryable_status(error.status, error.retryable) and not (
                    request.idempotency_key is not None
                    and is_in_progress(error.status, error.error_code)
                ):
                    raise error
                if isinstance(error, RateLimitedError):
                    retry_after = error.retry_after
                else:
                    retry_after = _wire.parse_retry_after(response.headers, clock.now())
            except (TransportError, ResponseDecodeError) as exc:
                # a lost or garbled response is safe to ask for again (see above)
                error = exc
            if self.state != "open":
                # the Session closed under this request: no retry can succeed
                raise SessionClosedError(
                    "the Session was closed while this call was in progress"
                ) from error
            remaining = None if deadline is None else deadline - clock.monotonic()
            delay = retry_delay(
                policy,
                attempt=attempt,
                retry_after=retry_after,
                slept=slept,
                remaining=remaining,
                rand=self.random(),
            )
            if delay is None:
                if remaining is not None and (
                    retry_delay(
                        policy,
                        attempt=attempt,
                        retry_after=retry_after,
                        slept=slept,
                        remaining=None,
                        rand=0.0,
                    )
                    is not None
                ):
                    # only the caller's deadline stopped the retries (P9 of _policy)
                    raise DeadlineReached(error)
                raise error
            logger.debug(
                "retrying %s %s in %.3fs after attempt %d: %s",
                request.method,
                request.path,
                delay,
                attempt,
                error,
            )
            if tally is not None:
                tally.retries += 1
                tally.slept += delay
            if telemetry is not None:
                telemetry.retried(request)
            with Guard(self):
                await clock.sleep(delay)
            slept += delay


def _paused_error(request: Request, left: float) -> RateLimitedError:
    return RateLimitedError(
        f"{request.method} {request.path} was not sent: the Session is paused for "
        f"{left:.3g} s more by the server's rate limit (HTTP 429), past this call's deadline",
        retry_after=left,
        status=429,
        error_code="SESSION_PAUSED",
        method=request.method,
        path=request.path,
    )


def _closed_under(requester: Requester, task: asyncio.Task[Any] | None) -> None:
    """Raise ``SessionClosedError`` if closing this Session is what cancelled ``task``
    (and nobody else did too); otherwise return, and the cancellation goes on."""
    if task in requester._closing:
        assert task is not None
        requester._closing.discard(task)
        if task.uncancel() == 0:
            raise SessionClosedError(
                "the Session was closed while this call was in progress"
            ) from None


class Guard:
    """A call in progress that closing the Session must end (see :meth:`Requester.guard`).

    While the block runs, its task is registered with the requester (once, however deeply
    guards nest). :meth:`Requester.aclose` cancels the registered tasks, and the guard that
    sees that cancellation turns it into ``SessionClosedError``, instead of a retry loop
    sending to a closed transport until its deadline (or forever without one). A task
    cancelled by someone else as well stays cancelled. Cheaper than a cancel scope per
    call: every request goes through here.
    """

    __slots__ = ("_requester", "_task")

    def __init__(self, requester: Requester) -> None:
        self._requester = requester
        self._task: asyncio.Task[Any] | None = None

    def __enter__(self) -> Guard:
        task = asyncio.current_task()
        if task is not None:
            calls = self._requester._calls
            calls[task] = calls.get(task, 0) + 1
            self._task = task
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = self._task
        if task is None:
            return
        requester = self._requester
        depth = requester._calls[task] - 1
        if depth:
            requester._calls[task] = depth
        else:
            del requester._calls[task]
        if exc_type is asyncio.CancelledError:
            _closed_under(requester, task)
