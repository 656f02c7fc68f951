"""POST /webhooks/twenty: Twenty's signature scheme checked against its real deliveries, replays and duplicates
refused, task events applied to the load cache, person.created turned into an owed follow-up (a row)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from reactor.loadcache import LoadCache
from reactor.resources import workspace_key
from reactor.settings import Settings
from reactor.webhooks import SignatureRejected, parse_event, signature, verify
from tests.conftest import app_client
from tests.fixtures import recorded_deliveries, webhook_secrets

pytestmark = pytest.mark.anyio

SECRET = "local-test-secret"


def headers_of(delivery: dict[str, Any]) -> dict[str, str]:
    return {name.lower(): value for name, value in delivery["headers"]}


def delivery(event: str) -> dict[str, Any]:
    return next(d for d in recorded_deliveries() if d["body_json"]["eventName"] == event)


@pytest.mark.parametrize("index", range(55))
def test_every_recorded_delivery_verifies_with_its_subscriptions_secret(index: int) -> None:
    sent = recorded_deliveries()[index]
    headers = headers_of(sent)
    secret = webhook_secrets()[sent["body_json"]["webhookId"]]
    nonce = verify(secret, headers, sent["body_raw"].encode(),
                   now_ms=int(headers["x-twenty-webhook-timestamp"]), tolerance_s=300)  # fmt: skip
    assert nonce == headers["x-twenty-webhook-nonce"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"body": b'{"eventName":"person.created","record":{"id":"x"}}'}, "signature does not match"),
        ({"secret": "another-secret"}, "signature does not match"),
        ({"now_delta_ms": 301_000}, "more than 300s away"),
        ({"now_delta_ms": -301_000}, "more than 300s away"),
        ({"drop": "x-twenty-webhook-signature"}, "missing"),
        ({"drop": "x-twenty-webhook-timestamp"}, "missing"),
    ],
)
def test_tampered_stale_and_unsigned_deliveries_are_rejected(change: dict[str, Any], reason: str) -> None:
    sent = delivery("person.created")
    headers = headers_of(sent)
    headers.pop(change.get("drop", ""), None)
    now = int(headers.get("x-twenty-webhook-timestamp", "0")) + change.get("now_delta_ms", 0)
    with pytest.raises(SignatureRejected, match=reason):
        verify(change.get("secret", SECRET), headers, change.get("body", sent["body_raw"].encode()),
               now_ms=now, tolerance_s=300)  # fmt: skip


def test_an_event_id_is_stable_across_re_sends_and_differs_per_change() -> None:
    updates = [d["body_json"] for d in recorded_deliveries() if d["body_json"]["eventName"] == "task.updated"]
    first = parse_event(updates[0])
    resent = parse_event({**updates[0], "eventDate": "2030-01-01T00:00:00.000Z"})  # a re-send has a new date
    assert first.event_id == resent.event_id
    assert len({parse_event(u).event_id for u in updates}) == len(updates)


# -- the route ---------------------------------------------------------------------------------------------


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"twenty_webhook_secret": SecretStr(SECRET)})


@pytest.fixture
async def api(hook_settings: Settings, db: object, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(hook_settings) as http:
        yield http


def signed(
    body: str | bytes, *, secret: str = SECRET, ts: int | None = None, nonce: str | None = None
) -> dict[str, str]:
    raw = body.encode() if isinstance(body, str) else body
    stamp = str(ts if ts is not None else int(time.time() * 1000))
    return {
        "content-type": "application/json",
        "x-twenty-webhook-timestamp": stamp,
        "x-twenty-webhook-signature": signature(secret, stamp, raw),
        "x-twenty-webhook-nonce": nonce or secrets.token_hex(16),
    }


async def post(api: httpx.AsyncClient, body: str, **sign: Any) -> httpx.Response:
    return await api.post("/webhooks/twenty", content=body.encode(), headers=signed(body, **sign))


def task_event(name: str, task_id: str, assignee: str | None, status: str, updated: str, **extra: Any) -> str:
    record = {"id": task_id, "assigneeId": assignee, "status": status, "updatedAt": updated, "deletedAt": None}
    body = {"eventName": name, "webhookId": "w1", "objectMetadata": {"nameSingular": "task"},
            "record": record | extra}  # fmt: skip
    return json.dumps(body, separators=(",", ":"))


def cache_of(settings: Settings, redis: Redis) -> LoadCache:
    return LoadCache(redis, load_statuses=["TODO"], workspace=workspace_key(settings))


async def test_person_created_owes_one_follow_up(api: httpx.AsyncClient, db: asyncpg.Pool, redis: Redis) -> None:
    body = delivery("person.created")["body_raw"]
    record = json.loads(body)["record"]
    response = await post(api, body)
    assert response.status_code == 202
    assert response.json()["status"] == "follow_up_owed"
    row = await db.fetchrow("SELECT * FROM follow_ups")
    assert (row["person_id"], row["state"], row["trigger"]) == (record["id"], "pending", "person_created")
    assert row["person"]["id"] == record["id"]  # kept: the drain need not read the person
    assert await redis.zcard("arq:queue") == 0  # no job: the row is the work

    again = await post(api, body)  # Twenty's duplicate: same change, new nonce and timestamp
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")


async def test_duplicate_deliveries_at_once_owe_one_follow_up(api: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    body = delivery("person.created")["body_raw"]
    responses = await asyncio.gather(*(post(api, body) for _ in range(20)))
    assert sorted(r.json()["status"] for r in responses) == ["duplicate"] * 19 + ["follow_up_owed"]
    assert await db.fetchval("SELECT count(*) FROM follow_ups") == 1


async def test_rejections_are_401_with_a_reason(api: httpx.AsyncClient) -> None:
    body = delivery("person.created")["body_raw"]
    wrong = await post(api, body, secret="not-the-secret")
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_signature")
    assert wrong.json()["detail"] == "signature does not match"
    stale = await post(api, body, ts=int(time.time() * 1000) - 10 * 60 * 1000)
    assert stale.status_code == 401
    assert "away from now" in stale.json()["detail"]
    unsigned = await api.post("/webhooks/twenty", content=body, headers={"content-type": "application/json"})
    assert unsigned.status_code == 401

    headers = signed(body)
    first = await api.post("/webhooks/twenty", content=body, headers=headers)
    replay = await api.post("/webhooks/twenty", content=body, headers=headers)  # the same request, captured
    assert first.status_code == 202
    assert (replay.status_code, replay.json()["detail"]) == (401, "this delivery was already received (replayed nonce)")
    resent = await post(api, body)  # the replay did not make the event forgettable: a re-send is still a duplicate
    assert (resent.status_code, resent.json()["status"]) == (200, "duplicate")


async def test_bad_bodies_are_4xx_not_500(api: httpx.AsyncClient) -> None:
    assert (await post(api, "{not json")).status_code == 400
    missing = await post(api, json.dumps({"eventName": "person.created", "record": {}}))
    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_event")
    other = await post(api, json.dumps({"eventName": "company.created", "record": {"id": "c1"}}))
    assert (other.status_code, other.json()["status"]) == (202, "ignored")


async def test_webhooks_off_without_a_secret(settings: Settings, db: object, redis: Redis) -> None:
    async with app_client(settings) as http:
        response = await http.post("/webhooks/twenty", content=b"{}", headers=signed("{}"))
    assert (response.status_code, response.json()["error"]) == (503, "not_configured")


async def test_task_events_keep_the_load_cache_current_in_any_order(
    api: httpx.AsyncClient, hook_settings: Settings, redis: Redis
) -> None:
    cache = cache_of(hook_settings, redis)
    created = task_event("task.created", "t1", "m1", "TODO", "2026-11-24T10:00:00.000Z")
    moved = task_event("task.updated", "t1", "m2", "TODO", "2026-11-24T10:05:00.000Z", updatedFields=["assigneeId"])
    done = task_event("task.updated", "t1", "m2", "DONE", "2026-11-24T10:09:00.000Z")

    assert (await post(api, moved)).json()["status"] == "applied"  # arrives first
    assert (await post(api, created)).json()["status"] == "stale"  # older than what is known: no effect
    assert await cache.counts() == {"m2": 1}
    await post(api, done)
    assert await cache.counts() == {}


async def test_the_recorded_task_events_apply(api: httpx.AsyncClient, hook_settings: Settings, redis: Redis) -> None:
    cache = cache_of(hook_settings, redis)
    sent = [d for d in recorded_deliveries() if d["body_json"]["eventName"].startswith("task.")]
    names = [(d["body_json"]["eventName"], d["body_json"]["record"].get("status")) for d in sent]
    # The recording: task A created, moved to IN_PROGRESS, DONE; task B created unassigned, assigned (TODO), then
    # destroyed; then A is updated again (DONE twice, IN_PROGRESS twice, each delivered twice).
    assert names[:6] == [("task.created", "TODO"), ("task.updated", "IN_PROGRESS"), ("task.updated", "DONE"),
                         ("task.created", "TODO"), ("task.updated", "TODO"), ("task.destroyed", "TODO")]  # fmt: skip

    async def replay(items: list[dict[str, Any]]) -> dict[str, int]:
        for item in items:
            response = await post(api, item["body_raw"])
            assert response.status_code in (200, 202), response.text
        return {member: count for member, count in (await cache.counts()).items() if count}

    b_assignee = sent[4]["body_json"]["record"]["assigneeId"]
    assert await replay(sent[:5]) == {b_assignee: 1}  # A is done; B is open and assigned: one load
    assert await replay(sent[5:]) == {}  # B destroyed; A only ever IN_PROGRESS or DONE again: no load
