"""Automation: `nox` runs the default sessions (tests, lint, typing) on this interpreter.

`nox -s bench`, `nox -s soak` and `nox -s mutation` are opt-in and never part of the
default run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typing"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
# Branch coverage the tests session enforces on dedalus_async/.
COVERAGE_FLOOR = "95"


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite with branch coverage (extra args go to pytest)."""
    session.install(".[fast]", *_group("test"))
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "combine", "--quiet")
    session.run("coverage", "report", f"--fail-under={COVERAGE_FLOOR}")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting check."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and the benchmarks."""
    session.install(".[fast]", *_group("typing"))
    session.run("mypy", "--strict")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the fake server on loopback (not part of the default run)."""
    session.install(".[fast]", *_group("bench"))
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """10,000 executions with random faults (not part of the default run)."""
    session.install(".[fast]", *_group("test"))
    session.run("pytest", "-m", "soak", "-p", "no:cacheprovider", *session.posargs)


# The pure modules `nox -s mutation` mutates ([tool.mutmut] only_mutate in pyproject.toml).
MUTATED = [
    "_policy",
    "_throttle",
    "_wire",
    "_convert",
    "_checks",
    "_models",
    "_errors",
    "_results",
    "_clock",
    "_config",
]
# Mutants that cannot change behaviour, so no test can kill them: excluded from the score.
# Keys are mutmut's mutant names (`mutmut show NAME` prints the diff); each says why.
_TYPE_ARG = "cattrs' generated structure function ignores its type argument (it has a default)"
_NEVER_EMPTY = (
    "cattrs' validation errors are non-empty exception groups: transform_error always gives "
    "a message, so the fallback to str(exc) never runs"
)
_EPSILON_EDGE = "`delay < _EPSILON`: a wait of exactly 1e-9 s, slept or not, is the same"
_400_NEVER = "`status <= 400` / `< 401` instead of `< 400`: 400 is never retried anyway"
_HEADERS_CI = "Response.headers looks names up case-insensitively (aiohttp's CIMultiDictProxy)"
_FLOAT_CASE = "float() reads 'nan'/'inf' in any case"
_FAST_PATH = "check_id's fast path is an optimisation: the full checks give the same answer"
EQUIVALENT: dict[str, str] = {
    **{
        f"dedalus_async._policy.x__hint_seconds__mutmut_{n}": (
            "`> 0` as `>= 0` or `> 1`: only an int too large for a float overflows, never 0 or 1"
        )
        for n in (5, 6)
    },
    "dedalus_async._policy.x__number__mutmut_16": (
        "ok(None, value): no predicate reads the instance (_not_below reads its bound first)"
    ),
    "dedalus_async._policy.x_is_retryable_status__mutmut_2": _400_NEVER,
    "dedalus_async._policy.x_is_retryable_status__mutmut_3": _400_NEVER,
    "dedalus_async._throttle.xǁThrottleǁsucceeded__mutmut_3": (
        "`now < _last_growth` instead of `<=`: at now == _last_growth the growth is "
        "slope * 0, so going on changes nothing"
    ),
    "dedalus_async._throttle.xǁThrottleǁrate_limited__mutmut_5": "tightened = None: as falsy",
    "dedalus_async._throttle.xǁThrottleǁ_wait__mutmut_8": _EPSILON_EDGE,
    **{
        f"dedalus_async._throttle.xǁThrottleǁ__init____mutmut_{n}": (
            "a starting value never read: _floor and _slope only with a rate (they are for "
            "its cuts), _last_growth and _spread only after rate_limited() has set them"
        )
        for n in (66, 72, 77, 78, 79, 80)
    },
    "dedalus_async._throttle.xǁThrottleǁacquire__mutmut_4": _EPSILON_EDGE,
    **{
        f"dedalus_async._convert.x__is_tuple__mutmut_{n}": (
            "cattrs.Converter already unstructures a tuple to a list (cattrs 26); the hook "
            "keeps that whatever cattrs' default"
        )
        for n in (1, 3, 4, 5, 6, 7, 8, 9)
    },
    "dedalus_async._convert.x_structure__mutmut_7": _TYPE_ARG,
    "dedalus_async._convert.x_structure__mutmut_9": _TYPE_ARG,
    "dedalus_async._convert.x_structure__mutmut_21": _NEVER_EMPTY,
    "dedalus_async._convert.x_structure__mutmut_23": _NEVER_EMPTY,
    "dedalus_async._wire.x_parse_retry_after__mutmut_4": _HEADERS_CI,
    "dedalus_async._wire.x_parse_retry_after__mutmut_24": _HEADERS_CI,
    "dedalus_async._wire.x_error_from_response__mutmut_55": _HEADERS_CI,
    "dedalus_async._wire.x_parse_retry_after__mutmut_13": _FLOAT_CASE,
    "dedalus_async._wire.x_parse_retry_after__mutmut_20": _FLOAT_CASE,
    "dedalus_async._wire.x_parse_retry_after__mutmut_39": _FLOAT_CASE,
    "dedalus_async._wire.x_check_id__mutmut_4": _FAST_PATH,
    "dedalus_async._wire.x_check_id__mutmut_6": _FAST_PATH,
    "dedalus_async._wire.x_check_id__mutmut_31": "quote()'s default safe='/': '/' is refused",
    "dedalus_async._wire.x_check_id__mutmut_36": "safe='XXXX': 'X' is unreserved, never quoted",
    "dedalus_async._wire.x_error_from_response__mutmut_76": _HEADERS_CI,
    "dedalus_async._wire.x__check_text__mutmut_4": "codec names are case-insensitive: 'UTF-8'",
    "dedalus_async._wire.x__snippet__mutmut_6": "codec names are case-insensitive: 'UTF-8'",
    "dedalus_async._wire.x_error_from_response__mutmut_5": (
        "details starts as None instead of {}: APIStatusError stores `dict(details) if "
        "details else {}`, the same {}"
    ),
    "dedalus_async._wire.x_error_from_response__mutmut_10": (
        "parsing an empty body too: b'' is not JSON, so data is None either way (the test "
        "only saves raising and catching)"
    ),
    "dedalus_async._wire.x_error_from_response__mutmut_12": (
        "unparseable body as '' instead of None: only a dict is read"
    ),
}
# How a mutant's test run ended (mutmut's exit codes, mutmut.stats.status_by_exit_code).
# Caught: a test failed (1), pytest's internal error (3), the CPU limit stopped a mutant that
# made the code hang (SIGXCPU: 24/-24/152, mutmut's own 36; SIGKILL one second later: -9).
_KILLED = {1, 3, 24, -24, 36, 152, -9}
# mutmut's runner raised instead of reporting pytest's verdict (it exits -1: 255), which
# mutmut counts as a timeout. Either the mutant broke the package's import (a kill: pytest
# cannot even load conftest.py) or the setup is broken (e.g. the fork server's preload):
# _import_fails tells the two apart.
_CRASHED = {255, -1}


def _import_fails(python: str, mutants: Path, name: str) -> bool:
    """Whether importing the mutated package fails with mutant ``name`` active."""
    env = {**os.environ, "MUTANT_UNDER_TEST": name}
    code = "import dedalus_async.testing"
    result = subprocess.run([python, "-c", code], cwd=mutants, env=env, capture_output=True)
    return result.returncode != 0


def _mutation_scores(
    root: Path, python: str
) -> list[tuple[str, int, int, int, list[str], list[str]]]:
    """(module, mutants, killed, equivalent, survivors, broken) per module, from mutmut's
    results; survivors include the mutants no test reaches ("no tests")."""
    rows = []
    for module in MUTATED:
        meta = root / "mutants" / "dedalus_async" / f"{module}.py.meta"
        if not meta.exists():
            continue
        codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        checked = {name: code for name, code in codes.items() if code is not None}
        if not checked:
            continue
        crashed = [n for n, c in checked.items() if c in _CRASHED]
        broken = sorted(n for n in crashed if not _import_fails(python, root / "mutants", n))
        equivalent = [name for name in checked if name in EQUIVALENT]
        killed = [
            n
            for n, c in checked.items()
            if (c in _KILLED or (c in _CRASHED and n not in broken)) and n not in EQUIVALENT
        ]
        survivors = sorted(set(checked) - set(killed) - set(equivalent) - set(broken))
        rows.append((module, len(checked), len(killed), len(equivalent), survivors, broken))
    return rows


@nox.session
def mutation(session: nox.Session) -> None:
    """Mutation-test the pure modules with mutmut and print a score per module (opt-in).

    Every mutant runs in a process forked from a server that has not imported the package
    (only the third-party modules of tests/mutmut_preload.txt): the mutated package is
    imported afresh, so code run at import time (attrs validators, cattrs hooks) is mutated
    too, and is charged to every test (tests/mutmut_import_time.py). Extra args are mutant
    name globs, e.g. `nox -s mutation -- "dedalus_async._throttle*"`. Scores exclude the
    mutants listed in EQUIVALENT; survivors are listed (`mutmut show NAME` for the diff).
    """
    session.install(".[fast]", *_group("mutation"))
    root = Path(__file__).parent
    # From scratch: mutmut keeps an old verdict unless the mutant is named again, and charges
    # import-time code to every test (tests/mutmut_import_time.py) only in a full stats run.
    shutil.rmtree(root / "mutants", ignore_errors=True)
    # at most 2 workers: the suite's own tests are timing-sensitive on a busy machine
    session.run("mutmut", "run", "--max-children", "2", *session.posargs, silent=True)
    rows = _mutation_scores(root, str(Path(session.bin) / "python"))
    lines = ["| module | mutants | killed | equivalent | score |", "|---|---|---|---|---|"]
    broken = []
    for module, total, killed, equivalent, survivors, not_run in rows:
        score = 100.0 * killed / max(1, total - equivalent)
        lines.append(f"| `{module}.py` | {total} | {killed} | {equivalent} | {score:.1f} % |")
        for name in survivors:
            session.log(f"survived: {name}")
        broken += not_run
    session.log("\n" + "\n".join(lines))
    if broken:
        session.error(
            f"{len(broken)} mutants were not judged (mutmut's runner crashed, the package "
            f"imports fine with them), e.g. "
            f"{broken[0]}: run `mutmut run {broken[0]}` with debug = true in [tool.mutmut]"
        )
