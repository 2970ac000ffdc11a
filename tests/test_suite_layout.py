"""The test suite's own layout: one meaning per fixture name, no test needing the benchmarks.

A fixture name is defined in one place: tests/conftest.py, our pytest plugin (which
conftest loads), or the one test module that needs it. A module that needs another script
or policy gives its fixture a name of its own, or sets them in the test. The plugin's
``*_options`` fixtures are the exception: overriding them in a module is how the plugin is
configured. The benchmarks' own tests live in benchmarks/tests/; nothing under tests/
imports ``benchmarks``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from dedalus_async.testing import pytest_plugin

TESTS = Path(__file__).parent
PLUGIN_MODULE = pytest_plugin.__name__
PLUGIN_FILE = Path(pytest_plugin.__file__)
FIXTURE_DECORATORS = {"pytest.fixture", "pytest_asyncio.fixture", "fixture"}


def _fixture_name(function: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The name a function is registered under as a fixture, None if it is not one."""
    for decorator in function.decorator_list:
        call = decorator if isinstance(decorator, ast.Call) else None
        target = call.func if call is not None else decorator
        if ast.unparse(target) not in FIXTURE_DECORATORS:
            continue
        for keyword in call.keywords if call is not None else ():
            if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                return str(keyword.value.value)
        return function.name
    return None


def fixture_definitions(source: str, plugin_fixtures: frozenset[str]) -> list[tuple[str, int]]:
    """(name, line) of every fixture a module defines: functions decorated with
    ``pytest.fixture`` or ``pytest_asyncio.fixture`` (bare or called, ``name=`` honoured),
    and module-level names bound to the plugin's fixtures (imported from the plugin, or
    assigned from an attribute of the plugin module)."""
    tree = ast.parse(source)
    found: list[tuple[str, int]] = []
    plugin_aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = _fixture_name(node)
            if name is not None:
                found.append((name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if node.module == PLUGIN_MODULE and alias.name in plugin_fixtures:
                    found.append((alias.asname or alias.name, node.lineno))
                elif f"{node.module}.{alias.name}" == PLUGIN_MODULE:
                    plugin_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            plugin_aliases.update(
                alias.asname for alias in node.names if alias.name == PLUGIN_MODULE and alias.asname
            )
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Attribute)
            and ast.unparse(node.value.value) in plugin_aliases | {PLUGIN_MODULE}
            and node.value.attr in plugin_fixtures
        ):
            found.extend((t.id, node.lineno) for t in node.targets if isinstance(t, ast.Name))
    return found


def benchmark_imports(source: str) -> list[int]:
    """Lines where a module imports ``benchmarks`` (or one of its modules)."""

    def is_benchmarks(module: str) -> bool:
        return module == "benchmarks" or module.startswith("benchmarks.")

    lines: list[int] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            if any(is_benchmarks(alias.name) for alias in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module is not None and is_benchmarks(node.module):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).rsplit(".", 1)[-1] in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and is_benchmarks(node.args[0].value)
        ):
            lines.append(node.lineno)
    return lines


def _plugin_fixtures() -> frozenset[str]:
    return frozenset(name for name, _ in fixture_definitions(PLUGIN_FILE.read_text(), frozenset()))


def _test_modules() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


# --- the checks, checked -------------------------------------------------------------


def test_every_form_of_fixture_definition_is_seen() -> None:
    source = """
import pytest
import pytest_asyncio
from pytest import fixture
from dedalus_async.testing import pytest_plugin as plugin
from dedalus_async.testing.pytest_plugin import local_backend, FAKE_API_KEY

@pytest.fixture
def a(): ...

@pytest.fixture(scope="module")
async def b(): ...

@pytest_asyncio.fixture
async def c(): ...

@pytest_asyncio.fixture(loop_scope="function")
async def d(): ...

@fixture
def e(): ...

@pytest.fixture(name="f")
def _f(): ...

@pytest.mark.slow
def test_not_a_fixture(): ...

fake_dedalus = plugin.fake_dedalus
not_one = plugin.FAKE_API_KEY
"""
    plugin_fixtures = frozenset({"local_backend", "fake_dedalus"})
    names = [name for name, _ in fixture_definitions(source, plugin_fixtures)]
    assert sorted(names) == ["a", "b", "c", "d", "e", "f", "fake_dedalus", "local_backend"]


def test_every_import_of_the_benchmarks_is_seen() -> None:
    source = """
import benchmarks
import benchmarks.server as server
from benchmarks.server import ServerStats
from benchmarks import runner
import importlib
importlib.import_module("benchmarks.client")
import benchmarks_elsewhere
from . import benchmarks_helpers
from .benchmarks import x
"""
    assert benchmark_imports(source) == [2, 3, 4, 5, 7]


def test_the_plugin_fixtures_are_found() -> None:
    assert {
        "fake_dedalus",
        "dedalus_session",
        "local_backend",
        "dedalus_fake_options",
        "dedalus_session_options",
        "local_backend_options",
    } <= _plugin_fixtures()


# --- the suite -----------------------------------------------------------------------


def test_no_fixture_name_is_defined_in_two_places() -> None:
    """Each fixture name has one definition (conftest, the plugin, or one test module);
    overriding the plugin's ``*_options`` fixtures is its configuration mechanism."""
    plugin_fixtures = _plugin_fixtures()
    places: dict[str, list[str]] = defaultdict(list)
    for name in plugin_fixtures:
        places[name].append(PLUGIN_MODULE)
    for path in _test_modules():
        for name, line in fixture_definitions(path.read_text(), plugin_fixtures):
            places[name].append(f"{path.relative_to(TESTS.parent)}:{line}")
    overridable = {name for name in plugin_fixtures if name.endswith("_options")}
    twice = {
        name: where for name, where in places.items() if len(where) > 1 and name not in overridable
    }
    assert twice == {}


def test_no_test_module_imports_the_benchmarks() -> None:
    """The benchmarks' own tests live in benchmarks/tests/; ours never need them."""
    found = {
        str(path.relative_to(TESTS.parent)): lines
        for path in _test_modules()
        if (lines := benchmark_imports(path.read_text()))
    }
    assert found == {}


def test_conftest_loads_our_plugin() -> None:
    """Our own tests use the plugin we ship, loaded the way its docstring tells users to
    (beside pytest's own ``pytester``, for tests/test_plugin.py)."""
    tree = ast.parse((TESTS / "conftest.py").read_text())
    loaded = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytest_plugins" for t in node.targets)
    ]
    assert len(loaded) == 1
    assert PLUGIN_MODULE in loaded[0]
    assert set(loaded[0]) <= {PLUGIN_MODULE, "pytester"}
