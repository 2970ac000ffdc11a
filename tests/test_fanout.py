"""Fan-out (run_many / as_completed) against FakeDedalus on real loopback, real clock."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import attrs
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from dedalus_async import (
    TERMINAL_STATUSES,
    Completed,
    ConflictError,
    ExecutionFailed,
    ExecutionRequest,
    ExecutionResult,
    PollPolicy,
    Progress,
    Session,
    SessionClosedError,
    WaitTimeout,
)
from dedalus_async.testing import FAKE_API_KEY, FakeDedalus, Fault, Outcome, Phase, Script

MACHINE = "dm-fdc9b75d-4376-5a2c-b60f-5e47cb0a68e1"  # the real form: "dm-" and a UUID

# Quick polls for short scripted executions: a hint is obeyed down to 10 ms.
FAST_POLL = PollPolicy(hint_floor=0.01, hint_jitter=0.005, initial_interval=0.01)


def _our_tasks() -> set[asyncio.Task[Any]]:
    """Tasks of the client side: the fake server's connection and request handlers (which
    live on after a client hangs up) are aiohttp's server tasks, not ours."""
    return {
        task
        for task in asyncio.all_tasks()
        if "aiohttp/web_" not in task.get_coro().cr_code.co_filename  # type: ignore[union-attr]
    }


def _requests(n: int, *, machines: int = 4, program: str = "echo") -> list[ExecutionRequest]:
    return [
        ExecutionRequest(
            machine_id=f"dm-7586c7cd-886a-5a0d-8099-{i % machines:012x}",
            command=[program, str(i)],
        )
        for i in range(n)
    ]


def _index_of(body: dict[str, Any]) -> int:
    return int(body["command"][1])


def _short(body: dict[str, Any]) -> Script:
    """A few milliseconds of running, with a small hint; echo prints its argument."""
    i = _index_of(body)
    stdout = f"{i}\n" if body["command"][0] == "echo" else ""
    return Script((Phase("running", 0.005, 5),), Outcome(stdout=stdout))


def _stuck_unless_fail(body: dict[str, Any]) -> Script:
    """``false N`` fails quickly; everything else runs (nearly) forever."""
    if body["command"][0] == "false":
        return Script((Phase("running", 0.01, 5),), Outcome(status="failed", exit_code=1))
    return Script.stuck(retry_after_ms=20)


# The plugin's live_fake_dedalus and live_dedalus_session (real clock) play _short with quick polls.
@pytest.fixture
def dedalus_fake_options() -> dict[str, Any]:
    return {"script": _short}


@pytest.fixture
def dedalus_session_options() -> dict[str, Any]:
    return {"poll": FAST_POLL}


# --- the big one -------------------------------------------------------------------------


@pytest.mark.slow
async def test_two_thousand_executions_respect_limits_order_and_idempotency() -> None:
    """2,000 runs: limits held, results in order, one create each despite dropped
    responses, nothing left running."""
    n, concurrency, create_concurrency = 2000, 150, 12
    # latency makes requests overlap at the server, so its peak counts mean something
    async with FakeDedalus(script=_short, latency=0.002) as fake:
        # 10 creates are processed, then their connection is cut: the client must retry
        # them under the same key and get the same execution back (fewer drops than
        # creates in flight, so no create can meet a drop on each of its 4 tries)
        drops = fake.add_fault(Fault(method="POST", drop_after_commit=True, times=10))
        async with Session(api_key=FAKE_API_KEY, base_url=fake.base_url, poll=FAST_POLL) as session:
            seen: list[Progress] = []
            before = _our_tasks()
            # not a timing (benchmarks/ measures speed): a bound that only a hang or a
            # collapse into one-at-a-time would reach on a loaded machine
            async with asyncio.timeout(300):
                results = await session.run_many(
                    _requests(n),
                    concurrency=concurrency,
                    create_concurrency=create_concurrency,
                    on_progress=seen.append,
                )
            assert _our_tasks() == before
    assert drops.hits == 10
    assert fake.create_count == n
    posts = fake.requests_for("POST")
    assert len(posts) == n + 10
    assert len({p.idempotency_key for p in posts}) == n
    assert 2 <= fake.peak_in_flight["POST"] <= create_concurrency
    assert max(p.in_flight for p in seen) == concurrency
    assert len(seen) == 2 * n  # one report when each starts, one when it ends
    assert seen[-1] == Progress(total=n, done=n, failed=0, in_flight=0)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(n)]
    assert all(r.ok for r in results)
    assert fake.errors == []


async def test_results_come_back_in_input_order_not_finishing_order(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """Later requests finish first; the list is still in input order."""
    live_fake_dedalus.set_script(
        lambda body: Script(
            (Phase("running", 0.05 * (10 - _index_of(body)), 5),),
            Outcome(stdout=f"{_index_of(body)}\n"),
        )
    )
    results = await live_dedalus_session.run_many(_requests(10), concurrency=10)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(10)]
    completed = [r.execution.completed_at for r in results if r.execution.completed_at]
    assert len(completed) == 10
    # the last request finished first, half a second before the first one (a strict
    # reverse order of all ten would depend on how evenly a loaded machine sent creates)
    assert completed[0] > completed[-1]
    assert completed != sorted(completed)


async def test_empty_input_sends_nothing(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """No requests: an empty list, no request sent."""
    assert await live_dedalus_session.run_many([]) == []
    assert live_fake_dedalus.requests == []


# --- validation before anything is sent ----------------------------------------------------


def test_execution_request_validates_when_built() -> None:
    """Each field is checked by the constructor, with the library's own validators."""
    with pytest.raises(TypeError, match="not a string"):
        ExecutionRequest(machine_id=MACHINE, command="ls -l")  # a str is a Sequence[str]
    with pytest.raises(ValueError, match="must not be empty"):
        ExecutionRequest(machine_id=MACHINE, command=[])
    with pytest.raises(ValueError, match="'/'"):
        ExecutionRequest(machine_id=f"{MACHINE}/b", command=["ls"])
    with pytest.raises(TypeError, match="timeout_ms"):
        ExecutionRequest(machine_id=MACHINE, command=["ls"], timeout_ms=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="env"):
        ExecutionRequest(machine_id=MACHINE, command=["ls"], env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="idempotency_key"):
        ExecutionRequest(
            machine_id=MACHINE,
            command=["ls"],
            idempotency_key="has space",
        )
    with pytest.raises(ValueError, match="timeout"):
        ExecutionRequest(machine_id=MACHINE, command=["ls"], timeout=0)
    with pytest.raises(TypeError, match="cwd"):
        ExecutionRequest(machine_id=MACHINE, command=["ls"], cwd=3)  # type: ignore[arg-type]


def test_execution_request_is_frozen_hashable_and_keeps_secrets_out_of_repr() -> None:
    """A request is an immutable value; its repr shows env keys and stdin size only."""
    request = ExecutionRequest(
        machine_id=MACHINE,
        command=["env"],
        env={"TOKEN": "s3cret"},
        stdin="password",
    )
    assert request == ExecutionRequest(
        machine_id=MACHINE,
        command=("env",),
        env={"TOKEN": "s3cret"},
        stdin="password",
    )
    assert hash(request) == hash(attrs.evolve(request))
    assert "s3cret" not in repr(request)
    assert "password" not in repr(request)
    assert "TOKEN" in repr(request)
    with pytest.raises(TypeError):
        request.env["TOKEN"] = "x"  # type: ignore[index]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.cwd = "/tmp"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("requests", "kwargs", "error"),
    [
        ([*_requests(3), "not a request"], {}, TypeError),
        (_requests(1)[0], {}, TypeError),
        (_requests(3), {"concurrency": 0}, ValueError),
        (_requests(3), {"create_concurrency": 0}, ValueError),
        (_requests(3), {"concurrency": 2.5}, TypeError),
        (_requests(3), {"on_progress": "print"}, TypeError),
        (
            [
                ExecutionRequest(
                    machine_id=MACHINE,
                    command=["a"],
                    idempotency_key="k1",
                ),
                ExecutionRequest(
                    machine_id=MACHINE,
                    command=["b"],
                    idempotency_key="k1",
                ),
            ],
            {},
            ValueError,
        ),
        (_requests(3), {"fail_fast": True, "return_exceptions": True}, ValueError),
    ],
)
async def test_bad_arguments_fail_before_any_request(
    live_fake_dedalus: FakeDedalus,
    live_dedalus_session: Session,
    requests: Any,
    kwargs: dict[str, Any],
    error: type[Exception],
) -> None:
    """A bad item or setting fails the whole call before the first request is sent."""
    with pytest.raises(error):
        await live_dedalus_session.run_many(requests, **kwargs)
    if "fail_fast" not in kwargs:  # as_completed has no fail_fast: a failure ends its loop
        with pytest.raises(error):
            live_dedalus_session.as_completed(requests, **kwargs)
    assert live_fake_dedalus.requests == []


async def test_closed_session_fails_before_any_request(live_fake_dedalus: FakeDedalus) -> None:
    """A fan-out on a Session that is not open raises SessionClosedError at once."""
    session = Session(api_key=FAKE_API_KEY, base_url=live_fake_dedalus.base_url)
    with pytest.raises(SessionClosedError):
        await session.run_many(_requests(2))
    assert live_fake_dedalus.requests == []


async def test_caller_keys_are_used_and_generated_keys_are_fresh(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """A request's own idempotency_key is sent; the others get distinct compact UUIDv7s."""
    requests = [
        *_requests(3),
        ExecutionRequest(
            machine_id=MACHINE,
            command=["echo", "3"],
            idempotency_key="mine",
        ),
    ]
    results = await live_dedalus_session.run_many(requests)
    keys = [p.idempotency_key for p in live_fake_dedalus.requests_for("POST")]
    assert "mine" in keys
    assert len(set(keys)) == 4
    assert all(r.ok for r in results)


# --- failures ------------------------------------------------------------------------------


async def test_return_exceptions_puts_each_failure_in_its_place(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """Failures come back where their request was; the rest run to their end."""
    live_fake_dedalus.destroy_machine("dm-bac2569c-cae0-5eb3-abfd-591bc9fd6d87")
    requests = [
        ExecutionRequest(machine_id=MACHINE, command=["echo", "0"]),
        ExecutionRequest(
            machine_id="dm-bac2569c-cae0-5eb3-abfd-591bc9fd6d87", command=["echo", "1"]
        ),  # 409 on create
        ExecutionRequest(machine_id=MACHINE, command=["false", "2"]),  # exit 1, check=True
        ExecutionRequest(machine_id=MACHINE, command=["echo", "3"]),
    ]
    live_fake_dedalus.set_script(
        lambda body: Script(
            (Phase("running", 0.01, 5),),
            Outcome(status="failed", exit_code=1)
            if body["command"][0] == "false"
            else Outcome(stdout=f"{_index_of(body)}\n"),
        )
    )
    results = await live_dedalus_session.run_many(requests, return_exceptions=True, check=True)
    assert isinstance(results[0], ExecutionResult)
    assert results[0].stdout == "0\n"
    assert isinstance(results[1], ConflictError)
    assert any("request #1" in note for note in results[1].__notes__)
    assert isinstance(results[2], ExecutionFailed)
    assert results[2].result.exit_code == 1
    assert isinstance(results[3], ExecutionResult)
    assert results[3].stdout == "3\n"


async def test_without_return_exceptions_failures_are_raised_together_at_the_end(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """Every request runs to its end; then all failures are raised as one group."""
    live_fake_dedalus.destroy_machine("dm-bac2569c-cae0-5eb3-abfd-591bc9fd6d87")
    requests = [
        *_requests(5),
        ExecutionRequest(
            machine_id="dm-bac2569c-cae0-5eb3-abfd-591bc9fd6d87", command=["echo", "5"]
        ),
        ExecutionRequest(
            machine_id="dm-bac2569c-cae0-5eb3-abfd-591bc9fd6d87", command=["echo", "6"]
        ),
    ]
    with pytest.raises(ExceptionGroup) as caught:
        await live_dedalus_session.run_many(requests)
    assert len(caught.value.exceptions) == 2
    assert all(isinstance(e, ConflictError) for e in caught.value.exceptions)
    assert live_fake_dedalus.create_count == 5
    assert all(
        live_fake_dedalus.get_record(id_).is_terminal for id_ in live_fake_dedalus.executions
    )


@pytest.mark.parametrize("batch_refresh", [True, False])
async def test_fail_fast_cancels_the_rest_and_deletes_them_remotely(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session, batch_refresh: bool
) -> None:
    """fail_fast: the first failure cancels the others at once; cancel_remote deletes them."""
    live_fake_dedalus.set_script(_stuck_unless_fail)
    requests = [
        *(ExecutionRequest(machine_id=MACHINE, command=["sleep", str(i)]) for i in range(8)),
        ExecutionRequest(machine_id=MACHINE, command=["false", "8"]),
    ]
    before = _our_tasks()
    started = time.monotonic()
    with pytest.raises(ExceptionGroup) as caught:
        await live_dedalus_session.run_many(
            requests,
            fail_fast=True,
            check=True,
            cancel_remote=True,
            batch_refresh=batch_refresh,
        )
    assert time.monotonic() - started < 5
    assert [type(e) for e in caught.value.exceptions] == [ExecutionFailed]
    assert _our_tasks() == before
    assert live_fake_dedalus.create_count == 9
    statuses = sorted(
        live_fake_dedalus.get_record(id_).status for id_ in live_fake_dedalus.executions
    )
    assert statuses == ["cancelled"] * 8 + ["failed"]
    assert len(live_fake_dedalus.requests_for("DELETE")) == 8


async def test_fail_fast_without_cancel_remote_leaves_remote_work_running(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """Without cancel_remote, only the local waits stop: no DELETE is sent."""
    live_fake_dedalus.set_script(_stuck_unless_fail)
    requests = [
        ExecutionRequest(machine_id=MACHINE, command=["sleep", "0"]),
        ExecutionRequest(machine_id=MACHINE, command=["false", "1"]),
    ]
    with pytest.raises(ExceptionGroup):
        await live_dedalus_session.run_many(requests, fail_fast=True, check=True)
    assert live_fake_dedalus.requests_for("DELETE") == []
    statuses = sorted(
        live_fake_dedalus.get_record(id_).status for id_ in live_fake_dedalus.executions
    )
    assert statuses == ["failed", "running"]


@pytest.mark.parametrize("batch_refresh", [True, False])
async def test_wait_timeout_with_cancel_remote_deletes_the_execution(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session, batch_refresh: bool
) -> None:
    """A request's own deadline ends its wait with WaitTimeout; cancel_remote deletes it."""
    live_fake_dedalus.set_script(_stuck_unless_fail)
    requests = [
        ExecutionRequest(
            machine_id=MACHINE,
            command=["sleep", str(i)],
            timeout=0.3,
        )
        for i in range(5)
    ]
    results = await live_dedalus_session.run_many(
        requests, return_exceptions=True, cancel_remote=True, batch_refresh=batch_refresh
    )
    assert all(isinstance(r, WaitTimeout) for r in results)
    assert all(
        live_fake_dedalus.get_record(id_).status == "cancelled"
        for id_ in live_fake_dedalus.executions
    )


async def test_an_error_in_on_progress_stops_everything(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """A broken callback is a bug in the caller: it is raised, and nothing keeps running."""
    calls = 0

    def broken(progress: Progress) -> None:
        nonlocal calls
        calls += 1
        if progress.done == 2:
            raise RuntimeError("boom")

    before = _our_tasks()
    with pytest.raises(ExceptionGroup) as caught:
        await live_dedalus_session.run_many(_requests(20), concurrency=4, on_progress=broken)
    assert caught.group_contains(RuntimeError, match="boom")
    assert _our_tasks() == before
    assert live_fake_dedalus.create_count < 20


# --- as_completed ----------------------------------------------------------------------------


async def test_as_completed_yields_each_result_as_it_finishes(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """Items come in finishing order, each naming its request and index."""
    live_fake_dedalus.set_script(
        lambda body: Script(
            (Phase("running", 0.03 * (5 - _index_of(body)), 5),),
            Outcome(stdout=f"{_index_of(body)}\n"),
        )
    )
    requests = _requests(5)
    order: list[int] = []
    async with live_dedalus_session.as_completed(requests, concurrency=5) as results:
        async for done in results:
            assert isinstance(done, Completed)
            assert done.request is requests[done.index]
            assert done.error is None
            assert done.result.stdout == f"{done.index}\n"
            order.append(done.index)
    assert order == [4, 3, 2, 1, 0]


@pytest.mark.parametrize("batch_refresh", [True, False])
async def test_leaving_as_completed_early_stops_local_waits_only(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session, batch_refresh: bool
) -> None:
    """Breaking out cancels the waits at once; without cancel_remote nothing is deleted."""
    live_fake_dedalus.set_script(_stuck_unless_fail)
    requests = [
        ExecutionRequest(machine_id=MACHINE, command=["false", "0"]),
        *(ExecutionRequest(machine_id=MACHINE, command=["sleep", str(i)]) for i in range(1, 6)),
    ]
    before = _our_tasks()
    async with live_dedalus_session.as_completed(requests, batch_refresh=batch_refresh) as results:
        async for done in results:
            assert done.index == 0
            break
    assert _our_tasks() == before
    assert live_fake_dedalus.requests_for("DELETE") == []
    running = [
        r
        for r in map(live_fake_dedalus.get_record, live_fake_dedalus.executions)
        if r.status == "running"
    ]
    assert len(running) == 5


@pytest.mark.parametrize("batch_refresh", [True, False])
async def test_leaving_as_completed_early_with_cancel_remote_deletes_the_rest(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session, batch_refresh: bool
) -> None:
    """With cancel_remote, every execution still running when the block is left is
    deleted before the block exits."""
    live_fake_dedalus.set_script(_stuck_unless_fail)
    requests = [
        ExecutionRequest(machine_id=MACHINE, command=["false", "0"]),
        *(ExecutionRequest(machine_id=MACHINE, command=["sleep", str(i)]) for i in range(1, 6)),
    ]
    async with live_dedalus_session.as_completed(
        requests, cancel_remote=True, batch_refresh=batch_refresh
    ) as results:
        async for done in results:
            assert done.result.exit_code == 1
            break
    deleted = {r.path.rsplit("/", 1)[1] for r in live_fake_dedalus.requests_for("DELETE")}
    assert len(deleted) == 5
    for execution_id in deleted:
        assert live_fake_dedalus.get_record(execution_id).status == "cancelled"


async def test_as_completed_raises_a_failure_unless_return_exceptions(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """A failure ends the loop with its exception; return_exceptions yields it instead."""
    live_fake_dedalus.destroy_machine("dm-bac2569c-cae0-5eb3-abfd-591bc9fd6d87")
    requests = [
        ExecutionRequest(
            machine_id="dm-bac2569c-cae0-5eb3-abfd-591bc9fd6d87", command=["echo", "0"]
        ),
        *_requests(3),
    ]
    with pytest.raises(ConflictError):
        async with live_dedalus_session.as_completed(requests, concurrency=1) as results:
            async for _ in results:
                pass
    failed: list[Completed] = []
    async with live_dedalus_session.as_completed(requests, return_exceptions=True) as results:
        async for done in results:
            if done.error is not None:
                failed.append(done)
    assert [f.index for f in failed] == [0]
    assert isinstance(failed[0].error, ConflictError)
    with pytest.raises(ConflictError):
        failed[0].result  # noqa: B018


async def test_an_exception_in_the_block_cancels_the_fan_out(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """The caller's own exception propagates unchanged, after everything is cleaned up."""
    live_fake_dedalus.set_script(_stuck_unless_fail)
    before = _our_tasks()
    with pytest.raises(KeyError):
        async with live_dedalus_session.as_completed(_requests(3, program="sleep")):
            await asyncio.sleep(0.05)
            raise KeyError("mine")
    assert _our_tasks() == before


# --- many waiters on one machine -----------------------------------------------------------


def _long(body: dict[str, Any]) -> Script:
    # 0.6 s of life with 20 ms hints: per-execution polling looks a couple of dozen times
    # (still more than 3 on a machine loaded enough to stretch every poll)
    i = _index_of(body)
    return Script(
        (Phase("queued", 0.1, 20), Phase("running", 0.5, 20)),
        Outcome(stdout=f"out {i}\n", exit_code=i % 3),
    )


async def _refresh_cost(batch_refresh: bool, *, history: int = 0) -> tuple[float, list[Any]]:
    """(GETs of executions or lists per execution, comparable results) of one fan-out."""
    n = 300
    poll = PollPolicy(hint_floor=0.02, hint_jitter=0.01)
    async with FakeDedalus(script=_long) as fake:
        async with Session(api_key=FAKE_API_KEY, base_url=fake.base_url, poll=poll) as session:
            if history:
                fake.set_script(Script.immediate())
                await session.run_many(_requests(history, machines=2), batch_refresh=False)
                fake.set_script(_long)
                fake.reset_stats()
            results = await session.run_many(
                _requests(n, machines=2), concurrency=100, batch_refresh=batch_refresh
            )
        refreshes = [r for r in fake.requests_for("GET") if not r.path.endswith("/output")]
        assert fake.create_count == n
    comparable = [(r.execution.status, r.exit_code, r.stdout, r.execution.command) for r in results]
    return len(refreshes) / n, comparable


@pytest.mark.slow
async def test_batch_refresh_uses_fewer_requests_with_identical_results() -> None:
    """Many waiters per machine: pages of list_executions cost well under half the GETs
    of polling each execution, and every result is the same."""
    per_execution, expected = await _refresh_cost(False)
    batched, got = await _refresh_cost(True)
    print(f"refresh requests per execution: polling {per_execution:.2f}, batched {batched:.2f}")
    assert got == expected
    assert per_execution > 3  # the comparison means something: each was polled often
    assert batched < per_execution / 2


@pytest.mark.slow
async def test_batch_refresh_skips_a_long_history() -> None:
    """With 1,000 older executions on the machines, sweeps start where the waited-on ones
    are (the list is oldest first) instead of paging through the history every time."""
    per_execution, expected = await _refresh_cost(False)
    batched, got = await _refresh_cost(True, history=1000)
    print(f"with history: polling {per_execution:.2f}, batched {batched:.2f} per execution")
    assert got == expected
    assert batched < per_execution / 2


# Script.default's timeline at half speed (each phase's hint is its whole duration),
# ending with some output
_HALF_DEFAULT = Script(
    (
        Phase("wake_in_progress", 0.1, 100),
        Phase("queued", 0.05, 50),
        Phase("running", 0.15, 150),
    ),
    Outcome(stdout="ok\n"),
)


class _HintWatch:
    """Watches, from the server's side, the hints the fake sends and the GETs that follow.

    Every response that shows an execution (its create, a GET of it, an item of a page of
    the list) sets when the client may next look at it: the moment the response was sent
    plus its ``retry_after_ms``. A GET of the execution that arrives before then is early.
    Measured from the moment the server *sent* the hint (before the client received it),
    so an early poll is never counted wrongly. One race remains that no client can avoid:
    a GET already on the wire when a page carrying a new hint was sent reaches the server
    after it. A GET arriving within ``IN_FLIGHT`` of the hint it breaks was sent before the
    client could know that hint, and is not counted (an early poll by the client's own
    schedule arrives a whole hint early, tens of milliseconds).
    """

    IN_FLIGHT = 0.005

    def __init__(self) -> None:
        #: execution id -> (the moment the latest hint sent for it elapses, the moment it
        #: was sent), until the next GET
        self.due: dict[str, tuple[float, float]] = {}
        #: (execution id, seconds early) of each GET that came before its hint elapsed
        self.early: list[tuple[str, float]] = []
        #: executions some response has shown in a terminal status
        self.shown_terminal: set[str] = set()

    def middleware(self) -> Middleware:
        @web.middleware
        async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
            arrived = time.monotonic()
            # /v1/machines/{m}/executions[/{e}[/output|/events]]
            parts = request.rel_url.raw_path.split("/")
            kind = {5: "list or create", 6: "execution"}.get(len(parts), "other")
            if kind == "execution" and request.method == "GET":
                hint = self.due.pop(parts[5], None)
                if hint is not None and arrived < hint[0] and arrived - hint[1] > self.IN_FLIGHT:
                    self.early.append((parts[5], hint[0] - arrived))
            response = await handler(request)
            sent = time.monotonic()
            if kind == "other" or response.status >= 400 or request.method == "DELETE":
                return response
            assert isinstance(response, web.Response)
            assert isinstance(response.body, bytes)
            data = json.loads(response.body)
            # a page of the list carries each execution's hint just like a GET does
            for item in data.get("items", ()) if "items" in data else (data,):
                self.shown(item, sent)
            return response

        return watch

    def shown(self, item: dict[str, Any], sent: float) -> None:
        execution_id = item["execution_id"]
        hint_ms = item.get("retry_after_ms")
        if hint_ms is None:  # no hint (a terminal execution): nothing to check
            self.due.pop(execution_id, None)
        else:
            self.due[execution_id] = (sent + hint_ms / 1000.0, sent)
        if item["status"] in TERMINAL_STATUSES:
            self.shown_terminal.add(execution_id)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("n", "concurrency", "hints", "order"),
    [
        (200, 40, "phase", "oldest"),
        (600, 600, "phase", "oldest"),
        (600, 600, "remaining", "newest"),
    ],
)
async def test_batch_refresh_never_polls_before_any_hint(
    n: int, concurrency: int, hints: str, order: str
) -> None:
    """No GET of an execution goes out before the latest hint the server gave for it,
    whether in its own responses or in a page of the list.

    Waves of ``concurrency``: each wave's first waiters start before the machine has
    enough of them to be read by pages, so pages and GETs of their own mix (the case
    that once polled early). Also with hints that are the time left in each phase, and
    the list newest first.
    """
    watch = _HintWatch()
    script = attrs.evolve(_HALF_DEFAULT, hints=hints)
    fake = FakeDedalus(api_key=FAKE_API_KEY, script=script, list_order=order)
    fake.app.middlewares.append(watch.middleware())  # watches, changes nothing
    async with fake, Session(api_key=FAKE_API_KEY, base_url=fake.base_url) as session:
        requests = [
            ExecutionRequest(machine_id="dm-c294061c-c5b5-5ab3-85c3-a559cc68d778", command=["true"])
            for _ in range(n)
        ]
        results = await session.run_many(requests, concurrency=concurrency)
    assert [r.execution.status for r in results] == ["succeeded"] * n
    lists = [r for r in fake.requests_for("GET") if r.path.endswith("/executions")]
    assert lists  # pages were read
    assert watch.early == []
    assert len(watch.shown_terminal) == n  # every finish was shown to the client


def _by_role(body: dict[str, Any]) -> Script:
    """``slow``: runs 3 s (hint 100 ms); ``done``: finished at once; ``mid``: runs 0.6 s
    with 50 ms hints; ``long``: 1.5 s with 50 ms hints."""
    role = body["command"][0]
    if role == "slow":
        return Script.running(3.0, retry_after_ms=100)
    if role == "done":
        return Script.immediate()
    return Script.running(1.5 if role == "long" else 0.6, retry_after_ms=50)


def _list_pages(fake: FakeDedalus) -> list[tuple[int, int]]:
    """(offset, limit) of every page of a list of executions the fake was asked for."""
    return [
        (int(r.query.get("cursor", "c0")[1:]), int(r.query.get("limit", fake.page_size)))
        for r in fake.requests_for("GET")
        if r.path.endswith("/executions")
    ]


async def test_a_waiter_deep_in_a_newest_first_list_is_served_by_its_own_get() -> None:
    """Newest first: the waited-on executions at the top, one old waiter 250 finished
    executions further down. Pages are read for the top ones and stop there; the old one
    GETs for itself instead of pages being walked down to it."""
    machine = "dm-c294061c-c5b5-5ab3-85c3-a559cc68d778"
    roles = ["slow"] + ["done"] * 250 + ["mid"] * 8
    requests = [ExecutionRequest(machine_id=machine, command=[role]) for role in roles]
    async with (
        FakeDedalus(script=_by_role, list_order="newest") as fake,
        Session(api_key=FAKE_API_KEY, base_url=fake.base_url, poll=FAST_POLL) as session,
    ):
        # one create at a time: the list's order is the requests' order
        results = await session.run_many(requests, concurrency=300, create_concurrency=1)
    assert [r.execution.status for r in results] == ["succeeded"] * len(roles)
    slow = results[0].execution.execution_id
    pages = _list_pages(fake)
    assert pages  # the top was read a page at a time
    depth = len(roles) - 1  # the slow one's offset in the list, newest first
    assert all(offset + limit <= depth for offset, limit in pages), pages
    polls = [r for r in fake.requests_for("GET", path_contains=slow) if r.path.endswith(slow)]
    assert polls  # it looked for itself


async def test_items_no_waiter_waits_for_are_never_decoded() -> None:
    """A page is read through the ids of its items: one the server got wrong (here an
    exit code that is not a number) costs nothing unless a waiter waits for it, so the
    waiters around it are still served by pages, not by GETs. And where the waiters are
    known to be, a page asks for about as many executions as there are waiters."""
    machine = "dm-c294061c-c5b5-5ab3-85c3-a559cc68d778"
    async with (
        FakeDedalus(script=_by_role) as fake,
        Session(api_key=FAKE_API_KEY, base_url=fake.base_url, poll=FAST_POLL) as session,
    ):
        broken = await session.run(machine, ["done"])
        fake.executions[broken.execution.execution_id].exit_code = "zero"  # type: ignore[assignment]
        requests = [ExecutionRequest(machine_id=machine, command=["long"]) for _ in range(8)]
        results = await session.run_many(requests)
    assert [r.execution.status for r in results] == ["succeeded"] * 8
    ids = {r.execution.execution_id for r in results}
    polls = [r for r in fake.requests_for("GET") if r.path.rsplit("/", 1)[-1] in ids]
    pages = _list_pages(fake)
    assert pages
    # each waiter looked a couple of dozen times (1.5 s, 50 ms hints), nearly always in pages
    assert len(polls) < 8, (len(polls), len(pages))
    assert all(limit <= 20 for _, limit in pages[1:]), pages  # 2 per waiter (9 at most)


async def test_batch_refresh_falls_back_to_gets_when_listing_fails(
    live_fake_dedalus: FakeDedalus, live_dedalus_session: Session
) -> None:
    """A server that refuses the list: its waiters poll one by one and still finish."""
    live_fake_dedalus.set_script(_long)
    lists = live_fake_dedalus.add_fault(
        Fault(method="GET", path=r"/executions$", status=400, times=None)
    )
    results = await live_dedalus_session.run_many(_requests(40, machines=1), concurrency=40)
    assert [r.stdout for r in results] == [f"out {i}\n" for i in range(40)]
    assert lists.hits == 1  # a refused list is not asked for again
    polls = [r for r in live_fake_dedalus.requests_for("GET") if "/executions/exe-" in r.path]
    assert len(polls) > 40


# --- 429 mid fan-out --------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [None, 3000.0])
async def test_a_429_burst_slows_the_whole_session_and_everything_finishes(
    rate: float | None,
) -> None:
    """After the first 429 (Retry-After 0.5 s) no request reaches the server until the
    pause is over; with a rate it is also cut; every execution still succeeds."""
    n = 300
    fault = Fault(status=429, headers={"Retry-After": "0.5"}, times=12)
    added_at: list[float] = []
    lowest_rate: list[float] = []
    async with FakeDedalus(script=_short) as fake:
        session = Session(
            api_key=FAKE_API_KEY,
            base_url=fake.base_url,
            poll=FAST_POLL,
            max_requests_per_second=rate,
        )

        def progress(p: Progress) -> None:
            if p.done == 50 and not added_at:
                fake.add_fault(fault)
                added_at.append(time.monotonic())
            if session.throttle.current_rate is not None:
                lowest_rate.append(session.throttle.current_rate)

        async with session:
            results = await session.run_many(_requests(n), concurrency=60, on_progress=progress)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(n)]
    assert fake.create_count == n
    assert fault.hits == 12
    assert session.throttle.rate_limited_count == 12
    # the first request the fault answered is the first one received after it was added
    first_429 = next(r.at for r in fake.requests if r.at >= added_at[0])
    during_pause = [r for r in fake.requests if first_429 + 0.1 <= r.at <= first_429 + 0.45]
    assert during_pause == []
    assert any(r.at > first_429 + 0.5 for r in fake.requests)
    if rate is not None:
        assert min(lowest_rate) < rate * 0.75  # cut (AIMD: halved, then climbing)...
        assert session.throttle.current_rate is not None
        assert session.throttle.current_rate > min(lowest_rate)  # ...and climbing back


def test_progress_counts() -> None:
    """pending and finished follow from the four counts."""
    progress = Progress(total=10, done=3, failed=2, in_flight=4)
    assert progress.finished == 5
    assert progress.pending == 1


async def test_create_slots_pass_on_a_slot_whose_waiter_was_cancelled() -> None:
    """The create limit (_Slots) is first come, first served, skips a waiter cancelled in
    the queue, and passes on a slot handed to a waiter cancelled before it resumed."""
    from dedalus_async._fanout import _Slots

    slots = _Slots(1)
    got: list[str] = []

    async def take(name: str) -> None:
        await slots.acquire()
        got.append(name)

    await slots.acquire()  # the one slot is held
    tasks = {name: asyncio.create_task(take(name)) for name in ("a", "b", "c", "d")}
    await asyncio.sleep(0)  # all four queued
    tasks["a"].cancel()  # cancelled while queued: skipped
    await asyncio.sleep(0)
    slots.release()  # handed to b ...
    tasks["b"].cancel()  # ... which is cancelled before it runs: b passes it to c
    for name in ("a", "b"):
        with pytest.raises(asyncio.CancelledError):
            await tasks[name]
    async with asyncio.timeout(5):  # not a timing: without the hand-on, c waits forever
        await tasks["c"]
    assert got == ["c"]
    assert not tasks["d"].done()  # one holder at a time: d waits for c's release
    slots.release()
    await tasks["d"]
    assert got == ["c", "d"]
    slots.release()
    await slots.acquire()  # free again: no wait
