"""What the user hands in besides plain arguments: ``run --stdin-file``, ``run-many``'s
JSON-lines file (read and checked completely before anything runs), and ``events
--cursor``."""

from __future__ import annotations

import json
import re
import sys
from typing import Final

import attrs

from dedalus_async._checks import is_int, is_number
from dedalus_async._fanout import ExecutionRequest

from ._outcomes import UsageError

__all__ = ["MAX_TIMEOUT_MS", "MAX_WAIT_SECONDS", "EventCursor", "load_requests", "read_stdin_file"]

_REQUEST_FIELDS: Final = frozenset(
    (
        "machine_id",
        "command",
        "cwd",
        "env",
        "stdin",
        "timeout_ms",
        "idempotency_key",
        "timeout",
        "key",
    )
)


#: The longest wait --timeout (or a run-many line's "timeout") may ask for: a year. More is
#: a typo (ms for s, an extra digit), not a plan.
MAX_WAIT_SECONDS: Final = 366 * 24 * 3600
#: The longest time limit --timeout-ms (or a line's "timeout_ms") may set: the same year.
MAX_TIMEOUT_MS: Final = MAX_WAIT_SECONDS * 1000

# A cursor longer than this is no cursor (the URL it rides in would be refused anyway).
_MAX_CURSOR: Final = 2048
_OURS: Final = re.compile(r"([0-9]{1,18}):(.*)", re.DOTALL)


@attrs.frozen
class EventCursor:
    """Where ``events`` continues: after event ``after`` (a sequence number), reading from
    the server's cursor ``server`` (``None``: from the start).

    Written ``SEQUENCE:SERVER_CURSOR`` (``7:c6``; ``3:`` when the server gave none yet):
    the server's cursors mark pages, not events, so the sequence number makes it exact.
    A bare server cursor (from another client) is read as ``server`` alone.
    """

    after: int | None
    server: str | None

    @classmethod
    def parse(cls, text: str) -> EventCursor:
        """Read what ``--cursor`` was given; ``ValueError`` for what is no cursor."""
        if not text or len(text) > _MAX_CURSOR or not text.isprintable() or " " in text:
            raise ValueError(f"not a cursor: {text!r}")
        match = _OURS.fullmatch(text)
        if match is None:
            return cls(None, text)
        return cls(int(match.group(1)), match.group(2) or None)

    def __str__(self) -> str:
        if self.after is None:
            return self.server or ""
        return f"{self.after}:{self.server or ''}"


def read_stdin_file(name: str | None) -> str | None:
    """The text ``--stdin-file`` names ('-' = this process's stdin), or None without one."""
    if name is None:
        return None
    try:
        if name == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(name, "rb") as file:
                data = file.read()
    except OSError as exc:
        raise UsageError(f"cannot read --stdin-file {name}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(
            "--stdin-file must be UTF-8 text: the API carries stdin as a string"
        ) from None


def load_requests(name: str, machine: str | None, timeout: float | None) -> list[ExecutionRequest]:
    """Parse and check every line first: a typo on line 900 must not surface mid-run."""
    requests: list[ExecutionRequest] = []
    for number, line in enumerate(_read_lines(name), 1):
        if line.strip():
            requests.append(_request(f"{name}:{number}", line, machine, timeout))
    return requests


def _read_lines(name: str) -> list[str]:
    try:
        if name == "-":
            return sys.stdin.read().splitlines()
        with open(name, encoding="utf-8") as file:
            return file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {name}: {exc}") from None


def _request(where: str, line: str, machine: str | None, timeout: float | None) -> ExecutionRequest:
    """One line as a request; the command-line defaults fill what it leaves out."""
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise UsageError(f"{where}: not JSON: {exc}") from None
    if not isinstance(item, dict):
        raise UsageError(f"{where}: each line must be a JSON object")
    unknown = sorted(set(item) - _REQUEST_FIELDS)
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)}")
    # a null field means "not given": the command-line default applies
    given = {k: v for k, v in item.items() if v is not None}
    for name, value in given.items():
        problem = _json_problem(name, value)
        if problem is not None:
            raise UsageError(f"{where}: {name} {problem}")
    fields = {"machine_id": machine, "timeout": timeout, **given}
    if fields["machine_id"] is None:
        raise UsageError(f"{where}: no machine_id, and no --machine-id was given")
    try:
        # ExecutionRequest checks the values as the API would (the types are checked
        # above, in JSON's words rather than Python's)
        return ExecutionRequest(**fields)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None


def _json_problem(name: str, value: object) -> str | None:
    """What is wrong with the type (or range) of a field of a run-many line, said in JSON's
    terms (array, object, null), or ``None``."""
    if name == "command":
        if isinstance(value, list) and all(isinstance(arg, str) for arg in value):
            return None
        return 'must be an array of strings (argv, no shell), e.g. ["sh", "-c", "echo hi"]'
    if name == "env":
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return None
        return 'must be an object whose values are strings, e.g. {"A": "1"}'
    if name == "timeout":
        if is_number(value) and 0 < value <= MAX_WAIT_SECONDS:  # NaN fails too
            return None
        return (
            f"must be a positive number of seconds, at most {MAX_WAIT_SECONDS} (a year); "
            "leave it out (or null) to wait without a limit"
        )
    if name == "timeout_ms":
        if is_int(value) and 0 < value <= MAX_TIMEOUT_MS:
            return None
        return f"must be a positive whole number of milliseconds, at most {MAX_TIMEOUT_MS}"
    if not isinstance(value, str):  # machine_id, cwd, stdin, idempotency_key
        return "must be a string"
    return None
