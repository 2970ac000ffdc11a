"""Durable batches with real processes: a batch (Python API, then the CLI) SIGKILLed at many
points against a fake server on 127.0.0.1 in this process, run again to the end: exactly
one execution per job and the same results, whatever the point. Plus ``batch status`` and
``batch results`` on the journal it leaves."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import dedalus_async
from dedalus_async.testing import FakeDedalus, RecordedRequest

from .conftest import API_KEY

REPO = Path(dedalus_async.__file__).resolve().parent.parent
MACHINE = "dm-0e7d2c4b-9a13-4f58-b6e2-3d8c1f5a7b90"

# The batch, run through the Python API: results as JSON on stdout.
API_SCRIPT = """
import asyncio, json, os, sys
from dedalus_async import ExecutionRequest, PollPolicy, Session

async def main():
    journal, n = sys.argv[1], int(sys.argv[2])
    requests = [
        ExecutionRequest(machine_id=os.environ["MACHINE"], command=["echo", f"job {i}"])
        for i in range(n)
    ]
    poll = PollPolicy(hint_floor=0.01, hint_jitter=0.005, initial_interval=0.01)
    async with Session(poll=poll) as session:
        results = await session.run_many(
            requests, journal=journal, concurrency=4, create_concurrency=2
        )
    print(json.dumps([[r.execution.execution_id, r.stdout] for r in results]))

asyncio.run(main())
"""


def _env(fake: FakeDedalus) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDALUS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(DEDALUS_BASE_URL=fake.base_url, DEDALUS_X_API_KEY=API_KEY, MACHINE=MACHINE)
    return env


def _api_command(journal: Path, n: int) -> list[str]:
    return [sys.executable, "-c", API_SCRIPT, str(journal), str(n)]


def _cli_command(journal: Path, jobs: Path) -> list[str]:
    return [
        sys.executable, "-m", "dedalus_async", "run-many", str(jobs), "--journal", str(journal),
        "--machine-id", MACHINE, "--concurrency", "4",
    ]  # fmt: skip


def _posts(seen: list[RecordedRequest]) -> int:
    return sum(1 for r in seen if r.method == "POST")


def _outputs(seen: list[RecordedRequest]) -> int:
    return sum(1 for r in seen if r.path.endswith("/output"))


# When to kill: a condition on the requests the server received since the run started,
# the journal's file, and how many jobs had no output read before the run started.
KillPoint = Callable[[list[RecordedRequest], Path, int], bool]

KILL_POINTS: dict[str, KillPoint] = {
    "before any create": lambda seen, journal, left: journal.exists(),
    "mid-create (first POST received)": lambda seen, journal, left: _posts(seen) >= 1,
    "mid-create (5 POSTs received)": lambda seen, journal, left: _posts(seen) >= 5,
    "mid-wait (first output read)": lambda seen, journal, left: _outputs(seen) >= 1,
    "mid-wait (half the outputs read)": lambda s, j, left: _outputs(s) >= max(1, left // 2),
    "during the final writes (last output read)": lambda s, j, left: _outputs(s) >= left,
}


async def _run_until(
    command: list[str], env: dict[str, str], when: Callable[[], bool], extra: float
) -> bool:
    """Start the batch, SIGKILL it once ``when()`` holds (plus ``extra`` seconds); True if
    killed, False if it finished first."""
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(30):
            # polled: the condition is on the fake's request log, which has no event
            while not when() and proc.returncode is None:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            if extra:
                await asyncio.sleep(extra)
            if proc.returncode is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            return True
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _finish(command: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


def _check_one_execution_per_job(fake: FakeDedalus, n: int) -> dict[str, str]:
    """Exactly one execution per job on the server; job -> its execution ID."""
    by_job = Counter(" ".join(record.command) for record in fake.executions.values())
    assert by_job == Counter(f"echo job {i}" for i in range(n)), by_job
    return {" ".join(r.command)[5:]: r.execution_id for r in fake.executions.values()}


def _api_results(out: bytes) -> list[tuple[str, str]]:
    return [(eid, stdout) for eid, stdout in json.loads(out)]


def _cli_results(out: bytes) -> list[tuple[str, str]]:
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["index"] for line in lines] == list(range(len(lines)))
    return [(line["execution"]["execution_id"], line["stdout"]) for line in lines]


async def _kill_and_resume(
    fake: FakeDedalus,
    journal: Path,
    command: list[str],
    read: Callable[[bytes], list[tuple[str, str]]],
    n: int,
    points: list[tuple[str, float]],
) -> list[str]:
    """Kill the batch at each point in turn (each run resuming the last), then run it to
    the end twice; check the invariants. Returns the points where a kill landed."""
    env = _env(fake)
    landed = []
    for name, extra in points:
        condition = KILL_POINTS[name]
        # each point counts from where the server's log stands when its run starts
        base = len(fake.requests)
        outputs_read = {r.path for r in fake.requests if r.path.endswith("/output")}
        left = n - len(outputs_read)

        def when(condition: KillPoint = condition, base: int = base, left: int = left) -> bool:
            return condition(fake.requests[base:], journal, left)

        if await _run_until(command, env, when, extra):
            landed.append(name)
    code, out, err = await _finish(command, env)
    assert code == 0, err.decode()
    ids = _check_one_execution_per_job(fake, n)
    results = read(out)
    assert results == [(ids[f"job {i}"], f"job {i}\n") for i in range(n)]
    # and once more: the same results from the journal, with no request at all
    sent = len(fake.requests)
    code, out, err = await _finish(command, env)
    assert code == 0, err.decode()
    assert read(out) == results
    assert len(fake.requests) == sent
    return landed


async def test_the_python_api_survives_sigkill_at_every_point(
    live_fake: FakeDedalus, tmp_path: Path
) -> None:
    n = 12
    points = [(name, 0.0) for name in KILL_POINTS]
    landed = await _kill_and_resume(
        live_fake, tmp_path / "batch.db", _api_command(tmp_path / "batch.db", n),
        _api_results, n, points,
    )  # fmt: skip
    # most points must really have been hit mid-run, or the test proves little
    assert len(landed) >= len(points) - 1, landed


async def test_the_cli_survives_sigkill_at_every_point_and_batch_reports_it(
    live_fake: FakeDedalus, tmp_path: Path
) -> None:
    n = 12
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(json.dumps({"command": ["echo", f"job {i}"], "key": f"j{i}"}) + "\n"
                for i in range(n))
    )  # fmt: skip
    journal = tmp_path / "batch.db"
    points = [(name, 0.0) for name in KILL_POINTS]
    landed = await _kill_and_resume(
        live_fake, journal, _cli_command(journal, jobs), _cli_results, n, points
    )
    assert len(landed) >= len(points) - 1, landed
    env = _env(live_fake)
    base = [sys.executable, "-m", "dedalus_async", "batch"]
    code, out, err = await _finish([*base, "status", "--journal", str(journal)], env)
    assert code == 0, err
    assert out.decode().splitlines()[:2] == [
        f"batch 'default' in {journal}: 12 jobs",
        "finished 12 (12 ok, 0 not ok), pending 0, sent 0, created 0",
    ]
    code, out, err = await _finish([*base, "results", "--journal", str(journal)], env)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(line["job"], line["stdout"], line["ok"]) for line in lines] == [
        (f"j{i}", f"job {i}\n", True) for i in range(n)
    ]


@pytest.mark.soak
async def test_random_kill_points_sweep(live_fake: FakeDedalus, tmp_path: Path) -> None:
    """Many rounds, each killing one batch several times at random points and delays."""
    rng = random.Random(int(os.environ.get("DURABLE_SEED", "15")))
    n = 12
    for round_ in range(int(os.environ.get("DURABLE_ROUNDS", "10"))):
        live_fake.executions.clear()
        journal = tmp_path / f"batch-{round_}.db"
        points = [(rng.choice(list(KILL_POINTS)), rng.uniform(0, 0.3)) for _ in range(4)]
        await _kill_and_resume(
            live_fake, journal, _api_command(journal, n), _api_results, n, points
        )


# --- the command line's journal errors -------------------------------------------------


async def _cli(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    code, out, err = await _finish([sys.executable, "-m", "dedalus_async", *args], env)
    return code, out.decode(), err.decode()


async def test_cli_journal_errors_name_the_path_and_exit_2(
    live_fake: FakeDedalus, tmp_path: Path
) -> None:
    env = _env(live_fake)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"command": ["echo", "a"]}\n{"command": ["echo", "b"]}\n')
    foreign = tmp_path / "notes.db"
    foreign.write_text("not a database at all, just notes\n" * 100)
    missing = tmp_path / "missing.db"
    journal = tmp_path / "batch.db"
    (code, _, err), (code2, _, err2), (code3, _, err3) = await asyncio.gather(
        _cli(["run-many", str(jobs), "--machine-id", MACHINE, "--journal", str(foreign)], env),
        _cli(["batch", "status", "--journal", str(missing)], env),
        _cli(["batch", "results", "--journal", str(foreign)], env),
    )
    assert (code, code2, code3) == (2, 2, 2)
    assert f"{foreign} is not a dedalus_async journal" in err
    assert f"no journal at {missing} (run-many FILE --journal {missing} writes one)" in err2
    assert not missing.exists()  # a reader creates nothing
    assert f"{foreign} is not a dedalus_async journal" in err3
    assert live_fake.requests == []
    # a batch run, then another batch under the same name: refused, nothing sent
    code, _out, err = await _cli(
        ["run-many", str(jobs), "--machine-id", MACHINE, "--journal", str(journal)], env
    )
    assert code == 0, err
    sent = len(live_fake.requests)
    jobs.write_text('{"command": ["echo", "a"]}\n{"command": ["echo", "changed"]}\n')
    (code, _, err), (code2, _, err2) = await asyncio.gather(
        _cli(["run-many", str(jobs), "--machine-id", MACHINE, "--journal", str(journal)], env),
        _cli(["batch", "status", "--journal", str(journal), "--batch", "other"], env),
    )
    assert code == 2
    assert "requests[1] (job '#1') differs from the one journaled" in err
    assert code2 == 2
    assert f"journal {journal} holds no batch 'other' (see --batch)" in err2
    assert len(live_fake.requests) == sent


async def test_cli_reports_a_stale_reservation_in_its_own_terms(
    live_fake: FakeDedalus, tmp_path: Path
) -> None:
    import time

    import attrs

    from dedalus_async import JobState, SQLiteJournal

    env = _env(live_fake)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"command": ["echo", "a"]}\n{"command": ["false"]}\n')
    journal = tmp_path / "batch.db"
    run = ["run-many", str(jobs), "--machine-id", MACHINE, "--journal", str(journal)]
    code, _, err = await _cli(run, env)
    assert code == 1, err  # `false` exits 1
    async with SQLiteJournal(journal) as store:
        batch = await store.load()
        assert batch is not None
        stale = attrs.evolve(
            batch.jobs[0], state=JobState.SENT, execution_id=None, execution=None,
            output=None, sent_at=time.time() - 7200,
        )  # fmt: skip
        await store.save(stale, durable=True)
    sent = len(live_fake.requests)
    code, out, err = await _cli(run, env)
    assert code == 1
    first = json.loads(out.splitlines()[0])
    assert "run again with a larger --reservation-max-age" in first["error"]["message"]
    assert "reservation_max_age" not in first["error"]["message"]
    assert len(live_fake.requests) == sent
    code, out, err = await _cli(["batch", "status", "--journal", str(journal)], env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1] == "finished 1 (0 ok, 1 not ok), pending 0, sent 1, created 0"
    assert lines[2].startswith("  #0 (sent): StaleReservationError: job '#0'")
    assert lines[3].startswith("  #1: ")
    assert "exit code 1" in lines[3]
    code, out, err = await _cli(["batch", "results", "--journal", str(journal)], env)
    assert code == 1
    docs = [json.loads(line) for line in out.splitlines()]
    assert [(d["job"], d["state"], d["ok"]) for d in docs] == [
        ("#0", "sent", False),
        ("#1", "finished", False),
    ]
    assert docs[0]["error"]["message"].startswith("StaleReservationError")
    # a larger limit sends it again, under its key
    code, out, err = await _cli([*run, "--reservation-max-age", "86400"], env)
    assert code == 1
    assert json.loads(out.splitlines()[0])["stdout"] == "a\n"
    assert len(live_fake.executions) == 2
