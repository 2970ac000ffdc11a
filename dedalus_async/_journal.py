"""Batch journals: what a durable fan-out writes down, so that it can resume after a crash.

The API makes a local record necessary: executions are listed per machine with no filter
by Idempotency-Key, and list items do not echo the key. After a crash between sending a
create and reading its answer, only a journal of the key finds the execution again.

A journal holds batches by name; a batch holds one :class:`JobRecord` per request. The
fan-out (:mod:`~dedalus_async._durable`) moves each job through four states, writing the
record *before* the step it guards:

J1  ``pending``: the job's Idempotency-Key is minted and written with the whole batch,
    before anything is sent.
J2  ``sent``: written, and committed, before each create is POSTed, with the time (the
    fan-out marks a few of the next creates in the same commit: see
    :meth:`~dedalus_async._durable.Ledger.sending`).
J3  ``created``: the execution ID, once the create answered. May be group-committed: if
    it is lost, the create is sent again under the same key and the server answers with
    the same execution.
J4  ``finished``: the terminal execution and its output. May be group-committed: if it
    is lost, the execution is attached to again and its output read again; nothing runs
    twice.
J5  Everything a journal accepted is durable once :meth:`Journal.flush` returns; the
    fan-out flushes before it returns or raises.

:class:`Journal` is the protocol a store implements (async, store-agnostic);
:class:`SQLiteJournal` is the embedded one. It writes from one thread of its own, which
takes every write queued while it was busy into one transaction (group commit), so the
event loop never waits for the disk except for the J2 commits it must wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import queue
import sqlite3
import threading
import time
import types
import typing
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import attrs

from ._checks import check_seconds
from ._convert import structure, unstructure, unstructure_datetime
from ._errors import JournalError, ResponseDecodeError
from ._models import Execution, ExecutionOutput

try:  # orjson is optional (the "fast" extra): it writes the same text as _DUMPS, faster
    import orjson

    _ORJSON = True
except ImportError:  # pragma: no cover - exercised when orjson is absent (a subprocess test)
    _ORJSON = False

__all__ = ["Batch", "JobRecord", "JobState", "Journal", "SQLiteJournal"]

T = TypeVar("T")


class JobState(enum.StrEnum):
    """Where a job of a journaled batch stands (see J1-J4 in :mod:`dedalus_async._journal`)."""

    PENDING = "pending"
    SENT = "sent"
    CREATED = "created"
    FINISHED = "finished"


@attrs.frozen(kw_only=True)
class JobRecord:
    """One job of a batch, as a journal holds it.

    ``job`` identifies it within the batch: the request's ``key``, or ``#N`` for the
    request at position N. ``fingerprint`` is a salted SHA-256 of what the request runs
    (env values and stdin are never stored in clear). ``attempt`` counts the executions
    created for it (more than one only with ``retry_execution``). ``sent_at`` (Unix
    seconds) is when the create under ``idempotency_key`` was first sent. ``execution``
    and ``output`` are set once finished; ``error`` describes the latest failure of a job
    not finished.
    """

    job: str
    position: int
    fingerprint: str
    machine_id: str
    command: tuple[str, ...]
    idempotency_key: str
    state: JobState = JobState.PENDING
    attempt: int = 1
    sent_at: float | None = None
    execution_id: str | None = None
    execution: Execution | None = None
    output: ExecutionOutput | None = None
    error: str | None = None


@attrs.frozen(kw_only=True)
class Batch:
    """A batch as a journal holds it: its ``name``, the ``salt`` of its fingerprints, and
    its ``jobs`` in input order."""

    name: str
    salt: str
    jobs: tuple[JobRecord, ...]


@runtime_checkable
class Journal(Protocol):
    """Where a durable fan-out keeps its batch: implement this to add a store.

    One object serves one batch (``batch`` is its name; a store may hold many).
    ``reservation_max_age`` (seconds, or ``None``: no limit) is how old a ``sent`` job
    without an execution ID may be and still be sent again on resume. Every method may be
    called from one event loop only, and never concurrently with :meth:`aclose`.
    """

    batch: str
    reservation_max_age: float | None

    async def load(self) -> Batch | None:
        """The batch, or ``None`` if the store has none by that name."""
        ...

    async def start(self, batch: Batch) -> None:
        """Write the whole batch (its jobs replacing any held before); durable on return."""
        ...

    async def save(self, *records: JobRecord, durable: bool) -> None:
        """Write these jobs' records; with ``durable``, they are durable when this
        returns, otherwise they may wait for the next durable write or :meth:`flush`."""
        ...

    async def flush(self) -> None:
        """Make every write accepted so far durable."""
        ...

    async def aclose(self) -> None:
        """Flush and release the store. Idempotent."""
        ...


# --- the SQLite journal ------------------------------------------------------------------

#: ``PRAGMA application_id`` of a journal: "DDSJ" (dedalus_async journal).
APPLICATION_ID: Final = 0x4444534A
#: ``PRAGMA user_version``: the schema version this code writes and reads.
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE batches (
    name TEXT PRIMARY KEY,
    salt TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE jobs (
    batch TEXT NOT NULL REFERENCES batches (name),
    job TEXT NOT NULL,
    position INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    command TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    sent_at REAL,
    execution_id TEXT,
    error TEXT,
    PRIMARY KEY (batch, job)
) WITHOUT ROWID;
CREATE TABLE results (
    id INTEGER PRIMARY KEY,
    batch TEXT NOT NULL REFERENCES batches (name),
    job TEXT NOT NULL,
    execution TEXT NOT NULL,
    output TEXT,
    UNIQUE (batch, job)
);
"""
# Why two tables: a job's small row is rewritten at each step, a result (the bulk of the
# bytes) is written once, appended in finishing order. Kept in one row, every step of every
# job rewrote a page full of results: measured at 10,000 executions, that was most of the
# journal's cost (pages written to the WAL, then again at each checkpoint).


# The rows of a transaction go in a few statements of many rows each
# (INSERT ... VALUES (...), (...), ...), their values bound as they are: sqlite3 lets go of
# the GIL at each step of a statement, so executemany over N rows made the event loop's
# thread and this one trade the GIL N times, and passing the rows as one JSON array (the
# way before) made SQLite parse each row's text again for each of its columns. Row counts
# are powers of two (a few statement texts, each prepared once and cached), each statement
# within the 999 parameters of SQLite before 3.32.
_MAX_PARAMETERS: Final = 999


def _inserts(table: str, width: int) -> dict[int, str]:
    """``INSERT OR REPLACE`` statements of ``table`` by their number of rows."""
    one = "(" + ", ".join("?" * width) + ")"
    statements = {}
    size = 1
    while size * width <= _MAX_PARAMETERS:
        statements[size] = f"INSERT OR REPLACE INTO {table} VALUES " + ", ".join([one] * size)
        size *= 2
    return statements


_INSERT_JOBS: Final = _inserts("jobs", 12)
_INSERT_RESULTS: Final = _inserts("results (batch, job, execution, output)", 4)


def _insert(conn: sqlite3.Connection, statements: dict[int, str], rows: Sequence[Any]) -> None:
    largest = max(statements)
    done, count = 0, len(rows)
    while done < count:
        size = min(largest, 1 << ((count - done).bit_length() - 1))
        conn.execute(statements[size], [value for row in rows[done : done + size] for value in row])
        done += size


_SELECT: Final = (
    "SELECT j.job, j.position, j.fingerprint, j.machine_id, j.command, j.idempotency_key, "
    "j.state, j.attempt, j.sent_at, j.execution_id, r.execution, r.output, j.error "
    "FROM jobs AS j LEFT JOIN results AS r ON r.batch = j.batch AND r.job = j.job "
    "WHERE j.batch = ? ORDER BY j.position"
)
_DUMPS: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _orjson_dumps(value: Any) -> str:
    try:
        return str(orjson.dumps(value), "utf-8")
    except TypeError:
        # orjson.JSONEncodeError (a TypeError): a lone surrogate, an integer past 64 bits
        # (json writes both); what json then does, raising included, is the answer
        return _DUMPS(value)


#: A value as JSON text: the same text as :data:`_DUMPS` (compact, not ASCII-escaped),
#: written by orjson when it is importable. The values a journal writes hold no float but
#: times (never NaN, which orjson would write as null).
dumps: Callable[[Any], str] = _orjson_dumps if _ORJSON else _DUMPS


# What unstructure() gives for the models of a result, without cattrs' dispatch of each
# field's value to its hook (most of the cost of a result's journal row, measured): a
# function for each model, written from its fields' types as cattrs writes its own. A None
# is left out where the default is None; fields not left out come first, as cattrs has them.
# tests/test_journal.py holds the two equal for every field.


def _conversion(kind: Any, functions: dict[str, Any]) -> str | None:
    """How a value of type ``kind`` (without its ``| None``) becomes JSON-ready: an
    expression of ``v``; ``None`` for a type this does not know (unstructure's then)."""
    if kind in (str, int, bool):
        return "v"
    if kind is datetime:
        functions["time"] = unstructure_datetime
        return "time(v)"
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if item is str:
            return "list(v)"
        if attrs.has(item) and (function := _plain_of(item)) is not None:
            functions[item.__name__] = function
            return f"[{item.__name__}(x) for x in v]"
        return None
    if attrs.has(kind) and (function := _plain_of(kind)) is not None:
        functions[kind.__name__] = function
        return f"{kind.__name__}(v)"
    return None


def _plain_of(cls: type[Any]) -> Callable[[Any], dict[str, Any]] | None:
    functions: dict[str, Any] = {}
    first, then = [], []
    for f in attrs.fields(attrs.resolve_types(cls)):
        args = [a for a in typing.get_args(f.type) if a is not type(None)]
        union = typing.get_origin(f.type) in (typing.Union, types.UnionType)
        convert = _conversion(args[0] if union and len(args) == 1 else f.type, functions)
        if convert is None:
            return None
        if f.default is None:
            then.append(
                f"    v = m.{f.name}\n    if v is not None:\n        d[{f.name!r}] = {convert}"
            )
        elif convert == "v":
            first.append(f"{f.name!r}: m.{f.name}")
        else:
            first.append(f"{f.name!r}: None if (v := m.{f.name}) is None else {convert}")
    source = "\n".join([f"def plain(m):\n    d = {{{', '.join(first)}}}", *then, "    return d"])
    exec(compile(source, f"<plain {cls.__name__}>", "exec"), functions)
    function: Callable[[Any], dict[str, Any]] = functions["plain"]
    return function


_PLAIN: Final[dict[type[Any], Callable[[Any], dict[str, Any]]]] = {
    cls: function
    for cls in (Execution, ExecutionOutput)
    if (function := _plain_of(cls)) is not None
}


def plain(model: attrs.AttrsInstance) -> dict[str, Any]:
    """:func:`~dedalus_async._convert.unstructure` of a result's model (an execution, its
    output), equal to it, without cattrs' per-field dispatch; any other model goes to
    unstructure."""
    function = _PLAIN.get(type(model))
    return unstructure(model) if function is None else function(model)


#: Seconds a write nobody waits for (J3, J4) may wait for others to share its commit: a
#: crash loses at most this much of them, which resuming redoes without running anything
#: twice. At most _MAX_ROWS of them wait.
LAZY_WINDOW: Final = 0.05
_MAX_ROWS: Final = 1000

#: The default of ``reservation_max_age``: the server's key lifetime is not published.
DEFAULT_RESERVATION_MAX_AGE: Final = 3600.0


# a job's row, and its result's row once it has one
_Rows = tuple[tuple[Any, ...], tuple[Any, ...] | None]


def job_rows(batch: str, r: JobRecord) -> _Rows:
    """A record as its job row and its result row, if any (every store writes these)."""
    job = (
        batch,
        r.job,
        r.position,
        r.fingerprint,
        r.machine_id,
        dumps(r.command),
        r.idempotency_key,
        r.state.value,
        r.attempt,
        r.sent_at,
        r.execution_id,
        r.error,
    )
    if r.state is not JobState.FINISHED or r.execution is None:
        return job, None
    output = None if r.output is None else dumps(plain(r.output))
    return job, (batch, r.job, dumps(plain(r.execution)), output)


def _write(conn: sqlite3.Connection, rows: Sequence[_Rows]) -> None:
    _insert(conn, _INSERT_JOBS, [job for job, _ in rows])
    results = [result for _, result in rows if result is not None]
    if results:
        _insert(conn, _INSERT_RESULTS, results)


def record_of(row: Sequence[Any]) -> JobRecord:
    """A job row joined with its result row (the columns of :func:`job_rows`) as a record."""
    (job, position, fp, machine, command, key, state, attempt, sent_at, eid, ex, out, err) = row
    if state != JobState.FINISHED:
        ex = out = None  # a result is a finished job's only
    return JobRecord(
        job=job,
        position=position,
        fingerprint=fp,
        machine_id=machine,
        command=tuple(json.loads(command)),
        idempotency_key=key,
        state=JobState(state),
        attempt=attempt,
        sent_at=sent_at,
        execution_id=eid,
        execution=None if ex is None else structure(json.loads(ex), Execution),
        output=None if out is None else structure(json.loads(out), ExecutionOutput),
        error=err,
    )


# an item of the writer's queue: work on the connection, and who waits for it (if anyone)
_Work = tuple[Callable[[sqlite3.Connection], Any] | None, asyncio.AbstractEventLoop | None, Any]


class SQLiteJournal:
    """A :class:`Journal` in an SQLite file: ``run_many(requests, journal=path)`` makes one.

    ``batch`` names the batch within the file (one file may hold several).
    ``reservation_max_age``: see :class:`Journal` (default one hour: the server's
    Idempotency-Key lifetime is not published). The file is in WAL mode with
    ``synchronous=NORMAL``: a commit survives the process being killed (SIGKILL, a crash)
    but not a power loss or an OS crash; ``fsync=True`` (``synchronous=FULL``) survives
    those too, for a disk flush per commit. A file that is not a journal, or a journal of
    a newer version, is refused with :class:`JournalError` before anything is written.
    Use it as ``async with SQLiteJournal(path) as journal:`` or call :meth:`aclose`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch: str = "default",
        reservation_max_age: float | None = DEFAULT_RESERVATION_MAX_AGE,
        fsync: bool = False,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"journal path must be a str or a path, not {type(path).__name__}")
        self.path: str = os.fspath(path)
        if not self.path:
            raise ValueError("journal path must not be empty")
        if not isinstance(batch, str) or not batch.strip():
            raise ValueError("batch must be a non-empty name, e.g. batch='nightly'")
        self.batch = batch
        self.reservation_max_age = check_seconds(
            "reservation_max_age", reservation_max_age, none_means="no limit"
        )
        self._fsync = bool(fsync)
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._rows: list[_Rows] = []
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<SQLiteJournal {self.path!r} batch={self.batch!r}>"

    async def __aenter__(self) -> SQLiteJournal:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- the Journal protocol ------------------------------------------------------------

    async def load(self) -> Batch | None:
        """See :meth:`Journal.load`."""
        return await self._call(self._load)

    async def start(self, batch: Batch) -> None:
        """See :meth:`Journal.start`."""
        if batch.name != self.batch:
            raise ValueError(f"this journal holds batch {self.batch!r}, not {batch.name!r}")

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO batches VALUES (?, ?, ?)",
                (batch.name, batch.salt, time.time()),
            )
            conn.execute("DELETE FROM jobs WHERE batch = ?", (batch.name,))
            conn.execute("DELETE FROM results WHERE batch = ?", (batch.name,))
            _write(conn, [job_rows(batch.name, job) for job in batch.jobs])

        await self._call(write)

    async def save(self, *records: JobRecord, durable: bool) -> None:
        """See :meth:`Journal.save`."""
        rows = [job_rows(self.batch, record) for record in records]
        if durable:
            await self._call(lambda conn: _write(conn, rows))
            return
        if self._closed:
            raise JournalError(f"journal {self.path} is closed", path=self.path)
        # Kept here until the next write somebody waits for, or LAZY_WINDOW: one handover
        # (and one commit) for many jobs' rows, not a wake-up of the writer for each.
        self._rows.extend(rows)
        if len(self._rows) >= _MAX_ROWS:
            self._hand_over()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LAZY_WINDOW, self._hand_over)

    async def flush(self) -> None:
        """See :meth:`Journal.flush`."""
        if self._thread is not None or self._rows:
            await self._call(lambda conn: None)

    async def aclose(self) -> None:
        """Flush, close the file and stop the writer thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._rows:
            self._hand_over()
        thread = self._thread
        if thread is None:
            return
        try:
            await self._call(lambda conn: None, closing=True)
        finally:
            self._queue.put((None, None, None))
            await asyncio.get_running_loop().run_in_executor(None, thread.join)

    # --- the writer thread ---------------------------------------------------------------

    async def _call(self, work: Callable[[sqlite3.Connection], T], *, closing: bool = False) -> T:
        if self._closed and not closing:
            raise JournalError(f"journal {self.path} is closed", path=self.path)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._hand_over()  # the rows saved before this go first, in the same transaction
        self._post(work, loop, future)
        return await future

    def _hand_over(self) -> None:
        """Queue the rows saved without waiting (J3, J4) for the writer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self._rows = self._rows, []
        if rows and self._failure is None:  # after a failure, the next awaited call says so
            self._post(lambda conn: _write(conn, rows), None, None)

    def _post(
        self,
        work: Callable[[sqlite3.Connection], Any],
        loop: asyncio.AbstractEventLoop | None,
        future: asyncio.Future[Any] | None,
    ) -> None:
        if self._failure is not None:
            # a write nobody waited for failed: every later one reports it
            raise JournalError(
                f"journal {self.path} failed to write: {self._failure}", path=self.path
            ) from self._failure
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"journal {self.path}", daemon=True
            )
            self._thread.start()
        self._queue.put((work, loop, future))

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                items = self._gather()
                stop = any(work is None for work, _, _ in items)
                works = [item for item in items if item[0] is not None]
                if works:
                    try:
                        if conn is None:
                            conn = self._connect()
                        results = self._transaction(conn, works)
                    except BaseException as exc:  # reported to whoever waits, or later
                        error = self._journal_error(exc)
                        if any(future is None for _, _, future in works):
                            self._failure = error
                        _resolve([(loop, future, None, error) for _, loop, future in works])
                    else:
                        _resolve(
                            [
                                (loop, future, result, None)
                                for (_, loop, future), result in zip(works, results, strict=True)
                            ]
                        )
                if stop:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _gather(self) -> list[_Work]:
        """The next transaction's work. Group commit: everything queued while the last
        transaction ran goes into the next one, so N jobs' writes cost one commit, not N."""
        items = [self._queue.get()]
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _transaction(self, conn: sqlite3.Connection, works: list[_Work]) -> list[Any]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [work(conn) for work, _, _ in works if work is not None]
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return results

    def _journal_error(self, exc: BaseException) -> JournalError:
        if isinstance(exc, JournalError):
            return exc
        error = JournalError(
            f"journal {self.path} cannot be used: {exc} (is the disk full, or the file "
            "damaged? a damaged journal cannot resume: start again with a new path)",
            path=self.path,
        )
        error.__cause__ = exc
        return error

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.Error as exc:
            raise JournalError(
                f"cannot open journal {path}: {exc} (does its folder exist?)", path=path
            ) from exc
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and version == 0 and tables == 0:
                self._create_schema(conn)
            elif app_id != APPLICATION_ID:
                raise JournalError(
                    f"{path} is an SQLite database but not a dedalus_async journal: give "
                    "a new path (the file is left as it is)",
                    path=path,
                )
            elif version > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {path} was written by a newer dedalus_async (schema "
                    f"{version}, this one reads {SCHEMA_VERSION}): upgrade dedalus_async",
                    path=path,
                )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise JournalError(
                f"{path} is not a dedalus_async journal ({exc}): give a new path, or the "
                "journal of this batch if this one was a mistake",
                path=path,
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _load(self, conn: sqlite3.Connection) -> Batch | None:
        found = conn.execute("SELECT salt FROM batches WHERE name = ?", (self.batch,)).fetchone()
        if found is None:
            return None
        rows = conn.execute(_SELECT, (self.batch,)).fetchall()
        try:
            jobs = tuple(record_of(row) for row in rows)
        except (ValueError, TypeError, KeyError, ResponseDecodeError) as exc:
            raise JournalError(
                f"journal {self.path} holds a record this version cannot read ({exc}): "
                "start again with a new path",
                path=self.path,
            ) from exc
        return Batch(name=self.batch, salt=found[0], jobs=jobs)


def _resolve(
    outcomes: list[tuple[asyncio.AbstractEventLoop | None, Any, Any, BaseException | None]],
) -> None:
    """Settle the futures of one transaction: one wake-up of each waiting loop for all."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, BaseException | None]]] = {}
    for loop, future, result, error in outcomes:
        if loop is not None and future is not None:
            by_loop.setdefault(loop, []).append((future, result, error))

    def settle(items: list[tuple[Any, Any, BaseException | None]]) -> None:
        for future, result, error in items:
            if future.done():  # the waiter was cancelled: the work was done all the same
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    for loop, items in by_loop.items():
        # a closed loop has nobody waiting any more
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, items)
