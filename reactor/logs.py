"""Logging: JSON lines in production, readable lines on a terminal (`reactor dev`); every line carries the request
or job it belongs to; people's emails and phones are masked unless LOG_PII=true."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9-])[A-Za-z0-9.-]*\.([A-Za-z]{2,})")
_PHONE = re.compile(r"\+\d{5,13}(\d{2})\b")  # intake stores phones as E.164: that is the form that reaches logs
_PERCENT_EMAIL = re.compile(r"([A-Za-z0-9._+-])[A-Za-z0-9._+-]*%40([A-Za-z0-9-])[A-Za-z0-9.-]*")
# A path with its query string, as in access logs and URLs: `/leads/search?name=Ada&phone=%2B1415…`.
_PATH_QUERY = re.compile(r"(/[^\s?\"#]*)\?([^\s\"#]+)")
# Parameter names (after percent-decoding and lowercasing: `?%74oken=` is `token`) whose value is a secret.
SECRET_PARAMS = frozenset({"token", "api_key", "apikey", "api-key", "x-api-key", "key", "access_token", "password",
                           "secret", "signature"})  # fmt: skip
# Routes whose query strings describe people; on them every value is masked but these.
_PERSONAL_ROUTES = ("/leads", "/assignments")
_HARMLESS_PARAMS = frozenset({"limit", "cursor"})


def _decoded(name: str) -> str:
    """Percent-decoded until it stops changing (bounded): `%2574oken` is `%74oken` is `token`."""
    for _ in range(4):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return name


def _query_masker(personal: bool) -> Callable[[re.Match[str]], str]:
    def masked(match: re.Match[str]) -> str:
        path, query = match.group(1), match.group(2)
        on_person = personal and path.rstrip("/").startswith(_PERSONAL_ROUTES)
        parts = []
        for part in query.split("&"):
            raw_name, eq, value = part.partition("=")
            name = _decoded(raw_name).strip().lower()
            if value and (name in SECRET_PARAMS or (on_person and name not in _HARMLESS_PARAMS)):
                value = "***"
            parts.append(f"{raw_name}{eq}{value}")
        return f"{path}?{'&'.join(parts)}"

    return masked


_MASK_SECRETS, _MASK_ALL = _query_masker(personal=False), _query_masker(personal=True)


def mask_secrets(text: str) -> str:
    """Keys and sign-in tokens in query strings -> ***, always (LOG_PII=true shows people, never secrets)."""
    return _PATH_QUERY.sub(_MASK_SECRETS, text) if "?" in text else text


def mask(text: str) -> str:
    """ada.lovelace@example.com -> a***@e***.com; +14155552671 -> +*********71; secrets and, on lead routes, every
    query value -> ***."""
    if "?" in text:
        text = _PATH_QUERY.sub(_MASK_ALL, text)
    text = _EMAIL.sub(r"\1***@\2***.\3", text)
    text = _PERCENT_EMAIL.sub(r"\1***%40\2***", text)
    return _PHONE.sub(lambda m: "+" + "*" * (len(m.group(0)) - 3) + m.group(1), text)


_PLAIN = logging.Formatter()


class ContextFilter(logging.Filter):
    """Adds request_id / job_id to every record, and masks personal data in its message and its traceback."""

    def __init__(self, *, pii: bool) -> None:
        super().__init__()
        self._mask = mask_secrets if pii else mask

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.job_id = job_id.get()
        message = record.getMessage()
        masked = self._mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        # An exception's text carries data too (asyncpg: `Key (email)=(ada@example.com) already exists`). It is
        # formatted here, once, so every formatter prints the masked text that Formatter caches in exc_text.
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self._mask(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            if value := getattr(record, key, None):
                line[key] = value
        if record.exc_info:
            line["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(context)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        ids = [v for v in (getattr(record, "request_id", None), getattr(record, "job_id", None)) if v]
        record.context = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is logged (test runners swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(level: str, *, fmt: str = "json", pii: bool = False) -> None:
    """Route every logger (uvicorn's and arq's included) through one handler on stderr."""
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter(pii=pii))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq", "arq.worker"):
        named = logging.getLogger(name)
        named.handlers[:] = []
        named.propagate = True
    # httpx logs every request URL at INFO, and Twenty look-ups carry people's emails in their filters.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))
