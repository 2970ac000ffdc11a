"""Reliability findings, each against the server that shows it: our fake where its rules
are the point, a deliberately misbehaving server of this file's own where the fake would
share our assumptions.

Covered here (issue "Reliability under a misbehaving server"): a wait ``until`` a status
that can no longer come; ``cancel()`` on finished work; the Idempotency-Key on a failed
create; ``run(cancel_remote=True)`` cancelled while its create is in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from dedalus_async import (
    ConfigurationError,
    ConflictError,
    DedalusError,
    ExecutionRequest,
    PollPolicy,
    RetryPolicy,
    ServerError,
    Session,
    SessionClosedError,
    TransportError,
    WaitTimeout,
)
from dedalus_async.testing import FakeClock, FakeDedalus, Fault, Outcome, Phase, Script

from .conftest import API_KEY
from .serving import serving

MACHINE = "dm-5d2e8c41-07b3-4f6a-9e1d-c84a2b7f0e59"  # the real form: "dm-" and a UUID
FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.02, max_attempts=3)


# --- wait(until=...) ----------------------------------------------------------------------


async def test_waiting_until_a_status_that_can_no_longer_come_returns_the_end(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """An execution that finished before it was seen running: wait(until={"running"})
    returns the terminal snapshot at once instead of waiting out its deadline."""
    fake.set_script(Script.immediate())
    handle = await session.create_execution(MACHINE, ["true"])
    start = clock.monotonic()
    snapshot = await handle.wait(until={"running"}, timeout=600)
    assert snapshot.status == "succeeded"
    assert clock.monotonic() - start < 1.0  # not the 600 s deadline
    assert handle.stats is not None
    assert handle.stats.polls <= 1


async def test_waiting_until_a_status_that_comes_stops_there(
    session: Session, fake: FakeDedalus
) -> None:
    fake.set_script(Script((Phase("queued", 1.0, 1000), Phase("running", 5.0, 5000))))
    handle = await session.create_execution(MACHINE, ["sleep", "5"])
    snapshot = await handle.wait(until={"running"})
    assert snapshot.status == "running"


# --- cancel() never destroys finished work ---------------------------------------------------


async def test_cancel_leaves_a_finished_execution_and_its_output(
    session: Session, fake: FakeDedalus
) -> None:
    fake.set_script(Script((), Outcome(stdout="kept\n")))
    handle = await session.create_execution(MACHINE, ["echo", "kept"])
    await handle.wait()
    reported = await handle.cancel()
    assert reported.status == "succeeded"
    assert fake.requests_for("DELETE") == []
    assert (await handle.output()).stdout == "kept\n"  # still there


async def test_cancel_stops_a_running_execution(session: Session, fake: FakeDedalus) -> None:
    fake.set_script(Script.running(1000.0))
    handle = await session.create_execution(MACHINE, ["sleep", "1000"])
    reported = await handle.cancel()
    assert reported.status == "cancelled"
    assert len(fake.requests_for("DELETE")) == 1


async def test_delete_execution_still_deletes_a_finished_one(
    session: Session, fake: FakeDedalus
) -> None:
    """The explicit way to delete: whatever the status."""
    fake.set_script(Script.immediate())
    handle = await session.create_execution(MACHINE, ["true"])
    await handle.wait()
    await session.delete_execution(MACHINE, handle.execution_id)
    assert len(fake.requests_for("DELETE")) == 1


# --- a server of our own --------------------------------------------------------------------


class Flaky:
    """Executions held in a dict; creates can be slowed down or failed on demand."""

    def __init__(self) -> None:
        self.create_delay = 0.0
        self.fail_creates = False
        # error codes of 409s to answer the next creates with, one each
        self.conflicts: list[str] = []
        self.keys: list[str] = []
        self.executions: dict[str, dict[str, object]] = {}
        self.deleted: list[str] = []
        self._ids = itertools.count(1)

    async def create(self, request: web.Request) -> web.Response:
        self.keys.append(request.headers.get("Idempotency-Key", ""))
        if self.fail_creates:
            return web.json_response({"error_code": "UNAVAILABLE", "retryable": True}, status=503)
        if self.conflicts:
            code = self.conflicts.pop(0)
            return web.json_response({"error_code": code, "message": "conflict"}, status=409)
        await asyncio.sleep(self.create_delay)
        body = await request.json()
        eid = f"exe-{next(self._ids)}"
        self.executions[eid] = {
            "execution_id": eid,
            "machine_id": request.match_info["machine"],
            "command": body["command"],
            "status": "running",
            "created_at": "2026-01-01T00:00:00Z",
            "retry_after_ms": 50,
        }
        return web.json_response(self.executions[eid], status=201)

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(self.executions[request.match_info["eid"]])

    async def delete(self, request: web.Request) -> web.Response:
        eid = request.match_info["eid"]
        self.deleted.append(eid)
        self.executions[eid]["status"] = "cancelled"
        return web.json_response(self.executions[eid])


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[Flaky, str]]:
    server = Flaky()
    app = web.Application()
    base = "/v1/machines/{machine}/executions"
    app.router.add_post(base, server.create)
    app.router.add_get(base + "/{eid}", server.get)
    app.router.add_delete(base + "/{eid}", server.delete)
    async with serving(app) as base_url:
        yield server, base_url


async def test_a_failed_create_names_its_idempotency_key(flaky: tuple[Flaky, str]) -> None:
    """The server may have stored it: the error carries the key to create again safely."""
    server, base_url = flaky
    server.fail_creates = True
    async with Session(API_KEY, base_url=base_url, retry=FAST) as session:
        with pytest.raises(ServerError) as caught:
            await session.create_execution(MACHINE, ["true"])
    key = server.keys[0]
    assert set(server.keys) == {key}  # every retry sent the same key
    assert caught.value.idempotency_key == key
    assert any(key in note for note in caught.value.__notes__)


async def test_a_failed_create_passes_its_own_key_back(flaky: tuple[Flaky, str]) -> None:
    server, base_url = flaky
    server.fail_creates = True
    async with Session(API_KEY, base_url=base_url, retry=FAST) as session:
        with pytest.raises(DedalusError) as caught:
            await session.run(MACHINE, ["true"], idempotency_key="job-42")
    assert caught.value.idempotency_key == "job-42"
    assert server.keys == ["job-42"] * FAST.max_attempts


async def test_cancelling_run_while_its_create_is_in_flight_still_cancels_remotely(
    flaky: tuple[Flaky, str],
) -> None:
    """``run(cancel_remote=True)`` sees its create through, then deletes what it made:
    nothing is left running on the server."""
    server, base_url = flaky
    server.create_delay = 0.3
    async with Session(API_KEY, base_url=base_url, poll=PollPolicy(hint_floor=0.01)) as session:
        task = asyncio.create_task(session.run(MACHINE, ["sleep", "100"], cancel_remote=True))
        await asyncio.sleep(0.1)  # the POST is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert list(server.executions) == ["exe-1"]
    assert server.deleted == ["exe-1"]
    assert server.executions["exe-1"]["status"] == "cancelled"


async def test_without_cancel_remote_a_cancelled_run_leaves_the_execution(
    flaky: tuple[Flaky, str],
) -> None:
    """The default: cancelling the caller stops the client only (as documented)."""
    server, base_url = flaky
    server.create_delay = 0.3
    async with Session(API_KEY, base_url=base_url) as session:
        task = asyncio.create_task(session.run(MACHINE, ["sleep", "100"]))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert server.deleted == []


# --- closing the Session ends what is in progress --------------------------------------------

SLOW_HINT = Script((Phase("running", 1000.0, 20_000),))  # a poll every 20 s


async def _closed_during(session: Session, call: Awaitable[object]) -> float:
    """Start ``call``, close the Session under it; seconds until it ended (it must raise
    SessionClosedError)."""
    task = asyncio.ensure_future(call)
    await asyncio.sleep(0.2)  # well inside a 20 s sleep
    assert not task.done()
    start = time.monotonic()
    await session.aclose()
    with pytest.raises(SessionClosedError, match="closed while this call"):
        await asyncio.wait_for(task, 5)
    return time.monotonic() - start


@pytest.mark.parametrize("timeout", [None, 600.0])
async def test_closing_the_session_ends_a_wait_at_once(
    live_fake: FakeDedalus, timeout: float | None
) -> None:
    live_fake.set_script(SLOW_HINT)  # on the real clock: closing must cut real sleeps
    session = Session(API_KEY, base_url=live_fake.base_url)
    await session.open()
    handle = await session.create_execution(MACHINE, ["sleep", "1000"])
    assert await _closed_during(session, handle.wait(timeout=timeout)) < 1.0


async def test_closing_the_session_ends_a_followed_event_stream(live_fake: FakeDedalus) -> None:
    live_fake.set_script(SLOW_HINT)  # on the real clock: closing must cut real sleeps
    session = Session(API_KEY, base_url=live_fake.base_url)
    await session.open()
    handle = await session.create_execution(MACHINE, ["sleep", "1000"])

    async def follow() -> None:
        async for _ in handle.events(follow=True):
            pass

    assert await _closed_during(session, follow()) < 1.0


async def test_closing_the_session_ends_a_call_waiting_to_retry(live_fake: FakeDedalus) -> None:
    live_fake.add_fault(Fault(method="GET", status=503, headers={"Retry-After": "10"}, times=None))
    live_fake.set_script(SLOW_HINT)  # on the real clock: closing must cut real sleeps
    session = Session(API_KEY, base_url=live_fake.base_url)
    await session.open()
    handle = await session.create_execution(MACHINE, ["sleep", "1000"])
    assert await _closed_during(session, handle.refresh()) < 1.0


async def test_a_call_after_close_is_refused_before_sending(live_fake: FakeDedalus) -> None:
    live_fake.set_script(SLOW_HINT)
    async with Session(API_KEY, base_url=live_fake.base_url) as session:
        handle = await session.create_execution(MACHINE, ["sleep", "1000"])
    sent = len(live_fake.requests)
    with pytest.raises(SessionClosedError, match="closed"):
        await handle.wait()
    assert len(live_fake.requests) == sent


# --- bad input never reaches the server --------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ({"command": [""]}, "command[0]"),
        ({"command": ["echo", "\ud800"]}, "command[1]"),
        ({"command": ["env"], "env": {"A": "\udcff"}}, "env['A']"),
        ({"command": ["cat"], "stdin": "x\ud800"}, "stdin"),
        ({"command": ["pwd"], "cwd": "\udc80"}, "cwd"),
        ({"command": ["sleep", "1"], "timeout_ms": 2**53}, "timeout_ms"),
        ({"command": ["sleep", "1"], "timeout_ms": 2**64}, "timeout_ms"),
    ],
)
async def test_input_the_wire_cannot_carry_is_refused_before_sending(
    session: Session, fake: FakeDedalus, call: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(field)) as caught:
        await session.create_execution(MACHINE, **call)
    assert "\ud800" not in str(caught.value)  # the text itself is not echoed
    assert fake.requests == []


async def test_a_lone_surrogate_in_an_id_is_refused_before_sending(
    session: Session, fake: FakeDedalus
) -> None:
    with pytest.raises(ValueError, match="machine_id has a lone surrogate"):
        await session.get_execution("dm-\ud800", "exe-1")
    assert fake.requests == []


async def test_the_largest_timeout_ms_is_sent(session: Session, fake: FakeDedalus) -> None:
    fake.set_script(Script.immediate())
    await session.create_execution(MACHINE, ["true"], timeout_ms=2**53 - 1)
    assert json.loads(fake.requests[0].body)["timeout_ms"] == 2**53 - 1


def test_a_fan_out_request_the_wire_cannot_carry_fails_when_built() -> None:
    """So a bad request 2,000th in a list fails before the first is sent."""
    with pytest.raises(ValueError, match=re.escape("command[1]")):
        ExecutionRequest(machine_id=MACHINE, command=["echo", "\ud800"])
    with pytest.raises(ValueError, match="command\\[0\\]"):
        ExecutionRequest(machine_id=MACHINE, command=[""])


def test_only_localhost_itself_and_loopback_addresses_may_use_plain_http() -> None:
    Session(API_KEY, base_url="http://localhost:8080")
    Session(API_KEY, base_url="http://127.0.0.2:8080")
    Session(API_KEY, base_url="http://[::1]:8080")
    with pytest.raises(ConfigurationError, match="refusing plain http"):
        Session(API_KEY, base_url="http://api.localhost:8080")


# --- the key in tracebacks ------------------------------------------------------------------


async def test_no_frame_of_a_transport_error_holds_the_key_in_its_locals() -> None:
    """Error reporters (Sentry and the like) record every frame's locals: none of ours, and
    none chained below, may hold the key."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: connections are refused
    async with Session(
        API_KEY, base_url=f"http://127.0.0.1:{port}", retry=RetryPolicy(max_attempts=1)
    ) as session:
        with pytest.raises(TransportError) as caught:
            await session.get_execution(MACHINE, "exe-1")
    frames = 0
    error: BaseException | None = caught.value
    while error is not None:
        tb = error.__traceback__
        while tb is not None:
            frames += 1
            for name, value in tb.tb_frame.f_locals.items():
                assert API_KEY not in repr(value), (tb.tb_frame.f_code.co_name, name)
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    assert frames > 3  # the walk saw our frames


# --- an events page that repeats an entry ------------------------------------------------------


async def test_an_event_repeated_within_a_page_is_delivered_once() -> None:
    events = [
        {"at": "2026-01-01T00:00:00Z", "sequence": n, "type": "stdout", "chunk": f"{n}\n"}
        for n in (1, 2, 2, 3)
    ]

    async def page(request: web.Request) -> web.Response:
        return web.json_response({"items": events, "next_cursor": None})

    app = web.Application()
    app.router.add_get("/v1/machines/{machine}/executions/{eid}/events", page)
    async with serving(app) as base_url, Session(API_KEY, base_url=base_url) as session:
        got = [e.sequence async for e in session.iter_events(MACHINE, "exe-1")]
    assert got == [1, 2, 3]


# --- a server that says "come back now", storms, pauses ------------------------------------


class Storm:
    """An executions API on the real clock that misbehaves on cue.

    ``retry_after`` headers go on every error it sends; ``storm_until`` (monotonic) makes
    every request matching ``storm_paths`` fail with ``storm_status`` until then;
    ``rolling_expiry`` makes every snapshot expire 2 ms from now, with no hint.
    """

    def __init__(self) -> None:
        self.storm_until = 0.0
        self.storm_status = 503
        self.storm_paths: tuple[str, ...] = ("",)
        self.storm_methods: tuple[str, ...] = ("GET", "POST", "DELETE")
        self.error_headers: dict[str, str] = {}
        self.rolling_expiry = False
        self.finish_after = 0.2  # seconds from create to succeeded
        self.requests: list[tuple[float, str, str]] = []
        self.created: dict[str, float] = {}
        self._ids = itertools.count(1)

    def _snapshot(self, eid: str, machine: str) -> dict[str, object]:
        done = time.monotonic() - self.created[eid] >= self.finish_after
        body: dict[str, object] = {
            "execution_id": eid,
            "machine_id": machine,
            "status": "succeeded" if done else "running",
            "created_at": "2026-01-01T00:00:00Z",
            "stdout_bytes": 3 if done else 0,
            "stderr_bytes": 0,
        }
        if done:
            body["exit_code"] = 0
        elif self.rolling_expiry:
            at = datetime.now(UTC) + timedelta(milliseconds=2)
            body["expires_at"] = at.isoformat().replace("+00:00", "Z")
        else:
            body["retry_after_ms"] = 50
        return body

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((time.monotonic(), request.method, request.path))
        storming = time.monotonic() < self.storm_until
        if (
            storming
            and request.method in self.storm_methods
            and any(request.path.endswith(p) for p in self.storm_paths)
        ):
            return web.json_response(
                {"error_code": "STORM", "message": "try later", "retryable": True},
                status=self.storm_status,
                headers=self.error_headers,
            )
        response: web.StreamResponse = await handler(request)
        return response

    async def create(self, request: web.Request) -> web.Response:
        eid = f"exe-{next(self._ids)}"
        self.created[eid] = time.monotonic()
        return web.json_response(self._snapshot(eid, request.match_info["machine"]), status=201)

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(
            self._snapshot(request.match_info["eid"], request.match_info["machine"])
        )

    async def delete(self, request: web.Request) -> web.Response:
        eid = request.match_info["eid"]
        body = self._snapshot(eid, request.match_info["machine"])
        body["status"] = "cancelled"
        return web.json_response(body)

    async def output(self, request: web.Request) -> web.Response:
        eid = request.match_info["eid"]
        return web.json_response({"execution_id": eid, "stdout": "ok\n", "stderr": ""})

    def gets(self) -> list[float]:
        return [at for at, method, path in self.requests if method == "GET"]


@pytest.fixture
async def storm() -> AsyncIterator[tuple[Storm, str]]:
    server = Storm()
    app = web.Application(middlewares=[server.middleware])
    base = "/v1/machines/{machine}/executions"
    app.router.add_post(base, server.create)
    app.router.add_get(base + "/{eid}", server.get)
    app.router.add_get(base + "/{eid}/output", server.output)
    app.router.add_delete(base + "/{eid}", server.delete)
    async with serving(app) as base_url:
        yield server, base_url


@pytest.mark.parametrize(
    "headers",
    [{"Retry-After": "0"}, {"Retry-After": "-5"}, {"retry-after-ms": "-100"}, {}],
    ids=["zero", "negative", "negative-ms", "none"],
)
async def test_come_back_now_is_no_busy_loop(
    storm: tuple[Storm, str], headers: dict[str, str]
) -> None:
    """A 503 that says "retry now", forever: at most one request per floor interval."""
    server, base_url = storm
    server.finish_after = 1000.0
    server.storm_paths = ("/exe-1",)
    server.error_headers = headers
    async with Session(API_KEY, base_url=base_url) as session:
        handle = await session.create_execution(MACHINE, ["sleep", "1000"])
        server.storm_until = time.monotonic() + 60.0
        start = time.monotonic()
        with pytest.raises(WaitTimeout):
            await handle.wait(timeout=1.0)
        elapsed = time.monotonic() - start
    floor = RetryPolicy().min_pause
    assert len(server.gets()) <= elapsed / floor + 2  # before the floor: thousands
    assert 0.9 <= elapsed < 2.0  # the whole deadline is used, and not much more


async def test_a_rolling_expiry_just_ahead_is_no_busy_loop(storm: tuple[Storm, str]) -> None:
    server, base_url = storm
    server.finish_after = 1000.0
    server.rolling_expiry = True
    async with Session(API_KEY, base_url=base_url) as session:
        handle = await session.create_execution(MACHINE, ["sleep", "1000"])
        with pytest.raises(WaitTimeout):
            await handle.wait(timeout=1.0)
    floor = PollPolicy().hint_floor
    assert len(server.gets()) <= 1.0 / floor + 2  # before: ~360 GETs a second


async def test_a_wait_ends_at_its_deadline_whatever_the_session_pause(
    storm: tuple[Storm, str],
) -> None:
    """One 429 asking for an hour pauses the Session (capped at a minute, T2), but a wait
    with a one-second deadline still ends after about a second."""
    server, base_url = storm
    server.finish_after = 1000.0
    server.storm_status = 429
    server.error_headers = {"Retry-After": "3600"}
    server.storm_paths = ("/exe-1",)
    async with Session(API_KEY, base_url=base_url) as session:
        handle = await session.create_execution(MACHINE, ["sleep", "1000"])
        server.storm_until = time.monotonic() + 3600
        await asyncio.sleep(0)
        with pytest.raises(DedalusError):  # the 429 itself: an hour is past any retry
            await handle.refresh()
        assert session.throttle.paused_until > session.clock.monotonic() + 30
        start = time.monotonic()
        with pytest.raises(WaitTimeout):
            await handle.wait(timeout=1.0)
        assert time.monotonic() - start < 1.5


async def test_a_storm_of_429s_loses_no_create(storm: tuple[Storm, str]) -> None:
    """2 s of 429s (Retry-After: 0.1) on every create: pacing, not failure; all 1,000
    succeed, each once."""
    server, base_url = storm
    server.storm_status = 429
    server.error_headers = {"Retry-After": "0.1"}
    server.storm_paths = ("/executions",)
    server.storm_until = time.monotonic() + 2.0
    async with Session(API_KEY, base_url=base_url) as session:
        handles = await asyncio.gather(
            *(session.create_execution(MACHINE, ["true"]) for _ in range(1000))
        )
    assert len({h.execution_id for h in handles}) == 1000
    assert len(server.created) == 1000


async def test_a_storm_on_output_fails_no_succeeded_run(storm: tuple[Storm, str]) -> None:
    """1.5 s of 503s (no Retry-After) on /output after 300 runs succeeded: every result is
    still read, none reported failed."""
    server, base_url = storm
    server.finish_after = 0.05
    server.storm_paths = ("/output",)
    server.storm_until = time.monotonic() + 1.5
    async with Session(API_KEY, base_url=base_url) as session:
        results = await asyncio.gather(*(session.run(MACHINE, ["echo", "ok"]) for _ in range(300)))
    assert all(r.ok and r.stdout == "ok\n" for r in results)
    outputs = [at for at, method, path in server.requests if path.endswith("/output")]
    assert len(outputs) > 300  # the storm was met: some reads were retried


async def test_a_followed_event_stream_survives_a_blip(live_fake: FakeDedalus) -> None:
    """``events(follow=True)`` is as patient as ``wait()``: 1.5 s of 503s on the events
    (no Retry-After) do not end it."""
    live_fake.set_script(Script((Phase("running", 2.5, 100),)))
    async with Session(API_KEY, base_url=live_fake.base_url) as session:
        handle = await session.create_execution(MACHINE, ["sleep", "2"])
        blip = live_fake.add_fault(Fault(path="/events", status=503, times=None))
        follow = asyncio.ensure_future(_drain(handle.events(follow=True)))
        await asyncio.sleep(1.5)
        live_fake.clear_faults()  # the blip is over
        events = await asyncio.wait_for(follow, 10)
    assert blip.hits >= 3  # the stream met the blip, more than a count of tries allows
    assert events[-1].status == "succeeded"


async def _drain(stream: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in stream]


# --- 409 "still in progress", and leaving a fan-out under cancellation --------------------------


async def test_a_create_still_in_progress_is_retried_under_its_key(
    flaky: tuple[Flaky, str],
) -> None:
    """The IETF idempotency-key draft answers a concurrent retry with 409: try again with
    the same key and get the first request's answer."""
    server, base_url = flaky
    server.conflicts = ["IDEMPOTENCY_KEY_IN_PROGRESS", "REQUEST_PROCESSING"]
    async with Session(API_KEY, base_url=base_url, retry=FAST) as session:
        handle = await session.create_execution(MACHINE, ["true"])
    assert handle.execution_id == "exe-1"
    assert len(server.keys) == 3
    assert len(set(server.keys)) == 1


async def test_any_other_conflict_is_not_retried(flaky: tuple[Flaky, str]) -> None:
    server, base_url = flaky
    server.conflicts = ["INVALID_STATE"]
    async with Session(API_KEY, base_url=base_url, retry=FAST) as session:
        with pytest.raises(ConflictError):
            await session.create_execution(MACHINE, ["true"])
    assert len(server.keys) == 1


async def test_leaving_a_fan_out_under_cancellation_is_bounded(
    flaky: tuple[Flaky, str],
) -> None:
    """Creates stalled on the server, run_many(cancel_remote=True) under a 1 s timeout:
    each shielded create gets request_timeout to finish, not all its retries (~9 s)."""
    server, base_url = flaky
    server.create_delay = 30.0
    requests = [ExecutionRequest(machine_id=MACHINE, command=["true"]) for _ in range(4)]
    async with Session(API_KEY, base_url=base_url, request_timeout=2.0) as session:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await session.run_many(requests, cancel_remote=True)
        elapsed = time.monotonic() - start
    assert elapsed < 4.0  # the 1 s timeout + at most one request_timeout for the creates


async def test_a_cancel_during_a_session_pause_still_reaches_the_server(
    storm: tuple[Storm, str],
) -> None:
    """The server paused the Session (429, Retry-After: 30); the run is cancelled during
    the pause: its DELETE goes out at once instead of waiting the pause out."""
    server, base_url = storm
    server.finish_after = 1000.0
    server.storm_status = 429
    server.error_headers = {"Retry-After": "30"}
    server.storm_paths = ("/exe-1",)
    server.storm_methods = ("GET",)
    server.storm_until = time.monotonic() + 3600
    async with Session(API_KEY, base_url=base_url) as session:
        task = asyncio.create_task(session.run(MACHINE, ["sleep", "1000"], cancel_remote=True))
        await asyncio.sleep(0.5)  # created, polled once, paused by the 429
        assert session.throttle.paused_until > session.clock.monotonic() + 20
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    deletes = [at for at, method, _ in server.requests if method == "DELETE"]
    assert len(deletes) == 1
    assert deletes[0] - cancelled_at < 1.0
