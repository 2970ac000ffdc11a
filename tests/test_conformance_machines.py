"""Conformance of the machine endpoints with the official SDK (``dedalus-sdk``), as
tests/test_conformance.py does for executions:

1. the official async client, validating every response strictly against its own types,
   drives FakeDedalus through every machine endpoint, with the status codes the API
   documents (202 for a create still on its way, 200 once converged);
2. the same logical call made through our Session and through the official SDK reaches a
   recording server on 127.0.0.1 as the same method, path, query and body bytes, with an
   Idempotency-Key (a compact UUIDv7) on every non-GET and none on a GET;
3. our decoder reads payloads built from the SDK's machine types and keeps every field.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
from aiohttp import web
from dedalus_sdk import AsyncDedalus, ConflictError, NotFoundError
from dedalus_sdk.types import LifecycleStatus as SdkLifecycleStatus
from dedalus_sdk.types import Machine as SdkMachine
from dedalus_sdk.types import MachineListItem as SdkMachineListItem
from dedalus_sdk.types import MachineRetrieveResponse as SdkMachineRetrieveResponse

from dedalus_async import LifecycleStatus, Machine, Session
from dedalus_async import _wire as wire
from dedalus_async.testing import FakeClock, FakeDedalus, MachineTimings

from .serving import serving

KEY = "conformance-key-0123456789"
MACHINE = "017f22e2-79b0-7cc3-98c4-dc0c0c07398f"
UUID7_COMPACT = re.compile(r"[0-9a-f]{12}7[0-9a-f]{19}")


def official(base_url: str, **kwargs: Any) -> AsyncDedalus:
    """The official async client in strict mode, with no retries to hide a bad answer."""
    return AsyncDedalus(
        base_url=base_url, max_retries=0, _strict_response_validation=True, **kwargs
    )


# -- 1. the official SDK drives our fake -------------------------------------------------


async def test_the_official_sdk_reads_every_machine_endpoint_strictly() -> None:
    clock = FakeClock()
    async with (
        FakeDedalus(api_key=KEY, clock=clock) as fake,
        official(fake.base_url, api_key=KEY) as client,
    ):
        raw = await client.machines.with_raw_response.create(
            vcpu=1, memory_mib=4096, storage_gib=10, autosleep="300s"
        )
        assert raw.status_code == 202
        assert raw.headers["etag"]
        created = await raw.parse()
        assert created.phase == "placement_pending"
        machine_id = created.machine_id

        got = await client.machines.retrieve(machine_id=machine_id)
        assert (got.status.phase, got.desired_state) == ("placement_pending", "running")
        clock.advance(2)
        got = await client.machines.retrieve(machine_id=machine_id)
        assert got.status.phase == "running"
        assert got.autosleep_seconds == 300

        fake.machine_timings = MachineTimings(placement=0, start=0)
        raw = await client.machines.with_raw_response.create()
        assert raw.status_code == 200
        assert (await raw.parse()).phase == "running"

        listed = [m async for m in client.machines.list(limit=1)]
        assert [m.machine_id for m in listed] == list(fake.machines)

        updated = await client.machines.update(machine_id=machine_id, autosleep="2h")
        assert updated.autosleep_seconds == 7200
        slept = await client.machines.sleep(machine_id=machine_id)
        assert (slept.phase, slept.desired_state) == ("stopping", "sleeping")
        clock.advance(1)
        woke = await client.machines.wake(machine_id=machine_id)
        assert (woke.phase, woke.desired_state) == ("starting", "running")
        deleted = await client.machines.delete(machine_id=machine_id)
        assert deleted.desired_state == "destroyed"
        with pytest.raises(ConflictError):
            await client.machines.wake(machine_id=machine_id)
        with pytest.raises(NotFoundError):
            await client.machines.retrieve(machine_id="no-such-machine")
    assert fake.errors == []


async def test_the_official_sdk_reads_a_failed_machine_strictly() -> None:
    async with (
        FakeDedalus(api_key=KEY, clock=FakeClock()) as fake,
        official(fake.base_url, api_key=KEY) as client,
    ):
        machine = fake.add_machine(running=True)
        fake.fail_machine(machine.machine_id, "host lost")
        got = await client.machines.retrieve(machine_id=machine.machine_id)
        assert (got.status.phase, got.status.last_error) == ("failed", "host lost")


# -- 2. the same call, the same request --------------------------------------------------

FLAT = {
    "autosleep_seconds": 300,
    "desired_state": "running",
    "machine_id": MACHINE,
    "memory_mib": 4096,
    "phase": "running",
    "storage_gib": 10,
    "vcpu": 1,
}
DETAIL = {
    **{k: v for k, v in FLAT.items() if k != "phase"},
    "status": {
        "phase": "running",
        "reason": "converged",
        "retryable": False,
        "revision": "3",
        "last_transition_at": "2026-01-01T00:00:00.000Z",
        "last_progress_at": "2026-01-01T00:00:00.000Z",
        "memory_configured_mib": 4096,
    },
}


@attrs.frozen
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


class MachineRecorder:
    """Records every request and answers a valid machine body; a list has a second page
    only when no cursor was sent."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        # how many requests to answer with a retryable 503 (after recording them)
        self.fail_next = 0

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
        if self.fail_next:
            self.fail_next -= 1
            return web.json_response({"error_code": "UNAVAILABLE", "retryable": True}, status=503)
        if request.method == "GET" and request.path == "/v1/machines":
            item = {**FLAT, "created_at": "2026-01-01T00:00:00Z"}
            cursor = None if "cursor" in request.query else "page-2"
            return web.json_response({"items": [item], "next_cursor": cursor})
        if request.method == "GET":
            return web.json_response(DETAIL)
        return web.json_response(FLAT)


@pytest.fixture
async def machine_recorder() -> AsyncIterator[tuple[MachineRecorder, str]]:
    rec = MachineRecorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    async with serving(app) as base_url:
        yield rec, base_url


async def _all(items: Any) -> list[Any]:
    return [item async for item in items]


Call = Callable[[Any], Awaitable[object]]
CASES: list[tuple[str, Call, Call]] = [
    (
        "create",
        lambda s: s.create_machine(vcpu=1, memory_mib=4096, storage_gib=10, autosleep="300s"),
        lambda c: c.machines.create(vcpu=1, memory_mib=4096, storage_gib=10, autosleep="300s"),
    ),
    (
        "create-fractional",
        lambda s: s.create_machine(vcpu=0.5, autosleep="never"),
        lambda c: c.machines.create(vcpu=0.5, autosleep="never"),
    ),
    ("create-defaults", lambda s: s.create_machine(), lambda c: c.machines.create()),
    (
        "retrieve",
        lambda s: s.get_machine(MACHINE),
        lambda c: c.machines.retrieve(machine_id=MACHINE),
    ),
    (
        "list",
        lambda s: _all(s.list_machines(limit=1)),
        lambda c: _all(c.machines.list(limit=1)),
    ),
    (
        "update",
        lambda s: s.update_machine(MACHINE, memory_mib=8192, vcpu=2),
        lambda c: c.machines.update(machine_id=MACHINE, memory_mib=8192, vcpu=2),
    ),
    (
        "delete",
        lambda s: s.delete_machine(MACHINE),
        lambda c: c.machines.delete(machine_id=MACHINE),
    ),
    (
        "sleep",
        lambda s: s.sleep_machine(MACHINE),
        lambda c: c.machines.sleep(machine_id=MACHINE),
    ),
    ("wake", lambda s: s.wake_machine(MACHINE), lambda c: c.machines.wake(machine_id=MACHINE)),
]


@pytest.mark.parametrize(("name", "ours", "theirs"), CASES, ids=[c[0] for c in CASES])
async def test_the_same_machine_call_sends_the_same_request(
    machine_recorder: tuple[MachineRecorder, str], name: str, ours: Call, theirs: Call
) -> None:
    rec, base_url = machine_recorder
    async with official(base_url, api_key=KEY) as client:
        await theirs(client)
    theirs_seen = list(rec.seen)
    rec.seen.clear()
    async with Session(KEY, base_url=base_url, auth_scheme="bearer") as session:
        await ours(session)
    ours_seen = list(rec.seen)

    assert len(ours_seen) == len(theirs_seen) >= 1
    for got, want in zip(ours_seen, theirs_seen, strict=True):
        assert (got.method, got.path, got.query) == (want.method, want.path, want.query)
        assert got.body == want.body
        assert got.headers.get("authorization") == want.headers.get("authorization")
        assert "if-match" not in got.headers
        assert "if-match" not in want.headers
        if want.body:
            assert got.headers["content-type"] == want.headers["content-type"]
        if want.method == "GET":
            assert "idempotency-key" not in got.headers
        else:
            assert UUID7_COMPACT.fullmatch(want.headers["idempotency-key"])
            assert UUID7_COMPACT.fullmatch(got.headers["idempotency-key"])


async def test_a_retried_wake_resends_its_key(
    machine_recorder: tuple[MachineRecorder, str],
) -> None:
    rec, base_url = machine_recorder
    rec.fail_next = 1
    async with Session(KEY, base_url=base_url) as session:
        session.retry = attrs.evolve(session.retry, initial_backoff=0.01)
        await session.wake_machine(MACHINE)
        await session.wake_machine(MACHINE)
    keys = [seen.headers["idempotency-key"] for seen in rec.seen]
    assert len(keys) == 3
    assert keys[0] == keys[1] != keys[2]


# -- 3. payloads built from the SDK's types ----------------------------------------------


@pytest.mark.parametrize(
    ("sdk_model", "ours", "payload"),
    [
        (SdkMachine, Machine, FLAT),
        (SdkMachineRetrieveResponse, Machine, DETAIL),
        (SdkMachineListItem, Machine, {**FLAT, "created_at": "2026-01-01T00:00:00Z"}),
        (SdkLifecycleStatus, LifecycleStatus, DETAIL["status"]),
    ],
)
def test_our_models_read_and_keep_every_field_of_the_official_types(
    sdk_model: type[Any], ours: type[Any], payload: dict[str, Any]
) -> None:
    theirs = sdk_model.model_validate(payload)
    fields = set(sdk_model.model_fields)
    missing = fields - {f.name for f in attrs.fields(ours)}
    assert not missing, f"{ours.__name__} lacks {missing}"
    body = wire.Response(200, {}, json.dumps(payload).encode())
    decoded = wire.decode_machine(body) if ours is Machine else wire.decode_lifecycle(body.body)
    for name in fields:
        value = getattr(theirs, name)
        mine = getattr(decoded, name)
        if name == "status":
            assert mine.phase == value.phase
            assert mine.revision == value.revision
        else:
            assert mine == value, name
