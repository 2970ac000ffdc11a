"""The wait loop on its own: looks, stats, the deadline, remote cancel, the pause seam.

A :class:`WaitLoop` over its own :class:`Requester` (the real aiohttp transport, FakeDedalus
on loopback, a FakeClock), waiting for a minimal watched object of the test's own, which
is all the loop asks of a handle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest

from dedalus_async import (
    Execution,
    ExecutionRef,
    PollPolicy,
    RetryPolicy,
    Session,
    Throttle,
    WaitStats,
    WaitTimeout,
)
from dedalus_async._policy import Sleep
from dedalus_async._requester import Requester
from dedalus_async._transport import AiohttpTransport
from dedalus_async._waiting import WaitLoop, is_terminal
from dedalus_async.testing import FakeClock, FakeDedalus, Phase, Script

from .conftest import API_KEY

MACHINE = "dm-3b9d6f10-2c47-4e8a-9f15-7a0c4e2d8b63"  # the real form: "dm-" and a UUID
POLICY = PollPolicy(hint_jitter=0.0)


@attrs.define
class Watched:
    machine_id: str
    execution_id: str
    last: Execution | None = None
    stats: WaitStats | None = None

    @property
    def ref(self) -> ExecutionRef:
        return ExecutionRef(machine_id=self.machine_id, execution_id=self.execution_id)


@pytest.fixture
async def parts(fake: FakeDedalus, clock: FakeClock) -> AsyncIterator[tuple[WaitLoop, Session]]:
    """A wait loop of its own, and a Session on the same server for creates and deletes."""
    transport = AiohttpTransport(
        fake.base_url, {"x-api-key": API_KEY}, request_timeout=5.0, max_connections=4
    )
    requester = Requester(
        transport,
        clock=clock,
        random=lambda: 0.5,
        throttle=Throttle(None, clock=clock, random=lambda: 0.5),
        retry=RetryPolicy(),
        request_timeout=5.0,
    )
    async with Session(API_KEY, base_url=fake.base_url, clock=clock) as session:
        loop = WaitLoop(requester, poll=POLICY, new_key=session.new_idempotency_key)
        await requester.open()
        try:
            yield loop, session
        finally:
            await requester.aclose()


async def _watched(session: Session) -> Watched:
    handle = await session.create_execution(MACHINE, ["true"])
    return Watched(MACHINE, handle.execution_id)


async def test_a_wait_polls_each_hint_and_keeps_stats(
    parts: tuple[WaitLoop, Session], fake: FakeDedalus, clock: FakeClock
) -> None:
    loop, session = parts
    fake.set_script(Script((Phase("queued", 1.0, 1000), Phase("running", 2.0, 2000))))
    watched = await _watched(session)
    start = clock.monotonic()
    done = await loop.wait(
        watched,
        timeout=60.0,
        deadline=loop.deadline(60.0),
        done_when=is_terminal,
        cancel_remote=False,
        policy=POLICY,
    )
    assert done.status == "succeeded"
    assert watched.last is done
    assert watched.stats is not None
    assert watched.stats.polls == 3  # the snapshot in hand was None: three GETs
    assert watched.stats.slept == pytest.approx(sum(clock.sleeps))
    assert watched.stats.elapsed == pytest.approx(clock.monotonic() - start)
    assert len(fake.requests_for("GET")) == 3


async def test_the_deadline_raises_wait_timeout_and_cancel_remote_deletes(
    parts: tuple[WaitLoop, Session], fake: FakeDedalus
) -> None:
    loop, session = parts
    fake.set_script(Script.running(1000.0))
    watched = await _watched(session)
    with pytest.raises(WaitTimeout, match="still 'running' after 5 s") as caught:
        await loop.wait(
            watched,
            timeout=5.0,
            deadline=loop.deadline(5.0),
            done_when=is_terminal,
            cancel_remote=True,
            policy=POLICY,
        )
    assert caught.value.ref == watched.ref
    deletes = fake.requests_for("DELETE")
    assert len(deletes) == 1
    assert watched.last is not None
    assert watched.last.status == "cancelled"  # what the DELETE answered
    assert watched.stats is not None
    assert watched.stats.detection_lag is None


async def test_cancel_remote_leaves_a_finished_execution_alone(
    parts: tuple[WaitLoop, Session], fake: FakeDedalus
) -> None:
    loop, session = parts
    fake.set_script(Script.immediate())
    watched = await _watched(session)
    watched.last = await session.get_execution(MACHINE, watched.execution_id)
    assert watched.last.is_terminal
    await loop.cancel_remote(watched)
    assert fake.requests_for("DELETE") == []


async def test_the_looks_of_one_loop_land_on_its_poll_grid(
    parts: tuple[WaitLoop, Session], fake: FakeDedalus, clock: FakeClock
) -> None:
    """P3 on a grid: every look the loop sleeps for goes out on the loop's grid (moments
    hint_jitter apart, placed by its phase), never before the hint and less than a step
    after it; waits started at different moments share the grid. A pause (fan-out) gets
    the uniform jitter instead."""
    loop, session = parts
    policy = PollPolicy(hint_jitter=0.005)
    assert loop.grid_phase == 0.5  # random=0.5: the grid is 2.5 ms past each 5 ms
    hints = (0.123, 0.0671, 0.2999)
    fake.set_script(
        Script(tuple(Phase("running", h, round(h * 1000)) for h in hints))  # 123, 67, 300 ms
    )
    for head_start in (0.0, 0.0011, 0.0173):
        clock.advance(head_start)
        watched = await _watched(session)
        sleeps_before = len(clock.sleeps)
        wake = clock.monotonic()
        await loop.wait(
            watched,
            timeout=None,
            deadline=None,
            done_when=is_terminal,
            cancel_remote=False,
            policy=policy,
        )
        sleeps = clock.sleeps[sleeps_before:]
        assert len(sleeps) == 3
        for slept, hint in zip(sleeps, (0.123, 0.067, 0.3), strict=True):
            wake += slept
            assert hint <= slept < hint + 0.005
            steps = (wake - 0.0025) / 0.005
            assert steps == pytest.approx(round(steps), abs=1e-6)

    decisions: list[Sleep] = []

    async def pause(decision: Sleep) -> Execution | None:
        decisions.append(decision)
        await clock.sleep(decision.seconds)
        return None

    clock.advance(0.0011)
    watched = await _watched(session)
    await loop.wait(
        watched,
        timeout=None,
        deadline=None,
        done_when=is_terminal,
        cancel_remote=False,
        policy=policy,
        pause=pause,
    )
    # random=0.5: half the jitter on top of each hint, wherever the grid is
    assert [d.seconds for d in decisions] == pytest.approx([0.1255, 0.0695, 0.3025])


async def test_a_pause_that_brings_a_snapshot_saves_the_get(
    parts: tuple[WaitLoop, Session], fake: FakeDedalus
) -> None:
    """The fan-out seam: a snapshot handed over by ``pause`` counts as a look and costs no
    GET of the loop's own; ``None`` makes the loop GET as usual."""
    loop, session = parts
    fake.set_script(
        Script(
            (Phase("queued", 1.0, 1000), Phase("running", 1.0, 1000), Phase("running", 1.0, 1000))
        )
    )
    watched = await _watched(session)
    watched.last = await session.get_execution(MACHINE, watched.execution_id)
    gets_before = len(fake.requests_for("GET"))
    decisions: list[Sleep] = []
    handed_over = 0

    async def pause(decision: Sleep) -> Execution | None:
        nonlocal handed_over
        decisions.append(decision)
        await loop.requester.clock.sleep(decision.seconds)
        if len(decisions) == 1:
            return None  # the loop GETs for itself
        handed_over += 1
        return await session.get_execution(MACHINE, watched.execution_id)  # "a page"

    done = await loop.wait(
        watched,
        timeout=None,
        deadline=None,
        done_when=is_terminal,
        cancel_remote=False,
        policy=POLICY,
        pause=pause,
    )
    assert done.status == "succeeded"
    assert [d.seconds for d in decisions] == pytest.approx([1.0, 1.0, 1.0])
    assert handed_over == 2
    assert len(fake.requests_for("GET")) - gets_before == 3  # one of the loop's, two "pages"
    assert watched.stats is not None
    assert watched.stats.polls == 3  # every look counts, whoever paid for it
    assert watched.stats.slept == pytest.approx(3.0)


async def test_polls_retry_until_the_deadline_with_one_policy_per_retry_policy(
    parts: tuple[WaitLoop, Session],
) -> None:
    loop, _ = parts
    first = loop.poll_retry()
    assert first is loop.poll_retry()  # built once, not once per wait
    assert first.max_attempts > 1_000_000  # only the deadline bounds a wait's retries
    loop.requester.retry = RetryPolicy(max_attempts=2)
    second = loop.poll_retry()
    assert second is not first
    assert second.initial_backoff == loop.requester.retry.initial_backoff
