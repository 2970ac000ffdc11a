"""The executions API, one method per endpoint: what a Session can ask the server.

Each method checks its arguments (before anything is sent), builds the request with
:mod:`~dedalus_async._wire`, sends it through the
:class:`~dedalus_async._requester.Requester` and decodes the answer into a model. Every
mutating request carries an Idempotency-Key, a fresh one unless the caller passes theirs.
:class:`~dedalus_async.Session` is this class plus configuration, lifecycle, ``run`` and
fan-out.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import _wire
from ._clock import Clock
from ._errors import DedalusError
from ._handle import EventStream, ExecutionHandle
from ._machines import MachineHandle
from ._models import (
    Execution,
    ExecutionOutput,
    ExecutionRef,
    LogReadToken,
    LogStatus,
    Machine,
    MachinePhase,
)
from ._policy import USE_POLICY_DEFAULT, PollPolicy, UsePolicyDefault, resolve_timeout
from ._requester import Requester
from ._waiting import WaitLoop

__all__ = ["ExecutionsAPI", "MachinesAPI"]

logger = logging.getLogger("dedalus_async")


class ExecutionsAPI:
    """The endpoints of ``/v1/machines/{machine_id}/executions``, over one requester."""

    clock: Clock
    _requester: Requester
    _waits: WaitLoop

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
        self._requester.check_open()
        try:
            execution = await self._requester.send(request, _wire.decode_execution)
        except DedalusError as exc:
            # the server may hold the execution already: the key is the way back to it
            exc.idempotency_key = key
            exc.add_note(
                f"the create was sent with Idempotency-Key {key}: create again with "
                f"idempotency_key={key!r} to get that execution, never a second one"
            )
            raise
        handle = ExecutionHandle(
            self, self._waits, execution.machine_id, execution.execution_id, idempotency_key=key
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
        return await self._requester.send(request, _wire.decode_execution)

    async def delete_execution(
        self, machine_id: str, execution_id: str, *, idempotency_key: str | None = None
    ) -> Execution:
        """Delete an execution; for one still running, this is how it is cancelled.

        Sent under an Idempotency-Key (a fresh one unless you pass your own), re-sent on
        every retry of this call.
        """
        key = _wire.check_idempotency_key(idempotency_key) or self.new_idempotency_key()
        request = _wire.execution_request("DELETE", machine_id, execution_id, idempotency_key=key)
        return await self._requester.send(request, _wire.decode_execution)

    async def get_output(self, machine_id: str, execution_id: str) -> ExecutionOutput:
        """Fetch an execution's captured stdout and stderr."""
        request = _wire.execution_request("GET", machine_id, execution_id, "/output")
        return await self._requester.send(request, _wire.decode_output)

    async def get_logs(self, machine_id: str, execution_id: str) -> LogStatus:
        """Where the capture and the publication of an execution's logs stand."""
        request = _wire.execution_request("GET", machine_id, execution_id, "/logs")
        return await self._requester.send(request, _wire.decode_log_status)

    async def create_log_token(
        self, machine_id: str, execution_id: str, *, idempotency_key: str | None = None
    ) -> LogReadToken:
        """A short-lived token to read the execution's log stream (``POST .../logs/token``)."""
        key = _wire.check_idempotency_key(idempotency_key) or self.new_idempotency_key()
        request = _wire.execution_request(
            "POST", machine_id, execution_id, "/logs/token", idempotency_key=key
        )
        return await self._requester.send(request, _wire.decode_log_token)

    async def reauthorize_logs(
        self, machine_id: str, execution_id: str, *, idempotency_key: str | None = None
    ) -> LogStatus:
        """Re-authorise publication of the execution's logs (``POST .../logs/reauthorize``)."""
        key = _wire.check_idempotency_key(idempotency_key) or self.new_idempotency_key()
        request = _wire.execution_request(
            "POST", machine_id, execution_id, "/logs/reauthorize", idempotency_key=key
        )
        return await self._requester.send(request, _wire.decode_log_status)

    async def list_executions(
        self, machine_id: str, *, limit: int | None = None
    ) -> AsyncIterator[Execution]:
        """Every execution of a machine, following all pages; ``limit`` is the page size."""
        path = _wire.executions_path(_wire.check_id("machine_id", machine_id))
        page_size = _wire.check_limit(limit)
        self._requester.check_open()
        cursor: str | None = None
        while True:
            request = _wire.page_request(path, limit=page_size, cursor=cursor)
            items, next_cursor = await self._requester.send(
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
        return self.execution(machine_id, execution_id).events(
            cursor=cursor, follow=follow, limit=limit
        )

    def execution(self, machine_id: str, execution_id: str) -> ExecutionHandle:
        """A handle on an existing execution (no request is sent)."""
        _wire.check_id("machine_id", machine_id)
        _wire.check_id("execution_id", execution_id)
        return ExecutionHandle(self, self._waits, machine_id, execution_id)

    def attach(self, ref: ExecutionRef | Mapping[str, Any]) -> ExecutionHandle:
        """A handle from a stored :class:`ExecutionRef` (or its dict), e.g. after a restart."""
        if not isinstance(ref, ExecutionRef):
            if not isinstance(ref, Mapping):
                raise TypeError(f"ref must be an ExecutionRef or a dict, not {type(ref).__name__}")
            ref = ExecutionRef.from_dict(ref)
        handle = self.execution(ref.machine_id, ref.execution_id)
        handle.idempotency_key = ref.idempotency_key
        return handle


class MachinesAPI:
    """The endpoints of ``/v1/machines``, over the same requester as the executions.

    Every mutating call (create, update, sleep, wake, delete) is sent under an
    Idempotency-Key, a fresh one unless you pass yours, re-sent on every retry of the
    call. No ``If-Match`` is sent: the official SDK (0.6.0) sends none, and the API no
    longer requires it.
    """

    _requester: Requester
    _waits: WaitLoop

    if TYPE_CHECKING:

        def new_idempotency_key(self) -> str: ...  # ExecutionsAPI's, in a Session

    async def create_machine(
        self,
        *,
        vcpu: float | None = None,
        memory_mib: int | None = None,
        storage_gib: int | None = None,
        autosleep: str | None = None,
        idempotency_key: str | None = None,
    ) -> MachineHandle:
        """Create a machine; return its handle (``await handle.wait()`` for ``running``).

        ``vcpu`` (e.g. ``1`` or ``0.5``), ``memory_mib`` and ``storage_gib``: the size,
        the server's defaults when left out. ``autosleep``: the idle window before it
        sleeps, as the API writes it (``"30s"``, ``"15m"``, ``"2h"``, ``"1w3d"``,
        ``"1800"`` or ``"never"``). Everything is checked before anything is sent. The
        server answers once the machine converged (HTTP 200) or at once while it is still
        on its way (202): the handle's ``last`` says which phase it is in.
        """
        key = _wire.check_idempotency_key(idempotency_key) or self.new_idempotency_key()
        request = _wire.machine_create_request(
            vcpu=vcpu,
            memory_mib=memory_mib,
            storage_gib=storage_gib,
            autosleep=autosleep,
            idempotency_key=key,
        )
        self._requester.check_open()
        try:
            machine = await self._requester.send(request, _wire.decode_machine)
        except DedalusError as exc:
            exc.idempotency_key = key
            exc.add_note(
                f"the create was sent with Idempotency-Key {key}: create again with "
                f"idempotency_key={key!r} to get that machine, never a second one"
            )
            raise
        handle = MachineHandle(self, self._waits, machine.machine_id)
        handle.last = machine
        logger.debug("created machine %s (phase %s)", machine.machine_id, machine.phase)
        return handle

    def machine(self, machine_id: str) -> MachineHandle:
        """A handle on an existing machine (no request is sent)."""
        _wire.check_id("machine_id", machine_id)
        return MachineHandle(self, self._waits, machine_id)

    async def get_machine(self, machine_id: str) -> Machine:
        """Fetch one machine (its lifecycle in ``status``)."""
        request = _wire.machine_request("GET", machine_id)
        return await self._requester.send(request, _wire.decode_machine)

    async def list_machines(self, *, limit: int | None = None) -> AsyncIterator[Machine]:
        """Every machine of the organisation, following all pages; ``limit`` is the page size."""
        page_size = _wire.check_limit(limit)
        self._requester.check_open()
        cursor: str | None = None
        while True:
            request = _wire.page_request(_wire.MACHINES_PATH, limit=page_size, cursor=cursor)
            items, next_cursor = await self._requester.send(request, _wire.decode_machine_page)
            for item in items:
                yield item
            # stop on the end marker, and on a server that repeats a cursor with nothing new
            if next_cursor is None or (not items and next_cursor == cursor):
                return
            cursor = next_cursor

    async def update_machine(
        self,
        machine_id: str,
        *,
        vcpu: float | None = None,
        memory_mib: int | None = None,
        storage_gib: int | None = None,
        autosleep: str | None = None,
        idempotency_key: str | None = None,
    ) -> Machine:
        """Change a machine's size or autosleep (only the fields given; at least one)."""
        key = _wire.check_idempotency_key(idempotency_key) or self.new_idempotency_key()
        request = _wire.machine_update_request(
            machine_id,
            vcpu=vcpu,
            memory_mib=memory_mib,
            storage_gib=storage_gib,
            autosleep=autosleep,
            idempotency_key=key,
        )
        return await self._requester.send(request, _wire.decode_machine)

    async def delete_machine(
        self, machine_id: str, *, idempotency_key: str | None = None
    ) -> Machine:
        """Destroy a machine; its storage is wiped. Its executions can no longer run."""
        return await self._lifecycle("DELETE", machine_id, "", idempotency_key)

    async def sleep_machine(
        self, machine_id: str, *, idempotency_key: str | None = None
    ) -> Machine:
        """Ask a machine to sleep (files under ``/home/machine`` persist)."""
        return await self._lifecycle("POST", machine_id, "/sleep", idempotency_key)

    async def wake_machine(self, machine_id: str, *, idempotency_key: str | None = None) -> Machine:
        """Ask a sleeping machine to wake; the answer is usually still on its way."""
        return await self._lifecycle("POST", machine_id, "/wake", idempotency_key)

    async def _lifecycle(
        self, method: str, machine_id: str, suffix: str, idempotency_key: str | None
    ) -> Machine:
        key = _wire.check_idempotency_key(idempotency_key) or self.new_idempotency_key()
        request = _wire.machine_request(method, machine_id, suffix, idempotency_key=key)
        return await self._requester.send(request, _wire.decode_machine)

    async def ensure_running(
        self,
        machine_id: str,
        *,
        timeout: float | UsePolicyDefault | None = USE_POLICY_DEFAULT,
        poll: PollPolicy | None = None,
    ) -> Machine:
        """Make sure a machine is running: wake it if it is (going) asleep, then wait until
        it is ``running``. Returns the running snapshot; raises like
        :meth:`MachineHandle.wait` (``MachineFailed`` for a machine that fails to wake).
        """
        handle = self.machine(machine_id)
        policy = poll or self._waits.poll
        seconds = resolve_timeout(timeout, policy)  # bad values fail before any request
        current = await handle.refresh()
        if current.phase == MachinePhase.RUNNING and current.desired_state in (
            None,
            MachinePhase.RUNNING,
        ):
            return current
        if current.desired_state == MachinePhase.SLEEPING or current.phase in (
            MachinePhase.SLEEPING,
            MachinePhase.STOPPING,
        ):
            await handle.wake()
        return await handle.wait("running", timeout=seconds, poll=policy)
