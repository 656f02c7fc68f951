"""API keys of lead sources: `X-API-Key: <key>` or `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from collections.abc import Mapping

from pydantic import SecretStr
from starlette.requests import Request

from reactor.errors import Unauthenticated


def _digest(value: str) -> bytes:
    # Equal-length inputs for compare_digest, so a key's length does not leak through timing either.
    return hashlib.sha256(value.encode()).digest()


def _basic_password(credentials: str) -> str | None:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        return None
    _user, colon, password = decoded.partition(":")
    return password if colon and password else None


def presented_key(request: Request, *, basic: bool = False) -> str | None:
    """The key the request carries: X-API-Key, else `Authorization: Bearer`, else (when `basic`) the password of
    `Authorization: Basic` (browsers ask for it; the user name is ignored)."""
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if basic and scheme.lower() == "basic" and credentials.strip():
        return _basic_password(credentials)
    return None


def authenticate(request: Request, keys: Mapping[str, SecretStr], *, basic: bool = False) -> str:
    """Return the source name whose key the request carries, or raise Unauthenticated (401).

    Every configured key's digest is compared, whichever matches, so the time taken does not tell which one did.
    """
    presented = presented_key(request, basic=basic)
    if presented is None:
        raise Unauthenticated("missing API key: send X-API-Key or Authorization: Bearer")
    offered = _digest(presented)
    source = None
    for name, digest in _digests(keys):
        if hmac.compare_digest(offered, digest):
            source = name
    if source is None:
        raise Unauthenticated("invalid API key")
    return source


def _digests(keys: Mapping[str, SecretStr]) -> tuple[tuple[str, bytes], ...]:
    return _digests_of(tuple((name, key.get_secret_value()) for name, key in keys.items()))


@functools.lru_cache(maxsize=8)  # one per Settings: a process has one, a test run a few at a time
def _digests_of(keys: tuple[tuple[str, str], ...]) -> tuple[tuple[str, bytes], ...]:
    """The configured keys' digests, made once, not for every key on every request."""
    return tuple((name, _digest(key)) for name, key in keys)
