"""Request parsing shared by the routes: a size- and type-checked JSON body, and typed query parameters.

The JSON parser is the edge where hostile input stops: nesting deeper than MAX_DEPTH is refused before parsing
(Python's parser recurses), and after it, any string holding a NUL or a lone surrogate (PostgreSQL cannot store
either), any NaN/Infinity or number that overflows a float, and any integer longer than MAX_INT_DIGITS is a 422
naming the field, so nothing below ever sees them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.requests import Request

from reactor.errors import InvalidInput, MalformedJson, PayloadTooLarge, UnsupportedMediaType

MAX_BODY_BYTES = 64 * 1024
MAX_DEPTH = 20  # objects/arrays inside each other; a lead is 3 deep, a Twenty webhook about 4
MAX_INT_DIGITS = 18  # fits PostgreSQL's bigint; Python refuses 4,300+ digits with an error of its own

# Possessive, and an unclosed string runs to the end: linear on any input (a backtracking pattern was quadratic).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"?')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# Escapes that decode to characters PostgreSQL refuses; a body without them needs no walk.
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class _Refused:
    """What the parser puts where a number it refuses was, so the walk can name the field."""

    def __init__(self, text: str, reason: str) -> None:
        self.text, self.reason = text, reason


def _refuse_constant(text: str) -> _Refused:
    return _Refused(text, "must be a finite number (NaN and Infinity are not JSON)")


def _float(text: str) -> float | _Refused:
    value = float(text)
    return value if math.isfinite(value) else _Refused(text, "is too large a number")


def _int(text: str) -> int | _Refused:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return _Refused(text, f"is an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _depth(body: bytes) -> int:
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _field(path: list[str | int]) -> str:
    return ".".join(str(part) for part in path) or "(body)"


def _problems(value: Any) -> list[dict[str, str]]:
    """Every refused number and unstorable string, by field; iterative, in document order."""
    problems: list[dict[str, str]] = []
    pending: list[tuple[list[str | int], Any]] = [([], value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, dict):
            for key, child in reversed(item.items()):
                if _UNSTORABLE.search(key):
                    problems.append({"field": _field([*path, ascii(key)[1:-1]]),
                                     "message": "the name holds a NUL or a lone surrogate"})  # fmt: skip
                pending.append(([*path, key], child))
        elif isinstance(item, list):
            pending.extend(([*path, i], child) for i, child in reversed(list(enumerate(item))))
        elif isinstance(item, _Refused):
            problems.append({"field": _field(path), "message": item.reason})
        elif isinstance(item, str) and _UNSTORABLE.search(item):
            problems.append({"field": _field(path), "message": "holds a NUL (U+0000) or a lone surrogate"})
    return problems


def parse_json(body: bytes) -> Any:
    """Parse a JSON body: 400 when it is not UTF-8 JSON, 422 (naming the field) for what cannot be stored."""
    # a body with no more brackets than the limit cannot nest past it: most need no walk
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and (depth := _depth(body)) > MAX_DEPTH:
        raise InvalidInput.field("(body)", f"nests {depth} levels deep; the limit is {MAX_DEPTH}")
    refused: list[_Refused] = []

    def note(made: Any) -> Any:
        if isinstance(made, _Refused):
            refused.append(made)
        return made

    try:
        value = json.loads(body.decode("utf-8"), parse_constant=lambda t: note(_refuse_constant(t)),
                           parse_float=lambda t: note(_float(t)), parse_int=lambda t: note(_int(t)))  # fmt: skip
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedJson(f"body is not valid JSON: {exc}") from None
    except RecursionError:  # the depth check counts what the parser does; this is belt and braces
        raise InvalidInput.field("(body)", f"nests deeper than {MAX_DEPTH} levels") from None
    if refused or _UNSTORABLE_ESCAPE.search(body):
        problems = _problems(value)
        if problems:
            raise InvalidInput(problems)
    return value


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request's JSON body: 415 for another content type, 413 past `max_bytes`, 400 when malformed."""
    return parse_json(await read_body(request, max_bytes))


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
