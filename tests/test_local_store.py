"""The local backend's records on disk (dedalus_async._store, rules S1-S7): what one backend
ran, another on the same data directory sees, at the same time or later.

Two LocalBackends in one process hold separate owner locks (flock locks belong to an open
file, not to a process), so they stand for two processes here; tests/test_cli.py runs the
same with real CLI processes, a SIGKILLed one included.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dedalus_async import Execution, NotFoundError, Session
from dedalus_async._local import LocalBackend, machine_dirname
from dedalus_async._records import ExecutionRecord
from dedalus_async._store import INTERRUPTED_CODE, SAVE_EVERY, ExecutionStore

MACHINE = "dm-0f4e9a52-7c3b-5d1e-8a6f-2b9c4d7e1a30"


def _backend(data_dir: Path, **options: object) -> LocalBackend:
    return LocalBackend(data_dir=data_dir, announce=False, wake_delay=0, **options)  # type: ignore[arg-type]


async def _listed(session: Session, machine: str = MACHINE) -> list[Execution]:
    return [e async for e in session.list_executions(machine)]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not within the time")
        await asyncio.sleep(0.02)


async def test_a_later_backend_answers_for_what_an_earlier_one_ran(tmp_path: Path) -> None:
    """get, output, events and list after a restart show what was served before it."""
    async with _backend(tmp_path) as first, first.session() as session:
        result = await session.run(MACHINE, ["sh", "-c", "echo out; echo err >&2; exit 4"])
        execution_id = result.execution.execution_id
        before = (
            await session.get_execution(MACHINE, execution_id),
            await session.get_output(MACHINE, execution_id),
            [e async for e in session.iter_events(MACHINE, execution_id)],
        )
    async with _backend(tmp_path) as later, later.session() as session:
        after = (
            await session.get_execution(MACHINE, execution_id),
            await session.get_output(MACHINE, execution_id),
            [e async for e in session.iter_events(MACHINE, execution_id)],
        )
        assert after == before
        assert after[0].exit_code == 4
        assert (after[1].stdout, after[1].stderr) == ("out\n", "err\n")
        assert await _listed(session) == [before[0]]


async def test_two_backends_at_once_see_each_other_and_list_oldest_first(
    tmp_path: Path,
) -> None:
    """Output of a running execution reaches the other backend; lists merge both."""
    async with (
        _backend(tmp_path) as one,
        _backend(tmp_path) as two,
        one.session() as s1,
        two.session() as s2,
    ):
        first = await s1.run(MACHINE, ["echo", "one"])
        handle = await s2.create_execution(MACHINE, ["sh", "-c", "echo live; sleep 30"])
        await _until(lambda: handle.last is not None)

        async def output_reached_the_other() -> None:
            while True:  # polling another process's record is the point
                if (await s1.get_output(MACHINE, handle.execution_id)).stdout == "live\n":
                    return
                await asyncio.sleep(0.05)

        await asyncio.wait_for(output_reached_the_other(), SAVE_EVERY + 5)
        seen = await s1.get_execution(MACHINE, handle.execution_id)
        assert (seen.status, seen.stdout_bytes) == ("running", 5)
        third = await s1.run(MACHINE, ["true"])
        ids = [first.execution.execution_id, handle.execution_id, third.execution.execution_id]
        assert [e.execution_id for e in await _listed(s1)] == ids
        assert [e.execution_id for e in await _listed(s2)] == ids
        await handle.cancel()


async def test_a_delete_from_another_backend_stops_the_command(tmp_path: Path) -> None:
    """S5: the owner kills its command and records `cancelled` for the other's DELETE."""
    async with (
        _backend(tmp_path) as owner,
        _backend(tmp_path) as other,
        owner.session() as s_owner,
        other.session() as s_other,
    ):
        handle = await s_owner.create_execution(MACHINE, ["sh", "-c", "echo $$; sleep 30"])
        pid = 0
        async for event in handle.events(follow=True):
            if event.type == "stdout" and event.chunk:
                pid = int(event.chunk)
                break
        answer = await s_other.execution(MACHINE, handle.execution_id).cancel()
        assert answer.status == "cancelled"
        final = await asyncio.wait_for(handle.wait(timeout=None), 5)
        assert (final.status, final.signal) == ("cancelled", signal.SIGKILL)
        await _until(lambda: not _alive(pid))
        # and the other backend reads what the owner recorded
        await _until(lambda: handle.last is not None and handle.last.is_terminal)
        seen = await s_other.get_execution(MACHINE, handle.execution_id)
        assert (seen.status, seen.signal) == ("cancelled", signal.SIGKILL)


async def test_deleting_a_finished_record_removes_it_for_everyone(tmp_path: Path) -> None:
    async with _backend(tmp_path) as one, one.session() as session:
        done = await session.run(MACHINE, ["true"])
    execution_id = done.execution.execution_id
    async with _backend(tmp_path) as two, two.session() as session:
        deleted = await session.delete_execution(MACHINE, execution_id)
        assert deleted.status == "succeeded"
        with pytest.raises(NotFoundError):
            await session.get_execution(MACHINE, execution_id)
    async with _backend(tmp_path) as three, three.session() as session:
        with pytest.raises(NotFoundError):
            await session.get_execution(MACHINE, execution_id)
        assert await _listed(session) == []


def _orphan(execution_id: str) -> subprocess.Popen[bytes]:
    """A command left behind by a dead owner: its own process group, its execution's id."""
    return subprocess.Popen(
        ["sleep", "30"],
        env={**os.environ, "DEDALUS_EXECUTION_ID": execution_id},
        start_new_session=True,
    )


def _crashed_owner_record(data_dir: Path, execution_id: str, command_pid: int) -> None:
    """What an owner killed mid-run leaves: a `running` record and a free owner lock."""
    store = ExecutionStore(data_dir, dirname=machine_dirname, output_cap=1000)
    store.open()
    record = ExecutionRecord(
        execution_id=execution_id,
        machine_id=MACHINE,
        command=("sleep", "30"),
        created_at=datetime.now(UTC),
        created_mono=0.0,
    )
    record.transition("running", record.created_at)
    store.claim(record)
    store.save(record, pid=command_pid)
    # it died in the middle of appending its next events
    with (store.root / machine_dirname(MACHINE) / f"{execution_id}.events").open("ab") as file:
        file.write(b'{"at":"2026-01-01T00:00:00.000Z","sequence":2,"type":"stdout","chunk":"')
        file.write(b"x" * 2000)
    # the lock goes as it does when the process dies: the kernel drops it
    assert store._lock_fd is not None
    os.close(store._lock_fd)


async def test_an_execution_whose_owner_died_reads_failed_and_its_command_is_killed(
    tmp_path: Path,
) -> None:
    """S4: not `running` forever; the orphaned command goes, a reused pid is spared."""
    execution_id = "exe-00000000000000aa"
    with _orphan(execution_id) as orphan, _orphan("exe-someone-else") as stranger:
        try:
            _crashed_owner_record(tmp_path, execution_id, orphan.pid)
            _crashed_owner_record(tmp_path, "exe-00000000000000bb", stranger.pid)
            async with _backend(tmp_path) as later, later.session() as session:
                execution = await session.get_execution(MACHINE, execution_id)
                assert (execution.status, execution.error_code) == ("failed", INTERRUPTED_CODE)
                assert execution.error_message is not None
                assert f"process group {orphan.pid}) was killed" in execution.error_message
                assert orphan.wait(timeout=5) == -signal.SIGKILL
                events = [e async for e in session.iter_events(MACHINE, execution_id)]
                assert [(e.sequence, e.status) for e in events] == [
                    (1, "running"),
                    (2, "failed"),
                ]
                other = await session.get_execution(MACHINE, "exe-00000000000000bb")
                assert other.status == "failed"
                assert "may still be running" in (other.error_message or "")
                assert stranger.poll() is None  # not the command it names: left alone
            # written back: a reader without the lock check agrees (and nothing is killed)
            path = tmp_path / "executions" / machine_dirname(MACHINE) / f"{execution_id}.json"
            stored = json.loads(path.read_text())
            assert (stored["status"], stored["error_code"]) == ("failed", INTERRUPTED_CODE)
            # the torn append is gone, not left behind the end
            assert path.with_suffix(".events").stat().st_size == stored["events_bytes"]
        finally:
            stranger.kill()
            orphan.kill()


async def test_a_live_owner_is_not_taken_for_a_dead_one(tmp_path: Path) -> None:
    async with (
        _backend(tmp_path) as owner,
        _backend(tmp_path) as other,
        owner.session() as s1,
        other.session() as s2,
    ):
        handle = await s1.create_execution(MACHINE, ["sleep", "30"])
        for _ in range(3):
            assert (await s2.get_execution(MACHINE, handle.execution_id)).status in (
                "queued",
                "running",
            )
        await handle.cancel()


async def test_the_output_cap_it_ran_under_travels_with_the_record(tmp_path: Path) -> None:
    async with _backend(tmp_path, output_cap=10) as small, small.session() as session:
        result = await session.run(MACHINE, ["sh", "-c", "printf 0123456789abcdef"])
    execution_id = result.execution.execution_id
    async with _backend(tmp_path) as default, default.session() as session:
        execution = await session.get_execution(MACHINE, execution_id)
        output = await session.get_output(MACHINE, execution_id)
    assert (execution.stdout_bytes, execution.stdout_truncated) == (16, True)
    assert (output.stdout, output.stdout_truncated) == ("0123456789", True)


async def test_stdin_and_env_values_never_reach_the_disk(tmp_path: Path) -> None:
    """S6: only the env names are kept; the later backend shows them as env_keys."""
    async with _backend(tmp_path) as one, one.session() as session:
        result = await session.run(
            MACHINE,
            ["sh", "-c", "cat >/dev/null; echo done"],
            env={"TOKEN": "env-secret-4711"},
            stdin="stdin-secret-0815",
        )
    stored = b"".join(p.read_bytes() for p in (tmp_path / "executions").rglob("*") if p.is_file())
    assert b"env-secret-4711" not in stored
    assert b"stdin-secret-0815" not in stored
    assert b"done" in stored
    async with _backend(tmp_path) as two, two.session() as session:
        execution = await session.get_execution(MACHINE, result.execution.execution_id)
    assert list(execution.env_keys or ()) == ["TOKEN"]


def test_ids_it_cannot_have_made_are_never_looked_up(tmp_path: Path) -> None:
    """S7: an id with a path in it names no file, even one that holds a valid record."""
    store = ExecutionStore(tmp_path, dirname=machine_dirname, output_cap=1000)
    store.open()
    try:
        record = ExecutionRecord(
            execution_id="exe-00000000000000cc",
            machine_id=MACHINE,
            command=("true",),
            created_at=datetime.now(UTC),
            created_mono=0.0,
        )
        record.finish("succeeded", record.created_at, exit_code=0)
        store.save(record)
        saved = store.root / machine_dirname(MACHINE) / "exe-00000000000000cc.json"
        (store.root / "evil.json").write_bytes(saved.read_bytes())
        assert store.find(MACHINE, "exe-00000000000000cc") is not None
        assert store.find(MACHINE, "../evil") is None
        # an unreadable record is skipped, not an error
        saved.write_text("{not json")
        assert store.find(MACHINE, "exe-00000000000000cc") is None
        assert store.machine_records(MACHINE) == []
    finally:
        store.close()


async def test_a_reader_never_sees_a_torn_record(tmp_path: Path) -> None:
    """S2: another process reading while the owner rewrites a large record reads whole JSON."""
    reads: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    directory = tmp_path / "executions" / machine_dirname(MACHINE)

    def reader() -> None:
        # another process's view: a store of its own, reading the record and its events
        store = ExecutionStore(tmp_path, dirname=machine_dirname, output_cap=1 << 20)
        while not stop.is_set():
            for path in directory.glob("exe-*.json") if directory.exists() else ():
                # find() checks the events it read against the count its record says
                record = store.find(MACHINE, path.stem)
                if record is None:
                    errors.append(AssertionError(f"{path.stem} was unreadable"))
                else:
                    reads.append(len(record.events))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        code = (
            "import sys, time\n"
            "for i in range(30):\n"
            "    sys.stdout.write('x' * 20000 + '\\n'); sys.stdout.flush(); time.sleep(0.05)\n"
        )
        async with _backend(tmp_path) as backend, backend.session() as session:
            result = await session.run(MACHINE, [sys.executable, "-c", code], timeout=30)
        assert result.execution.stdout_bytes == 30 * 20001
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(reads) > 10
    assert len(set(reads)) > 3  # it saw the record grow, not only its start and end


def test_a_finished_record_deleted_elsewhere_is_not_written_back(tmp_path: Path) -> None:
    """S3: the owner writes a terminal record once, so another process's delete stays done."""
    owner = ExecutionStore(tmp_path, dirname=machine_dirname, output_cap=1000)
    other = ExecutionStore(tmp_path, dirname=machine_dirname, output_cap=1000)
    owner.open()
    other.open()
    try:
        record = ExecutionRecord(
            execution_id="exe-00000000000000dd",
            machine_id=MACHINE,
            command=("true",),
            created_at=datetime.now(UTC),
            created_mono=0.0,
        )
        owner.claim(record)
        owner.save(record)
        record.finish("succeeded", record.created_at, exit_code=0)
        owner.save(record)
        found = other.find(MACHINE, record.execution_id)
        assert found is not None
        other.remove(found)
        owner.save(record)  # a late save of the same end (a cancel, then the task's end)
        assert other.find(MACHINE, record.execution_id) is None
    finally:
        other.close()
        owner.close()


def _finished_record(execution_id: str, status: str = "succeeded") -> ExecutionRecord:
    record = ExecutionRecord(
        execution_id=execution_id,
        machine_id=MACHINE,
        command=("true",),
        created_at=datetime.now(UTC),
        created_mono=0.0,
    )
    record.transition("running", record.created_at)
    if status != "running":
        record.finish(status, record.created_at, exit_code=0)
    return record


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda state, events: (state.update(format=99), events), "format 99"),
        (lambda state, events: (state, events[:-5]), "shorter than its record says"),
        (
            lambda state, events: (
                state.update(events=state["events"] + 1, events_bytes=len(events)),
                events,
            ),
            "events where the record says",
        ),
        (lambda state, events: (state.pop("status"), events), "status"),
    ],
)
def test_a_damaged_record_is_skipped_with_a_warning(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[dict[str, object], bytes], tuple[object, bytes]],
    why: str,
) -> None:
    """S7: another version's record, or one cut short, reads as absent; nothing raises."""
    store = ExecutionStore(tmp_path, dirname=machine_dirname, output_cap=1000)
    store.open()
    try:
        store.save(_finished_record("exe-00000000000000ee"))
        path = store.root / machine_dirname(MACHINE) / "exe-00000000000000ee.json"
        state = json.loads(path.read_bytes())
        events = path.with_suffix(".events").read_bytes()
        _, events = damage(state, events)
        path.write_text(json.dumps(state))
        path.with_suffix(".events").write_bytes(events)
        reader = ExecutionStore(tmp_path, dirname=machine_dirname, output_cap=1000)
        with caplog.at_level("WARNING", logger="dedalus_async.local"):
            assert reader.find(MACHINE, "exe-00000000000000ee") is None
        assert why in caplog.text
    finally:
        store.close()


def test_an_owner_that_closed_without_ending_a_record_counts_as_gone(tmp_path: Path) -> None:
    """S1: no lock file at all (its owner closed, or the file was cleaned) is a gone owner."""
    owner = ExecutionStore(tmp_path, dirname=machine_dirname, output_cap=1000)
    owner.open()
    record = _finished_record("exe-00000000000000ab", status="running")
    owner.claim(record)
    owner.save(record)  # no command_pid: nothing to kill
    owner.close()
    owner.close()  # twice is fine
    assert not owner.owns(_finished_record("exe-0000000000000000"))
    reader = ExecutionStore(tmp_path, dirname=machine_dirname, output_cap=1000)
    found = reader.find(MACHINE, "exe-00000000000000ab")
    assert found is not None
    assert (found.status, found.error_code) == ("failed", INTERRUPTED_CODE)
    assert "exited first" in (found.error_message or "")
    assert "process group" not in (found.error_message or "")
    assert "ExecutionStore" in repr(reader)


def test_a_record_that_cannot_be_saved_does_not_stop_the_execution(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full or broken disk: the execution still runs and answers; the store warns."""

    async def run() -> Execution:
        async with _backend(tmp_path) as backend, backend.session() as session:
            (tmp_path / "executions" / machine_dirname(MACHINE)).write_text("not a directory")
            result = await session.run(MACHINE, ["echo", "still works"])
            assert result.stdout == "still works\n"
            return result.execution

    with caplog.at_level("WARNING", logger="dedalus_async.local"):
        execution = asyncio.run(run())
    assert execution.status == "succeeded"
    assert "cannot save the record" in caplog.text


def test_a_pid_that_is_gone_or_not_a_group_is_never_signalled(tmp_path: Path) -> None:
    """S4's kill needs a live process that is the execution's own command."""
    from dedalus_async._store import _kill_orphan

    assert not _kill_orphan(None, "exe-00000000000000aa")
    assert not _kill_orphan(1, "exe-00000000000000aa")  # never init, whatever it says
    assert not _kill_orphan(2**22 + 12345, "exe-00000000000000aa")  # no such process
