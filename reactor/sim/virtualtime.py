"""Virtual time for driving the simulator and reactor's pace through minutes of traffic in a second: a clock that
moves only when every simulated caller sleeps, and a transport adding loopback latency in that time."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
from collections.abc import Coroutine
from typing import Any

import httpx

STALL_S = 1.0  # real seconds without progress after which the callers not asleep are taken to be blocked


class VirtualTime:
    """A clock that moves only when every simulated caller is asleep: it jumps to the earliest wake-up. Real
    Redis calls and ASGI calls happen in no virtual time, so minutes of traffic run in a second or two."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._changed = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), self._seq, future))
        self._changed.set()
        await future

    async def run(self, callers: list[Coroutine[Any, Any, None]]) -> None:
        tasks = [asyncio.create_task(caller) for caller in callers]
        for task in tasks:
            task.add_done_callback(lambda _: self._changed.set())
        while True:
            alive = [task for task in tasks if not task.done()]
            if not alive:
                break
            if len(self._sleepers) < len(alive):  # someone is still running (in Redis, in the simulator)
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), STALL_S)
                    continue
                if not self._sleepers:
                    continue
                # Nothing moved for STALL_S: the rest wait on a lock or a future that only a sleeper can release.
            wake, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            future.set_result(None)
            await asyncio.sleep(0)
        for task in tasks:
            task.result()  # raise what a caller raised


class Latency(httpx.AsyncBaseTransport):
    """Loopback latency (10-31 ms, recorded/latency.json) plus an event loop running late by up to 60 ms on a
    busy host, on the way to the simulator; in virtual time."""

    def __init__(self, inner: httpx.AsyncBaseTransport, time: VirtualTime, rng: random.Random) -> None:
        self._inner, self._time, self._rng = inner, time, rng

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await self._time.sleep(self._rng.uniform(0, 0.06) + self._rng.uniform(0.01, 0.031))
        return await self._inner.handle_async_request(request)
