"""The request engine on its own: lifecycle, retries, the deadline, and the transport seam.

Driven over the real aiohttp transport against FakeDedalus on loopback (faults injected by
the server, time on a FakeClock), and through ``Session(transport=...)`` with a transport
of the test's own, which is the seam the Session documents for custom transports.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from dedalus_async import (
    RetryPolicy,
    ServerError,
    Session,
    SessionClosedError,
    Throttle,
)
from dedalus_async._requester import DeadlineReached, Requester, Tally
from dedalus_async._transport import AiohttpTransport
from dedalus_async._wire import Request, Response, decode_execution, execution_request
from dedalus_async.testing import FakeClock, FakeDedalus, Fault, Script

from .conftest import API_KEY

MACHINE = "dm-7c3e1a52-98f4-4d0b-a1c6-2f5b8e9d0a17"  # the real form: "dm-" and a UUID
RETRY = RetryPolicy(max_attempts=3, initial_backoff=2.0, max_backoff=2.0, budget=60.0)


@pytest.fixture
async def requester(fake: FakeDedalus, clock: FakeClock) -> AsyncIterator[Requester]:
    transport = AiohttpTransport(
        fake.base_url, {"x-api-key": API_KEY}, request_timeout=5.0, max_connections=4
    )
    engine = Requester(
        transport,
        clock=clock,
        random=lambda: 0.5,  # full jitter at its middle: each backoff is exactly 1 s
        throttle=Throttle(None, clock=clock, random=lambda: 0.5),
        retry=RETRY,
        request_timeout=5.0,
    )
    await engine.open()
    yield engine
    await engine.aclose()


async def _created(fake: FakeDedalus, requester: Requester) -> Request:
    """A GET of an execution that exists."""
    fake.set_script(Script.running(100.0))
    async with Session(API_KEY, base_url=fake.base_url, clock=fake.clock) as session:
        handle = await session.create_execution(MACHINE, ["sleep", "100"])
    return execution_request("GET", MACHINE, handle.execution_id)


async def test_a_transient_error_is_retried_and_counted(
    fake: FakeDedalus, requester: Requester, clock: FakeClock
) -> None:
    request = await _created(fake, requester)
    fake.add_fault(Fault(method="GET", status=503, times=2))
    tally = Tally()
    execution = await requester.send(request, decode_execution, tally=tally)
    assert execution.status == "running"
    assert (tally.retries, tally.slept) == (2, 2.0)
    assert clock.sleeps == [1.0, 1.0]
    assert len(fake.requests_for("GET")) == 3


async def test_retries_run_out_with_the_last_error(fake: FakeDedalus, requester: Requester) -> None:
    request = await _created(fake, requester)
    fake.add_fault(Fault(method="GET", status=503, times=None))
    with pytest.raises(ServerError):
        await requester.send(request, decode_execution)
    assert len(fake.requests_for("GET")) == RETRY.max_attempts


async def test_only_the_deadline_ending_the_retries_says_so(
    fake: FakeDedalus, requester: Requester, clock: FakeClock
) -> None:
    """Retries left but no time left: DeadlineReached (the caller reports its own
    timeout), carrying the error that would have been retried."""
    request = await _created(fake, requester)
    fake.add_fault(Fault(method="GET", status=503, times=None))
    with pytest.raises(DeadlineReached) as caught:
        await requester.send(request, decode_execution, deadline=clock.monotonic() + 1.5)
    assert isinstance(caught.value.error, ServerError)
    assert len(fake.requests_for("GET")) == 2  # the second backoff would pass the deadline


async def test_a_permanent_error_is_not_retried(fake: FakeDedalus, requester: Requester) -> None:
    fake.add_fault(Fault(method="GET", status=404, times=None))
    request = execution_request("GET", MACHINE, "exe-missing")
    with pytest.raises(Exception, match="404"):
        await requester.send(request, decode_execution)
    assert len(fake.requests_for("GET")) == 1


async def test_lifecycle_new_open_closed(fake: FakeDedalus, clock: FakeClock) -> None:
    transport = AiohttpTransport(fake.base_url, {}, request_timeout=5.0, max_connections=1)
    engine = Requester(
        transport,
        clock=clock,
        random=lambda: 0.5,
        throttle=Throttle(None, clock=clock, random=lambda: 0.5),
        retry=RETRY,
        request_timeout=5.0,
    )
    request = execution_request("GET", MACHINE, "exe-1")
    with pytest.raises(SessionClosedError, match="not open"):
        await engine.send(request, decode_execution)
    await engine.open()
    with pytest.raises(SessionClosedError, match="already open"):
        await engine.open()
    await engine.aclose()
    await engine.aclose()  # idempotent
    with pytest.raises(SessionClosedError, match="is closed"):
        await engine.send(request, decode_execution)
    assert fake.requests == []


class RecordingTransport:
    """A transport of our own: answers every request from a tiny in-memory model."""

    def __init__(self) -> None:
        self.sent: list[tuple[Request, float | None]] = []
        self.events: list[str] = []

    async def open(self) -> None:
        self.events.append("open")

    async def aclose(self) -> None:
        self.events.append("aclose")

    async def send(self, request: Request, *, timeout: float | None = None) -> Response:
        self.sent.append((request, timeout))
        body = {
            "execution_id": "exe-1",
            "machine_id": MACHINE,
            "command": ["true"],
            "status": "succeeded" if request.method == "GET" else "queued",
            "exit_code": 0,
            "stdout_bytes": 0,
            "stderr_bytes": 0,
            "created_at": "2026-01-01T00:00:00Z",
            "retry_after_ms": 10,
        }
        return Response(200 if request.method == "GET" else 201, {}, json.dumps(body).encode())


async def test_a_custom_transport_carries_every_request(clock: FakeClock) -> None:
    """Session(transport=...) sends everything through it: create, polls, nothing else
    (both output sizes are zero, so there is no output to fetch)."""
    transport = RecordingTransport()
    async with Session(
        API_KEY, base_url="https://example.invalid", transport=transport, clock=clock
    ) as session:
        result = await session.run(MACHINE, ["true"], timeout=30)
    assert result.ok
    assert transport.events == ["open", "aclose"]
    methods = [(r.method, r.path) for r, _ in transport.sent]
    assert methods == [
        ("POST", f"/v1/machines/{MACHINE}/executions"),
        ("GET", f"/v1/machines/{MACHINE}/executions/exe-1"),
    ]
    create = transport.sent[0][0]
    assert create.idempotency_key is not None
    # polls carry the wait's deadline as their timeout, never more than request_timeout
    poll_timeout = transport.sent[1][1]
    assert poll_timeout is not None
    assert poll_timeout <= session.request_timeout
