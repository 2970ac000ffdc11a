"""A fake Dedalus executions server, served over real loopback HTTP by aiohttp.

:class:`FakeDedalus` implements every endpoint of the executions API with realistic
behaviour, records what it receives, and injects faults on demand. What an execution
*does* is delegated to a :class:`~dedalus_async.testing.Runner`; the default
:class:`~dedalus_async.testing.ScriptedRunner` plays a :class:`~dedalus_async.testing.Script`
lazily against the injected clock (see :mod:`._fake_script` for the exact timeline).

Behaviour the API documents is copied; where it does not, the fake makes one choice,
stated here, and the client must not depend on more than the API promises.

Auth
    ``x-api-key: KEY`` or ``Authorization: Bearer KEY``; either one presented and valid is
    enough. Nothing presented: 401 ``AUTH_REQUIRED``; something presented but nothing
    valid: 401 ``AUTH_INVALID``. Auth is checked on every route, unknown ones included.

Errors
    400/401/404/405/409/429/5xx use ``{"error_code", "message", "retryable", "details"?}``;
    422 (validation of the create body, of ``limit``) uses RFC 7807 problem JSON
    (``application/problem+json``) whose ``detail`` starts with the field name, so clients
    meet both shapes. Every response carries ``x-request-id``.

Idempotency-Key
    Required on every mutating request (every POST and DELETE route): without it, 400
    ``IDEMPOTENCY_KEY_REQUIRED`` (after auth and routing). Keys are scoped per
    machine. A create with a key seen before and the same body (parsed JSON compared
    canonically) returns that execution's current state without creating; with a
    different body, 400 ``IDEMPOTENCY_KEY_REUSED``; once the execution is deleted its key
    is forgotten and may create again. Any other mutating request with a key seen before
    on the same method and path replays the first answer (a retried DELETE does not turn
    "cancel" into "forget"); on another method or path it is 400 ``IDEMPOTENCY_KEY_REUSED``.

Create
    HTTP 200 with the Execution, whose ``creation_request_id`` is the create's
    ``x-request-id`` and ``creation_trace_id`` the trace id of a W3C ``traceparent``
    header when one was sent (else a random one).

Executions
    Every field the official types mark required is sent, ``log_capture`` included:
    ``{"state": "pending"}`` until the execution ends, then ``{}`` (capture complete,
    nothing lost), unless the runner set its own (the local backend's is
    ``unavailable``). Optional fields without a value are left out.

Logs
    ``GET .../logs`` answers ``{execution_id, capture, publication, stream_id}`` with the
    same capture; publication is ``active`` until the execution ends, then ``closed`` and
    complete. ``POST .../logs/token`` answers a read token valid for 15 minutes (409
    ``LOGS_UNAVAILABLE`` when capture is ``unavailable``); ``POST .../logs/reauthorize``
    answers like ``GET .../logs``.

Lists and events
    ``?limit=`` defaults to ``page_size``, is clamped to ``max_page_size``, and must be a
    positive integer (else 422). Cursors are opaque strings (today ``"c"`` + a position);
    a cursor this server did not issue is 400 ``INVALID_CURSOR``. The executions list is
    oldest first; its ``next_cursor`` is null on the last page. The event log is ordered by
    ``sequence`` (1, 2, ...). Its ``next_cursor`` is positioned after the last returned
    item; when there is nothing new it echoes a cursor at the same position while the
    execution is not terminal, and it is null once the execution is terminal and the page
    reached the end of the log. A follower therefore polls with the returned cursor until
    it gets null.

Delete
    DELETE of a non-terminal execution cancels it (``runner.cancel``): the record stays
    and the response shows ``cancelled``. DELETE of a terminal execution removes it and
    returns its last state; afterwards it is 404 everywhere. So "DELETE twice" is "cancel,
    then forget".

Destroyed machines
    After :meth:`FakeDedalus.destroy_machine`, create on it is 409 ``INVALID_STATE`` and
    every read of its executions (list included) is 404 ``NOT_FOUND``; its running
    executions are cancelled so a runner with real processes stops them.

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

Time and cost
    Handlers are synchronous after the body is read: no per-request scans, a dict for
    idempotency, O(page) lists. ``latency`` (seconds) adds a real sleep to every request
    for concurrency-limit tests. Set ``record_requests=False`` for large benchmarks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import re
import secrets
from collections.abc import Callable, Mapping
from datetime import timedelta
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import attrs
from aiohttp import web

from dedalus_async._clock import Clock, SystemClock
from dedalus_async._records import ExecutionRecord, Runner, format_time, to_millis

from ._fake_script import Script, ScriptedRunner, ScriptFactory

__all__ = ["FakeDedalus", "Fault", "RecordedRequest"]

_log = logging.getLogger(__name__)

_SECRET_HEADERS = frozenset({"x-api-key", "authorization"})
# What can never be a path-segment id: the API says reject only these.
_BAD_ID = re.compile(r"[\x00-\x1f\x7f/]")
_CURSOR = re.compile(r"c(0|[1-9][0-9]{0,11})")
_LIMIT = re.compile(r"[0-9]{1,9}")
# The "compact UUIDv7" the newest SDK sends: 12 hex of Unix ms, "7", 19 random hex.
_UUID7_COMPACT = re.compile(r"[0-9a-f]{12}7[0-9a-f]{19}")
_INT64_MAX = 2**63 - 1
# W3C trace context: version "00", 32 hex of trace id, 16 hex of parent id, 2 hex of flags
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_LOG_TOKEN_TTL = timedelta(minutes=15)

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


def _error(
    status: int,
    code: str,
    message: str,
    *,
    retryable: bool = False,
    details: dict[str, Any] | None = None,
) -> web.Response:
    payload: dict[str, Any] = {"error_code": code, "message": message, "retryable": retryable}
    if details is not None:
        payload["details"] = details
    return _json_response(payload, status)


def _problem(field: str, message: str) -> web.Response:
    payload = {
        "type": "about:blank",
        "title": "Unprocessable Entity",
        "status": 422,
        "detail": f"{field}: {message}",
        "errors": [{"field": field, "message": message}],
    }
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=422,
        content_type="application/problem+json",
    )


def _not_found(message: str) -> web.Response:
    return _error(404, "NOT_FOUND", message)


def _method_not_allowed(allowed: str) -> web.Response:
    response = _error(405, "METHOD_NOT_ALLOWED", f"allowed methods: {allowed}")
    response.headers["Allow"] = allowed
    return response


def _validate_create(body: Any) -> tuple[str, str] | None:
    """``(field, message)`` for the first problem of a create body, or ``None``."""
    if not isinstance(body, dict):
        return "body", "must be a JSON object"
    command = body.get("command")
    if command is None:
        return "command", "is required"
    if not isinstance(command, list) or not command:
        return "command", "must be a non-empty list of strings"
    if not all(isinstance(arg, str) for arg in command):
        return "command", "must be a non-empty list of strings"
    if not command[0]:
        return "command", "the program (command[0]) must not be empty"
    cwd = body.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        return "cwd", "must be a string"
    env = body.get("env")
    if env is not None and (
        not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values())
    ):
        return "env", "must be an object mapping strings to strings"
    stdin = body.get("stdin")
    if stdin is not None and not isinstance(stdin, str):
        return "stdin", "must be a string"
    timeout_ms = body.get("timeout_ms")
    if timeout_ms is not None and (
        isinstance(timeout_ms, bool)
        or not isinstance(timeout_ms, int)
        or not 0 < timeout_ms <= _INT64_MAX
    ):
        return "timeout_ms", "must be a positive integer"
    return None


def _parse_json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


class FakeDedalus:
    """The fake executions server; ``async with FakeDedalus() as fake: fake.base_url``.

    Pass the same :class:`~dedalus_async.testing.FakeClock` to the fake and to the client
    so scripted executions progress with the client's sleeps. ``script`` (one
    :class:`Script`, or a factory called with each create body) configures the default
    :class:`ScriptedRunner`; pass ``runner`` instead to play executions some other way.

    ``executions`` holds every execution not deleted, by id; records are brought up to
    date lazily, so use :meth:`get_record` to read a current one. ``requests`` is every
    request received, in order (unauthenticated ones too).
    """

    def __init__(
        self,
        *,
        api_key: str = "test-key",
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
    ) -> None:
        if runner is not None and script is not None:
            raise ValueError("pass either runner or script: a script configures the default runner")
        if not 1 <= page_size <= max_page_size:
            raise ValueError("need 1 <= page_size <= max_page_size")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError("fault_rate must be within [0, 1]")
        self._api_key = api_key.encode()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.runner: Runner = runner if runner is not None else ScriptedRunner(self.clock, script)
        self.host = host
        self.port = port
        self.page_size = page_size
        self.max_page_size = max_page_size
        self.output_cap = output_cap
        self.require_idempotency_key = require_idempotency_key
        #: When True, an Idempotency-Key that is not a compact UUIDv7 is 400.
        self.strict_idempotency_keys = strict_idempotency_keys
        #: Probability of a random fault per request (see the module docstring).
        self.fault_rate = fault_rate
        self.random = random.Random(fault_seed)
        self.latency = latency
        self.record_requests = record_requests

        self.requests: list[RecordedRequest] = []
        self.executions: dict[str, ExecutionRecord] = {}
        self.create_count = 0
        #: every fault ever added, fired or not
        self.faults: list[Fault] = []
        #: how many random faults of each kind fired: "status", "drop", "drop_after_commit"
        self.random_fault_hits: dict[str, int] = {}
        self.destroyed_machines: set[str] = set()
        self.in_flight: dict[str, int] = {"total": 0}
        self.peak_in_flight: dict[str, int] = {"total": 0}
        #: exceptions raised by handlers (answered with 500); a test can assert it is empty
        self.errors: list[BaseException] = []

        self._active_faults: list[Fault] = []
        self._by_machine: dict[str, list[str]] = {}
        self._idempotency: dict[tuple[str, str], tuple[str, str]] = {}
        # (machine, key) -> (method and path, status, body) of mutating requests other
        # than creates, replayed when the same key comes again
        self._replays: dict[tuple[str, str], tuple[str, int, bytes]] = {}
        self._request_counter = 0
        self._app_runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._closed = False
        self.app: web.Application = self.make_app()

    # -- lifecycle -------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """A new aiohttp application serving this fake's state (e.g. for aiohttp's
        ``TestServer``); :attr:`app` is one made at construction."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        # One catch-all route: the fake routes on the raw path itself, so percent-encoded
        # ids (even an encoded "/") are split before they are decoded.
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self) -> None:
        """Bind ``host:port`` (port 0 = a free one) and serve; sets :attr:`base_url`."""
        if self._app_runner is not None:
            raise RuntimeError("FakeDedalus is already started")
        if self._closed:
            raise RuntimeError("FakeDedalus is closed")
        # A short shutdown timeout: a request parked in a delay fault should not hold up
        # the end of a test.
        app_runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=0.25
        )
        await app_runner.setup()
        try:
            site = web.TCPSite(app_runner, self.host, self.port, backlog=4096)
            await site.start()
        except BaseException:
            await app_runner.cleanup()
            raise
        self._app_runner = app_runner
        host, port = app_runner.addresses[0][:2]
        self._base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop serving and close the runner. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._app_runner is not None:
                await self._app_runner.cleanup()
                self._app_runner = None
        finally:
            await self.runner.aclose()

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
        if self._base_url is None:
            raise RuntimeError("FakeDedalus is not started: use 'async with' or start()")
        return self._base_url

    def __repr__(self) -> str:
        where = self._base_url or "not started"
        return (
            f"<FakeDedalus {where} executions={len(self.executions)} "
            f"created={self.create_count} requests={self._request_counter} "
            f"active_faults={len(self._active_faults)}>"
        )

    # -- test controls ---------------------------------------------------------------

    def set_script(self, script: Script | ScriptFactory | None) -> None:
        """Script executions created from now on (only with the default runner)."""
        if not isinstance(self.runner, ScriptedRunner):
            raise TypeError(f"set_script needs a ScriptedRunner, this fake runs {self.runner!r}")
        self.runner.set_script(script)

    def add_fault(self, fault: Fault) -> Fault:
        """Queue ``fault`` behind the ones already added; returns it (to read ``hits``)."""
        self.faults.append(fault)
        if not fault.exhausted:
            self._active_faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Forget every fault that has not fired out yet."""
        self._active_faults.clear()

    def destroy_machine(self, machine_id: str) -> None:
        """Destroy a machine: creates on it are 409, its executions 404 (see module doc)."""
        self.destroyed_machines.add(machine_id)
        for execution_id in self._by_machine.get(machine_id, ()):
            record = self.executions.get(execution_id)
            if record is None:
                continue
            self.runner.refresh(record)
            if not record.is_terminal:
                self.runner.cancel(record)

    def get_record(self, execution_id: str) -> ExecutionRecord:
        """The execution's record, brought up to date first. KeyError if unknown."""
        record = self.executions[execution_id]
        self.runner.refresh(record)
        return record

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
            body = await request.read()
            parsed = _parse_json(body)
            self._request_counter += 1
            request_id = f"req-{self._request_counter:08x}"
            if self.record_requests:
                self.requests.append(
                    RecordedRequest(
                        method=method,
                        path=request.path,
                        query=dict(request.query),
                        headers={k.lower(): v for k, v in request.headers.items()},
                        body=body,
                        json=parsed,
                        at=self.clock.monotonic(),
                        request_id=request_id,
                    )
                )
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            fault = self._take_fault(method, request.path) if self._active_faults else None
            if fault is None and self.fault_rate > 0 and self.random.random() < self.fault_rate:
                fault = self._random_fault()
            if fault is not None:
                return await self._apply_fault(fault, request, parsed, request_id)
            response = self._process(request, parsed, request_id)
            response.headers["x-request-id"] = request_id
            return response
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
        self, fault: Fault, request: web.Request, parsed: Any, request_id: str
    ) -> web.StreamResponse:
        if fault.delay > 0:
            await asyncio.sleep(fault.delay)
        if fault.drop:
            return _drop(request)
        if fault.status is not None:
            response = _fault_response(fault, fault.status)
        else:
            response = self._process(request, parsed, request_id)
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
        response.headers["x-request-id"] = request_id
        if fault.truncate:
            return await _send_truncated(request, response)
        return response

    def _process(self, request: web.Request, parsed: Any, request_id: str) -> web.Response:
        try:
            denied = self._check_auth(request)
            if denied is not None:
                return denied
            return self._route(request, parsed, request_id)
        except Exception as exc:
            # A bug in the fake (or a runner) must be loud, but must not hang the client.
            _log.exception("FakeDedalus handler failed")
            self.errors.append(exc)
            return _error(500, "INTERNAL", f"fake server error: {exc!r}", retryable=True)

    def _check_auth(self, request: web.Request) -> web.Response | None:
        presented: list[str] = []
        api_key = request.headers.get("x-api-key")
        if api_key:
            presented.append(api_key)
        authorization = request.headers.get("Authorization")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            # A non-Bearer scheme still counts as an attempt (AUTH_INVALID, not REQUIRED).
            presented.append(token.strip() if scheme.lower() == "bearer" else "")
        if not presented:
            response = _error(401, "AUTH_REQUIRED", "an API key is required")
        elif any(
            hmac.compare_digest(p.encode("utf-8", "surrogateescape"), self._api_key)
            for p in presented
        ):
            return None
        else:
            response = _error(401, "AUTH_INVALID", "the API key is not valid")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    def _check_idempotency_key(self, request: web.Request) -> web.Response | None:
        """The 400 for a mutating request without a usable key (checked once routed)."""
        key = request.headers.get("Idempotency-Key")
        if not key:
            if not self.require_idempotency_key:
                return None
            return _error(
                400,
                "IDEMPOTENCY_KEY_REQUIRED",
                f"the Idempotency-Key header is required on {request.method} requests",
            )
        if len(key) > 255 or (
            self.strict_idempotency_keys and _UUID7_COMPACT.fullmatch(key) is None
        ):
            return _error(400, "IDEMPOTENCY_KEY_INVALID", "the Idempotency-Key is malformed")
        return None

    def _route(self, request: web.Request, parsed: Any, request_id: str) -> web.Response:
        parts = request.rel_url.raw_path.split("/")
        count = len(parts)
        if (
            count < 5
            or count > 8
            or parts[0]
            or parts[1] != "v1"
            or parts[2] != "machines"
            or parts[4] != "executions"
        ):
            return _not_found(f"no route for {request.method} {request.path}")
        machine_id = _decode_id(parts[3])
        if machine_id is None:
            return _not_found("machine not found")
        method = request.method
        if count == 5:
            if method == "POST":
                return self._create(request, machine_id, parsed, request_id)
            if method == "GET":
                return self._list(request, machine_id)
            return _method_not_allowed("GET, POST")
        execution_id = _decode_id(parts[5])
        if execution_id is None:
            return _not_found("execution not found")
        if count == 6:
            if method == "GET":
                return self._get(machine_id, execution_id)
            if method == "DELETE":
                return self._replayed(
                    request, machine_id, lambda: self._delete(machine_id, execution_id)
                )
            return _method_not_allowed("DELETE, GET")
        if parts[6] == "logs":
            return self._logs_route(request, machine_id, execution_id, parts[7:])
        if count == 8:
            return _not_found(f"no route for {request.method} {request.path}")
        if parts[6] == "output":
            if method != "GET":
                return _method_not_allowed("GET")
            return self._output(machine_id, execution_id)
        if parts[6] == "events":
            if method != "GET":
                return _method_not_allowed("GET")
            return self._events(request, machine_id, execution_id)
        return _not_found(f"no route for {request.method} {request.path}")

    # -- endpoints -------------------------------------------------------------------

    def _lookup(self, machine_id: str, execution_id: str) -> ExecutionRecord | web.Response:
        record = self.executions.get(execution_id)
        if (
            record is None
            or record.machine_id != machine_id
            or machine_id in self.destroyed_machines
        ):
            return _not_found(f"execution {execution_id} not found on machine {machine_id}")
        self.runner.refresh(record)
        return record

    def _replayed(
        self, request: web.Request, machine_id: str, handle: Callable[[], web.Response]
    ) -> web.Response:
        """Answer a mutating request once per Idempotency-Key; replay it for a retry."""
        denied = self._check_idempotency_key(request)
        if denied is not None:
            return denied
        key = request.headers.get("Idempotency-Key") or None
        if key is None:
            return handle()
        target = f"{request.method} {request.rel_url.raw_path}"
        seen = self._replays.get((machine_id, key))
        if seen is not None:
            if seen[0] != target:
                return _error(
                    400,
                    "IDEMPOTENCY_KEY_REUSED",
                    "idempotency key reused with different request parameters",
                )
            return web.Response(status=seen[1], body=seen[2], content_type="application/json")
        response = handle()
        if response.status < 500 and isinstance(response.body, bytes):
            # server errors are not remembered: a retry must get a real second chance
            self._replays[(machine_id, key)] = (target, response.status, response.body)
        return response

    def _create(
        self, request: web.Request, machine_id: str, parsed: Any, request_id: str
    ) -> web.Response:
        if machine_id in self.destroyed_machines:
            return _error(
                409,
                "INVALID_STATE",
                f"machine {machine_id} was destroyed",
                details={"machine_id": machine_id},
            )
        denied = self._check_idempotency_key(request)
        if denied is not None:
            return denied
        key = request.headers.get("Idempotency-Key") or None
        problem = _validate_create(parsed)
        if problem is not None:
            return _problem(*problem)
        canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":"))
        if key is not None:
            seen = self._idempotency.get((machine_id, key))
            if seen is not None:
                if seen[0] != canonical:
                    return _error(
                        400,
                        "IDEMPOTENCY_KEY_REUSED",
                        "idempotency key reused with different request parameters",
                    )
                existing = self.executions.get(seen[1])
                if existing is not None:
                    self.runner.refresh(existing)
                    return _json_response(existing.to_json(self.output_cap))
        record = self._new_record(request, machine_id, key, parsed, request_id)
        self.executions[record.execution_id] = record
        ids = self._by_machine.setdefault(machine_id, [])
        ids.append(record.execution_id)
        if key is not None:
            self._idempotency[(machine_id, key)] = (canonical, record.execution_id)
        try:
            self.runner.start(record)
        except BaseException:
            # The create did not happen: leave no half-made execution behind.
            del self.executions[record.execution_id]
            ids.pop()
            if key is not None:
                self._idempotency.pop((machine_id, key), None)
            raise
        self.create_count += 1
        return _json_response(record.to_json(self.output_cap))

    def _new_record(
        self,
        request: web.Request,
        machine_id: str,
        key: str | None,
        body: dict[str, Any],
        request_id: str,
    ) -> ExecutionRecord:
        execution_id = "exe-" + secrets.token_hex(8)
        while execution_id in self.executions:
            execution_id = "exe-" + secrets.token_hex(8)
        env = body.get("env")
        return ExecutionRecord(
            execution_id=execution_id,
            machine_id=machine_id,
            command=tuple(body["command"]),
            created_at=to_millis(self.clock.now()),
            created_mono=self.clock.monotonic(),
            cwd=body.get("cwd"),
            env=dict(env) if env is not None else None,
            stdin=body.get("stdin"),
            timeout_ms=body.get("timeout_ms"),
            idempotency_key=key,
            org_id=request.headers.get("X-Dedalus-Org-Id"),
            creation_request_id=request_id,
            creation_trace_id=_trace_id(request.headers.get("traceparent")),
        )

    def _get(self, machine_id: str, execution_id: str) -> web.Response:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, web.Response):
            return found
        return _json_response(found.to_json(self.output_cap))

    def _delete(self, machine_id: str, execution_id: str) -> web.Response:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, web.Response):
            return found
        if not found.is_terminal:
            self.runner.cancel(found)
            return _json_response(found.to_json(self.output_cap))
        del self.executions[execution_id]
        key = found.idempotency_key
        if key is not None:
            seen = self._idempotency.get((machine_id, key))
            if seen is not None and seen[1] == execution_id:
                del self._idempotency[(machine_id, key)]
        return _json_response(found.to_json(self.output_cap))

    def _output(self, machine_id: str, execution_id: str) -> web.Response:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, web.Response):
            return found
        return _json_response(found.output_json(self.output_cap))

    def _logs_route(
        self, request: web.Request, machine_id: str, execution_id: str, rest: list[str]
    ) -> web.Response:
        method = request.method
        if not rest:
            if method != "GET":
                return _method_not_allowed("GET")
            return self._logs(machine_id, execution_id)
        if rest[0] in ("token", "reauthorize"):
            if method != "POST":
                return _method_not_allowed("POST")
            if rest[0] == "token":
                return self._replayed(
                    request, machine_id, lambda: self._log_token(machine_id, execution_id)
                )
            return self._replayed(request, machine_id, lambda: self._logs(machine_id, execution_id))
        return _not_found(f"no route for {request.method} {request.path}")

    def _logs(self, machine_id: str, execution_id: str) -> web.Response:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, web.Response):
            return found
        return _json_response(_log_status(found))

    def _log_token(self, machine_id: str, execution_id: str) -> web.Response:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, web.Response):
            return found
        capture = found.log_capture_json()
        if capture.get("state") == "unavailable":
            return _error(
                409,
                "LOGS_UNAVAILABLE",
                f"execution {execution_id} has no log stream to read"
                f" ({capture.get('code') or 'capture unavailable'}); read its /output"
                " or /events instead",
            )
        expires = to_millis(self.clock.now()) + _LOG_TOKEN_TTL
        return _json_response(
            {
                "access_token": "lrt_" + secrets.token_urlsafe(24),
                "base_url": f"{self._base_url or ''}/_logs",
                "execution_id": execution_id,
                "expires_at": format_time(expires),
                "stream_id": _stream_id(found),
                "token_type": "Bearer",
            }
        )

    def _page_args(self, request: web.Request, end: int) -> tuple[int, int] | web.Response:
        """``(limit, start)`` from the query, or the error response."""
        raw_limit = request.query.get("limit")
        if raw_limit is None or raw_limit == "":
            limit = self.page_size
        else:
            if _LIMIT.fullmatch(raw_limit) is None or int(raw_limit) < 1:
                return _problem("limit", "must be a positive integer")
            limit = min(int(raw_limit), self.max_page_size)
        raw_cursor = request.query.get("cursor")
        if raw_cursor is None or raw_cursor == "":
            return limit, 0
        match = _CURSOR.fullmatch(raw_cursor)
        if match is None or int(match.group(1)) > end:
            return _error(400, "INVALID_CURSOR", "the cursor is not valid here")
        return limit, int(match.group(1))

    def _list(self, request: web.Request, machine_id: str) -> web.Response:
        if machine_id in self.destroyed_machines:
            return _not_found(f"machine {machine_id} not found")
        ids = self._by_machine.get(machine_id, [])
        args = self._page_args(request, len(ids))
        if isinstance(args, web.Response):
            return args
        limit, index = args
        executions = self.executions
        items: list[dict[str, Any]] = []
        end = len(ids)
        while index < end and len(items) < limit:
            record = executions.get(ids[index])
            index += 1
            if record is None:
                continue
            self.runner.refresh(record)
            items.append(record.to_json(self.output_cap))
        # Deleted ids stay in the list (so cursors stay stable); skip them to tell
        # whether anything is left for another page.
        more = index
        while more < end and ids[more] not in executions:
            more += 1
        next_cursor = f"c{index}" if more < end else None
        return _json_response({"items": items, "next_cursor": next_cursor})

    def _events(self, request: web.Request, machine_id: str, execution_id: str) -> web.Response:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, web.Response):
            return found
        events = found.events
        args = self._page_args(request, len(events))
        if isinstance(args, web.Response):
            return args
        limit, start = args
        page = events[start : start + limit]
        stop = start + len(page)
        drained = found.is_terminal and stop == len(events)
        return _json_response(
            {
                "items": [event.to_json() for event in page],
                "next_cursor": None if drained else f"c{stop}",
            }
        )


def _trace_id(traceparent: str | None) -> str:
    match = _TRACEPARENT.fullmatch(traceparent.strip()) if traceparent else None
    return match.group(1) if match is not None else secrets.token_hex(16)


def _stream_id(record: ExecutionRecord) -> str:
    return f"logs-{record.execution_id}"


def _log_status(record: ExecutionRecord) -> dict[str, Any]:
    """The ``/logs`` body of one execution (see the module docstring)."""
    capture = record.log_capture_json()
    out: dict[str, Any] = {"execution_id": record.execution_id, "capture": capture}
    if capture.get("state") == "unavailable":
        if "code" in capture:
            out["code"] = capture["code"]
        return out
    done = record.is_terminal
    out["publication"] = {
        "complete": done,
        "queued_messages": 0,
        "state": "closed" if done else "active",
    }
    out["stream_id"] = _stream_id(record)
    return out


def _decode_id(segment: str) -> str | None:
    """The decoded id of a raw path segment, or ``None`` if it can never be valid."""
    value = _unquote(segment)
    if not value or len(value) > 253 or _BAD_ID.search(value) is not None:
        return None
    return value


def _unquote(segment: str) -> str:
    # Invalid UTF-8 escapes decode to U+FFFD rather than failing: such an id simply
    # matches nothing.
    return unquote(segment) if "%" in segment else segment


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
