"""One measurement in its own process: one driver, N executions, one JSON line out.

Run as ``python -m benchmarks.client --driver NAME --base-url URL --executions N
[--concurrency C]``. A fresh process per measurement keeps drivers from sharing a heap,
a garbage collector's history or a peak RSS, and lets ``ru_maxrss`` mean "this run".

The measured window is the fan-out alone: after the driver is set up and has run a short
warm-up (so that one-time costs such as lazy imports and connection set-up are not
counted as per-request costs), and before it is torn down. Inside it the process records
CPU time (user + system, ``time.process_time``), wall time, the peak RSS growth, and each
execution's detection lag; the server's counters (requests by kind, polls before the
hint) are read from ``/_bench/stats`` after a reset at the start of the window.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sys
import time
import tracemalloc
import urllib.request
from typing import Any

from .drivers import DRIVERS, Sample
from .server import percentile, to_ms

__all__ = ["main", "measure", "percentile"]

# Loopback only: never let a proxy from the environment sit between us and the server.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _control(base_url: str, what: str) -> dict[str, Any]:
    """Reset or read the server's counters (a blocking call, made outside the window)."""
    method = "POST" if what == "reset" else "GET"
    request = urllib.request.Request(f"{base_url}/_bench/{what}", method=method)
    with _OPENER.open(request, timeout=30) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def _rss_kib() -> int:
    """The resident set size right now, in KiB (Linux); the peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return _maxrss_kib()


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere


async def measure(
    driver_name: str,
    base_url: str,
    executions: int,
    concurrency: int | None,
    *,
    warmup: int = 20,
    trace_memory: bool = False,
    profile: str | None = None,
) -> dict[str, Any]:
    """Run one measurement in this process and return its figures."""
    driver = DRIVERS[driver_name]()
    await driver.setup(base_url)
    try:
        if warmup:
            await driver.run(warmup, warmup)
        _control(base_url, "reset")
        gc.collect()
        rss_before = _rss_kib()
        profiler = None
        if profile is not None:
            import cProfile

            # CPU time, not wall time: the seconds spent waiting in epoll are not a cost
            profiler = cProfile.Profile(time.process_time)
        if trace_memory:
            tracemalloc.start()
        if profiler is not None:
            profiler.enable()
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        samples: list[Sample] = await driver.run(executions, concurrency)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile))
        traced_peak = traced_kept = None
        if trace_memory:
            # ``kept`` is what is still allocated with every sample (and its record) alive:
            # the records themselves; ``peak - kept`` is what waiting cost on top of them.
            traced_kept, traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        rss_peak = _maxrss_kib()
        server = _control(base_url, "stats")
    finally:
        await driver.teardown()
    lags = [s.lag for s in samples if s.lag is not None]
    errors = [s.error for s in samples if s.error is not None]
    return {
        "driver": driver_name,
        "executions": executions,
        "concurrency": concurrency,
        "completed": len(samples) - len(errors),
        "errors": len(errors),
        "first_errors": sorted(set(errors))[:3],
        "wall_s": wall1 - wall0,
        "cpu_s": cpu1 - cpu0,
        "user_s": usage1.ru_utime - usage0.ru_utime,
        "sys_s": usage1.ru_stime - usage0.ru_stime,
        "context_switches": (usage1.ru_nvcsw - usage0.ru_nvcsw)
        + (usage1.ru_nivcsw - usage0.ru_nivcsw),
        "rss_growth_kib": max(0, rss_peak - rss_before),
        "traced_peak_bytes": traced_peak,
        "traced_kept_bytes": traced_kept,
        "lag_p50_ms": to_ms(percentile(lags, 50)),
        "lag_p99_ms": to_ms(percentile(lags, 99)),
        "lag_max_ms": to_ms(max(lags) if lags else None),
        "server": server,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.client", description=__doc__)
    parser.add_argument("--driver", required=True, choices=sorted(DRIVERS))
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--executions", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=None, help="default: all at once")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--trace-memory", action="store_true")
    parser.add_argument("--profile", metavar="PATH", help="write a cProfile of the window")
    args = parser.parse_args(argv)
    unavailable = DRIVERS[args.driver].unavailable()
    if unavailable is not None:
        print(json.dumps({"driver": args.driver, "skipped": unavailable}), flush=True)
        return 0
    result = asyncio.run(
        measure(
            args.driver,
            args.base_url,
            args.executions,
            args.concurrency,
            warmup=args.warmup,
            trace_memory=args.trace_memory,
            profile=args.profile,
        )
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
