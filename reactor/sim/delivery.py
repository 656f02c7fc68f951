"""Webhook deliveries as Twenty makes them: one POST per record and subscription, Twenty's body and signature, a
5-second timeout and no retry; with knobs to drop, duplicate and reorder them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

from reactor.sim.state import OBJECT_IDS, WORKSPACE_ID, Event, Workspace, now

log = logging.getLogger("reactor.sim.webhooks")
TIMEOUT_S = 5.0


@dataclass
class DeliveryKnobs:
    drop_rate: float = 0.0  # share of deliveries never sent
    duplicate_rate: float = 0.0  # share sent twice (a new timestamp and nonce each time, as Twenty's re-sends)
    reorder_s: float = 0.0  # each delivery waits a random 0..reorder_s first, so they can arrive out of order


def body_of(event: Event, hook: dict[str, Any]) -> bytes:
    """Twenty's payload, keys in its order, serialised as JSON.stringify does (no spaces, raw UTF-8)."""
    obj, _ = event.name.split(".", 1)
    payload: dict[str, Any] = {
        "targetUrl": hook["targetUrl"], "eventName": event.name,
        "objectMetadata": {"id": OBJECT_IDS.get(obj, ""), "nameSingular": obj}, "workspaceId": WORKSPACE_ID,
        "webhookId": hook["id"], "eventDate": now(), "record": event.record,
    }  # fmt: skip
    if event.updated_fields is not None:
        payload["updatedFields"] = event.updated_fields
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def matches(operations: list[str], event_name: str) -> bool:
    obj, action = event_name.split(".", 1)
    return bool({event_name, f"*.{action}", f"{obj}.*", "*.*"} & set(operations))


class Deliverer:
    def __init__(
        self, workspace: Workspace, knobs: DeliveryKnobs, *, rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:  # fmt: skip
        self.knobs = knobs
        self.stats: Counter[str] = Counter()
        self._workspace = workspace
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._http = httpx.AsyncClient(timeout=TIMEOUT_S, transport=transport)
        workspace.listeners.append(self.on_event)

    def on_event(self, event: Event) -> None:
        for hook in list(self._workspace.webhooks.values()):
            if not matches(hook["operations"], event.name):
                continue
            if self._rng.random() < self.knobs.drop_rate:
                self.stats["dropped"] += 1
                continue
            copies = 2 if self._rng.random() < self.knobs.duplicate_rate else 1
            self.stats["duplicated"] += copies - 1
            for _ in range(copies):
                task = asyncio.get_running_loop().create_task(self._send(event, hook))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, event: Event, hook: dict[str, Any]) -> None:
        if self.knobs.reorder_s:
            await asyncio.sleep(self._rng.uniform(0, self.knobs.reorder_s))
        body = body_of(event, hook)
        stamp = str(int(time.time() * 1000))
        headers = {"Content-Type": "application/json", "X-Twenty-Webhook-Timestamp": stamp,
                   "X-Twenty-Webhook-Nonce": secrets.token_hex(16)}  # fmt: skip
        if hook.get("secret"):
            digest = hmac.new(hook["secret"].encode(), stamp.encode() + b":" + body, hashlib.sha256).hexdigest()
            headers["X-Twenty-Webhook-Signature"] = digest
        try:  # one attempt; a failure is only counted, as Twenty only audits it
            response = await self._http.post(hook["targetUrl"], content=body, headers=headers)
            self.stats["sent" if response.status_code < 300 else "failed"] += 1
        except httpx.HTTPError as exc:
            self.stats["failed"] += 1
            log.info("sim.webhook_failed url=%s error=%s", hook["targetUrl"], type(exc).__name__)

    async def drain(self) -> None:
        """Wait for the deliveries in flight (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await self._http.aclose()
