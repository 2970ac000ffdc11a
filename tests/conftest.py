"""Shared fixtures. Each name means one thing in every test module (tests/test_suite_layout.py
checks that no module defines one again):

``clock``            a FakeClock.
``fake``             a FakeDedalus (key ``API_KEY``) on ``clock``; its handlers must not raise.
``session``          a Session on ``fake`` and ``clock``, jitter fixed (random=0.5).
``live_fake``        a FakeDedalus (key ``API_KEY``) on the real clock; its handlers must not
                     raise. Tests that need other executions call ``live_fake.set_script``.
``local_session``    a Session on the plugin's ``local_backend``.
``no_leaked_tasks``  the tasks running before the test's work.
``postgres_server``  the DSN of a PostgreSQL server (found or started: tests/postgres.py),
                     for the whole run; skipped with one line saying how to get one,
                     failed instead under ``CI``.
``postgres_dsn``     a fresh empty database on it, dropped after the test.

Our own pytest plugin is loaded too: ``fake_dedalus`` and ``dedalus_session`` (a fake and a
Session on the plugin's ``dedalus_clock``, a FakeClock), ``live_fake_dedalus`` and
``live_dedalus_session`` (the same on the real clock), all configured by overriding
``dedalus_fake_options`` and ``dedalus_session_options`` in a module, and ``local_backend``
(configured by ``local_backend_options``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from dedalus_async import Session
from dedalus_async._local import LocalBackend
from dedalus_async.testing import FakeClock, FakeDedalus

from . import postgres

pytest_plugins = ["dedalus_async.testing.pytest_plugin", "pytester"]

API_KEY = "test-key-0123456789abcdef-SECRET"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeDedalus]:
    async with FakeDedalus(api_key=API_KEY, clock=clock) as server:
        yield server
    assert server.errors == [], "the fake's handlers raised"


@pytest.fixture
async def session(fake: FakeDedalus, clock: FakeClock) -> AsyncIterator[Session]:
    # random=0.5: jitter is deterministic, so sleep schedules can be asserted exactly
    async with Session(API_KEY, base_url=fake.base_url, clock=clock, random=lambda: 0.5) as s:
        yield s


@pytest.fixture
async def live_fake() -> AsyncIterator[FakeDedalus]:
    """A fake on the real clock (for what is about the event loop: cancellation, timeouts)."""
    async with FakeDedalus(api_key=API_KEY) as server:
        yield server
    assert server.errors == [], "the fake's handlers raised"


@pytest.fixture
async def local_session(local_backend: LocalBackend) -> AsyncIterator[Session]:
    """A Session on the local backend (real processes, real clock)."""
    async with local_backend.session() as s:
        yield s


@pytest.fixture
def no_leaked_tasks() -> object:
    """Snapshot of the running tasks; a test compares after its work is done."""
    return set(asyncio.all_tasks())


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    try:
        with postgres.server_dsn() as dsn:
            yield dsn
    except postgres.PostgresUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL: {exc}")
        pytest.skip(str(exc))


@pytest.fixture
async def postgres_dsn(postgres_server: str) -> AsyncIterator[str]:
    async with postgres.fresh_database(postgres_server) as dsn:
        yield dsn
