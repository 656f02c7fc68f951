"""Request parsing shared by the routes: a size- and type-checked JSON body, and typed query parameters."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from reactor.errors import InvalidInput, MalformedJson, PayloadTooLarge, UnsupportedMediaType

MAX_BODY_BYTES = 64 * 1024


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request's JSON body: 415 for another content type, 413 past `max_bytes`, 400 when malformed."""
    body = await read_body(request, max_bytes)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedJson(f"body is not valid JSON: {exc}") from None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw JSON body, exactly as received: 415 for another content type, 413 past `max_bytes`."""
    if not _is_json(request.headers.get("content-type", "")):
        raise UnsupportedMediaType("send the body as Content-Type: application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"body is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():  # counted as it arrives: a lying Content-Length changes nothing
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
    return bytes(body)


def int_param(request: Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput.field(name, f"must be an integer from {low} to {high}") from None
    if not low <= value <= high:
        raise InvalidInput.field(name, f"must be an integer from {low} to {high}")
    return value


def text_param(request: Request, name: str, *, max_length: int = 500) -> str | None:
    value = request.query_params.get(name, "").strip()
    if len(value) > max_length:
        raise InvalidInput.field(name, f"is longer than {max_length} characters")
    return value or None
