"""How a command ends: the exit codes, the exceptions that pick one, and the rule from a
finished execution to the code ``run`` exits with.

Pure: no I/O. ``--help`` documents the codes (:data:`._parser.EXIT_CODES_HELP`).
"""

from __future__ import annotations

from typing import Final

from dedalus_async._models import Execution, ExecutionStatus

__all__ = [
    "EXIT_API_ERROR",
    "EXIT_CANCELLED",
    "EXIT_EXPIRED",
    "EXIT_INTERRUPTED",
    "EXIT_REMOTE_FAILED",
    "EXIT_SOME_FAILED",
    "EXIT_USAGE",
    "EXIT_WAIT_TIMEOUT",
    "Terminated",
    "UsageError",
    "command_line_words",
    "describe_end",
    "exit_code_for",
]

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


class UsageError(Exception):
    """Bad input found after argparse was done (exit 2)."""


class Terminated(Exception):
    """SIGTERM arrived: stop like Ctrl-C, exit 143."""


# The library's advice for a Python caller, and what a command-line user does instead.
_PYTHON_ADVICE: Final = (
    (
        "decode bytes with errors='replace' (or fix the text) before sending",
        "give it as UTF-8 text (check the shell's locale, or the file it came from)",
    ),
)


def command_line_words(message: str) -> str:
    """A message of the library's argument checks, with advice meant for Python callers
    replaced by what to do on the command line."""
    for python, cli in _PYTHON_ADVICE:
        message = message.replace(python, cli)
    return message


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


def describe_end(execution: Execution) -> str | None:
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
