"""wait(), watch(), events(follow=True), run(): end to end over loopback against FakeDedalus."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math

import pytest

from dedalus_async import (
    ExecutionFailed,
    ExecutionStatus,
    NotFoundError,
    PollPolicy,
    RetryPolicy,
    ServerError,
    Session,
    TransportError,
    WaitTimeout,
)
from dedalus_async.testing import FakeClock, FakeDedalus, Fault, Outcome, Phase, Script

from .conftest import API_KEY

MACHINE = "dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0"  # the real form: "dm-" and a UUID

# random=0.5 in the session fixture: the Session's poll grid (P3 of _policy) sits half a
# step (2.5 ms) after each multiple of 5 ms of the FakeClock's monotonic time, which starts
# on one (1000.0): a look due on a multiple of 5 ms waits 2.5 ms more, then its next hints
# of whole 5 ms steps keep it on the grid with nothing added.
JITTER = 0.5 * PollPolicy().hint_jitter


def client_tasks() -> set[asyncio.Task[object]]:
    """Running tasks, minus the in-process fake server's own connection handlers."""
    return {
        t
        for t in asyncio.all_tasks()
        if not t.get_coro().__qualname__.startswith("RequestHandler.")  # type: ignore[union-attr]
    }


async def test_sleeping_machine_wakes_with_exactly_the_hinted_polls(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """wake_in_progress → queued → running → succeeded: one poll per hint, none early."""
    fake.set_script(Script.default())
    handle = await session.create_execution(MACHINE, ["true"])
    done = await handle.wait()
    assert done.status == "succeeded"
    assert handle.stats is not None
    assert handle.stats.polls == 3  # hints 200, 100, 300 ms: exactly three GETs
    assert clock.sleeps == pytest.approx([0.2 + JITTER, 0.1, 0.3])
    gets = fake.requests_for("GET")
    assert len(gets) == 3
    # the server never saw a poll before its own hint had elapsed
    post_at = fake.requests_for("POST")[0].at
    gaps = [gets[0].at - post_at] + [b.at - a.at for a, b in itertools.pairwise(gets)]
    for gap, hint in zip(gaps, (0.2, 0.1, 0.3), strict=True):
        assert gap >= hint


async def test_hint_is_read_from_every_response(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """A hint that changes mid-wait is followed (not only the first one)."""
    fake.set_script(
        Script(
            (Phase("queued", 1.0, 1000), Phase("running", 0.05, 50), Phase("running", 3.0, 3000)),
        )
    )
    handle = await session.create_execution(MACHINE, ["x"])
    await handle.wait()
    assert clock.sleeps == pytest.approx([1.0 + JITTER, 0.05, 3.0])


async def test_no_hint_backs_off(session: Session, fake: FakeDedalus, clock: FakeClock) -> None:
    """Without hints the wait backs off exponentially, with jitter, up to max_interval."""
    fake.set_script(Script.running(10.0))
    handle = await session.create_execution(MACHINE, ["x"])
    await handle.wait()
    policy = session.poll
    expected = [
        min(policy.max_interval, policy.initial_interval * policy.multiplier**n)
        * (1 - policy.jitter * 0.5)
        for n in range(len(clock.sleeps))
    ]
    assert clock.sleeps == pytest.approx(expected)
    assert math.fsum(clock.sleeps) >= 10.0


async def test_deadline_raises_wait_timeout_on_time(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """A stuck execution: WaitTimeout after exactly `timeout` seconds, with what resumes it."""
    fake.set_script(Script.stuck(retry_after_ms=700))
    handle = await session.create_execution(MACHINE, ["x"])
    with pytest.raises(WaitTimeout) as info:
        await handle.wait(timeout=5)
    err = info.value
    assert isinstance(err, TimeoutError)
    assert math.fsum(clock.sleeps) == pytest.approx(5.0)
    assert err.timeout == 5
    assert err.last is not None
    assert err.last.status == "running"
    assert err.ref == handle.ref
    assert "attach" in str(err)
    # the last poll landed exactly on the deadline
    gets = fake.requests_for("GET")
    assert gets[-1].at - fake.requests_for("POST")[0].at == pytest.approx(5.0)
    assert fake.get_record(handle.execution_id).status == "running"  # not cancelled


async def test_resume_after_timeout_with_attach(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """A stored ref resumes the wait in a new Session (as another process would)."""
    fake.set_script(Script.running(20.0, retry_after_ms=1000))
    handle = await session.create_execution(MACHINE, ["x"])
    with pytest.raises(WaitTimeout) as info:
        await handle.wait(timeout=3)
    stored = info.value.ref.to_json()
    async with Session(API_KEY, base_url=fake.base_url, clock=clock) as other:
        resumed = other.attach(type(info.value.ref).from_json(stored))
        done = await resumed.wait(timeout=60)
    assert done.status == "succeeded"
    assert done.execution_id == handle.execution_id


async def test_expires_at_is_never_slept_past(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """A hint longer than the time to expires_at: look at expires_at, then see `expired`."""
    fake.set_script(Script.stuck(retry_after_ms=10_000, expires_after=2.5))
    handle = await session.create_execution(MACHINE, ["x"])
    done = await handle.wait(timeout=60)
    assert done.status == ExecutionStatus.EXPIRED
    assert clock.sleeps == [pytest.approx(2.5)]


async def test_expiry_passed_but_status_lags_looks_once_more(
    fake: FakeDedalus, clock: FakeClock
) -> None:
    """If the server still says running after expires_at, look again soon, once, then go
    back to the normal schedule (until the deadline)."""
    stale = {
        "execution_id": "e1",
        "machine_id": MACHINE,
        "command": ["x"],
        "created_at": "2026-01-01T00:00:00Z",
        "status": "running",
        "retry_after_ms": 5000,
        "expires_at": "2025-12-31T23:59:00Z",
    }
    fake.add_fault(Fault(method="GET", malformed=json.dumps(stale).encode(), times=None))
    async with Session(API_KEY, base_url=fake.base_url, clock=clock, random=lambda: 0.0) as s:
        with pytest.raises(WaitTimeout):
            await s.execution(MACHINE, "e1").wait(timeout=12)
    policy = s.poll
    assert clock.sleeps[0] == pytest.approx(policy.expiry_grace)
    assert clock.sleeps[1:] == pytest.approx([5.0, 5.0, 12 - 10 - policy.expiry_grace])


async def test_storms_mid_wait_are_survived(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """429s and 503s while polling do not end the wait; Retry-After is respected."""
    fake.set_script(Script.default())
    handle = await session.create_execution(MACHINE, ["x"])
    fake.add_fault(Fault(method="GET", status=503, times=6))
    fake.add_fault(Fault(method="GET", status=429, headers={"Retry-After": "1.5"}, times=3))
    done = await handle.wait(timeout=120)
    assert done.status == "succeeded"
    assert handle.stats is not None
    assert handle.stats.retries == 9
    assert clock.sleeps.count(1.5) == 3


async def test_permanent_error_ends_the_wait_at_once(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """The machine is destroyed mid-wait: NotFoundError immediately, not at the deadline."""
    fake.set_script(Script.stuck(retry_after_ms=1000))
    handle = await session.create_execution(MACHINE, ["x"])
    fake.destroy_machine(MACHINE)
    with pytest.raises(NotFoundError):
        await handle.wait(timeout=600)
    assert math.fsum(clock.sleeps) == pytest.approx(1.0 + JITTER)


async def test_unknown_status_keeps_waiting(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """A status nobody documented is not terminal: the wait goes on through it."""
    fake.set_script(Script((Phase("paused_for_maintenance", 2.0, 500),), Outcome()))
    handle = await session.create_execution(MACHINE, ["x"])
    done = await handle.wait()
    assert done.status == "succeeded"
    assert handle.stats is not None
    assert handle.stats.polls == 4


async def test_until_stops_at_a_chosen_status(session: Session, fake: FakeDedalus) -> None:
    """until={'running'} returns the first snapshot that is running."""
    fake.set_script(Script.default())
    handle = await session.create_execution(MACHINE, ["x"])
    snap = await handle.wait(until={"running"})
    assert snap.status == "running"
    with pytest.raises(TypeError, match="collection"):
        await handle.wait(until="running")


async def test_await_handle_is_wait(session: Session, fake: FakeDedalus) -> None:
    """`await handle` waits for the terminal status."""
    handle = await session.create_execution(MACHINE, ["echo", "hi"])
    done = await handle
    assert done.status == "succeeded"


async def test_already_terminal_needs_no_poll(session: Session, fake: FakeDedalus) -> None:
    """A create that answers terminal ends the wait without a GET."""
    fake.set_script(Script.immediate())
    handle = await session.create_execution(MACHINE, ["true"])
    await handle.wait()
    assert fake.requests_for("GET") == []


@pytest.mark.parametrize("bad", [0, -1, "5", True])
async def test_bad_timeouts_are_refused(session: Session, bad: object) -> None:
    """timeout must be positive seconds or None."""
    with pytest.raises((TypeError, ValueError), match="timeout"):
        await session.execution(MACHINE, "e").wait(timeout=bad)  # type: ignore[arg-type]


async def test_watch_yields_each_status_once(session: Session, fake: FakeDedalus) -> None:
    """watch() yields the first snapshot and every change, ending after the terminal one."""
    fake.set_script(
        Script(
            (Phase("queued", 0.3, 100), Phase("running", 0.5, 100)),
            Outcome(status="failed", exit_code=3),
        )
    )
    handle = await session.create_execution(MACHINE, ["x"])
    statuses = [s.status async for s in handle.watch()]
    assert statuses == ["queued", "running", "failed"]


async def test_watch_on_attached_handle_starts_with_a_poll(
    session: Session, fake: FakeDedalus
) -> None:
    """An attached handle has no snapshot yet: watch polls first."""
    fake.set_script(Script.running(1.0, retry_after_ms=400))
    created = await session.create_execution(MACHINE, ["x"])
    handle = session.execution(MACHINE, created.execution_id)
    statuses = [s.status async for s in handle.watch()]
    assert statuses == ["running", "succeeded"]


async def test_events_follow_streams_until_drained(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """events(follow=True) yields lifecycle and output chunks as they appear, then ends."""
    fake.set_script(
        Script(
            (Phase("queued", 0.2, 200), Phase("running", 0.5, 250, stdout="partial\n")),
            Outcome(stdout="done\n", exit_code=0),
        )
    )
    handle = await session.create_execution(MACHINE, ["x"])
    seen = [(e.type, e.status or e.chunk) async for e in handle.events(follow=True)]
    assert seen[0] == ("lifecycle", "queued")
    assert ("stdout", "partial\n") in seen
    assert ("stdout", "done\n") in seen
    assert seen[-1] == ("lifecycle", "succeeded")


async def test_events_resume_from_a_cursor(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """A stream's cursor resumes it later without repeating what was read."""
    fake.set_script(Script.running(1.0, Outcome(stdout="a\n"), retry_after_ms=100))
    handle = await session.create_execution(MACHINE, ["x"])
    first = handle.events()
    got = [e async for e in first]
    assert [e.status for e in got] == ["running"]
    clock.advance(2)
    rest = [e async for e in handle.events(cursor=first.cursor)]
    assert [e.sequence for e in rest] == [got[-1].sequence + 1, got[-1].sequence + 2]


async def test_run_returns_output_and_telemetry(
    session: Session, fake: FakeDedalus, caplog: pytest.LogCaptureFixture
) -> None:
    """run() = create + wait + output; telemetry is on the result and in a DEBUG log line
    that never contains the key."""
    caplog.set_level(logging.DEBUG, logger="dedalus_async")
    result = await session.run(
        MACHINE,
        ["echo", "hello", "world"],
        env={"TOKEN": "s3cr3t"},
    )
    assert result.ok
    assert result.stdout == "hello world\n"
    assert result.exit_code == 0
    assert result.stats.polls == 3
    assert result.stats.detection_lag is not None
    assert 0 <= result.stats.detection_lag < 0.05
    lines = [r.getMessage() for r in caplog.records]
    assert any("polls=3" in line for line in lines)
    for line in lines:
        assert API_KEY not in line
        assert "s3cr3t" not in line


async def test_nonzero_exit_is_a_result_unless_check(session: Session, fake: FakeDedalus) -> None:
    """`false` returns a result with ok=False; check=True raises ExecutionFailed with it."""
    result = await session.run(MACHINE, ["false"])
    assert not result.ok
    assert result.exit_code == 1
    with pytest.raises(ExecutionFailed) as info:
        await session.run(MACHINE, ["false"], check=True)
    assert info.value.result.exit_code == 1
    assert "exit code 1" in str(info.value)


async def test_run_skips_output_when_there_is_none(session: Session, fake: FakeDedalus) -> None:
    """Both sizes reported zero: no /output request."""
    await session.run(MACHINE, ["true"])
    assert fake.requests_for("GET", "/output") == []


async def test_timeout_and_failure_never_look_the_same(session: Session, fake: FakeDedalus) -> None:
    """A timed-out run raises WaitTimeout; a failed one returns (or raises ExecutionFailed)."""
    fake.set_script(Script.stuck())
    with pytest.raises(WaitTimeout):
        await session.run(MACHINE, ["x"], timeout=2, check=True)


# --- cancellation (real time: cancellation is about the event loop) ------------------


# on conftest's live_fake (the real clock): executions stuck in running, hint 50 ms
STUCK = Script.stuck(retry_after_ms=50)


async def test_cancelling_wait_leaves_nothing_behind(live_fake: FakeDedalus) -> None:
    """Cancelling the waiting task stops polling at once; no task is left, no DELETE sent."""
    live_fake.set_script(STUCK)
    before = client_tasks()
    async with Session(API_KEY, base_url=live_fake.base_url) as s:
        handle = await s.create_execution(MACHINE, ["x"])
        task = asyncio.create_task(handle.wait(timeout=60))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        polls = len(live_fake.requests_for("GET"))
        await asyncio.sleep(0.2)
        assert len(live_fake.requests_for("GET")) == polls  # polling really stopped
    assert client_tasks() == before
    assert live_fake.requests_for("DELETE") == []
    assert live_fake.get_record(handle.execution_id).status == "running"


async def test_cancel_remote_sends_a_delete(live_fake: FakeDedalus) -> None:
    """With cancel_remote=True, an asyncio.timeout around run() also stops the remote work."""
    live_fake.set_script(STUCK)
    before = client_tasks()
    async with Session(API_KEY, base_url=live_fake.base_url) as s:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await s.run(MACHINE, ["x"], cancel_remote=True)
    deletes = live_fake.requests_for("DELETE")
    assert len(deletes) == 1
    (record,) = live_fake.executions.values()
    assert live_fake.get_record(record.execution_id).status == "cancelled"
    assert client_tasks() == before


async def test_cancel_remote_on_wait_timeout(session: Session, fake: FakeDedalus) -> None:
    """A run that times out with cancel_remote=True deletes the remote execution too."""
    fake.set_script(Script.stuck())
    with pytest.raises(WaitTimeout):
        await session.run(MACHINE, ["x"], timeout=3, cancel_remote=True)
    assert len(fake.requests_for("DELETE")) == 1


async def test_task_group_failure_cancels_waits(live_fake: FakeDedalus) -> None:
    """A failing sibling in a TaskGroup cancels the wait cleanly."""
    live_fake.set_script(STUCK)
    before = client_tasks()

    async def boom() -> None:
        await asyncio.sleep(0.1)
        raise RuntimeError("sibling failed")

    async with Session(API_KEY, base_url=live_fake.base_url) as s:
        handle = await s.create_execution(MACHINE, ["x"])
        with pytest.raises(ExceptionGroup):
            async with asyncio.TaskGroup() as tg:
                tg.create_task(handle.wait(cancel_remote=True))
                tg.create_task(boom())
    assert len(live_fake.requests_for("DELETE")) == 1
    assert client_tasks() == before


# --- resume after a crash -------------------------------------------------------------


async def test_crash_after_create_sent_resubmits_safely(
    fake: FakeDedalus, clock: FakeClock
) -> None:
    """The process 'dies' after the create reached the server but before the response;
    re-sending with the same idempotency_key returns that execution, not a second one."""
    fake.add_fault(Fault(method="POST", drop_after_commit=True))
    async with Session(
        API_KEY, base_url=fake.base_url, clock=clock, retry=RetryPolicy.none()
    ) as dying:
        with pytest.raises(TransportError):
            await dying.create_execution(MACHINE, ["echo", "x"], idempotency_key="job-7")
    assert fake.create_count == 1
    async with Session(API_KEY, base_url=fake.base_url, clock=clock) as restarted:
        handle = await restarted.create_execution(MACHINE, ["echo", "x"], idempotency_key="job-7")
        await handle.wait()
    assert fake.create_count == 1
    assert list(fake.executions) == [handle.execution_id]


async def test_storm_outlasting_the_deadline_is_a_wait_timeout(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """Errors until past the deadline: WaitTimeout (caused by the last error), on time."""
    fake.set_script(Script.stuck(retry_after_ms=1000))
    handle = await session.create_execution(MACHINE, ["x"])
    fake.add_fault(Fault(method="GET", status=503, times=None))
    with pytest.raises(WaitTimeout) as info:
        await handle.wait(timeout=10)
    assert isinstance(info.value.__cause__, ServerError)
    assert info.value.last is not None  # the create's snapshot
    assert math.fsum(clock.sleeps) <= 10.0 + 1e-9  # (float rounding of sums of sleeps)


async def test_attached_wait_that_never_saw_a_snapshot(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """An attached handle whose every poll failed times out with last=None."""
    fake.add_fault(Fault(method="GET", drop=True, times=None))
    with pytest.raises(WaitTimeout) as info:
        await session.execution(MACHINE, "exe-x").wait(timeout=5)
    assert info.value.last is None
    assert "unseen" in str(info.value)
