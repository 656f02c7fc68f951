"""The worker: the drain loop (reactor.drain, the one write path to Twenty) and arq for the long jobs —
`sync_backlog` (POST /sync-crm), `auto_assign` and `reconcile` — with their retry policy.

Short work (a lead's sync, a follow-up, an SLA check) is never an arq job: it is a row in PostgreSQL that the
drain loop of any worker takes, so a Redis restart or a killed worker loses nothing and blocks nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import prometheus_client
from arq import Retry
from arq.cron import CronJob, cron
from arq.worker import Worker, func

from reactor import (
    assignees,
    deadletters,
    drain,
    followup_store,
    followups,
    jobs,
    logs,
    metrics,
    outages,
    supervisor,
)
from reactor.resources import Resources
from reactor.settings import Settings
from reactor.twenty import TwentyClient, TwentyError, TwentyUnavailable

log = logging.getLogger("reactor.worker")

BACKLOG_KEEP_RESULT_S = 24 * 3600  # GET /jobs/{id} shows a long job's result for a day
MAX_RETRY_DELAY_S = 600.0
MEMBERS_REFRESH_S = 600  # how often the workspace members are re-read (one call, once for the fleet)
POLL_DELAY_S = 0.5  # how often an idle worker looks for arq jobs (only the long ones are jobs)
JOB_COMPLETION_WAIT_S = 20  # on SIGTERM, under the usual 30 s before platforms send SIGKILL
LONG_JOB_TIMEOUT_S = 3600


def retry_delay(job_try: int, retry_after: float | None, base_s: float) -> float:
    """Exponential backoff with jitter (base, 2xbase, 4xbase… capped), never shorter than Retry-After."""
    ceiling = min(MAX_RETRY_DELAY_S, base_s * 2 ** (job_try - 1))
    return max(retry_after or 0.0, random.uniform(ceiling / 2, ceiling))


def _resources(ctx: dict[str, Any]) -> tuple[Resources, TwentyClient]:
    resources: Resources = ctx["resources"]
    assert resources.twenty is not None, "the worker starts only with Twenty configured"
    return resources, resources.twenty


async def _retry_or_dead_letter(ctx: dict[str, Any], name: str, args: list[Any], exc: TwentyUnavailable) -> None:
    """Retry a job Twenty could not serve, with growing delays; after the last try, record a dead letter."""
    res: Resources = ctx["resources"]
    if ctx["job_try"] < res.settings.sync_max_tries:
        delay = retry_delay(ctx["job_try"], exc.retry_after, res.settings.sync_retry_base_s)
        raise Retry(defer=delay) from exc
    await deadletters.record(res.db, job_name=name, job_id=ctx["job_id"], args=args, error=str(exc),
                             attempts=ctx["job_try"])  # fmt: skip
    metrics.job_failed()
    metrics.job_failed()


JobFunction = TypeVar("JobFunction", bound=Callable[..., Awaitable[dict[str, Any]]])


def _retry_outages(job: JobFunction) -> JobFunction:
    """A long job that meets a PostgreSQL or Redis outage is retried later, like one that met a Twenty outage."""

    @functools.wraps(job)
    async def run(ctx: dict[str, Any], *args: Any) -> dict[str, Any]:
        try:
            return await job(ctx, *args)
        except Retry:
            raise
        except Exception as exc:
            if outages.unavailable(exc) is None:
                raise
            res: Resources = ctx["resources"]
            raise Retry(defer=retry_delay(ctx["job_try"], None, res.settings.sync_retry_base_s)) from exc

    return cast(JobFunction, run)


@_retry_outages
async def sync_backlog(ctx: dict[str, Any]) -> dict[str, Any]:
    """POST /sync-crm: push every waiting lead now, through the drain's batches, and report what happened."""
    res, _ = _resources(ctx)
    pushed, outage = await drain.sync_all_leads(res)
    result: dict[str, Any] = {
        "synced": list(pushed.synced),
        "failed": [{"lead_id": k, "error": v} for k, v in pushed.rejected.items()],
        "suppressed": pushed.suppressed,
        "interrupted": str(outage) if outage else None,
    }
    counts = {f"{key}_count": len(result[key]) for key in ("synced", "failed", "suppressed")}
    return {"total": sum(counts.values()), **counts, **result}


@_retry_outages
async def auto_assign(ctx: dict[str, Any]) -> dict[str, Any]:
    """POST /tasks/auto-assign: a follow-up for every person in Twenty who has no active one — historical
    contacts included, which is what this command is for — through the drain's batches."""
    res, twenty = _resources(ctx)
    try:
        async with res.db.acquire() as conn:
            active = await followup_store.people_with_active(conn)
        people = {p.id: p async for p in twenty.list_people() if p.id not in active and p.deleted_at is None}
    except TwentyUnavailable as exc:
        await _retry_or_dead_letter(ctx, jobs.AUTO_ASSIGN, [], exc)
        return {"owed": 0, "created": 0, "failed": 0, "error": str(exc)}
    owed = await followups.owe(res.db, people, trigger="auto_assign")
    rounds = await drain.until_idle(res)
    return {
        "scope": "every person in Twenty without an open follow-up, historical contacts included",
        "owed": len(owed),
        "created": sum(len(r.follow_ups.opened) for r in rounds),
        "failed": sum(len(r.follow_ups.failed) for r in rounds),
        "waiting": sum(r.follow_ups.waiting for r in rounds),
        "interrupted": next((str(r.unavailable) for r in rounds if r.unavailable), None),
    }


async def reconcile(ctx: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    """The reconcile job (POST /reconcile, RECONCILE_CRON). Refused while another run holds the lock."""
    from reactor import reconcile as reconciliation

    res, _ = _resources(ctx)
    run_id = ctx["job_id"]
    holder = await reconciliation.acquire(res.redis, run_id)
    if holder is not None:
        return {"refused": f"reconcile {holder} is running"}
    try:
        report = await reconciliation.run(res, run_id, dry_run=dry_run)
    finally:
        await reconciliation.release(res.redis, run_id)
    return report.as_dict()


async def _maintenance(res: Resources) -> None:
    """Every SYNC_SWEEP_S: re-read the members once per MEMBERS_REFRESH_S for the fleet (new or removed members
    become pickable), and dead-letter what Twenty refused since the last look."""
    while True:
        with contextlib.suppress(Exception):  # Redis or Twenty away: the next tick tries again
            if res.twenty is not None and await res.redis.set(res.cache.key("members-fresh"), 1, nx=True,
                                                               ex=MEMBERS_REFRESH_S):  # fmt: skip
                await assignees.refresh_members(res.twenty, res.cache, res.settings)
        await asyncio.sleep(res.settings.sync_sweep_s * random.uniform(0.9, 1.1))


async def _check_routing_config(res: Resources) -> str | None:
    """Every member email the routing settings name must be a workspace member (when Twenty can be asked)."""
    named = res.settings.routing_emails()
    if not named or res.twenty is None:
        return None
    try:
        members = await res.twenty.list_workspace_members()
    except TwentyError as exc:
        log.warning("worker.routing_unchecked error=%s (Twenty unreachable; checked again at the next start)", exc)
        return None
    unknown = named - {(m.user_email or "").lower() for m in members}
    if unknown:
        return ("ASSIGNEE_EMAILS, ASSIGNEE_WEIGHTS, FALLBACK_ASSIGNEE_EMAIL: not workspace members: "
                + ", ".join(sorted(unknown)))  # fmt: skip
    return None


def _cron_jobs(settings: Settings) -> list[CronJob]:
    if not settings.reconcile_cron:
        return []
    from reactor.reconcile import parse_cron

    when = {k: v for k, v in parse_cron(settings.reconcile_cron).items() if v is not None}
    # arq gives each occurrence one job id, so a fleet of workers reconciles once per occurrence.
    return [cron(reconcile, name="reconcile_cron", unique=True, timeout=3600, **when)]  # type: ignore[arg-type]


async def _job_context(ctx: dict[str, Any]) -> None:
    logs.job_id.set(ctx["job_id"])  # every log line of the job carries its id


def build_worker(res: Resources, *, burst: bool = False, background: bool = True) -> Worker:
    """arq for the long jobs; with `background`, the drain loop and the maintenance ticker run beside it."""
    settings = res.settings
    tasks: list[asyncio.Task[None]] = []
    stopped = asyncio.Event()  # arq may run on_shutdown while on_startup is still awaiting

    async def startup(ctx: dict[str, Any]) -> None:
        if res.twenty is not None:
            try:  # a first start (or a flushed Redis): members and loads once before assigning anything
                await assignees.ensure_ready(res.twenty, res.cache, res.db, settings)
            except TwentyError as exc:
                log.warning("worker.load_cache_not_built error=%s (built at the first pick instead)", exc)
        if background and not stopped.is_set():
            tasks.append(asyncio.create_task(drain.run_forever(res)))
            tasks.append(asyncio.create_task(_maintenance(res)))

    async def shutdown(ctx: dict[str, Any]) -> None:
        stopped.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    keep, timeout = BACKLOG_KEEP_RESULT_S, LONG_JOB_TIMEOUT_S
    return Worker(
        functions=[
            func(
                metrics.instrumented(jobs.SYNC_BACKLOG)(sync_backlog),
                name=jobs.SYNC_BACKLOG,
                keep_result=keep,
                timeout=timeout,
            ),
            func(
                metrics.instrumented(jobs.AUTO_ASSIGN)(auto_assign),
                name=jobs.AUTO_ASSIGN,
                keep_result=keep,
                timeout=timeout,
            ),
            func(
                metrics.instrumented(jobs.RECONCILE)(reconcile),
                name=jobs.RECONCILE,
                keep_result=keep,
                timeout=timeout,
                max_tries=1,
            ),
        ],
        cron_jobs=_cron_jobs(settings),
        redis_pool=res.redis,
        ctx={"resources": res},
        on_startup=startup,
        on_shutdown=shutdown,
        on_job_start=_job_context,
        burst=burst,
        poll_delay=0 if burst else POLL_DELAY_S,
        handle_signals=not burst,
        max_jobs=4,
        job_timeout=LONG_JOB_TIMEOUT_S,
        health_check_interval=30,
        job_completion_wait=JOB_COMPLETION_WAIT_S,
    )


async def run(settings: Settings) -> int:
    """The `reactor worker` process: runs until SIGTERM (0) or a configuration error (2), through outages."""
    if settings.worker_metrics_port:
        prometheus_client.start_http_server(settings.worker_metrics_port, registry=metrics.REGISTRY)
    # On SIGTERM arq gives the jobs in flight JOB_COMPLETION_WAIT_S to finish; the rest are cancelled and run again
    # later (their leads are leased, never lost).
    return await supervisor.supervise(settings, build_worker, _check_routing_config)
