"""`Endpoint`: a Starlette Route whose handler is called directly.

Starlette wraps each route's handler in a layer of its own that looks up exception handlers; reactor.app.Edge
answers every error itself, so that layer only added a frame and a send wrapper to every request."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]


def _direct(handler: Handler) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        response = await handler(Request(scope, receive))
        await response(scope, receive, send)

    return app


class Endpoint(Route):
    def __init__(self, path: str, endpoint: Handler, **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            raise TypeError(f"{endpoint!r} must be an async function")
        super().__init__(path, endpoint, **kwargs)
        self.app = _direct(endpoint)
