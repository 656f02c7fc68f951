"""POST /reconcile (one run at a time) and GET /reconcile/{job_id} (status, progress, summary)."""

from __future__ import annotations

import uuid
from typing import Any

from arq.jobs import Job, JobStatus
from starlette.requests import Request
from starlette.responses import JSONResponse

from reactor import jobs, reconcile
from reactor.api.auth import authenticate
from reactor.api.endpoint import Endpoint
from reactor.errors import InvalidInput, JobNotFound
from reactor.resources import Resources


def _resources(request: Request) -> Resources:
    resources: Resources = request.state.resources
    authenticate(request, resources.settings.lead_api_keys)
    return resources


async def start(request: Request) -> JSONResponse:
    res = _resources(request)
    flag = request.query_params.get("dry_run", "false").lower()
    if flag not in {"true", "false", "1", "0"}:
        raise InvalidInput.field("dry_run", "must be true or false")
    run_id = f"{jobs.RECONCILE}:{uuid.uuid4().hex}"
    holder = await reconcile.acquire(res.redis, run_id)
    if holder is not None:
        return JSONResponse({"job_id": holder, "status": "already_running"}, status_code=200)
    try:
        await jobs.enqueue(res.redis, jobs.RECONCILE, flag in {"true", "1"}, job_id=run_id)
    except BaseException:
        await reconcile.release(res.redis, run_id)
        raise
    return JSONResponse({"job_id": run_id, "status": "queued"}, status_code=202)


async def status(request: Request) -> JSONResponse:
    res = _resources(request)
    run_id = request.path_params["job_id"]
    job = Job(run_id, res.redis)
    state = await job.status()
    progress = await reconcile.read_progress(res.redis, run_id)
    if state is JobStatus.not_found and progress is None:
        raise JobNotFound(f"no reconcile {run_id!r} (unknown, or its result has expired)")
    body: dict[str, Any] = {"job_id": run_id, "status": state.value, "progress": progress}
    if state is JobStatus.complete:
        info = await job.result_info()
        if info is not None:
            body["status"] = "complete" if info.success else "failed"
            body["summary" if info.success else "error"] = info.result if info.success else str(info.result)
    return JSONResponse(body)


routes = [
    Endpoint("/reconcile", start, methods=["POST"]),
    Endpoint("/reconcile/{job_id}", status, methods=["GET"]),
]
