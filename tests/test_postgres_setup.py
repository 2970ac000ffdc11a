"""The PostgreSQL the journal's tests use (tests/postgres.py): found, isolated, or started."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil

import asyncpg
import pytest

from . import postgres


async def test_each_test_gets_an_empty_database_of_its_own(postgres_dsn: str) -> None:
    connection = await asyncpg.connect(postgres_dsn)
    try:
        name = await connection.fetchval("SELECT current_database()")
        tables = await connection.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        await connection.execute("CREATE TABLE scratch (x int)")
    finally:
        await connection.close()
    assert name.startswith("dedalus_test_")
    assert tables == 0


async def test_the_database_is_dropped_afterwards(postgres_server: str) -> None:
    async with postgres.fresh_database(postgres_server) as dsn:
        name = dsn.rpartition("/")[2]
    admin = await asyncpg.connect(postgres_server)
    try:
        left = await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name)
    finally:
        await admin.close()
    assert left == 0


@pytest.mark.slow
@pytest.mark.skipif(postgres._binaries() is None, reason="no initdb/pg_ctl installed")
def test_a_throwaway_server_starts_serves_and_is_gone_afterwards() -> None:
    with postgres.throwaway_server() as dsn:
        assert "5432" not in dsn
        assert asyncio.run(postgres._reachable(dsn)) is None
        folders = [p for p in os.listdir("/tmp") if p.startswith("dedalus-pg-")]
    assert asyncio.run(postgres._reachable(dsn)) is not None
    assert all(not os.path.exists(f"/tmp/{p}") for p in folders)


def test_without_binaries_the_message_says_how_to_enable(monkeypatch: pytest.MonkeyPatch) -> None:
    # the one fault we cannot produce for real here: PostgreSQL not installed
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    with pytest.raises(postgres.PostgresUnavailable) as caught, postgres.throwaway_server():
        pass
    assert postgres.ENV_DSN in str(caught.value)
    assert "install PostgreSQL" in str(caught.value)
