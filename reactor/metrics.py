"""Prometheus metrics. Each process counts what it does (the web process: leads and webhooks; the worker: jobs and
Twenty calls) in its own registry; fleet-wide state (member loads, queue depth, the last reconcile) is read from
Redis when /metrics is scraped, so any web process reports it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from functools import wraps
from typing import Any, TypeVar

from arq import Retry
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()

LEADS = Counter("reactor_leads_received", "POST /leads by outcome (created, existing, rejected) and lead source",
                ["outcome", "source"], registry=REGISTRY)  # fmt: skip
INTAKE_BATCH = Histogram("reactor_intake_batch_size", "Submissions POST /leads wrote together in one statement",
                         registry=REGISTRY, buckets=(1, 2, 5, 10, 25, 50, 100))  # fmt: skip
INTAKE_REWRITTEN = Counter("reactor_intake_batches_rewritten",
                           "Intake batches that failed and were written one by one, by error", ["error"],
                           registry=REGISTRY)  # fmt: skip
WEBHOOKS = Counter("reactor_webhook_events", "Twenty webhook deliveries by event name and outcome",
                   ["event", "outcome"], registry=REGISTRY)  # fmt: skip
JOBS = Counter("reactor_jobs", "arq jobs by name and outcome (ok, retry, failed)", ["job", "outcome"],
               registry=REGISTRY)  # fmt: skip
JOB_SECONDS = Histogram("reactor_job_duration_seconds", "arq job durations", ["job"], registry=REGISTRY,
                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))  # fmt: skip
TWENTY_CALLS = Counter("reactor_twenty_calls", "Calls to Twenty by operation and HTTP status (or timeout, error)",
                       ["operation", "status"], registry=REGISTRY)  # fmt: skip
TWENTY_RETRIES = Counter("reactor_twenty_retries", "Retried calls to Twenty by reason", ["reason"], registry=REGISTRY)
RATE_LIMIT_WAIT = Counter("reactor_twenty_rate_limit_wait_seconds", "Time spent waiting for the shared rate limit",
                          registry=REGISTRY)  # fmt: skip
TWENTY_RATE = Gauge("reactor_twenty_rate_per_minute", "The pace of calls to Twenty the fleet has learnt (shared)",
                    registry=REGISTRY)  # fmt: skip
DRAINED = Counter("reactor_drained", "Items the drain loop finished, by kind (lead, follow_up) and outcome (synced, "
                  "suppressed, opened, failed, waiting)", ["kind", "outcome"], registry=REGISTRY)  # fmt: skip
MEMBER_LOAD = Gauge("reactor_member_load", "Open tasks per workspace member, as the load cache has them",
                    ["member"], registry=REGISTRY)  # fmt: skip
QUEUE_DEPTH = Gauge("reactor_queue_depth", "Jobs waiting in the arq queue", registry=REGISTRY)
FAILED_JOBS = Gauge("reactor_failed_jobs_pending", "Dead letters not yet replayed", registry=REGISTRY)
RECONCILE_DRIFT = Gauge("reactor_reconcile_drift_members", "Members whose load the last reconcile corrected",
                        registry=REGISTRY)  # fmt: skip
RECONCILE_AT = Gauge("reactor_reconcile_last_run_timestamp_seconds", "When the last reconcile finished",
                     registry=REGISTRY)  # fmt: skip

_ID = re.compile(r"/[0-9a-fA-F-]{16,}|/\d+")
LAST_RECONCILE_KEY = "reactor:reconcile:last"


def operation(method: str, path: str) -> str:
    """`GET /tasks/{id}`: ids folded, so the label has a handful of values."""
    return f"{method} {_ID.sub('/{id}', path.split('?', 1)[0])}"


def render() -> bytes:
    return generate_latest(REGISTRY)


async def refresh_fleet(redis: Any, db: Any, loads: Mapping[str, int]) -> None:
    """Set the fleet-wide gauges (loads, queue, dead letters, last reconcile) just before a scrape."""
    MEMBER_LOAD.clear()
    for member, count in loads.items():
        MEMBER_LOAD.labels(member).set(int(count))
    QUEUE_DEPTH.set(await redis.zcard("arq:queue"))
    async with db.acquire() as conn:
        FAILED_JOBS.set(await conn.fetchval("SELECT count(*) FROM failed_jobs WHERE replayed_at IS NULL"))
    last = await redis.get(LAST_RECONCILE_KEY)
    if last:
        report = json.loads(last)
        RECONCILE_DRIFT.set(len(report.get("drift", {})))
        RECONCILE_AT.set(report.get("finished_at", 0))


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_OUTCOME: ContextVar[list[str] | None] = ContextVar("reactor_job_outcome", default=None)


def job_failed() -> None:
    """Count the running job as `failed` although it returns normally: it gave its work up to a dead letter."""
    outcome = _OUTCOME.get()
    if outcome is not None:
        outcome[0] = "failed"


def instrumented(job: str) -> Callable[[F], F]:
    """Count an arq job's outcome and time it."""

    def decorate(func: F) -> F:
        @wraps(func)
        async def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            outcome = "failed"
            returned = ["ok"]  # job_failed() turns it into "failed"
            token = _OUTCOME.set(returned)
            try:
                result = await func(*args, **kwargs)
                outcome = returned[0]
                return result
            except Retry:
                outcome = "retry"
                raise
            finally:
                _OUTCOME.reset(token)
                JOBS.labels(job, outcome).inc()
                JOB_SECONDS.labels(job).observe(time.perf_counter() - started)

        return run  # type: ignore[return-value]

    return decorate
