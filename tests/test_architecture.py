"""The architecture, proved by imports: a pure core, one module that talks to aiohttp."""

from __future__ import annotations

import ast
from pathlib import Path

import dedalus_async

PACKAGE = Path(dedalus_async.__file__).parent
PURE = ["_models", "_convert", "_errors", "_wire", "_policy", "_results", "_clock"]
IO_LIBRARIES = {"aiohttp", "anyio"}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(third-party/stdlib top-level names, sibling private modules) imported by a module."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    outside: set[str] = set()
    siblings: set[str] = set()
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue  # imports for annotations only do nothing at run time
        if isinstance(node, ast.Import):
            outside.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.module:
                    siblings.add(node.module.split(".")[0])
                else:
                    siblings.update(alias.name for alias in node.names)
            elif node.module:
                outside.add(node.module.split(".")[0])
    return outside, siblings


def _closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    names: set[str] = set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        outside, siblings = _imports(current)
        names |= outside
        todo.extend(siblings)
    return names


def test_pure_core_does_no_io() -> None:
    """The pure modules, and everything they import, use neither aiohttp nor anyio."""
    for module in PURE:
        leaked = _closure(module) & IO_LIBRARIES
        assert not leaked, f"{module} imports {leaked}"


def test_decisions_do_not_touch_the_event_loop() -> None:
    """Wire format and policy decide without asyncio: time is passed in, never read."""
    for module in ("_wire", "_policy", "_convert", "_models", "_errors"):
        assert "asyncio" not in _closure(module), module


def test_only_the_transport_imports_aiohttp_client_code() -> None:
    """Outside testing/ and the local backend's server, only _transport runs aiohttp code."""
    offenders = []
    for path in PACKAGE.glob("_*.py"):
        outside, _ = _imports(path.stem)
        if "aiohttp" in outside and path.stem not in {"_transport", "_local"}:
            offenders.append(path.stem)
    assert offenders == []


def test_public_surface_is_sorted_and_complete() -> None:
    """__all__ is sorted, every name exists, and nothing private leaks into it."""
    names = dedalus_async.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), n))
    for name in names:
        assert hasattr(dedalus_async, name), name
        assert not name.startswith("_") or name == "__version__"
