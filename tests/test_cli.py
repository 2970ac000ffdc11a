"""The command line, run as a real subprocess against the local backend (no mocks)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pty
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import dedalus_async
from dedalus_async import Execution, ExecutionEvent, ExecutionOutput
from dedalus_async._cli import (
    EXIT_API_ERROR,
    EXIT_CANCELLED,
    EXIT_EXPIRED,
    EXIT_REMOTE_FAILED,
    EXIT_WAIT_TIMEOUT,
    build_parser,
    exit_code_for,
    main,
)
from dedalus_async._cli._commands import COMMANDS
from dedalus_async._cli._parser import NUMERIC_TYPES
from dedalus_async._convert import structure
from dedalus_async._local import machine_dirname
from dedalus_async.testing import FakeDedalus, MachineTimings

from .conftest import API_KEY
from .serving import serving

REPO = Path(dedalus_async.__file__).resolve().parent.parent
LOCAL_NOTE = "running locally as user"


def _base_env(home: Path) -> dict[str, str]:
    """This environment without any Dedalus settings, the package importable, a tmp home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDALUS_")}
    env["DEDALUS_LOCAL_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "local-home"


def _cli(
    home: Path,
    *args: str,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dedalus_async", *args],
        input=input if input is not None else b"",
        capture_output=True,
        env={**_base_env(home), **(env or {})},
        cwd=home.parent,
        timeout=timeout,
        check=False,
    )


def _cli_parallel(
    home: Path, *calls: list[str], env: dict[str, str] | None = None, timeout: float = 30
) -> list[subprocess.CompletedProcess[bytes]]:
    """Independent invocations at once (the suite is mostly interpreter start-up)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dedalus_async", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**_base_env(home), **(env or {})},
            cwd=home.parent,
        )
        for args in calls
    ]
    results = []
    for args, proc in zip(calls, procs, strict=True):
        with proc:
            stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return results


def _start(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dedalus_async", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**_base_env(home), **(env or {})},
        cwd=home.parent,
        # unbuffered: _read_line selects on the pipe, so no line may hide in a buffer
        bufsize=0,
    )


def _read_line(proc: subprocess.Popen[bytes], timeout: float = 15) -> bytes:
    """One line of the child's stdout, or fail after ``timeout`` (never hang the suite)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            proc.kill()
            raise AssertionError(f"no output within {timeout} s")
    return proc.stdout.readline()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_dead(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


def _notes(stderr: bytes) -> list[str]:
    """The CLI's own lines on stderr."""
    return [line for line in stderr.decode().splitlines() if line.startswith("dedalus-async:")]


# --- run against the in-process local backend ------------------------------------------


def test_run_streams_stdout_and_stderr_and_exits_with_the_exit_code(home: Path) -> None:
    """Output goes to the matching stream; the exit code is the remote one; one note line."""
    proc = _cli(home, "run", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert proc.returncode == 3
    assert proc.stdout == b"out\n"
    assert b"err\n" in proc.stderr
    notes = _notes(proc.stderr)
    assert len(notes) == 1
    assert LOCAL_NOTE in notes[0]
    assert "not sandboxed" in notes[0]
    assert str(home) in notes[0]


def test_run_sends_stdin_only_when_asked(home: Path, tmp_path: Path) -> None:
    """--stdin-file - forwards our stdin, --stdin-file F a file; piped input alone is not."""
    proc = _cli(home, "run", "--stdin-file", "-", "--", "cat", input=b"from a pipe\n")
    assert (proc.returncode, proc.stdout) == (0, b"from a pipe\n")
    source = tmp_path / "in.txt"
    source.write_text("from a file ü\n", encoding="utf-8")
    proc = _cli(home, "run", "--stdin-file", str(source), "--", "cat")
    assert proc.stdout.decode() == "from a file ü\n"
    proc = _cli(home, "run", "--", "cat", input=b"not sent\n")
    assert (proc.returncode, proc.stdout) == (0, b"")


def test_run_env_and_cwd(home: Path) -> None:
    """--env K=V sets, a bare --env K passes our value; --cwd is inside the machine."""
    proc = _cli(
        home,
        "run",
        "--machine-id",
        "dm-e379f91f-ad44-550a-9e07-e105a5aecd3d",
        "--",
        "mkdir",
        "-p",
        "work/dir",
    )
    assert proc.returncode == 0
    proc = _cli(
        home,
        "run",
        "--machine-id",
        "dm-e379f91f-ad44-550a-9e07-e105a5aecd3d",
        "--cwd",
        "work/dir",
        "--env",
        "FOO=bar=baz",
        "--env",
        "PASSED",
        "--",
        "sh",
        "-c",
        'echo "$FOO|$PASSED"; pwd',
        env={"PASSED": "through"},
    )
    machine = (
        home / "machines" / machine_dirname("dm-e379f91f-ad44-550a-9e07-e105a5aecd3d")
    ).resolve()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"bar=baz|through\n{machine / 'work' / 'dir'}\n"


def test_timeout_ms_kill_exits_128_plus_signal(home: Path) -> None:
    """The remote time limit kills the command: exit 137 and a line saying TIMEOUT."""
    proc = _cli(home, "run", "--timeout-ms", "300", "--", "sleep", "10")
    assert proc.returncode == 128 + 9
    notes = _notes(proc.stderr)
    assert any("TIMEOUT" in line and "timeout_ms=300" in line for line in notes), notes


def test_a_remote_signal_exits_128_plus_signal(home: Path) -> None:
    """A command killed by SIGTERM makes the CLI exit 143."""
    proc = _cli(home, "run", "--", "sh", "-c", "kill -TERM $$")
    assert proc.returncode == 143


def test_wait_timeout_has_its_own_exit_code(home: Path) -> None:
    """--timeout passing first exits 124 with one error line, quickly."""
    started = time.monotonic()
    proc = _cli(home, "run", "--timeout", "0.5", "--", "sleep", "10")
    assert time.monotonic() - started < 8
    assert proc.returncode == 124
    errors = [line for line in _notes(proc.stderr) if "error:" in line]
    assert len(errors) == 1
    assert "did not finish within 0.5 s" in errors[0]


def test_command_not_found_is_a_remote_failure_without_exit_code(home: Path) -> None:
    """No exit code, no signal: exit 126 and one line with the error code, no traceback."""
    proc = _cli(home, "run", "--", "no-such-program-xyz")
    assert proc.returncode == 126
    assert b"Traceback" not in proc.stderr
    notes = _notes(proc.stderr)
    assert len(notes) == 2  # the local note, then the failure
    assert "COMMAND_NOT_FOUND" in notes[1]


def test_json_output(home: Path) -> None:
    """--json prints one object with the execution and its output; exit code as usual."""
    proc = _cli(home, "run", "--json", "--", "sh", "-c", "echo hi; echo oops >&2; exit 4")
    assert proc.returncode == 4
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert (result["ok"], result["stdout"], result["stderr"], result["error"]) == (
        False,
        "hi\n",
        "oops\n",
        None,
    )
    execution = result["execution"]
    assert (execution["status"], execution["exit_code"]) == ("failed", 4)
    assert execution["command"] == ["sh", "-c", "echo hi; echo oops >&2; exit 4"]
    assert execution["created_at"].endswith("Z")


def test_local_flag_wins_over_a_configured_key(home: Path) -> None:
    """--local runs here even when a key and a (dead) base URL are configured."""
    dead = {"DEDALUS_X_API_KEY": "configured-key", "DEDALUS_BASE_URL": "http://127.0.0.1:9"}
    proc = _cli(home, "run", "--local", "--", "echo", "here", env=dead)
    assert (proc.returncode, proc.stdout) == (0, b"here\n")
    assert "--local" in _notes(proc.stderr)[0]


def test_ctrl_c_exits_130_and_stops_the_local_command(home: Path) -> None:
    """SIGINT while waiting: exit 130, and the local command does not outlive the CLI."""
    with _start(home, "run", "--", "sh", "-c", "echo $$; sleep 30") as proc:
        pid = int(_read_line(proc))
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert _wait_dead(pid)
    assert "interrupted" in stderr.decode()


def test_sigterm_also_stops_cleanly(home: Path) -> None:
    """SIGTERM: exit 143, and the local command is killed too."""
    with _start(home, "run", "--", "sh", "-c", "echo $$; sleep 30") as proc:
        pid = int(_read_line(proc))
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert proc.returncode == 143
    assert _wait_dead(pid)


def test_usage_errors_exit_2_with_one_line(home: Path, tmp_path: Path) -> None:
    """Bad invocations exit 2 before anything runs, each with one readable line."""
    cases: list[tuple[list[str], str]] = [
        (["run"], "needs a command"),
        (["run", "--stdin-file", str(tmp_path / "missing"), "--", "cat"], "cannot read"),
        (["get", "dm-2f6c0432-4e72-5276-adda-6b1916a48fdd", "exe-y"], "no API key"),
        (["run", "--local", "--base-url", "https://x.example", "--", "true"], "--base-url"),
        (["run", "--timeout", "-1", "--", "true"], "must be a positive number"),
        (["run", "--env", "=x", "--", "true"], "expected K=V"),
        (["frobnicate"], "invalid choice"),
    ]
    results = _cli_parallel(home, *(args for args, _ in cases))
    for (args, expected), proc in zip(cases, results, strict=True):
        assert proc.returncode == 2, args
        assert proc.stdout == b""
        notes = _notes(proc.stderr)
        assert proc.stderr.count(b"\n") == len(notes) == 1, (args, proc.stderr)
        assert expected in notes[0], notes


def test_help_documents_the_exit_codes(home: Path) -> None:
    """`run --help` lists every reserved exit code."""
    proc = _cli(home, "run", "--help")
    assert proc.returncode == 0
    text = proc.stdout.decode()
    for code in ("122", "123", "124", "125", "126", "130", "128+N"):
        assert code in text, code


# --- run-many --------------------------------------------------------------------------


def test_run_many_fans_out_and_keeps_input_order(home: Path, tmp_path: Path) -> None:
    """Results come back one line per request, in input order, with a failing exit 1."""
    requests: list[dict[str, Any]] = [
        {"command": ["sh", "-c", "sleep 0.4; echo slow"]},
        {"command": ["echo", "fast"]},
        {
            "command": ["sh", "-c", "exit 2"],
            "machine_id": "dm-7f5bf56c-8390-58ff-a89a-cd813a7323a7",
        },
        {"command": ["cat"], "stdin": "fed\n"},
        {"command": ["sh", "-c", "echo $X"], "env": {"X": "from-env"}},
    ]
    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in requests) + "\n\n")
    out = tmp_path / "results.jsonl"
    started = time.monotonic()
    proc = _cli(home, "run-many", "--concurrency", "3", "--output", str(out), str(source))
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == b""
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["ok"] for r in results] == [True, True, False, True, True]
    assert [r["stdout"] for r in results] == ["slow\n", "fast\n", "", "fed\n", "from-env\n"]
    assert results[2]["execution"]["exit_code"] == 2
    assert results[2]["execution"]["machine_id"] == "dm-7f5bf56c-8390-58ff-a89a-cd813a7323a7"
    assert results[0]["execution"]["machine_id"] == "dm-local"
    # stderr is not a terminal: no progress line, only the local note
    assert len(_notes(proc.stderr)) == 1
    assert elapsed < 15


def test_run_many_draws_progress_on_a_terminal(home: Path, tmp_path: Path) -> None:
    """With stderr on a terminal, a progress line is redrawn in place; results still go
    to stdout."""
    source = tmp_path / "requests.jsonl"
    source.write_text('{"command": ["true"]}\n{"command": ["false"]}\n')
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dedalus_async", "run-many", str(source)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=_base_env(home),
            cwd=tmp_path,
            timeout=30,
            check=False,
        )
        os.close(slave)
        slave = -1
        screen = b""
        with contextlib.suppress(OSError):  # EIO once everything written was read
            while chunk := os.read(master, 65536):
                screen += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 1
    assert len(proc.stdout.splitlines()) == 2
    assert b"\rdedalus-async: 2/2 done, 1 not ok, 0 running" in screen


def test_run_many_checks_the_whole_file_first(home: Path, tmp_path: Path) -> None:
    """A bad line is a usage error naming file and line; nothing runs."""
    source = tmp_path / "bad.jsonl"
    source.write_text('{"command": ["echo", "1"]}\n{"comand": ["echo"]}\n')
    proc = _cli(home, "run-many", str(source))
    assert proc.returncode == 2
    assert proc.stdout == b""
    notes = _notes(proc.stderr)
    assert len(notes) == 1
    assert f"{source}:2" in notes[0]
    assert "comand" in notes[0]
    assert not (home / "machines").exists()


# --- against serve-local ---------------------------------------------------------------


@contextlib.contextmanager
def _serving(home: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """A serve-local process and the settings it printed; terminated on the way out."""
    with _start(home, "serve-local", "--data-dir", str(home), *extra) as proc:
        try:
            settings: dict[str, str] = {}
            for _ in range(3):
                line = _read_line(proc).decode().strip()
                assert line.startswith("export "), line
                name, _, value = line.removeprefix("export ").partition("=")
                settings[name] = value
            yield proc, settings
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A serve-local process shared by the tests below (small output cap)."""
    with _serving(tmp_path_factory.mktemp("served"), "--output-cap", "1000") as (_, settings):
        yield settings


def _remote(server: dict[str, str]) -> dict[str, str]:
    return {k: server[k] for k in ("DEDALUS_BASE_URL", "DEDALUS_X_API_KEY")}


def test_serve_local_prints_settings_serves_and_stops(home: Path) -> None:
    """serve-local prints the export lines and a warning, serves a run, stops on SIGTERM."""
    with _serving(home) as (proc, settings):
        url = settings["DEDALUS_BASE_URL"]
        assert url.startswith("http://127.0.0.1:")
        client = _cli(
            home,
            "run",
            "--machine-id",
            "dm-cec7a105-ef8c-5f91-a6bd-3e7a22c82f47",
            "--",
            "echo",
            "served",
            env=settings,
        )
        assert (client.returncode, client.stdout) == (0, b"served\n")
        assert LOCAL_NOTE not in client.stderr.decode()  # it went to the server
        # with all the printed settings, the quick start's command runs as it is
        assert settings["DEDALUS_MACHINE_ID"] == "dm-local"
        quick = _cli(home, "run", "--", "echo", "quick", env=settings)
        assert (quick.returncode, quick.stdout) == (0, b"quick\n")
        assert LOCAL_NOTE not in quick.stderr.decode()
        assert (
            home / "machines" / machine_dirname("dm-cec7a105-ef8c-5f91-a6bd-3e7a22c82f47")
        ).is_dir()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0
    warning = stderr.decode()
    assert "without a sandbox" in warning
    assert settings["DEDALUS_X_API_KEY"] not in warning
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def _lookups(
    home: Path, machine: str, execution_id: str, env: dict[str, str], *flags: str
) -> list[list[Any]]:
    """What get, output, events --json and list print (JSON lines), run side by side."""
    return [
        [json.loads(line) for line in proc.stdout.splitlines()]
        for proc in _cli_parallel(
            home,
            ["get", *flags, machine, execution_id],
            ["output", *flags, machine, execution_id],
            ["events", "--json", *flags, machine, execution_id],
            ["list", *flags, machine],
            env=env,
        )
    ]


def test_lookup_commands_print_json(home: Path, server: dict[str, str]) -> None:
    """get/output/events/list/cancel print the API's objects as JSON."""
    env = _remote(server)
    proc = _cli(
        home,
        "run",
        "--json",
        "--machine-id",
        "dm-47de9a51-8c26-5f16-bcfb-5b41173d1aac",
        "--",
        "echo",
        "x",
        env=env,
    )
    execution = json.loads(proc.stdout)["execution"]
    machine, execution_id = execution["machine_id"], execution["execution_id"]
    got, output, events, listed = _lookups(home, machine, execution_id, env)
    assert [(e["execution_id"], e["status"]) for e in got] == [(execution_id, "succeeded")]
    assert output[0]["stdout"] == "x\n"
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events[-3:]] == ["lifecycle", "stdout", "lifecycle"]
    assert (events[-3]["status"], events[-2]["chunk"]) == ("running", "x\n")
    assert [e["execution_id"] for e in listed] == [execution_id]
    # cancel leaves a finished execution (and its output) alone; delete removes it
    cancelled = _cli(home, "cancel", machine, execution_id, env=env)
    assert cancelled.returncode == 0
    assert json.loads(cancelled.stdout)["status"] == "succeeded"
    kept = _cli(home, "output", machine, execution_id, env=env)
    assert json.loads(kept.stdout)["stdout"] == "x\n"
    deleted = _cli(home, "delete", machine, execution_id, env=env)
    assert deleted.returncode == 0
    gone = _cli(home, "get", machine, execution_id, env=env)
    assert gone.returncode == 125
    assert "404" in _notes(gone.stderr)[0]


def test_ctrl_c_with_cancel_remote_deletes_the_execution(
    home: Path, server: dict[str, str]
) -> None:
    """With --cancel-remote, Ctrl-C cancels the execution on the server before exiting."""
    env = _remote(server)
    machine = "dm-24b8eba8-557c-5e05-bd3e-8864933ac4c0"
    argv = [
        "run",
        "--cancel-remote",
        "--machine-id",
        machine,
        "--",
        "sh",
        "-c",
        "echo $$; sleep 30",
    ]
    with _start(home, *argv, env=env) as proc:
        pid = int(_read_line(proc))
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert "cancelled execution" in stderr.decode()
    listed = [json.loads(line) for line in _cli(home, "list", machine, env=env).stdout.splitlines()]
    assert [e["status"] for e in listed] == ["cancelled"]
    assert _wait_dead(pid)


def test_ctrl_c_says_which_execution_keeps_running(home: Path, server: dict[str, str]) -> None:
    """Without --cancel-remote, Ctrl-C leaves the execution running and says how to find it."""
    env = _remote(server)
    machine = "dm-24b8eba8-557c-5e05-bd3e-8864933ac4c0"
    argv = ["run", "--machine-id", machine, "--", "sh", "-c", "echo $$; sleep 5"]
    with _start(home, *argv, env=env) as proc:
        _read_line(proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130
    listed = [json.loads(line) for line in _cli(home, "list", machine, env=env).stdout.splitlines()]
    running = [e for e in listed if e["status"] == "running"]
    assert len(running) == 1, (listed, stderr)
    where = f"{machine} {running[0]['execution_id']}"
    assert f"keeps running (dedalus-async get {where}; dedalus-async cancel {where}" in (
        stderr.decode()
    )
    _cli(home, "cancel", machine, running[0]["execution_id"], env=env)


def test_an_api_error_with_json_is_one_object_on_stdout(home: Path, server: dict[str, str]) -> None:
    wrong = {"DEDALUS_BASE_URL": server["DEDALUS_BASE_URL"], "DEDALUS_X_API_KEY": "wrong-key-7"}
    argv = [
        "run",
        "--json",
        "--machine-id",
        "dm-24b8eba8-557c-5e05-bd3e-8864933ac4c0",
        "--",
        "true",
    ]
    proc = _cli(home, *argv, env=wrong)
    assert proc.returncode == 125
    (line,) = proc.stdout.splitlines()
    document = json.loads(line)
    assert document["ok"] is False
    assert document["execution"] is None
    assert document["error"]["type"] == "AuthenticationError"
    assert "401" in _notes(proc.stderr)[0]
    assert b"wrong-key-7" not in proc.stdout + proc.stderr


def test_ctrl_c_on_the_local_backend_says_it_stops_the_execution(home: Path) -> None:
    with _start(home, "run", "--", "sh", "-c", "echo $$; sleep 5") as proc:
        pid = int(_read_line(proc))
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert "the local backend stops it on exit" in stderr.decode()
    assert _wait_dead(pid)


def test_truncated_output_is_said_so(home: Path, server: dict[str, str]) -> None:
    """Past the server's cap the CLI prints what was kept and one line about the rest."""
    code = "import sys; sys.stdout.write('a' * 5000)"
    proc = _cli(
        home,
        "run",
        "--machine-id",
        "dm-c16cdbb3-150f-539f-8cfc-ec128ddeaf9f",
        "--",
        sys.executable,
        "-c",
        code,
        env=_remote(server),
    )
    assert proc.returncode == 0
    assert proc.stdout == b"a" * 1000
    notes = _notes(proc.stderr)
    assert any("truncated" in n and "5000" in n and "1000" in n for n in notes), notes


def test_errors_are_one_line_and_never_show_the_key(home: Path, server: dict[str, str]) -> None:
    """A refused key is exit 125 with one line; the key appears nowhere, --debug included."""
    wrong = {"DEDALUS_BASE_URL": server["DEDALUS_BASE_URL"], "DEDALUS_X_API_KEY": "wrong-key-31337"}
    proc = _cli(home, "get", "dm-2f6c0432-4e72-5276-adda-6b1916a48fdd", "exe-y", env=wrong)
    assert proc.returncode == 125
    notes = _notes(proc.stderr)
    assert len(notes) == 1
    assert "401" in notes[0]
    assert proc.stderr.count(b"\n") == 1
    debug = _cli(
        home, "get", "--debug", "dm-2f6c0432-4e72-5276-adda-6b1916a48fdd", "exe-y", env=wrong
    )
    assert debug.returncode == 125
    assert b"Traceback" in debug.stderr  # --debug shows the details...
    assert b"wrong-key-31337" not in debug.stderr + debug.stdout  # ...but not the key
    right = _cli(
        home,
        "get",
        "--debug",
        "dm-2f6c0432-4e72-5276-adda-6b1916a48fdd",
        "exe-y",
        env=_remote(server),
    )
    assert right.returncode == 125
    assert server["DEDALUS_X_API_KEY"].encode() not in right.stderr + right.stdout
    assert b"GET" in right.stderr or b"HTTP 404" in right.stderr


# --- in-process: main() itself, and the pure helpers -------------------------------------
# The same code the subprocess tests run, called directly so that it is measured (and
# cheap): no interpreter start-up, output captured by pytest.


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Dedalus settings in os.environ; local machines under tmp_path."""
    for name in list(os.environ):
        if name.startswith("DEDALUS_"):
            monkeypatch.delenv(name)
    home = tmp_path / "in-process-home"
    monkeypatch.setenv("DEDALUS_LOCAL_HOME", str(home))
    return home


def _main(capsys: pytest.CaptureFixture[bytes], *args: str) -> tuple[int, bytes, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err.decode()


def test_main_runs_locally_in_process(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """main() returns the exit code, streams both outputs, and leaves logging as it was."""
    package = logging.getLogger("dedalus_async")
    before = (package.handlers[:], package.level, package.propagate)
    code, out, err = _main(capsysbinary, "run", "--", "sh", "-c", "echo o; echo e >&2; exit 5")
    assert (code, out) == (5, b"o\n")
    assert "e\n" in err
    assert LOCAL_NOTE in err
    assert (package.handlers, package.level, package.propagate) == before


def test_main_json_wait_timeout(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """--json with --timeout: exit 124 and a JSON object carrying the error and snapshot."""
    code, out, err = _main(capsysbinary, "run", "--json", "--timeout", "0.3", "--", "sleep", "5")
    assert code == EXIT_WAIT_TIMEOUT
    result = json.loads(out)
    assert result["ok"] is False
    assert result["error"]["type"] == "WaitTimeout"
    assert result["execution"]["status"] in ("queued", "running")
    assert "the local backend stops it on exit" in err


def test_main_cancel_remote_on_wait_timeout(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """--cancel-remote with --timeout: the execution is deleted before exit 124."""
    code, _, err = _main(
        capsysbinary, "run", "--cancel-remote", "--timeout", "0.3", "--", "sleep", "5"
    )
    assert code == EXIT_WAIT_TIMEOUT
    assert "cancelled execution" in err
    assert "(cancelled)" in err


def test_main_run_many_to_stdout(
    in_process: Path, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """run-many writes results to stdout; a null field takes the command-line default."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"command": ["echo", "a"], "machine_id": null}\n{"command": ["true"]}\n')
    code, out, _ = _main(
        capsysbinary,
        "run-many",
        "--machine-id",
        "dm-6c9797bf-e8f4-5f12-a798-adeb268cfaf9",
        str(source),
    )
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["execution"]["machine_id"] for r in results] == [
        "dm-6c9797bf-e8f4-5f12-a798-adeb268cfaf9",
        "dm-6c9797bf-e8f4-5f12-a798-adeb268cfaf9",
    ]
    assert [r["stdout"] for r in results] == ["a\n", ""]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json\n", "not JSON"),
        ("[1]\n", "must be a JSON object"),
        ('{"command": "echo hi"}\n', "command must be an array of strings"),
        ('{"command": []}\n', "must not be empty"),
        ('{"command": ["x"], "env": {"A": 1}}\n', "env"),
        ('{"command": ["x"], "timeout": -1}\n', "timeout"),
    ],
)
def test_main_run_many_rejects_bad_lines(
    in_process: Path,
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    content: str,
    expected: str,
) -> None:
    """Each kind of bad line is a usage error naming the line."""
    source = tmp_path / "bad.jsonl"
    source.write_text(content)
    code, out, err = _main(capsysbinary, "run-many", str(source))
    assert (code, out) == (2, b"")
    assert f"{source}:1" in err
    assert expected in err


def test_main_run_many_file_problems(
    in_process: Path, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A missing input or an unwritable output is a usage error before anything runs."""
    code, _, err = _main(capsysbinary, "run-many", str(tmp_path / "missing.jsonl"))
    assert code == 2
    assert "cannot read" in err
    source = tmp_path / "ok.jsonl"
    source.write_text('{"command": ["true"]}\n')
    code, _, err = _main(
        capsysbinary, "run-many", "--output", str(tmp_path / "no" / "such" / "dir"), str(source)
    )
    assert code == 2
    assert "cannot write" in err


def test_main_against_a_server(
    in_process: Path,
    server: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    """Remote mode end to end: run, get, events --follow, list, cancel, errors."""
    for name, value in _remote(server).items():
        monkeypatch.setenv(name, value)
    code, _, err = _main(capsysbinary, "run", "--", "true")
    assert code == 2
    assert "--machine-id is required" in err
    code, out, err = _main(
        capsysbinary, "run", "--json", "--machine-id", "dm-c2a40383-8856-5fb0-84aa-c0dcf1fa2d6d",
        "--timeout", "0.3", "--",
        "sh", "-c", "echo started; sleep 30",
    )  # fmt: skip
    assert code == EXIT_WAIT_TIMEOUT
    assert "it keeps running (dedalus-async get dm-c2a40383-8856-5fb0-84aa-c0dcf1fa2d6d " in err
    execution_id = json.loads(out)["execution"]["execution_id"]
    code, out, _ = _main(
        capsysbinary, "cancel", "dm-c2a40383-8856-5fb0-84aa-c0dcf1fa2d6d", execution_id
    )
    assert (code, json.loads(out)["status"]) == (0, "cancelled")
    code, out, _ = _main(
        capsysbinary,
        "events",
        "--follow",
        "--json",
        "dm-c2a40383-8856-5fb0-84aa-c0dcf1fa2d6d",
        execution_id,
    )
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert events[-1]["status"] == "cancelled"
    assert {"type": "stdout", "chunk": "started\n"}.items() <= events[-2].items()
    code, out, _ = _main(
        capsysbinary, "list", "--limit", "1", "dm-c2a40383-8856-5fb0-84aa-c0dcf1fa2d6d"
    )
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["cancelled"]
    code, out, err = _main(
        capsysbinary, "get", "--debug", "dm-c2a40383-8856-5fb0-84aa-c0dcf1fa2d6d", "exe-missing"
    )
    assert code == EXIT_API_ERROR
    assert "HTTP 404" in err
    assert server["DEDALUS_X_API_KEY"] not in err + out.decode()


def test_main_without_a_subcommand_prints_help(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """No subcommand: the help on stderr and exit 2."""
    code, out, err = _main(capsysbinary)
    assert (code, out) == (2, b"")
    assert "run-many" in err
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0


def _execution(**fields: Any) -> Execution:
    base: dict[str, Any] = {
        "execution_id": "exe-1",
        "machine_id": "dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0",
        "command": ("x",),
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        "status": "failed",
    }
    return Execution(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"status": "succeeded", "exit_code": 0}, 0),
        ({"status": "succeeded"}, 0),
        ({"status": "failed", "exit_code": 3}, 3),
        ({"status": "failed", "exit_code": 300}, EXIT_REMOTE_FAILED),
        ({"status": "failed", "exit_code": -1}, EXIT_REMOTE_FAILED),
        ({"status": "failed", "signal": 9, "error_code": "TIMEOUT"}, 137),
        ({"status": "failed", "exit_code": 0}, EXIT_REMOTE_FAILED),
        ({"status": "failed", "error_code": "COMMAND_NOT_FOUND"}, EXIT_REMOTE_FAILED),
        ({"status": "cancelled", "signal": 9}, EXIT_CANCELLED),
        ({"status": "expired"}, EXIT_EXPIRED),
        ({"status": "something-new"}, EXIT_REMOTE_FAILED),
    ],
)
def test_exit_code_for(fields: dict[str, Any], code: int) -> None:
    """Each way an execution can end maps to its documented exit code."""
    assert exit_code_for(_execution(**fields)) == code


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--timeout", "soon", "--", "true"], "not a number of seconds"),
        (["run", "--timeout", "inf", "--", "true"], "must be a positive number"),
        (["run", "--timeout-ms", "1.5", "--", "true"], "not an integer"),
        (["run", "--timeout-ms", "0", "--", "true"], "must be a positive integer"),
        (["run", "--env", "NOT_SET_ANYWHERE_XYZ", "--", "true"], "is not set here"),
        (["run-many", "--concurrency", "0", "f"], "must be a positive integer"),
        (["serve-local", "--port", "99999"], "a port is 0 to 65535"),
        (["serve-local", "--port", "-1"], "a port is 0 to 65535"),
        (["serve-local", "--port", "http"], "not a port number"),
    ],
)
def test_bad_option_values_are_one_line_usage_errors(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes], args: list[str], expected: str
) -> None:
    """argparse's own errors also come as one line, with a pointer to --help."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsysbinary.readouterr().err.decode()
    assert err.count("\n") == 1
    assert expected in err
    assert "--help" in err


def test_debug_logs_every_request(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """``--debug`` promises a line per request: the create, each poll, the output read."""
    code, out, err = _main(capsysbinary, "run", "--debug", "--", "sh", "-c", "echo hi")
    assert (code, out) == (0, b"hi\n")
    lines = err.splitlines()
    creates = [line for line in lines if "POST /v1/machines/dm-local/executions -> 20" in line]
    polls = [line for line in lines if "GET /v1/machines/dm-local/executions/" in line]
    assert len(creates) == 1
    assert polls  # the events stream and the wait's reads, each with its status
    assert all(" -> 200" in line for line in polls)


@pytest.mark.parametrize("subcommand", ["get", "output", "events", "cancel", "delete"])
def test_a_lookup_without_a_key_says_what_to_set(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes], subcommand: str
) -> None:
    code, out, err = _main(capsysbinary, subcommand, "dm-local", "exe-1")
    assert (code, out) == (2, b"")
    assert "no API key: set DEDALUS_API_KEY" in err
    assert "serve-local" in err
    assert "Session(" not in err


def test_an_empty_machine_id_is_a_usage_error(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """``--machine-id ''`` (an unset shell variable) is refused, not read as the default."""
    code, out, err = _main(capsysbinary, "run", "--machine-id", "", "--", "true")
    assert code == 2
    assert "--machine-id is empty" in err
    assert out == b""


def test_main_reports_how_an_execution_ended(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A signal, a remote timeout and a missing program each get their line and code."""
    code, _, err = _main(capsysbinary, "run", "--", "sh", "-c", "kill -KILL $$")
    assert code == 137
    assert "failed: command killed by SIGKILL (signal 9)" in err
    code, _, err = _main(capsysbinary, "run", "--timeout-ms", "200", "--", "sleep", "5")
    assert code == 137
    assert "TIMEOUT: command exceeded timeout_ms=200 (signal 9)" in err
    code, out, err = _main(capsysbinary, "run", "--json", "--", "no-such-program-xyz")
    assert code == EXIT_REMOTE_FAILED
    assert json.loads(out)["execution"]["error_code"] == "COMMAND_NOT_FOUND"


def test_main_says_when_output_was_truncated(
    in_process: Path,
    server: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    """Both streams past the server's cap: what was kept is printed, one line per stream."""
    for name, value in _remote(server).items():
        monkeypatch.setenv(name, value)
    code = "import sys; sys.stdout.write('o' * 3000); sys.stderr.write('e' * 2000)"
    status, out, err = _main(
        capsysbinary,
        "run",
        "--machine-id",
        "dm-90794f84-6225-5202-a932-d9289d3b7d20",
        "--",
        sys.executable,
        "-c",
        code,
    )
    assert (status, out) == (0, b"o" * 1000)
    assert "stdout was truncated by the server: the command wrote 3000 bytes, 1000" in err
    assert "stderr was truncated by the server: the command wrote 2000 bytes, 1000" in err


async def test_printed_models_decode_to_what_the_server_sent(
    home: Path, server: dict[str, str]
) -> None:
    """get/output/events/list print models in a form our decoder reads back unchanged."""
    env = _remote(server)
    machine = "dm-5d0c1e64-1f7a-5b7e-9d43-2c8f6a1b0e95"
    run = _cli(home, "run", "--json", "--machine-id", machine, "--", "echo", "ü", env=env)
    execution_id = json.loads(run.stdout)["execution"]["execution_id"]
    got, output, events, listed = _lookups(home, machine, execution_id, env)
    key, url = server["DEDALUS_X_API_KEY"], server["DEDALUS_BASE_URL"]
    async with dedalus_async.Session(key, base_url=url, auth_scheme="x-api-key") as session:
        execution = await session.get_execution(machine, execution_id)
        assert [structure(e, Execution) for e in got + listed] == [execution, execution]
        assert structure(output[0], ExecutionOutput) == await session.get_output(
            machine, execution_id
        )
        sent = [e async for e in session.iter_events(machine, execution_id)]
        assert [structure(e, ExecutionEvent) for e in events] == sent


def test_every_subcommand_has_a_command() -> None:
    """The parser's subcommands and the functions that run them are the same set."""
    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(COMMANDS)


def test_main_run_many_reports_a_wait_timeout_on_its_line(
    in_process: Path, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A request's own timeout passing is a not-ok line with the error and the snapshot."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"command": ["sleep", "5"], "timeout": 0.2}\n{"command": ["true"]}\n')
    code, out, _ = _main(capsysbinary, "run-many", str(source))
    assert code == 1
    slow, fast = (json.loads(line) for line in out.splitlines())
    assert (slow["index"], slow["ok"], slow["error"]["type"]) == (0, False, "WaitTimeout")
    assert slow["execution"]["status"] in ("queued", "running")
    message = slow["error"]["message"]
    execution = slow["execution"]
    assert message.startswith(f"execution {execution['execution_id']} did not finish within 0.2 s")
    assert f"dedalus-async get {execution['machine_id']} {execution['execution_id']}" in message
    assert "session." not in message  # the command line's words, not Python
    assert (fast["index"], fast["ok"], fast["error"]) == (1, True, None)


def test_main_input_problems_are_usage_errors(
    in_process: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    """Stdin that is not UTF-8, and a request without a machine where none is implied."""
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    code, out, err = _main(capsysbinary, "run", "--stdin-file", str(binary), "--", "cat")
    assert (code, out) == (2, b"")
    assert "--stdin-file must be UTF-8 text" in err
    monkeypatch.setenv("DEDALUS_X_API_KEY", "a-configured-key")  # not local: no dm-local
    source = tmp_path / "in.jsonl"
    source.write_text('{"command": ["true"]}\n')
    code, out, err = _main(capsysbinary, "run-many", str(source))
    assert (code, out) == (2, b"")
    assert f"{source}:1: no machine_id, and no --machine-id was given" in err


# --- the local backend's records, across processes ---------------------------------------


def test_ids_run_printed_locally_are_looked_at_by_later_processes(home: Path) -> None:
    """run --local prints an ID; get/output/events/list/cancel/delete --local find it later."""
    proc = _cli(home, "run", "--local", "--json", "--", "sh", "-c", "echo x; echo y >&2; exit 3")
    execution = json.loads(proc.stdout)["execution"]
    machine, execution_id = execution["machine_id"], execution["execution_id"]
    assert machine == "dm-local"
    got, output, events, listed = _lookups(home, machine, execution_id, {}, "--local")
    assert got == [execution]
    assert (output[0]["stdout"], output[0]["stderr"]) == ("x\n", "y\n")
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert (events[-1]["status"], events[-1]["exit_code"]) == ("failed", 3)
    assert listed == [execution]
    cancelled = _cli(home, "cancel", "--local", machine, execution_id)
    assert (cancelled.returncode, json.loads(cancelled.stdout)) == (0, execution)
    deleted = _cli(home, "delete", "--local", machine, execution_id)
    assert deleted.returncode == 0
    gone = _cli(home, "get", "--local", machine, execution_id)
    assert gone.returncode == EXIT_API_ERROR
    assert "404" in _notes(gone.stderr)[0]
    # without --local (and without a key) the message says what to add
    keyless = _cli(home, "get", machine, execution_id)
    assert keyless.returncode == 2
    assert "add --local" in _notes(keyless.stderr)[0]


def test_a_run_killed_outright_reads_failed_and_its_command_is_stopped(home: Path) -> None:
    """SIGKILL leaves no chance to clean up: the next reader ends the record and the
    orphaned command."""
    with _start(home, "run", "--local", "--", "sh", "-c", "echo $$; sleep 30") as proc:
        pid = int(_read_line(proc))
        proc.kill()
        proc.wait(timeout=10)
    assert _alive(pid)  # the command outlived its owner...
    listed = _cli(home, "list", "--local", "dm-local")
    (execution,) = (json.loads(line) for line in listed.stdout.splitlines())
    assert (execution["status"], execution["error_code"]) == (
        "failed",
        "execution_runner_interrupted",
    )
    assert f"process group {pid}) was killed" in execution["error_message"]
    assert _wait_dead(pid)  # ...until the next look at it
    again = _cli(home, "get", "--local", "dm-local", execution["execution_id"])
    assert json.loads(again.stdout) == execution  # written back: every reader agrees


def test_serve_local_and_run_local_share_one_data_dir(home: Path) -> None:
    """At once: serve-local answers for run --local's execution and cancels it; --local
    lookups list serve-local's executions."""
    machine = "dm-3b1f07c2-95d4-5e8a-b6c1-7f2e9d4a8c05"
    with _serving(home) as (_, settings):
        argv = ["run", "--local", "--machine-id", machine, "--", "sh", "-c", "echo $$; sleep 30"]
        with _start(home, *argv) as runner:
            pid = int(_read_line(runner))
            served = _cli(
                home, "run", "--json", "--machine-id", machine, "--", "true", env=settings
            )
            served_id = json.loads(served.stdout)["execution"]["execution_id"]
            listed = [
                json.loads(line)
                for line in _cli(home, "list", "--local", machine).stdout.splitlines()
            ]
            assert [e["status"] for e in listed] == ["running", "succeeded"]
            assert listed[1]["execution_id"] == served_id
            running_id = listed[0]["execution_id"]
            through_server = _cli(home, "get", machine, running_id, env=settings)
            assert json.loads(through_server.stdout)["status"] == "running"
            cancel = _cli(home, "cancel", machine, running_id, env=settings)
            assert json.loads(cancel.stdout)["status"] == "cancelled"
            _, stderr = runner.communicate(timeout=10)
        assert runner.returncode == EXIT_CANCELLED, stderr
        assert _wait_dead(pid)
        final = _cli(home, "get", "--local", machine, running_id)
        assert (json.loads(final.stdout)["status"], json.loads(final.stdout)["signal"]) == (
            "cancelled",
            9,
        )


def test_local_lookups_refuse_a_base_url(in_process: Path, capsysbinary: Any) -> None:
    code, out, err = _main(capsysbinary, "get", "--local", "--base-url", "https://x", "dm-1", "e")
    assert (code, out) == (2, b"")
    assert "--base-url and --local do not go together" in err


# --- event cursors ------------------------------------------------------------------------


def _events_json(capsys: pytest.CaptureFixture[bytes], *args: str) -> list[dict[str, Any]]:
    code, out, err = _main(capsys, "events", "--json", "--local", *args)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_each_event_cursor_resumes_right_after_it(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """Over several pages (the server's page is 50), --cursor of event k gives k+1 on, once."""
    # the streams take turns, so each write is an event of its own
    script = (
        "import sys, time\n"
        "for i in range(150):\n"
        "    for s in (sys.stdout, sys.stderr): s.write(f'{i}\\n'); s.flush(); time.sleep(0.002)\n"
    )
    code, out, _ = _main(capsysbinary, "run", "--json", "--", sys.executable, "-c", script)
    assert code == 0
    execution_id = json.loads(out)["execution"]["execution_id"]
    every = _events_json(capsysbinary, "dm-local", execution_id)
    assert len(every) > 60  # two pages at least (the writes of a busy machine bunch up)
    assert all(e["cursor"] == f"{e['sequence']}:{e['cursor'].split(':', 1)[1]}" for e in every)
    for k in (0, 1, 48, 49, 50, 51, len(every) - 2, len(every) - 1):
        after = _events_json(capsysbinary, "--cursor", every[k]["cursor"], "dm-local", execution_id)
        assert [e["sequence"] for e in after] == [e["sequence"] for e in every[k + 1 :]], k
    # the text form: one line per event, a chunk as a JSON string
    code, out, err = _main(capsysbinary, "events", "--local", "dm-local", execution_id)
    lines = out.decode().splitlines()
    assert len(lines) == len(every)
    assert lines[0].startswith("#1 ")
    assert lines[0].endswith(" lifecycle queued")
    assert lines[-1].endswith(" lifecycle succeeded exit_code=0")
    assert err == ""  # a finished execution: nothing to continue


@pytest.mark.parametrize(
    ("cursor", "expected"),
    [
        ("", "argument --cursor: not a cursor: ''"),
        ("a b", "argument --cursor: not a cursor"),
        ("7:\x01", "argument --cursor: not a cursor"),
        ("x" * 3000, "argument --cursor: not a cursor"),
        ("c999", "--cursor 'c999' is not a cursor of this execution's events"),
        ("3:nope", "--cursor '3:nope' is not a cursor of this execution's events"),
    ],
)
def test_a_bad_cursor_is_a_usage_error_naming_the_flag(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes], cursor: str, expected: str
) -> None:
    code, out, _ = _main(capsysbinary, "run", "--json", "--", "true")
    execution_id = json.loads(out)["execution"]["execution_id"]
    try:
        code, out, err = _main(
            capsysbinary, "events", "--local", "--cursor", cursor, "dm-local", execution_id
        )
    except SystemExit as exc:  # refused by the parser
        code, err = int(str(exc.code)), capsysbinary.readouterr().err.decode()
    assert code == 2
    assert expected in err
    assert "SEQUENCE:SERVER_CURSOR" in err


def test_events_help_states_the_cursor_format() -> None:
    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = subparsers.choices["events"].format_help()
    assert "SEQUENCE:SERVER_CURSOR" in " ".join(text.split())
    assert "events --json" in text


def test_ctrl_c_on_events_follow_prints_the_command_to_read_on(
    home: Path, server: dict[str, str]
) -> None:
    """The printed command continues after the last event shown, to the end."""
    env = _remote(server)
    machine = "dm-6a2d9e14-3c7b-5f08-a1e5-9d4c2b7f3e60"
    run = _cli(
        home, "run", "--json", "--timeout", "1", "--machine-id", machine, "--",
        "sh", "-c", "echo first; sleep 30", env=env,
    )  # fmt: skip
    execution_id = json.loads(run.stdout)["execution"]["execution_id"]
    with _start(home, "events", "--follow", machine, execution_id, env=env) as proc:
        shown: list[str] = []
        while not shown or '"first\\n"' not in shown[-1]:
            shown.append(_read_line(proc).decode())
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130
    (resume,) = [n for n in _notes(stderr) if "to read on:" in n]
    assert "interrupted: the execution keeps running" in resume
    argv = shlex.split(resume.split("to read on: ", 1)[1])
    last_sequence = int(shown[-1].split()[0].lstrip("#"))
    assert argv[:3] == ["dedalus-async", "events", "--follow"]
    assert argv[-2] == "--cursor"
    assert argv[-1].startswith(f"{last_sequence}:")
    _cli(home, "cancel", machine, execution_id, env=env)
    rest = _cli(home, *argv[1:], env=env)
    assert rest.returncode == 0
    lines = rest.stdout.decode().splitlines()
    assert lines[0].startswith(f"#{last_sequence + 1} ")
    assert lines[-1].split()[2:4] == ["lifecycle", "cancelled"]


def test_events_of_an_unfinished_execution_say_how_to_read_on(
    home: Path, server: dict[str, str]
) -> None:
    env = _remote(server)
    machine = "dm-6a2d9e14-3c7b-5f08-a1e5-9d4c2b7f3e60"
    run = _cli(
        home, "run", "--json", "--timeout", "0.5", "--machine-id", machine, "--",
        "sleep", "30", env=env,
    )  # fmt: skip
    execution_id = json.loads(run.stdout)["execution"]["execution_id"]
    proc = _cli(home, "events", "--json", machine, execution_id, env=env)
    _cli(home, "cancel", machine, execution_id, env=env)
    last = json.loads(proc.stdout.splitlines()[-1])
    (note,) = _notes(proc.stderr)
    assert "the execution has not ended; to read on: dedalus-async events --follow" in note
    assert note.endswith(f"--cursor {last['cursor']}")


# --- every numeric flag -----------------------------------------------------------------

_NOT_NUMBERS = ["", "abc", "1,5", "0x10"]
_ALWAYS_BAD = ["-1", "nan", "inf", "-inf", "1e999", "9" * 30, *_NOT_NUMBERS]
#: (subcommand and what it needs, flag, values it refuses besides _ALWAYS_BAD, largest valid)
NUMERIC_FLAGS: list[tuple[list[str], str, list[str], str]] = [
    (["run"], "--timeout", ["0", "31622401"], "31622400"),
    (["run"], "--timeout-ms", ["0", "1.5", "1e3", "31622400001"], "31622400000"),
    (["run-many", "f.jsonl"], "--timeout", ["0", "31622401"], "31622400"),
    (["run-many", "f.jsonl"], "--concurrency", ["0", "2.5", "10001"], "10000"),
    (["run-many", "f.jsonl"], "--reservation-max-age", ["0", "31622401"], "31622400"),
    (["list", "dm-1"], "--limit", ["0", "1.0", "1001"], "1000"),
    (["serve-local"], "--port", ["65536", "8080.0"], "65535"),
    (["serve-local"], "--output-cap", ["0", "1073741825"], "1073741824"),
    (["serve-local"], "--idle-timeout", ["0", "31622401"], "31622400"),
    (["machines", "create"], "--vcpu", ["0", "1024.5"], "1024"),
    (["machines", "create"], "--memory-mib", ["0", "1.5", "4194305"], "4194304"),
    (["machines", "create"], "--storage-gib", ["0", "2.5", "1048577"], "1048576"),
    (["machines", "list"], "--limit", ["0", "1.0", "1001"], "1000"),
    (["machines", "wait", "dm-1"], "--timeout", ["0", "31622401"], "31622400"),
    (
        ["batch", "submit", "f.jsonl", "--journal", "postgresql://u@h/d"],
        "--max-in-flight",
        ["0", "2.5", "10001"],
        "10000",
    ),
    (
        ["batch", "submit", "f.jsonl", "--journal", "postgresql://u@h/d"],
        "--rate",
        ["0", "1000001"],
        "1000000",
    ),
    (
        ["batch", "work", "--journal", "postgresql://u@h/d"],
        "--concurrency",
        ["0", "2.5", "10001"],
        "10000",
    ),
    (
        ["batch", "work", "--journal", "postgresql://u@h/d"],
        "--lease",
        ["0", "31622401"],
        "31622400",
    ),
]


def _numeric_flags(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> set[Any]:
    """(subcommand path, flag) of every option with a numeric type, nested ones included."""
    found: set[Any] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _numeric_flags(sub, (*path, name))
        elif action.type in NUMERIC_TYPES:
            found.add((" ".join(path), action.option_strings[-1]))
    return found


def _command_path(args: list[str]) -> str:
    """The subcommand words at the start of ``args`` (``machines wait`` of
    ``["machines", "wait", "dm-1"]``)."""
    words = []
    parser: argparse.ArgumentParser = build_parser()
    for word in args:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        words.append(word)
        parser = subs[0].choices[word]
    return " ".join(words)


def test_the_table_covers_every_numeric_flag() -> None:
    """A numeric option added to the parser must be added to NUMERIC_FLAGS too."""
    numeric = _numeric_flags(build_parser())
    assert ("machines create", "--vcpu") in numeric  # nested subcommands are looked at
    assert numeric == {(_command_path(args), flag) for args, flag, _, _ in NUMERIC_FLAGS}


@pytest.mark.parametrize(
    ("args", "flag", "value"),
    [
        pytest.param(args, flag, value, id=f"{' '.join(args[:2])} {flag} {value[:12]!r}")
        for args, flag, bad, _ in NUMERIC_FLAGS
        for value in [*bad, *_ALWAYS_BAD]
    ],
)
def test_a_bad_number_is_a_usage_error_naming_the_flag(
    capsysbinary: pytest.CaptureFixture[bytes], args: list[str], flag: str, value: str
) -> None:
    """Zero, negative, NaN, infinite, absurdly large or not a number: exit 2, one line."""
    with pytest.raises(SystemExit) as exc:
        main([*args, f"{flag}={value}"])
    assert exc.value.code == 2
    err = capsysbinary.readouterr().err.decode()
    assert err.count("\n") == 1
    assert f"argument {flag}: " in err
    assert "--help" in err


@pytest.mark.parametrize(("args", "flag", "largest"), [(a, f, v) for a, f, _, v in NUMERIC_FLAGS])
def test_the_largest_value_of_each_numeric_flag_is_taken(
    args: list[str], flag: str, largest: str
) -> None:
    parsed = build_parser().parse_args([*args, flag, largest])
    assert float(getattr(parsed, flag.lstrip("-").replace("-", "_"))) == float(largest)


# --- the command line's words, not Python's ------------------------------------------------

_PYTHON_WORDS = ("Session(", "allow_insecure_http", "session.", "None", "api_key=", "int(", "['")


@pytest.mark.parametrize(
    ("env", "args", "expected", "hidden"),
    [
        (
            {"DEDALUS_BASE_URL": "http://example.com"},
            ["get", "dm-1", "exe-1"],
            "DEDALUS_BASE_URL=http://example.com: plain http to example.com",
            None,
        ),
        (
            {},
            ["list", "--base-url", "http://10.1.2.3:8080", "dm-1"],
            "--base-url=http://10.1.2.3:8080: plain http to 10.1.2.3",
            None,
        ),
        (
            {"DEDALUS_BASE_URL": "https://user:hunter2@example.com"},
            ["get", "dm-1", "exe-1"],
            "DEDALUS_BASE_URL must not carry credentials",
            "hunter2",
        ),
        (
            {},
            ["get", "--base-url", "ftp://example.com", "dm-1", "exe-1"],
            "--base-url='ftp://example.com' is not an http(s) URL",
            None,
        ),
        (
            {"DEDALUS_BASE_URL": "https://example.com/?x=1"},
            ["get", "dm-1", "exe-1"],
            "a base URL has no query or fragment",
            None,
        ),
        (
            {"DEDALUS_ORG_ID": "org\nX-Injected: 1"},
            ["get", "dm-1", "exe-1"],
            "DEDALUS_ORG_ID must not contain line breaks",
            None,
        ),
    ],
)
def test_settings_problems_name_the_flag_or_variable(
    in_process: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
    env: dict[str, str],
    args: list[str],
    expected: str,
    hidden: str | None,
) -> None:
    monkeypatch.setenv("DEDALUS_X_API_KEY", "a-configured-key")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = _main(capsysbinary, *args)
    assert (code, out) == (2, b"")
    assert expected in err
    assert not [word for word in _PYTHON_WORDS if word in err], err
    assert hidden is None or hidden not in err


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"command": ["x"], "timeout": -1}', "timeout must be a positive number of seconds"),
        ('{"command": ["x"], "timeout": "soon"}', "timeout must be a positive number"),
        ('{"command": ["x"], "timeout": NaN}', "timeout must be a positive number"),
        ('{"command": ["x"], "timeout": 1e10}', "at most 31622400"),
        ('{"command": ["x"], "timeout": true}', "timeout must be a positive number"),
        ('{"command": ["x"], "timeout_ms": 1.5}', "timeout_ms must be a positive whole number"),
        ('{"command": ["x"], "timeout_ms": 0}', "timeout_ms must be a positive whole number"),
        ('{"command": "echo hi"}', 'e.g. ["sh", "-c", "echo hi"]'),
        ('{"command": ["x", 1]}', "command must be an array of strings"),
        ('{"command": ["x"], "env": {"A": 1}}', "env must be an object whose values are strings"),
        ('{"command": ["x"], "env": ["A=1"]}', "env must be an object"),
        ('{"command": ["x"], "cwd": 3}', "cwd must be a string"),
        ('{"command": ["x"], "stdin": {}}', "stdin must be a string"),
        ('{"command": ["x"], "machine_id": 7}', "machine_id must be a string"),
        ('{"command": ["x"], "idempotency_key": "a b"}', "idempotency_key must be 1-255"),
    ],
)
def test_run_many_line_problems_are_said_in_json_terms(
    in_process: Path,
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    line: str,
    expected: str,
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(line + "\n")
    code, out, err = _main(capsysbinary, "run-many", str(source))
    assert (code, out) == (2, b"")
    assert f"{source}:1: " in err
    assert expected in err
    assert not [word for word in _PYTHON_WORDS if word in err], err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["get", "", "exe-1"], "argument MACHINE_ID: must not be empty"),
        (["get", "dm-1", "a/b"], "argument EXECUTION_ID: must not contain '/'"),
        (["list", "x" * 300], "argument MACHINE_ID: is 300 characters long"),
        (["run", "--machine-id", "..", "--", "true"], "argument --machine-id: '..' is not an ID"),
        (["run", "--idempotency-key", "a b", "--", "true"], "argument --idempotency-key: must"),
    ],
)
def test_ids_and_keys_are_checked_as_arguments(
    capsysbinary: pytest.CaptureFixture[bytes], args: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsysbinary.readouterr().err.decode()
    assert expected in err
    assert "machine_id" not in err
    assert "idempotency_key" not in err


# --- Ctrl-C on run-many -------------------------------------------------------------------


def test_ctrl_c_on_run_many_writes_what_finished_and_says_what_keeps_running(
    home: Path, server: dict[str, str], tmp_path: Path
) -> None:
    env = _remote(server)
    machine = "dm-8e4c1a7b-2d95-5f3e-b0a6-4c9d7e2f1b83"
    source = tmp_path / "jobs.jsonl"
    slow = '{"command": ["sleep", "30"]}\n'
    source.write_text(slow + '{"command": ["echo", "quick"]}\n' + slow)
    with _start(home, "run-many", "--machine-id", machine, str(source), env=env) as proc:
        deadline = time.monotonic() + 15
        while True:  # the quick one has finished; its line waits for the first one's
            listed = _cli(home, "list", machine, env=env).stdout.splitlines()
            statuses = [json.loads(line)["status"] for line in listed]
            if statuses.count("succeeded") == 1 and statuses.count("running") == 2:
                break
            assert time.monotonic() < deadline, statuses
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130
    (line,) = (json.loads(raw) for raw in stdout.splitlines())
    assert (line["index"], line["stdout"]) == (1, "quick\n")
    (note,) = [n for n in _notes(stderr) if "interrupted" in n and "results" in n]
    assert "run-many interrupted: 1 of 3 results written on stdout" in note
    assert 'out of order: each line has its input "index"' in note
    assert "up to 2 executions keep running on the server" in note
    assert f"dedalus-async list {machine}" in note
    for raw in _cli(home, "list", machine, env=env).stdout.splitlines():
        _cli(home, "cancel", machine, json.loads(raw)["execution_id"], env=env)


def test_ctrl_c_on_run_many_locally_says_the_backend_stops_them(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "jobs.jsonl"
    source.write_text('{"command": ["sh", "-c", "echo $$; sleep 30"]}\n')
    out = tmp_path / "results.jsonl"
    with _start(home, "run-many", "--output", str(out), str(source)) as proc:
        deadline = time.monotonic() + 15
        while "running" not in _cli(home, "list", "--local", "dm-local").stdout.decode():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert out.read_bytes() == b""
    (note,) = [n for n in _notes(stderr) if "interrupted" in n and "results" in n]
    assert f"0 of 1 results written to {out}" in note
    assert "the local backend stops the 1 still running on exit" in note
    listed = _cli(home, "list", "--local", "dm-local").stdout
    assert json.loads(listed)["status"] == "cancelled"


def test_arguments_that_are_not_utf8_get_command_line_advice(home: Path) -> None:
    """Bytes the shell passed that UTF-8 cannot carry: exit 2, and no Python advice."""
    for argv in (
        [b"run", b"--local", b"--", b"echo", b"\xff"],
        [b"get", b"--local", b"dm-1", b"\xff"],
    ):
        proc = subprocess.run(
            [sys.executable.encode(), b"-m", b"dedalus_async", *argv],
            capture_output=True,
            env=_base_env(home),
            cwd=home.parent,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 2
        (error,) = [n for n in _notes(proc.stderr) if "error:" in n]
        assert "give it as UTF-8 text" in error
        assert "errors=" not in error


async def test_an_error_while_reading_events_prints_where_to_read_on(home: Path) -> None:
    """A server that fails after the first page: exit 125, and the command to read on
    names the cursor after the last event printed; a failure before any, no such line."""

    async def events(request: web.Request) -> web.Response:
        if request.query.get("cursor") == "page-2":
            return web.json_response(
                {"error_code": "NOT_FOUND", "message": "gone", "retryable": False}, status=404
            )
        items = [
            {"at": "2026-01-01T00:00:00.000Z", "sequence": n, "type": "stdout", "chunk": "x"}
            for n in (1, 2)
        ]
        return web.json_response({"items": items, "next_cursor": "page-2"})

    app = web.Application()
    app.router.add_get("/v1/machines/{m}/executions/{e}/events", events)
    async with serving(app) as url:
        env = {**_base_env(home), "DEDALUS_BASE_URL": url, "DEDALUS_X_API_KEY": "k-123456"}
        for execution_id, printed in (("exe-1", 2), ("exe-2", 0)):
            argv = ["events", "dm-1", execution_id]
            if printed == 0:
                argv += ["--cursor", "0:page-2"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dedalus_async", *argv,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=home.parent,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == EXIT_API_ERROR
            assert len(out.splitlines()) == printed
            notes = [n for n in _notes(err) if "to read on" in n]
            if printed:
                (note,) = notes
                assert note.endswith(
                    "reading stopped; to read on: dedalus-async events --follow dm-1 exe-1 "
                    "--cursor 2:page-2"
                )
            else:
                assert notes == []


# --- machines ------------------------------------------------------------------------------


def _machine_json(capsys: pytest.CaptureFixture[bytes], *args: str) -> tuple[int, Any, str]:
    code, out, err = _main(capsys, "machines", *args, "--local", "--json")
    return code, json.loads(out), err


def test_machines_on_the_local_backend_in_process(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """create, get, list, sleep, wait (reached and timed out), wake, delete, and a wait
    that can never end: exit codes, one line per machine, --json's object."""
    code, out, err = _main(
        capsysbinary, "machines", "create", "--local", "--vcpu", "0.5", "--autosleep", "15m"
    )
    assert (code, err) == (0, "")
    machine_id, phase, *rest = out.decode().split()
    assert phase == "running"
    assert rest == ["vcpu=0.5", "memory_mib=4096", "storage_gib=10", "autosleep=900s"]
    assert (in_process / "machines" / machine_dirname(machine_id)).is_dir()
    code, document, _ = _machine_json(capsysbinary, "get", machine_id)
    assert code == 0
    assert document["ok"] is True
    assert document["error"] is None
    assert (document["machine"]["machine_id"], document["machine"]["phase"]) == (
        machine_id,
        "running",
    )
    assert document["machine"]["status"]["phase"] == "running"  # GET nests the lifecycle
    code, out, _ = _main(capsysbinary, "machines", "sleep", "--local", machine_id)
    assert (code, out.decode().split()[:2]) == (0, [machine_id, "sleeping"])
    code, out, err = _main(
        capsysbinary, "machines", "wait", "--local", machine_id, "--timeout", "0.3"
    )
    assert code == EXIT_WAIT_TIMEOUT
    assert out.decode().split()[:2] == [machine_id, "sleeping"]  # where it stood
    assert _notes(err.encode()) == [
        f"dedalus-async: error: machine {machine_id} was still sleeping after --timeout 0.3 s "
        f"of waiting for running; to keep following it: dedalus-async machines wait --local "
        f"{machine_id} --until running"
    ]
    code, document, err = _machine_json(
        capsysbinary, "wait", machine_id, "--until", "sleeping", "--timeout", "5"
    )
    assert (code, document["machine"]["phase"], err) == (0, "sleeping", "")
    code, out, _ = _main(capsysbinary, "machines", "wake", "--local", machine_id)
    assert (code, out.decode().split()[1]) == (0, "running")
    code, out, _ = _main(capsysbinary, "machines", "list", "--local")
    assert [line.split()[:2] for line in out.decode().splitlines()] == [[machine_id, "running"]]
    code, out, _ = _main(capsysbinary, "machines", "list", "--local", "--json", "--limit", "1")
    assert [json.loads(line)["machine_id"] for line in out.splitlines()] == [machine_id]
    code, out, _ = _main(capsysbinary, "machines", "delete", "--local", machine_id)
    assert (code, out.decode().split()[1]) == (0, "destroyed")
    assert not (in_process / "machines" / machine_dirname(machine_id)).exists()
    code, document, err = _machine_json(capsysbinary, "wait", machine_id, "--timeout", "5")
    assert code == EXIT_REMOTE_FAILED
    assert document["ok"] is False
    assert document["machine"]["phase"] == "destroyed"
    assert document["error"]["type"] == "MachineStateError"
    assert f"machine {machine_id} is destroyed: it will never be running" in err
    code, out, _ = _main(
        capsysbinary, "machines", "wait", "--local", machine_id, "--until", "destroyed"
    )
    assert (code, out.decode().split()[1]) == (0, "destroyed")


def test_machines_errors_are_one_line_in_command_line_terms(
    in_process: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A machine unknown: exit 125 (--json: the error object); bad values: exit 2 naming
    the flag, before any request; no key and no --local: what to set."""
    code, document, err = _machine_json(capsysbinary, "get", "dm-unknown")
    assert code == EXIT_API_ERROR
    assert document == {
        "ok": False,
        "machine": None,
        "error": {"type": "NotFoundError", "message": document["error"]["message"]},
    }
    assert "machine dm-unknown not found" in err
    for argv, flag in (
        (["create", "--autosleep", "5 min"], "argument --autosleep: '5 min' is not a duration"),
        (["wait", "dm-1", "--until", "starting"], "argument --until: invalid choice"),
        (["get", "a/b"], "argument MACHINE_ID"),
        (["wake", "dm-1", "--idempotency-key", "a b"], "argument --idempotency-key"),
        ([], "the following arguments are required: COMMAND"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["machines", *argv])
        assert exc.value.code == 2
        err = capsysbinary.readouterr().err.decode()
        assert err.count("\n") == 1
        assert flag in err
    code, _, err = _main(capsysbinary, "machines", "list")
    assert code == 2
    assert "no API key: set DEDALUS_API_KEY" in err


def test_machines_made_by_one_process_are_seen_by_the_next(home: Path) -> None:
    """The local backend's machines outlive the process that made them: a later
    `machines` (and a `run` on one) in another process finds them as they were left."""
    created = _cli(home, "machines", "create", "--local", "--autosleep", "never")
    assert created.returncode == 0, created.stderr
    machine_id = created.stdout.decode().split()[0]
    slept = _cli(home, "machines", "sleep", "--local", machine_id)
    assert slept.returncode == 0, slept.stderr
    got, listed = _cli_parallel(
        home, ["machines", "get", "--local", machine_id], ["machines", "list", "--local"]
    )
    assert got.stdout.decode().split()[:2] == [machine_id, "sleeping"]
    assert [line.split()[0] for line in listed.stdout.decode().splitlines()] == [machine_id]
    ran = _cli(home, "run", "--local", "--machine-id", machine_id, "--", "pwd")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.decode().strip() == os.path.realpath(
        home / "machines" / machine_dirname(machine_id)
    )
    woken = _cli(home, "machines", "get", "--local", machine_id)
    assert woken.stdout.decode().split()[:2] == [machine_id, "running"]  # the run woke it


async def test_machines_wait_against_a_server_whose_machine_fails(
    home: Path, live_fake: FakeDedalus
) -> None:
    """Against a server: a wait that times out says where the machine stood (124); a
    machine that fails mid-wake ends the wait at once with its error (126); --debug logs
    the requests and never the key."""
    live_fake.machine_timings = MachineTimings(placement=0, start=0, wake=30, stop=0, destroy=0)
    machine = live_fake.add_machine("dm-cli-wait", autosleep_seconds=0, running=True)
    env = {
        **_base_env(home),
        "DEDALUS_BASE_URL": live_fake.base_url,
        "DEDALUS_X_API_KEY": API_KEY,
    }

    async def cli(*argv: str) -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dedalus_async", "machines", *argv,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=home.parent,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out, err

    code, out, err = await cli("sleep", "dm-cli-wait")
    assert (code, out.split()[1]) == (0, b"sleeping"), err
    code, out, err = await cli("wake", "dm-cli-wait")
    assert (code, out.split()[1]) == (0, b"starting")
    code, out, err = await cli("wait", "dm-cli-wait", "--timeout", "0.5")
    assert code == EXIT_WAIT_TIMEOUT
    assert out.split()[:2] == [b"dm-cli-wait", b"starting"]
    assert (
        "was still starting (desired state running) after --timeout 0.5 s of waiting for running"
        in err.decode()
    )
    live_fake.fail_machine(machine.machine_id, "disk on fire")  # fails at once
    code, out, err = await cli("wait", "--debug", "dm-cli-wait", "--timeout", "60")
    assert code == EXIT_REMOTE_FAILED
    assert out.split()[:2] == [b"dm-cli-wait", b"failed"]
    (error,) = [n for n in _notes(err) if "error:" in n]
    assert "machine dm-cli-wait failed while waiting for running: disk on fire" in error
    assert "dedalus-async machines delete dm-cli-wait" in error
    assert "GET /v1/machines/dm-cli-wait -> 200" in err.decode()
    assert API_KEY not in (out + err).decode()
