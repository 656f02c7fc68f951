"""The Twenty simulator against reactor's own Twenty client and the contract: envelopes, upsert and batch,
filters, cursor pagination, groupBy, errors, the rate limit, and signed webhooks reactor verifies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from reactor.sim import DeliveryKnobs, Knobs, create_sim
from reactor.sim.filters import FilterError, parse
from reactor.sim.throttle import LegacyThrottle
from reactor.twenty import PersonInput, TaskInput, TwentyClient, TwentyRejected, TwentyUnavailable
from reactor.webhooks import parse_event, verify

pytestmark = pytest.mark.anyio

TOKEN = "sim-token"


class Capture:
    """Where the simulator's webhooks land."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.deliveries.append((dict(request.headers), request.content))
        return httpx.Response(200)

    def events(self) -> list[str]:
        return [json.loads(body)["eventName"] for _, body in self.deliveries]


async def started(capture: Capture, **options: Any) -> AsyncIterator[tuple[TwentyClient, Any]]:
    app = create_sim(token=TOKEN, delivery_transport=httpx.MockTransport(capture), **options)
    async with LifespanManager(app) as manager, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=manager.app), base_url="http://sim/rest",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as http:  # fmt: skip
        yield TwentyClient(http, max_attempts=1), app


@pytest.fixture
def capture() -> Capture:
    return Capture()


@pytest.fixture
async def sim(capture: Capture) -> AsyncIterator[tuple[TwentyClient, Any]]:
    async for pair in started(capture, members=3, open_tasks=5):
        yield pair


async def test_upsert_matches_on_email_and_batches_work(sim: tuple[TwentyClient, Any]) -> None:
    twenty, _ = sim
    first = await twenty.upsert_person(PersonInput(first_name="Ada", email="Ada@Example.com", phone="+14155552671"))
    again = await twenty.upsert_person(PersonInput(first_name="Ada", email="ada@example.com", city="London"))
    assert first.id == again.id
    assert again.city == "London"
    assert again.phones is not None
    assert (again.phones.primary_phone_number, again.phones.primary_phone_calling_code) == ("4155552671", "+1")
    people = await twenty.upsert_people([PersonInput(email=f"p{i}@example.com") for i in range(130)])
    assert len(people) == 130
    found = await twenty.find_person_by_phone("+14155552671")
    assert found is not None
    assert found.id == first.id


async def test_pages_follow_cursors_and_filters_apply(sim: tuple[TwentyClient, Any]) -> None:
    twenty, _ = sim
    await twenty.upsert_people([PersonInput(email=f"p{i}@example.com", city="Paris" if i % 2 else "Rome")
                                for i in range(450)])  # fmt: skip
    everyone = [p async for p in twenty.list_people()]
    assert len(everyone) == 450
    assert len({p.id for p in everyone}) == 450
    paris = [p async for p in twenty.list_people('city[eq]:"Paris"')]
    assert len(paris) == 225
    either = [p async for p in twenty.list_people('or(emails.primaryEmail[eq]:"p1@example.com",city[eq]:"Rome")')]
    assert len(either) == 226


async def test_tasks_group_by_targets_and_soft_delete(sim: tuple[TwentyClient, Any], capture: Capture) -> None:
    twenty, app = sim
    await twenty.create_webhook("http://reactor.test/hook", ["task.*"], "test", "s")
    members = await twenty.list_workspace_members()
    assert len(members) == 3
    assert sum((await twenty.count_open_tasks_by_assignee(("TODO",))).values()) == 5
    person = await twenty.upsert_person(PersonInput(first_name="Grace", email="grace@example.com"))
    task = await twenty.create_task(TaskInput(id="00000000-0000-4000-8000-000000000001", title="Call",
                                              status="TODO", assignee_id=members[0].id))  # fmt: skip
    again = await twenty.create_task(TaskInput(id=task.id, title="Call", status="TODO", assignee_id=members[0].id))
    assert again.id == task.id  # an upsert on our own id: still one task
    target = await twenty.create_task_target(task.id, person.id)
    assert target.person_id == person.id
    await twenty.delete_task(task.id)
    assert await twenty.get_task(task.id) is None  # in the trash
    await app.state.deliverer.drain()
    assert capture.events().count("task.created") == 1
    assert "task.deleted" in capture.events()


async def test_errors_are_twentys(sim: tuple[TwentyClient, Any]) -> None:
    twenty, _ = sim
    with pytest.raises(TwentyRejected, match="Field metadata not found for field: nope"):
        [t async for t in twenty.list_tasks("nope[eq]:1")]
    with pytest.raises(TwentyRejected, match="comparator equals not in"):
        [t async for t in twenty.list_tasks("status[equals]:TODO")]
    with pytest.raises(TwentyRejected, match="Provided phone number is invalid"):
        await twenty.upsert_person(PersonInput(email="x@example.com", phone="+999"))
    with pytest.raises(TwentyRejected, match="object 'person' not found"):
        await twenty.request("GET", "/person")
    with pytest.raises(TwentyRejected, match="Maximum number of records"):
        await twenty.request("POST", "/batch/people", json=[{}] * 201)


async def test_the_rate_limit_answers_429_like_twenty(capture: Capture) -> None:
    async for twenty, _ in started(capture, knobs=Knobs(rate_limit=3)):
        for _ in range(3):
            await twenty.list_workspace_members()
        with pytest.raises(TwentyUnavailable) as raised:
            await twenty.list_workspace_members()
        assert raised.value.status == 429
        assert raised.value.retry_after is None  # the legacy limiter sends no Retry-After
        assert "Limit reached (3 tokens per 60000 ms)" in str(raised.value)


async def test_webhooks_are_signed_as_twenty_signs_them(sim: tuple[TwentyClient, Any], capture: Capture) -> None:
    twenty, app = sim
    hook = await twenty.create_webhook("http://reactor.test/webhooks/twenty", ["person.created", "task.*"],
                                       "test", "the-secret")  # fmt: skip
    assert hook.secret == "the-secret"
    person = await twenty.upsert_person(PersonInput(first_name="Lin", email="lin@example.com"))
    await twenty.upsert_person(PersonInput(first_name="Lin", email="lin@example.com"))  # no change: no event
    await twenty.upsert_person(
        PersonInput(first_name="Linus", email="lin@example.com")
    )  # person.updated: not subscribed
    await app.state.deliverer.drain()
    [(headers, body)] = capture.deliveries
    verify("the-secret", headers, body, now_ms=int(headers["x-twenty-webhook-timestamp"]), tolerance_s=300)
    event = parse_event(json.loads(body))
    assert (event.name, event.record_id) == ("person.created", person.id)
    assert list(json.loads(body))[:6] == ["targetUrl", "eventName", "objectMetadata", "workspaceId", "webhookId",
                                          "eventDate"]  # fmt: skip


async def test_deliveries_can_be_dropped_and_duplicated(capture: Capture) -> None:
    knobs = Knobs(delivery=DeliveryKnobs(drop_rate=0.5, duplicate_rate=0.5))
    async for twenty, app in started(capture, knobs=knobs, seed=7):
        await twenty.create_webhook("http://reactor.test/hook", ["*.*"], "chaos", "s")
        await twenty.upsert_people([PersonInput(email=f"c{i}@example.com") for i in range(100)])
        await app.state.deliverer.drain()
        stats = app.state.deliverer.stats
        assert 20 < stats["dropped"] < 80
        assert stats["duplicated"] > 10
        assert len(capture.deliveries) == 100 - stats["dropped"] + stats["duplicated"]


def test_the_filter_parser_follows_twentys_rules() -> None:
    fields = {"status", "assigneeId", "title"}
    todo, _ = parse("status[in]:[TODO,IN_PROGRESS]", fields)
    assert todo({"status": "TODO"})
    assert not todo({"status": "DONE"})
    nested, mentions_deleted = parse('and(status[eq]:TODO,not(title[ilike]:"%urgent%"))', fields)
    assert nested({"status": "TODO", "title": "Call"})
    assert not nested({"status": "TODO", "title": "URGENT call"})
    assert mentions_deleted is False
    unassigned, _ = parse("assigneeId[is]:NULL", fields)
    assert unassigned({"assigneeId": None})
    with pytest.raises(FilterError, match="close bracket is missing"):
        parse("and(status[eq]:TODO", fields)


def test_the_legacy_throttler_loses_the_fraction_on_every_accepted_call() -> None:
    """As throttler.service.ts: whole tokens, floor(elapsed x rate), lastRefillAt reset on accept (not on refusal)."""
    now = [0.0]
    throttle = LegacyThrottle(lambda: now[0])
    for _ in range(100):  # one every 12 ms: the short (per-second) bucket keeps up, the long one is spent
        now[0] += 0.012
        assert throttle.take(100, 60) is None
    now[0] += 0.012
    assert throttle.take(100, 60) == "Limit reached (100 tokens per 60000 ms)"
    last = now[0] - 0.012
    now[0] = last + 0.599
    assert throttle.take(100, 60) is not None  # 599 ms after the last accepted call: floor(0.998) = 0
    now[0] = last + 0.601
    assert throttle.take(100, 60) is None  # one token earned and spent; the clock restarts here
    now[0] += 0.599
    assert throttle.take(100, 60) is not None
    accepted = 0
    for _ in range(120):  # a call every 500 ms for a minute: each accepted one restarts the clock
        now[0] += 0.5
        accepted += throttle.take(100, 60) is None
    assert accepted == 60  # every other call: 60 a minute, not the nominal 100 (or the 120 asked)
