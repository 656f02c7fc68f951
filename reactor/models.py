"""The lead as sources send it (`LeadIn`) and as reactor answers with it (`Lead`), as pydantic models.

Validation normalises email and phone (see `normalize`); the phone region comes from the lead's own country
when it is an ISO code, else from the validation context's `phone_region` (DEFAULT_PHONE_REGION).
"""

from __future__ import annotations

import functools
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import phonenumbers
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
    model_validator,
)

from reactor.normalize import normalize_email, normalize_phone

# Repeats of a person (a third of intake) skip the parsers: the results are pure functions of their inputs.
_email = functools.lru_cache(maxsize=16_384)(normalize_email)
_phone = functools.lru_cache(maxsize=16_384)(normalize_phone)


def _blank_to_none(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


Text = Annotated[Annotated[str, Field(max_length=500)] | None, BeforeValidator(_blank_to_none)]

# The full-name index holds lower(first || ' ' || last), and a btree entry holds at most 2,704 bytes: 500 characters
# of four bytes each, twice, made PostgreSQL refuse the row (a 500). 800 bytes each fit even if lowercasing grows
# a character from two bytes to three.
NAME_MAX_BYTES = 800


def _fits_the_name_index(value: str | None) -> str | None:
    if value is not None and len(value.encode()) > NAME_MAX_BYTES:
        raise ValueError(f"is longer than {NAME_MAX_BYTES} bytes in UTF-8")
    return value


Name = Annotated[Text, AfterValidator(_fits_the_name_index)]
# Money travels as a JSON number, not pydantic's default decimal string.
Number = PlainSerializer(float, return_type=float, when_used="json-unless-none")
Amount = Annotated[Annotated[Decimal, Field(ge=0, le=10**12)] | None, BeforeValidator(_blank_to_none), Number]


class _Part(BaseModel):
    """A nested part of a lead; unknown keys are kept (they end up in `raw`)."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)


class Address(_Part):
    street: Text = None
    city: Text = None
    state: Text = None
    postal_code: Text = None
    country: Text = None


class Vehicle(_Part):
    make: Text = None
    model: Text = None
    year: Annotated[Annotated[int, Field(ge=1886, le=2100)] | None, BeforeValidator(_blank_to_none)] = None


class Employment(_Part):
    employer: Text = None
    job_title: Text = None
    employment_status: Text = None
    years_employed: Annotated[
        Annotated[Decimal, Field(ge=0, le=100)] | None, BeforeValidator(_blank_to_none), Number
    ] = None


class SalaryRange(_Part):
    min: Amount = None
    max: Amount = None

    @model_validator(mode="after")
    def _ordered(self) -> SalaryRange:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not be greater than max")
        return self


class LeadIn(BaseModel):
    """One lead as a source POSTs it. At least one of email or phone is required."""

    model_config = ConfigDict(
        extra="allow",
        str_strip_whitespace=True,
        json_schema_extra={
            "example": {
                "lead_id": "webform-8812",
                "first_name": "Ada",
                "last_name": "Lovelace",
                "email": "ada@example.com",
                "phone": "+1 415 555 2671",
                "address": {"city": "San Francisco", "state": "CA", "country": "US"},
                "employment": {"job_title": "Engineer"},
                "current_credit": 25000,
                "consent": True,
                "source": "google-ads",
                "utm_campaign": "spring",
            }
        },
    )

    lead_id: Annotated[
        Annotated[str, Field(max_length=200, pattern=r"^[\x21-\x7e]+$")] | None,
        BeforeValidator(_blank_to_none),
        Field(
            description="the source's own id, printable ASCII: unique within the source, and a dedupe key "
            "within it (reactor's own id is in the answer)"
        ),
    ] = None
    first_name: Name = None
    last_name: Name = None
    # address precedes phone: the phone's region may come from address.country.
    address: Address | None = None
    email: Text = None
    phone: Annotated[Annotated[str, Field(max_length=50)] | None, BeforeValidator(_blank_to_none)] = None
    vehicle: Vehicle | None = None
    employment: Employment | None = None
    salary: SalaryRange | None = None
    current_credit: Amount = Field(None, description="budget")
    consent: bool | None = None
    source: Text = None
    utm_source: Text = None
    utm_medium: Text = None
    utm_campaign: Text = None
    utm_term: Text = None
    utm_content: Text = None

    @field_validator("email")
    @classmethod
    def _normalize_email(cls, value: str | None) -> str | None:
        return None if value is None else _email(value)

    @field_validator("phone")
    @classmethod
    def _parse_phone(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        region = (info.context or {}).get("phone_region", "US")
        address = info.data.get("address")
        country = (address.country or "").upper() if isinstance(address, Address) else ""
        if country in phonenumbers.SUPPORTED_REGIONS:
            region = country
        return _phone(value, region)

    @model_validator(mode="after")
    def _contact_required(self) -> LeadIn:
        if self.email is None and self.phone is None:
            raise ValueError("at least one of email or phone is required")
        return self

    def unknown_fields(self) -> dict[str, Any]:
        """Fields the schema does not know, verbatim, nested ones under their parent's name."""
        unknown: dict[str, Any] = dict(self.model_extra or {})
        for name in ("address", "vehicle", "employment", "salary"):
            part = getattr(self, name)
            if part is not None and part.model_extra:
                unknown[name] = dict(part.model_extra)
        return unknown

    def columns(self) -> dict[str, Any]:
        """The lead flattened into the `leads` table's columns (None where not supplied)."""
        address, vehicle = self.address or Address(), self.vehicle or Vehicle()
        employment, salary = self.employment or Employment(), self.salary or SalaryRange()
        return {
            "email": self.email,
            "phone": self.phone,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "street": address.street,
            "city": address.city,
            "state": address.state,
            "postal_code": address.postal_code,
            "country": address.country,
            "vehicle_make": vehicle.make,
            "vehicle_model": vehicle.model,
            "vehicle_year": vehicle.year,
            "employer": employment.employer,
            "job_title": employment.job_title,
            "employment_status": employment.employment_status,
            "years_employed": employment.years_employed,
            "salary_min": salary.min,
            "salary_max": salary.max,
            "current_credit": self.current_credit,
            "consent": self.consent,
            "source": self.source,
            "utm_source": self.utm_source,
            "utm_medium": self.utm_medium,
            "utm_campaign": self.utm_campaign,
            "utm_term": self.utm_term,
            "utm_content": self.utm_content,
        }


class LeadAccepted(BaseModel):
    status: str = Field(description="'created' (201) or 'existing' (200)")
    lead_id: str = Field(description="reactor's id of the lead (GET /leads/{lead_id})")
    source_lead_id: str | None = Field(None, description="the source's own id, as this submission gave it")


class FollowUp(BaseModel):
    """The follow-up task of the lead's person in Twenty (the latest one)."""

    task_id: str
    assignee_id: str | None
    state: str  # pending | open | closed | failed
    llm_used: bool | None
    opened_at: datetime | None


class Lead(BaseModel):
    """A stored lead with its CRM state, as the read endpoints return it."""

    lead_id: str
    source_lead_id: str | None = Field(description="the id the first source gave it (unique within that source)")
    version: int = Field(description="bumped by every submission that changed the lead")
    first_name: str | None
    last_name: str | None
    email: str | None
    phone: str | None
    address: Address
    vehicle: Vehicle
    employment: Employment
    salary: SalaryRange
    current_credit: Amount
    consent: bool | None
    source: str | None
    api_source: str
    utm: dict[str, str | None]
    raw: dict[str, Any]
    created_at: datetime
    last_seen_at: datetime
    submission_count: int
    crm_synced: bool
    crm_person_id: str | None
    crm_synced_at: datetime | None
    suppressed: bool
    sync_attempts: int
    last_sync_error: str | None
    follow_up: FollowUp | None = None  # shown by GET /leads/{lead_id}

    @classmethod
    def from_row(cls, row: Any) -> Lead:
        """The stored lead, not validated again: it was validated on the way in, and a record written under
        older rules (a salary range merged upside down, say) must still be readable, never a 500."""
        return cls.model_construct(
            lead_id=row["lead_id"],
            source_lead_id=row["source_lead_id"],
            version=row["version"],
            first_name=row["first_name"],
            last_name=row["last_name"],
            email=row["email"],
            phone=row["phone"],
            address=Address.model_construct(
                street=row["street"],
                city=row["city"],
                state=row["state"],
                postal_code=row["postal_code"],
                country=row["country"],
            ),
            vehicle=Vehicle.model_construct(
                make=row["vehicle_make"], model=row["vehicle_model"], year=row["vehicle_year"]
            ),
            employment=Employment.model_construct(
                employer=row["employer"],
                job_title=row["job_title"],
                employment_status=row["employment_status"],
                years_employed=row["years_employed"],
            ),
            salary=SalaryRange.model_construct(min=row["salary_min"], max=row["salary_max"]),
            current_credit=row["current_credit"],
            consent=row["consent"],
            source=row["source"],
            api_source=row["api_source"],
            utm={k: row[f"utm_{k}"] for k in ("source", "medium", "campaign", "term", "content")},
            raw=row["raw"],
            created_at=row["created_at"],
            last_seen_at=row["last_seen_at"],
            submission_count=row["submission_count"],
            crm_synced=row["crm_synced"],
            crm_person_id=row["crm_person_id"],
            crm_synced_at=row["crm_synced_at"],
            suppressed=row["suppressed"],
            sync_attempts=row["sync_attempts"],
            last_sync_error=row["last_sync_error"],
            follow_up=_follow_up(row),
        )


class LeadPage(BaseModel):
    leads: list[Lead]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page; null at the end")


class LeadList(BaseModel):
    leads: list[Lead]


def _follow_up(row: Any) -> FollowUp | None:
    if row.get("fu_task_id") is None:  # rows read without the follow-up join have no such column
        return None
    return FollowUp.model_construct(task_id=row["fu_task_id"], assignee_id=row["fu_assignee_id"],
                                    state=row["fu_state"], llm_used=row["fu_llm_used"],
                                    opened_at=row["fu_opened_at"])  # fmt: skip
