"""Soak: thousands of executions through run_many while 5 % of all requests fail at random.

The fake injects, on 5 % of requests chosen by a seeded RNG, a 503, a dropped connection
or a dropped response after the request was processed (the nastiest: a create that
happened but whose answer was lost). Real clock, scripts of a few milliseconds.

The default run has a 1,000-execution version that must end with every execution
completed (retries absorb the faults), none duplicated and nothing leaked. The
10,000-execution version is marked ``soak`` (``nox -s soak`` / ``pytest -m soak``) and
prints the same summary.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import attrs
import pytest

from dedalus_async import (
    DedalusError,
    ExecutionRequest,
    ExecutionResult,
    PollPolicy,
    RetryPolicy,
    Session,
)
from dedalus_async.testing import FakeDedalus, Outcome, Script

from .test_faults import client_tasks, pool_in_use

KEY = "soak-key"
FAULT_RATE = 0.05
# Fast pacing for a fast fake: hints of a few ms are obeyed, not raised to 50 ms.
POLL = PollPolicy(
    hint_floor=0.002,
    hint_jitter=0.002,
    initial_interval=0.005,
    max_interval=0.05,
    timeout=120,
)
# Eight tries: a request fails for good only after eight faults in a row, (5 %)^8.
RETRY = RetryPolicy(max_attempts=8, initial_backoff=0.005, max_backoff=0.1)


@attrs.frozen
class SoakReport:
    """What a soak run ended with."""

    total: int
    completed: int
    failed: int
    untyped: int
    duplicated: int
    leaked: int
    faults: int
    requests: int
    seconds: float

    def line(self) -> str:
        return (
            f"soak: {self.total} executions in {self.seconds:.1f} s: "
            f"completed={self.completed} failed={self.failed} untyped={self.untyped} "
            f"duplicated={self.duplicated} leaked={self.leaked} "
            f"(random faults={self.faults} over {self.requests} requests)"
        )


async def soak(total: int, *, seed: int, concurrency: int = 100, machines: int = 20) -> SoakReport:
    """Run ``total`` executions through run_many against a faulty fake and count."""
    script = Script.running(0.01, Outcome(stdout="ok\n"), retry_after_ms=5)
    started = time.monotonic()
    async with FakeDedalus(
        api_key=KEY,
        script=script,
        fault_rate=FAULT_RATE,
        fault_seed=seed,
    ) as fake:
        before = client_tasks()
        async with Session(KEY, base_url=fake.base_url, retry=RETRY, poll=POLL) as session:
            requests = [
                # the job number makes every command unique: a duplicate is easy to spot
                ExecutionRequest(
                    machine_id=f"dm-7586c7cd-886a-5a0d-8099-{i % machines:012x}",
                    command=["echo", f"job-{i}"],
                )
                for i in range(total)
            ]
            outcomes = await session.run_many(
                requests, concurrency=concurrency, return_exceptions=True
            )
            for _ in range(3):
                await asyncio.sleep(0)
            leaked = pool_in_use(session) + len(client_tasks() - before)
        leaked += fake.in_flight["total"]
        per_command = Counter(record.command for record in fake.executions.values())
        duplicated = sum(count - 1 for count in per_command.values())
        # a job whose execution exists twice under two ids is a duplicate even if both ran
        seen_ids = Counter(
            o.execution.execution_id for o in outcomes if isinstance(o, ExecutionResult)
        )
        duplicated += sum(count - 1 for count in seen_ids.values())
        completed = sum(
            1
            for i, o in enumerate(outcomes)
            if isinstance(o, ExecutionResult)
            and o.ok
            and o.stdout == "ok\n"
            # each result belongs to its own request
            and fake.executions[o.execution.execution_id].command == ("echo", f"job-{i}")
        )
        failed = sum(1 for o in outcomes if isinstance(o, BaseException))
        untyped = sum(
            1 for o in outcomes if isinstance(o, BaseException) and not isinstance(o, DedalusError)
        )
        report = SoakReport(
            total=total,
            completed=completed,
            failed=failed,
            untyped=untyped,
            duplicated=duplicated,
            leaked=leaked,
            faults=sum(fake.random_fault_hits.values()),
            requests=len(fake.requests),
            seconds=time.monotonic() - started,
        )
    assert fake.errors == []
    assert fake.create_count == len(fake.executions)
    return report


async def test_thousand_executions_under_random_faults() -> None:
    """1,000 executions with 5 % random faults: all complete, none duplicated, none leaked,
    every failure (there should be none) a typed DedalusError."""
    report = await soak(1_000, seed=20260101)
    print(report.line())
    assert report.faults >= 0.02 * report.requests, "too few faults fired to prove anything"
    assert report.duplicated == 0
    assert report.leaked == 0
    assert report.untyped == 0
    assert report.completed + report.failed == report.total
    assert report.completed == report.total


@pytest.mark.soak
async def test_ten_thousand_executions_under_random_faults() -> None:
    """The 10,000-execution soak: same claims, printed as one summary line."""
    report = await soak(10_000, seed=7, concurrency=200, machines=50)
    print(report.line())
    assert report.faults >= 0.02 * report.requests
    assert report.duplicated == 0
    assert report.leaked == 0
    assert report.untyped == 0
    assert report.completed == report.total
