"""Twenty's webhook deliveries: the signature check, and the event inside.

Twenty signs `"<timestamp>:" + body` with HMAC-SHA256, keyed by the subscription's secret as UTF-8 text, and sends
the lowercase hex digest in X-Twenty-Webhook-Signature and the timestamp (ms) in X-Twenty-Webhook-Timestamp. The
check runs over the raw bytes received: re-serialising the JSON would change them. Twenty sends no event id, and its
nonce is new on every send, so duplicates are recognised by an id derived from what the event says.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from reactor.twenty import Person

SIGNATURE = "x-twenty-webhook-signature"
TIMESTAMP = "x-twenty-webhook-timestamp"
NONCE = "x-twenty-webhook-nonce"


class SignatureRejected(Exception):
    """Why a delivery is not trusted; the message is safe to return to the caller."""


def signature(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, now_ms: int, tolerance_s: float) -> str:
    """Check a delivery; return its nonce (to remember against replays). Raises SignatureRejected."""
    sent, timestamp = headers.get(SIGNATURE), headers.get(TIMESTAMP)
    if not sent or not timestamp:
        raise SignatureRejected("missing X-Twenty-Webhook-Signature or X-Twenty-Webhook-Timestamp")
    if not hmac.compare_digest(signature(secret, timestamp, body), sent.strip().lower()):
        raise SignatureRejected("signature does not match")
    if not timestamp.isdigit():
        raise SignatureRejected("timestamp is not milliseconds since the epoch")
    if abs(now_ms - int(timestamp)) > tolerance_s * 1000:
        raise SignatureRejected(f"timestamp is more than {tolerance_s:g}s away from now")
    return headers.get(NONCE) or f"sig:{sent}"


@dataclass(frozen=True)
class Event:
    name: str  # e.g. "task.updated"
    webhook_id: str
    record: dict[str, Any]
    updated_fields: tuple[str, ...]

    @property
    def object_name(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def action(self) -> str:
        return self.name.split(".", 1)[-1]

    @property
    def record_id(self) -> str:
        return str(self.record["id"])

    @property
    def event_id(self) -> str:
        """Stable across re-sends of one change: webhook, event, record and the record's own version."""
        version = self.record.get("updatedAt") or self.record.get("deletedAt") or self.record.get("createdAt") or ""
        key = f"{self.webhook_id}|{self.name}|{self.record_id}|{version}"
        return hashlib.sha256(key.encode()).hexdigest()[:32]


class MalformedEvent(ValueError):
    pass


# The record fields reactor reads (events.task_state, Event.event_id, the follow-up job's Person): each must have
# the type Twenty sends, or the event is refused here, so no code below meets an int where it expects a date.
_TIMES = ("createdAt", "updatedAt", "deletedAt")
_TEXTS = ("assigneeId", "status")


def _check_record(name: str, record: dict[str, Any]) -> None:
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise MalformedEvent("record.id is missing or not a string")
    for key in _TIMES:
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise MalformedEvent(f"record.{key} must be an ISO 8601 date-time string or null")
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise MalformedEvent(f"record.{key} is not an ISO 8601 date-time") from None
    for key in _TEXTS:
        if record.get(key) is not None and not isinstance(record[key], str):
            raise MalformedEvent(f"record.{key} must be a string or null")
    if name.startswith("person."):
        try:  # with the model the follow-up job reads it with
            Person.model_validate(record)
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.errors()[0]["loc"])
            raise MalformedEvent(f"record.{where}: {exc.errors()[0]['msg']}") from None


def parse_event(body: Any) -> Event:
    """The event in a verified delivery; MalformedEvent (a 400) for any shape or type reactor cannot use."""
    if not isinstance(body, dict):
        raise MalformedEvent("the body is not a JSON object")
    name, record = body.get("eventName"), body.get("record")
    if not isinstance(name, str) or "." not in name:
        raise MalformedEvent("eventName is missing or not '<object>.<action>'")
    if not isinstance(record, dict):
        raise MalformedEvent("record is missing or not an object")
    _check_record(name, record)
    webhook_id = body.get("webhookId")
    if webhook_id is not None and not isinstance(webhook_id, str):
        raise MalformedEvent("webhookId must be a string")
    fields = body.get("updatedFields")
    if fields is not None and not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
        raise MalformedEvent("updatedFields must be a list of strings")
    return Event(name=name, webhook_id=webhook_id or "", record=record, updated_fields=tuple(fields or ()))
