"""The benchmark runner's merging of saved runs (how the README's table is assembled)."""

from __future__ import annotations

from typing import Any

from benchmarks.runner import merge


def _raw(scenario: dict[str, Any], marker: str) -> dict[str, Any]:
    return {
        "meta": {"date": marker},
        "scenarios": [scenario],
        "drivers": ["aiohttp"],
        "skipped": {},
        "not_run": {},
        "runs": {scenario["name"]: {"aiohttp": [marker]}},
        "memory": {},
    }


def test_a_scenario_run_again_replaces_the_earlier_one_title_included() -> None:
    small = {"name": "lag", "title": "200 executions", "executions": 200, "concurrency": 40}
    large = {"name": "lag", "title": "1,000 executions", "executions": 1000, "concurrency": 40}
    fanout = {"name": "fanout-10", "title": "10 at once", "executions": 10, "concurrency": None}
    merged = merge([_raw(small, "first"), _raw(fanout, "second"), _raw(large, "third")])
    assert [s["name"] for s in merged["scenarios"]] == ["lag", "fanout-10"]
    assert merged["scenarios"][0]["title"] == "1,000 executions"
    assert merged["runs"]["lag"] == {"aiohttp": ["third"]}
    assert merged["meta"]["date"] == "first"
