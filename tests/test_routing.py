"""Routing: availability, caps, weights, the fallback, SLA re-assignment and the decision audit, on the real
PostgreSQL and Redis with Twenty mocked."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
from collections.abc import AsyncIterator, Iterator
from zoneinfo import ZoneInfo

import asyncpg
import pytest
import respx
from pydantic import SecretStr
from redis.asyncio import Redis

from reactor import assignees, drain, followups, routing
from reactor.loadcache import TaskState
from reactor.resources import Resources, open_resources
from reactor.settings import Settings
from reactor.worker import _check_routing_config
from tests.conftest import app_client
from tests.fake_twenty import BASE_URL, FakeTwenty

pytestmark = pytest.mark.anyio

UTC = dt.UTC


@pytest.fixture
def twenty_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "twenty_rest_url": BASE_URL, "twenty_rest_token": SecretStr("tok"), "twenty_max_attempts": 1,
        "twenty_rate_limit": 100_000, "follow_up_sla_hours": 4.0, "max_reassignments": 2,
    })  # fmt: skip


@pytest.fixture
def fake() -> Iterator[FakeTwenty]:
    twenty = FakeTwenty()
    for member in ("m1", "m2", "m3"):
        twenty.add_member(member, f"{member}@acme.test")
    with respx.mock(assert_all_called=False) as router:
        twenty.install(router)
        yield twenty


@pytest.fixture
async def res(twenty_settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[Resources]:
    async with open_resources(twenty_settings) as resources:
        yield resources


def with_settings(res: Resources, **changes: object) -> Resources:
    return dataclasses.replace(res, settings=res.settings.model_copy(update=changes))


def random_availability(rng: random.Random, now: dt.datetime) -> routing.Availability | None:
    kind = rng.choice(["none", "away", "away_until_past", "away_until_future", "hours", "cap"])
    if kind == "none":
        return None
    if kind == "away":
        return routing.Availability(away=True)
    if kind.startswith("away_until"):
        delta = dt.timedelta(hours=rng.uniform(0.1, 48))
        return routing.Availability(away_until=now - delta if kind.endswith("past") else now + delta)
    if kind == "cap":
        return routing.Availability(max_open_tasks=rng.randint(0, 4))
    start = rng.randint(0, 22)
    hours = routing.WorkingHours(timezone=rng.choice(["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"]),
                                 days=rng.sample(list(routing.DAYS), rng.randint(1, 7)),
                                 start=dt.time(start), end=dt.time(rng.randint(start + 1, 23)))  # fmt: skip
    return routing.Availability(working_hours=hours)


def allowed(member: str, rules: routing.Availability | None, loads: dict[str, int], now: dt.datetime) -> bool:
    """The rules, restated independently of routing.candidates: not away, in working hours, under the cap."""
    cap = rules.max_open_tasks if rules and rules.max_open_tasks is not None else 0
    if cap and loads.get(member, 0) >= cap:
        return False
    if rules is None:
        return True
    if rules.away or (rules.away_until is not None and rules.away_until > now):
        return False
    if rules.working_hours is not None:
        local = now.astimezone(ZoneInfo(rules.working_hours.timezone))
        on_day = routing.DAYS[local.weekday()] in rules.working_hours.days
        return on_day and rules.working_hours.start <= local.time() < rules.working_hours.end
    return True


async def decide(res: Resources, db: asyncpg.Pool, person_id: str) -> tuple[str | None, str, list[dict[str, object]]]:
    """Owe a follow-up and make its pick, as the drain does: (member, rule, candidates as audited)."""
    await followups.owe(db, {person_id: None}, trigger="test")
    row = await db.fetchrow("SELECT * FROM follow_ups WHERE person_id = $1", person_id)
    await assignees.assign(res.cache, db, res.settings, [dict(row)])
    audit = await db.fetchrow("SELECT * FROM assignment_decisions WHERE person_id = $1", person_id)
    return audit["chosen_member"], audit["rule"], audit["candidates"]


async def test_away_off_hours_and_capped_members_are_never_picked(res: Resources, db: asyncpg.Pool) -> None:
    rng = random.Random(20261124)
    picked_someone = 0
    for state in range(150):
        await res.redis.flushdb()
        await db.execute("TRUNCATE member_availability, assignment_decisions, follow_ups")
        members = {f"s{state}m{i}": rng.choice([1.0, 1.0, 2.0, 0.5]) for i in range(rng.randint(1, 6))}
        await res.cache.set_members(members)
        now = dt.datetime.now(UTC)
        rules = {m: av for m in members if (av := random_availability(rng, now)) is not None}
        for member, availability in rules.items():
            await routing.save_availability(db, member, availability)
        for member in members:
            for t in range(rng.randint(0, 5)):
                await res.cache.apply(TaskState(f"{member}-t{t}", member, "TODO", 1))
        loads = await assignees.member_loads(db, res.cache, res.settings)

        member, rule, candidates = await decide(res, db, f"person{state}")

        eligible = [m for m in members if allowed(m, rules.get(m), loads, now)]
        if member is None:
            assert eligible == [], f"state {state}: nobody picked although {eligible} could take it"
            assert rule == "none_available"
            continue
        picked_someone += 1
        assert member in eligible, f"state {state}: picked {member}, rules {rules}"
        best = min(loads.get(m, 0) / members[m] for m in eligible)
        assert loads.get(member, 0) / members[member] == best
        skipped = {c["member"]: c["skipped"] for c in candidates if c["skipped"]}
        assert set(skipped) == set(members) - set(eligible)
    assert picked_someone > 50  # the random states exercise both outcomes


async def test_weights_are_honoured_within_one_over_a_thousand_picks(res: Resources, db: asyncpg.Pool) -> None:
    await res.cache.set_members({"light": 1.0, "double": 2.0, "triple": 3.0})
    await followups.owe(db, {f"p{i}": None for i in range(1000)}, trigger="test")
    rows = [dict(r) for r in await db.fetch("SELECT * FROM follow_ups ORDER BY id")]
    for start in range(0, 1000, 60):  # a batch at a time, as the drain claims them
        await assignees.assign(res.cache, db, res.settings, rows[start : start + 60])
    loads = await assignees.member_loads(db, res.cache, res.settings)
    for member, weight in (("light", 1), ("double", 2), ("triple", 3)):
        assert abs(loads[member] - 1000 * weight / 6) <= 1, loads
    assert await db.fetchval("SELECT count(*) FROM assignment_decisions") == 1000


async def test_concurrent_pickers_in_two_workers_share_the_load_evenly(res: Resources, db: asyncpg.Pool) -> None:
    await res.cache.set_members(dict.fromkeys(["m1", "m2", "m3", "m4", "m5"], 1.0))
    await followups.owe(db, {f"c{i}": None for i in range(100)}, trigger="test")
    rows = [dict(r) for r in await db.fetch("SELECT * FROM follow_ups ORDER BY id")]
    await asyncio.gather(*(assignees.assign(res.cache, db, res.settings, rows[i : i + 10]) for i in range(0, 100, 10)))
    assert await assignees.member_loads(db, res.cache, res.settings) == dict.fromkeys(
        ["m1", "m2", "m3", "m4", "m5"], 20
    )


async def test_nobody_available_goes_to_the_fallback_or_waits(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    for member in ("m1", "m2", "m3"):
        await routing.save_availability(db, member, routing.Availability(away=True))
    waiting_person = fake.add_person("wait@example.com", first="Wait")
    await followups.owe(db, {waiting_person: None}, trigger="test")
    rounds = await drain.until_idle(res)
    assert sum(r.follow_ups.waiting for r in rounds) == 1
    assert fake.tasks == {}  # nothing created while nobody can take it
    row = await db.fetchrow("SELECT state, wait_until FROM follow_ups WHERE person_id = $1", waiting_person)
    assert row["state"] == "pending"
    assert row["wait_until"] > dt.datetime.now(UTC)
    assert await db.fetchval("SELECT rule FROM assignment_decisions") == "none_available"

    fallback_person = fake.add_person("fb@example.com", first="Fallback")
    await followups.owe(db, {fallback_person: None}, trigger="test")
    await drain.until_idle(with_settings(res, fallback_assignee_email="m2@acme.test"))
    assert await db.fetchval("SELECT assignee_id FROM follow_ups WHERE person_id = $1", fallback_person) == "m2"
    rules = [r["rule"] for r in await routing.recent_decisions(db, person_id=fallback_person, limit=5)]
    assert rules == ["fallback"]

    await routing.save_availability(db, "m3", routing.Availability())  # m3 is back
    await db.execute("UPDATE follow_ups SET wait_until = now() WHERE person_id = $1", waiting_person)
    await drain.until_idle(res)
    row = await db.fetchrow("SELECT state, assignee_id FROM follow_ups WHERE person_id = $1", waiting_person)
    assert (row["state"], row["assignee_id"]) == ("open", "m3")


async def test_sla_reassigns_an_untouched_follow_up_once_per_round_and_survives_a_redis_flush(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    person = fake.add_person("sla@example.com", first="Sla")
    await followups.owe(db, {person: None}, trigger="test")
    await drain.until_idle(res)
    row = await db.fetchrow("SELECT * FROM follow_ups")
    task_id, first_owner = row["task_id"], row["assignee_id"]
    assert row["sla_due_at"] > dt.datetime.now(UTC) + dt.timedelta(hours=3.9)  # the SLA clock runs in the row
    assert await followups.sla_sweep(res.follow_up_deps(), lease_s=30) == {"reassigned": 0, "touched": 0,
                                                                           "nobody_available": 0}  # fmt: skip

    await res.redis.flushdb()  # no deferred job to lose
    await db.execute("UPDATE follow_ups SET sla_due_at = now() - interval '1 minute'")  # 4 hours later
    swept = await asyncio.gather(*(followups.sla_sweep(res.follow_up_deps(), lease_s=30) for _ in range(3)))
    assert sum(s["reassigned"] for s in swept) == 1  # three sweeps at once: the round happens once
    task = fake.tasks[task_id]
    assert task["assigneeId"] not in (None, first_owner)
    assert "untouched for 4 h (SLA)" in task["bodyV2"]["markdown"]
    loads = await assignees.member_loads(db, res.cache, res.settings)
    assert loads.get(first_owner or "", 0) == 0
    assert loads[task["assigneeId"]] == 1  # the load moved with it
    after = await db.fetchrow("SELECT * FROM follow_ups")
    assert (after["assignee_id"], after["reassignments"]) == (task["assigneeId"], 1)
    decisions = await routing.recent_decisions(db, person_id=person, limit=5)
    assert decisions[0]["rule"].startswith("sla_reassignment:")
    assert decisions[0]["chosen_member"] == task["assigneeId"]

    fake.touch(task_id)  # the rep opened and edited it
    await db.execute("UPDATE follow_ups SET sla_due_at = now() - interval '1 minute'")
    assert (await followups.sla_sweep(res.follow_up_deps(), lease_s=30))["touched"] == 1
    assert fake.calls["update_task"] == 1
    assert await db.fetchval("SELECT sla_due_at FROM follow_ups") is None  # a touched task leaves the SLA


async def test_the_audit_and_the_availability_api(twenty_settings: Settings, res: Resources, fake: FakeTwenty) -> None:
    person = fake.add_person("audit@example.com", first="Audit")
    await followups.owe(res.db, {person: None}, trigger="test")
    await drain.until_idle(res)
    outcome = await res.db.fetchrow("SELECT * FROM follow_ups")
    async with app_client(twenty_settings) as api:
        [decision] = (await api.get("/assignments", params={"person_id": person})).json()["assignments"]
        assert (decision["task_id"], decision["chosen_member"]) == (outcome["task_id"], outcome["assignee_id"])
        assert {c["member"] for c in decision["candidates"]} == {"m1", "m2", "m3"}
        assert all(c["load"] == 0 for c in decision["candidates"])

        hours = {"timezone": "Europe/Paris", "days": ["mon", "tue"], "start": "09:00", "end": "17:00"}
        saved = await api.put("/members/m1/availability", json={"working_hours": hours, "max_open_tasks": 5})
        assert saved.status_code == 200
        assert (await api.get("/members/m1/availability")).json()["max_open_tasks"] == 5
        listed = {m["id"]: m for m in (await api.get("/members")).json()["members"]}
        assert listed["m1"]["cap"] == 5
        assert listed[outcome["assignee_id"]]["load"] == 1

        bad_zone = await api.put("/members/m1/availability", json={"working_hours": {**hours, "timezone": "Mars/Base"}})
        assert bad_zone.status_code == 422
        assert bad_zone.json()["detail"][0]["field"] == "working_hours.timezone"
        negative = await api.put("/members/m1/availability", json={"max_open_tasks": -1})
        assert (negative.status_code, negative.json()["detail"][0]["field"]) == (422, "max_open_tasks")
        naive = await api.put("/members/m1/availability", json={"away_until": "2026-12-01T09:00:00"})
        assert naive.status_code == 422
        assert (await api.get("/members/nobody/availability")).status_code == 404


async def test_unknown_member_emails_stop_the_worker_at_start(res: Resources, fake: FakeTwenty) -> None:
    assert await _check_routing_config(res) is None
    wrong = dataclasses.replace(res, settings=res.settings.model_copy(update={
        "fallback_assignee_email": "ghost@acme.test", "assignee_emails": frozenset({"m1@acme.test"})}))  # fmt: skip
    problem = await _check_routing_config(wrong)
    assert problem is not None
    assert "ghost@acme.test" in problem


async def test_off_hours_are_read_in_the_members_time_zone() -> None:
    hours = routing.WorkingHours(timezone="Asia/Tokyo", days=["mon"], start=dt.time(9), end=dt.time(17))
    assert hours.open_at(dt.datetime(2026, 11, 23, 1, 0, tzinfo=UTC))  # Monday 10:00 in Tokyo
    assert not hours.open_at(dt.datetime(2026, 11, 23, 9, 0, tzinfo=UTC))  # Monday 18:00 in Tokyo
    with pytest.raises(ValueError, match="start must be before end"):
        routing.WorkingHours(timezone="UTC", start=dt.time(17), end=dt.time(9))
