"""Durable fan-out: matching a batch with its journal, and the journal's side of each job.

:class:`Ledger` is what the fan-out engine (:mod:`~dedalus_async._fanout`) calls around
each step of a job when ``run_many`` / ``as_completed`` got a ``journal``; the record
states and the rules of what is written when are in :mod:`~dedalus_async._journal`
(J1-J5). Resuming, job by job:

D1  ``finished``: the journaled result is delivered at once; no request is sent.
D2  ``created``: attach to the journaled execution ID and wait for it.
D3  ``sent``: POST again under the journaled Idempotency-Key (the server answers with the
    execution it may have created), unless the first send is older than the journal's
    ``reservation_max_age``: then :class:`StaleReservationError` for that job, nothing sent.
D4  ``pending``: run it.
D5  A job that ended with an exception is not finished, and runs again on resume from
    where it stopped: a create refused with a definitive 4xx created nothing, so it
    gets a fresh key (state ``pending``); any other failed create may have created it,
    so the key is kept (``sent``); a failed wait or output read attaches again
    (``created``).
D6  Jobs are matched by the request's ``key``, else by position (``#N``), and each is
    checked against its fingerprint: a batch that differs in any job is refused with
    :class:`BatchChangedError` before anything is sent.

:class:`RetryExecution` (with or without a journal) re-creates a job whose execution
ended ``expired`` or with a chosen ``error_code``, each attempt under a new key (journaled
before its POST); never because of a non-zero exit code.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable, Collection, Sequence
from typing import Final

import anyio
import attrs

from ._checks import check_count
from ._errors import APIStatusError, BatchChangedError, JournalError, StaleReservationError
from ._journal import Batch, JobRecord, JobState, Journal, SQLiteJournal, dumps
from ._models import Execution, ExecutionOutput, ExecutionStatus
from ._postgres import PostgresJournal, is_dsn
from ._results import ExecutionResult

__all__ = ["Ledger", "RetryExecution", "job_id", "open_journal"]

# 4xx answers to a create that mean the server created nothing: a new key is safe (D5).
# 408 and 429 are transient and retried by the Requester under the same key.
_NOTHING_CREATED = frozenset({400, 401, 403, 404, 409, 422})


def _attempts(value: object) -> int:
    return check_count("attempts", value)


def _error_codes(value: Collection[str]) -> frozenset[str]:
    if isinstance(value, str) or not all(isinstance(code, str) for code in value):
        raise TypeError("error_codes must be a collection of error_code strings")
    return frozenset(value)


@attrs.frozen(kw_only=True)
class RetryExecution:
    """Create a job's execution again when it ended for reasons of the infrastructure.

    ``attempts``: executions created per job at most (the first included). An execution
    that ended ``expired`` (with ``expired=True``) or whose ``error_code`` is in
    ``error_codes`` is replaced by a new one, under a new Idempotency-Key; a non-zero exit
    code never is. Off unless passed as ``retry_execution=`` to ``run_many`` /
    ``as_completed``.
    """

    attempts: int = attrs.field(default=3, converter=_attempts)
    error_codes: frozenset[str] = attrs.field(
        default=frozenset({"execution_runner_interrupted", "exec_frame_read_timeout"}),
        converter=_error_codes,
    )
    expired: bool = True

    def wants_another(self, execution: Execution, attempt: int) -> bool:
        """Whether a job whose attempt number ``attempt`` ended as ``execution`` runs again."""
        if attempt >= self.attempts:
            return False
        if self.expired and execution.status == ExecutionStatus.EXPIRED:
            return True
        return execution.error_code is not None and execution.error_code in self.error_codes


def job_id(position: int, key: str | None) -> str:
    """A job's identity within its batch: its ``key``, else ``#position``."""
    return key if key is not None else f"#{position}"


def fingerprint(
    salt: str,
    machine_id: str,
    command: Sequence[str],
    cwd: str | None,
    env: dict[str, str] | None,
    stdin: str | None,
    timeout_ms: int | None,
    idempotency_key: str | None,
) -> str:
    """A salted SHA-256 of what a request runs: equal for equal requests, and neither env
    values nor stdin can be read back from it (the salt defeats precomputed tables)."""
    document = [
        machine_id,
        list(command),
        cwd,
        None if env is None else sorted(env.items()),
        stdin,
        timeout_ms,
        idempotency_key,
    ]
    text = dumps(document)  # json.dumps(ensure_ascii=False, separators=(",", ":"))'s text
    return hashlib.sha256(f"{salt}\n{text}".encode()).hexdigest()


def open_journal(journal: object) -> tuple[Journal, bool]:
    """The journal a ``journal=`` argument names, and whether the fan-out owns (closes) it."""
    if is_dsn(journal):
        assert isinstance(journal, str)
        return PostgresJournal(journal), True
    if isinstance(journal, str | os.PathLike):
        return SQLiteJournal(journal), True
    if isinstance(journal, Journal):
        return journal, False
    raise TypeError(
        "journal must be a path (str or os.PathLike) to an SQLite journal, a PostgreSQL DSN "
        "(postgresql://...), or a Journal, "
        f"not {type(journal).__name__}"
    )


@attrs.frozen
class JobSpec:
    """What the ledger needs of one request to journal it."""

    job: str
    machine_id: str
    command: tuple[str, ...]
    fingerprint: Callable[[str], str]  # salt -> fingerprint
    idempotency_key: str


#: Jobs marked ``sent`` ahead of time by each J2 commit, besides the one being sent: one
#: commit (and one wait for it) per 32 creates. A job marked but not yet sent when the
#: process dies is sent on resume under its key, as if it had been; measured with
#: ``python -m benchmarks.journal_cost``, 15 cost ~2 us more per job, 63 no less than 31.
RESERVE_AHEAD: Final = 31


class _Commit:
    """A J2 commit that other jobs' creates wait for."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        self.error = exc

    async def wait(self) -> None:
        await self.done.wait()
        if self.error is not None:
            # the mark this create needed was never made durable: it must not be sent
            raise JournalError(
                f"the journal could not record this job as sent: {self.error}"
            ) from self.error


class Ledger:
    """The journal's side of a running batch: loaded (and checked) once, then one call
    around each step of each job."""

    def __init__(self, journal: Journal, new_key: Callable[[], str]) -> None:
        self.journal = journal
        self._new_key = new_key
        self.records: list[JobRecord] = []
        # J2 commits in flight, by the jobs they mark; and how far _ahead has looked
        self._commits: dict[int, _Commit] = {}
        self._scanned = 0

    async def open(self, specs: Sequence[JobSpec]) -> list[JobRecord]:
        """Load the batch (or write it, J1) and match it with ``specs`` (D6)."""
        journal = self.journal
        batch = await journal.load()
        salt = batch.salt if batch is not None else secrets.token_hex(16)
        if batch is None:
            records = [
                JobRecord(
                    job=spec.job,
                    position=position,
                    fingerprint=spec.fingerprint(salt),
                    machine_id=spec.machine_id,
                    command=spec.command,
                    idempotency_key=spec.idempotency_key,
                )
                for position, spec in enumerate(specs)
            ]
            await journal.start(Batch(name=journal.batch, salt=salt, jobs=tuple(records)))
        else:
            records = self._match(batch, specs)
            if any(r.position != i for i, r in enumerate(records)):
                records = [attrs.evolve(r, position=i) for i, r in enumerate(records)]
                await journal.start(Batch(name=batch.name, salt=salt, jobs=tuple(records)))
        self.records = records
        return records

    def _match(self, batch: Batch, specs: Sequence[JobSpec]) -> list[JobRecord]:
        held = {record.job: record for record in batch.jobs}
        given = {spec.job for spec in specs}
        where = f"batch {batch.name!r} of the journal"
        new = [spec.job for spec in specs if spec.job not in held]
        gone = [record.job for record in batch.jobs if record.job not in given]
        if new or gone:
            parts = []
            if new:
                parts.append(f"{len(new)} job(s) not in it ({_few(new)})")
            if gone:
                parts.append(f"{len(gone)} job(s) of it missing ({_few(gone)})")
            raise BatchChangedError(
                f"these requests are not {where}: {'; '.join(parts)}. Run the same "
                "requests again to resume, or use a new batch name or journal for new ones"
            )
        records = []
        for position, spec in enumerate(specs):
            record = held[spec.job]
            if spec.fingerprint(batch.salt) != record.fingerprint:
                raise BatchChangedError(
                    f"requests[{position}] (job {spec.job!r}) differs from the one journaled "
                    f"in {where} (machine, command, cwd, env, stdin, timeout_ms or "
                    "idempotency_key changed). Run the same requests again to resume, or use "
                    "a new batch name or journal for new ones"
                )
            records.append(record)
        return records

    # --- one job, step by step ------------------------------------------------------------

    def result_of(self, index: int) -> ExecutionResult | None:
        """The journaled result of a finished job (D1), else ``None``."""
        record = self.records[index]
        if record.state is not JobState.FINISHED or record.execution is None:
            return None
        output = record.output
        return ExecutionResult(
            execution=record.execution,
            stdout=(output.stdout if output else None) or "",
            stderr=(output.stderr if output else None) or "",
            output=output,
        )

    def check_resendable(self, index: int, now: float) -> None:
        """D3: a ``sent`` job older than the journal's limit is reported, not sent."""
        record = self.records[index]
        limit = self.journal.reservation_max_age
        if record.state is not JobState.SENT or limit is None or record.sent_at is None:
            return
        age = now - record.sent_at
        if age > limit:
            raise StaleReservationError(
                f"job {record.job!r}: its create was reserved {age:.0f} s ago (and may have "
                f"been sent) under Idempotency-Key {record.idempotency_key}, and no answer "
                "was journaled; "
                f"that is more than reservation_max_age ({limit:g} s), and the server may "
                "have forgotten the key, so it is not sent again. Look for it among the "
                f"executions of {record.machine_id}; to send it anyway, resume with a larger "
                "reservation_max_age",
                job=record.job,
                idempotency_key=record.idempotency_key,
                machine_id=record.machine_id,
                sent_at=record.sent_at,
            )

    async def sending(self, index: int) -> str:
        """J2: the job's key, once its record says ``sent``, committed, before its POST.

        The commit is shared: it also marks ``sent`` the next jobs due to be sent
        (:data:`RESERVE_AHEAD` of them), so most creates find theirs done already. Their
        ``sent_at`` is then a moment early, which errs on the safe side of
        ``reservation_max_age``.
        """
        record = self.records[index]
        if record.state is JobState.SENT:
            commit = self._commits.get(index)
            if commit is not None:
                await commit.wait()
            return record.idempotency_key
        indexes = [index, *self._ahead(index)]
        now = time.time()
        commit = _Commit()
        before = [self.records[i] for i in indexes]
        marked = []
        for i in indexes:
            r = self.records[i]
            self.records[i] = r = _step(
                r, JobState.SENT, r.idempotency_key, r.attempt, now, r.execution_id, r.error
            )
            marked.append(r)
            self._commits[i] = commit
        try:
            await self.journal.save(*marked, durable=True)
        except BaseException as exc:
            commit.fail(exc)
            # not durable, so not sent: each of these tries its own commit when its turn
            # comes (and is not sent unless that one holds)
            for i, record in zip(indexes, before, strict=True):
                self.records[i] = record
            raise
        finally:
            commit.done.set()
            for i in indexes:
                self._commits.pop(i, None)
        return self.records[index].idempotency_key

    def _ahead(self, index: int) -> list[int]:
        """The next ``pending`` jobs after ``index``, in the order workers take them."""
        records = self.records
        found: list[int] = []
        position = max(index + 1, self._scanned)
        while position < len(records) and len(found) < RESERVE_AHEAD:
            if records[position].state is JobState.PENDING:
                found.append(position)
            position += 1
        self._scanned = position
        return found

    async def created(self, index: int, execution_id: str) -> None:
        """J3."""
        r = self.records[index]
        self.records[index] = r = _step(
            r, JobState.CREATED, r.idempotency_key, r.attempt, r.sent_at, execution_id, r.error
        )
        await self.journal.save(r, durable=False)

    async def failed(self, index: int, error: BaseException) -> None:
        """D5: the job stays where resuming should take it up again."""
        record = self.records[index]
        described = f"{type(error).__name__}: {error}"
        if (
            record.state is JobState.SENT
            and isinstance(error, APIStatusError)
            and error.status in _NOTHING_CREATED
        ):
            # refused outright: nothing was created, and a new key is safe
            state, key, sent_at = JobState.PENDING, self._new_key(), None
        else:
            state, key, sent_at = record.state, record.idempotency_key, record.sent_at
        self.records[index] = record = _step(
            record, state, key, record.attempt, sent_at, record.execution_id, described
        )
        await self.journal.save(record, durable=False)

    async def again(self, index: int, execution: Execution) -> None:
        """A new attempt (:class:`RetryExecution`): a new key, journaled before its POST."""
        record = self.records[index]
        how = execution.error_code or execution.status
        self.records[index] = record = _step(
            record,
            JobState.PENDING,
            self._new_key(),
            record.attempt + 1,
            None,
            None,
            f"attempt {record.attempt}: execution {execution.execution_id} ended {how}",
        )
        await self.journal.save(record, durable=False)

    async def finished(self, index: int, result: ExecutionResult) -> None:
        """J4."""
        r = self.records[index]
        execution = result.execution
        self.records[index] = r = _step(
            r,
            JobState.FINISHED,
            r.idempotency_key,
            r.attempt,
            r.sent_at,
            execution.execution_id,
            None,
            execution,
            result.output,
        )
        await self.journal.save(r, durable=False)


def _step(
    r: JobRecord,
    state: JobState,
    idempotency_key: str,
    attempt: int,
    sent_at: float | None,
    execution_id: str | None,
    error: str | None,
    execution: Execution | None = None,
    output: ExecutionOutput | None = None,
) -> JobRecord:
    """``r`` moved on a step: what a job's steps change, all given (a result only to a
    finished job). About half the cost of ``attrs.evolve`` (timeit), 3 times a job."""
    return JobRecord(
        job=r.job,
        position=r.position,
        fingerprint=r.fingerprint,
        machine_id=r.machine_id,
        command=r.command,
        idempotency_key=idempotency_key,
        state=state,
        attempt=attempt,
        sent_at=sent_at,
        execution_id=execution_id,
        execution=execution,
        output=output,
        error=error,
    )


def _few(jobs: Sequence[str]) -> str:
    shown = ", ".join(repr(job) for job in jobs[:3])
    return shown + (", ..." if len(jobs) > 3 else "")
