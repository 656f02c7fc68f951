"""The simulator's workspace: people, tasks, task targets, members and webhook subscriptions, in memory, with
Twenty's record shapes and its write semantics (upsert on id then primary email, reviving the trash; events only
when something changed)."""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

WORKSPACE_ID = "3b8e6458-5fc1-4e63-8563-008ccddaa6db"
OBJECT_IDS = {"person": "9f1d1c60-0000-4000-8000-000000000001", "task": "9f1d1c60-0000-4000-8000-000000000002",
              "taskTarget": "9f1d1c60-0000-4000-8000-000000000003"}  # fmt: skip
PLURAL = {"person": "people", "task": "tasks", "taskTarget": "taskTargets", "workspaceMember": "workspaceMembers"}
SINGULAR = {plural: singular for singular, plural in PLURAL.items()}
ACTOR: dict[str, Any] = {"source": "API", "workspaceMemberId": None, "name": "reactor", "context": {}}

PERSON_FIELDS = {"id", "name", "emails", "phones", "jobTitle", "city", "avatarUrl", "position", "companyId",
                 "linkedinLink", "xLink", "createdAt", "updatedAt", "deletedAt", "createdBy", "updatedBy"}  # fmt: skip
TASK_FIELDS = {"id", "title", "bodyV2", "dueAt", "status", "assigneeId", "position", "createdAt", "updatedAt",
               "deletedAt", "createdBy", "updatedBy"}  # fmt: skip
TARGET_FIELDS = {"id", "taskId", "targetPersonId", "targetCompanyId", "targetOpportunityId", "createdAt",
                 "updatedAt", "deletedAt"}  # fmt: skip
LEGACY_TARGET_FIELDS = {"id", "taskId", "personId", "companyId", "opportunityId", "createdAt", "updatedAt", "deletedAt"}
MEMBER_FIELDS = {"id", "name", "userEmail", "userId", "createdAt", "updatedAt", "deletedAt"}


class Rejected(Exception):
    """A 4xx as Twenty words it."""

    def __init__(self, status: int, message: str, error: str = "BadRequestException") -> None:
        super().__init__(message)
        self.status, self.error = status, error


@dataclass(frozen=True)
class Event:
    name: str  # person.created, task.updated, …
    record: dict[str, Any]
    updated_fields: list[str] | None = None


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Workspace:
    custom_person_fields: set[str] = field(default_factory=set)
    legacy_task_targets: bool = False  # the 1.16-era server: personId (before Twenty 1.17), its messages
    tables: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {name: {} for name in ("person", "task", "taskTarget", "workspaceMember")}
    )
    webhooks: dict[str, dict[str, Any]] = field(default_factory=dict)
    listeners: list[Callable[[Event], None]] = field(default_factory=list)
    _position: int = 0

    def fields(self, obj: str) -> set[str]:
        if obj == "person":
            return PERSON_FIELDS | self.custom_person_fields
        if obj == "taskTarget":
            return LEGACY_TARGET_FIELDS if self.legacy_task_targets else TARGET_FIELDS
        return {"task": TASK_FIELDS, "workspaceMember": MEMBER_FIELDS}[obj]

    def duplicate_message(self, field_name: str) -> str:
        """The 1.16-era server names no field (rest/63); later ones do."""
        return "A duplicate entry was detected" + ("" if self.legacy_task_targets else
                                                   f". Please check the {field_name} field.")  # fmt: skip

    def seed(self, members: int, open_tasks: int) -> None:
        for i in range(members):
            member_id = str(uuid.uuid4())
            self.tables["workspaceMember"][member_id] = {
                "id": member_id, "name": {"firstName": f"Member{i + 1}", "lastName": "Sim"},
                "userEmail": f"member{i + 1}@sim.test", "userId": str(uuid.uuid4()), "createdAt": now(),
                "updatedAt": now(), "deletedAt": None,
            }  # fmt: skip
        member_ids = list(self.tables["workspaceMember"])
        for i in range(open_tasks):
            assignee = member_ids[i % len(member_ids)] if member_ids else None
            self.create("task", {"title": f"Seeded task {i + 1}", "status": "TODO", "assigneeId": assignee},
                        emit=False)  # fmt: skip

    def emit(self, event: Event) -> None:
        for listener in self.listeners:
            listener(event)

    # -- reads --------------------------------------------------------------------------------------------

    def get(self, obj: str, record_id: str, *, with_deleted: bool = False) -> dict[str, Any]:
        record = self.tables[obj].get(record_id)
        if record is None or (record.get("deletedAt") and not with_deleted):
            raise Rejected(404, "Record not found", "NotFoundException")
        return record

    # -- writes -------------------------------------------------------------------------------------------

    def validate(self, obj: str, data: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise Rejected(400, "Record data must be an object")
        unknown = set(data) - self.fields(obj)
        if unknown:
            raise Rejected(400, f'Object {obj} doesn\'t have any "{sorted(unknown)[0]}" field.')
        clean = copy.deepcopy(data)
        if obj == "person":
            if "emails" in clean:
                emails = clean["emails"] or {}
                clean["emails"] = {"primaryEmail": (emails.get("primaryEmail") or "").strip().lower(),
                                   "additionalEmails": emails.get("additionalEmails") or []}  # fmt: skip
            if "phones" in clean:
                clean["phones"] = _phones(clean["phones"] or {})
        if obj == "task" and clean.get("status") not in (None, "TODO", "IN_PROGRESS", "DONE"):
            raise Rejected(400, f'Value "{clean["status"]}" is not a valid option for field "status"')
        if obj == "task" and "bodyV2" in clean:
            clean["bodyV2"] = {"markdown": (clean["bodyV2"] or {}).get("markdown") or "", "blocknote": None}
        return clean

    def create(self, obj: str, data: dict[str, Any], *, emit: bool = True) -> dict[str, Any]:
        clean = self.validate(obj, data)
        record_id = clean.get("id") or str(uuid.uuid4())
        if record_id in self.tables[obj]:
            raise Rejected(400, self.duplicate_message("id"))
        if obj == "person":
            self._check_unique_email(clean, None)
        self._position -= 1
        record = {**self._defaults(obj), **clean, "id": record_id, "createdAt": now(), "updatedAt": now(),
                  "deletedAt": None, "position": self._position, "createdBy": ACTOR, "updatedBy": ACTOR}  # fmt: skip
        self.tables[obj][record_id] = record
        if emit:
            self.emit(Event(f"{obj}.created", copy.deepcopy(record)))
        return record

    def upsert(self, obj: str, data: dict[str, Any]) -> dict[str, Any]:
        """Twenty's upsert: match on id, then on a unique field (a person's primary email), trash included."""
        clean = self.validate(obj, data)
        match = self.tables[obj].get(clean.get("id") or "")
        if match is None and obj == "person":
            email = (clean.get("emails") or {}).get("primaryEmail")
            match = next((p for p in self.tables["person"].values() if email and
                          p["emails"]["primaryEmail"] == email), None)  # fmt: skip
        if match is None:
            return self.create(obj, clean)
        return self.update(obj, match["id"], {k: v for k, v in clean.items() if k != "id"}, revive=True)

    def update(self, obj: str, record_id: str, data: dict[str, Any], *, revive: bool = False) -> dict[str, Any]:
        record = self.tables[obj].get(record_id)
        if record is None or (record.get("deletedAt") and not revive):
            raise Rejected(404, "Record not found", "NotFoundException")
        clean = self.validate(obj, data)
        if obj == "person":
            self._check_unique_email(clean, record_id)
        changed = {k: v for k, v in clean.items() if k not in ("id", "createdAt", "updatedAt") and record.get(k) != v}
        if revive and record.get("deletedAt"):
            changed["deletedAt"] = None
        if not changed:
            return record
        record.update(changed)
        record["updatedAt"] = now()
        updated = sorted(changed)
        if "assigneeId" in changed:
            updated.append("assignee")  # 2.4x names both the relation and its join column
        self.emit(Event(f"{obj}.updated", copy.deepcopy(record), updated))
        return record

    def delete(self, obj: str, record_id: str, *, soft: bool) -> dict[str, Any]:
        record = self.tables[obj].get(record_id)
        if record is None or (soft and record.get("deletedAt")):
            raise Rejected(404, "Record not found", "NotFoundException")
        if soft:
            record["deletedAt"] = record["updatedAt"] = now()
            self.emit(Event(f"{obj}.deleted", copy.deepcopy(record), ["deletedAt"]))
        else:
            del self.tables[obj][record_id]
            self.emit(Event(f"{obj}.destroyed", copy.deepcopy(record)))
            if obj == "task":  # task targets cascade
                for target_id in [t for t, v in self.tables["taskTarget"].items() if v["taskId"] == record_id]:
                    del self.tables["taskTarget"][target_id]
        return record

    def restore(self, obj: str, record_id: str) -> dict[str, Any]:
        record = self.tables[obj].get(record_id)
        if record is None or not record.get("deletedAt"):
            raise Rejected(404, "Record not found", "NotFoundException")
        record["deletedAt"] = None
        record["updatedAt"] = now()
        self.emit(Event(f"{obj}.restored", copy.deepcopy(record), ["deletedAt"]))
        return record

    def _check_unique_email(self, clean: dict[str, Any], own_id: str | None) -> None:
        email = (clean.get("emails") or {}).get("primaryEmail")
        if email and any(p["emails"]["primaryEmail"] == email and p["id"] != own_id
                         for p in self.tables["person"].values()):  # fmt: skip
            raise Rejected(400, self.duplicate_message("emails"))

    def _defaults(self, obj: str) -> dict[str, Any]:
        if obj == "person":
            return {"name": {"firstName": "", "lastName": ""}, "emails": {"primaryEmail": "", "additionalEmails": []},
                    "phones": _phones({}), "jobTitle": "", "city": "", "avatarUrl": "", "companyId": None}  # fmt: skip
        if obj == "task":
            return {"title": None, "bodyV2": {"markdown": "", "blocknote": None}, "dueAt": None, "status": "TODO",
                    "assigneeId": None}  # fmt: skip
        if obj == "taskTarget":
            names = ("personId", "companyId", "opportunityId") if self.legacy_task_targets else (
                "targetPersonId", "targetCompanyId", "targetOpportunityId")  # fmt: skip
            return dict.fromkeys(names)
        return {}


def _phones(phones: dict[str, Any]) -> dict[str, Any]:
    """As Twenty's transform-phones-value: libphonenumber parses the number (the codes as defaults), a code that
    conflicts is refused, and the national number is what is stored."""
    number = phones.get("primaryPhoneNumber") or ""
    country, calling = phones.get("primaryPhoneCountryCode") or "", phones.get("primaryPhoneCallingCode") or ""
    if not number:
        return {"primaryPhoneNumber": "", "primaryPhoneCountryCode": country, "primaryPhoneCallingCode": calling,
                "additionalPhones": []}  # fmt: skip
    try:
        region = country or (phonenumbers.region_code_for_country_code(int(calling.lstrip("+"))) if calling else None)
        parsed = phonenumbers.parse(number, region)
    except (phonenumbers.NumberParseException, ValueError):
        raise Rejected(400, f"Provided phone number is invalid {number}") from None
    if calling and calling.lstrip("+") != str(parsed.country_code):
        raise Rejected(400, "Provided and inferred calling code are conflicting")
    return {"primaryPhoneNumber": str(parsed.national_number),
            "primaryPhoneCountryCode": country or phonenumbers.region_code_for_number(parsed) or "",
            "primaryPhoneCallingCode": f"+{parsed.country_code}", "additionalPhones": []}  # fmt: skip
