"""The benchmarks still run: ``python -m benchmarks --quick`` end to end, in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

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


def _table_rows(report: str, heading: str) -> dict[str, list[str]]:
    """The rows of the Markdown table that follows ``heading`` (or the first table)."""
    lines = report.splitlines()
    start = lines.index(heading) if heading else 0
    rows: dict[str, list[str]] = {}
    for line in lines[start:]:
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_quick_run_prints_the_comparison_table() -> None:
    """--quick runs both drivers against the server process and prints every table row."""
    done = _run_quick()
    assert done.returncode == 0, done.stderr
    report = done.stdout

    headline = _table_rows(report, "")
    floor = headline["bare aiohttp loop (the floor)"]
    ours = headline["dedalus_async, Session.run per execution"]
    assert floor[0].endswith("(1.00x)")  # the floor is its own baseline
    assert " ms (" in ours[0]  # CPU per request...
    assert ours[0].endswith("x)")  # ...and its ratio to the floor
    assert ours[-2].startswith("0 of ")  # no poll before the server's hint

    for heading in ("### c10: 20 executions, concurrency 10", "### fanout-30: 30 at once"):
        rows = _table_rows(report, heading)
        assert set(rows) >= {"aiohttp", "dedalus_async"}, heading
        for driver in ("aiohttp", "dedalus_async"):
            cells = rows[driver]
            assert cells[3] == "5.00", (heading, driver, cells)  # requests per execution
            assert cells[-1] == "0", (heading, driver, cells)  # errors
    # the tracemalloc run of the fan-out filled in the memory columns
    memory = _table_rows(report, "### fanout-30: 30 at once")["dedalus_async"]
    assert memory[5].endswith("KiB")
    assert memory[6].endswith("KiB")
