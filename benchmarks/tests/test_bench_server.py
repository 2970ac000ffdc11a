"""The benchmark server's bookkeeping: early polls and the lag over the hint.

These counters decide the README's "polls before the hint" and "lag over the hint"
columns, so they are checked here on hand-made timelines (monotonic seconds).
"""

from __future__ import annotations

import pytest

from benchmarks.server import ServerStats, percentile


def test_a_poll_before_the_hint_elapsed_is_counted_early() -> None:
    stats = ServerStats()
    stats.hint_sent("e1", 300, sent=10.0, own=True)
    stats.poll_arrived("e1", now=10.25)  # 50 ms early
    stats.hint_sent("e1", 300, sent=10.26, own=True)
    stats.poll_arrived("e1", now=10.57)  # 10 ms after the hint
    out = stats.as_dict()
    assert (out["early_polls"], out["early_own"], out["checked_polls"]) == (1, 1, 2)
    assert out["min_margin_ms"] == pytest.approx(-50.0)


def test_a_page_hint_counts_for_early_polls_but_not_for_own_ones() -> None:
    stats = ServerStats()
    stats.hint_sent("e1", 100, sent=1.0, own=True)
    stats.hint_sent("e1", 300, sent=1.05, own=False)  # a list page, later, longer hint
    stats.poll_arrived("e1", now=1.2)  # after the own hint, before the page's
    out = stats.as_dict()
    assert (out["early_polls"], out["early_own"]) == (1, 0)


def test_lag_over_the_hint_counts_from_the_later_of_finish_and_hint() -> None:
    stats = ServerStats()
    # finished before the hint allowed a look: counted from the hint
    stats.hint_sent("a", 300, sent=0.0, own=True)
    stats.shown_terminal("a", completed=0.25, sent=0.31)
    # finished after the hint: counted from the finish
    stats.hint_sent("b", 300, sent=0.0, own=True)
    stats.shown_terminal("b", completed=0.4, sent=0.42)
    # a second response showing it finished changes nothing
    stats.shown_terminal("b", completed=0.4, sent=5.0)
    # no hint ever shown: from the finish
    stats.shown_terminal("c", completed=1.0, sent=1.005)
    out = stats.as_dict()
    assert out["over_hint_count"] == 3
    assert out["over_hint_max_ms"] == pytest.approx(20.0)
    assert out["over_hint_p50_ms"] == pytest.approx(10.0)


def test_the_latest_hint_shown_is_the_one_that_counts() -> None:
    stats = ServerStats()
    stats.hint_sent("a", 300, sent=0.0, own=True)
    stats.hint_sent("a", 100, sent=0.5, own=False)  # due at 0.6, not 0.3
    stats.shown_terminal("a", completed=0.55, sent=0.62)
    assert stats.as_dict()["over_hint_max_ms"] == pytest.approx(20.0)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
