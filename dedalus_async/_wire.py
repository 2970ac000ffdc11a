"""The wire format, pure: validate arguments, build requests, decode responses.

Nothing here does I/O. A :class:`Request` is everything the transport needs except the
credentials (which only the transport holds, so they can never leak into a repr, a log
line or an error message); a :class:`Response` is status, headers and body bytes. Decoding
either returns a model or raises the typed error from :mod:`dedalus_async._errors`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, TypeVar
from urllib.parse import quote

import attrs

from ._checks import check_count, is_int
from ._convert import structure
from ._errors import APIStatusError, RateLimitedError, ResponseDecodeError, error_for_status
from ._models import (
    MACHINE_TARGETS,
    Execution,
    ExecutionEvent,
    ExecutionOutput,
    LifecycleStatus,
    LogReadToken,
    LogStatus,
    Machine,
)

try:  # orjson is optional (the "fast" extra): less CPU on the hot path; on odd input (NaN,
    # integers past 64 bits) it differs from json, but either way the outcome is a model or
    # a ResponseDecodeError
    import orjson

    _loads: Any = orjson.loads
except ImportError:  # pragma: no cover - exercised when orjson is absent
    _loads = json.loads

__all__ = [
    "Request",
    "Response",
    "ServerSentEvent",
    "ServerSentEvents",
    "create_request",
    "decode_execution",
    "decode_lifecycle",
    "decode_log_status",
    "decode_log_token",
    "decode_machine",
    "decode_output",
    "decode_page",
    "error_from_response",
    "machine_create_request",
    "machine_request",
    "machine_update_request",
    "new_idempotency_key",
    "parse_retry_after",
    "raw_page",
    "structure_item",
]

T = TypeVar("T")

MAX_ID_LENGTH: Final = 253
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 255
#: The longest `timeout_ms` sent: 2**53 - 1, the largest integer every JSON reader keeps.
MAX_TIMEOUT_MS: Final = 2**53 - 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 3986 "unreserved" characters: exactly what quote(..., safe="") leaves as it is
_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]+")
_KEY_OK = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it travels in an HTTP header
_BODY_SNIPPET: Final = 2000
# Built once: json.dumps() with any non-default argument builds a new encoder per call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_REQUEST_ID_HEADERS: Final = ("x-request-id", "request-id", "x-dedalus-request-id", "x-trace-id")


@attrs.frozen(slots=True)
class Request:
    """One HTTP request, minus credentials. ``path`` is already percent-encoded.

    Every request that is not a GET carries an ``idempotency_key``: the API requires the
    header on every mutating request, and every retry of one call re-sends the same key.
    """

    method: str
    path: str
    params: Mapping[str, str] | None = None
    body: bytes | None = None
    idempotency_key: str | None = None


@attrs.frozen(slots=True)
class Response:
    """One HTTP response. ``headers`` must look names up case-insensitively."""

    status: int
    headers: Mapping[str, str]
    body: bytes


# --- validation ----------------------------------------------------------------------


def check_id(name: str, value: object) -> str:
    """Validate a machine or execution ID; return its path-segment form."""
    # The common case first (every request builds a path from one or two IDs): an ID of
    # unreserved characters needs no escaping and breaks none of the rules below.
    if (
        type(value) is str
        and len(value) <= MAX_ID_LENGTH
        and _UNRESERVED.fullmatch(value) is not None
        and value not in (".", "..")
    ):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{name} is {len(value)} characters long; at most {MAX_ID_LENGTH} allowed")
    if "/" in value:
        raise ValueError(f"{name} must not contain '/': pass the bare ID, not a path or URL")
    if _CONTROL.search(value):
        raise ValueError(f"{name} must not contain control characters")
    if value in (".", ".."):
        raise ValueError(f"{name} {value!r} is not an ID")
    return quote(_check_text(name, value), safe="")


def _check_text(name: str, value: str) -> str:
    """A str that can travel as UTF-8 (no lone surrogate); the value itself is not shown."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{name} has a lone surrogate at position {exc.start}, which UTF-8 cannot "
                "carry: decode bytes with errors='replace' (or fix the text) before sending"
            ) from None
    return value


def check_command(command: object) -> list[str]:
    """Validate an argv list; a bare string is refused with a hint."""
    if isinstance(command, str | bytes):
        raise TypeError(
            "command must be a list of strings (argv, no shell), not a string: pass "
            f"[{command!r}] for a single program, "
            f"or ['/bin/sh', '-c', {command!r}] for a shell line"
        )
    if not isinstance(command, Sequence):
        raise TypeError(f"command must be a list of strings, not {type(command).__name__}")
    argv = list(command)
    if not argv:
        raise ValueError("command must not be empty: give at least the program to run")
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise TypeError(f"command[{i}] must be a str, not {type(arg).__name__}")
        _check_text(f"command[{i}]", arg)
    if not argv[0]:
        raise ValueError("command[0] must name the program to run, not be an empty string")
    return argv


def check_env(env: object) -> dict[str, str] | None:
    """Validate an environment mapping of str to str."""
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str):
            raise TypeError(f"env keys must be str, got {type(key).__name__}")
        if not key or "=" in key or "\x00" in key:
            raise ValueError(f"env key {key!r} is not a valid variable name")
        if not isinstance(value, str):
            # the value is deliberately not shown: env often carries secrets
            raise TypeError(f"env[{key!r}] must be a str, not {type(value).__name__}")
        _check_text("an env key", key)
        out[key] = _check_text(f"env[{key!r}]", value)
    return out


def check_optional_str(name: str, value: object) -> str | None:
    """Validate an optional string argument."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, not {type(value).__name__}")
    return _check_text(name, value)


def check_timeout_ms(value: object) -> int | None:
    """Validate the remote command's own time limit in milliseconds."""
    if value is None:
        return None
    if not is_int(value):
        kind = type(value).__name__
        hint = ": for seconds, use timeout_ms=int(seconds * 1000)" if kind == "float" else ""
        raise TypeError(f"timeout_ms must be an int (milliseconds), not {kind}{hint}")
    if value <= 0:
        raise ValueError(f"timeout_ms must be a positive number of milliseconds, got {value}")
    if value > MAX_TIMEOUT_MS:
        raise ValueError(
            f"timeout_ms must be at most {MAX_TIMEOUT_MS} (2**53 - 1, the largest integer "
            f"every JSON reader keeps exactly), got {value}"
        )
    return value


def check_idempotency_key(value: object) -> str | None:
    """Validate a caller-supplied Idempotency-Key."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"idempotency_key must be a str, not {type(value).__name__}")
    if not value or len(value) > MAX_IDEMPOTENCY_KEY_LENGTH or not _KEY_OK.fullmatch(value):
        raise ValueError(
            "idempotency_key must be 1-255 visible ASCII characters (no spaces); "
            "omit it to get a fresh compact UUIDv7"
        )
    return value


def check_limit(value: object) -> int | None:
    """Validate a page size."""
    return None if value is None else check_count("limit", value)


# --- building requests ---------------------------------------------------------------


def new_idempotency_key(unix_ms: int, rand: int) -> str:
    """A compact UUIDv7: 12 hex digits of Unix milliseconds, ``7``, then 19 random hex.

    ``rand`` supplies the random bits (76 are used); pass ``secrets.randbits(76)``.
    """
    return f"{unix_ms & 0xFFFFFFFFFFFF:012x}7{rand & ((1 << 76) - 1):019x}"


def executions_path(machine_id: str) -> str:
    """Path of the executions collection of one machine (IDs already validated)."""
    return f"/v1/machines/{machine_id}/executions"


def create_request(
    machine_id: str,
    command: object,
    *,
    cwd: object = None,
    env: object = None,
    stdin: object = None,
    timeout_ms: object = None,
    idempotency_key: str,
) -> Request:
    """Validate every argument and build the create request.

    The body is serialised once, here: every retry sends these exact bytes under the same
    Idempotency-Key, so the server can recognise it.
    """
    mid = check_id("machine_id", machine_id)
    body: dict[str, Any] = {"command": check_command(command)}
    if (cwd := check_optional_str("cwd", cwd)) is not None:
        body["cwd"] = cwd
    if (env_ := check_env(env)) is not None:
        body["env"] = env_
    if (stdin_ := check_optional_str("stdin", stdin)) is not None:
        body["stdin"] = stdin_
    if (tm := check_timeout_ms(timeout_ms)) is not None:
        body["timeout_ms"] = tm
    raw = _ENCODER.encode(body).encode()
    return Request("POST", executions_path(mid), None, raw, idempotency_key)


def execution_request(
    method: str,
    machine_id: str,
    execution_id: str,
    suffix: str = "",
    *,
    idempotency_key: str | None = None,
) -> Request:
    """A request on one execution (``suffix``: ``/output``, ``/events``, ``/logs``...).

    Anything but a GET mutates, so it must carry an Idempotency-Key (minted once per call
    by the caller, re-sent on every retry).
    """
    mid = check_id("machine_id", machine_id)
    eid = check_id("execution_id", execution_id)
    if method != "GET" and idempotency_key is None:
        raise ValueError(f"a {method} request needs an Idempotency-Key")
    return Request(method, f"{executions_path(mid)}/{eid}{suffix}", None, None, idempotency_key)


def page_request(path: str, *, limit: int | None, cursor: str | None) -> Request:
    """A GET of one page of a cursor-paginated collection."""
    params: dict[str, str] = {}
    if limit is not None:
        params["limit"] = str(limit)
    if cursor:
        params["cursor"] = cursor
    return Request("GET", path, params or None)


# --- decoding responses --------------------------------------------------------------


def _json(response: Response) -> Any:
    try:
        return _loads(response.body)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ResponseDecodeError(
            f"response body is not valid JSON (HTTP {response.status}, "
            f"{len(response.body)} bytes): {exc}",
            status=response.status,
            body=_snippet(response.body),
        ) from None


def _snippet(body: bytes) -> str:
    return body[:_BODY_SNIPPET].decode("utf-8", "replace")


def _structure(data: object, cls: type[T], response: Response) -> T:
    try:
        return structure(data, cls)
    except ResponseDecodeError as exc:
        # the converter knows the field; the response knows the status and the body
        exc.status = response.status
        exc.body = _snippet(response.body)
        raise


def decode_execution(response: Response) -> Execution:
    """Decode a response holding one Execution."""
    return _structure(_json(response), Execution, response)


def decode_output(response: Response) -> ExecutionOutput:
    """Decode the ``/output`` response."""
    return _structure(_json(response), ExecutionOutput, response)


def decode_log_status(response: Response) -> LogStatus:
    """Decode the ``/logs`` (and ``/logs/reauthorize``) response."""
    return _structure(_json(response), LogStatus, response)


def decode_log_token(response: Response) -> LogReadToken:
    """Decode the ``/logs/token`` response."""
    return _structure(_json(response), LogReadToken, response)


def decode_page(response: Response, cls: type[T]) -> tuple[list[T], str | None]:
    """Decode ``{"items": [...] | null, "next_cursor": ...}``; an empty cursor means the end."""
    items, cursor = _page_parts(response)
    return [_structure(item, cls, response) for item in items], cursor


def raw_page(response: Response) -> tuple[list[Any], str | None]:
    """A page's items as they came (JSON values, not checked) and its next cursor: for a
    reader that structures only the items it wants, with :func:`structure_item`."""
    return _page_parts(response)


def structure_item(data: object, cls: type[T], response: Response) -> T:
    """One item of a :func:`raw_page`, checked and structured as ``cls``."""
    return _structure(data, cls, response)


def _page_parts(response: Response) -> tuple[list[Any], str | None]:
    """The raw items and the next cursor (None at the end) of a page."""
    data = _json(response)
    if type(data) is not dict:
        raise ResponseDecodeError(
            f"expected a page object, got {type(data).__name__}", status=response.status
        )
    items = data.get("items")
    if items is None:
        items = []
    elif type(items) is not list:
        raise ResponseDecodeError(
            f"page items must be a list, got {type(items).__name__}",
            field="items",
            status=response.status,
        )
    cursor = data.get("next_cursor")
    if cursor is not None and type(cursor) is not str:
        raise ResponseDecodeError(
            f"next_cursor must be a string, got {type(cursor).__name__}",
            field="next_cursor",
            status=response.status,
        )
    return items, (cursor or None)


def decode_events(response: Response) -> tuple[list[ExecutionEvent], str | None]:
    """Decode one page of the event log."""
    return decode_page(response, ExecutionEvent)


def parse_retry_after(headers: Mapping[str, str], now: datetime) -> float | None:
    """The server's requested pause in seconds, or None if it asked for none we can read.

    ``retry-after-ms`` (milliseconds) wins over ``Retry-After`` (seconds, or an HTTP date
    compared with ``now``). A date in the past gives a negative number: the caller decides.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000.0
        except ValueError:
            value = float("nan")
        if value == value and abs(value) != float("inf"):  # not NaN, not inf
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
            if when.tzinfo is None:
                return None
            return (when - now).total_seconds()
        except (TypeError, ValueError, IndexError, OverflowError):
            # unparseable, or a date beyond what datetime can represent: no usable pause
            return None
    if seconds != seconds or abs(seconds) == float("inf"):
        return None
    return seconds


def error_from_response(
    response: Response, *, method: str, path: str, now: datetime
) -> APIStatusError:
    """The typed error for a non-2xx response, from either error body shape or none."""
    status = response.status
    code: str | None = None
    message: str | None = None
    retryable: bool | None = None
    details: dict[str, Any] = {}
    text = _snippet(response.body)
    try:
        data = _loads(response.body) if response.body else None
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        if isinstance(data.get("error_code"), str):
            code = data["error_code"]
        elif isinstance(data.get("code"), str):
            code = data["code"]
        for key in ("message", "detail", "title", "error"):
            if isinstance(data.get(key), str) and data[key]:
                message = data[key]
                break
        if isinstance(data.get("retryable"), bool):
            retryable = data["retryable"]
        if isinstance(data.get("details"), dict):
            details = data["details"]
        else:  # RFC 7807 problems put their extra members at the top level
            details = {
                k: v
                for k, v in data.items()
                if k not in ("error_code", "code", "message", "retryable", "status")
            }
    if 300 <= status < 400:
        where = response.headers.get("location")
        note = (
            f"the server answered with a redirect{f' to {where[:200]}' if where else ''}, "
            "which is not followed (credentials are never sent to another location); "
            "check base_url"
        )
        message = note if message is None else f"{message}; {note}"
    elif message is None:
        ctype = response.headers.get("content-type", "no content type")
        size = len(response.body)
        message = f"error response without a JSON error body ({ctype}, {size} bytes)"
    request_id = next(
        (response.headers[h] for h in _REQUEST_ID_HEADERS if h in response.headers), None
    )
    cls = error_for_status(status, code)
    kwargs: dict[str, Any] = {
        "status": status,
        "error_code": code,
        "retryable": retryable,
        "details": details,
        "request_id": request_id,
        "body": text,
        "method": method,
        "path": path,
    }
    if cls is RateLimitedError:
        return RateLimitedError(
            message, retry_after=parse_retry_after(response.headers, now), **kwargs
        )
    return cls(message, **kwargs)


# --- machines ------------------------------------------------------------------------

MACHINES_PATH: Final = "/v1/machines"
# The API's autosleep forms: "never", raw seconds ("1800"), or number+unit groups ("30s",
# "15m", "2h", "1w3d", "7d3h4s"). Units may come in any order; the server normalises.
_AUTOSLEEP = re.compile(r"never|[0-9]{1,10}|(?:[0-9]{1,10}[wdhms]){1,5}")
_MACHINE_SUFFIXES: Final = ("", "/sleep", "/wake", "/status/stream")


def check_vcpu(value: object) -> float | int | None:
    """Validate a machine's vCPU count: a positive finite number (``0.5`` is fine)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"vcpu must be a number of vCPUs (e.g. 1 or 0.5), not {type(value).__name__}"
        )
    if not value > 0 or value == float("inf"):
        raise ValueError(f"vcpu must be a positive number of vCPUs (e.g. 1 or 0.5), got {value!r}")
    return value


def check_machine_size(name: str, value: object, unit: str) -> int | None:
    """Validate ``memory_mib`` / ``storage_gib``: an int of at least 1."""
    if value is None:
        return None
    if not is_int(value):
        kind = type(value).__name__
        raise TypeError(f"{name} must be a whole number of {unit} (an int >= 1), not {kind}")
    if value < 1:
        raise ValueError(f"{name} must be a whole number of {unit}, at least 1, got {value}")
    return value


def check_autosleep(value: object) -> str | None:
    """Validate the idle window before a machine sleeps, in the API's own text form."""
    if value is None:
        return None
    if not isinstance(value, str):
        hint = f": pass {str(value)!r} for seconds" if is_int(value) else ""
        raise TypeError(f"autosleep must be a str such as '30m', not {type(value).__name__}{hint}")
    if _AUTOSLEEP.fullmatch(value) is None:
        raise ValueError(
            f"autosleep {value[:40]!r} is not a duration the API reads: use units like "
            "'30s', '15m', '2h' or '1w3d', raw seconds like '1800', or 'never'"
        )
    return value


def check_machine_target(value: object) -> str:
    """Validate the phase a machine wait ends on: ``running``, ``sleeping`` or ``destroyed``."""
    if not isinstance(value, str) or value not in MACHINE_TARGETS:
        raise ValueError(f"until must be 'running', 'sleeping' or 'destroyed', not {value!r:.40}")
    return value


def _machine_body(
    *, vcpu: object, memory_mib: object, storage_gib: object, autosleep: object
) -> bytes:
    # key order as the official SDK sends them (its params, alphabetically), so that the
    # same call is the same bytes
    body: dict[str, Any] = {}
    if (autosleep_ := check_autosleep(autosleep)) is not None:
        body["autosleep"] = autosleep_
    if (memory := check_machine_size("memory_mib", memory_mib, "MiB")) is not None:
        body["memory_mib"] = memory
    if (storage := check_machine_size("storage_gib", storage_gib, "GiB")) is not None:
        body["storage_gib"] = storage
    if (cpus := check_vcpu(vcpu)) is not None:
        body["vcpu"] = cpus
    return _ENCODER.encode(body).encode()


def machine_create_request(
    *,
    vcpu: object = None,
    memory_mib: object = None,
    storage_gib: object = None,
    autosleep: object = None,
    idempotency_key: str,
) -> Request:
    """Validate the machine's size and build ``POST /v1/machines`` (fields left out are
    the server's defaults)."""
    body = _machine_body(
        vcpu=vcpu, memory_mib=memory_mib, storage_gib=storage_gib, autosleep=autosleep
    )
    return Request("POST", MACHINES_PATH, None, body, idempotency_key)


def machine_update_request(
    machine_id: str,
    *,
    vcpu: object = None,
    memory_mib: object = None,
    storage_gib: object = None,
    autosleep: object = None,
    idempotency_key: str,
) -> Request:
    """Validate and build ``PATCH /v1/machines/{id}`` (only the fields given change)."""
    mid = check_id("machine_id", machine_id)
    body = _machine_body(
        vcpu=vcpu, memory_mib=memory_mib, storage_gib=storage_gib, autosleep=autosleep
    )
    if body == b"{}":
        raise ValueError(
            "update_machine needs at least one of vcpu, memory_mib, storage_gib, autosleep"
        )
    return Request("PATCH", f"{MACHINES_PATH}/{mid}", None, body, idempotency_key)


def machine_request(
    method: str, machine_id: str, suffix: str = "", *, idempotency_key: str | None = None
) -> Request:
    """A request on one machine (``suffix``: ``""``, ``/sleep``, ``/wake``,
    ``/status/stream``); anything but a GET carries an Idempotency-Key."""
    mid = check_id("machine_id", machine_id)
    if suffix not in _MACHINE_SUFFIXES:
        raise ValueError(f"unknown machine route suffix {suffix!r}")
    if method != "GET" and idempotency_key is None:
        raise ValueError(f"a {method} request needs an Idempotency-Key")
    return Request(method, f"{MACHINES_PATH}/{mid}{suffix}", None, None, idempotency_key)


def _machine_from(data: object, response: Response) -> Machine:
    if type(data) is dict:
        status = data.get("status")
        extra: dict[str, Any] = {}
        if "phase" not in data and type(status) is dict and "phase" in status:
            extra["phase"] = status["phase"]  # the GET shape: the phase is in the status
        if data.get("revision") is None:
            revision = status.get("revision") if type(status) is dict else None
            if revision is None:
                revision = _etag(response.headers.get("etag"))
            if revision is not None:
                extra["revision"] = revision
        if extra:
            data = {**data, **extra}
    return _structure(data, Machine, response)


def _etag(value: str | None) -> str | None:
    # an ETag is a quoted string, maybe weak (W/"..."); the revision is what is inside
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def decode_machine(response: Response) -> Machine:
    """Decode a response holding one machine, in either shape (see :class:`Machine`)."""
    return _machine_from(_json(response), response)


def decode_machine_page(response: Response) -> tuple[list[Machine], str | None]:
    """Decode one page of ``GET /v1/machines`` (each item in either shape)."""
    items, cursor = _page_parts(response)
    page = Response(response.status, {}, response.body)  # the page's ETag is no item's
    return [_machine_from(item, page) for item in items], cursor


def decode_lifecycle(data: bytes) -> LifecycleStatus:
    """Decode one event of a machine's status stream (a LifecycleStatus as JSON)."""
    event = Response(200, {}, data)
    return _structure(_json(event), LifecycleStatus, event)


# --- server-sent events (the machine status stream) ------------------------------------


@attrs.frozen(slots=True)
class ServerSentEvent:
    """One event of a ``text/event-stream``: its ``data`` lines joined by ``\n``; ``id``
    is the stream's last event id once this event arrived (``None``: none sent yet)."""

    data: str
    event: str = "message"
    id: str | None = None


class ServerSentEvents:
    """The events of a ``text/event-stream``, fed one line at a time (the WHATWG rules:
    ``field: value``, one leading space dropped, ``:`` comments, a blank line ends an
    event, an event without data is none, an id is kept across events, an id holding NUL
    is ignored). Pure: the bytes come from whoever reads the stream."""

    __slots__ = ("_data", "_event", "last_id")

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id
        self._data: list[str] = []
        self._event = ""

    def feed(self, line: bytes | str) -> ServerSentEvent | None:
        """Take one line (its end of line or not); return the event it completes."""
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent("\n".join(self._data), self._event or "message", self.last_id)
            self._data = []
            self._event = ""
            return event
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\x00" not in value:
            self.last_id = value
        return None
