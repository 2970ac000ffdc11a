"""The library's own CPU per execution, with the network taken out.

Run as ``python -m benchmarks.libcost [--executions N] [--profile]``. A ``Session`` is
given a canned transport (recorded-looking responses, no sockets) and a clock whose sleep
returns at once, then ``Session.run`` is called N times in a row: what remains is exactly
the Python the library runs per execution (validation, request building, decoding,
the poll and retry decisions, the result records), 5 requests each. The end-to-end
benchmark cannot resolve a few microseconds per request on a noisy machine; this can, so
it is what ``PROFILE.md``'s before/after figures for the pure code come from.

``--mode run`` and ``--mode run_many`` instead put N executions in flight at once
(``Session.run`` each, or one ``Session.run_many``, ``--create-concurrency``) against
:class:`SimulatedServer` in virtual time (:class:`VirtualClock`): creates, GETs, list
pages newest first and outputs, ``--hints phase|remaining``; the fan-out's own Python per
execution against ``run``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import heapq
import json
import math
import pstats
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from dedalus_async import ExecutionRequest, PollPolicy, Session
from dedalus_async._wire import Request, Response

__all__ = ["main", "measure"]

_HEADERS = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
_STARTED = {
    "started_at": "2026-01-01T00:00:00.300Z",
    "stdout_bytes": 0,
    "stderr_bytes": 0,
    "stdout_truncated": False,
    "stderr_truncated": False,
}


_MACHINE = "dm-654ed9cb-4d87-556a-a534-d08332976a86"


def _execution(status: str, **fields: Any) -> bytes:
    body = {
        "execution_id": "exe-0123456789abcdef",
        "machine_id": _MACHINE,
        "command": ["echo", "ok"],
        "created_at": "2026-01-01T00:00:00.000Z",
        "status": status,
        **fields,
    }
    return json.dumps(body, separators=(",", ":")).encode()


# What the benchmark server answers, in order: the create, three polls, the output.
_CREATE = _execution("wake_in_progress", retry_after_ms=200)
_POLLS = (
    _execution("queued", retry_after_ms=100),
    _execution("running", retry_after_ms=300, **_STARTED),
    _execution(
        "succeeded",
        **{**_STARTED, "stdout_bytes": 3},
        completed_at="2026-01-01T00:00:00.600Z",
        exit_code=0,
    ),
)
_OUTPUT = json.dumps(
    {"execution_id": "exe-0123456789abcdef", "stdout": "ok\n", "stderr": "", "stdout_bytes": 3}
).encode()


class CannedTransport:
    """Answers like the benchmark server would, without a socket; one execution at a time."""

    def __init__(self) -> None:
        self._poll = 0

    async def open(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def send(self, request: Request, *, timeout: float | None = None) -> Response:
        if request.method == "POST":
            self._poll = 0
            return Response(200, _HEADERS, _CREATE)
        if request.path.endswith("/output"):
            return Response(200, _HEADERS, _OUTPUT)
        body = _POLLS[self._poll]
        self._poll += 1
        return Response(200, _HEADERS, body)


class InstantClock:
    """Real time, but every sleep returns at once."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        return None


def _sdk_providers() -> dict[str, Any]:
    """OpenTelemetry SDK providers that record everything and export nowhere: the cost of
    the spans and metrics themselves (an exporter's cost is the application's choice)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    return {
        "tracer_provider": TracerProvider(),
        "meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()]),
    }


async def measure(executions: int, repeats: int, profile: bool, otel: bool = False) -> float:
    """The lowest CPU seconds per execution over ``repeats`` batches of ``executions``;
    ``otel``: with OpenTelemetry SDK providers configured."""
    session = Session(
        "bench-key",
        base_url="http://127.0.0.1:9",
        clock=InstantClock(),
        transport=CannedTransport(),  # recorded-looking responses, no sockets
        **(_sdk_providers() if otel else {}),
    )
    best = float("inf")
    async with session:
        for _ in range(200):  # warm-up
            await session.run("dm-654ed9cb-4d87-556a-a534-d08332976a86", ["echo", "ok"])
        profiler = cProfile.Profile(time.process_time) if profile else None
        for _ in range(repeats):
            if profiler is not None:
                profiler.enable()
            start = time.process_time()
            for _ in range(executions):
                result = await session.run(
                    "dm-654ed9cb-4d87-556a-a534-d08332976a86", ["echo", "ok"]
                )
            best = min(best, (time.process_time() - start) / executions)
            if profiler is not None:
                profiler.disable()
            assert result.stdout == "ok\n", result
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return best


# --- run_many against a simulated server in virtual time ------------------------------

_MACHINES = tuple(f"dm-654ed9cb-4d87-556a-a534-d0833297{i:04x}" for i in range(8))
# phases as the benchmark server's Script.default: (status, seconds, extra fields)
_PHASES = (("wake_in_progress", 0.2), ("queued", 0.1), ("running", 0.3))
_LATENCY = 0.002  # virtual seconds each request takes, so that creates spread out
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class VirtualClock:
    """Virtual time for many concurrent tasks: a sleep parks its task until the event loop
    has nothing else to run, then time jumps to the earliest wake-up. Deterministic, and
    a wait of seconds costs what the library does, not the seconds."""

    def __init__(self) -> None:
        self.t = 0.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return _EPOCH + timedelta(seconds=self.t)

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._timers, (self.t + max(seconds, 0.0), self._seq, future))
        await future

    async def keep_time(self, until: asyncio.Future[Any]) -> None:
        """Advance time whenever every other task is parked; ends when ``until`` is done."""
        loop = asyncio.get_running_loop()
        ready = loop._ready  # type: ignore[attr-defined]  # the loop's run queue (CPython)
        timers = self._timers
        while not until.done():
            await asyncio.sleep(0)
            if ready:
                continue  # something else can still run at this moment
            while timers and timers[0][2].done():
                heapq.heappop(timers)  # cancelled sleeps
            if not timers:
                continue
            self.t = max(self.t, timers[0][0])
            while timers and timers[0][0] <= self.t:
                _, _, future = heapq.heappop(timers)
                if not future.done():
                    future.set_result(None)


# an execution's body in each phase (the hint appended at the time of the request), and
# finished: built once, then given each execution's IDs with two byte replacements
_TEMPLATES = (
    *(
        _execution(status, **(_STARTED if status == "running" else {}))[:-1] + b',"retry_after_ms":'
        for status, _ in _PHASES
    ),
    _POLLS[-1],
)


class SimulatedServer:
    """A canned transport with the benchmark server's behaviour in virtual time: every
    execution goes through ``_PHASES`` from its create and ends ``succeeded``; GETs, list
    pages (newest first, offset cursors) and outputs are answered from bytes built at the
    create, so the server's own work per request is a few joins, not JSON encoding."""

    def __init__(self, clock: VirtualClock, hints: str) -> None:
        self.clock = clock
        self.remaining = hints == "remaining"
        self.requests: dict[str, int] = {"create": 0, "poll": 0, "list": 0, "output": 0}
        self._born: dict[str, float] = {}
        self._bodies: dict[str, list[tuple[bytes, bytes]]] = {}
        self._lists: dict[str, list[str]] = {}
        self._count = 0

    async def open(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def reset(self) -> None:
        for kind in self.requests:
            self.requests[kind] = 0

    def _create(self, machine_id: str) -> str:
        self._count += 1
        execution_id = f"exe-{self._count:016x}"
        self._born[execution_id] = self.clock.t
        self._lists.setdefault(machine_id, []).append(execution_id)
        ids = (
            (b"exe-0123456789abcdef", execution_id.encode()),
            (_MACHINE.encode(), machine_id.encode()),
        )
        bodies = []
        for template in _TEMPLATES:
            for old, new in ids:
                template = template.replace(old, new)
            bodies.append((template, b"}"))
        bodies[-1] = (bodies[-1][0], b"")
        self._bodies[execution_id] = bodies
        return execution_id

    def _item(self, execution_id: str) -> bytes:
        age = self.clock.t - self._born[execution_id]
        bodies = self._bodies[execution_id]
        end = 0.0
        for phase, (_, seconds) in enumerate(_PHASES):
            end += seconds
            if age < end:
                head, tail = bodies[phase]
                hint = end - age if self.remaining else seconds
                return head + str(max(1, math.ceil(hint * 1000))).encode() + tail
        return bodies[-1][0]

    async def send(self, request: Request, *, timeout: float | None = None) -> Response:
        await self.clock.sleep(_LATENCY)
        parts = request.path.split("/")  # /v1/machines/M/executions[/E[/output]]
        if request.method == "POST":
            self.requests["create"] += 1
            return Response(200, _HEADERS, self._item(self._create(parts[3])))
        if len(parts) == 5:
            self.requests["list"] += 1
            params = request.params or {}
            listed = self._lists[parts[3]]
            offset = int(params.get("cursor", 0))
            end = offset + int(params.get("limit", 100))
            page = listed[max(len(listed) - end, 0) : max(len(listed) - offset, 0)]
            items = b",".join(self._item(e) for e in reversed(page))
            cursor = b'"%d"' % end if end < len(listed) else b"null"
            return Response(
                200, _HEADERS, b'{"items":[' + items + b'],"next_cursor":' + cursor + b"}"
            )
        if len(parts) == 7:
            self.requests["output"] += 1
            return Response(
                200, _HEADERS, _OUTPUT.replace(b"exe-0123456789abcdef", parts[5].encode())
            )
        self.requests["poll"] += 1
        return Response(200, _HEADERS, self._item(parts[5]))


async def _batch(
    session: Session, mode: str, executions: int, create_concurrency: int
) -> list[Any]:
    if mode == "run":
        return await asyncio.gather(
            *(session.run(_MACHINES[i % len(_MACHINES)], ["echo", "ok"]) for i in range(executions))
        )
    requests = [
        ExecutionRequest(machine_id=_MACHINES[i % len(_MACHINES)], command=["echo", "ok"])
        for i in range(executions)
    ]
    return await session.run_many(
        requests, concurrency=executions, create_concurrency=create_concurrency
    )


async def measure_many(
    mode: str,
    executions: int,
    repeats: int,
    profile: bool,
    hints: str = "phase",
    create_concurrency: int = 100,
) -> tuple[float, float]:
    """``executions`` at once through ``Session.run`` (``mode="run"``, one task each) or
    one ``Session.run_many``, against :class:`SimulatedServer` in virtual time: the lowest
    CPU seconds per execution over ``repeats`` batches (after one warm-up batch), and the
    requests per execution."""
    profiler = cProfile.Profile(time.process_time) if profile else None
    best = float("inf")
    sent = 0.0
    for repeat in range(repeats + 1):  # the first is the warm-up
        clock = VirtualClock()
        server = SimulatedServer(clock, hints)
        session = Session(
            "bench-key",
            base_url="http://127.0.0.1:9",
            clock=clock,
            transport=server,
            poll=PollPolicy(hint_jitter=0.0),  # as the benchmark's drivers
        )
        async with session:
            if profiler is not None and repeat:
                profiler.enable()
            start = time.process_time()
            task = asyncio.ensure_future(_batch(session, mode, executions, create_concurrency))
            await clock.keep_time(task)
            results = task.result()
            spent = (time.process_time() - start) / executions
            if profiler is not None and repeat:
                profiler.disable()
        assert all(result.stdout == "ok\n" for result in results), results[:3]
        if repeat:
            best = min(best, spent)
            sent = sum(server.requests.values()) / executions
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return best, sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.libcost", description=__doc__)
    parser.add_argument("--executions", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a cProfile (CPU time)")
    parser.add_argument(
        "--otel",
        action="store_true",
        help="with OpenTelemetry SDK tracer and meter providers (needs opentelemetry-sdk)",
    )
    parser.add_argument(
        "--mode",
        choices=("sequential", "run", "run_many"),
        default="sequential",
        help="sequential: Session.run one after another on canned answers (default); run / "
        "run_many: --executions at once (Session.run each / one Session.run_many) against a "
        "simulated server in virtual time",
    )
    parser.add_argument("--hints", choices=("phase", "remaining"), default="phase")
    parser.add_argument("--create-concurrency", type=int, default=100)
    args = parser.parse_args(argv)
    if args.mode != "sequential":
        per, sent = asyncio.run(
            measure_many(
                args.mode,
                args.executions,
                args.repeats,
                args.profile,
                args.hints,
                args.create_concurrency,
            )
        )
        print(
            f"dedalus_async {args.mode}, {args.executions} at once ({args.hints} hints"
            + (f", create_concurrency={args.create_concurrency}" if args.mode == "run_many" else "")
            + f"): {per * 1e6:.1f} us per execution, {sent:.2f} requests per execution, "
            f"{per / sent * 1e6:.1f} us per request (best of {args.repeats})"
        )
        return 0
    per = asyncio.run(measure(args.executions, args.repeats, args.profile, args.otel))
    print(
        f"dedalus_async CPU without the network{' (OpenTelemetry on)' if args.otel else ''}: "
        f"{per * 1e6:.1f} us per execution, "
        f"{per / 5 * 1e6:.1f} us per request (best of {args.repeats} x {args.executions})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
