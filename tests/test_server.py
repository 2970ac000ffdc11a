"""The production server, without the test kit: the API's rules in ``_server``, served over
real loopback HTTP by ``_local.HTTPServer``, with a runner written here.

Nothing in this module imports :mod:`dedalus_async.testing`: what the fake server and the
local backend share must work on its own. (``tests/test_fake_server.py`` pins every rule
in detail through the fake.)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from dedalus_async._clock import SystemClock
from dedalus_async._http_server import HTTPServer
from dedalus_async._records import ExecutionRecord, Runner, to_millis
from dedalus_async._server import APIRequest, APIResponse, ExecutionsServer

KEY = "server-key"
MACHINE = "dm-0b9e1c55-6a43-5f0e-9b7e-3c1d2a4f5e60"
EXECS = f"/v1/machines/{MACHINE}/executions"


class EchoRunner:
    """Runs nothing: each execution prints its command and succeeds at once."""

    def __init__(self) -> None:
        self.clock = SystemClock()
        self.closed = 0

    def start(self, record: ExecutionRecord) -> None:
        now = to_millis(self.clock.now())
        record.transition("running", now)
        record.append_output("stdout", " ".join(record.command) + "\n", now)
        record.finish("succeeded", now, exit_code=0)

    def refresh(self, record: ExecutionRecord) -> None:
        pass

    def cancel(self, record: ExecutionRecord) -> None:  # never called: all are terminal
        raise AssertionError("nothing to cancel")

    async def aclose(self) -> None:
        self.closed += 1


class BrokenRunner(EchoRunner):
    def start(self, record: ExecutionRecord) -> None:
        raise RuntimeError("cannot start")


@pytest.fixture
async def served() -> AsyncIterator[HTTPServer]:
    server = ExecutionsServer(api_key=KEY, runner=EchoRunner(), page_size=2)
    http = HTTPServer(server)
    await http.start()
    try:
        yield http
    finally:
        await http.close()
    assert server.errors == []


async def _call(
    http: aiohttp.ClientSession, method: str, path: str, key: str | None = None, **kw: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    async with http.request(method, path, headers=headers, **kw) as resp:
        return resp.status, await resp.json(content_type=None), resp


async def test_the_production_server_serves_the_api_over_loopback(served: HTTPServer) -> None:
    """Auth, create with replay, reads, paged events, the list, delete: over real HTTP."""
    assert isinstance(served.server.runner, Runner)
    async with aiohttp.ClientSession(served.base_url) as anonymous:
        status, body, resp = await _call(anonymous, "GET", EXECS)
    assert (status, body["error_code"]) == (401, "AUTH_REQUIRED")
    assert resp.headers["x-request-id"].startswith("req-")

    async with aiohttp.ClientSession(served.base_url, headers={"x-api-key": KEY}) as http:
        status, created, resp = await _call(http, "POST", EXECS, "k1", json={"command": ["hi"]})
        assert (status, created["status"], created["exit_code"]) == (200, "succeeded", 0)
        assert created["creation_request_id"] == resp.headers["x-request-id"]
        eid = created["execution_id"]

        # the same key and body: the same execution, nothing new created
        status, again, _ = await _call(http, "POST", EXECS, "k1", json={"command": ["hi"]})
        assert (status, again["execution_id"], served.server.create_count) == (200, eid, 1)
        status, reused, _ = await _call(http, "POST", EXECS, "k1", json={"command": ["ho"]})
        assert (status, reused["error_code"]) == (400, "IDEMPOTENCY_KEY_REUSED")

        status, output, _ = await _call(http, "GET", f"{EXECS}/{eid}/output")
        assert (status, output["stdout"]) == (200, "hi\n")
        events: list[str] = []
        cursor: str | None = ""
        while cursor is not None:  # page_size=2: the log of 3 events takes two pages
            _, page, _ = await _call(http, "GET", f"{EXECS}/{eid}/events?cursor={cursor}")
            events += [e.get("status") or e["chunk"] for e in page["items"]]
            cursor = page["next_cursor"]
        assert events == ["running", "hi\n", "succeeded"]

        status, listed, _ = await _call(http, "GET", EXECS)
        assert [item["execution_id"] for item in listed["items"]] == [eid]
        status, token, _ = await _call(http, "POST", f"{EXECS}/{eid}/logs/token", "k2")
        assert token["base_url"] == f"{served.base_url}/_logs"

        status, refused, resp = await _call(http, "PUT", EXECS)
        assert (status, refused["error_code"], resp.headers["Allow"]) == (
            405,
            "METHOD_NOT_ALLOWED",
            "GET, POST",
        )

        # delete a terminal execution: it is forgotten
        status, deleted, _ = await _call(http, "DELETE", f"{EXECS}/{eid}", "k3")
        assert (status, deleted["execution_id"]) == (200, eid)
        status, gone, _ = await _call(http, "GET", f"{EXECS}/{eid}")
        assert (status, gone["error_code"]) == (404, "NOT_FOUND")


def _request(server: ExecutionsServer, method: str, path: str, **kw: Any) -> APIRequest:
    return APIRequest(method=method, raw_path=path, request_id=server.next_request_id(), **kw)


def test_the_rules_answer_without_a_network() -> None:
    """``handle`` is a function of the request: header names in any case, the first of a
    repeated header wins, the body is parsed once."""
    server = ExecutionsServer(api_key=KEY, runner=EchoRunner())
    headers = CIMultiDict([("X-Api-Key", KEY), ("x-api-key", "wrong"), ("IDEMPOTENCY-KEY", "k")])
    request = _request(server, "POST", EXECS, headers=headers, body=b'{"command": ["a", "b"]}')
    assert request.headers == {"x-api-key": KEY, "idempotency-key": "k"}
    assert request.json == {"command": ["a", "b"]}
    assert request.path == EXECS
    response = server.handle(request)
    assert isinstance(response, APIResponse)
    assert (response.status, response.content_type) == (200, "application/json")
    assert response.headers["x-request-id"] == request.request_id
    execution = response.json()
    assert server.get_record(execution["execution_id"]).stdout == "a b\n"

    bad = _request(server, "GET", EXECS, headers={"x-api-key": KEY}, query={"limit": "0"})
    problem = server.handle(bad)
    assert (problem.status, problem.content_type) == (422, "application/problem+json")
    assert problem.json()["detail"].startswith("limit:")
    assert KEY not in repr(server)


def test_a_runner_that_raises_is_a_500_and_leaves_nothing_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing runner: 500 INTERNAL (retryable), logged, kept in ``errors``; no record."""
    server = ExecutionsServer(api_key=KEY, runner=BrokenRunner())
    headers = {"x-api-key": KEY, "idempotency-key": "k"}
    with caplog.at_level(logging.ERROR):
        response = server.handle(
            _request(server, "POST", EXECS, headers=headers, body=b'{"command": ["x"]}')
        )
    assert response.status == 500
    assert response.json()["error_code"] == "INTERNAL"
    assert response.json()["retryable"] is True
    assert [type(e) for e in server.errors] == [RuntimeError]
    assert (server.executions, server.create_count) == ({}, 0)
    assert "ExecutionsServer handler failed" in caplog.text


async def test_http_server_lifecycle_is_checked() -> None:
    """Not started, started twice, closed: each is a clear RuntimeError; close closes the
    runner once, however often it is called."""
    runner = EchoRunner()
    http = HTTPServer(ExecutionsServer(api_key=KEY, runner=runner, name="Mine"))
    with pytest.raises(RuntimeError, match="Mine is not started"):
        _ = http.base_url
    await http.start()
    assert "Mine" in repr(http)
    with pytest.raises(RuntimeError, match="already started"):
        await http.start()
    await http.close()
    await http.close()
    assert runner.closed == 1
    with pytest.raises(RuntimeError, match="Mine is closed"):
        await http.start()


def test_page_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="page_size"):
        ExecutionsServer(api_key=KEY, runner=EchoRunner(), page_size=5, max_page_size=4)


async def test_a_port_in_use_fails_start_and_leaves_nothing_open() -> None:
    """Binding a taken port raises; the server was never started and closes cleanly."""
    first = HTTPServer(ExecutionsServer(api_key=KEY, runner=EchoRunner()))
    await first.start()
    try:
        port = int(first.base_url.rsplit(":", 1)[1])
        runner = EchoRunner()
        second = HTTPServer(ExecutionsServer(api_key=KEY, runner=runner), port=port)
        with pytest.raises(OSError):
            await second.start()
        with pytest.raises(RuntimeError, match="not started"):
            _ = second.base_url
        await second.close()
        assert runner.closed == 1
    finally:
        await first.close()
