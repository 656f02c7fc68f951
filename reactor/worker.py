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
import sys
import time
from typing import Any

import prometheus_client
from arq import Retry
from arq.cron import CronJob, cron
from arq.worker import Worker, func

from reactor import assignees, deadletters, followups, jobs, logs, metrics, store, sync
from reactor.resources import Resources, open_resources
from reactor.settings import Settings
from reactor.twenty import Person, TwentyClient, TwentyError, TwentyUnavailable

log = logging.getLogger("reactor.worker")

SYNC_LEAD_KEEP_RESULT_S = 10  # short: a later enqueue of the same sync:<lead_id> must not be refused for long
BACKLOG_KEEP_RESULT_S = 24 * 3600  # GET /jobs/{id} shows a backlog run's result for a day
MAX_RETRY_DELAY_S = 600.0
MEMBERS_REFRESH_S = 600  # how often the sweep re-reads the workspace members (one call)
POLL_DELAY_S = 0.1  # how often an idle worker looks for jobs: bounds the webhook-to-task latency
JOB_COMPLETION_WAIT_S = 20  # on SIGTERM, under the usual 30 s before platforms send SIGKILL


def retry_delay(job_try: int, retry_after: float | None, base_s: float) -> float:
    """Exponential backoff with jitter (base, 2xbase, 4xbase… capped), never shorter than Retry-After."""
    ceiling = min(MAX_RETRY_DELAY_S, base_s * 2 ** (job_try - 1))
    return max(retry_after or 0.0, random.uniform(ceiling / 2, ceiling))


def _resources(ctx: dict[str, Any]) -> tuple[Resources, TwentyClient]:
    resources: Resources = ctx["resources"]
    assert resources.twenty is not None, "the worker starts only with Twenty configured"
    return resources, resources.twenty


def sync_options(settings: Settings) -> sync.SyncOptions:
    return sync.SyncOptions.from_settings(settings)


async def _retry_or_dead_letter(ctx: dict[str, Any], name: str, args: list[Any], exc: TwentyUnavailable) -> None:
    """Retry a job Twenty could not serve, with growing delays; after the last try, record a dead letter."""
    res: Resources = ctx["resources"]
    if ctx["job_try"] < res.settings.sync_max_tries:
        delay = retry_delay(ctx["job_try"], exc.retry_after, res.settings.sync_retry_base_s)
        raise Retry(defer=delay) from exc
    await deadletters.record(res.db, job_name=name, job_id=ctx["job_id"], args=args, error=str(exc),
                             attempts=ctx["job_try"])  # fmt: skip


async def sync_lead(ctx: dict[str, Any], lead_id: str) -> str:
    res, twenty = _resources(ctx)
    try:
        pushed = await sync.sync_lead(res.db, twenty, lead_id, sync_options(res.settings))
    except TwentyUnavailable as exc:
        # Out of tries, the lead stays unsynced (the sweep keeps trying), and the dead letter says why.
        await _retry_or_dead_letter(ctx, jobs.SYNC_LEAD, [lead_id], exc)
        return "unavailable"
    if pushed is None:
        # Already synced: a returning lead. Its person gets a new follow-up if the last one is done.
        async with res.db.acquire() as conn:
            lead = await conn.fetchrow("SELECT crm_person_id, suppressed, synced_version FROM leads WHERE lead_id = $1",
                                       lead_id)  # fmt: skip
        # crm_person_id is chosen at the claim, before the Person exists: only a pushed lead has one for sure.
        if lead and lead["crm_person_id"] and lead["synced_version"] is not None and not lead["suppressed"]:
            await jobs.enqueue_follow_up(res.redis, lead["crm_person_id"])
        return "skipped"
    if lead_id in pushed.rejected:
        await deadletters.record(res.db, job_name=jobs.SYNC_LEAD, job_id=ctx["job_id"], args=[lead_id],
                                 error=pushed.rejected[lead_id], attempts=ctx["job_try"])  # fmt: skip
        return "rejected"
    if lead_id in pushed.synced:
        # An upsert that matched an existing person sends no person.created: ask for the follow-up here.
        person_id = pushed.synced[lead_id]
        person = next((p for p in pushed.people if p.id == person_id), None)
        record = person.model_dump(by_alias=True, mode="json") if person else None
        await jobs.enqueue_follow_up(res.redis, person_id, record)
    return "suppressed" if pushed.suppressed else "synced"


async def create_follow_up(ctx: dict[str, Any], person_id: str, record: dict[str, Any] | None = None) -> dict[str, Any]:
    res, _ = _resources(ctx)
    person = Person.model_validate(record) if record else None
    try:
        outcome = await followups.create_follow_up(res.follow_up_deps(), person_id, person=person)
    except TwentyUnavailable as exc:
        await _retry_or_dead_letter(ctx, jobs.FOLLOW_UP, [person_id], exc)
        return {"person_id": person_id, "status": "unavailable", "error": str(exc)}
    if outcome.status == "failed":
        await deadletters.record(res.db, job_name=jobs.FOLLOW_UP, job_id=ctx["job_id"], args=[person_id],
                                 error=outcome.error or "failed", attempts=ctx["job_try"])  # fmt: skip
    return outcome.as_dict()


async def sla_check(ctx: dict[str, Any], task_id: str, round_: int) -> str:
    """A follow-up untouched for FOLLOW_UP_SLA_HOURS goes to the next member by the same rules."""
    res, _ = _resources(ctx)
    try:
        outcome = await followups.reassign_if_untouched(res.follow_up_deps(), task_id, round_)
    except TwentyUnavailable as exc:
        await _retry_or_dead_letter(ctx, jobs.SLA_CHECK, [task_id, round_], exc)
        return "unavailable"
    return outcome


async def auto_assign(ctx: dict[str, Any]) -> dict[str, Any]:
    """A follow-up for every person in Twenty without an open one, through the batch endpoints."""
    res, twenty = _resources(ctx)
    async with res.db.acquire() as conn:
        covered = await store.people_with_follow_ups(conn)
        stale = await store.stale_pending_follow_ups(conn)
    people = [person async for person in twenty.list_people() if person.id not in covered]
    try:
        outcome = await followups.create_follow_ups(res.follow_up_deps(), people)
        for person_id in stale:  # left pending by a crash or an outage: finish them (same task ids)
            resumed = await followups.create_follow_up(res.follow_up_deps(), person_id)
            (outcome.created if resumed.status == "created" else outcome.failed).append(resumed)
    except TwentyUnavailable as exc:
        await _retry_or_dead_letter(ctx, jobs.AUTO_ASSIGN, [], exc)
        return {"created": 0, "failed": 0, "details": [], "error": str(exc)}
    return outcome.as_dict()


async def sync_backlog(ctx: dict[str, Any]) -> dict[str, Any]:
    res, twenty = _resources(ctx)
    deps = res.follow_up_deps()

    async def follow_up(people: list[Person]) -> None:
        try:
            await followups.create_follow_ups(deps, people)
        except TwentyError as exc:  # the leads are synced; their follow-ups are resumed later (auto-assign)
            log.warning("sync.follow_ups_deferred people=%d error=%s", len(people), exc)

    async with res.db.acquire() as conn:
        due = await store.resumable_follow_ups(conn)
    for person_id in due:  # waited for an available member, or left pending: try again (same ids, no duplicate)
        await jobs.enqueue_follow_up(res.redis, person_id)
    if await res.redis.set("reactor:load:members-fresh", 1, nx=True, ex=MEMBERS_REFRESH_S):
        with contextlib.suppress(TwentyError):  # new or removed members become pickable within this period
            await assignees.refresh_members(twenty, res.cache, res.settings)
    result = await sync.sync_backlog(res.db, twenty, sync_options(res.settings), on_synced=follow_up)
    for failure in result.failed:
        await deadletters.record(res.db, job_name=jobs.SYNC_LEAD, job_id=jobs.sync_lead_job_id(failure["lead_id"]),
                                 args=[failure["lead_id"]], error=failure["error"], attempts=1)  # fmt: skip
    return result.as_dict()


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


async def _sweep_ticker(res: Resources) -> None:
    period = res.settings.sync_sweep_s
    while True:
        slot = int(time.time() // period)
        with contextlib.suppress(Exception):  # Redis down: the next tick tries again
            await jobs.enqueue(res.redis, jobs.SYNC_BACKLOG, job_id=f"sweep:{slot}")
        await asyncio.sleep((slot + 1) * period - time.time() + random.uniform(0, 0.5))


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


def build_worker(res: Resources, *, burst: bool = False, sweep: bool = True) -> Worker:
    settings = res.settings
    ticker: dict[str, asyncio.Task[None]] = {}

    async def startup(ctx: dict[str, Any]) -> None:
        if res.twenty is not None and not await res.cache.is_built():
            try:  # a first start (or a flushed Redis): count the loads once before assigning anything
                await assignees.refresh_members(res.twenty, res.cache, settings)
                await assignees.rebuild_loads(res.twenty, res.cache, settings)
            except TwentyError as exc:
                log.warning("worker.load_cache_not_built error=%s (assignments use the loads seen so far)", exc)
        if sweep:
            ticker["task"] = asyncio.create_task(_sweep_ticker(res))

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "task" in ticker:
            ticker["task"].cancel()

    return Worker(
        functions=[
            func(
                metrics.instrumented(jobs.SYNC_LEAD)(sync_lead),
                name=jobs.SYNC_LEAD,
                keep_result=SYNC_LEAD_KEEP_RESULT_S,
                max_tries=settings.sync_max_tries,
            ),
            func(
                metrics.instrumented(jobs.SYNC_BACKLOG)(sync_backlog),
                name=jobs.SYNC_BACKLOG,
                keep_result=BACKLOG_KEEP_RESULT_S,
                timeout=3600,
            ),
            func(
                metrics.instrumented(jobs.FOLLOW_UP)(create_follow_up),
                name=jobs.FOLLOW_UP,
                keep_result=SYNC_LEAD_KEEP_RESULT_S,
                max_tries=settings.sync_max_tries,
            ),
            func(
                metrics.instrumented(jobs.AUTO_ASSIGN)(auto_assign),
                name=jobs.AUTO_ASSIGN,
                keep_result=BACKLOG_KEEP_RESULT_S,
                timeout=3600,
            ),
            func(
                metrics.instrumented(jobs.SLA_CHECK)(sla_check),
                name=jobs.SLA_CHECK,
                keep_result=BACKLOG_KEEP_RESULT_S,
                max_tries=settings.sync_max_tries,
            ),
            func(
                metrics.instrumented(jobs.RECONCILE)(reconcile),
                name=jobs.RECONCILE,
                keep_result=BACKLOG_KEEP_RESULT_S,
                timeout=3600,
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
        max_jobs=20,
        job_timeout=300,
        health_check_interval=30,
        job_completion_wait=JOB_COMPLETION_WAIT_S,
    )


async def run(settings: Settings) -> int:
    if settings.worker_metrics_port:
        prometheus_client.start_http_server(settings.worker_metrics_port, registry=metrics.REGISTRY)
    async with open_resources(settings) as res:
        if problem := await _check_routing_config(res):
            print(f"reactor: invalid configuration:\n  {problem}", file=sys.stderr)
            return 2
        worker = build_worker(res)
        # On SIGTERM arq gives the jobs in flight JOB_COMPLETION_WAIT_S to finish; the rest are cancelled and
        # run again later (their leads are leased, never lost). Cancellation is how arq stops: not an error.
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await worker.async_run()
            finally:
                await worker.close()
    return 0
