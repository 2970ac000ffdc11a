"""A PostgreSQL server for the tests that need one, found or started, or a clear skip.

In order:

1. ``DEDALUS_TEST_POSTGRES_DSN``, if set: that server (unreachable is an error, not a skip:
   you asked for it);
2. a server on 127.0.0.1:5432 that lets user ``postgres`` in without a password (trust
   auth), as on the project's CI machines;
3. a throwaway server started from the installed PostgreSQL binaries (``initdb`` and
   ``pg_ctl`` on PATH or under ``/usr/lib/postgresql/*/bin``) in a temporary directory,
   stopped when the tests end (as root, it runs as the ``postgres`` user, since PostgreSQL
   refuses root);
4. otherwise the tests that need PostgreSQL are skipped, with one line saying how to run
   them. With ``CI`` set, a missing server fails them instead: CI must not pass by skipping.

Each test gets a database of its own (:func:`fresh_database`), created from ``template0``
and dropped afterwards, so tests in parallel workers never see each other's tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg

__all__ = ["HOW_TO_ENABLE", "PostgresUnavailable", "fresh_database", "server_dsn"]

ENV_DSN = "DEDALUS_TEST_POSTGRES_DSN"
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
HOW_TO_ENABLE = (
    "PostgreSQL tests skipped: no server at 127.0.0.1:5432 (user postgres, trust auth) and "
    "no initdb/pg_ctl to start one; install PostgreSQL or set "
    f"{ENV_DSN}=postgresql://USER@HOST:PORT/DB to run them"
)


class PostgresUnavailable(Exception):
    """No server could be found or started; the message says how to get one."""


async def _reachable(dsn: str) -> str | None:
    """None if we can connect and run a query, else why not."""
    try:
        connection = await asyncpg.connect(dsn, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        await connection.fetchval("SELECT 1")
    finally:
        await connection.close()
    return None


def _binaries() -> tuple[str, str] | None:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        initdb, pg_ctl = f"{folder}/initdb", f"{folder}/pg_ctl"
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return initdb, pg_ctl
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def throwaway_server() -> Iterator[str]:
    """A new cluster in a temporary directory, on a free port; yields its DSN."""
    found = _binaries()
    if found is None:
        raise PostgresUnavailable(HOW_TO_ENABLE)
    initdb, pg_ctl = found
    prefix: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        # PostgreSQL will not run as root: run it as its own system user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable(
                f"{HOW_TO_ENABLE} (running as root, and there is no postgres user to start "
                "a throwaway server as)"
            ) from None
        prefix = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="dedalus-pg-"))
    data = root / "data"
    port = _free_port()
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    try:
        subprocess.run(
            [*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [
                *prefix,
                pg_ctl,
                "-D",
                str(data),
                "-o",
                options,
                "-w",
                "-l",
                str(root / "log"),
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        raise PostgresUnavailable(
            f"{HOW_TO_ENABLE} (starting a throwaway server failed: {exc} "
            f"{detail.decode(errors='replace').strip()})"
        ) from None
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def server_dsn() -> Iterator[str]:
    """The DSN of a server to use (see the module docstring), for as long as the block runs."""
    explicit = os.environ.get(ENV_DSN)
    if explicit:
        why = asyncio.run(_reachable(explicit))
        if why is not None:
            raise RuntimeError(f"{ENV_DSN} is set but its server is not reachable: {why}")
        yield explicit
        return
    if asyncio.run(_reachable(LOCAL_DSN)) is None:
        yield LOCAL_DSN
        return
    with throwaway_server() as dsn:
        yield dsn


def _with_database(dsn: str, name: str) -> str:
    head, _, _ = dsn.rpartition("/")
    return f"{head}/{name}"


@contextlib.asynccontextmanager
async def fresh_database(dsn: str) -> AsyncIterator[str]:
    """A new empty database on the server of ``dsn``, dropped afterwards; yields its DSN."""
    name = f"dedalus_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(dsn, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await admin.close()
    try:
        yield _with_database(dsn, name)
    finally:
        admin = await asyncpg.connect(dsn, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
