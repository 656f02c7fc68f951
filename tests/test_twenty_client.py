"""The Twenty REST client against respx, answering with what a real Twenty server sent (tests/fixtures)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from reactor import metrics
from reactor.devstack import free_port
from reactor.ratelimit import Permit, RateLimitUnavailable
from reactor.twenty import (
    PersonInput,
    RateBudgetExhausted,
    TaskInput,
    TwentyAuthError,
    TwentyClient,
    TwentyRejected,
    TwentyUnavailable,
    create_http_client,
    quoted,
)
from tests.fixtures import recorded_rest, sample

pytestmark = pytest.mark.anyio

BASE = "http://twenty.test/rest"


class Sleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def client(sleeps: Sleeps) -> AsyncIterator[TwentyClient]:
    async with create_http_client(BASE, "secret-token") as http:
        yield TwentyClient(http, max_attempts=4, backoff_base_s=1.0, min_rate_limited_wait_s=0.6, sleep=sleeps)


def page(key: str, items: list[dict[str, object]], cursor: str | None) -> httpx.Response:
    info = {"hasNextPage": cursor is not None, "hasPreviousPage": False, "startCursor": None, "endCursor": cursor}
    return httpx.Response(200, json={"data": {key: items}, "totalCount": 999, "pageInfo": info})


def error(status: int, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, json={"statusCode": status, "error": "E", "messages": [message]})


def test_the_http_client_has_explicit_timeouts_and_the_bearer_token() -> None:
    http = create_http_client(BASE + "/", "tok")
    assert http.timeout.connect
    assert http.timeout.read
    assert http.timeout.write
    assert http.timeout.pool
    assert http.headers["Authorization"] == "Bearer tok"
    assert str(http.base_url) == BASE + "/"  # httpx keeps one trailing slash; paths join under /rest


@respx.mock
async def test_upsert_person_sends_twentys_shapes_and_reads_the_envelope(client: TwentyClient) -> None:
    recorded = recorded_rest("47-people-upsert-by-email")
    route = respx.post(f"{BASE}/people", params={"upsert": "true"}).mock(
        return_value=httpx.Response(recorded["status"], json=recorded["response"])
    )
    person = await client.upsert_person(
        PersonInput(
            first_name="Ada",
            last_name="Lovelace",
            email=" Ada.Lovelace@Example.com",
            phone="+14155552671",
            city="Marylebone",
            custom_fields={"budget": 5000.0},
        )
    )
    assert person.id == recorded["response"]["data"]["createPerson"]["id"]
    assert person.email == "ada.lovelace@example.com"
    sent = json.loads(route.calls.last.request.content)
    assert sent == {
        "name": {"firstName": "Ada", "lastName": "Lovelace"},
        "emails": {"primaryEmail": "ada.lovelace@example.com"},
        "phones": {"primaryPhoneNumber": "+14155552671", "primaryPhoneCallingCode": "+1"},
        "city": "Marylebone",
        "budget": 5000.0,
    }
    assert route.calls.last.request.headers["Authorization"] == "Bearer secret-token"


@respx.mock
async def test_list_tasks_follows_every_page_with_the_end_cursor(client: TwentyClient) -> None:
    pages = [
        page("tasks", [{"id": "t1", "status": "TODO"}, {"id": "t2", "status": "DONE"}], "c1"),
        page("tasks", [{"id": "t3", "status": "IN_PROGRESS"}], "c2+/="),
        page("tasks", [{"id": "t4", "status": "TODO", "assigneeId": "m1"}], None),
    ]
    route = respx.get(f"{BASE}/tasks").mock(side_effect=pages)

    tasks = [task async for task in client.list_tasks('status[in]:["TODO","IN_PROGRESS"]')]

    assert [task.id for task in tasks] == ["t1", "t2", "t3", "t4"]
    assert tasks[3].assignee_id == "m1"
    assert tasks[3].is_open
    assert not tasks[1].is_open
    params = [call.request.url.params for call in route.calls]
    assert [p.get("starting_after") for p in params] == [None, "c1", "c2+/="]
    assert all(p["limit"] == "200" and p["filter"] == 'status[in]:["TODO","IN_PROGRESS"]' for p in params)
    assert b"c2%2B%2F%3D" in route.calls[2].request.url.raw_path  # the cursor travels percent-encoded


@respx.mock
async def test_a_recorded_list_is_read_whole(client: TwentyClient) -> None:
    recorded = recorded_rest("10-workspace-members-list")
    respx.get(f"{BASE}/workspaceMembers").mock(return_value=httpx.Response(200, json=recorded["response"]))
    members = await client.list_workspace_members()
    assert [m.user_email for m in members] == [
        item["userEmail"] for item in recorded["response"]["data"]["workspaceMembers"]
    ]
    assert members[0].name is not None
    assert members[0].name.first_name == "Tim"


@respx.mock
async def test_upsert_people_goes_in_chunks_and_merges_repeated_emails(client: TwentyClient) -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        records = json.loads(request.content)
        people = [{"id": f"p-{r['emails']['primaryEmail']}", **r} for r in records]
        return httpx.Response(201, json={"data": {"createPeople": people}})

    route = respx.post(f"{BASE}/batch/people", params={"upsert": "true"}).mock(side_effect=echo)
    inputs = [PersonInput(email=f"p{i}@example.com") for i in range(130)]
    inputs.append(PersonInput(email="P0@example.com", city="Paris"))  # the same person again, in one batch

    people = await client.upsert_people(inputs)

    sizes = [len(json.loads(call.request.content)) for call in route.calls]
    assert sizes == [60, 60, 10]
    assert len(people) == 130
    first = json.loads(route.calls[0].request.content)[0]
    assert first["emails"]["primaryEmail"] == "p0@example.com"
    assert first["city"] == "Paris"


@respx.mock
async def test_429_waits_for_retry_after_then_succeeds(client: TwentyClient, sleeps: Sleeps) -> None:
    limited = sample("error-429")
    respx.get(f"{BASE}/people/p1").mock(side_effect=[
        httpx.Response(429, headers=limited["headers"], json=limited["body"]),
        httpx.Response(200, json={"data": {"person": {"id": "p1"}}}),
    ])  # fmt: skip
    person = await client.get_person("p1")
    assert person is not None
    assert person.id == "p1"
    assert len(sleeps) == 1
    assert sleeps[0] >= 12.0


@respx.mock
async def test_429_without_retry_after_waits_at_least_one_token(client: TwentyClient, sleeps: Sleeps) -> None:
    legacy = sample("error-429-legacy")
    respx.get(f"{BASE}/people/p1").mock(side_effect=[
        httpx.Response(429, json=legacy["body"]),
        httpx.Response(200, json={"data": {"person": {"id": "p1"}}}),
    ])  # fmt: skip
    client_with_slow_tokens = TwentyClient(client._http, backoff_base_s=0.01, min_rate_limited_wait_s=0.6,
                                           sleep=sleeps)  # fmt: skip
    assert await client_with_slow_tokens.get_person("p1") is not None
    assert sleeps == [0.6]


@respx.mock
async def test_5xx_and_timeouts_retry_with_growing_jittered_delays(client: TwentyClient, sleeps: Sleeps) -> None:
    recorded = recorded_rest("13-task-create")
    route = respx.post(f"{BASE}/tasks").mock(side_effect=[
        error(502, "Bad Gateway"),
        httpx.ReadTimeout("slow"),
        httpx.ConnectError("refused"),
        httpx.Response(201, json=recorded["response"]),
    ])  # fmt: skip
    task = await client.create_task(TaskInput(title="Call Ada", status="TODO", assignee_id="m1"))
    assert task.id == recorded["response"]["data"]["createTask"]["id"]
    assert task.body_v2 is not None
    assert task.body_v2.markdown == "Discuss the analytical engine"
    assert route.call_count == 4
    assert len(sleeps) == 3
    assert 0.5 <= sleeps[0] <= 1.0
    assert 1.0 <= sleeps[1] <= 2.0
    assert 2.0 <= sleeps[2] <= 4.0


@respx.mock
async def test_retries_are_bounded_and_then_unavailable(client: TwentyClient, sleeps: Sleeps) -> None:
    route = respx.get(f"{BASE}/tasks/t1").mock(return_value=error(503, "Service Unavailable"))
    with pytest.raises(TwentyUnavailable) as raised:
        await client.get_task("t1")
    assert route.call_count == 4
    assert len(sleeps) == 3
    assert raised.value.status == 503
    assert "Service Unavailable" in str(raised.value)


@respx.mock
async def test_400_is_not_retried_and_carries_twentys_message(client: TwentyClient, sleeps: Sleeps) -> None:
    recorded = recorded_rest("34-error-bad-filter")
    route = respx.get(f"{BASE}/tasks").mock(return_value=httpx.Response(400, json=recorded["response"]))
    with pytest.raises(TwentyRejected) as raised:
        [task async for task in client.list_tasks("nope[eq]:1")]
    assert route.call_count == 1
    assert sleeps == []
    assert raised.value.status == 400
    assert "Field metadata not found for field: nope" in str(raised.value)


@pytest.mark.parametrize("fixture", ["35-error-no-auth", "36-error-bad-token"])
@respx.mock
async def test_auth_failures_are_not_retried(client: TwentyClient, sleeps: Sleeps, fixture: str) -> None:
    recorded = recorded_rest(fixture)
    route = respx.get(f"{BASE}/workspaceMembers").mock(
        return_value=httpx.Response(recorded["status"], json=recorded["response"])
    )
    with pytest.raises(TwentyAuthError) as raised:
        await client.list_workspace_members()
    assert route.call_count == 1
    assert sleeps == []
    assert str(raised.value).endswith(recorded["response"]["messages"][0])


@respx.mock
async def test_a_missing_record_is_none(client: TwentyClient) -> None:
    respx.get(f"{BASE}/tasks/gone").mock(return_value=error(404, "Record not found"))
    assert await client.get_task("gone") is None


@respx.mock
async def test_lookups_quote_and_encode_their_values(client: TwentyClient) -> None:
    route = respx.get(f"{BASE}/people").mock(return_value=page("people", [], None))
    assert await client.find_person_by_email("Jane+X@Acme.com") is None
    assert route.calls.last.request.url.params["filter"] == 'emails.primaryEmail[eq]:"jane+x@acme.com"'
    assert b"%2B" in route.calls.last.request.url.raw_path  # '+' would arrive as a space otherwise

    await client.find_deleted_emails(["a@x.com", "b@x.com"])
    assert route.calls.last.request.url.params["filter"] == (
        'and(emails.primaryEmail[in]:["a@x.com","b@x.com"],deletedAt[is]:NOT_NULL)'
    )
    with pytest.raises(ValueError, match="cannot be used in a Twenty filter"):
        quoted('a"b')


@respx.mock
async def test_find_by_phone_matches_the_national_number_twenty_stores(client: TwentyClient) -> None:
    stored = recorded_rest("11-person-create")["response"]["data"]["createPerson"]
    route = respx.get(f"{BASE}/people").mock(return_value=page("people", [stored], None))
    person = await client.find_person_by_phone("+14155550100", include_deleted=True)
    assert person is not None
    assert person.id == stored["id"]
    assert route.calls.last.request.url.params["filter"] == (
        'and(phones.primaryPhoneNumber[eq]:"4155550100",phones.primaryPhoneCallingCode[eq]:"+1",'
        "or(deletedAt[is]:NULL,deletedAt[is]:NOT_NULL))"
    )


@respx.mock
async def test_update_sends_only_what_changes_and_delete_is_soft(client: TwentyClient) -> None:
    update = respx.patch(f"{BASE}/tasks/t1").mock(
        return_value=httpx.Response(200, json={"data": {"updateTask": {"id": "t1", "status": "DONE"}}})
    )
    delete = respx.delete(f"{BASE}/tasks/t1").mock(
        return_value=httpx.Response(200, json={"data": {"deleteTask": {"id": "t1"}}})
    )
    task = await client.update_task("t1", TaskInput.model_construct(status="DONE", _fields_set={"status"}))
    assert task.status == "DONE"
    assert json.loads(update.calls.last.request.content) == {"status": "DONE"}
    await client.delete_task("t1")
    assert delete.calls.last.request.url.params["soft_delete"] == "true"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (["id", "task", "targetPerson", "targetCompany"], "targetPersonId"),  # Twenty 1.17 and later
        (["id", "task", "person", "company"], "personId"),  # before 1.17 (the recorded server)
    ],
)
@respx.mock
async def test_task_targets_use_the_field_the_server_has(
    client: TwentyClient, fields: list[str], expected: str
) -> None:
    metadata = respx.get(f"{BASE}/metadata/objects").mock(return_value=httpx.Response(200, json={
        "data": {"objects": [{"nameSingular": "person", "fields": [{"name": "name"}]},
                             {"nameSingular": "taskTarget", "fields": [{"name": f} for f in fields]}]}
    }))  # fmt: skip
    legacy = recorded_rest("14-tasktarget-create")["response"]
    create = respx.post(f"{BASE}/taskTargets").mock(return_value=httpx.Response(201, json=legacy))

    first = await client.create_task_target("task-1", "person-1")
    await client.create_task_target("task-2", "person-2")

    assert metadata.call_count == 1  # detected once per client (process)
    assert json.loads(create.calls[0].request.content) == {"taskId": "task-1", expected: "person-1"}
    assert first.person_id == legacy["data"]["createTaskTarget"]["personId"]


@respx.mock
async def test_metadata_is_asked_without_a_query_string_once_for_concurrent_first_callers(
    client: TwentyClient,
) -> None:
    recorded = recorded_rest("54-metadata-objects-no-query-ok")

    async def slow_metadata(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)  # every caller arrives while the first one is still reading
        return httpx.Response(200, json=recorded["response"])

    metadata = respx.get(f"{BASE}/metadata/objects").mock(side_effect=slow_metadata)
    create = respx.post(f"{BASE}/taskTargets").mock(
        return_value=httpx.Response(201, json=recorded_rest("60-tasktarget-create-personId-ok")["response"])
    )

    await asyncio.gather(*(client.create_task_target(f"task-{i}", f"person-{i}") for i in range(8)))

    assert metadata.call_count == 1
    assert metadata.calls[0].request.url.query == b""  # rest/53: any query string is a 400 on 1.16-era servers
    assert all("personId" in json.loads(call.request.content) for call in create.calls)
    assert create.call_count == 8


@respx.mock
async def test_metadata_refused_then_a_write_refused_for_the_field_learns_the_other_one(client: TwentyClient) -> None:
    refused = recorded_rest("53-metadata-objects-with-query-string-400")
    respx.get(f"{BASE}/metadata/objects").mock(return_value=httpx.Response(400, json=refused["response"]))
    no_field = recorded_rest("59-tasktarget-create-targetPersonId-400")
    linked = recorded_rest("60-tasktarget-create-personId-ok")

    def answer(request: httpx.Request) -> httpx.Response:
        if "targetPersonId" in json.loads(request.content):
            return httpx.Response(400, json=no_field["response"])
        return httpx.Response(201, json=linked["response"])

    create = respx.post(f"{BASE}/taskTargets").mock(side_effect=answer)

    first = await client.create_task_target("task-1", "person-1", target_id="target-1")
    await client.create_task_target("task-2", "person-2")

    assert first.person_id == linked["response"]["data"]["createTaskTarget"]["personId"]  # linked, not an orphan
    sent = [json.loads(call.request.content) for call in create.calls]
    assert sent == [{"taskId": "task-1", "targetPersonId": "person-1", "id": "target-1"},
                    {"taskId": "task-1", "personId": "person-1", "id": "target-1"},
                    {"taskId": "task-2", "personId": "person-2"}]  # fmt: skip
    assert await client.task_target_person_field() == "personId"


@respx.mock
async def test_a_batch_refused_for_the_field_is_sent_again_with_the_other_one(client: TwentyClient) -> None:
    # Metadata that says targetPersonId (a newer server's) while the server writing says otherwise.
    respx.get(f"{BASE}/metadata/objects").mock(return_value=httpx.Response(200, json={
        "data": {"objects": [{"nameSingular": "taskTarget", "fields": [{"name": "targetPerson"}]}]}}))  # fmt: skip
    no_field = recorded_rest("59-tasktarget-create-targetPersonId-400")["response"]
    batch = recorded_rest("62-batch-tasktargets-create-personId")["response"]
    route = respx.post(f"{BASE}/batch/taskTargets").mock(side_effect=[
        httpx.Response(400, json=no_field), httpx.Response(201, json=batch)])  # fmt: skip

    created = await client.create_task_targets([("t1", "task-1", "p1"), ("t2", "task-2", "p1")])

    assert [target.person_id for target in created] == [item["personId"] for item in batch["data"]["createTaskTargets"]]
    assert [sorted(json.loads(call.request.content)[0]) for call in route.calls] == [
        ["id", "targetPersonId", "taskId"], ["id", "personId", "taskId"]]  # fmt: skip


@respx.mock
async def test_a_refusal_naming_another_field_is_not_retried(client: TwentyClient) -> None:
    respx.get(f"{BASE}/metadata/objects").mock(return_value=httpx.Response(200, json={"data": {"objects": []}}))
    route = respx.post(f"{BASE}/taskTargets").mock(
        return_value=error(400, 'Object taskTarget doesn\'t have any "taskId" field.')
    )
    with pytest.raises(TwentyRejected, match="taskId"):
        await client.create_task_target("task-1", "person-1")
    assert route.call_count == 1


@respx.mock
async def test_open_task_counts_use_the_relation_form_and_string_counts(client: TwentyClient) -> None:
    recorded = recorded_rest("56-tasks-groupby-assignee-id-ok")
    route = respx.get(f"{BASE}/tasks/groupBy").mock(return_value=httpx.Response(200, json=recorded["response"]))
    counts = await client.count_open_tasks_by_assignee()
    assert counts == {g["groupByDimensionValues"][0]: int(g["totalCount"]) for g in recorded["response"]}
    assert route.call_count == 1
    params = route.calls.last.request.url.params
    assert params["group_by"] == '[{"assignee":{"id":true}}]'
    assert params["filter"] == 'status[in]:["TODO","IN_PROGRESS"]'


@respx.mock
async def test_open_task_counts_fall_back_to_the_join_column_and_remember_it(client: TwentyClient) -> None:
    groups = sample("tasks-groupby-assignee")["body"]

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.params["group_by"] == '[{"assigneeId":true}]':
            return httpx.Response(200, json=groups)
        return error(400, "Field metadata not found for field: assignee")  # what a server without the form says

    route = respx.get(f"{BASE}/tasks/groupBy").mock(side_effect=answer)
    counts = await client.count_open_tasks_by_assignee()
    again = await client.count_open_tasks_by_assignee()
    assert counts == again
    assert counts[None] == 3
    assert sum(counts.values()) == sum(int(g["totalCount"]) for g in groups)
    assert route.call_count == 3  # one refused, then one call each


class Recording:
    """A limiter that grants at once and records what Twenty's answers told it."""

    def __init__(self) -> None:
        self.slowed: list[float | None] = []

    async def acquire(self) -> Permit:
        return Permit(1)

    async def slow_down(self, permit: Permit, pause_s: float | None) -> None:
        self.slowed.append(pause_s)


@respx.mock
async def test_a_429_or_nothing_remaining_slows_the_fleet_down(sleeps: Sleeps) -> None:
    respx.get(f"{BASE}/tasks/t1").mock(side_effect=[
        httpx.Response(429, json=recorded_rest("64-rate-limit-429-legacy")["response"]),
        httpx.Response(429, headers={"Retry-After": "7"}, json={"messages": ["Rate limit exceeded"]}),
        httpx.Response(200, headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "12"},
                       json={"data": {"task": {"id": "t1"}}}),
    ])  # fmt: skip
    limiter = Recording()
    async with create_http_client(BASE, "tok") as http:
        client = TwentyClient(http, limiter=limiter, max_attempts=3, sleep=sleeps)
        assert await client.get_task("t1") is not None
    assert limiter.slowed == [None, 7.0, 12.0]


@respx.mock
async def test_an_exhausted_rate_budget_is_unavailable_not_a_crash(sleeps: Sleeps) -> None:
    class Exhausted(Recording):
        async def acquire(self) -> Permit:
            raise RateLimitUnavailable("no Twenty call budget within 60s")

    route = respx.get(f"{BASE}/tasks/t1")
    before = metrics.TWENTY_RETRIES.labels("rate_limit_wait")._value.get()
    network = metrics.TWENTY_RETRIES.labels("network")._value.get()
    async with create_http_client(BASE, "tok") as http:
        client = TwentyClient(http, limiter=Exhausted(), max_attempts=2, sleep=sleeps)
        with pytest.raises(RateBudgetExhausted, match="budget"):
            await client.get_task("t1")
    assert route.call_count == 0
    assert metrics.TWENTY_RETRIES.labels("rate_limit_wait")._value.get() == before + 1  # its own reason
    assert metrics.TWENTY_RETRIES.labels("network")._value.get() == network


async def test_an_unreachable_twenty_is_named_by_host_and_port() -> None:
    from reactor.twenty import TwentyUnavailable

    port = free_port()
    async with create_http_client(f"http://127.0.0.1:{port}/rest", "t") as http:
        with pytest.raises(TwentyUnavailable, match=rf"Twenty at 127\.0\.0\.1:{port} unreachable \(ConnectError\)"):
            await TwentyClient(http, max_attempts=1).request("GET", "/people")
