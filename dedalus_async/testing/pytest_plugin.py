"""pytest fixtures for code that uses dedalus_async.

Enable them in your top-level ``conftest.py``::

    pytest_plugins = ["dedalus_async.testing.pytest_plugin"]

(or import the fixtures you use, with their ``*_options`` fixtures, into a test module).
They are async fixtures and need pytest-asyncio (any mode).

``fake_dedalus``
    A started :class:`~dedalus_async.testing.FakeDedalus` on 127.0.0.1, with the default
    scripted runner; change what executions do with ``fake_dedalus.set_script(...)``.
``dedalus_session``
    An open :class:`~dedalus_async.Session` pointed at ``fake_dedalus``, sharing its
    clock (so with a :class:`~dedalus_async.testing.FakeClock`, waits take no real time).
``local_backend``
    A started :class:`~dedalus_async._local.LocalBackend` whose machines live under the
    test's ``tmp_path``: real processes, as the current user, no sandbox.

Configure them by overriding the options fixtures, e.g. in a test module::

    @pytest.fixture
    def dedalus_fake_options():
        return {"clock": FakeClock(), "script": Script.running(60)}

``dedalus_fake_options`` is passed to :class:`FakeDedalus` (its ``api_key`` is also the
session's), ``dedalus_session_options`` to :class:`Session`, ``local_backend_options`` to
:class:`LocalBackend`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pytest
import pytest_asyncio

from dedalus_async import Session
from dedalus_async._local import LocalBackend

from ._fake import FakeDedalus

__all__ = [
    "FAKE_API_KEY",
    "dedalus_fake_options",
    "dedalus_session",
    "dedalus_session_options",
    "fake_dedalus",
    "local_backend",
    "local_backend_options",
]

#: The API key of ``fake_dedalus`` unless ``dedalus_fake_options`` sets another.
FAKE_API_KEY: Final = "test-key"


@pytest.fixture
def dedalus_fake_options() -> dict[str, Any]:
    """Keyword arguments for the ``fake_dedalus`` server; override to configure it."""
    return {}


@pytest.fixture
def dedalus_session_options() -> dict[str, Any]:
    """Keyword arguments for the ``dedalus_session`` Session; override to configure it."""
    return {}


@pytest.fixture
def local_backend_options() -> dict[str, Any]:
    """Keyword arguments for the ``local_backend``; override to configure it."""
    return {}


@pytest_asyncio.fixture
async def fake_dedalus(dedalus_fake_options: dict[str, Any]) -> AsyncIterator[FakeDedalus]:
    """A started fake executions server on 127.0.0.1 (closed after the test)."""
    options = {"api_key": FAKE_API_KEY, **dedalus_fake_options}
    async with FakeDedalus(**options) as fake:
        yield fake


@pytest_asyncio.fixture
async def dedalus_session(
    fake_dedalus: FakeDedalus,
    dedalus_fake_options: dict[str, Any],
    dedalus_session_options: dict[str, Any],
) -> AsyncIterator[Session]:
    """An open Session on ``fake_dedalus``, with the fake's key and clock."""
    options: dict[str, Any] = {
        "api_key": dedalus_fake_options.get("api_key", FAKE_API_KEY),
        "base_url": fake_dedalus.base_url,
        "clock": fake_dedalus.clock,
        **dedalus_session_options,
    }
    async with Session(**options) as session:
        yield session


@pytest_asyncio.fixture
async def local_backend(
    tmp_path: Path, local_backend_options: dict[str, Any]
) -> AsyncIterator[LocalBackend]:
    """A started local backend keeping its machines under ``tmp_path / "dedalus-local"``."""
    options: dict[str, Any] = {
        "data_dir": tmp_path / "dedalus-local",
        "announce": False,
        **local_backend_options,
    }
    async with LocalBackend(**options) as backend:
        yield backend
