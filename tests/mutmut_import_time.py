"""A pytest plugin for `nox -s mutation` only: code that runs at import time gets its tests.

mutmut runs each mutant against the tests that called the mutated function, which it
learns in a "stats" run: a function called while a test runs is charged to that test.
Functions the package calls while it is being imported (``_convert._make`` builds the
cattrs converters, its hooks are closures made there) run before any test, so mutmut
charges them to the first test only, and their mutants are judged by one unrelated test.
Here they are charged to every test instead: such a mutant runs against the whole
selection, in a fresh interpreter that imports the mutated package (forkserver mode).

It also turns off Hypothesis' per-example deadline and its too-slow health check: on a busy
machine a slow example would otherwise fail a test, which mutmut counts as a kill (or, in the
stats run, as a broken setup).

Loaded by ``[tool.mutmut] pytest_add_cli_args`` (``-p tests.mutmut_import_time``) only; the
charging happens in mutmut's stats run alone. It reads mutmut's own record of the calls
(``mutmut.state.state()._stats``, mutmut 3.8), and says so loudly if that changes.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("mutmut", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mutmut")

_at_import: frozenset[str] = frozenset()


def _stats_run() -> bool:
    return os.environ.get("MUTANT_UNDER_TEST") == "stats"


def _calls() -> set[str]:
    """The functions called since the last test's teardown (mutmut's own record)."""
    state: Any = importlib.import_module("mutmut.state").state()
    calls = getattr(state, "_stats", None)
    if not isinstance(calls, set):
        raise RuntimeError(
            "tests/mutmut_import_time.py: mutmut no longer keeps its calls in "
            "state()._stats; import-time code would be scored against one test only"
        )
    return calls


def pytest_collection_finish(session: pytest.Session) -> None:
    """Remember what ran while the package and the test modules were imported."""
    global _at_import
    if _stats_run():
        _at_import = frozenset(_calls())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Charge the import-time calls to this test too (before mutmut's collector runs)."""
    if _stats_run():
        _calls().update(_at_import)
