"""The library's own CPU per execution, with the network taken out.

Run as ``python -m benchmarks.libcost [--executions N] [--profile]``. A ``Session`` is
given a canned transport (recorded-looking responses, no sockets) and a clock whose sleep
returns at once, then ``Session.run`` is called N times in a row: what remains is exactly
the Python the library runs per execution (validation, request building, decoding,
the poll and retry decisions, the result records), 5 requests each. The end-to-end
benchmark cannot resolve a few microseconds per request on a noisy machine; this can, so
it is what ``PROFILE.md``'s before/after figures for the pure code come from.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import time
from datetime import UTC, datetime
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from dedalus_async import Session
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


def _execution(status: str, **fields: Any) -> bytes:
    body = {
        "execution_id": "exe-0123456789abcdef",
        "machine_id": "dm-654ed9cb-4d87-556a-a534-d08332976a86",
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
    args = parser.parse_args(argv)
    per = asyncio.run(measure(args.executions, args.repeats, args.profile, args.otel))
    print(
        f"dedalus_async CPU without the network{' (OpenTelemetry on)' if args.otel else ''}: "
        f"{per * 1e6:.1f} us per execution, "
        f"{per / 5 * 1e6:.1f} us per request (best of {args.repeats} x {args.executions})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
