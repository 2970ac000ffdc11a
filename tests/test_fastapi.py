"""The example FastAPI app (tests/fastapi_app.py), in-process, against FakeDedalus.

Requests go through httpx's ASGITransport; the lifespan is driven with
``app.router.lifespan_context(app)``, as a server would. Client disconnects are played at
the ASGI level (the server's ``http.disconnect`` message), which ASGITransport cannot do.
"""

from __future__ import annotations

import asyncio
import gc
import json
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message, Scope

from dedalus_async import PollPolicy, RetryPolicy, Session
from dedalus_async.testing import FAKE_API_KEY, FakeDedalus, Fault, Outcome, Phase, Script

from .fastapi_app import create_app

MACHINE = "dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1"  # the real form: "dm-" and a UUID

FAST_POLL = PollPolicy(hint_floor=0.01, hint_jitter=0.005, initial_interval=0.01)
QUICK = Script((Phase("running", 0.03, 10),), Outcome(stdout="hi\n"))


@pytest.fixture
def dedalus_fake_options() -> dict[str, Any]:
    """The plugin's live_fake_dedalus (real clock) plays QUICK."""
    return {"script": QUICK}


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (lifespan entered) and a client talking to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


def _app_for(fake: FakeDedalus) -> FastAPI:
    return create_app(lambda: Session(api_key=FAKE_API_KEY, base_url=fake.base_url, poll=FAST_POLL))


async def _asgi_call(
    app: FastAPI, path: str, body: dict[str, Any], disconnect: anyio.Event
) -> list[dict[str, Any]]:
    """POST ``body`` to ``path`` as an ASGI server would; the client "leaves" when
    ``disconnect`` is set. Returns the messages the app sent."""
    raw = json.dumps(body).encode()
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"app"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("app", 80),
    }
    delivered = False
    sent: list[dict[str, Any]] = []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    return sent


async def _until(condition: Any, seconds: float = 5.0) -> None:
    with anyio.fail_after(seconds):
        # the fake's counters signal nothing, so they are looked at now and then
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_run_returns_the_result(live_fake_dedalus: FakeDedalus) -> None:
    """POST /run runs the command to its end and answers with its result."""
    async with running(_app_for(live_fake_dedalus)) as client:
        response = await client.post(
            "/run",
            json={"machine_id": MACHINE, "command": ["echo"]},
        )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "succeeded"
    assert body["exit_code"] == 0
    assert body["ok"] is True
    assert body["stdout"] == "hi\n"
    assert live_fake_dedalus.create_count == 1


async def test_start_answers_at_once_and_events_stream_until_the_end(
    live_fake_dedalus: FakeDedalus,
) -> None:
    """POST /start returns the reference; GET .../events streams SSE until terminal."""
    live_fake_dedalus.set_script(
        Script(
            (
                Phase("queued", 0.03, 10),
                Phase("running", 0.05, 10, stdout="one\n"),
                Phase("running", 0.05, 10, stdout="two\n"),
            ),
            Outcome(stdout="three\n"),
        )
    )
    async with running(_app_for(live_fake_dedalus)) as client:
        started = await client.post(
            "/start",
            json={"machine_id": MACHINE, "command": ["x"]},
        )
        ref = started.json()
        assert ref["machine_id"] == MACHINE
        assert ref["status"] == "queued"
        assert ref["idempotency_key"]
        path = f"/executions/{ref['machine_id']}/{ref['execution_id']}/events"
        async with client.stream("GET", path) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            text = (await response.aread()).decode()
    messages = [m for m in text.split("\n\n") if m]
    assert messages[-1] == "event: end\ndata: {}"
    events = [json.loads(m.split("data: ", 1)[1]) for m in messages[:-1]]
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert [e["chunk"] for e in events if e["type"] == "stdout"] == ["one\n", "two\n", "three\n"]
    assert events[-1] == {**events[-1], "type": "lifecycle", "status": "succeeded"}


async def test_errors_map_to_http_statuses(live_fake_dedalus: FakeDedalus) -> None:
    """The server's 409 stays a 409; a wait past its deadline is a 504 with the ref."""
    live_fake_dedalus.destroy_machine("dm-bac2569c-cae0-5eb3-abfd-591bc9fd6d87")
    async with running(_app_for(live_fake_dedalus)) as client:
        gone = await client.post(
            "/run", json={"machine_id": "dm-bac2569c-cae0-5eb3-abfd-591bc9fd6d87", "command": ["x"]}
        )
        live_fake_dedalus.set_script(Script.stuck(retry_after_ms=20))
        slow = await client.post(
            "/run",
            json={
                "machine_id": MACHINE,
                "command": ["x"],
                "timeout": 0.2,
            },
        )
        bad = await client.post("/run", json={"machine_id": MACHINE, "command": []})
    assert gone.status_code == 409
    assert slow.status_code == 504
    assert slow.json()["ref"]["machine_id"] == MACHINE
    assert bad.status_code == 422


async def test_concurrent_requests_share_one_session_and_its_pool(
    live_fake_dedalus: FakeDedalus,
) -> None:
    """20 concurrent runs: one Session made, at most 4 connections opened (its pool)."""
    made: list[Session] = []
    connections = 0

    async def on_connection(*_: Any) -> None:
        nonlocal connections
        connections += 1

    @asynccontextmanager
    async def pooled() -> AsyncIterator[Session]:
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_connection)
        connector = aiohttp.TCPConnector(limit=4)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as client:
            clients.append(client)
            session = Session(
                api_key=FAKE_API_KEY,
                base_url=live_fake_dedalus.base_url,
                poll=FAST_POLL,
                client_session=client,
            )
            made.append(session)
            async with session:
                yield session

    clients: list[aiohttp.ClientSession] = []
    async with running(create_app(pooled)) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/run",
                    json={
                        "machine_id": f"dm-7586c7cd-886a-5a0d-8099-{i % 3:012x}",
                        "command": ["echo"],
                    },
                )
                for i in range(20)
            )
        )
    assert [r.status_code for r in responses] == [200] * 20
    assert live_fake_dedalus.create_count == 20
    assert len(made) == 1
    assert 1 <= connections <= 4
    assert clients[0].closed  # closed by the lifespan's exit


@pytest.mark.parametrize("cancel_remote", [True, False])
async def test_a_client_that_disconnects_cancels_the_wait(
    live_fake_dedalus: FakeDedalus, cancel_remote: bool
) -> None:
    """The client leaves mid-wait: the wait stops at once; with cancel_remote the fake
    sees the DELETE, without it the execution keeps running."""
    live_fake_dedalus.set_script(Script.stuck(retry_after_ms=20))
    app = _app_for(live_fake_dedalus)
    disconnect = anyio.Event()
    body = {
        "machine_id": MACHINE,
        "command": ["x"],
        "cancel_remote": cancel_remote,
    }
    async with app.router.lifespan_context(app):
        sent: list[list[dict[str, Any]]] = []

        async def call() -> None:
            sent.append(await _asgi_call(app, "/run", body, disconnect))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            # wait until the run is well into its wait (created and polled)
            await _until(lambda: len(live_fake_dedalus.requests_for("GET")) >= 2)
            disconnect.set()
            with anyio.fail_after(2):
                await _until(lambda: bool(sent))
        gets_after = len(live_fake_dedalus.requests_for("GET"))
        await anyio.sleep(0.1)
        assert len(live_fake_dedalus.requests_for("GET")) == gets_after  # nobody polls any more
    assert sent[0][0]["status"] == 499
    (execution_id,) = live_fake_dedalus.executions
    if cancel_remote:
        assert len(live_fake_dedalus.requests_for("DELETE")) == 1
        assert live_fake_dedalus.get_record(execution_id).status == "cancelled"
    else:
        assert live_fake_dedalus.requests_for("DELETE") == []
        assert live_fake_dedalus.get_record(execution_id).status == "running"


async def test_a_cancelled_client_request_cancels_the_handler(
    live_fake_dedalus: FakeDedalus,
) -> None:
    """In-process, the client's cancellation reaches the handler (same task): with
    cancel_remote the execution is deleted before the cancellation completes."""
    live_fake_dedalus.set_script(Script.stuck(retry_after_ms=20))
    async with running(_app_for(live_fake_dedalus)) as client:
        body = {
            "machine_id": MACHINE,
            "command": ["x"],
            "cancel_remote": True,
        }
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.post("/run", json=body), 0.2)
        assert len(live_fake_dedalus.requests_for("DELETE")) == 1


async def test_shutdown_closes_everything(live_fake_dedalus: FakeDedalus) -> None:
    """After the lifespan: the Session is closed, the app refuses work (503), and
    collecting the Session warns about nothing."""
    app = _app_for(live_fake_dedalus)
    async with running(app) as client:
        assert (
            await client.post(
                "/run",
                json={"machine_id": MACHINE, "command": ["x"]},
            )
        ).is_success
        session = app.state.session
        assert isinstance(session, Session)
        assert not session.closed
    assert session.closed
    assert app.state.session is None
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        refused = await client.post("/run", json={"machine_id": MACHINE, "command": ["x"]})
    assert refused.status_code == 503
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del session
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


# --- what a client gets when something goes wrong ---------------------------------------

LONG_ID = "dm-" + "a" * 300


@pytest.mark.parametrize("path", ["/run", "/start"])
@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"machine_id": "a/b"}, "machine_id", "machine_id must not contain '/'"),
        ({"machine_id": ".."}, "machine_id", "machine_id '..' is not an ID"),
        ({"machine_id": LONG_ID}, "machine_id", "machine_id is 303 characters long"),
        ({"command": [""]}, "command", "command[0] must name the program to run"),
        ({"env": {"A=B": "1"}}, "env", "env key 'A=B' is not a valid variable name"),
        ({"timeout_ms": 2**53}, "timeout_ms", "timeout_ms must be at most 9007199254740991"),
    ],
)
async def test_input_the_library_refuses_is_a_422_naming_the_field(
    live_fake_dedalus: FakeDedalus, path: str, fields: dict[str, Any], field: str, message: str
) -> None:
    """Checked by the library's own rules before anything is sent (it used to be a 500);
    the answer has FastAPI's shape for invalid input, located at the field."""
    async with running(_app_for(live_fake_dedalus)) as client:
        response = await client.post(path, json={"machine_id": MACHINE, "command": ["x"], **fields})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert error["msg"].startswith(message)
    assert live_fake_dedalus.requests == []


async def test_events_of_an_unknown_execution_are_a_404_before_any_stream(
    live_fake_dedalus: FakeDedalus,
) -> None:
    """Not a 200 with an empty body (and an error in the server) as it used to be."""
    async with running(_app_for(live_fake_dedalus)) as client:
        response = await client.get(f"/executions/{MACHINE}/exe-0123456789abcdef/events")
        bad_id = await client.get(f"/executions/{MACHINE}/exe%0A1/events")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "NOT_FOUND"
    assert bad_id.status_code == 422
    (error,) = bad_id.json()["detail"]
    assert error["loc"] == ["path", "execution_id"]
    assert "control characters" in error["msg"]


async def test_an_error_once_the_stream_has_started_ends_it_with_an_error_event(
    live_fake_dedalus: FakeDedalus,
) -> None:
    """The status is sent with the stream's start; a later failure is an ``error`` event."""
    live_fake_dedalus.set_script(Script.stuck(retry_after_ms=20))
    async with running(_app_for(live_fake_dedalus)) as client:
        started = await client.post("/start", json={"machine_id": MACHINE, "command": ["x"]})
        ref = started.json()
        live_fake_dedalus.add_fault(Fault(method="GET", path=r"/events$", status=404))
        path = f"/executions/{MACHINE}/{ref['execution_id']}/events"
        async with client.stream("GET", path) as response:
            assert response.status_code == 200
            text = (await response.aread()).decode()
    assert text.startswith("event: error\ndata: ")
    error = json.loads(text.split("data: ", 1)[1])
    assert (error["status"], error["error"]) == (404, "NOT_FOUND")


async def test_the_api_refusing_the_apps_own_key_is_a_502_without_the_key(
    live_fake_dedalus: FakeDedalus,
) -> None:
    """A 401 is the app's trouble with the API, not the client's: 502."""
    key = "wrong-key-0123456789-SECRET"
    app = create_app(lambda: Session(api_key=key, base_url=live_fake_dedalus.base_url))
    async with running(app) as client:
        response = await client.post("/run", json={"machine_id": MACHINE, "command": ["x"]})
    assert response.status_code == 502
    assert response.json()["error"] == "upstream"
    assert key not in response.text


async def test_an_api_that_keeps_failing_or_is_gone_is_a_502(
    live_fake_dedalus: FakeDedalus,
) -> None:
    live_fake_dedalus.add_fault(Fault(method="POST", status=503, times=None))
    retry = RetryPolicy(initial_backoff=0.01, max_backoff=0.02)
    app = create_app(lambda: live_fake_dedalus.session(retry=retry))
    async with running(app) as client:
        failing = await client.post("/run", json={"machine_id": MACHINE, "command": ["x"]})
    await live_fake_dedalus.close()
    async with running(app) as client:
        gone = await client.post("/start", json={"machine_id": MACHINE, "command": ["x"]})
    assert (failing.status_code, failing.json()["error"]) == (502, "upstream")
    assert (gone.status_code, gone.json()["error"]) == (502, "upstream")


async def test_a_rate_limit_passes_on_with_its_retry_after(live_fake_dedalus: FakeDedalus) -> None:
    """A pause longer than the Session waits out is the client's to wait: 429 and when."""
    live_fake_dedalus.add_fault(Fault(method="POST", status=429, headers={"Retry-After": "3600"}))
    async with running(_app_for(live_fake_dedalus)) as client:
        response = await client.post("/run", json={"machine_id": MACHINE, "command": ["x"]})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3600"
    assert response.json()["error"] == "RATE_LIMITED"
