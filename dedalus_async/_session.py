"""The Session: the public face of the client, a small facade over its engines.

A Session holds the configuration (:mod:`~dedalus_async._config`), and builds the two
engines everything runs on: the :class:`~dedalus_async._requester.Requester` (one request,
with retries, paced by the :class:`~dedalus_async.Throttle`) and the
:class:`~dedalus_async._waiting.WaitLoop` (polling to the end, with its deadline, stats
and remote cancel). Each endpoint method builds a request with :mod:`~dedalus_async._wire`
and hands it to the requester; handles (:mod:`~dedalus_async._handle`) and fan-out
(:mod:`~dedalus_async._fanout`) use the engines and the Session's public calls, never its
internals.
"""

from __future__ import annotations

import logging
import random as _random
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Literal, overload

from . import _config, _fanout, _telemetry
from ._api import ExecutionsAPI, MachinesAPI
from ._checks import check_instance
from ._clock import Clock, SystemClock
from ._config import DEFAULT_BASE_URL, AuthScheme
from ._fanout import Completed, ExecutionRequest, Progress
from ._handle import EventStream, ExecutionHandle, run_to_end
from ._policy import (
    USE_POLICY_DEFAULT,
    PollPolicy,
    RetryPolicy,
    UsePolicyDefault,
    resolve_timeout,
)
from ._requester import Requester, Transport
from ._results import ExecutionResult
from ._throttle import Throttle, check_rate
from ._transport import AiohttpTransport
from ._waiting import WaitLoop

if TYPE_CHECKING:
    import aiohttp
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ["DEFAULT_BASE_URL", "EventStream", "ExecutionHandle", "Session"]

logger = logging.getLogger("dedalus_async")


class Session(ExecutionsAPI, MachinesAPI):
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
        transport: what sends the requests, in place of the aiohttp one: any object with
            ``open()``, ``aclose()`` and ``send(request, *, timeout)`` (see
            :class:`~dedalus_async._requester.Transport`); the seam for custom transports
            and tests. It adds the headers itself (:attr:`headers` has them).
        tracer_provider, meter_provider: OpenTelemetry providers to record spans and metrics
            with (the ``otel`` extra); by default the global ones, if the application set
            them before the Session opens. See the README's "Observability" section.
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
        transport: Transport | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        settings = _config.resolve(
            api_key,
            base_url=base_url,
            org_id=org_id,
            auth_scheme=auth_scheme,
            request_timeout=request_timeout,
            max_connections=max_connections,
            allow_insecure_http=allow_insecure_http,
        )
        check_instance("retry", retry, RetryPolicy, "a RetryPolicy")
        check_instance("poll", poll, PollPolicy, "a PollPolicy")
        check_instance("clock", clock, Clock, "a Clock (monotonic, now, sleep)")
        if random is not None and not callable(random):
            raise TypeError(
                f"random must be a callable returning [0, 1), not {type(random).__name__}"
            )
        self.base_url: str = settings.base_url
        self.org_id: str | None = settings.org_id
        self.auth_scheme: AuthScheme = settings.auth_scheme
        self.clock: Clock = clock if clock is not None else SystemClock()
        draw = random if random is not None else _random.random
        self.throttle: Throttle = Throttle(
            check_rate(max_requests_per_second, "max_requests_per_second"),
            clock=self.clock,
            random=draw,
        )
        # The key lives only inside the transport's header dict from here on.
        self._transport: Transport = transport or AiohttpTransport(
            settings.base_url,
            settings.headers,
            request_timeout=settings.request_timeout,
            client_session=client_session,
            max_connections=settings.max_connections,
        )
        self._requester = Requester(
            self._transport,
            clock=self.clock,
            random=draw,
            throttle=self.throttle,
            retry=retry if retry is not None else RetryPolicy(),
            request_timeout=settings.request_timeout,
        )
        self._waits = WaitLoop(
            self._requester,
            poll=poll if poll is not None else PollPolicy(),
            new_key=self.new_idempotency_key,
        )
        self._providers = (tracer_provider, meter_provider)

    def __repr__(self) -> str:
        return f"<Session {self.base_url} auth={self.auth_scheme} {self._requester.state}>"

    @property
    def request_timeout(self) -> float:
        """Seconds one HTTP request may take."""
        return self._requester.request_timeout

    @property
    def retry(self) -> RetryPolicy:
        """How transient failures of one request are retried (assignable)."""
        return self._requester.retry

    @retry.setter
    def retry(self, policy: RetryPolicy) -> None:
        check_instance("retry", policy, RetryPolicy, "a RetryPolicy")
        self._requester.retry = policy

    @property
    def poll(self) -> PollPolicy:
        """How waits pace themselves, and their default deadline (assignable)."""
        return self._waits.poll

    @poll.setter
    def poll(self, policy: PollPolicy) -> None:
        check_instance("poll", policy, PollPolicy, "a PollPolicy")
        self._waits.poll = policy

    # --- lifecycle -------------------------------------------------------------------------

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
        await self._requester.open()
        # OpenTelemetry, if the application configured it by now (see _telemetry)
        self._requester.telemetry = _telemetry.resolve(
            *self._providers,
            self.base_url,
            over_aiohttp=isinstance(self._transport, AiohttpTransport),
        )

    async def aclose(self) -> None:
        """Close the connection pool (a borrowed aiohttp session stays open). Idempotent."""
        await self._requester.aclose()

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran."""
        return self._requester.state == "closed"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        requester = getattr(self, "_requester", None)
        if requester is not None and requester.state == "open":
            _warn(
                f"unclosed {self!r}: use `async with Session(...)` or await session.aclose()",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )

    async def run(
        self,
        machine_id: str,
        command: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        timeout_ms: int | None = None,
        timeout: float | UsePolicyDefault | None = USE_POLICY_DEFAULT,
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
        resolve_timeout(timeout, poll or self.poll)  # bad values fail before the create
        create = self.create_execution(
            machine_id,
            command,
            cwd=cwd,
            env=env,
            stdin=stdin,
            timeout_ms=timeout_ms,
            idempotency_key=idempotency_key,
        )
        return await run_to_end(
            machine_id,
            create,
            self._waits,
            timeout=timeout,
            cancel_remote=cancel_remote,
            poll=poll,
            check=check,
        )

    # --- fan-out (dedalus_async._fanout does the work) ------------------------------------

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
        wake_machines: bool = ...,
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
        wake_machines: bool = ...,
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
        wake_machines: bool = False,
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
        left running when this returns or raises. ``wake_machines=True`` first makes each
        machine running (:meth:`ensure_running`, once per machine) before any create.
        """
        return await _fanout.run_many(
            self,
            self._waits,
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
            wake=self.ensure_running if wake_machines else None,
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
        return _fanout.as_completed(
            self,
            self._waits,
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
