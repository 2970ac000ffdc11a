"""The ``dedalus-async`` command line (also ``python -m dedalus_async``).

It sits on top of the Session like any other user of the library. ``run`` and
``run-many`` talk to the server named by ``DEDALUS_BASE_URL`` with the key in
``DEDALUS_API_KEY`` / ``DEDALUS_X_API_KEY``; with no key configured (or with ``--local``)
they start an in-process :class:`~dedalus_async._local.LocalBackend` instead and say so on
stderr. Errors are one line on stderr; ``--debug`` adds request logs and tracebacks. The
API key is never printed, except by ``serve-local``, whose job is to hand its key out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Final, NoReturn

import attrs

from ._errors import ConfigurationError, DedalusError, WaitTimeout
from ._fanout import Completed, ExecutionRequest, Progress
from ._models import Execution, ExecutionStatus
from ._results import ExecutionResult
from ._session import ExecutionHandle, Session

if TYPE_CHECKING:
    from ._local import LocalBackend

__all__ = [
    "DEFAULT_LOCAL_MACHINE",
    "EXIT_API_ERROR",
    "EXIT_CANCELLED",
    "EXIT_EXPIRED",
    "EXIT_INTERRUPTED",
    "EXIT_REMOTE_FAILED",
    "EXIT_SOME_FAILED",
    "EXIT_USAGE",
    "EXIT_WAIT_TIMEOUT",
    "build_parser",
    "exit_code_for",
    "main",
]

PROG: Final = "dedalus-async"
#: ``run-many``: at least one execution did not succeed with exit code 0.
EXIT_SOME_FAILED: Final = 1
#: Bad arguments, an unreadable input file, no API key where one is needed, an unusable
#: base URL, a port serve-local cannot listen on.
EXIT_USAGE: Final = 2
#: The execution expired before it finished.
EXIT_EXPIRED: Final = 122
#: The execution was cancelled (by a DELETE from anyone).
EXIT_CANCELLED: Final = 123
#: ``--timeout`` passed first; the execution keeps running unless ``--cancel-remote``.
EXIT_WAIT_TIMEOUT: Final = 124
#: The CLI could not talk to the server, or the server refused (HTTP error, bad response).
EXIT_API_ERROR: Final = 125
#: The execution failed without an exit code or a signal (e.g. the program was not found).
EXIT_REMOTE_FAILED: Final = 126
#: Interrupted by Ctrl-C (SIGINT); 143 for SIGTERM.
EXIT_INTERRUPTED: Final = 130

#: The machine id ``run`` uses locally when none is given.
DEFAULT_LOCAL_MACHINE: Final = "dm-local"
_KEY_VARIABLES: Final = ("DEDALUS_API_KEY", "DEDALUS_X_API_KEY")
_CANCEL_TIMEOUT: Final = 10.0

EXIT_CODES_HELP: Final = """\
exit codes of run:
  N        the remote command's exit code (0-255)
  128+N    the remote command was killed by signal N (a timeout_ms kill gives 137)
  2        usage or configuration error (bad arguments, unreadable --stdin-file, no API
           key where one is needed, an unusable DEDALUS_BASE_URL)
  122      the execution expired before it finished
  123      the execution was cancelled
  124      --timeout passed first (the execution keeps running unless --cancel-remote)
  125      API or transport error (could not talk to the server, or it refused)
  126      the execution failed without an exit code or signal (e.g. command not found)
  130      interrupted by Ctrl-C (143: SIGTERM); with --cancel-remote the execution is
           deleted first
run-many exits 0 when every execution succeeded with exit code 0, else 1 (2, 125, 130 as
above); get/output/events/cancel/list exit 0, 2 or 125; serve-local exits 0 when stopped
by Ctrl-C or SIGTERM, 2 when it cannot listen. A remote exit code can equal one of the
codes above: use --json when the difference matters.
"""


_RUN_HELP: Final = """\
Create an execution, print its stdout and stderr as they arrive (following its event
log), and exit with its exit code.

With no API key configured (DEDALUS_API_KEY, DEDALUS_X_API_KEY), or with --local, the
command runs on this computer instead, as you and WITHOUT a sandbox, in a directory per
machine id under $DEDALUS_LOCAL_HOME (default ~/.local/share/dedalus-async); one line on
stderr says so. There, --cwd is relative to that directory (or under /home/machine),
HOME is that directory, and the command is killed when this program exits.

examples:
  dedalus-async run -- uname -a
  dedalus-async run --machine-id dm-0199a8f2-6c1e-7d3a-9b42-5e8f1a2b3c4d --timeout 60 \\
      -- sh -c 'make test'
  dedalus-async run --stdin-file - --json -- wc -l < data.txt
"""

_RUN_MANY_HELP: Final = """\
Run the executions described in FILE ('-' = stdin), at most --concurrency at once.

Each line is a JSON object: command (list of strings, required), machine_id, cwd, env,
stdin, timeout_ms, idempotency_key, timeout (seconds to wait for that one). The whole file
is checked before anything runs. One JSON object per input line is written, in input
order, as soon as it and every earlier one are done:
  {"index", "ok", "execution", "stdout", "stderr", "error"}
A progress line is drawn on stderr when stderr is a terminal.
"""

_SERVE_LOCAL_HELP: Final = """\
Serve the executions API on 127.0.0.1, running every command it receives as a process of
the current user, WITHOUT a sandbox. It prints the settings that point clients at it:

  export DEDALUS_BASE_URL=http://127.0.0.1:PORT
  export DEDALUS_X_API_KEY=KEY      (a fresh random key on every start)

Each machine id gets a persistent directory under --data-dir. Idle machines fall asleep
and take a moment to wake, as real ones do. Stop it with Ctrl-C or SIGTERM (exit 0):
commands still running are killed.
"""


class _UsageError(Exception):
    """Bad input found after argparse was done (exit 2)."""


class _Terminated(Exception):
    """SIGTERM arrived: stop like Ctrl-C, exit 143."""


@attrs.define
class _Context:
    """What every subcommand needs: where to write, what to hide, whether to debug."""

    debug: bool = False
    secrets: set[str] = attrs.Factory(set)
    stdout: IO[bytes] = attrs.field(factory=lambda: sys.stdout.buffer)
    stderr: IO[str] = attrs.field(factory=lambda: sys.stderr)
    stderr_bytes: IO[bytes] = attrs.field(factory=lambda: sys.stderr.buffer)

    def redact(self, text: str) -> str:
        """``text`` with every known secret replaced by ``***``."""
        for secret in self.secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def note(self, message: str) -> None:
        """One line on stderr, prefixed with the program name."""
        line = " ".join(self.redact(message).split("\n"))
        self.stderr.write(f"{PROG}: {line}\n")
        self.stderr.flush()

    def error(self, message: str) -> None:
        """One ``error:`` line on stderr."""
        self.note(f"error: {message}")

    def write_json(self, value: Any) -> None:
        """One JSON document on one line of stdout."""
        self.stdout.write(_dumps(value).encode() + b"\n")
        self.stdout.flush()


class _RedactingFormatter(logging.Formatter):
    """Log lines (tracebacks included) with secrets masked."""

    def __init__(self, ctx: _Context, fmt: str) -> None:
        super().__init__(fmt)
        self._ctx = ctx

    def format(self, record: logging.LogRecord) -> str:
        return self._ctx.redact(super().format(record))


# --- JSON ------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"))


def _jsonable(value: Any) -> Any:
    """Models as the API spells them: None fields left out, times in RFC 3339 UTC."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if attrs.has(type(value)):
        out = {}
        for field in attrs.fields(type(value)):
            item = getattr(value, field.name)
            if item is not None:
                out[field.name] = _jsonable(item)
        return out
    return value


def _result_json(
    execution: Execution | None,
    *,
    stdout: str = "",
    stderr: str = "",
    error: BaseException | None = None,
) -> dict[str, Any]:
    ok = error is None and execution is not None and ExecutionResult(execution=execution).ok
    out: dict[str, Any] = {
        "ok": ok,
        "execution": execution,
        "stdout": stdout,
        "stderr": stderr,
        "error": None,
    }
    if error is not None:
        out["error"] = {"type": type(error).__name__, "message": str(error)}
    return out


# --- outcomes --------------------------------------------------------------------------


def exit_code_for(execution: Execution) -> int:
    """The process exit code ``run`` ends with for a finished execution (see ``--help``)."""
    status = execution.status
    if status == ExecutionStatus.CANCELLED:
        return EXIT_CANCELLED
    if status == ExecutionStatus.EXPIRED:
        return EXIT_EXPIRED
    code = execution.exit_code
    if code is not None and (code != 0 or status == ExecutionStatus.SUCCEEDED):
        return code if 0 <= code <= 255 else EXIT_REMOTE_FAILED
    if execution.signal is not None and 0 < execution.signal < 128:
        return 128 + execution.signal
    if status == ExecutionStatus.SUCCEEDED:
        return 0
    return EXIT_REMOTE_FAILED


def _describe_end(execution: Execution) -> str | None:
    """A line about how the execution ended, unless a plain exit code says it all."""
    status = execution.status
    if status == ExecutionStatus.SUCCEEDED or (
        status == ExecutionStatus.FAILED and execution.exit_code not in (None, 0)
    ):
        return None
    parts = [f"execution {execution.execution_id} {status}"]
    if execution.error_code:
        parts.append(execution.error_code)
    if execution.error_message:
        parts.append(execution.error_message)
    text = ": ".join(parts)
    if execution.signal is not None:
        text += f" (signal {execution.signal})"
    return text


# --- argument types --------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return value


def _env_item(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected K=V or K, got {text!r}")
    if not sep:
        # docker's convention: a bare name passes this process's own value through
        if name not in os.environ:
            raise argparse.ArgumentTypeError(f"{name} is not set here; use {name}=VALUE")
        value = os.environ[name]
    return name, value


# --- the parser ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the whole command line."""
    from . import __version__

    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help="log every request and show tracebacks on stderr (the API key is masked)",
    )
    server = _Parser(add_help=False)
    server.add_argument(
        "--base-url",
        metavar="URL",
        help="the API's base URL (default: $DEDALUS_BASE_URL, else the public API)",
    )
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Run commands on Dedalus machines, or locally without an account.",
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        parents=[common, server],
        help="run one command and stream its output",
        description=_RUN_HELP,
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    _add_execution_options(run)
    run.add_argument("--cwd", metavar="DIR", help="working directory on the machine")
    run.add_argument(
        "--env",
        action="append",
        default=[],
        type=_env_item,
        metavar="K=V",
        help="set a variable (repeatable); a bare K passes this shell's value through",
    )
    run.add_argument(
        "--stdin-file",
        metavar="FILE",
        help="send FILE as the command's stdin ('-' = this process's stdin; it must be "
        "UTF-8 text). Without it the command's stdin is empty: piped input is not sent "
        "implicitly, so a script with an open stdin never hangs",
    )
    run.add_argument(
        "--timeout-ms",
        type=_positive_int,
        metavar="MS",
        help="the remote command's own time limit; when it passes the command is killed",
    )
    run.add_argument("--idempotency-key", metavar="KEY", help="your own Idempotency-Key")
    run.add_argument(
        "--json",
        action="store_true",
        help="print nothing while it runs, then one JSON object: "
        '{"ok", "execution", "stdout", "stderr", "error"}',
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]")
    run.set_defaults(handler=_cmd_run)

    many = sub.add_parser(
        "run-many",
        parents=[common, server],
        help="run the executions of a JSON-lines file, concurrently",
        description=_RUN_MANY_HELP,
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    _add_execution_options(many)
    many.add_argument("file", metavar="FILE")
    many.add_argument(
        "--concurrency", type=_positive_int, default=8, metavar="N", help="default: 8"
    )
    many.add_argument("--output", metavar="FILE", help="write the results here, not stdout")
    many.set_defaults(handler=_cmd_run_many)

    for name, what in (
        ("get", "print an execution as JSON"),
        ("output", "print an execution's stdout and stderr as JSON"),
        ("events", "print an execution's events as JSON lines"),
        ("cancel", "cancel (DELETE) an execution and print what the server reports"),
    ):
        cmd = sub.add_parser(name, parents=[common, server], help=what, description=what)
        cmd.add_argument("machine_id", metavar="MACHINE_ID")
        cmd.add_argument("execution_id", metavar="EXECUTION_ID")
        if name == "events":
            cmd.add_argument(
                "--follow", action="store_true", help="keep reading until the execution ends"
            )
            cmd.add_argument("--cursor", help="start after this cursor")
        cmd.set_defaults(handler=_cmd_lookup)

    lister = sub.add_parser(
        "list",
        parents=[common, server],
        help="print a machine's executions as JSON lines",
        description="print a machine's executions as JSON lines, oldest first",
    )
    lister.add_argument("machine_id", metavar="MACHINE_ID")
    lister.add_argument("--limit", type=_positive_int, metavar="N", help="page size")
    lister.set_defaults(handler=_cmd_list)

    serve = sub.add_parser(
        "serve-local",
        parents=[common],
        help="serve the API on 127.0.0.1, running commands on this computer",
        description=_SERVE_LOCAL_HELP,
        formatter_class=formatter,
    )
    serve.add_argument("--port", type=int, default=0, help="default: any free port")
    serve.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where machines live (default: $DEDALUS_LOCAL_HOME, else "
        "~/.local/share/dedalus-async)",
    )
    serve.add_argument(
        "--output-cap",
        type=_positive_int,
        metavar="BYTES",
        help="bytes of each stream kept per execution (default: 1 MiB)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_positive_float,
        metavar="S",
        help="seconds idle before a machine sleeps (default: 300)",
    )
    serve.set_defaults(handler=_cmd_serve_local)
    return parser


def _add_execution_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--machine-id",
        metavar="ID",
        help=f"default: $DEDALUS_MACHINE_ID, else {DEFAULT_LOCAL_MACHINE!r} when local",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="S",
        help="seconds to wait for the end (default: no limit)",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="run on this computer even when an API key is configured",
    )
    parser.add_argument(
        "--cancel-remote",
        action="store_true",
        help="on Ctrl-C or --timeout, delete (cancel) the execution before exiting",
    )


# --- sessions --------------------------------------------------------------------------


def _has_key() -> bool:
    return any(os.environ.get(name) for name in _KEY_VARIABLES)


def _runs_locally(args: argparse.Namespace) -> bool:
    return bool(args.local) or not _has_key()


def _default_machine(args: argparse.Namespace) -> str | None:
    """--machine-id, else $DEDALUS_MACHINE_ID, else dm-local when local, else None."""
    machine = args.machine_id or os.environ.get("DEDALUS_MACHINE_ID") or None
    if machine is None and _runs_locally(args):
        return DEFAULT_LOCAL_MACHINE
    return machine


@contextlib.asynccontextmanager
async def _session_for_runs(
    args: argparse.Namespace, ctx: _Context
) -> AsyncIterator[tuple[Session, LocalBackend | None]]:
    """A session for run/run-many: the configured server, or an in-process local backend
    (yielded too, when there is one)."""
    if not _runs_locally(args):
        async with Session(base_url=args.base_url) as session:
            yield session, None
        return
    if args.base_url:
        raise _UsageError("--base-url needs an API key; the local backend has its own URL")
    from ._local import LocalBackend, current_user

    # A fresh in-process backend would make every run wait for an emulated wake: that
    # emulation is for long-lived backends (serve-local), not for one-shot runs.
    async with LocalBackend(announce=False, wake_delay=0) as backend:
        ctx.secrets.add(backend.api_key)
        why = "--local" if args.local else "no API key configured (DEDALUS_API_KEY)"
        where = backend.machine_dir(_default_machine(args) or DEFAULT_LOCAL_MACHINE)
        ctx.note(f"{why}: running locally as user {current_user()!r} in {where} (not sandboxed)")
        async with backend.session() as session:
            yield session, backend


def _remote_session(args: argparse.Namespace) -> Session:
    return Session(base_url=args.base_url)


async def _cancel_quietly(handle: ExecutionHandle, ctx: _Context) -> None:
    """DELETE the execution, time-boxed; a failure is reported, not raised."""
    try:
        async with asyncio.timeout(_CANCEL_TIMEOUT):
            execution = await handle.cancel()
        ctx.note(f"cancelled execution {handle.execution_id} ({execution.status})")
    except (DedalusError, TimeoutError) as exc:
        ctx.error(f"could not cancel execution {handle.execution_id}: {exc}")


# --- run -------------------------------------------------------------------------------


def _read_stdin_file(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        if name == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(name, "rb") as file:
                data = file.read()
    except OSError as exc:
        raise _UsageError(f"cannot read --stdin-file {name}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _UsageError(
            "--stdin-file must be UTF-8 text: the API carries stdin as a string"
        ) from None


async def _stream(handle: ExecutionHandle, ctx: _Context) -> tuple[Execution, dict[str, int]]:
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


async def _cmd_run(args: argparse.Namespace, ctx: _Context) -> int:
    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise _UsageError("run needs a command: dedalus-async run [OPTIONS] -- CMD [ARG ...]")
    stdin = _read_stdin_file(args.stdin_file)
    env = dict(args.env) if args.env else None
    machine = _default_machine(args)
    if machine is None:
        raise _UsageError("--machine-id is required (or set DEDALUS_MACHINE_ID)")
    async with _session_for_runs(args, ctx) as (session, backend):
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
            if args.cancel_remote and handle is not None:
                await _cancel_quietly(handle, ctx)
            raise
        if args.json:
            stdout = stderr = ""
            if execution.stdout_bytes != 0 or execution.stderr_bytes != 0:
                output = await handle.output()
                stdout, stderr = output.stdout or "", output.stderr or ""
            ctx.write_json(_result_json(execution, stdout=stdout, stderr=stderr))
        else:
            _report_truncation(ctx, execution, shown)
            ending = _describe_end(execution)
            if ending is not None:
                ctx.note(ending)
        return exit_code_for(execution)


def _report_truncation(ctx: _Context, execution: Execution, shown: dict[str, int]) -> None:
    for stream in ("stdout", "stderr"):
        if getattr(execution, f"{stream}_truncated"):
            total = getattr(execution, f"{stream}_bytes")
            ctx.note(
                f"{stream} was truncated by the server: the command wrote {total} bytes, "
                f"{shown[stream]} were kept"
            )


async def _wait_timed_out(
    args: argparse.Namespace, ctx: _Context, handle: ExecutionHandle, local: bool
) -> int:
    where = f"{handle.machine_id} {handle.execution_id}"
    message = f"execution {handle.execution_id} did not finish within {args.timeout:g} s"
    if args.cancel_remote:
        await _cancel_quietly(handle, ctx)
    elif local:
        message += "; the local backend stops it on exit"
    else:
        message += f"; it keeps running (dedalus-async get {where})"
    if args.json:
        error = WaitTimeout(message, ref=handle.ref, last=handle.last, timeout=args.timeout)
        ctx.write_json(_result_json(handle.last, error=error))
    ctx.error(message)
    return EXIT_WAIT_TIMEOUT


# --- run-many --------------------------------------------------------------------------

_REQUEST_FIELDS: Final = frozenset(
    ("machine_id", "command", "cwd", "env", "stdin", "timeout_ms", "idempotency_key", "timeout")
)


def _load_requests(name: str, machine: str | None, timeout: float | None) -> list[ExecutionRequest]:
    """Parse and check every line first: a typo on line 900 must not surface mid-run."""
    try:
        if name == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(name, encoding="utf-8") as file:
                lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"cannot read {name}: {exc}") from None
    requests: list[ExecutionRequest] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise _UsageError(f"{where}: not JSON: {exc}") from None
        if not isinstance(item, dict):
            raise _UsageError(f"{where}: each line must be a JSON object")
        unknown = sorted(set(item) - _REQUEST_FIELDS)
        if unknown:
            raise _UsageError(f"{where}: unknown field(s) {', '.join(unknown)}")
        # a null field means "not given": the command-line default applies
        given = {k: v for k, v in item.items() if v is not None}
        fields = {"machine_id": machine, "timeout": timeout, **given}
        if fields["machine_id"] is None:
            raise _UsageError(f"{where}: no machine_id, and no --machine-id was given")
        try:
            # ExecutionRequest checks every field as the API would
            requests.append(ExecutionRequest(**fields))
        except (TypeError, ValueError) as exc:
            raise _UsageError(f"{where}: {exc}") from None
    return requests


class _ProgressLine:
    """A one-line counter on stderr, redrawn in place; silent unless stderr is a TTY."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.enabled = stream.isatty()
        self.not_ok = 0
        self._last: Progress | None = None

    def __call__(self, progress: Progress | None = None) -> None:
        if progress is not None:
            self._last = progress
        p = self._last
        if self.enabled and p is not None:
            self._stream.write(
                f"\r{PROG}: {p.finished}/{p.total} done, {self.not_ok} not ok, "
                f"{p.in_flight} running\x1b[K"
            )
            self._stream.flush()

    def close(self) -> None:
        if self.enabled and self._last is not None:
            self._stream.write("\n")
            self._stream.flush()


def _open_output(name: str) -> IO[bytes]:
    # opened before any execution starts, so a bad path costs nothing; opening a local
    # file is not worth a thread
    try:
        return open(name, "wb")  # the caller closes it
    except OSError as exc:
        raise _UsageError(f"cannot write {name}: {exc.strerror}") from None


async def _cmd_run_many(args: argparse.Namespace, ctx: _Context) -> int:
    requests = _load_requests(args.file, _default_machine(args), args.timeout)
    out = _open_output(args.output) if args.output else ctx.stdout
    try:
        async with _session_for_runs(args, ctx) as (session, _backend):
            return await _fan_out(args, session, requests, out, _ProgressLine(ctx.stderr))
    finally:
        if out is not ctx.stdout:
            out.close()


async def _fan_out(
    args: argparse.Namespace,
    session: Session,
    requests: list[ExecutionRequest],
    out: IO[bytes],
    progress: _ProgressLine,
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
        ) as completed:
            async for item in completed:
                pending[item.index] = {"index": item.index, **_completed_json(item)}
                if not pending[item.index]["ok"]:
                    progress.not_ok += 1
                    progress()
                while written in pending:
                    out.write(_dumps(pending.pop(written)).encode() + b"\n")
                    written += 1
                out.flush()
    finally:
        progress.close()
    return EXIT_SOME_FAILED if progress.not_ok else 0


def _completed_json(item: Completed) -> dict[str, Any]:
    error = item.error
    if error is None:
        result = item.result
        return _result_json(result.execution, stdout=result.stdout, stderr=result.stderr)
    last = error.last if isinstance(error, WaitTimeout) else None
    return _result_json(last, error=error)


# --- lookups ---------------------------------------------------------------------------


async def _cmd_lookup(args: argparse.Namespace, ctx: _Context) -> int:
    async with _remote_session(args) as session:
        machine, execution_id = args.machine_id, args.execution_id
        if args.subcommand == "get":
            ctx.write_json(await session.get_execution(machine, execution_id))
        elif args.subcommand == "output":
            ctx.write_json(await session.get_output(machine, execution_id))
        elif args.subcommand == "cancel":
            ctx.write_json(await session.delete_execution(machine, execution_id))
        else:
            stream = session.iter_events(
                machine, execution_id, cursor=args.cursor, follow=args.follow
            )
            async for event in stream:
                ctx.write_json(event)
    return 0


async def _cmd_list(args: argparse.Namespace, ctx: _Context) -> int:
    async with _remote_session(args) as session:
        async for execution in session.list_executions(args.machine_id, limit=args.limit):
            ctx.write_json(execution)
    return 0


# --- serve-local -----------------------------------------------------------------------


async def _cmd_serve_local(args: argparse.Namespace, ctx: _Context) -> int:
    from ._local import DEFAULT_OUTPUT_CAP, LocalBackend, current_user

    backend = LocalBackend(
        data_dir=args.data_dir,
        port=args.port,
        output_cap=args.output_cap or DEFAULT_OUTPUT_CAP,
        idle_timeout=300.0 if args.idle_timeout is None else args.idle_timeout,
        announce=False,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        await backend.start()
    except OSError as exc:
        raise _UsageError(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}") from None
    try:
        # serve-local exists to hand this key out: it is the one place it is printed
        ctx.stdout.write(
            f"export DEDALUS_BASE_URL={backend.base_url}\n"
            f"export DEDALUS_X_API_KEY={backend.api_key}\n".encode()
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
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        ctx.note("stopping: killing the commands still running")
    finally:
        await backend.close()
    return 0


# --- main ------------------------------------------------------------------------------


def _configure_logging(ctx: _Context) -> Callable[[], None]:
    """Send the package's log records to stderr, masked; returns what undoes it (so that
    main() can be called in-process without leaving our handler behind)."""
    package = logging.getLogger("dedalus_async")
    saved = (package.handlers[:], package.level, package.propagate)

    def restore() -> None:
        package.handlers[:], package.level, package.propagate = saved

    handler = logging.StreamHandler(ctx.stderr)
    if ctx.debug:
        fmt = f"{PROG}: %(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        fmt = f"{PROG}: %(levelname)s: %(message)s"
    handler.setFormatter(_RedactingFormatter(ctx, fmt))
    package.handlers[:] = [handler]
    package.setLevel(logging.DEBUG if ctx.debug else logging.WARNING)
    package.propagate = False
    return restore


async def _main_task(
    handler: Callable[[argparse.Namespace, _Context], Coroutine[Any, Any, int]],
    args: argparse.Namespace,
    ctx: _Context,
) -> int:
    # SIGTERM stops like Ctrl-C: local commands run in their own process groups and would
    # outlive an abrupt exit, and --cancel-remote must get its chance to run
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop = asyncio.get_running_loop()
    watch = args.subcommand != "serve-local"  # serve-local handles its own signals
    if watch:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await handler(args, ctx)
    except asyncio.CancelledError:
        if terminated:
            raise _Terminated from None
        raise
    finally:
        if watch:
            loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (see ``--help``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    ctx = _Context(debug=args.debug)
    ctx.secrets.update(os.environ[name] for name in _KEY_VARIABLES if os.environ.get(name))
    restore_logging = _configure_logging(ctx)
    try:
        return _dispatch(args, ctx)
    finally:
        restore_logging()


def _dispatch(args: argparse.Namespace, ctx: _Context) -> int:
    """Run the subcommand; turn every way it can end into an exit code and one line."""
    try:
        return asyncio.run(_main_task(args.handler, args, ctx))
    except KeyboardInterrupt:
        ctx.note("interrupted")
        return EXIT_INTERRUPTED
    except _Terminated:
        ctx.note("terminated")
        return 128 + signal.SIGTERM
    except _UsageError as exc:
        ctx.error(str(exc))
        return EXIT_USAGE
    except ConfigurationError as exc:
        _debug_traceback(ctx, exc)
        ctx.error(str(exc))
        return EXIT_USAGE
    except DedalusError as exc:
        _debug_traceback(ctx, exc)
        ctx.error(str(exc))
        return EXIT_API_ERROR
    except (TypeError, ValueError) as exc:
        # the library checks arguments before sending anything: these are usage errors
        _debug_traceback(ctx, exc)
        ctx.error(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader of our stdout went away (`| head`): stop quietly, like a shell tool
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as exc:
        _debug_traceback(ctx, exc)
        ctx.error(f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)")
        return EXIT_API_ERROR


def _debug_traceback(ctx: _Context, exc: BaseException) -> None:
    if ctx.debug:
        text = "".join(traceback.format_exception(exc))
        ctx.stderr.write(ctx.redact(text))
        ctx.stderr.flush()
