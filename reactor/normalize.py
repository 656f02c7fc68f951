"""Pure normalisation of the two identity fields reactor deduplicates on: email and phone."""

from __future__ import annotations

import phonenumbers
from email_validator import EmailNotValidError, validate_email


def normalize_email(value: str) -> str:
    """Syntax-check an address and return its canonical form: trimmed, lowercased (IDNA domain as Unicode).

    The whole address is lowercased: the local part is case-sensitive in theory only, and Twenty itself stores
    emails lowercased, so a case-sensitive comparison here would only create duplicates there.
    Raises ValueError with a reason a person can act on.
    """
    try:
        result = validate_email(value.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None
    return result.normalized.lower()


def normalize_phone(value: str, region: str) -> str:
    """Parse a phone number (international, or national in `region`) and return it as E.164.

    Raises ValueError when libphonenumber cannot parse it or says it is not a valid number; Twenty validates
    phones with the same library, so what passes here will pass there.
    """
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError(f"not a valid phone number for region {region} (give it as +<country code>…)")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def phone_region(e164: str) -> str | None:
    """The ISO region of an E.164 number ("US" for +1415…), or None when it cannot be told."""
    number = phonenumbers.parse(e164, None)
    region: str | None = phonenumbers.region_code_for_number(number)
    return region if region and region != "ZZ" else None
