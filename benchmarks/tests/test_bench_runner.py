"""The benchmark runner's merging of saved runs (how the README's table is assembled), and
the names it gives scenarios run against a server of another style."""

from __future__ import annotations

from typing import Any

import attrs

from benchmarks.runner import merge, parse_args, scenarios
from benchmarks.server import MACHINE_ID, machine_ids


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


def test_a_server_style_names_its_scenarios_so_styles_merge_side_by_side() -> None:
    default = scenarios(parse_args(["--sizes", "5000", "--lag-executions", "0"]))
    style = ["--hints", "remaining", "--list-order", "newest", "--machines", "8"]
    styled = scenarios(parse_args(["--sizes", "5000", "--lag-executions", "0", *style]))
    assert [s.name for s in default] == ["c100", "fanout-5000"]
    suffix = "-remaining-newest-m8"
    assert [s.name for s in styled] == ["c100" + suffix, "fanout-5000" + suffix]
    assert styled[1].title == "5,000 at once (remaining hints, newest first, 8 machines)"
    raws = [
        _raw(attrs.asdict(s), marker)
        for s, marker in ((default[1], "default"), (styled[1], "styled"))
    ]
    merged = merge(raws)
    assert [s["name"] for s in merged["scenarios"]] == [default[1].name, styled[1].name]


def test_machines_are_distinct_and_the_first_is_the_usual_one() -> None:
    ids = machine_ids(8)
    assert ids[0] == MACHINE_ID
    assert len(set(ids)) == 8
