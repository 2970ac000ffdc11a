"""pytest fixtures for code that uses dedalus_async.

Install them with the ``pytest`` extra, which brings pytest and pytest-asyncio::

    pip install "dedalus-async[pytest]"

and enable them in your top-level ``conftest.py``::

    pytest_plugins = ["dedalus_async.testing.pytest_plugin"]

They are pytest-asyncio fixtures, so they work in its strict mode (the default: mark async
tests with ``@pytest.mark.asyncio``) and in auto mode alike, and run on the event loop of
the test (function scope, unless ``asyncio_default_fixture_loop_scope`` says otherwise).
pytest-asyncio itself warns in every project until ``asyncio_default_fixture_loop_scope``
is set; the fixtures need no other setting.

On a fake clock (waits take no real time, and ``dedalus_clock.sleeps`` is their schedule):

``dedalus_clock``
    The :class:`~dedalus_async.testing.FakeClock` of ``fake_dedalus`` and
    ``dedalus_session``; override it to start at another time.
``fake_dedalus``
    A started :class:`~dedalus_async.testing.FakeDedalus` on 127.0.0.1, on
    ``dedalus_clock``, with the key :data:`FAKE_API_KEY` and the default scripted runner.
``dedalus_session``
    An open :class:`~dedalus_async.Session` on ``fake_dedalus``, with its key and clock.
    Code under test that makes its own Session should take ``fake_dedalus.session()``
    (same clock) or use the real-clock fixtures below: a Session on the real clock never
    sees a fake-clock execution progress.

On the real clock, for tests that need wall time (``asyncio.timeout``, cancellation, a
Session the code under test makes itself, a web app):

``live_fake_dedalus``
    Like ``fake_dedalus``, on the real clock (the default script takes 0.6 s).
``live_dedalus_session``
    An open Session on ``live_fake_dedalus``.

And a real backend:

``local_backend``
    A started :class:`~dedalus_async.LocalBackend` whose machines live under the test's
    ``tmp_path``: real processes, as the current user, no sandbox.

Scripts and faults: override ``dedalus_fake_options`` (keyword arguments for
:class:`~dedalus_async.testing.FakeDedalus`, e.g. ``{"script": Script.running(60)}`` or
``{"fault_rate": 0.05}``; the clock is not one of them) for every test of a module; in a
test, or in a fixture of yours that takes ``fake_dedalus``, call
``fake_dedalus.set_script(...)`` and ``fake_dedalus.add_fault(Fault(...))``.
``dedalus_session_options`` goes to the Session (e.g. ``{"poll": PollPolicy(...)}``),
``local_backend_options`` to :class:`~dedalus_async.LocalBackend`.

A fake whose request handlers raised (``fake_dedalus.errors``: a bug in a runner or a
script factory, answered with a 500) fails the test at teardown, since the test saw only
the 500; a test that provokes one on purpose clears ``fake_dedalus.errors``. Error answers
the fake gives by the API's rules (401, 404, 409, 422, a fault's 503) are never counted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

try:
    import pytest_asyncio
except ImportError as exc:  # pragma: no cover - tested in a subprocess without it
    raise ImportError(
        "dedalus_async.testing.pytest_plugin needs pytest-asyncio: "
        'pip install "dedalus-async[pytest]"'
    ) from exc

from dedalus_async import Session, SystemClock
from dedalus_async._local import LocalBackend

from ._clock import FakeClock
from ._fake import FAKE_API_KEY, FakeDedalus

__all__ = [
    "FAKE_API_KEY",
    "dedalus_clock",
    "dedalus_fake_options",
    "dedalus_session",
    "dedalus_session_options",
    "fake_dedalus",
    "live_dedalus_session",
    "live_fake_dedalus",
    "local_backend",
    "local_backend_options",
]


@pytest.fixture
def dedalus_fake_options() -> dict[str, Any]:
    """Keyword arguments for ``fake_dedalus`` and ``live_fake_dedalus``; override to
    configure them (``script``, ``runner``, ``fault_rate``, ``api_key``, ...)."""
    return {}


@pytest.fixture
def dedalus_session_options() -> dict[str, Any]:
    """Keyword arguments for the Session of ``dedalus_session`` and
    ``live_dedalus_session``; override to configure it."""
    return {}


@pytest.fixture
def local_backend_options() -> dict[str, Any]:
    """Keyword arguments for the ``local_backend``; override to configure it."""
    return {}


@pytest.fixture
def dedalus_clock() -> FakeClock:
    """The fake clock shared by ``fake_dedalus`` and ``dedalus_session``."""
    return FakeClock()


def _serve(options: dict[str, Any], clock: FakeClock | SystemClock) -> FakeDedalus:
    if "clock" in options:
        pytest.fail(
            "dedalus_fake_options sets 'clock': override the dedalus_clock fixture to "
            "change the fake clock, or use live_fake_dedalus for the real one",
            pytrace=False,
        )
    return FakeDedalus(**{"api_key": FAKE_API_KEY, **options, "clock": clock})


def _check_handlers(fake: FakeDedalus, name: str) -> None:
    """Fail the test at teardown if the fake's handlers raised (see the module docstring)."""
    if fake.errors:
        times = "once" if len(fake.errors) == 1 else f"{len(fake.errors)} times"
        pytest.fail(
            f"{name}: the fake's request handlers raised {times} (each answered with a 500, "
            f"the tracebacks are in the captured log), first {fake.errors[0]!r}. If the "
            f"test means it, clear {name}.errors before it ends.",
            pytrace=False,
        )


@pytest_asyncio.fixture
async def fake_dedalus(
    dedalus_clock: FakeClock, dedalus_fake_options: dict[str, Any]
) -> AsyncIterator[FakeDedalus]:
    """A started fake executions server on 127.0.0.1 and ``dedalus_clock``."""
    async with _serve(dedalus_fake_options, dedalus_clock) as fake:
        yield fake
    _check_handlers(fake, "fake_dedalus")


@pytest_asyncio.fixture
async def dedalus_session(
    fake_dedalus: FakeDedalus, dedalus_session_options: dict[str, Any]
) -> AsyncIterator[Session]:
    """An open Session on ``fake_dedalus``, with the fake's key and clock."""
    async with fake_dedalus.session(**dedalus_session_options) as session:
        yield session


@pytest_asyncio.fixture
async def live_fake_dedalus(dedalus_fake_options: dict[str, Any]) -> AsyncIterator[FakeDedalus]:
    """A started fake executions server on 127.0.0.1 and the real clock."""
    async with _serve(dedalus_fake_options, SystemClock()) as fake:
        yield fake
    _check_handlers(fake, "live_fake_dedalus")


@pytest_asyncio.fixture
async def live_dedalus_session(
    live_fake_dedalus: FakeDedalus, dedalus_session_options: dict[str, Any]
) -> AsyncIterator[Session]:
    """An open Session on ``live_fake_dedalus`` (real clock), with the fake's key."""
    async with live_fake_dedalus.session(**dedalus_session_options) as session:
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
