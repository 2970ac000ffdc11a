"""The benchmarks still run: ``python -m benchmarks --quick`` end to end, in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository root

pytestmark = pytest.mark.slow


def _run_quick() -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--drivers", "aiohttp,dedalus_async"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _table_rows(report: str, heading: str) -> dict[str, dict[str, str]]:
    """The Markdown table after ``heading`` (the first one if empty): row -> column -> cell."""
    lines = report.splitlines()
    start = lines.index(heading) if heading else 0
    header: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            if header:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not header:
            header = cells
        elif not line.startswith("|---"):
            rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_quick_run_prints_the_comparison_table() -> None:
    """--quick runs both drivers against the server process and prints every table row."""
    done = _run_quick()
    assert done.returncode == 0, done.stderr
    report = done.stdout

    headline = _table_rows(report, "")
    floor = headline["bare aiohttp loop (the floor)"]
    ours = headline["dedalus_async, Session.run per execution"]
    cpu = "client CPU per request, concurrency 10"
    assert floor[cpu].endswith("(1.00x)")  # the floor is its own baseline
    assert " ms (" in ours[cpu]  # CPU per request...
    assert ours[cpu].endswith("x)")  # ...and its ratio to the floor
    assert ours["polls before the hint"].startswith("0 of ")

    for heading in (
        "### c10: 20 executions, concurrency 10 (1 round)",
        "### fanout-30: 30 at once (1 round)",
    ):
        rows = _table_rows(report, heading)
        assert set(rows) >= {"aiohttp", "dedalus_async"}, heading
        for driver in ("aiohttp", "dedalus_async"):
            row = rows[driver]
            # 5 when every poll lands in its phase; on a loaded machine a late poll can
            # skip a phase (fewer), never add one (polls follow the hints)
            assert 4.5 <= float(row["requests / exec"]) <= 5.0, (heading, row)
            assert row["errors"] == "0", (heading, row)
    # the tracemalloc run of the fan-out filled in the memory columns
    memory = _table_rows(report, "### fanout-30: 30 at once (1 round)")["dedalus_async"]
    assert memory["traced peak / exec"].endswith("KiB")
    assert memory["waiting / exec"].endswith("KiB")
    # the server measured every execution's lag over the hint (a number of ms, not "-")
    over = memory["over the hint p50 / p99 / max"]
    assert over.endswith(" ms"), over
    assert "-" not in over, over
