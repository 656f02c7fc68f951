"""The web application: `create_app(settings)` builds a Starlette app whose lifespan opens the process's
resources (one PostgreSQL pool, one Redis client) and closes them at shutdown. No migrations here."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reactor import logs
from reactor.api import dashboard, docs, jobs, leads, members, ops, reconcile, webhooks
from reactor.errors import EXCEPTION_HANDLERS
from reactor.resources import open_resources
from reactor.settings import Settings


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with open_resources(settings) as resources:
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
        middleware=[Middleware(RequestId)],
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
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if 0 < len(given) <= 64 and given.isprintable() else uuid.uuid4().hex[:16]
        token = logs.request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)
