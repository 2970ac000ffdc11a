"""The local backend: the executions API served on loopback, running real subprocesses.

:class:`LocalBackend` is the API's rules (:class:`~dedalus_async._server.ExecutionsServer`:
auth, idempotency, pagination, events) served over HTTP by
:class:`~dedalus_async._http_server.HTTPServer`, with :class:`SubprocessRunner` as the
:class:`~dedalus_async._records.Runner`: it runs every command as a real process **as the
current user, without a sandbox**. It binds to ``127.0.0.1`` only and requires an API key
drawn at random on every start.
The test kit's :class:`~dedalus_async.testing.FakeDedalus` serves the same rules through
the same :class:`~dedalus_async._http_server.HTTPServer`.

What an execution does, precisely (the real service documents none of this; these are the
local backend's choices):

Machines
    Any machine id is accepted. It maps to a directory ``<data_dir>/machines/<slug>-<hash>``
    where ``slug`` is a readable, sanitised prefix of the id (only ``[a-z0-9-]``) and
    ``hash`` is 12 hex of the SHA-256 of the exact id, so an id like ``../../etc`` or
    ``/etc`` can never name a directory outside ``machines/``, and ids differing only in
    case or punctuation never share one. The directory persists across executions and
    restarts, like ``/home/machine`` on a real machine. ``data_dir`` defaults to
    ``$DEDALUS_LOCAL_HOME``, else ``$XDG_DATA_HOME/dedalus-async``, else
    ``~/.local/share/dedalus-async``.
    ``/v1/machines`` lists, creates, sleeps, wakes and deletes them (the server's rules
    S1-S6 of :mod:`~dedalus_async._machine_records`, with these phases): create makes
    the directory (answering 200 ``running`` at once, or 202 ``starting`` for the
    ``wake_delay`` when there is one); sleep is instant; wake takes ``wake_delay``;
    delete first cancels the machine's executions still going (their processes are
    killed), then removes its directory and its executions' records, and the machine
    stays ``destroyed``: nothing runs on it again. Machines are kept on disk beside their
    directories (:mod:`dedalus_async._store`, rules M1-M4), so a later process finds
    them as they were left; a machine first met through an execution is made there too,
    running, with autosleep off.
Sleep and wake
    A machine created or steered through ``/v1/machines`` sleeps and wakes by its
    lifecycle: after its ``autosleep``, or when asked; an execution created on it while
    it sleeps reports ``wake_in_progress`` until the wake ends, then starts at once.
    Any other machine id sleeps by this runner's own rule: a machine it has not run
    anything on yet, or one idle (no execution in progress) for ``idle_timeout`` seconds,
    is asleep. An execution created on it first
    reports ``wake_in_progress`` with ``retry_after_ms`` set to the wake time left, waits
    ``wake_delay`` seconds (on the clock; executions created meanwhile share the same
    wake), then goes ``queued`` and ``running``.
Concurrency
    At most ``max_concurrency`` commands run at once across all machines; the others stay
    ``queued`` until a slot frees.
Command
    ``command`` is an argv list executed without a shell (``execvpe`` semantics: a bare
    program name is looked up on the ``PATH`` of the execution's environment). A program
    that cannot be started ends the execution ``failed`` with no exit code and
    ``error_code`` ``COMMAND_NOT_FOUND``, ``COMMAND_NOT_EXECUTABLE``, ``INVALID_ARGUMENT``
    (a NUL byte in an argument or in env) or ``SPAWN_FAILED``; a machine directory that
    cannot be created gives ``MACHINE_UNAVAILABLE``.
Working directory
    Default: the machine's directory. A relative ``cwd`` is taken relative to it; an
    absolute one must be ``/home/machine`` or below it, which maps to the machine's
    directory (so requests written for a real machine work unchanged). After symlinks are
    resolved the directory must still be inside the machine's directory and must exist;
    otherwise the execution ends ``failed`` with ``error_code="INVALID_CWD"``. Only
    ``cwd`` is mapped: arguments reach the command unchanged, so refer to files relative
    to the working directory or through ``$HOME``. This keeps
    executions from wandering into your files by accident; it is **not** a sandbox: the
    command runs as you and can touch anything you can.
Environment
    The backend process's own environment, without ``DEDALUS_API_KEY`` and
    ``DEDALUS_X_API_KEY`` (credentials never flow into commands), then ``HOME`` = the
    machine's directory, ``PWD`` = the working directory, ``DEDALUS_MACHINE_ID`` and
    ``DEDALUS_EXECUTION_ID``, then the request's ``env`` on top (it wins, ``HOME`` too).
Stdin
    The request's ``stdin`` is written UTF-8 encoded, then the pipe is closed; without
    ``stdin`` the command reads from ``/dev/null``.
Output
    stdout and stderr are read while the command runs, decoded as UTF-8 (invalid bytes
    become U+FFFD) and kept once: ``/output`` is the events of a stream joined. The first
    ``output_cap`` bytes of each stream are kept; the rest is read and dropped.
    ``stdout_bytes``/``stderr_bytes`` count every byte the command wrote; ``*_truncated``
    is true when that exceeds the cap.
Output events
    What a command writes is gathered and logged as one event when someone reads the
    execution (any request that shows it: a GET, a list, ``/output``, ``/events``) and
    the gathering began 20 ms ago or more, when 64 KiB have piled up, when the other
    stream writes, and when the execution ends. So every read sees everything the
    command wrote up to 20 ms before it, an event once served never changes (a cursor
    stays valid), and a command making a million one-byte writes costs a few events per
    read, not a million, even under a follower that asks again as soon as it gets
    something. Events follow the order in which the two streams wrote; each is stamped
    with the moment its first byte arrived. (The 20 ms are real time, whatever the clock:
    they batch the kernel's pipe reads, they are no rule of the API.)
    An execution logs at most ``max_events`` events (default 10 000, lifecycle events
    included). Once only room for the end is left, output is still kept but no longer
    logged as it arrives: what is left of each stream is logged as one event per stream
    when the execution ends (or is cancelled), so the events joined still equal
    ``/output``, which until then shows what was logged.
Exit
    Exit status 0: ``succeeded`` with ``exit_code=0``. Non-zero: ``failed`` with that
    ``exit_code``. Killed by a signal: ``failed``, ``signal`` = its number, no
    ``exit_code`` (not 128+n: the API has a field for the signal). When the main process
    exits, whatever is left in its process group is killed with SIGKILL: an execution
    leaves no processes behind (a process that starts its own session escapes this).
Timeout
    ``timeout_ms`` counts from the moment the process started. When it passes, the whole
    process group gets SIGKILL and the execution ends ``failed`` with ``signal=9``, no exit
    code and ``error_code="TIMEOUT"`` (as the fake server reports it).
Logs
    Output is kept for ``/output`` and ``/events``; no log stream is captured or published:
    every execution's ``log_capture`` is ``{"state": "unavailable", "code":
    "LOCAL_BACKEND_NO_LOG_STREAM"}``, ``GET .../logs`` says the same and
    ``POST .../logs/token`` is 409 ``LOGS_UNAVAILABLE``.
Cancel
    DELETE of an execution that has not ended kills its process group with SIGKILL and
    reports ``cancelled`` at once (``signal=9`` when a process was killed).
Records
    Every execution's record is kept on disk under ``<data_dir>/executions/``
    (:mod:`dedalus_async._store` has the rules): any later backend on the same
    ``data_dir``, in any process, answers for it (``dedalus-async get --local`` after a
    ``run --local``), and two processes on one ``data_dir`` at once see each other's
    executions without writing each other's files. A record is saved on create, on each
    status change, every 0.25 s while output arrives (a save counts as a read of the
    execution: the output gathered is logged first) and at the end. An execution whose
    process died before it ended reads as ``failed`` with ``error_code``
    ``execution_runner_interrupted``. A DELETE of another live process's unfinished
    execution is carried out by that process within 0.1 s. The runner's own sleep and
    wake, idempotency keys and the ``stdin`` and ``env`` values of a request stay in the
    memory of the process that took it; a machine is read from disk once per process
    (what another process does to it afterwards is not seen by this one).
Time
    Every time the runner reads or waits for comes from its :class:`~dedalus_async.Clock`
    (real by default): timestamps, idle time, the wake, the running hint and
    ``timeout_ms``. So with a :class:`~dedalus_async.testing.FakeClock` a test moves those
    without waiting, while the processes still run for real. The only real-time waits are
    the bounds on waiting for the kernel (a killed process to be reaped, pipes to drain
    after the exit, tasks to end on close): they are about the operating system, not the
    API's rules, and a fake clock would cut them short. A fake clock moves whenever anyone
    sleeps on it, the runner's own timers included: under one, a wake or a ``timeout_ms``
    elapses at once.

POSIX only: process groups and ``os.killpg``.
"""

from __future__ import annotations

import asyncio
import codecs
import getpass
import hashlib
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Final

import attrs

from ._checks import check_count, is_number
from ._clock import Clock, SystemClock
from ._http_server import HTTPServer
from ._machine_records import MachineTimings
from ._records import ExecutionRecord, to_millis
from ._server import ExecutionsServer
from ._session import Session
from ._store import SAVE_EVERY, WATCH_EVERY, ExecutionStore, MachineFolders

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_EVENTS",
    "DEFAULT_OUTPUT_CAP",
    "LOG_CAPTURE",
    "MACHINE_HOME",
    "LocalBackend",
    "SubprocessRunner",
    "current_user",
    "default_data_dir",
    "machine_dirname",
    "resolve_cwd",
]

logger = logging.getLogger("dedalus_async.local")

#: Bytes of each stream an execution keeps by default (1 MiB, the server's default too).
DEFAULT_OUTPUT_CAP: Final = 1_048_576
#: The largest request body the local backend reads (8 MiB). The largest body the API takes
#: is a create, and it carries ``stdin`` as a JSON string: 8 MiB lets through several MiB
#: of plain-text stdin (more than 1 MiB even when JSON escapes every character as
#: ``\uXXXX``), while requests read at once cost at most 8 MiB each. Unauthenticated
#: requests cost nothing: the key is checked before the body is read.
DEFAULT_MAX_BODY_SIZE: Final = 8 * 1024 * 1024
#: Events an execution logs at most by default (see "Output events" in the module doc):
#: with output gathered between reads, ~200 bytes each, so ~2 MB at worst per execution.
DEFAULT_MAX_EVENTS: Final = 10_000
#: The ``log_capture`` of every local execution: it keeps output for ``/output`` and
#: ``/events`` but captures no log stream, so ``.../logs/token`` is 409.
LOG_CAPTURE: Final = {"state": "unavailable", "code": "LOCAL_BACKEND_NO_LOG_STREAM"}
#: The absolute path that stands for a machine's directory in ``cwd``.
MACHINE_HOME: Final = PurePosixPath("/home/machine")

# Variables that carry credentials: never handed to commands.
_SECRET_ENV: Final = ("DEDALUS_API_KEY", "DEDALUS_X_API_KEY")
# Hints for pollers: the backend is local, so asking again soon is cheap. A command that
# just started is likely a short one: the hint starts at 50 ms (quick results, live
# output for event followers) and grows with the run time to 250 ms (gentle on long ones).
_QUEUED_HINT_MS: Final = 50
_RUNNING_HINT_MIN_MS: Final = 50
_RUNNING_HINT_MAX_MS: Final = 250
# After the main process ends (and its group is killed), how long to keep reading pipes
# that a process outside the group (one that called setsid) may still hold open.
_DRAIN_TIMEOUT: Final = 1.0
_SLUG_BAD: Final = re.compile(r"[^a-z0-9]+")
_NEVER: Final = datetime.max.replace(tzinfo=UTC)
# Output gathered for one event is logged once it reaches this size, read or not.
_FLUSH_SIZE: Final = 64 * 1024
# A read logs gathered output only once it has gathered this long (real seconds): a reader
# that asks again at once then finds nothing new and waits for its hint, rather than
# making one event of every few bytes.
_GATHER_WINDOW: Final = 0.02
# Events that may still come once output stops being logged live: the rest of each stream
# (one event each) and the terminal lifecycle event.
_END_EVENTS: Final = 3
# Events logged before a command can write (wake_in_progress, queued, running) plus one:
# the smallest max_events that still logs some output live.
_MIN_EVENTS: Final = 4 + _END_EVENTS
# How long aiohttp keeps reading (and dropping) the rest of a body it refused before it
# closes the connection: long enough for a client to finish a small request and read the
# answer, short enough that a refused upload costs little.
_LINGER: Final = 1.0


def default_data_dir() -> Path:
    """Where the local backend keeps machines when no ``data_dir`` is given.

    ``$DEDALUS_LOCAL_HOME``, else ``$XDG_DATA_HOME/dedalus-async``, else
    ``~/.local/share/dedalus-async``.
    """
    explicit = os.environ.get("DEDALUS_LOCAL_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "dedalus-async"


def machine_dirname(machine_id: str) -> str:
    """The name of a machine's directory: ``<slug>-<12 hex of sha256(id)>``.

    Always one plain path component (never ``.``, ``..`` or anything with a separator),
    whatever the id is; the hash keeps distinct ids in distinct directories.
    """
    digest = hashlib.sha256(machine_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    slug = _SLUG_BAD.sub("-", machine_id.lower()).strip("-")[:48].rstrip("-")
    return f"{slug or 'machine'}-{digest}"


def resolve_cwd(machine_dir: Path, cwd: str | None) -> Path:
    """The real directory an execution with this ``cwd`` runs in, or ``ValueError``.

    See the module docstring: relative to the machine's directory, ``/home/machine/...``
    mapped onto it, symlinks resolved, must stay inside and must exist.
    """
    root = Path(os.path.realpath(machine_dir))
    if not cwd:
        return root
    if "\x00" in cwd:
        raise ValueError("cwd must not contain NUL")
    path = PurePosixPath(cwd)
    if path.is_absolute():
        try:
            path = path.relative_to(MACHINE_HOME)
        except ValueError:
            raise ValueError(
                f"cwd {cwd!r} is outside the machine: use a path relative to its home "
                f"directory, or one under {MACHINE_HOME}"
            ) from None
    target = Path(os.path.realpath(root / path))
    if target != root and root not in target.parents:
        raise ValueError(f"cwd {cwd!r} leads outside the machine's home directory")
    if not target.is_dir():
        raise ValueError(f"cwd {cwd!r} is not an existing directory on the machine")
    return target


class _DirError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _prepare_dirs(directory: Path, cwd: str | None) -> tuple[Path, Path]:
    """Create the machine's directory; return it (resolved) and the execution's cwd.

    Synchronous on purpose: a mkdir and a few stats on a local disk cost microseconds,
    less than a hop to a worker thread.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise _DirError(
            "MACHINE_UNAVAILABLE", f"cannot create {directory}: {exc.strerror}"
        ) from None
    try:
        return Path(os.path.realpath(directory)), resolve_cwd(directory, cwd)
    except ValueError as exc:
        raise _DirError("INVALID_CWD", str(exc)) from None


def _kill_group(pgid: int) -> bool:
    """SIGKILL a process group; False when it is already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The group's only members are zombies or processes that changed user: nothing
        # more we can do, and nothing that still runs as us.
        return False
    return True


def _check_delay(name: str, value: object, *, infinite_ok: bool) -> float:
    """Seconds that may be 0 (no wait), as a float; ``math.inf`` only if ``infinite_ok``."""
    if not is_number(value):
        raise TypeError(f"{name} must be seconds (an int or a float), not {type(value).__name__}")
    assert isinstance(value, int | float)
    if not value >= 0 or (value == math.inf and not infinite_ok):  # NaN fails >= 0
        finite = "" if infinite_ok else " and finite"
        raise ValueError(f"{name} must be >= 0{finite} seconds, got {value}")
    return float(value)


def _running_hint_ms(ran: float) -> int:
    """``retry_after_ms`` for a command that has run ``ran`` seconds: a tenth of it, clamped."""
    return min(_RUNNING_HINT_MAX_MS, max(_RUNNING_HINT_MIN_MS, int(ran * 100)))


def _wire_now(clock: Clock) -> datetime:
    """The clock's wall time at wire precision: every record change is stamped with it."""
    return to_millis(clock.now())


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@attrs.define(eq=False)
class _Machine:
    """What the runner remembers about one machine (in memory: a restart sleeps them all)."""

    directory: Path
    # Executions started and not yet finished; a busy machine never falls asleep.
    busy: int = 0
    # monotonic time of the last finish; None = never ran here since this runner started
    last_active: float | None = None
    # monotonic time the wake in progress ends, if one is
    wake_ends: float | None = None


@attrs.define(eq=False)
class _Job:
    """The runner's state for one execution (kept as ``record.runner_state``)."""

    record: ExecutionRecord
    machine: _Machine
    task: asyncio.Task[None] | None = None
    # set once the process is spawned
    pid: int | None = None
    protocol: _CommandProtocol | None = None
    # monotonic time the machine's wake ends, when this execution had to wait for one
    wake_ends: float | None = None

    def kill(self) -> bool:
        """SIGKILL the command's process group if the command still runs; True if it did."""
        if self.pid is None or self.protocol is None or self.protocol.exited.done():
            return False
        return _kill_group(self.pid)

    def end_output(self) -> None:
        """Log the output gathered so far, before the record ends some other way than by
        the command's exit (what comes after that is dropped)."""
        if self.protocol is not None:
            self.protocol.flush(final=False)


class SubprocessRunner:
    """A :class:`~dedalus_async._records.Runner` that runs each command as a local process.

    Semantics (environment, working directory, caps, signals, timeouts, sleep and wake,
    time) are described in :mod:`dedalus_async._local`. Every execution is driven by its
    own task on the event loop; :meth:`aclose` kills and awaits them all. ``clock`` is
    read for every timestamp, idle time, wake and timeout (real time by default). With a
    ``store``, every record is saved there as it changes ("Records" in the module doc).
    """

    def __init__(
        self,
        machines_dir: str | os.PathLike[str],
        *,
        output_cap: int = DEFAULT_OUTPUT_CAP,
        idle_timeout: float = 300.0,
        wake_delay: float = 0.2,
        max_concurrency: int = 32,
        max_events: int = DEFAULT_MAX_EVENTS,
        clock: Clock | None = None,
        store: ExecutionStore | None = None,
    ) -> None:
        self.machines_dir = Path(machines_dir)
        #: where records are saved for other processes (None: memory only)
        self.store = store
        self.output_cap = check_count("output_cap", output_cap, minimum=0)
        # math.inf: a machine never falls asleep once it has run something
        self.idle_timeout = _check_delay("idle_timeout", idle_timeout, infinite_ok=True)
        self.wake_delay = _check_delay("wake_delay", wake_delay, infinite_ok=False)
        self.max_concurrency = check_count("max_concurrency", max_concurrency)
        self.max_events = check_count("max_events", max_events, minimum=_MIN_EVENTS)
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._machines: dict[str, _Machine] = {}
        # machines whose sleep and wake are their lifecycle's (created or steered through
        # /v1/machines): the server holds their executions while they sleep or wake
        self._managed: set[str] = set()
        self._jobs: dict[str, _Job] = {}
        # Created lazily: the runner may be built outside the loop that will run it.
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"SubprocessRunner({str(self.machines_dir)!r}, running={len(self._jobs)}, "
            f"output_cap={self.output_cap})"
        )

    def machine_dir(self, machine_id: str) -> Path:
        """The directory of a machine (not created here)."""
        return self.machines_dir / machine_dirname(machine_id)

    def _machine(self, machine_id: str) -> _Machine:
        machine = self._machines.get(machine_id)
        if machine is None:
            machine = _Machine(self.machine_dir(machine_id))
            self._machines[machine_id] = machine
        return machine

    def manage(self, machine_id: str) -> None:
        """Leave the machine's sleep and wake to its lifecycle (``/v1/machines``): its
        executions start without this runner's own wake."""
        self._managed.add(machine_id)

    # --- the Runner protocol -------------------------------------------------------------

    def start(self, record: ExecutionRecord) -> None:
        """Decide wake or not, log the first status, and start the execution's task."""
        # output is kept in /output and /events only: there is no log stream to publish
        record.log_capture = dict(LOG_CAPTURE)
        if self.store is not None:
            self.store.claim(record)
        if self._closed:
            record.finish(
                "failed", self._stamp(), error_code="BACKEND_CLOSED", error_message="closed"
            )
            self._save(record)
            return
        loop = asyncio.get_running_loop()
        machine = self._machine(record.machine_id)
        now = self.clock.monotonic()
        if machine.wake_ends is not None and machine.wake_ends <= now:
            machine.wake_ends = None
        # ready: the server held the execution until its machine woke; managed: the
        # machine's lifecycle is awake (or the server would have held it): no second wake
        awake = record.ready is not None or record.machine_id in self._managed
        asleep = (
            not awake
            and machine.busy == 0
            and (machine.last_active is None or now - machine.last_active >= self.idle_timeout)
        )
        if machine.wake_ends is None and asleep and self.wake_delay > 0:
            machine.wake_ends = now + self.wake_delay
        machine.busy += 1
        wake_ends = None if awake else machine.wake_ends
        if wake_ends is not None:
            left_ms = max(1, math.ceil((wake_ends - now) * 1000 - 1e-6))
            record.transition("wake_in_progress", self._stamp(), retry_after_ms=left_ms)
        else:
            record.transition("queued", self._stamp(), retry_after_ms=_QUEUED_HINT_MS)
        job = _Job(record, machine, wake_ends=wake_ends)
        record.runner_state = job
        self._jobs[record.execution_id] = job
        self._save(record)
        job.task = loop.create_task(self._play(job), name=f"dedalus-local-{record.execution_id}")

    def refresh(self, record: ExecutionRecord) -> None:
        """Log the output gathered since the last read and update the polling hint of a
        running execution (its task does the rest, live)."""
        job = self._jobs.get(record.execution_id)
        if job is not None and job.protocol is not None and record.status == "running":
            job.protocol.log_output()
            ran = self.clock.monotonic() - job.protocol.started
            record.retry_after_ms = _running_hint_ms(ran)

    def cancel(self, record: ExecutionRecord) -> None:
        """Kill the execution's process group (if it runs) and mark it ``cancelled`` now;
        another process's execution is cancelled by that process (S5 of ``_store``)."""
        job = self._jobs.get(record.execution_id)
        store = self.store
        if job is None and store is not None and not store.owns(record):
            store.request_cancel(record)
            record.finish("cancelled", self._stamp(), error_message="cancelled by DELETE")
            return
        killed = job is not None and job.kill()
        if job is not None:
            job.end_output()
        record.finish(
            "cancelled",
            self._stamp(),
            signal=int(signal.SIGKILL) if killed else None,
            error_message="cancelled by DELETE",
        )
        self._save(record)

    async def aclose(self) -> None:
        """Kill every running command and wait for the executions' tasks to end."""
        self._closed = True
        jobs = list(self._jobs.values())
        for job in jobs:
            job.end_output()
            job.record.finish(
                "cancelled",
                self._stamp(),
                error_code="BACKEND_CLOSED",
                error_message="the local backend shut down",
            )
            self._save(job.record)
            job.kill()
        tasks = [job.task for job in jobs if job.task is not None]
        if tasks:
            # Killed commands end within moments: let their tasks reap them, so that no
            # process outlives the event loop; then cancel whatever still waits.
            _, pending = await asyncio.wait(tasks, timeout=_DRAIN_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- one execution -------------------------------------------------------------------

    async def _play(self, job: _Job) -> None:
        record = job.record
        machine = job.machine
        watch = None
        if self.store is not None:
            watch = asyncio.create_task(self._watch(job, self.store))
        try:
            await self._wake(job)
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.max_concurrency)
            async with self._slots:
                if not record.is_terminal:
                    await self._run(job)
        except asyncio.CancelledError:
            job.end_output()
            record.finish(
                "cancelled",
                self._stamp(),
                error_code="BACKEND_CLOSED",
                error_message="the local backend shut down",
            )
            raise
        except Exception as exc:
            # A bug here must not leave the execution hanging in "running" forever.
            logger.exception("local execution %s failed in the runner", record.execution_id)
            self._fail(record, "RUNNER_ERROR", repr(exc))
        finally:
            machine.busy -= 1
            machine.last_active = self.clock.monotonic()
            self._jobs.pop(record.execution_id, None)
            self._save(record)
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)

    def _stamp(self) -> datetime:
        return _wire_now(self.clock)

    def _save(self, record: ExecutionRecord) -> None:
        if self.store is not None:
            job = self._jobs.get(record.execution_id)
            self.store.save(record, pid=None if job is None else job.pid)

    async def _watch(self, job: _Job, store: ExecutionStore) -> None:
        """Save the record as it changes and carry out a DELETE asked by another process
        (S3, S5 of ``_store``); real time, like the gathering window: it is about the disk
        and other processes, not the API's rules."""
        record = job.record
        saved = (record.status, len(record.events), job.pid)
        last = time.monotonic()
        while not record.is_terminal:
            await asyncio.sleep(WATCH_EVERY)
            if store.cancel_requested(record):
                self.cancel(record)
                return
            now = time.monotonic()
            if now - last >= SAVE_EVERY and job.protocol is not None:
                job.protocol.log_output()  # a save reads the execution like a GET
            current = (record.status, len(record.events), job.pid)
            if (
                current[0] != saved[0]
                or current[2] != saved[2]
                or (current != saved and now - last >= SAVE_EVERY)
            ):
                self._save(record)
                saved, last = current, now

    async def _wake(self, job: _Job) -> None:
        if job.wake_ends is not None:
            await self.clock.sleep(max(0.0, job.wake_ends - self.clock.monotonic()))
            job.record.transition("queued", self._stamp(), retry_after_ms=_QUEUED_HINT_MS)

    def _fail(self, record: ExecutionRecord, code: str, message: str) -> None:
        record.finish("failed", self._stamp(), error_code=code, error_message=message)

    def _environment(self, record: ExecutionRecord, home: Path, cwd: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        env["HOME"] = str(home)
        env["PWD"] = str(cwd)
        env["DEDALUS_MACHINE_ID"] = record.machine_id
        env["DEDALUS_EXECUTION_ID"] = record.execution_id
        if record.env:
            env.update(record.env)
        return env

    async def _spawn(
        self, job: _Job
    ) -> tuple[asyncio.SubprocessTransport, _CommandProtocol] | None:
        """Start the process, or end the execution ``failed`` and return None."""
        record = job.record
        try:
            home, cwd = _prepare_dirs(job.machine.directory, record.cwd)
        except _DirError as exc:
            self._fail(record, exc.code, str(exc))
            return None
        env = self._environment(record, home, cwd)
        program = record.command[0]
        loop = asyncio.get_running_loop()
        try:
            # A protocol rather than create_subprocess_exec: Process.wait() also waits for
            # the pipes to close, which a background child holding stdout can delay
            # forever; process_exited() says when the command itself ended.
            return await loop.subprocess_exec(
                lambda: _CommandProtocol(
                    record, self.output_cap, loop, self.clock, self.max_events
                ),
                *record.command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL if record.stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # its own process group, so that a timeout or a cancel can kill the
                # command and everything it started, and a Ctrl-C meant for the backend
                # does not reach it
                start_new_session=True,
            )
        except FileNotFoundError:
            self._fail(record, "COMMAND_NOT_FOUND", f"{program}: command not found")
        except PermissionError:
            self._fail(record, "COMMAND_NOT_EXECUTABLE", f"{program}: permission denied")
        except ValueError as exc:  # a NUL in an argument or in env, '=' in an env name
            self._fail(record, "INVALID_ARGUMENT", f"cannot start {program}: {exc}")
        except OSError as exc:
            self._fail(record, "SPAWN_FAILED", f"cannot start {program}: {exc}")
        return None

    async def _exit_or_timeout(self, record: ExecutionRecord, protocol: _CommandProtocol) -> bool:
        """Wait for the command to exit; True when ``timeout_ms`` passed first.

        The deadline counts from the moment the process started, on the clock.
        """
        if record.timeout_ms is None:
            await asyncio.wait([protocol.exited])  # waits without cancelling the future
            return False
        deadline = protocol.started + record.timeout_ms / 1000
        left = max(0.0, deadline - self.clock.monotonic())
        timer = asyncio.ensure_future(self.clock.sleep(left))
        try:
            await asyncio.wait([protocol.exited, timer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        # an exit and the deadline in the same moment: the command made it
        return not protocol.exited.done()

    async def _run(self, job: _Job) -> None:
        record = job.record
        spawned = await self._spawn(job)
        if spawned is None:
            return
        transport, protocol = spawned
        job.pid = transport.get_pid()
        job.protocol = protocol
        self._save(record)  # running, with the process group S4 of _store may have to kill
        timed_out = False
        try:
            if record.is_terminal:  # cancelled while the process was being started
                return
            stdin = transport.get_pipe_transport(0)
            if stdin is not None:
                # buffered by the transport and flushed before it closes; a command that
                # exits without reading it just closes the pipe (no error reaches us)
                assert isinstance(stdin, asyncio.WriteTransport)
                stdin.write((record.stdin or "").encode("utf-8", "surrogatepass"))
                stdin.close()
            timed_out = await self._exit_or_timeout(record, protocol)
            if timed_out:
                job.kill()
                await asyncio.wait([protocol.exited], timeout=_DRAIN_TIMEOUT)
            # anything the command left behind in its group goes with it
            _kill_group(job.pid)
            # output written just before the exit may still be in the pipes
            await asyncio.wait([protocol.closed], timeout=_DRAIN_TIMEOUT)
        finally:
            if job.kill():  # cancelled (the backend is closing): reap it before leaving
                await asyncio.wait([protocol.exited], timeout=_DRAIN_TIMEOUT)
            transport.close()
        protocol.flush(final=True)
        returncode = transport.get_returncode()
        at = self._stamp()
        if timed_out:
            record.finish(
                "failed",
                at,
                signal=int(signal.SIGKILL),
                error_code="TIMEOUT",
                error_message=f"command exceeded timeout_ms={record.timeout_ms}",
            )
        elif returncode is None:  # it did not die within the drain time: report the kill
            record.finish(
                "failed",
                at,
                signal=int(signal.SIGKILL),
                error_code="UNRESPONSIVE",
                error_message="command did not end after SIGKILL",
            )
        elif returncode < 0:
            record.finish(
                "failed",
                at,
                signal=-returncode,
                error_message=f"command killed by {_signal_name(-returncode)}",
            )
        elif returncode == 0:
            record.finish("succeeded", at, exit_code=0)
        else:
            record.finish("failed", at, exit_code=returncode)


class _Capture:
    """One output stream of a command: counted, and kept up to the cap in ``pending``
    until :meth:`flush` logs it as one event."""

    __slots__ = (
        "_decoder",
        "cap",
        "clock",
        "kept",
        "pending",
        "pending_at",
        "pending_since",
        "record",
        "stream",
        "total",
    )

    def __init__(self, record: ExecutionRecord, stream: str, cap: int, clock: Clock) -> None:
        self.record = record
        self.clock = clock
        self.stream = stream
        self.cap = cap
        self.total = 0
        self.kept = 0
        #: bytes kept and not yet logged, and the wire time the first of them arrived
        self.pending = bytearray()
        self.pending_at: datetime | None = None
        self.pending_since = 0.0  # time.monotonic() then, for the gathering window
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> None:
        """Count ``data``; gather what fits under the cap."""
        self.total += len(data)
        record = self.record
        if record.is_terminal:
            return  # the record never changes after its end; the data is drained, dropped
        if self.kept < self.cap:
            part = data[: self.cap - self.kept]
            self.kept += len(part)
            if not self.pending:
                self.pending_at = _wire_now(self.clock)
                self.pending_since = time.monotonic()
            self.pending += part
        _set_bytes(record, self.stream, self.total)

    def flush(self, *, final: bool = False) -> None:
        """Log what was gathered as one event (nothing once the record is terminal).

        ``final`` (the command ended): a trailing incomplete character becomes U+FFFD,
        unless the cap cut the stream (then the character cut in half is dropped).
        """
        pending = self.pending
        at = self.pending_at
        if not pending and not final:
            return
        record = self.record
        text = self._decoder.decode(pending, final=final and self.kept == self.total)
        pending.clear()
        self.pending_at = None
        if text and not record.is_terminal:
            record.append_output(self.stream, text, at or _wire_now(self.clock))
            _set_bytes(record, self.stream, self.total)


class _CommandProtocol(asyncio.SubprocessProtocol):
    """Receives a command's output and tells when it exited and when its pipes closed.

    Output is gathered per stream and logged as events by :meth:`log_output` (on a read
    of the execution, once gathered for ``_GATHER_WINDOW``), past ``_FLUSH_SIZE``, when
    the other stream writes, and by :meth:`flush` at the end; at most ``max_events``
    events in all (module docstring).
    """

    def __init__(
        self,
        record: ExecutionRecord,
        cap: int,
        loop: asyncio.AbstractEventLoop,
        clock: Clock,
        max_events: int = DEFAULT_MAX_EVENTS,
    ) -> None:
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._clock = clock
        #: the clock's monotonic time the process started
        self.started = clock.monotonic()
        self._record = record
        # past this many events, output waits for the end (room is left for it)
        self._live_events = max_events - _END_EVENTS
        self._stdout = _Capture(record, "stdout", cap, clock)
        self._stderr = _Capture(record, "stderr", cap, clock)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio calls this before delivering any output, so the event log always
        # reads "running" before the first chunk
        self.started = self._clock.monotonic()
        self._record.transition(
            "running", _wire_now(self._clock), retry_after_ms=_RUNNING_HINT_MIN_MS
        )

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        if fd == 1:
            capture, other = self._stdout, self._stderr
        elif fd == 2:
            capture, other = self._stderr, self._stdout
        else:
            return
        if other.pending:
            self._log(other)  # events keep the order in which the streams wrote
        capture.feed(bytes(data))
        if len(capture.pending) >= _FLUSH_SIZE:
            self._log(capture)

    def _log(self, capture: _Capture) -> None:
        if len(self._record.events) < self._live_events:
            capture.flush()

    def log_output(self) -> None:
        """Log what was gathered for ``_GATHER_WINDOW`` at least (called before every read
        of the execution)."""
        since = time.monotonic() - _GATHER_WINDOW
        for capture in (self._stdout, self._stderr):
            if capture.pending and capture.pending_since <= since:
                self._log(capture)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        # called once the process has exited and every pipe is closed
        if not self.closed.done():
            self.closed.set_result(None)

    def flush(self, *, final: bool) -> None:
        """Log everything gathered, event cap or not, in the order it arrived (call once
        the record is about to end; ``final``: the command ended, flush the decoders)."""
        for capture in sorted((self._stdout, self._stderr), key=_arrival):
            capture.flush(final=final)


def _arrival(capture: _Capture) -> datetime:
    # when a stream's gathered output began (nothing gathered: last; ties keep stdout first)
    return capture.pending_at or _NEVER


def _set_bytes(record: ExecutionRecord, stream: str, total: int) -> None:
    # append_output counts the decoded text it keeps; the API's *_bytes is what the command
    # wrote, bytes dropped by the cap and undecodable ones included
    if stream == "stdout":
        record.stdout_bytes = total
    else:
        record.stderr_bytes = total


class LocalBackend:
    """The executions API on ``127.0.0.1``, running commands as local processes.

    ::

        async with LocalBackend() as backend:
            async with backend.session() as session:
                result = await session.run("dm-local", ["uname", "-a"])

    **Commands run as the current user, with no sandbox.** The server listens on
    ``127.0.0.1`` only and accepts only :attr:`api_key`, drawn at random on every start.
    The semantics of executions are in :mod:`dedalus_async._local`.

    Arguments:
        data_dir: where machines live (``<data_dir>/machines/...``); defaults to
            :func:`default_data_dir`.
        port: TCP port on 127.0.0.1; 0 picks a free one.
        output_cap: bytes of each stream kept per execution.
        idle_timeout: seconds without executions after which a machine falls asleep.
        wake_delay: seconds a sleeping machine takes to wake.
        max_concurrency: commands running at once; the others wait ``queued``.
        max_events: events an execution logs at most (see "Output events" in
            :mod:`dedalus_async._local`).
        max_body_size: the largest request body read, in bytes; a larger one is 413
            ``PAYLOAD_TOO_LARGE`` (requests without the right key are refused before their
            body is read, whatever its size).
        announce: log a WARNING on start saying where it listens and whom it runs as.
        clock: the time the server and the runner read (real time by default; see the
            module docstring for what a fake clock moves).
    """

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        port: int = 0,
        output_cap: int = DEFAULT_OUTPUT_CAP,
        idle_timeout: float = 300.0,
        wake_delay: float = 0.2,
        max_concurrency: int = 32,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        announce: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self.data_dir: Path = Path(data_dir) if data_dir is not None else default_data_dir()
        self.machines_dir: Path = self.data_dir / "machines"
        self.clock: Clock = clock if clock is not None else SystemClock()
        #: the records on disk, shared with every backend on the same ``data_dir``
        self.store = ExecutionStore(
            self.data_dir, dirname=machine_dirname, output_cap=output_cap, clock=self.clock
        )
        self.runner = SubprocessRunner(
            self.machines_dir,
            output_cap=output_cap,
            idle_timeout=idle_timeout,
            wake_delay=wake_delay,
            max_concurrency=max_concurrency,
            max_events=max_events,
            clock=self.clock,
            store=self.store,
        )
        # a local machine's phases: none but a wake, which takes the runner's wake_delay
        timings = MachineTimings(
            placement=0,
            start=self.runner.wake_delay,
            wake=self.runner.wake_delay,
            stop=0,
            destroy=0,
        )
        #: the machines on disk: a folder each (rules M1-M4 of :mod:`dedalus_async._store`)
        self.machines = MachineFolders(
            self.machines_dir,
            dirname=machine_dirname,
            records_dir=self.store.root,
            timings=timings,
            managed=self.runner.manage,
            clock=self.clock,
        )
        self._api_key = secrets.token_urlsafe(32)
        self.announce = announce
        #: The API's state and rules, with :attr:`runner` behind them.
        self.server = ExecutionsServer(
            api_key=self._api_key,
            runner=self.runner,
            clock=self.clock,
            output_cap=output_cap,
            name="LocalBackend",
            store=self.store,
            machine_store=self.machines,
        )
        self.server.machine_timings = timings
        #: :attr:`server` on ``127.0.0.1:port``.
        self.http = HTTPServer(
            self.server,
            host="127.0.0.1",
            port=port,
            max_body_size=max_body_size,
            lingering_time=_LINGER,
        )

    def __repr__(self) -> str:
        try:
            where = self.base_url
        except RuntimeError:
            where = "not started"
        return f"<LocalBackend {where} data_dir={str(self.data_dir)!r}>"

    @property
    def api_key(self) -> str:
        """The key clients must send (``x-api-key`` or Bearer); new on every instance."""
        return self._api_key

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` once started."""
        return self.http.base_url

    def machine_dir(self, machine_id: str) -> Path:
        """The directory a machine's commands run in (created by its first execution)."""
        return self.runner.machine_dir(machine_id)

    def session(self, **kwargs: Any) -> Session:
        """A new (not yet opened) :class:`Session` pointed at this backend.

        Keyword arguments go to :class:`Session` (``poll``, ``retry``, ...).
        """
        return Session(
            api_key=self._api_key, base_url=self.base_url, auth_scheme="x-api-key", **kwargs
        )

    async def start(self) -> None:
        """Create the data directory and start serving (``async with`` does this)."""
        self.machines_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store.open()
        try:
            await self.http.start()
        except BaseException:
            self.store.close()
            raise
        if self.announce:
            logger.warning(
                "dedalus-async local backend at %s runs commands as user %r on this computer, "
                "without a sandbox (machines in %s)",
                self.base_url,
                current_user(),
                self.machines_dir,
            )

    async def close(self) -> None:
        """Stop serving and kill every command still running. Safe to call twice."""
        try:
            await self.http.close()  # the runner saves every record it ends
        finally:
            self.store.close()

    async def __aenter__(self) -> LocalBackend:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def current_user() -> str:
    """The name of the user commands run as (or ``uid N`` when it has none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers): show the number
        return f"uid {os.getuid()}"
