"""The web application: `create_app(settings)` builds a Starlette app whose lifespan opens the process's
resources (one PostgreSQL pool, one Redis client) and closes them at shutdown. No migrations here."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette

from reactor.api import docs, jobs, leads, ops, reconcile, webhooks
from reactor.errors import EXCEPTION_HANDLERS
from reactor.resources import open_resources
from reactor.settings import Settings


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with open_resources(settings) as resources:
            yield {"resources": resources}

    return Starlette(
        routes=[*leads.routes, *jobs.routes, *webhooks.routes, *reconcile.routes, *ops.routes, *docs.routes()],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
