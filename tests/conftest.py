"""Shared fixtures: a FakeDedalus on loopback and a Session on the same fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dedalus_async import Session
from dedalus_async.testing import FakeClock, FakeDedalus

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
def no_leaked_tasks() -> object:
    """Snapshot of the running tasks; a test compares after its work is done."""
    return set(asyncio.all_tasks())
