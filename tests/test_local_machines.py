"""The local backend's machines: a folder each under the data dir, kept across processes
(rules M1-M4 of ``dedalus_async._store``), driven by a real Session over real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dedalus_async import ConflictError, ExecutionHandle, NotFoundError, Session
from dedalus_async._local import LocalBackend, SubprocessRunner, machine_dirname
from dedalus_async._records import ExecutionRecord, to_millis

# ``local_backend`` is the plugin's; ``local_session`` a Session on it (conftest).


@pytest.fixture
def local_backend_options() -> dict[str, Any]:
    """No emulated wake: a machine is running the moment it is created."""
    return {"wake_delay": 0}


async def _first_stdout(handle: ExecutionHandle) -> str:
    async for event in handle.events(follow=True):
        if event.type == "stdout" and event.chunk:
            return event.chunk
    raise AssertionError("the execution ended without printing")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _real(path: Path) -> str:
    """What ``pwd`` prints for ``path`` (the tmp dir may sit behind a symlink)."""
    return os.path.realpath(path)


async def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


def _backend(data_dir: Path, **options: Any) -> LocalBackend:
    return LocalBackend(data_dir=data_dir, announce=False, **options)


def _sidecar(backend: LocalBackend, machine_id: str) -> dict[str, Any]:
    folder = backend.machine_dir(machine_id)
    document: dict[str, Any] = json.loads(folder.with_name(folder.name + ".json").read_text())
    return document


async def test_a_created_machine_is_a_folder_running_at_once(
    local_backend: LocalBackend, local_session: Session
) -> None:
    """Create answers 200 running; the folder exists before anything runs in it, and the
    commands of the machine run there."""
    handle = await local_session.create_machine(vcpu=2, memory_mib=1024, autosleep="15m")
    assert handle.last is not None
    assert handle.last.phase == "running"
    folder = local_backend.machine_dir(handle.machine_id)
    assert folder.is_dir()
    kept = _sidecar(local_backend, handle.machine_id)
    assert {k: kept[k] for k in ("machine_id", "vcpu", "memory_mib", "autosleep_seconds")} == {
        "machine_id": handle.machine_id,
        "vcpu": 2,
        "memory_mib": 1024,
        "autosleep_seconds": 900,
    }
    assert (kept["desired_state"], kept["origin"]) == ("running", "api")
    result = await local_session.run(handle.machine_id, ["pwd"], timeout=10)
    assert result.stdout.strip() == _real(folder)
    listed = [m async for m in local_session.list_machines()]
    assert [(m.machine_id, m.phase) for m in listed] == [(handle.machine_id, "running")]


async def test_a_created_machine_wakes_once_not_twice(tmp_path: Path) -> None:
    """With a wake delay, the create's phases take it (202, then running); the first
    execution then starts at once: the runner does not wake the machine a second time."""
    async with _backend(tmp_path, wake_delay=0.3) as backend, backend.session() as session:
        handle = await session.create_machine()
        assert handle.last is not None
        assert handle.last.phase == "starting"
        started = asyncio.get_running_loop().time()
        await handle.wait("running", timeout=10)
        assert asyncio.get_running_loop().time() - started >= 0.25
        execution = await session.create_execution(handle.machine_id, ["true"])
        assert execution.last is not None
        assert execution.last.status == "queued"
        assert (await execution.wait(timeout=10)).status == "succeeded"


async def test_sleep_then_an_execution_wakes_it_once(tmp_path: Path) -> None:
    """Sleep is instant; an execution on the sleeping machine waits for one wake (the
    lifecycle's), then runs, and the machine is running again."""
    async with _backend(tmp_path, wake_delay=0.3) as backend, backend.session() as session:
        handle = await session.create_machine(autosleep="never")
        await handle.wait("running", timeout=10)
        asleep = await handle.sleep()
        assert asleep.phase == "sleeping"
        execution = await session.create_execution(handle.machine_id, ["true"])
        assert execution.last is not None
        assert execution.last.status == "wake_in_progress"
        done = await execution.wait(timeout=10)
        assert done.status == "succeeded"
        assert done.started_at is not None
        waited = (done.started_at - done.created_at).total_seconds()
        assert 0.25 <= waited < 0.55  # one wake of 0.3 s, not two
        assert (await handle.refresh()).phase == "running"


async def test_machines_are_kept_across_backends(tmp_path: Path) -> None:
    """A later backend on the same data dir (another process, for the CLI) finds the
    machines as they were left: size, desired state, and those met through executions."""
    async with _backend(tmp_path, wake_delay=0) as backend, backend.session() as session:
        handle = await session.create_machine(vcpu=0.5, storage_gib=3, autosleep="never")
        await handle.sleep()
        await session.run("dm-met-by-an-execution", ["true"], timeout=10)
    async with _backend(tmp_path, wake_delay=0) as backend, backend.session() as session:
        machine = await session.get_machine(handle.machine_id)
        assert (machine.phase, machine.vcpu, machine.storage_gib) == ("sleeping", 0.5, 3)
        assert machine.autosleep_seconds == 0
        listed = {m.machine_id: m.phase async for m in session.list_machines()}
        assert listed == {handle.machine_id: "sleeping", "dm-met-by-an-execution": "running"}
        # an execution wakes it, and that is kept too
        assert (await session.run(handle.machine_id, ["true"], timeout=10)).ok
    async with _backend(tmp_path, wake_delay=0) as backend, backend.session() as session:
        assert (await session.get_machine(handle.machine_id)).phase == "running"
        with pytest.raises(NotFoundError):
            await session.get_machine("dm-never-made")


async def test_delete_stops_its_executions_and_wipes_the_folder(tmp_path: Path) -> None:
    """DELETE cancels what runs on the machine (its process is killed), removes its folder
    and its executions' records; the machine stays destroyed for later backends, and
    nothing runs on it again."""
    async with _backend(tmp_path, wake_delay=0) as backend, backend.session() as session:
        handle = await session.create_machine()
        await session.run(handle.machine_id, ["sh", "-c", "echo kept > file"], timeout=10)
        running = await session.create_execution(
            handle.machine_id, ["sh", "-c", "echo $$; exec sleep 30"]
        )
        pid = int(await _first_stdout(running))
        folder = backend.machine_dir(handle.machine_id)
        records = backend.store.root / folder.name
        assert (folder / "file").exists()
        assert records.is_dir()
        gone = await handle.delete()
        assert gone.phase == "destroyed"
        assert not folder.exists()
        assert not records.exists()
        assert _sidecar(backend, handle.machine_id)["desired_state"] == "destroyed"
        with pytest.raises(NotFoundError):
            await running.refresh()  # a destroyed machine's executions are gone
        assert await _wait_dead(pid)
    async with _backend(tmp_path, wake_delay=0) as backend, backend.session() as session:
        assert (await session.get_machine(handle.machine_id)).phase == "destroyed"
        with pytest.raises(ConflictError, match="destroyed"):
            await session.create_execution(handle.machine_id, ["true"])
        assert not backend.machine_dir(handle.machine_id).exists()


async def test_folders_without_a_description_are_running_machines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder left by an older version is a running machine, listed when its name gives
    its id back; an unreadable description is skipped with a warning."""
    machines = tmp_path / "machines"
    (machines / machine_dirname("dm-old")).mkdir(parents=True)
    (machines / machine_dirname("Not-Reversible_ID")).mkdir()
    broken = machines / (machine_dirname("dm-broken") + ".json")
    broken.write_text("{not json")
    async with _backend(tmp_path) as backend, backend.session() as session:
        with caplog.at_level(logging.WARNING, logger="dedalus_async.local"):
            listed = {m.machine_id: m.phase async for m in session.list_machines()}
        assert listed == {"dm-old": "running"}
        assert any("unreadable machine" in r.getMessage() for r in caplog.records)
        # found by its own id all the same
        assert (await session.get_machine("Not-Reversible_ID")).phase == "running"


async def test_the_runner_starts_an_execution_held_for_a_wake_without_its_own(
    tmp_path: Path,
) -> None:
    """``record.ready`` (the server held the execution until its machine woke): the runner
    queues it at once, even on a machine its own model thinks is waking."""
    runner = SubprocessRunner(tmp_path / "machines", wake_delay=5)
    now = datetime.now(UTC)

    def record(execution_id: str) -> ExecutionRecord:
        return ExecutionRecord(
            execution_id=execution_id,
            machine_id="dm-held",
            command=("true",),
            created_at=to_millis(now),
            created_mono=runner.clock.monotonic(),
        )

    held = record("exe-0000000000000001")
    held.ready = (runner.clock.monotonic(), to_millis(now))
    fresh = record("exe-0000000000000002")
    try:
        runner.start(fresh)  # its own model: a machine never seen here is asleep
        assert fresh.status == "wake_in_progress"
        runner.start(held)  # not held up by that wake either
        assert held.status == "queued"
    finally:
        await runner.aclose()
