"""The Twenty REST client: the only module that knows Twenty's URLs, envelopes, filter syntax and errors.

Rules from Twenty's source (see README, "Twenty's API as reactor uses it"):
* lists come in pages of at most 200 (larger limits are capped silently), followed with `starting_after`;
* filters are one `filter` string; string values are double-quoted and may not hold `"()[]` (no escaping exists);
* batches hold at most 200 records and fail as a whole; a plain DELETE is a hard delete;
* errors are `{"statusCode", "error", "messages": [...]}`; 429 may come without Retry-After.

Servers in the wild differ (docs/twenty-compatibility.md): task targets name the person `targetPersonId` (1.17 and
later) or `personId` (before); groupBy takes the relation form or the join column; the metadata API of older
servers refuses any query string. The client detects each once per process and learns from a refusal.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
import phonenumbers
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from reactor import metrics
from reactor.ratelimit import Limiter, Permit, RateLimitUnavailable, Unlimited

log = logging.getLogger("reactor.twenty")

PAGE_SIZE = 200  # Twenty's QUERY_MAX_RECORDS
MAX_BATCH = 200
TIMEOUT = httpx.Timeout(connect=3.0, read=15.0, write=10.0, pool=5.0)
OPEN_STATUSES = ("TODO", "IN_PROGRESS")
# The person a task target points at: Twenty 1.17 and later, then the servers before it.
TARGET_PERSON_FIELDS = ("targetPersonId", "personId")
# groupBy on the assignee: the relation form (1.16-era servers refuse the join column), then the join column.
ASSIGNEE_GROUP_BY = ('[{"assignee":{"id":true}}]', '[{"assigneeId":true}]')
_NO_SUCH_FIELD = re.compile(r"doesn't have any \"(\w+)\" field")
TaskStatus = Literal["TODO", "IN_PROGRESS", "DONE"]


class TwentyError(Exception):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TwentyUnavailable(TwentyError):
    """Twenty could not take the call now (429, 5xx, timeout, connection, our own rate budget): try later."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after

    @property
    def reason(self) -> str:
        """The label of a retry: the HTTP status, or `network` for a timeout or a connection error."""
        return str(self.status) if self.status else "network"


class RateBudgetExhausted(TwentyUnavailable):
    """reactor's own shared pace had no slot in time (or Redis, which keeps it, is down): no call was made."""

    @property
    def reason(self) -> str:
        return "rate_limit_wait"


class TwentyAuthError(TwentyUnavailable):
    """401/403: the token is wrong or lacks a permission. Not retried within a call, and not the record's
    fault, so work is kept for later like an outage rather than given up."""


class TwentyRejected(TwentyError):
    """Twenty refused this request (a 4xx other than 401/403/429): retrying it unchanged will not help."""


# -- models -----------------------------------------------------------------------------------------------


class TwentyModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class FullName(TwentyModel):
    first_name: str = ""
    last_name: str = ""


class Emails(TwentyModel):
    primary_email: str | None = None


class Phones(TwentyModel):
    primary_phone_number: str | None = None
    primary_phone_country_code: str | None = None
    primary_phone_calling_code: str | None = None


class Person(TwentyModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")  # custom fields kept

    id: str
    name: FullName | None = None
    emails: Emails | None = None
    phones: Phones | None = None
    job_title: str | None = None
    city: str | None = None
    created_at: datetime | None = None
    deleted_at: datetime | None = None

    @property
    def email(self) -> str | None:
        address = self.emails.primary_email if self.emails else None
        return address.lower() if address else None


class RichText(TwentyModel):
    markdown: str | None = None


class Task(TwentyModel):
    id: str
    title: str | None = None
    status: str | None = None
    assignee_id: str | None = None
    due_at: datetime | None = None
    body_v2: RichText | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted_at: datetime | None = None

    @property
    def is_open(self) -> bool:
        return self.deleted_at is None and self.status in OPEN_STATUSES


class TaskTarget(TwentyModel):
    id: str
    task_id: str | None = None
    person_id: str | None = Field(None, validation_alias=AliasChoices("targetPersonId", "personId"))


class WorkspaceMember(TwentyModel):
    id: str
    name: FullName | None = None
    user_email: str | None = None


class Webhook(TwentyModel):
    id: str
    target_url: str
    operations: list[str] = Field(default_factory=list)
    description: str | None = None
    secret: str | None = None
    created_at: datetime | None = None


class PersonInput(BaseModel):
    """What reactor writes to a Person. `phone` is E.164 (intake normalised it)."""

    id: str | None = None  # the Person this lead already became: the upsert then matches it by id
    first_name: str | None = None  # the name is sent when either part is set (the other one then blank)
    last_name: str | None = None
    email: str | None = None
    phone: str | None = None
    job_title: str | None = None
    city: str | None = None
    custom_fields: dict[str, Any] = Field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.first_name is not None or self.last_name is not None:
            body["name"] = {"firstName": self.first_name or "", "lastName": self.last_name or ""}
        if self.id:
            body["id"] = self.id
        if self.email:
            body["emails"] = {"primaryEmail": self.email.strip().lower()}
        if self.phone:
            body["phones"] = phone_body(self.phone)
        if self.job_title:
            body["jobTitle"] = self.job_title
        if self.city:
            body["city"] = self.city
        return body | self.custom_fields


def phone_body(e164: str) -> dict[str, str]:
    """E.164 with its calling code; Twenty parses it with libphonenumber and stores the national number."""
    try:
        number = phonenumbers.parse(e164)
    except phonenumbers.NumberParseException:  # intake normalises phones; if one slips through, Twenty decides
        return {"primaryPhoneNumber": e164}
    return {"primaryPhoneNumber": e164, "primaryPhoneCallingCode": f"+{number.country_code}"}


class TaskInput(BaseModel):
    id: str | None = None  # chosen by reactor: creating with an id and upsert=true is idempotent
    title: str
    markdown: str | None = None
    status: TaskStatus | None = None
    assignee_id: str | None = None
    due_at: datetime | None = None

    def body(self, *, partial: bool = False) -> dict[str, Any]:
        fields = self.model_dump(exclude_unset=partial)
        body: dict[str, Any] = {"id": fields["id"]} if fields.get("id") else {}
        if "title" in fields:
            body["title"] = fields["title"]
        if "markdown" in fields:
            body["bodyV2"] = {"markdown": fields["markdown"] or ""}
        if "status" in fields:
            body["status"] = fields["status"]
        if "assignee_id" in fields:
            body["assigneeId"] = fields["assignee_id"]
        if "due_at" in fields:
            body["dueAt"] = fields["due_at"].isoformat() if fields["due_at"] else None
        return body


# -- filters ----------------------------------------------------------------------------------------------

_UNSAFE = set('"()[]')


def quoted(value: str) -> str:
    """A string value for Twenty's filter language, which has no escape for these characters."""
    if _UNSAFE & set(value):
        raise ValueError(f'{value!r} cannot be used in a Twenty filter (it holds one of " ( ) [ ])')
    return f'"{value}"'


def one_of(values: Iterable[str]) -> str:
    """The value of an `in` predicate. Twenty splits it on every comma, quoted or not."""
    items = list(values)
    if any("," in value for value in items):
        raise ValueError("a value of an `in` filter cannot hold a comma")
    return "[" + ",".join(quoted(value) for value in items) + "]"


# -- the client -------------------------------------------------------------------------------------------


def create_http_client(
    base_url: str, token: str, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        timeout=TIMEOUT,
        limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
        transport=transport,
    )


class TwentyClient:
    """Typed calls to Twenty's REST API, each paced by the shared rate limit and retried when transient.

    A call is tried up to `max_attempts` times: on 429, 5xx, timeouts and connection errors, after an
    exponential, jittered delay that is never shorter than Retry-After (or, without one, one token's worth of
    the rate limit). Other 4xx raise TwentyRejected with Twenty's own message at once.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        limiter: Limiter | None = None,
        batch_size: int = 60,
        max_attempts: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        min_rate_limited_wait_s: float = 0.6,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._http = http
        self._limiter = limiter or Unlimited()
        self.batch_size = min(batch_size, MAX_BATCH)
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._min_rate_limited_wait_s = min_rate_limited_wait_s
        self._sleep = sleep
        self._task_target_person_field: str | None = None
        self._detecting = asyncio.Lock()  # concurrent first callers share one metadata call
        self._assignee_group_by: str | None = None

    # -- transport ----------------------------------------------------------------------------------------

    async def request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None, limited: bool = True
    ) -> Any:
        """One logical call: its JSON body on 2xx; TwentyUnavailable/TwentyRejected otherwise. `limited=False`
        for the endpoints Twenty does not throttle (metadata, webhook subscriptions)."""
        for attempt in range(1, self._max_attempts + 1):
            failure = await self._attempt(method, path, params, json, limited)
            if not isinstance(failure, TwentyUnavailable):
                return failure
            if isinstance(failure, TwentyAuthError) or attempt == self._max_attempts:
                raise failure
            delay = self._backoff(attempt, failure)
            metrics.TWENTY_RETRIES.labels(failure.reason).inc()
            log.info("twenty.retry method=%s path=%s attempt=%d delay_s=%.2f error=%s",
                     method, path, attempt, delay, failure)  # fmt: skip
            await self._sleep(delay)
        raise AssertionError("unreachable")

    async def _attempt(self, method: str, path: str, params: dict[str, Any] | None, json: Any, limited: bool) -> Any:
        permit = Permit()
        if limited:
            try:
                permit = await self._limiter.acquire()
            except RateLimitUnavailable as exc:
                return RateBudgetExhausted(str(exc))
        op = metrics.operation(method, path)
        try:
            response = await self._http.request(method, path, params=params, json=json)
        except httpx.TimeoutException as exc:
            metrics.TWENTY_CALLS.labels(op, "timeout").inc()
            return TwentyUnavailable(f"Twenty at {self._where()} timed out ({type(exc).__name__}) on {method} {path}")
        except httpx.TransportError as exc:
            metrics.TWENTY_CALLS.labels(op, "error").inc()
            return TwentyUnavailable(
                f"Twenty at {self._where()} unreachable ({type(exc).__name__}) on {method} {path}: "
                "check TWENTY_REST_URL and that the server is up"
            )
        status = response.status_code
        metrics.TWENTY_CALLS.labels(op, str(status)).inc()
        if limited and (status == 429 or response.headers.get("X-RateLimit-Remaining") == "0"):
            # The fleet slows down now, before its next call; a 2xx with nothing remaining is a 429 avoided.
            await self._limiter.slow_down(permit, _retry_after(response) or _reset_after(response))
        if status < 300:
            try:
                return response.json()
            except ValueError:
                return TwentyUnavailable(f"Twenty answered {status} without JSON on {method} {path}", status=status)
        message = f"Twenty {status} on {method} {path}: {_messages(response)}"
        if status == 429 or status >= 500:
            return TwentyUnavailable(message, status=status, retry_after=_retry_after(response))
        if status in (401, 403):
            return TwentyAuthError(message, status=status)
        raise TwentyRejected(message, status=status)

    def _where(self) -> str:
        url = self._http.base_url
        return f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"

    def _backoff(self, attempt: int, failure: TwentyUnavailable) -> float:
        ceiling = min(self._backoff_max_s, self._backoff_base_s * 2 ** (attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        floor = failure.retry_after
        if floor is None and failure.status == 429:
            floor = self._min_rate_limited_wait_s
        return max(delay, floor or 0.0)

    async def _pages(self, path: str, key: str, params: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """Every page of a list, in Twenty's default order (by id), which is the order that pages correctly."""
        query = {**params, "limit": PAGE_SIZE}
        while True:
            body = await self.request("GET", path, params=query)
            yield body["data"][key]
            info = body.get("pageInfo") or {}
            if not info.get("hasNextPage") or not info.get("endCursor"):
                return
            query["starting_after"] = info["endCursor"]

    # -- people -------------------------------------------------------------------------------------------

    async def upsert_person(self, person: PersonInput) -> Person:
        body = await self.request("POST", "/people", params={"upsert": "true"}, json=person.body())
        return Person.model_validate(body["data"]["createPerson"])

    async def upsert_people(self, people: Sequence[PersonInput]) -> list[Person]:
        """Twenty's batch upsert, `batch_size` records a call. Inputs sharing an email are merged first (in one
        batch Twenty would insert both and fail on its unique index); later fields win."""
        merged: dict[str, dict[str, Any]] = {}
        without_email: list[dict[str, Any]] = []
        for person in people:
            body = person.body()
            email = body.get("emails", {}).get("primaryEmail")
            if email:
                merged[email] = merged.get(email, {}) | body
            else:
                without_email.append(body)
        records = [*merged.values(), *without_email]
        saved: list[Person] = []
        for start in range(0, len(records), self.batch_size):
            chunk = records[start : start + self.batch_size]
            body = await self.request("POST", "/batch/people", params={"upsert": "true"}, json=chunk)
            saved += [Person.model_validate(item) for item in body["data"]["createPeople"]]
        return saved

    async def get_person(self, person_id: str) -> Person | None:
        try:
            body = await self.request("GET", f"/people/{person_id}")
        except TwentyRejected as exc:
            if exc.status in (400, 404):  # older servers answer 400 for a missing record
                return None
            raise
        return Person.model_validate(body["data"]["person"])

    async def list_people(self, filter: str | None = None) -> AsyncIterator[Person]:
        async for page in self._pages("/people", "people", {"filter": filter} if filter else {}):
            for item in page:
                yield Person.model_validate(item)

    async def find_person_by_email(self, email: str, *, include_deleted: bool = False) -> Person | None:
        found = [p async for p in self.list_people(_with_trash(f"emails.primaryEmail[eq]:{quoted(email.lower())}",
                                                               include_deleted))]  # fmt: skip
        return found[0] if found else None

    async def find_person_by_phone(self, e164: str, *, include_deleted: bool = False) -> Person | None:
        number = phonenumbers.parse(e164)
        national = str(number.national_number)
        predicate = (f"phones.primaryPhoneNumber[eq]:{quoted(national)},"
                     f"phones.primaryPhoneCallingCode[eq]:{quoted(f'+{number.country_code}')}")  # fmt: skip
        found = [p async for p in self.list_people(_with_trash(predicate, include_deleted))]
        live = [p for p in found if p.deleted_at is None]
        return next(iter(live or found), None)

    async def find_people_by_ids(self, ids: Sequence[str]) -> list[Person]:
        """The People with these ids, trashed ones included (one call per 100 ids)."""
        found: list[Person] = []
        for start in range(0, len(ids), 100):
            predicate = f"id[in]:{one_of(ids[start : start + 100])}"
            found += [p async for p in self.list_people(_with_trash(predicate, True))]
        return found

    async def find_deleted_emails(self, emails: Sequence[str]) -> set[str]:
        """Which of these emails belong to a Person in Twenty's trash (an upsert would revive them)."""
        if not emails:
            return set()
        predicate = f"emails.primaryEmail[in]:{one_of(e.lower() for e in emails)},deletedAt[is]:NOT_NULL"
        return {p.email async for p in self.list_people(f"and({predicate})") if p.email}

    # -- workspace members and tasks ---------------------------------------------------------------------

    async def list_workspace_members(self) -> list[WorkspaceMember]:
        return [WorkspaceMember.model_validate(item) async for page in
                self._pages("/workspaceMembers", "workspaceMembers", {}) for item in page]  # fmt: skip

    async def list_tasks(self, filter: str | None = None) -> AsyncIterator[Task]:
        """Every task matching `filter` (Twenty's filter language), following every page."""
        async for page in self._pages("/tasks", "tasks", {"filter": filter} if filter else {}):
            for item in page:
                yield Task.model_validate(item)

    async def get_task(self, task_id: str) -> Task | None:
        try:
            body = await self.request("GET", f"/tasks/{task_id}")
        except TwentyRejected as exc:
            if exc.status in (400, 404):
                return None
            raise
        return Task.model_validate(body["data"]["task"])

    async def create_task(self, task: TaskInput) -> Task:
        """With `task.id` set this is an upsert: creating the same task twice leaves one."""
        params = {"upsert": "true"} if task.id else None
        body = await self.request("POST", "/tasks", params=params, json=task.body())
        return Task.model_validate(body["data"]["createTask"])

    async def create_tasks(self, tasks: Sequence[TaskInput]) -> list[Task]:
        """Twenty's batch create (upsert on the ids reactor chose), `batch_size` tasks a call."""
        created: list[Task] = []
        for start in range(0, len(tasks), self.batch_size):
            chunk = [task.body() for task in tasks[start : start + self.batch_size]]
            body = await self.request("POST", "/batch/tasks", params={"upsert": "true"}, json=chunk)
            created += [Task.model_validate(item) for item in body["data"]["createTasks"]]
        return created

    async def update_task(self, task_id: str, changes: TaskInput) -> Task:
        """Only the fields set on `changes` are sent."""
        body = await self.request("PATCH", f"/tasks/{task_id}", json=changes.body(partial=True))
        return Task.model_validate(body["data"]["updateTask"])

    async def delete_task(self, task_id: str) -> None:
        """A soft delete (to the trash, `task.deleted`); a plain DELETE would destroy the task for good."""
        await self.request("DELETE", f"/tasks/{task_id}", params={"soft_delete": "true"})

    async def create_task_target(self, task_id: str, person_id: str, *, target_id: str | None = None) -> TaskTarget:
        """Link a task to its person with the field this server has. If the server refuses the field name, the
        other one is learnt and the link retried: a refusal for the name never leaves the task unlinked."""
        params = {"upsert": "true"} if target_id else None

        async def post(field: str) -> Any:
            record = {"taskId": task_id, field: person_id} | ({"id": target_id} if target_id else {})
            return await self.request("POST", "/taskTargets", params=params, json=record)

        body = await self._with_target_person_field(post)
        return TaskTarget.model_validate(body["data"]["createTaskTarget"])

    async def create_task_targets(self, links: Sequence[tuple[str, str, str]]) -> list[TaskTarget]:
        """Batch links (target id, task id, person id), upserted on the target ids reactor chose; the field name
        is learnt from a refusal as in create_task_target (a batch fails as a whole, so retrying it is safe)."""
        created: list[TaskTarget] = []
        for start in range(0, len(links), self.batch_size):
            batch = links[start : start + self.batch_size]

            async def post(field: str, batch: Sequence[tuple[str, str, str]] = batch) -> Any:
                chunk = [{"id": target, "taskId": task, field: person} for target, task, person in batch]
                return await self.request("POST", "/batch/taskTargets", params={"upsert": "true"}, json=chunk)

            body = await self._with_target_person_field(post)
            created += [TaskTarget.model_validate(item) for item in body["data"]["createTaskTargets"]]
        return created

    async def _with_target_person_field(self, write: Callable[[str], Any]) -> Any:
        """`write(field)` with the person field this server has; refused for that very field name, learn the
        other name and write once more (the write is an upsert on reactor's ids, or a create that did nothing)."""
        field = await self.task_target_person_field()
        try:
            return await write(field)
        except TwentyRejected as exc:
            match = _NO_SUCH_FIELD.search(str(exc))
            if match is None or match.group(1) != field:
                raise
            other = next(name for name in TARGET_PERSON_FIELDS if name != field)
            if self._task_target_person_field == field:  # another caller may have learnt it meanwhile
                self._task_target_person_field = other
                log.warning("twenty.task_target_field_learnt refused=%s using=%s", field, other)
        return await write(other)

    # -- webhook subscriptions (not rate-limited by Twenty) ----------------------------------------------

    async def list_webhooks(self) -> list[Webhook]:
        body = await self.request("GET", "/webhooks", limited=False)
        items = body if isinstance(body, list) else body.get("data", {}).get("webhooks", [])
        return [Webhook.model_validate(item) for item in items]

    async def create_webhook(
        self, target_url: str, operations: Sequence[str], description: str, secret: str
    ) -> Webhook:
        """The secret is sent, not left to Twenty: servers before 2.x refuse a subscription without one."""
        record = {"targetUrl": target_url, "operations": list(operations), "description": description,
                  "secret": secret}  # fmt: skip
        body = await self.request("POST", "/webhooks", json=record, limited=False)
        return Webhook.model_validate(body.get("data", body) if isinstance(body, dict) else body)

    async def update_webhook(self, webhook_id: str, operations: Sequence[str], description: str) -> Webhook:
        record = {"operations": list(operations), "description": description}
        body = await self.request("PATCH", f"/webhooks/{webhook_id}", json=record, limited=False)
        return Webhook.model_validate(body.get("data", body) if isinstance(body, dict) else body)

    async def task_target_person_field(self) -> str:
        """`targetPersonId` (Twenty 1.17 and later) or `personId` (before), read once per client (process) from
        the metadata API; callers that arrive while it is being read wait for that one call."""
        if self._task_target_person_field is None:
            async with self._detecting:
                if self._task_target_person_field is None:
                    self._task_target_person_field = await self._detect_task_target_person_field()
        return self._task_target_person_field

    async def _detect_task_target_person_field(self) -> str:
        try:
            # No query string: 1.16-era servers read it as part of the path and answer 400 (rest/53).
            body = await self.request("GET", "/metadata/objects", limited=False)
        except (TwentyRejected, TwentyAuthError) as exc:
            log.warning("twenty.metadata_unreadable error=%s (assuming targetPersonId until a write says)", exc)
            return "targetPersonId"
        for obj in _nodes(body.get("data", {}).get("objects", [])):
            if obj.get("nameSingular") == "taskTarget":
                names = {field.get("name") for field in _nodes(obj.get("fields", []))}
                if names & {"person", "personId"} and not names & {"targetPerson", "targetPersonId"}:
                    return "personId"
                return "targetPersonId"
        return "targetPersonId"

    async def count_open_tasks_by_assignee(self, statuses: Sequence[str] = OPEN_STATUSES) -> dict[str | None, int]:
        """Tasks in these statuses per assignee, in one groupBy call; None counts the unassigned. The groupBy
        shape the server takes is found on the first call (a refused one costs one more) and remembered."""
        known = self._assignee_group_by
        shapes = ([known] if known else []) + [shape for shape in ASSIGNEE_GROUP_BY if shape != known]
        for shape in shapes:
            try:
                body = await self.request("GET", "/tasks/groupBy", params={
                    "group_by": shape,
                    "aggregate": '["totalCount"]',
                    "filter": f"status[in]:{one_of(statuses)}",
                    "limit": PAGE_SIZE,
                })  # fmt: skip
            except TwentyRejected as exc:
                if shape == shapes[-1]:
                    raise
                log.info("twenty.group_by_refused shape=%s error=%s (trying the other shape)", shape, exc)
                continue
            self._assignee_group_by = shape
            break
        groups = body if isinstance(body, list) else body.get("data", [])
        # Counts come from a SQL COUNT and arrive as strings on some servers (rest/56).
        return {group["groupByDimensionValues"][0]: int(group["totalCount"]) for group in groups}


def _with_trash(predicate: str, include_deleted: bool) -> str:
    # Twenty hides soft-deleted rows unless the filter mentions deletedAt.
    if not include_deleted:
        return predicate
    return f"and({predicate},or(deletedAt[is]:NULL,deletedAt[is]:NOT_NULL))"


def _nodes(items: Any) -> list[dict[str, Any]]:
    """Metadata lists come as plain lists or as GraphQL-style `{edges: [{node}]}` connections."""
    if isinstance(items, dict):
        return [edge.get("node", {}) for edge in items.get("edges", [])]
    return list(items)


def _messages(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        messages = body.get("messages") or body.get("message") or body.get("error")
        if isinstance(messages, list):
            return "; ".join(str(m) for m in messages)
        if messages:
            return str(messages)
    return str(body)[:200]


def _reset_after(response: httpx.Response) -> float | None:
    """X-RateLimit-Reset as seconds from now (Twenty's v2 limiter; epoch values are not trusted as a pause)."""
    try:
        value = float(response.headers.get("X-RateLimit-Reset", ""))
    except ValueError:
        return None
    return value if 0 <= value <= 3600 else None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(when.tzinfo)).total_seconds())
