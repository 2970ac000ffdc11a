"""The Session: drives the pure core (wire format, retry and poll policy) over the transport.

Everything with a clock in it lives here: the retry loop around each request, the wait
loop around :func:`~dedalus_async._policy.next_poll`, cancellation. Time and randomness
come from the injected :class:`~dedalus_async.Clock` and ``random`` callable.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random as _random
import secrets
import warnings
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Generator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, overload
from urllib.parse import urlsplit

import anyio
import attrs

from . import _wire
from ._clock import Clock, SystemClock
from ._errors import (
    APIStatusError,
    ConfigurationError,
    DedalusError,
    ExecutionFailed,
    RateLimitedError,
    ResponseDecodeError,
    SessionClosedError,
    TransportError,
    WaitTimeout,
)
from ._models import (
    Execution,
    ExecutionEvent,
    ExecutionOutput,
    ExecutionRef,
    LogReadToken,
    LogStatus,
)
from ._policy import (
    Done,
    GiveUp,
    PollPolicy,
    PollState,
    RetryPolicy,
    Sleep,
    is_retryable_status,
    next_poll,
    retry_delay,
)
from ._results import ExecutionResult, WaitStats
from ._throttle import Throttle, check_rate
from ._transport import AiohttpTransport
from ._version import __version__
from ._wire import Request, Response

if TYPE_CHECKING:
    from collections.abc import Iterable
    from contextlib import AbstractAsyncContextManager

    import aiohttp

    from ._fanout import Completed, ExecutionRequest, Progress

__all__ = ["DEFAULT_BASE_URL", "EventStream", "ExecutionHandle", "Session"]

logger = logging.getLogger("dedalus_async")

DEFAULT_BASE_URL: Final = "https://dcs.dedaluslabs.ai"
T = TypeVar("T")


class _Default:
    """Marks "not given" where None is a meaningful value (``timeout=None`` = no deadline)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()
AuthScheme = Literal["x-api-key", "bearer"]


class _DeadlineReached(Exception):
    """Raised by ``_call`` when only the caller's deadline ended its retries."""

    def __init__(self, error: DedalusError) -> None:
        super().__init__(str(error))
        self.error = error


class _Counters:
    """Mutable tallies for one wait; frozen into :class:`WaitStats` at its end."""

    __slots__ = ("polls", "retries", "slept")

    def __init__(self) -> None:
        self.polls = 0
        self.retries = 0
        self.slept = 0.0


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _resolve_credentials(
    api_key: str | None, auth_scheme: AuthScheme | None
) -> tuple[str, AuthScheme]:
    if api_key is not None:
        if not isinstance(api_key, str):
            raise TypeError(f"api_key must be a str, not {type(api_key).__name__}")
        if not api_key.strip():
            raise ConfigurationError("api_key must be a non-empty string")
        _check_header_value("api_key", api_key)
        return api_key, auth_scheme or "x-api-key"
    bearer = os.environ.get("DEDALUS_API_KEY")
    x_key = os.environ.get("DEDALUS_X_API_KEY")
    if auth_scheme == "x-api-key" and x_key:
        _check_header_value("DEDALUS_X_API_KEY", x_key)
        return x_key, "x-api-key"
    if bearer:
        _check_header_value("DEDALUS_API_KEY", bearer)
        return bearer, auth_scheme or "bearer"
    if x_key:
        _check_header_value("DEDALUS_X_API_KEY", x_key)
        return x_key, auth_scheme or "x-api-key"
    raise ConfigurationError(
        "no API key: pass Session(api_key=...) or set DEDALUS_API_KEY (sent as a Bearer "
        "token) or DEDALUS_X_API_KEY (sent as x-api-key); to try things without an "
        "account, run `dedalus-async serve-local` or use dedalus_async.testing.FakeDedalus"
    )


def _check_header_value(name: str, value: str) -> None:
    # a line break in a header value would let the caller inject headers; the value itself
    # is never shown (it may be the key)
    if any(c in value for c in "\r\n\x00"):
        raise ConfigurationError(f"{name} must not contain line breaks or NUL characters")


def _check_instance(name: str, value: object, cls: type | tuple[type, ...], what: str) -> None:
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name} must be {what}, not {type(value).__name__}")


def _check_base_url(base_url: str, allow_insecure_http: bool) -> str:
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a str, not {type(base_url).__name__}")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"base_url must be an http(s) URL like {DEFAULT_BASE_URL!r}, got {base_url!r}"
        )
    if parts.username or parts.password:
        raise ConfigurationError("base_url must not carry credentials; pass api_key instead")
    if parts.query or parts.fragment:
        raise ConfigurationError("base_url must not have a query or fragment")
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname):
        raise ConfigurationError(
            f"refusing plain http to {parts.hostname}: the API key would travel in clear "
            "text; use https, or pass allow_insecure_http=True if you really mean it"
        )
    return base_url.rstrip("/")


class Session:
    """An open line to the Dedalus executions API. Use it as ``async with Session() as s:``.

    Arguments:
        api_key: the key; defaults to ``DEDALUS_API_KEY`` (sent as a Bearer token) or
            ``DEDALUS_X_API_KEY`` (sent as ``x-api-key``). Missing: :class:`ConfigurationError`.
        base_url: defaults to ``DEDALUS_BASE_URL`` or ``https://dcs.dedaluslabs.ai``. Plain
            ``http://`` is refused unless the host is loopback or ``allow_insecure_http``.
        org_id: sent as ``X-Dedalus-Org-Id``; defaults to ``DEDALUS_ORG_ID``.
        auth_scheme: ``"x-api-key"`` or ``"bearer"``.
        request_timeout: seconds one HTTP request may take (not the wait, not the command).
        retry: how transient failures of one request are retried.
        poll: how :meth:`ExecutionHandle.wait` paces itself; its ``timeout`` is the default
            deadline of a wait.
        client_session: an ``aiohttp.ClientSession`` to borrow; used as is, never closed.
        clock, random: injected time and randomness (tests pass a fake clock).
        max_connections: size of the connection pool of the session we create.
        max_requests_per_second: a ceiling on the request rate of this Session, shared by
            every caller (``None``: none). Either way a 429 slows the whole Session down:
            see :class:`Throttle`, available as :attr:`throttle`.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        org_id: str | None = None,
        auth_scheme: AuthScheme | None = None,
        request_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        client_session: aiohttp.ClientSession | None = None,
        allow_insecure_http: bool = False,
        clock: Clock | None = None,
        random: Callable[[], float] | None = None,
        max_connections: int = 100,
        max_requests_per_second: float | None = None,
    ) -> None:
        if auth_scheme not in (None, "x-api-key", "bearer"):
            raise ConfigurationError(
                f"auth_scheme must be 'x-api-key' or 'bearer', got {auth_scheme!r}"
            )
        key, scheme = _resolve_credentials(api_key, auth_scheme)
        if base_url is None:
            base_url = os.environ.get("DEDALUS_BASE_URL") or DEFAULT_BASE_URL
        url = base_url
        self.base_url: str = _check_base_url(url, allow_insecure_http)
        _check_instance("org_id", org_id, str, "a str")
        org = org_id if org_id is not None else os.environ.get("DEDALUS_ORG_ID")
        if org:
            _check_header_value("org_id", org)
        if isinstance(request_timeout, bool) or not isinstance(request_timeout, int | float):
            raise TypeError("request_timeout must be a number of seconds")
        if not 0 < request_timeout < float("inf"):
            raise ValueError(f"request_timeout must be positive seconds, got {request_timeout}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError("max_connections must be an int")
        if max_connections < 1:
            raise ValueError("max_connections must be a positive int")
        _check_instance("retry", retry, RetryPolicy, "a RetryPolicy")
        _check_instance("poll", poll, PollPolicy, "a PollPolicy")
        _check_instance("clock", clock, Clock, "a Clock (monotonic, now, sleep)")
        if random is not None and not callable(random):
            raise TypeError(
                f"random must be a callable returning [0, 1), not {type(random).__name__}"
            )
        self.org_id: str | None = org
        self.auth_scheme: AuthScheme = scheme
        self.request_timeout: float = float(request_timeout)
        self.retry: RetryPolicy = retry if retry is not None else RetryPolicy()
        self.poll: PollPolicy = poll if poll is not None else PollPolicy()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._random = random if random is not None else _random.random
        self.throttle: Throttle = Throttle(
            check_rate(max_requests_per_second, "max_requests_per_second"),
            clock=self.clock,
            random=self._random,
        )
        headers = {
            "Accept": "application/json",
            "User-Agent": f"dedalus-async/{__version__}",
        }
        if scheme == "bearer":
            headers["Authorization"] = f"Bearer {key}"
        else:
            headers["x-api-key"] = key
        if org:
            headers["X-Dedalus-Org-Id"] = org
        # The key lives only inside the transport's header dict from here on.
        self._transport = AiohttpTransport(
            self.base_url,
            headers,
            request_timeout=self.request_timeout,
            client_session=client_session,
            max_connections=max_connections,
        )
        self._state: Literal["new", "open", "closed"] = "new"
        self._poll_retry_cache: tuple[RetryPolicy, RetryPolicy] | None = None

    def __repr__(self) -> str:
        return f"<Session {self.base_url} auth={self.auth_scheme} {self._state}>"

    # --- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open the connection pool (``async with`` does this); call once."""
        if self._state != "new":
            raise SessionClosedError(f"Session is already {self._state}; make a new one")
        await self._transport.open()
        self._state = "open"

    async def aclose(self) -> None:
        """Close the connection pool (a borrowed aiohttp session stays open). Idempotent."""
        if self._state == "open":
            self._state = "closed"
            await self._transport.aclose()
        self._state = "closed"

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran."""
        return self._state == "closed"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, "_state", None) == "open":
            _warn(
                f"unclosed {self!r}: use `async with Session(...)` or await session.aclose()",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )

    def _check_open(self) -> None:
        if self._state != "open":
            if self._state == "new":
                raise SessionClosedError(
                    "Session is not open: use `async with Session(...) as session:`"
                )
            raise SessionClosedError("Session is closed; make a new one")

    # --- one request, with retries -------------------------------------------------------

    async def _call(
        self,
        request: Request,
        decode: Callable[[Response], T],
        *,
        deadline: float | None = None,
        retry: RetryPolicy | None = None,
        counters: _Counters | None = None,
    ) -> T:
        """Send ``request`` until it succeeds, a permanent error comes, or retries run out.

        Only what is safe to repeat is repeated: every request here is either read-only,
        a DELETE, or a create carrying the same Idempotency-Key and the same body bytes.
        """
        self._check_open()
        policy = retry or self.retry
        clock = self.clock
        throttle = self.throttle
        attempt = 0
        slept = 0.0
        while True:
            attempt += 1
            # the Session-wide pace: None (go now) unless a rate or a 429 pause applies
            waiting = throttle.acquire()
            if waiting is not None:
                await waiting
            epoch = throttle.epoch
            timeout: float | None = None
            if deadline is not None:
                # a request may not run far past the caller's deadline, but it gets a
                # fair chance to complete even when the deadline is right now
                timeout = min(self.request_timeout, max(deadline - clock.monotonic(), 1.0))
            retry_after: float | None = None
            try:
                response = await self._transport.send(request, timeout=timeout)
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
                if not is_retryable_status(error.status, error.retryable):
                    raise error
                if isinstance(error, RateLimitedError):
                    retry_after = error.retry_after
                else:
                    retry_after = _wire.parse_retry_after(response.headers, clock.now())
            except (TransportError, ResponseDecodeError) as exc:
                # a lost or garbled response is safe to ask for again (see above)
                error = exc
            remaining = None if deadline is None else deadline - clock.monotonic()
            delay = retry_delay(
                policy,
                attempt=attempt,
                retry_after=retry_after,
                slept=slept,
                remaining=remaining,
                rand=self._random(),
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
                    raise _DeadlineReached(error)
                raise error
            logger.debug(
                "retrying %s %s in %.3fs after attempt %d: %s",
                request.method,
                request.path,
                delay,
                attempt,
                error,
            )
            if counters is not None:
                counters.retries += 1
                counters.slept += delay
            await clock.sleep(delay)
            slept += delay

    # --- endpoints -----------------------------------------------------------------------

    async def create_execution(
        self,
        machine_id: str,
        command: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        timeout_ms: int | None = None,
        idempotency_key: str | None = None,
    ) -> ExecutionHandle:
        """Start ``command`` (an argv list, no shell) on a machine; return its handle.

        Every argument is checked before anything is sent. The create is retried on
        transient failures under one Idempotency-Key with the same body, so it happens at
        most once; pass your own ``idempotency_key`` to make that hold across processes
        (re-sending after a crash returns the same execution). ``timeout_ms`` is the remote
        command's own time limit.
        """
        key = _wire.check_idempotency_key(idempotency_key) or self.new_idempotency_key()
        request = _wire.create_request(
            machine_id,
            command,
            cwd=cwd,
            env=env,
            stdin=stdin,
            timeout_ms=timeout_ms,
            idempotency_key=key,
        )
        self._check_open()
        execution = await self._call(request, _wire.decode_execution)
        handle = ExecutionHandle(
            self, execution.machine_id, execution.execution_id, idempotency_key=key
        )
        handle.last = execution
        logger.debug(
            "created %s on %s (status %s)",
            execution.execution_id,
            execution.machine_id,
            execution.status,
        )
        return handle

    def new_idempotency_key(self) -> str:
        """A fresh compact UUIDv7 key (what creates use when you pass none)."""
        unix_ms = int(self.clock.now().timestamp() * 1000)
        return _wire.new_idempotency_key(unix_ms, secrets.randbits(76))

    async def get_execution(self, machine_id: str, execution_id: str) -> Execution:
        """Fetch one execution's current state."""
        request = _wire.execution_request("GET", machine_id, execution_id)
        return await self._call(request, _wire.decode_execution)

    async def delete_execution(
        self, machine_id: str, execution_id: str, *, idempotency_key: str | None = None
    ) -> Execution:
        """Delete an execution; for one still running, this is how it is cancelled.

        Sent under an Idempotency-Key (a fresh one unless you pass your own), re-sent on
        every retry of this call.
        """
        key = _wire.check_idempotency_key(idempotency_key) or self.new_idempotency_key()
        request = _wire.execution_request("DELETE", machine_id, execution_id, idempotency_key=key)
        return await self._call(request, _wire.decode_execution)

    async def get_output(self, machine_id: str, execution_id: str) -> ExecutionOutput:
        """Fetch an execution's captured stdout and stderr."""
        request = _wire.execution_request("GET", machine_id, execution_id, "/output")
        return await self._call(request, _wire.decode_output)

    async def get_logs(self, machine_id: str, execution_id: str) -> LogStatus:
        """Where the capture and the publication of an execution's logs stand."""
        request = _wire.execution_request("GET", machine_id, execution_id, "/logs")
        return await self._call(request, _wire.decode_log_status)

    async def create_log_token(
        self, machine_id: str, execution_id: str, *, idempotency_key: str | None = None
    ) -> LogReadToken:
        """A short-lived token to read the execution's log stream (``POST .../logs/token``)."""
        key = _wire.check_idempotency_key(idempotency_key) or self.new_idempotency_key()
        request = _wire.execution_request(
            "POST", machine_id, execution_id, "/logs/token", idempotency_key=key
        )
        return await self._call(request, _wire.decode_log_token)

    async def reauthorize_logs(
        self, machine_id: str, execution_id: str, *, idempotency_key: str | None = None
    ) -> LogStatus:
        """Re-authorise publication of the execution's logs (``POST .../logs/reauthorize``)."""
        key = _wire.check_idempotency_key(idempotency_key) or self.new_idempotency_key()
        request = _wire.execution_request(
            "POST", machine_id, execution_id, "/logs/reauthorize", idempotency_key=key
        )
        return await self._call(request, _wire.decode_log_status)

    async def list_executions(
        self, machine_id: str, *, limit: int | None = None
    ) -> AsyncIterator[Execution]:
        """Every execution of a machine, following all pages; ``limit`` is the page size."""
        path = _wire.executions_path(_wire.check_id("machine_id", machine_id))
        page_size = _wire.check_limit(limit)
        self._check_open()
        cursor: str | None = None
        while True:
            request = _wire.page_request(path, limit=page_size, cursor=cursor)
            items, next_cursor = await self._call(
                request, lambda r: _wire.decode_page(r, Execution)
            )
            for item in items:
                yield item
            # stop on the end marker, and on a server that repeats a cursor with nothing new
            if next_cursor is None or (not items and next_cursor == cursor):
                return
            cursor = next_cursor

    def iter_events(
        self,
        machine_id: str,
        execution_id: str,
        *,
        cursor: str | None = None,
        follow: bool = False,
        limit: int | None = None,
    ) -> EventStream:
        """The execution's event log from ``cursor`` (the start when None).

        Without ``follow`` it ends when the log has no more entries now; with ``follow`` it
        keeps polling until the execution is terminal and the log is drained. ``limit`` is
        the page size asked of the server (its default when None).
        """
        return EventStream(
            self, self.execution(machine_id, execution_id), cursor, follow, limit=limit
        )

    def execution(self, machine_id: str, execution_id: str) -> ExecutionHandle:
        """A handle on an existing execution (no request is sent)."""
        _wire.check_id("machine_id", machine_id)
        _wire.check_id("execution_id", execution_id)
        return ExecutionHandle(self, machine_id, execution_id)

    def attach(self, ref: ExecutionRef | Mapping[str, Any]) -> ExecutionHandle:
        """A handle from a stored :class:`ExecutionRef` (or its dict), e.g. after a restart."""
        if not isinstance(ref, ExecutionRef):
            if not isinstance(ref, Mapping):
                raise TypeError(f"ref must be an ExecutionRef or a dict, not {type(ref).__name__}")
            ref = ExecutionRef.from_dict(ref)
        handle = self.execution(ref.machine_id, ref.execution_id)
        handle.idempotency_key = ref.idempotency_key
        return handle

    async def run(
        self,
        machine_id: str,
        command: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        timeout_ms: int | None = None,
        timeout: float | _Default | None = DEFAULT,
        check: bool = False,
        idempotency_key: str | None = None,
        cancel_remote: bool = False,
        poll: PollPolicy | None = None,
    ) -> ExecutionResult:
        """Create an execution, wait for it to end, fetch its output.

        ``timeout`` is the deadline of the whole wait in seconds (default: the poll
        policy's; ``None`` waits forever); ``timeout_ms`` is the remote command's own limit.
        A non-zero exit is returned, not raised, unless ``check=True``
        (:class:`ExecutionFailed`). With ``cancel_remote=True``, a run that is cancelled or
        times out deletes the remote execution too.
        """
        self._resolve_timeout(timeout, poll or self.poll)  # bad values fail before the create
        handle = await self.create_execution(
            machine_id,
            command,
            cwd=cwd,
            env=env,
            stdin=stdin,
            timeout_ms=timeout_ms,
            idempotency_key=idempotency_key,
        )
        execution = await handle.wait(timeout=timeout, cancel_remote=cancel_remote, poll=poll)
        return await self._result(handle, execution, check=check)

    @staticmethod
    async def _result(
        handle: ExecutionHandle, execution: Execution, *, check: bool
    ) -> ExecutionResult:
        """The end of a run: fetch the output, build the result, raise only if asked."""
        output: ExecutionOutput | None = None
        if execution.stdout_bytes != 0 or execution.stderr_bytes != 0:
            # both sizes reported as zero: there is nothing to fetch
            output = await handle.output()
        result = ExecutionResult(
            execution=execution,
            stdout=(output.stdout if output else None) or "",
            stderr=(output.stderr if output else None) or "",
            output=output,
            stats=handle.stats or WaitStats(),
        )
        if check and not result.ok:
            raise ExecutionFailed(result)
        return result

    # --- fan-out (dedalus_async._fanout does the work) ---------------------------------------

    @overload
    async def run_many(
        self,
        requests: Iterable[ExecutionRequest],
        *,
        concurrency: int = ...,
        create_concurrency: int = ...,
        return_exceptions: Literal[False] = ...,
        fail_fast: bool = ...,
        cancel_remote: bool = ...,
        on_progress: Callable[[Progress], object] | None = ...,
        check: bool = ...,
        poll: PollPolicy | None = ...,
        batch_refresh: bool = ...,
    ) -> list[ExecutionResult]: ...

    @overload
    async def run_many(
        self,
        requests: Iterable[ExecutionRequest],
        *,
        concurrency: int = ...,
        create_concurrency: int = ...,
        return_exceptions: bool,
        fail_fast: bool = ...,
        cancel_remote: bool = ...,
        on_progress: Callable[[Progress], object] | None = ...,
        check: bool = ...,
        poll: PollPolicy | None = ...,
        batch_refresh: bool = ...,
    ) -> list[ExecutionResult | BaseException]: ...

    async def run_many(
        self,
        requests: Iterable[ExecutionRequest],
        *,
        concurrency: int = 100,
        create_concurrency: int = 10,
        return_exceptions: bool = False,
        fail_fast: bool = False,
        cancel_remote: bool = False,
        on_progress: Callable[[Progress], object] | None = None,
        check: bool = False,
        poll: PollPolicy | None = None,
        batch_refresh: bool = True,
    ) -> list[ExecutionResult] | list[ExecutionResult | BaseException]:
        """Run many executions, at most ``concurrency`` at once; results in input order.

        Each :class:`ExecutionRequest` is created (at most ``create_concurrency`` creates
        in flight), waited on and read like :meth:`run`. Everything is validated and every
        Idempotency-Key chosen before the first request is sent. A failed request does not
        stop the others: with ``return_exceptions=True`` its exception takes its place in
        the list, otherwise all failures are raised together at the end as an
        :class:`ExceptionGroup`. With ``fail_fast=True`` the first failure cancels the rest
        and is raised (in an :class:`ExceptionGroup`) at once. ``cancel_remote=True``
        deletes the remote executions of requests cut short (cancelled, timed out).
        ``on_progress`` is called with a :class:`Progress` on every change. When several
        executions of one machine are waited on at once, they are read a page of
        ``list_executions`` at a time (``batch_refresh=False``: one GET each). Nothing is
        left running when this returns or raises.
        """
        # imported here: _fanout is built on this module
        from . import _fanout

        return await _fanout.run_many(
            self,
            requests,
            concurrency=concurrency,
            create_concurrency=create_concurrency,
            return_exceptions=return_exceptions,
            fail_fast=fail_fast,
            cancel_remote=cancel_remote,
            on_progress=on_progress,
            check=check,
            poll=poll,
            batch_refresh=batch_refresh,
        )

    def as_completed(
        self,
        requests: Iterable[ExecutionRequest],
        *,
        concurrency: int = 100,
        create_concurrency: int = 10,
        return_exceptions: bool = False,
        cancel_remote: bool = False,
        on_progress: Callable[[Progress], object] | None = None,
        check: bool = False,
        poll: PollPolicy | None = None,
        batch_refresh: bool = True,
    ) -> AbstractAsyncContextManager[AsyncIterator[Completed]]:
        """Run many executions like :meth:`run_many`, yielding each as it finishes::

            async with session.as_completed(requests) as results:
                async for done in results:
                    print(done.index, done.result.exit_code)

        Each item is a :class:`Completed` (the request's index, the request, its outcome).
        A failure is raised from the loop, unless ``return_exceptions=True``, which yields
        it as a :class:`Completed` whose :attr:`~Completed.error` is set. Leaving the block
        early cancels what is still running (and, with ``cancel_remote=True``, deletes it
        remotely) before the block exits. Arguments are validated when this is called.
        """
        from . import _fanout

        return _fanout.as_completed(
            self,
            requests,
            concurrency=concurrency,
            create_concurrency=create_concurrency,
            return_exceptions=return_exceptions,
            cancel_remote=cancel_remote,
            on_progress=on_progress,
            check=check,
            poll=poll,
            batch_refresh=batch_refresh,
        )

    # --- waiting -------------------------------------------------------------------------

    def _resolve_timeout(
        self, timeout: float | _Default | None, policy: PollPolicy
    ) -> float | None:
        """The wait's deadline in seconds from now (None: none), checking both arguments."""
        if not isinstance(policy, PollPolicy):
            raise TypeError(f"poll must be a PollPolicy, not {type(policy).__name__}")
        if isinstance(timeout, _Default):
            return policy.timeout
        if timeout is None:
            return None
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be seconds or None, not {type(timeout).__name__}")
        if not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be positive seconds (or None), got {timeout}")
        return float(timeout)

    async def _wait(
        self,
        handle: ExecutionHandle,
        *,
        timeout: float | None,
        deadline: float | None,
        done_when: Callable[[Execution], bool],
        cancel_remote: bool,
        policy: PollPolicy,
        pause: Callable[[Sleep], Awaitable[Execution | None]] | None = None,
    ) -> Execution:
        """The wait loop: poll, ask :func:`next_poll`, sleep, until done or the deadline.

        ``pause`` replaces the sleep between polls: it may return a fresh snapshot it got
        some other way (fan-out reads one list page for many waiters), or None to have
        this loop GET the execution as usual.
        """
        self._check_open()
        clock = self.clock
        start = clock.monotonic()
        counters = _Counters()
        poll_retry = self._poll_retry()
        state = PollState()
        request = _wire.execution_request("GET", handle.machine_id, handle.execution_id)
        snapshot = handle.last
        finished = False
        try:
            while True:
                if snapshot is None:
                    counters.polls += 1
                    try:
                        snapshot = await self._call(
                            request,
                            _wire.decode_execution,
                            deadline=deadline,
                            retry=poll_retry,
                            counters=counters,
                        )
                    except _DeadlineReached as reached:
                        assert timeout is not None
                        handle.stats = self._wait_stats(counters, start, None)
                        raise self._wait_timeout(handle, timeout) from reached.error
                    handle.last = snapshot
                done = done_when(snapshot)
                expires_in = None
                if snapshot.expires_at is not None:
                    expires_in = (snapshot.expires_at - clock.now()).total_seconds()
                decision, state = next_poll(
                    policy,
                    state,
                    done=done,
                    retry_after_ms=snapshot.retry_after_ms,
                    expires_in=expires_in,
                    remaining=None if deadline is None else deadline - clock.monotonic(),
                    rand=self._random(),
                )
                if isinstance(decision, Done):
                    finished = True
                    handle.stats = self._wait_stats(counters, start, snapshot)
                    self._log_wait(handle, snapshot, handle.stats)
                    return snapshot
                if isinstance(decision, GiveUp):
                    assert timeout is not None
                    handle.stats = self._wait_stats(counters, start, None)
                    raise self._wait_timeout(handle, timeout)
                if pause is None:
                    counters.slept += decision.seconds
                    await clock.sleep(decision.seconds)
                    snapshot = None
                else:
                    before = clock.monotonic()
                    snapshot = await pause(decision)
                    counters.slept += clock.monotonic() - before
                    if snapshot is not None:
                        counters.polls += 1  # a look, even if it cost no request of its own
                        handle.last = snapshot
        finally:
            if not finished and cancel_remote:
                await self._cancel_remote(handle)

    def _poll_retry(self) -> RetryPolicy:
        """The retry policy of a wait's polls: the Session's, bounded by the deadline alone.

        Polls retry transient errors for as long as the deadline allows (P9 of _policy).
        Built once per RetryPolicy (``retry`` may be replaced), not once per wait.
        """
        cached = self._poll_retry_cache
        if cached is None or cached[0] is not self.retry:
            cached = (self.retry, attrs.evolve(self.retry, max_attempts=1 << 30, budget=1e12))
            self._poll_retry_cache = cached
        return cached[1]

    @staticmethod
    def _wait_timeout(handle: ExecutionHandle, timeout: float) -> WaitTimeout:
        status = handle.last.status if handle.last is not None else "unseen"
        return WaitTimeout(
            f"execution {handle.execution_id} on {handle.machine_id} was still "
            f"{status!r} after {timeout:g} s; it keeps running remotely unless cancelled: "
            "resume with session.attach(exc.ref).wait()",
            ref=handle.ref,
            last=handle.last,
            timeout=timeout,
        )

    async def _cancel_remote(self, handle: ExecutionHandle) -> None:
        """DELETE the execution, shielded from the cancellation in progress, time-boxed."""
        if handle.last is not None and handle.last.is_terminal:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.request_timeout):
            try:
                handle.last = await self.delete_execution(handle.machine_id, handle.execution_id)
                logger.debug("cancelled %s remotely", handle.execution_id)
            except DedalusError as exc:
                logger.warning("could not cancel %s remotely: %s", handle.execution_id, exc)

    def _wait_stats(
        self, counters: _Counters, start: float, terminal: Execution | None
    ) -> WaitStats:
        lag = None
        if terminal is not None and terminal.completed_at is not None:
            lag = (self.clock.now() - terminal.completed_at).total_seconds()
        return WaitStats(
            polls=counters.polls,
            retries=counters.retries,
            slept=counters.slept,
            elapsed=self.clock.monotonic() - start,
            detection_lag=lag,
        )

    @staticmethod
    def _log_wait(handle: ExecutionHandle, snapshot: Execution, stats: WaitStats) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "wait for %s ended %s: polls=%d retries=%d slept=%.3fs elapsed=%.3fs lag=%s",
                handle.execution_id,
                snapshot.status,
                stats.polls,
                stats.retries,
                stats.slept,
                stats.elapsed,
                "n/a" if stats.detection_lag is None else f"{stats.detection_lag:.3f}s",
            )


def _check_until(until: Collection[str]) -> frozenset[str]:
    if isinstance(until, str):
        raise TypeError(f"until must be a collection of statuses, e.g. {{{until!r}}}")
    if not isinstance(until, Collection):
        raise TypeError(f"until must be a collection of statuses, not {type(until).__name__}")
    statuses = frozenset(until)
    if not statuses or not all(isinstance(s, str) for s in statuses):
        raise ValueError("until must be a non-empty collection of status strings")
    return statuses


class ExecutionHandle:
    """One execution, as this process knows it.

    ``last`` is the latest snapshot seen (from the create, a refresh or a wait);
    ``idempotency_key`` is set when this process created it; ``stats`` describes the most
    recent wait. ``await handle`` is ``await handle.wait()``.
    """

    __slots__ = ("_session", "execution_id", "idempotency_key", "last", "machine_id", "stats")

    def __init__(
        self,
        session: Session,
        machine_id: str,
        execution_id: str,
        *,
        idempotency_key: str | None = None,
    ) -> None:
        self._session = session
        self.machine_id = machine_id
        self.execution_id = execution_id
        self.idempotency_key = idempotency_key
        self.last: Execution | None = None
        self.stats: WaitStats | None = None

    def __repr__(self) -> str:
        status = self.last.status if self.last else "unknown"
        return f"<ExecutionHandle {self.machine_id}/{self.execution_id} {status}>"

    @property
    def ref(self) -> ExecutionRef:
        """A serializable reference: store it and :meth:`Session.attach` it later."""
        return ExecutionRef(
            machine_id=self.machine_id,
            execution_id=self.execution_id,
            idempotency_key=self.idempotency_key,
        )

    async def refresh(self) -> Execution:
        """Fetch the current state (and remember it as :attr:`last`)."""
        self.last = await self._session.get_execution(self.machine_id, self.execution_id)
        return self.last

    async def output(self) -> ExecutionOutput:
        """Fetch the captured stdout and stderr."""
        return await self._session.get_output(self.machine_id, self.execution_id)

    async def cancel(self) -> Execution:
        """Stop the execution on the server (a DELETE) and return what it reported."""
        self.last = await self._session.delete_execution(self.machine_id, self.execution_id)
        return self.last

    def events(
        self, *, cursor: str | None = None, follow: bool = False, limit: int | None = None
    ) -> EventStream:
        """The event log; see :meth:`Session.iter_events`."""
        return EventStream(self._session, self, cursor, follow, limit=limit)

    async def wait(
        self,
        *,
        timeout: float | _Default | None = DEFAULT,
        until: Collection[str] | None = None,
        cancel_remote: bool = False,
        poll: PollPolicy | None = None,
    ) -> Execution:
        """Poll until the execution is terminal (or its status is in ``until``).

        Paced by the server's ``retry_after_ms`` (read afresh on every response), never
        sleeping past ``expires_at`` or the deadline. ``timeout`` (seconds) defaults to the
        poll policy's; ``None`` waits forever. On the deadline: :class:`WaitTimeout`, and
        the remote execution keeps running unless ``cancel_remote=True``, which also
        deletes it when this wait is cancelled.
        """
        session = self._session
        policy = poll or session.poll
        seconds = session._resolve_timeout(timeout, policy)
        if until is None:
            done_when: Callable[[Execution], bool] = _is_terminal
        else:
            wanted = _check_until(until)
            done_when = lambda snapshot: snapshot.status in wanted  # noqa: E731
        deadline = None if seconds is None else session.clock.monotonic() + seconds
        return await session._wait(
            self,
            timeout=seconds,
            deadline=deadline,
            done_when=done_when,
            cancel_remote=cancel_remote,
            policy=policy,
        )

    def __await__(self) -> Generator[Any, None, Execution]:
        return self.wait().__await__()

    async def watch(
        self,
        *,
        timeout: float | _Default | None = DEFAULT,
        poll: PollPolicy | None = None,
    ) -> AsyncIterator[Execution]:
        """Yield a snapshot each time the status changes (the first one too); end after a
        terminal one. Same pacing and deadline as :meth:`wait` (one deadline for it all)."""
        session = self._session
        policy = poll or session.poll
        seconds = session._resolve_timeout(timeout, policy)
        deadline = None if seconds is None else session.clock.monotonic() + seconds
        snapshot = self.last
        if snapshot is not None:
            yield snapshot
        while snapshot is None or not snapshot.is_terminal:
            snapshot = await session._wait(
                self,
                timeout=seconds,
                deadline=deadline,
                done_when=_changed_from(None if snapshot is None else snapshot.status),
                cancel_remote=False,
                policy=policy,
            )
            yield snapshot


def _is_terminal(snapshot: Execution) -> bool:
    return snapshot.is_terminal


def _changed_from(status: str | None) -> Callable[[Execution], bool]:
    return lambda snapshot: snapshot.status != status or snapshot.is_terminal


class EventStream:
    """An async iterator over an execution's events; :attr:`cursor` resumes it.

    ``cursor`` is where the next page starts: store it and pass it back to
    :meth:`ExecutionHandle.events` to resume. Delivery across a resume is at least once
    (a page is re-read if it was only partly consumed): deduplicate by ``sequence``.
    """

    def __init__(
        self,
        session: Session,
        handle: ExecutionHandle,
        cursor: str | None,
        follow: bool,
        *,
        limit: int | None = None,
    ) -> None:
        if cursor is not None and not isinstance(cursor, str):
            raise TypeError(f"cursor must be a str or None, not {type(cursor).__name__}")
        self._limit = _wire.check_limit(limit)
        self._session = session
        self._handle = handle
        self.cursor = cursor
        self._follow = follow
        self._buffer: deque[ExecutionEvent] = deque()
        self._next: str | None = cursor
        self._finished = False
        self._last_sequence: int | None = None
        self._terminal_seen = False
        self._state = PollState()
        self._path = _wire.execution_request(
            "GET", handle.machine_id, handle.execution_id, "/events"
        ).path

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ExecutionEvent:
        while not self._buffer:
            if self._finished:
                raise StopAsyncIteration
            await self._fetch()
        event = self._buffer.popleft()
        self._last_sequence = event.sequence
        if not self._buffer:
            self.cursor = self._next
        return event

    async def _fetch(self) -> None:
        session = self._session
        request = _wire.page_request(self._path, limit=self._limit, cursor=self._next)
        items, next_cursor = await session._call(request, _wire.decode_events)
        if self._last_sequence is not None:
            # a resumed cursor may replay part of a page already delivered
            items = [e for e in items if e.sequence > self._last_sequence]
        if next_cursor is not None:
            self._next = next_cursor
        self._buffer.extend(items)
        if not self._buffer:
            self.cursor = self._next
        if next_cursor is None or (not items and not self._follow):
            # the server marked the end, or a non-following reader has read all there is
            self._finished = True
        elif not items:
            if self._terminal_seen:
                self._finished = True  # the page read after the terminal status was empty
                return
            # Nothing new while following: the execution's own hint paces the next page.
            snapshot = await self._handle.refresh()
            if snapshot.is_terminal:
                self._terminal_seen = True  # read once more to drain what is left
                return
            decision, self._state = next_poll(
                session.poll,
                self._state,
                done=False,
                retry_after_ms=snapshot.retry_after_ms,
                expires_in=None,
                remaining=None,
                rand=session._random(),
            )
            if not isinstance(decision, Done | GiveUp):
                await session.clock.sleep(decision.seconds)
