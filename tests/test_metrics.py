"""Metrics that tell the truth: a job that ends in a dead letter is `failed`, not `ok`; a follow-up Twenty
refused is `failed`, not `opened` (the drain on the real PostgreSQL and Redis, Twenty faked with respx); waiting
for reactor's own pace is `rate_limit_wait` (tests/test_twenty_client.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import respx
from pydantic import SecretStr
from redis.asyncio import Redis

from reactor import drain, followups, jobs, metrics
from reactor.resources import Resources, open_resources
from reactor.settings import Settings
from tests.fake_twenty import BASE_URL, FakeTwenty, unavailable

pytestmark = pytest.mark.anyio


def jobs_total(job: str, outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("reactor_jobs_total", {"job": job, "outcome": outcome}) or 0.0


@pytest.fixture
def fake() -> Iterator[FakeTwenty]:
    twenty = FakeTwenty()
    twenty.add_member("m1", "ann@acme.test")
    with respx.mock(assert_all_called=False) as router:
        twenty.install(router)
        yield twenty


@pytest.fixture
async def res(settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[Resources]:
    configured = settings.model_copy(update={
        "twenty_rest_url": BASE_URL, "twenty_rest_token": SecretStr("tok"), "sync_max_tries": 2,
        "sync_retry_base_s": 0.01, "twenty_max_attempts": 1, "twenty_rate_limit": 100_000,
    })  # fmt: skip
    async with open_resources(configured) as resources:
        yield resources


async def test_a_job_that_gives_up_to_a_dead_letter_counts_as_failed() -> None:
    @metrics.instrumented("demo_dead_letter")
    async def gives_up() -> str:
        metrics.job_failed()
        return "rejected"

    @metrics.instrumented("demo_dead_letter")
    async def works() -> str:
        return "done"

    assert await gives_up() == "rejected"
    assert await works() == "done"  # the mark does not leak into the next job
    assert (jobs_total("demo_dead_letter", "failed"), jobs_total("demo_dead_letter", "ok")) == (1, 1)


def drained(kind: str, outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("reactor_drained_total", {"kind": kind, "outcome": outcome}) or 0.0


async def test_a_follow_up_twenty_refuses_is_failed_not_opened(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    person_id = fake.add_person("refused@example.com")
    fake.reject_tasks = True
    opened, failed = drained("follow_up", "opened"), drained("follow_up", "failed")
    await followups.owe(db, {person_id: None}, trigger="test")
    await drain.until_idle(res)
    assert await db.fetchval("SELECT count(*) FROM failed_jobs WHERE job_name = $1", jobs.FOLLOW_UP) == 1
    assert drained("follow_up", "failed") == failed + 1
    assert drained("follow_up", "opened") == opened


async def test_a_follow_up_twenty_cannot_take_now_is_neither_opened_nor_failed(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    person_id = fake.add_person("later@example.com")
    fake.fail_next = [unavailable(503)] * 5
    before = {o: drained("follow_up", o) for o in ("opened", "failed")}
    await followups.owe(db, {person_id: None}, trigger="test")
    [result] = await drain.until_idle(res)
    assert result.unavailable is not None
    assert {o: drained("follow_up", o) for o in ("opened", "failed")} == before
    assert await db.fetchval("SELECT state FROM follow_ups") == "pending"  # still owed: retried after its back-off
    assert await db.fetchval("SELECT count(*) FROM failed_jobs") == 0
