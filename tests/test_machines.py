"""Machines end to end: our Session against FakeDedalus on 127.0.0.1, on a fake clock.

The fake's default timings (``MachineTimings()``): placement 0.5 s, start 1.5 s, wake 2 s,
stop 1 s, destroy 1 s.
"""

from __future__ import annotations

import json

import aiohttp
import pytest

from dedalus_async import (
    ConflictError,
    ExecutionRequest,
    IdempotencyKeyReusedError,
    MachineFailed,
    MachineHandle,
    MachineStateError,
    MachineWaitTimeout,
    NotFoundError,
    Session,
)
from dedalus_async.testing import FakeClock, FakeDedalus, Fault, MachineTimings, Phase, Script

from .conftest import API_KEY

INSTANT = MachineTimings(placement=0, start=0, wake=0, stop=0, destroy=0)


async def test_create_then_wait_until_running_then_run(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """The issue's "done when": create, wait for running, run a command on it."""
    handle = await session.create_machine(vcpu=1, memory_mib=2048, storage_gib=10)
    assert isinstance(handle, MachineHandle)
    assert handle.last is not None
    assert handle.last.phase == "placement_pending"  # answered 202, still on its way
    before = clock.monotonic()
    machine = await handle.wait(until="running", timeout=60)
    assert machine.phase == "running"
    assert machine.status is not None
    assert machine.status.reason == "converged"
    # running 2.0 s after the create (placement 0.5 + start 1.5); found on the first look
    # at or after that moment, and the waits never overshoot by more than one backoff
    assert 2.0 <= clock.monotonic() - before < 2.0 + 1.0
    assert handle.stats is not None
    assert handle.stats.polls >= 2
    result = await session.run(machine.machine_id, ["echo", "hi"], timeout=60)
    assert result.ok
    create = fake.requests_for("POST", "/v1/machines")[0]
    assert create.json == {"memory_mib": 2048, "storage_gib": 10, "vcpu": 1}
    assert create.idempotency_key


async def test_a_machine_that_converges_inline_is_running_at_once(
    session: Session, fake: FakeDedalus
) -> None:
    fake.machine_timings = INSTANT
    handle = await session.create_machine()
    assert handle.last is not None
    assert handle.last.phase == "running"
    assert handle.last.revision is not None  # from the answer's ETag
    fake.reset_stats()
    await handle.wait()
    assert len(fake.requests) == 1  # one look: already there


async def test_the_create_answers_202_then_200_once_converged(fake: FakeDedalus) -> None:
    async with aiohttp.ClientSession(headers={"x-api-key": API_KEY}) as http:
        async with http.post(
            fake.base_url + "/v1/machines", json={}, headers={"Idempotency-Key": "k1"}
        ) as pending:
            assert pending.status == 202
            assert pending.headers["ETag"]
        fake.machine_timings = INSTANT
        async with http.post(
            fake.base_url + "/v1/machines", json={}, headers={"Idempotency-Key": "k2"}
        ) as converged:
            assert converged.status == 200
            assert (await converged.json())["phase"] == "running"


async def test_a_create_retried_after_a_lost_answer_makes_one_machine(
    session: Session, fake: FakeDedalus
) -> None:
    fake.add_fault(Fault(method="POST", path="^/v1/machines$", drop_after_commit=True))
    handle = await session.create_machine(autosleep="never")
    creates = fake.requests_for("POST", "/v1/machines")
    assert len(creates) == 2
    assert creates[0].idempotency_key == creates[1].idempotency_key
    assert list(fake.machines) == [handle.machine_id]
    assert fake.machines[handle.machine_id].autosleep_seconds == 0


async def test_a_reused_key_with_another_body_is_refused(session: Session) -> None:
    first = await session.create_machine(vcpu=1, idempotency_key="mine-1")
    again = await session.create_machine(vcpu=1, idempotency_key="mine-1")
    assert again.machine_id == first.machine_id
    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await session.create_machine(vcpu=2, idempotency_key="mine-1")
    assert caught.value.idempotency_key == "mine-1"


async def test_bad_sizes_fail_before_any_request(session: Session, fake: FakeDedalus) -> None:
    with pytest.raises(ValueError, match="vcpu must be a positive"):
        await session.create_machine(vcpu=0)
    with pytest.raises(ValueError, match="autosleep '5 min' is not a duration"):
        await session.create_machine(autosleep="5 min")
    with pytest.raises(TypeError, match="memory_mib must be a whole number"):
        await session.update_machine("dm-1", memory_mib=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="until must be 'running', 'sleeping' or 'destroyed'"):
        await session.machine("dm-1").wait("starting")
    assert fake.requests == []


async def test_sleep_then_wake_on_the_fakes_clock(session: Session, clock: FakeClock) -> None:
    handle = await session.create_machine()
    await handle.wait("running")
    slept = await handle.sleep()
    assert (slept.phase, slept.desired_state) == ("stopping", "sleeping")
    start = clock.monotonic()
    assert (await handle.wait("sleeping")).phase == "sleeping"
    assert 1.0 <= clock.monotonic() - start < 2.0
    woke = await handle.wake()
    assert (woke.phase, woke.desired_state) == ("starting", "running")
    start = clock.monotonic()
    machine = await handle.wait("running")
    assert 2.0 <= clock.monotonic() - start < 3.5
    assert machine.status is not None
    assert machine.status.phase == "running"


async def test_a_machine_that_fails_mid_wake_ends_the_wait_at_once(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """The issue's second "done when": not at the deadline, when the failure happens."""
    fake.machine_timings = MachineTimings(placement=0, start=0, wake=5, stop=0, destroy=0)
    handle = await session.create_machine()
    await handle.sleep()
    await handle.wait("sleeping")
    fake.fail_machine(handle.machine_id, "host lost during wake", when="wake")
    await handle.wake()
    start = clock.monotonic()
    with pytest.raises(MachineFailed, match="host lost during wake") as caught:
        await handle.wait("running", timeout=600)
    assert 5.0 <= clock.monotonic() - start < 7.0  # at the failure, far from the deadline
    assert caught.value.machine.phase == "failed"
    assert caught.value.until == "running"
    assert handle.last is caught.value.machine
    with pytest.raises(ConflictError) as conflict:
        await session.run(handle.machine_id, ["true"])
    assert conflict.value.error_code == "INVALID_STATE"
    with pytest.raises(ConflictError):
        await handle.wake()


async def test_a_destroyed_machine_can_no_longer_be_running(
    session: Session, clock: FakeClock
) -> None:
    handle = await session.create_machine()
    deleted = await handle.delete()
    assert deleted.desired_state == "destroyed"
    with pytest.raises(MachineStateError, match="will never be 'running'") as caught:
        await handle.wait("running")
    assert not isinstance(caught.value, MachineFailed)
    assert (await handle.wait("destroyed")).phase == "destroyed"
    with pytest.raises(ConflictError, match="INVALID_STATE"):
        await session.run(handle.machine_id, ["true"])


async def test_the_deadline_is_honest_and_says_where_the_machine_stood(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    fake.machine_timings = MachineTimings(placement=0, start=30)
    handle = await session.create_machine()
    start = clock.monotonic()
    with pytest.raises(MachineWaitTimeout) as caught:
        await handle.wait("running", timeout=3)
    assert clock.monotonic() - start == pytest.approx(3.0)  # neither early nor late
    error = caught.value
    assert error.last is not None
    assert error.last.phase == "starting"
    assert "still 'starting' (desired state 'running') after 3 s" in str(error)
    assert (error.machine_id, error.until, error.timeout) == (handle.machine_id, "running", 3)


async def test_polls_retry_a_server_blip_within_the_deadline(
    session: Session, fake: FakeDedalus
) -> None:
    handle = await session.create_machine()
    fake.add_fault(Fault(method="GET", path="/v1/machines/", status=503, times=3))
    assert (await handle.wait("running")).phase == "running"
    assert handle.stats is not None
    assert handle.stats.retries == 3


async def test_an_execution_on_a_sleeping_machine_wakes_it(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    fake.set_script(Script((Phase("queued", 0.5), Phase("running", 1.0))))
    handle = await session.create_machine()
    await handle.wait("running")
    await handle.sleep()
    await handle.wait("sleeping")
    execution = await session.create_execution(handle.machine_id, ["echo", "hi"])
    assert execution.last is not None
    assert execution.last.status == "wake_in_progress"
    assert execution.last.retry_after_ms == 2000  # the wake's 2 s
    finished = await execution.wait(timeout=60)
    assert finished.status == "succeeded"
    woke = fake.get_machine_record(handle.machine_id)
    assert woke.phase == "running"
    assert woke.running_since is not None
    # the script started when the machine was running, not at the create
    assert finished.started_at == woke.at(woke.running_since + 0.5)
    statuses = [e.status async for e in execution.events() if e.type == "lifecycle"]
    assert statuses == ["wake_in_progress", "queued", "running", "succeeded"]


async def test_an_execution_waiting_on_a_failed_wake_fails(
    session: Session, fake: FakeDedalus
) -> None:
    handle = await session.create_machine()
    await handle.wait("running")
    await handle.sleep()
    await handle.wait("sleeping")
    fake.fail_machine(handle.machine_id, "no capacity", when="wake")
    result = await session.run(handle.machine_id, ["true"], timeout=60)
    assert result.execution.status == "failed"
    assert result.execution.error_code == "MACHINE_FAILED"
    assert "no capacity" in (result.execution.error_message or "")


async def test_an_idle_machine_falls_asleep_after_its_autosleep(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    fake.set_script(Script.immediate())
    handle = await session.create_machine(autosleep="30s")
    await handle.wait("running")
    await session.run(handle.machine_id, ["true"])
    clock.advance(29)
    assert (await handle.refresh()).phase == "running"
    clock.advance(2)  # 30 s idle, then 1 s of stopping
    machine = await handle.refresh()
    assert (machine.phase, machine.desired_state) == ("sleeping", "sleeping")
    assert machine.status is not None
    assert machine.status.reason == "converged"
    assert (await session.ensure_running(handle.machine_id)).phase == "running"


async def test_a_machine_never_seen_still_runs_executions(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """Executions as they always were: the machine is made on the spot, never asleep."""
    machine_id = "dm-0199a8f2-6c1e-7d3a-9b42-5e8f1a2b3c4d"
    with pytest.raises(NotFoundError):
        await session.get_machine(machine_id)
    assert (await session.run(machine_id, ["true"], timeout=60)).ok
    clock.advance(86400)
    machine = await session.get_machine(machine_id)
    assert (machine.phase, machine.autosleep_seconds) == ("running", 0)


async def test_ensure_running_wakes_only_what_sleeps(session: Session, fake: FakeDedalus) -> None:
    fake.machine_timings = INSTANT
    awake = fake.add_machine(running=True)
    fake.reset_stats()
    assert (await session.ensure_running(awake.machine_id)).phase == "running"
    assert [r.method for r in fake.requests] == ["GET"]
    asleep = fake.add_machine(running=True)
    asleep.want("sleeping", fake.clock.monotonic())
    fake.reset_stats()
    assert (await session.ensure_running(asleep.machine_id)).phase == "running"
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in fake.requests] == [
        ("GET", asleep.machine_id),
        ("POST", "wake"),
        ("GET", asleep.machine_id),
    ]


async def test_watch_yields_each_phase_until_the_desired_state(session: Session) -> None:
    handle = await session.create_machine()
    phases = [m.phase async for m in handle.watch(timeout=60)]
    assert phases == ["placement_pending", "starting", "running"]


async def test_list_machines_follows_every_page(session: Session, fake: FakeDedalus) -> None:
    made = [fake.add_machine().machine_id for _ in range(5)]
    fake.reset_stats()
    listed = [m async for m in session.list_machines(limit=2)]
    assert [m.machine_id for m in listed] == made
    assert all(m.created_at is not None for m in listed)
    assert len(fake.requests) == 3


async def test_update_changes_only_what_is_given(session: Session, fake: FakeDedalus) -> None:
    handle = await session.create_machine(memory_mib=1024)
    updated = await session.update_machine(handle.machine_id, autosleep="2h", vcpu=2)
    assert (updated.autosleep_seconds, updated.vcpu, updated.memory_mib) == (7200, 2.0, 1024)
    patch = fake.requests_for("PATCH")[0]
    assert patch.json == {"autosleep": "2h", "vcpu": 2}
    assert patch.idempotency_key


# --- the status stream (server-sent events) ----------------------------------------------


async def _read_events(
    http: aiohttp.ClientSession, url: str, last: str | None = None
) -> list[tuple[str, dict[str, object]]]:
    headers = {"Last-Event-ID": last} if last else {}
    events: list[tuple[str, dict[str, object]]] = []
    async with http.get(url, headers=headers) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        event_id = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                events.append((event_id, json.loads(line[6:])))
    return events


async def test_the_status_stream_follows_the_machine_until_it_settles(
    fake: FakeDedalus, clock: FakeClock
) -> None:
    machine = fake.add_machine()
    url = f"{fake.base_url}/v1/machines/{machine.machine_id}/status/stream"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        events = await _read_events(http, url)
        assert [e[1]["phase"] for e in events] == ["placement_pending", "starting", "running"]
        assert [e[0] for e in events] == [str(e[1]["revision"]) for e in events]
        # the server's own clock moved, exactly to the transitions
        assert clock.monotonic() - machine.created_mono == pytest.approx(2.0)
        # resume after the first event: the rest again; on a settled machine, it closes
        again = await _read_events(http, url, last=events[0][0])
        assert [e[1]["phase"] for e in again] == ["starting", "running"]
        current = await _read_events(http, url)
        assert [e[1]["phase"] for e in current] == ["running"]
        async with http.get(f"{fake.base_url}/v1/machines/nope/status/stream") as missing:
            assert missing.status == 404


# --- fan-out ------------------------------------------------------------------------------


async def test_run_many_wakes_each_machine_once_before_its_executions(
    session: Session, fake: FakeDedalus
) -> None:
    fake.set_script(Script.immediate())
    asleep = [fake.add_machine(running=True) for _ in range(2)]
    for machine in asleep:
        machine.want("sleeping", fake.clock.monotonic())
    fake.reset_stats()
    requests = [
        ExecutionRequest(machine_id=machine.machine_id, command=["echo", str(i)])
        for i in range(3)
        for machine in asleep
    ]
    results = await session.run_many(requests, wake_machines=True)
    assert all(result.ok for result in results)
    wakes = fake.requests_for("POST", "/wake")
    assert sorted(r.path for r in wakes) == sorted(
        f"/v1/machines/{m.machine_id}/wake" for m in asleep
    )
    first_create = fake.requests.index(fake.requests_for("POST", "/executions")[0])
    assert all(fake.requests.index(wake) < first_create for wake in wakes)
    # created on running machines: none of them had to wait for a wake
    for result in results:
        statuses = [
            e.status
            async for e in session.iter_events(
                result.execution.machine_id, result.execution.execution_id
            )
        ]
        assert "wake_in_progress" not in statuses


async def test_run_many_creates_nothing_when_a_machine_cannot_wake(
    session: Session, fake: FakeDedalus
) -> None:
    broken = fake.add_machine(running=True)
    fake.fail_machine(broken.machine_id, "disk gone")
    with pytest.raises(ExceptionGroup) as caught:
        await session.run_many(
            [ExecutionRequest(machine_id=broken.machine_id, command=["true"])], wake_machines=True
        )
    assert caught.group_contains(MachineFailed, match="disk gone")
    assert fake.requests_for("POST", "/executions") == []
