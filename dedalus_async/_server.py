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
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import unquote

import attrs

from ._checks import is_int
from ._clock import Clock, SystemClock
from ._records import ExecutionRecord, RecordStore, Runner, format_time, to_millis

__all__ = ["APIRequest", "APIResponse", "ExecutionsServer", "parse_json"]

_log = logging.getLogger(__name__)

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
    """What the server answers: ``content_type`` is kept apart from the other headers."""

    status: int
    body: bytes
    content_type: str = _JSON
    headers: dict[str, str] = attrs.Factory(dict)

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
    ``store``: where to look for executions memory lacks (see "Stored records").
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
    ) -> None:
        if not 1 <= page_size <= max_page_size:
            raise ValueError("need 1 <= page_size <= max_page_size")
        self._api_key = api_key.encode()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.runner: Runner = runner
        self.page_size = page_size
        self.max_page_size = max_page_size
        self.output_cap = output_cap
        self.require_idempotency_key = require_idempotency_key
        #: When True, an Idempotency-Key that is not a compact UUIDv7 is 400.
        self.strict_idempotency_keys = strict_idempotency_keys
        self.name = name
        self.public_url: str | None = None
        self.store = store

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
            self.runner.refresh(record)
            if not record.is_terminal:
                self.runner.cancel(record)

    def get_record(self, execution_id: str) -> ExecutionRecord:
        """The execution's record, brought up to date first. KeyError if unknown."""
        record = self.executions[execution_id]
        self.runner.refresh(record)
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
        self.runner.refresh(record)
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
                    self.runner.refresh(existing)
                    return _json_response(existing.to_json(self.output_cap))
        record = self._new_record(request, machine_id, key, parsed)
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

    def _list_stored(self, request: APIRequest, machine_id: str, store: RecordStore) -> APIResponse:
        """A machine's list with a store: memory's records and the store's, oldest first."""
        merged = {r.execution_id: r for r in store.machine_records(machine_id)}
        for execution_id in self._by_machine.get(machine_id, ()):
            record = self.executions.get(execution_id)
            if record is not None:
                merged[execution_id] = record  # memory is fresher than the store
        records = sorted(merged.values(), key=lambda r: (r.created_at, r.execution_id))
        args = self._page_args(request, len(records))
        if isinstance(args, APIResponse):
            return args
        limit, index = args
        page = records[index : index + limit]
        for record in page:
            self.runner.refresh(record)
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
