"""POST /webhooks/twenty: verify, drop replays and duplicates, apply. No CRM call, answered in milliseconds."""

from __future__ import annotations

import contextlib
import logging
import time

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse

from reactor import events, metrics
from reactor.api.endpoint import Endpoint
from reactor.api.inputs import parse_json, read_body
from reactor.errors import InvalidEvent, InvalidSignature, NotConfigured, ReactorError, ServiceUnavailable
from reactor.resources import Resources
from reactor.webhooks import MalformedEvent, SignatureRejected, parse_event, verify

log = logging.getLogger("reactor.webhooks")

MAX_WEBHOOK_BYTES = 512 * 1024
EVENT_MEMORY_S = 7 * 24 * 3600  # how long a processed event is remembered (duplicates come within seconds)


async def twenty_webhook(request: Request) -> JSONResponse:
    res: Resources = request.state.resources
    secret = res.settings.twenty_webhook_secret
    if secret is None:
        raise NotConfigured("TWENTY_WEBHOOK_SECRET is not set: webhooks are off")
    body = await read_body(request, MAX_WEBHOOK_BYTES)
    tolerance = res.settings.webhook_tolerance_s
    try:
        nonce = verify(secret.get_secret_value(), request.headers, body, now_ms=int(time.time() * 1000),
                       tolerance_s=tolerance)  # fmt: skip
    except SignatureRejected as exc:
        log.warning("webhook.rejected reason=%s", exc)
        metrics.WEBHOOKS.labels("unknown", "rejected_signature").inc()
        raise InvalidSignature(str(exc)) from None
    try:
        event = parse_event(parse_json(body))
    except ReactorError:  # not JSON (400), or JSON that cannot be stored (422)
        metrics.WEBHOOKS.labels("unknown", "invalid").inc()
        raise
    except MalformedEvent as exc:
        metrics.WEBHOOKS.labels("unknown", "invalid").inc()
        raise InvalidEvent(str(exc)) from None

    event_key = f"reactor:webhook:event:{event.event_id}"
    try:
        fresh = await res.redis.set(f"reactor:webhook:nonce:{nonce}", 1, nx=True, ex=2 * tolerance)
        first = fresh and await res.redis.set(event_key, 1, nx=True, ex=EVENT_MEMORY_S)
    except RedisError as exc:
        raise ServiceUnavailable(f"Redis is unavailable: {type(exc).__name__}") from None
    if not fresh:
        log.warning("webhook.rejected reason=replayed_nonce event=%s", event.name)
        metrics.WEBHOOKS.labels(event.name, "rejected_replay").inc()
        raise InvalidSignature("this delivery was already received (replayed nonce)")
    if not first:
        log.info("webhook.duplicate event=%s record=%s", event.name, event.record_id)
        metrics.WEBHOOKS.labels(event.name, "duplicate").inc()
        return JSONResponse({"status": "duplicate", "event_id": event.event_id})
    try:
        outcome = await events.handle(event, db=res.db, cache=res.cache)
    except RedisError as exc:
        await _forget(res, event_key)  # not processed: a re-send (or reconcile) may still apply it
        raise ServiceUnavailable(f"Redis is unavailable: {type(exc).__name__}") from None
    except Exception:
        await _forget(res, event_key)
        raise
    log.info("webhook.event event=%s record=%s outcome=%s", event.name, event.record_id, outcome)
    metrics.WEBHOOKS.labels(event.name, "ignored" if outcome == "ignored" else "accepted").inc()
    return JSONResponse({"status": outcome, "event_id": event.event_id}, status_code=202)


async def _forget(res: Resources, key: str) -> None:
    with contextlib.suppress(RedisError):
        await res.redis.delete(key)


routes = [Endpoint("/webhooks/twenty", twenty_webhook, methods=["POST"])]
