"""The ceiling `bench/intake.py --ceiling` measures beside reactor: the bare stack reactor is built on, doing the
least an intake can. Starlette, one asyncpg pool, one `INSERT … ON CONFLICT DO NOTHING` per request; no
authentication, validation, normalisation, merge or submission record. bench/intake.py serves it the way
`reactor web` serves (uvicorn with httptools and uvloop, no access log), so the ratio measures reactor's own work.

    uvicorn bench.ceiling_intake:app   (DATABASE_URL: a database migrated with schema.sql)
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_INSERT = """INSERT INTO leads (lead_id, email, phone, first_name, last_name, api_source)
             VALUES ($1, $2, $3, $4, $5, 'ceiling') ON CONFLICT DO NOTHING"""


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1,
                                               max_size=int(os.environ.get("DB_POOL_SIZE", "10")))  # fmt: skip
    yield
    await app.state.pool.close()


async def create_lead(request: Request) -> Response:
    body = json.loads(await request.body())
    lead_id = f"ld_{uuid.uuid4().hex}"
    await request.app.state.pool.execute(_INSERT, lead_id, body.get("email"), body.get("phone"),
                                         body.get("first_name"), body.get("last_name"))  # fmt: skip
    return JSONResponse({"status": "created", "lead_id": lead_id}, status_code=201)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/leads", create_lead, methods=["POST"]), Route("/healthz", healthz)], lifespan=lifespan)
