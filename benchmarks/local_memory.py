"""What the local backend's memory costs: per byte of output kept, and for refused uploads.

Run as ``python -m benchmarks.local_memory [--json]``. Every scenario runs in a fresh
Python process (so one scenario's garbage or peak never shows in the next), against a
real :class:`~dedalus_async._local.LocalBackend` on loopback, real processes and a real
``Session``; each runs twice, once under ``tracemalloc`` and once without it for RSS.

``one-byte``
    One command makes 20 000 one-byte writes (a 100 µs pause after each, so that most of
    them reach the backend as chunks of their own; ``chunks`` says how many did), awaited
    with ``Session.run`` (polls, then ``/output``).
``many``
    100 commands (32 at a time) each write 2 MiB in one go; the default 1 MiB cap keeps
    half of it, so 100 MiB are kept in all. Each awaited with ``Session.run``.
``unauthenticated``
    8 clients at once POST a 60 MiB body with a wrong key, from another process (raw
    sockets: each sends its headers and the body in 64 KiB pieces, and reads the answer as
    soon as one comes).

Figures: ``retained``: what the backend's Python heap holds once every execution ended
and the client dropped its results (tracemalloc, after ``gc.collect()``), and that per
byte of output kept; ``peak``: the heap's high-water mark during the scenario
(tracemalloc); ``rss_growth``: the process's resident size at the end less at the start,
and ``rss_peak_growth`` its high-water mark (VmHWM) less the start, from a run without
tracemalloc (so the interpreter's allocator and aiohttp's buffers count too; the client
runs in the same process, so its transient buffers show in the peak; freed memory is
handed back with glibc's ``malloc_trim`` before RSS is read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from dedalus_async._local import LocalBackend, _CommandProtocol

__all__ = ["SCENARIOS", "main", "run_scenario"]

MIB = 1024 * 1024
MACHINE = "dm-5f0c1a2e-7b3d-5e4f-8a9b-0c1d2e3f4a5b"
ONE_BYTE_WRITES = 20_000
MANY_EXECUTIONS = 100
MANY_SIZE = 2 * MIB
UPLOADS = 8
UPLOAD_SIZE = 60 * MIB

_ONE_BYTE = (
    "import os, time\n"
    f"for _ in range({ONE_BYTE_WRITES}):\n"
    "    os.write(1, b'x')\n"
    "    time.sleep(0.0001)\n"
)
_MANY = f"import sys; sys.stdout.buffer.write(b'x' * {MANY_SIZE})"

# The attacker: its own process, so its buffers never count as the backend's.
_UPLOADER = """
import asyncio, json, sys, time

URL_HOST, PORT, PATH = sys.argv[1], int(sys.argv[2]), sys.argv[3]
SIZE, COUNT = int(sys.argv[4]), int(sys.argv[5])
PIECE = b"x" * 65536

async def upload():
    reader, writer = await asyncio.open_connection(URL_HOST, PORT)
    writer.write(
        f"POST {PATH} HTTP/1.1\\r\\nHost: {URL_HOST}\\r\\nx-api-key: wrong\\r\\n"
        f"Idempotency-Key: k\\r\\nContent-Type: application/json\\r\\n"
        f"Content-Length: {SIZE}\\r\\n\\r\\n".encode()
    )
    sent = 0
    async def send():
        nonlocal sent
        try:
            while sent < SIZE:
                writer.write(PIECE)
                await writer.drain()
                sent += len(PIECE)
        except (ConnectionError, OSError):
            pass
    sender = asyncio.ensure_future(send())
    head = await reader.readuntil(b"\\r\\n\\r\\n")
    sent_at_answer = sent
    status = int(head.split()[1])
    lines = head.split(b"\\r\\n")
    length = [int(l.split(b":")[1]) for l in lines if l.lower().startswith(b"content-length:")]
    body = await reader.readexactly(length[0]) if length else b""
    try:
        await asyncio.wait_for(sender, 10)
    except asyncio.TimeoutError:
        sender.cancel()
    writer.close()
    return {"status": status, "sent_before_answer": sent_at_answer, "sent": sent,
            "body": body.decode()}

async def main():
    results = await asyncio.gather(*[upload() for _ in range(COUNT)])
    print(json.dumps(results))

asyncio.run(main())
"""


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _count_chunks() -> list[int]:
    """Count the output chunks the backend receives (the same hook before and after)."""
    counter = [0]
    received = _CommandProtocol.pipe_data_received

    def counting(self: _CommandProtocol, fd: int, data: bytes | bytearray) -> None:
        counter[0] += 1
        received(self, fd, data)

    _CommandProtocol.pipe_data_received = counting  # type: ignore[method-assign]
    return counter


async def _scenario(name: str, data_dir: Path) -> dict[str, Any]:
    chunks = _count_chunks()
    out: dict[str, Any] = {}
    backend = LocalBackend(data_dir=data_dir, wake_delay=0, announce=False)
    async with backend:
        async with backend.session() as session:
            # one execution first, so imports and lazily built objects are not counted
            await session.run(MACHINE, ["true"], timeout=30)
            for execution_id in list(backend.server.executions):
                await session.delete_execution(MACHINE, execution_id)
        start_heap = _settle()
        if tracemalloc.is_tracing():
            tracemalloc.reset_peak()
        start_rss, _ = _rss()
        chunks[0] = 0
        started = time.monotonic()
        kept = 0
        # the client is closed before the heap is read: only what the backend keeps counts
        async with backend.session() as session:
            if name == "one-byte":
                argv = [sys.executable, "-c", _ONE_BYTE]
                result = await session.run(MACHINE, argv, timeout=120)
                assert result.stdout == "x" * ONE_BYTE_WRITES, len(result.stdout)
                kept = len(result.stdout)
                del result
            elif name == "many":
                argv = [sys.executable, "-c", _MANY]
                runs = [session.run(MACHINE, argv, timeout=300) for _ in range(MANY_EXECUTIONS)]
                results = await asyncio.gather(*runs)
                kept = sum(len(r.stdout) for r in results)
                del results, runs
            else:
                out["uploads"] = await _upload(backend)
        out["seconds"] = round(time.monotonic() - started, 2)
        await asyncio.sleep(0.1)  # the server's side of the closed connections goes too
        peak = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else 0
        end_heap = _settle()
        records = list(backend.server.executions.values())
        out["executions"] = len(records)
        out["events"] = sum(len(r.events) for r in records)
        del records
        out["chunks"] = chunks[0]
        out["kept_bytes"] = kept
        if tracemalloc.is_tracing():
            out["retained"] = end_heap - start_heap
            out["peak"] = peak - start_heap
            if kept:
                out["retained_per_kept_byte"] = round(out["retained"] / kept, 2)
        else:
            rss, hwm = _rss()
            out["rss_growth"] = rss - start_rss
            out["rss_peak_growth"] = hwm - start_rss
    return out


def _settle() -> int:
    """Collect garbage and hand freed memory back to the OS; the traced heap's size now
    (0 when not tracing)."""
    gc.collect()
    _malloc_trim()
    return tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0


def _malloc_trim() -> None:
    # glibc keeps freed memory for reuse: without this, RSS would count the client's and
    # the transport's garbage too, not only what is still alive
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS reads higher
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def _upload(backend: LocalBackend) -> list[dict[str, Any]]:
    host, port = backend.base_url.removeprefix("http://").rsplit(":", 1)
    path = f"/v1/machines/{MACHINE}/executions"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _UPLOADER,
        host,
        port,
        path,
        str(UPLOAD_SIZE),
        str(UPLOADS),
        stdout=subprocess.PIPE,
    )
    stdout, _ = await proc.communicate()
    results: list[dict[str, Any]] = json.loads(stdout)
    return results


def run_scenario(name: str, *, traced: bool) -> dict[str, Any]:
    """Run one scenario in this process (``traced``: under tracemalloc)."""
    if traced:
        tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(_scenario(name, Path(tmp)))


SCENARIOS = ("one-byte", "many", "unauthenticated")


def _in_child(name: str, traced: bool) -> dict[str, Any]:
    args = [sys.executable, "-m", "benchmarks.local_memory", "--child", name]
    if traced:
        args.append("--traced")
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _mib(value: int) -> str:
    if abs(value) < MIB:
        return f"{value / 1024:.1f} KiB"
    return f"{value / MIB:.1f} MiB"


def _report(name: str, traced: dict[str, Any], rss: dict[str, Any]) -> str:
    lines = [f"{name}: {traced['executions']} executions, {traced['events']} events"]
    lines[0] += f", {traced['chunks']} output chunks received, {traced['seconds']} s"
    if traced["kept_bytes"]:
        lines.append(
            f"  retained {_mib(traced['retained'])} for {_mib(traced['kept_bytes'])} kept"
            f" = {traced['retained_per_kept_byte']} bytes per byte (tracemalloc)"
        )
    else:
        lines.append(f"  retained {_mib(traced['retained'])} (tracemalloc)")
    lines.append(f"  heap peak +{_mib(traced['peak'])} (tracemalloc)")
    lines.append(
        f"  RSS +{_mib(rss['rss_growth'])} at the end, peak +{_mib(rss['rss_peak_growth'])}"
    )
    for upload in traced.get("uploads", ()):
        lines.append(
            f"  upload: {upload['status']} after {_mib(upload['sent_before_answer'])} sent"
            f" ({_mib(upload['sent'])} in all)"
        )
        break
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.local_memory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="these scenarios")
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_scenario(args.child, traced=args.traced)))
        return 0
    figures = {
        name: {"tracemalloc": _in_child(name, True), "rss": _in_child(name, False)}
        for name in args.only or SCENARIOS
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for name, result in figures.items():
            print(_report(name, result["tracemalloc"], result["rss"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
