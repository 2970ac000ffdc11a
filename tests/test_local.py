"""The local backend: real subprocesses behind the real HTTP API, driven by a real Session."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dedalus_async import (
    TERMINAL_STATUSES,
    AuthenticationError,
    Execution,
    ExecutionHandle,
    Session,
)
from dedalus_async._local import LocalBackend, default_data_dir, machine_dirname, resolve_cwd
from dedalus_async.testing import FakeClock, FakeDedalus

# ``local_backend`` is the plugin's (tests/conftest.py loads it); ``local_session`` is a
# Session on it (conftest).

MACHINE = "dm-b2ba66b6-5d11-5ae2-a0f5-9f434344e97b"


@pytest.fixture
def local_backend_options() -> dict[str, Any]:
    """A short wake keeps the suite fast; the wake tests set their own."""
    return {"wake_delay": 0.02}


def _real(path: Path) -> str:
    """What ``pwd`` prints for ``path`` (the tmp dir may sit behind a symlink)."""
    return os.path.realpath(path)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def _first_stdout(handle: ExecutionHandle) -> str:
    async for event in handle.events(follow=True):
        if event.type == "stdout" and event.chunk:
            return event.chunk
    raise AssertionError("the execution ended without printing")


# --- what a command sees and reports ---------------------------------------------------


async def test_exit_code_stdout_and_stderr_are_reported(local_session: Session) -> None:
    """A non-zero exit is `failed` with that exit code, and both streams are captured."""
    result = await local_session.run(
        MACHINE, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10
    )
    ex = result.execution
    assert (ex.status, ex.exit_code, ex.signal) == ("failed", 3, None)
    assert (result.stdout, result.stderr) == ("out\n", "err\n")
    assert (ex.stdout_bytes, ex.stderr_bytes) == (4, 4)
    assert (ex.stdout_truncated, ex.stderr_truncated) == (False, False)


async def test_success_goes_through_the_documented_statuses(local_session: Session) -> None:
    """A fresh machine wakes, queues, runs and succeeds; output is logged while running."""
    handle = await local_session.create_execution(MACHINE, ["echo", "x"])
    assert handle.last is not None
    assert handle.last.status == "wake_in_progress"
    execution = await handle.wait(timeout=10)
    assert (execution.status, execution.exit_code) == ("succeeded", 0)
    log = [(e.type, e.status or e.chunk) async for e in handle.events()]
    assert log == [
        ("lifecycle", "wake_in_progress"),
        ("lifecycle", "queued"),
        ("lifecycle", "running"),
        ("stdout", "x\n"),
        ("lifecycle", "succeeded"),
    ]


async def test_stdin_is_written_then_closed_and_absent_stdin_is_empty(
    local_session: Session,
) -> None:
    """`stdin` reaches the command (UTF-8) and EOF follows; without it stdin is /dev/null."""
    text = "héllo\nwörld\n"
    result = await local_session.run(MACHINE, ["cat"], stdin=text, timeout=10)
    assert result.stdout == text
    assert result.execution.stdout_bytes == len(text.encode())
    result = await local_session.run(MACHINE, ["cat"], timeout=10)
    assert (result.exit_code, result.stdout) == (0, "")


async def test_environment_merge(
    local_session: Session, local_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inherited env minus the API keys, HOME = machine dir, then the request's env wins."""
    monkeypatch.setenv("DEDALUS_X_API_KEY", "must-not-leak")
    monkeypatch.setenv("INHERITED_VAR", "inherited")
    script = (
        'echo "$FOO|$HOME|$DEDALUS_MACHINE_ID|${DEDALUS_X_API_KEY-unset}|$INHERITED_VAR'
        '|$DEDALUS_EXECUTION_ID"'
    )
    result = await local_session.run(MACHINE, ["sh", "-c", script], env={"FOO": "bar"}, timeout=10)
    home = _real(local_backend.machine_dir(MACHINE))
    foo, got_home, machine, key, inherited, execution_id = result.stdout.strip().split("|")
    assert (foo, got_home, machine, key, inherited) == ("bar", home, MACHINE, "unset", "inherited")
    assert execution_id == result.execution.execution_id
    assert result.execution.env_keys == ("FOO",)
    result = await local_session.run(MACHINE, ["sh", "-c", "echo $HOME"], env={"HOME": "/x"})
    assert result.stdout == "/x\n"


async def test_cwd_defaults_to_the_machine_dir_and_resolves_inside_it(
    local_session: Session, local_backend: LocalBackend
) -> None:
    """Relative cwd and /home/machine/... both land inside the machine's directory."""
    home = Path(_real(local_backend.machine_dir(MACHINE)))
    result = await local_session.run(MACHINE, ["sh", "-c", "pwd; mkdir -p sub/deeper"], timeout=10)
    assert result.stdout == f"{home}\n"
    for cwd in ("sub/deeper", "/home/machine/sub/deeper", "sub/../sub/deeper"):
        result = await local_session.run(MACHINE, ["pwd"], cwd=cwd, timeout=10)
        assert result.stdout == f"{home / 'sub' / 'deeper'}\n", cwd
        assert result.execution.cwd == cwd


async def test_cwd_outside_the_machine_is_refused(
    local_session: Session, local_backend: LocalBackend, tmp_path: Path
) -> None:
    """No cwd can lead out of the machine's directory, not even through a symlink."""
    await local_session.run(MACHINE, ["ln", "-s", str(tmp_path), "escape"], timeout=10)
    for cwd in ("..", "../..", "/etc", "/home/machine/../..", "escape", "missing", "/tmp"):
        result = await local_session.run(MACHINE, ["pwd"], cwd=cwd, timeout=10)
        ex = result.execution
        assert (ex.status, ex.error_code, ex.exit_code) == ("failed", "INVALID_CWD", None), cwd
        assert result.stdout == ""


def test_resolve_cwd_is_confined(tmp_path: Path) -> None:
    """The pure resolver: inside is fine, outside or missing is a ValueError."""
    home = tmp_path / "m"
    (home / "a").mkdir(parents=True)
    assert resolve_cwd(home, None) == home.resolve()
    assert resolve_cwd(home, "/home/machine") == home.resolve()
    assert resolve_cwd(home, "a") == (home / "a").resolve()
    for bad in ("../", "/home/machinex", "/", "a/../../m2", "no-such-dir", "a\x00b"):
        with pytest.raises(ValueError):
            resolve_cwd(home, bad)


async def test_files_persist_across_executions_and_restarts(
    local_session: Session, tmp_path: Path, local_backend: LocalBackend
) -> None:
    """The machine directory keeps its files, like /home/machine, even across restarts."""
    await local_session.run(MACHINE, ["sh", "-c", "echo kept > note.txt"], timeout=10)
    result = await local_session.run(MACHINE, ["cat", "note.txt"], timeout=10)
    assert result.stdout == "kept\n"
    async with (
        LocalBackend(data_dir=local_backend.data_dir, announce=False) as again,
        again.session() as other,
    ):
        result = await other.run(MACHINE, ["sh", "-c", 'cat "$HOME/note.txt"'], timeout=10)
    assert result.stdout == "kept\n"
    # a different machine does not see it
    result = await local_session.run(
        "dm-7f5bf56c-8390-58ff-a89a-cd813a7323a7", ["cat", "note.txt"], timeout=10
    )
    assert result.execution.exit_code not in (None, 0)


async def test_command_not_found_fails_without_exit_code(local_session: Session) -> None:
    """A program that cannot be started is `failed` with an error code, no exit code."""
    result = await local_session.run(MACHINE, ["no-such-program-xyz"], timeout=10)
    ex = result.execution
    assert (ex.status, ex.exit_code, ex.error_code) == ("failed", None, "COMMAND_NOT_FOUND")
    assert ex.error_message is not None
    assert "no-such-program-xyz" in ex.error_message


async def test_commands_that_cannot_start_say_why(
    local_session: Session, local_backend: LocalBackend
) -> None:
    """Not executable, a NUL in an argument, an unusable machine directory: each is
    `failed` with no exit code and its own error code."""
    await local_session.run(MACHINE, ["sh", "-c", "printf 'echo hi' > script; chmod -x script"])
    result = await local_session.run(MACHINE, ["./script"], timeout=10)
    assert (result.execution.error_code, result.exit_code) == ("COMMAND_NOT_EXECUTABLE", None)
    result = await local_session.run(MACHINE, ["echo", "a\x00b"], timeout=10)
    assert (result.execution.error_code, result.exit_code) == ("INVALID_ARGUMENT", None)
    blocked = local_backend.machine_dir("dm-88ac1214-dba9-516f-af67-41373c0806ed")
    blocked.write_text("a file where the machine's directory should be")
    result = await local_session.run(
        "dm-88ac1214-dba9-516f-af67-41373c0806ed", ["true"], timeout=10
    )
    assert (result.execution.error_code, result.exit_code) == ("MACHINE_UNAVAILABLE", None)


def test_default_data_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """$DEDALUS_LOCAL_HOME, else $XDG_DATA_HOME/dedalus-async, else ~/.local/share/..."""
    monkeypatch.setenv("DEDALUS_LOCAL_HOME", str(tmp_path / "explicit"))
    assert default_data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("DEDALUS_LOCAL_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "dedalus-async"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "dedalus-async"
    assert LocalBackend(announce=False).data_dir == default_data_dir()


@pytest.mark.parametrize(
    "options",
    [{"output_cap": -1}, {"idle_timeout": -1}, {"wake_delay": math.inf}, {"max_concurrency": 0}],
)
def test_runner_settings_are_checked(options: dict[str, Any], tmp_path: Path) -> None:
    """Impossible settings fail when the backend is built, not on the first execution."""
    with pytest.raises(ValueError):
        LocalBackend(data_dir=tmp_path, **options)


# --- signals, timeouts, cancel ---------------------------------------------------------


async def test_a_signal_is_reported_as_signal_without_exit_code(local_session: Session) -> None:
    """Killed by SIGTERM: `failed`, signal 15, no exit code."""
    result = await local_session.run(MACHINE, ["sh", "-c", "kill -TERM $$"], timeout=10)
    ex = result.execution
    assert (ex.status, ex.signal, ex.exit_code) == ("failed", 15, None)
    assert ex.error_message is not None
    assert "SIGTERM" in ex.error_message


async def test_timeout_ms_kills_the_whole_process_group(local_session: Session) -> None:
    """At timeout_ms the command and its background child die; TIMEOUT, signal 9."""
    started = time.monotonic()
    result = await local_session.run(
        MACHINE, ["sh", "-c", "sleep 30 & echo $!; wait"], timeout_ms=400, timeout=10
    )
    assert time.monotonic() - started < 5
    ex = result.execution
    assert (ex.status, ex.error_code, ex.signal, ex.exit_code) == ("failed", "TIMEOUT", 9, None)
    assert ex.error_message == "command exceeded timeout_ms=400"
    child = int(result.stdout)
    assert await _wait_dead(child), "the background child survived the timeout"


async def test_processes_left_behind_are_killed_when_the_command_exits(
    local_session: Session,
) -> None:
    """An execution leaves nothing running: its group is killed when the main process ends."""
    result = await local_session.run(MACHINE, ["sh", "-c", "sleep 30 & echo $!"], timeout=10)
    assert (result.execution.status, result.exit_code) == ("succeeded", 0)
    assert await _wait_dead(int(result.stdout))


async def test_delete_cancels_a_running_execution(local_session: Session) -> None:
    """DELETE kills the running command's group and the execution reports `cancelled`."""
    handle = await local_session.create_execution(
        MACHINE, ["sh", "-c", "sleep 30 & echo $!; sleep 30"]
    )
    child = int(await _first_stdout(handle))
    cancelled = await handle.cancel()
    assert (cancelled.status, cancelled.signal, cancelled.exit_code) == ("cancelled", 9, None)
    assert await _wait_dead(child)
    final = await handle.wait(timeout=5)
    assert final.status == "cancelled"
    assert final.completed_at is not None


async def test_closing_the_backend_kills_running_commands(tmp_path: Path) -> None:
    """Nothing outlives the backend."""
    backend = LocalBackend(data_dir=tmp_path, wake_delay=0, announce=False)
    async with backend, backend.session() as session:
        handle = await session.create_execution(MACHINE, ["sh", "-c", "echo $$; sleep 30"])
        pid = int(await _first_stdout(handle))
    assert await _wait_dead(pid)


# --- output ----------------------------------------------------------------------------


async def test_output_is_capped_and_sizes_stay_truthful(tmp_path: Path) -> None:
    """Beyond output_cap bytes a stream is counted but not kept; *_truncated says so."""
    code = "import sys; sys.stdout.write('a' * 5000); sys.stderr.write('é' * 10)"
    backend = LocalBackend(data_dir=tmp_path, output_cap=1000, wake_delay=0, announce=False)
    async with backend, backend.session() as session:
        handle = await session.create_execution(MACHINE, [sys.executable, "-c", code])
        ex = await handle.wait(timeout=10)
        output = await handle.output()
        streamed = "".join([e.chunk or "" async for e in handle.events() if e.type == "stdout"])
    assert output.stdout == "a" * 1000
    assert streamed == "a" * 1000
    assert (ex.stdout_bytes, ex.stdout_truncated) == (5000, True)
    assert output.stderr == "é" * 10
    assert (ex.stderr_bytes, ex.stderr_truncated) == (20, False)


async def test_the_cap_never_splits_a_character(tmp_path: Path) -> None:
    """A multi-byte character cut by the cap is dropped, not turned into garbage."""
    code = "import sys; sys.stdout.write('é' * 1000)"
    backend = LocalBackend(data_dir=tmp_path, output_cap=1001, wake_delay=0, announce=False)
    async with backend, backend.session() as session:
        result = await session.run(MACHINE, [sys.executable, "-c", code], timeout=10)
    assert result.stdout == "é" * 500
    assert result.execution.stdout_bytes == 2000
    assert result.execution.stdout_truncated is True


async def test_output_is_streamed_while_the_command_runs(local_session: Session) -> None:
    """The first chunk arrives as an event while the execution is still running."""
    handle = await local_session.create_execution(
        MACHINE, ["sh", "-c", "echo first; sleep 1; echo second"]
    )
    started = time.monotonic()
    seen: list[tuple[str, float]] = []
    status_at_first: str | None = None
    async for event in handle.events(follow=True):
        if event.type == "stdout" and event.chunk:
            seen.append((event.chunk, time.monotonic() - started))
            if status_at_first is None:
                status_at_first = (await handle.refresh()).status
    assert [chunk for chunk, _ in seen] == ["first\n", "second\n"]
    assert status_at_first == "running"
    assert seen[1][1] - seen[0][1] > 0.5, seen


# --- time on an injected clock: real processes, no real waiting ---------------------------


async def _settled(handle: ExecutionHandle, timeout: float = 10.0) -> Execution:
    """Poll until terminal, every 10 ms of real time: the backend's hints are on its fake
    clock, so a client honouring them would sleep for real."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        execution = await handle.refresh()
        if execution.status in TERMINAL_STATUSES:
            return execution
        await asyncio.sleep(0.01)
    raise AssertionError(f"{handle.execution_id} did not end within {timeout} s")


async def test_wake_delay_and_idle_timeout_follow_the_clock(tmp_path: Path) -> None:
    """An hour's wake and a day's idle timeout, on a FakeClock: the wake is exactly an
    hour of the clock, and a machine falls asleep exactly when the clock says so."""
    clock = FakeClock()
    backend = LocalBackend(
        data_dir=tmp_path, clock=clock, wake_delay=3600, idle_timeout=86400, announce=False
    )
    started = time.monotonic()
    async with backend, backend.session() as session:
        first = await session.create_execution(MACHINE, ["echo", "woke"])
        assert first.last is not None
        assert (first.last.status, first.last.retry_after_ms) == ("wake_in_progress", 3_600_000)
        done = await _settled(first)
        assert (done.status, (await first.output()).stdout) == ("succeeded", "woke\n")
        assert done.started_at is not None
        assert (done.started_at - done.created_at).total_seconds() == 3600

        clock.advance(86400 - 0.001)  # idle for just under the timeout: still awake
        awake = await session.create_execution(MACHINE, ["true"])
        assert awake.last is not None
        assert awake.last.status != "wake_in_progress"
        await _settled(awake)

        clock.advance(86400)  # idle for the whole timeout: asleep again
        again = await session.create_execution(MACHINE, ["true"])
        assert again.last is not None
        assert again.last.status == "wake_in_progress"
        assert (await _settled(again)).status == "succeeded"
    assert time.monotonic() - started < 8


async def test_timeout_ms_is_measured_on_the_clock(tmp_path: Path) -> None:
    """A one-minute timeout on a FakeClock kills a real `sleep 60` at once (no minute
    passes), and the record says it ran exactly 60 s of the clock."""
    clock = FakeClock()
    backend = LocalBackend(data_dir=tmp_path, clock=clock, wake_delay=0, announce=False)
    started = time.monotonic()
    async with backend, backend.session() as session:
        handle = await session.create_execution(MACHINE, ["sleep", "60"], timeout_ms=60_000)
        ex = await _settled(handle)
    assert time.monotonic() - started < 8, "the process was not killed"
    assert (ex.status, ex.error_code, ex.signal, ex.exit_code) == ("failed", "TIMEOUT", 9, None)
    assert ex.started_at is not None
    assert ex.completed_at is not None
    assert (ex.completed_at - ex.started_at).total_seconds() == 60


async def test_the_running_hint_grows_with_the_clock(tmp_path: Path) -> None:
    """``retry_after_ms`` of a running command is a tenth of its run time on the clock,
    from 50 ms up to 250 ms."""
    clock = FakeClock()
    backend = LocalBackend(data_dir=tmp_path, clock=clock, wake_delay=0, announce=False)
    async with backend, backend.session() as session:
        handle = await session.create_execution(MACHINE, ["sh", "-c", "echo up; sleep 60"])
        assert await _first_stdout(handle) == "up\n"
        hints = []
        for ran in (0.0, 1.0, 2.0, 3600.0):
            clock.advance(ran)
            hints.append((await handle.refresh()).retry_after_ms)
        cancelled = await handle.cancel()
    assert hints == [50, 100, 250, 250]
    assert (cancelled.status, cancelled.signal) == ("cancelled", 9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"output_cap": True}, "output_cap must be an int, not bool"),
        ({"max_concurrency": 2.0}, "max_concurrency must be an int, not float"),
        ({"idle_timeout": "5"}, "idle_timeout must be seconds"),
        ({"wake_delay": False}, "wake_delay must be seconds"),
    ],
)
def test_runner_settings_of_the_wrong_type_are_refused(
    options: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """A bool is not a count nor seconds; a float is not a count: TypeError, named."""
    with pytest.raises(TypeError, match=message):
        LocalBackend(data_dir=tmp_path, **options)


def test_an_infinite_idle_timeout_means_never_asleep_again(tmp_path: Path) -> None:
    """``idle_timeout=math.inf`` is allowed (a machine stays awake once it ran); an
    infinite or NaN wake is not."""
    assert LocalBackend(data_dir=tmp_path, idle_timeout=math.inf).runner.idle_timeout == math.inf
    for bad in (math.inf, math.nan, -0.5):
        with pytest.raises(ValueError, match="wake_delay must be >= 0 and finite seconds"):
            LocalBackend(data_dir=tmp_path, wake_delay=bad)


# --- machines: sleep, wake, names, concurrency -----------------------------------------


async def test_a_sleeping_machine_wakes_first(tmp_path: Path) -> None:
    """Fresh or idle machines report wake_in_progress with a hint; a busy one does not."""
    backend = LocalBackend(data_dir=tmp_path, idle_timeout=0.3, wake_delay=0.15, announce=False)
    async with backend, backend.session() as session:
        first = await session.create_execution(MACHINE, ["true"])
        joined = await session.create_execution(MACHINE, ["true"])
        for handle in (first, joined):
            assert handle.last is not None
            assert handle.last.status == "wake_in_progress"
            assert handle.last.retry_after_ms is not None
            assert 0 < handle.last.retry_after_ms <= 150
        done = await first.wait(timeout=10)
        await joined.wait(timeout=10)
        assert done.started_at is not None
        assert (done.started_at - done.created_at).total_seconds() >= 0.14
        awake = await session.create_execution(MACHINE, ["true"])
        assert awake.last is not None
        assert awake.last.status in ("queued", "running", "succeeded")
        await awake.wait(timeout=10)
        await asyncio.sleep(0.4)  # longer than idle_timeout
        again = await session.create_execution(MACHINE, ["true"])
        assert again.last is not None
        assert again.last.status == "wake_in_progress"
        assert (await again.wait(timeout=10)).status == "succeeded"


async def test_max_concurrency_queues_the_rest(tmp_path: Path) -> None:
    """With one slot, a second execution stays `queued` until the first one ends."""
    backend = LocalBackend(data_dir=tmp_path, wake_delay=0, max_concurrency=1, announce=False)
    async with backend, backend.session() as session:
        busy = await session.create_execution(MACHINE, ["sh", "-c", "echo go; sleep 0.5"])
        await _first_stdout(busy)
        waiting = await session.create_execution(
            "dm-5259f3f8-82c5-50a6-a17d-166b2073440b", ["true"]
        )
        await asyncio.sleep(0.1)
        assert (await waiting.refresh()).status == "queued"
        assert (await waiting.wait(timeout=10)).status == "succeeded"
        assert (await busy.refresh()).status == "succeeded"


@pytest.mark.parametrize(
    "machine_id",
    ["../../etc", "..", ".", "/etc/passwd", "a/../../b", "", "\x00", "x" * 400, "ü/..", "-"],
)
def test_machine_ids_never_name_a_path_outside_the_data_folder(
    machine_id: str, tmp_path: Path
) -> None:
    """Whatever the id, its directory is one plain child of machines/."""
    name = machine_dirname(machine_id)
    assert "/" not in name
    assert name not in (".", "..")
    assert len(name) <= 61
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_machine_dir_names_are_readable_and_distinct() -> None:
    """The slug keeps ids recognisable; the hash keeps similar ids apart."""
    assert machine_dirname("dm-95e5a864-0e30-55bf-b0c5-dd9c4df102d1").startswith(
        "dm-95e5a864-0e30-55bf-b0c5-dd9c4df102d1-"
    )
    names = {
        machine_dirname(i)
        for i in (
            "dm-266d11eb-daee-5aeb-b6c3-4ae9b9e8b3e1",
            "DM-ABC",
            "dm_abc",
            "dm abc",
            "dm-266d11eb-daee-5aeb-b6c3-4ae9b9e8b3e1 ",
        )
    }
    assert len(names) == 5


async def test_an_odd_machine_id_works_over_http(
    local_session: Session, local_backend: LocalBackend
) -> None:
    """An id the API allows but no filesystem likes still gets its own directory."""
    machine = "Weird id: ü*?..<>"
    result = await local_session.run(machine, ["sh", "-c", "pwd; touch made-here"], timeout=10)
    directory = local_backend.machines_dir / machine_dirname(machine)
    assert (directory / "made-here").is_file()
    assert result.stdout == f"{_real(directory)}\n"
    assert result.execution.machine_id == machine


# --- the server itself -----------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port``, from the kernel's own tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":
                found.add(address)
    return found


async def test_binds_to_loopback_only(local_backend: LocalBackend) -> None:
    """The only listening socket on the port is 127.0.0.1."""
    assert local_backend.base_url.startswith("http://127.0.0.1:")
    port = int(local_backend.base_url.rsplit(":", 1)[1])
    assert _listening_addresses(port) == {"0100007F"}


async def test_the_random_key_is_required(local_backend: LocalBackend, tmp_path: Path) -> None:
    """No key: 401 AUTH_REQUIRED; a wrong key: AuthenticationError; keys differ per start."""
    url = f"{local_backend.base_url}/v1/machines/{MACHINE}/executions"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 401
        assert (await response.json())["error_code"] == "AUTH_REQUIRED"
    async with Session(api_key="wrong", base_url=local_backend.base_url) as session:
        with pytest.raises(AuthenticationError):
            await session.get_execution(MACHINE, "exe-nope")
    other = LocalBackend(data_dir=tmp_path / "other", announce=False)
    assert other.api_key != local_backend.api_key
    assert len(local_backend.api_key) >= 40
    assert local_backend.api_key not in repr(local_backend)


async def test_start_announces_that_commands_run_unsandboxed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The startup warning says where it listens and that there is no sandbox."""
    async with LocalBackend(data_dir=tmp_path) as backend:
        pass
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(backend.base_url in m and "without a sandbox" in m for m in messages)


# --- the pytest plugin -----------------------------------------------------------------


async def test_plugin_fixtures_fake_and_session_work_together(
    fake_dedalus: FakeDedalus, dedalus_session: Session
) -> None:
    """dedalus_session talks to fake_dedalus with its key; the fake's default script runs."""
    result = await dedalus_session.run(
        "dm-266d11eb-daee-5aeb-b6c3-4ae9b9e8b3e1", ["echo", "hi"], timeout=10
    )
    assert result.stdout == "hi\n"
    assert dedalus_session.base_url == fake_dedalus.base_url
    assert fake_dedalus.create_count == 1


async def test_plugin_local_backend_lives_under_tmp_path(
    local_backend: LocalBackend, tmp_path: Path
) -> None:
    """The local_backend fixture keeps machines inside the test's tmp_path."""
    assert tmp_path in local_backend.machines_dir.parents
    async with local_backend.session() as session:
        result = await session.run(MACHINE, ["echo", "ok"], timeout=10)
    assert result.stdout == "ok\n"
