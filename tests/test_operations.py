"""Operating reactor: /metrics, structured and masked logs, request ids, the dashboard (in headless Chromium too)
and the worker's health check."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
import respx
from pydantic import SecretStr
from redis.asyncio import Redis

from reactor import logs, metrics
from reactor.api.dashboard import sign_token
from reactor.devstack import free_port
from reactor.loadcache import LoadCache, TaskState
from reactor.resources import workspace_key
from reactor.settings import Settings, load_settings
from reactor.twenty import TwentyClient, create_http_client
from tests.conftest import API_KEYS, ROOT, app_client
from tests.test_webhooks import SECRET, signed

pytestmark = pytest.mark.anyio


def load_cache(redis: Redis) -> LoadCache:
    """The app's cache: these tests' settings name no Twenty, so its workspace key is that of no workspace."""
    return LoadCache(redis, load_statuses=["TODO"], workspace=workspace_key(load_settings(None, LEAD_API_KEYS="a:b")))


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def api(settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    hooked = settings.model_copy(update={"twenty_webhook_secret": SecretStr(SECRET)})
    async with app_client(hooked) as http:
        yield http


# -- metrics ------------------------------------------------------------------------------------------------


async def test_metrics_count_leads_and_webhooks_by_outcome(api: httpx.AsyncClient, redis: Redis) -> None:
    before = {outcome: sample("reactor_leads_received_total", outcome=outcome, source="webform")
              for outcome in ("created", "existing", "rejected")}  # fmt: skip
    await api.post("/leads", json={"email": "m1@example.com"})
    await api.post("/leads", json={"email": "m1@example.com"})
    await api.post("/leads", json={"email": "not-an-email"})
    body = json.dumps({"eventName": "company.created", "record": {"id": "c1"}})
    await api.post("/webhooks/twenty", content=body, headers=signed(body))
    await api.post("/webhooks/twenty", content=body, headers=signed(body, secret="wrong"))
    cache = load_cache(redis)
    await cache.apply(TaskState("t1", "member-a", "TODO", 1))
    await redis.set(metrics.LAST_RECONCILE_KEY, json.dumps({"drift": {"m": {}}, "finished_at": 1700000000}))

    response = await api.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for outcome in before:
        assert sample("reactor_leads_received_total", outcome=outcome, source="webform") == before[outcome] + 1
    text = response.text
    assert 'reactor_webhook_events_total{event="company.created",outcome="ignored"}' in text
    assert 'reactor_webhook_events_total{event="unknown",outcome="rejected_signature"}' in text
    assert 'reactor_member_load{member="member-a"} 1.0' in text
    assert "reactor_queue_depth 0.0" in text  # a lead's sync is a row, not a job
    assert "reactor_reconcile_drift_members 1.0" in text
    assert "reactor_reconcile_last_run_timestamp_seconds 1.7e+09" in text


@respx.mock
async def test_metrics_count_twenty_calls_retries_and_jobs() -> None:
    respx.get("http://twenty.test/rest/tasks/0123456789abcdef0123").mock(side_effect=[
        httpx.Response(503, json={"messages": ["down"]}), httpx.Response(200, json={"data": {"task": {"id": "x"}}}),
    ])  # fmt: skip
    op = "GET /tasks/{id}"
    calls_503, calls_200 = (sample("reactor_twenty_calls_total", operation=op, status=s) for s in ("503", "200"))
    retries = sample("reactor_twenty_retries_total", reason="503")

    async def no_sleep(_: float) -> None:
        return None

    async with create_http_client("http://twenty.test/rest", "t") as http:
        await TwentyClient(http, sleep=no_sleep).get_task("0123456789abcdef0123")

    assert sample("reactor_twenty_calls_total", operation=op, status="503") == calls_503 + 1
    assert sample("reactor_twenty_calls_total", operation=op, status="200") == calls_200 + 1
    assert sample("reactor_twenty_retries_total", reason="503") == retries + 1

    jobs_ok = sample("reactor_jobs_total", job="demo", outcome="ok")

    @metrics.instrumented("demo")
    async def demo() -> str:
        return "done"

    assert await demo() == "done"
    assert sample("reactor_jobs_total", job="demo", outcome="ok") == jobs_ok + 1
    assert sample("reactor_job_duration_seconds_count", job="demo") >= 1


# -- logs ---------------------------------------------------------------------------------------------------


def test_personal_data_is_masked_in_logs() -> None:
    text = "lead ada.lovelace@example.com +14155552671 filter=emails.primaryEmail%5Beq%5D%3A%22ada%40example.com%22"
    masked = logs.mask(text)
    assert "ada.lovelace@example.com" not in masked
    assert "a***@e***.com" in masked
    assert "+14155552671" not in masked
    assert masked.count("71") >= 1
    assert "ada%40example.com" not in masked


def _record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("reactor.test", logging.INFO, __file__, 1, message, args, None)


def test_json_lines_carry_the_request_id_and_mask_unless_log_pii() -> None:
    token = logs.request_id.set("req-123")
    try:
        record = _record("sync.rejected lead=%s email=%s", "ld_1", "grace@example.com")
        assert logs.ContextFilter(pii=False).filter(record)
        line = json.loads(logs.JsonFormatter().format(record))
    finally:
        logs.request_id.reset(token)
    assert (line["level"], line["logger"], line["request_id"]) == ("info", "reactor.test", "req-123")
    assert line["msg"] == "sync.rejected lead=ld_1 email=g***@e***.com"

    plain = _record("email=%s", "grace@example.com")
    logs.ContextFilter(pii=True).filter(plain)
    assert json.loads(logs.JsonFormatter().format(plain))["msg"] == "email=grace@example.com"


@pytest.mark.parametrize("formatter", [logs.JsonFormatter, logs.TextFormatter])
def test_an_exception_s_text_is_masked_in_both_formats(formatter: type[logging.Formatter]) -> None:
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(formatter())
    handler.addFilter(logs.ContextFilter(pii=False))
    logger = logging.getLogger("reactor.test.exceptions")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        raise RuntimeError("DETAIL:  Key (email)=(grace.hopper@example.com) already exists; phone +14155552671")
    except RuntimeError:
        logger.exception("request.failed")
    finally:
        logger.removeHandler(handler)
    text = written.getvalue()
    assert "request.failed" in text
    assert "RuntimeError: DETAIL:  Key (email)=(g***@e***.com)" in text
    assert "grace.hopper@example.com" not in text
    assert "+14155552671" not in text


async def test_every_answer_carries_a_request_id(api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    given = await api.get("/healthz", headers={"X-Request-ID": "from-the-caller"})
    assert given.headers["X-Request-ID"] == "from-the-caller"
    made = await api.get("/healthz")
    assert len(made.headers["X-Request-ID"]) == 16


async def test_a_rejected_webhook_logs_the_reason_but_no_signature(
    api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps({"eventName": "person.created", "record": {"id": "p"}})
    headers = signed(body, secret="wrong")
    with caplog.at_level(logging.INFO):
        await api.post("/webhooks/twenty", content=body, headers=headers)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "signature does not match" in logged
    assert headers["x-twenty-webhook-signature"] not in logged
    assert SECRET not in logged


# -- the dashboard ------------------------------------------------------------------------------------------


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"ops:{key}".encode()).decode()}


async def seed_dashboard(api: httpx.AsyncClient, redis: Redis) -> None:
    cache = load_cache(redis)
    await cache.set_members({"m-ann": 1.0, "m-bob": 1.0}, {"m-ann": "Ann Lee", "m-bob": "Bob Ray"})
    for i in range(3):
        await cache.apply(TaskState(f"t{i}", "m-ann", "TODO", 1))
    await api.post("/leads", json={"first_name": "Grace", "last_name": "Hopper", "email": "grace@example.com"})
    marked = await api.put("/members/m-bob/availability", json={"away": True})
    assert marked.status_code == 200, marked.text


async def test_the_dashboard_needs_a_key_and_shows_the_state(api: httpx.AsyncClient, redis: Redis) -> None:
    await seed_dashboard(api, redis)
    refused = await api.get("/", headers={"X-API-Key": ""})
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic")

    page = await api.get("/", headers=basic(API_KEYS["webform"]))
    assert page.status_code == 200
    html = page.text
    assert "Ann Lee" in html
    assert "Bob Ray · away" in html  # availability shows beside the load
    assert "Recent assignments" in html
    assert "Grace Hopper" in html
    assert "g***@e***.com" in html  # masked
    assert "grace@example.com" not in html
    assert 'http-equiv="refresh"' in html
    assert "<script" not in html  # no JavaScript, nothing from a CDN
    assert "https://" not in html


async def test_the_dashboard_renders_in_headless_chromium(
    database_url: str, redis_url: str, db: asyncpg.Pool, redis: Redis, tmp_path: Path
) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "LEAD_API_KEYS": "ops:dash-key",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    web = subprocess.Popen([sys.executable, "-m", "reactor", "web", "--host", "127.0.0.1", "--port", str(port)],
                           env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": "dash-key"}) as http:
            with anyio.fail_after(30):
                while True:
                    try:
                        await http.get("/healthz")
                        break
                    except httpx.TransportError:
                        await anyio.sleep(0.1)
            await seed_dashboard(http, redis)
        screenshot = tmp_path / "dashboard.png"
        browse = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                  "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
        # A sign-in link (what `reactor dashboard-link` prints): the page swaps it for a cookie and redirects.
        url = f"http://127.0.0.1:{port}/?token={sign_token('ops', 'dash-key', expires_at=int(time.time()) + 600)}"
        dom = await anyio.run_process([*browse, "--dump-dom", url], check=False)
        shot = await anyio.run_process([*browse, f"--screenshot={screenshot}", url], check=False)
    finally:
        web.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(lambda: web.wait(timeout=30))
    page = dom.stdout.decode()
    assert "Open tasks per member" in page, dom.stderr.decode()[-2000:]
    assert "Ann Lee" in page
    assert "Grace Hopper" in page
    assert shot.returncode == 0, shot.stderr.decode()[-2000:]
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank
    (ROOT / ".reactor").mkdir(exist_ok=True)
    shutil.copy(screenshot, ROOT / ".reactor" / "dashboard.png")  # to look at after a run


async def test_a_sign_in_link_becomes_a_cookie_and_expired_or_forged_links_do_not(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    await seed_dashboard(api, redis)
    key = API_KEYS["webform"]
    good = sign_token("webform", key, expires_at=int(time.time()) + 60)
    answer = await api.get(f"/?token={good}", headers={"X-API-Key": ""})
    assert (answer.status_code, answer.headers["location"]) == (303, "/")
    assert "httponly" in answer.headers["set-cookie"].lower()
    api.cookies.clear()  # each request below says which cookie it carries
    page = await api.get("/", headers={"X-API-Key": "", "Cookie": f"reactor_session={good}"})
    assert page.status_code == 200
    assert "Ann Lee" in page.text

    expired = sign_token("webform", key, expires_at=int(time.time()) - 1)
    forged = sign_token("webform", "not-the-key", expires_at=int(time.time()) + 60)
    for token in (expired, forged, "webform.x.y"):
        refused = await api.get("/", headers={"X-API-Key": "", "Cookie": f"reactor_session={token}"})
        assert refused.status_code == 401
        assert (await api.get(f"/?token={token}", headers={"X-API-Key": ""})).status_code == 401
    assert logs.mask(f"GET /?token={good} HTTP/1.1") == "GET /?token=*** HTTP/1.1"


# -- the worker's health check ------------------------------------------------------------------------------


async def test_the_worker_health_check(database_url: str, redis_url: str, redis: Redis, tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "LEAD_API_KEYS": "s:k",
           "TWENTY_REST_URL": f"http://127.0.0.1:{free_port()}", "TWENTY_REST_TOKEN": "t",
           "TWENTY_MAX_ATTEMPTS": "1"}  # fmt: skip
    check = [sys.executable, "-m", "reactor", "worker", "--check"]
    assert (await anyio.run_process(check, env=env, check=False)).returncode == 1  # no worker yet
    worker = subprocess.Popen([sys.executable, "-m", "reactor", "worker"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        with anyio.fail_after(30):
            for _ in range(100):  # the worker writes its health sentinel once it polls
                if (await anyio.run_process(check, env=env, check=False)).returncode == 0:
                    break
                await anyio.sleep(0.3)
    finally:
        worker.send_signal(signal.SIGTERM)
        status = await anyio.to_thread.run_sync(lambda: worker.wait(timeout=30))
    assert status == 0
