"""``machines create|get|list|wake|sleep|delete|wait``: the machine endpoints of the
Session, a line per machine (or ``--json``), on the configured server or with ``--local``
on the local backend's machines (a folder each, kept on disk across processes).
"""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

from dedalus_async._convert import unstructure
from dedalus_async._errors import MachineFailed, MachineStateError, MachineWaitTimeout
from dedalus_async._models import Machine
from dedalus_async._session import Session

from ._outcomes import EXIT_REMOTE_FAILED, EXIT_WAIT_TIMEOUT
from ._output import Context
from ._sessions import lookup_session

__all__ = ["machine_document", "machine_line", "machines"]


def machine_line(machine: Machine) -> str:
    """``MACHINE_ID PHASE [(desired STATE)] vcpu=N memory_mib=N storage_gib=N autosleep=...``
    (and ``last_error=...`` when the server said why it failed)."""
    parts = [machine.machine_id, machine.phase]
    desired = machine.desired_state
    if desired is not None and desired != machine.phase:
        parts.append(f"(desired {desired})")
    for name in ("vcpu", "memory_mib", "storage_gib"):
        value = getattr(machine, name)
        if value is not None:
            parts.append(f"{name}={value:g}" if name == "vcpu" else f"{name}={value}")
    seconds = machine.autosleep_seconds
    if seconds is not None:
        parts.append(f"autosleep={seconds}s" if seconds > 0 else "autosleep=never")
    error = machine.status.last_error if machine.status is not None else None
    if error:
        parts.append(f"last_error={json.dumps(error, ensure_ascii=False)}")
    return " ".join(parts) + "\n"


def machine_document(
    machine: Machine | None, *, error: BaseException | None = None, ok: bool | None = None
) -> dict[str, Any]:
    """``{"ok", "machine", "error"}``: one machine command's outcome for ``--json``."""
    return {
        "ok": (error is None and machine is not None) if ok is None else ok,
        "machine": None if machine is None else unstructure(machine),
        "error": None if error is None else {"type": type(error).__name__, "message": str(error)},
    }


def _show(ctx: Context, args: argparse.Namespace, machine: Machine) -> None:
    if args.json:
        ctx.write_json(machine_document(machine))
    else:
        ctx.stdout.write(machine_line(machine).encode())
        ctx.stdout.flush()


async def machines(args: argparse.Namespace, ctx: Context) -> int:
    """``machines``: one of its subcommands, on the configured server or ``--local``."""
    async with lookup_session(args, ctx) as session:
        verb = args.machines_command
        if verb == "list":
            async for machine in session.list_machines(limit=args.limit):
                if args.json:
                    ctx.write_model(machine)
                else:
                    ctx.stdout.write(machine_line(machine).encode())
            ctx.stdout.flush()
            return 0
        if verb == "wait":
            return await _wait(args, ctx, session)
        _show(ctx, args, await _one(args, session))
    return 0


async def _one(args: argparse.Namespace, session: Session) -> Machine:
    verb = args.machines_command
    if verb == "create":
        handle = await session.create_machine(
            vcpu=args.vcpu,
            memory_mib=args.memory_mib,
            storage_gib=args.storage_gib,
            autosleep=args.autosleep,
            idempotency_key=args.idempotency_key,
        )
        assert handle.last is not None  # a create answers with the machine
        return handle.last
    if verb == "get":
        return await session.get_machine(args.machine_id)
    key = args.idempotency_key
    if verb == "wake":
        return await session.wake_machine(args.machine_id, idempotency_key=key)
    if verb == "sleep":
        return await session.sleep_machine(args.machine_id, idempotency_key=key)
    assert verb == "delete", verb
    return await session.delete_machine(args.machine_id, idempotency_key=key)


async def _wait(args: argparse.Namespace, ctx: Context, session: Session) -> int:
    """``machines wait``: the machine once it is --until; 124 on --timeout, saying where it
    stood; 126 when it failed or can no longer get there."""
    handle = session.machine(args.machine_id)
    quoted = shlex.quote(args.machine_id)
    local = " --local" if args.local else ""
    try:
        machine = await handle.wait(args.until, timeout=args.timeout)
    except MachineWaitTimeout as exc:
        last = exc.last
        where = "was never seen" if last is None else f"was still {last.phase}"
        if last is not None and last.desired_state and last.desired_state != last.phase:
            where += f" (desired state {last.desired_state})"
        message = (
            f"machine {args.machine_id} {where} after --timeout {args.timeout:g} s of waiting "
            f"for {args.until}; to keep following it: dedalus-async machines wait{local} "
            f"{quoted} --until {args.until}"
        )
        return _ended(ctx, args, last, exc, message, EXIT_WAIT_TIMEOUT)
    except MachineFailed as exc:
        snapshot = exc.machine
        why = snapshot.status.last_error if snapshot.status is not None else None
        message = (
            f"machine {args.machine_id} failed while waiting for {args.until}"
            + (f": {why}" if why else "")
            + f"; delete it (dedalus-async machines delete{local} {quoted}) and create a new "
            "one, or wake it (dedalus-async machines wake) if the failure is retryable"
        )
        return _ended(ctx, args, snapshot, exc, message, EXIT_REMOTE_FAILED)
    except MachineStateError as exc:
        snapshot = exc.machine
        message = (
            f"machine {args.machine_id} is {snapshot.phase}: it will never be {args.until} "
            "(dedalus-async machines create makes a new one)"
        )
        return _ended(ctx, args, snapshot, exc, message, EXIT_REMOTE_FAILED)
    _show(ctx, args, machine)
    return 0


def _ended(
    ctx: Context,
    args: argparse.Namespace,
    machine: Machine | None,
    error: BaseException,
    message: str,
    code: int,
) -> int:
    """A wait that did not reach --until: the machine as last seen, and one error line."""
    if args.json:
        document = machine_document(machine, ok=False)
        document["error"] = {"type": type(error).__name__, "message": message}
        ctx.write_json(document)
    elif machine is not None:
        ctx.stdout.write(machine_line(machine).encode())
        ctx.stdout.flush()
    ctx.error(message)
    return code
