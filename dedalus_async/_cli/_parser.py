"""The command line's arguments: every subcommand, its options and its help (argparse).

Nothing here runs a command: the parsed ``args.subcommand`` names the function of
:mod:`._commands` that does. Option values are checked as they are parsed, with the
library's own rules (:mod:`dedalus_async._checks`), so that a bad one is a one-line usage
error.
"""

from __future__ import annotations

import argparse
import os
from typing import Final, NoReturn

from dedalus_async._checks import check_count, check_seconds
from dedalus_async._version import __version__

from ._inputs import EventCursor
from ._outcomes import EXIT_USAGE
from ._output import PROG
from ._sessions import DEFAULT_LOCAL_MACHINE

__all__ = ["EXIT_CODES_HELP", "build_parser"]

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
above); get/output/events/cancel/delete/list exit 0, 2 or 125; serve-local exits 0 when stopped
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
  export DEDALUS_MACHINE_ID=dm-local  (the machine `run` uses without --machine-id)

Each machine id gets a persistent directory under --data-dir. Idle machines fall asleep
and take a moment to wake, as real ones do. Stop it with Ctrl-C or SIGTERM (exit 0):
commands still running are killed.
"""


_EVENTS_HELP: Final = """\
Print an execution's event log, one line per event:

  #SEQUENCE TIME TYPE [CHUNK as a JSON string] [STATUS] [exit_code=N] [signal=N] ...

With --json, one JSON object per line, each with the cursor that continues after it
("cursor": "SEQUENCE:SERVER_CURSOR"). Interrupted (Ctrl-C), stopped by an error, or done
before the execution ended, it prints on stderr the command that reads on after the last
event printed, with that event's cursor:

  dedalus-async events --follow MACHINE_ID EXECUTION_ID --cursor 7:c6
"""

# --- argument types --------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    try:
        seconds = check_seconds("seconds", value)
    except ValueError:
        # the library's wording names a Python argument; this one quotes what was typed
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds: {text!r}"
        ) from None
    assert seconds is not None  # None is refused without none_means
    return seconds


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free one), not {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    try:
        return check_count("N", value, minimum=1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}") from None


def _cursor(text: str) -> EventCursor:
    try:
        return EventCursor.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f'{exc} (a cursor is SEQUENCE:SERVER_CURSOR, e.g. 7:c6: copy the "cursor" of a '
            "line of `events --json`, or the one in the command `events` printed to continue)"
        ) from None


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
    local = _Parser(add_help=False)
    local.add_argument(
        "--local",
        action="store_true",
        help="look at the executions that ran on this computer (run without an API key or "
        "with --local, serve-local), kept under $DEDALUS_LOCAL_HOME (default "
        "~/.local/share/dedalus-async)",
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

    for name, what in (
        ("get", "print an execution as JSON"),
        ("output", "print an execution's stdout and stderr as JSON"),
        ("events", "print an execution's events as JSON lines"),
        (
            "cancel",
            "stop an execution that is still going (a finished one is left as it is) "
            "and print what the server reports",
        ),
        ("delete", "delete an execution, finished or not (its output goes too)"),
    ):
        cmd = sub.add_parser(name, parents=[common, server, local], help=what, description=what)
        cmd.add_argument("machine_id", metavar="MACHINE_ID")
        cmd.add_argument("execution_id", metavar="EXECUTION_ID")
        if name == "events":
            cmd.description = _EVENTS_HELP
            cmd.formatter_class = formatter
            cmd.add_argument(
                "--follow", action="store_true", help="keep reading until the execution ends"
            )
            cmd.add_argument(
                "--cursor",
                type=_cursor,
                metavar="CURSOR",
                help="continue after the event this cursor came with. The form is "
                "SEQUENCE:SERVER_CURSOR (e.g. 7:c6): the event's sequence number, then the "
                'server\'s page cursor. Take it from the "cursor" of a line of '
                "`events --json`, or from the command that `events` prints on stderr to "
                "continue (on Ctrl-C, on an error, or when the execution has not ended)",
            )
            cmd.add_argument(
                "--json",
                action="store_true",
                help="one JSON object per line: the event as the API sends it, plus "
                '"cursor" (what --cursor takes to continue after it)',
            )

    lister = sub.add_parser(
        "list",
        parents=[common, server, local],
        help="print a machine's executions as JSON lines",
        description="print a machine's executions as JSON lines, oldest first",
    )
    lister.add_argument("machine_id", metavar="MACHINE_ID")
    lister.add_argument("--limit", type=_positive_int, metavar="N", help="page size")

    serve = sub.add_parser(
        "serve-local",
        parents=[common],
        help="serve the API on 127.0.0.1, running commands on this computer",
        description=_SERVE_LOCAL_HELP,
        formatter_class=formatter,
    )
    serve.add_argument("--port", type=_port, default=0, help="default: any free port")
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
