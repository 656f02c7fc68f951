"""The fuzz test in the suite: schemathesis over /openapi.json (tests/fuzzing.py) against a real uvicorn configured
as `reactor web` is, with a source's key, a bounded and derandomized number of examples per operation and mode.
No 5xx, and every answer is documented (status, content type, schema)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from reactor.app import create_app
from reactor.settings import Settings
from tests.conftest import API_KEYS
from tests.fuzzing import fuzz
from tests.test_faults import served

pytestmark = pytest.mark.anyio

EXAMPLES = 12  # per operation and mode: about 450 cases, ~30 s on a busy 2-CPU machine


@pytest.fixture
async def server(settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[str]:
    app = create_app(settings.model_copy(update={"twenty_webhook_secret": SecretStr("fuzz-secret")}))
    async with served(app, access_log=False) as port:
        yield f"http://127.0.0.1:{port}"


async def test_schemathesis_finds_no_5xx_and_only_documented_answers(server: str) -> None:
    report = await anyio.to_thread.run_sync(
        lambda: fuzz(server, API_KEYS["webform"], examples=EXAMPLES, derandomize=True)
    )
    assert report.cases >= 300, report.summary()
    assert report.server_errors == 0, report.summary() + "\n" + "\n".join(report.failures[:20])
    assert report.failures == [], report.summary() + "\n" + "\n".join(report.failures[:20])
