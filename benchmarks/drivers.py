"""The clients being compared: each runs N executions, all at once or under a limit.

Every driver does the same work per execution: create it (with an Idempotency-Key), poll
it, sleeping what the server's ``retry_after_ms`` says (``dedalus_async`` adds its own
small jitter on top), until it is terminal, then fetch its output. Against the benchmark
server that is 5 requests per execution. Each returns one :class:`Sample` per execution:
the final record it kept (so memory figures can tell records from waiting state), the
detection lag it saw, or the error it ended with.

* ``aiohttp``: the floor, a bare loop over one ``aiohttp.ClientSession`` (100 connections,
  aiohttp's default) and the standard library's ``json``, no retries, no validation.
* ``dedalus_async``: ``Session.run`` per execution.
* ``dedalus_async-run_many``: ``Session.run_many`` over all of them (only when the
  installed ``Session`` has it).
* ``dedalus_async-run_many-journal``: the same with ``journal=`` a fresh SQLite file.
* ``sdk`` / ``sdk-aiohttp``: the official ``dedalus_sdk.AsyncDedalus`` (on httpx, or on
  its aiohttp transport) with the polling loop its users write by hand.
* experiments, not run by default: ``aiohttp-jitter`` (the bare loop plus the library's
  0-10 ms poll jitter) and ``dedalus_async-nojitter`` (``hint_jitter=0``) price the jitter
  alone; ``dedalus_async-run_many-cc100`` (``create_concurrency=100``) prices the create
  limit; see ``PROFILE.md``.

Every driver creates its executions on the server's machines in turn (one machine unless
the server was started with ``--machines N``: see :func:`bench_machines`).

Concurrency is the same scaffolding for every driver except ``run_many``, which brings its
own: with a limit, that many worker tasks take executions one after another; without
one, one task per execution, all started at once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, ClassVar, NamedTuple

import aiohttp

from dedalus_async import PollPolicy, Session

from .server import API_KEY, MACHINE_ID

__all__ = ["DRIVERS", "Driver", "Sample", "available", "bench_machines", "fan_out"]

COMMAND = ("echo", "ok")
# The API's terminal statuses, spelled out: the bare loop and the SDK loop owe nothing to us.
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
EXPECTED_STDOUT = "ok\n"


class Sample(NamedTuple):
    """What one execution left behind in a driver."""

    record: object
    lag: float | None
    error: str | None


def _failed(exc: BaseException) -> Sample:
    return Sample(None, None, f"{type(exc).__name__}: {exc}"[:300])


async def fan_out(
    n: int, concurrency: int | None, one: Callable[[], Awaitable[Sample]]
) -> list[Sample]:
    """Run ``one`` ``n`` times: ``concurrency`` workers, or ``n`` tasks at once (``None``)."""
    samples: list[Sample] = []

    async def guarded() -> None:
        try:
            samples.append(await one())
        except Exception as exc:  # a failed execution is a measurement, not a crash
            samples.append(_failed(exc))

    async with asyncio.TaskGroup() as tg:
        if concurrency is None or concurrency >= n:
            for _ in range(n):
                tg.create_task(guarded())
        else:
            left = n

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await guarded()

            for _ in range(concurrency):
                tg.create_task(worker())
    return samples


class Driver:
    """One client under test; subclasses implement :meth:`one` (or :meth:`run`)."""

    name: ClassVar[str]
    description: ClassVar[str]

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this driver cannot run here, or ``None`` if it can."""
        return None

    async def setup(self, base_url: str) -> None:
        raise NotImplementedError

    async def teardown(self) -> None:
        raise NotImplementedError

    async def one(self) -> Sample:
        raise NotImplementedError

    async def run(self, n: int, concurrency: int | None) -> list[Sample]:
        return await fan_out(n, concurrency, self.one)


def bench_machines(base_url: str) -> list[str]:
    """The machines the benchmark server spreads executions over (``/_bench/config``);
    asked once, in a driver's setup, outside the measured window."""
    with urllib.request.urlopen(f"{base_url}/_bench/config", timeout=30) as response:
        config = json.loads(response.read())
    machines = config.get("machines") or [MACHINE_ID]
    return [str(machine_id) for machine_id in machines]


def _in_turn(base_url: str) -> Iterator[str]:
    return itertools.cycle(bench_machines(base_url))


def _lag(completed_at: datetime | None) -> float | None:
    if completed_at is None:
        return None
    return (datetime.now(UTC) - completed_at).total_seconds()


class AiohttpLoop(Driver):
    """The floor: what a careful hand-written aiohttp loop costs."""

    name = "aiohttp"
    description = "bare aiohttp loop (the floor)"

    async def setup(self, base_url: str) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        self._bases = itertools.cycle(
            [f"{base_url}/v1/machines/{m}/executions" for m in bench_machines(base_url)]
        )
        self._headers = {"x-api-key": API_KEY, "Accept": "application/json"}
        self._body = json.dumps({"command": list(COMMAND)}).encode()

    async def teardown(self) -> None:
        await self._session.close()

    def _jitter(self) -> float:
        return 0.0

    async def _get(self, url: str) -> Any:
        async with self._session.get(url, headers=self._headers) as resp:
            resp.raise_for_status()
            return json.loads(await resp.read())

    async def one(self) -> Sample:
        headers = {
            **self._headers,
            "Content-Type": "application/json",
            "Idempotency-Key": secrets.token_hex(16),
        }
        base = next(self._bases)
        async with self._session.post(base, data=self._body, headers=headers) as resp:
            resp.raise_for_status()
            execution = json.loads(await resp.read())
        url = f"{base}/{execution['execution_id']}"
        while execution["status"] not in TERMINAL:
            await asyncio.sleep(execution.get("retry_after_ms", 500) / 1000 + self._jitter())
            execution = await self._get(url)
        completed = execution.get("completed_at")
        lag = _lag(datetime.fromisoformat(completed)) if completed else None
        output = None
        if execution.get("stdout_bytes") or execution.get("stderr_bytes"):
            output = await self._get(url + "/output")
        if output is None or output.get("stdout") != EXPECTED_STDOUT:
            return Sample(None, lag, f"unexpected output {output!r}"[:300])
        return Sample((execution, output), lag, None)


class AiohttpLoopJitter(AiohttpLoop):
    """The bare loop plus dedalus_async's default jitter: an experiment, to price the
    jitter alone (spread-out polls batch less on the event loop and the socket)."""

    name = "aiohttp-jitter"
    description = "bare aiohttp loop + 0-10 ms jitter (experiment)"

    def _jitter(self) -> float:
        return random.random() * 0.01


class DedalusAsyncRun(Driver):
    """``Session.run`` per execution."""

    name = "dedalus_async"
    description = "dedalus_async, Session.run per execution"

    async def setup(self, base_url: str) -> None:
        self._session = Session(API_KEY, base_url=base_url)
        self._machines = _in_turn(base_url)
        await self._session.open()

    async def teardown(self) -> None:
        await self._session.aclose()

    async def one(self) -> Sample:
        result = await self._session.run(next(self._machines), COMMAND)
        if result.stdout != EXPECTED_STDOUT:
            return Sample(None, result.stats.detection_lag, f"unexpected {result!r}"[:300])
        return Sample(result, result.stats.detection_lag, None)


class DedalusAsyncNoJitter(DedalusAsyncRun):
    """``Session.run`` with ``hint_jitter=0``: an experiment, to price the jitter alone."""

    name = "dedalus_async-nojitter"
    description = "dedalus_async, Session.run, hint_jitter=0 (experiment)"

    async def setup(self, base_url: str) -> None:
        self._session = Session(API_KEY, base_url=base_url, poll=PollPolicy(hint_jitter=0.0))
        self._machines = _in_turn(base_url)
        await self._session.open()


class DedalusAsyncRunMany(DedalusAsyncRun):
    """``Session.run_many`` over every execution (its own workers and batching)."""

    name = "dedalus_async-run_many"
    description = "dedalus_async, Session.run_many"

    @classmethod
    def unavailable(cls) -> str | None:
        if not hasattr(Session, "run_many"):
            return "this dedalus_async has no Session.run_many yet"
        return None

    async def run(self, n: int, concurrency: int | None) -> list[Sample]:
        import dedalus_async

        # exported by the package once fan-out lands; until then from its module
        request_cls: Any = getattr(dedalus_async, "ExecutionRequest", None)
        if request_cls is None:
            from dedalus_async._fanout import ExecutionRequest as request_cls
        machines = self._machines
        requests = [request_cls(machine_id=next(machines), command=COMMAND) for _ in range(n)]
        run_many: Any = getattr(self._session, "run_many")  # noqa: B009 - absent in old versions
        outcomes = await run_many(
            requests, concurrency=concurrency or n, return_exceptions=True, **self._options()
        )
        samples = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                samples.append(_failed(outcome))
            elif outcome.stdout != EXPECTED_STDOUT:
                samples.append(Sample(None, None, f"unexpected {outcome!r}"[:300]))
            else:
                samples.append(Sample(outcome, outcome.stats.detection_lag, None))
        return samples

    def _options(self) -> dict[str, Any]:
        return {}


class DedalusAsyncRunManyJournal(DedalusAsyncRunMany):
    """``Session.run_many`` with a journal: a fresh SQLite file per run (what it costs to
    make the batch durable)."""

    name = "dedalus_async-run_many-journal"
    description = "dedalus_async, Session.run_many(journal=...)"

    @classmethod
    def unavailable(cls) -> str | None:
        import dedalus_async

        if not hasattr(dedalus_async, "SQLiteJournal"):
            return "this dedalus_async has no journal yet"
        return super().unavailable()

    async def setup(self, base_url: str) -> None:
        import tempfile

        await super().setup(base_url)
        self._folder = tempfile.TemporaryDirectory(prefix="bench-journal-")
        self._runs = 0

    async def teardown(self) -> None:
        await super().teardown()
        self._folder.cleanup()

    def _options(self) -> dict[str, Any]:
        self._runs += 1  # a new batch each run: a journal that resumed would send nothing
        return {"journal": f"{self._folder.name}/batch-{self._runs}.db"}


class DedalusAsyncRunManyCreates(DedalusAsyncRunMany):
    """``Session.run_many`` with 100 creates in flight (the connection pool's size) instead
    of the default 10: an experiment, to price the create limit in wall time."""

    name = "dedalus_async-run_many-cc100"
    description = "dedalus_async, Session.run_many, create_concurrency=100 (experiment)"

    def _options(self) -> dict[str, Any]:
        return {"create_concurrency": 100}


class OfficialSdk(Driver):
    """``dedalus_sdk.AsyncDedalus`` with the polling loop its users write by hand."""

    name = "sdk"
    description = "official SDK (dedalus-sdk, httpx), hand-written loop"

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import dedalus_sdk  # noqa: F401
        except ImportError:
            return "dedalus_sdk is not installed (pip install dedalus-sdk==0.6.0)"
        return None

    def _http_client(self) -> Any:
        return None  # the SDK's own default: httpx

    async def setup(self, base_url: str) -> None:
        from dedalus_sdk import AsyncDedalus

        self._client = AsyncDedalus(
            api_key=API_KEY, base_url=base_url, http_client=self._http_client()
        )
        self._executions = self._client.machines.executions
        self._machines = _in_turn(base_url)

    async def teardown(self) -> None:
        await self._client.close()

    async def one(self) -> Sample:
        executions = self._executions
        machine_id = next(self._machines)
        execution = await executions.create(machine_id=machine_id, command=list(COMMAND))
        while execution.status not in TERMINAL:
            await asyncio.sleep((execution.retry_after_ms or 500) / 1000)
            execution = await executions.retrieve(
                machine_id=machine_id, execution_id=execution.execution_id
            )
        lag = _lag(execution.completed_at)
        output = None
        if execution.stdout_bytes or execution.stderr_bytes:
            output = await executions.output(
                machine_id=machine_id, execution_id=execution.execution_id
            )
        if output is None or output.stdout != EXPECTED_STDOUT:
            return Sample(None, lag, f"unexpected output {output!r}"[:300])
        return Sample((execution, output), lag, None)


class OfficialSdkAiohttp(OfficialSdk):
    """The official SDK on its optional aiohttp transport (``DefaultAioHttpClient``)."""

    name = "sdk-aiohttp"
    description = "official SDK on its aiohttp transport"

    @classmethod
    def unavailable(cls) -> str | None:
        missing = super().unavailable()
        if missing is not None:
            return missing
        try:
            import httpx_aiohttp  # noqa: F401
        except ImportError:
            return "httpx_aiohttp is not installed (pip install 'dedalus-sdk[aiohttp]==0.6.0')"
        return None

    def _http_client(self) -> Any:
        from dedalus_sdk import DefaultAioHttpClient

        return DefaultAioHttpClient()


DRIVERS: dict[str, type[Driver]] = {
    cls.name: cls
    for cls in (
        AiohttpLoop,
        AiohttpLoopJitter,
        DedalusAsyncRun,
        DedalusAsyncRunMany,
        DedalusAsyncRunManyJournal,
        DedalusAsyncRunManyCreates,
        DedalusAsyncNoJitter,
        OfficialSdk,
        OfficialSdkAiohttp,
    )
}


def available(name: str) -> str | None:
    """``None`` if driver ``name`` can run here, else why not."""
    cls = DRIVERS.get(name)
    if cls is None:
        return f"unknown driver {name!r}; known: {', '.join(DRIVERS)}"
    return cls.unavailable()
