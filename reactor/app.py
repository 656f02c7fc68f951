"""The web application: `create_app(settings)` builds a Starlette app whose lifespan opens the process's
resources (one PostgreSQL pool, one Redis client) and closes them at shutdown. No migrations here."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reactor import logs
from reactor.api import dashboard, docs, jobs, leads, members, ops, reconcile, webhooks
from reactor.errors import (
    EXCEPTION_HANDLERS,
    InvalidInput,
    ReactorError,
    RequestTimeout,
    ServiceUnavailable,
    error_response,
    unexpected_error,
)
from reactor.resources import open_resources
from reactor.settings import Settings

log = logging.getLogger("reactor.app")


@dataclass(frozen=True)
class Limits:
    """Deadlines the app enforces itself; the server's own limits are in reactor.server."""

    body_timeout_s: float = 10.0  # from the request's head to its body's last byte (a slow-body client)
    request_timeout_s: float = 30.0  # the whole answer; PostgreSQL's command timeout (10 s) normally comes first


def create_app(settings: Settings, limits: Limits | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with open_resources(settings) as resources:
            # What start-up made (modules, phone metadata, the pool) lives as long as the process: out of the
            # collector's sight, a full collection scans only what requests allocate (a p99 of pauses otherwise).
            gc.collect()
            gc.freeze()
            yield {"resources": resources}

    return Starlette(
        routes=[
            *leads.routes,
            *jobs.routes,
            *webhooks.routes,
            *reconcile.routes,
            *ops.routes,
            *docs.routes(),
            *members.routes,
            *dashboard.routes,
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(RequestId), Middleware(Guard, limits=limits or Limits())],
        lifespan=lifespan,
    )


class RequestId:
    """Every request gets an id (the caller's X-Request-ID, or a new one): on each log line and in the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"").decode("latin-1")
        rid = given if 0 < len(given) <= 64 and given.isprintable() else os.urandom(8).hex()
        token = logs.request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)


def _nul_in_url(scope: Scope) -> str | None:
    """The part of the URL that decodes to a NUL (which PostgreSQL cannot store), or None."""
    if "\x00" in scope["path"]:
        return "(path)"
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return name.replace("\x00", "\\0") or "(query)"
    return None


class Guard:
    """Inside RequestId, so each of these lines carries the request's id: refuses URLs that decode to a NUL,
    bounds the time to receive the body and to answer, answers an outage with 503 (a bug with 500, logged once),
    and takes a client that hangs up as routine (info), not as an error."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        if (field := _nul_in_url(scope)) is not None:
            await error_response(InvalidInput.field(field, "contains a NUL character (U+0000)"))(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        # asyncio's own timeouts, not anyio's cancel scopes: a tenth of the cost, on every request
        deadline = asyncio.timeout(self.limits.request_timeout_s)
        try:
            async with deadline:
                await self.app(scope, self._body_deadline(receive), send_watched)
        except ClientDisconnect:
            log.info("request.client_disconnected method=%s path=%s", method, path)
            return
        except Exception as exc:
            if not (isinstance(exc, TimeoutError) and deadline.expired()):  # the answer's own deadline: below
                await self._failed(exc, started, scope, receive, send)
                return
        if deadline.expired():
            log.warning("request.timeout method=%s path=%s after_s=%s", method, path, self.limits.request_timeout_s)
            if not started:
                timeout = ServiceUnavailable(f"no answer within {self.limits.request_timeout_s:g} s; retry later")
                await error_response(timeout)(scope, receive, send)

    @staticmethod
    async def _failed(exc: Exception, started: bool, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if started:  # too late to answer: the status line is out
            log.error("request.failed_mid_response method=%s path=%s", method, path, exc_info=exc)
            return
        response = error_response(exc) if isinstance(exc, ReactorError) else unexpected_error(exc, method, path)
        await response(scope, receive, send)

    def _body_deadline(self, receive: Receive) -> Receive:
        give_up_at = asyncio.get_running_loop().time() + self.limits.body_timeout_s
        body_done = False

        async def receive_in_time() -> Message:
            nonlocal body_done
            if body_done:  # later reads wait for a disconnect, which may rightly take any time
                return await receive()
            arrival = asyncio.timeout_at(give_up_at)
            try:
                async with arrival:
                    message = await receive()
            except TimeoutError:
                if arrival.expired():
                    raise RequestTimeout(f"the body did not arrive within {self.limits.body_timeout_s:g} s") from None
                raise
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return receive_in_time
