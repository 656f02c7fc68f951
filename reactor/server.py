"""uvicorn's limits for `reactor web` (and for the tests that run a real server), so that no client holds a
connection or a buffer indefinitely. The app's own deadlines (body, whole request) are reactor.app.Limits.

uvicorn bounds idle keep-alive connections only after a first answer, and its keep-alive timer stops at a request's
first byte: a client that connects and says nothing, or trickles its headers, held a connection for ever. With
httptools, uvicorn does not bound the size of a request head either (the parser buffers a header of any length).
The protocol below keeps httptools' C parser, which costs a fraction of h11's pure-Python one per request, and adds
both bounds: every request head must arrive within HEAD_TIMEOUT_S and within HEAD_MAX_BYTES.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_TIMEOUT_S = 10.0
HEAD_MAX_BYTES = 16 * 1024  # a request line plus headers over 16 KiB: 400, connection closed


HEAD_TOO_LARGE = "Request line or headers too large."


class _HeadTooLarge(Exception):
    pass


class BoundedHttpTools(HttpToolsProtocol):
    head_timeout_s = HEAD_TIMEOUT_S
    head_max_bytes = HEAD_MAX_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_too_large = False
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:  # bytes since the last head ended: what the parser may be buffering
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.head_max_bytes and not self.transport.is_closing():
            self.send_400_response(HEAD_TOO_LARGE)

    def on_headers_complete(self) -> None:
        # A head that came in one read never passed the byte count above: measure what the parser gathered.
        if len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > self.head_max_bytes:
            self._head_too_large = True
            raise _HeadTooLarge  # stops the parser; uvicorn answers 400 and closes (send_400_response below)
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        super().send_400_response(HEAD_TOO_LARGE if self._head_too_large else msg)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_head()

    def _await_head(self) -> None:
        """The next head is due within head_timeout_s. One timer per connection, moved forward lazily: a timer
        per request (and the request it held) stayed alive for head_timeout_s, ten seconds of requests that every
        full garbage collection then scanned (a 200 ms pause at 2,000 requests/s)."""
        self._head_due = self.loop.time() + self.head_timeout_s
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_due, self._check_head)

    def _check_head(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
            return  # closed, or a request is in progress: its response's end sets the next deadline
        if self.loop.time() >= self._head_due:
            self.transport.close()
        else:
            self._head_timer = self.loop.call_at(self._head_due, self._check_head)


SERVER_LIMITS: dict[str, Any] = {
    "http": BoundedHttpTools,
    "timeout_keep_alive": 5,  # seconds an idle keep-alive connection is kept between requests
    "limit_concurrency": 1000,  # connections + requests in flight; past it, new requests are answered 503
}
