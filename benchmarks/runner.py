"""The runner: alternate the drivers round by round, then print medians and ratios.

Every measurement gets a fresh server process and a fresh client process (see
:mod:`benchmarks.server` and :mod:`benchmarks.client`). Within a scenario the drivers run
round by round, A B C, B C A, C A B, ..., so that a noisy neighbour or a thermal drift hits
every driver alike and none always goes first; each figure is then divided by the bare
aiohttp loop's figure *from the same round*, and the tables show the median of those
per-round ratios (with their range in the detail tables) next to the median absolute value.

Scenarios:

* ``c100``: ``--cpu-executions`` executions, at most ``--concurrency`` at a time: the
  client CPU per HTTP request (the server counts the requests).
* ``fanout-N`` for each ``--sizes`` N: all N executions started at once: wall time, peak
  RSS growth per execution, requests per execution, polls before the hint, detection lag.
* ``lag``: ``--lag-executions`` at ``--lag-concurrency``, a load light enough that the
  detection lag shows the client's schedule rather than the server's queue. Two lags are
  reported: from ``completed_at`` (seen by the client), and *over the hint* (measured by
  the server: see :mod:`benchmarks.server`), which leaves out what the server's own hints
  imposed.
* the server's style: ``--hints whole-phase|remaining`` (each hint the phase's whole
  duration, or the time left in it), ``--list-order oldest|newest`` and ``--machines N``
  (see :mod:`benchmarks.server`). A style other than the default (whole-phase, oldest
  first, one machine) is part of each scenario's name and title, so runs of several
  styles merge into one report (``--from-json``).
* with ``--memory`` (the default), one more run per driver and fan-out size under
  ``tracemalloc``: the traced peak per execution, and the part of it that is not the
  records kept at the end (what waiting costs). Its timings are not used.

The official SDK on httpx needs minutes for a thousand executions waiting at once: it runs
fan-outs only up to ``--slow-max-size`` and only in the first ``--slow-rounds`` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import attrs

from dedalus_async._server import LIST_ORDERS

from .drivers import DRIVERS, available

__all__ = ["Scenario", "collect", "main", "merge", "render", "summarise"]

BASELINE = "aiohttp"
# the runner's names for the benchmark server's hint styles
HINTS = {"whole-phase": "phase", "remaining": "remaining"}
DEFAULT_DRIVERS = ("aiohttp", "dedalus_async", "dedalus_async-run_many", "sdk", "sdk-aiohttp")
SLOW_DRIVERS = ("sdk",)
_ROOT = Path(__file__).resolve().parent.parent
Result = dict[str, Any]


@attrs.frozen
class Scenario:
    """One workload: ``executions`` at ``concurrency`` at a time (``None``: all at once)."""

    name: str
    title: str
    executions: int
    concurrency: int | None


def _sizes(text: str) -> list[int]:
    sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive")
    return sizes


def _drivers(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in DRIVERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown driver(s) {', '.join(unknown)}; known: {', '.join(DRIVERS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare dedalus_async with a bare aiohttp loop and the official SDK "
        "against a fake server on loopback. Every figure is a ratio to the bare aiohttp "
        "loop measured in the same round.",
    )
    parser.add_argument(
        "--sizes", type=_sizes, default=[1000, 10000], help="fan-out sizes, e.g. 1000,10000"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--drivers",
        type=_drivers,
        default=list(DEFAULT_DRIVERS),
        help=f"comma-separated, from: {', '.join(DRIVERS)}",
    )
    parser.add_argument(
        "--cpu-executions", type=int, default=1000, help="0: no CPU (concurrency) scenario"
    )
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--lag-executions",
        type=int,
        default=1000,
        help="0: no lag scenario (default 1000: enough for a p99 that is not one outlier)",
    )
    parser.add_argument("--lag-concurrency", type=int, default=40)
    parser.add_argument(
        "--slow-max-size",
        type=int,
        default=1000,
        help="largest fan-out the official SDK on httpx runs (default 1000)",
    )
    parser.add_argument(
        "--slow-rounds",
        type=int,
        default=1,
        help="rounds in which the official SDK on httpx runs fan-outs (default 1)",
    )
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--time-scale", type=float, default=1.0, help="scale the script")
    parser.add_argument(
        "--hints",
        choices=sorted(HINTS),
        default="whole-phase",
        help="the server's retry_after_ms: the phase's whole duration (default) or the "
        "time remaining in it",
    )
    parser.add_argument(
        "--list-order",
        choices=LIST_ORDERS,
        default="oldest",
        help="the order of a machine's executions list (default oldest first)",
    )
    parser.add_argument(
        "--machines", type=int, default=1, help="spread the executions over N machines"
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument(
        "--shared-server",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="one server process for every run instead of a fresh one per run",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every raw result here")
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        nargs="+",
        help="run nothing: render the results saved by earlier --json runs, merged",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of seconds: 1 round, 20-30 executions, a script twice as fast, "
        "one server process",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.sizes = [30]
        args.cpu_executions = 20
        args.concurrency = 10
        args.lag_executions = 0
        # hints of 100/50/150 ms: not below dedalus_async's 50 ms hint floor, so every
        # client still makes the same 5 requests per execution
        args.time_scale = 0.5
        args.warmup = 2
        args.run_timeout = 120.0
        args.shared_server = True
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.machines < 1:
        parser.error("--machines must be at least 1")
    return args


def _style(args: argparse.Namespace) -> tuple[str, str]:
    """The server's style as a scenario name suffix and a title suffix ("" by default)."""
    parts: list[tuple[str, str]] = []
    if args.hints != "whole-phase":
        parts.append((args.hints, f"{args.hints} hints"))
    if args.list_order != "oldest":
        parts.append((args.list_order, f"{args.list_order} first"))
    if args.machines != 1:
        parts.append((f"m{args.machines}", f"{args.machines} machines"))
    if not parts:
        return "", ""
    return "-" + "-".join(n for n, _ in parts), " (" + ", ".join(t for _, t in parts) + ")"


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    name, title = _style(args)
    return [
        Scenario(s.name + name, s.title + title, s.executions, s.concurrency)
        for s in _scenarios(args)
    ]


def _scenarios(args: argparse.Namespace) -> list[Scenario]:
    out: list[Scenario] = []
    if args.cpu_executions > 0:
        out.append(
            Scenario(
                f"c{args.concurrency}",
                f"{args.cpu_executions:,} executions, concurrency {args.concurrency}",
                args.cpu_executions,
                args.concurrency,
            )
        )
    out += [Scenario(f"fanout-{n}", f"{n:,} at once", n, None) for n in args.sizes]
    if args.lag_executions > 0:
        out.append(
            Scenario(
                "lag",
                f"{args.lag_executions:,} executions, concurrency {args.lag_concurrency}",
                args.lag_executions,
                args.lag_concurrency,
            )
        )
    return out


# --- running one measurement -------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the child processes import this package the way we did, wherever we were started
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    return env


class ServerProcess:
    """``python -m benchmarks.server`` in a child process; a context manager."""

    def __init__(self, args: argparse.Namespace) -> None:
        command = [sys.executable, "-m", "benchmarks.server", "--time-scale", str(args.time_scale)]
        command += ["--hints", HINTS[args.hints], "--list-order", args.list_order]
        command += ["--machines", str(args.machines)]
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert self._process.stdout is not None
        ready = self._process.stdout.readline().split()
        if len(ready) != 2 or ready[0] != "READY":
            self.close()
            raise RuntimeError(f"benchmark server did not start: {ready!r}")
        self.base_url = ready[1]

    def close(self) -> None:
        process = self._process
        if process.stdin is not None and not process.stdin.closed:
            process.stdin.close()  # the server stops at the end of its input
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run_one(
    driver: str,
    scenario: Scenario,
    args: argparse.Namespace,
    *,
    trace_memory: bool = False,
    server: ServerProcess | None = None,
) -> Result:
    """Run one client process against ``server`` (default: a fresh one); its figures."""
    if server is None:
        with ServerProcess(args) as fresh:
            return run_one(driver, scenario, args, trace_memory=trace_memory, server=fresh)
    command = [
        sys.executable,
        "-m",
        "benchmarks.client",
        "--driver",
        driver,
        "--base-url",
        server.base_url,
        "--executions",
        str(scenario.executions),
        "--warmup",
        str(args.warmup),
    ]
    if scenario.concurrency is not None:
        command += ["--concurrency", str(scenario.concurrency)]
    if trace_memory:
        command.append("--trace-memory")
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=args.run_timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"driver": driver, "failed": f"no result within {args.run_timeout:g} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"driver": driver, "failed": f"exit {done.returncode}: {' | '.join(tail)}"}
    result: Result = json.loads(lines[-1])
    return result


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _brief(result: Result) -> str:
    if "skipped" in result or "failed" in result:
        return str(result.get("skipped") or result.get("failed"))
    requests = result["server"]["requests"]
    return (
        f"wall {result['wall_s']:.2f}s cpu {result['cpu_s']:.2f}s "
        f"({result['cpu_s'] / max(requests, 1) * 1000:.3f} ms/request) "
        f"requests {requests} errors {result['errors']}"
    )


def _skip_reason(
    driver: str, scenario: Scenario, round_: int, args: argparse.Namespace
) -> str | None:
    if driver not in SLOW_DRIVERS or scenario.concurrency is not None:
        return None
    if scenario.executions > args.slow_max_size:
        return f"not run above {args.slow_max_size:,} at once (--slow-max-size)"
    if round_ > args.slow_rounds:
        return ""  # it ran in earlier rounds: nothing to say in the table
    return None


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Run every scenario round by round; return the raw results."""
    drivers: list[str] = []
    skipped: dict[str, str] = {}
    for name in args.drivers:
        why = available(name)
        if why is None:
            drivers.append(name)
        else:
            skipped[name] = why
            _log(f"skipping {name}: {why}")
    runs: dict[str, dict[str, list[Result | None]]] = {}
    memory: dict[str, dict[str, Result]] = {}
    not_run: dict[str, dict[str, str]] = {}
    shared = ServerProcess(args) if args.shared_server else None
    try:
        for scenario in scenarios(args):
            _scenario(scenario, drivers, args, shared, runs, memory, not_run)
    finally:
        if shared is not None:
            shared.close()
    return {
        "meta": _meta(args),
        "scenarios": [attrs.asdict(s) for s in scenarios(args)],
        "drivers": drivers,
        "skipped": skipped,
        "not_run": not_run,
        "runs": runs,
        "memory": memory,
    }


def _scenario(
    scenario: Scenario,
    drivers: list[str],
    args: argparse.Namespace,
    shared: ServerProcess | None,
    runs: dict[str, dict[str, list[Result | None]]],
    memory: dict[str, dict[str, Result]],
    not_run: dict[str, dict[str, str]],
) -> None:
    """Run one scenario, its rounds alternating the drivers, then its memory runs."""
    runs[scenario.name] = {d: [] for d in drivers}
    for round_ in range(1, args.rounds + 1):
        # each round starts with the next driver: no driver always runs first or last
        shift = (round_ - 1) % len(drivers)
        for driver in drivers[shift:] + drivers[:shift]:
            why = _skip_reason(driver, scenario, round_, args)
            if why is not None:
                runs[scenario.name][driver].append(None)  # keeps rounds aligned
                if why:
                    not_run.setdefault(scenario.name, {})[driver] = why
                continue
            started = time.monotonic()
            result = run_one(driver, scenario, args, server=shared)
            runs[scenario.name][driver].append(result)
            _log(
                f"[{scenario.name} round {round_}/{args.rounds}] {driver}: "
                f"{_brief(result)} ({time.monotonic() - started:.0f}s)"
            )
    if args.memory and scenario.concurrency is None:
        memory[scenario.name] = {}
        for driver in drivers:
            if _skip_reason(driver, scenario, 1, args) is not None:
                continue
            result = run_one(driver, scenario, args, trace_memory=True, server=shared)
            memory[scenario.name][driver] = result
            _log(f"[{scenario.name} tracemalloc] {driver}: {_brief(result)}")


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    versions: dict[str, str] = {}
    for dist in ("dedalus-async", "aiohttp", "orjson", "cattrs", "dedalus-sdk", "httpx"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "versions": versions,
        "argv": sys.argv[1:],
        "rounds": args.rounds,
        "server": {"hints": args.hints, "list_order": args.list_order, "machines": args.machines},
    }


# --- summarising -------------------------------------------------------------------------


def _ok(result: Result | None) -> bool:
    return result is not None and "wall_s" in result


def _cpu_per_request(result: Result) -> float | None:
    requests = result["server"]["requests"]
    return float(result["cpu_s"]) / requests if requests else None


def _cpu_per_execution(result: Result) -> float:
    return float(result["cpu_s"]) / float(result["executions"])


def _wall(result: Result) -> float:
    return float(result["wall_s"])


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratios(
    results: list[Result | None],
    baseline: list[Result | None],
    metric: Callable[[Result], float | None],
) -> list[float]:
    """``metric(run) / metric(baseline run of the same round)``, for each round both ran."""
    out: list[float] = []
    for run, base in zip(results, baseline, strict=False):
        if run is None or base is None or not (_ok(run) and _ok(base)):
            continue
        a, b = metric(run), metric(base)
        if a is not None and b:
            out.append(a / b)
    return out


def summarise(raw: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per scenario and driver: medians, per-round ratios to the baseline, and counts."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, by_driver in raw["runs"].items():
        baseline: list[Result | None] = by_driver.get(BASELINE, [])
        out[name] = {}
        for driver, results in by_driver.items():
            ok: list[Result] = [r for r in results if r is not None and _ok(r)]
            if not ok:
                failures = [r.get("failed") or r.get("skipped") for r in results if r]
                if failures:
                    out[name][driver] = {"failed": str(failures[0])}
                continue
            server = [r["server"] for r in ok]
            row: dict[str, Any] = {
                "rounds": len(ok),
                "wall_s": _median([_wall(r) for r in ok]),
                "cpu_s": _median([r["cpu_s"] for r in ok]),
                "cpu_per_request": _median([_cpu_per_request(r) for r in ok]),
                "cpu_per_execution": _median([r["cpu_s"] / r["executions"] for r in ok]),
                "requests_per_execution": _median(
                    [s["requests"] / r["executions"] for s, r in zip(server, ok, strict=True)]
                ),
                "rss_kib_per_execution": _median(
                    [r["rss_growth_kib"] / r["executions"] for r in ok]
                ),
                "lag_p50_ms": _median([r["lag_p50_ms"] for r in ok]),
                "lag_p99_ms": _median([r["lag_p99_ms"] for r in ok]),
                "lag_max_ms": max((r["lag_max_ms"] or 0.0) for r in ok),
                "over_hint_p50_ms": _median([s.get("over_hint_p50_ms") for s in server]),
                "over_hint_p99_ms": _median([s.get("over_hint_p99_ms") for s in server]),
                "over_hint_max_ms": max((s.get("over_hint_max_ms") or 0.0) for s in server),
                "early_polls": sum(s["early_polls"] for s in server),
                "early_own": sum(s.get("early_own", 0) for s in server),
                "checked_polls": sum(s["checked_polls"] for s in server),
                "min_margin_ms": min(
                    (s["min_margin_ms"] for s in server if s["min_margin_ms"] is not None),
                    default=None,
                ),
                "errors": sum(r["errors"] + r["server"]["errors"] for r in ok),
                "first_errors": next((r["first_errors"] for r in ok if r["first_errors"]), []),
                "by_kind": server[-1]["by_kind"],
            }
            if baseline:
                row["wall_ratios"] = _ratios(results, baseline, _wall)
                row["cpu_ratios"] = _ratios(results, baseline, _cpu_per_request)
                row["cpu_exec_ratios"] = _ratios(results, baseline, _cpu_per_execution)
            traced = raw["memory"].get(name, {}).get(driver)
            if traced and traced.get("traced_peak_bytes") is not None:
                n = traced["executions"]
                peak, kept = traced["traced_peak_bytes"], traced["traced_kept_bytes"]
                row["traced_kib_per_execution"] = peak / 1024 / n
                row["waiting_kib_per_execution"] = (peak - kept) / 1024 / n
            out[name][driver] = row
    return out


# --- rendering ---------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _ratio(ratios: list[float] | None, spread: bool = False) -> str:
    if not ratios:
        return ""
    text = f" ({statistics.median(ratios):.2f}x"
    if spread and len(ratios) > 1:
        text += f", {min(ratios):.2f}-{max(ratios):.2f}"
    return text + ")"


def _label(driver: str) -> str:
    return DRIVERS[driver].description if driver in DRIVERS else driver


def _cpu_cell(row: dict[str, Any] | None, spread: bool = False) -> str:
    if not row:
        return "not run"
    if "failed" in row:
        return f"failed: {row['failed']}"
    per = row["cpu_per_request"]
    ms = None if per is None else per * 1000
    return _fmt(ms, ".3f", " ms") + _ratio(row.get("cpu_ratios"), spread)


def _wall_cell(row: dict[str, Any] | None, why: str, spread: bool = False) -> str:
    if row is None:
        return why
    if "failed" in row:
        return f"failed: {row['failed']}"
    return _fmt(row["wall_s"], ".2f", " s") + _ratio(row.get("wall_ratios"), spread)


def render(raw: dict[str, Any]) -> str:
    """The Markdown report: the headline table, then one detail table per scenario."""
    summary = summarise(raw)
    scen = [Scenario(**s) for s in raw["scenarios"]]
    drivers: list[str] = raw["drivers"]
    meta = raw["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [
        f"dedalus_async benchmarks, {meta['date']}, {meta['machine']}, "
        f"Python {meta['python']} ({versions})",
        "",
        "Medians over the rounds of each scenario; (Nx) = median of the per-round ratios "
        "to the bare aiohttp loop run in the same round.",
        "",
    ]
    limited = [s for s in scen if s.concurrency is not None and s.name != "lag"]
    cpu = limited[0] if limited else None
    fanouts = [s for s in scen if s.concurrency is None]
    lag = next((s for s in scen if s.name == "lag"), cpu)
    largest = fanouts[-1] if fanouts else cpu
    # tracemalloc runs may exist for smaller fan-outs only (they are slow at the largest)
    traced = [s for s in fanouts if raw["memory"].get(s.name)]
    memory = traced[-1] if traced else largest
    head = ["client"]
    if cpu is not None:
        head.append(f"client CPU per request, concurrency {cpu.concurrency}")
    head += [f"wall time, {s.title}" for s in fanouts]
    if largest is not None:
        head.append(f"requests / execution ({largest.title})")
    if memory is not None:
        head.append(f"memory / waiting execution ({memory.title})")
    head.append("polls before the hint")
    if lag is not None:
        head.append(f"detection lag p50 / p99 ({lag.title})")
        head.append("lag over the hint p50 / p99")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for driver in drivers:
        cells = [_label(driver)]
        if cpu is not None:
            cells.append(_cpu_cell(summary[cpu.name].get(driver)))
        for s in fanouts:
            why = raw["not_run"].get(s.name, {}).get(driver, "not run")
            cells.append(_wall_cell(summary[s.name].get(driver), why))
        if largest is not None:
            big = _usable(summary[largest.name].get(driver))
            cells.append(_fmt(big.get("requests_per_execution"), ".2f"))
        if memory is not None:
            row = _usable(summary[memory.name].get(driver))
            cells.append(_fmt(row.get("waiting_kib_per_execution"), ".2f", " KiB"))
        cells.append(_early_cell(summary, driver))
        if lag is not None:
            row = _usable(summary[lag.name].get(driver))
            p50, p99 = row.get("lag_p50_ms"), row.get("lag_p99_ms")
            cells.append(_fmt(p50, ".0f") + " / " + _fmt(p99, ".0f", " ms"))
            p50, p99 = row.get("over_hint_p50_ms"), row.get("over_hint_p99_ms")
            cells.append(_fmt(p50, ".1f") + " / " + _fmt(p99, ".1f", " ms"))
        lines.append("| " + " | ".join(cells) + " |")
    for name, why in raw["skipped"].items():
        lines += ["", f"{name}: skipped, {why}"]
    for s in scen:
        rounds = max((len(r) for r in raw["runs"][s.name].values()), default=0)
        plural = "" if rounds == 1 else "s"
        lines += ["", f"### {s.name}: {s.title} ({rounds} round{plural})", ""]
        lines += _detail(summary[s.name], drivers, raw["not_run"].get(s.name, {}))
    return "\n".join(lines) + "\n"


def _usable(row: dict[str, Any] | None) -> dict[str, Any]:
    return {} if row is None or "failed" in row else row


def _early_cell(summary: dict[str, dict[str, dict[str, Any]]], driver: str) -> str:
    early = checked = 0
    for by_driver in summary.values():
        row = _usable(by_driver.get(driver))
        early += row.get("early_polls", 0)
        checked += row.get("checked_polls", 0)
    return f"{early} of {checked:,}"


_DETAIL_HEAD = [
    "driver",
    "wall (ratio, range)",
    "client CPU",
    "CPU / request (ratio, range)",
    "CPU / execution (ratio)",
    "requests / exec",
    "RSS growth / exec",
    "traced peak / exec",
    "waiting / exec",
    "early polls (own hints)",
    "min margin",
    "lag p50 / p99 / max",
    "over the hint p50 / p99 / max",
    "errors",
]


def _detail(
    rows: dict[str, dict[str, Any]], drivers: list[str], not_run: dict[str, str]
) -> list[str]:
    out = ["| " + " | ".join(_DETAIL_HEAD) + " |", "|" + "---|" * len(_DETAIL_HEAD)]
    blank = " |" * (len(_DETAIL_HEAD) - 2)
    for driver in drivers:
        row = rows.get(driver)
        if row is None or "failed" in row:
            why = not_run.get(driver, "not run") if row is None else f"failed: {row['failed']}"
            out.append(f"| {driver} | {why} |{blank}")
            continue
        lags = " / ".join(_fmt(row[k], ".0f") for k in ("lag_p50_ms", "lag_p99_ms", "lag_max_ms"))
        errors = str(row["errors"])
        if row["first_errors"]:
            errors += f" ({row['first_errors'][0]})"
        cells = [
            driver,
            _wall_cell(row, "", spread=True),
            _fmt(row["cpu_s"], ".2f", " s"),
            _cpu_cell(row, spread=True),
            _fmt(row["cpu_per_execution"] * 1000, ".2f", " ms")
            + _ratio(row.get("cpu_exec_ratios")),
            _fmt(row["requests_per_execution"], ".2f"),
            _fmt(row["rss_kib_per_execution"], ".2f", " KiB"),
            _fmt(row.get("traced_kib_per_execution"), ".2f", " KiB"),
            _fmt(row.get("waiting_kib_per_execution"), ".2f", " KiB"),
            f"{row['early_polls']} ({row['early_own']}) of {row['checked_polls']:,}",
            _fmt(row["min_margin_ms"], ".1f", " ms"),
            lags + " ms",
            " / ".join(
                _fmt(row[k], ".1f")
                for k in ("over_hint_p50_ms", "over_hint_p99_ms", "over_hint_max_ms")
            )
            + " ms",
            errors,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def merge(raws: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' raw results as one, e.g. fan-out sizes run by separate commands."""
    out: dict[str, Any] = {
        "meta": dict(raws[0]["meta"]),
        "scenarios": [],
        "drivers": [],
        "skipped": {},
        "not_run": {},
        "runs": {},
        "memory": {},
    }
    for raw in raws:
        for scenario in raw["scenarios"]:  # a scenario run twice: the later run wins
            name = scenario["name"]
            out["scenarios"] = [s for s in out["scenarios"] if s["name"] != name]
            out["scenarios"].append(scenario)
            out["runs"][name] = raw["runs"][name]
        out["drivers"] += [d for d in raw["drivers"] if d not in out["drivers"]]
        for key in ("skipped", "not_run", "memory"):
            out[key].update(raw[key])
    # fan-outs smallest first, then the rest as they came
    fanouts = sorted(
        (s for s in out["scenarios"] if s["concurrency"] is None), key=lambda s: s["executions"]
    )
    others = [s for s in out["scenarios"] if s["concurrency"] is not None]
    out["scenarios"] = others[:1] + fanouts + others[1:]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        raw = merge([json.loads(Path(p).read_text()) for p in args.from_json])
        print(render(raw), end="")
        return 0
    raw = collect(args)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    print(render(raw), end="")
    return 0
