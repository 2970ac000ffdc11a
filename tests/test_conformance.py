"""Conformance with the official SDK (``dedalus-sdk``, pinned in the test dependencies).

We cannot reach the real service from here, so a client none of us wrote is the oracle:

1. the official async client, validating every response strictly against its own types,
   drives :class:`FakeDedalus` and :class:`LocalBackend` through every executions
   endpoint: a field the official types require and our servers leave out fails here;
2. the same logical call made through our :class:`Session` and through the official SDK
   reaches a recording server on 127.0.0.1 as the same method, path, query and body
   bytes, with the headers the API requires (an ``Idempotency-Key`` on every non-GET);
3. our decoder reads payloads built from the SDK's types with every optional field
   present, absent and null, and keeps every field the SDK's types have.
"""

from __future__ import annotations

import asyncio
import json
import re
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import pydantic
import pytest
from aiohttp import web
from dedalus_sdk import AsyncDedalus, ConflictError, NotFoundError
from dedalus_sdk.types.machines import (
    ArtifactRef as SdkArtifactRef,
)
from dedalus_sdk.types.machines import (
    Execution as SdkExecution,
)
from dedalus_sdk.types.machines import (
    ExecutionEvent as SdkExecutionEvent,
)
from dedalus_sdk.types.machines import (
    ExecutionOutput as SdkExecutionOutput,
)
from dedalus_sdk.types.machines.executions import ReadToken as SdkReadToken
from dedalus_sdk.types.machines.executions import Status as SdkStatus

from dedalus_async import (
    ArtifactRef,
    Execution,
    ExecutionEvent,
    ExecutionOutput,
    LocalBackend,
    LogReadToken,
    LogStatus,
    Session,
)
from dedalus_async import _wire as wire
from dedalus_async.testing import FakeClock, FakeDedalus, Script

from .serving import serving

KEY = "conformance-key-0123456789"
MACHINE = "dm-0199a8f2-6c1e-7d3a-9b42-5e8f1a2b3c4d"
UUID7_COMPACT = re.compile(r"[0-9a-f]{12}7[0-9a-f]{19}")


def sdk(base_url: str, **kwargs: Any) -> AsyncDedalus:
    """The official async client in strict mode, with no retries to hide a bad answer."""
    return AsyncDedalus(
        base_url=base_url, max_retries=0, _strict_response_validation=True, **kwargs
    )


# -- 1. the official SDK drives our servers ---------------------------------------------


async def test_the_official_sdk_reads_every_fake_endpoint_strictly() -> None:
    """Every answer of FakeDedalus passes the official types' strict validation, with the
    status codes the API documents."""
    clock = FakeClock()
    async with (
        FakeDedalus(api_key=KEY, clock=clock, page_size=2) as fake,
        sdk(fake.base_url, api_key=KEY) as client,
    ):
        executions = client.machines.executions
        fake.set_script(Script.stuck())
        stuck = await executions.create(machine_id=MACHINE, command=["sleep", "inf"])
        assert stuck.log_capture.state == "pending"
        fake.set_script(None)
        made = [
            await executions.create(
                machine_id=MACHINE,
                command=["echo", f"hi {i}"],
                cwd="/home/machine",
                env={"A": "1"},
                stdin="x",
                timeout_ms=60_000,
            )
            for i in range(4)
        ]
        clock.advance(5)  # the default script ends within a second
        got = await executions.retrieve(machine_id=MACHINE, execution_id=made[0].execution_id)
        assert (got.status, got.exit_code, got.env_keys) == ("succeeded", 0, ["A"])
        assert got.creation_request_id is not None
        listed = [item.execution_id async for item in executions.list(machine_id=MACHINE)]
        assert listed == [stuck.execution_id, *(m.execution_id for m in made)]  # 3 pages
        output = await executions.output(machine_id=MACHINE, execution_id=got.execution_id)
        assert output.stdout == "hi 0\n"
        events = [
            event
            async for event in executions.events(
                machine_id=MACHINE, execution_id=got.execution_id, limit=2
            )
        ]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert {e.type for e in events} == {"lifecycle", "stdout"}
        logs = await executions.logs.retrieve(machine_id=MACHINE, execution_id=got.execution_id)
        assert logs.publication is not None
        assert logs.publication.complete
        token = await executions.logs.create_token(
            machine_id=MACHINE, execution_id=got.execution_id
        )
        assert token.execution_id == got.execution_id
        again = await executions.logs.reauthorize(machine_id=MACHINE, execution_id=got.execution_id)
        assert again.stream_id == logs.stream_id
        cancelled = await executions.delete(machine_id=MACHINE, execution_id=stuck.execution_id)
        assert cancelled.status == "cancelled"
        removed = await executions.delete(machine_id=MACHINE, execution_id=got.execution_id)
        assert removed.status == "succeeded"
        with pytest.raises(NotFoundError):
            await executions.retrieve(machine_id=MACHINE, execution_id=got.execution_id)
        raw = await executions.with_raw_response.retrieve(
            machine_id=MACHINE, execution_id=made[1].execution_id
        )
        assert raw.http_response.status_code == 200
    assert fake.errors == []
    # the official client sent an Idempotency-Key on every mutating request, and got 200s
    mutating = [r for r in fake.requests if r.method != "GET"]
    assert len(mutating) == 5 + 2 + 2
    assert all(r.idempotency_key for r in mutating)


@pytest.fixture
def local_backend_options() -> dict[str, Any]:
    """The plugin's ``local_backend``, waking its machine quickly."""
    return {"wake_delay": 0.01}


async def test_the_official_sdk_reads_every_local_backend_endpoint_strictly(
    local_backend: LocalBackend,
) -> None:
    """The local backend runs a real process; the official client reads all of it."""
    async with sdk(local_backend.base_url, x_api_key=local_backend.api_key) as client:
        executions = client.machines.executions
        created = await executions.create(
            machine_id=MACHINE, command=["/bin/sh", "-c", "echo out; echo err >&2"]
        )
        assert created.log_capture.state == "unavailable"
        execution = created
        for _ in range(400):  # at most 20 s of real time
            execution = await executions.retrieve(
                machine_id=MACHINE, execution_id=created.execution_id
            )
            if execution.status in ("succeeded", "failed", "cancelled", "expired"):
                break
            await asyncio.sleep(0.05)
        assert (execution.status, execution.exit_code) == ("succeeded", 0)
        listed = [e.execution_id async for e in executions.list(machine_id=MACHINE, limit=1)]
        assert listed == [created.execution_id]
        output = await executions.output(machine_id=MACHINE, execution_id=created.execution_id)
        assert (output.stdout, output.stderr) == ("out\n", "err\n")
        events = [
            e
            async for e in executions.events(machine_id=MACHINE, execution_id=created.execution_id)
        ]
        assert events[-1].status == "succeeded"
        logs = await executions.logs.retrieve(machine_id=MACHINE, execution_id=created.execution_id)
        assert logs.capture.state == "unavailable"
        assert logs.code == "LOCAL_BACKEND_NO_LOG_STREAM"
        with pytest.raises(ConflictError) as refused:
            await executions.logs.create_token(
                machine_id=MACHINE, execution_id=created.execution_id
            )
        assert refused.value.status_code == 409
        deleted = await executions.delete(machine_id=MACHINE, execution_id=created.execution_id)
        assert deleted.execution_id == created.execution_id
        with pytest.raises(NotFoundError):
            await executions.retrieve(machine_id=MACHINE, execution_id=created.execution_id)


# -- 2. the same call, byte for byte -----------------------------------------------------

EXECUTION = {
    "execution_id": "exe-0011223344556677",
    "machine_id": MACHINE,
    "command": ["echo", "hé"],
    "created_at": "2026-01-01T00:00:00.000Z",
    "status": "running",
    "log_capture": {"state": "pending"},
}
LOG_STATUS = {"execution_id": EXECUTION["execution_id"], "capture": {}}
ANSWERS: dict[str, Any] = {
    "execution": EXECUTION,
    "output": {"execution_id": EXECUTION["execution_id"], "stdout": "hi\n", "stderr": ""},
    "events": {
        "items": [{"at": "2026-01-01T00:00:00Z", "sequence": 1, "type": "stdout", "chunk": "a"}]
    },
    "list": {"items": [EXECUTION]},
    "logs": LOG_STATUS,
    "token": {
        "access_token": "secret-token",
        "base_url": "https://logs.example.invalid",
        "execution_id": EXECUTION["execution_id"],
        "expires_at": "2026-01-01T00:15:00Z",
        "stream_id": "s-1",
        "token_type": "Bearer",
    },
}


@attrs.frozen
class Seen:
    """One request as the recording server got it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


class Recorder:
    """A server on 127.0.0.1 that records every request and answers a valid body for the
    route; a page has a next cursor only when no cursor was sent (so two pages)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        # how many DELETEs to answer with a retryable 503 (after recording them)
        self.fail_deletes = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(
            Seen(
                request.method,
                request.rel_url.raw_path,
                dict(request.query),
                {k.lower(): v for k, v in request.headers.items()},
                await request.read(),
            )
        )
        path = request.rel_url.path
        if request.method == "DELETE" and self.fail_deletes:
            self.fail_deletes -= 1
            return web.json_response({"error_code": "UNAVAILABLE", "retryable": True}, status=503)
        if path.endswith("/logs/token"):
            answer = ANSWERS["token"]
        elif path.endswith(("/logs", "/reauthorize")):
            answer = ANSWERS["logs"]
        elif path.endswith("/output"):
            answer = ANSWERS["output"]
        elif path.endswith(("/events", "/executions")) and request.method == "GET":
            answer = dict(ANSWERS["events" if path.endswith("/events") else "list"])
            if "cursor" not in request.query:
                answer["next_cursor"] = "page-2"
        else:
            answer = ANSWERS["execution"]
        return web.json_response(answer)


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    async with serving(app) as base_url:
        yield rec, base_url


EID = str(EXECUTION["execution_id"])


async def _collect(items: Any) -> list[Any]:
    return [item async for item in items]


# Each case: (name, our call, the official SDK's call) for one logical operation.
Call = Callable[[Any], Awaitable[object]]
CASES: list[tuple[str, Call, Call]] = [
    (
        "create",
        lambda s: s.create_execution(
            MACHINE,
            ["python3", "-c", "print('hé ✓')"],
            cwd="/home/machine/work",
            env={"B": "2", "A": "é"},
            stdin="line\n",
            timeout_ms=30_000,
        ),
        lambda c: c.machines.executions.create(
            machine_id=MACHINE,
            command=["python3", "-c", "print('hé ✓')"],
            cwd="/home/machine/work",
            env={"B": "2", "A": "é"},
            stdin="line\n",
            timeout_ms=30_000,
        ),
    ),
    (
        "create-minimal",
        lambda s: s.create_execution(MACHINE, ["true"]),
        lambda c: c.machines.executions.create(machine_id=MACHINE, command=["true"]),
    ),
    (
        "get",
        lambda s: s.get_execution(MACHINE, EID),
        lambda c: c.machines.executions.retrieve(machine_id=MACHINE, execution_id=EID),
    ),
    (
        "list",
        lambda s: _collect(s.list_executions(MACHINE, limit=2)),
        lambda c: _collect(c.machines.executions.list(machine_id=MACHINE, limit=2)),
    ),
    (
        "output",
        lambda s: s.get_output(MACHINE, EID),
        lambda c: c.machines.executions.output(machine_id=MACHINE, execution_id=EID),
    ),
    (
        "events",
        lambda s: _collect(s.iter_events(MACHINE, EID, limit=3)),
        lambda c: _collect(
            c.machines.executions.events(machine_id=MACHINE, execution_id=EID, limit=3)
        ),
    ),
    (
        "delete",
        lambda s: s.delete_execution(MACHINE, EID),
        lambda c: c.machines.executions.delete(machine_id=MACHINE, execution_id=EID),
    ),
    (
        "logs",
        lambda s: s.get_logs(MACHINE, EID),
        lambda c: c.machines.executions.logs.retrieve(machine_id=MACHINE, execution_id=EID),
    ),
    (
        "logs-token",
        lambda s: s.create_log_token(MACHINE, EID),
        lambda c: c.machines.executions.logs.create_token(machine_id=MACHINE, execution_id=EID),
    ),
    (
        "logs-reauthorize",
        lambda s: s.reauthorize_logs(MACHINE, EID),
        lambda c: c.machines.executions.logs.reauthorize(machine_id=MACHINE, execution_id=EID),
    ),
]


@pytest.mark.parametrize("auth", ["bearer", "x-api-key"])
@pytest.mark.parametrize(("name", "ours", "theirs"), CASES, ids=[c[0] for c in CASES])
async def test_the_same_call_sends_the_same_request(
    recorder: tuple[Recorder, str], name: str, ours: Call, theirs: Call, auth: str
) -> None:
    """Method, path, query and body bytes match the official SDK's; both send the auth
    and org headers, and an Idempotency-Key (a compact UUIDv7) on every non-GET."""
    rec, base_url = recorder
    org = "0199a8f2-0000-7000-8000-00000000c0de"
    credentials = {"api_key": KEY} if auth == "bearer" else {"x_api_key": KEY}
    async with sdk(base_url, dedalus_org_id=org, **credentials) as client:
        await theirs(client)
    official = list(rec.seen)
    rec.seen.clear()
    async with Session(KEY, base_url=base_url, org_id=org, auth_scheme=auth) as session:  # type: ignore[arg-type]
        await ours(session)
    mine = list(rec.seen)

    assert len(mine) == len(official) >= 1
    for got, want in zip(mine, official, strict=True):
        assert (got.method, got.path, got.query) == (want.method, want.path, want.query)
        assert got.body == want.body
        for header in ("authorization", "x-api-key", "x-dedalus-org-id"):
            assert got.headers.get(header) == want.headers.get(header), header
        if want.body:
            assert got.headers["content-type"] == want.headers["content-type"]
        if want.method == "GET":
            assert "idempotency-key" not in got.headers
        else:
            assert UUID7_COMPACT.fullmatch(want.headers["idempotency-key"])
            assert UUID7_COMPACT.fullmatch(got.headers["idempotency-key"])


async def test_a_retried_delete_resends_its_key(recorder: tuple[Recorder, str]) -> None:
    """The API may have acted on a DELETE whose answer was lost: the retry must carry the
    same Idempotency-Key, and a new call a new one."""
    rec, base_url = recorder
    rec.fail_deletes = 1
    async with Session(KEY, base_url=base_url) as session:
        session.retry = attrs.evolve(session.retry, initial_backoff=0.01)
        await session.delete_execution(MACHINE, EID)
        await session.delete_execution(MACHINE, EID)
    keys = [seen.headers["idempotency-key"] for seen in rec.seen]
    assert len(keys) == 3
    assert keys[0] == keys[1] != keys[2]


# -- 3. payloads built from the SDK's types ----------------------------------------------

SAMPLE_TIME = "2026-03-04T05:06:07.890123Z"
OURS: dict[type[pydantic.BaseModel], tuple[type[Any], Callable[[wire.Response], Any]]] = {
    SdkExecution: (Execution, wire.decode_execution),
    SdkExecutionOutput: (ExecutionOutput, wire.decode_output),
    SdkExecutionEvent: (ExecutionEvent, lambda r: wire.decode_events(_page(r))[0][0]),
    SdkStatus: (LogStatus, wire.decode_log_status),
    SdkReadToken: (LogReadToken, wire.decode_log_token),
    SdkArtifactRef: (ArtifactRef, lambda r: _first_artifact(_with_artifact(r))),
}


def _first_artifact(response: wire.Response) -> ArtifactRef:
    artifacts = wire.decode_execution(response).artifacts
    assert artifacts
    return artifacts[0]


def _page(response: wire.Response) -> wire.Response:
    body = b'{"items":[' + response.body + b'],"next_cursor":null}'
    return wire.Response(200, {}, body)


def _with_artifact(response: wire.Response) -> wire.Response:
    execution = {
        "execution_id": "e",
        "machine_id": MACHINE,
        "created_at": SAMPLE_TIME,
        "status": "queued",
        "log_capture": {},
        "artifacts": [json.loads(response.body)],
    }
    return wire.Response(200, {}, json.dumps(execution).encode())


def _inner(annotation: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether ``None`` was allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        assert len(rest) == 1
        return rest[0], True
    return annotation, False


def _sample(name: str, annotation: Any, optional: str) -> Any:
    """A value the official type accepts, for the field ``name``."""
    kind, _ = _inner(annotation)
    origin = typing.get_origin(kind)
    if isinstance(kind, type) and issubclass(kind, pydantic.BaseModel):
        return payload(kind, optional)
    if origin is typing.Literal:
        return typing.get_args(kind)[-1]
    if origin is list:
        (item,) = typing.get_args(kind)
        return [_sample(name, item, optional), _sample(name, item, optional)]
    if kind is str:
        # byte counts are strings of digits on the wire
        return "12345678901234" if name.endswith("_bytes") else f"{name}-value"
    if kind is bool:
        return True
    if kind is int:
        return 42
    if kind is datetime:
        return SAMPLE_TIME
    raise AssertionError(f"no sample for {name}: {annotation!r}")


def payload(model: type[pydantic.BaseModel], optional: str) -> dict[str, Any]:
    """A JSON object of ``model`` whose optional fields are all ``present``, ``absent`` or
    ``null``."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if not field.is_required():
            if optional == "absent":
                continue
            if optional == "null":
                out[name] = None
                continue
        out[name] = _sample(name, field.annotation, optional)
    return out


def _same(ours: Any, theirs: Any, where: str) -> None:
    """Our decoded value means what the SDK parsed (lists are tuples, byte counts ints)."""
    if isinstance(theirs, pydantic.BaseModel):
        assert attrs.has(type(ours)), where
        for name in type(theirs).model_fields:
            assert hasattr(ours, name), f"{where}.{name} is dropped by our model"
            _same(getattr(ours, name), getattr(theirs, name), f"{where}.{name}")
    elif isinstance(theirs, list):
        assert isinstance(ours, tuple), where
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, str) and where.endswith("_bytes"):
        assert ours == int(theirs), where
    elif isinstance(theirs, datetime):
        assert ours == theirs, where
        assert ours.tzinfo is not None, where
    else:
        assert ours == theirs, where


@pytest.mark.parametrize("optional", ["present", "absent", "null"])
@pytest.mark.parametrize("model", list(OURS), ids=lambda m: m.__name__)
def test_our_decoder_reads_what_the_official_types_describe(
    model: type[pydantic.BaseModel], optional: str
) -> None:
    """A payload valid for the official type decodes, and every field keeps its meaning."""
    data = payload(model, optional)
    theirs = model.model_validate(data)  # the payload is valid by the SDK's own rules
    _, decode = OURS[model]
    ours = decode(wire.Response(200, {}, json.dumps(data).encode()))
    _same(ours, theirs, model.__name__)


@pytest.mark.parametrize("model", list(OURS), ids=lambda m: m.__name__)
def test_our_models_have_every_field_of_the_official_types(
    model: type[pydantic.BaseModel],
) -> None:
    ours = {a.name for a in attrs.fields(OURS[model][0])}
    assert set(model.model_fields) <= ours


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02t03:04:05z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05.123456789Z", datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        ("2026-01-02t03:04:05.5+02:00", datetime(2026, 1, 2, 1, 4, 5, 500000, tzinfo=UTC)),
    ],
)
def test_rfc3339_in_any_case_with_any_fraction_and_offset(text: str, expected: datetime) -> None:
    data = {**EXECUTION, "created_at": text}
    execution = wire.decode_execution(wire.Response(200, {}, json.dumps(data).encode()))
    assert execution.created_at == expected
    assert SdkExecution.model_validate(data).created_at == expected  # the SDK agrees


def test_a_leap_second_reads_as_the_next_second() -> None:
    """RFC 3339 allows second 60. The official SDK (pydantic) rejects it; we read it as the
    first instant of the next minute rather than fail a whole response over it."""
    data = {**EXECUTION, "created_at": "2026-12-31T23:59:60Z"}
    execution = wire.decode_execution(wire.Response(200, {}, json.dumps(data).encode()))
    assert execution.created_at == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(pydantic.ValidationError):
        SdkExecution.model_validate(data)  # if this starts passing, the SDK caught up
