"""The Session over real loopback HTTP against FakeDedalus: set-up, endpoints, errors, retries."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import socket

import aiohttp
import pytest

from dedalus_async import (
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    Execution,
    ExecutionRef,
    IdempotencyKeyReusedError,
    NotFoundError,
    RateLimitedError,
    RequestTimeout,
    ResponseDecodeError,
    RetryPolicy,
    ServerError,
    Session,
    SessionClosedError,
    TransportError,
    UnprocessableEntityError,
)
from dedalus_async._transport import AiohttpTransport
from dedalus_async._wire import Request
from dedalus_async.testing import FakeClock, FakeDedalus, Fault, Outcome, Script

from .conftest import API_KEY

MACHINE = "dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0"  # the real form: "dm-" and a UUID

UUID7 = re.compile(r"[0-9a-f]{12}7[0-9a-f]{19}")


# --- construction --------------------------------------------------------------------


def test_missing_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key anywhere: ConfigurationError naming both variables and the local option."""
    monkeypatch.delenv("DEDALUS_API_KEY", raising=False)
    monkeypatch.delenv("DEDALUS_X_API_KEY", raising=False)
    with pytest.raises(ConfigurationError) as info:
        Session()
    text = str(info.value)
    assert "DEDALUS_API_KEY" in text
    assert "DEDALUS_X_API_KEY" in text
    assert "serve-local" in text


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://dcs.dedaluslabs.ai", True),
        ("http://127.0.0.1:8080", True),
        ("http://127.8.9.10:8080", True),
        ("http://localhost:1", True),
        ("http://[::1]:1", True),
        ("http://dcs.dedaluslabs.ai", False),
        ("http://10.0.0.5", False),
        ("ftp://x", False),
        ("https://user:pw@host", False),
        ("https://host/?q=1", False),
        ("dcs.dedaluslabs.ai", False),
        ("", False),
    ],
)
def test_base_url_rules(url: str, ok: bool) -> None:
    """https anywhere; plain http only to loopback; no credentials or query in the URL."""
    if ok:
        assert Session("k", base_url=url).base_url == url.rstrip("/")
    else:
        with pytest.raises(ConfigurationError):
            Session("k", base_url=url)


def test_insecure_http_needs_explicit_opt_in() -> None:
    """allow_insecure_http=True lets a non-loopback http URL through."""
    s = Session("k", base_url="http://10.0.0.5:80", allow_insecure_http=True)
    assert s.base_url == "http://10.0.0.5:80"


def test_bad_settings_are_refused() -> None:
    """Nonsense settings fail at construction, naming the setting."""
    with pytest.raises(ConfigurationError, match="auth_scheme"):
        Session("k", auth_scheme="basic")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="api_key"):
        Session("  ")
    with pytest.raises(ValueError, match="request_timeout"):
        Session("k", request_timeout=0)
    with pytest.raises(TypeError, match="request_timeout"):
        Session("k", request_timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections"):
        Session("k", max_connections=0)


def test_repr_never_shows_the_key() -> None:
    """Neither the Session nor its transport show the key."""
    s = Session(API_KEY, base_url="http://127.0.0.1:1")
    assert API_KEY not in repr(s)
    assert API_KEY not in repr(s._transport)
    assert API_KEY not in str(vars(s).get("base_url"))


@pytest.mark.parametrize(
    ("env", "header", "value"),
    [
        ({"DEDALUS_API_KEY": API_KEY}, "authorization", f"Bearer {API_KEY}"),
        ({"DEDALUS_X_API_KEY": API_KEY}, "x-api-key", API_KEY),
    ],
)
async def test_environment_configures_the_session(
    fake: FakeDedalus,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    header: str,
    value: str,
) -> None:
    """Key, scheme, base URL and org come from the conventional variables."""
    for name in ("DEDALUS_API_KEY", "DEDALUS_X_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, v in env.items():
        monkeypatch.setenv(name, v)
    monkeypatch.setenv("DEDALUS_BASE_URL", fake.base_url)
    monkeypatch.setenv("DEDALUS_ORG_ID", "org-7")
    async with Session() as s:
        handle = await s.create_execution(MACHINE, ["true"])
    sent = fake.requests[-1]
    assert sent.headers[header] == value
    assert sent.org_id == "org-7"
    assert handle.execution_id in fake.executions


async def test_explicit_bearer_scheme(fake: FakeDedalus) -> None:
    """auth_scheme='bearer' sends an Authorization header and no x-api-key."""
    async with Session(API_KEY, base_url=fake.base_url, auth_scheme="bearer") as s:
        await s.create_execution(MACHINE, ["true"])
    headers = fake.requests[-1].headers
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert "x-api-key" not in headers


# --- lifecycle -----------------------------------------------------------------------


async def test_use_before_open_and_after_close(fake: FakeDedalus) -> None:
    """Outside `async with` every call is a SessionClosedError, and nothing is sent."""
    s = Session(API_KEY, base_url=fake.base_url)
    with pytest.raises(SessionClosedError, match="async with"):
        await s.get_execution(MACHINE, "exe-1")
    async with s:
        assert not s.closed
    assert s.closed
    with pytest.raises(SessionClosedError, match="closed"):
        await s.get_execution(MACHINE, "exe-1")
    with pytest.raises(SessionClosedError):
        await s.open()
    await s.aclose()  # idempotent
    assert fake.requests == []


async def test_borrowed_client_session_is_not_closed(fake: FakeDedalus) -> None:
    """A client_session we were given is used, and left open for its owner."""
    async with aiohttp.ClientSession() as borrowed:
        async with Session(API_KEY, base_url=fake.base_url, client_session=borrowed) as s:
            await s.create_execution(MACHINE, ["true"])
        assert not borrowed.closed
        assert fake.create_count == 1


async def test_own_client_session_is_closed(fake: FakeDedalus) -> None:
    """The aiohttp session we create is closed with the Session."""
    async with Session(API_KEY, base_url=fake.base_url) as s:
        assert isinstance(s._transport, AiohttpTransport)
        inner = s._transport._session
        assert inner is not None
    assert inner.closed


async def test_unclosed_session_warns(fake: FakeDedalus) -> None:
    """Forgetting to close an open Session gives a ResourceWarning naming the fix."""
    s = Session(API_KEY, base_url=fake.base_url)
    await s.open()
    assert isinstance(s._transport, AiohttpTransport)
    inner = s._transport._session
    assert inner is not None
    with pytest.warns(ResourceWarning, match="async with"):
        del s
        gc.collect()
    await inner.close()


# --- endpoints -----------------------------------------------------------------------


async def test_create_sends_a_compact_uuid7_key_and_the_body(
    session: Session, fake: FakeDedalus
) -> None:
    """A create carries a fresh compact UUIDv7 Idempotency-Key and the documented body."""
    handle = await session.create_execution(
        "dm-95e5a864-0e30-55bf-b0c5-dd9c4df102d1",
        ["/bin/bash", "-c", "echo hi"],
        cwd="/home/machine",
        env={"FOO": "secret-value"},
        stdin="input",
        timeout_ms=1500,
    )
    sent = fake.requests[-1]
    assert sent.method == "POST"
    assert sent.path == "/v1/machines/dm-95e5a864-0e30-55bf-b0c5-dd9c4df102d1/executions"
    assert sent.idempotency_key is not None
    assert UUID7.fullmatch(sent.idempotency_key)
    assert handle.idempotency_key == sent.idempotency_key
    assert sent.json == {
        "command": ["/bin/bash", "-c", "echo hi"],
        "cwd": "/home/machine",
        "env": {"FOO": "secret-value"},
        "stdin": "input",
        "timeout_ms": 1500,
    }
    assert handle.last is not None
    assert handle.last.status == "wake_in_progress"
    assert handle.last.env_keys == ("FOO",)
    assert handle.ref == ExecutionRef(
        machine_id="dm-95e5a864-0e30-55bf-b0c5-dd9c4df102d1",
        execution_id=handle.execution_id,
        idempotency_key=sent.idempotency_key,
    )


async def test_keys_differ_between_creates(session: Session, fake: FakeDedalus) -> None:
    """Two logical creates never share a key."""
    await session.create_execution(MACHINE, ["true"])
    await session.create_execution(MACHINE, ["true"])
    keys = {r.idempotency_key for r in fake.requests_for("POST")}
    assert len(keys) == 2
    assert fake.create_count == 2


async def test_get_refresh_output_and_cancel(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """get_execution, refresh, output and cancel (DELETE) through the handle."""
    fake.set_script(Script.running(1.0, Outcome(stdout="out\n", stderr="err\n")))
    handle = await session.create_execution(MACHINE, ["prog"])
    got = await session.get_execution(MACHINE, handle.execution_id)
    assert got.status == "running"
    clock.advance(2)
    refreshed = await handle.refresh()
    assert refreshed.status == "succeeded"
    assert handle.last == refreshed
    out = await handle.output()
    assert (out.stdout, out.stderr, out.stdout_bytes) == ("out\n", "err\n", 4)
    fake.set_script(Script.stuck())
    running = await session.create_execution(MACHINE, ["forever"])
    cancelled = await running.cancel()
    assert cancelled.status == "cancelled"
    assert running.last == cancelled
    assert fake.requests[-1].method == "DELETE"


async def test_delete_execution_then_not_found(session: Session, fake: FakeDedalus) -> None:
    """Deleting a finished execution forgets it: the next GET is a NotFoundError."""
    fake.set_script(Script.immediate())
    handle = await session.create_execution(MACHINE, ["true"])
    deleted = await session.delete_execution(MACHINE, handle.execution_id)
    assert deleted.status == "succeeded"
    with pytest.raises(NotFoundError) as info:
        await session.get_execution(MACHINE, handle.execution_id)
    assert info.value.status == 404
    assert info.value.request_id is not None


async def test_list_follows_every_page(session: Session, fake: FakeDedalus) -> None:
    """list_executions yields every execution, oldest first, across pages."""
    fake.set_script(Script.immediate())
    ids = [(await session.create_execution(MACHINE, ["true"])).execution_id for _ in range(5)]
    await session.create_execution("dm-7f5bf56c-8390-58ff-a89a-cd813a7323a7", ["true"])
    listed = [e.execution_id async for e in session.list_executions(MACHINE, limit=2)]
    assert listed == ids
    pages = fake.requests_for("GET", "/executions")
    assert len(pages) == 3
    assert pages[0].query == {"limit": "2"}
    assert "cursor" in pages[1].query


async def test_list_of_unknown_machine_is_empty_or_404(session: Session) -> None:
    """A machine with no executions lists nothing."""
    assert [
        e async for e in session.list_executions("dm-bedca8eb-d881-5922-9a16-3ef2b928fcac")
    ] == []


async def test_iter_events_reads_the_log(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """iter_events yields the whole log in order; the handle's events() is the same."""
    fake.set_script(Script.running(0.5, Outcome(stdout="a\n")))
    handle = await session.create_execution(MACHINE, ["x"])
    clock.advance(1)
    events = [e async for e in session.iter_events(MACHINE, handle.execution_id)]
    assert [e.sequence for e in events] == sorted(e.sequence for e in events)
    assert [e.type for e in events] == ["lifecycle", "stdout", "lifecycle"]
    assert events[0].status == "running"
    assert events[-1].status == "succeeded"
    again = [e async for e in handle.events()]
    assert again == events


async def test_execution_attaches_without_a_request(session: Session, fake: FakeDedalus) -> None:
    """session.execution() and attach() build handles without sending anything."""
    handle = session.execution(MACHINE, "exe-1")
    assert handle.last is None
    assert handle.ref.idempotency_key is None
    ref = ExecutionRef(
        machine_id=MACHINE,
        execution_id="exe-1",
        idempotency_key="k",
    )
    attached = session.attach(ref.to_dict())
    assert attached.ref == ref
    assert session.attach(ExecutionRef.from_json(ref.to_json())).ref == ref
    assert fake.requests == []
    with pytest.raises(TypeError, match="ref"):
        session.attach("dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0/exe-1")  # type: ignore[arg-type]


async def test_ids_with_odd_characters_round_trip(session: Session, fake: FakeDedalus) -> None:
    """IDs travel percent-encoded and arrive intact."""
    handle = await session.create_execution("dm a?b#c", ["true"])
    assert handle.machine_id == "dm a?b#c"
    assert (await handle.refresh()).machine_id == "dm a?b#c"


# --- validation happens before anything is sent ---------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((MACHINE, "ls -la"), {}, TypeError),
        ((MACHINE, []), {}, ValueError),
        ((MACHINE, ["ls"]), {"timeout_ms": -1}, ValueError),
        ((MACHINE, ["ls"]), {"env": {"A": 1}}, TypeError),
        (("", ["ls"]), {}, ValueError),
        (("dm/1", ["ls"]), {}, ValueError),
        (
            (MACHINE, ["ls"]),
            {"idempotency_key": "has space"},
            ValueError,
        ),
    ],
)
async def test_bad_input_sends_nothing(
    session: Session,
    fake: FakeDedalus,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    error: type[Exception],
) -> None:
    """Bad arguments raise before any request reaches the server."""
    with pytest.raises(error):
        await session.create_execution(*args, **kwargs)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        await session.get_execution(MACHINE, "")
    with pytest.raises(ValueError, match="limit"):
        _ = [e async for e in session.list_executions(MACHINE, limit=0)]
    assert fake.requests == []


# --- errors from the server ----------------------------------------------------------


async def test_wrong_key_is_authentication_error_without_the_key(fake: FakeDedalus) -> None:
    """401 maps to AuthenticationError; neither the message nor the repr has the key."""
    wrong = "wrong-key-SHOULD-NOT-LEAK"
    async with Session(wrong, base_url=fake.base_url) as s:
        with pytest.raises(AuthenticationError) as info:
            await s.get_execution(MACHINE, "exe-1")
    err = info.value
    assert err.error_code == "AUTH_INVALID"
    assert err.retryable is False
    for text in (str(err), repr(err), err.body, err.message):
        assert wrong not in text
        assert API_KEY not in text
    assert len(fake.requests) == 1  # never retried


async def test_idempotency_key_reuse_is_refused(session: Session, fake: FakeDedalus) -> None:
    """Same key, different body: IdempotencyKeyReusedError, sent once, nothing created."""
    await session.create_execution(MACHINE, ["true"], idempotency_key="my-key-1")
    with pytest.raises(IdempotencyKeyReusedError) as info:
        await session.create_execution(MACHINE, ["false"], idempotency_key="my-key-1")
    assert info.value.retryable is False
    assert fake.create_count == 1
    assert len(fake.requests_for("POST")) == 2


async def test_same_key_same_body_returns_the_same_execution(
    session: Session, fake: FakeDedalus
) -> None:
    """Re-sending a create under its key (e.g. after a crash) does not create twice."""
    first = await session.create_execution(MACHINE, ["echo", "x"], idempotency_key="job-42")
    second = await session.create_execution(MACHINE, ["echo", "x"], idempotency_key="job-42")
    assert first.execution_id == second.execution_id
    assert fake.create_count == 1


async def test_destroyed_machine_conflicts(session: Session, fake: FakeDedalus) -> None:
    """Creating on a destroyed machine is a ConflictError (409), not retried."""
    fake.destroy_machine("dm-0ab2b0af-1482-561f-8e8c-7d937b9e10c4")
    with pytest.raises(ConflictError) as info:
        await session.create_execution("dm-0ab2b0af-1482-561f-8e8c-7d937b9e10c4", ["true"])
    assert info.value.error_code == "INVALID_STATE"
    assert len(fake.requests_for("POST")) == 1


async def test_problem_json_422(session: Session, fake: FakeDedalus) -> None:
    """A 422 in problem-JSON shape is UnprocessableEntityError with the detail."""
    fake.add_fault(
        Fault(
            method="POST",
            status=422,
            body={
                "type": "about:blank",
                "title": "Unprocessable",
                "status": 422,
                "detail": "cwd: bad",
            },
            content_type="application/problem+json",
        )
    )
    with pytest.raises(UnprocessableEntityError, match="cwd: bad"):
        await session.create_execution(MACHINE, ["true"])
    assert fake.create_count == 0


# --- retries -------------------------------------------------------------------------


async def test_get_retries_5xx_with_backoff(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """Two 503s then success: three GETs, full-jitter backoff between them."""
    fake.set_script(Script.immediate())
    handle = await session.create_execution(MACHINE, ["true"])
    fake.add_fault(Fault(method="GET", status=503, times=2))
    before = len(clock.sleeps)
    got = await handle.refresh()
    assert got.status == "succeeded"
    assert len(fake.requests_for("GET")) == 3
    # rand=0.5: 0.5 * 0.25, then 0.5 * 0.5
    assert clock.sleeps[before:] == [0.125, 0.25]


async def test_retry_after_is_obeyed(session: Session, fake: FakeDedalus, clock: FakeClock) -> None:
    """429 with Retry-After: 2 waits exactly 2 s; retry-after-ms wins when both are sent."""
    fake.set_script(Script.immediate())
    handle = await session.create_execution(MACHINE, ["true"])
    fake.add_fault(Fault(method="GET", status=429, headers={"Retry-After": "2"}))
    fake.add_fault(
        Fault(method="GET", status=503, headers={"Retry-After": "9", "retry-after-ms": "150"})
    )
    before = len(clock.sleeps)
    await handle.refresh()
    assert clock.sleeps[before:] == [2.0, 0.15]


async def test_huge_retry_after_gives_up_at_once(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """A server asking for an hour is not waited out: RateLimitedError carries the pause."""
    fake.add_fault(Fault(method="GET", status=429, headers={"Retry-After": "3600"}))
    with pytest.raises(RateLimitedError) as info:
        await session.get_execution(MACHINE, "exe-1")
    assert info.value.retry_after == 3600.0
    assert clock.sleeps == []


async def test_retries_run_out(session: Session, fake: FakeDedalus) -> None:
    """A server that keeps failing: ServerError after max_attempts tries."""
    fake.add_fault(Fault(method="GET", status=500, times=None))
    with pytest.raises(ServerError) as info:
        await session.get_execution(MACHINE, "exe-1")
    assert info.value.status == 500
    assert len(fake.requests_for("GET")) == session.retry.max_attempts


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_permanent_statuses_are_never_retried(
    session: Session, fake: FakeDedalus, status: int
) -> None:
    """400/401/403/404/409/422 are sent once, even if the body says retryable."""
    fake.add_fault(
        Fault(
            method="GET",
            status=status,
            body={"error_code": "X", "message": "no", "retryable": True},
        )
    )
    with pytest.raises(Exception) as info:
        await session.get_execution(MACHINE, "exe-1")
    assert getattr(info.value, "status", None) == status
    assert len(fake.requests_for("GET")) == 1


async def test_lost_create_response_is_retried_under_the_same_key(
    session: Session, fake: FakeDedalus
) -> None:
    """The create happened but its response was lost: the retry sends the same key and the
    same bytes, gets the same execution, and the fake created exactly one."""
    fake.add_fault(Fault(method="POST", drop_after_commit=True))
    handle = await session.create_execution(MACHINE, ["echo", "once"])
    posts = fake.requests_for("POST")
    assert len(posts) == 2
    assert posts[0].idempotency_key == posts[1].idempotency_key == handle.idempotency_key
    assert posts[0].body == posts[1].body
    assert fake.create_count == 1
    assert list(fake.executions) == [handle.execution_id]


async def test_create_5xx_storm_still_creates_once(session: Session, fake: FakeDedalus) -> None:
    """503, 502, then success: one execution, every try under one key."""
    fake.add_fault(Fault(method="POST", status=503))
    fake.add_fault(Fault(method="POST", status=502))
    await session.create_execution(MACHINE, ["true"])
    keys = {r.idempotency_key for r in fake.requests_for("POST")}
    assert len(keys) == 1
    assert fake.create_count == 1


async def test_truncated_and_malformed_bodies_are_retried(
    session: Session, fake: FakeDedalus
) -> None:
    """A body cut short or not JSON is asked for again; a permanent one ends in a typed error."""
    fake.set_script(Script.immediate())
    handle = await session.create_execution(MACHINE, ["true"])
    fake.add_fault(Fault(method="GET", truncate=True, status=200))
    fake.add_fault(Fault(method="GET", malformed=b'{"execution_id": '))
    got = await handle.refresh()
    assert got.status == "succeeded"
    fake.add_fault(Fault(method="GET", malformed=b"<html>oops</html>", times=None))
    with pytest.raises(ResponseDecodeError) as info:
        await handle.refresh()
    assert info.value.status == 200
    assert "<html>" in info.value.body


async def test_wrong_shape_names_the_field(session: Session, fake: FakeDedalus) -> None:
    """A 200 whose JSON lacks a required field names it."""
    fake.add_fault(
        Fault(method="GET", malformed=json.dumps({"execution_id": "e"}).encode(), times=None)
    )
    with pytest.raises(ResponseDecodeError) as info:
        await session.get_execution(MACHINE, "e")
    assert info.value.field == "machine_id"


async def test_connection_refused_is_transport_error(clock: FakeClock) -> None:
    """Nobody listening: TransportError after the retries, each slept on the fake clock."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with Session(
        API_KEY, base_url=f"http://127.0.0.1:{port}", clock=clock, random=lambda: 0.0
    ) as s:
        with pytest.raises(TransportError) as info:
            await s.get_execution(MACHINE, "exe-1")
    assert info.value.method == "GET"
    assert API_KEY not in str(info.value)
    assert len(clock.sleeps) == s.retry.max_attempts - 1


async def test_slow_server_is_request_timeout(fake: FakeDedalus) -> None:
    """A server slower than request_timeout: RequestTimeout, which is also a TimeoutError."""
    fake.add_fault(Fault(method="GET", delay=2.0))
    async with Session(
        API_KEY, base_url=fake.base_url, request_timeout=0.2, retry=RetryPolicy.none()
    ) as s:
        with pytest.raises(RequestTimeout) as info:
            await s.get_execution(MACHINE, "exe-1")
    assert isinstance(info.value, TimeoutError)
    assert "0.2" in str(info.value)


async def test_dropped_connections_are_retried(session: Session, fake: FakeDedalus) -> None:
    """Connections closed without a response are retried until one answers."""
    fake.set_script(Script.immediate())
    handle = await session.create_execution(MACHINE, ["true"])
    fake.add_fault(Fault(method="GET", drop=True, times=3))
    assert (await handle.refresh()).status == "succeeded"


async def test_redirects_are_not_followed(session: Session, fake: FakeDedalus) -> None:
    """A 3xx is an error, so the key never travels to the Location."""
    fake.add_fault(
        Fault(method="GET", status=307, headers={"Location": "http://127.0.0.2:9/steal"}, body=b"")
    )
    with pytest.raises(Exception) as info:
        await session.get_execution(MACHINE, "exe-1")
    assert "redirect" in str(info.value)
    assert len(fake.requests) == 1


async def test_many_concurrent_calls_share_the_pool(session: Session, fake: FakeDedalus) -> None:
    """200 concurrent creates all succeed through one Session."""
    handles = await asyncio.gather(
        *(session.create_execution(MACHINE, ["true"]) for _ in range(200))
    )
    assert len({h.execution_id for h in handles}) == 200
    assert fake.create_count == 200
    assert all(isinstance(h.last, Execution) for h in handles)


async def test_queued_request_near_its_deadline_gives_up_waiting_for_a_connection() -> None:
    """Requests beyond the pool wait in the transport; near a deadline that wait counts,
    and the queue moves on once the connection is free again."""
    async with FakeDedalus(api_key="k") as fake:
        fake.add_fault(Fault(method="GET", path="/slow", delay=0.5, status=404))
        transport = AiohttpTransport(
            fake.base_url, {"x-api-key": "k"}, request_timeout=30.0, max_connections=1
        )
        await transport.open()
        try:
            busy = asyncio.create_task(transport.send(Request("GET", "/slow")))
            await asyncio.sleep(0.05)
            with pytest.raises(RequestTimeout, match="no free connection"):
                await transport.send(
                    Request("GET", f"/v1/machines/{MACHINE}/executions"), timeout=0.1
                )
            later = await transport.send(Request("GET", f"/v1/machines/{MACHINE}/executions"))
            assert later.status == 200
            assert (await busy).status == 404
        finally:
            await transport.aclose()
