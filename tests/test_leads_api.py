"""POST /leads and the read endpoints, through the app's ASGI interface inside its lifespan."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from tests.conftest import API_KEYS

pytestmark = pytest.mark.anyio

ADA = {"first_name": "Ada", "last_name": "Lovelace", "email": "Ada@Example.com", "phone": "(415) 555-2671"}


async def test_new_lead_is_created_with_normalised_identity(client: httpx.AsyncClient) -> None:
    response = await client.post("/leads", json=ADA)
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "created"
    lead = (await client.get(f"/leads/{body['lead_id']}")).json()
    assert lead["email"] == "ada@example.com"
    assert lead["phone"] == "+14155552671"
    assert lead["api_source"] == "webform"
    assert lead["submission_count"] == 1
    assert lead["crm_synced"] is False
    assert lead["crm_person_id"] is None


async def test_source_lead_id_is_kept_and_a_retry_gets_the_same_answer(client: httpx.AsyncClient) -> None:
    first = await client.post("/leads", json={**ADA, "lead_id": "form-77"})
    retry = await client.post("/leads", json={**ADA, "lead_id": "form-77"})
    lead_id = first.json()["lead_id"]
    assert lead_id.startswith("ld_")  # reactor's own id; the source's is kept beside it
    assert (first.status_code, first.json()) == (201, {"status": "created", "lead_id": lead_id,
                                                       "source_lead_id": "form-77"})  # fmt: skip
    assert (retry.status_code, retry.json()) == (200, {"status": "existing", "lead_id": lead_id,
                                                       "source_lead_id": "form-77"})  # fmt: skip
    by_source_id = (await client.get("/leads/form-77")).json()
    assert (by_source_id["lead_id"], by_source_id["source_lead_id"]) == (lead_id, "form-77")


async def test_lead_id_matches_when_email_and_phone_do_not(client: httpx.AsyncClient) -> None:
    first = await client.post("/leads", json={"lead_id": "ads-1", "email": "one@example.com"})
    again = await client.post("/leads", json={"lead_id": "ads-1", "email": "typo@example.com"})
    assert again.json() == {"status": "existing", "lead_id": first.json()["lead_id"], "source_lead_id": "ads-1"}


async def test_dedupe_order_is_email_then_phone(client: httpx.AsyncClient) -> None:
    by_email = (await client.post("/leads", json={"email": "e@example.com"})).json()["lead_id"]
    by_phone = (await client.post("/leads", json={"phone": "+12125550123"})).json()["lead_id"]
    # Matches one lead by email and the other by phone: email wins.
    both = await client.post("/leads", json={"email": "E@example.com", "phone": "+1 212 555 0123"})
    assert both.json() == {"status": "existing", "lead_id": by_email, "source_lead_id": None}
    phone_only = await client.post("/leads", json={"phone": "212-555-0123"})
    assert phone_only.json() == {"status": "existing", "lead_id": by_phone, "source_lead_id": None}
    # The email lead could not take a phone another lead holds.
    assert (await client.get(f"/leads/{by_email}")).json()["phone"] is None


async def test_existing_lead_gains_missing_fields_and_keeps_its_own(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    lead_id = (await client.post("/leads", json={"email": "g@example.com", "first_name": "Grace"})).json()["lead_id"]
    before = (await client.get(f"/leads/{lead_id}")).json()
    update = {
        "email": "g@example.com",
        "first_name": "Gracie",
        "last_name": "Hopper",
        "phone": "+1 646 555 0199",
        "address": {"city": "Arlington"},
        "campaign_cost": 12,
    }
    assert (await client.post("/leads", json=update)).status_code == 200
    after = (await client.get(f"/leads/{lead_id}")).json()
    assert after["first_name"] == "Grace"  # not overwritten
    assert after["last_name"] == "Hopper"  # gained
    assert after["phone"] == "+16465550199"
    assert after["address"]["city"] == "Arlington"
    assert after["raw"] == {"campaign_cost": 12}
    assert after["submission_count"] == 2
    assert after["last_seen_at"] > before["last_seen_at"]
    assert after["created_at"] == before["created_at"]
    # Every submission is kept verbatim, the overridden first name included.
    payloads = await db.fetch("SELECT payload, outcome FROM lead_submissions ORDER BY id")
    assert [row["outcome"] for row in payloads] == ["created", "existing"]
    assert payloads[1]["payload"]["first_name"] == "Gracie"


async def test_unknown_fields_are_kept_verbatim(client: httpx.AsyncClient) -> None:
    extra = {"gclid": "abc", "answers": {"q1": [1, 2]}, "address": {"city": "Paris", "arrondissement": 11}}
    lead_id = (await client.post("/leads", json={"email": "x@example.com", **extra})).json()["lead_id"]
    lead = (await client.get(f"/leads/{lead_id}")).json()
    assert lead["raw"] == {"gclid": "abc", "answers": {"q1": [1, 2]}, "address": {"arrondissement": 11}}
    assert lead["address"]["city"] == "Paris"


async def test_all_documented_fields_round_trip(client: httpx.AsyncClient) -> None:
    full = {
        "lead_id": "full-1",
        "first_name": "Alan",
        "last_name": "Turing",
        "email": "alan@example.com",
        "phone": "020 7946 0958",
        "address": {
            "street": "1 Bletchley",
            "city": "London",
            "state": "ENG",
            "postal_code": "MK3",
            "country": "GB",
        },
        "vehicle": {"make": "Austin", "model": "Seven", "year": 1936},
        "employment": {
            "employer": "GC&CS",
            "job_title": "Cryptanalyst",
            "employment_status": "full-time",
            "years_employed": 4.5,
        },
        "salary": {"min": 40000, "max": 60000},
        "current_credit": 25000.5,
        "consent": True,
        "source": "google-ads",
        "utm_source": "google",
        "utm_medium": "cpc",
        "utm_campaign": "spring",
        "utm_term": "loan",
        "utm_content": "ad-2",
    }
    await client.post("/leads", json=full)
    lead = (await client.get("/leads/full-1")).json()
    assert lead["phone"] == "+442079460958"  # parsed in the lead's own country, not the default US
    assert lead["vehicle"] == {"make": "Austin", "model": "Seven", "year": 1936}
    assert lead["employment"]["years_employed"] == 4.5
    assert lead["salary"] == {"min": 40000, "max": 60000}
    assert lead["current_credit"] == 25000.5
    assert lead["consent"] is True
    assert lead["utm"] == {
        "source": "google",
        "medium": "cpc",
        "campaign": "spring",
        "term": "loan",
        "content": "ad-2",
    }
    assert lead["source"] == "google-ads"
    assert lead["raw"] == {}


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}],
)
async def test_requests_without_a_valid_key_get_401(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    client.headers.pop("X-API-Key")
    for method, url in (("POST", "/leads"), ("GET", "/leads"), ("GET", "/leads/x"), ("GET", "/leads/search")):
        response = await client.request(method, url, json=ADA, headers=headers)
        assert response.status_code == 401, (method, url)
        assert response.json()["error"] == "unauthenticated"


async def test_bearer_key_names_the_source(client: httpx.AsyncClient) -> None:
    client.headers.pop("X-API-Key")
    response = await client.post("/leads", json=ADA, headers={"Authorization": f"Bearer {API_KEYS['adsplatform']}"})
    assert response.status_code == 201
    lead = (await client.get(f"/leads/{response.json()['lead_id']}", headers={"X-API-Key": API_KEYS["webform"]})).json()
    assert lead["api_source"] == "adsplatform"


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/leads", content=b'{"email": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == "malformed_json"
    bad_utf8 = await client.post("/leads", content=b'{"email": "\xff"}', headers={"Content-Type": "application/json"})
    assert bad_utf8.status_code == 400


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/leads", data={"email": "a@example.com"})
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]


async def test_body_over_64_kib_is_413(client: httpx.AsyncClient) -> None:
    big = {"email": "a@example.com", "notes": "x" * (64 * 1024)}
    assert (await client.post("/leads", json=big)).status_code == 413

    async def chunks():  # no Content-Length: the limit holds while streaming
        yield b'{"email": "a@example.com", "notes": "'
        for _ in range(70):
            yield b"y" * 1024
        yield b'"}'

    streamed = await client.post("/leads", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413


async def test_schema_errors_are_422_listing_every_bad_field(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/leads",
        json={
            "email": "not-an-email",
            "phone": "12",
            "vehicle": {"year": "soon"},
            "salary": {"min": 10, "max": 5},
            "consent": "perhaps",
            "current_credit": -1,
        },
    )
    assert response.status_code == 422
    fields = {problem["field"] for problem in response.json()["detail"]}
    assert fields == {"email", "phone", "vehicle.year", "salary", "consent", "current_credit"}


async def test_email_or_phone_is_required(client: httpx.AsyncClient) -> None:
    response = await client.post("/leads", json={"first_name": "Nobody"})
    assert response.status_code == 422
    assert "email or phone" in response.json()["detail"][0]["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"null",
        b'"lead"',
        b"42",
        b'{"email": {"nested": 1}}',
        b'{"email": "a@b.co", "phone": 5}',
        b'{"email": "a@b.co", "address": "Main St"}',
        b'{"email": "a@b.co", "current_credit": 1e400}',
        b'{"email": "a@b.co", "lead_id": "has space"}',
        b'{"email": "a@b.co", "vehicle": {"year": 99999999999999999999}}',
    ],
)
async def test_odd_input_never_causes_a_500(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post("/leads", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500
    assert set(response.json()) == {"error", "detail"}


async def test_unknown_lead_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/leads/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "lead_not_found"


async def test_list_pages_newest_first_with_a_cursor(client: httpx.AsyncClient) -> None:
    ids = [(await client.post("/leads", json={"email": f"p{i}@example.com"})).json()["lead_id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/leads", params=params)).json()
        seen += [lead["lead_id"] for lead in page["leads"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "201"}, {"limit": "x"}, {"cursor": "bm9wZQ"}])
async def test_bad_list_parameters_are_422(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    response = await client.get("/leads", params=params)
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] in params


async def test_search_by_phone_email_and_name(client: httpx.AsyncClient) -> None:
    ada = (await client.post("/leads", json=ADA)).json()["lead_id"]
    other = (await client.post("/leads", json={"email": "bob@example.com", "first_name": "Bob"})).json()["lead_id"]

    async def found(**params: str) -> list[str]:
        response = await client.get("/leads/search", params=params)
        assert response.status_code == 200
        return [lead["lead_id"] for lead in response.json()["leads"]]

    assert await found(phone="+1 (415) 555-2671") == [ada]
    assert await found(phone="4155552671") == [ada]
    assert await found(email="ADA@example.com") == [ada]
    assert await found(name="lovelace") == [ada]
    assert await found(name="ADA LOVELACE") == [ada]
    assert await found(name="bob") == [other]
    assert await found(name="ada", email="bob@example.com") == []


async def test_search_returns_at_most_50_newest(client: httpx.AsyncClient) -> None:
    for i in range(55):
        await client.post("/leads", json={"email": f"s{i}@example.com", "last_name": "Smith"})
    leads = (await client.get("/leads/search", params={"name": "smith"})).json()["leads"]
    assert len(leads) == 50
    assert leads[0]["email"] == "s54@example.com"


async def test_list_and_search_show_the_follow_up_as_the_lead_itself_does(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    lead_id = (await client.post("/leads", json=ADA)).json()["lead_id"]
    await db.execute("UPDATE leads SET crm_person_id = 'person-ada', crm_synced = true WHERE lead_id = $1", lead_id)
    await db.execute("INSERT INTO follow_ups (person_id, task_id, target_id, assignee_id, state, llm_used, opened_at) "
                     "VALUES ('person-ada', 'task-ada', 'target-ada', 'member-1', 'open', false, now())")  # fmt: skip
    shown = (await client.get(f"/leads/{lead_id}")).json()
    assert shown["follow_up"]["task_id"] == "task-ada"
    assert (await client.get("/leads")).json()["leads"] == [shown]
    assert (await client.get("/leads/search", params={"email": "ada@example.com"})).json()["leads"] == [shown]
    assert (await client.get("/leads/search", params={"name": "lovelace"})).json()["leads"] == [shown]


async def test_search_needs_a_criterion_and_valid_values(client: httpx.AsyncClient) -> None:
    assert (await client.get("/leads/search")).status_code == 422
    response = await client.get("/leads/search", params={"phone": "12", "email": "nope"})
    assert response.status_code == 422
    assert {p["field"] for p in response.json()["detail"]} == {"phone", "email"}


async def test_a_name_too_long_for_the_name_index_is_422_not_500(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    wide = "\U0001f600" * 500  # 500 characters, within the length limit, but 2,000 bytes
    response = await client.post("/leads", json={"email": "wide@example.com", "first_name": wide, "last_name": wide})
    assert response.status_code == 422
    assert {p["field"] for p in response.json()["detail"]} == {"first_name", "last_name"}
    assert "bytes" in response.json()["detail"][0]["message"]
    narrow = "\U0001f600" * 200  # 800 bytes each: stored
    assert (
        await client.post("/leads", json={"email": "w@example.com", "first_name": narrow, "last_name": narrow})
    ).status_code == 201
    assert await db.fetchval("SELECT count(*) FROM leads") == 1
