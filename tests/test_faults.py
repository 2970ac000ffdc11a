"""Fault injection over real loopback HTTP: every fault, against every kind of operation.

Each test drives a real operation (``create_execution``, ``wait``, ``run``, ``run_many``)
against :class:`FakeDedalus` while the fake misbehaves, and checks three things: the
operation ends with the right result or the right typed error within its deadline; the
fake created exactly one execution per logical create; and nothing is left behind (no
task, no connection checked out of the pool, no ResourceWarning).

Time is the shared :class:`FakeClock` except where real time is the point (a server
slower than ``request_timeout``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dedalus_async import (
    APIStatusError,
    ExecutionFailed,
    ExecutionRequest,
    ExecutionResult,
    NotFoundError,
    PollPolicy,
    RateLimitedError,
    RequestTimeout,
    ResponseDecodeError,
    RetryPolicy,
    ServerError,
    Session,
    WaitTimeout,
)
from dedalus_async._transport import AiohttpTransport
from dedalus_async.testing import FakeClock, FakeDedalus, Fault, Outcome, Phase, Script

from .conftest import API_KEY

MACHINE = "dm-e209e296-6cc2-5f4e-bf75-a5b1e5768ac0"  # the real form: "dm-" and a UUID

TIMEOUT = 120.0  # the deadline of every wait below, in (fake) seconds
JITTER = 0.5 * PollPolicy().hint_jitter  # random=0.5 in the session fixture
BACKOFF_1 = 0.5 * RetryPolicy().initial_backoff  # the first retry's full-jitter backoff


# --- leak checks ---------------------------------------------------------------------


def client_tasks() -> set[asyncio.Task[Any]]:
    """Running tasks, minus the in-process fake server's own connection handlers."""
    return {
        task
        for task in asyncio.all_tasks()
        if not task.get_coro().__qualname__.startswith("RequestHandler.")  # type: ignore[union-attr]
    }


def pool_in_use(session: Session) -> int:
    """Connections the Session's aiohttp pool has handed out and not got back."""
    transport = session._transport
    assert isinstance(transport, AiohttpTransport)
    http = transport._session
    assert http is not None, "the Session is not open"
    connector = http.connector
    assert connector is not None
    # aiohttp has no public counter; _acquired is the set its own `limit` is enforced with
    return len(connector._acquired)


class Leaks:
    """Snapshot the client's tasks now; :meth:`check` asserts nothing was added since."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.tasks = client_tasks()

    async def check(self) -> None:
        for _ in range(3):  # let tasks that just finished be reaped
            await asyncio.sleep(0)
        leftover = client_tasks() - self.tasks
        assert not leftover, f"tasks left running: {leftover}"
        assert pool_in_use(self.session) == 0, "a connection was never released"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
        resource = [w for w in caught if issubclass(w.category, ResourceWarning)]
        assert not resource, [str(w.message) for w in resource]


def assert_one_execution_per_create(fake: FakeDedalus, ids: list[str], logical: int) -> None:
    """The fake created exactly ``logical`` executions, each under its own key, and the
    client got back exactly those (distinct) ids."""
    assert fake.create_count == logical
    assert len(ids) == logical
    assert len(set(ids)) == logical
    assert set(ids) == set(fake.executions)
    keys = Counter(record.idempotency_key for record in fake.executions.values())
    assert all(count == 1 for count in keys.values()), keys
    sent = {r.idempotency_key for r in fake.requests_for("POST")}
    assert sent == set(keys)


# --- the operations, each run under a fault -------------------------------------------

Operation = Callable[[Session, FakeDedalus, dict[str, Any]], Awaitable[list[str]]]


async def op_create(session: Session, fake: FakeDedalus, fault: dict[str, Any]) -> list[str]:
    """create_execution with the fault on its POST."""
    fake.add_fault(Fault(method="POST", **fault))
    handle = await session.create_execution(MACHINE, ["echo", "hi"])
    assert handle.last is not None
    assert handle.last.execution_id == handle.execution_id
    assert handle.last.command == ("echo", "hi")
    return [handle.execution_id]


async def op_wait(session: Session, fake: FakeDedalus, fault: dict[str, Any]) -> list[str]:
    """wait() with the fault on its polls."""
    handle = await session.create_execution(MACHINE, ["echo", "hi"])
    fake.add_fault(Fault(method="GET", **fault))
    done = await handle.wait(timeout=TIMEOUT)
    assert done.status == "succeeded"
    assert done.exit_code == 0
    return [handle.execution_id]


async def op_run(session: Session, fake: FakeDedalus, fault: dict[str, Any]) -> list[str]:
    """run() with the fault on whatever requests come first (the create, then polls)."""
    fake.add_fault(Fault(**fault))
    result = await session.run(MACHINE, ["echo", "hi"], timeout=TIMEOUT, check=True)
    assert result.stdout == "hi\n"
    return [result.execution.execution_id]


async def op_run_many(session: Session, fake: FakeDedalus, fault: dict[str, Any]) -> list[str]:
    """run_many() of six requests on two machines, the fault on the first requests."""
    fake.add_fault(Fault(**fault))
    requests = [
        ExecutionRequest(
            machine_id=f"dm-7586c7cd-886a-5a0d-8099-{i % 2:012x}",
            command=["echo", f"n{i}"],
            timeout=TIMEOUT,
        )
        for i in range(6)
    ]
    results = await session.run_many(requests, check=True)
    assert [r.stdout for r in results] == [f"n{i}\n" for i in range(6)]
    return [r.execution.execution_id for r in results]


OPERATIONS: dict[str, tuple[Operation, int]] = {
    "create": (op_create, 1),
    "wait": (op_wait, 1),
    "run": (op_run, 1),
    "run_many": (op_run_many, 6),
}

MISSING_STATUS = {
    "execution_id": "exe-garbled",
    "machine_id": MACHINE,
    "command": ["echo", "hi"],
    "created_at": "2026-01-01T00:00:00Z",
}
PAST_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
OVERFLOWING_DATE = "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"

# Faults a client must ride out: the operation completes as if nothing happened.
TRANSIENT: list[Any] = [
    pytest.param({"drop_after_commit": True}, id="response-lost-after-commit"),
    pytest.param({"drop": True, "times": 2}, id="connection-dropped"),
    pytest.param({"status": 500, "times": 3}, id="500-burst"),
    pytest.param({"status": 502, "times": 3}, id="502-burst"),
    pytest.param({"status": 503, "times": 3}, id="503-burst"),
    pytest.param({"status": 500, "body": b"", "times": 2}, id="500-empty-body"),
    pytest.param(
        {
            "status": 502,
            "body": "<html><h1>502 Bad Gateway</h1></html>",
            "content_type": "text/html",
        },
        id="502-html-page",
    ),
    pytest.param({"status": 429, "times": 3}, id="429-storm-bare"),
    pytest.param(
        {"status": 429, "headers": {"Retry-After": "1.5"}, "times": 3}, id="429-retry-after"
    ),
    pytest.param(
        {"status": 429, "headers": {"retry-after-ms": "250"}, "times": 3}, id="429-retry-after-ms"
    ),
    pytest.param(
        {"status": 429, "headers": {"retry-after-ms": "-500"}, "times": 2}, id="429-negative-ms"
    ),
    pytest.param(
        {"status": 429, "headers": {"Retry-After": PAST_DATE}, "times": 2}, id="429-date-in-past"
    ),
    pytest.param(
        {"status": 429, "headers": {"Retry-After": "soon, promise"}, "times": 2},
        id="429-retry-after-garbage",
    ),
    pytest.param(
        {"status": 503, "headers": {"Retry-After": OVERFLOWING_DATE}},
        id="503-retry-after-overflowing-date",
    ),
    pytest.param({"status": 408, "times": 2}, id="408"),
    pytest.param({"status": 425, "times": 2}, id="425-retryable-by-body"),
    pytest.param({"status": 599, "times": 2}, id="599-unknown-5xx"),
    pytest.param({"truncate": True}, id="body-cut-in-half"),
    pytest.param({"malformed": b'{"execution_id": "exe-', "times": 2}, id="invalid-json"),
    pytest.param({"malformed": json.dumps(MISSING_STATUS).encode()}, id="missing-field"),
    pytest.param({"content_type": "text/plain", "times": 3}, id="wrong-content-type"),
]


@pytest.mark.parametrize("fault", TRANSIENT)
@pytest.mark.parametrize("operation", list(OPERATIONS))
async def test_transient_fault_is_ridden_out(
    session: Session, fake: FakeDedalus, clock: FakeClock, operation: str, fault: dict[str, Any]
) -> None:
    """Under a transient fault every operation completes, in time, once, leaving nothing."""
    op, logical = OPERATIONS[operation]
    leaks = Leaks(session)
    start = clock.monotonic()
    ids = await op(session, fake, fault)
    assert clock.monotonic() - start <= TIMEOUT
    assert any(f.hits for f in fake.faults), "the fault never fired: the test proves nothing"
    assert_one_execution_per_create(fake, ids, logical)
    await leaks.check()


# --- Retry-After: what each form means, exactly --------------------------------------

# the shortest pause (R3a of _policy) with the session fixture's random=0.5
FLOOR = RetryPolicy().min_pause * 1.5


@pytest.mark.parametrize(
    ("headers", "slept"),
    [
        pytest.param({"Retry-After": "1.5"}, 1.5, id="seconds"),
        pytest.param({"retry-after-ms": "250"}, 0.25, id="milliseconds"),
        pytest.param({"Retry-After": "Thu, 01 Jan 2026 00:00:30 GMT"}, 30.0, id="date-ahead"),
        # "now" still waits the floor (R3a): no server answer makes a busy loop
        pytest.param({"Retry-After": PAST_DATE}, FLOOR, id="date-in-past-means-the-floor"),
        pytest.param({"Retry-After": "-3"}, FLOOR, id="negative-seconds-means-the-floor"),
        pytest.param({"retry-after-ms": "0"}, FLOOR, id="zero-ms-means-the-floor"),
        pytest.param({"retry-after-ms": "-100"}, FLOOR, id="negative-ms-means-the-floor"),
        pytest.param({}, BACKOFF_1, id="absent-means-backoff"),
        pytest.param({"Retry-After": "soon"}, BACKOFF_1, id="garbage-means-backoff"),
        pytest.param({"Retry-After": "nan"}, BACKOFF_1, id="nan-means-backoff"),
        pytest.param(
            {"Retry-After": "Thu, 01 Jan 2026 00:00:30 -0000"}, BACKOFF_1, id="zoneless-date"
        ),
        pytest.param({"retry-after-ms": "inf", "Retry-After": "2"}, 2.0, id="bad-ms-falls-back"),
        pytest.param({"Retry-After": OVERFLOWING_DATE}, BACKOFF_1, id="overflowing-date-backoff"),
    ],
)
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_forms(
    session: Session,
    fake: FakeDedalus,
    clock: FakeClock,
    status: int,
    headers: dict[str, str],
    slept: float,
) -> None:
    """Each Retry-After form gives one exact pause before the second try, then success."""
    fake.set_script(Script.immediate())
    handle = await session.create_execution(MACHINE, ["true"])
    fake.add_fault(Fault(method="GET", status=status, headers=headers))
    leaks = Leaks(session)
    got = await handle.refresh()
    assert got.status == "succeeded"
    assert clock.sleeps == [pytest.approx(slept)]
    assert len(fake.requests_for("GET")) == 2
    await leaks.check()


HUGE_PAUSES = [
    pytest.param({"Retry-After": "3600"}, 3600.0, id="an-hour"),
    pytest.param({"retry-after-ms": "3600000"}, 3600.0, id="an-hour-in-ms"),
    pytest.param({"Retry-After": "Thu, 01 Jan 2026 02:00:00 GMT"}, 7200.0, id="date-2h-ahead"),
]


@pytest.mark.parametrize(("headers", "pause"), HUGE_PAUSES)
@pytest.mark.parametrize("operation", ["create", "wait", "run", "run_many"])
async def test_retry_after_beyond_the_cap_fails_at_once(
    session: Session,
    fake: FakeDedalus,
    clock: FakeClock,
    operation: str,
    headers: dict[str, str],
    pause: float,
) -> None:
    """A 429 asking for longer than max_retry_after is RateLimitedError at once, carrying the
    pause; nothing is slept, and a create is never duplicated by it."""
    leaks = Leaks(session)
    fault = Fault(status=429, headers=headers, method="GET" if operation == "wait" else None)
    error: BaseException
    if operation == "create":
        fake.add_fault(fault)
        with pytest.raises(RateLimitedError) as info:
            await session.create_execution(MACHINE, ["true"])
        error = info.value
        assert fake.create_count == 0
    elif operation == "wait":
        handle = await session.create_execution(MACHINE, ["true"])
        fake.add_fault(fault)
        with pytest.raises(RateLimitedError) as info:
            await handle.wait(timeout=TIMEOUT)
        error = info.value
        assert fake.create_count == 1
    elif operation == "run":
        fake.add_fault(fault)
        with pytest.raises(RateLimitedError) as info:
            await session.run(MACHINE, ["true"], timeout=TIMEOUT)
        error = info.value
        assert fake.create_count == 0
    else:
        fake.add_fault(fault)
        request = ExecutionRequest(machine_id=MACHINE, command=["true"], timeout=TIMEOUT)
        (outcome,) = await session.run_many([request], return_exceptions=True)
        assert isinstance(outcome, RateLimitedError)
        error = outcome
        assert fake.create_count == 0
    assert isinstance(error, RateLimitedError)
    # measured from when the 429 arrived (a wait first slept one poll interval)
    assert error.retry_after == pytest.approx(pause, abs=0.25)
    # no retry sleep at all (a wait only slept its first poll interval, before the 429)
    assert clock.sleeps == ([pytest.approx(0.2 + JITTER)] if operation == "wait" else [])
    assert len(fake.requests) == (2 if operation == "wait" else 1)
    await leaks.check()


# --- failures that retries cannot fix: the right typed error --------------------------


@pytest.mark.parametrize("operation", ["create", "run", "run_many"])
async def test_permanent_5xx_exhausts_retries_and_creates_nothing(
    session: Session, fake: FakeDedalus, clock: FakeClock, operation: str
) -> None:
    """A create that always gets 503 ends in ServerError after max_attempts tries, all under
    one Idempotency-Key, and the fake created nothing."""
    fake.add_fault(Fault(method="POST", status=503, times=None))
    leaks = Leaks(session)
    error: BaseException | ExecutionResult
    if operation == "create":
        with pytest.raises(ServerError) as info:
            await session.create_execution(MACHINE, ["true"])
        error = info.value
    elif operation == "run":
        with pytest.raises(ServerError) as info:
            await session.run(MACHINE, ["true"], timeout=TIMEOUT)
        error = info.value
    else:
        request = ExecutionRequest(machine_id=MACHINE, command=["true"], timeout=TIMEOUT)
        (error,) = await session.run_many([request], return_exceptions=True)
    assert isinstance(error, ServerError)
    assert error.status == 503
    posts = fake.requests_for("POST")
    assert len(posts) == session.retry.max_attempts
    assert len({p.idempotency_key for p in posts}) == 1
    assert fake.create_count == 0
    assert clock.slept <= session.retry.budget
    await leaks.check()


@pytest.mark.parametrize("operation", ["wait", "run", "run_many", "run_many-batched"])
async def test_storm_outlasting_the_deadline_is_wait_timeout(
    session: Session, fake: FakeDedalus, clock: FakeClock, operation: str
) -> None:
    """Polls that fail until past the deadline end in WaitTimeout caused by the last error,
    on time, never a private or untyped exception."""
    fake.set_script(Script.stuck(retry_after_ms=1000))
    leaks = Leaks(session)
    start = clock.monotonic()
    error: BaseException | ExecutionResult
    if operation == "wait":
        handle = await session.create_execution(MACHINE, ["x"])
        fake.add_fault(Fault(method="GET", status=503, times=None))
        with pytest.raises(WaitTimeout) as info:
            await handle.wait(timeout=10)
        error = info.value
    elif operation == "run":
        fake.add_fault(Fault(method="GET", status=503, times=None))
        with pytest.raises(WaitTimeout) as info:
            await session.run(MACHINE, ["x"], timeout=10)
        error = info.value
    else:
        # five waiters on one machine are read a page of list_executions at a time
        count = 5 if operation == "run_many-batched" else 1
        fake.add_fault(Fault(method="GET", status=503, times=None))
        requests = [
            ExecutionRequest(
                machine_id=MACHINE,
                command=["x", str(i)],
                timeout=10,
            )
            for i in range(count)
        ]
        outcomes = await session.run_many(requests, return_exceptions=True)
        assert len(outcomes) == count
        assert all(type(o) is type(outcomes[0]) for o in outcomes), outcomes
        error = outcomes[0]
    assert isinstance(error, WaitTimeout), f"got {type(error).__mro__}"
    assert isinstance(error.__cause__, ServerError)
    assert error.timeout == 10
    if operation != "run_many-batched":  # concurrent waiters share (and advance) one clock
        assert clock.monotonic() - start <= 10.0 + 1e-9
    assert fake.create_count == (5 if operation == "run_many-batched" else 1)
    await leaks.check()


@pytest.mark.parametrize("status", [402, 418, 451, 499])
@pytest.mark.parametrize("operation", ["create", "run", "run_many"])
async def test_unknown_error_status_is_a_plain_api_status_error(
    session: Session, fake: FakeDedalus, operation: str, status: int
) -> None:
    """An error status the API never documented is APIStatusError itself, sent once."""
    fake.add_fault(Fault(method="POST", status=status, times=None))
    leaks = Leaks(session)
    error: BaseException | ExecutionResult
    if operation == "create":
        with pytest.raises(APIStatusError) as info:
            await session.create_execution(MACHINE, ["true"])
        error = info.value
    elif operation == "run":
        with pytest.raises(APIStatusError) as info:
            await session.run(MACHINE, ["true"])
        error = info.value
    else:
        request = ExecutionRequest(machine_id=MACHINE, command=["true"])
        (error,) = await session.run_many([request], return_exceptions=True)
    assert type(error) is APIStatusError
    assert error.status == status
    assert error.retryable is False
    assert len(fake.requests) == 1
    assert fake.create_count == 0
    await leaks.check()


async def test_permanent_html_error_page_is_server_error_with_context(
    session: Session, fake: FakeDedalus
) -> None:
    """A proxy's HTML 502 page that never goes away: ServerError naming the content type,
    with the page in .body, after the retries."""
    page = "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1>nginx</body></html>"
    fake.add_fault(
        Fault(method="POST", status=502, body=page, content_type="text/html", times=None)
    )
    leaks = Leaks(session)
    with pytest.raises(ServerError) as info:
        await session.run(MACHINE, ["true"])
    err = info.value
    assert err.status == 502
    assert "text/html" in str(err)
    assert err.body == page
    assert err.request_id is not None
    assert len(fake.requests_for("POST")) == session.retry.max_attempts
    assert fake.create_count == 0
    await leaks.check()


def _execution(**changes: Any) -> bytes:
    base: dict[str, Any] = {
        "execution_id": "exe-bad",
        "machine_id": MACHINE,
        "command": ["echo", "hi"],
        "created_at": "2026-01-01T00:00:00Z",
        "status": "running",
    }
    base.update(changes)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


MISTYPED = [
    pytest.param(_execution(status=...), "status", id="status-missing"),
    pytest.param(_execution(status=None), "status", id="status-null"),
    pytest.param(_execution(created_at=5), "created_at", id="created_at-number"),
    pytest.param(_execution(created_at="yesterday"), "created_at", id="created_at-garbage"),
    pytest.param(_execution(command="echo hi"), "command", id="command-string"),
    pytest.param(_execution(exit_code="0"), "exit_code", id="exit_code-string"),
    pytest.param(_execution(exit_code=True), "exit_code", id="exit_code-bool"),
    pytest.param(_execution(stdout_truncated="no"), "stdout_truncated", id="flag-string"),
    pytest.param(_execution(execution_id=7), "execution_id", id="execution_id-number"),
    pytest.param(_execution(retry_after_ms=1.5), "retry_after_ms", id="hint-float"),
    pytest.param(_execution(artifacts=[{"name": "a"}]), "artifacts", id="artifact-incomplete"),
]


@pytest.mark.parametrize(("body", "field"), MISTYPED)
async def test_mistyped_create_response_is_decode_error_and_creates_once(
    session: Session, fake: FakeDedalus, body: bytes, field: str
) -> None:
    """A create whose every response is mistyped: ResponseDecodeError naming the field; the
    server created exactly one execution, which a re-send under the same key finds."""
    fake.add_fault(Fault(method="POST", malformed=body, times=None))
    leaks = Leaks(session)
    with pytest.raises(ResponseDecodeError) as info:
        await session.create_execution(MACHINE, ["echo", "hi"], idempotency_key="job-1")
    assert info.value.field is not None
    assert field in info.value.field
    assert info.value.status is None or info.value.status == 200
    assert fake.create_count == 1
    fake.clear_faults()
    again = await session.create_execution(MACHINE, ["echo", "hi"], idempotency_key="job-1")
    assert fake.create_count == 1
    assert list(fake.executions) == [again.execution_id]
    await leaks.check()


@pytest.mark.parametrize(("body", "field"), MISTYPED[:4])
async def test_mistyped_polls_end_in_wait_timeout_from_the_decode_error(
    session: Session, fake: FakeDedalus, clock: FakeClock, body: bytes, field: str
) -> None:
    """Polls that only ever get garbage end at the deadline as WaitTimeout whose cause is
    the ResponseDecodeError (a wait treats a garbled response as transient)."""
    handle = await session.create_execution(MACHINE, ["echo", "hi"])
    fake.add_fault(Fault(method="GET", malformed=body, times=None))
    leaks = Leaks(session)
    with pytest.raises(WaitTimeout) as info:
        await handle.wait(timeout=20)
    assert isinstance(info.value.__cause__, ResponseDecodeError)
    assert clock.slept <= 20.0 + 1e-9
    assert fake.create_count == 1
    await leaks.check()


# --- what executions report: hints, expiry, unknown statuses, big output ---------------


@pytest.mark.parametrize(
    ("hint", "first_sleep"),
    [
        pytest.param(-5, PollPolicy().hint_floor, id="negative"),
        pytest.param(0, PollPolicy().hint_floor, id="zero"),
        pytest.param(10**15, PollPolicy().hint_ceiling, id="huge"),
        pytest.param(2**63 - 1, PollPolicy().hint_ceiling, id="int64-max"),
    ],
)
async def test_retry_after_ms_hint_is_clamped(
    session: Session, fake: FakeDedalus, clock: FakeClock, hint: int, first_sleep: float
) -> None:
    """A negative, zero or huge retry_after_ms is clamped into [hint_floor, hint_ceiling];
    the run still finishes with its output, before its deadline."""
    fake.set_script(Script((Phase("running", 1.0, hint),), Outcome(stdout="done\n")))
    leaks = Leaks(session)
    result = await session.run(MACHINE, ["job"], timeout=TIMEOUT)
    assert result.stdout == "done\n"
    assert clock.sleeps[0] == pytest.approx(first_sleep + JITTER)
    assert all(
        PollPolicy().hint_floor <= s <= PollPolicy().hint_ceiling + 0.01 for s in clock.sleeps
    )
    assert clock.slept <= TIMEOUT
    await leaks.check()


async def test_huge_hint_never_sleeps_past_the_deadline(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """A huge retry_after_ms with a 10 s deadline: one sleep of exactly 10 s, WaitTimeout."""
    fake.set_script(Script.stuck(retry_after_ms=10**15))
    leaks = Leaks(session)
    with pytest.raises(WaitTimeout):
        await session.run(MACHINE, ["job"], timeout=10)
    assert clock.sleeps == [pytest.approx(10.0)]
    await leaks.check()


async def test_expires_at_in_the_past_looks_again_soon_then_reports_expired(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """A snapshot still 'running' although its expires_at has passed: the wait looks again
    after expiry_grace (not after the 5 s hint) and sees 'expired'; run(check=True) raises
    an expired execution as ExecutionFailed."""
    fake.set_script(Script.stuck(retry_after_ms=5000, expires_after=1.0))
    leaks = Leaks(session)
    handle = await session.create_execution(MACHINE, ["job"])
    assert handle.last is not None
    assert handle.last.status == "running"
    assert handle.last.expires_at is not None
    clock.advance(2.0)  # the snapshot in hand now says running, expires_at 1 s ago
    clock_before = clock.monotonic()
    done = await handle.wait(timeout=TIMEOUT)
    assert done.status == "expired"
    assert clock.sleeps == [pytest.approx(PollPolicy().expiry_grace)]
    assert clock.monotonic() - clock_before < 1.0
    fake.set_script(Script.running(0.5, expires_after=0.25))
    with pytest.raises(ExecutionFailed) as info:
        await session.run(MACHINE, ["job"], timeout=TIMEOUT, check=True)
    assert info.value.result.execution.status == "expired"
    assert not info.value.result.ok
    await leaks.check()


async def test_unknown_execution_status_is_waited_through_in_run_many(
    session: Session, fake: FakeDedalus
) -> None:
    """Executions passing through an undocumented status still finish in run_many."""
    fake.set_script(
        Script((Phase("hibernating", 0.5, 100), Phase("defrosting", 0.5, None)), Outcome())
    )
    requests = [ExecutionRequest(machine_id=MACHINE, command=["x", str(i)]) for i in range(5)]
    leaks = Leaks(session)
    results = await session.run_many(requests)
    assert [r.execution.status for r in results] == ["succeeded"] * 5
    assert_one_execution_per_create(fake, [r.execution.execution_id for r in results], 5)
    await leaks.check()


async def test_eight_megabytes_of_output_arrive_intact(clock: FakeClock) -> None:
    """8 MB of stdout (with non-ASCII text) is fetched whole by run(), even when the first
    /output response is cut in half."""
    line = "0123456789 ünïcödé ✓ abcdefghijklmnopqrstuvwxyz\n"
    stdout = "".join(f"{i:08d} {line}" for i in range(8 * 1024 * 1024 // (len(line) + 9)))
    stderr = "warning: ✓\n" * 1000
    assert len(stdout.encode()) >= 8_000_000
    async with FakeDedalus(api_key=API_KEY, clock=clock, output_cap=32 * 1024 * 1024) as fake:
        fake.set_script(Script.running(1.0, Outcome(stdout=stdout, stderr=stderr)))
        fake.add_fault(Fault(method="GET", path="/output$", truncate=True))
        async with Session(API_KEY, base_url=fake.base_url, clock=clock) as session:
            leaks = Leaks(session)
            result = await session.run(MACHINE, ["big"], timeout=TIMEOUT)
            await leaks.check()
    assert result.stdout == stdout
    assert result.stderr == stderr
    assert result.output is not None
    assert result.output.stdout_bytes == len(stdout.encode())
    assert result.output.stdout_truncated is False
    assert result.execution.stdout_truncated is False
    assert len(fake.requests_for("GET", "/output")) == 2
    assert fake.errors == []


# --- the machine goes away mid-wait -----------------------------------------------------


async def _until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Yield to the loop (real time) until ``predicate()`` holds."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0)


async def test_machine_destroyed_mid_run_ends_it_at_once(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """The machine is destroyed while run() waits: NotFoundError on the next poll, not at
    the 600 s deadline."""
    fake.set_script(Script.stuck(retry_after_ms=1000))
    leaks = Leaks(session)
    task = asyncio.create_task(session.run(MACHINE, ["x"], timeout=600))
    await _until(lambda: len(fake.requests_for("GET")) >= 2)
    fake.destroy_machine(MACHINE)
    destroyed_at = clock.monotonic()
    with pytest.raises(NotFoundError) as info:
        await task
    assert info.value.status == 404
    assert clock.monotonic() - destroyed_at <= 1.0 + 2 * JITTER
    assert fake.create_count == 1
    await leaks.check()


async def test_machine_destroyed_mid_run_many_fails_only_its_requests(
    session: Session, fake: FakeDedalus, clock: FakeClock
) -> None:
    """In a fan-out, destroying one machine fails its requests with NotFoundError at once;
    the other machine's requests still succeed, each created once."""

    def script(body: dict[str, Any]) -> Script:
        if body["command"][0] == "stuck":
            return Script.stuck(retry_after_ms=1000)
        return Script.running(3.0, Outcome(stdout="ok\n"), retry_after_ms=500)

    fake.set_script(script)
    requests = [
        ExecutionRequest(
            machine_id="dm-d026e0b1-eb59-56be-90a9-4d01354e0b4f",
            command=["stuck", str(i)],
            timeout=600,
        )
        for i in range(5)
    ] + [
        ExecutionRequest(
            machine_id="dm-454c69e6-02b8-5e68-8e6f-1d896816104d", command=["ok", str(i)]
        )
        for i in range(3)
    ]
    leaks = Leaks(session)
    task = asyncio.create_task(session.run_many(requests, return_exceptions=True))
    await _until(lambda: fake.create_count == 8 and len(fake.requests_for("GET")) >= 2)
    fake.destroy_machine("dm-d026e0b1-eb59-56be-90a9-4d01354e0b4f")
    destroyed_at = clock.monotonic()
    results = await task
    doomed, fine = results[:5], results[5:]
    assert all(isinstance(r, NotFoundError) for r in doomed), doomed
    assert all(isinstance(r, ExecutionResult) and r.stdout == "ok\n" for r in fine), fine
    # each doomed waiter noticed within about one of its 1 s hints (not the 600 s deadline)
    assert clock.monotonic() - destroyed_at < 30
    assert fake.create_count == 8
    assert len(Counter(r.idempotency_key for r in fake.executions.values())) == 8
    await leaks.check()


# --- a server slower than request_timeout (real time, small values) ---------------------


# on conftest's live_fake (the real clock): executions finish after 50 ms (hint 20 ms)
QUICK = Script.running(0.05, Outcome(stdout="ok\n"), retry_after_ms=20)


def _live_session(fake: FakeDedalus, **kwargs: Any) -> Session:
    kwargs.setdefault("retry", RetryPolicy(initial_backoff=0.01, max_backoff=0.05))
    kwargs.setdefault("request_timeout", 0.2)
    return Session(API_KEY, base_url=fake.base_url, **kwargs)


async def test_one_slow_poll_is_retried_and_the_run_finishes(live_fake: FakeDedalus) -> None:
    """A poll slower than request_timeout is abandoned after 0.2 s and retried; run() still
    returns its output well before the slow response would have come."""
    live_fake.set_script(QUICK)
    live_fake.add_fault(Fault(method="GET", delay=1.5))
    async with _live_session(live_fake) as session:
        leaks = Leaks(session)
        started = time.monotonic()
        result = await session.run(MACHINE, ["x"], timeout=10)
        elapsed = time.monotonic() - started
        await leaks.check()
    assert result.stdout == "ok\n"
    assert result.stats.retries >= 1
    assert 0.2 <= elapsed < 1.2
    assert live_fake.create_count == 1


async def test_slow_create_that_commits_late_is_still_created_once(live_fake: FakeDedalus) -> None:
    """The first POST is abandoned after request_timeout but the server commits it later;
    the retry (same key, same body) and the late commit yield one execution."""
    live_fake.set_script(QUICK)
    live_fake.add_fault(Fault(method="POST", delay=0.6))
    async with _live_session(live_fake) as session:
        leaks = Leaks(session)
        result = await session.run(MACHINE, ["x"], timeout=10)
        await asyncio.sleep(0.8)  # let the slow handler commit (or replay) its create
        await leaks.check()
    posts = live_fake.requests_for("POST")
    assert len(posts) == 2
    assert posts[0].idempotency_key == posts[1].idempotency_key
    assert posts[0].body == posts[1].body
    assert live_fake.create_count == 1
    assert list(live_fake.executions) == [result.execution.execution_id]


async def test_always_slow_server_is_request_timeout_within_bounds(live_fake: FakeDedalus) -> None:
    """Every request slower than request_timeout: RequestTimeout after max_attempts tries,
    each cut at 0.2 s, long before the slow server would answer."""
    live_fake.set_script(QUICK)
    live_fake.add_fault(Fault(method="GET", delay=5.0, times=None))
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.01)
    async with _live_session(live_fake, retry=retry) as session:
        leaks = Leaks(session)
        started = time.monotonic()
        with pytest.raises(RequestTimeout) as info:
            await session.get_execution(MACHINE, "exe-1")
        elapsed = time.monotonic() - started
        await leaks.check()
    assert isinstance(info.value, TimeoutError)
    assert info.value.method == "GET"
    assert 0.6 <= elapsed < 1.5
    assert len(live_fake.requests_for("GET")) == 3


async def test_slow_polls_outlasting_the_wait_deadline_are_wait_timeout(
    live_fake: FakeDedalus,
) -> None:
    """A wait of 0.5 s against a server that never answers a poll in time: WaitTimeout from
    RequestTimeout, raised within one request_timeout of the deadline."""
    live_fake.set_script(QUICK)
    async with _live_session(live_fake) as session:
        handle = await session.create_execution(MACHINE, ["x"])
        live_fake.add_fault(Fault(method="GET", delay=5.0, times=None))
        leaks = Leaks(session)
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as info:
            await handle.wait(timeout=0.5)
        elapsed = time.monotonic() - started
        await leaks.check()
    assert isinstance(info.value.__cause__, RequestTimeout)
    assert elapsed < 0.5 + session.request_timeout + 0.3
    assert live_fake.create_count == 1


async def test_cancelling_a_run_stuck_on_a_slow_server_releases_everything(
    live_fake: FakeDedalus,
) -> None:
    """A run cancelled while its request hangs on a slow server stops at once and leaves no
    task or connection behind."""
    live_fake.set_script(QUICK)
    live_fake.add_fault(Fault(method="GET", delay=5.0, times=None))
    async with _live_session(live_fake, request_timeout=10.0) as session:
        leaks = Leaks(session)
        task = asyncio.create_task(session.run(MACHINE, ["x"], timeout=30))
        await _until(lambda: len(live_fake.requests_for("GET")) >= 1)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 0.5
        await leaks.check()
    assert live_fake.create_count == 1
