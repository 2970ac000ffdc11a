"""The package's version, read once from its installed metadata (pyproject.toml's is the
only version literal)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__: str = version("dedalus-async")
except PackageNotFoundError:  # pragma: no cover - only a source tree that was never installed
    __version__ = "0+unknown"
