"""The command line's arguments: every subcommand, its options and its help (argparse).

Nothing here runs a command: the parsed ``args.subcommand`` names the function of
:mod:`._commands` that does. Option values are checked as they are parsed, with the
library's own rules (:mod:`dedalus_async._checks`), so that a bad one is a one-line usage
error.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Final, NoReturn

from dedalus_async._version import __version__
from dedalus_async._wire import check_autosleep, check_id, check_idempotency_key

from ._inputs import MAX_TIMEOUT_MS, MAX_WAIT_SECONDS, EventCursor
from ._outcomes import EXIT_USAGE, command_line_words
from ._output import PROG
from ._sessions import DEFAULT_LOCAL_MACHINE

__all__ = [
    "EXIT_CODES_HELP",
    "MAX_CONCURRENCY",
    "MAX_MEMORY_MIB",
    "MAX_OUTPUT_CAP",
    "MAX_PAGE_SIZE",
    "MAX_RATE",
    "MAX_STORAGE_GIB",
    "MAX_VCPU",
    "NUMERIC_TYPES",
    "build_parser",
]

#: --concurrency at most: more executions at once than any machine or account runs.
MAX_CONCURRENCY: Final = 10_000
#: batch submit --rate at most (requests per second: more than any account is allowed).
MAX_RATE: Final = 1_000_000
#: list --limit at most (a page size; servers clamp it lower anyway).
MAX_PAGE_SIZE: Final = 1_000
#: serve-local --output-cap at most (1 GiB per stream, kept in memory per execution).
MAX_OUTPUT_CAP: Final = 1 << 30
#: machines create --vcpu, --memory-mib, --storage-gib at most: more than any one machine
#: has (1024 vCPUs, 4 TiB of memory, 1 PiB of storage); beyond that it is a typo.
MAX_VCPU: Final = 1024
MAX_MEMORY_MIB: Final = 4 << 20
MAX_STORAGE_GIB: Final = 1 << 20

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
above; 2 also for a journal that is not one, or holds another batch under that name);
get/output/events/cancel/delete/list exit 0, 2 or 125 (130: Ctrl-C during
events --follow, after printing the command to read on); machines exits 0, 2 or 125, and
machines wait 124 when --timeout passed first (saying where the machine stood) and 126
when the machine failed or can no longer reach --until; serve-local exits 0 when stopped
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
HOME is that directory, and the command is killed when this program exits. Its record
stays: `dedalus-async get --local MACHINE_ID EXECUTION_ID` (and output, events, list)
reads it later.

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

With --journal PATH the batch is durable: killed or interrupted, the same command run
again returns the finished executions from the journal, waits for the started ones and
creates nothing twice. A line may then carry a "key" (a name unique in the file) to match
its job by name instead of by line position. See `dedalus-async batch --help`.
"""

_BATCH_HELP: Final = """\
Look at a batch that run-many --journal ran (or is running), or share one batch among
workers on many machines (the journal then is a PostgreSQL DSN, postgresql://...).

  status    counts of jobs by state, and each failure with its error (reads only)
  results   one JSON line per job, in input order (reads only):
            {"index", "job", "state", "ok", "execution", "stdout", "stderr", "error"}
            (exit 0 when every job finished ok, else 1)
  submit    store a JSON-lines file as a batch in PostgreSQL (whole: env and stdin too)
  work      run jobs of a submitted batch until none is left; start any number of them
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


_MACHINES_HELP: Final = """\
Create, look at, wake, put to sleep, delete and wait for machines. Each prints one line
per machine:

  MACHINE_ID PHASE [(desired STATE)] vcpu=N memory_mib=N storage_gib=N autosleep=...

With --json, one object instead: {"ok", "machine", "error"} ("machine" as the API spells
it); machines list --json prints one machine per line. With --local, the machines of the
local backend on this computer (a folder each under $DEDALUS_LOCAL_HOME, default
~/.local/share/dedalus-async).

examples:
  ID=$(dedalus-async machines create --vcpu 1 --memory-mib 4096 | cut -d' ' -f1)
  dedalus-async machines wait "$ID" --until running --timeout 300
  dedalus-async run --machine-id "$ID" -- uname -a
"""

_MACHINES_WAIT_HELP: Final = """\
Look at a machine until its phase is --until (default: running) and print it. It only
watches: a sleeping machine is woken by `machines wake` (or by a command run on it).
Exit 124 when --timeout passes first (the line says where the machine stood), 126 when
the machine failed or can no longer get there (destroyed while waiting for running).
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


def _seconds(text: str) -> float:
    """--timeout, --idle-timeout: positive, finite, at most a year."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_WAIT_SECONDS:  # NaN and infinities fail too
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds, at most {MAX_WAIT_SECONDS} (a year), "
            f"not {text!r}"
        )
    return value


def _integer(maximum: int, unit: str = "", *, minimum: int = 1) -> Callable[[str], int]:
    """An argument type: a whole number from ``minimum`` to ``maximum`` (``unit`` for the
    message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # "1.5", "1e3", "nan", "", and digits beyond int()'s limit
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not minimum <= value <= maximum:
            least = "a positive integer" if minimum == 1 else f"an integer from {minimum}"
            raise argparse.ArgumentTypeError(
                f"must be {least}{unit}, at most {maximum}, not {text!r}"
            )
        return value

    return parse


def _vcpu(text: str) -> float:
    """--vcpu: a positive number of vCPUs (0.5 is fine), at most MAX_VCPU."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of vCPUs: {text!r}") from None
    if not 0 < value <= MAX_VCPU:  # NaN and infinities fail too
        raise argparse.ArgumentTypeError(
            f"must be a positive number of vCPUs, at most {MAX_VCPU}, not {text!r}"
        )
    return int(value) if value.is_integer() else value


def _rate(text: str) -> float:
    """--rate: a positive number of requests per second (0.5 is fine), at most MAX_RATE."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of requests per second: {text!r}") from None
    if not 0 < value <= MAX_RATE:  # NaN and infinities fail too
        raise argparse.ArgumentTypeError(
            f"must be a positive number of requests per second, at most {MAX_RATE}, not {text!r}"
        )
    return value


def _autosleep(text: str) -> str:
    try:
        check_autosleep(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not a duration: use units like 30s, 15m, 2h or 1w3d, raw "
            "seconds like 1800, or never"
        ) from None
    return text


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free one), not {value}")
    return value


_timeout_ms = _integer(MAX_TIMEOUT_MS, " of milliseconds")
_concurrency = _integer(MAX_CONCURRENCY)
_page_size = _integer(MAX_PAGE_SIZE)
_output_cap = _integer(MAX_OUTPUT_CAP, " of bytes")
_memory_mib = _integer(MAX_MEMORY_MIB, " of MiB")
_storage_gib = _integer(MAX_STORAGE_GIB, " of GiB")

#: The argument types of numeric options (tests check each option that uses one).
NUMERIC_TYPES: Final = frozenset(
    {
        _seconds,
        _port,
        _timeout_ms,
        _concurrency,
        _page_size,
        _output_cap,
        _vcpu,
        _rate,
        _memory_mib,
        _storage_gib,
    }
)


def _id(name: str) -> Callable[[str], str]:
    """MACHINE_ID, EXECUTION_ID, --machine-id: the library's rule, said about the argument
    (an empty --machine-id is left to the command, which has its own word for it)."""

    def parse(text: str) -> str:
        if text == "" and name == "--machine-id":
            return text
        try:
            check_id(name, text)
        except ValueError as exc:
            message = command_line_words(str(exc).removeprefix(f"{name} "))
            raise argparse.ArgumentTypeError(message) from None
        return text

    return parse


def _idempotency_key(text: str) -> str:
    try:
        check_idempotency_key(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "must be 1-255 visible ASCII characters (no spaces); leave --idempotency-key "
            "out to get a fresh one"
        ) from None
    return text


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
        type=_timeout_ms,
        metavar="MS",
        help="the remote command's own time limit; when it passes the command is killed",
    )
    run.add_argument(
        "--idempotency-key",
        type=_idempotency_key,
        metavar="KEY",
        help="your own Idempotency-Key",
    )
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
        "--concurrency",
        type=_concurrency,
        default=8,
        metavar="N",
        help=f"default: 8, at most {MAX_CONCURRENCY}",
    )
    many.add_argument("--output", metavar="FILE", help="write the results here, not stdout")
    _add_journal_options(many)
    many.add_argument(
        "--reservation-max-age",
        type=_seconds,
        default=3600.0,
        metavar="S",
        help="on resume, a create sent more than S seconds ago whose answer was never "
        "journaled is reported, not sent again (the server's key lifetime is unknown; "
        "default: 3600)",
    )

    batch = sub.add_parser(
        "batch",
        help="look at a batch run with run-many --journal, or share one among workers",
        description=_BATCH_HELP,
        formatter_class=formatter,
    )
    batch_sub = batch.add_subparsers(dest="batch_command", metavar="COMMAND", required=True)
    for name, what in (
        ("status", "counts of jobs by state, and failures with their errors"),
        ("results", "one JSON line per job, in input order"),
    ):
        cmd = batch_sub.add_parser(name, parents=[common], help=what, description=what)
        _add_journal_options(cmd, required=True)
    submit = batch_sub.add_parser(
        "submit",
        parents=[common],
        help="store a JSON-lines file as a batch in PostgreSQL, for batch work to run",
        description="store the requests of a JSON-lines file (as run-many reads them) as a "
        "batch in a PostgreSQL database, whole: env values and stdin included, since "
        "workers on other machines need them. Submitting the same file again does nothing.",
    )
    submit.add_argument("file", metavar="FILE")
    submit.add_argument(
        "--machine-id",
        type=_id("--machine-id"),
        metavar="ID",
        help="for lines without a machine_id (default: $DEDALUS_MACHINE_ID)",
    )
    _add_journal_options(submit, required=True, dsn_only=True)
    submit.add_argument(
        "--max-in-flight",
        type=_concurrency,
        metavar="N",
        help="jobs in flight across all workers together, at most (default: no cap but "
        "each worker's --concurrency)",
    )
    submit.add_argument(
        "--rate",
        type=_rate,
        metavar="R",
        help="requests per second of all workers together, at most, e.g. 50 or 0.5 "
        "(default: no shared ceiling). Submitting again changes it (and --max-in-flight) "
        "while workers run",
    )
    work = batch_sub.add_parser(
        "work",
        parents=[common, server],
        help="run jobs of a submitted batch until none is left (start any number)",
        description="claim jobs of a batch that batch submit stored, run them, record "
        "their outcomes, and exit when no job is left. Start it on as many machines as you "
        "like: each job is held under a lease renewed while the worker lives; the jobs of "
        "a worker that dies are taken over when its leases expire, with the same "
        "Idempotency-Keys, so no job runs twice.",
    )
    _add_journal_options(work, required=True, dsn_only=True)
    work.add_argument(
        "--concurrency",
        type=_concurrency,
        default=8,
        metavar="N",
        help=f"jobs this worker runs at once (default: 8, at most {MAX_CONCURRENCY})",
    )
    work.add_argument(
        "--lease",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="seconds a dead worker's jobs wait before another takes them (default: 30)",
    )
    work.add_argument(
        "--local",
        action="store_true",
        help="run the jobs on this computer even when an API key is configured",
    )
    work.set_defaults(machine_id=None, cancel_remote=False)

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
        cmd.add_argument("machine_id", type=_id("MACHINE_ID"), metavar="MACHINE_ID")
        cmd.add_argument("execution_id", type=_id("EXECUTION_ID"), metavar="EXECUTION_ID")
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
    lister.add_argument("machine_id", type=_id("MACHINE_ID"), metavar="MACHINE_ID")
    lister.add_argument(
        "--limit", type=_page_size, metavar="N", help=f"page size (at most {MAX_PAGE_SIZE})"
    )

    _add_machines(sub, common, server)

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
        type=_output_cap,
        metavar="BYTES",
        help="bytes of each stream kept per execution (default: 1 MiB)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_seconds,
        metavar="S",
        help="seconds idle before a machine sleeps (default: 300)",
    )
    return parser


def _add_machines(
    sub: argparse._SubParsersAction[_Parser], common: _Parser, server: _Parser
) -> None:
    """``machines create|get|list|wake|sleep|delete|wait``."""
    local = _Parser(add_help=False)
    local.add_argument(
        "--local",
        action="store_true",
        help="the machines of the local backend on this computer (a folder each under "
        "$DEDALUS_LOCAL_HOME, default ~/.local/share/dedalus-async)",
    )
    parents = [common, server, local]
    formatter = argparse.RawDescriptionHelpFormatter
    machines = sub.add_parser(
        "machines",
        help="create, look at, wake, sleep, delete and wait for machines",
        description=_MACHINES_HELP,
        formatter_class=formatter,
    )
    verbs = machines.add_subparsers(dest="machines_command", metavar="COMMAND", required=True)
    json_help = 'print {"ok", "machine", "error"} as one JSON object instead of a line'

    create = verbs.add_parser(
        "create", parents=parents, help="create a machine", description="create a machine"
    )
    create.add_argument(
        "--vcpu", type=_vcpu, metavar="N", help=f"vCPUs, e.g. 1 or 0.5 (at most {MAX_VCPU})"
    )
    create.add_argument(
        "--memory-mib", type=_memory_mib, metavar="N", help="memory in MiB (e.g. 4096)"
    )
    create.add_argument(
        "--storage-gib", type=_storage_gib, metavar="N", help="storage in GiB (e.g. 10)"
    )
    create.add_argument(
        "--autosleep",
        type=_autosleep,
        metavar="DURATION",
        help="idle time before it sleeps: 30s, 15m, 2h, 1w3d, seconds, or never",
    )
    each: list[tuple[str, str]] = [
        ("get", "print a machine"),
        ("wake", "ask a sleeping machine to wake (machines wait to know it did)"),
        ("sleep", "ask a machine to sleep (its files are kept)"),
        ("delete", "destroy a machine and wipe its storage"),
    ]
    commands = {"create": create}
    for name, what in each:
        cmd = verbs.add_parser(name, parents=parents, help=what, description=what)
        cmd.add_argument("machine_id", type=_id("MACHINE_ID"), metavar="MACHINE_ID")
        commands[name] = cmd
    for name in ("create", "wake", "sleep", "delete"):
        commands[name].add_argument(
            "--idempotency-key", type=_idempotency_key, metavar="KEY", help="your own key"
        )
    lister = verbs.add_parser(
        "list",
        parents=parents,
        help="print every machine, a line each",
        description="print every machine, a line each (--json: one machine per line)",
    )
    lister.add_argument(
        "--limit", type=_page_size, metavar="N", help=f"page size (at most {MAX_PAGE_SIZE})"
    )
    waiter = verbs.add_parser(
        "wait",
        parents=parents,
        help="wait until a machine is running, sleeping or destroyed",
        description=_MACHINES_WAIT_HELP,
        formatter_class=formatter,
    )
    waiter.add_argument("machine_id", type=_id("MACHINE_ID"), metavar="MACHINE_ID")
    waiter.add_argument(
        "--until",
        choices=("running", "sleeping", "destroyed"),
        default="running",
        help="the phase to wait for (default: running)",
    )
    waiter.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="seconds to wait at most (default: no limit; at most a year)",
    )
    for cmd in (*commands.values(), waiter):
        cmd.add_argument("--json", action="store_true", help=json_help)
    lister.add_argument(
        "--json", action="store_true", help="one JSON object per machine, as the API spells it"
    )


def _add_journal_options(
    parser: argparse.ArgumentParser, *, required: bool = False, dsn_only: bool = False
) -> None:
    if dsn_only:
        what = "the batch's PostgreSQL database, postgresql://USER@HOST[:PORT]/DATABASE"
    elif required:
        what = "the journal run-many --journal (or batch submit) wrote: a path or a DSN"
    else:
        what = (
            "the batch's journal: an SQLite file (created if missing), or a PostgreSQL "
            "database, postgresql://USER@HOST[:PORT]/DATABASE"
        )
    parser.add_argument(
        "--journal",
        metavar="DSN" if dsn_only else "PATH|DSN",
        required=required,
        help=what,
    )
    parser.add_argument(
        "--batch",
        "--name",
        dest="batch",
        default="default",
        metavar="NAME",
        help="the batch's name within the journal (default: 'default')",
    )


def _add_execution_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--machine-id",
        type=_id("--machine-id"),
        metavar="ID",
        help=f"default: $DEDALUS_MACHINE_ID, else {DEFAULT_LOCAL_MACHINE!r} when local",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="seconds to wait for the end (default: no limit; at most a year)",
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
