"""The arq worker: thin job functions (ctx -> Resources -> one service call) and the retry policy.

Jobs: `sync_lead(lead_id)` and `sync_backlog()`; a ticker in each worker enqueues the backlog sweep every
SYNC_SWEEP_S with a job id derived from the period, so a fleet of workers sweeps once per period, not once
per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

from arq import Retry
from arq.worker import Worker, func

from reactor import deadletters, jobs, sync
from reactor.resources import Resources, open_resources
from reactor.settings import Settings
from reactor.twenty import TwentyClient, TwentyUnavailable

log = logging.getLogger("reactor.worker")

SYNC_LEAD_KEEP_RESULT_S = 10  # short: a later enqueue of the same sync:<lead_id> must not be refused for long
BACKLOG_KEEP_RESULT_S = 24 * 3600  # GET /jobs/{id} shows a backlog run's result for a day
MAX_RETRY_DELAY_S = 600.0


def retry_delay(job_try: int, retry_after: float | None, base_s: float) -> float:
    """Exponential backoff with jitter (base, 2xbase, 4xbase… capped), never shorter than Retry-After."""
    ceiling = min(MAX_RETRY_DELAY_S, base_s * 2 ** (job_try - 1))
    return max(retry_after or 0.0, random.uniform(ceiling / 2, ceiling))


def _resources(ctx: dict[str, Any]) -> tuple[Resources, TwentyClient]:
    resources: Resources = ctx["resources"]
    assert resources.twenty is not None, "the worker starts only with Twenty configured"
    return resources, resources.twenty


def sync_options(settings: Settings) -> sync.SyncOptions:
    return sync.SyncOptions(
        field_map=settings.person_field_map,
        restore_deleted=settings.restore_deleted_people,
        batch_size=settings.twenty_batch_size,
    )


async def sync_lead(ctx: dict[str, Any], lead_id: str) -> str:
    res, twenty = _resources(ctx)
    try:
        pushed = await sync.sync_lead(res.db, twenty, lead_id, sync_options(res.settings))
    except TwentyUnavailable as exc:
        if ctx["job_try"] < res.settings.sync_max_tries:
            delay = retry_delay(ctx["job_try"], exc.retry_after, res.settings.sync_retry_base_s)
            raise Retry(defer=delay) from exc
        # Out of tries: the lead stays unsynced (the sweep keeps trying), and the dead letter says why.
        await deadletters.record(res.db, job_name=jobs.SYNC_LEAD, job_id=ctx["job_id"], args=[lead_id],
                                 error=str(exc), attempts=ctx["job_try"])  # fmt: skip
        return "unavailable"
    if pushed is None:
        return "skipped"
    if lead_id in pushed.rejected:
        await deadletters.record(res.db, job_name=jobs.SYNC_LEAD, job_id=ctx["job_id"], args=[lead_id],
                                 error=pushed.rejected[lead_id], attempts=ctx["job_try"])  # fmt: skip
        return "rejected"
    return "suppressed" if pushed.suppressed else "synced"


async def sync_backlog(ctx: dict[str, Any]) -> dict[str, Any]:
    res, twenty = _resources(ctx)
    result = await sync.sync_backlog(res.db, twenty, sync_options(res.settings))
    for failure in result.failed:
        await deadletters.record(res.db, job_name=jobs.SYNC_LEAD, job_id=jobs.sync_lead_job_id(failure["lead_id"]),
                                 args=[failure["lead_id"]], error=failure["error"], attempts=1)  # fmt: skip
    return result.as_dict()


async def _sweep_ticker(res: Resources) -> None:
    period = res.settings.sync_sweep_s
    while True:
        slot = int(time.time() // period)
        with contextlib.suppress(Exception):  # Redis down: the next tick tries again
            await jobs.enqueue(res.redis, jobs.SYNC_BACKLOG, job_id=f"sweep:{slot}")
        await asyncio.sleep((slot + 1) * period - time.time() + random.uniform(0, 0.5))


def build_worker(res: Resources, *, burst: bool = False, sweep: bool = True) -> Worker:
    settings = res.settings
    ticker: dict[str, asyncio.Task[None]] = {}

    async def startup(ctx: dict[str, Any]) -> None:
        if sweep:
            ticker["task"] = asyncio.create_task(_sweep_ticker(res))

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "task" in ticker:
            ticker["task"].cancel()

    return Worker(
        functions=[
            func(
                sync_lead, name=jobs.SYNC_LEAD, keep_result=SYNC_LEAD_KEEP_RESULT_S, max_tries=settings.sync_max_tries
            ),
            func(sync_backlog, name=jobs.SYNC_BACKLOG, keep_result=BACKLOG_KEEP_RESULT_S, timeout=3600),
        ],
        redis_pool=res.redis,
        ctx={"resources": res},
        on_startup=startup,
        on_shutdown=shutdown,
        burst=burst,
        poll_delay=0 if burst else 0.5,
        handle_signals=not burst,
        max_jobs=20,
        job_timeout=300,
        health_check_interval=30,
    )


async def run(settings: Settings) -> None:
    async with open_resources(settings) as res:
        worker = build_worker(res)
        try:
            await worker.async_run()
        finally:
            await worker.close()
