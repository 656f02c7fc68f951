"""`reactor doctor` against the simulator, and with each thing it checks broken: one line each, ✓ or ✗ with the fix."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from pydantic import SecretStr
from redis.asyncio import Redis
from starlette.applications import Starlette

from reactor import doctor, subscription
from reactor.devstack import free_port
from reactor.settings import Settings
from reactor.sim import create_sim
from reactor.twenty import TwentyClient, create_http_client

pytestmark = pytest.mark.anyio

TOKEN = "doctor-token"
SIM = "http://sim.test"
HOOK = "http://127.0.0.1:8123/webhooks/twenty"


@pytest.fixture
async def sim() -> AsyncIterator[Starlette]:
    app = create_sim(token=TOKEN, members=2)
    async with LifespanManager(app) as manager:
        yield manager.app  # type: ignore[misc]


def configured(settings: Settings, **changes: object) -> Settings:
    base = {"twenty_rest_url": f"{SIM}/rest", "twenty_rest_token": SecretStr(TOKEN)}
    return settings.model_copy(update={**base, **changes})


async def install(sim: Starlette, url: str = HOOK) -> str:
    async with create_http_client(f"{SIM}/rest", TOKEN, transport=httpx.ASGITransport(sim)) as http:
        installed = await subscription.install(TwentyClient(http), url)
    assert installed.secret is not None
    return installed.secret


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {check.name: check for check in checks}


async def calls(sim: Starlette) -> int:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(sim), base_url=SIM) as http:
        counted = (await http.get("/sim/state")).json()["calls"]
    return sum(v for k, v in counted.items() if k not in ("429", "5xx"))


async def test_a_working_setup_is_all_ticks(settings: Settings, db: object, redis: Redis, sim: Starlette) -> None:
    secret = await install(sim)
    before = await calls(sim)
    checks = await doctor.run(configured(settings, twenty_webhook_secret=SecretStr(secret)), webhook_url=HOOK,
                              transport=httpx.ASGITransport(sim))  # fmt: skip
    lines = [check.line() for check in checks]
    assert doctor.exit_status(checks) == 0, lines
    assert all(line.startswith("✓") for line in lines), lines
    assert {"configuration", "postgres", "redis", "twenty", "members", "task targets", "rate limit", "webhook",
            "webhook secret", "webhook URL"} == {check.name for check in checks}  # fmt: skip
    assert "2 (" in by_name(checks)["members"].detail
    assert "targetPersonId" in by_name(checks)["task targets"].detail
    assert await calls(sim) - before <= 4  # members, metadata, webhooks (+ the simulator probe): a few calls


async def test_each_failure_is_a_cross_with_its_fix(
    settings: Settings, db: object, redis: Redis, sim: Starlette
) -> None:
    transport = httpx.ASGITransport(sim)
    missing = by_name(await doctor.run(configured(settings), transport=transport))
    assert missing["webhook"].ok is False
    assert "reactor webhook install --url" in missing["webhook"].fix

    await install(sim)
    wrong = await doctor.run(configured(settings, twenty_webhook_secret=SecretStr("other")), transport=transport)
    assert by_name(wrong)["webhook secret"].ok is False
    assert by_name(wrong)["webhook secret"].line().startswith("✗ webhook secret: differs")
    assert doctor.exit_status(wrong) == 1

    refused = by_name(await doctor.run(configured(settings, twenty_rest_token=SecretStr("bad")), transport=transport))
    assert refused["twenty"].ok is False
    assert "TWENTY_REST_TOKEN" in refused["twenty"].fix

    stranger = configured(settings, fallback_assignee_email="nobody@acme.test")
    assert "nobody@acme.test" in by_name(await doctor.run(stranger, transport=transport))["members"].detail

    unset = by_name(await doctor.run(settings))
    assert unset["twenty"].ok is False
    assert "TWENTY_REST_URL" in unset["twenty"].detail


async def test_unreachable_postgres_redis_and_twenty_name_host_and_port(settings: Settings) -> None:
    port = free_port()
    broken = settings.model_copy(update={
        "database_url": f"postgresql://postgres@127.0.0.1:{port}/x", "redis_url": f"redis://127.0.0.1:{port}/0",
        "twenty_rest_url": f"http://127.0.0.1:{port}/rest", "twenty_rest_token": SecretStr("t")})  # fmt: skip
    checks = by_name(await doctor.run(broken))
    for name, server in (("postgres", "PostgreSQL"), ("redis", "Redis"), ("twenty", "Twenty")):
        assert checks[name].ok is False
        assert f"{server} at 127.0.0.1:{port}" in checks[name].line(), checks[name].line()


async def test_a_missing_schema_says_migrate(settings: Settings, database_url: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(database_url)
    name = f"doctor_empty_{free_port()}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        empty = settings.model_copy(update={"database_url": database_url.rsplit("/", 1)[0] + f"/{name}"})
        check = await doctor.check_postgres(empty)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    assert (check.ok, check.fix) == (False, "run: reactor migrate")


def test_a_private_webhook_url_names_twentys_outbound_settings() -> None:
    check = doctor._reachability("http://10.1.2.3/webhooks/twenty", simulated=False)
    assert check.ok is False
    assert "OUTBOUND_HTTP_ALLOWED_INTERNAL_HOSTS=10.1.2.3" in check.fix
    assert "OUTBOUND_HTTP_SAFE_MODE_ENABLED=false" in check.fix
    assert doctor._reachability("http://93.184.215.14/webhooks/twenty", simulated=False).ok is True


def test_the_rate_limit_check_reads_twentys_budget(settings: Settings) -> None:
    announced = doctor._budget_check(settings, doctor._Budget(limit="50", remaining="49"), simulated=False)
    assert (announced.ok, announced.fix) == (False, "set TWENTY_RATE_LIMIT=50")
    silent = doctor._budget_check(settings, doctor._Budget(), simulated=False)
    assert silent.ok is None  # a warning: above what a 1.16-era server really accepts, but nothing broken
    assert "TWENTY_RATE_LIMIT=79" in silent.fix
    assert doctor.exit_status([silent]) == 0
    within = settings.model_copy(update={"twenty_rate_limit": 79})
    assert doctor._budget_check(within, doctor._Budget(), simulated=False).ok is True
