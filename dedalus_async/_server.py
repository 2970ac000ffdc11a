"""The executions API's server-side rules, without the network: a request in, a response out.

:class:`ExecutionsServer` holds the state (executions, idempotency keys, the API key, the
clock) and answers one :class:`APIRequest` with one :class:`APIResponse` in
:meth:`ExecutionsServer.handle`. What an execution *does* is delegated to a
:class:`~dedalus_async._records.Runner`. Nothing here touches a socket or aiohttp:
:class:`dedalus_async._local.HTTPServer` serves it over HTTP, for the local backend (with
real subprocesses) and for the test kit's :class:`~dedalus_async.testing.FakeDedalus`
(with scripted executions, faults and a request log on top).

Behaviour the API documents is copied; where it does not, this server makes one choice,
stated here, and the client must not depend on more than the API promises.

Auth
    ``x-api-key: KEY`` or ``Authorization: Bearer KEY``; either one presented and valid is
    enough. Nothing presented: 401 ``AUTH_REQUIRED``; something presented but nothing
    valid: 401 ``AUTH_INVALID``. Auth is checked on every route, unknown ones included,
    and needs only the headers (:meth:`ExecutionsServer.authenticate`): the local
    backend's HTTP layer refuses a request before reading its body.

Errors
    400/401/404/405/409/429/5xx use ``{"error_code", "message", "retryable", "details"?}``;
    422 (validation of the create body, of ``limit``) uses RFC 7807 problem JSON
    (``application/problem+json``) whose ``detail`` starts with the field name, so clients
    meet both shapes. Every response carries ``x-request-id``. A handler or runner that
    raises is a 500 ``INTERNAL`` (retryable), logged and kept in
    :attr:`ExecutionsServer.errors`.

Idempotency-Key
    Required on every mutating request (every POST and DELETE route): without it, 400
    ``IDEMPOTENCY_KEY_REQUIRED`` (after auth and routing). Keys are scoped per
    machine. A create with a key seen before and the same body (parsed JSON compared
    canonically) returns that execution's current state without creating; with a
    different body, 400 ``IDEMPOTENCY_KEY_REUSED``; once the execution is deleted its key
    is forgotten and may create again. Any other mutating request with a key seen before
    on the same method and path replays the first answer (a retried DELETE does not turn
    "cancel" into "forget"); on another method or path it is 400 ``IDEMPOTENCY_KEY_REUSED``.
    Server errors (5xx) are not remembered, so a retry gets a real second chance.

Create
    HTTP 200 with the Execution, whose ``creation_request_id`` is the create's
    ``x-request-id`` and ``creation_trace_id`` the trace id of a W3C ``traceparent``
    header when one was sent (else a random one). A runner that raises in ``start``
    leaves no execution behind.

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
    oldest first (``list_order="newest"``: newest first, with offset cursors, so an
    execution created meanwhile shifts the ones after it by one, as on a server that
    pages by offset); its ``next_cursor`` is null on the last page. The event log is ordered by
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

Stored records
    A server given a :class:`~dedalus_async._records.RecordStore` (the local backend's
    records on disk) also answers for the executions the store holds and its memory does
    not (another process ran them): a read, a DELETE and a list find them there. Such a
    machine's list is every record of the store and of memory, oldest first, and a cursor
    is a position in it (a delete meanwhile may shift it by one: the list is read anew on
    every page). Deleting a terminal execution removes it from the store too.

Destroyed machines
    After :meth:`ExecutionsServer.destroy_machine`, create on it is 409 ``INVALID_STATE``
    and every read of its executions (list included) is 404 ``NOT_FOUND``; its running
    executions are cancelled so a runner with real processes stops them.

Machines
    ``/v1/machines`` (create, list, get, update, delete, sleep, wake, and the status
    stream) follow :mod:`~dedalus_async._machine_records`' rules S1-S6, on this server's
    clock and its ``machine_timings``. Create answers 200 when the machine converged
    inline, else 202; every machine answer carries an ``ETag`` of its revision. ``GET``
    nests the lifecycle in ``status``; the other answers are flat, with ``phase`` (as the
    official SDK 0.6.0 types them). Mutating machine requests need an Idempotency-Key; a
    create with a key seen before and the same body returns that machine, with another body
    400 ``IDEMPOTENCY_KEY_REUSED``; the others replay their first answer. Sleep or wake of
    a failed, destroying or destroyed machine is 409 ``INVALID_STATE``. The status stream
    (``text/event-stream``) sends the current lifecycle, or every change after
    ``Last-Event-ID``, then each change as it happens, and closes once the machine is in
    its desired state, failed or destroyed.

    A machine the server first meets through an execution create is made on the spot,
    running, with autosleep off, so executions on any machine id work as they always did.
    An execution created on a machine that is not running (asleep, on its way up) wakes
    it: the execution is ``wake_in_progress`` (with a ``retry_after_ms`` of the time left)
    and the runner starts it the moment the machine is running (``record.ready``); if the
    wake fails, the execution fails with ``MACHINE_FAILED``. Creating one on a failed or
    destroyed machine is 409 ``INVALID_STATE``.

Stored machines
    A server given a :class:`~dedalus_async._machine_records.MachineStore` (the local
    backend's machine folders) reads a machine its memory lacks from there (a request on
    it, an execution created on it), lists the store's machines beside memory's (oldest
    first), and hands it every machine it creates, changes or destroys. A machine is read
    once per process: what another process does to it later is not seen.

Time and cost
    :meth:`~ExecutionsServer.handle` is synchronous: no per-request scans, a dict for
    idempotency, O(page) lists. Time is read only through the injected clock.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import timedelta
from typing import Any, Final
from urllib.parse import unquote

import attrs

from ._checks import is_int
from ._clock import Clock, SystemClock
from ._machine_records import MachineRecord, MachineStore, MachineTimings, parse_autosleep
from ._records import ExecutionRecord, RecordStore, Runner, format_time, to_millis

__all__ = ["APIRequest", "APIResponse", "ExecutionsServer", "parse_json"]

_log = logging.getLogger(__name__)

# What can never be a path-segment id: the API says reject only these.
_BAD_ID = re.compile(r"[\x00-\x1f\x7f/]")
#: The orders a machine's executions list can be served in (``list_order``).
LIST_ORDERS: Final = ("oldest", "newest")
_CURSOR = re.compile(r"c(0|[1-9][0-9]{0,11})")
_LIMIT = re.compile(r"[0-9]{1,9}")
# The "compact UUIDv7" the newest SDK sends: 12 hex of Unix ms, "7", 19 random hex.
_UUID7_COMPACT = re.compile(r"[0-9a-f]{12}7[0-9a-f]{19}")
_INT64_MAX = 2**63 - 1
# W3C trace context: version "00", 32 hex of trace id, 16 hex of parent id, 2 hex of flags
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_LOG_TOKEN_TTL = timedelta(minutes=15)
_JSON = "application/json"


def parse_json(body: bytes) -> Any:
    """The parsed JSON of a request body; ``None`` when it is empty or not JSON."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _first_values(pairs: Mapping[str, str]) -> dict[str, str]:
    # The first of repeated names wins, as with a multidict's ``get`` (its items() yields
    # every repeat).
    out: dict[str, str] = {}
    for name, value in pairs.items():
        out.setdefault(name, value)
    return out


def _lowercase_names(headers: Mapping[str, str]) -> dict[str, str]:
    # Header names are case-insensitive; the first of repeated headers wins here too.
    out: dict[str, str] = {}
    for name, value in headers.items():
        out.setdefault(name.lower(), value)
    return out


@attrs.frozen
class APIRequest:
    """One HTTP request as the server's rules see it.

    ``raw_path`` is the path as sent (percent-encoding kept: routing splits it before
    decoding, so an encoded ``/`` stays inside its id); ``path`` is the decoded path, for
    messages. ``headers`` has lowercase names; ``query`` and ``headers`` keep the first
    value of a repeated name. ``json`` is the parsed body (``None`` when it is not JSON).
    ``request_id`` comes from :meth:`ExecutionsServer.next_request_id`.
    """

    method: str
    raw_path: str
    request_id: str
    query: Mapping[str, str] = attrs.field(factory=dict, converter=_first_values)
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_lowercase_names)
    body: bytes = b""
    path: str = attrs.field(
        default=attrs.Factory(lambda self: unquote(self.raw_path), takes_self=True)
    )
    json: Any = attrs.field(
        init=False, default=attrs.Factory(lambda self: parse_json(self.body), takes_self=True)
    )


@attrs.define
class APIResponse:
    """What the server answers: ``content_type`` is kept apart from the other headers.

    ``stream``, when set, is sent in place of ``body``, chunk by chunk (server-sent events).
    """

    status: int
    body: bytes
    content_type: str = _JSON
    headers: dict[str, str] = attrs.Factory(dict)
    stream: AsyncIterator[bytes] | None = None

    def json(self) -> Any:
        """The parsed body."""
        return json.loads(self.body)


def _json_response(payload: Any, status: int = 200) -> APIResponse:
    return APIResponse(status, json.dumps(payload, separators=(",", ":")).encode())


def _error(
    status: int,
    code: str,
    message: str,
    *,
    retryable: bool = False,
    details: dict[str, Any] | None = None,
) -> APIResponse:
    payload: dict[str, Any] = {"error_code": code, "message": message, "retryable": retryable}
    if details is not None:
        payload["details"] = details
    return _json_response(payload, status)


def _problem(field: str, message: str) -> APIResponse:
    payload = {
        "type": "about:blank",
        "title": "Unprocessable Entity",
        "status": 422,
        "detail": f"{field}: {message}",
        "errors": [{"field": field, "message": message}],
    }
    body = json.dumps(payload, separators=(",", ":")).encode()
    return APIResponse(422, body, "application/problem+json")


def _not_found(message: str) -> APIResponse:
    return _error(404, "NOT_FOUND", message)


def _no_route(request: APIRequest) -> APIResponse:
    return _not_found(f"no route for {request.method} {request.path}")


def _method_not_allowed(allowed: str) -> APIResponse:
    response = _error(405, "METHOD_NOT_ALLOWED", f"allowed methods: {allowed}")
    response.headers["Allow"] = allowed
    return response


def _key_reused() -> APIResponse:
    return _error(
        400, "IDEMPOTENCY_KEY_REUSED", "idempotency key reused with different request parameters"
    )


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
    if timeout_ms is not None and not (is_int(timeout_ms) and 0 < timeout_ms <= _INT64_MAX):
        return "timeout_ms", "must be a positive integer"
    return None


class ExecutionsServer:
    """The executions API's state and rules; :meth:`handle` answers one request.

    ``executions`` holds every execution not deleted, by id; records are brought up to
    date lazily (by the runner's ``refresh``), so use :meth:`get_record` to read a current
    one. ``name`` appears in logs and in the repr. ``public_url`` is where clients reach
    the server (the HTTP layer sets it when it starts); log tokens point below it.
    ``store``: where to look for executions memory lacks (see "Stored records");
    ``machine_store``: where machines outlive the process (see "Stored machines").
    """

    def __init__(
        self,
        *,
        api_key: str,
        runner: Runner,
        clock: Clock | None = None,
        page_size: int = 50,
        max_page_size: int = 100,
        output_cap: int = 1_048_576,
        require_idempotency_key: bool = True,
        strict_idempotency_keys: bool = False,
        name: str = "ExecutionsServer",
        store: RecordStore | None = None,
        machine_store: MachineStore | None = None,
        list_order: str = "oldest",
    ) -> None:
        if not 1 <= page_size <= max_page_size:
            raise ValueError("need 1 <= page_size <= max_page_size")
        if list_order not in LIST_ORDERS:
            raise ValueError(f"list_order must be one of {LIST_ORDERS}, got {list_order!r}")
        self._api_key = api_key.encode()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.runner: Runner = runner
        self.page_size = page_size
        self.max_page_size = max_page_size
        #: ``"oldest"`` or ``"newest"``: the order of a machine's executions list
        self.list_order = list_order
        self.output_cap = output_cap
        self.require_idempotency_key = require_idempotency_key
        #: When True, an Idempotency-Key that is not a compact UUIDv7 is 400.
        self.strict_idempotency_keys = strict_idempotency_keys
        self.name = name
        self.public_url: str | None = None
        self.store = store
        self.machine_store = machine_store

        self.executions: dict[str, ExecutionRecord] = {}
        self.create_count = 0
        self.destroyed_machines: set[str] = set()
        #: exceptions raised by handlers (answered with 500); a test can assert it is empty
        self.errors: list[BaseException] = []
        #: how many request ids were handed out (one per request received)
        self.request_count = 0

        self._by_machine: dict[str, list[str]] = {}
        # (machine, key) -> (canonical create body, execution id)
        self._idempotency: dict[tuple[str, str], tuple[str, str]] = {}
        # (machine, key) -> (method and path, status, body) of mutating requests other
        # than creates, replayed when the same key comes again
        self._replays: dict[tuple[str, str], tuple[str, int, bytes]] = {}

        #: every machine this server knows, by id (see "Machines" in the module docstring)
        self.machines: dict[str, MachineRecord] = {}
        #: how long machines created from now on take in each phase
        self.machine_timings = MachineTimings()
        # key -> (canonical create body, machine id) of machine creates
        self._machine_creates: dict[str, tuple[str, str]] = {}
        # execution id -> machine id, for executions waiting for their machine to wake
        self._deferred: dict[str, str] = {}

    def __repr__(self) -> str:
        # never the API key
        return (
            f"<{self.name} executions={len(self.executions)} created={self.create_count} "
            f"requests={self.request_count}>"
        )

    def next_request_id(self) -> str:
        """A new ``x-request-id``; call once per request received."""
        self.request_count += 1
        return f"req-{self.request_count:08x}"

    async def aclose(self) -> None:
        """Close the runner (its processes, tasks)."""
        await self.runner.aclose()

    # -- state -----------------------------------------------------------------------

    def destroy_machine(self, machine_id: str) -> None:
        """Destroy a machine: creates on it are 409, its executions 404 (see module doc)."""
        self.destroyed_machines.add(machine_id)
        for execution_id in self._by_machine.get(machine_id, ()):
            record = self.executions.get(execution_id)
            if record is None:
                continue
            if self._deferred.pop(execution_id, None) is not None:
                # never started by the runner: nothing of it runs, end it here
                record.finish("cancelled", to_millis(self.clock.now()))
                continue
            self.runner.refresh(record)
            if not record.is_terminal:
                self.runner.cancel(record)

    def get_record(self, execution_id: str) -> ExecutionRecord:
        """The execution's record, brought up to date first. KeyError if unknown."""
        record = self.executions[execution_id]
        self._refresh(record)
        return record

    # -- one request -----------------------------------------------------------------

    def handle(self, request: APIRequest, *, authenticated: bool = False) -> APIResponse:
        """Answer ``request``: auth, routing, then the endpoint; never raises.

        ``authenticated=True`` skips the key check: the caller already passed the request's
        headers through :meth:`authenticate` (the HTTP layer does, before reading a body).
        """
        try:
            denied = None if authenticated else self._check_auth(request.headers)
            response = denied if denied is not None else self._route(request)
        except Exception as exc:
            # A bug here (or in a runner) must be loud, but must not hang the client.
            _log.exception("%s handler failed", self.name)
            self.errors.append(exc)
            response = _error(500, "INTERNAL", f"server error: {exc!r}", retryable=True)
        response.headers["x-request-id"] = request.request_id
        return response

    def authenticate(self, headers: Mapping[str, str], request_id: str) -> APIResponse | None:
        """The 401 for request headers without a valid key (``None``: the key is good).

        Needs only the headers (looked up by lowercase name, as a case-insensitive mapping
        or :attr:`APIRequest.headers` allows), so a body need not be read to refuse it.
        """
        denied = self._check_auth(headers)
        if denied is not None:
            denied.headers["x-request-id"] = request_id
        return denied

    def refuse(self, request_id: str, status: int, code: str, message: str) -> APIResponse:
        """An API-shaped, non-retryable error the HTTP layer sends on its own (e.g. 413)."""
        response = _error(status, code, message)
        response.headers["x-request-id"] = request_id
        return response

    def _check_auth(self, headers: Mapping[str, str]) -> APIResponse | None:
        presented: list[str] = []
        api_key = headers.get("x-api-key")
        if api_key:
            presented.append(api_key)
        authorization = headers.get("authorization")
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

    def _check_idempotency_key(self, request: APIRequest) -> APIResponse | None:
        """The 400 for a mutating request without a usable key (checked once routed)."""
        key = request.headers.get("idempotency-key")
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

    def _route(self, request: APIRequest) -> APIResponse:
        parts = request.raw_path.split("/")
        count = len(parts)
        if (
            3 <= count <= 6
            and parts[:3] == ["", "v1", "machines"]
            and (count <= 4 or parts[4] != "executions")
        ):
            return self._machines_route(request, parts[3:])
        if (
            count < 5
            or count > 8
            or parts[0]
            or parts[1] != "v1"
            or parts[2] != "machines"
            or parts[4] != "executions"
        ):
            return _no_route(request)
        machine_id = _decode_id(parts[3])
        if machine_id is None:
            return _not_found("machine not found")
        method = request.method
        if count == 5:
            if method == "POST":
                return self._create(request, machine_id)
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
            return _no_route(request)
        if parts[6] == "output":
            if method != "GET":
                return _method_not_allowed("GET")
            return self._output(machine_id, execution_id)
        if parts[6] == "events":
            if method != "GET":
                return _method_not_allowed("GET")
            return self._events(request, machine_id, execution_id)
        return _no_route(request)

    # -- endpoints -------------------------------------------------------------------

    def _lookup(self, machine_id: str, execution_id: str) -> ExecutionRecord | APIResponse:
        record = self.executions.get(execution_id)
        if record is None and self.store is not None:
            record = self.store.find(machine_id, execution_id)
        if (
            record is None
            or record.machine_id != machine_id
            or machine_id in self.destroyed_machines
        ):
            return _not_found(f"execution {execution_id} not found on machine {machine_id}")
        self._refresh(record)
        return record

    def _replayed(
        self, request: APIRequest, machine_id: str, handle: Callable[[], APIResponse]
    ) -> APIResponse:
        """Answer a mutating request once per Idempotency-Key; replay it for a retry."""
        denied = self._check_idempotency_key(request)
        if denied is not None:
            return denied
        key = request.headers.get("idempotency-key") or None
        if key is None:
            return handle()
        target = f"{request.method} {request.raw_path}"
        seen = self._replays.get((machine_id, key))
        if seen is not None:
            if seen[0] != target:
                return _key_reused()
            return APIResponse(seen[1], seen[2])
        response = handle()
        if response.status < 500:
            # server errors are not remembered: a retry must get a real second chance
            self._replays[(machine_id, key)] = (target, response.status, response.body)
        return response

    def _create(self, request: APIRequest, machine_id: str) -> APIResponse:
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
        machine = self._machine_of_execution(machine_id)
        if machine.phase in ("failed", "destroying", "destroyed"):
            return _error(
                409,
                "INVALID_STATE",
                f"machine {machine_id} is {machine.phase}: executions cannot run on it",
                details={"machine_id": machine_id, "phase": machine.phase},
            )
        key = request.headers.get("idempotency-key") or None
        parsed = request.json
        problem = _validate_create(parsed)
        if problem is not None:
            return _problem(*problem)
        canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":"))
        if key is not None:
            seen = self._idempotency.get((machine_id, key))
            if seen is not None:
                if seen[0] != canonical:
                    return _key_reused()
                existing = self.executions.get(seen[1])
                if existing is not None:
                    self._refresh(existing)
                    return _json_response(existing.to_json(self.output_cap))
        record = self._new_record(request, machine_id, key, parsed)
        self.executions[record.execution_id] = record
        ids = self._by_machine.setdefault(machine_id, [])
        ids.append(record.execution_id)
        if key is not None:
            self._idempotency[(machine_id, key)] = (canonical, record.execution_id)
        try:
            self._start_on(machine, record)
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
        self, request: APIRequest, machine_id: str, key: str | None, body: dict[str, Any]
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
            org_id=request.headers.get("x-dedalus-org-id"),
            creation_request_id=request.request_id,
            creation_trace_id=_trace_id(request.headers.get("traceparent")),
        )

    def _get(self, machine_id: str, execution_id: str) -> APIResponse:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, APIResponse):
            return found
        return _json_response(found.to_json(self.output_cap))

    def _delete(self, machine_id: str, execution_id: str) -> APIResponse:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, APIResponse):
            return found
        if not found.is_terminal:
            self.runner.cancel(found)
            return _json_response(found.to_json(self.output_cap))
        self.executions.pop(execution_id, None)  # a stored record is not in memory
        if self.store is not None:
            self.store.remove(found)
        key = found.idempotency_key
        if key is not None:
            seen = self._idempotency.get((machine_id, key))
            if seen is not None and seen[1] == execution_id:
                del self._idempotency[(machine_id, key)]
        return _json_response(found.to_json(self.output_cap))

    def _output(self, machine_id: str, execution_id: str) -> APIResponse:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, APIResponse):
            return found
        return _json_response(found.output_json(self.output_cap))

    def _logs_route(
        self, request: APIRequest, machine_id: str, execution_id: str, rest: list[str]
    ) -> APIResponse:
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
        return _no_route(request)

    def _logs(self, machine_id: str, execution_id: str) -> APIResponse:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, APIResponse):
            return found
        return _json_response(_log_status(found))

    def _log_token(self, machine_id: str, execution_id: str) -> APIResponse:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, APIResponse):
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
                "base_url": f"{self.public_url or ''}/_logs",
                "execution_id": execution_id,
                "expires_at": format_time(expires),
                "stream_id": _stream_id(found),
                "token_type": "Bearer",
            }
        )

    def _page_args(self, request: APIRequest, end: int) -> tuple[int, int] | APIResponse:
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

    def _list(self, request: APIRequest, machine_id: str) -> APIResponse:
        if machine_id in self.destroyed_machines:
            return _not_found(f"machine {machine_id} not found")
        if self.store is not None:
            return self._list_stored(request, machine_id, self.store)
        ids = self._by_machine.get(machine_id, [])
        args = self._page_args(request, len(ids))
        if isinstance(args, APIResponse):
            return args
        limit, index = args
        executions = self.executions
        items: list[dict[str, Any]] = []
        end = len(ids)
        newest = self.list_order == "newest"

        def at(position: int) -> str:
            # newest first, position 0 is the last id created
            return ids[end - 1 - position] if newest else ids[position]

        while index < end and len(items) < limit:
            record = executions.get(at(index))
            index += 1
            if record is None:
                continue
            self._refresh(record)
            items.append(record.to_json(self.output_cap))
        # Deleted ids stay in the list (so cursors stay stable); skip them to tell
        # whether anything is left for another page.
        more = index
        while more < end and at(more) not in executions:
            more += 1
        next_cursor = f"c{index}" if more < end else None
        return _json_response({"items": items, "next_cursor": next_cursor})

    def _list_stored(self, request: APIRequest, machine_id: str, store: RecordStore) -> APIResponse:
        """A machine's list with a store: memory's records and the store's, oldest first."""
        merged = {r.execution_id: r for r in store.machine_records(machine_id)}
        for execution_id in self._by_machine.get(machine_id, ()):
            record = self.executions.get(execution_id)
            if record is not None:
                merged[execution_id] = record  # memory is fresher than the store
        records = sorted(
            merged.values(),
            key=lambda r: (r.created_at, r.execution_id),
            reverse=self.list_order == "newest",
        )
        args = self._page_args(request, len(records))
        if isinstance(args, APIResponse):
            return args
        limit, index = args
        page = records[index : index + limit]
        for record in page:
            self._refresh(record)
        stop = index + len(page)
        return _json_response(
            {
                "items": [record.to_json(self.output_cap) for record in page],
                "next_cursor": f"c{stop}" if stop < len(records) else None,
            }
        )

    def _events(self, request: APIRequest, machine_id: str, execution_id: str) -> APIResponse:
        found = self._lookup(machine_id, execution_id)
        if isinstance(found, APIResponse):
            return found
        events = found.events
        args = self._page_args(request, len(events))
        if isinstance(args, APIResponse):
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

    # -- machines (see "Machines" in the module docstring) -----------------------------

    def add_machine(
        self,
        machine_id: str | None = None,
        *,
        vcpu: float = 1,
        memory_mib: int = 4096,
        storage_gib: int = 10,
        autosleep_seconds: int = 300,
        running: bool = False,
        origin: str = "api",
    ) -> MachineRecord:
        """A new machine, as a create would make it (``running=True``: already running).

        Its phases follow :attr:`machine_timings` as they are now; ``origin`` says how
        the server met it (``"execution"``: an execution on an id it did not know).
        """
        now = self.clock.monotonic()
        record = MachineRecord(
            machine_id=machine_id or str(uuid.uuid4()),
            vcpu=vcpu,
            memory_mib=memory_mib,
            storage_gib=storage_gib,
            autosleep_seconds=autosleep_seconds,
            created_at=to_millis(self.clock.now()),
            created_mono=now,
            timings=self.machine_timings,
            origin=origin,
        )
        if record.machine_id in self.machines:
            raise ValueError(f"machine {record.machine_id} exists already")
        self.machines[record.machine_id] = record
        if running:
            record.begin_running(now)
        else:
            record.begin(now)
            self._advance(record)
        self._machine_changed(record)
        return record

    def _find_machine(self, machine_id: str) -> MachineRecord | None:
        """The machine from memory, else from the machine store (kept in memory then)."""
        machine = self.machines.get(machine_id)
        if machine is None and self.machine_store is not None:
            machine = self.machine_store.load(machine_id)
            if machine is not None:
                self.machines[machine_id] = machine
        return machine

    def _machine_changed(self, machine: MachineRecord) -> None:
        if self.machine_store is not None:
            self.machine_store.save(machine)

    def get_machine_record(self, machine_id: str) -> MachineRecord:
        """The machine's record, brought up to date first. KeyError if unknown."""
        record = self.machines[machine_id]
        self._advance(record)
        return record

    def _advance(self, machine: MachineRecord) -> None:
        """Replay the machine's transitions up to now (S1-S5), then start or fail the
        executions that were waiting for it to wake."""
        busy = False
        idle_since: float | None = None
        # only autosleep (S3) needs the machine's activity: a machine that never sleeps
        # (every one first met through an execution) costs no scan of its executions
        sleepy = machine.autosleep_seconds > 0 and machine.phase == "running"
        for execution_id in self._by_machine.get(machine.machine_id, ()) if sleepy else ():
            record = self.executions.get(execution_id)
            if record is None or execution_id in self._deferred:
                continue
            self.runner.refresh(record)
            if not record.is_terminal:
                busy = True
            elif record.completed_at is not None:
                ended = (
                    record.created_mono + (record.completed_at - record.created_at).total_seconds()
                )
                idle_since = ended if idle_since is None else max(idle_since, ended)
        machine.advance(self.clock.monotonic(), busy=busy, idle_since=idle_since)

    def _refresh(self, record: ExecutionRecord) -> None:
        """Bring an execution up to date: start it if its machine finished waking."""
        machine_id = self._deferred.get(record.execution_id)
        if machine_id is not None:
            machine = self.machines[machine_id]
            self._advance(machine)
            if machine.phase == "running" and machine.running_since is not None:
                del self._deferred[record.execution_id]
                record.ready = (machine.running_since, machine.at(machine.running_since))
                self.runner.start(record)
            elif machine.phase in ("failed", "destroying", "destroyed"):
                del self._deferred[record.execution_id]
                record.finish(
                    "failed",
                    machine.last_transition_at or to_millis(self.clock.now()),
                    error_code="MACHINE_FAILED",
                    error_message=f"machine {machine_id} did not wake: {machine.last_error}",
                )
            else:
                left = machine.seconds_to_running(self.clock.monotonic())
                record.retry_after_ms = _wake_hint(left)
                return
        self.runner.refresh(record)

    def _machine_of_execution(self, machine_id: str) -> MachineRecord:
        machine = self._find_machine(machine_id)
        if machine is None:
            # first met through an execution: running, never asleep (executions as ever)
            machine = self.add_machine(
                machine_id, autosleep_seconds=0, running=True, origin="execution"
            )
        else:
            self._advance(machine)
        return machine

    def _start_on(self, machine: MachineRecord, record: ExecutionRecord) -> None:
        """Start an execution now, or wake its machine and start it once running."""
        now = self.clock.monotonic()
        if machine.phase == "running" and machine.desired_state == "running":
            machine.last_active = now
            self.runner.start(record)
            return
        machine.want("running", now)
        self._machine_changed(machine)
        left = machine.seconds_to_running(now)
        record.transition("wake_in_progress", record.created_at, retry_after_ms=_wake_hint(left))
        self._deferred[record.execution_id] = machine.machine_id

    def _machines_route(self, request: APIRequest, rest: list[str]) -> APIResponse:
        method = request.method
        if not rest:
            if method == "POST":
                return self._create_machine(request)
            if method == "GET":
                return self._list_machines(request)
            return _method_not_allowed("GET, POST")
        machine_id = _decode_id(rest[0])
        machine = self._find_machine(machine_id) if machine_id is not None else None
        tail = "/".join(rest[1:])
        if tail not in ("", "sleep", "wake", "status/stream"):
            return _no_route(request)
        if machine is None:
            return _not_found(f"machine {machine_id} not found")
        self._advance(machine)
        if tail == "":
            if method == "GET":
                return _machine_response(machine.detail_json(), machine)
            if method == "PATCH":
                return self._replayed(
                    request, machine.machine_id, lambda: self._update_machine(request, machine)
                )
            if method == "DELETE":
                return self._replayed(
                    request, machine.machine_id, lambda: self._delete_machine(machine)
                )
            return _method_not_allowed("DELETE, GET, PATCH")
        if tail == "status/stream":
            if method != "GET":
                return _method_not_allowed("GET")
            last = request.headers.get("last-event-id")
            return APIResponse(
                200,
                b"",
                "text/event-stream",
                {"Cache-Control": "no-cache"},
                stream=self._status_events(machine, last),
            )
        if method != "POST":
            return _method_not_allowed("POST")
        target = "sleeping" if tail == "sleep" else "running"
        return self._replayed(
            request, machine.machine_id, lambda: self._steer_machine(machine, target)
        )

    def _create_machine(self, request: APIRequest) -> APIResponse:
        denied = self._check_idempotency_key(request)
        if denied is not None:
            return denied
        key = request.headers.get("idempotency-key") or None
        body = request.json if request.body else {}
        problem = _validate_machine(body, update=False)
        if problem is not None:
            return _problem(*problem)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        if key is not None and (seen := self._machine_creates.get(key)) is not None:
            if seen[0] != canonical:
                return _key_reused()
            machine = self.get_machine_record(seen[1])
        else:
            autosleep = parse_autosleep(body.get("autosleep", "300"))
            assert autosleep is not None  # validated above
            machine = self.add_machine(
                vcpu=body.get("vcpu", 1),
                memory_mib=body.get("memory_mib", 4096),
                storage_gib=body.get("storage_gib", 10),
                autosleep_seconds=autosleep,
            )
            if key is not None:
                self._machine_creates[key] = (canonical, machine.machine_id)
        status = 200 if machine.phase == "running" else 202
        return _machine_response(machine.to_json(), machine, status)

    def _list_machines(self, request: APIRequest) -> APIResponse:
        ids = list(self.machines)  # oldest first: dicts keep their insertion order
        if self.machine_store is not None:
            for machine_id in self.machine_store.machine_ids():
                self._find_machine(machine_id)
            ids = sorted(self.machines, key=lambda i: (self.machines[i].created_at, i))
        args = self._page_args(request, len(ids))
        if isinstance(args, APIResponse):
            return args
        limit, start = args
        page = ids[start : start + limit]
        items = []
        for machine_id in page:
            machine = self.machines[machine_id]
            self._advance(machine)
            items.append(machine.list_item_json())
        stop = start + len(page)
        next_cursor = f"c{stop}" if stop < len(ids) else None
        return _json_response({"items": items, "next_cursor": next_cursor})

    def _update_machine(self, request: APIRequest, machine: MachineRecord) -> APIResponse:
        body = request.json if request.body else {}
        problem = _validate_machine(body, update=True)
        if problem is not None:
            return _problem(*problem)
        if machine.phase in ("destroying", "destroyed"):
            return _invalid_state(machine, "updated")
        for name in ("vcpu", "memory_mib", "storage_gib"):
            if name in body:
                setattr(machine, name, body[name])
        if "autosleep" in body:
            machine.autosleep_seconds = parse_autosleep(body["autosleep"]) or 0
        machine.revision += 1
        machine.origin = "api"
        self._machine_changed(machine)
        return _machine_response(machine.to_json(), machine)

    def _delete_machine(self, machine: MachineRecord) -> APIResponse:
        machine.want("destroyed", self.clock.monotonic())
        self.destroy_machine(machine.machine_id)
        self._advance(machine)
        if self.machine_store is not None:
            self.machine_store.destroy(machine)
        return _machine_response(machine.to_json(), machine)

    def _steer_machine(self, machine: MachineRecord, target: str) -> APIResponse:
        if machine.phase in ("failed", "destroying", "destroyed"):
            return _invalid_state(machine, "woken" if target == "running" else "put to sleep")
        machine.want(target, self.clock.monotonic())
        self._advance(machine)
        machine.origin = "api"
        self._machine_changed(machine)
        return _machine_response(machine.to_json(), machine)

    async def _status_events(
        self, machine: MachineRecord, last_event_id: str | None
    ) -> AsyncIterator[bytes]:
        """The status stream: past changes (after ``last_event_id``, else the current
        state), then each change as it happens, until the machine settles."""
        sent = _event_number(last_event_id)
        if sent is None:  # a new reader gets the current state: the latest change
            sent = int(machine.history[-1]["revision"]) - 1 if machine.history else 0
        while True:
            self._advance(machine)
            for event in machine.history:
                number = int(event["revision"])
                if number > sent:
                    sent = number
                    data = json.dumps(event, separators=(",", ":"))
                    yield f"id: {number}\nevent: status\ndata: {data}\n\n".encode()
            if machine.settled:
                return
            now = self.clock.monotonic()
            until = machine.phase_until
            await self.clock.sleep(max(until - now, 0.001) if until is not None else 0.05)


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


def _machine_response(
    payload: dict[str, Any], machine: MachineRecord, status: int = 200
) -> APIResponse:
    response = _json_response(payload, status)
    response.headers["ETag"] = f'"{machine.revision}"'
    return response


def _invalid_state(machine: MachineRecord, what: str) -> APIResponse:
    return _error(
        409,
        "INVALID_STATE",
        f"machine {machine.machine_id} is {machine.phase} and cannot be {what}",
        details={"machine_id": machine.machine_id, "phase": machine.phase},
    )


def _wake_hint(seconds: float | None) -> int:
    # the executions' hint while their machine wakes: when it should be running
    return max(int((seconds or 0.0) * 1000), 50)


def _event_number(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def _validate_machine(body: Any, *, update: bool) -> tuple[str, str] | None:
    """``(field, message)`` for the first problem of a machine create/update body."""
    if not isinstance(body, dict):
        return "body", "must be a JSON object"
    vcpu = body.get("vcpu")
    if "vcpu" in body and (
        isinstance(vcpu, bool) or not isinstance(vcpu, int | float) or not 0 < vcpu < 1e6
    ):
        return "vcpu", "must be a positive number"
    for name in ("memory_mib", "storage_gib"):
        if name in body and not (is_int(body[name]) and 0 < body[name] <= _INT64_MAX):
            return name, "must be a positive integer"
    if "autosleep" in body and parse_autosleep(body["autosleep"]) is None:
        return "autosleep", "must be a duration like 30s, 15m, 2h or 1w3d, seconds, or never"
    if update and not body:
        return "body", "must change at least one field"
    return None
