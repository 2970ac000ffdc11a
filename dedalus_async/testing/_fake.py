"""A fake Dedalus executions server for tests, served over real loopback HTTP by aiohttp.

:class:`FakeDedalus` is the production server
(:class:`~dedalus_async._server.ExecutionsServer`, whose module docstring states the
API's rules: auth, idempotency, validation, pagination, events, logs, error bodies)
served by :class:`~dedalus_async._local.HTTPServer`, plus what only tests need:

Scripted executions
    By default executions are played by a :class:`~dedalus_async.testing.ScriptedRunner`
    from a :class:`~dedalus_async.testing.Script`, lazily against the injected clock (see
    :mod:`._fake_script` for the exact timeline); :meth:`FakeDedalus.set_script` changes
    the script of executions created from then on. Any other
    :class:`~dedalus_async.testing.Runner` may be passed instead.

The request log
    ``requests`` is every request received, in order (unauthenticated and faulted ones
    too), as a :class:`RecordedRequest` with its credentials (the repr masks them). Set
    ``record_requests=False`` for large benchmarks. ``in_flight`` and ``peak_in_flight``
    count requests being answered, in total and per method.

Faults
    :class:`Fault` s are matched in the order they were added; the first match fires.
    ``drop`` closes the TCP connection before the request is processed, so the client sees
    a disconnection with no response (``aiohttp.ServerDisconnectedError``).
    ``drop_after_commit`` processes the request first (the create happens), then drops.
    ``truncate`` sends the real status and headers with the full ``Content-Length`` but
    only the first half of the body, then closes (``aiohttp.ClientPayloadError``).
    ``malformed`` processes the request and answers 200 with the given raw bytes.
    ``status`` answers with that status (and an API-shaped error body by default) without
    processing. ``delay`` really sleeps first (for request timeouts); ``headers`` are added
    to whatever is sent. With ``fault_rate`` > 0, each request additionally has that
    probability of a random fault, drawn from a ``random.Random(fault_seed)``: a 503
    ``UNAVAILABLE``, a ``drop``, or a ``drop_after_commit``, equally likely.

Lists and hints
    ``list_order="newest"`` serves each machine's executions list newest first, with
    offset cursors (a real server's order is not documented; the default is oldest
    first). ``Script(hints="remaining")`` makes a scripted execution's hint the time left
    in its current phase instead of the phase's whole duration.

Latency
    ``latency`` (seconds) adds a real sleep to every request, before faults and the
    server's answer, for concurrency-limit tests.

Machines
    The server's machines (``fake.machines``; rules in
    :mod:`dedalus_async._machine_records`) move on the fake's clock;
    ``fake.machine_timings`` sets how long each phase lasts for machines created from then
    on, :meth:`~dedalus_async._server.ExecutionsServer.add_machine` makes one without a
    request, and :meth:`FakeDedalus.fail_machine` makes one fail (now, or at its next
    start or wake).

The controls wrap the server's handler; the server's rules never see them.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Mapping
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final

import attrs
from aiohttp import web

from dedalus_async import Session
from dedalus_async._clock import Clock, SystemClock
from dedalus_async._http_server import HTTPServer, to_web_response
from dedalus_async._machine_records import FailWhen
from dedalus_async._records import Runner
from dedalus_async._server import APIRequest, ExecutionsServer

from ._fake_script import Script, ScriptedRunner, ScriptFactory

__all__ = ["FAKE_API_KEY", "FakeDedalus", "Fault", "RecordedRequest"]

#: The API key a :class:`FakeDedalus` accepts unless given another: a test key, not a secret.
FAKE_API_KEY: Final = "test-key"

_SECRET_HEADERS = frozenset({"x-api-key", "authorization"})

_ERROR_CODES: dict[int, str] = {
    400: "BAD_REQUEST",
    401: "AUTH_INVALID",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    409: "INVALID_STATE",
    422: "VALIDATION_FAILED",
    425: "TOO_EARLY",
    429: "RATE_LIMITED",
    500: "INTERNAL",
    502: "BAD_GATEWAY",
    503: "UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}


def _masked(headers: Mapping[str, str]) -> str:
    return repr({k: ("***" if k in _SECRET_HEADERS else v) for k, v in headers.items()})


@attrs.frozen
class RecordedRequest:
    """One request as the fake received it (credentials included, so tests can check them).

    ``headers`` has lowercase keys; ``json`` is the parsed body or ``None``; ``at`` is the
    server clock's ``monotonic()``. The repr masks credential headers.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = attrs.field(repr=_masked)
    body: bytes
    json: Any
    at: float
    request_id: str

    @property
    def idempotency_key(self) -> str | None:
        """The ``Idempotency-Key`` header, if sent."""
        return self.headers.get("idempotency-key")

    @property
    def org_id(self) -> str | None:
        """The ``X-Dedalus-Org-Id`` header, if sent."""
        return self.headers.get("x-dedalus-org-id")


def _retryable(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


def _error_body(status: int) -> dict[str, Any]:
    try:
        message = HTTPStatus(status).phrase
    except ValueError:
        message = f"HTTP {status}"
    return {
        "error_code": _ERROR_CODES.get(status, f"HTTP_{status}"),
        "message": message,
        "retryable": _retryable(status),
    }


@attrs.define(eq=False)
class Fault:
    """A misbehaviour to inject; see the module docstring for what each kind does.

    ``method`` (``None`` = any) and ``path`` (a regex searched in the decoded request
    path, ``None`` = any) select requests. ``times`` is how many matching requests it
    fires on (``None`` = forever); ``hits`` counts how often it fired. At most one of
    ``drop``, ``drop_after_commit``, ``status``/``malformed`` may be set; ``truncate``
    combines with ``status`` or ``malformed``; ``delay`` and ``headers`` with anything.

    Note that aiohttp's client itself re-sends an idempotent request (GET, DELETE, ...)
    once when the server disconnects before answering: a single ``drop`` of a GET never
    reaches the caller; use ``times=2`` to make it visible.
    """

    method: str | None = None
    path: str | None = None
    status: int | None = None
    body: bytes | str | dict[str, Any] | None = None
    headers: dict[str, str] = attrs.Factory(dict)
    content_type: str | None = None
    delay: float = 0.0
    drop: bool = False
    drop_after_commit: bool = False
    truncate: bool = False
    malformed: bytes | None = None
    times: int | None = 1
    hits: int = 0

    def __attrs_post_init__(self) -> None:
        exclusive = [
            self.drop,
            self.drop_after_commit,
            self.status is not None or self.malformed is not None,
        ]
        if sum(exclusive) > 1:
            raise ValueError("Fault: choose one of drop, drop_after_commit, status/malformed")
        if self.status is not None and self.malformed is not None:
            raise ValueError("Fault: status and malformed are alternatives")
        if self.truncate and (self.drop or self.drop_after_commit):
            raise ValueError("Fault: a dropped connection cannot also be truncated")
        if self.body is not None and self.status is None:
            raise ValueError("Fault: body needs a status (use malformed for a raw 200 body)")
        if self.times is not None and self.times < 1:
            raise ValueError("Fault: times must be >= 1 or None")
        if self.delay < 0:
            raise ValueError("Fault: delay must be >= 0")
        if self.path is not None:
            re.compile(self.path)

    @property
    def exhausted(self) -> bool:
        """True once the fault has fired ``times`` times."""
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str) -> bool:
        """Whether a request with this method and decoded path is selected."""
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path is None or re.search(self.path, path) is not None


def _json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


class FakeDedalus(ExecutionsServer):
    """The fake executions server; ``async with FakeDedalus() as fake: fake.base_url``.

    Pass the same :class:`~dedalus_async.testing.FakeClock` to the fake and to the client
    so scripted executions progress with the client's sleeps. ``script`` (one
    :class:`Script`, or a factory called with each create body) configures the default
    :class:`ScriptedRunner`; pass ``runner`` instead to play executions some other way.

    Everything :class:`~dedalus_async._server.ExecutionsServer` has is here too:
    ``executions`` holds every execution not deleted, by id; records are brought up to
    date lazily, so use :meth:`get_record` to read a current one. ``requests`` is every
    request received, in order (unauthenticated ones too).
    """

    def __init__(
        self,
        *,
        api_key: str = FAKE_API_KEY,
        clock: Clock | None = None,
        runner: Runner | None = None,
        script: Script | ScriptFactory | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        page_size: int = 50,
        max_page_size: int = 100,
        output_cap: int = 1_048_576,
        require_idempotency_key: bool = True,
        strict_idempotency_keys: bool = False,
        fault_rate: float = 0.0,
        fault_seed: int = 0,
        latency: float = 0.0,
        record_requests: bool = True,
        list_order: str = "oldest",
    ) -> None:
        if runner is not None and script is not None:
            raise ValueError("pass either runner or script: a script configures the default runner")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError("fault_rate must be within [0, 1]")
        clock = clock if clock is not None else SystemClock()
        super().__init__(
            api_key=api_key,
            runner=runner if runner is not None else ScriptedRunner(clock, script),
            clock=clock,
            page_size=page_size,
            max_page_size=max_page_size,
            output_cap=output_cap,
            require_idempotency_key=require_idempotency_key,
            strict_idempotency_keys=strict_idempotency_keys,
            name="FakeDedalus",
            list_order=list_order,
        )
        #: The key clients must send (``x-api-key`` or Bearer): a test key, not a secret.
        self.api_key = api_key
        self.host = host
        self.port = port
        #: Probability of a random fault per request (see the module docstring).
        self.fault_rate = fault_rate
        self.random = random.Random(fault_seed)
        self.latency = latency
        self.record_requests = record_requests

        self.requests: list[RecordedRequest] = []
        #: every fault ever added, fired or not
        self.faults: list[Fault] = []
        #: how many random faults of each kind fired: "status", "drop", "drop_after_commit"
        self.random_fault_hits: dict[str, int] = {}
        self.in_flight: dict[str, int] = {"total": 0}
        self.peak_in_flight: dict[str, int] = {"total": 0}

        self._active_faults: list[Fault] = []
        #: the HTTP side: every request goes through the test controls first
        self.http = HTTPServer(self, host=host, port=port, handler=self._handle)
        self.app: web.Application = self.http.app

    def session(self, **kwargs: Any) -> Session:
        """A new (not yet opened) :class:`~dedalus_async.Session` pointed at this fake, on
        the fake's own clock; keyword arguments go to :class:`~dedalus_async.Session`."""
        options: dict[str, Any] = {"clock": self.clock, **kwargs}
        return Session(api_key=self.api_key, base_url=self.base_url, **options)

    # -- lifecycle -------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """A new aiohttp application serving this fake's state (e.g. for aiohttp's
        ``TestServer``); :attr:`app` is one made at construction."""
        return self.http.make_app()

    async def start(self) -> None:
        """Bind ``host:port`` (port 0 = a free one) and serve; sets :attr:`base_url`."""
        await self.http.start()

    async def close(self) -> None:
        """Stop serving and close the runner. Safe to call twice."""
        await self.http.close()

    async def __aenter__(self) -> FakeDedalus:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` once started."""
        return self.http.base_url

    def __repr__(self) -> str:
        where = self.public_url or "not started"
        return (
            f"<FakeDedalus {where} executions={len(self.executions)} "
            f"created={self.create_count} requests={self.request_count} "
            f"active_faults={len(self._active_faults)}>"
        )

    # -- test controls ---------------------------------------------------------------

    def set_script(self, script: Script | ScriptFactory | None) -> None:
        """Script executions created from now on (only with the default runner)."""
        if not isinstance(self.runner, ScriptedRunner):
            raise TypeError(f"set_script needs a ScriptedRunner, this fake runs {self.runner!r}")
        self.runner.set_script(script)

    def fail_machine(
        self, machine_id: str, error: str = "injected failure", *, when: FailWhen | None = None
    ) -> None:
        """Make a machine fail: at once (``when=None``), or at the end of its next
        ``"wake"``, ``"start"`` or either (``"any"``) instead of running (rule S5)."""
        machine = self.get_machine_record(machine_id)
        if when is None:
            machine.fail_now(error, self.clock.monotonic())
        else:
            machine.fail_next(error, when)

    def add_fault(self, fault: Fault) -> Fault:
        """Queue ``fault`` behind the ones already added; returns it (to read ``hits``)."""
        self.faults.append(fault)
        if not fault.exhausted:
            self._active_faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Forget every fault that has not fired out yet."""
        self._active_faults.clear()

    def requests_for(
        self, method: str | None = None, path_contains: str | None = None
    ) -> list[RecordedRequest]:
        """Recorded requests with this method and whose path contains this text."""
        method = method.upper() if method is not None else None
        return [
            r
            for r in self.requests
            if (method is None or r.method == method)
            and (path_contains is None or path_contains in r.path)
        ]

    def reset_stats(self) -> None:
        """Clear ``requests``, ``create_count``, ``random_fault_hits`` and the peaks.

        Peaks restart from what is in flight right now. Executions and faults stay.
        """
        self.requests.clear()
        self.create_count = 0
        self.random_fault_hits.clear()
        self.peak_in_flight = dict(self.in_flight)

    # -- request handling ------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Count, record, delay and maybe fault a request around the server's answer."""
        method = request.method
        in_flight = self.in_flight
        peak = self.peak_in_flight
        in_flight["total"] += 1
        in_flight[method] = in_flight.get(method, 0) + 1
        if in_flight["total"] > peak["total"]:
            peak["total"] = in_flight["total"]
        if in_flight[method] > peak.get(method, 0):
            peak[method] = in_flight[method]
        try:
            api_request = await self.http.read(request)
            if self.record_requests:
                self.requests.append(_recorded(request, api_request, self.clock.monotonic()))
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            fault = self._take_fault(method, request.path) if self._active_faults else None
            if fault is None and self.fault_rate > 0 and self.random.random() < self.fault_rate:
                fault = self._random_fault()
            if fault is not None:
                return await self._apply_fault(fault, request, api_request)
            return to_web_response(self.handle(api_request))
        finally:
            in_flight["total"] -= 1
            in_flight[method] -= 1

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self._active_faults:
            if fault.matches(method, path):
                fault.hits += 1
                if fault.exhausted:
                    self._active_faults.remove(fault)
                return fault
        return None

    def _random_fault(self) -> Fault:
        kind = self.random.choice(("status", "drop", "drop_after_commit"))
        self.random_fault_hits[kind] = self.random_fault_hits.get(kind, 0) + 1
        if kind == "status":
            return Fault(status=503)
        if kind == "drop":
            return Fault(drop=True)
        return Fault(drop_after_commit=True)

    async def _apply_fault(
        self, fault: Fault, request: web.Request, api_request: APIRequest
    ) -> web.StreamResponse:
        if fault.delay > 0:
            await asyncio.sleep(fault.delay)
        if fault.drop:
            return _drop(request)
        if fault.status is not None:
            response = _fault_response(fault, fault.status)
        else:
            response = to_web_response(self.handle(api_request))
            if fault.drop_after_commit:
                return _drop(request)
            if fault.malformed is not None:
                response = web.Response(
                    status=200,
                    body=fault.malformed,
                    content_type=fault.content_type or "application/json",
                )
            elif fault.content_type is not None:
                response.content_type = fault.content_type
        response.headers.update(fault.headers)
        response.headers["x-request-id"] = api_request.request_id
        if fault.truncate:
            return await _send_truncated(request, response)
        return response


def _recorded(request: web.Request, api_request: APIRequest, at: float) -> RecordedRequest:
    return RecordedRequest(
        method=request.method,
        path=request.path,
        query=dict(request.query),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=api_request.body,
        json=api_request.json,
        at=at,
        request_id=api_request.request_id,
    )


def _fault_response(fault: Fault, status: int) -> web.Response:
    body = fault.body
    if body is None:
        if status < 400:
            return web.Response(status=status, content_type=fault.content_type)
        return _fault_json(_error_body(status), status, fault.content_type)
    if isinstance(body, dict):
        return _fault_json(body, status, fault.content_type)
    if isinstance(body, str):
        return web.Response(
            status=status, body=body.encode(), content_type=fault.content_type or "text/plain"
        )
    return web.Response(
        status=status, body=body, content_type=fault.content_type or "application/octet-stream"
    )


def _fault_json(payload: dict[str, Any], status: int, content_type: str | None) -> web.Response:
    response = _json_response(payload, status)
    if content_type is not None:
        response.content_type = content_type
    return response


def _drop(request: web.Request) -> web.Response:
    """Close the connection so that nothing at all is sent back.

    The response returned here is never written: aiohttp's attempt to send it meets the
    closed transport, which it treats as a client that went away, and it drops the
    connection quietly.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=500)


async def _send_truncated(request: web.Request, response: web.Response) -> web.StreamResponse:
    """Send ``response`` with its full Content-Length but only half its body, then close."""
    body = response.body
    if not isinstance(body, bytes):
        body = b"" if body is None else bytes(str(body), "utf-8")
    out = web.StreamResponse(status=response.status, reason=response.reason)
    out.headers.update(response.headers)
    # Content-Length must claim the full body for the client to notice the shortfall.
    out.content_length = len(body)
    await out.prepare(request)
    await out.write(body[: len(body) // 2])
    transport = request.transport
    if transport is not None:
        transport.close()
    return out
