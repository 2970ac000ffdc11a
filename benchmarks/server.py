"""The benchmark's server process: a FakeDedalus on loopback, plus a little bookkeeping.

Run as ``python -m benchmarks.server [--time-scale S] [--hints phase|remaining]
[--list-order oldest|newest] [--machines N]``. It prints one line,
``READY http://127.0.0.1:PORT``, then serves until its standard input closes (so it never
outlives the runner that started it). It lives in its own process so that the client's
CPU time is the client's alone.

Every execution follows ``Script.default`` (``wake_in_progress`` 0.2 s, ``queued`` 0.1 s,
``running`` 0.3 s, each phase's ``retry_after_ms`` hint equal to its duration), scaled by
``--time-scale``, and ends ``succeeded`` with ``stdout="ok\\n"`` so that every client also
fetches the output: 5 requests per execution when every poll lands on time.

The server's style is selectable, since the real service's is not documented:
``--hints remaining`` makes each hint the time left in the current phase (what a real
server likely sends) instead of the phase's whole duration; ``--list-order newest`` lists
a machine's executions newest first (offset cursors) instead of oldest first;
``--machines N`` spreads the executions over N machines: ``GET /_bench/config`` answers
``{"machines": [...]}``, and every driver creates its executions on them in turn.

A middleware watches the traffic without changing it:

* it counts requests by kind (create, poll, output, list, other) and error statuses;
* for every response carrying a hint (a create, a GET, or an item of a list page) it
  remembers when it was sent, and when the next GET of that execution arrives it checks
  the gap (``early_polls``). The gap is measured from the moment the server *sent* the
  hint, which is before the client received it, so a gap shorter than the hint proves
  the client looked early; none is ever counted wrongly. ``early_own`` counts the same
  way but only against the hints of the execution's own create and GETs, not those it
  appeared with in a page of the list.
* the first response that shows an execution terminal (a GET, or an item of a list page)
  gives its *lag over the hint*: the moment that response was sent, less the later of the
  moment the execution finished and the moment the latest hint shown for it before
  elapsed. The script's hints are each phase's whole duration, so a client that follows
  them to the letter reaches the end of the script later by every poll's small delay
  added up; the lag counted from ``completed_at`` includes that, the lag over the hint
  is only what the client (and the server's answer) added once it was free to look.

``GET /_bench/stats`` answers the counters as JSON, ``POST /_bench/reset`` zeroes them
(the client calls it after its warm-up). Both are answered by the middleware and never
reach the fake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dedalus_async import TERMINAL_STATUSES
from dedalus_async._server import LIST_ORDERS
from dedalus_async.testing import FakeDedalus, Outcome, Phase, Script
from dedalus_async.testing._fake_script import HINT_STYLES

__all__ = [
    "API_KEY",
    "MACHINE_ID",
    "ServerStats",
    "bench_script",
    "machine_ids",
    "main",
    "percentile",
    "to_ms",
]

#: The key every benchmark client presents.
API_KEY = "bench-key"
#: The machine every benchmark execution runs on.
MACHINE_ID = "dm-654ed9cb-4d87-556a-a534-d08332976a86"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bench_script(time_scale: float = 1.0, hints: str = "phase") -> Script:
    """``Script.default`` timing times ``time_scale``, ending with some stdout; ``hints``
    as :class:`~dedalus_async.testing.Script` takes it."""
    phases = (
        Phase("wake_in_progress", 0.2 * time_scale, round(200 * time_scale)),
        Phase("queued", 0.1 * time_scale, round(100 * time_scale)),
        Phase("running", 0.3 * time_scale, round(300 * time_scale)),
    )
    return Script(phases, Outcome(stdout="ok\n"), hints=hints)


def machine_ids(count: int) -> list[str]:
    """The ``count`` machines a benchmark spreads its executions over (``MACHINE_ID``
    first)."""
    if count < 1:
        raise ValueError("need at least one machine")
    return [MACHINE_ID, *(f"dm-bench-{i:04d}" for i in range(1, count))]


class ServerStats:
    """Counters kept by the middleware; :meth:`as_dict` is what ``/_bench/stats`` sends."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # executions created before this moment (the warm-up's) are not counted
        self.since = time.monotonic()
        self.requests = 0
        self.by_kind: dict[str, int] = {}
        self.errors = 0
        self.checked_polls = 0
        self.early_polls = 0
        self.early_own = 0
        self.min_margin_ms: float | None = None
        # seconds: each finished execution's lag over the hint (see the module docstring)
        self.over_hint: list[float] = []
        self.seen_terminal: set[str] = set()
        # execution id -> monotonic moment the latest hint shown for it elapses: from any
        # response that showed the execution (list pages included), kept until it is shown
        # finished ...
        self.due: dict[str, float] = {}
        # ... the same, until the next GET of it arrives (each hint is checked once) ...
        self.hints: dict[str, float] = {}
        # ... and from the execution's own responses only (its create and its GETs)
        self.own_hints: dict[str, float] = {}

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_kind": dict(self.by_kind),
            "errors": self.errors,
            "checked_polls": self.checked_polls,
            "early_polls": self.early_polls,
            "early_own": self.early_own,
            "min_margin_ms": self.min_margin_ms,
            "over_hint_count": len(self.over_hint),
            "over_hint_p50_ms": to_ms(percentile(self.over_hint, 50)),
            "over_hint_p99_ms": to_ms(percentile(self.over_hint, 99)),
            "over_hint_max_ms": to_ms(max(self.over_hint, default=None)),
        }

    def hint_sent(
        self, execution_id: str | None, hint_ms: int | None, sent: float, *, own: bool
    ) -> None:
        """A response told the client to wait ``hint_ms`` before looking at it again."""
        if execution_id is None:
            return
        if hint_ms is None:  # no hint (a terminal execution): nothing to check
            self.hints.pop(execution_id, None)
            if own:
                self.own_hints.pop(execution_id, None)
            return
        due = sent + hint_ms / 1000.0
        self.due[execution_id] = self.hints[execution_id] = due
        if own:
            self.own_hints[execution_id] = due

    def poll_arrived(self, execution_id: str, now: float) -> None:
        """A GET of this execution arrived: was it at least the last hint after it?"""
        own = self.own_hints.pop(execution_id, None)
        if own is not None and now < own:
            self.early_own += 1
        due = self.hints.pop(execution_id, None)
        if due is None:
            return
        margin_ms = (now - due) * 1000.0
        self.checked_polls += 1
        if margin_ms < 0:
            self.early_polls += 1
        if self.min_margin_ms is None or margin_ms < self.min_margin_ms:
            self.min_margin_ms = margin_ms

    def shown_terminal(self, execution_id: str, completed: float, sent: float) -> None:
        """A response sent at ``sent`` shows the execution finished (at ``completed``)."""
        if execution_id in self.seen_terminal:
            return
        self.seen_terminal.add(execution_id)
        free = max(completed, self.due.pop(execution_id, completed))
        self.over_hint.append(max(0.0, sent - free))


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``, None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def to_ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _completed(fake: FakeDedalus, execution_id: str, since: float) -> float | None:
    """The server's monotonic moment the execution finished, if it has (and was created
    after ``since``)."""
    record = fake.executions.get(execution_id)
    if record is None or record.completed_at is None or record.created_mono < since:
        return None
    return record.created_mono + (record.completed_at - record.created_at).total_seconds()


def _kind(method: str, parts: list[str]) -> str:
    # /v1/machines/{m}/executions[/{e}[/output|/events]]
    if len(parts) == 5:
        return "create" if method == "POST" else "list"
    if len(parts) == 6:
        return "poll" if method == "GET" else method.lower()
    if len(parts) == 7:
        return parts[6]
    return "other"


def make_middleware(fake: FakeDedalus, stats: ServerStats, machines: int = 1) -> Any:
    """The watching middleware described in the module docstring."""
    config = {"machines": machine_ids(machines)}

    @web.middleware
    async def watch(request: web.Request, handler: _Handler) -> web.StreamResponse:
        path = request.path
        if path == "/_bench/config":
            return web.json_response(config)
        if path.startswith("/_bench/"):
            if path == "/_bench/reset":
                stats.reset()
            return web.json_response(stats.as_dict())
        arrived = time.monotonic()
        parts = request.rel_url.raw_path.split("/")
        kind = _kind(request.method, parts)
        stats.requests += 1
        stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
        if kind == "poll":
            stats.poll_arrived(parts[5], arrived)
        response = await handler(request)
        if response.status >= 400:
            stats.errors += 1
            return response
        sent = time.monotonic()
        if kind == "poll":
            record = fake.executions.get(parts[5])
            if record is not None:
                stats.hint_sent(record.execution_id, record.retry_after_ms, sent, own=True)
                completed = _completed(fake, record.execution_id, stats.since)
                if completed is not None:
                    stats.shown_terminal(record.execution_id, completed, sent)
        elif kind in ("create", "list") and isinstance(response, web.Response):
            body = response.body
            if isinstance(body, bytes):
                data = json.loads(body)
                # a page of the list carries each execution's hint just like a GET does
                items = (data.get("items") or ()) if kind == "list" else (data,)
                for item in items:
                    execution_id = item.get("execution_id")
                    stats.hint_sent(
                        execution_id, item.get("retry_after_ms"), sent, own=kind == "create"
                    )
                    if execution_id is None or item.get("status") not in TERMINAL_STATUSES:
                        continue
                    completed = _completed(fake, execution_id, stats.since)
                    if completed is not None:
                        stats.shown_terminal(execution_id, completed, sent)
        return response

    return watch


async def serve(
    time_scale: float,
    port: int,
    *,
    hints: str = "phase",
    list_order: str = "oldest",
    machines: int = 1,
) -> None:
    """Serve until standard input reaches its end."""
    stats = ServerStats()
    fake = FakeDedalus(
        api_key=API_KEY,
        script=bench_script(time_scale, hints),
        port=port,
        record_requests=False,
        list_order=list_order,
    )
    fake.app.middlewares.append(make_middleware(fake, stats, machines))
    async with fake:
        print(f"READY {fake.base_url}", flush=True)
        loop = asyncio.get_running_loop()
        # Reading in a thread: the runner closes our stdin (or dies) and we stop.
        while await loop.run_in_executor(None, sys.stdin.readline):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server", description=__doc__)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--hints", choices=HINT_STYLES, default="phase")
    parser.add_argument("--list-order", choices=LIST_ORDERS, default="oldest")
    parser.add_argument("--machines", type=int, default=1)
    args = parser.parse_args(argv)
    if args.machines < 1:
        parser.error("--machines must be at least 1")
    asyncio.run(
        serve(
            args.time_scale,
            args.port,
            hints=args.hints,
            list_order=args.list_order,
            machines=args.machines,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
