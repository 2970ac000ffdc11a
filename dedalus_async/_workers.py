"""Many workers, one batch: a batch stored whole in PostgreSQL, run by any number of
worker processes on any number of machines.

:func:`submit_batch` stores the requests (all of each: workers elsewhere need the command,
cwd, env, stdin and timeouts, so env values and stdin are then in the database);
:func:`work_batch` claims jobs and runs each through the durable fan-out
(:mod:`~dedalus_async._durable`, D1-D6), so a job taken over behaves as a resumed one.

W1  A claim takes unfinished jobs with no live lease, in input order, with
    ``SELECT ... FOR UPDATE SKIP LOCKED``: two workers never claim the same job at once.
    It sets the lease (the worker's random owner token, and an expiry on the database's
    clock, so the workers' clocks do not matter) and logs the claim (``dedalus_claims``,
    with the owner it took the job from, if any).
W2  A worker renews the leases it holds every third of the lease time (heartbeat, on a
    connection of its own). A worker that dies stops renewing: its jobs are claimable once
    its leases expire, and the next claim attaches to a ``created`` job or re-sends a
    ``sent`` one under its journaled key (D2, D3): one execution per job.
W3  Every write of a job is fenced by the owner token (``WHERE lease_owner = token``): a
    worker whose lease lapsed (paused, cut off) cannot overwrite its successor's record.
    A write that finds the lease gone raises :class:`LeaseLostError` to the job, which
    the worker drops.
W4  A job's rows are written as in the single-process journal (J1-J5): ``sent`` durable
    before the POST, the rest group-committed; the outcome's write also releases the lease.
W5  A job whose run raised (not a non-zero exit code: that is a result) is released with
    its failure counted; after ``max_failures`` it is left unfinished, reported by
    ``batch status``, and no worker claims it again.
W6  A worker exits when no job of the batch is left to claim or running anywhere.
W7  One 429 pause for all: a worker whose Session's throttle was paused by a 429 writes
    the pause's end to the batch (``paused_until``, on the database's clock); every worker
    reads it a few times a second (:data:`SYNC_INTERVAL`) and pauses its own Session's
    throttle until then (:meth:`~dedalus_async.Throttle.rate_limited`), so a 429 seen by
    one worker stops them all for the server's ``Retry-After``.
W8  One cap on jobs in flight across all workers (``max_in_flight``, set at submit): a
    job is in flight from its claim until its outcome is written (or its lease expires).
    Claims are serialized under a transaction-level advisory lock per batch, and each
    takes at most the cap less the live leases.
W9  One requests-per-second ceiling for all (``rate``, set at submit, changed by
    submitting again): the batch's row holds the next free slot of one schedule, a slot
    every ``1 / rate`` seconds on the database's clock. A worker reserves a chunk of
    :func:`chunk_size` consecutive slots with one ``UPDATE ... RETURNING`` (about
    :data:`ROUND_TRIPS_PER_SECOND` round trips a second when it alone uses the whole
    rate), and its Session's throttle (T7, :meth:`~dedalus_async.Throttle.gated`) lets
    each request go at its slot's time, after any 429 pause. So in any T seconds the
    batch's workers send at most ``rate * T + 1`` requests on fresh slots, plus the slots
    that were reserved earlier and not yet spent: at most one chunk per worker. A worker
    that dies loses the unspent slots of its chunk (at most one chunk: the others' requests
    are not delayed by more than ``chunk / rate`` seconds). Each worker reads the rate with
    the 429 pause (W7), so a new one applies within :data:`SYNC_INTERVAL`.
W10 The claims log stays bounded: claims of jobs finished, made more than
    :data:`CLAIMS_MAX_AGE` ago, are deleted (across all batches of the database) when a
    worker starts; a claim goes with its job, so deleting a batch
    (``DELETE FROM dedalus_batches WHERE name = ...``) deletes its jobs, results and
    claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._checks import check_count, check_seconds
from ._clock import Clock
from ._durable import job_id
from ._errors import BatchChangedError, JournalError, LeaseLostError
from ._fanout import ExecutionRequest
from ._journal import (
    _DUMPS,
    DEFAULT_RESERVATION_MAX_AGE,
    LAZY_WINDOW,
    Batch,
    JobRecord,
    job_rows,
)
from ._policy import UsePolicyDefault
from ._postgres import connect, is_dsn, record_of, redact_dsn
from ._throttle import check_rate

if TYPE_CHECKING:
    import asyncpg

    from ._session import Session

__all__ = ["WorkSummary", "submit_batch", "work_batch"]

#: Default lease, in seconds: how long a dead worker's jobs wait before another takes them.
DEFAULT_LEASE: Final = 30.0
#: Seconds between two looks at the batch's shared 429 pause (W7).
SYNC_INTERVAL: Final = 0.25
#: Default failures (exceptions, W5) after which a job is left unfinished.
DEFAULT_MAX_FAILURES: Final = 3
#: W9: a worker that alone uses a batch's whole rate reserves its slots in chunks sized
#: for about this many database round trips a second.
ROUND_TRIPS_PER_SECOND: Final = 10
#: W10: seconds after which the claims of a finished job are deleted (a week).
CLAIMS_MAX_AGE: Final = 7 * 24 * 3600.0


def chunk_size(rate: float) -> int:
    """W9: how many slots of a batch's schedule a worker reserves at once, at ``rate``
    requests per second: ``rate / ROUND_TRIPS_PER_SECOND`` rounded up."""
    return max(1, math.ceil(rate / ROUND_TRIPS_PER_SECOND))


@attrs.frozen(kw_only=True)
class WorkSummary:
    """What one :func:`work_batch` call did: ``claimed`` jobs (``taken_over`` of them from
    a worker whose lease had expired), ``finished`` (with a result, whatever its exit
    code), ``failed`` (raised: counted toward ``max_failures``), ``lost`` (lease lost,
    W3), and ``left`` jobs of the batch no worker will run (failed too often)."""

    worker: str
    claimed: int
    taken_over: int
    finished: int
    failed: int
    lost: int
    left: int


# --- submitting ------------------------------------------------------------------------


# the columns of a job row (job_rows), in order
_JOB_COLUMNS: Final = (
    "batch", "job", "position", "fingerprint", "machine_id", "command", "idempotency_key",
    "state", "attempt", "sent_at", "execution_id", "error",
)  # fmt: skip


def _request_document(request: ExecutionRequest) -> dict[str, Any]:
    document: dict[str, Any] = {
        "machine_id": request.machine_id,
        "command": list(request.command),
        "cwd": request.cwd,
        "env": None if request.env is None else dict(request.env),
        "stdin": request.stdin,
        "timeout_ms": request.timeout_ms,
        "idempotency_key": request.idempotency_key,
    }
    if not isinstance(request.timeout, UsePolicyDefault):
        document["timeout"] = request.timeout
    return document


def _request_of(document: dict[str, Any]) -> ExecutionRequest:
    return ExecutionRequest(**document)


def _check_dsn(dsn: object) -> str:
    if not is_dsn(dsn):
        raise ValueError(
            "dsn must be a PostgreSQL URL, postgresql://USER@HOST[:PORT]/DATABASE "
            "(a shared batch lives in PostgreSQL, not in an SQLite file)"
        )
    assert isinstance(dsn, str)
    return dsn


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name must be a non-empty batch name, e.g. name='nightly'")
    return name


async def submit_batch(
    dsn: str,
    requests: Iterable[ExecutionRequest],
    *,
    name: str = "default",
    max_in_flight: int | None = None,
    rate: float | None = None,
) -> int:
    """Store ``requests`` as batch ``name`` in the PostgreSQL database ``dsn``, for
    :func:`work_batch` to run on any number of machines; returns the number of jobs.

    The whole requests are stored (env values and stdin included: workers elsewhere need
    them). Submitting the same requests again under the same name does nothing; different
    ones raise :class:`~dedalus_async.BatchChangedError` (use a new name).
    ``max_in_flight`` caps the jobs in flight across all the batch's workers together
    (``None``: each worker's ``concurrency`` is the only limit); ``rate`` caps the requests
    per second of all the batch's workers together (``None``: no shared ceiling; W9).
    Submitting again sets both, while workers run.
    """
    dsn, name = _check_dsn(dsn), _check_name(name)
    if max_in_flight is not None:
        max_in_flight = check_count("max_in_flight", max_in_flight)
    rate = check_rate(rate)
    items = list(requests)
    for position, request in enumerate(items):
        if not isinstance(request, ExecutionRequest):
            raise TypeError(
                f"requests[{position}] must be an ExecutionRequest, not {type(request).__name__}"
            )
    jobs = [job_id(position, request.key) for position, request in enumerate(items)]
    if len(set(jobs)) != len(jobs):
        raise ValueError("the requests' keys must be unique within a batch")
    documents = [_DUMPS(_request_document(request)) for request in items]
    conn = await connect(dsn)
    try:
        async with conn.transaction():
            held = await conn.fetch(
                "SELECT job, request FROM dedalus_jobs WHERE batch = $1 ORDER BY position", name
            )
            if held:
                if [(r["job"], r["request"]) for r in held] == list(
                    zip(jobs, documents, strict=True)
                ):
                    await conn.execute(_SET_LIMITS, name, max_in_flight, rate)
                    return len(items)
                raise BatchChangedError(
                    f"batch {name!r} of {redact_dsn(dsn)} holds other requests: submit "
                    "these under a new name"
                )
            salt = secrets.token_hex(16)
            await conn.execute(
                "INSERT INTO dedalus_batches (name, salt, created_at, shared, max_in_flight, "
                "rate) VALUES ($1, $2, $3, true, $4, $5)",
                name,
                salt,
                time.time(),
                max_in_flight,
                rate,
            )
            rows = []
            for position, (request, job, document) in enumerate(
                zip(items, jobs, documents, strict=True)
            ):
                spec = request._spec(position, request.idempotency_key or secrets.token_hex(16))
                record = JobRecord(
                    job=job,
                    position=position,
                    fingerprint=spec.fingerprint(salt),
                    machine_id=request.machine_id,
                    command=request.command,
                    idempotency_key=spec.idempotency_key,
                )
                rows.append((*job_rows(name, record)[0], document))
            await conn.copy_records_to_table(
                "dedalus_jobs",
                records=rows,
                columns=[*_JOB_COLUMNS, "request"],
            )
    finally:
        await conn.close()
    return len(items)


# --- working ---------------------------------------------------------------------------

_SET_LIMITS: Final = "UPDATE dedalus_batches SET max_in_flight = $2, rate = $3 WHERE name = $1"
# W8: claims of one batch one at a time, and how many more its cap allows
_CLAIM_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtext('dedalus_claims'), hashtext($1))"
_ROOM: Final = """
SELECT b.max_in_flight - (
    SELECT count(*) FROM dedalus_jobs
    WHERE batch = $1 AND state <> 'finished' AND lease_owner IS NOT NULL
        AND lease_until >= clock_timestamp()
)
FROM dedalus_batches AS b WHERE b.name = $1 AND b.max_in_flight IS NOT NULL
"""
_CLAIM: Final = """
WITH picked AS (
    SELECT job, lease_owner AS previous FROM dedalus_jobs
    WHERE batch = $1 AND state <> 'finished' AND failures < $4
        AND (lease_owner IS NULL OR lease_until < clock_timestamp())
    ORDER BY position LIMIT $3
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE dedalus_jobs AS j
    SET lease_owner = $2, lease_until = clock_timestamp() + make_interval(secs => $5)
    FROM picked WHERE j.batch = $1 AND j.job = picked.job
    RETURNING j.job, picked.previous
), logged AS (
    INSERT INTO dedalus_claims (batch, job, owner, previous_owner)
    SELECT $1, job, $2, previous FROM claimed
)
SELECT j.job, j.position, j.fingerprint, j.machine_id, j.command, j.idempotency_key,
    j.state, j.attempt, j.sent_at, j.execution_id, r.execution, r.output, j.error,
    j.request, c.previous
FROM claimed AS c
JOIN dedalus_jobs AS j ON j.batch = $1 AND j.job = c.job
LEFT JOIN dedalus_results AS r ON r.batch = $1 AND r.job = c.job
ORDER BY j.position
"""
# One statement for every row of a group commit, fenced by the token (W3); the outcome
# releases the lease (W4). RETURNING says which rows were still ours.
_FENCED_WRITE: Final = """
UPDATE dedalus_jobs AS j SET
    state = u.state, attempt = u.attempt, sent_at = u.sent_at,
    execution_id = u.execution_id, error = u.error, idempotency_key = u.idempotency_key,
    lease_owner = CASE WHEN u.state = 'finished' THEN NULL ELSE j.lease_owner END,
    lease_until = CASE WHEN u.state = 'finished' THEN NULL ELSE j.lease_until END
FROM unnest($3::text[], $4::text[], $5::int[], $6::float8[], $7::text[], $8::text[],
    $9::text[]) AS u(job, state, attempt, sent_at, execution_id, error, idempotency_key)
WHERE j.batch = $1 AND j.job = u.job AND j.lease_owner = $2
RETURNING j.job
"""
_RESULTS: Final = """
INSERT INTO dedalus_results (batch, job, execution, output)
SELECT $1, u.job, u.execution, u.output
FROM unnest($2::text[], $3::text[], $4::text[]) AS u(job, execution, output)
ON CONFLICT (batch, job) DO UPDATE SET execution = EXCLUDED.execution,
    output = EXCLUDED.output
"""
# SKIP LOCKED: a row this worker's writer holds is renewed at the next beat. Waiting for
# it instead deadlocked with the writer (two connections of one worker locking the same
# rows in different orders): measured at 10,000 jobs, 89 jobs failed that way.
_RENEW: Final = """
UPDATE dedalus_jobs SET lease_until = clock_timestamp() + make_interval(secs => $3)
WHERE batch = $1 AND job IN (
    SELECT job FROM dedalus_jobs WHERE batch = $1 AND lease_owner = $2
    FOR UPDATE SKIP LOCKED
)
"""
_RELEASE_FAILED: Final = """
UPDATE dedalus_jobs SET lease_owner = NULL, lease_until = NULL, failures = failures + 1
WHERE batch = $1 AND job = $2 AND lease_owner = $3
"""
_SHARE_PAUSE: Final = """
UPDATE dedalus_batches
SET paused_until = greatest(coalesce(paused_until, '-infinity'),
    clock_timestamp() + make_interval(secs => $2))
WHERE name = $1
"""
_READ_SHARED: Final = """
SELECT extract(epoch FROM paused_until - clock_timestamp())::float8 AS pause, rate
FROM dedalus_batches WHERE name = $1
"""
# W9: the next `$2` slots of the batch's schedule (none before now); RETURNING says how
# far ahead of now the schedule's end is, and at what rate its slots are spaced
_RESERVE: Final = """
UPDATE dedalus_batches
SET rate_next = greatest(coalesce(rate_next, '-infinity'), clock_timestamp())
    + make_interval(secs => $2::float8 / rate)
WHERE name = $1 AND rate IS NOT NULL
RETURNING rate, extract(epoch FROM rate_next - clock_timestamp())::float8 AS ahead
"""
# W10
_PRUNE_CLAIMS: Final = """
DELETE FROM dedalus_claims AS c USING dedalus_jobs AS j
WHERE j.batch = c.batch AND j.job = c.job AND j.state = 'finished'
    AND c.claimed_at < clock_timestamp() - make_interval(secs => $1)
"""
_OPEN: Final = """
SELECT count(*) FILTER (WHERE failures < $2) AS open,
    count(*) FILTER (WHERE failures >= $2) AS left
FROM dedalus_jobs WHERE batch = $1 AND state <> 'finished'
"""


class _Writer:
    """A worker's fenced group commit (W3, W4): every job's rows queued while a write ran
    go in the next one, as one statement."""

    def __init__(self, conn: asyncpg.Connection, batch: str, owner: str) -> None:
        self._conn = conn
        self._batch = batch
        self._owner = owner
        self._rows: dict[str, JobRecord] = {}
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.lost: set[str] = set()
        self.unwritten: set[str] = set()
        #: the worker's claims and this writer share the connection, one at a time
        self.lock = asyncio.Lock()

    async def write(self, record: JobRecord, *, durable: bool) -> None:
        self._rows[record.job] = record
        if not durable:
            if self._timer is None and self._task is None:
                self._timer = asyncio.get_running_loop().call_later(LAZY_WINDOW, self._kick)
            return
        await self.wait_for(record.job)

    async def wait_for(self, job: str) -> None:
        """Until what was queued for ``job`` is written; :class:`LeaseLostError` if the
        lease was gone."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((job, future))
        self._kick()
        await future

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._rows or self._waiters:
                rows, self._rows = self._rows, {}
                waiters, self._waiters = self._waiters, []
                error: BaseException | None = None
                try:
                    if rows:
                        await self._write(list(rows.values()))
                except Exception as exc:
                    error = exc
                    # not written, and nobody may wait for these: their jobs' next wait
                    # (the fan-out's final flush at the latest) says so
                    self.unwritten.update(rows)
                for job, future in waiters:
                    if future.done():
                        continue
                    if error is not None or job in self.unwritten:
                        future.set_exception(
                            JournalError(
                                f"job {job!r}: the batch's database failed to write its "
                                f"record: {error or 'an earlier write failed'}"
                            )
                        )
                    elif job in self.lost:
                        future.set_exception(
                            LeaseLostError(
                                f"job {job!r}: this worker's lease ran out and another "
                                "worker may have it; its record was not written"
                            )
                        )
                    else:
                        future.set_result(None)
        finally:
            self._task = None

    async def _write(self, records: Sequence[JobRecord]) -> None:
        columns: list[list[Any]] = [[] for _ in range(7)]
        for r in records:
            for column, value in zip(
                columns,
                (r.job, r.state.value, r.attempt, r.sent_at, r.execution_id, r.error,
                 r.idempotency_key),
                strict=True,
            ):  # fmt: skip
                column.append(value)
        async with self.lock, self._conn.transaction():
            kept = {
                row[0]
                for row in await self._conn.fetch(_FENCED_WRITE, self._batch, self._owner, *columns)
            }
            results: list[list[Any]] = [[], [], []]
            for r in records:
                if r.job not in kept:
                    self.lost.add(r.job)
                    continue
                _, result = job_rows(self._batch, r)
                if result is not None:
                    for column, value in zip(results, result[1:], strict=True):
                        column.append(value)
            if results[0]:
                await self._conn.execute(_RESULTS, self._batch, *results)


class _SharedRate:
    """W9: this worker's part of the batch's requests-per-second ceiling, the gate its
    Session's throttle applies (T7). Slots are reserved a chunk at a time on a connection
    of their own (opened when first needed) and spent one per request, at their times."""

    def __init__(self, dsn: str, batch: str, clock: Clock, rate: float | None) -> None:
        #: the batch's rate as last read (W7's look at the batch refreshes it); None: no gate
        self.rate = rate
        self._dsn = dsn
        self._batch = batch
        self._clock = clock
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._next = 0.0  # when the next reserved slot is due, on the clock's monotonic scale
        self._interval = 0.0
        self._left = 0  # reserved slots not yet spent

    def take(self) -> Awaitable[None] | None:
        """The gate: ``None`` when a request may go now, else what to await first."""
        if self.rate is None:
            return None
        if self._left and not self._lock.locked():
            return self._spend()
        return self._take()

    def _spend(self) -> Awaitable[None] | None:
        slot = self._next
        self._next += self._interval
        self._left -= 1
        delay = slot - self._clock.monotonic()
        return None if delay <= 0 else self._clock.sleep(delay)

    async def _take(self) -> None:
        async with self._lock:  # one reservation at a time; callers queue behind it
            while not self._left:
                # not before the last chunk's slots are due: this worker holds at most
                # one chunk of the schedule ahead of time (what it loses if it dies)
                due = self._next - self._clock.monotonic()
                if due > 0:
                    await self._clock.sleep(due)
                if self.rate is None or not await self._reserve():
                    return  # the batch has no rate (any more): go
            waiting = self._spend()
        if waiting is not None:
            await waiting

    async def _reserve(self) -> bool:
        if self._conn is None:
            self._conn = await connect(self._dsn)
        count = chunk_size(self.rate or 1.0)
        row = await self._conn.fetchrow(_RESERVE, self._batch, float(count))
        if row is None:
            self.rate = None
            return False
        self.rate = rate = float(row["rate"])
        # the chunk's slots end `ahead` seconds from now (the database's now, taken as
        # ours: the round trip only makes them later)
        self._interval = 1.0 / rate
        self._next = self._clock.monotonic() + row["ahead"] - count * self._interval
        self._left = count
        return True

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()


class _ClaimedJob:
    """The journal of one claimed job, as the durable fan-out sees it: a batch of one,
    named ``#0``; its writes go, fenced, to the worker's writer."""

    def __init__(
        self, batch: str, salt: str, record: JobRecord, writer: _Writer, max_age: float | None
    ) -> None:
        self.batch = batch
        self.reservation_max_age = max_age
        self._salt = salt
        self._record = record
        self._writer = writer

    async def load(self) -> Batch | None:
        only = attrs.evolve(self._record, job="#0", position=0)
        return Batch(name=self.batch, salt=self._salt, jobs=(only,))

    async def start(self, batch: Batch) -> None:  # pragma: no cover - load() matches
        raise JournalError("a claimed job's batch is not rewritten")

    async def save(self, *records: JobRecord, durable: bool) -> None:
        for record in records:
            mine = attrs.evolve(record, job=self._record.job, position=self._record.position)
            await self._writer.write(mine, durable=durable)

    async def flush(self) -> None:
        await self._writer.wait_for(self._record.job)

    async def aclose(self) -> None:
        await self.flush()


async def work_batch(
    session: Session,
    dsn: str,
    *,
    name: str = "default",
    concurrency: int = 8,
    lease: float = DEFAULT_LEASE,
    max_failures: int = DEFAULT_MAX_FAILURES,
    reservation_max_age: float | None = DEFAULT_RESERVATION_MAX_AGE,
    on_start: Callable[[str], object] | None = None,
) -> WorkSummary:
    """Run jobs of batch ``name`` (stored by :func:`submit_batch` in ``dsn``) through
    ``session``, up to ``concurrency`` at a time, until none is left (W1-W8).

    Start it on as many machines as you like. Each job is claimed under a ``lease`` of
    that many seconds, renewed while this worker lives; a worker that dies leaves its jobs
    to the others once its leases expire, and they attach to or re-create (under the same
    Idempotency-Key) what it started. A job that raises is retried by the next claim, up
    to ``max_failures`` times (a non-zero exit code is a result, not a failure).
    ``on_start`` is called with this worker's owner token (as ``dedalus_claims`` logs it)
    once the batch is found.
    """
    dsn, name = _check_dsn(dsn), _check_name(name)
    concurrency = check_count("concurrency", concurrency)
    max_failures = check_count("max_failures", max_failures)
    lease_s = check_seconds("lease", lease)
    assert lease_s is not None  # no none_means: None was refused
    max_age = check_seconds("reservation_max_age", reservation_max_age, none_means="no limit")
    owner = secrets.token_hex(16)
    where = redact_dsn(dsn)
    conn = await connect(dsn)
    beat: asyncpg.Connection | None = None
    shared: _SharedRate | None = None
    counts = {"claimed": 0, "taken_over": 0, "finished": 0, "failed": 0, "lost": 0}
    left = 0
    try:
        found = await conn.fetchrow(
            "SELECT salt, shared, rate FROM dedalus_batches WHERE name = $1", name
        )
        if found is None or not found["shared"]:  # a run_many batch has no requests
            raise JournalError(
                f"{where} holds no submitted batch {name!r}: store one first with "
                f"`dedalus-async batch submit FILE --journal DSN --name {name}` "
                "(or submit_batch)",
                path=where,
            )
        salt: str = found["salt"]
        shared = _SharedRate(dsn, name, session.clock, found["rate"])
        await conn.execute(_PRUNE_CLAIMS, CLAIMS_MAX_AGE)  # W10
        if on_start is not None:
            on_start(owner)
        beat = await connect(dsn)
        writer = _Writer(conn, name, owner)
        running: set[asyncio.Task[None]] = set()
        heartbeat = asyncio.create_task(_upkeep(session, beat, name, owner, lease_s, shared))
        try:
            while True:
                free = concurrency - len(running)
                claimed = []
                if free > 0:
                    async with writer.lock:
                        claimed = await _claim(conn, name, owner, free, max_failures, lease_s)
                for row in claimed:
                    counts["claimed"] += 1
                    counts["taken_over"] += row["previous"] is not None
                    record = record_of(tuple(row)[:13], where)
                    request = _request_of(_loads(row["request"]))
                    job = _ClaimedJob(name, salt, record, writer, max_age)
                    task = asyncio.create_task(
                        _run_job(
                            session, shared, conn, writer, name, owner, job, record, request,
                            counts,
                        )
                    )  # fmt: skip
                    running.add(task)
                    task.add_done_callback(running.discard)
                if claimed and len(running) < concurrency:
                    continue
                if not running:
                    async with writer.lock:
                        still = await conn.fetchrow(_OPEN, name, max_failures)
                    assert still is not None  # an aggregate has one row
                    if still["open"] == 0:
                        left = int(still["left"])
                        break
                    # others hold what is left: wait for theirs to end or expire (W2)
                    await asyncio.sleep(min(1.0, lease_s / 4))
                    continue
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        finally:
            heartbeat.cancel()
            for task in list(running):
                task.cancel()
            await asyncio.gather(heartbeat, *running, return_exceptions=True)
    finally:
        await conn.close()
        if beat is not None:
            await beat.close()
        if shared is not None:
            await shared.aclose()
    return WorkSummary(worker=owner, left=left, **counts)


async def _claim(
    conn: asyncpg.Connection, batch: str, owner: str, free: int, max_failures: int, lease: float
) -> list[asyncpg.Record]:
    """W1 and W8: up to ``free`` jobs, fewer if the batch's cap says so."""
    async with conn.transaction():
        await conn.execute(_CLAIM_LOCK, batch)
        room = await conn.fetchval(_ROOM, batch)
        if room is not None:
            free = min(free, room)
            if free <= 0:
                return []
        return await conn.fetch(_CLAIM, batch, owner, free, max_failures, lease)


async def _run_job(
    session: Session,
    shared: _SharedRate,
    conn: asyncpg.Connection,
    writer: _Writer,
    batch: str,
    owner: str,
    journal: _ClaimedJob,
    record: JobRecord,
    request: ExecutionRequest,
    counts: dict[str, int],
) -> None:
    try:
        with session.throttle.gated(shared.take):  # W9: every request of the job
            (outcome,) = await session.run_many(
                [attrs.evolve(request, key=None)], journal=journal, return_exceptions=True
            )
    except JournalError as exc:  # the final flush: lease lost (W3), or the database failed
        outcome = exc
    if not isinstance(outcome, BaseException):
        counts["finished"] += 1
        return
    if isinstance(outcome, LeaseLostError) or record.job in writer.lost:
        counts["lost"] += 1
        return
    counts["failed"] += 1
    async with writer.lock:
        await conn.execute(_RELEASE_FAILED, batch, record.job, owner)


async def _upkeep(
    session: Session,
    conn: asyncpg.Connection,
    batch: str,
    owner: str,
    lease: float,
    shared: _SharedRate,
) -> None:
    """W2, W7 and W9, on a connection of their own: renew this worker's leases every third
    of the lease time; share 429 pauses and read the batch's rate every
    :data:`SYNC_INTERVAL`."""
    throttle = session.throttle
    seen = throttle.rate_limited_count
    renewed = time.monotonic()
    while True:
        await asyncio.sleep(min(SYNC_INTERVAL, lease / 3))
        with contextlib.suppress(Exception):  # a missed beat: the next one tries again
            if time.monotonic() - renewed >= lease / 3:
                await conn.execute(_RENEW, batch, owner, lease)
                renewed = time.monotonic()
            now = session.clock.monotonic()
            if throttle.rate_limited_count != seen and throttle.paused_until > now:
                # this Session was told to back off: so is every worker of the batch
                await conn.execute(_SHARE_PAUSE, batch, throttle.paused_until - now)
            seen = throttle.rate_limited_count
            row = await conn.fetchrow(_READ_SHARED, batch)
            if row is None:  # the batch was deleted under its workers
                continue
            shared.rate = row["rate"]
            left = row["pause"]
            if left is not None and left > 0 and throttle.paused_until < now + left - 0.05:
                throttle.rate_limited(left, throttle.epoch)
                seen = throttle.rate_limited_count


def _loads(text: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(text)
    return document
