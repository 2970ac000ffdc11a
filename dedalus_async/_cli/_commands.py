"""What each subcommand does, built on the library's public calls.

``run`` creates an execution and follows its event log (or waits, with ``--json``);
``run-many`` hands a file of requests to :meth:`Session.as_completed`; ``get``,
``output``, ``events``, ``cancel`` and ``list`` print what the server answers;
``machines`` (:mod:`._machines`) creates, looks at, steers and waits for machines;
``serve-local`` runs a :class:`~dedalus_async.LocalBackend` until stopped. Each returns the
process exit code, or raises what :func:`dedalus_async._cli.main` turns into one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import signal
from collections.abc import Callable, Coroutine
from typing import IO, Any, Final

from dedalus_async._errors import BadRequestError, DedalusError, WaitTimeout
from dedalus_async._fanout import ExecutionRequest
from dedalus_async._journal import Journal
from dedalus_async._models import TERMINAL_STATUSES, Execution
from dedalus_async._results import may_have_output
from dedalus_async._session import ExecutionHandle, Session

from ._batch import batch, journal_for
from ._inputs import EventCursor, load_requests, read_stdin_file
from ._machines import machines
from ._outcomes import EXIT_SOME_FAILED, EXIT_WAIT_TIMEOUT, UsageError, describe_end, exit_code_for
from ._output import (
    Context,
    ProgressLine,
    completed_document,
    event_document,
    event_line,
    json_line,
    result_document,
)
from ._sessions import (
    DEFAULT_LOCAL_MACHINE,
    cancel_quietly,
    default_machine,
    lookup_session,
    session_for_runs,
)

__all__ = ["COMMANDS", "Command"]

#: A subcommand: parsed arguments and the context in, exit code out.
Command = Callable[[argparse.Namespace, Context], Coroutine[Any, Any, int]]


# --- run -------------------------------------------------------------------------------


def _command_of(args: argparse.Namespace) -> list[str]:
    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise UsageError("run needs a command: dedalus-async run [OPTIONS] -- CMD [ARG ...]")
    return argv


async def run(args: argparse.Namespace, ctx: Context) -> int:
    """``run``: one execution, its output streamed (or one JSON object), its exit code."""
    argv = _command_of(args)
    stdin = read_stdin_file(args.stdin_file)
    env = dict(args.env) if args.env else None
    machine = default_machine(args)
    if machine is None:
        raise UsageError("--machine-id is required (or set DEDALUS_MACHINE_ID)")
    async with session_for_runs(args, ctx) as (session, backend):
        handle: ExecutionHandle | None = None
        deadline: asyncio.Timeout | None = None
        shown = {"stdout": 0, "stderr": 0}
        try:
            handle = await session.create_execution(
                machine,
                argv,
                cwd=args.cwd,
                env=env,
                stdin=stdin,
                timeout_ms=args.timeout_ms,
                idempotency_key=args.idempotency_key,
            )
            async with asyncio.timeout(args.timeout) as deadline:
                if args.json:
                    execution = await handle.wait(timeout=None)
                else:
                    execution, shown = await _stream(handle, ctx)
        except TimeoutError:
            if deadline is None or not deadline.expired() or handle is None:
                raise
            return await _wait_timed_out(args, ctx, handle, backend is not None)
        except asyncio.CancelledError:
            if handle is not None:
                await _interrupted(args, ctx, handle, backend is not None)
            raise
        if args.json:
            ctx.write_json(await _finished_document(handle, execution))
        else:
            _report_end(ctx, execution, shown)
        return exit_code_for(execution)


async def _stream(handle: ExecutionHandle, ctx: Context) -> tuple[Execution, dict[str, int]]:
    """Print output events as they arrive; return the final execution and bytes shown."""
    shown = {"stdout": 0, "stderr": 0}
    async for event in handle.events(follow=True):
        if event.type not in shown or not event.chunk:
            continue
        data = event.chunk.encode("utf-8", "replace")
        shown[event.type] += len(data)
        if event.type == "stdout":
            ctx.stdout.write(data)
            ctx.stdout.flush()
        else:
            ctx.stderr.flush()  # keep our own notes and the command's stderr in order
            ctx.stderr_bytes.write(data)
            ctx.stderr_bytes.flush()
    last = handle.last
    if last is None or not last.is_terminal:
        last = await handle.wait(timeout=None)
    return last, shown


async def _finished_document(handle: ExecutionHandle, execution: Execution) -> dict[str, Any]:
    """``run --json``'s object: the execution and its output, fetched only if there is any."""
    stdout = stderr = ""
    if may_have_output(execution):
        output = await handle.output()
        stdout, stderr = output.stdout or "", output.stderr or ""
    return result_document(execution, stdout=stdout, stderr=stderr)


def _report_end(ctx: Context, execution: Execution, shown: dict[str, int]) -> None:
    """After streamed output: what the server cut, and how the execution ended."""
    for stream in ("stdout", "stderr"):
        if getattr(execution, f"{stream}_truncated"):
            total = getattr(execution, f"{stream}_bytes")
            ctx.note(
                f"{stream} was truncated by the server: the command wrote {total} bytes, "
                f"{shown[stream]} were kept"
            )
    ending = describe_end(execution)
    if ending is not None:
        ctx.note(ending)


async def _interrupted(
    args: argparse.Namespace, ctx: Context, handle: ExecutionHandle, local: bool
) -> None:
    """Ctrl-C or SIGTERM during a run: cancel it remotely, or say how to find it again."""
    if args.cancel_remote:
        await cancel_quietly(handle, ctx)
    elif local:
        where = f"{handle.machine_id} {handle.execution_id}"
        ctx.note(
            f"execution {handle.execution_id}: the local backend stops it on exit "
            f"(dedalus-async get --local {where} shows how it ended)"
        )
    else:
        where = f"{handle.machine_id} {handle.execution_id}"
        ctx.note(
            f"execution {handle.execution_id} keeps running (dedalus-async get {where}; "
            f"dedalus-async cancel {where} stops it)"
        )


async def _wait_timed_out(
    args: argparse.Namespace, ctx: Context, handle: ExecutionHandle, local: bool
) -> int:
    where = f"{handle.machine_id} {handle.execution_id}"
    message = f"execution {handle.execution_id} did not finish within {args.timeout:g} s"
    if args.cancel_remote:
        await cancel_quietly(handle, ctx)
    elif local:
        message += f"; the local backend stops it on exit (dedalus-async get --local {where})"
    else:
        message += f"; it keeps running (dedalus-async get {where})"
    if args.json:
        error = WaitTimeout(message, ref=handle.ref, last=handle.last, timeout=args.timeout)
        ctx.write_json(result_document(handle.last, error=error))
    ctx.error(message)
    return EXIT_WAIT_TIMEOUT


# --- run-many --------------------------------------------------------------------------


def _open_output(name: str) -> IO[bytes]:
    # opened before any execution starts, so a bad path costs nothing; opening a local
    # file is not worth a thread
    try:
        return open(name, "wb")  # the caller closes it
    except OSError as exc:
        raise UsageError(f"cannot write {name}: {exc.strerror}") from None


async def run_many(args: argparse.Namespace, ctx: Context) -> int:
    """``run-many``: every request of a file, one result line each, in input order."""
    requests = load_requests(args.file, default_machine(args), args.timeout)
    journal = journal_for(args)
    out = _open_output(args.output) if args.output else ctx.stdout
    try:
        async with session_for_runs(args, ctx) as (session, backend):
            progress = ProgressLine(ctx.stderr)
            try:
                return await _fan_out(args, session, requests, out, progress, journal)
            except asyncio.CancelledError:
                _many_interrupted(args, ctx, requests, progress, local=backend is not None)
                raise
    finally:
        if journal is not None:
            await journal.aclose()
        if out is not ctx.stdout:
            out.close()


async def _fan_out(
    args: argparse.Namespace,
    session: Session,
    requests: list[ExecutionRequest],
    out: IO[bytes],
    progress: ProgressLine,
    journal: Journal | None = None,
) -> int:
    """Session.as_completed does the work; lines are written in input order, each as soon
    as every earlier one is written."""
    pending: dict[int, dict[str, Any]] = {}
    written = 0
    try:
        async with session.as_completed(
            requests,
            concurrency=args.concurrency,
            return_exceptions=True,
            cancel_remote=args.cancel_remote,
            on_progress=progress,
            journal=journal,
        ) as completed:
            async for item in completed:
                pending[item.index] = completed_document(item)
                if not pending[item.index]["ok"]:
                    progress.not_ok += 1
                    progress()
                while written in pending:
                    out.write(json_line(pending.pop(written)))
                    written += 1
                out.flush()
    except asyncio.CancelledError:
        # what finished is written, out of order (each line has its "index")
        progress.written = set(range(written)) | set(pending)
        for index in sorted(pending):
            out.write(json_line(pending[index]))
        with contextlib.suppress(OSError):
            out.flush()
        raise
    finally:
        progress.close()
    return EXIT_SOME_FAILED if progress.not_ok else 0


def _many_interrupted(
    args: argparse.Namespace,
    ctx: Context,
    requests: list[ExecutionRequest],
    progress: ProgressLine,
    *,
    local: bool,
) -> None:
    """Ctrl-C during run-many: what was written, what keeps running, how to find it."""
    total = len(requests)
    where = f"to {args.output}" if args.output else "on stdout"
    message = f"run-many interrupted: {len(progress.written)} of {total} results written {where}"
    if progress.written != set(range(len(progress.written))):
        message += ' (the last ones out of order: each line has its input "index")'
    running = 0 if progress.last is None else progress.last.in_flight
    if running == 0:
        ctx.note(f"{message}; none was running")
    elif args.cancel_remote:
        ctx.note(f"{message}; --cancel-remote: cancelling the {running} still running")
    elif local:
        ctx.note(f"{message}; the local backend stops the {running} still running on exit")
    else:
        unfinished = set(range(total)) - progress.written
        machines = sorted({requests[i].machine_id for i in unfinished})
        lists = "; ".join(f"dedalus-async list {shlex.quote(m)}" for m in machines[:3])
        more = f" (and {len(machines) - 3} more machines)" if len(machines) > 3 else ""
        ctx.note(
            f"{message}; up to {running} executions keep running on the server, their "
            f"results not written: see them with {lists}{more}; stop one with "
            "dedalus-async cancel MACHINE_ID EXECUTION_ID"
        )


# --- lookups ---------------------------------------------------------------------------


async def get(args: argparse.Namespace, ctx: Context) -> int:
    """``get``: the execution as JSON."""
    async with lookup_session(args, ctx) as session:
        ctx.write_model(await session.get_execution(args.machine_id, args.execution_id))
    return 0


async def output(args: argparse.Namespace, ctx: Context) -> int:
    """``output``: its captured stdout and stderr as JSON."""
    async with lookup_session(args, ctx) as session:
        ctx.write_model(await session.get_output(args.machine_id, args.execution_id))
    return 0


async def cancel(args: argparse.Namespace, ctx: Context) -> int:
    """``cancel``: stop it unless it has finished (see ``ExecutionHandle.cancel``)."""
    async with lookup_session(args, ctx) as session:
        ctx.write_model(await session.execution(args.machine_id, args.execution_id).cancel())
    return 0


async def delete(args: argparse.Namespace, ctx: Context) -> int:
    """``delete``: DELETE it whatever its status, print what the server reports."""
    async with lookup_session(args, ctx) as session:
        ctx.write_model(await session.delete_execution(args.machine_id, args.execution_id))
    return 0


async def events(args: argparse.Namespace, ctx: Context) -> int:
    """``events``: its event log, a line per event (``--json``: JSON lines, each with its
    cursor); ``--follow``: until it ends. Interrupted, failed, or ended before the
    execution did, it says how to continue from the last cursor."""
    given: EventCursor | None = args.cursor
    last = given  # where a reader would continue: after the last event printed
    async with lookup_session(args, ctx) as session:
        stream = session.iter_events(
            args.machine_id,
            args.execution_id,
            cursor=None if given is None else given.server,
            follow=args.follow,
        )
        ended = False
        try:
            async for event in stream:
                if given is not None and given.after is not None and event.sequence <= given.after:
                    continue  # the page the server cursor marks, up to the event it names
                # the stream's cursor reads on at or before the next event: exact with the
                # sequence number
                last = EventCursor(event.sequence, stream.cursor)
                if args.json:
                    ctx.write_json(event_document(event, str(last)))
                else:
                    ctx.stdout.write(event_line(event).encode())
                    ctx.stdout.flush()
                ended = event.type == "lifecycle" and event.status in TERMINAL_STATUSES
        except asyncio.CancelledError:
            _continue_note(ctx, args, last, "interrupted: the execution keeps running")
            raise
        except BadRequestError as exc:
            if given is not None and exc.error_code == "INVALID_CURSOR":
                raise UsageError(
                    f"--cursor {str(given)!r} is not a cursor of this execution's events: "
                    "use one that `events` printed for it (SEQUENCE:SERVER_CURSOR: the "
                    '"cursor" of a line of `events --json`, or the --cursor of the command '
                    "it printed to continue)"
                ) from None
            if last is not given:
                _continue_note(ctx, args, last, "reading stopped")
            raise
        except DedalusError:
            if last is not given:  # events were printed: where they stopped matters
                _continue_note(ctx, args, last, "reading stopped")
            raise
    if not ended:
        _continue_note(ctx, args, last, "the execution has not ended")
    return 0


def _continue_note(
    ctx: Context, args: argparse.Namespace, cursor: EventCursor | None, why: str
) -> None:
    """The command that reads on after ``cursor`` (from the start when there is none)."""
    argv = ["dedalus-async", "events", "--follow", *(["--local"] if args.local else [])]
    argv += [args.machine_id, args.execution_id]
    if cursor is not None:
        argv += ["--cursor", str(cursor)]
    ctx.note(f"{why}; to read on: {shlex.join(argv)}")


async def list_executions(args: argparse.Namespace, ctx: Context) -> int:
    """``list``: a machine's executions as JSON lines, oldest first."""
    async with lookup_session(args, ctx) as session:
        async for execution in session.list_executions(args.machine_id, limit=args.limit):
            ctx.write_model(execution)
    return 0


# --- serve-local -----------------------------------------------------------------------


async def serve_local(args: argparse.Namespace, ctx: Context) -> int:
    """``serve-local``: the API on 127.0.0.1 until Ctrl-C or SIGTERM."""
    from dedalus_async._local import DEFAULT_OUTPUT_CAP, LocalBackend, current_user

    backend = LocalBackend(
        data_dir=args.data_dir,
        port=args.port,
        output_cap=args.output_cap or DEFAULT_OUTPUT_CAP,
        idle_timeout=300.0 if args.idle_timeout is None else args.idle_timeout,
        announce=False,
    )
    try:
        await backend.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}") from None
    try:
        # serve-local exists to hand this key out: it is the one place it is printed
        ctx.stdout.write(
            f"export DEDALUS_BASE_URL={backend.base_url}\n"
            f"export DEDALUS_X_API_KEY={backend.api_key}\n"
            # so that `dedalus-async run -- CMD` works as it is, like on the local backend
            f"export DEDALUS_MACHINE_ID={DEFAULT_LOCAL_MACHINE}\n".encode()
        )
        ctx.stdout.flush()
        ctx.secrets.add(backend.api_key)
        ctx.note(
            f"WARNING: serving at {backend.base_url}: every command it receives runs as user "
            f"{current_user()!r} on this computer, without a sandbox"
        )
        ctx.note(
            f"machines live in {backend.machines_dir}; unset DEDALUS_API_KEY in the client's "
            "shell (it takes precedence); stop with Ctrl-C"
        )
        await _until_stopped()
        ctx.note("stopping: killing the commands still running")
    finally:
        await backend.close()
    return 0


async def _until_stopped() -> None:
    """Wait for Ctrl-C or SIGTERM (serve-local's normal end, exit 0)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


#: The function of each subcommand, by the name the parser gives it.
COMMANDS: Final[dict[str, Command]] = {
    "run": run,
    "run-many": run_many,
    "get": get,
    "output": output,
    "events": events,
    "cancel": cancel,
    "delete": delete,
    "list": list_executions,
    "serve-local": serve_local,
    "batch": batch,
    "machines": machines,
}
