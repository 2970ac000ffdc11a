"""The local backend's records on disk: its executions (:class:`ExecutionStore`) and its
machines (:class:`MachineFolders`), what a later process, or another one at the same time,
reads back (``dedalus-async get --local`` after ``run --local``, a ``serve-local`` next to
a ``run --local``, ``machines get --local`` after ``machines create --local``).

Layout under the backend's ``data_dir``::

    executions/<machine dirname>/<execution_id>.json    the record but its events
    executions/<machine dirname>/<execution_id>.events  its events, one JSON line each
    executions/<machine dirname>/<execution_id>.cancel  a DELETE asked by another process
    owners/<token>.lock                                 held by the process running them

``<machine dirname>`` is the machine's directory name under ``machines/``
(:func:`~dedalus_async._local.machine_dirname`), so no machine id can lead outside.

The rules, cited from the code as S1-S7:

S1  One owner per record: the process whose runner plays an execution is the only one that
    writes its record while it runs. Every process holds an exclusive ``flock`` on its own
    ``owners/<token>.lock`` for as long as its backend is open; the kernel drops it when
    the process dies, however it dies, so a free lock means the owner is gone.
S2  Writes are atomic: new events are appended to ``.events`` first, then the record goes
    to a temporary file in the same directory and ``os.replace`` puts it in place. The
    record says how many bytes of ``.events`` are its events, so a reader sees the old
    record or the new one with exactly its events, never a torn one, whatever is being
    appended meanwhile. A save costs the new events and a small file, not the whole log
    again. No ``fsync``: records survive their process dying, not the computer losing
    power.
S3  When: on create, on every status change, at most every ``SAVE_EVERY`` seconds while
    output arrives (so another process sees output up to that late), and at the end.
    A terminal record is written once and never again (a terminal record never changes),
    so a DELETE by another process stays done.
S4  An owner gone (S1) and a record not terminal: the command's process died with it, or
    was left without anyone to watch it. Such a record reads as ``failed`` with
    ``error_code`` ``execution_runner_interrupted`` (the code the service itself uses when
    the runner of an execution is lost) and a message naming the process that was gone;
    the first reader writes that back, so every later one agrees. The command runs in a
    process group of its own and outlives its owner: that reader kills the group, but only
    when the group's leader is still that command (its ``/proc/PID/environ`` names the
    execution's ``DEDALUS_EXECUTION_ID``), so a process id reused since is left alone;
    where ``/proc`` is missing the message says the command may still run.
S5  A DELETE of an unfinished execution another live process owns leaves
    ``<execution_id>.cancel``; the owner looks for it every ``WATCH_EVERY`` seconds, kills
    the command and records ``cancelled`` (the DELETE answers ``cancelled`` at once, as
    the API does). A DELETE of a terminal record removes its files.
S6  Kept: everything the API shows, the output events included, and the output cap they
    were kept under. Not kept: ``stdin`` and the values of ``env`` (only its names, which
    the API shows as ``env_keys``): secrets passed that way never reach the disk.
S7  Unreadable files (another version's format, a file edited by hand) are skipped with a
    warning, as if absent; ids that this backend cannot have made are never looked up, so
    a path in an id cannot name a file.

Reads are cached by the file's (inode, mtime, size): a follower polling another process's
execution re-reads its file only when it changed.

Machines (:class:`MachineFolders`), rules M1-M4:

M1  A machine is its folder, ``machines/<machine dirname>/`` (its ``/home/machine``),
    with ``machines/<machine dirname>.json`` beside it: its id, size, autosleep, creation
    time, desired state and how the server met it. Both are made by a create, and by the
    first execution on an id the backend did not know.
M2  Read back, a machine is in its desired state (``running`` or ``sleeping``): the
    local backend's phases last at most a wake, so a process that ended mid-way left it
    where it was going. A folder without its ``.json`` (made by an older version) is a
    running machine that never sleeps, listed when its name gives its id back.
M3  Destroying a machine removes its folder and its executions' records (its storage is
    wiped, as the API says) and keeps the ``.json`` saying ``destroyed``: a ``.json``
    without its folder is a destroyed machine, which no execution can run on.
M4  Writes are atomic (a temporary file, then ``os.replace``); a failed write is a
    warning, never a failed request, and an unreadable ``.json`` is skipped with one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from ._clock import Clock, SystemClock
from ._machine_records import MachineRecord, MachineTimings
from ._models import TERMINAL_STATUSES
from ._records import EventRecord, ExecutionRecord, format_time, parse_time, to_millis

__all__ = ["INTERRUPTED_CODE", "SAVE_EVERY", "WATCH_EVERY", "ExecutionStore", "MachineFolders"]

logger = logging.getLogger("dedalus_async.local")

#: ``error_code`` of an execution whose owning process was gone before it ended (S4).
INTERRUPTED_CODE: Final = "execution_runner_interrupted"

_FORMAT: Final = 1
# The ids ExecutionsServer makes ("exe-" + 16 hex): nothing else is looked up (S7).
_EXECUTION_ID: Final = re.compile(r"exe-[0-9a-f]{16}")
#: How often (real seconds) a running execution's record is saved while output arrives.
SAVE_EVERY: Final = 0.25
#: How often (real seconds) an owner looks for a DELETE asked by another process (S5).
WATCH_EVERY: Final = 0.1
_TIMES: Final = ("created_at", "started_at", "completed_at", "expires_at")
_PLAIN: Final = (
    "execution_id",
    "machine_id",
    "cwd",
    "timeout_ms",
    "status",
    "exit_code",
    "signal",
    "error_code",
    "error_message",
    "retry_after_ms",
    "artifacts",
    "log_capture",
    "creation_request_id",
    "creation_trace_id",
)


class ExecutionStore:
    """Records of a local backend's executions under ``data_dir`` (rules S1-S7 above).

    ``dirname`` maps a machine id to its directory name; ``output_cap`` is the cap this
    process keeps output under (saved with each record); ``clock`` stamps S4's end.
    :meth:`open` before use, :meth:`close` after (the owner lock of S1).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        dirname: Callable[[str], str],
        output_cap: int,
        clock: Clock | None = None,
    ) -> None:
        self.root = Path(data_dir) / "executions"
        self.owners = Path(data_dir) / "owners"
        self._dirname = dirname
        self.output_cap = output_cap
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.token = secrets.token_hex(8)
        self._lock_fd: int | None = None
        # ids this process created (it owns them) and ids it deleted (never written again)
        self._own: set[str] = set()
        self._removed: set[str] = set()
        self._final: set[str] = set()
        # id -> (events written, their bytes in .events), for this process's own records
        self._logged: dict[str, tuple[int, int]] = {}
        self._dirs: set[Path] = set()  # directories known to exist
        # path -> ((inode, mtime_ns, size), record): reads of unchanged files are free
        self._cache: dict[Path, tuple[tuple[int, int, int], ExecutionRecord]] = {}

    def __repr__(self) -> str:
        return f"<ExecutionStore {str(self.root)!r} own={len(self._own)}>"

    # --- the owner lock (S1) ---------------------------------------------------------------

    def open(self) -> None:
        """Create the directories and take this process's owner lock."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.owners.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._lock_path(self.token), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def close(self) -> None:
        """Give the owner lock up (after the last save). Safe to call twice."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path(self.token))
            os.close(fd)

    def _lock_path(self, token: str) -> Path:
        return self.owners / f"{token}.lock"

    def _owner_alive(self, token: object) -> bool:
        if token == self.token:
            return self._lock_fd is not None
        if not isinstance(token, str) or not re.fullmatch(r"[0-9a-f]{16}", token):
            return False
        try:
            fd = os.open(self._lock_path(token), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)  # also releases the lock we may have taken
        with contextlib.suppress(OSError):  # a dead owner's lock file is litter
            os.unlink(self._lock_path(token))
        return False

    # --- writing (S2, S3, S6) ------------------------------------------------------------

    def owns(self, record: ExecutionRecord) -> bool:
        """True when this process created ``record`` (and so writes it)."""
        return record.execution_id in self._own

    def claim(self, record: ExecutionRecord) -> None:
        """Take ``record`` as this process's own (it was just created here)."""
        self._own.add(record.execution_id)

    def save(self, record: ExecutionRecord, *, pid: int | None = None) -> None:
        """Write ``record`` atomically (S2); a terminal one once only (S3).

        ``pid``: the command's process group, for the message of S4.
        """
        execution_id = record.execution_id
        if execution_id in self._removed or execution_id in self._final:
            return
        if record.is_terminal:
            self._final.add(execution_id)
        path = self._path(record.machine_id, execution_id)
        logged = self._logged.get(execution_id, (0, 0))
        try:
            logged = self._commit(path, record, pid, logged)
        except OSError as exc:
            # a full disk must not break the execution itself: it still runs and answers
            logger.warning("cannot save the record %s: %s", path, exc)
        else:
            self._logged[execution_id] = logged

    def _commit(
        self,
        path: Path,
        record: ExecutionRecord,
        pid: int | None,
        logged: tuple[int, int],
        owner: dict[str, Any] | None = None,
    ) -> tuple[int, int]:
        """Append the events after the first ``logged[0]`` (whose bytes are ``logged[1]``),
        then put the record in place (S2); returns the new ``logged``."""
        directory = path.parent
        if directory not in self._dirs:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._dirs.add(directory)
        count, size = logged
        new = record.events[count:]
        if new or count == 0:
            data = b"".join(_json_line(event.to_json()) for event in new)
            fd = os.open(
                path.with_suffix(".events"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                # at the end of what the record counts: a torn append of a dead owner is
                # overwritten, never followed
                os.ftruncate(fd, size)
                os.lseek(fd, size, os.SEEK_SET)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            count, size = len(record.events), size + len(data)
        state = self._state(record, pid)
        state["events"], state["events_bytes"] = count, size
        if owner is not None:
            state.update(owner)
        temp = path.with_name(f".{path.name}.{self.token}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(_json_line(state))
            os.replace(temp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return count, size

    def _state(self, record: ExecutionRecord, pid: int | None) -> dict[str, Any]:
        state: dict[str, Any] = {"format": _FORMAT, "owner": self.token, "pid": os.getpid()}
        if pid is not None:
            state["command_pid"] = pid
        for name in _PLAIN:
            state[name] = getattr(record, name)
        for name in _TIMES:
            value = getattr(record, name)
            state[name] = None if value is None else format_time(value)
        state["command"] = list(record.command)
        # S6: the names of env, never its values; no stdin
        state["env_keys"] = None if record.env is None else sorted(record.env)
        state["output_cap"] = record.output_cap or self.output_cap
        state["stdout_bytes"] = record.stdout_bytes
        state["stderr_bytes"] = record.stderr_bytes
        return state

    def remove(self, record: ExecutionRecord) -> None:
        """Delete the record's files (S5); it is never written again by this process."""
        self._removed.add(record.execution_id)
        path = self._path(record.machine_id, record.execution_id)
        self._cache.pop(path, None)
        for name in (path, path.with_suffix(".events"), path.with_suffix(".cancel")):
            with contextlib.suppress(FileNotFoundError):
                name.unlink()

    # --- cancels across processes (S5) ----------------------------------------------------

    def request_cancel(self, record: ExecutionRecord) -> None:
        """Ask the owner of ``record`` (another process) to cancel it."""
        marker = self._path(record.machine_id, record.execution_id).with_suffix(".cancel")
        with contextlib.suppress(OSError):
            marker.touch(mode=0o600)

    def cancel_requested(self, record: ExecutionRecord) -> bool:
        """True when another process asked for ``record`` to be cancelled."""
        return self._path(record.machine_id, record.execution_id).with_suffix(".cancel").exists()

    # --- reading (S4, S7) ----------------------------------------------------------------

    def find(self, machine_id: str, execution_id: str) -> ExecutionRecord | None:
        """The stored record, or ``None`` (unknown, removed, unreadable, or an id this
        backend cannot have made)."""
        if _EXECUTION_ID.fullmatch(execution_id) is None:
            return None
        return self._read(self._path(machine_id, execution_id))

    def machine_records(self, machine_id: str) -> list[ExecutionRecord]:
        """Every stored record of the machine that another process made, oldest first (this
        process's own are fresher in its server's memory)."""
        directory = self.root / self._dirname(machine_id)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            stem = name[:-5]
            if name.endswith(".json") and _EXECUTION_ID.fullmatch(stem) and stem not in self._own:
                record = self._read(directory / name)
                if record is not None and record.machine_id == machine_id:
                    records.append(record)
        records.sort(key=lambda r: (r.created_at, r.execution_id))
        return records

    def _path(self, machine_id: str, execution_id: str) -> Path:
        return self.root / self._dirname(machine_id) / f"{execution_id}.json"

    def _read(self, path: Path, *, again: bool = True) -> ExecutionRecord | None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._cache.pop(path, None)
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            record = cached[1]
        else:
            try:
                state = json.loads(path.read_bytes())
                record = self._restore(state, self._read_events(path, state))
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("skipping the unreadable execution record %s: %s", path, exc)
                return None
            self._cache[path] = (key, record)
        owner = record.runner_state
        if (
            not record.is_terminal
            and not self.owns(record)
            and not self._owner_alive(owner["owner"])
        ):
            self._interrupted(path, record)
            if again:  # as written back, by this reader or by another at the same moment
                return self._read(path, again=False)
        return record

    @staticmethod
    def _read_events(path: Path, state: dict[str, Any]) -> list[EventRecord]:
        """The record's events: the first ``events_bytes`` of ``.events`` (S2)."""
        if state.get("format") != _FORMAT:
            raise ValueError(f"format {state.get('format')!r}, not {_FORMAT}")
        size = state["events_bytes"]
        with open(path.with_suffix(".events"), "rb") as file:
            data = file.read(size)
        if len(data) != size:
            raise ValueError(f"{path.with_suffix('.events')} is shorter than its record says")
        events = [EventRecord.from_json(json.loads(line)) for line in data.splitlines()]
        if len(events) != state["events"]:
            raise ValueError(f"{len(events)} events where the record says {state['events']}")
        return events

    def _restore(self, state: dict[str, Any], events: list[EventRecord]) -> ExecutionRecord:
        fields = {name: state[name] for name in _PLAIN}
        for name in _TIMES:
            fields[name] = None if state[name] is None else parse_time(state[name])
        keys = state["env_keys"]
        fields["env"] = None if keys is None else dict.fromkeys(keys, "")
        record = ExecutionRecord.restore(
            events=events,
            stdout_bytes=state["stdout_bytes"],
            stderr_bytes=state["stderr_bytes"],
            command=tuple(state["command"]),
            created_mono=time.monotonic(),
            output_cap=state["output_cap"],
            **fields,
        )
        # who ran it (S4 needs it, and the runner tells a stored record by it), and how
        # much of .events is its own
        record.runner_state = {k: state.get(k) for k in ("owner", "pid", "command_pid")}
        record.runner_state["logged"] = (state["events"], state["events_bytes"])
        return record

    def _interrupted(self, path: Path, record: ExecutionRecord) -> None:
        """S4: the owner is gone; the record ends here, and is written back (once: readers
        that find it at the same moment take turns, and the later ones find it done)."""
        self._cache.pop(path, None)
        try:
            fd = os.open(path.with_suffix(".events"), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = json.loads(path.read_bytes())
            if (
                current.get("status") in TERMINAL_STATUSES
                or current.get("owner") != (record.runner_state["owner"])
            ):
                return
            self._end_interrupted(path, record)
        except (OSError, ValueError) as exc:
            logger.warning("cannot end the record %s: %s", path, exc)
        finally:
            os.close(fd)

    def _end_interrupted(self, path: Path, record: ExecutionRecord) -> None:
        owner = record.runner_state
        message = f"the local backend process that ran it (pid {owner['pid']}) exited first"
        group = owner["command_pid"]
        if _kill_orphan(group, record.execution_id):
            message += f"; its command (process group {group}) was killed"
        elif group is not None:
            message += f"; its command (process group {group}) may still be running"
        record.finish(
            "failed",
            to_millis(self.clock.now()),
            error_code=INTERRUPTED_CODE,
            error_message=message,
        )
        self._commit(
            path,
            record,
            group,
            owner["logged"],
            owner={"owner": owner["owner"], "pid": owner["pid"]},
        )


def _kill_orphan(group: object, execution_id: str) -> bool:
    """SIGKILL an orphaned command's process group (S4), only while its leader is still that
    command: True when it did."""
    if not isinstance(group, int) or group <= 1:
        return False
    try:
        environ = Path(f"/proc/{group}/environ").read_bytes().split(b"\0")
    except OSError:  # gone already, not ours, or no /proc
        return False
    if f"DEDALUS_EXECUTION_ID={execution_id}".encode() not in environ:
        return False  # the process id was reused: not our command
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        return False
    return True


def _json_line(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


_MACHINE_FIELDS: Final = (
    "machine_id",
    "vcpu",
    "memory_mib",
    "storage_gib",
    "autosleep_seconds",
    "desired_state",
    "origin",
)


class MachineFolders:
    """The local backend's machines, kept as folders under ``machines_dir`` (rules M1-M4
    above): a :class:`~dedalus_async._machine_records.MachineStore`.

    ``dirname`` maps a machine id to its folder's name; ``records_dir`` holds the
    executions' records (``<records_dir>/<dirname>/``, wiped with the machine);
    ``timings`` says how long the phases of a machine read back last; ``managed`` is
    called with the id of every machine created or steered through the API, read or
    written (the runner then leaves its sleep and wake to the machine's lifecycle).
    """

    def __init__(
        self,
        machines_dir: Path,
        *,
        dirname: Callable[[str], str],
        records_dir: Path,
        timings: MachineTimings,
        managed: Callable[[str], None],
        clock: Clock | None = None,
    ) -> None:
        self.machines_dir = Path(machines_dir)
        self.records_dir = Path(records_dir)
        self._dirname = dirname
        self.timings = timings
        self._managed = managed
        self.clock: Clock = clock if clock is not None else SystemClock()

    def __repr__(self) -> str:
        return f"<MachineFolders {str(self.machines_dir)!r}>"

    def _paths(self, machine_id: str) -> tuple[Path, Path]:
        folder = self.machines_dir / self._dirname(machine_id)
        return folder, folder.with_name(folder.name + ".json")

    def load(self, machine_id: str) -> MachineRecord | None:
        """The machine kept for ``machine_id`` (M2), or ``None``."""
        folder, sidecar = self._paths(machine_id)
        state = self._read(sidecar)
        if state is not None and state.get("machine_id") != machine_id:
            state = None  # not this id's (a hash collision would be news)
        if state is None:
            if not folder.is_dir():
                return None
            created = datetime.fromtimestamp(folder.stat().st_mtime, UTC)
            state = {"machine_id": machine_id, "created_at": format_time(created)}
        clock = self.clock
        now = clock.monotonic()
        created_at = to_millis(parse_time(state["created_at"]))
        record = MachineRecord(
            machine_id=machine_id,
            vcpu=state.get("vcpu", 1),
            memory_mib=state.get("memory_mib", 4096),
            storage_gib=state.get("storage_gib", 10),
            autosleep_seconds=state.get("autosleep_seconds", 0),
            created_at=created_at,
            created_mono=now - (clock.now() - created_at).total_seconds(),
            timings=self.timings,
            origin=state.get("origin", "execution"),
            revision=max(int(state.get("revision", 0)), 0),
        )
        desired = state.get("desired_state", "running")
        if not folder.is_dir():
            desired = "destroyed"  # M3: the folder is the machine
        elif desired not in ("running", "sleeping"):
            desired = "running"
        record.begin_settled(desired, now)
        if record.origin == "api":
            self._managed(machine_id)
        return record

    def machine_ids(self) -> list[str]:
        """Every machine kept: from the ``.json`` files, and folders without one whose name
        gives their id back (M2)."""
        try:
            names = os.listdir(self.machines_dir)
        except FileNotFoundError:
            return []
        ids: list[str] = []
        described: set[str] = set()
        for name in sorted(names):
            if name.endswith(".json") and not name.startswith("."):
                state = self._read(self.machines_dir / name)
                machine_id = None if state is None else state.get("machine_id")
                if isinstance(machine_id, str) and self._dirname(machine_id) == name[:-5]:
                    ids.append(machine_id)
                    described.add(name[:-5])
        for name in sorted(names):
            slug = name.rpartition("-")[0]
            if (
                name not in described
                and not name.endswith(".json")
                and self._dirname(slug) == name
                and (self.machines_dir / name).is_dir()
            ):
                ids.append(slug)
        return ids

    def save(self, machine: MachineRecord) -> None:
        """Make the machine's folder and write its ``.json`` (M1, M4)."""
        folder, sidecar = self._paths(machine.machine_id)
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            logger.warning("cannot create the machine folder %s: %s", folder, exc.strerror)
        self._write(sidecar, machine)
        if machine.origin == "api":
            self._managed(machine.machine_id)

    def destroy(self, machine: MachineRecord) -> None:
        """M3: wipe the folder and the executions' records; keep the ``.json``."""
        folder, sidecar = self._paths(machine.machine_id)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self.records_dir / folder.name, ignore_errors=True)
        self._write(sidecar, machine)

    def _write(self, path: Path, machine: MachineRecord) -> None:
        state: dict[str, Any] = {"format": _FORMAT}
        for name in _MACHINE_FIELDS:
            state[name] = getattr(machine, name)
        state["created_at"] = format_time(machine.created_at)
        state["revision"] = machine.revision
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(_json_line(state))
            os.replace(temp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            logger.warning("cannot save the machine %s: %s", path, exc.strerror)

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            state = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("skipping the unreadable machine %s: %s", path, exc)
            return None
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            logger.warning("skipping the machine %s: not a format this version reads", path)
            return None
        return state
