"""uvicorn's limits for `reactor web` (and for the tests that run a real server), so that no client holds a
connection or a buffer indefinitely. The app's own deadlines (body, whole request) are reactor.app.Limits.

uvicorn bounds idle keep-alive connections only after a first answer, and its keep-alive timer stops at a request's
first byte: a client that connects and says nothing, or trickles its headers, held a connection for ever. The
protocol below gives every request head HEAD_TIMEOUT_S to arrive. h11, not httptools: only h11 bounds the size of a
request's head.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 10.0


class H11WithHeadDeadline(H11Protocol):
    head_timeout_s = HEAD_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_head()

    def _await_head(self) -> None:
        waiting_after = self.cycle  # a new request head replaces it

        def give_up() -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(self.head_timeout_s, give_up)


SERVER_LIMITS: dict[str, Any] = {
    "http": H11WithHeadDeadline,
    "h11_max_incomplete_event_size": 16 * 1024,  # a request line plus headers over 16 KiB: 400, connection closed
    "timeout_keep_alive": 5,  # seconds an idle keep-alive connection is kept between requests
    "limit_concurrency": 1000,  # connections + requests in flight; past it, new requests are answered 503
}
