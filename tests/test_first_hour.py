"""What a new user meets first, from a REPL: the public names, short reprs, and a fake
that hands out a Session of its own."""

from __future__ import annotations

from datetime import UTC, datetime

import dedalus_async
from dedalus_async import Execution, ExecutionOutput, ExecutionResult
from dedalus_async.testing import FakeClock, FakeDedalus, Script

MACHINE = "dm-4e8a1c07-5b2d-4f93-8a61-0c7d3e9b2f45"  # the real form: "dm-" and a UUID


def test_dir_shows_the_public_api_only() -> None:
    names = dir(dedalus_async)
    assert names == sorted(dedalus_async.__all__)
    assert "LocalBackend" in names  # loaded lazily, listed all the same
    for private in ("Any", "TYPE_CHECKING", "_session", "_wire"):
        assert private not in names


def test_a_result_repr_is_short_and_shows_no_output() -> None:
    big = "x" * 5000
    execution = Execution(
        execution_id="exe-1",
        machine_id=MACHINE,
        status="succeeded",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    result = ExecutionResult(
        execution=execution,
        stdout=big,
        stderr="oops",
        output=ExecutionOutput(execution_id="exe-1", stdout=big, stderr="oops"),
    )
    text = repr(result)
    assert "xxxx" not in text
    assert "stdout=<5000 characters>" in text
    assert "stderr=<4 characters>" in text
    assert "output=" not in text
    assert len(text) < 700


async def test_the_fake_hands_out_a_session_on_its_own_clock_and_key() -> None:
    clock = FakeClock()
    async with FakeDedalus(clock=clock, script=Script.running(10.0)) as fake:
        assert fake.api_key == "test-key"
        async with fake.session() as session:
            assert session.clock is clock
            result = await session.run(MACHINE, ["sleep", "10"])
        assert result.ok
        assert clock.monotonic() >= 10.0  # the wait ran on the fake's clock, instantly
        async with fake.session(request_timeout=5.0) as session:
            assert session.request_timeout == 5.0
