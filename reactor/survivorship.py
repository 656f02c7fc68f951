"""Survivorship: which of a lead's values reach its Person in Twenty, on the first sync and on every re-sync.

Pure functions, no I/O. The rules (docs/survivorship.md has them as a table, and tests/test_survivorship.py
checks each row):

* The first sync sends everything reactor has: every Person field the lead has a value for.
* A re-sync sends only what the lead gained or changed since the last push (`pushed`, stored with the lead),
  never a blank, and nothing for a field someone edited in Twenty since that push: Twenty wins there.
* Custom fields from PERSON_FIELD_MAP follow the same rules as the standard ones.
* The name is one composite field in Twenty: when either part is sent, the other part is Twenty's current one
  (so a rep's edit of the other part survives), else reactor's, else blank.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import phonenumbers

from reactor.twenty import Person, PersonInput

# Person fields reactor writes, by the lead column that feeds each.
STANDARD_FIELDS = ("first_name", "last_name", "email", "phone", "job_title", "city")
_NAME = ("first_name", "last_name")


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal) else value


def lead_values(lead: Mapping[str, Any], field_map: Mapping[str, str]) -> dict[str, Any]:
    """What reactor has for each Person field (keys: the lead column, `custom:<personField>` for mapped
    ones), JSON-ready; fields the lead has no value for are left out."""
    values = {column: lead[column] for column in STANDARD_FIELDS if lead[column] not in (None, "")}
    for column, person_field in field_map.items():
        if lead[column] is not None:
            values[f"custom:{person_field}"] = _plain(lead[column])
    return values


def twenty_values(person: Person, field_map: Mapping[str, str]) -> dict[str, Any]:
    """The same fields as the Person holds them now (blank fields left out)."""
    name = person.name
    values: dict[str, Any] = {
        "first_name": name.first_name if name else None,
        "last_name": name.last_name if name else None,
        "email": person.email,
        "phone": _e164(person),
        "job_title": person.job_title,
        "city": person.city,
    }
    extra = person.model_extra or {}
    for person_field in field_map.values():
        values[f"custom:{person_field}"] = extra.get(person_field)
    return {key: value for key, value in values.items() if value not in (None, "")}


def _e164(person: Person) -> str | None:
    phones = person.phones
    if phones is None or not phones.primary_phone_number:
        return None
    number = phones.primary_phone_number
    if number.startswith("+"):
        return number
    calling = (phones.primary_phone_calling_code or "").lstrip("+")
    try:
        parsed = phonenumbers.parse(f"+{calling}{number}" if calling else number, phones.primary_phone_country_code)
    except phonenumbers.NumberParseException:
        return number
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def changes(
    values: Mapping[str, Any], pushed: Mapping[str, Any] | None, in_twenty: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The fields to send: all of `values` on a first sync (`pushed` is None), else those that differ from what
    was pushed last, except where Twenty's value (`in_twenty`, when known) differs from that push too: a
    person edited the field there, and Twenty wins."""
    if pushed is None:
        return dict(values)
    send = {}
    for key, value in values.items():
        before = pushed.get(key)
        if value == before:
            continue
        if in_twenty is not None and in_twenty.get(key) is not None and in_twenty.get(key) != before:
            continue
        send[key] = value
    return send


def person_input(
    person_id: str | None,
    send: Mapping[str, Any],
    values: Mapping[str, Any],
    in_twenty: Mapping[str, Any] | None,
) -> PersonInput:
    """The upsert body for `send` (see `changes`), by the Person's id."""
    first = last = None
    if any(part in send for part in _NAME):
        here = in_twenty or {}

        def part(key: str) -> str:
            return str(send.get(key) or here.get(key) or values.get(key) or "")

        first, last = part("first_name"), part("last_name")
    custom = {key.removeprefix("custom:"): value for key, value in send.items() if key.startswith("custom:")}
    return PersonInput(
        id=person_id,
        first_name=first,
        last_name=last,
        email=send.get("email"),
        phone=send.get("phone"),
        job_title=send.get("job_title"),
        city=send.get("city"),
        custom_fields=custom,
    )
