"""One execution as this process knows it: :class:`ExecutionHandle` and :class:`EventStream`.

A handle is what ``create_execution`` returns and what ``wait()``, ``watch()``,
``events()`` hang off. It talks to the API only through the public calls of its
:class:`Client` (a Session) and waits through the :class:`~dedalus_async._waiting.WaitLoop`;
it holds no state of its own beyond the latest snapshot and the last wait's statistics.
:func:`read_result` ends a run: fetch the output (unless there is none), build the
:class:`~dedalus_async.ExecutionResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Generator, Sequence
from typing import Any, Protocol

import anyio

from . import _wire
from ._errors import DedalusError, ExecutionFailed
from ._models import Execution, ExecutionEvent, ExecutionOutput, ExecutionRef
from ._policy import (
    USE_POLICY_DEFAULT,
    Done,
    GiveUp,
    PollPolicy,
    PollState,
    UsePolicyDefault,
    next_poll,
    resolve_timeout,
)
from ._results import ExecutionResult, WaitStats, may_have_output
from ._waiting import WaitLoop, changed_from, is_terminal

__all__ = ["Client", "EventStream", "ExecutionHandle", "create_seen_through", "read_result"]


class Client(Protocol):
    """The calls a handle makes (a :class:`~dedalus_async.Session` provides them)."""

    async def get_execution(self, machine_id: str, execution_id: str) -> Execution: ...

    async def get_output(self, machine_id: str, execution_id: str) -> ExecutionOutput: ...

    async def delete_execution(self, machine_id: str, execution_id: str) -> Execution: ...


class ExecutionHandle:
    """One execution, as this process knows it.

    ``last`` is the latest snapshot seen (from the create, a refresh or a wait);
    ``idempotency_key`` is set when this process created it; ``stats`` describes the most
    recent wait. ``await handle`` is ``await handle.wait()``.
    """

    __slots__ = (
        "_client",
        "_loop",
        "execution_id",
        "idempotency_key",
        "last",
        "machine_id",
        "stats",
    )

    def __init__(
        self,
        client: Client,
        loop: WaitLoop,
        machine_id: str,
        execution_id: str,
        *,
        idempotency_key: str | None = None,
    ) -> None:
        self._client = client
        self._loop = loop
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
        self.last = await self._client.get_execution(self.machine_id, self.execution_id)
        return self.last

    async def output(self) -> ExecutionOutput:
        """Fetch the captured stdout and stderr."""
        return await self._client.get_output(self.machine_id, self.execution_id)

    async def cancel(self) -> Execution:
        """Stop the execution if it is still going; return what the server reports.

        A finished execution is left alone: on the API a DELETE of a finished execution
        deletes it, output included, so this first looks (a GET) and sends the DELETE only
        when the status is not terminal. (An execution finishing between the two requests
        is still deleted; to delete one on purpose, use :meth:`Session.delete_execution`.)
        """
        current = await self.refresh()
        if current.is_terminal:
            return current
        self.last = await self._client.delete_execution(self.machine_id, self.execution_id)
        return self.last

    def events(
        self, *, cursor: str | None = None, follow: bool = False, limit: int | None = None
    ) -> EventStream:
        """The event log; see :meth:`Session.iter_events`."""
        return EventStream(self, self._loop, cursor, follow, limit=limit)

    async def wait(
        self,
        *,
        timeout: float | UsePolicyDefault | None = USE_POLICY_DEFAULT,
        until: Collection[str] | None = None,
        cancel_remote: bool = False,
        poll: PollPolicy | None = None,
    ) -> Execution:
        """Poll until the execution is terminal (or its status is in ``until``).

        A terminal status also ends a wait ``until`` another status: once the execution
        has finished, the status waited for can no longer come, so the terminal snapshot
        is returned (check its ``status``).

        Paced by the server's ``retry_after_ms`` (read afresh on every response), never
        sleeping past ``expires_at`` or the deadline. ``timeout`` (seconds) defaults to the
        poll policy's; ``None`` waits forever. On the deadline: :class:`WaitTimeout`, and
        the remote execution keeps running unless ``cancel_remote=True``, which also
        deletes it when this wait is cancelled.
        """
        loop = self._loop
        policy = poll or loop.poll
        seconds = resolve_timeout(timeout, policy)
        if until is None:
            done_when: Callable[[Execution], bool] = is_terminal
        else:
            wanted = _check_until(until)
            done_when = lambda snapshot: snapshot.status in wanted or snapshot.is_terminal  # noqa: E731
        return await loop.wait(
            self,
            timeout=seconds,
            deadline=loop.deadline(seconds),
            done_when=done_when,
            cancel_remote=cancel_remote,
            policy=policy,
        )

    def __await__(self) -> Generator[Any, None, Execution]:
        return self.wait().__await__()

    async def watch(
        self,
        *,
        timeout: float | UsePolicyDefault | None = USE_POLICY_DEFAULT,
        poll: PollPolicy | None = None,
    ) -> AsyncIterator[Execution]:
        """Yield a snapshot each time the status changes (the first one too); end after a
        terminal one. Same pacing and deadline as :meth:`wait` (one deadline for it all)."""
        loop = self._loop
        policy = poll or loop.poll
        seconds = resolve_timeout(timeout, policy)
        deadline = loop.deadline(seconds)
        snapshot = self.last
        if snapshot is not None:
            yield snapshot
        while snapshot is None or not snapshot.is_terminal:
            snapshot = await loop.wait(
                self,
                timeout=seconds,
                deadline=deadline,
                done_when=changed_from(None if snapshot is None else snapshot.status),
                cancel_remote=False,
                policy=policy,
            )
            yield snapshot


def _check_until(until: Collection[str]) -> frozenset[str]:
    if isinstance(until, str):
        raise TypeError(f"until must be a collection of statuses, e.g. {{{until!r}}}")
    if not isinstance(until, Collection):
        raise TypeError(f"until must be a collection of statuses, not {type(until).__name__}")
    statuses = frozenset(until)
    if not statuses or not all(isinstance(s, str) for s in statuses):
        raise ValueError("until must be a non-empty collection of status strings")
    return statuses


async def create_seen_through(
    create: Coroutine[Any, Any, ExecutionHandle], loop: WaitLoop
) -> ExecutionHandle:
    """Await a create that must not be abandoned half-way; on cancellation, delete its work.

    The create runs in a task of its own. If the caller is cancelled while it is in flight
    (``task.cancel()``, ``asyncio.timeout``, a cancel scope: an anyio shield alone does not
    stop asyncio's own cancellation), the create is still awaited, for at most the
    Session's ``request_timeout``, and the execution it made is deleted (time-boxed the
    same way); then the cancellation goes on. Without this the server would run an
    execution nobody knows the ID of.
    """
    task = asyncio.ensure_future(create)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True):
            budget = loop.requester.request_timeout
            with anyio.move_on_after(budget), contextlib.suppress(DedalusError):
                await asyncio.shield(task)
            if task.done() and not task.cancelled() and task.exception() is None:
                await loop.cancel_remote(task.result())
            else:
                task.cancel()  # too late to learn its ID: stop trying
        raise


async def run_to_end(
    machine_id: str,
    create: Coroutine[Any, Any, ExecutionHandle],
    loop: WaitLoop,
    *,
    timeout: float | UsePolicyDefault | None,
    cancel_remote: bool,
    poll: PollPolicy | None,
    check: bool,
) -> ExecutionResult:
    """``Session.run`` once its arguments are checked: create, wait, read the result (in
    an execution span, with OpenTelemetry)."""
    telemetry = loop.requester.telemetry
    if telemetry is None:
        # with cancel_remote, a cancel that arrives during the create still reaches the
        # server: the create is seen through (time-boxed) and what it made is deleted
        handle = await (create_seen_through(create, loop) if cancel_remote else create)
        execution = await handle.wait(timeout=timeout, cancel_remote=cancel_remote, poll=poll)
        return await read_result(handle, execution, check=check)
    with telemetry.execution_span(machine_id) as note:
        handle = await (create_seen_through(create, loop) if cancel_remote else create)
        if handle.last is not None:
            note(handle.last)
        execution = await handle.wait(timeout=timeout, cancel_remote=cancel_remote, poll=poll)
        note(execution)
        return await read_result(handle, execution, check=check)


async def read_result(
    handle: ExecutionHandle, execution: Execution, *, check: bool
) -> ExecutionResult:
    """The end of a run: fetch the output, build the result, raise only if asked.

    The output is read as patiently as the wait polled (by time, not by a count of tries):
    an execution that succeeded is not reported failed over a short server blip.
    """
    output = None
    if may_have_output(execution):
        request = _wire.execution_request("GET", handle.machine_id, handle.execution_id, "/output")
        output = await handle._loop.send_patiently(request, _wire.decode_output)
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


class EventStream:
    """An async iterator over an execution's events; :attr:`cursor` resumes it.

    ``cursor`` is where the next page starts: store it and pass it back to
    :meth:`ExecutionHandle.events` to resume. Delivery across a resume is at least once
    (a page is re-read if it was only partly consumed): deduplicate by ``sequence``.
    """

    def __init__(
        self,
        handle: ExecutionHandle,
        loop: WaitLoop,
        cursor: str | None,
        follow: bool,
        *,
        limit: int | None = None,
    ) -> None:
        if cursor is not None and not isinstance(cursor, str):
            raise TypeError(f"cursor must be a str or None, not {type(cursor).__name__}")
        self._limit = _wire.check_limit(limit)
        self._handle = handle
        self._loop = loop
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
        with self._loop.requester.guard():  # closing the Session ends the stream at once
            await self._fetch_page()

    async def _fetch_page(self) -> None:
        requester = self._loop.requester
        request = _wire.page_request(self._path, limit=self._limit, cursor=self._next)
        items: Sequence[ExecutionEvent]
        if self._follow:  # as patient as a wait: a blip must not end a followed stream
            items, next_cursor = await self._loop.send_patiently(request, _wire.decode_events)
        else:
            items, next_cursor = await requester.send(request, _wire.decode_events)
        # Deliver each sequence once: a resumed cursor may replay part of a page already
        # delivered, and a page may repeat an entry of its own.
        seen = self._last_sequence
        fresh: list[ExecutionEvent] = []
        for event in items:
            if seen is None or event.sequence > seen:
                fresh.append(event)
                seen = event.sequence
        items = fresh
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
                self._loop.poll,
                self._state,
                done=False,
                retry_after_ms=snapshot.retry_after_ms,
                expires_in=None,
                remaining=None,
                rand=requester.random(),
            )
            if not isinstance(decision, Done | GiveUp):
                await requester.clock.sleep(decision.seconds)
