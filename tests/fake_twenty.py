"""A stateful stand-in for Twenty's People endpoints, served through respx (Twenty's HTTP contract, not our
code, is what it fakes): upsert by primary email (reviving the trash, as Twenty does), batches, look-ups by
email (with or without the trash) and by phone. It counts every call, so tests can assert call budgets."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import phonenumbers
import respx

BASE_URL = "http://twenty.test/rest"
_PREDICATE = re.compile(r'([\w.]+)\[(\w+)\]:("[^"]*"|\[[^\]]*\]|[^,)]+)')


@dataclass
class FakeTwenty:
    people: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    batches: list[list[dict[str, Any]]] = field(default_factory=list)
    fail_next: list[httpx.Response] = field(default_factory=list)  # answered first, in order
    reject_emails: set[str] = field(default_factory=set)  # a batch holding one of these gets a 400
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    members: list[dict[str, Any]] = field(default_factory=list)
    reject_tasks: bool = False  # task creation answers 400
    task_target_field: str = "targetPersonId"  # "personId" plays a server from before 1.17
    on_task_page: Callable[[int], None] | None = None  # called as each page of tasks is served
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    reject_task_ids: set[str] = field(default_factory=set)  # a batch holding one of these task ids gets a 400
    fail_targets_next: list[httpx.Response] = field(default_factory=list)  # answered first by task-target calls
    on_tasks_created: Callable[[list[dict[str, Any]]], None] | None = None  # e.g. to send their webhooks early
    _clock: int = 0

    def install(self, router: respx.MockRouter) -> None:
        self.router = router  # tests add their own routes (the LLM) to it
        router.post(f"{BASE_URL}/batch/people").mock(side_effect=self._batch)
        router.post(f"{BASE_URL}/people").mock(side_effect=self._one)
        router.get(url__regex=rf"{re.escape(BASE_URL)}/people(\?.*)?$").mock(side_effect=self._list)
        router.get(url__regex=rf"{re.escape(BASE_URL)}/people/[^/?]+").mock(side_effect=self._get_person)
        router.post(url__regex=rf"{re.escape(BASE_URL)}/(batch/)?tasks(\?.*)?$").mock(side_effect=self._create_tasks)
        router.get(url__regex=rf"{re.escape(BASE_URL)}/tasks(\?.*)?$").mock(side_effect=self._list_tasks)
        router.get(url__regex=rf"{re.escape(BASE_URL)}/tasks/groupBy").mock(side_effect=self._group_tasks)
        router.get(url__regex=rf"{re.escape(BASE_URL)}/tasks/[^/?]+").mock(side_effect=self._get_task)
        router.patch(url__regex=rf"{re.escape(BASE_URL)}/tasks/[^/?]+").mock(side_effect=self._update_task)
        router.delete(url__regex=rf"{re.escape(BASE_URL)}/tasks/[^/?]+").mock(side_effect=self._delete_task)
        router.get(url__regex=rf"{re.escape(BASE_URL)}/(metadata/)?webhooks$").mock(side_effect=self._webhooks)
        router.post(url__regex=rf"{re.escape(BASE_URL)}/(batch/)?taskTargets").mock(side_effect=self._create_targets)
        router.get(f"{BASE_URL}/workspaceMembers").mock(side_effect=self._members)
        router.get(f"{BASE_URL}/metadata/objects").mock(side_effect=self._metadata)

    def add_member(self, member_id: str, email: str) -> None:
        self.members.append({"id": member_id, "userEmail": email, "name": {"firstName": member_id, "lastName": ""}})

    def add_task(self, task_id: str, assignee: str | None, status: str = "TODO") -> None:
        self.tasks[task_id] = {"id": task_id, "assigneeId": assignee, "status": status, "deletedAt": None,
                               "updatedAt": "2026-11-24T09:00:00.000Z", "title": "seeded"}  # fmt: skip

    def _envelope(self, key: str, items: list[dict[str, Any]], request: httpx.Request | None = None) -> httpx.Response:
        """One page, as Twenty pages: at most `limit` (capped at 200), cursor = position (opaque to clients)."""
        params = request.url.params if request is not None else httpx.QueryParams()
        limit = min(int(params.get("limit", "60")), 200)
        start = int(params.get("starting_after", "0"))
        page, more = items[start : start + limit], start + limit < len(items)
        info = {"hasNextPage": more, "hasPreviousPage": start > 0, "startCursor": str(start),
                "endCursor": str(start + limit) if more else str(len(items))}  # fmt: skip
        return httpx.Response(200, json={"data": {key: page}, "totalCount": len(items), "pageInfo": info})

    def _get_person(self, request: httpx.Request) -> httpx.Response:
        self.calls["get_person"] += 1
        person = self.people.get(request.url.path.rsplit("/", 1)[-1])
        if person is None:
            return _error(404, "Record not found")
        return httpx.Response(200, json={"data": {"person": person}})

    def _create_tasks(self, request: httpx.Request) -> httpx.Response:
        batch = "/batch/" in request.url.path
        self.calls["batch_tasks" if batch else "create_task"] += 1
        if failure := self._failure():
            return failure
        if self.reject_tasks:
            return _error(400, "Invalid assignee")
        records = json.loads(request.content)
        if any(r.get("id") in self.reject_task_ids for r in (records if batch else [records])):
            return _error(400, "Invalid assignee")
        saved = []
        for record in records if batch else [records]:
            task = self.tasks.setdefault(record.get("id") or str(uuid.uuid4()), {"deletedAt": None})
            task.update(record)
            task["id"] = task.get("id") or record.get("id")
            task["updatedAt"] = "2026-11-24T12:00:00.000Z"
            saved.append(task)
        key = "createTasks" if batch else "createTask"
        if self.on_tasks_created is not None:
            self.on_tasks_created([dict(task) for task in saved])
        return httpx.Response(201, json={"data": {key: saved if batch else saved[0]}})

    def _open_tasks(self, text: str) -> list[dict[str, Any]]:
        statuses, ids = _in_values(text, "status"), _in_values(text, "id")
        return [t for t in self.tasks.values() if t["deletedAt"] is None and (statuses is None or t["status"] in
                statuses) and (ids is None or t["id"] in ids)]  # fmt: skip

    def _list_tasks(self, request: httpx.Request) -> httpx.Response:
        self.calls["list_tasks"] += 1
        if self.on_task_page is not None:
            self.on_task_page(self.calls["list_tasks"])
        return self._envelope("tasks", self._open_tasks(request.url.params.get("filter", "")), request)

    def _group_tasks(self, request: httpx.Request) -> httpx.Response:
        self.calls["group_by"] += 1
        counts = Counter(t["assigneeId"] for t in self._open_tasks(request.url.params.get("filter", "")))
        return httpx.Response(200, json=[{"groupByDimensionValues": [a], "totalCount": str(n)}
                                         for a, n in counts.items()])  # fmt: skip

    def _update_task(self, request: httpx.Request) -> httpx.Response:
        self.calls["update_task"] += 1
        task = self.tasks.get(request.url.path.rsplit("/", 1)[-1])
        if task is None:
            return _error(404, "Record not found")
        task.update(json.loads(request.content))
        self.touch(task["id"])
        return httpx.Response(200, json={"data": {"updateTask": task}})

    def touch(self, task_id: str) -> None:
        """A later updatedAt, as any write gives a task."""
        self._clock += 1
        self.tasks[task_id]["updatedAt"] = f"2026-11-24T13:{self._clock // 60 % 60:02d}:{self._clock % 60:02d}.000Z"

    def _delete_task(self, request: httpx.Request) -> httpx.Response:
        self.calls["delete_task"] += 1
        task = self.tasks.get(request.url.path.rsplit("/", 1)[-1])
        if task is None:
            return _error(404, "Record not found")
        task["deletedAt"] = "2026-11-24T14:00:00.000Z"
        return httpx.Response(200, json={"data": {"deleteTask": {"id": task["id"]}}})

    def _webhooks(self, request: httpx.Request) -> httpx.Response:
        self.calls["webhooks"] += 1
        return httpx.Response(200, json=self.webhooks)

    def add_webhook(self, created_at: str) -> None:
        self.webhooks.append(
            {
                "id": str(uuid.uuid4()),
                "targetUrl": "http://reactor.test/webhooks/twenty",
                "operations": ["person.created", "task.*"],
                "secret": "s",
                "createdAt": created_at,
            }
        )

    def _get_task(self, request: httpx.Request) -> httpx.Response:
        self.calls["get_task"] += 1
        task = self.tasks.get(request.url.path.rsplit("/", 1)[-1])
        if task is None:
            return _error(404, "Record not found")
        return httpx.Response(200, json={"data": {"task": task}})

    def _create_targets(self, request: httpx.Request) -> httpx.Response:
        batch = "/batch/" in request.url.path
        self.calls["batch_targets" if batch else "create_target"] += 1
        if failure := self._failure() or (self.fail_targets_next.pop(0) if self.fail_targets_next else None):
            return failure
        records = json.loads(request.content)
        saved = []
        for record in records if batch else [records]:
            if self.task_target_field not in record:
                return _error(400, f"Field metadata not found for field: {next(k for k in record if 'erson' in k)}")
            target = {"id": record.get("id") or str(uuid.uuid4()), **record}
            self.task_targets[target["id"]] = target
            saved.append(target)
        key = "createTaskTargets" if batch else "createTaskTarget"
        return httpx.Response(201, json={"data": {key: saved if batch else saved[0]}})

    def _members(self, request: httpx.Request) -> httpx.Response:
        self.calls["members"] += 1
        return self._envelope("workspaceMembers", self.members)

    def _metadata(self, request: httpx.Request) -> httpx.Response:
        self.calls["metadata"] += 1
        person = "targetPerson" if self.task_target_field == "targetPersonId" else "person"
        fields = [{"name": name} for name in ("id", "task", person)]
        return httpx.Response(200, json={"data": {"objects": [{"nameSingular": "taskTarget", "fields": fields}]}})

    def add_person(
        self,
        email: str,
        *,
        deleted: bool = False,
        phone: str | None = None,
        first: str = "",
        last: str = "",
        created_at: str = "2026-11-01T00:00:00.000Z",
    ) -> str:
        person_id = str(uuid.uuid4())
        self.people[person_id] = {
            "id": person_id,
            "createdAt": created_at,
            "name": {"firstName": first, "lastName": last},
            "emails": {"primaryEmail": email, "additionalEmails": None},
            "phones": {"primaryPhoneNumber": phone or "", "primaryPhoneCountryCode": "", "primaryPhoneCallingCode": ""},
            "deletedAt": "2026-11-01T00:00:00.000Z" if deleted else None,
        }
        return person_id

    def _failure(self) -> httpx.Response | None:
        return self.fail_next.pop(0) if self.fail_next else None

    def _upsert(self, record: dict[str, Any]) -> dict[str, Any]:
        email = (record.get("emails") or {}).get("primaryEmail") or ""
        match = self.people.get(record.get("id", ""))  # Twenty's upsert matches on id, then on the primary email
        if match is None:
            match = next((p for p in self.people.values() if email and p["emails"]["primaryEmail"] == email), None)
        if match is None:
            match = {"id": record.get("id") or str(uuid.uuid4())}
            self.people[match["id"]] = match
        match.update({k: v for k, v in record.items() if k != "id"} if "emails" in match else record)
        if phones := record.get("phones"):
            match["phones"] = _stored_phones(phones)
        match["deletedAt"] = None  # Twenty's upsert revives a trashed match
        return match

    def _batch(self, request: httpx.Request) -> httpx.Response:
        self.calls["batch"] += 1
        if failure := self._failure():
            return failure
        records = json.loads(request.content)
        self.batches.append(records)
        if len(records) > 200:
            return _error(400, "Maximum number of records to upsert is 200.")
        if any((r.get("emails") or {}).get("primaryEmail") in self.reject_emails for r in records):
            return _error(400, "Provided phone number is invalid")
        return httpx.Response(201, json={"data": {"createPeople": [self._upsert(r) for r in records]}})

    def _one(self, request: httpx.Request) -> httpx.Response:
        self.calls["one"] += 1
        if failure := self._failure():
            return failure
        record = json.loads(request.content)
        if (record.get("emails") or {}).get("primaryEmail") in self.reject_emails:
            return _error(400, "Provided phone number is invalid")
        return httpx.Response(201, json={"data": {"createPerson": self._upsert(record)}})

    def _list(self, request: httpx.Request) -> httpx.Response:
        self.calls["list"] += 1
        if failure := self._failure():
            return failure
        text = request.url.params.get("filter", "")
        found = [p for p in self.people.values() if _matches(p, text)]
        return self._envelope("people", found, request)


def _matches(person: dict[str, Any], text: str) -> bool:
    """The conjunction of the predicates in a filter (enough for the look-ups reactor makes)."""
    either = "or(deletedAt[is]:NULL,deletedAt[is]:NOT_NULL)"  # "live or trashed": every row
    if "deletedAt" not in text and person["deletedAt"] is not None:
        return False
    for path, op, raw in _PREDICATE.findall(text.replace(either, "")):
        value: Any = person
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        wanted = raw.strip('"')
        if op == "eq" and value != wanted:
            return False
        if op == "in" and value not in [v.strip().strip('"') for v in wanted.strip("[]").split(",")]:
            return False
        if op == "is" and (value is None) != (wanted == "NULL"):
            return False
        if op == "gte" and (value is None or str(value) < wanted):  # ISO timestamps order as text
            return False
    return True


def _in_values(text: str, field: str) -> set[str] | None:
    wanted = re.search(rf"(?<![\w.]){field}\[in\]:\[([^\]]*)\]", text)
    return {v.strip().strip('"') for v in wanted.group(1).split(",")} if wanted else None


def _stored_phones(phones: dict[str, Any]) -> dict[str, Any]:
    """As Twenty stores them: the national number, with the country and calling codes it inferred."""
    number = phonenumbers.parse(phones["primaryPhoneNumber"], phones.get("primaryPhoneCountryCode") or None)
    return {
        "primaryPhoneNumber": str(number.national_number),
        "primaryPhoneCountryCode": phonenumbers.region_code_for_number(number),
        "primaryPhoneCallingCode": f"+{number.country_code}",
        "additionalPhones": [],
    }


def _error(status: int, message: str) -> httpx.Response:
    names = {400: "BadRequestException", 429: "HttpException", 503: "ServiceUnavailableException"}
    return httpx.Response(status, json={"statusCode": status, "error": names.get(status, "HttpException"),
                                        "messages": [message]})  # fmt: skip


def unavailable(status: int = 503) -> httpx.Response:
    return _error(status, "Limit reached (100 tokens per 60000 ms)" if status == 429 else "Service Unavailable")
