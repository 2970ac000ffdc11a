"""Many workers on one batch in PostgreSQL, against the single-process ``run_many``.

Run as ``python -m benchmarks.workers [--jobs N] [--workers 1,2,4] [--concurrency C]
[--time-scale S] [--dsn DSN]``. The fake server (``benchmarks.server``) runs in a process
of its own; each client runs in processes of their own, so their CPU time (user + system,
from ``RUSAGE_CHILDREN`` once they exited) is the client's alone. Scenarios, each on a
fresh database:

* ``run_many``: one process, ``Session.run_many`` of the N requests, no journal;
* ``run_many + PostgresJournal``: the same with ``journal=DSN``;
* ``K workers``: ``batch submit`` (not timed), then K ``batch work`` processes at once,
  each with ``--concurrency C``; the wall time runs from their start to the last exit.

It prints one Markdown table: wall time, client CPU per execution, and each as a ratio to
``run_many``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .server import API_KEY, MACHINE_ID

RUN_MANY = """
import asyncio, sys
from dedalus_async import ExecutionRequest, Session
async def main():
    n, concurrency, journal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None
    requests = [ExecutionRequest(machine_id=sys.argv[4], command=["echo", str(i)])
                for i in range(n)]
    async with Session() as session:
        results = await session.run_many(requests, concurrency=concurrency, journal=journal)
    assert len(results) == n and all(r.ok for r in results)
asyncio.run(main())
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _new_database(admin_dsn: str) -> str:
    import asyncpg

    name = f"dedalus_bench_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await conn.close()

    asyncio.run(create())
    return f"{admin_dsn.rpartition('/')[0]}/{name}"


def _drop_database(admin_dsn: str, dsn: str) -> None:
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{dsn.rpartition("/")[2]}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


def _timed(commands: list[list[str]], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and client CPU seconds of these processes, run at once."""
    cpu = _children_cpu()
    start = time.perf_counter()
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL) for command in commands]
    codes = [proc.wait() for proc in procs]
    wall = time.perf_counter() - start
    if any(codes):
        raise SystemExit(f"a client failed: exit codes {codes}")
    return wall, _children_cpu() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--time-scale", type=float, default=0.1)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDALUS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.server", "--time-scale", str(args.time_scale)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    ready = server.stdout.readline().split()
    env.update(DEDALUS_BASE_URL=ready[1], DEDALUS_X_API_KEY=API_KEY)
    n, c = args.jobs, args.concurrency
    rows: list[tuple[str, float, float]] = []
    folder = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    jobs = folder / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"command": ["echo", str(i)]}) + "\n" for i in range(n)))
    cli = [sys.executable, "-m", "dedalus_async"]
    try:
        run_many = [sys.executable, "-c", RUN_MANY, str(n), str(c)]
        rows.append(("run_many, one process", *_timed([[*run_many, "", MACHINE_ID]], env)))
        dsn = _new_database(args.dsn)
        try:
            label = "run_many + PostgresJournal, one process"
            rows.append((label, *_timed([[*run_many, dsn, MACHINE_ID]], env)))
        finally:
            _drop_database(args.dsn, dsn)
        for k in (int(x) for x in args.workers.split(",")):
            dsn = _new_database(args.dsn)
            try:
                where = ["--journal", dsn, "--name", "bench"]
                submit = [*cli, "batch", "submit", str(jobs), "--machine-id", MACHINE_ID, *where]
                subprocess.run(submit, env=env, check=True, capture_output=True)
                work = [*cli, "batch", "work", *where, "--concurrency", str(c)]
                rows.append((f"{k} worker(s), batch work", *_timed([work] * k, env)))
            finally:
                _drop_database(args.dsn, dsn)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait()
    base_wall, base_cpu = rows[0][1], rows[0][2]
    print(f"{n:,} executions, concurrency {c} per process, time scale {args.time_scale}")
    print("| client | wall | client CPU per execution |")
    print("|---|---|---|")
    for label, wall, cpu in rows:
        print(
            f"| {label} | {wall:.1f} s ({wall / base_wall:.2f}x) | "
            f"{cpu / n * 1000:.2f} ms ({cpu / base_cpu:.2f}x) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
