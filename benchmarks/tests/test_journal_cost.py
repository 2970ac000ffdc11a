"""``python -m benchmarks.journal_cost`` runs, and what it measures is a whole batch."""

from __future__ import annotations

import pytest

from benchmarks import journal_cost


def test_a_small_run_journals_every_job_and_prints_each_phase(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # main() reads each batch back and fails unless every job is finished with its output
    assert journal_cost.main(["--jobs", "70", "--repeats", "2", "--window", "8"]) == 0
    report = capsys.readouterr().out
    assert "best of 2 x 70 jobs" in report
    for phase in ("open (J1)", "sent + created (J2, J3)", "finished (J4)", "close (J5)", "total"):
        assert phase in report
        line = next(line for line in report.splitlines() if phase in line)
        assert float(line.split()[-2]) > 0, line
