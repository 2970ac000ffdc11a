"""Machine waits that follow the status stream (rule M5 of ``dedalus_async._machines``):
against FakeDedalus on the real clock, and against servers of the tests' own that drop the
stream mid-way, answer 404, or go quiet; and the pure server-sent-events reader."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp import web

from dedalus_async import AuthenticationError, MachineWaitTimeout, Session
from dedalus_async._wire import ServerSentEvent, ServerSentEvents
from dedalus_async.testing import FakeDedalus, MachineTimings

from .conftest import API_KEY
from .serving import serving

MACHINE = "dm-5f0c1e2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b"


def _lifecycle(phase: str, revision: int) -> dict[str, Any]:
    return {
        "phase": phase,
        "reason": "test",
        "retryable": False,
        "revision": str(revision),
        "last_transition_at": "2026-12-02T10:00:00.000Z",
        "last_progress_at": "2026-12-02T10:00:00.000Z",
    }


def _machine(phase: str, revision: int) -> dict[str, Any]:
    return {
        "machine_id": MACHINE,
        "desired_state": "running",
        "vcpu": 1,
        "memory_mib": 4096,
        "storage_gib": 10,
        "autosleep_seconds": 0,
        "status": _lifecycle(phase, revision),
    }


def _event(phase: str, revision: int) -> bytes:
    data = json.dumps(_lifecycle(phase, revision))
    return f"id: {revision}\nevent: status\ndata: {data}\n\n".encode()


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


# --- against the fake, on the real clock -------------------------------------------------


async def test_a_wait_follows_the_stream_instead_of_polling(live_fake: FakeDedalus) -> None:
    """One look, then the stream: the wait ends the moment the machine runs, with no poll
    in between, and a watch sees every phase."""
    live_fake.machine_timings = MachineTimings(placement=0.2, start=0.3)
    async with Session(API_KEY, base_url=live_fake.base_url) as session:
        handle = await session.create_machine()
        started = time.monotonic()
        machine = await handle.wait("running", timeout=10)
        waited = time.monotonic() - started
        assert machine.phase == "running"
        assert machine.desired_state == "running"  # from the look, kept through the stream
        assert waited < 0.5 + 0.2  # at the transition, not at a later poll
        path = f"/v1/machines/{handle.machine_id}"
        assert len(live_fake.requests_for("GET", path + "/status/stream")) == 1
        assert [r.path for r in live_fake.requests_for("GET", path)] == [
            path,
            path + "/status/stream",
        ]
        asleep = await handle.sleep()
        assert asleep.phase == "stopping"
        phases = [snapshot.phase async for snapshot in handle.watch(timeout=10)]
        assert phases == ["stopping", "sleeping"]


# --- servers of the tests' own ----------------------------------------------------------


async def test_a_dropped_stream_is_resumed_from_the_last_event() -> None:
    """The stream breaks after two events: the wait reconnects at once with Last-Event-ID
    naming the second, and ends on the event the server sends after it."""
    resumed_from: list[str | None] = []
    looks: list[str] = []

    async def machine(request: web.Request) -> web.Response:
        looks.append(request.path)
        return web.json_response(_machine("starting", 1))

    async def stream(request: web.Request) -> web.StreamResponse:
        last = request.headers.get("Last-Event-ID")
        resumed_from.append(last)
        response = await _open_stream(request)
        if last is None:
            await response.write(_event("starting", 1) + _event("starting", 2))
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()  # mid-way: no end of the chunked body
            return response
        await response.write(_event("running", int(last) + 1))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/machines/{m}", machine)
    app.router.add_get("/v1/machines/{m}/status/stream", stream)
    async with serving(app) as url, Session(API_KEY, base_url=url) as session:
        machine_seen = await session.machine(MACHINE).wait("running", timeout=10)
    assert resumed_from == [None, "2"]
    assert len(looks) == 1  # resumed at once, not after another look
    assert machine_seen.phase == "running"
    assert machine_seen.revision == "3"


async def test_a_stream_answered_404_is_left_for_polling() -> None:
    """A server without the stream: asked once, then the wait polls to the end."""
    looks: list[str] = []

    async def machine(request: web.Request) -> web.Response:
        looks.append("get")
        phase = "running" if len(looks) >= 4 else "starting"
        return web.json_response(_machine(phase, len(looks)))

    async def stream(request: web.Request) -> web.Response:
        looks.append("stream")
        return web.json_response(
            {"error_code": "NOT_FOUND", "message": "no such route", "retryable": False},
            status=404,
        )

    app = web.Application()
    app.router.add_get("/v1/machines/{m}", machine)
    app.router.add_get("/v1/machines/{m}/status/stream", stream)
    async with serving(app) as url, Session(API_KEY, base_url=url) as session:
        handle = session.machine(MACHINE)
        assert (await handle.wait("running", timeout=10)).phase == "running"
    assert looks == ["get", "stream", "get", "get"]


async def test_a_quiet_stream_ends_at_the_deadline() -> None:
    """A stream that sends the current state and then nothing: the wait still ends at its
    deadline, saying where the machine stood."""

    async def machine(request: web.Request) -> web.Response:
        return web.json_response(_machine("starting", 1))

    async def stream(request: web.Request) -> web.StreamResponse:
        response = await _open_stream(request)
        await response.write(_event("starting", 1))
        await asyncio.sleep(30)
        return response

    app = web.Application()
    app.router.add_get("/v1/machines/{m}", machine)
    app.router.add_get("/v1/machines/{m}/status/stream", stream)
    async with serving(app) as url, Session(API_KEY, base_url=url) as session:
        started = time.monotonic()
        with pytest.raises(MachineWaitTimeout) as caught:
            await session.machine(MACHINE).wait("running", timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 2.0
    assert caught.value.last is not None
    assert caught.value.last.phase == "starting"


# --- reading server-sent events (pure) ---------------------------------------------------


def _events(lines: list[str], last_id: str | None = None) -> list[ServerSentEvent]:
    reader = ServerSentEvents(last_id)
    return [event for line in lines if (event := reader.feed(line)) is not None]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["data: a", ""], [ServerSentEvent("a")]),
        (["data:a", "data:  b", ""], [ServerSentEvent("a\n b")]),
        (["id: 7", "event: status", "data: x", ""], [ServerSentEvent("x", "status", "7")]),
        ([": keep-alive", "", "data: y", ""], [ServerSentEvent("y")]),
        (["id: 1", "", "data: z", ""], [ServerSentEvent("z", id="1")]),  # ids carry on
        (["id: a\x00b", "data: q", ""], [ServerSentEvent("q", id="0")]),  # NUL: ignored
        (["event: lone", ""], []),  # no data, no event (and its type is forgotten)
        (["data\r\n", "\r\n"], [ServerSentEvent("")]),  # a field without a colon
        (["retry: 10", "data: r", "unknown: 1", ""], [ServerSentEvent("r")]),
    ],
)
def test_server_sent_events_are_read_as_the_standard_says(
    lines: list[str], expected: list[ServerSentEvent]
) -> None:
    assert _events(lines, last_id="0") == [
        ServerSentEvent(e.data, e.event, e.id if e.id is not None else "0") for e in expected
    ]


def test_server_sent_events_take_bytes_and_keep_the_last_id() -> None:
    reader = ServerSentEvents()
    assert reader.feed(b"id: 9\n") is None
    assert reader.feed(b"data: \xff\n") is None
    assert reader.feed(b"\n") == ServerSentEvent("\ufffd", id="9")
    assert reader.last_id == "9"


async def test_a_stream_that_answers_503_or_garbles_an_event_is_tried_again() -> None:
    """A 5xx counts as a drop (the next round opens it again); an event that is no
    lifecycle is skipped; an error that is the caller's (401) ends the wait."""
    opened: list[int] = []

    async def machine(request: web.Request) -> web.Response:
        return web.json_response(_machine("starting", 1))

    async def stream(request: web.Request) -> web.StreamResponse:
        opened.append(1)
        if len(opened) == 1:
            return web.json_response(
                {"error_code": "UNAVAILABLE", "message": "busy", "retryable": True}, status=503
            )
        response = await _open_stream(request)
        await response.write(b"id: 5\nevent: status\ndata: not a lifecycle\n\n")
        await response.write(_event("running", 6))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/machines/{m}", machine)
    app.router.add_get("/v1/machines/{m}/status/stream", stream)
    async with serving(app) as url, Session(API_KEY, base_url=url) as session:
        machine_seen = await session.machine(MACHINE).wait("running", timeout=10)
    assert (machine_seen.phase, machine_seen.revision, len(opened)) == ("running", "6", 2)

    async def refused(request: web.Request) -> web.Response:
        return web.json_response(
            {"error_code": "AUTH_INVALID", "message": "no", "retryable": False}, status=401
        )

    app = web.Application()
    app.router.add_get("/v1/machines/{m}", machine)
    app.router.add_get("/v1/machines/{m}/status/stream", refused)
    async with serving(app) as url, Session(API_KEY, base_url=url) as session:
        with pytest.raises(AuthenticationError):
            await session.machine(MACHINE).wait("running", timeout=10)
