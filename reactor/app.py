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
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reactor import logs
from reactor.api import dashboard, docs, jobs, leads, members, ops, reconcile, webhooks
from reactor.errors import (
    InvalidInput,
    ReactorError,
    RequestTimeout,
    ServiceUnavailable,
    error_response,
    http_error_response,
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

    return ReactorApp(
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
        lifespan=lifespan,
        limits=limits or Limits(),
    )


class ReactorApp(Starlette):
    """Starlette with one middleware, Edge, in place of Starlette's own two error layers and their handlers: Edge
    answers every error itself, so each request passes one wrapper instead of three (a tenth of intake's CPU)."""

    def __init__(self, *, limits: Limits, **kwargs: Any) -> None:
        if kwargs.get("middleware") or kwargs.get("exception_handlers"):
            raise TypeError("ReactorApp has one middleware, Edge, which answers every error: add to Edge instead")
        super().__init__(**kwargs)
        self.limits = limits

    def build_middleware_stack(self) -> ASGIApp:
        if self.user_middleware or self.exception_handlers:
            raise TypeError("ReactorApp has one middleware, Edge, which answers every error: add to Edge instead")
        return Edge(self.router, self.limits)


def _nul_in_url(scope: Scope) -> str | None:
    """The part of the URL that decodes to a NUL (which PostgreSQL cannot store), or None."""
    if "\x00" in scope["path"]:
        return "(path)"
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return name.replace("\x00", "\\0") or "(query)"
    return None


class Edge:
    """Every request passes here once. It gets an id (the caller's X-Request-ID, or a new one), on each log line
    and in the answer; a URL that decodes to a NUL is refused; the time to receive the body and to answer is
    bounded; every error becomes its answer: a ReactorError or HTTPException as itself, an outage as a 503, a bug
    as a 500 logged once with the request id; a client that hangs up is routine (info), not an error."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"").decode("latin-1")
        rid = given if 0 < len(given) <= 64 and given.isprintable() else os.urandom(8).hex()
        token = logs.request_id.set(rid)
        try:
            await self._answer(scope, receive, send, rid)
        finally:
            logs.request_id.reset(token)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        if (field := _nul_in_url(scope)) is not None:
            problem = InvalidInput.field(field, "contains a NUL character (U+0000)")
            await error_response(problem)(scope, receive, send_with_id)
            return
        method, path = scope["method"], scope["path"]
        # asyncio's own timeouts, not anyio's cancel scopes: a tenth of the cost, on every request
        deadline = asyncio.timeout(self.limits.request_timeout_s)
        try:
            async with deadline:
                await self.app(scope, self._body_deadline(receive), send_with_id)
        except ClientDisconnect:
            log.info("request.client_disconnected method=%s path=%s", method, path)
            return
        except Exception as exc:
            if not (isinstance(exc, TimeoutError) and deadline.expired()):  # the answer's own deadline: below
                await self._failed(exc, started, scope, receive, send_with_id)
                return
        if deadline.expired():
            log.warning("request.timeout method=%s path=%s after_s=%s", method, path, self.limits.request_timeout_s)
            if not started:
                timeout = ServiceUnavailable(f"no answer within {self.limits.request_timeout_s:g} s; retry later")
                await error_response(timeout)(scope, receive, send_with_id)

    @staticmethod
    async def _failed(exc: Exception, started: bool, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if started:  # too late to answer: the status line is out
            log.error("request.failed_mid_response method=%s path=%s", method, path, exc_info=exc)
            return
        if isinstance(exc, ReactorError):
            response = error_response(exc)
        elif isinstance(exc, HTTPException):
            response = http_error_response(exc)
        else:
            response = unexpected_error(exc, method, path)
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
