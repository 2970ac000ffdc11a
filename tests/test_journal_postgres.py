"""The PostgreSQL journal's own behaviour, on a real server (tests/postgres.py): its
schema created and migrated (M1-M3 in dedalus_async._postgres), and its errors. What it
shares with the SQLite journal is tested on both in tests/test_journal.py."""

from __future__ import annotations

import asyncio

import asyncpg
import attrs
import pytest

from dedalus_async import (
    Batch,
    ExecutionRequest,
    JobRecord,
    JobState,
    JournalError,
    PostgresJournal,
    Session,
    submit_batch,
    work_batch,
)
from dedalus_async._journal import _MAX_ROWS
from dedalus_async._postgres import MIGRATIONS, SCHEMA_VERSION, migrate, redact_dsn
from dedalus_async.testing import FakeDedalus

from .conftest import API_KEY

MACHINE = "dm-5b0c3a9e-2f71-4d86-9e15-7a4c8b2d6f03"


def _requests(n: int) -> list[ExecutionRequest]:
    return [
        ExecutionRequest(machine_id=MACHINE, command=["echo", f"job {i}"], stdin=f"secret-{i}")
        for i in range(n)
    ]


async def _version(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        version: int = await conn.fetchval("SELECT version FROM dedalus_schema")
    finally:
        await conn.close()
    return version


async def test_an_empty_database_gets_the_latest_schema_and_no_secret(
    session: Session, postgres_dsn: str
) -> None:
    await session.run_many(_requests(3), journal=postgres_dsn)
    assert SCHEMA_VERSION == 3
    assert await _version(postgres_dsn) == SCHEMA_VERSION
    conn = await asyncpg.connect(postgres_dsn)
    try:
        columns = {
            row[0]
            for row in await conn.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'dedalus_jobs'"
            )
        }
        dumped = await conn.fetchval(
            "SELECT string_agg(j::text, ' ') FROM dedalus_jobs AS j"
        ) + await conn.fetchval("SELECT string_agg(r::text, ' ') FROM dedalus_results AS r")
    finally:
        await conn.close()
    assert {"lease_owner", "lease_until", "request", "failures"} <= columns
    assert "secret-" not in dumped  # run_many stores fingerprints, never stdin or env


async def test_a_version_1_journal_is_migrated_and_its_batch_resumes(
    fake: FakeDedalus, session: Session, postgres_dsn: str
) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await migrate(conn, "test", to=1)
        assert await conn.fetchval("SELECT version FROM dedalus_schema") == 1
        has_lease = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'lease_owner'"
        )
        assert has_lease == 0
    finally:
        await conn.close()
    # the journal migrates it to the latest when it connects (rows of version 1: below)
    first = await session.run_many(_requests(3), journal=postgres_dsn)
    assert await _version(postgres_dsn) == SCHEMA_VERSION
    sent = len(fake.requests)
    again = await session.run_many(_requests(3), journal=postgres_dsn)
    assert len(fake.requests) == sent
    assert [r.execution for r in again] == [r.execution for r in first]


async def test_rows_written_at_version_1_are_read_after_the_migration(
    postgres_dsn: str,
) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await migrate(conn, "test", to=1)
        await conn.execute(
            "INSERT INTO dedalus_batches VALUES ('old', 'salt', 0);"
            "INSERT INTO dedalus_jobs VALUES ('old', '#0', 0, 'fp', "
            f"'{MACHINE}', '[\"true\"]', 'key-1', 'sent', 1, 5.0, NULL, NULL)"
        )
    finally:
        await conn.close()
    async with PostgresJournal(postgres_dsn, batch="old") as journal:
        batch = await journal.load()
    assert batch is not None
    (job,) = batch.jobs
    assert (job.state, job.idempotency_key, job.command, job.sent_at) == (
        JobState.SENT, "key-1", ("true",), 5.0,
    )  # fmt: skip
    assert await _version(postgres_dsn) == SCHEMA_VERSION


async def test_a_version_2_database_is_migrated_and_its_shared_batch_is_worked(
    live_fake: FakeDedalus, postgres_dsn: str
) -> None:
    """From version 2 to 3: a batch submitted at version 2 gets a rate (W9) and is worked;
    its claims survive, a claim of no job (possible at version 2) is deleted, and claims
    now go with their batch (W10)."""
    request = ExecutionRequest(machine_id=MACHINE, command=["true"])
    fingerprint = request._spec(0, "key-1").fingerprint("salt")
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await migrate(conn, "test", to=2)
        await conn.execute(
            "INSERT INTO dedalus_batches (name, salt, created_at, shared) "
            "VALUES ('old', 'salt', 0, true);"
            "INSERT INTO dedalus_jobs (batch, job, position, fingerprint, machine_id, "
            "command, idempotency_key, state, attempt, request) VALUES ('old', '#0', 0, "
            f"'{fingerprint}', '{MACHINE}', '[\"true\"]', 'key-1', 'pending', 0, "
            f'\'{{"machine_id": "{MACHINE}", "command": ["true"]}}\');'
            "INSERT INTO dedalus_claims (batch, job, owner) VALUES ('old', '#0', 'w1'), "
            "('gone', '#0', 'w2')"
        )
    finally:
        await conn.close()
    await submit_batch(postgres_dsn, [], name="other", rate=1000.0)  # connects: migrates
    assert await _version(postgres_dsn) == SCHEMA_VERSION
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("UPDATE dedalus_batches SET rate = 50 WHERE name = 'old'")
        async with Session(API_KEY, base_url=live_fake.base_url) as session:
            summary = await work_batch(session, postgres_dsn, name="old", lease=5)
        assert (summary.claimed, summary.finished) == (1, 1)
        assert await conn.fetchval(
            "SELECT rate_next IS NOT NULL FROM dedalus_batches WHERE name = 'old'"
        )  # the rate was used
        owners = [r[0] for r in await conn.fetch("SELECT owner FROM dedalus_claims ORDER BY id")]
        assert owners == ["w1", summary.worker]
        await conn.execute("DELETE FROM dedalus_batches WHERE name = 'old'")
        assert await conn.fetchval("SELECT count(*) FROM dedalus_claims") == 0
    finally:
        await conn.close()


async def test_a_newer_schema_is_refused_before_anything_is_written(
    session: Session, fake: FakeDedalus, postgres_dsn: str
) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await migrate(conn, "test")
        await conn.execute("UPDATE dedalus_schema SET version = $1", len(MIGRATIONS) + 1)
    finally:
        await conn.close()
    with pytest.raises(JournalError, match=r"newer dedalus_async.*upgrade dedalus_async"):
        await session.run_many(_requests(1), journal=postgres_dsn)
    assert fake.requests == []


async def test_an_unreachable_server_says_so_without_the_password(session: Session) -> None:
    dsn = "postgresql://someone:hunter2@127.0.0.1:1/nothing"
    with pytest.raises(JournalError, match="cannot connect to the journal") as caught:
        await session.run_many(_requests(1), journal=dsn)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(PostgresJournal(dsn))
    assert redact_dsn(dsn) == "postgresql://someone:***@127.0.0.1:1/nothing"
    assert redact_dsn("postgresql://u@h/d") == "postgresql://u@h/d"


def test_bad_arguments_fail_at_once() -> None:
    with pytest.raises(ValueError, match="postgresql://"):
        PostgresJournal("mysql://x")
    with pytest.raises(ValueError, match="batch must be a non-empty name"):
        PostgresJournal("postgresql://u@h/d", batch="")


async def test_a_closed_journal_says_so(postgres_dsn: str) -> None:
    journal = PostgresJournal(postgres_dsn)
    assert await journal.load() is None
    await journal.aclose()
    await journal.aclose()
    with pytest.raises(JournalError, match="is closed"):
        await journal.load()
    with pytest.raises(JournalError, match="is closed"):
        await journal.flush()


def _record(job: str) -> JobRecord:
    return JobRecord(
        job=job, position=0, fingerprint="f", machine_id=MACHINE, command=("x",),
        idempotency_key=f"key-{job}",
    )  # fmt: skip


async def test_lazy_saves_are_written_in_groups_and_by_aclose(postgres_dsn: str) -> None:
    many = [attrs.evolve(_record(f"j{i}"), position=i) for i in range(_MAX_ROWS + 5)]
    async with PostgresJournal(postgres_dsn, batch="b") as journal:
        with pytest.raises(ValueError, match="holds batch 'b', not 'other'"):
            await journal.start(Batch(name="other", salt="s", jobs=()))
        await journal.start(Batch(name="b", salt="s", jobs=tuple(many)))
        created = [attrs.evolve(r, state=JobState.CREATED, execution_id="e") for r in many]
        await journal.save(*created, durable=False)  # past _MAX_ROWS: written at once
        await journal.save(attrs.evolve(many[0], state=JobState.SENT), durable=False)
    # aclose wrote the last one, which waited for LAZY_WINDOW
    rows = await _fetch(postgres_dsn, "SELECT state, count(*) FROM dedalus_jobs GROUP BY 1")
    assert {row[0]: row[1] for row in rows} == {"created": len(many) - 1, "sent": 1}


async def test_a_failed_lazy_write_is_reported_by_the_next_call(postgres_dsn: str) -> None:
    journal = PostgresJournal(postgres_dsn, batch="never-started")
    assert await journal.load() is None  # connected (and the schema made): not timed below
    # a job of a batch that was never written: the database refuses it (foreign key)
    await journal.save(_record("orphan"), durable=False)
    await asyncio.sleep(0.2)  # LAZY_WINDOW passes, the write fails with nobody waiting
    with pytest.raises(JournalError, match="failed to write"):
        await journal.save(_record("next"), durable=True)
    with pytest.raises(JournalError, match="failed to write"):
        await journal.aclose()
    await journal.aclose()  # closed all the same


async def test_a_record_this_version_cannot_read_is_refused(postgres_dsn: str) -> None:
    async with PostgresJournal(postgres_dsn, batch="b") as journal:
        await journal.start(Batch(name="b", salt="s", jobs=(_record("a"),)))
    await _fetch(postgres_dsn, "UPDATE dedalus_jobs SET state = 'exploded'")
    async with PostgresJournal(postgres_dsn, batch="b") as journal:
        with pytest.raises(JournalError, match="cannot read"):
            await journal.load()


async def _fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()
