"""Probes and metrics: GET /healthz (the process is up), GET /readyz (PostgreSQL and Redis answer in time),
GET /metrics (Prometheus)."""

from __future__ import annotations

import logging

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from reactor import assignees, metrics, store
from reactor.api.endpoint import Endpoint
from reactor.resources import Resources

log = logging.getLogger("reactor.ops")
PROBE_TIMEOUT_S = 2.0


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def _check_postgres(res: Resources) -> None:
    async with res.db.acquire() as conn:
        await store.ping(conn)


async def _check_redis(res: Resources) -> None:
    await res.redis.ping()


async def readyz(request: Request) -> JSONResponse:
    res: Resources = request.state.resources
    checks = {}
    for name, check in (("postgres", _check_postgres), ("redis", _check_redis)):
        try:
            with anyio.fail_after(PROBE_TIMEOUT_S):
                await check(res)
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not ready"; the reason is logged, not returned
            log.warning("readyz.failed dependency=%s error=%s", name, type(exc).__name__)
            checks[name] = "unavailable"
    ready = all(state == "ok" for state in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503)


async def prometheus(request: Request) -> Response:
    res: Resources = request.state.resources
    try:
        with anyio.fail_after(PROBE_TIMEOUT_S):
            loads = await assignees.member_loads(res.db, res.cache, res.settings)
            await metrics.refresh_fleet(res.redis, res.db, loads)
    except Exception as exc:  # the process's own counters are still worth scraping
        log.warning("metrics.fleet_unavailable error=%s", type(exc).__name__)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


routes = [Endpoint("/healthz", healthz), Endpoint("/readyz", readyz), Endpoint("/metrics", prometheus)]
