"""The journal's own CPU per job, with the network taken out.

Run as ``python -m benchmarks.journal_cost [--jobs N] [--repeats R] [--profile]``. N jobs
go through the calls the fan-out makes on a journaled batch (``run_many(journal=path)``),
in its order, against a fresh SQLite file each repeat, and nothing else runs: the requests'
fingerprints and the batch written whole (J1, ``Ledger.open``), then per job the ``sent``
mark committed before its create (J2, ``Ledger.sending``), its execution ID (J3), and its
outcome with the result the benchmark server's script gives (J4), then the final flush and
close (J5). The lazily written rows (J3, J4) are handed to the writer every
``--window`` jobs, as the fan-out's 50 ms timer does at the benchmark's pace.

CPU is ``time.process_time``: this process, the journal's writer thread included. The
figure is the lowest of the repeats (the least disturbed by other work on the machine);
the end-to-end benchmark (``python -m benchmarks ... dedalus_async-run_many-journal``)
cannot resolve tens of microseconds per execution on a noisy machine, this can. For an
instruction count that does not depend on load at all::

    valgrind --tool=callgrind --callgrind-out-file=/tmp/journal-1.cg \\
        python -m benchmarks.journal_cost --jobs 3000 --repeats 1 --no-check
    valgrind --tool=callgrind --callgrind-out-file=/tmp/journal-2.cg \\
        python -m benchmarks.journal_cost --jobs 3000 --repeats 2 --no-check

The difference of the two totals (``callgrind_annotate FILE | grep TOTALS``) is one batch
of 3,000 jobs, the writer thread included.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dedalus_async import ExecutionRequest, SQLiteJournal
from dedalus_async._durable import Ledger
from dedalus_async._models import Execution, ExecutionOutput, LogCapture
from dedalus_async._results import ExecutionResult

__all__ = ["main", "measure"]

MACHINE = "dm-654ed9cb-4d87-556a-a534-d08332976a86"
_AT = datetime(2026, 1, 1, tzinfo=UTC)


def _result(index: int) -> ExecutionResult:
    """What the fan-out holds when a job of the benchmark server's script finished."""
    execution_id = f"exe-{index:016x}"
    execution = Execution(
        execution_id=execution_id,
        machine_id=MACHINE,
        created_at=_AT,
        status="succeeded",
        command=("sh", "-c", f"echo ok {index}"),
        started_at=_AT.replace(microsecond=300_000),
        completed_at=_AT.replace(microsecond=600_000),
        exit_code=0,
        stdout_bytes=3,
        stderr_bytes=0,
        stdout_truncated=False,
        stderr_truncated=False,
        log_capture=LogCapture(),
        creation_request_id=f"req-{index:08d}",
        creation_trace_id=f"{index:032x}",
    )
    output = ExecutionOutput(
        execution_id=execution_id,
        stdout="ok\n",
        stderr="",
        stdout_bytes=3,
        stderr_bytes=0,
        stdout_truncated=False,
        stderr_truncated=False,
    )
    return ExecutionResult(execution=execution, stdout="ok\n", stderr="", output=output)


def _requests(jobs: int) -> list[ExecutionRequest]:
    return [
        ExecutionRequest(machine_id=MACHINE, command=["sh", "-c", f"echo ok {i}"])
        for i in range(jobs)
    ]


async def _one_batch(
    path: Path,
    requests: list[ExecutionRequest],
    results: list[ExecutionResult],
    window: int,
    new_key: Callable[[], str],
) -> dict[str, float]:
    """One batch through the journal; CPU seconds by phase."""
    spent: dict[str, float] = {}
    keys = [new_key() for _ in requests]  # the fan-out mints them with or without a journal
    start = time.process_time()
    journal = SQLiteJournal(path)
    ledger = Ledger(journal, new_key)
    # what _FanOut.open_journal does: the requests' specs, matched with the journal
    await ledger.open([request._spec(i, keys[i]) for i, request in enumerate(requests)])
    spent["open (J1)"] = time.process_time() - start

    # the fan-out's lazy-write timer hands the rows over every LAZY_WINDOW; here every
    # `window` jobs, so that the count of handovers does not depend on the machine's speed
    hand_over: Callable[[], None] = getattr(journal, "_hand_over", lambda: None)
    mark = time.process_time()
    for index in range(len(requests)):
        await ledger.sending(index)  # J2, committed (RESERVE_AHEAD jobs a commit)
        await ledger.created(index, results[index].execution.execution_id)  # J3
        if index % window == window - 1:
            hand_over()
    spent["sent + created (J2, J3)"] = time.process_time() - mark
    mark = time.process_time()
    for index in range(len(requests)):
        await ledger.finished(index, results[index])  # J4
        if index % window == window - 1:
            hand_over()
    spent["finished (J4)"] = time.process_time() - mark
    mark = time.process_time()
    await journal.aclose()  # J5
    spent["close (J5)"] = time.process_time() - mark
    spent["total"] = time.process_time() - start
    return spent


async def measure(
    jobs: int, repeats: int, window: int, profile: bool, check: bool = True
) -> dict[str, float]:
    """CPU seconds per job by phase, each the lowest over ``repeats`` batches of ``jobs``."""
    requests = _requests(jobs)
    results = [_result(i) for i in range(jobs)]
    counter = iter(range(10**9))

    def new_key() -> str:
        return f"idem-{next(counter):032x}"

    best: dict[str, float] = {}
    profiler = cProfile.Profile(time.process_time) if profile else None
    with tempfile.TemporaryDirectory(prefix="journal-cost-") as folder:
        # warm-up: imports, the first connection, sqlite's caches
        await _one_batch(Path(folder, "warm.db"), requests[:200], results[:200], window, new_key)
        for run in range(repeats):
            if profiler is not None:
                profiler.enable()
            spent = await _one_batch(
                Path(folder, f"batch-{run}.db"), requests, results, window, new_key
            )
            if profiler is not None:
                profiler.disable()
            for phase, seconds in spent.items():
                best[phase] = min(best.get(phase, float("inf")), seconds / jobs)
            if check:
                await _check(Path(folder, f"batch-{run}.db"), jobs)
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return best


async def _check(path: Path, jobs: int) -> None:
    """The journal holds every job finished, with its output: nothing was skipped."""
    async with SQLiteJournal(path) as journal:
        batch = await journal.load()
    assert batch is not None
    assert len(batch.jobs) == jobs, len(batch.jobs)
    last: Any = batch.jobs[-1]
    assert last.state == "finished", last
    assert last.output.stdout == "ok\n", last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.journal_cost", description=__doc__)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--window", type=int, default=32, help="jobs per handover of the lazy rows (J3, J4)"
    )
    parser.add_argument("--profile", action="store_true", help="print a cProfile (CPU time)")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="do not read each batch back (for instruction counts of the writes alone)",
    )
    args = parser.parse_args(argv)
    best = asyncio.run(
        measure(args.jobs, args.repeats, args.window, args.profile, check=not args.no_check)
    )
    print(f"journal CPU per job (best of {args.repeats} x {args.jobs} jobs, SQLite):")
    for phase, seconds in best.items():
        print(f"  {phase:<24} {seconds * 1e6:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
