"""Security: secrets never leak, redirects never carry the key, keys are checked properly.

* The API key and the values of ``env``/``stdin`` sent to the server never appear in any
  repr, str, log record or exception (message, args, repr, attributes, the whole
  ``__cause__``/``__context__`` chain), on every error path we can produce.
* A redirect is an error: no request (so no key) ever reaches the ``Location``, checked
  with a second real server that records what it receives.
* Plain http only to loopback (hostile look-alikes of loopback are refused).
* The fake's and the local backend's key check rejects every wrong key; the local
  backend listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dedalus_async import (
    APIStatusError,
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    ExecutionFailed,
    ExecutionRef,
    ExecutionRequest,
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
    WaitTimeout,
)
from dedalus_async._local import LocalBackend
from dedalus_async.testing import FakeClock, FakeDedalus, Fault, Outcome, Script

from .serving import serving

MACHINE = "dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0"  # the real form: "dm-" and a UUID

# Distinctive values: any occurrence of one of them in collected text is a leak.
KEY = "sk-live-7f3a9c2e-SECRET-KEY-DO-NOT-LEAK"
WRONG_KEY = "sk-wrong-41d0aa-SECRET-ALSO-PRIVATE"
ENV_SECRET = "env-value-91b2e4-SECRET-TOKEN"
STDIN_SECRET = "stdin-5c1d88-SECRET-PASSWORD"
SECRETS = (KEY, WRONG_KEY, ENV_SECRET, STDIN_SECRET)
ENV = {"API_TOKEN": ENV_SECRET, "PLAIN": "not secret"}


# --- collecting everything a user (or their logs and error tracker) could see -----------


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception reachable through causes, contexts and groups."""
    seen: dict[int, BaseException] = {}
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen[id(current)] = current
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                stack.append(linked)
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
    return list(seen.values())


class Collector:
    """Every text a caller could print, log or send to an error tracker."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, label: str, obj: object) -> None:
        self.texts.append((f"{label} str", str(obj)))
        self.texts.append((f"{label} repr", repr(obj)))

    def add_error(self, label: str, exc: BaseException) -> None:
        formatted = "".join(traceback.format_exception(exc))
        self.texts.append((f"{label} traceback", formatted))
        for i, item in enumerate(exception_chain(exc)):
            name = f"{label} chain[{i}] {type(item).__name__}"
            self.add(name, item)
            self.texts.append((f"{name} args", repr(item.args)))
            self.texts.append((f"{name} notes", repr(getattr(item, "__notes__", None))))
            for attr, value in vars(item).items():
                self.texts.append((f"{name}.{attr}", repr(value)))

    def add_logs(self, records: list[logging.LogRecord]) -> None:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        for record in records:
            self.texts.append((f"log {record.name}", formatter.format(record)))
            self.texts.append((f"log {record.name} args", repr(record.args)))

    def assert_clean(self) -> None:
        assert self.texts, "nothing was collected: the scan proves nothing"
        leaks = [
            (label, secret) for label, text in self.texts for secret in SECRETS if secret in text
        ]
        assert not leaks, f"secrets leaked into: {leaks}"


# --- every error path, each scanned on its own -----------------------------------------


class World:
    """A fake on a fake clock, an open Session on it with KEY, and what was collected."""

    def __init__(self, fake: FakeDedalus, session: Session, clock: FakeClock) -> None:
        self.fake = fake
        self.session = session
        self.clock = clock
        self.seen = Collector()

    async def expect(
        self, error: type[BaseException], call: Awaitable[Any], label: str = "error"
    ) -> BaseException:
        """Await ``call``, which must raise ``error``; collect the exception."""
        with pytest.raises(error) as info:
            await call
        self.seen.add_error(label, info.value)
        return info.value


@pytest.fixture
async def world() -> AsyncIterator[World]:
    clock = FakeClock()
    async with (
        FakeDedalus(api_key=KEY, clock=clock) as fake,
        Session(KEY, base_url=fake.base_url, clock=clock, random=lambda: 0.5) as session,
    ):
        yield World(fake, session, clock)
    assert fake.errors == []


async def path_auth_failure(w: World) -> None:
    async with Session(WRONG_KEY, base_url=w.fake.base_url, clock=w.clock) as other:
        w.seen.add("session with wrong key", other)
        await w.expect(
            AuthenticationError,
            other.run(MACHINE, ["env"], env=ENV, stdin=STDIN_SECRET),
        )
        await w.expect(
            AuthenticationError,
            other.get_execution(MACHINE, "exe-1"),
        )


async def path_not_found(w: World) -> None:
    await w.expect(
        NotFoundError,
        w.session.get_execution(MACHINE, "exe-missing"),
    )
    await w.expect(
        NotFoundError,
        w.session.execution(MACHINE, "exe-missing").wait(timeout=5),
    )


async def path_conflict(w: World) -> None:
    w.fake.destroy_machine("dm-0ab2b0af-1482-561f-8e8c-7d937b9e10c4")
    await w.expect(
        ConflictError,
        w.session.create_execution(
            "dm-0ab2b0af-1482-561f-8e8c-7d937b9e10c4", ["x"], env=ENV, stdin=STDIN_SECRET
        ),
    )


async def path_unprocessable(w: World) -> None:
    # a body the server refuses though the client's checks pass (a rule only the server
    # knows): an RFC 7807 problem, as the API answers 422
    w.fake.add_fault(
        Fault(
            method="POST",
            status=422,
            body={"title": "Unprocessable Entity", "status": 422, "detail": "command: refused"},
            content_type="application/problem+json",
        )
    )
    await w.expect(
        UnprocessableEntityError,
        w.session.create_execution(MACHINE, ["echo", ENV_SECRET], env=ENV, stdin=STDIN_SECRET),
    )


async def path_idempotency_key_reused(w: World) -> None:
    await w.session.create_execution(MACHINE, ["x"], env=ENV, idempotency_key="job-1")
    await w.expect(
        IdempotencyKeyReusedError,
        w.session.create_execution(
            MACHINE,
            ["y"],
            env=ENV,
            stdin=STDIN_SECRET,
            idempotency_key="job-1",
        ),
    )


async def path_rate_limited(w: World) -> None:
    w.fake.add_fault(Fault(status=429, headers={"Retry-After": "3600"}))
    await w.expect(
        RateLimitedError,
        w.session.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET),
    )


async def path_server_error(w: World) -> None:
    w.fake.add_fault(Fault(method="POST", status=503, times=None))
    await w.expect(
        ServerError,
        w.session.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET),
    )


async def path_connection_refused(w: World) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with Session(KEY, base_url=f"http://127.0.0.1:{port}", clock=w.clock) as s:
        await w.expect(
            TransportError,
            s.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET),
        )


async def path_connection_dropped(w: World) -> None:
    w.fake.add_fault(Fault(method="POST", drop=True, times=None))
    await w.expect(
        TransportError,
        w.session.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET),
    )


async def path_body_cut_short(w: World) -> None:
    w.fake.add_fault(Fault(method="POST", truncate=True, times=None))
    await w.expect(
        TransportError,
        w.session.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET),
    )


async def path_malformed_http(w: World) -> None:
    """A server whose answer is not even HTTP (aiohttp's parser rejects a header line)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nthis is not a header\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with (
        server,
        Session(
            KEY, base_url=f"http://127.0.0.1:{port}", clock=w.clock, retry=RetryPolicy.none()
        ) as s,
    ):
        await w.expect(TransportError, s.get_execution(MACHINE, "exe-1"))
        await w.expect(
            TransportError,
            s.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET),
        )


async def path_request_timeout(w: World) -> None:
    w.fake.add_fault(Fault(method="POST", delay=1.0))
    async with Session(
        KEY,
        base_url=w.fake.base_url,
        clock=w.clock,
        request_timeout=0.1,
        retry=RetryPolicy.none(),
    ) as s:
        await w.expect(
            RequestTimeout,
            s.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET),
        )


async def path_decode_error(w: World) -> None:
    w.fake.add_fault(Fault(method="POST", malformed=b'{"execution_id": 5}', times=None))
    await w.expect(
        ResponseDecodeError,
        w.session.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET),
    )
    w.fake.add_fault(Fault(method="GET", malformed=b"<html>not json</html>", times=None))
    await w.expect(
        ResponseDecodeError,
        w.session.get_execution(MACHINE, "exe-1"),
    )


async def path_wait_timeout(w: World) -> None:
    w.fake.set_script(Script.stuck())
    error = await w.expect(
        WaitTimeout,
        w.session.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET, timeout=3),
    )
    assert isinstance(error, WaitTimeout)
    w.seen.add("WaitTimeout.ref json", error.ref.to_json())


async def path_execution_failed(w: World) -> None:
    w.fake.set_script(
        Script.immediate(
            Outcome(
                status="failed",
                exit_code=None,
                signal=9,
                error_code="OOM_KILLED",
                error_message="the command ran out of memory",
                stdout="out",
                stderr="err",
            )
        )
    )
    error = await w.expect(
        ExecutionFailed,
        w.session.run(
            MACHINE,
            ["x"],
            env=ENV,
            stdin=STDIN_SECRET,
            check=True,
        ),
    )
    assert isinstance(error, ExecutionFailed)
    w.seen.add("ExecutionFailed.result", error.result)


async def path_cancel_remote_fails(w: World) -> None:
    """The remote cancel after a timeout fails too: logged as a warning, scanned."""
    w.fake.set_script(Script.stuck())
    w.fake.add_fault(Fault(method="DELETE", status=503, times=None))
    await w.expect(
        WaitTimeout,
        w.session.run(
            MACHINE,
            ["x"],
            env=ENV,
            stdin=STDIN_SECRET,
            timeout=3,
            cancel_remote=True,
        ),
    )


async def path_session_closed(w: World) -> None:
    closed = Session(KEY, base_url=w.fake.base_url, clock=w.clock)
    await w.expect(
        SessionClosedError,
        closed.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET),
    )
    async with closed:
        pass
    await w.expect(SessionClosedError, closed.get_execution(MACHINE, "exe-1"))
    w.seen.add("closed session", closed)


async def path_bad_arguments(w: World) -> None:
    with pytest.raises(TypeError) as type_error:
        await w.session.create_execution(MACHINE, ["x"], env={"TOKEN": [ENV_SECRET]})  # type: ignore[dict-item]
    w.seen.add_error("env value of the wrong type", type_error.value)
    with pytest.raises(ValueError) as value_error:
        await w.session.create_execution(MACHINE, ["x"], env={"BAD=KEY": ENV_SECRET})
    w.seen.add_error("bad env key", value_error.value)
    with pytest.raises(ConfigurationError) as config_error:
        Session(KEY, base_url="http://dcs.example.com")
    w.seen.add_error("insecure base_url", config_error.value)


async def path_fan_out(w: World) -> None:
    w.fake.destroy_machine("dm-0ab2b0af-1482-561f-8e8c-7d937b9e10c4")
    w.fake.set_script(Script.immediate(Outcome(stdout="fine")))
    requests = [
        ExecutionRequest(machine_id=m, command=["x"], env=ENV, stdin=STDIN_SECRET)
        for m in (
            "dm-0ab2b0af-1482-561f-8e8c-7d937b9e10c4",
            MACHINE,
        )
    ]
    for request in requests:
        w.seen.add("ExecutionRequest", request)
    await w.expect(ExceptionGroup, w.session.run_many(requests), "run_many group")
    outcomes = await w.session.run_many(requests, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            w.seen.add_error("run_many outcome", outcome)
        else:
            w.seen.add("run_many result", outcome)


async def path_success(w: World) -> None:
    """Not an error: every object a successful run hands back is scanned too."""
    w.fake.set_script(Script.default(Outcome(stdout="done")))
    handle = await w.session.create_execution(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET)
    w.seen.add("handle", handle)
    w.seen.add("ref", handle.ref)
    w.seen.add("ref json", handle.ref.to_json())
    w.seen.add("execution", await handle.wait())
    w.seen.add("stats", handle.stats)
    w.seen.add("output", await handle.output())
    w.seen.add("events", [event async for event in handle.events()])
    result = await w.session.run(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET)
    w.seen.add("result", result)
    w.seen.add("session", w.session)
    w.seen.add("transport", w.session._transport)
    w.seen.add("throttle", w.session.throttle)
    w.seen.add("attached", w.session.attach(ExecutionRef.from_json(handle.ref.to_json())))


ERROR_PATHS: list[Callable[[World], Awaitable[None]]] = [
    path_auth_failure,
    path_not_found,
    path_conflict,
    path_unprocessable,
    path_idempotency_key_reused,
    path_rate_limited,
    path_server_error,
    path_connection_refused,
    path_connection_dropped,
    path_body_cut_short,
    path_malformed_http,
    path_request_timeout,
    path_decode_error,
    path_wait_timeout,
    path_execution_failed,
    path_cancel_remote_fails,
    path_session_closed,
    path_bad_arguments,
    path_fan_out,
    path_success,
]


@pytest.mark.parametrize("path", ERROR_PATHS, ids=lambda p: p.__name__.removeprefix("path_"))
async def test_secrets_never_leak(
    world: World, caplog: pytest.LogCaptureFixture, path: Callable[[World], Awaitable[None]]
) -> None:
    """No repr, str, log record or exception (chain included) shows the key or env/stdin."""
    caplog.set_level(logging.DEBUG)
    await path(world)
    world.seen.add_logs(caplog.records)
    world.seen.assert_clean()


async def test_secrets_did_reach_the_server(world: World) -> None:
    """The scans above are meaningful: the key, env and stdin really were sent."""
    await world.session.create_execution(MACHINE, ["x"], env=ENV, stdin=STDIN_SECRET)
    (sent,) = world.fake.requests
    assert sent.headers["x-api-key"] == KEY
    assert sent.json["env"]["API_TOKEN"] == ENV_SECRET
    assert sent.json["stdin"] == STDIN_SECRET


# --- redirects never carry the key anywhere ---------------------------------------------


class Thief:
    """A second HTTP server on 127.0.0.1 that records every request it gets."""

    def __init__(self) -> None:
        self.received: list[dict[str, str]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(dict(request.headers))
        execution = {
            "execution_id": "exe-stolen",
            "machine_id": MACHINE,
            "command": ["x"],
            "created_at": "2026-01-01T00:00:00Z",
            "status": "succeeded",
        }
        return web.json_response(execution)


@pytest.fixture
async def thief() -> AsyncIterator[Thief]:
    recorder = Thief()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    async with serving(app) as base_url:
        recorder.url = base_url
        yield recorder


REDIRECT_BODIES = [
    pytest.param(b"", id="empty-body"),
    pytest.param("<html><head><title>301 Moved Permanently</title></head></html>", id="html-body"),
    pytest.param({"message": "Found", "error_code": "MOVED"}, id="json-body"),
]


@pytest.mark.parametrize("body", REDIRECT_BODIES)
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("borrowed", [False, True], ids=["own-pool", "borrowed-pool"])
async def test_redirects_never_reach_another_host(
    thief: Thief, status: int, body: bytes | str | dict[str, str], borrowed: bool
) -> None:
    """A 3xx pointing at another server is an APIStatusError that says 'redirect'; the other
    server receives nothing (so never the key), for GETs and creates, with our own pool or
    a borrowed aiohttp session (whose default is to follow redirects)."""
    clock = FakeClock()
    async with FakeDedalus(api_key=KEY, clock=clock) as fake:
        fault = Fault(
            status=status,
            headers={"Location": f"{thief.url}/v1/machines/{MACHINE}/executions"},
            body=body,
            content_type="text/html" if isinstance(body, str) else None,
            times=None,
        )
        fake.add_fault(fault)
        async with aiohttp.ClientSession() as http:
            session = Session(
                KEY, base_url=fake.base_url, clock=clock, client_session=http if borrowed else None
            )
            errors: list[APIStatusError] = []
            async with session:
                with pytest.raises(APIStatusError) as info:
                    await session.get_execution(MACHINE, "exe-1")
                errors.append(info.value)
                with pytest.raises(APIStatusError) as info:
                    await session.create_execution(MACHINE, ["x"], env=ENV)
                errors.append(info.value)
        assert fault.hits == 2  # one request each: a redirect is not retried either
    assert thief.received == []  # the security property, checked first
    for error in errors:
        assert error.status == status
        assert KEY not in str(error)
        assert "redirect" in str(error)  # the caller learns why, whatever the body said


async def test_thief_server_would_have_seen_the_key(thief: Thief) -> None:
    """The redirect test can fail: a client following the Location does reach the thief."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{thief.url}/x", headers={"x-api-key": KEY}) as response,
    ):
        assert response.status == 200
    assert thief.received[0]["x-api-key"] == KEY


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1.nip.io",
        "http://localhost.example.com",
        "http://localhost.",
        "http://0.0.0.0:8080",
        "http://127.1",
        "http://2130706433",
        "http://0x7f000001",
        "http://[::ffff:7f00:1]",
        "http://127.0.0.1@evil.example",
        "http://evil.example#@127.0.0.1",
        "http://evil.example\\@127.0.0.1",
        "http://evil.example/?next=127.0.0.1",
        "HTTP://EVIL.EXAMPLE",
        " http://evil.example",
        "http://127.0.0.1\n.evil.example",
    ],
)
def test_lookalikes_of_loopback_get_no_plain_http(url: str) -> None:
    """Hosts that merely look like loopback (or hide another host) cannot use plain http."""
    with pytest.raises(ConfigurationError) as info:
        Session(KEY, base_url=url)
    assert KEY not in str(info.value)


def test_insecure_base_url_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """DEDALUS_BASE_URL gets the same http check as the argument."""
    monkeypatch.setenv("DEDALUS_BASE_URL", "http://dcs.dedaluslabs.ai")
    with pytest.raises(ConfigurationError, match="plain http"):
        Session(KEY)


# --- the key check of the fake and of the local backend ---------------------------------


def wrong_keys(real: str) -> list[tuple[str, dict[str, str]]]:
    """Credentials that must all be refused: wrong keys of many lengths, near misses."""
    near = real[:-1] + ("A" if real[-1] != "A" else "B")
    keys = {
        "one-char": "x",
        "prefix": real[: len(real) // 2],
        "all-but-last": real[:-1],
        "last-char-changed": near,
        "first-char-changed": ("A" if real[0] != "A" else "B") + real[1:],
        "one-extra": real + "x",
        "doubled": real + real,
        "case-swapped": real.swapcase(),
        "long": "k" * 4000,  # aiohttp refuses header lines over 8190 bytes
        "latin-1": "clé-" + real,
    }
    out: list[tuple[str, dict[str, str]]] = []
    for name, key in keys.items():
        out.append((f"x-api-key {name}", {"x-api-key": key}))
        out.append((f"bearer {name}", {"Authorization": f"Bearer {key}"}))
    out.append(("basic scheme with the real key", {"Authorization": f"Basic {real}"}))
    out.append(("real key as the scheme", {"Authorization": real}))
    out.append(("nothing", {}))
    return out


async def _statuses(base_url: str, credentials: list[tuple[str, dict[str, str]]]) -> dict[str, int]:
    got: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        for name, headers in credentials:
            url = f"{base_url}/v1/machines/dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0/executions"
            async with http.get(url, headers=headers) as response:
                got[name] = response.status
    return got


async def test_fake_refuses_every_wrong_key() -> None:
    """Wrong keys of every length, near misses and wrong schemes are all 401."""
    async with FakeDedalus(api_key=KEY) as fake:
        got = await _statuses(fake.base_url, wrong_keys(KEY))
        ok = await _statuses(
            fake.base_url,
            [("x-api-key", {"x-api-key": KEY}), ("bearer", {"Authorization": f"Bearer {KEY}"})],
        )
    assert got == dict.fromkeys(got, 401)
    assert ok == {"x-api-key": 200, "bearer": 200}


@pytest.fixture
def local_backend_options(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """The plugin's ``local_backend`` announcing itself as it starts, with every log record
    captured from before the start (none may carry its key)."""
    caplog.set_level(logging.DEBUG)
    return {"announce": True}


async def test_local_backend_refuses_every_wrong_key(local_backend: LocalBackend) -> None:
    """The local backend's random key is the only one it accepts, and it is never logged."""
    got = await _statuses(local_backend.base_url, wrong_keys(local_backend.api_key))
    assert got == dict.fromkeys(got, 401)
    ok = await _statuses(local_backend.base_url, [("real", {"x-api-key": local_backend.api_key})])
    assert ok == {"real": 200}


async def test_local_backend_never_logs_or_shows_its_key(
    local_backend: LocalBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """Starting (with the announcement) and using the backend log nothing with its key."""
    async with local_backend.session() as session:
        await session.run("dm-47129f7a-63bc-53e9-8fd8-4e0a2e5f4ee0", ["true"], timeout=10)
        text = repr(session) + repr(local_backend) + repr(local_backend.server)
    records = [r.getMessage() for r in [*caplog.get_records("setup"), *caplog.records]]
    assert any("without a sandbox" in m for m in records)  # the announcement was captured
    assert all(local_backend.api_key not in m for m in records)
    assert local_backend.api_key not in text


async def test_local_backend_listens_on_127_0_0_1_only(local_backend: LocalBackend) -> None:
    """Another loopback address (and IPv6 loopback) on the same port is refused: the socket
    is bound to 127.0.0.1 itself, not to a wildcard address."""
    port = int(local_backend.base_url.rsplit(":", 1)[1])
    assert local_backend.base_url == f"http://127.0.0.1:{port}"
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    await writer.wait_closed()
    for family, host in ((socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                outcome = sock.connect_ex((host, port))
        except OSError as exc:  # e.g. no IPv6 on this host: refused all the same
            outcome = exc.errno or -1
        assert outcome != 0, f"{host}:{port} accepted a connection"


async def test_dedalus_error_messages_of_the_fake_never_echo_credentials() -> None:
    """The fake's own 401 bodies never echo the presented key (so errors built from them
    cannot either)."""
    async with FakeDedalus(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        url = f"{fake.base_url}/v1/machines/dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0/executions"
        async with http.get(url, headers={"x-api-key": WRONG_KEY}) as response:
            body = await response.text()
            assert response.status == 401
    assert WRONG_KEY not in body
    assert KEY not in body
