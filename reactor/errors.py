"""The one error tree for expected failures, and the handlers that render every error as JSON.

Every error body is `{"error": <code>, "detail": <text or list>}`. Only bugs become 500s, and a 500 shows no
stack trace (it is logged with the request id instead).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from reactor import outages

log = logging.getLogger("reactor.errors")


class ReactorError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class MalformedJson(ReactorError):
    status, code = 400, "malformed_json"


class Unauthenticated(ReactorError):
    status, code = 401, "unauthenticated"


class InvalidSignature(ReactorError):
    status, code = 401, "invalid_signature"


class InvalidEvent(ReactorError):
    status, code = 400, "invalid_event"


class NotConfigured(ReactorError):
    status, code = 503, "not_configured"


class ServiceUnavailable(ReactorError):
    """503 with Retry-After: PostgreSQL or Redis is down (reactor.outages decides), or the request ran too long."""

    status, code = 503, "unavailable"


class RequestTimeout(ReactorError):
    status, code = 408, "request_timeout"


class LeadNotFound(ReactorError):
    status, code = 404, "lead_not_found"


class JobNotFound(ReactorError):
    status, code = 404, "job_not_found"


class PayloadTooLarge(ReactorError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ReactorError):
    status, code = 415, "unsupported_media_type"


class InvalidInput(ReactorError):
    """422: every bad field, each as {"field": "address.country", "message": "..."}."""

    status, code = 422, "validation_failed"

    @classmethod
    def from_validation(cls, exc: ValidationError, prefix: str = "") -> InvalidInput:
        problems = []
        for error in exc.errors(include_url=False, include_context=False, include_input=False):
            field = ".".join(str(part) for part in error["loc"])
            problems.append(
                {
                    "field": f"{prefix}{field}" if field else prefix.rstrip(".") or "(body)",
                    "message": error["msg"].removeprefix("Value error, "),
                }
            )
        return cls(problems)

    @classmethod
    def field(cls, field: str, message: str) -> InvalidInput:
        return cls([{"field": field, "message": message}])


def _render(status: int, code: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def error_response(exc: ReactorError) -> JSONResponse:
    headers = None
    if isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": 'Bearer realm="reactor"'}
    elif isinstance(exc, ServiceUnavailable):
        headers = {"Retry-After": str(outages.RETRY_AFTER_S)}
    elif isinstance(exc, RequestTimeout):
        headers = {"Connection": "close"}
    return _render(exc.status, exc.code, exc.detail, headers)


def http_error_response(exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _render(exc.status_code, code, exc.detail, dict(exc.headers or {}))


def unexpected_error(exc: BaseException, method: str, path: str) -> JSONResponse:
    """The answer to an exception no route handled: a 503 when it is an outage (logged as a warning, without a
    traceback), else a 500 logged once, with its traceback, on a line that carries the request id."""
    dependency = outages.unavailable(exc)
    if dependency is not None:
        log.warning("request.unavailable method=%s path=%s dependency=%s error=%s", method, path,
                    dependency.value, type(exc).__name__)  # fmt: skip
        return error_response(ServiceUnavailable(outages.describe(dependency, exc)))
    log.error("request.failed method=%s path=%s error=%s", method, path, type(exc).__name__, exc_info=exc)
    return _render(500, "internal_error", "an unexpected error occurred; it has been logged")
