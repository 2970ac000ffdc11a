"""``run-many --journal`` and the ``batch`` subcommands: a durable batch's journal, opened
from the command line's flags, and what ``batch status`` / ``batch results`` print of it.

Both ``batch`` subcommands only read the journal: they send no request, and they work
while ``run-many`` is still writing it (SQLite's WAL lets a reader in beside the writer).
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from typing import Any

from dedalus_async._journal import Batch, JobRecord, JobState, SQLiteJournal
from dedalus_async._postgres import PostgresJournal, is_dsn, redact_dsn
from dedalus_async._results import execution_ok
from dedalus_async._workers import submit_batch, work_batch

from ._inputs import load_requests
from ._outcomes import EXIT_SOME_FAILED, UsageError, describe_end
from ._output import Context, json_line, result_document
from ._sessions import session_for_runs

__all__ = ["batch", "journal_for"]


def journal_for(args: argparse.Namespace) -> SQLiteJournal | PostgresJournal | None:
    """The journal ``--journal`` / ``--batch`` / ``--reservation-max-age`` name, if any:
    a PostgreSQL database for a ``postgresql://`` DSN, else an SQLite file."""
    if args.journal is None:
        return None
    max_age = getattr(args, "reservation_max_age", None)
    if is_dsn(args.journal):
        return PostgresJournal(args.journal, batch=args.batch, reservation_max_age=max_age)
    return SQLiteJournal(args.journal, batch=args.batch, reservation_max_age=max_age)


def journal_name(journal: str) -> str:
    """``--journal``'s value as messages show it (a DSN without its password)."""
    return redact_dsn(journal) if is_dsn(journal) else journal


def _check_exists(path: str) -> None:
    # opening a missing path would create an empty journal: a reader must not
    if not os.path.exists(path):
        raise UsageError(f"no journal at {path} (run-many FILE --journal {path} writes one)")


async def _load(args: argparse.Namespace) -> Batch:
    if not is_dsn(args.journal):
        _check_exists(args.journal)
    journal = journal_for(args)
    assert journal is not None
    async with journal:
        found = await journal.load()
    if found is None:
        raise UsageError(
            f"journal {journal_name(args.journal)} holds no batch {args.batch!r} (see --batch)"
        )
    return found


async def batch(args: argparse.Namespace, ctx: Context) -> int:
    """``batch status``, ``batch results``, ``batch submit`` and ``batch work``."""
    if args.batch_command in ("submit", "work"):
        if not is_dsn(args.journal):
            raise UsageError(
                f"--journal must be a PostgreSQL DSN for batch {args.batch_command} "
                "(postgresql://USER@HOST[:PORT]/DATABASE): workers share the batch through "
                "the database; an SQLite journal serves one run-many"
            )
        if args.batch_command == "submit":
            return await _submit(args, ctx)
        return await _work(args, ctx)
    found = await _load(args)
    if args.batch_command == "status":
        _status(found, journal_name(args.journal), ctx)
        return 0
    not_ok = 0
    for job in found.jobs:
        document = _result_document(job)
        not_ok += not document["ok"]
        ctx.stdout.write(json_line(document))
    ctx.stdout.flush()
    return EXIT_SOME_FAILED if not_ok else 0


async def _submit(args: argparse.Namespace, ctx: Context) -> int:
    machine = args.machine_id or os.environ.get("DEDALUS_MACHINE_ID") or None
    requests = load_requests(args.file, machine, None)
    count = await submit_batch(
        args.journal,
        requests,
        name=args.batch,
        max_in_flight=args.max_in_flight,
        rate=args.rate,
    )
    ctx.note(
        f"batch {args.batch!r} in {journal_name(args.journal)}: {count} jobs; run them with "
        f"`dedalus-async batch work --journal DSN --name {args.batch}` on any number of machines"
    )
    return 0


async def _work(args: argparse.Namespace, ctx: Context) -> int:
    async with session_for_runs(args, ctx) as (session, _):
        summary = await work_batch(
            session,
            args.journal,
            name=args.batch,
            concurrency=args.concurrency,
            lease=args.lease,
            on_start=lambda worker: ctx.note(f"worker {worker}: claiming jobs of {args.batch!r}"),
        )
    ctx.note(
        f"worker {summary.worker}: batch {args.batch!r} done here: claimed {summary.claimed} "
        f"({summary.taken_over} taken over), finished {summary.finished}, failed "
        f"{summary.failed}, lost {summary.lost}"
        + (
            f"; {summary.left} job(s) failed too often and are left (see batch status)"
            if summary.left
            else ""
        )
    )
    return EXIT_SOME_FAILED if summary.left else 0


def _result_document(job: JobRecord) -> dict[str, Any]:
    head = {"index": job.position, "job": job.job, "state": job.state.value}
    if job.state is JobState.FINISHED and job.execution is not None:
        output = job.output
        return head | result_document(
            job.execution,
            stdout=(output.stdout if output else None) or "",
            stderr=(output.stderr if output else None) or "",
        )
    document = head | result_document(None)
    document["error"] = {
        "type": "NotFinished",
        "message": job.error or f"not finished: {job.state.value}",
    }
    return document


def _status(found: Batch, path: str, ctx: Context) -> None:
    jobs = found.jobs
    states = Counter(job.state for job in jobs)
    # only finished jobs count: a job sent again after a crash may still carry the result
    # row of an earlier attempt
    ok = sum(
        1
        for job in jobs
        if job.state is JobState.FINISHED
        and job.execution is not None
        and execution_ok(job.execution)
    )
    finished = states[JobState.FINISHED]
    lines = [
        f"batch {found.name!r} in {path}: {len(jobs)} jobs",
        f"finished {finished} ({ok} ok, {finished - ok} not ok), "
        + ", ".join(f"{state.value} {states[state]}" for state in list(JobState)[:-1]),
    ]
    for job in jobs:
        if job.state is JobState.FINISHED and job.execution is not None:
            if not execution_ok(job.execution):
                how = describe_end(job.execution) or f"exit code {job.execution.exit_code}"
                lines.append(f"  {job.job}: {how}")
        elif job.error is not None:
            lines.append(f"  {job.job} ({job.state.value}): {job.error}")
    ctx.stdout.write(ctx.redact("\n".join(lines) + "\n").encode())
    ctx.stdout.flush()
