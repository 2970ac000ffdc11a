"""Which server a command talks to: the configured one, or an in-process local backend when
no API key is configured (or with ``--local``); and the time-boxed cancel that Ctrl-C and
``--timeout`` use with ``--cancel-remote``.

The lookups (get, output, events, cancel, delete, list) with ``--local`` start a local
backend on the same data directory as ``run --local`` and ``serve-local``: it reads the
records they keep on disk, so the IDs a run printed can be looked at by a later process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from dedalus_async._config import DEFAULT_BASE_URL
from dedalus_async._errors import ConfigurationError, DedalusError
from dedalus_async._session import ExecutionHandle, Session

from ._outcomes import UsageError
from ._output import Context

if TYPE_CHECKING:
    from dedalus_async._local import LocalBackend

__all__ = [
    "DEFAULT_LOCAL_MACHINE",
    "KEY_VARIABLES",
    "cancel_quietly",
    "configuration_message",
    "default_machine",
    "lookup_session",
    "session_for_runs",
]

#: The machine id ``run`` uses locally when none is given.
DEFAULT_LOCAL_MACHINE: Final = "dm-local"
#: Where an API key can come from; their values are masked in everything printed.
KEY_VARIABLES: Final = ("DEDALUS_API_KEY", "DEDALUS_X_API_KEY")
_CANCEL_TIMEOUT: Final = 10.0


def _has_key() -> bool:
    return any(os.environ.get(name) for name in KEY_VARIABLES)


def _runs_locally(args: argparse.Namespace) -> bool:
    return bool(args.local) or not _has_key()


def default_machine(args: argparse.Namespace) -> str | None:
    """--machine-id, else $DEDALUS_MACHINE_ID, else dm-local when local, else None."""
    if args.machine_id == "":
        # an empty value is a mistake (an unset shell variable), not a request for the default
        raise UsageError("--machine-id is empty: give a machine ID, or leave the option out")
    machine = args.machine_id or os.environ.get("DEDALUS_MACHINE_ID") or None
    if machine is None and _runs_locally(args):
        return DEFAULT_LOCAL_MACHINE
    return machine


@contextlib.asynccontextmanager
async def session_for_runs(
    args: argparse.Namespace, ctx: Context
) -> AsyncIterator[tuple[Session, LocalBackend | None]]:
    """A session for run/run-many: the configured server, or an in-process local backend
    (yielded too, when there is one)."""
    if not _runs_locally(args):
        async with Session(base_url=args.base_url) as session:
            yield session, None
        return
    from dedalus_async._local import current_user

    async with _local_backend(args, ctx) as backend:
        why = "--local" if args.local else "no API key configured (DEDALUS_API_KEY)"
        where = backend.machine_dir(default_machine(args) or DEFAULT_LOCAL_MACHINE)
        ctx.note(f"{why}: running locally as user {current_user()!r} in {where} (not sandboxed)")
        async with backend.session() as session:
            yield session, backend


@contextlib.asynccontextmanager
async def _local_backend(args: argparse.Namespace, ctx: Context) -> AsyncIterator[LocalBackend]:
    """An in-process local backend on $DEDALUS_LOCAL_HOME, its key masked in the output."""
    if args.base_url:
        raise UsageError(
            "--base-url and --local do not go together: the local backend has its own URL "
            "(drop --base-url, or set an API key and drop --local)"
            if args.local
            else "--base-url needs an API key: set DEDALUS_API_KEY or DEDALUS_X_API_KEY"
        )
    # imported here: the local backend pulls in aiohttp's server side, which the commands
    # that only talk to a server never need
    from dedalus_async._local import LocalBackend

    # A fresh in-process backend would make every run wait for an emulated wake: that
    # emulation is for long-lived backends (serve-local), not for one-shot runs.
    async with LocalBackend(announce=False, wake_delay=0) as backend:
        ctx.secrets.add(backend.api_key)
        yield backend


@contextlib.asynccontextmanager
async def lookup_session(args: argparse.Namespace, ctx: Context) -> AsyncIterator[Session]:
    """A session for get, output, events, cancel, delete and list: the configured server,
    or with --local the records of the local backend on this computer."""
    if args.local:
        async with _local_backend(args, ctx) as backend, backend.session() as session:
            yield session
        return
    if not _has_key():
        # said in the command line's terms, not the library's (Session(api_key=...))
        raise UsageError(
            "no API key: set DEDALUS_API_KEY (sent as a Bearer token) or DEDALUS_X_API_KEY; "
            "for executions that ran on this computer (run without a key, or with --local) "
            "add --local, or point DEDALUS_BASE_URL at a running `dedalus-async serve-local`"
        )
    async with Session(base_url=args.base_url) as session:
        yield session


def configuration_message(exc: ConfigurationError, args: argparse.Namespace) -> str:
    """The library's complaint about a setting, in the command line's words: the flag or
    the environment variable it came from, and what to change there."""
    if exc.field == "org_id":
        return str(exc).replace("org_id", "DEDALUS_ORG_ID", 1)
    if exc.field != "base_url":
        return str(exc)
    flag = getattr(args, "base_url", None)
    source = "--base-url" if flag else "DEDALUS_BASE_URL"
    url = flag or os.environ.get("DEDALUS_BASE_URL", "")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return f"{source} is not a URL: give one like {DEFAULT_BASE_URL}"
    if parts.username or parts.password:
        # the URL itself is not shown: it holds a credential
        return (
            f"{source} must not carry credentials: put the key in DEDALUS_API_KEY or "
            "DEDALUS_X_API_KEY, and the bare URL in " + source
        )
    if parts.scheme == "http" and host:
        return (
            f"{source}={url}: plain http to {host} would send the API key in clear text; use "
            f"an https:// URL (plain http is for this computer only: 127.0.0.1, ::1, "
            "localhost, as serve-local prints)"
        )
    if parts.query or parts.fragment:
        return f"{source}={url}: a base URL has no query or fragment (drop the ?... or #...)"
    return f"{source}={url!r} is not an http(s) URL: give one like {DEFAULT_BASE_URL}"


async def cancel_quietly(handle: ExecutionHandle, ctx: Context) -> None:
    """DELETE the execution, time-boxed; a failure is reported, not raised."""
    try:
        async with asyncio.timeout(_CANCEL_TIMEOUT):
            execution = await handle.cancel()
        ctx.note(f"cancelled execution {handle.execution_id} ({execution.status})")
    except (DedalusError, TimeoutError) as exc:
        ctx.error(f"could not cancel execution {handle.execution_id}: {exc}")
