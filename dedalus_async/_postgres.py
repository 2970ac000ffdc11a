"""The journal on PostgreSQL: one batch's :class:`~dedalus_async._journal.Journal` for
``run_many``, and the store that workers on many machines share (:mod:`~dedalus_async._workers`).

asyncpg is imported when a journal first connects, so the base install never needs it
(``pip install "dedalus-async[postgres]"``).

The schema is the library's: created, and migrated, when a journal connects, under a
transaction-level advisory lock, so workers that start together migrate it once.

M1  ``dedalus_schema`` holds the schema's version. Its absence means version 0 (empty).
M2  :data:`MIGRATIONS` are ordered: version N is reached by applying migration N to
    version N-1. Version 1 is the single-process journal (the SQLite journal's tables);
    version 2 adds what workers need (the full request, the lease, the claims log);
    version 3 the batch's shared requests-per-second ceiling (W9) and ties each claim to
    its job (deleting a job or a batch deletes its claims, W10).
M3  A database at a version newer than :data:`SCHEMA_VERSION` is refused before anything
    is written: an older library must not write a schema it does not know.

Every table is named ``dedalus_*``, so the journal can live in a database shared with an
application.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from . import _journal
from ._checks import check_seconds
from ._errors import JournalError, ResponseDecodeError
from ._journal import (
    _MAX_ROWS,
    DEFAULT_RESERVATION_MAX_AGE,
    LAZY_WINDOW,
    Batch,
    JobRecord,
    job_rows,
)

if TYPE_CHECKING:
    import asyncpg

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresJournal", "connect", "is_dsn", "redact_dsn"]

#: The schema's migrations, in order (M2): ``MIGRATIONS[n - 1]`` brings version n-1 to n.
MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: the single-process journal, as in SQLite
    """
    CREATE TABLE dedalus_schema (version integer NOT NULL);
    INSERT INTO dedalus_schema VALUES (0);
    CREATE TABLE dedalus_batches (
        name text PRIMARY KEY,
        salt text NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE TABLE dedalus_jobs (
        batch text NOT NULL REFERENCES dedalus_batches (name) ON DELETE CASCADE,
        job text NOT NULL,
        position integer NOT NULL,
        fingerprint text NOT NULL,
        machine_id text NOT NULL,
        command text NOT NULL,
        idempotency_key text NOT NULL,
        state text NOT NULL,
        attempt integer NOT NULL,
        sent_at double precision,
        execution_id text,
        error text,
        PRIMARY KEY (batch, job)
    );
    CREATE TABLE dedalus_results (
        batch text NOT NULL REFERENCES dedalus_batches (name) ON DELETE CASCADE,
        job text NOT NULL,
        execution text NOT NULL,
        output text,
        PRIMARY KEY (batch, job)
    );
    """,
    # 2: workers (dedalus_async._workers): the whole request (workers elsewhere run it),
    # the lease (owner token and expiry), failures counted, a log of every claim, the
    # batch's shared 429 pause and its cap on jobs in flight
    """
    ALTER TABLE dedalus_batches
        ADD COLUMN shared boolean NOT NULL DEFAULT false,
        ADD COLUMN paused_until timestamptz,
        ADD COLUMN max_in_flight integer;
    ALTER TABLE dedalus_jobs
        ADD COLUMN request text,
        ADD COLUMN lease_owner text,
        ADD COLUMN lease_until timestamptz,
        ADD COLUMN failures integer NOT NULL DEFAULT 0;
    CREATE INDEX dedalus_jobs_unfinished ON dedalus_jobs (batch, position)
        WHERE state <> 'finished';
    CREATE TABLE dedalus_claims (
        id bigserial PRIMARY KEY,
        batch text NOT NULL,
        job text NOT NULL,
        owner text NOT NULL,
        claimed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        previous_owner text
    );
    """,
    # 3: the batch's requests-per-second ceiling shared by its workers (the rate, and the
    # next free slot of its schedule, W9); claims go with their job (W10)
    """
    ALTER TABLE dedalus_batches
        ADD COLUMN rate double precision,
        ADD COLUMN rate_next timestamptz;
    DELETE FROM dedalus_claims AS c WHERE NOT EXISTS (
        SELECT FROM dedalus_jobs AS j WHERE j.batch = c.batch AND j.job = c.job
    );
    ALTER TABLE dedalus_claims ADD CONSTRAINT dedalus_claims_job
        FOREIGN KEY (batch, job) REFERENCES dedalus_jobs (batch, job) ON DELETE CASCADE;
    CREATE INDEX dedalus_claims_by_job ON dedalus_claims (batch, job);
    """,
)
#: The version this code reads and writes.
SCHEMA_VERSION: Final = len(MIGRATIONS)
# pg_advisory_xact_lock key of migrations: "DDSJ", as the SQLite journal's application_id
_MIGRATION_LOCK: Final = 0x4444534A

_UPSERT_JOBS: Final = """
INSERT INTO dedalus_jobs (batch, job, position, fingerprint, machine_id, command,
    idempotency_key, state, attempt, sent_at, execution_id, error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (batch, job) DO UPDATE SET position = EXCLUDED.position,
    fingerprint = EXCLUDED.fingerprint, machine_id = EXCLUDED.machine_id,
    command = EXCLUDED.command, idempotency_key = EXCLUDED.idempotency_key,
    state = EXCLUDED.state, attempt = EXCLUDED.attempt, sent_at = EXCLUDED.sent_at,
    execution_id = EXCLUDED.execution_id, error = EXCLUDED.error
"""
_UPSERT_RESULTS: Final = """
INSERT INTO dedalus_results (batch, job, execution, output) VALUES ($1, $2, $3, $4)
ON CONFLICT (batch, job) DO UPDATE SET execution = EXCLUDED.execution,
    output = EXCLUDED.output
"""
SELECT_JOBS: Final = """
SELECT j.job, j.position, j.fingerprint, j.machine_id, j.command, j.idempotency_key,
    j.state, j.attempt, j.sent_at, j.execution_id, r.execution, r.output, j.error
FROM dedalus_jobs AS j
LEFT JOIN dedalus_results AS r ON r.batch = j.batch AND r.job = j.job
"""


def is_dsn(target: object) -> bool:
    """Whether a ``journal=`` / ``--journal`` value names a PostgreSQL database."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, fit for a message or a repr."""
    scheme, sep, rest = dsn.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return dsn
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def record_of(row: Any, where: str) -> JobRecord:
    """A row of :data:`SELECT_JOBS` as a record; a row this version cannot read is a
    :class:`JournalError`."""
    try:
        return _journal.record_of(row)
    except (ValueError, TypeError, KeyError, ResponseDecodeError) as exc:
        raise JournalError(
            f"journal {where} holds a record this version cannot read ({exc}): start again "
            "with a new batch name",
            path=where,
        ) from exc


async def write_rows(
    conn: asyncpg.Connection, rows: Sequence[tuple[tuple[Any, ...], tuple[Any, ...] | None]]
) -> None:
    """Upsert job rows and their result rows (in the caller's transaction)."""
    await conn.executemany(_UPSERT_JOBS, [job for job, _ in rows])
    results = [result for _, result in rows if result is not None]
    if results:
        await conn.executemany(_UPSERT_RESULTS, results)


async def connect(dsn: str) -> asyncpg.Connection:
    """A connection to ``dsn`` whose schema is at :data:`SCHEMA_VERSION` (M1-M3)."""
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - the extra is installed wherever tests run
        raise JournalError(
            'a PostgreSQL journal needs asyncpg: pip install "dedalus-async[postgres]"'
        ) from None
    where = redact_dsn(dsn)
    try:
        conn = await asyncpg.connect(dsn, timeout=30)
    except (TimeoutError, OSError, asyncpg.PostgresError, ValueError) as exc:
        raise JournalError(
            f"cannot connect to the journal at {where}: {exc} (is the server running, and "
            "the DSN right?)",
            path=where,
        ) from exc
    try:
        await migrate(conn, where)
    except BaseException:
        await conn.close()
        raise
    return conn


async def schema_version(conn: asyncpg.Connection) -> int:
    """The schema's version (M1): 0 for a database without one."""
    exists = await conn.fetchval("SELECT to_regclass('dedalus_schema') IS NOT NULL")
    if not exists:
        return 0
    version: int = await conn.fetchval("SELECT version FROM dedalus_schema")
    return version


async def migrate(conn: asyncpg.Connection, where: str, *, to: int = SCHEMA_VERSION) -> None:
    """Bring the schema to version ``to`` (M2), or refuse a newer one (M3)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        version = await schema_version(conn)
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {where} was written by a newer dedalus_async (schema {version}, "
                f"this one reads {SCHEMA_VERSION}): upgrade dedalus_async",
                path=where,
            )
        for number in range(version + 1, to + 1):
            await conn.execute(MIGRATIONS[number - 1])
            await conn.execute("UPDATE dedalus_schema SET version = $1", number)


class PostgresJournal:
    """A :class:`~dedalus_async.Journal` in a PostgreSQL database:
    ``run_many(requests, journal="postgresql://...")`` makes one.

    ``dsn``: ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE`` (asyncpg's form).
    ``batch`` names the batch (a database holds many). ``reservation_max_age``: see
    :class:`~dedalus_async.Journal`. Writes nobody waits for (J3, J4) are sent together,
    at the next write somebody waits for or after a few milliseconds; each write is one
    transaction, committed before the call that asked for durability returns. Like the
    SQLite journal, it stores fingerprints of env values and stdin, never the values (the
    workers' ``submit_batch`` is what stores whole requests). Needs asyncpg
    (``pip install "dedalus-async[postgres]"``), imported when it first connects.
    Use it as ``async with PostgresJournal(dsn) as journal:`` or call :meth:`aclose`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        batch: str = "default",
        reservation_max_age: float | None = DEFAULT_RESERVATION_MAX_AGE,
    ) -> None:
        if not is_dsn(dsn):
            raise ValueError("dsn must be a PostgreSQL URL, postgresql://USER@HOST[:PORT]/DATABASE")
        if not isinstance(batch, str) or not batch.strip():
            raise ValueError("batch must be a non-empty name, e.g. batch='nightly'")
        self.dsn = dsn
        self.batch = batch
        self.reservation_max_age = check_seconds(
            "reservation_max_age", reservation_max_age, none_means="no limit"
        )
        self._where = redact_dsn(dsn)
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._rows: list[tuple[tuple[Any, ...], tuple[Any, ...] | None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._lazy: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<PostgresJournal {self._where!r} batch={self.batch!r}>"

    async def __aenter__(self) -> PostgresJournal:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- the Journal protocol ------------------------------------------------------------

    async def load(self) -> Batch | None:
        """See :meth:`~dedalus_async.Journal.load`."""
        async with self._connection() as conn:
            salt = await conn.fetchval(
                "SELECT salt FROM dedalus_batches WHERE name = $1", self.batch
            )
            if salt is None:
                return None
            rows = await conn.fetch(
                SELECT_JOBS + " WHERE j.batch = $1 ORDER BY j.position", self.batch
            )
        jobs = tuple(record_of(row, self._where) for row in rows)
        return Batch(name=self.batch, salt=salt, jobs=jobs)

    async def start(self, batch: Batch) -> None:
        """See :meth:`~dedalus_async.Journal.start`."""
        if batch.name != self.batch:
            raise ValueError(f"this journal holds batch {self.batch!r}, not {batch.name!r}")
        rows = [job_rows(batch.name, job) for job in batch.jobs]
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO dedalus_batches (name, salt, created_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO NOTHING",
                batch.name,
                batch.salt,
                time.time(),
            )
            await conn.execute("DELETE FROM dedalus_results WHERE batch = $1", batch.name)
            await conn.execute("DELETE FROM dedalus_jobs WHERE batch = $1", batch.name)
            await write_rows(conn, rows)

    async def save(self, *records: JobRecord, durable: bool) -> None:
        """See :meth:`~dedalus_async.Journal.save`."""
        self._check_open()
        self._rows.extend(job_rows(self.batch, record) for record in records)
        if durable:
            await self._write_pending()
        elif len(self._rows) >= _MAX_ROWS:
            self._write_later(0)
        elif self._timer is None and self._lazy is None:
            self._write_later(LAZY_WINDOW)

    async def flush(self) -> None:
        """See :meth:`~dedalus_async.Journal.flush`."""
        await self._write_pending()

    async def aclose(self) -> None:
        """Flush and close the connection. Idempotent."""
        if self._closed:
            return
        if self._lazy is not None:
            await asyncio.gather(self._lazy, return_exceptions=True)
        try:
            await self._write_pending()
        finally:
            self._closed = True
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await conn.close()

    # --- writing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError(f"journal {self._where} is closed", path=self._where)
        if self._failure is not None:
            # a write nobody waited for failed: every later one reports it
            raise JournalError(
                f"journal {self._where} failed to write: {self._failure}", path=self._where
            ) from self._failure

    def _write_later(self, delay: float) -> None:
        def start() -> None:
            self._timer = None
            if self._lazy is None:
                self._lazy = asyncio.get_running_loop().create_task(self._lazy_write())

        if delay == 0:
            if self._timer is not None:
                self._timer.cancel()
            start()
        else:
            self._timer = asyncio.get_running_loop().call_later(delay, start)

    async def _lazy_write(self) -> None:
        try:
            await self._write_pending()
        except Exception as exc:  # reported by the next call (J3/J4 writes have no waiter)
            self._failure = exc
        finally:
            self._lazy = None

    async def _write_pending(self) -> None:
        self._check_open()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        async with self._connection() as conn:
            # taken under the lock: rows queued while another write ran go in this one
            rows, self._rows = self._rows, []
            if not rows:
                return
            try:
                async with conn.transaction():
                    await write_rows(conn, rows)
            except BaseException as exc:
                self._failure = exc
                raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> JournalError:
        if isinstance(exc, JournalError):
            return exc
        return JournalError(f"journal {self._where} failed to write: {exc}", path=self._where)

    def _connection(self) -> _Connection:
        return _Connection(self)

    async def _connected(self) -> asyncpg.Connection:
        if self._conn is None:
            self._conn = await connect(self.dsn)
        return self._conn


class _Connection:
    """The journal's one connection, used by one caller at a time."""

    def __init__(self, journal: PostgresJournal) -> None:
        self._journal = journal

    async def __aenter__(self) -> asyncpg.Connection:
        journal = self._journal
        if journal._closed:
            raise JournalError(f"journal {journal._where} is closed", path=journal._where)
        await journal._lock.acquire()
        try:
            return await journal._connected()
        except BaseException:
            journal._lock.release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._journal._lock.release()
