"""Hostile input at the edge (issue 16, cases 3, 5, 6, 7): what PostgreSQL or the JSON parser cannot take is a 422
naming the field (never a 500), a webhook of the wrong shape is a 4xx, the dashboard takes HTTP Basic, and the logs
hold no personal data or secret from a query string."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from reactor import logs
from reactor.settings import Settings
from reactor.webhooks import signature
from tests.conftest import API_KEYS, app_client

pytestmark = pytest.mark.anyio

SECRET = "hygiene-webhook-secret"


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"twenty_webhook_secret": SecretStr(SECRET)})


@pytest.fixture
async def api(hook_settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(hook_settings) as http:
        yield http


class Lines(logging.Handler):
    """Every log line as reactor writes it in production (JSON, masked, with request ids)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[dict[str, Any]] = []
        self.setFormatter(logs.JsonFormatter())
        self.addFilter(logs.ContextFilter(pii=False))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def text(self) -> str:
        return "\n".join(json.dumps(line) for line in self.lines)


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def raw_post(api: httpx.AsyncClient, path: str, body: bytes) -> Any:
    return api.post(path, content=body, headers={"Content-Type": "application/json"})


# -- case 3: input that reached PostgreSQL or the parser --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"email": "nul@example.com", "first_name": "a\\u0000b"}', "first_name"),
        (b'{"email": "nul@example.com", "address": {"city": "x\\u0000"}}', "address.city"),
        (b'{"email": "nul@example.com", "gclid": "\\u0000"}', "gclid"),  # an unknown field, kept in raw
        (b'{"email": "s@example.com", "first_name": "\\ud800"}', "first_name"),  # a lone surrogate
        (b'{"email": "s@example.com", "tags": ["ok", "\\udfff"]}', "tags.1"),
        (b'{"email": "n@example.com", "current_credit": Infinity}', "current_credit"),
        (b'{"email": "n@example.com", "current_credit": NaN}', "current_credit"),
        (b'{"email": "n@example.com", "current_credit": 1e400}', "current_credit"),
        (b'{"email": "n@example.com", "current_credit": ' + b"9" * 5000 + b"}", "current_credit"),
        (b'{"email": "n@example.com", "extra": -' + b"1" * 19 + b"}", "extra"),
        (b'{"email": "d@example.com", "deep": ' + b"[" * 1000 + b"]" * 1000 + b"}", "(body)"),
        (b"[" * 60_000, "(body)"),  # deeper than Python's parser could recurse, and unclosed
    ],
)
async def test_unstorable_json_is_a_422_naming_the_field(
    api: httpx.AsyncClient, db: asyncpg.Pool, body: bytes, field: str
) -> None:
    answer = await raw_post(api, "/leads", body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "validation_failed"
    assert field in [problem["field"] for problem in answer.json()["detail"]]
    assert await db.fetchval("SELECT count(*) FROM leads") == 0


async def test_json_within_the_limits_is_accepted(api: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    body = {"email": "fine@example.com", "first_name": "Zoë 😀", "big": 10**17, "nested": [[[{"a": 1.5}]]]}
    answer = await api.post("/leads", json=body)
    assert answer.status_code == 201, answer.text
    stored = await db.fetchrow("SELECT first_name, raw FROM leads")
    assert stored["first_name"] == "Zoë 😀"
    assert stored["raw"]["nested"] == [[[{"a": 1.5}]]]
    assert stored["raw"]["big"] == 10**17


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/leads/%00", "(path)"),
        ("/leads/a%00b", "(path)"),
        ("/leads/search?name=%00", "name"),
        ("/leads/search?email=a%00@example.com", "email"),
        ("/leads?cursor=%00", "cursor"),
        ("/assignments?person_id=%00", "person_id"),
        ("/members/%00/availability", "(path)"),
        ("/jobs/%00", "(path)"),
        ("/reconcile?dry_run=%00", "dry_run"),
    ],
)
async def test_a_nul_anywhere_in_the_url_is_a_422(api: httpx.AsyncClient, path: str, field: str) -> None:
    method = "POST" if path.startswith("/reconcile") else "GET"
    answer = await api.request(method, path)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["field"] == field


# -- case 6: webhooks of the wrong shape ------------------------------------------------------------------------


def signed(body: bytes) -> dict[str, str]:
    ts = str(int(time.time() * 1000))
    return {"Content-Type": "application/json", "X-Twenty-Webhook-Signature": signature(SECRET, ts, body),
            "X-Twenty-Webhook-Timestamp": ts, "X-Twenty-Webhook-Nonce": secrets.token_hex(8)}  # fmt: skip


def task_event(**record: Any) -> dict[str, Any]:
    return {"eventName": "task.updated", "webhookId": "w1", "record": {"id": "t1", "status": "TODO", **record}}


@pytest.mark.parametrize(
    "event",
    [
        task_event(updatedAt=1733000000000),  # the 500 the issue found: an int where a date is
        task_event(updatedAt="yesterday"),
        task_event(deletedAt={"at": "2026-01-01"}),
        task_event(createdAt=["2026-01-01T00:00:00Z"]),
        task_event(assigneeId=7),
        task_event(status=["DONE"]),
        task_event(id=12),
        {**task_event(), "updatedFields": 5},
        {**task_event(), "updatedFields": [1, 2]},
        {**task_event(), "webhookId": {"id": "w1"}},
        {"eventName": "task.updated", "record": "t1"},
        {"eventName": "task.updated", "record": None},
        {"eventName": 5, "record": {"id": "t1"}},
        {"eventName": "person.created", "record": {"id": "p1", "name": "Ada"}},
        {"eventName": "person.created", "record": {"id": "p1", "emails": {"primaryEmail": 5}}},
        ["task.updated"],
        "task.updated",
    ],
)
async def test_a_signed_webhook_of_the_wrong_shape_is_a_400(api: httpx.AsyncClient, redis: Redis, event: Any) -> None:
    body = json.dumps(event).encode()
    answer = await api.post("/webhooks/twenty", content=body, headers=signed(body))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_event"
    assert await redis.exists("arq:job:follow_up:p1") == 0  # no follow-up queued for a record it could not read


async def test_a_signed_webhook_with_unstorable_text_is_a_422(api: httpx.AsyncClient) -> None:
    body = json.dumps(task_event(status="TO\u0000DO")).encode()
    answer = await api.post("/webhooks/twenty", content=body, headers=signed(body))
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["field"] == "record.status"


async def test_a_well_formed_task_event_is_still_applied(api: httpx.AsyncClient) -> None:
    body = json.dumps(task_event(assigneeId="m1", updatedAt="2026-01-01T00:00:00.000Z")).encode()
    answer = await api.post("/webhooks/twenty", content=body, headers=signed(body))
    assert answer.status_code == 202, answer.text


# -- case 5: the dashboard with HTTP Basic ----------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_the_dashboard_accepts_http_basic_alone(api: httpx.AsyncClient) -> None:
    del api.headers["X-API-Key"]  # the old test always sent one, so Basic was never what let it in
    page = await api.get("/", headers={"Authorization": basic("anyone", API_KEYS["webform"])})
    assert page.status_code == 200, page.text[:200]
    assert "<h1>reactor</h1>" in page.text
    for refused in (basic("anyone", "wrong-key"), basic("only-a-user", ""), "Basic !!!not-base64", "Basic"):
        answer = await api.get("/", headers={"Authorization": refused})
        assert answer.status_code == 401, refused
        assert answer.headers["WWW-Authenticate"].startswith("Basic")


async def test_http_basic_is_for_the_dashboard_only(api: httpx.AsyncClient) -> None:
    del api.headers["X-API-Key"]
    answer = await api.get("/leads", headers={"Authorization": basic("anyone", API_KEYS["webform"])})
    assert answer.status_code == 401


# -- case 7: logs -----------------------------------------------------------------------------------------------


def test_lead_route_query_strings_are_masked_like_bodies() -> None:
    access = '127.0.0.1:5000 - "GET /leads/search?name=Ada%20Lovelace&phone=%2B14155552671&limit=5 HTTP/1.1" 200'
    masked = logs.mask(access)
    assert "Lovelace" not in masked
    assert "4155552671" not in masked
    assert "limit=5" in masked  # not personal: kept for whoever reads the log
    assert "/leads/search?name=***&phone=***" in masked
    assert "person_id=***" in logs.mask("GET /assignments?person_id=p-123 HTTP/1.1")


@pytest.mark.parametrize(
    "url",
    ["/?token=src.1.abc", "/?%74oken=src.1.abc", "/?TOKEN=src.1.abc", "/metrics?api_key=src.1.abc",
     "/?x=1&api%5Fkey=src.1.abc", "/?x-api-key=src.1.abc", "http://host:1/?token=src.1.abc"],
)  # fmt: skip
def test_a_secret_in_a_query_string_is_masked_even_with_log_pii(url: str) -> None:
    for pii in (False, True):
        record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '"GET %s HTTP/1.1" 200', (url,), None)
        logs.ContextFilter(pii=pii).filter(record)
        assert "src.1.abc" not in record.getMessage(), (pii, record.getMessage())
