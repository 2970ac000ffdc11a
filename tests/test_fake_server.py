"""The fake Dedalus server, exercised over real loopback HTTP with a raw aiohttp client.

These tests pin the fake's behaviour (which every other test of the library relies on)
without going through the library's own client.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from dedalus_async.testing import (
    ExecutionRecord,
    FakeClock,
    FakeDedalus,
    Fault,
    Outcome,
    Phase,
    Runner,
    Script,
    ScriptedRunner,
)

from .conftest import API_KEY

MACHINE = "dm-135ce9da-ac51-5d5c-8f90-0d6e8fad17c3"
EXECS = f"/v1/machines/{MACHINE}/executions"
KEY = API_KEY  # conftest's fake has it; the fakes built here are given it too


def ts(text: str) -> datetime:
    """Parse the fake's RFC 3339 timestamps."""
    return datetime.fromisoformat(text)


@pytest.fixture
async def http(fake: FakeDedalus) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(fake.base_url, headers={"x-api-key": KEY}) as session:
        yield session


_key_counter = 0


def new_key() -> str:
    global _key_counter
    _key_counter += 1
    return f"key-{_key_counter}"


async def delete(http: aiohttp.ClientSession, path: str, *, key: str | None = None) -> Any:
    """DELETE ``path`` under an Idempotency-Key (a fresh one unless given); (status, JSON)."""
    async with http.delete(path, headers={"Idempotency-Key": key or new_key()}) as resp:
        return resp.status, await resp.json()


async def create(
    http: aiohttp.ClientSession,
    body: dict[str, Any] | None = None,
    *,
    key: str | None = None,
    machine: str = MACHINE,
) -> dict[str, Any]:
    async with http.post(
        f"/v1/machines/{machine}/executions",
        json=body if body is not None else {"command": ["echo", "hi"]},
        headers={"Idempotency-Key": key or new_key()},
    ) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def get_json(http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with http.get(path) as resp:
        return resp.status, await resp.json(content_type=None)


# -- auth ----------------------------------------------------------------------------


async def test_missing_credentials_are_auth_required(fake: FakeDedalus) -> None:
    async with (
        aiohttp.ClientSession(fake.base_url) as anon,
        anon.get(EXECS) as resp,
    ):
        body = await resp.json()
    assert resp.status == 401
    assert body["error_code"] == "AUTH_REQUIRED"
    assert body["retryable"] is False
    assert isinstance(body["message"], str)
    assert fake.requests[-1].path == EXECS  # recorded although rejected


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dGVzdC1rZXk6"},
    ],
)
async def test_wrong_credentials_are_auth_invalid(
    fake: FakeDedalus, headers: dict[str, str]
) -> None:
    async with (
        aiohttp.ClientSession(fake.base_url) as session,
        session.get(EXECS, headers=headers) as resp,
    ):
        body = await resp.json()
    assert resp.status == 401
    assert body["error_code"] == "AUTH_INVALID"
    assert fake.create_count == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": KEY},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer {KEY}"},
        {"x-api-key": "stale", "Authorization": f"Bearer {KEY}"},
    ],
)
async def test_either_scheme_authenticates(fake: FakeDedalus, headers: dict[str, str]) -> None:
    async with (
        aiohttp.ClientSession(fake.base_url) as session,
        session.get(EXECS, headers=headers) as resp,
    ):
        assert resp.status == 200
        assert await resp.json() == {"items": [], "next_cursor": None}


async def test_requests_are_recorded_with_credentials_and_org_id(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    created = await create(http, {"command": ["true"]}, key="k-org")
    async with http.get(
        f"{EXECS}/{created['execution_id']}", headers={"X-Dedalus-Org-Id": "org-1"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"].startswith("req-")
    post, get = fake.requests
    assert post.method == "POST"
    assert post.headers["x-api-key"] == KEY
    assert post.idempotency_key == "k-org"
    assert post.json == {"command": ["true"]}
    assert json.loads(post.body) == {"command": ["true"]}
    assert get.org_id == "org-1"
    assert get.query == {}
    assert fake.requests_for("get") == [get]
    assert fake.requests_for(path_contains="/executions/") == [get]
    assert KEY not in repr(post)


async def test_org_id_is_kept_on_the_execution(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        EXECS,
        json={"command": ["true"]},
        headers={"Idempotency-Key": "k", "X-Dedalus-Org-Id": "org-9"},
    ) as resp:
        execution_id = (await resp.json())["execution_id"]
    assert fake.executions[execution_id].org_id == "org-9"


# -- create and idempotency ----------------------------------------------------------


async def test_create_returns_the_execution_object(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    body = {"command": ["env"], "cwd": "/home/machine", "env": {"B": "secret", "A": "x"}}
    async with http.post(EXECS, json=body, headers={"Idempotency-Key": "k1"}) as resp:
        text = await resp.text()
        assert resp.status == 200
        assert resp.content_type == "application/json"
    data = json.loads(text)
    assert re.fullmatch(r"exe-[0-9a-f]{16}", data["execution_id"])
    assert data == {
        "execution_id": data["execution_id"],
        "machine_id": MACHINE,
        "command": ["env"],
        "created_at": "2026-01-01T00:00:00.000Z",
        "status": "wake_in_progress",
        "cwd": "/home/machine",
        "env_keys": ["A", "B"],
        "retry_after_ms": 200,
        "log_capture": {"state": "pending"},
        "creation_request_id": resp.headers["x-request-id"],
        "creation_trace_id": data["creation_trace_id"],
    }
    assert re.fullmatch(r"[0-9a-f]{32}", data["creation_trace_id"])
    assert "secret" not in text
    assert fake.executions[data["execution_id"]].env == {"B": "secret", "A": "x"}
    assert fake.create_count == 1


async def test_idempotent_replay_returns_the_same_execution(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    first = await create(http, {"command": ["echo", "a"], "env": {"X": "1"}}, key="same")
    clock.advance(0.25)
    # Same parameters in another key order: still the same request.
    again = await create(http, {"env": {"X": "1"}, "command": ["echo", "a"]}, key="same")
    assert again["execution_id"] == first["execution_id"]
    assert again["status"] == "queued"  # the current state, not a copy of the first reply
    assert fake.create_count == 1
    assert len(fake.executions) == 1


async def test_idempotency_keys_are_scoped_per_machine(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    a = await create(http, key="shared", machine="dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1")
    b = await create(http, key="shared", machine="dm-67d209e8-5872-57c2-b293-3e1494a6cb05")
    assert a["execution_id"] != b["execution_id"]
    assert fake.create_count == 2


async def test_key_reused_with_a_different_body_is_rejected(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    await create(http, {"command": ["echo", "a"]}, key="k")
    async with http.post(
        EXECS, json={"command": ["echo", "b"]}, headers={"Idempotency-Key": "k"}
    ) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body == {
        "error_code": "IDEMPOTENCY_KEY_REUSED",
        "message": "idempotency key reused with different request parameters",
        "retryable": False,
    }
    assert fake.create_count == 1


async def test_missing_idempotency_key_is_400(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    async with http.post(EXECS, json={"command": ["true"]}) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error_code"] == "IDEMPOTENCY_KEY_REQUIRED"
    assert fake.create_count == 0


async def test_idempotency_key_can_be_optional() -> None:
    async with (
        FakeDedalus(api_key=KEY, require_idempotency_key=False) as fake,
        aiohttp.ClientSession(fake.base_url, headers={"x-api-key": KEY}) as http,
    ):
        for _ in range(2):
            async with http.post(EXECS, json={"command": ["true"]}) as resp:
                assert resp.status == 200
        assert fake.create_count == 2


async def test_strict_idempotency_keys_want_compact_uuid7() -> None:
    async with (
        FakeDedalus(api_key=KEY, strict_idempotency_keys=True) as fake,
        aiohttp.ClientSession(fake.base_url, headers={"x-api-key": KEY}) as http,
    ):
        async with http.post(
            EXECS, json={"command": ["true"]}, headers={"Idempotency-Key": "not-a-uuid"}
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["error_code"] == "IDEMPOTENCY_KEY_INVALID"
        good = "019a1b2c3d4e" + "7" + "0123456789abcdef012"
        async with http.post(
            EXECS, json={"command": ["true"]}, headers={"Idempotency-Key": good}
        ) as resp:
            assert resp.status == 200
        assert fake.create_count == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "command"),
        ({"command": []}, "command"),
        ({"command": "echo hi"}, "command"),
        ({"command": ["echo", 1]}, "command"),
        ({"command": [""]}, "command"),
        ({"command": ["true"], "cwd": 3}, "cwd"),
        ({"command": ["true"], "env": {"A": 1}}, "env"),
        ({"command": ["true"], "env": ["A"]}, "env"),
        ({"command": ["true"], "stdin": 5}, "stdin"),
        ({"command": ["true"], "timeout_ms": 0}, "timeout_ms"),
        ({"command": ["true"], "timeout_ms": 1.5}, "timeout_ms"),
        ({"command": ["true"], "timeout_ms": True}, "timeout_ms"),
        ([1, 2], "body"),
    ],
)
async def test_invalid_create_is_422_problem_json_naming_the_field(
    fake: FakeDedalus, http: aiohttp.ClientSession, body: Any, field: str
) -> None:
    async with http.post(EXECS, json=body, headers={"Idempotency-Key": "k"}) as resp:
        problem = await resp.json(content_type="application/problem+json")
    assert resp.status == 422
    assert problem["status"] == 422
    assert problem["title"] == "Unprocessable Entity"
    assert problem["type"] == "about:blank"
    assert problem["detail"].startswith(f"{field}: ")
    assert problem["errors"][0]["field"] == field
    assert fake.create_count == 0


async def test_non_json_create_body_is_422(fake: FakeDedalus, http: aiohttp.ClientSession) -> None:
    async with http.post(EXECS, data=b"{not json", headers={"Idempotency-Key": "k"}) as resp:
        assert resp.status == 422
        assert (await resp.json(content_type=None))["detail"].startswith("body: ")


# -- scripted lifecycle --------------------------------------------------------------


async def test_default_script_progresses_with_the_clock(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    created = await create(http, {"command": ["echo", "hello", "world"]})
    path = f"{EXECS}/{created['execution_id']}"
    seen: list[tuple[str, int | None]] = []
    for step in (0.0, 0.2, 0.1, 0.3):
        clock.advance(step)
        status, data = await get_json(http, path)
        assert status == 200
        seen.append((data["status"], data.get("retry_after_ms")))
    assert seen == [
        ("wake_in_progress", 200),
        ("queued", 100),
        ("running", 300),
        ("succeeded", None),
    ]
    assert data["started_at"] == "2026-01-01T00:00:00.300Z"
    assert data["completed_at"] == "2026-01-01T00:00:00.600Z"
    assert data["exit_code"] == 0
    assert data["stdout_bytes"] == len("hello world\n")
    status, output = await get_json(http, f"{path}/output")
    assert output["stdout"] == "hello world\n"


async def test_completed_at_is_the_scripted_moment_not_the_observation(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    clock.advance(0.0123)  # created_at is stored at millisecond precision
    created = await create(http, {"command": ["true"]})
    clock.advance(3600)
    _, data = await get_json(http, f"{EXECS}/{created['execution_id']}")
    assert data["status"] == "succeeded"
    assert ts(data["completed_at"]) - ts(data["created_at"]) == timedelta(seconds=0.6)
    assert data["created_at"] == "2026-01-01T00:00:00.012Z"


async def test_immediate_script_is_terminal_in_the_create_response(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.set_script(Script.immediate(Outcome(stdout="done\n")))
    data = await create(http)
    assert data["status"] == "succeeded"
    assert data["completed_at"] == data["created_at"]
    assert data["started_at"] == data["created_at"]
    assert "retry_after_ms" not in data
    assert data["stdout_bytes"] == 5


async def test_false_fails_with_exit_code_one(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    created = await create(http, {"command": ["/usr/bin/false"]})
    clock.advance(1)
    _, data = await get_json(http, f"{EXECS}/{created['execution_id']}")
    assert (data["status"], data["exit_code"]) == ("failed", 1)


async def test_sleep_runs_for_its_argument(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    created = await create(http, {"command": ["sleep", "5"]})
    path = f"{EXECS}/{created['execution_id']}"
    clock.advance(5.2)
    assert (await get_json(http, path))[1]["status"] == "running"
    clock.advance(0.2)
    _, data = await get_json(http, path)
    assert data["status"] == "succeeded"
    assert ts(data["completed_at"]) - ts(data["started_at"]) == timedelta(seconds=5)


async def test_zero_duration_phases_are_skipped(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake.set_script(
        Script((Phase("wake_in_progress", 0), Phase("running", 1, 50), Phase("queued", 0)))
    )
    created = await create(http)
    assert (created["status"], created["retry_after_ms"]) == ("running", 50)
    clock.advance(1)
    path = f"{EXECS}/{created['execution_id']}"
    _, events = await get_json(http, f"{path}/events")
    statuses = [e["status"] for e in events["items"] if e["type"] == "lifecycle"]
    assert statuses == ["running", "succeeded"]


async def test_unknown_phase_status_is_served_as_is(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.set_script(Script((Phase("provisioning", 1, 750),)))
    data = await create(http)
    assert (data["status"], data["retry_after_ms"]) == ("provisioning", 750)


async def test_script_factory_sees_the_create_body(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    bodies: list[dict[str, Any]] = []

    def factory(body: dict[str, Any]) -> Script:
        bodies.append(body)
        return Script.immediate(Outcome(stdout=body.get("stdin", "")))

    fake.set_script(factory)
    data = await create(http, {"command": ["cat"], "stdin": "abc", "env": {"K": "v"}})
    assert bodies == [{"command": ["cat"], "stdin": "abc", "env": {"K": "v"}}]
    assert data["stdout_bytes"] == 3


async def test_expiry_turns_an_unfinished_execution_expired(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake.set_script(Script.stuck("queued", retry_after_ms=1000, expires_after=5))
    created = await create(http)
    assert created["expires_at"] == "2026-01-01T00:00:05.000Z"
    path = f"{EXECS}/{created['execution_id']}"
    clock.advance(4.999)
    assert (await get_json(http, path))[1]["status"] == "queued"
    clock.advance(30)
    _, data = await get_json(http, path)
    assert data["status"] == "expired"
    assert data["error_code"] == "EXPIRED"
    assert data["completed_at"] == "2026-01-01T00:00:05.000Z"
    assert "expires_at" not in data
    assert "retry_after_ms" not in data


async def test_finishing_exactly_at_expiry_is_not_expired(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake.set_script(Script.running(2, expires_after=2))
    created = await create(http)
    clock.advance(2)
    _, data = await get_json(http, f"{EXECS}/{created['execution_id']}")
    assert data["status"] == "succeeded"


async def test_timeout_ms_ends_a_long_command_as_failed(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    created = await create(http, {"command": ["sleep", "60"], "timeout_ms": 1500})
    clock.advance(10)
    _, data = await get_json(http, f"{EXECS}/{created['execution_id']}")
    assert data["status"] == "failed"
    assert data["error_code"] == "TIMEOUT"
    assert data["signal"] == 9
    assert "exit_code" not in data
    assert ts(data["completed_at"]) - ts(data["started_at"]) == timedelta(seconds=1.5)


def test_script_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="terminal"):
        Phase("succeeded", 1)
    with pytest.raises(ValueError, match="duration"):
        Phase("running", -1)
    with pytest.raises(ValueError, match="terminal"):
        Outcome(status="running")
    with pytest.raises(ValueError, match="expires_after"):
        Script((), expires_after=0)


# -- list ----------------------------------------------------------------------------


async def test_list_paginates_oldest_first(fake: FakeDedalus, http: aiohttp.ClientSession) -> None:
    ids = [(await create(http))["execution_id"] for _ in range(5)]
    await create(http, machine="dm-7f5bf56c-8390-58ff-a89a-cd813a7323a7")
    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, page = await get_json(http, EXECS + query)
        assert status == 200
        assert len(page["items"]) <= 2
        seen += [item["execution_id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert seen == ids
    assert pages == 3


async def test_list_skips_deleted_executions_and_clamps_the_limit(
    clock: FakeClock,
) -> None:
    async with (
        FakeDedalus(api_key=KEY, clock=clock, page_size=2, max_page_size=3) as fake,
        aiohttp.ClientSession(fake.base_url, headers={"x-api-key": KEY}) as http,
    ):
        fake.set_script(Script.immediate())
        ids = [(await create(http))["execution_id"] for _ in range(5)]
        assert (await delete(http, f"{EXECS}/{ids[1]}"))[0] == 200
        _, page = await get_json(http, EXECS)
        assert [i["execution_id"] for i in page["items"]] == [ids[0], ids[2]]
        _, page = await get_json(http, EXECS + "?limit=1000")
        assert [i["execution_id"] for i in page["items"]] == [ids[0], ids[2], ids[3]]
        _, last = await get_json(http, EXECS + f"?limit=3&cursor={page['next_cursor']}")
        assert [i["execution_id"] for i in last["items"]] == [ids[4]]
        assert last["next_cursor"] is None


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "1.5"])
async def test_invalid_limit_is_422(http: aiohttp.ClientSession, limit: str) -> None:
    async with http.get(EXECS, params={"limit": limit}) as resp:
        assert resp.status == 422
        assert resp.content_type == "application/problem+json"
        assert (await resp.json(content_type=None))["detail"].startswith("limit: ")


@pytest.mark.parametrize("cursor", ["bogus", "c99", "c-1", "c01"])
async def test_invalid_cursor_is_400(http: aiohttp.ClientSession, cursor: str) -> None:
    async with http.get(EXECS, params={"cursor": cursor}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error_code"] == "INVALID_CURSOR"


# -- delete --------------------------------------------------------------------------


async def test_delete_cancels_a_running_execution_then_removes_it(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake.set_script(Script.stuck())
    created = await create(http, key="del")
    path = f"{EXECS}/{created['execution_id']}"
    clock.advance(2)
    status, cancelled = await delete(http, path, key="cancel-1")
    assert status == 200
    assert cancelled["status"] == "cancelled"
    assert cancelled["completed_at"] == "2026-01-01T00:00:02.000Z"
    assert "exit_code" not in cancelled
    assert (await get_json(http, path))[1]["status"] == "cancelled"  # still there
    # a retry under the same key replays the answer: it does not turn cancel into forget
    assert await delete(http, path, key="cancel-1") == (200, cancelled)
    assert (await get_json(http, path))[1]["status"] == "cancelled"

    status, removed = await delete(http, path)
    assert status == 200
    assert removed["execution_id"] == created["execution_id"]
    for suffix in ("", "/output", "/events"):
        status, body = await get_json(http, path + suffix)
        assert status == 404
        assert body["error_code"] == "NOT_FOUND"
    assert (await delete(http, path))[0] == 404
    # The key of a forgotten execution creates afresh.
    again = await create(http, key="del")
    assert again["execution_id"] != created["execution_id"]


async def test_delete_of_a_terminal_execution_removes_it(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.set_script(Script.immediate())
    created = await create(http)
    assert (await delete(http, f"{EXECS}/{created['execution_id']}"))[1]["status"] == "succeeded"
    assert created["execution_id"] not in fake.executions


@pytest.mark.parametrize("suffix", ["", "/logs/token", "/logs/reauthorize"])
async def test_every_mutating_request_needs_an_idempotency_key(
    fake: FakeDedalus, http: aiohttp.ClientSession, suffix: str
) -> None:
    """DELETE and every POST route answer 400 IDEMPOTENCY_KEY_REQUIRED without the header,
    and change nothing."""
    fake.set_script(Script.stuck())
    created = await create(http)
    path = f"{EXECS}/{created['execution_id']}{suffix}"
    method = "DELETE" if not suffix else "POST"
    async with http.request(method, path) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error_code"] == "IDEMPOTENCY_KEY_REQUIRED"
    assert method in body["message"]
    assert fake.get_record(created["execution_id"]).status == "running"


async def test_a_key_reused_on_another_request_is_refused(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.set_script(Script.stuck())
    first, second = (await create(http))["execution_id"], (await create(http))["execution_id"]
    assert (await delete(http, f"{EXECS}/{first}", key="one-key"))[0] == 200
    status, body = await delete(http, f"{EXECS}/{second}", key="one-key")
    assert (status, body["error_code"]) == (400, "IDEMPOTENCY_KEY_REUSED")
    assert fake.get_record(second).status == "running"


async def test_creation_trace_id_comes_from_traceparent(http: aiohttp.ClientSession) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with http.post(
        EXECS,
        json={"command": ["true"]},
        headers={"Idempotency-Key": new_key(), "traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
    ) as resp:
        assert (await resp.json())["creation_trace_id"] == trace


# -- logs ----------------------------------------------------------------------------


async def test_logs_follow_the_execution_from_active_to_closed(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    created = await create(http)
    path = f"{EXECS}/{created['execution_id']}/logs"
    status, logs = await get_json(http, path)
    assert status == 200
    assert logs == {
        "execution_id": created["execution_id"],
        "capture": {"state": "pending"},
        "publication": {"complete": False, "queued_messages": 0, "state": "active"},
        "stream_id": f"logs-{created['execution_id']}",
    }
    clock.advance(5)
    _, done = await get_json(http, path)
    assert done["capture"] == {}
    assert done["publication"] == {"complete": True, "queued_messages": 0, "state": "closed"}
    async with http.post(path + "/reauthorize", headers={"Idempotency-Key": new_key()}) as resp:
        assert (resp.status, await resp.json()) == (200, done)


async def test_a_log_token_expires_in_15_minutes_and_is_replayed_for_its_key(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    created = await create(http)
    path = f"{EXECS}/{created['execution_id']}/logs/token"
    async with http.post(path, headers={"Idempotency-Key": "tok"}) as resp:
        token = await resp.json()
    assert resp.status == 200
    assert token["execution_id"] == created["execution_id"]
    assert token["token_type"] == "Bearer"
    assert token["stream_id"] == f"logs-{created['execution_id']}"
    assert ts(token["expires_at"]) - ts(created["created_at"]) == timedelta(minutes=15)
    assert token["access_token"].startswith("lrt_")
    async with http.post(path, headers={"Idempotency-Key": "tok"}) as resp:
        assert await resp.json() == token
    async with http.post(path, headers={"Idempotency-Key": "tok2"}) as resp:
        assert (await resp.json())["access_token"] != token["access_token"]


@pytest.mark.parametrize(
    ("method", "suffix"), [("POST", "/logs"), ("GET", "/logs/token"), ("GET", "/logs/x")]
)
async def test_logs_routes_refuse_other_methods(
    http: aiohttp.ClientSession, method: str, suffix: str
) -> None:
    created = await create(http)
    path = f"{EXECS}/{created['execution_id']}{suffix}"
    async with http.request(method, path, headers={"Idempotency-Key": new_key()}) as resp:
        assert resp.status == (404 if suffix == "/logs/x" else 405)


# -- output --------------------------------------------------------------------------


async def test_output_is_capped_in_utf8_bytes(clock: FakeClock) -> None:
    stdout = "héllo wörld, and more"  # 23 bytes in UTF-8
    async with (
        FakeDedalus(
            api_key=KEY, clock=clock, output_cap=9, script=Script.immediate(Outcome(stdout=stdout))
        ) as fake,
        aiohttp.ClientSession(fake.base_url, headers={"x-api-key": KEY}) as http,
    ):
        created = await create(http)
        assert created["stdout_truncated"] is True
        assert created["stderr_truncated"] is False
        _, output = await get_json(http, f"{EXECS}/{created['execution_id']}/output")
    assert output == {
        "execution_id": created["execution_id"],
        "stdout": "héllo w",  # 8 bytes: the "ö" would make 10, and is not cut in half
        "stderr": "",
        "stdout_bytes": len(stdout.encode()),
        "stderr_bytes": 0,
        "stdout_truncated": True,
        "stderr_truncated": False,
    }


# -- events --------------------------------------------------------------------------


async def test_events_follow_the_cursor_until_terminal(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake.set_script(
        Script(
            (Phase("queued", 1, 100), Phase("running", 1, 100, stdout="partial\n")),
            Outcome(stdout="rest\n", stderr="warn\n", exit_code=0),
        )
    )
    created = await create(http)
    events_path = f"{EXECS}/{created['execution_id']}/events"

    _, page = await get_json(http, events_path)
    assert [(e["type"], e.get("status")) for e in page["items"]] == [("lifecycle", "queued")]
    cursor = page["next_cursor"]
    assert cursor is not None

    # Nothing new yet: the same position comes back, so a follower keeps polling.
    _, idle = await get_json(http, f"{events_path}?cursor={cursor}")
    assert idle == {"items": [], "next_cursor": cursor}

    clock.advance(1)
    _, page = await get_json(http, f"{events_path}?cursor={cursor}")
    assert [(e["type"], e.get("chunk")) for e in page["items"]] == [
        ("lifecycle", None),
        ("stdout", "partial\n"),
    ]
    cursor = page["next_cursor"]

    clock.advance(1)
    items: list[dict[str, Any]] = []
    while cursor is not None:
        _, page = await get_json(http, f"{events_path}?cursor={cursor}&limit=1")
        items += page["items"]
        cursor = page["next_cursor"]
    assert [(e["type"], e.get("chunk"), e.get("status")) for e in items] == [
        ("stdout", "rest\n", None),
        ("stderr", "warn\n", None),
        ("lifecycle", None, "succeeded"),
    ]
    assert items[-1]["exit_code"] == 0
    assert {e["at"] for e in items} == {"2026-01-01T00:00:02.000Z"}

    _, everything = await get_json(http, events_path)
    assert [e["sequence"] for e in everything["items"]] == [1, 2, 3, 4, 5, 6]
    assert everything["next_cursor"] is None  # terminal and drained in one page


async def test_events_of_a_terminal_execution_end_with_a_null_cursor_on_the_last_page(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.set_script(Script.immediate(Outcome(stdout="x")))
    created = await create(http)
    events_path = f"{EXECS}/{created['execution_id']}/events"
    _, first = await get_json(http, f"{events_path}?limit=1")
    assert first["next_cursor"] == "c1"
    _, second = await get_json(http, f"{events_path}?cursor=c1&limit=1")
    assert second["next_cursor"] is None
    _, past = await get_json(http, f"{events_path}?cursor=c2")
    assert past == {"items": [], "next_cursor": None}
    async with http.get(f"{events_path}?cursor=c3") as resp:
        assert resp.status == 400


# -- faults --------------------------------------------------------------------------


async def test_status_fault_sends_an_api_error_with_retry_after(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fault = fake.add_fault(Fault(method="GET", status=429, headers={"Retry-After": "2"}))
    async with http.get(EXECS) as resp:
        body = await resp.json()
        assert resp.headers["Retry-After"] == "2"
    assert resp.status == 429
    assert body == {"error_code": "RATE_LIMITED", "message": "Too Many Requests", "retryable": True}
    assert fault.hits == 1
    async with http.get(EXECS) as resp:
        assert resp.status == 200  # times=1: spent


async def test_status_fault_with_a_custom_body_and_retry_after_ms(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.add_fault(
        Fault(
            status=502,
            body="<html>bad gateway</html>",
            content_type="text/html",
            headers={"retry-after-ms": "150"},
        )
    )
    async with http.post(EXECS, json={"command": ["true"]}, headers={"Idempotency-Key": "k"}) as r:
        assert r.status == 502
        assert r.content_type == "text/html"
        assert r.headers["retry-after-ms"] == "150"
        assert await r.text() == "<html>bad gateway</html>"
    assert fake.create_count == 0  # a status fault replaces the handling


async def test_faults_match_by_method_and_path_in_order(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    created = await create(http)
    events = fake.add_fault(Fault(method="GET", path=r"/events$", status=500, times=None))
    first = fake.add_fault(Fault(status=503, times=2))
    second = fake.add_fault(Fault(status=504))
    path = f"{EXECS}/{created['execution_id']}"
    statuses = []
    for _ in range(4):
        async with http.get(path) as resp:
            statuses.append(resp.status)
    assert statuses == [503, 503, 504, 200]
    for _ in range(2):
        async with http.get(path + "/events") as resp:
            assert resp.status == 500
            assert (await resp.json())["retryable"] is True
    assert (events.hits, first.hits, second.hits) == (2, 2, 1)


async def test_drop_closes_the_connection_without_processing(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.add_fault(Fault(method="POST", drop=True))
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await create(http, key="dropped")
    assert fake.create_count == 0
    assert fake.executions == {}
    # The retry with the same key is the first create the server ever processes.
    await create(http, key="dropped")
    assert fake.create_count == 1


async def test_a_dropped_get_is_retried_once_by_aiohttp_itself(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    # aiohttp re-sends an idempotent request once when the server disconnects, so a
    # single drop of a GET is invisible to the caller; two in a row are not.
    once = fake.add_fault(Fault(method="GET", drop=True))
    async with http.get(EXECS) as resp:
        assert resp.status == 200
    assert once.hits == 1
    twice = fake.add_fault(Fault(method="GET", drop=True, times=2))
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        async with http.get(EXECS):
            pass
    assert twice.hits == 2
    assert len(fake.requests_for("GET")) == 4


async def test_drop_after_commit_creates_but_never_answers(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.add_fault(Fault(method="POST", drop_after_commit=True))
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await create(http, {"command": ["true"]}, key="committed")
    assert fake.create_count == 1
    (record,) = fake.executions.values()
    replay = await create(http, {"command": ["true"]}, key="committed")
    assert replay["execution_id"] == record.execution_id
    assert fake.create_count == 1


async def test_truncate_sends_half_the_body(fake: FakeDedalus, http: aiohttp.ClientSession) -> None:
    fake.add_fault(Fault(method="POST", truncate=True))
    async with http.post(
        EXECS, json={"command": ["true"]}, headers={"Idempotency-Key": "t"}
    ) as resp:
        assert resp.status == 200
        assert resp.content_length is not None
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert fake.create_count == 1  # processed, only the reply was cut


async def test_malformed_body_is_served_raw(fake: FakeDedalus, http: aiohttp.ClientSession) -> None:
    fake.add_fault(Fault(method="GET", malformed=b'{"execution_id": '))
    async with http.get(EXECS) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.read() == b'{"execution_id": '
        with pytest.raises(json.JSONDecodeError):
            await resp.json()


async def test_delay_outlasts_a_client_timeout(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.add_fault(Fault(method="GET", delay=0.5))
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(EXECS, timeout=aiohttp.ClientTimeout(total=0.05)):
            pass
    async with http.get(EXECS) as resp:
        assert resp.status == 200


async def test_content_type_fault_relabels_a_real_response(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.add_fault(Fault(method="GET", content_type="text/html"))
    async with http.get(EXECS) as resp:
        assert resp.content_type == "text/html"
        assert json.loads(await resp.text()) == {"items": [], "next_cursor": None}


def test_contradictory_faults_are_refused() -> None:
    with pytest.raises(ValueError):
        Fault(drop=True, status=500)
    with pytest.raises(ValueError):
        Fault(drop=True, truncate=True)
    with pytest.raises(ValueError):
        Fault(body="x")
    with pytest.raises(ValueError):
        Fault(times=0)


async def test_random_faults_are_reproducible_from_the_seed() -> None:
    async def soak(seed: int) -> tuple[list[str], dict[str, int], int]:
        outcomes: list[str] = []
        async with (
            FakeDedalus(
                api_key=KEY, fault_rate=0.5, fault_seed=seed, script=Script.immediate()
            ) as fake,
            aiohttp.ClientSession(fake.base_url, headers={"x-api-key": KEY}) as http,
        ):
            for i in range(30):
                try:
                    async with http.post(
                        EXECS, json={"command": ["true"]}, headers={"Idempotency-Key": f"{i}"}
                    ) as resp:
                        outcomes.append(str(resp.status))
                except aiohttp.ServerDisconnectedError:
                    outcomes.append("dropped")
            return outcomes, dict(fake.random_fault_hits), fake.create_count

    first, second = await soak(7), await soak(7)
    assert first == second
    outcomes, hits, created = first
    assert set(outcomes) == {"200", "503", "dropped"}
    assert outcomes.count("503") == hits["status"]
    assert outcomes.count("dropped") == hits["drop"] + hits["drop_after_commit"]
    assert created == outcomes.count("200") + hits["drop_after_commit"]


# -- machines, stats, routing ------------------------------------------------------


async def test_destroyed_machine_refuses_creates_and_hides_executions(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.set_script(Script.stuck())
    created = await create(http)
    path = f"{EXECS}/{created['execution_id']}"
    fake.destroy_machine(MACHINE)
    assert fake.executions[created["execution_id"]].status == "cancelled"
    for suffix in ("", "/output", "/events"):
        status, body = await get_json(http, path + suffix)
        assert (status, body["error_code"]) == (404, "NOT_FOUND")
    status, body = await get_json(http, EXECS)
    assert (status, body["error_code"]) == (404, "NOT_FOUND")
    async with http.post(
        EXECS, json={"command": ["true"]}, headers={"Idempotency-Key": "after"}
    ) as resp:
        body = await resp.json()
    assert resp.status == 409
    assert body["error_code"] == "INVALID_STATE"
    assert body["details"] == {"machine_id": MACHINE}
    # Other machines are unaffected.
    await create(http, machine="dm-f7028f2f-4d9e-5bb2-9eb2-d53c94a07925")


async def test_peak_in_flight_counts_concurrent_requests(
    fake: FakeDedalus, http: aiohttp.ClientSession
) -> None:
    fake.add_fault(Fault(method="GET", delay=0.1, times=None))

    async def one() -> int:
        async with http.get(EXECS) as resp:
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(5))) == [200] * 5
    assert fake.peak_in_flight["GET"] == 5
    assert fake.peak_in_flight["total"] == 5
    assert fake.in_flight == {"total": 0, "GET": 0}
    fake.reset_stats()
    assert fake.peak_in_flight == {"total": 0, "GET": 0}
    assert fake.requests == []


async def test_latency_slows_every_request(clock: FakeClock) -> None:
    async with (
        FakeDedalus(api_key=KEY, clock=clock, latency=0.05) as fake,
        aiohttp.ClientSession(fake.base_url, headers={"x-api-key": KEY}) as http,
    ):

        async def one() -> None:
            async with http.get(EXECS) as resp:
                assert resp.status == 200

        await asyncio.gather(*(one() for _ in range(3)))
        assert fake.peak_in_flight["GET"] == 3


async def test_repr_never_shows_the_api_key() -> None:
    async with FakeDedalus(api_key="sekrit-123") as fake:
        text = repr(fake)
        assert "sekrit" not in text
        assert fake.base_url in text
    assert "sekrit" not in repr(fake)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 404),
        ("GET", "/v2/machines/dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1/executions", 404),
        ("GET", "/v1/machines/dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1/executions/exe-1/bogus", 404),
        (
            "GET",
            "/v1/machines/dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1/executions/exe-1/events/more/",
            404,
        ),
        ("GET", "/v1/machines/dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1/executions/exe-unknown", 404),
        ("GET", "/v1/machines/dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1%2Fb/executions", 404),
        ("PUT", "/v1/machines/dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1/executions", 405),
        (
            "POST",
            "/v1/machines/dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1/executions/exe-1/output",
            405,
        ),
    ],
)
async def test_unknown_routes_and_methods(
    http: aiohttp.ClientSession, method: str, path: str, status: int
) -> None:
    async with http.request(method, path) as resp:
        body = await resp.json()
    assert resp.status == status
    assert body["error_code"] == ("NOT_FOUND" if status == 404 else "METHOD_NOT_ALLOWED")
    assert body["retryable"] is False


async def test_percent_encoded_ids_are_decoded(fake: FakeDedalus) -> None:
    fake.set_script(Script.immediate())
    url = URL(f"{fake.base_url}/v1/machines/dm%2Dx%20y/executions", encoded=True)
    async with (
        aiohttp.ClientSession(headers={"x-api-key": KEY}) as http,
        http.post(url, json={"command": ["true"]}, headers={"Idempotency-Key": "k"}) as resp,
    ):
        created = await resp.json()
    assert created["machine_id"] == "dm-x y"
    assert fake.requests[-1].path == "/v1/machines/dm-x y/executions"
    assert fake.executions[created["execution_id"]].machine_id == "dm-x y"


async def test_make_app_serves_the_same_state(fake: FakeDedalus) -> None:
    fake.set_script(Script.immediate())
    async with (
        TestServer(fake.make_app()) as server,
        aiohttp.ClientSession(headers={"x-api-key": KEY}) as http,
        http.post(
            server.make_url(EXECS), json={"command": ["true"]}, headers={"Idempotency-Key": "k"}
        ) as resp,
    ):
        assert resp.status == 200
    assert fake.create_count == 1


# -- the runner seam -----------------------------------------------------------------


class RecordingRunner:
    """A runner that finishes executions only when told to, logging every call."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, str]] = []

    def start(self, record: ExecutionRecord) -> None:
        self.calls.append(("start", record.execution_id))
        record.transition("running", self.clock.now(), retry_after_ms=10)
        record.append_output("stdout", "started\n", self.clock.now())

    def refresh(self, record: ExecutionRecord) -> None:
        self.calls.append(("refresh", record.execution_id))

    def cancel(self, record: ExecutionRecord) -> None:
        self.calls.append(("cancel", record.execution_id))
        record.finish("cancelled", self.clock.now(), signal=15)

    async def aclose(self) -> None:
        self.calls.append(("aclose", ""))


async def test_a_custom_runner_plays_the_executions(clock: FakeClock) -> None:
    runner = RecordingRunner(clock)
    assert isinstance(runner, Runner)
    async with (
        FakeDedalus(api_key=KEY, clock=clock, runner=runner) as fake,
        aiohttp.ClientSession(fake.base_url, headers={"x-api-key": KEY}) as http,
    ):
        created = await create(http)
        eid = created["execution_id"]
        assert (created["status"], created["stdout_bytes"]) == ("running", 8)
        assert (await delete(http, f"{EXECS}/{eid}"))[1]["signal"] == 15
        with pytest.raises(TypeError):
            fake.set_script(Script.immediate())
    assert runner.calls == [("start", eid), ("refresh", eid), ("cancel", eid), ("aclose", "")]


async def test_a_failing_runner_is_a_500_and_creates_nothing(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(body: dict[str, Any]) -> Script:
        raise RuntimeError("no script for you")

    async with (
        FakeDedalus(api_key=KEY, clock=clock, script=broken) as fake,
        aiohttp.ClientSession(fake.base_url, headers={"x-api-key": KEY}) as http,
    ):
        async with http.post(
            EXECS, json={"command": ["true"]}, headers={"Idempotency-Key": "k"}
        ) as resp:
            assert resp.status == 500
            assert (await resp.json())["error_code"] == "INTERNAL"
        assert fake.create_count == 0
        assert fake.executions == {}
        assert [type(e) for e in fake.errors] == [RuntimeError]
    assert "FakeDedalus handler failed" in caplog.text


def test_runner_and_script_are_alternatives(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        FakeDedalus(runner=ScriptedRunner(clock), script=Script.immediate())


async def test_get_record_brings_the_record_up_to_date(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    created = await create(http)
    clock.advance(1)
    assert fake.executions[created["execution_id"]].status == "wake_in_progress"  # lazy
    record = fake.get_record(created["execution_id"])
    assert record.status == "succeeded"
    assert record.stdout == "hi\n"


# --- the benchmark styles: newest-first lists, time-remaining hints ---------------------


async def test_list_newest_first_pages_by_offset(clock: FakeClock) -> None:
    """``list_order="newest"``: the newest execution first, cursors are offsets into that
    order (so one created meanwhile shifts the rest by one), deleted ones are skipped."""
    async with (
        FakeDedalus(api_key=KEY, clock=clock, list_order="newest") as fake,
        aiohttp.ClientSession(fake.base_url, headers={"x-api-key": KEY}) as http,
    ):
        fake.set_script(Script.immediate())
        ids = [(await create(http))["execution_id"] for _ in range(5)]
        await create(http, machine="dm-7f5bf56c-8390-58ff-a89a-cd813a7323a7")
        _, page = await get_json(http, EXECS + "?limit=2")
        assert [i["execution_id"] for i in page["items"]] == [ids[4], ids[3]]
        _, page = await get_json(http, EXECS + f"?limit=2&cursor={page['next_cursor']}")
        assert [i["execution_id"] for i in page["items"]] == [ids[2], ids[1]]
        newer = (await create(http))["execution_id"]
        assert (await delete(http, f"{EXECS}/{ids[0]}"))[0] == 200
        _, page = await get_json(http, EXECS + f"?limit=2&cursor={page['next_cursor']}")
        # offset 4 of [newer, 4, 3, 2, 1, (0 deleted)]: the creation shifted ids[1] down
        assert [i["execution_id"] for i in page["items"]] == [ids[1]]
        assert page["next_cursor"] is None
        _, whole = await get_json(http, EXECS + "?limit=100")
        assert [i["execution_id"] for i in whole["items"]] == [newer, *ids[4:0:-1]]


def test_list_order_and_hint_style_are_checked() -> None:
    with pytest.raises(ValueError, match="list_order"):
        FakeDedalus(list_order="random")
    with pytest.raises(ValueError, match="hints"):
        Script((Phase("running", 1.0, 100),), hints="sometimes")


@pytest.mark.parametrize("hints", ["phase", "remaining"])
async def test_hints_are_the_whole_phase_or_the_time_left_in_it(
    fake: FakeDedalus, http: aiohttp.ClientSession, clock: FakeClock, hints: str
) -> None:
    """``Script(hints="remaining")``: the hint is the time left in the current phase
    (rounded up); by default it is the phase's own ``retry_after_ms``. No hint in a phase
    without one, none once terminal."""
    phases = (Phase("queued", 0.2, 200), Phase("running", 0.3, 300), Phase("running", 0.1))
    fake.set_script(Script(phases, hints=hints))
    execution_id = (await create(http))["execution_id"]
    seen = []
    for step in (0.0, 0.05, 0.1004, 0.05, 0.35, 0.1):  # at 0, 50, 150.4, 200.4, 550.4, 650.4 ms
        clock.advance(step)
        _, data = await get_json(http, f"{EXECS}/{execution_id}")
        seen.append((data["status"], data.get("retry_after_ms")))
    if hints == "phase":
        hinted = [200, 200, 200, 300, None, None]
    else:
        hinted = [200, 150, 50, 300, None, None]
    assert seen == [
        (status, hint)
        for status, hint in zip(
            ["queued", "queued", "queued", "running", "running", "succeeded"], hinted, strict=True
        )
    ]
