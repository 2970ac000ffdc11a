"""Fan-out: many executions at once, with limits, as structured concurrency.

:meth:`Session.run_many <dedalus_async.Session.run_many>` and
:meth:`Session.as_completed <dedalus_async.Session.as_completed>` both drive one engine:

* Every request is validated, and gets its Idempotency-Key, before anything is sent: a bad
  request in a list of 2,000 fails at once, and a retried create never runs twice.
* ``concurrency`` workers run inside one anyio task group; each takes the next request,
  creates it (at most ``create_concurrency`` creates in flight), waits for it, fetches its
  output, and takes the next. So at most ``concurrency`` executions are being waited on,
  and no task is left behind when the call returns, raises or is left early.
* Waiting: when several executions of one machine are waited on at once, a per-machine
  :class:`_Refresher` reads them a page at a time from ``list_executions`` instead of
  one GET per execution per look, reading only the pages (and decoding only the items)
  its due waiters need; each waiter keeps its own schedule (the pure
  :func:`~dedalus_async._policy.next_poll`) and its own deadline, and falls back to its
  own GET whenever the page does not serve it.
* The Session's :class:`~dedalus_async.Throttle` paces every request of every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import attrs

from . import _wire
from ._checks import check_count, check_instance, check_seconds
from ._durable import JobSpec, Ledger, RetryExecution, fingerprint, job_id, open_journal
from ._errors import APIStatusError, DedalusError, ExecutionFailed
from ._handle import ExecutionHandle, create_seen_through, read_result
from ._journal import JobState, Journal
from ._models import TERMINAL_STATUSES, Execution
from ._policy import USE_POLICY_DEFAULT, PollPolicy, Sleep, UsePolicyDefault, resolve_timeout
from ._requester import DeadlineReached
from ._results import ExecutionResult
from ._waiting import WaitLoop, is_terminal

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["Client", "Completed", "ExecutionRequest", "Progress", "as_completed", "run_many"]

logger = logging.getLogger("dedalus_async")

#: A machine's executions are read a page at a time once this many are being waited on.
BATCH_MIN_WAITERS: Final = 4
# The page size asked for when reading a machine's executions (servers may clamp it).
_PAGE_SIZE: Final = 100
# A page costs the client more than a GET (a hundred executions to read, against one): a
# sweep reads one only while at least this many due waiters are still to be found.
_PAGE_WORTH: Final = 2
# Where the waiters are known to be, a page is asked for no more executions than this many
# per waiter on the machine (and at least _PAGE_MIN): the finished executions around them
# would only be read to be skipped.
_PAGE_PER_WAITER: Final = 2
_PAGE_MIN: Final = 10
# A waiter may be served by a page read this fraction of its own sleep early: looking a
# little early costs nothing when the page is read anyway, and it lets one page serve
# waiters whose schedules are close but not equal.
_EARLY_FRACTION: Final = 0.5
# ... and a sweep waits for the first waiter due this fraction of its sleep (at most
# _LATE_MAX seconds) past its moment, so that the waiters due meanwhile share its pages:
# a little detection lag for far fewer requests when waiters' moments are spread out (a
# server whose hints are the time left in a phase puts each on a moment of its own).
_LATE_FRACTION: Final = 0.25
_LATE_MAX: Final = 0.1
# A machine's waiters go back to their own GETs for the rest of the fan-out when, over
# this many sweeps in a row, the pages read served no more looks than there were pages.
_LEDGER_SWEEPS: Final = 8
# Statuses with which a server refuses a list outright: no point asking again.
_LIST_REFUSED: Final = frozenset({400, 401, 403, 404, 405, 422})


# --- requests, results, progress -------------------------------------------------------


def _check_machine_id(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    _wire.check_id("machine_id", value)


def _argv(value: Sequence[str]) -> tuple[str, ...]:
    return tuple(_wire.check_command(value))


def _env(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    checked = _wire.check_env(value)
    # read-only, so a frozen request cannot change under a fan-out that is running it
    return None if checked is None else MappingProxyType(checked)


def _optional_str(_: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    _wire.check_optional_str(attribute.name, value)


def _timeout_ms(_: Any, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    _wire.check_timeout_ms(value)


def _idempotency_key(_: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    _wire.check_idempotency_key(value)


def _job_key(_: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"key must be a str or None, not {type(value).__name__}")
    if not value or len(value) > 255 or not value.isprintable() or value.startswith("#"):
        raise ValueError(
            "key must be 1-255 printable characters, not starting with '#' (which names "
            "jobs by position); omit it to match the job by its position"
        )
    _wire.check_optional_str("key", value)


def _wait_timeout(
    _: Any,
    attribute: attrs.Attribute[float | UsePolicyDefault | None],
    value: float | UsePolicyDefault | None,
) -> None:
    # the same rule as ExecutionHandle.wait(timeout=...), checked here so that it fails
    # when the request is built, not halfway through a fan-out
    if not isinstance(value, UsePolicyDefault):
        check_seconds("timeout", value, none_means="no deadline")


# typed as the field is, so the default does not narrow the field's type
_POLICY_TIMEOUT: float | UsePolicyDefault | None = USE_POLICY_DEFAULT


def _env_repr(env: Mapping[str, str] | None) -> str:
    # values often carry secrets: show the keys only
    return "None" if env is None else "{" + ", ".join(f"{k!r}: ..." for k in env) + "}"


def _stdin_repr(stdin: str | None) -> str:
    return "None" if stdin is None else f"<{len(stdin)} characters>"


@attrs.frozen(kw_only=True)
class ExecutionRequest:
    """One execution to run in a fan-out: the arguments of :meth:`Session.run`.

    Everything is validated when the request is built, so a bad request in a long list
    fails before any request is sent. ``timeout_ms`` is the remote command's own limit;
    ``timeout`` the deadline of the wait in seconds (default: the Session's poll policy's,
    ``None``: no deadline). Without an ``idempotency_key`` the fan-out generates one.
    ``key`` names the job in a journaled batch (``journal=``), so that resuming matches it
    by name rather than by position; keys are unique within a batch.
    """

    machine_id: str = attrs.field(validator=_check_machine_id)
    command: tuple[str, ...] = attrs.field(converter=_argv)
    cwd: str | None = attrs.field(default=None, validator=_optional_str)
    env: Mapping[str, str] | None = attrs.field(
        default=None, converter=_env, hash=False, repr=_env_repr
    )
    stdin: str | None = attrs.field(default=None, validator=_optional_str, repr=_stdin_repr)
    timeout_ms: int | None = attrs.field(default=None, validator=_timeout_ms)
    idempotency_key: str | None = attrs.field(default=None, validator=_idempotency_key)
    timeout: float | UsePolicyDefault | None = attrs.field(
        default=_POLICY_TIMEOUT, validator=_wait_timeout
    )
    key: str | None = attrs.field(default=None, validator=_job_key)

    def _spec(self, position: int, idempotency_key: str) -> JobSpec:
        env = None if self.env is None else dict(self.env)

        def fingerprint_with(salt: str) -> str:
            return fingerprint(
                salt,
                self.machine_id,
                self.command,
                self.cwd,
                env,
                self.stdin,
                self.timeout_ms,
                self.idempotency_key,
            )

        return JobSpec(
            job_id(position, self.key),
            self.machine_id,
            self.command,
            fingerprint_with,
            idempotency_key,
        )


@attrs.frozen(kw_only=True)
class Progress:
    """Where a fan-out stands; passed to ``on_progress`` on every change.

    ``done``: finished with a result (whatever its exit code); ``failed``: finished with
    an exception; ``in_flight``: being created, waited on or read; ``total``: requests.
    """

    total: int
    done: int = 0
    failed: int = 0
    in_flight: int = 0

    @property
    def finished(self) -> int:
        """Requests that ended either way: ``done + failed``."""
        return self.done + self.failed

    @property
    def pending(self) -> int:
        """Requests not started yet."""
        return self.total - self.finished - self.in_flight


@attrs.frozen(kw_only=True)
class Completed:
    """One finished request of :meth:`Session.as_completed`, and which one it was.

    ``index`` is the request's position in the input; ``outcome`` is its
    :class:`ExecutionResult` or the exception it ended with.
    """

    index: int
    request: ExecutionRequest
    outcome: ExecutionResult | BaseException

    @property
    def error(self) -> BaseException | None:
        """The exception the request ended with, or ``None`` if it has a result."""
        return self.outcome if isinstance(self.outcome, BaseException) else None

    @property
    def result(self) -> ExecutionResult:
        """The result; raises the request's exception if it ended with one."""
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


# --- planning: everything that can fail before a request is sent ------------------------


@attrs.frozen
class _Plan:
    requests: tuple[ExecutionRequest, ...]
    keys: tuple[str, ...]
    concurrency: int
    create_concurrency: int
    cancel_remote: bool
    check: bool
    batch_refresh: bool
    on_progress: Callable[[Progress], object] | None
    poll: PollPolicy | None
    journal: Journal | None = None
    owns_journal: bool = False
    retry_execution: RetryExecution | None = None


class Client(Protocol):
    """What fan-out uses of its Session: creates, keys and handles (its waits use the
    WaitLoop)."""

    def new_idempotency_key(self) -> str: ...

    def execution(self, machine_id: str, execution_id: str) -> ExecutionHandle: ...

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
    ) -> ExecutionHandle: ...


def _plan(
    client: Client,
    waits: WaitLoop,
    requests: Iterable[ExecutionRequest],
    *,
    concurrency: int,
    create_concurrency: int,
    cancel_remote: bool,
    check: bool,
    batch_refresh: bool,
    on_progress: Callable[[Progress], object] | None,
    poll: PollPolicy | None,
    journal: object = None,
    retry_execution: RetryExecution | None = None,
) -> _Plan:
    if isinstance(requests, ExecutionRequest):
        raise TypeError("requests must be an iterable of ExecutionRequest, not a single one")
    items = tuple(requests)
    for index, item in enumerate(items):
        if not isinstance(item, ExecutionRequest):
            raise TypeError(
                f"requests[{index}] must be an ExecutionRequest, not {type(item).__name__}"
            )
    if poll is not None and not isinstance(poll, PollPolicy):
        raise TypeError(f"poll must be a PollPolicy, not {type(poll).__name__}")
    if on_progress is not None and not callable(on_progress):
        raise TypeError("on_progress must be a callable taking a Progress")
    check_instance("retry_execution", retry_execution, RetryExecution, "a RetryExecution")
    named: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.key is not None:
            first = named.setdefault(item.key, index)
            if first != index:
                raise ValueError(
                    f"requests[{first}] and requests[{index}] share the key {item.key!r}"
                )
    given: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.idempotency_key is not None:
            first = given.setdefault(item.idempotency_key, index)
            if first != index:
                # the server would answer the second with the first's execution (or a 400)
                raise ValueError(
                    f"requests[{first}] and requests[{index}] share an idempotency_key"
                )
    # Keys are fixed before anything is sent: every retry of a create repeats its key, so
    # the server creates each execution once, however the network behaves.
    keys = tuple(item.idempotency_key or client.new_idempotency_key() for item in items)
    waits.requester.check_open()
    store, owned = (None, False) if journal is None else open_journal(journal)
    return _Plan(
        items,
        keys,
        check_count("concurrency", concurrency),
        check_count("create_concurrency", create_concurrency),
        bool(cancel_remote),
        bool(check),
        bool(batch_refresh),
        on_progress,
        poll,
        store,
        owned,
        retry_execution,
    )


# --- the engine --------------------------------------------------------------------------


class _FanOut:
    """Runs a plan in a task group; hands each outcome to ``deliver`` as it comes."""

    def __init__(
        self,
        client: Client,
        waits: WaitLoop,
        plan: _Plan,
        deliver: Callable[[int, ExecutionResult | Exception], None],
        *,
        fail_fast: bool,
        name: str,
    ) -> None:
        self.client = client
        self.waits = waits
        self.plan = plan
        self._deliver = deliver
        self._fail_fast = fail_fast
        self._next = 0
        self._done = 0
        self._failed = 0
        self._in_flight = 0
        self._refreshers: dict[str, _Refresher] = {}
        self._name = name
        self._telemetry = waits.requester.telemetry
        self._span: Any = None  # the fan-out's span, with telemetry
        self.ledger: Ledger | None = None

    async def open_journal(self) -> None:
        """Load the plan's journal and match the batch with it (D6); idempotent. On
        failure a journal the fan-out owns is closed before the error is raised."""
        plan = self.plan
        if plan.journal is None or self.ledger is not None:
            return
        ledger = Ledger(plan.journal, self.client.new_idempotency_key)
        pairs = enumerate(zip(plan.requests, plan.keys, strict=True))
        try:
            await ledger.open([request._spec(i, key) for i, (request, key) in pairs])
        except BaseException:
            await self._close_journal()
            raise
        self.ledger = ledger

    async def _close_journal(self) -> None:
        # J5: whatever the outcome, what was journaled is durable before we return
        journal = self.plan.journal
        if journal is not None:
            with anyio.CancelScope(shield=True):
                if self.plan.owns_journal:
                    await journal.aclose()
                elif self.ledger is not None:
                    await journal.flush()

    async def run(self) -> None:
        telemetry = self._telemetry
        if telemetry is None:
            await self._run()
            return
        plan = self.plan
        with telemetry.fanout_span(self._name, len(plan.requests), plan.concurrency) as span:
            self._span = span
            try:
                await self._run()
            finally:
                if span is not None:
                    span.set_attributes(
                        {"dedalus.fanout.done": self._done, "dedalus.fanout.failed": self._failed}
                    )

    async def _run(self) -> None:
        plan = self.plan
        await self.open_journal()
        # created here, inside the running loop: nothing of a fan-out outlives its call
        self._create_slots = _Slots(plan.create_concurrency)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for _ in range(min(plan.concurrency, len(plan.requests))):
                    tg.start_soon(self._worker)
        finally:
            await self._close_journal()

    def _report(self) -> None:
        callback = self.plan.on_progress
        if callback is not None:
            callback(
                Progress(
                    total=len(self.plan.requests),
                    done=self._done,
                    failed=self._failed,
                    in_flight=self._in_flight,
                )
            )

    async def _worker(self) -> None:
        requests = self.plan.requests
        while self._next < len(requests):
            index = self._next
            self._next += 1
            self._in_flight += 1
            self._report()
            try:
                if self._telemetry is None:
                    result = await self._one(index)
                else:
                    with self._telemetry.execution_span(requests[index].machine_id) as note:
                        result = await self._one(index)
                        note(result.execution)
            except Exception as exc:
                request = requests[index]
                exc.add_note(
                    f"in fan-out request #{index}: {request.command[0]!r} on {request.machine_id}"
                )
                self._in_flight -= 1
                self._failed += 1
                if self._fail_fast:
                    self._report()
                    # the task group cancels every other worker and raises this
                    raise
                self._deliver(index, exc)
                self._report()
            else:
                self._in_flight -= 1
                self._done += 1
                self._deliver(index, result)
                self._report()

    async def _one(self, index: int) -> ExecutionResult:
        plan = self.plan
        request = plan.requests[index]
        ledger = self.ledger
        key = plan.keys[index]
        attempt = 1
        handle: ExecutionHandle | None = None
        try:
            if ledger is not None:
                resumed = ledger.result_of(index)
                if resumed is not None:
                    return self._checked(resumed)  # D1: no request at all
                record = ledger.records[index]
                attempt = record.attempt
                if record.state is JobState.CREATED and record.execution_id is not None:
                    handle = self.client.execution(request.machine_id, record.execution_id)
                    handle.idempotency_key = record.idempotency_key  # D2
                else:
                    ledger.check_resendable(index, time.time())  # D3
            while True:
                if handle is None:
                    handle = await self._create(index, key)
                    if ledger is not None:
                        await ledger.created(index, handle.execution_id)
                result = await self._wait_and_read(handle, request)
                retry = plan.retry_execution
                if retry is None or not retry.wants_another(result.execution, attempt):
                    break
                logger.info(
                    "fan-out request #%d: execution %s ended %s, creating it again (attempt %d)",
                    index,
                    result.execution.execution_id,
                    result.execution.error_code or result.execution.status,
                    attempt + 1,
                )
                attempt += 1
                handle = None
                if ledger is not None:
                    await ledger.again(index, result.execution)
                else:
                    key = self.client.new_idempotency_key()
        except Exception as exc:
            if ledger is not None:
                await ledger.failed(index, exc)  # D5
            raise
        if ledger is not None:
            await ledger.finished(index, result)  # J4
        return self._checked(result)

    def _checked(self, result: ExecutionResult) -> ExecutionResult:
        if self.plan.check and not result.ok:
            raise ExecutionFailed(result)
        return result

    async def _create(self, index: int, key: str) -> ExecutionHandle:
        plan = self.plan
        request = plan.requests[index]
        slots = self._create_slots
        await slots.acquire()
        try:
            if self.ledger is not None:
                # J2: committed before the POST, once it has its slot (so "sent" is close
                # to when it was sent, and at most create_concurrency commits are waited on)
                key = await self.ledger.sending(index)
            create = self.client.create_execution(
                request.machine_id,
                request.command,
                cwd=request.cwd,
                env=request.env,
                stdin=request.stdin,
                timeout_ms=request.timeout_ms,
                idempotency_key=key,
            )
            # With cancel_remote, a create cancelled in flight is seen through (for at most
            # request_timeout, not all its retries) and what it made deleted.
            return await (create_seen_through(create, self.waits) if plan.cancel_remote else create)
        finally:
            slots.release()

    async def _wait_and_read(
        self, handle: ExecutionHandle, request: ExecutionRequest
    ) -> ExecutionResult:
        plan = self.plan
        if plan.batch_refresh:
            execution = await self._wait_batched(handle, request)
        else:
            execution = await handle.wait(
                timeout=request.timeout, cancel_remote=plan.cancel_remote, poll=plan.poll
            )
        return await read_result(handle, execution, check=False)

    async def _wait_batched(self, handle: ExecutionHandle, request: ExecutionRequest) -> Execution:
        """:meth:`ExecutionHandle.wait` (terminal statuses), with looks shared per machine.

        :meth:`WaitLoop.wait` runs the loop; only its pause differs: while the machine's
        refresher is engaged, a waiter's next snapshot may come from a page the refresher
        read for everyone, else the loop GETs it as usual.
        """
        waits = self.waits
        policy = self.plan.poll or waits.poll
        seconds = resolve_timeout(request.timeout, policy)
        deadline = waits.deadline(seconds)
        refresher = self._refresher(handle.machine_id)
        look = refresher.register(handle.execution_id, deadline)
        try:
            return await waits.wait(
                handle,
                timeout=seconds,
                deadline=deadline,
                done_when=is_terminal,
                cancel_remote=self.plan.cancel_remote,
                policy=policy,
                pause=look.pause,
            )
        finally:
            refresher.unregister(look)

    def _refresher(self, machine_id: str) -> _Refresher:
        refresher = self._refreshers.get(machine_id)
        if refresher is None:
            refresher = _Refresher(
                self.waits, machine_id, self._tg, self.plan.poll or self.waits.poll
            )
            if self._telemetry is not None:
                # its page reads belong to the fan-out, not to the job that came first
                refresher.context = functools.partial(self._telemetry.within, self._span)
            self._refreshers[machine_id] = refresher
        return refresher

    def stats(self) -> dict[str, int]:
        """Requests the refreshers made and saved (for tests and debug logs)."""
        out = {"pages": 0, "served": 0, "fallbacks": 0, "sweeps": 0}
        for refresher in self._refreshers.values():
            out["pages"] += refresher.pages
            out["served"] += refresher.served
            out["fallbacks"] += refresher.fallbacks
            out["sweeps"] += refresher.sweeps
        return out


class _Slots:
    """At most ``n`` holders at a time, served first come, first served: the fan-out's
    create limit.

    Not anyio's Semaphore, which yields to the event loop on every acquire (a checkpoint
    in a shielded cancel scope), nor asyncio's, whose release walks its waiters' futures
    and whose woken waiter removes itself from the middle of the queue: with every
    worker of a large fan-out queued for a create slot, both cost per create in
    proportion to the queue. Here a release hands its slot to the first waiter still
    waiting; a waiter cancelled in the queue stays there, skipped, and one cancelled
    just after being handed the slot passes it on.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self._free and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed the slot as it was cancelled: pass it on
            raise

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled one is done
                waiter.set_result(None)
                return
        self._free += 1


# --- many waiters on one machine -----------------------------------------------------------


def _raw_page(response: _wire.Response) -> tuple[list[Any], str | None, _wire.Response]:
    # the items undecoded, and the response to structure the few a waiter takes from
    items, cursor = _wire.raw_page(response)
    return items, cursor, response


class _Look:
    """One waiter's standing request to its machine's refresher."""

    __slots__ = (
        "deadline",
        "due",
        "early_by",
        "event",
        "execution_id",
        "late_by",
        "not_before",
        "refresher",
        "seen",
        "snapshot",
    )

    def __init__(self, refresher: _Refresher, execution_id: str, deadline: float | None) -> None:
        self.refresher = refresher
        self.execution_id = execution_id
        self.deadline = deadline
        # the latest hint a page gave for this execution, as a moment: a GET of its own
        # never goes out before it, even when the waiter's schedule is older than the page
        self.not_before = 0.0
        # a terminal snapshot a page showed while the waiter was not asking for a look
        self.seen: Execution | None = None
        self.due: float | None = None  # None: not waiting for a look right now
        self.early_by = 0.0
        self.late_by = 0.0  # how long past ``due`` a sweep may come for it
        # resolved by the sweep that serves the look: a bare future, not an anyio.Event
        # (its Event wraps an asyncio.Event, its deque and a future of its own, per look)
        self.event: asyncio.Future[None] | None = None
        self.snapshot: Execution | None = None

    async def pause(self, decision: Sleep) -> Execution | None:
        """:meth:`WaitLoop.wait`'s pause for this waiter: a snapshot a sweep read for it,
        or ``None`` to GET for itself. (A method, not a closure per wait: a fan-out of
        thousands allocates far fewer objects, and the cyclic GC walks far fewer.)"""
        if self.seen is not None:
            return self.seen  # a page showed it finished while we were busy
        refresher = self.refresher
        clock = refresher.requester.clock
        if refresher.engaged:
            # only a schedule of our own choosing may be served early; the deadline
            # and expires_at are moments to look at exactly
            seconds = decision.seconds
            if decision.reason in ("hint", "backoff"):
                event = refresher.ask(
                    self, seconds, _EARLY_FRACTION, min(seconds * _LATE_FRACTION, _LATE_MAX)
                )
            else:
                event = refresher.ask(self, seconds, 0.0, 0.0)
            try:
                await event
            finally:
                self.due = None
                self.event = None
            if self.snapshot is not None:
                return self.snapshot
        else:
            await clock.sleep(decision.seconds)
        # No page served us: GET for ourselves, but not before the latest hint a page
        # gave for this execution (nor past the deadline). Pages being read right now
        # may show it: we wait for them rather than send a GET alongside.
        deadline = self.deadline
        while True:
            await refresher.sweep_finished(self._grace(clock.monotonic()))
            if self.seen is not None:
                return self.seen
            now = clock.monotonic()
            until = self.not_before if deadline is None else min(self.not_before, deadline)
            if until <= now:
                return None
            await clock.sleep(until - now)

    def _grace(self, now: float) -> float:
        # how long a page being read may keep us from our own GET: as long as a GET of
        # our own could take, and never past the deadline
        limit = self.refresher.requester.request_timeout
        deadline = self.deadline
        return limit if deadline is None else max(0.0, min(limit, deadline - now))


class _Refresher:
    """Reads the executions of one machine a page at a time for the waiters on it.

    Each waiter asks for a look at a moment of its own choosing (:meth:`ask`). When the
    earliest moment comes (a little after it for a schedule of the waiter's own: see
    ``_LATE_FRACTION``), one *sweep* reads pages of ``list_executions`` and serves every
    waiter that is due (or nearly: see ``_EARLY_FRACTION``), plus every waiter whose
    execution the page shows terminal, whenever it was due. A due waiter the sweep cannot
    serve (too few due, not on the pages read, the list failed) is told to GET for itself,
    and one that was only nearly due keeps waiting for its own moment: a waiter never
    polls more often than it would alone. What a page shows of a waiter it does not serve
    is kept for it (:meth:`_note`): a finish, handed over at its next pause instead of a
    GET, or a hint, before which its own GET never goes out. A waiter about to GET while
    a page is being read waits for the sweep to end first: the page is as good as the GET
    it would send, and a GET sent alongside could reach the server after the page and
    before the hint the page carries.

    Pages are read from where the oldest waited-on execution was found last time (the
    API lists oldest first, so the rest of a long history is skipped), wrapping around to
    the first page when the wanted ones were not found before the end (a newest-first
    server). What a sweep reads is what its due waiters need, and no more:

    * it stops once fewer than ``_PAGE_WORTH`` due waiters are still to be found (one GET
      each is cheaper than another page), and at most one page per two due waiters;
    * it stops (or goes round to the first page, once) when a page shows none of the
      machine's waiters after earlier pages did: it has passed them, and what lies further
      is finished executions, among which a waiter still missing (an old one deep in a
      newest-first list) is cheaper to GET than the pages down to it;
    * where the waiters were found last time, a page asks for ``_PAGE_PER_WAITER`` items
      per waiter on the machine (the finished ones around them are only skipped);
    * items are looked at through their raw ``execution_id``, ``status`` and
      ``retry_after_ms``: only an item a waiter takes (or a finish kept for one) is
      structured into an :class:`Execution`.

    The next sweep reads on from where the last one stopped if it found none of its own;
    when sweeps stop saving requests (or the server refuses the list) the machine's
    waiters go back to their own GETs.
    """

    def __init__(self, waits: WaitLoop, machine_id: str, tg: TaskGroup, policy: PollPolicy) -> None:
        self.requester = waits.requester
        self.policy = policy  # the fan-out's: how far a page's hint may push a look
        self.machine_id = machine_id
        self._tg = tg
        self._path = _wire.executions_path(_wire.check_id("machine_id", machine_id))
        self._looks: dict[str, _Look] = {}
        # created inside the fan-out's running loop, like everything of a fan-out
        self._event_loop = asyncio.get_running_loop()
        self._running = False
        self._sweeping: anyio.Event | None = None  # set when the sweep in progress ends
        self._wake: asyncio.Future[None] | None = None  # resolved to wake the idle loop
        self._nap: anyio.CancelScope | None = None
        self._nap_until = math.inf
        self._start_cursor: str | None = None
        self._start_known = False  # whether the last sweep found waiters from there on
        self._ledger: deque[tuple[int, int]] = deque(maxlen=_LEDGER_SWEEPS)
        self.disabled = False
        #: the context its loop task starts in (the fan-out's span, with OpenTelemetry)
        self.context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        # telemetry
        self.pages = 0
        self.served = 0
        self.fallbacks = 0
        self.sweeps = 0

    @property
    def engaged(self) -> bool:
        """Whether waiters should ask for looks (enough of them, and sweeps pay off)."""
        return not self.disabled and len(self._looks) >= BATCH_MIN_WAITERS

    def register(self, execution_id: str, deadline: float | None) -> _Look:
        look = _Look(self, execution_id, deadline)
        self._looks[execution_id] = look
        if not self._running:
            self._running = True
            with self.context():
                self._tg.start_soon(self._loop)
        return look

    def unregister(self, look: _Look) -> None:
        self._looks.pop(look.execution_id, None)
        look.due = None
        self._wake_loop()  # the loop ends once nobody is left

    def _wake_loop(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def ask(self, look: _Look, seconds: float, early: float, late: float) -> asyncio.Future[None]:
        """Ask for a look: the future a sweep resolves at least ``seconds`` (less ``early``
        of it) from now, or sooner with a terminal snapshot, leaving ``look.snapshot``:
        ``None`` when no sweep could serve (GET it yourself now). The waiter awaits it
        and then clears ``look.due`` and ``look.event``, whatever happened (a plain
        method and a future, not a coroutine: one object less per look)."""
        now = self.requester.clock.monotonic()
        look.due = now + seconds
        look.early_by = seconds * early
        look.late_by = late
        look.snapshot = None
        event = look.event = self._event_loop.create_future()
        if look.due + late < self._nap_until and self._nap is not None:
            self._nap.cancel()  # the loop is sleeping past this waiter's moment
        self._wake_loop()
        return event

    async def sweep_finished(self, grace: float) -> None:
        """Wait until the sweep in progress (if any) ends, for at most ``grace`` seconds
        (real seconds: this waits for network I/O, not for anyone's schedule)."""
        sweeping = self._sweeping
        if sweeping is not None:
            with anyio.move_on_after(grace):
                await sweeping.wait()

    def _serve(self, look: _Look, snapshot: Execution | None) -> None:
        look.snapshot = snapshot
        look.due = None
        event = look.event
        if event is not None and not event.done():
            event.set_result(None)
        if snapshot is None:
            self.fallbacks += 1
        else:
            self.served += 1

    async def _loop(self) -> None:
        clock = self.requester.clock
        try:
            while self._looks:
                waiting = [look for look in self._looks.values() if look.due is not None]
                if not waiting:
                    wake = self._wake = self._event_loop.create_future()
                    try:
                        await wake
                    finally:
                        self._wake = None
                    continue
                # A sweep happens when a waiter is due, never earlier, and then serves
                # everyone at least part-way through their sleep (see _EARLY_FRACTION):
                # waiters served together stay in step, so the next sweep serves them
                # together again.
                first = min(look.due + look.late_by for look in waiting if look.due is not None)
                now = clock.monotonic()
                if first > now:
                    with anyio.CancelScope() as nap:
                        self._nap, self._nap_until = nap, first
                        await clock.sleep(first - now)
                    self._nap, self._nap_until = None, math.inf
                    continue
                self._sweeping = anyio.Event()
                try:
                    await self._sweep(waiting)
                finally:
                    self._sweeping.set()
                    self._sweeping = None
        finally:
            self._running = False
            self._wake = None
            # a waiter still parked here (the loop was cancelled) must not hang: serve None
            for look in list(self._looks.values()):
                if look.due is not None:
                    self._serve(look, None)

    async def _sweep(self, waiting: list[_Look]) -> None:
        self.sweeps += 1
        now = self.requester.clock.monotonic()
        due = {
            look.execution_id: look
            for look in waiting
            if look.due is not None and look.due - look.early_by <= now
        }
        if self.disabled or len(due) < _PAGE_WORTH or len(self._looks) < BATCH_MIN_WAITERS:
            # one GET each is as cheap as a page, and fresher
            for look in due.values():
                self._release(look, now)
            return
        deadlines = [look.deadline for look in due.values() if look.deadline is not None]
        deadline = min(deadlines) if deadlines else None
        max_pages = max(1, len(due) // 2)
        pages = 0
        missing = set(due)
        served = 0
        looks = self._looks
        # where the oldest waited-on execution sits: pages read after going round to the
        # first page come before the ones read earlier in the list
        first: dict[bool, str | None] = {}
        start = cursor = self._start_cursor
        wrapped = start is None
        went_round = False
        # whether a page read since this sweep began (or went round) showed a waiter
        found = False
        try:
            # A page costs more than a GET: it is read for two missing waiters or more
            while len(missing) >= _PAGE_WORTH and pages < max_pages:
                # searching, a whole page; where ours are, about as many as there are
                limit = _PAGE_SIZE
                if found or (cursor == start and self._start_known):
                    limit = min(_PAGE_SIZE, max(_PAGE_MIN, _PAGE_PER_WAITER * len(looks)))
                request = _wire.page_request(self._path, limit=limit, cursor=cursor)
                items, next_cursor, response = await self.requester.send(
                    request, _raw_page, deadline=deadline
                )
                pages += 1
                self.pages += 1
                ours = False
                for item in items:
                    # Only what a waiter takes is structured: the rest of the page is
                    # looked at through its id, never decoded into an Execution.
                    if type(item) is not dict:
                        continue
                    execution_id = item.get("execution_id")
                    waiter = looks.get(execution_id) if type(execution_id) is str else None
                    if waiter is None:
                        continue
                    ours = True
                    first.setdefault(wrapped and start is not None, cursor)
                    terminal = item.get("status") in TERMINAL_STATUSES
                    if waiter.due is None or (execution_id not in missing and not terminal):
                        # busy (its own GET, or between looks), or not due yet with
                        # nothing it needs to know early: keep what the page says
                        self._note(waiter, item, terminal, response)
                        continue
                    missing.discard(execution_id)
                    self._serve(waiter, _wire.structure_item(item, Execution, response))
                    served += 1
                if next_cursor is None or (not items and next_cursor == cursor):
                    if wrapped:
                        went_round = True
                        break
                    wrapped, next_cursor, found = True, None, False  # go round to the first page
                elif found and not ours:
                    # Past the waited-on executions: what lies further down are finished
                    # ones, and a waiter still missing sits deep among them, where its own
                    # GET costs less than the pages down to it.
                    if wrapped:
                        break
                    wrapped, next_cursor, found = True, None, False
                else:
                    found = found or ours
                if wrapped and next_cursor == start and start is not None:
                    went_round = True
                    break  # came round to where this sweep began
                cursor = next_cursor
        except (DedalusError, DeadlineReached) as exc:
            # a failed list must not fail the waits: they GET for themselves this time
            # (and each meets its own deadline, or error, doing so)
            logger.debug("listing executions of %s failed: %s", self.machine_id, exc)
            self._start_cursor, self._start_known = None, False
            if isinstance(exc, APIStatusError) and exc.status in _LIST_REFUSED:
                self._disable("the server refuses to list them")  # asking again won't help
            else:
                self._account(pages + 1, served)
        else:
            self._start_known = bool(first)
            if first:
                self._start_cursor = first.get(True, first.get(False))
            elif not went_round and pages >= max_pages:
                # Stopped by the page limit before finding any of ours (a long history):
                # the next sweep reads on from here instead of re-reading the same pages.
                self._start_cursor = cursor
            self._account(pages, served)
        for execution_id in missing:
            self._release(due[execution_id], now)

    def _note(
        self, look: _Look, item: dict[str, Any], terminal: bool, response: _wire.Response
    ) -> None:
        """What a page showed of a waiter it does not serve: a finish to hand over at its
        next pause, or a hint its own GET must respect (read from the raw item)."""
        if terminal:
            look.seen = _wire.structure_item(item, Execution, response)
            return
        hint = item.get("retry_after_ms")
        if type(hint) is int and hint > 0:
            hinted = self.requester.clock.monotonic() + min(hint / 1000, self.policy.hint_ceiling)
            look.not_before = max(look.not_before, hinted)

    def _release(self, look: _Look, now: float) -> None:
        """A look no page served: GET for yourself, but not before your own moment."""
        if look.due is None:
            return
        if look.due <= now:
            self._serve(look, None)
        else:
            # It was only early enough to share a page. Were it sent off to GET now, it
            # would poll more often than on its own: it waits for its moment instead
            # (a later sweep may still serve it).
            look.early_by = 0.0

    def _account(self, pages: int, served: int) -> None:
        # Judged over several sweeps, not one: the first few may be spent finding where
        # the waited-on executions are in a long list.
        self._ledger.append((pages, served))
        if len(self._ledger) == self._ledger.maxlen:
            spent = sum(p for p, _ in self._ledger)
            saved = sum(s for _, s in self._ledger)
            if saved <= spent:
                self._disable(f"{spent} pages served only {saved} looks")

    def _disable(self, why: str) -> None:
        if not self.disabled:
            self.disabled = True
            logger.debug("polling %s's executions one by one: %s", self.machine_id, why)


# --- the two entry points ------------------------------------------------------------------


async def run_many(
    client: Client,
    waits: WaitLoop,
    requests: Iterable[ExecutionRequest],
    *,
    concurrency: int,
    create_concurrency: int,
    return_exceptions: bool,
    fail_fast: bool,
    cancel_remote: bool,
    on_progress: Callable[[Progress], object] | None,
    check: bool,
    poll: PollPolicy | None,
    batch_refresh: bool,
    wake: Callable[[str], Awaitable[object]] | None = None,
    journal: object = None,
    retry_execution: RetryExecution | None = None,
) -> list[ExecutionResult] | list[ExecutionResult | BaseException]:
    """See :meth:`Session.run_many`; ``wake`` makes one machine ready (``wake_machines``)."""
    if fail_fast and return_exceptions:
        raise ValueError(
            "fail_fast=True raises at the first failure, return_exceptions=True returns "
            "every failure in place: choose one"
        )
    plan = _plan(
        client,
        waits,
        requests,
        concurrency=concurrency,
        create_concurrency=create_concurrency,
        cancel_remote=cancel_remote,
        check=check,
        batch_refresh=batch_refresh,
        on_progress=on_progress,
        poll=poll,
        journal=journal,
        retry_execution=retry_execution,
    )
    total = len(plan.requests)
    if not total:
        return []
    if wake is not None:
        await wake_machines(wake, plan.requests, limit=create_concurrency)  # checked by _plan
    outcomes: list[ExecutionResult | BaseException | None] = [None] * total

    def deliver(index: int, outcome: ExecutionResult | Exception) -> None:
        outcomes[index] = outcome

    engine = _FanOut(client, waits, plan, deliver, fail_fast=fail_fast, name="dedalus.run_many")
    try:
        await engine.run()
    except ExceptionGroup as group:
        if fail_fast:
            raise ExceptionGroup(
                f"run_many stopped at the first failure ({total} requests)", group.exceptions
            ) from None
        raise
    logger.debug("run_many of %d finished: %s", total, engine.stats())
    results: list[ExecutionResult | BaseException] = []
    errors: list[Exception] = []
    for outcome in outcomes:
        assert outcome is not None  # every worker delivered before the task group ended
        results.append(outcome)
        if isinstance(outcome, Exception):
            errors.append(outcome)
    if errors and not return_exceptions:
        raise ExceptionGroup(f"{len(errors)} of {total} executions failed", errors)
    return results


async def wake_machines(
    wake: Callable[[str], Awaitable[object]], requests: Sequence[ExecutionRequest], *, limit: int
) -> None:
    """The step before a fan-out with ``wake_machines=True``: each distinct machine once,
    ``limit`` at a time, until all are running. A machine that cannot be made to run
    raises (in an :class:`ExceptionGroup`) before any execution is created."""
    machine_ids = list(dict.fromkeys(request.machine_id for request in requests))
    limiter = anyio.CapacityLimiter(limit)

    async def one(machine_id: str) -> None:
        async with limiter:
            await wake(machine_id)

    async with anyio.create_task_group() as group:
        for machine_id in machine_ids:
            group.start_soon(one, machine_id)
    logger.debug("woke %d machines before the fan-out", len(machine_ids))


class _Completions:
    """The async iterator of :func:`as_completed`."""

    def __init__(
        self, receive: MemoryObjectReceiveStream[Completed], return_exceptions: bool
    ) -> None:
        self._receive = receive
        self._return_exceptions = return_exceptions

    def __aiter__(self) -> _Completions:
        return self

    async def __anext__(self) -> Completed:
        try:
            item = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None
        if not self._return_exceptions and isinstance(item.outcome, BaseException):
            raise item.outcome
        return item


def as_completed(
    client: Client,
    waits: WaitLoop,
    requests: Iterable[ExecutionRequest],
    *,
    concurrency: int,
    create_concurrency: int,
    return_exceptions: bool,
    cancel_remote: bool,
    on_progress: Callable[[Progress], object] | None,
    check: bool,
    poll: PollPolicy | None,
    batch_refresh: bool,
    journal: object = None,
    retry_execution: RetryExecution | None = None,
) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Completed]]:
    """See :meth:`Session.as_completed`; validates everything before returning."""
    plan = _plan(
        client,
        waits,
        requests,
        concurrency=concurrency,
        create_concurrency=create_concurrency,
        cancel_remote=cancel_remote,
        check=check,
        batch_refresh=batch_refresh,
        on_progress=on_progress,
        poll=poll,
        journal=journal,
        retry_execution=retry_execution,
    )
    return _as_completed(client, waits, plan, return_exceptions)


@contextlib.asynccontextmanager
async def _as_completed(
    client: Client, waits: WaitLoop, plan: _Plan, return_exceptions: bool
) -> AsyncIterator[AsyncIterator[Completed]]:
    send: MemoryObjectSendStream[Completed]
    receive: MemoryObjectReceiveStream[Completed]
    # unbounded: each item is one finished result, which run_many would hold anyway, and a
    # slow reader must not hold up the executions still running
    send, receive = anyio.create_memory_object_stream[Completed](math.inf)

    def deliver(index: int, outcome: ExecutionResult | Exception) -> None:
        send.send_nowait(Completed(index=index, request=plan.requests[index], outcome=outcome))

    engine = _FanOut(client, waits, plan, deliver, fail_fast=False, name="dedalus.as_completed")

    async def produce() -> None:
        try:
            await engine.run()
        finally:
            send.close()  # the reader's loop ends after the last item

    raised: Exception | None = None
    with send, receive:
        # a journal that cannot be used fails the `async with`, not the first item
        await engine.open_journal()
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            try:
                yield _Completions(receive, return_exceptions)
            except Exception as exc:
                # The block's own exception (a failure raised by the loop included) is
                # re-raised as it is once the task group is done; raised in here, the
                # task group would wrap it in an ExceptionGroup.
                raised = exc
            finally:
                # Leaving the block, early or not: stop whatever still runs. The task
                # group waits for the workers' cleanup (remote cancels included).
                tg.cancel_scope.cancel()
    if raised is not None:
        raise raised
