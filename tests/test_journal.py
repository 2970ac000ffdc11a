"""Durable batches: the SQLite journal on real files, and run_many / as_completed resuming
from it against FakeDedalus (fake clock), counting what the server was sent."""

from __future__ import annotations

import os
import pickle
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import attrs
import pytest

from dedalus_async import (
    Batch,
    BatchChangedError,
    ExecutionFailed,
    ExecutionRequest,
    JobRecord,
    JobState,
    Journal,
    JournalError,
    PostgresJournal,
    Progress,
    RetryExecution,
    Session,
    SQLiteJournal,
    StaleReservationError,
    _journal,
)
from dedalus_async._convert import unstructure
from dedalus_async._durable import fingerprint
from dedalus_async._models import ArtifactRef, Execution, ExecutionOutput, LogCapture
from dedalus_async.testing import FakeDedalus, Fault, Outcome, Script

REPO = Path(_journal.__file__).resolve().parent.parent

MACHINE = "dm-5b0c3a9e-2f71-4d86-9e15-7a4c8b2d6f03"


def _batch(n: int = 5, *, keyed: bool = False) -> list[ExecutionRequest]:
    return [
        ExecutionRequest(
            machine_id=MACHINE,
            command=["echo", f"job {i}"],
            env={"TOKEN": f"secret-value-{i}"},
            key=f"k{i}" if keyed else None,
        )
        for i in range(n)
    ]


def _creates(fake: FakeDedalus) -> list[str | None]:
    return [r.idempotency_key for r in fake.requests if r.method == "POST"]


def _read_all(folder: Path, pattern: str) -> bytes:
    return b"".join(p.read_bytes() for p in folder.glob(pattern))


def _wreck(path: Path) -> None:
    """Keep the SQLite header, overwrite every page after it."""
    data = bytearray(path.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)
    path.write_bytes(bytes(data))
    Path(f"{path}-wal").unlink(missing_ok=True)


@pytest.fixture(params=["sqlite", "postgres"])
def journal_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's journal lives: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "batch.db")
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


def _open(target: str | Path, **options: Any) -> SQLiteJournal | PostgresJournal:
    """The journal at ``target``, of the store its form names (as ``journal=`` does)."""
    if str(target).startswith("postgresql://"):
        return PostgresJournal(str(target), **options)
    return SQLiteJournal(target, **options)


async def _set_state(path: str | Path, index: int, **changes: Any) -> None:
    """Rewrite one job's record, as a crash at that point would have left it."""
    async with _open(path) as journal:
        batch = await journal.load()
        assert batch is not None
        await journal.save(attrs.evolve(batch.jobs[index], **changes), durable=True)


# --- the SQLite journal itself ---------------------------------------------------------


async def test_a_second_run_sends_nothing_and_returns_the_same_results(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    first = await session.run_many(_batch(), journal=path)
    assert [r.stdout for r in first] == [f"job {i}\n" for i in range(5)]
    sent = len(fake.requests)
    again = await session.run_many(_batch(), journal=path)
    assert len(fake.requests) == sent  # not one request
    assert [r.execution for r in again] == [r.execution for r in first]
    assert [r.stdout for r in again] == [r.stdout for r in first]
    assert len(fake.executions) == 5


async def test_the_journal_records_every_job_and_no_secret(
    session: Session, tmp_path: Path
) -> None:
    path = tmp_path / "batch.db"
    results = await session.run_many(_batch(), journal=path)
    async with SQLiteJournal(path) as journal:
        batch = await journal.load()
    assert batch is not None
    assert [job.job for job in batch.jobs] == [f"#{i}" for i in range(5)]
    assert {job.state for job in batch.jobs} == {JobState.FINISHED}
    assert [job.execution for job in batch.jobs] == [r.execution for r in results]
    assert [job.command for job in batch.jobs] == [("echo", f"job {i}") for i in range(5)]
    assert all(job.sent_at is not None and job.attempt == 1 for job in batch.jobs)
    raw = _read_all(tmp_path, "batch.db*")
    assert b"secret-value" not in raw  # env values are fingerprinted, never stored


async def test_a_lazy_save_is_durable_after_flush_and_batches_are_separate(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    record = JobRecord(
        job="a",
        position=0,
        fingerprint="f",
        machine_id=MACHINE,
        command=("x",),
        idempotency_key="k1",
    )
    async with SQLiteJournal(path, batch="one") as one:
        assert await one.load() is None
        await one.start(Batch(name="one", salt="s", jobs=(record,)))
        await one.save(
            attrs.evolve(record, state=JobState.CREATED, execution_id="e1"), durable=False
        )
        await one.flush()
        # another connection sees it once flushed
        with sqlite3.connect(path) as conn:
            (state,) = conn.execute("SELECT state FROM jobs WHERE job = 'a'").fetchone()
        assert state == "created"
    async with SQLiteJournal(path, batch="two") as two:
        assert await two.load() is None
        with pytest.raises(ValueError, match="holds batch 'two'"):
            await two.start(Batch(name="one", salt="s", jobs=()))
    async with SQLiteJournal(path, batch="one") as again:
        loaded = await again.load()
    assert loaded is not None
    assert loaded.jobs[0].execution_id == "e1"


async def test_a_foreign_sqlite_file_is_refused_and_left_alone(
    session: Session, fake: FakeDedalus, tmp_path: Path
) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    before = path.read_bytes()
    with pytest.raises(JournalError, match="not a dedalus_async journal") as caught:
        await session.run_many(_batch(), journal=path)
    assert str(path) in str(caught.value)
    assert caught.value.path == str(path)
    assert fake.requests == []
    assert path.read_bytes() == before


async def test_a_file_that_is_not_sqlite_is_refused(
    session: Session, fake: FakeDedalus, tmp_path: Path
) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"this": "is not a database, but the results of something else"}\n' * 50)
    with pytest.raises(JournalError, match=r"results\.jsonl is not a dedalus_async journal"):
        await session.run_many(_batch(), journal=path)
    assert fake.requests == []


async def test_a_corrupted_journal_is_refused(
    session: Session, fake: FakeDedalus, tmp_path: Path
) -> None:
    path = tmp_path / "batch.db"
    await session.run_many(_batch(), journal=path)
    sent = len(fake.requests)
    _wreck(path)
    with pytest.raises(JournalError, match=str(path)):
        await session.run_many(_batch(), journal=path)
    assert len(fake.requests) == sent


async def test_a_journal_of_a_newer_version_is_refused(
    session: Session, fake: FakeDedalus, tmp_path: Path
) -> None:
    path = tmp_path / "batch.db"
    await session.run_many(_batch(1), journal=path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(JournalError, match="newer dedalus_async"):
        await session.run_many(_batch(1), journal=path)


async def test_a_journal_in_a_missing_folder_says_so(session: Session, tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="does its folder exist"):
        await session.run_many(_batch(1), journal=tmp_path / "nowhere" / "batch.db")


def test_bad_journal_arguments_fail_at_once(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="journal path must be a str"):
        SQLiteJournal(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch must be a non-empty name"):
        SQLiteJournal(tmp_path / "j.db", batch=" ")
    with pytest.raises(ValueError, match="reservation_max_age must be positive"):
        SQLiteJournal(tmp_path / "j.db", reservation_max_age=0)
    with pytest.raises(ValueError, match="key must be 1-255 printable characters"):
        ExecutionRequest(machine_id=MACHINE, command=["true"], key="#3")
    with pytest.raises(TypeError, match="attempts must be an int"):
        RetryExecution(attempts="3")
    with pytest.raises(TypeError, match="error_codes must be a collection"):
        RetryExecution(error_codes="oops")


async def test_bad_fan_out_arguments_fail_before_any_request(
    session: Session, fake: FakeDedalus, tmp_path: Path
) -> None:
    with pytest.raises(TypeError, match="journal must be a path"):
        await session.run_many(_batch(), journal=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="retry_execution must be a RetryExecution"):
        await session.run_many(_batch(), retry_execution=3)  # type: ignore[call-overload]
    twice = [*_batch(1, keyed=True), *_batch(1, keyed=True)]
    with pytest.raises(ValueError, match=r"requests\[0\] and requests\[1\] share the key 'k0'"):
        await session.run_many(twice, journal=tmp_path / "j.db")
    assert fake.requests == []
    assert not (tmp_path / "j.db").exists()


async def test_a_closed_journal_says_so(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "j.db")
    assert await journal.load() is None
    await journal.aclose()
    await journal.aclose()  # idempotent
    with pytest.raises(JournalError, match="is closed"):
        await journal.load()


# --- resuming, state by state ------------------------------------------------------------


async def test_a_sent_job_is_sent_again_under_its_key_and_not_created_twice(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    """The crash came after the POST went out, before its answer was journaled."""
    path = journal_target
    first = await session.run_many(_batch(), journal=path)
    async with _open(path) as journal:
        batch = await journal.load()
    assert batch is not None
    key = batch.jobs[2].idempotency_key
    await _set_state(path, 2, state=JobState.SENT, execution_id=None, execution=None, output=None)
    fake.requests.clear()
    again = await session.run_many(_batch(), journal=path)
    assert _creates(fake) == [key]
    assert len(fake.executions) == 5  # the server answered with the one it had
    assert again[2].execution.execution_id == first[2].execution.execution_id
    assert again[2].stdout == "job 2\n"


async def test_a_created_job_is_attached_to_not_created_again(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    first = await session.run_many(_batch(), journal=path)
    await _set_state(path, 4, state=JobState.CREATED, execution=None, output=None)
    fake.requests.clear()
    again = await session.run_many(_batch(), journal=path)
    assert _creates(fake) == []
    paths = {r.path for r in fake.requests}
    eid = first[4].execution.execution_id
    assert any(eid in p for p in paths)
    assert all(eid in p for p in paths)
    assert again[4].stdout == "job 4\n"


async def test_a_pending_job_runs_under_its_journaled_key(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    await session.run_many(_batch(2), journal=path)
    async with _open(path) as journal:
        batch = await journal.load()
    assert batch is not None
    await _set_state(
        path,
        1,
        state=JobState.PENDING,
        execution_id=None,
        execution=None,
        output=None,
        sent_at=None,
    )
    fake.requests.clear()
    await session.run_many(_batch(2), journal=path)
    assert _creates(fake) == [batch.jobs[1].idempotency_key]


async def test_an_old_reservation_is_reported_not_sent(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    await session.run_many(_batch(2), journal=path)
    await _set_state(
        path,
        0,
        state=JobState.SENT,
        execution_id=None,
        execution=None,
        output=None,
        sent_at=time.time() - 7200,
    )
    fake.requests.clear()
    results = await session.run_many(_batch(2), journal=path, return_exceptions=True)
    assert isinstance(results[0], StaleReservationError)
    assert "reservation_max_age (3600 s)" in str(results[0])
    assert results[0].machine_id == MACHINE
    assert fake.requests == []
    # a larger limit sends it (under the same key: the server still knows it here)
    longer = _open(path, reservation_max_age=3 * 3600)
    async with longer:
        resent = await session.run_many(_batch(2), journal=longer)
    assert resent[0].stdout == "job 0\n"
    assert len(fake.executions) == 2


async def test_a_create_refused_outright_gets_a_new_key_on_resume(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    fake.add_fault(Fault(method="POST", status=422))
    results = await session.run_many(_batch(1), journal=path, return_exceptions=True)
    assert isinstance(results[0], Exception)
    refused = _creates(fake)
    async with _open(path) as journal:
        batch = await journal.load()
    assert batch is not None
    job = batch.jobs[0]
    assert job.state is JobState.PENDING
    assert job.error
    assert "HTTP 422" in job.error
    assert job.idempotency_key not in refused
    (result,) = await session.run_many(_batch(1), journal=path)
    assert _creates(fake)[-1] == job.idempotency_key
    assert result.ok


async def test_a_create_that_failed_in_transit_keeps_its_key_on_resume(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    # 503s until the Session's retries give up, yet the first POST did create it
    fake.add_fault(Fault(method="POST", drop_after_commit=True))
    fake.add_fault(Fault(method="POST", status=503, times=None))
    results = await session.run_many(_batch(1), journal=path, return_exceptions=True)
    assert isinstance(results[0], Exception)
    key = _creates(fake)[0]
    fake.clear_faults()
    (result,) = await session.run_many(_batch(1), journal=path)
    assert set(_creates(fake)) == {key}
    assert len(fake.executions) == 1
    assert result.stdout == "job 0\n"


# --- matching a batch with its journal --------------------------------------------------


async def test_a_changed_request_is_refused_before_anything_is_sent(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    await session.run_many(_batch(3), journal=path)
    fake.requests.clear()
    changed = _batch(3)
    changed[1] = attrs.evolve(changed[1], env={"TOKEN": "another"})
    with pytest.raises(BatchChangedError, match=r"requests\[1\] \(job '#1'\) differs"):
        await session.run_many(changed, journal=path)
    with pytest.raises(BatchChangedError, match=r"1 job\(s\) of it missing \('#2'\)"):
        await session.run_many(_batch(2), journal=path)
    with pytest.raises(BatchChangedError, match=r"1 job\(s\) not in it \('#3'\)"):
        await session.run_many(_batch(4), journal=path)
    assert fake.requests == []


async def test_keyed_jobs_match_by_key_in_any_order(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    first = await session.run_many(_batch(4, keyed=True), journal=path)
    fake.requests.clear()
    shuffled = list(reversed(_batch(4, keyed=True)))
    again = await session.run_many(shuffled, journal=path)
    assert fake.requests == []
    assert [r.stdout for r in again] == [r.stdout for r in reversed(first)]
    async with _open(path) as journal:
        batch = await journal.load()
    assert batch is not None
    assert [j.job for j in batch.jobs] == ["k3", "k2", "k1", "k0"]


async def test_progress_starts_from_the_journaled_jobs_and_check_still_applies(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    requests = [*_batch(2), ExecutionRequest(machine_id=MACHINE, command=["false"])]
    await session.run_many(requests, journal=path, return_exceptions=True)
    seen: list[Progress] = []
    results = await session.run_many(
        requests, journal=path, check=True, return_exceptions=True, on_progress=seen.append
    )
    assert isinstance(results[2], ExecutionFailed)
    assert results[2].result.exit_code == 1
    assert seen[-1].done == 2
    assert seen[-1].failed == 1


async def test_as_completed_resumes_from_the_journal(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    async with session.as_completed(_batch(3), journal=path) as completed:
        first = {item.index: item.result.stdout async for item in completed}
    fake.requests.clear()
    async with session.as_completed(_batch(3), journal=path) as completed:
        again = {item.index: item.result.stdout async for item in completed}
    assert again == first
    assert fake.requests == []


# --- retrying the command -------------------------------------------------------------


def _expiring_then(outcome: Outcome, failures: int) -> object:
    calls = {"n": 0}

    def factory(body: dict[str, object]) -> Script:
        calls["n"] += 1
        if calls["n"] <= failures:
            return Script.running(1.0, Outcome(status="expired", exit_code=None))
        return Script.immediate(outcome)

    return factory


async def test_retry_execution_creates_an_expired_job_again_under_a_new_key(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    fake.set_script(_expiring_then(Outcome(stdout="done\n"), failures=2))  # type: ignore[arg-type]
    path = journal_target
    (result,) = await session.run_many(
        _batch(1), journal=path, retry_execution=RetryExecution(attempts=3)
    )
    assert result.stdout == "done\n"
    keys = _creates(fake)
    assert len(keys) == 3
    assert len(set(keys)) == 3
    async with _open(path) as journal:
        batch = await journal.load()
    assert batch is not None
    assert batch.jobs[0].attempt == 3


async def test_retry_execution_stops_after_its_attempts_and_without_a_journal_too(
    fake: FakeDedalus, session: Session
) -> None:
    fake.set_script(_expiring_then(Outcome(), failures=5))  # type: ignore[arg-type]
    (result,) = await session.run_many(_batch(1), retry_execution=RetryExecution(attempts=2))
    assert result.execution.status == "expired"
    assert len(set(_creates(fake))) == 2


async def test_retry_execution_never_reruns_a_non_zero_exit_or_other_error_codes(
    fake: FakeDedalus, session: Session
) -> None:
    fake.set_script(Script.immediate(Outcome(status="failed", exit_code=3, error_code="other")))
    retry = RetryExecution(attempts=5, error_codes={"execution_runner_interrupted"})
    (result,) = await session.run_many(_batch(1), retry_execution=retry)
    assert result.exit_code == 3
    assert len(_creates(fake)) == 1
    fake.set_script(
        Script.immediate(
            Outcome(status="failed", exit_code=None, error_code="execution_runner_interrupted")
        )
    )
    (result,) = await session.run_many(_batch(1), retry_execution=retry)
    assert len(_creates(fake)) == 1 + 5


async def test_as_completed_refuses_a_bad_journal_when_entered(
    fake: FakeDedalus, session: Session, journal_target: str
) -> None:
    path = journal_target
    await session.run_many(_batch(2), journal=path)
    with pytest.raises(BatchChangedError):
        async with session.as_completed(_batch(3), journal=path):
            pytest.fail("the block must not run")


async def test_a_failed_write_is_reported_to_its_waiter_or_to_the_next_caller(
    tmp_path: Path,
) -> None:
    good = JobRecord(
        job="a",
        position=0,
        fingerprint="f",
        machine_id=MACHINE,
        command=("x",),
        idempotency_key="k1",
    )
    unbindable = attrs.evolve(good, fingerprint=None)  # type: ignore[arg-type] # NOT NULL
    async with SQLiteJournal(tmp_path / "j.db") as journal:
        await journal.start(Batch(name="default", salt="s", jobs=(good,)))
        with pytest.raises(JournalError, match="cannot be used") as caught:
            await journal.save(unbindable, durable=True)
        assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
        await journal.save(attrs.evolve(good, attempt=2), durable=True)  # still usable
        await journal.save(unbindable, durable=False)  # nobody waits for this one...
        with pytest.raises(JournalError, match="NOT NULL constraint failed"):
            await journal.flush()  # ...so the next caller hears of it
        with pytest.raises(JournalError, match="failed to write"):
            await journal.aclose()
    async with SQLiteJournal(tmp_path / "j.db") as again:
        batch = await again.load()
    assert batch is not None
    assert batch.jobs[0].attempt == 2  # the failed transaction wrote nothing


class MemoryJournal:
    """A Journal of our own (a dict): the protocol is all the fan-out needs."""

    def __init__(self) -> None:
        self.batch = "default"
        self.reservation_max_age: float | None = None
        self.held: Batch | None = None
        self.saves: list[tuple[JobState, bool]] = []
        self.durable_calls = 0
        self.flushes = 0
        self.failing: Exception | None = None

    async def load(self) -> Batch | None:
        return self.held

    async def start(self, batch: Batch) -> None:
        self.held = batch

    async def save(self, *records: JobRecord, durable: bool) -> None:
        assert self.held is not None
        self.durable_calls += durable
        if self.failing is not None:
            raise self.failing
        for record in records:
            jobs = [record if job.job == record.job else job for job in self.held.jobs]
            self.held = attrs.evolve(self.held, jobs=tuple(jobs))
            self.saves.append((record.state, durable))

    async def flush(self) -> None:
        self.flushes += 1

    async def aclose(self) -> None:
        raise AssertionError("a journal passed in is the caller's to close")


async def test_any_journal_store_works_and_only_sent_marks_wait_for_durability(
    fake: FakeDedalus, session: Session
) -> None:
    journal = MemoryJournal()
    assert isinstance(journal, Journal)
    first = await session.run_many(_batch(3), journal=journal)
    assert sorted(journal.saves) == sorted(
        [(JobState.SENT, True), (JobState.CREATED, False), (JobState.FINISHED, False)] * 3
    )
    assert journal.flushes == 1
    sent = len(fake.requests)
    again = await session.run_many(_batch(3), journal=journal)
    assert len(fake.requests) == sent
    assert [r.execution for r in again] == [r.execution for r in first]


async def test_a_record_this_version_cannot_read_is_refused(
    session: Session, fake: FakeDedalus, tmp_path: Path
) -> None:
    path = tmp_path / "batch.db"
    await session.run_many(_batch(1), journal=path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE jobs SET state = 'teleported'")
    sent = len(fake.requests)
    with pytest.raises(JournalError, match="holds a record this version cannot read"):
        await session.run_many(_batch(1), journal=path)
    assert len(fake.requests) == sent
    unused = SQLiteJournal(tmp_path / "unused.db")
    await unused.flush()
    await unused.aclose()
    assert not (tmp_path / "unused.db").exists()  # never opened, never created


async def test_a_batch_missing_many_jobs_names_a_few(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "batch.db"
    await session.run_many(_batch(6), journal=path)
    with pytest.raises(
        BatchChangedError, match=r"5 job\(s\) of it missing \('#1', '#2', '#3', \.\.\.\)"
    ):
        await session.run_many(_batch(1), journal=path)


async def test_one_commit_marks_several_creates_sent_and_none_is_sent_unmarked(
    fake: FakeDedalus, session: Session
) -> None:
    journal = MemoryJournal()
    await session.run_many(_batch(40), journal=journal, create_concurrency=4)
    assert sum(durable for _, durable in journal.saves) == 40  # every job marked sent
    assert journal.durable_calls <= 40 // 8  # ...by a few commits, not one each
    failing = MemoryJournal()
    failing.failing = OSError("disk full")
    results = await session.run_many(
        _batch(40, keyed=True), journal=failing, return_exceptions=True
    )
    assert all(isinstance(r, BaseException) for r in results)
    assert _creates(fake).count(None) == 0
    assert len(fake.executions) == 40  # the first batch's only: nothing was sent unmarked


# --- what the journal stores, with and without orjson --------------------------------------

_AT = datetime(2026, 3, 4, 5, 6, 7, 891_000, tzinfo=UTC)
# every field of an execution set, times in three forms, text JSON must escape
_FULL = Execution(
    execution_id="exe-1",
    machine_id=MACHINE,
    created_at=_AT,
    status="failed",
    command=("sh", "-c", 'echo "caf\u00e9"\n\t\\ \u2028 \U0001f600'),
    started_at=_AT.replace(microsecond=123_456),  # microseconds
    completed_at=_AT.astimezone(timezone(timedelta(hours=-5))),  # another offset
    cwd="/w\u00e9rk",
    env_keys=("A", "B"),
    exit_code=3,
    signal=9,
    error_code="execution_runner_interrupted",
    error_message="ctrl \x00\x01\x1f\x7f",
    stdout_bytes=2**40,
    stderr_bytes=0,
    stdout_truncated=True,
    stderr_truncated=False,
    retry_after_ms=0,
    expires_at=datetime(2026, 3, 5),  # naive: read as UTC
    artifacts=(
        ArtifactRef(artifact_id="a1", name="out.txt"),
        ArtifactRef(artifact_id="a2", name=""),
    ),
    log_capture=LogCapture(state="incomplete", code="c", lost_bytes=1, unconfirmed_bytes=0),
    creation_request_id="req-1",
    creation_trace_id="0" * 32,
)
_MODELS: list[Execution | ExecutionOutput] = [
    _FULL,
    Execution(execution_id="exe-2", machine_id=MACHINE, created_at=_AT, status="queued"),
    Execution(
        execution_id="exe-3",
        machine_id=MACHINE,
        created_at=_AT,
        status="succeeded",
        log_capture=LogCapture(),
        artifacts=(),
        command=(),
    ),
    ExecutionOutput(execution_id="exe-1", stdout="\u00e9\n" * 3, stderr="", stdout_bytes=9),
    ExecutionOutput(execution_id="exe-2"),
]


@attrs.frozen
class _WithSet:
    name: str
    tags: frozenset[str] | None = None


@attrs.frozen
class _WithOptional:
    name: str
    when: Optional[datetime] = None  # noqa: UP045 - the typing.Union spelling, on purpose


def test_results_are_stored_as_unstructure_and_json_write_them() -> None:
    """The journal's fast paths (its own unstructure, orjson) store the very text that
    unstructure + json.dumps(ensure_ascii=False, compact) stores, for every field."""
    assert all(getattr(_FULL, f.name) is not None for f in attrs.fields(Execution))
    for model in _MODELS:
        assert _journal.plain(model) == unstructure(model)
        text = _journal._DUMPS(unstructure(model))
        assert _journal._orjson_dumps(_journal.plain(model)) == text
        assert _journal.dumps(_journal.plain(model)) == text
    # what orjson refuses (a lone surrogate, an integer past 64 bits) is json's to write
    for odd in (["\ud800"], [2**64], {"x": [-(2**70)]}):
        assert _journal._orjson_dumps(odd) == _journal._DUMPS(odd)
    # both models have their function (else every result goes the slow way)...
    assert set(_journal._PLAIN) == {Execution, ExecutionOutput}
    # ...and a model with a field of a type it has no case for has none (unstructure's)
    assert _journal._plain_of(_WithSet) is None
    assert _journal._plain_of(_WithOptional) is not None
    # a value of a type it has no case for: unstructure's answer
    odd_status = attrs.evolve(_FULL, status=JobState.SENT)
    assert _journal.plain(odd_status) == unstructure(odd_status)


def test_fingerprints_are_the_ones_earlier_versions_wrote() -> None:
    """A journal written before orjson wrote fingerprints resumes: these were computed with
    json.dumps."""
    args = (("echo", "caf\u00e9 \u2028", '"q"'), "/tmp", {"B": "2", "A": "1\n"}, "in\x00\x7f")
    assert (
        fingerprint("s4lt", "dm-5b0c3a9e-2f71-4d86-9e15-7a4c8b2d6f03", *args, 5000, "key-1")
        == "993ea99c171a4bd8a8bda9fa283aff0ebf149824993aadb7e13dd720fb5d8735"
    )
    assert (
        fingerprint(
            "s4lt",
            "dm-5b0c3a9e-2f71-4d86-9e15-7a4c8b2d6f03",
            ("echo",),
            None,
            None,
            None,
            None,
            None,
        )
        == "ee07b7f68435e477a05e723b519bf7d565eb7ea3195f19676f85bc758114e2b6"
    )


_WRITE_BATCH = """
import asyncio, pickle, sys
{block}
from dedalus_async import Batch, SQLiteJournal, _journal

async def main():
    records = pickle.loads(sys.stdin.buffer.read())
    async with SQLiteJournal(sys.argv[1]) as journal:
        await journal.start(Batch(name="default", salt="s", jobs=tuple(records)))
    print(_journal.dumps is _journal._DUMPS)

asyncio.run(main())
"""


def _stored(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        jobs = conn.execute("SELECT * FROM jobs ORDER BY position").fetchall()
        results = conn.execute("SELECT * FROM results ORDER BY id").fetchall()
    return jobs + results


def test_the_journal_stores_the_same_text_without_orjson(tmp_path: Path) -> None:
    """The same records, written by a process without orjson (stdlib json) and by one
    with it: the same rows, to the byte."""
    records = [
        JobRecord(
            job=f"k\u00e9{i}",
            position=i,
            fingerprint="f",
            machine_id=MACHINE,
            command=("echo", f"\u00e9\n{i}"),
            idempotency_key=f"key-{i}",
            state=JobState.FINISHED,
            sent_at=1.5 + i,
            execution_id=model.execution_id,
            execution=model,
            output=ExecutionOutput(execution_id=model.execution_id, stdout="\u00e9\x00\n"),
        )
        for i, model in enumerate(m for m in _MODELS if isinstance(m, Execution))
    ]
    stored = {}
    for name, block in (("with", ""), ("without", "sys.modules['orjson'] = None")):
        path = tmp_path / f"{name}.db"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", _WRITE_BATCH.format(block=block), str(path)],
            input=pickle.dumps(records),
            capture_output=True,
            check=True,
            env=env,
        )
        assert out.stdout.decode().strip() == str(name == "without")  # the path it took
        stored[name] = _stored(path)
    assert stored["with"] == stored["without"]
    assert len(stored["with"]) == 2 * len(records)
