"""The local backend's bounds: the key before the body, a body size limit, output stored
once, coalesced output events, an event cap. Real processes, real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dedalus_async import Session
from dedalus_async._local import LocalBackend

MACHINE = "dm-3c9d2f1a-4b5e-5c6d-8e7f-9a0b1c2d3e4f"
EXECS = f"/v1/machines/{MACHINE}/executions"


@pytest.fixture
async def small_body_backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    """A local backend that reads request bodies of 64 KiB at most."""
    backend = LocalBackend(data_dir=tmp_path, wake_delay=0, announce=False, max_body_size=65536)
    async with backend:
        yield backend
    assert backend.server.errors == []


@pytest.fixture
async def capped_events_backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    """A local backend whose executions log 10 events at most."""
    backend = LocalBackend(data_dir=tmp_path, wake_delay=0, announce=False, max_events=10)
    async with backend:
        yield backend
    assert backend.server.errors == []


async def _raw_request(
    base_url: str, head: str, body: bytes = b"", *, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (request line and headers) and ``body`` as they are on a fresh
    connection, and read the answer; fails if none comes within ``timeout``."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = raw_head.decode().split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        answer = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
        return int(lines[0].split()[1]), headers, answer
    finally:
        writer.close()


def _create_head(path: str, length: int, key: str | None) -> str:
    auth = f"x-api-key: {key}\n" if key is not None else ""
    return (
        f"POST {path} HTTP/1.1\nHost: localhost\n{auth}Idempotency-Key: k1\n"
        f"Content-Type: application/json\nContent-Length: {length}\n"
    )


# --- the key before the body; a bounded body ------------------------------------------


@pytest.mark.parametrize(("key", "code"), [(None, "AUTH_REQUIRED"), ("wrong", "AUTH_INVALID")])
async def test_a_body_without_the_right_key_is_refused_before_it_is_read(
    local_backend: LocalBackend, key: str | None, code: str
) -> None:
    """Headers announce 60 MiB; 64 KiB of it are sent and the 401 comes anyway, at once,
    and the backend's parser never buffered the body."""
    status, headers, body = await _raw_request(
        local_backend.base_url, _create_head(EXECS, 60 * 1024 * 1024, key), b"x" * 65536
    )
    assert status == 401
    answer = json.loads(body)
    assert answer["error_code"] == code
    assert answer["retryable"] is False
    assert headers["x-request-id"].startswith("req-")
    assert headers["connection"].lower() == "close"
    assert local_backend.server.executions == {}


async def test_the_key_is_checked_before_the_body_is_parsed(local_backend: LocalBackend) -> None:
    """A wrong key with a body that is not even JSON is a 401, not a 422."""
    status, _, body = await _raw_request(
        local_backend.base_url, _create_head(EXECS, 9, "wrong"), b"not json!"
    )
    assert (status, json.loads(body)["error_code"]) == (401, "AUTH_INVALID")


async def test_a_body_announced_too_large_is_a_413_without_being_read(
    small_body_backend: LocalBackend,
) -> None:
    """The Content-Length alone is enough: nothing of the body was sent."""
    status, headers, body = await _raw_request(
        small_body_backend.base_url, _create_head(EXECS, 65537, small_body_backend.api_key)
    )
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"].startswith("req-")
    answer = json.loads(body)
    assert answer["error_code"] == "PAYLOAD_TOO_LARGE"
    assert answer["retryable"] is False
    assert "65536" in answer["message"]


async def test_a_chunked_body_over_the_limit_is_a_413_in_json(
    small_body_backend: LocalBackend,
) -> None:
    """Without a Content-Length the body is read up to the limit, then refused."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * 20000

    headers = {"x-api-key": small_body_backend.api_key, "Idempotency-Key": "k2"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(small_body_backend.base_url + EXECS, data=chunks(), headers=headers) as resp,
    ):
        assert resp.status == 413
        answer = await resp.json()
    assert answer["error_code"] == "PAYLOAD_TOO_LARGE"
    assert answer["retryable"] is False
    assert small_body_backend.server.executions == {}


async def test_a_body_of_exactly_the_limit_is_accepted(small_body_backend: LocalBackend) -> None:
    """stdin travels in the create body: one filling the limit to the byte still runs."""
    body: dict[str, Any] = {"command": ["wc", "-c"], "stdin": ""}
    body["stdin"] = "y" * (65536 - len(json.dumps(body).encode()))
    data = json.dumps(body).encode()
    assert len(data) == 65536
    headers = {
        "x-api-key": small_body_backend.api_key,
        "Idempotency-Key": "k3",
        "Content-Type": "application/json",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(small_body_backend.base_url + EXECS, data=data, headers=headers) as resp,
    ):
        assert resp.status == 200
        created = await resp.json()
    async with small_body_backend.session() as session:
        handle = session.execution(MACHINE, created["execution_id"])
        await handle.wait(timeout=10)
        output = await handle.output()
    assert (output.stdout or "").strip() == str(len(body["stdin"]))


def test_limits_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_events"):
        LocalBackend(data_dir=tmp_path, max_events=6, announce=False)
    with pytest.raises(ValueError, match="max_body_size"):
        LocalBackend(data_dir=tmp_path, max_body_size=0, announce=False)


# --- output events ----------------------------------------------------------------------

_ONE_BYTE_WRITES = (
    "import os, sys, time\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    os.write(1, b'x')\n"
    "    time.sleep(0.0005)\n"
)


async def test_one_byte_writes_make_few_events_and_the_output_is_exact(
    local_session: Session,
) -> None:
    """2000 one-byte writes, followed live: a few dozen events, joined they are the output."""
    writes = 2000
    handle = await local_session.create_execution(
        MACHINE, [sys.executable, "-c", _ONE_BYTE_WRITES, str(writes)]
    )
    events = [event async for event in handle.events(follow=True)]
    output = await handle.output()
    chunks = [e.chunk or "" for e in events if e.type == "stdout"]
    assert "".join(chunks) == output.stdout == "x" * writes
    assert 1 < len(chunks) < writes / 10, len(chunks)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [e.at for e in events] == sorted(e.at for e in events)


async def test_a_reader_asking_again_at_once_does_not_split_the_output(
    local_backend: LocalBackend,
) -> None:
    """A follower reading in a tight loop while bytes trickle in: a read logs only output
    gathered for 20 ms, so there are no more output events than 20 ms periods."""
    writes = 1000
    code = _ONE_BYTE_WRITES.replace("0.0005", "0.001")
    base = f"{local_backend.base_url}{EXECS}"
    started = time.monotonic()
    async with local_backend.session() as session:
        handle = await session.create_execution(MACHINE, [sys.executable, "-c", code, str(writes)])
    events: list[dict[str, Any]] = []
    reads = 0
    cursor: str | None = ""
    headers = {"x-api-key": local_backend.api_key}
    async with aiohttp.ClientSession(headers=headers) as http:
        while cursor is not None:
            url = f"{base}/{handle.execution_id}/events?cursor={cursor}"
            async with http.get(url) as resp:
                page = await resp.json()
            reads += 1
            events.extend(page["items"])
            cursor = page["next_cursor"]
    elapsed = time.monotonic() - started
    chunks = [e["chunk"] for e in events if e["type"] == "stdout"]
    assert "".join(chunks) == "x" * writes
    assert len(chunks) <= elapsed / 0.02 + 2, (len(chunks), elapsed, reads)
    assert reads > 2 * len(chunks)  # the reader did ask far more often than that


async def test_large_output_is_logged_in_pieces_and_kept_up_to_the_cap(
    local_session: Session,
) -> None:
    """1.5 MiB in 64 KiB writes, nobody reading: events of 64 KiB or so (not one event of
    1 MiB), the first 1 MiB kept, every byte counted."""
    code = "import os\nfor _ in range(24):\n    os.write(1, b'x' * 65536)\n"
    result = await local_session.run(MACHINE, [sys.executable, "-c", code], timeout=30)
    handle = local_session.execution(MACHINE, result.execution.execution_id)
    chunks = [e.chunk or "" async for e in handle.events() if e.type == "stdout"]
    assert "".join(chunks) == result.stdout == "x" * 1_048_576
    assert (result.execution.stdout_bytes, result.execution.stdout_truncated) == (24 * 65536, True)
    assert len(chunks) >= 4
    assert max(len(c) for c in chunks) <= 65536 + 256 * 1024  # one pipe read past 64 KiB


async def test_events_keep_the_order_in_which_the_streams_wrote(local_session: Session) -> None:
    code = (
        "import os, time\n"
        "for i in range(6):\n"
        "    os.write(1 + i % 2, str(i).encode())\n"
        "    time.sleep(0.05)\n"
    )
    handle = await local_session.create_execution(MACHINE, [sys.executable, "-c", code])
    await handle.wait(timeout=10)
    streams = [(e.type, e.chunk) async for e in handle.events() if e.type != "lifecycle"]
    assert "".join(chunk or "" for _, chunk in streams) == "012345"
    assert [kind for kind, _ in streams] == ["stdout", "stderr"] * 3
    output = await handle.output()
    assert (output.stdout, output.stderr) == ("024", "135")


async def test_a_served_event_never_changes(local_backend: LocalBackend) -> None:
    """Every page served while the command writes is, event for event, what the full log
    says at the end; the pages, cursor to cursor, neither repeat nor skip."""
    code = "import sys, time\nfor i in range(40):\n    print(i, flush=True)\n    time.sleep(0.01)\n"
    headers = {"x-api-key": local_backend.api_key}
    base = local_backend.base_url + EXECS
    async with local_backend.session() as session:
        handle = await session.create_execution(MACHINE, [sys.executable, "-c", code])
    served: list[dict[str, Any]] = []
    cursor: str | None = ""
    async with aiohttp.ClientSession(headers=headers) as http:
        while cursor is not None:
            url = f"{base}/{handle.execution_id}/events?limit=3&cursor={cursor}"
            async with http.get(url) as resp:
                page = await resp.json()
            served.extend(page["items"])
            cursor = page["next_cursor"]
            if not page["items"]:
                await asyncio.sleep(0.005)
        async with http.get(f"{base}/{handle.execution_id}/events?limit=100") as resp:
            everything = (await resp.json())["items"]
        async with http.get(f"{base}/{handle.execution_id}/output") as resp:
            output = await resp.json()
    assert served == everything
    assert [e["sequence"] for e in served] == list(range(1, len(served) + 1))
    stdout = "".join(e.get("chunk", "") for e in served if e["type"] == "stdout")
    assert stdout == output["stdout"] == "".join(f"{i}\n" for i in range(40))
    # output came in several events: the check above compared live pages, not one page
    assert sum(e["type"] == "stdout" for e in served) > 3


async def test_the_event_cap_holds_and_nothing_is_lost(
    capped_events_backend: LocalBackend,
) -> None:
    """With max_events=10, a command read after every line still logs 10 events at most;
    what did not fit live comes at the end, so the events joined still equal /output."""
    code = (
        "import sys, time\n"
        "for i in range(30):\n"
        "    print(i, flush=True)\n"
        "    print(-i, file=sys.stderr, flush=True)\n"
        "    time.sleep(0.01)\n"
    )
    async with capped_events_backend.session() as session:
        handle = await session.create_execution(MACHINE, [sys.executable, "-c", code])
        for _ in range(200):  # reads (each one logs what was gathered) until it ends
            if (await handle.refresh()).status in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.005)
        events = [event async for event in handle.events()]
        output = await handle.output()
    assert len(events) <= 10
    assert events[-1].status == "succeeded"
    joined = {
        kind: "".join(e.chunk or "" for e in events if e.type == kind)
        for kind in ("stdout", "stderr")
    }
    assert joined["stdout"] == output.stdout == "".join(f"{i}\n" for i in range(30))
    assert joined["stderr"] == output.stderr == "".join(f"{-i}\n" for i in range(30))


async def test_a_cancel_logs_what_was_gathered_past_the_cap(
    capped_events_backend: LocalBackend,
) -> None:
    code = (
        "import sys, time\nfor i in range(1000):\n    print(i, flush=True)\n    time.sleep(0.005)\n"
    )
    async with capped_events_backend.session() as session:
        handle = await session.create_execution(MACHINE, [sys.executable, "-c", code])
        seen = 0
        while seen < 400:  # enough reads to reach the cap, and output gathered past it
            execution = await handle.refresh()
            seen = execution.stdout_bytes or 0
            await asyncio.sleep(0.01)
        cancelled = await handle.cancel()
        events = [event async for event in handle.events()]
        output = await handle.output()
    assert cancelled.status == "cancelled"
    assert len(events) <= 10
    assert events[-1].status == "cancelled"
    stdout = "".join(e.chunk or "" for e in events if e.type == "stdout")
    assert stdout == output.stdout
    assert len(stdout) >= 400
    assert stdout == "".join(f"{i}\n" for i in range(stdout.count("\n")))
