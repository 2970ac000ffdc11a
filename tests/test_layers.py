"""The layers, proved by imports: production code never depends on the test kit.

``dedalus_async.testing`` builds on the production modules (the fake is the production
server plus test controls); the other way round is forbidden, even for annotations, so
the package works with ``testing/`` deleted. The API's rules (``_server``) and the
execution records (``_records``) do no network I/O of their own: only the HTTP layer of
``_local`` serves them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dedalus_async

PACKAGE = Path(dedalus_async.__file__).parent
TEST_KIT = "dedalus_async.testing"


def _production_modules() -> list[Path]:
    """Every module of the package outside ``testing/``."""
    return sorted(
        path
        for path in PACKAGE.rglob("*.py")
        if (PACKAGE / "testing") not in path.parents and "__pycache__" not in path.parts
    )


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Absolute names of everything ``source`` (the text of ``module``) imports.

    Every import counts, wherever it is: in functions, under ``if TYPE_CHECKING:``.
    ``from X import y`` yields both ``X`` and ``X.y`` (``y`` may be a submodule).
    """
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return names


def _uses_test_kit(names: set[str]) -> set[str]:
    return {n for n in names if n == TEST_KIT or n.startswith(TEST_KIT + ".")}


def test_production_modules_are_found() -> None:
    """The walk sees the modules this file is about (a broken walk would prove nothing)."""
    names = {_module_name(p) for p in _production_modules()}
    assert {"dedalus_async", "dedalus_async._server", "dedalus_async._local"} <= names
    assert not any(n.startswith(TEST_KIT) for n in names)


@pytest.mark.parametrize("path", _production_modules(), ids=lambda p: p.name)
def test_production_never_imports_the_test_kit(path: Path) -> None:
    """No module outside testing/ imports dedalus_async.testing, in any form."""
    names = imported_modules(
        path.read_text(), _module_name(path), is_package=path.name == "__init__.py"
    )
    assert _uses_test_kit(names) == set(), f"{path.name} depends on the test kit"


@pytest.mark.parametrize(
    "source",
    [
        "import dedalus_async.testing",
        "import dedalus_async.testing._fake as fake",
        "from dedalus_async.testing import FakeDedalus",
        "from dedalus_async import testing",
        "from .testing import FakeDedalus",
        "from .testing._fake_script import Script",
        "from . import testing",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .testing import FakeClock",
        "def later() -> None:\n    from .testing._clock import FakeClock",
    ],
)
def test_every_form_of_importing_the_test_kit_is_caught(source: str) -> None:
    """The check itself: each way of writing the import is seen."""
    assert _uses_test_kit(imported_modules(source, "dedalus_async._local"))


def test_lookalikes_are_not_the_test_kit() -> None:
    """Names that merely start the same, or another package's ``testing``, are fine."""
    source = (
        "import dedalus_async.testing_helpers\n"
        "from aiohttp import testing\n"
        "from ._records import testing_note\n"
    )
    assert _uses_test_kit(imported_modules(source, "dedalus_async._local")) == set()


@pytest.mark.parametrize("module", ["_server", "_records"])
def test_the_api_rules_do_no_network_io(module: str) -> None:
    """The server's rules and records answer requests without sockets or aiohttp."""
    path = PACKAGE / f"{module}.py"
    names = imported_modules(path.read_text(), f"dedalus_async.{module}")
    roots = {name.split(".")[0] for name in names}
    assert roots.isdisjoint({"aiohttp", "anyio", "socket", "asyncio"}), roots


def test_the_production_server_runs_without_loading_the_test_kit() -> None:
    """Importing the server and the local backend in a fresh interpreter loads nothing of
    the test kit (what the import check promises, seen at run time)."""
    code = (
        "import sys, dedalus_async._server, dedalus_async._local\n"
        "print(sorted(m for m in sys.modules if m.startswith('dedalus_async.testing')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
