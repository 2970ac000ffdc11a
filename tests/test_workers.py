"""Many workers, one batch (dedalus_async._workers, W1-W6): real worker processes
(``dedalus-async batch work``) against a fake server on 127.0.0.1 in this process and a
real PostgreSQL database, one of them SIGKILLed mid-batch; and the Python API."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import signal
import sys
import time
from asyncio.subprocess import Process
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import dedalus_async
from dedalus_async import (
    BatchChangedError,
    ExecutionRequest,
    JournalError,
    LeaseLostError,
    PostgresJournal,
    Session,
    WorkSummary,
    submit_batch,
    work_batch,
)
from dedalus_async._workers import (
    _FENCED_WRITE,
    _RENEW,
    CLAIMS_MAX_AGE,
    SYNC_INTERVAL,
    chunk_size,
)
from dedalus_async.testing import FakeDedalus, Fault, Script

from .conftest import API_KEY

REPO = Path(dedalus_async.__file__).resolve().parent.parent
MACHINE = "dm-3c1e9a7f-5b24-4d08-8e6a-2f9b0c7d1e45"


def _env(fake: FakeDedalus) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDALUS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(DEDALUS_BASE_URL=fake.base_url, DEDALUS_X_API_KEY=API_KEY)
    return env


async def _cli(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dedalus_async", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _start_workers(args: list[str], env: dict[str, str], count: int) -> list[Process]:
    """``count`` worker processes (``dedalus-async batch work ARGS``)."""
    return [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dedalus_async",
            "batch",
            "work",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(count)
    ]


def _requests(n: int, **fields: Any) -> list[ExecutionRequest]:
    return [
        ExecutionRequest(machine_id=MACHINE, command=["echo", f"job {i}"], **fields)
        for i in range(n)
    ]


async def _fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def _one_execution_per_job(fake: FakeDedalus, n: int) -> None:
    by_job = Counter(" ".join(record.command) for record in fake.executions.values())
    assert by_job == Counter(f"echo job {i}" for i in range(n)), by_job


async def _stdout_by_job(dsn: str, batch: str) -> dict[str, str]:
    async with PostgresJournal(dsn, batch=batch) as journal:
        found = await journal.load()
    assert found is not None
    return {job.job: (job.output.stdout if job.output else None) or "" for job in found.jobs}


# --- worker processes, one killed ------------------------------------------------------


async def test_workers_share_a_batch_and_a_killed_one_is_taken_over(
    live_fake: FakeDedalus, postgres_dsn: str, tmp_path: Path
) -> None:
    n, lease = 1000, 3.0
    env = _env(live_fake)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"command": ["echo", f"job {i}"]}) + "\n" for i in range(n)))
    where = ["--journal", postgres_dsn, "--name", "big"]
    code, _, err = await _cli(["batch", "submit", str(jobs), "--machine-id", MACHINE, *where], env)
    assert code == 0, err
    assert f"'big' in {postgres_dsn}: {n} jobs" in err

    workers = await _start_workers([*where, "--concurrency", "40", "--lease", str(lease)], env, 3)
    tokens = []
    for worker in workers:
        assert worker.stderr is not None
        async with asyncio.timeout(30):
            line = (await worker.stderr.readline()).decode()
        assert "claiming jobs of 'big'" in line, line
        tokens.append(line.split("worker ", 1)[1].split(":", 1)[0])
    victim, token = workers[0], tokens[0]

    conn = await asyncpg.connect(postgres_dsn)
    try:
        async with asyncio.timeout(60):
            while True:  # mid-batch, and the victim holds jobs
                counts = await conn.fetchrow(
                    "SELECT count(*) FILTER (WHERE state = 'finished'), "
                    "count(*) FILTER (WHERE lease_owner = $1) FROM dedalus_jobs",
                    token,
                )
                assert counts is not None
                if counts[0] >= n // 5 and counts[1] > 0:
                    break
                await asyncio.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        killed_at: datetime.datetime = await conn.fetchval("SELECT clock_timestamp()")
        orphans = {
            row[0]
            for row in await conn.fetch(
                "SELECT job FROM dedalus_jobs WHERE lease_owner = $1 AND state <> 'finished'",
                token,
            )
        }
    finally:
        await conn.close()
    assert orphans  # the kill left jobs behind

    summaries = []
    for worker in workers[1:]:
        async with asyncio.timeout(120):
            _, err_bytes = await worker.communicate()
        assert worker.returncode == 0, err_bytes.decode()
        summaries.append(err_bytes.decode())

    # every job done, once, with its own output
    states = await _fetch(postgres_dsn, "SELECT state, count(*) FROM dedalus_jobs GROUP BY 1")
    assert {row[0]: row[1] for row in states} == {"finished": n}
    _one_execution_per_job(live_fake, n)
    code, out, err = await _cli(["batch", "status", *where], env)
    assert code == 0, err
    assert out.splitlines()[:2] == [
        f"batch 'big' in {postgres_dsn}: {n} jobs",
        f"finished {n} ({n} ok, 0 not ok), pending 0, sent 0, created 0",
    ]
    assert await _stdout_by_job(postgres_dsn, "big") == {f"#{i}": f"job {i}\n" for i in range(n)}

    # no job held by two workers at once: a job is claimed again only from the dead worker,
    # after it died, within the lease time (plus a worker's poll interval)
    claims = await _fetch(
        postgres_dsn,
        "SELECT job, owner, previous_owner, claimed_at FROM dedalus_claims ORDER BY id",
    )
    by_job: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for claim in claims:
        by_job[claim["job"]].append(claim)
    assert len(by_job) == n
    for job, held in by_job.items():
        assert held[0]["previous_owner"] is None, job
        for before, after in itertools.pairwise(held):
            assert after["previous_owner"] == before["owner"] == token, (job, held)
    taken = [claim for claim in claims if claim["previous_owner"] is not None]
    assert {claim["job"] for claim in taken} == orphans
    delays = [(claim["claimed_at"] - killed_at).total_seconds() for claim in taken]
    assert all(0 < delay < lease + 2.0 for delay in delays), delays
    assert {claim["owner"] for claim in claims} <= set(tokens)
    assert sum(f"({len(orphans)}" in text or "taken over" in text for text in summaries) == 2


# --- the Python API --------------------------------------------------------------------


async def test_two_workers_in_one_process_run_a_submitted_batch(
    live_fake: FakeDedalus, postgres_dsn: str
) -> None:
    live_fake.set_script(Script.running(0.05))
    requests = _requests(60, env={"TOKEN": "needed-by-the-worker"})
    assert await submit_batch(postgres_dsn, requests, name="py") == 60
    assert await submit_batch(postgres_dsn, requests, name="py") == 60  # the same: nothing
    with pytest.raises(BatchChangedError, match="submit these under a new name"):
        await submit_batch(postgres_dsn, _requests(3), name="py")
    async with Session(API_KEY, base_url=live_fake.base_url) as session:
        one, two = await asyncio.gather(
            work_batch(session, postgres_dsn, name="py", concurrency=10, lease=5),
            work_batch(session, postgres_dsn, name="py", concurrency=10, lease=5),
        )
    assert one.finished + two.finished == 60
    assert one.claimed + two.claimed == 60
    assert (one.failed, one.lost, one.left, one.taken_over) == (0, 0, 0, 0)
    _one_execution_per_job(live_fake, 60)
    # the whole request reached the server: env values are stored for workers
    assert all(
        record.env == {"TOKEN": "needed-by-the-worker"} for record in live_fake.executions.values()
    )


async def test_a_job_that_keeps_failing_is_left_after_max_failures(
    live_fake: FakeDedalus, postgres_dsn: str
) -> None:
    await submit_batch(
        postgres_dsn,
        [ExecutionRequest(machine_id="dm-00000000-0000-4000-8000-000000000000", command=["x"])],
        name="bad",
    )
    live_fake.set_script(Script.running(0.01))
    live_fake.add_fault(Fault(method="POST", status=422, times=None))
    async with Session(API_KEY, base_url=live_fake.base_url) as session:
        summary = await work_batch(session, postgres_dsn, name="bad", max_failures=2, lease=5)
    assert (summary.claimed, summary.failed, summary.left, summary.finished) == (2, 2, 1, 0)
    rows = await _fetch(postgres_dsn, "SELECT failures, lease_owner, error FROM dedalus_jobs")
    assert rows[0]["failures"] == 2
    assert rows[0]["lease_owner"] is None
    assert "422" in rows[0]["error"]


async def test_a_worker_whose_lease_was_taken_cannot_write(
    live_fake: FakeDedalus, postgres_dsn: str
) -> None:
    """W3: the lease is taken over while the job runs; the first worker's write is refused."""
    live_fake.set_script(Script.running(1.0))
    await submit_batch(postgres_dsn, _requests(1), name="fence")
    async with Session(API_KEY, base_url=live_fake.base_url) as session:
        worker = asyncio.create_task(work_batch(session, postgres_dsn, name="fence", lease=30))
        async with asyncio.timeout(10):
            while not live_fake.executions:  # noqa: ASYNC110 - the fake has no event for it
                await asyncio.sleep(0.01)
        # another worker takes the job, as if this one's lease had run out
        await _fetch(postgres_dsn, "UPDATE dedalus_jobs SET lease_owner = 'successor'")
        await asyncio.sleep(2.0)  # the execution ends; this worker tries to record it
        assert not worker.done()  # the job is the successor's: this worker waits for it
        # the successor finishes it: the batch is done, and this worker exits
        await _fetch(postgres_dsn, "UPDATE dedalus_jobs SET lease_owner = NULL, state = 'finished'")
        summary = await worker
    assert summary.lost == 1
    assert summary.finished == 0
    results = await _fetch(postgres_dsn, "SELECT count(*) FROM dedalus_results")
    assert results[0][0] == 0  # the fenced writer wrote no result


async def test_bad_arguments_and_a_missing_batch_are_clear(
    session: Session, postgres_dsn: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="PostgreSQL URL"):
        await submit_batch(str(tmp_path / "j.db"), _requests(1))
    with pytest.raises(ValueError, match="keys must be unique"):
        await submit_batch(postgres_dsn, [*_requests(1, key="a"), *_requests(1, key="a")])
    with pytest.raises(TypeError, match=r"requests\[0\] must be an ExecutionRequest"):
        await submit_batch(postgres_dsn, ["echo"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        await work_batch(session, postgres_dsn, concurrency=0)
    with pytest.raises(JournalError, match=r"no submitted batch 'nope'.*batch submit"):
        await work_batch(session, postgres_dsn, name="nope")
    assert issubclass(LeaseLostError, JournalError)


async def test_cli_work_needs_a_dsn_and_a_submitted_batch(
    live_fake: FakeDedalus, postgres_dsn: str, tmp_path: Path
) -> None:
    env = _env(live_fake)
    code, _, err = await _cli(["batch", "work", "--journal", str(tmp_path / "j.db")], env)
    assert code == 2
    assert "--journal must be a PostgreSQL DSN for batch work" in err
    code, _, err = await _cli(["batch", "work", "--journal", postgres_dsn, "--name", "x"], env)
    assert code == 2
    assert "no submitted batch 'x'" in err


async def test_a_429_seen_by_one_worker_pauses_every_worker(
    live_fake: FakeDedalus, postgres_dsn: str
) -> None:
    """W7: one 429 (Retry-After 2 s) to one worker; within SYNC_INTERVAL or so every
    worker's Session holds back, so the server hears nothing until the pause ends."""
    live_fake.set_script(Script.running(0.3, retry_after_ms=50))
    await submit_batch(postgres_dsn, _requests(120), name="pause")
    sessions = [Session(API_KEY, base_url=live_fake.base_url) for _ in range(3)]

    async def worker(session: Session) -> WorkSummary:
        async with session:
            return await work_batch(session, postgres_dsn, name="pause", concurrency=8, lease=5)

    async def one_429_mid_batch() -> float:
        async with asyncio.timeout(20):
            while len(live_fake.executions) < 30:  # noqa: ASYNC110 - the fake has no event
                await asyncio.sleep(0.01)
            fault = Fault(status=429, headers={"Retry-After": "2"})
            live_fake.add_fault(fault)
            while not fault.hits:  # noqa: ASYNC110 - the fake has no event
                await asyncio.sleep(0.001)
        return time.monotonic()  # the fake's clock: a moment after the 429 was sent

    summaries, sent_429 = await asyncio.gather(
        asyncio.gather(*(worker(session) for session in sessions)), one_429_mid_batch()
    )
    assert sum(summary.finished for summary in summaries) == 120
    assert [session.throttle.rate_limited_count >= 1 for session in sessions] == [True] * 3
    # once the workers heard of it (SYNC_INTERVAL and a database round trip: well under
    # a second, but a loaded 2-core machine has taken 0.6 s), silence until the
    # Retry-After has passed; then the work goes on
    after = [r.at - sent_429 for r in live_fake.requests]
    assert [delay for delay in after if 1.0 < delay < 1.8] == []
    assert any(delay >= 1.9 for delay in after)
    _one_execution_per_job(live_fake, 120)


async def test_the_cap_on_jobs_in_flight_holds_across_workers(
    live_fake: FakeDedalus, postgres_dsn: str
) -> None:
    """W8: three workers of concurrency 10, a cap of 4: never more than 4 executions at once."""
    live_fake.set_script(Script.running(0.15, retry_after_ms=20))
    await submit_batch(postgres_dsn, _requests(40), name="cap", max_in_flight=4)
    async with Session(API_KEY, base_url=live_fake.base_url) as session:
        summaries = await asyncio.gather(
            *(work_batch(session, postgres_dsn, name="cap", concurrency=10, lease=5)
              for _ in range(3))
        )  # fmt: skip
    assert sum(summary.finished for summary in summaries) == 40
    # executions overlapping on the server, from their creation to their end
    edges = sorted(
        edge
        for record in live_fake.executions.values()
        for edge in ((record.created_at, 1), (record.completed_at or record.created_at, -1))
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert 3 <= peak <= 4


# --- the shared requests-per-second ceiling (W9) ---------------------------------------


def _busiest_second(times: list[float]) -> int:
    """The most requests in any 1-second window of ``times``."""
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] > 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


async def test_the_rate_holds_across_worker_processes(
    live_fake: FakeDedalus, postgres_dsn: str, tmp_path: Path
) -> None:
    """W9: three worker processes, a batch submitted with --rate 30: over any second the
    server hears at most rate + 1 + one chunk per worker; the same batch without a rate
    goes clearly faster (the workers could, and the ceiling held them)."""
    n, rate, workers = 90, 30, 3
    bound = rate + 1 + workers * chunk_size(rate)  # 30 + 1 + 3 * 3 = 40
    env = _env(live_fake)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"command": ["echo", f"job {i}"]}) + "\n" for i in range(n)))
    busiest = {}
    for name, limit in (("slow", ["--rate", str(rate)]), ("free", [])):
        where = ["--journal", postgres_dsn, "--name", name]
        code, _, err = await _cli(
            ["batch", "submit", str(jobs), "--machine-id", MACHINE, *where, *limit], env
        )
        assert code == 0, err
        live_fake.requests.clear()
        live_fake.executions.clear()
        for worker in await _start_workers([*where, "--concurrency", "20"], env, workers):
            async with asyncio.timeout(120):
                _, err_bytes = await worker.communicate()
            assert worker.returncode == 0, err_bytes.decode()
        _one_execution_per_job(live_fake, n)
        times = [r.at for r in live_fake.requests]
        assert len(times) >= n
        busiest[name] = _busiest_second(times)
    assert busiest["slow"] <= bound, busiest
    assert busiest["free"] > 2 * bound, busiest


async def test_submitting_again_changes_the_rate_while_workers_run(
    live_fake: FakeDedalus, postgres_dsn: str
) -> None:
    """W9 from Python: two workers (Sessions of their own) share rate=5; submitted again
    with rate=None mid-batch, they finish the rest at once."""
    live_fake.set_script(Script.immediate())
    n, rate = 40, 5.0
    requests = _requests(n)
    await submit_batch(postgres_dsn, requests, name="rated", rate=rate)

    async def worker() -> WorkSummary:
        async with Session(API_KEY, base_url=live_fake.base_url) as session:
            return await work_batch(session, postgres_dsn, name="rated", concurrency=8, lease=5)

    async def lift_the_rate() -> float:
        await asyncio.sleep(3.0)
        await submit_batch(postgres_dsn, requests, name="rated")  # rate=None: no ceiling
        return time.monotonic()

    started = time.monotonic()
    summaries, lifted = await asyncio.gather(asyncio.gather(worker(), worker()), lift_the_rate())
    ended = time.monotonic()
    assert sum(summary.finished for summary in summaries) == n
    _one_execution_per_job(live_fake, n)
    before = [r.at for r in live_fake.requests if r.at < lifted]
    # within the ceiling until it was lifted: 3 s at 5/s, + 1, + a chunk (1) per worker
    assert 10 <= len(before) <= 3 * rate + 1 + 2 * chunk_size(rate), len(before)
    assert _busiest_second(before) <= rate + 1 + 2 * chunk_size(rate)
    # then the rest at once: at 5/s they would need (n - 18) / 5 > 4 s more
    after = sorted(round(r.at - lifted, 2) for r in live_fake.requests if r.at >= lifted)
    assert ended - lifted < 2.0, (ended - started, lifted - started, after, len(before))


async def test_a_rate_set_while_a_worker_runs_applies_within_a_sync_interval(
    live_fake: FakeDedalus, postgres_dsn: str
) -> None:
    """W9: a batch submitted without a rate, submitted again with rate=10 once its worker
    is going: from SYNC_INTERVAL (and a round trip) later, the worker keeps to it."""
    live_fake.set_script(Script.running(0.2))
    n, rate = 30, 10.0
    requests = _requests(n)
    await submit_batch(postgres_dsn, requests, name="later")

    async def set_the_rate() -> float:
        async with asyncio.timeout(10):
            while len(live_fake.requests) < 5:  # noqa: ASYNC110 - the fake has no event
                await asyncio.sleep(0.005)
        await submit_batch(postgres_dsn, requests, name="later", rate=rate)
        return time.monotonic()

    async with Session(API_KEY, base_url=live_fake.base_url) as session:
        summary, set_at = await asyncio.gather(
            work_batch(session, postgres_dsn, name="later", concurrency=10, lease=5),
            set_the_rate(),
        )
    assert summary.finished == n
    _one_execution_per_job(live_fake, n)
    after = [r.at for r in live_fake.requests if r.at > set_at + SYNC_INTERVAL + 0.2]
    assert len(after) >= 2 * rate  # the rate held a good part of the batch
    assert _busiest_second(after) <= rate + 1 + chunk_size(rate), _busiest_second(after)


# --- the claims log stays bounded (W10) ------------------------------------------------


async def test_claims_of_finished_jobs_are_pruned_after_their_age(
    live_fake: FakeDedalus, postgres_dsn: str
) -> None:
    """W10: a worker's start deletes the claims of finished jobs older than CLAIMS_MAX_AGE,
    in every batch; recent claims and those of unfinished jobs stay."""
    await submit_batch(postgres_dsn, _requests(4), name="done")
    await submit_batch(postgres_dsn, _requests(1), name="waiting")
    async with Session(API_KEY, base_url=live_fake.base_url) as session:
        await work_batch(session, postgres_dsn, name="done", lease=5)
        age = CLAIMS_MAX_AGE + 60
        await _fetch(
            postgres_dsn,
            "INSERT INTO dedalus_claims (batch, job, owner, claimed_at) "
            "SELECT 'waiting', '#0', 'old', clock_timestamp() - make_interval(secs => $1)",
            age,
        )
        await _fetch(
            postgres_dsn,
            "UPDATE dedalus_claims SET claimed_at = clock_timestamp() - make_interval(secs => $1) "
            "WHERE batch = 'done' AND job IN ('#0', '#1')",
            age,
        )
        await _fetch(  # just younger than the limit: kept
            postgres_dsn,
            "UPDATE dedalus_claims SET claimed_at = clock_timestamp() - make_interval(secs => $1) "
            "WHERE batch = 'done' AND job = '#2'",
            CLAIMS_MAX_AGE - 60,
        )
        summary = await work_batch(session, postgres_dsn, name="done", lease=5)
    assert summary.claimed == 0  # nothing left to run: it only started, and pruned
    rows = await _fetch(postgres_dsn, "SELECT batch, job FROM dedalus_claims ORDER BY 1, 2")
    assert [tuple(row) for row in rows] == [("done", "#2"), ("done", "#3"), ("waiting", "#0")]


# --- the heartbeat and the writer (commit 28eab6f) -------------------------------------


async def test_the_heartbeat_skips_rows_its_writer_holds_instead_of_deadlocking(
    postgres_dsn: str,
) -> None:
    """The writer's transaction holds job #1's row and is about to write #0; the
    heartbeat renews the worker's leases meanwhile. Waiting for #1 (while holding #0) would
    deadlock the two (PostgreSQL aborts one after deadlock_timeout): the heartbeat skips
    #1 instead, renews #0 and lets the writer go on."""
    await submit_batch(postgres_dsn, _requests(2), name="dl")
    owner = "worker-token"
    writer = await asyncpg.connect(postgres_dsn)
    beat = await asyncpg.connect(postgres_dsn)
    try:
        await writer.execute(
            "UPDATE dedalus_jobs SET lease_owner = $1, "
            "lease_until = clock_timestamp() + interval '1 minute'",
            owner,
        )

        def fenced(job: str) -> Any:  # one job's row, as _Writer writes it (sent)
            return writer.fetch(
                _FENCED_WRITE, "dl", owner, [job], ["sent"], [1], [1.0], [None], [None],
                [f"key-{job}"],
            )  # fmt: skip

        async with writer.transaction():
            assert len(await fenced("#1")) == 1  # the writer holds #1
            renew = asyncio.create_task(beat.execute(_RENEW, "dl", owner, 600.0))
            async with asyncio.timeout(10):  # the heartbeat is done, or waits for a lock
                while not renew.done():
                    waiting = await writer.fetchval(
                        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                        beat.get_server_pid(),
                    )
                    if waiting:
                        break
                    await asyncio.sleep(0.01)
            assert len(await fenced("#0")) == 1  # the writer goes on: no deadlock
        async with asyncio.timeout(10):
            assert await renew == "UPDATE 1"  # #0 renewed, #1 skipped (the next beat's)
        rows = await writer.fetch(
            "SELECT job, state, lease_until > clock_timestamp() + interval '5 minutes' "
            "FROM dedalus_jobs ORDER BY job"
        )
    finally:
        await writer.close()
        await beat.close()
    assert [tuple(row) for row in rows] == [("#0", "sent", True), ("#1", "sent", False)]
