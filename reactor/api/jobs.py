"""Job routes: POST /sync-crm (the backlog sync), GET /jobs/failed (dead letters), GET /jobs/{job_id}."""

from __future__ import annotations

import uuid
from typing import Any

from arq.jobs import Job, JobStatus
from starlette.requests import Request
from starlette.responses import JSONResponse

from reactor import jobs, store
from reactor.api.auth import authenticate
from reactor.api.endpoint import Endpoint
from reactor.api.inputs import int_param
from reactor.errors import JobNotFound
from reactor.resources import Resources


def _resources(request: Request) -> Resources:
    resources: Resources = request.state.resources
    authenticate(request, resources.settings.lead_api_keys)
    return resources


async def sync_crm(request: Request) -> JSONResponse:
    res = _resources(request)
    job_id = f"{jobs.SYNC_BACKLOG}:{uuid.uuid4().hex}"
    await jobs.enqueue(res.redis, jobs.SYNC_BACKLOG, job_id=job_id)
    return JSONResponse({"job_id": job_id, "status": "queued"}, status_code=202)


async def auto_assign(request: Request) -> JSONResponse:
    res = _resources(request)
    job_id = f"{jobs.AUTO_ASSIGN}:{uuid.uuid4().hex}"
    await jobs.enqueue(res.redis, jobs.AUTO_ASSIGN, job_id=job_id)
    return JSONResponse({"job_id": job_id, "status": "queued"}, status_code=202)


async def job_status(request: Request) -> JSONResponse:
    res = _resources(request)
    job_id = request.path_params["job_id"]
    job = Job(job_id, res.redis)
    status = await job.status()
    if status is JobStatus.not_found:
        raise JobNotFound(f"no job {job_id!r} (unknown, or its result has expired)")
    body: dict[str, Any] = {"job_id": job_id, "status": status.value}
    if status is JobStatus.complete:
        info = await job.result_info()
        if info is not None:
            body["function"] = info.function
            body["finished_at"] = info.finish_time.isoformat()
            if info.success:
                body["result"] = info.result
            else:
                body["status"] = "failed"
                body["error"] = f"{type(info.result).__name__}: {info.result}"
    return JSONResponse(body)


async def failed_jobs(request: Request) -> JSONResponse:
    res = _resources(request)
    limit = int_param(request, "limit", default=50, low=1, high=500)
    async with res.db.acquire() as conn:
        rows = await store.list_failed_jobs(conn, limit=limit)
    return JSONResponse(
        {
            "failed": [
                {
                    "id": row["id"],
                    "job_name": row["job_name"],
                    "job_id": row["job_id"],
                    "args": row["args"],
                    "error": row["error"],
                    "attempts": row["attempts"],
                    "failed_at": row["failed_at"].isoformat(),
                }
                for row in rows
            ]
        }
    )


routes = [
    Endpoint("/sync-crm", sync_crm, methods=["POST"]),
    Endpoint("/tasks/auto-assign", auto_assign, methods=["POST"]),
    Endpoint("/jobs/failed", failed_jobs, methods=["GET"]),
    Endpoint("/jobs/{job_id}", job_status, methods=["GET"]),
]
