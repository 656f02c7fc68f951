"""The real processes: `reactor migrate` and `reactor web` as the Procfile runs them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
import respx
from redis.asyncio import Redis

from reactor.devstack import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.anyio


async def _stopped(process: subprocess.Popen[bytes], timeout_s: float, log: Path) -> int:
    """The process's status once it has stopped by itself within the deadline; else it and its children are killed
    (a process left running would work on the next tests' rows) and the test fails with its log."""
    try:
        return await anyio.to_thread.run_sync(lambda: process.wait(timeout=timeout_s))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(process.wait)
        tail = (await anyio.Path(log).read_text())[-3000:]
        raise AssertionError(f"still running {timeout_s:.0f} s after the signal:\n{tail}") from None


async def _logged(process: subprocess.Popen[bytes], log: Path, line: str, within_s: float) -> None:
    """Wait until the process's log says `line`; fail with the log if the process exits first or it takes longer."""
    with anyio.fail_after(within_s):
        while line not in (text := await anyio.Path(log).read_text()):
            assert process.poll() is None, text
            await anyio.sleep(0.2)


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
        log.close()
        await _stopped(web, 30, tmp_path / "web.log")
    output = (tmp_path / "web.log").read_text()
    assert "Application shutdown complete" in output, output


async def test_the_worker_refuses_to_start_without_twenty(database_url: str, redis_url: str, tmp_path: Path) -> None:
    env = _env(database_url, redis_url)
    env.pop("TWENTY_REST_URL", None)
    env.pop("TWENTY_REST_TOKEN", None)
    result = await anyio.run_process([sys.executable, "-m", "reactor", "worker"], env=env, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert b"TWENTY_REST_URL, TWENTY_REST_TOKEN: required by the worker" in result.stderr


async def test_the_procfile_worker_stops_cleanly_on_sigterm(database_url: str, redis_url: str, tmp_path: Path) -> None:
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line)
    # Twenty unreachable: the worker still starts (its first load rebuild fails and is logged) and stops cleanly.
    env = _env(database_url, redis_url, TWENTY_REST_URL=f"http://127.0.0.1:{free_port()}", TWENTY_REST_TOKEN="t",
               TWENTY_MAX_ATTEMPTS="1")  # fmt: skip
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen(["sh", "-c", f"exec {procfile['worker']}"], env=env, cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            await _logged(worker, log_path, "Starting worker", within_s=30)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            status = await _stopped(worker, 30, log_path)
    output = log_path.read_text()
    assert status == 0, output
    assert "shutdown on SIGTERM" in output
    assert "Traceback" not in output


async def test_replay_re_enqueues_dead_letters(
    database_url: str, redis_url: str, db: asyncpg.Pool, redis: Redis, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO leads (lead_id, email, api_source, sync_gave_up_at) "
                           "VALUES ('d1', 'd1@example.com', 't', now())")  # fmt: skip
        await conn.execute("INSERT INTO failed_jobs (job_name, job_id, args, error, attempts) "
                           """VALUES ('sync_lead', 'sync:d1', '["d1"]', 'boom', 3)""")  # fmt: skip
        result = await anyio.run_process([sys.executable, "-m", "reactor", "replay", "--job", "sync_lead"],
                                         env=_env(database_url, redis_url), cwd=tmp_path, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        assert b"replayed 1 dead letter(s)" in result.stdout
        assert await conn.fetchval("SELECT sync_gave_up_at FROM leads WHERE lead_id = 'd1'") is None
        assert await conn.fetchval("SELECT replayed_at IS NOT NULL FROM failed_jobs") is True
    finally:
        await conn.close()
    assert await redis.zcard("arq:queue") == 0  # the lead waits again as a row: the drain takes it


def test_webhook_install_creates_then_updates_and_status_reports(
    database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from reactor.cli import main

    for name, value in _env(database_url, redis_url, TWENTY_REST_URL="http://twenty.test",
                            TWENTY_REST_TOKEN="tok").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    hooks: list[dict[str, object]] = []

    def create(request: httpx.Request) -> httpx.Response:
        hook = {"id": "w1", **json.loads(request.content)}
        hooks.append(hook)
        return httpx.Response(201, json=hook)

    def update(request: httpx.Request) -> httpx.Response:
        hooks[0].update(json.loads(request.content))
        return httpx.Response(200, json=hooks[0])

    with respx.mock(assert_all_called=False) as router:
        router.get("http://twenty.test/rest/webhooks").mock(side_effect=lambda _: httpx.Response(200, json=hooks))
        router.post("http://twenty.test/rest/webhooks").mock(side_effect=create)
        router.patch("http://twenty.test/rest/webhooks/w1").mock(side_effect=update)

        assert main(["webhook", "install", "--url", "http://127.0.0.1:8000/webhooks/twenty"]) == 0
        first = capsys.readouterr().out
        assert main(["webhook", "install", "--url", "http://127.0.0.1:8000/webhooks/twenty"]) == 0
        second = capsys.readouterr().out
        monkeypatch.setenv("TWENTY_WEBHOOK_SECRET", str(hooks[0]["secret"]))
        assert main(["webhook", "status"]) == 0
        status = capsys.readouterr().out

    assert len(hooks) == 1
    assert hooks[0]["operations"] == ["person.created", "task.*"]
    assert f"TWENTY_WEBHOOK_SECRET={hooks[0]['secret']}" in first
    assert "OUTBOUND_HTTP_ALLOWED_INTERNAL_HOSTS" in first  # loopback: Twenty would refuse it by default
    assert "OUTBOUND_HTTP_SAFE_MODE_ENABLED=false" in first  # the only setting on 1.16-era servers
    assert second.startswith("updated webhook w1")
    assert "missing for reactor: nothing" in status
    assert "secret: matches TWENTY_WEBHOOK_SECRET" in status
    assert str(hooks[0]["secret"]) not in status


def test_reconcile_cli_reports_drift_as_json(
    database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis as sync_redis

    from reactor.cli import main
    from tests.fake_twenty import FakeTwenty

    async def empty_tables() -> None:
        conn = await asyncpg.connect(database_url)
        await conn.execute("TRUNCATE leads, lead_submissions, follow_ups, failed_jobs")
        await conn.close()

    asyncio.run(empty_tables())
    sync_redis.Redis.from_url(redis_url).flushdb()

    for name, value in _env(database_url, redis_url, TWENTY_REST_URL="http://twenty.test",
                            TWENTY_REST_TOKEN="tok").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    fake = FakeTwenty()
    fake.add_member("m1", "m1@acme.test")
    fake.add_task("a", "m1")
    with respx.mock(assert_all_called=False) as router:
        fake.install(router)
        assert main(["reconcile", "--check", "--json"]) == 1  # drift: the cache knows nothing yet
        checked = json.loads(capsys.readouterr().out)
        assert main(["reconcile", "--dry-run", "--json"]) == 0
        dry = json.loads(capsys.readouterr().out)
        assert main(["reconcile"]) == 0
        summary = capsys.readouterr().out
        assert main(["reconcile", "--check"]) == 0
        clean = capsys.readouterr().out
    assert checked["drift"] == {"m1": {"cached": 0, "true": 1}}
    assert (dry["dry_run"], dry["drift"]) == (True, {"m1": {"cached": 0, "true": 1}})
    assert "m1: 0 -> 1" in summary
    assert clean.strip().endswith("no drift")


@pytest.mark.parametrize("failure", ["unreachable", "both groupBy shapes refused", "redis down"])
def test_reconcile_check_exits_2_with_the_reason_on_one_line_when_it_cannot_ask(
    database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    failure: str,
) -> None:  # fmt: skip
    """0 is clean and 1 is drift (above); 2 says nothing is known, so a probe does not report drift that is not."""
    from reactor.cli import main

    if failure == "redis down":
        redis_url = f"redis://127.0.0.1:{free_port()}/0"
    for name, value in _env(database_url, redis_url, TWENTY_REST_URL="http://twenty.test", TWENTY_REST_TOKEN="tok",
                            TWENTY_MAX_ATTEMPTS="1").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    with respx.mock(assert_all_called=False) as router:
        route = router.get(url__regex=r"/tasks/groupBy")
        if failure == "both groupBy shapes refused":
            refused = {"statusCode": 400, "error": "E", "messages": ["column task.assignee does not exist"]}
            route.mock(return_value=httpx.Response(400, json=refused))
        else:
            route.mock(side_effect=httpx.ConnectError("connection refused"))
        assert main(["reconcile", "--check"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("reactor:")]  # the rest is the JSON log
    assert len(lines) == 1, err
    assert lines[0].startswith("reactor: reconcile --check: ")
    assert "could not be asked" in lines[0]
    expected = {"unreachable": "ConnectError", "both groupBy shapes refused": "column task.assignee does not exist",
                "redis down": "unavailable"}[failure]  # fmt: skip
    assert expected in lines[0]


def _second_terminal(env: dict[str, str]) -> dict[str, str]:
    """A terminal that has none of the dev stack's variables: it must find them in .reactor/dev.env."""
    names = (
        "DATABASE_URL",
        "REDIS_URL",
        "LEAD_API_KEYS",
        "TWENTY_REST_URL",
        "TWENTY_REST_TOKEN",
        "TWENTY_WEBHOOK_SECRET",
    )
    return {k: v for k, v in env.items() if k not in names}


async def test_reactor_dev_runs_the_pipeline_and_stops_everything(
    database_url: str, redis_url: str, db: asyncpg.Pool, redis: Redis, tmp_path: Path
) -> None:
    # The last run's state: the simulator keeps nothing, so a new `reactor dev` must not keep it either.
    await db.execute("INSERT INTO leads (lead_id, email, api_source) VALUES ('stale', 'stale@example.com', 'old')")
    await redis.set("reactor:stale", "1")
    port = free_port()
    env = _env(database_url, redis_url, LOG_LEVEL="INFO")
    env.pop("TWENTY_REST_URL", None)
    log_path = tmp_path / "dev.log"
    with log_path.open("w") as log:
        dev = subprocess.Popen([sys.executable, "-m", "reactor", "dev", "--port", str(port)], env=env, cwd=tmp_path,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            with anyio.fail_after(60):
                await _logged(dev, log_path, "reactor dev is running", within_s=60)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": "k"}) as http:
                    assert (await http.get("/leads/stale")).status_code == 404
                    posted = await http.post("/leads", json={"first_name": "Dev", "email": "dev@example.com"})
                    assert posted.status_code == 201
                    while True:  # another process does the work: look until the task is linked (open)
                        lead = (await http.get(f"/leads/{posted.json()['lead_id']}")).json()
                        if lead["follow_up"] is not None and lead["follow_up"]["state"] == "open":
                            break
                        await anyio.sleep(0.1)
            assert lead["crm_synced"] is True
            assert lead["follow_up"]["assignee_id"]
            assert await redis.exists("reactor:stale") == 0
            # A second terminal in the same folder reaches the same stack, webhook secret included.
            other = _second_terminal(env)
            for argv in (["reconcile", "--check"], ["webhook", "status"], ["dashboard-link"], ["doctor"]):
                done = await anyio.run_process([sys.executable, "-m", "reactor", *argv], env=other, cwd=tmp_path,
                                               check=False)  # fmt: skip
                assert done.returncode == 0, (argv, done.stdout.decode(), done.stderr.decode())
                if argv[0] == "webhook":
                    assert b"secret: matches TWENTY_WEBHOOK_SECRET" in done.stdout
                if argv[0] == "reconcile":
                    assert done.stdout.strip().endswith(b"no drift")
        finally:
            dev.send_signal(signal.SIGINT)  # Ctrl-C
            await _stopped(dev, 60, log_path)
    output = log_path.read_text()
    assert "followup.created" in output
    assert "✓ webhook secret: matches TWENTY_WEBHOOK_SECRET" in output  # reactor doctor ran at start-up
    assert "✗" not in output
    assert "starting clean" in output
    assert "reactor dev: stopping" in output
    assert not (tmp_path / ".reactor" / "dev.env").exists()
    children = await anyio.run_process(["pgrep", "-f", f"--port {port}"], check=False)
    assert children.stdout == b"", "a child outlived reactor dev"
    # Without a running `reactor dev`, its settings are not used: the same terminal now lacks LEAD_API_KEYS.
    after = await anyio.run_process([sys.executable, "-m", "reactor", "dashboard-link"], env=_second_terminal(env),
                                    cwd=tmp_path, check=False)  # fmt: skip
    assert after.returncode == 2
    assert b"LEAD_API_KEYS: is required but not set" in after.stderr


async def test_reactor_dev_reset_empties_the_state_it_would_keep_with_a_real_twenty(
    database_url: str, redis_url: str, db: asyncpg.Pool, redis: Redis, tmp_path: Path
) -> None:
    await db.execute("INSERT INTO leads (lead_id, email, api_source) VALUES ('kept', 'kept@example.com', 'old')")
    await redis.set("reactor:kept", "1")
    await redis.set("someone-elses-key", "1")
    port = free_port()
    # A "real" Twenty (configured; here nothing answers there): the state would be kept without --reset.
    env = _env(database_url, redis_url, TWENTY_REST_URL=f"http://127.0.0.1:{free_port()}", TWENTY_REST_TOKEN="t",
               TWENTY_MAX_ATTEMPTS="1")  # fmt: skip
    log_path = tmp_path / "dev.log"
    with log_path.open("w") as log:
        dev = subprocess.Popen([sys.executable, "-m", "reactor", "dev", "--reset", "--port", str(port)], env=env,
                               cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            await _logged(dev, log_path, "reactor dev is running", within_s=60)
        finally:
            dev.send_signal(signal.SIGINT)
            await _stopped(dev, 60, log_path)
    output = log_path.read_text()
    assert "starting clean (--reset)" in output
    assert await db.fetchval("SELECT count(*) FROM leads") == 0
    assert await redis.exists("reactor:kept") == 0
    assert await redis.exists("someone-elses-key") == 1  # only reactor's keys: the Redis database may be shared
    assert "✗ twenty: cannot reach Twenty at 127.0.0.1:" in output  # and doctor said why nothing will sync


def test_a_dashboard_link_names_the_url_it_is_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A plain test (main() runs its own event loop), so no async fixture: the link reaches neither server.
    database_url, redis_url = "postgresql://postgres@127.0.0.1:1/none", "redis://127.0.0.1:1/0"
    import time

    from pydantic import SecretStr

    from reactor.api.dashboard import token_source
    from reactor.cli import main

    for name, value in _env(database_url, redis_url).items():
        monkeypatch.setenv(name, value)
    assert main(["dashboard-link", "--url", "http://127.0.0.1:8000"]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith("http://127.0.0.1:8000/?token=")
    assert token_source(link.partition("token=")[2], {"cli": SecretStr("k")}, now=time.time()) == "cli"


# Neither command below reaches PostgreSQL or Redis: where they are is all the tests look at.
DEV_DATABASE, OWN_DATABASE = "postgresql://postgres@127.0.0.1:1/dev", "postgresql://postgres@127.0.0.1:1/own"


def _in_a_folder_with_a_running_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No reactor setting in the environment; the folder's .reactor/dev.env written by a live process (this one)."""
    from reactor import devstack
    from reactor.settings import Settings

    for field in Settings.model_fields.values():
        monkeypatch.delenv(str(field.validation_alias), raising=False)
    monkeypatch.chdir(tmp_path)
    devstack.write_dev_env({"DATABASE_URL": DEV_DATABASE, "REDIS_URL": "redis://127.0.0.1:1/0",
                            "LEAD_API_KEYS": "dev:devkey", "TWENTY_REST_URL": "http://twenty.dev.test/rest",
                            "TWENTY_REST_TOKEN": "sim-token"})  # fmt: skip


@pytest.mark.parametrize(("database", "value"), [("DATABASE_URL", OWN_DATABASE), ("DB_HOST", "127.0.0.1")])
def test_a_process_configured_by_its_environment_takes_nothing_from_a_running_dev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], database: str, value: str
) -> None:
    from reactor.cli import main

    _in_a_folder_with_a_running_dev(tmp_path, monkeypatch)
    # As the tests start `reactor web`: a database, Redis and keys of its own, and no Twenty.
    monkeypatch.setenv(database, value)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:2/0")
    monkeypatch.setenv("LEAD_API_KEYS", "cli:k")
    with respx.mock(assert_all_mocked=True) as twenty:
        assert main(["webhook", "status"]) == 2
        assert twenty.calls.call_count == 0  # the simulator's URL and token were not picked up
    err = capsys.readouterr().err
    assert "TWENTY_REST_URL, TWENTY_REST_TOKEN: required by" in err
    assert "reactor dev's settings" not in err


def test_a_terminal_that_names_no_database_takes_a_running_dev_s_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    from pydantic import SecretStr

    from reactor.api.dashboard import token_source
    from reactor.cli import main

    _in_a_folder_with_a_running_dev(tmp_path, monkeypatch)
    monkeypatch.setenv("LOG_FORMAT", "text")  # what the environment does set still wins over dev.env
    assert main(["dashboard-link"]) == 0
    out, err = capsys.readouterr()
    assert token_source(out.strip().partition("token=")[2], {"dev": SecretStr("devkey")}, now=time.time()) == "dev"
    assert "using the running reactor dev's settings" in err


async def test_reactor_dev_fails_at_once_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with anyio.fail_after(20):
            done = await anyio.run_process([sys.executable, "-m", "reactor", "dev", "--port", str(port)],
                                           cwd=tmp_path, check=False)  # fmt: skip
    assert done.returncode == 2
    assert f"port {port} is taken".encode() in done.stderr
    assert b"--port" in done.stderr
    assert b"reactor dev is running" not in done.stdout


async def test_a_configuration_error_in_dev_is_printed_once(tmp_path: Path) -> None:
    env = {**os.environ, "DB_PORT": "abc"}
    env.pop("DATABASE_URL", None)
    done = await anyio.run_process([sys.executable, "-m", "reactor", "dev", "--port", str(free_port())], env=env,
                                   cwd=tmp_path, check=False)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.decode().count("DB_PORT: Input should be a valid integer") == 1, done.stderr.decode()
    assert b"Traceback" not in done.stderr


def _closed_port() -> int:
    return free_port()  # bound, then released: nothing listens there


@pytest.mark.parametrize(
    ("argv", "broken", "named"),
    [
        (["migrate"], "postgres", "PostgreSQL at 127.0.0.1:{port}"),
        (["web", "--port", "0"], "postgres", "PostgreSQL at 127.0.0.1:{port}"),
        (["reconcile"], "redis", "Redis at 127.0.0.1:{port}"),
        (["webhook", "status"], "twenty", "Twenty at 127.0.0.1:{port}"),
    ],
)
async def test_an_unreachable_server_is_one_line_and_exit_2(
    database_url: str, redis_url: str, tmp_path: Path, argv: list[str], broken: str, named: str
) -> None:
    port = _closed_port()
    env = _env(database_url, redis_url, TWENTY_REST_URL=f"http://127.0.0.1:{free_port()}", TWENTY_REST_TOKEN="t",
               TWENTY_MAX_ATTEMPTS="1")  # fmt: skip
    env.pop("LOG_LEVEL", None)
    if broken == "postgres":
        env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{port}/reactor"
    elif broken == "redis":
        env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    else:
        env["TWENTY_REST_URL"] = f"http://127.0.0.1:{port}"
    done = await anyio.run_process([sys.executable, "-m", "reactor", *argv], env=env, cwd=tmp_path, check=False)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert named.format(port=port) in err
    assert "check" in err
    assert "Traceback" not in err
    debug = await anyio.run_process([sys.executable, "-m", "reactor", *argv], env={**env, "LOG_LEVEL": "DEBUG"},
                                    cwd=tmp_path, check=False)  # fmt: skip
    assert b"Traceback" in debug.stderr  # LOG_LEVEL=DEBUG shows where it failed


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from reactor.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    commands = ("web", "worker", "migrate", "replay", "reconcile", "dashboard-link", "webhook", "sim", "dev", "doctor")
    for command in commands:
        assert re.search(rf"^\s+{re.escape(command)}\s+\w", shown, re.MULTILINE), f"{command} missing from --help"


@pytest.mark.parametrize("url", ["not-a-url", "ftp://x.example/webhooks/twenty", "https://reactor.example.com",
                                 "https:///webhooks/twenty"])  # fmt: skip
def test_webhook_install_refuses_a_bad_url(
    database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    from reactor.cli import main

    for name, value in _env(database_url, redis_url, TWENTY_REST_URL="http://twenty.test",
                            TWENTY_REST_TOKEN="tok").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    with respx.mock(assert_all_mocked=True) as router:  # any call to Twenty would fail the test
        assert main(["webhook", "install", "--url", url]) == 2
        assert router.calls.call_count == 0
    assert "webhook install: --url" in capsys.readouterr().err


def test_env_example_works_when_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reactor import devstack
    from reactor.dev import _project_env
    from reactor.settings import Settings, load_settings

    example = (ROOT / ".env.example").read_text()
    (tmp_path / ".env").write_text(example)
    for name in [*Settings.model_fields, *(str(f.validation_alias) for f in Settings.model_fields.values())]:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    copied = _project_env()
    assert devstack.configured_postgres(copied) is None  # reactor dev finds or embeds PostgreSQL
    assert not copied.get("REDIS_URL")  # ... and Redis
    assert not copied.get("TWENTY_REST_URL")  # ... and simulates Twenty
    # Every variable it names is one Settings reads, every Settings variable is in it, and every value is valid.
    named = dict(re.findall(r"^# ([A-Z][A-Z0-9_]*)=(.*)$", example, re.MULTILINE))
    aliases = {str(f.validation_alias) for f in Settings.model_fields.values()}
    assert set(named) == aliases
    (tmp_path / "all.env").write_text("\n".join(f"{k}={v}" for k, v in named.items()))
    shown = load_settings(tmp_path / "all.env")
    # ... and each value shown is the default, but for the examples of what has none.
    defaults = load_settings(None, LEAD_API_KEYS="x:y")
    differ = {str(f.validation_alias) for name, f in Settings.model_fields.items()
              if getattr(shown, name) != getattr(defaults, name)}  # fmt: skip
    assert differ <= {"DATABASE_URL", "LEAD_API_KEYS", "TWENTY_REST_URL", "TWENTY_REST_TOKEN", "TWENTY_WEBHOOK_SECRET"}
