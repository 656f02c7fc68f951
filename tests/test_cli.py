"""The real processes: `reactor migrate` and `reactor web` as the Procfile runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from reactor.devstack import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.anyio


def _env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    # The Procfile names `reactor`, found on PATH as in an activated virtualenv.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {
        **os.environ,
        "PATH": path,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "LEAD_API_KEYS": "cli:k",
        **extra,
    }


async def test_migrate_twice_succeeds(database_url: str, redis_url: str, tmp_path: Path) -> None:
    for _ in range(2):
        result = await anyio.run_process(
            [sys.executable, "-m", "reactor", "migrate"],
            env=_env(database_url, redis_url),
            cwd=tmp_path,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()


async def test_procfile_web_line_binds_port_and_stops_on_sigterm(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line)
    port = free_port()
    log = (tmp_path / "web.log").open("w")
    web = subprocess.Popen(
        ["sh", "-c", f"exec {procfile['web']}"],
        env=_env(database_url, redis_url, PORT=str(port)),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            with anyio.fail_after(30):
                while True:
                    try:
                        ready = await http.get("/readyz")
                        break
                    except httpx.TransportError:
                        assert web.poll() is None, "web exited before it was ready"
                        await anyio.sleep(0.2)
            assert ready.status_code == 200
            lead = await http.post("/leads", json={"email": "cli@example.com"}, headers={"X-API-Key": "k"})
            assert lead.status_code == 201
    finally:
        if web.poll() is None:
            os.killpg(web.pid, signal.SIGTERM)
        # uvicorn re-raises the SIGTERM it handled once it has shut down, so the status is -15 either way:
        # the log tells a graceful stop (lifespan shutdown ran, pools closed) from a kill.
        await anyio.to_thread.run_sync(lambda: web.wait(timeout=30))
        log.close()
    output = (tmp_path / "web.log").read_text()
    assert "Application shutdown complete" in output, output
