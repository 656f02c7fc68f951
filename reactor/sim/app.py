"""The Twenty simulator: the part of Twenty's REST API reactor uses, with Twenty's envelopes, filters, cursor
pagination, error bodies, rate limit and webhooks, plus knobs for latency and faults.

    reactor sim --port 3000 --members 5 --tasks 20 --rate-limit 100 --error-rate 0.1 --drop-rate 0.3

With `legacy_task_targets` (`--legacy-task-targets`) it answers as the recorded 1.16-era server (e0d44920) does,
not only for task targets (`personId`): its metadata API refuses any query string, its groupBy refuses the join
column, a webhook without a secret is a 400, its throttler is the legacy one, and its messages are that server's.
Otherwise it follows CONTRACT.md (2.4x). tests/test_conformance.py replays every recording against it.

`GET /sim/state` shows the truth (open tasks per member, counts, delivery stats); `PATCH /sim/knobs` changes the
knobs of a running simulator.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reactor.sim.delivery import Deliverer, DeliveryKnobs
from reactor.sim.filters import FilterError, parse
from reactor.sim.state import PLURAL, SINGULAR, Rejected, Workspace, now
from reactor.sim.throttle import ContinuousThrottle, LegacyThrottle, Throttle

MAX_RECORDS = 200  # QUERY_MAX_RECORDS: page size cap and batch maximum
DEFAULT_LIMIT = 60
# As class-validator's isUUID (versions 1-5 and the RFC variant): the nil UUID is not one (rest/33).
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", re.IGNORECASE)
INVALID_PATH = "Valid examples: /rest/companies/id or /rest/companies or /rest/batch/companies"


@dataclass
class Knobs:
    latency_s: float = 0.0
    rate_limit: int | None = None  # record calls per rate_window_s; None: unlimited
    rate_window_s: float = 60.0
    rate_limiter: str | None = None  # "legacy" (Twenty's throttler) or "continuous"; None: as the server profile
    error_rate: float = 0.0  # share of record calls answered 500 (before doing anything)
    delivery: DeliveryKnobs = field(default_factory=DeliveryKnobs)


def create_sim(
    *, token: str, members: int = 3, open_tasks: int = 0, knobs: Knobs | None = None, seed: int | None = None,
    legacy_task_targets: bool = False, custom_person_fields: set[str] | None = None,
    delivery_transport: httpx.AsyncBaseTransport | None = None, clock: Callable[[], float] = time.monotonic,
) -> Starlette:  # fmt: skip
    legacy = legacy_task_targets  # the 1.16-era server's shapes, not only its task targets
    workspace = Workspace(custom_person_fields=custom_person_fields or set(), legacy_task_targets=legacy)
    workspace.seed(members, open_tasks)
    knobs = knobs or Knobs()
    rng = random.Random(seed)
    throttles: dict[str, Throttle] = {"legacy": LegacyThrottle(clock), "continuous": ContinuousThrottle(clock)}
    calls: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        deliverer = Deliverer(workspace, knobs.delivery, rng=rng, transport=delivery_transport)
        app.state.deliverer = deliverer
        yield
        await deliverer.close()

    def error(status: int, message: str, name: str = "BadRequestException", **headers: str) -> JSONResponse:
        return JSONResponse({"statusCode": status, "error": name, "messages": [message]}, status, headers=headers)

    async def guard(request: Request, *, record_call: bool = True) -> Response | None:
        """Auth, latency, the rate limit and injected 5xx, in Twenty's order."""
        if knobs.latency_s:
            await asyncio.sleep(knobs.latency_s)
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if not presented:
            return error(403, "Missing authentication token", "FORBIDDEN_EXCEPTION")
        if scheme.lower() != "bearer" or not secrets.compare_digest(presented, token):
            # A key that is not a JWT at all has no payload to read (rest/36); a JWT that does not verify is invalid.
            return error(401, "Token invalid." if presented.count(".") == 2 else "No payload", "UNAUTHENTICATED")
        if not record_call:
            return None
        calls[f"{request.method} {request.url.path}"] += 1
        kind = knobs.rate_limiter or ("legacy" if legacy else "continuous")
        if knobs.rate_limit is not None and (refused := throttles[kind].take(knobs.rate_limit, knobs.rate_window_s)):
            calls["429"] += 1
            return error(429, refused, "HttpException")
        if knobs.error_rate and rng.random() < knobs.error_rate:
            calls["5xx"] += 1
            return error(500, "Internal server error", "InternalServerErrorException")
        return None

    def matcher(obj: str, text: str | None) -> tuple[Any, bool]:
        return parse(text, workspace.fields(obj)) if text else ((lambda record: True), False)

    def obj_of(request: Request) -> str:
        plural = request.path_params["objects"]
        if plural not in SINGULAR:
            if legacy:
                raise Rejected(400, f"object '{plural}' not found. eg: companies")
            raise Rejected(400, f"object '{plural}' not found. Did you mean '{PLURAL.get(plural, 'people')}'?")
        return SINGULAR[plural]

    def id_of(request: Request) -> str:
        record_id: str = request.path_params["id"]
        if not _UUID.match(record_id):
            raise Rejected(400, f"'{record_id}' is not a valid UUID")
        return record_id

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body() or b"null")
        except json.JSONDecodeError:
            raise Rejected(400, "Invalid JSON body") from None

    async def find_many(request: Request) -> Response:
        if failure := await guard(request):
            return failure
        obj = obj_of(request)
        params = request.query_params
        try:
            limit = min(int(params.get("limit", DEFAULT_LIMIT)), MAX_RECORDS)
        except ValueError:
            raise Rejected(400, f"limit '{params.get('limit')}' is invalid. Should be an integer") from None
        predicate, mentions_deleted = matcher(obj, params.get("filter"))
        rows = [
            r for r in workspace.tables[obj].values() if (mentions_deleted or not r.get("deletedAt")) and predicate(r)
        ]
        rows.sort(key=lambda r: r["id"])
        after = params.get("starting_after")
        start = 0
        if after:
            try:
                last = json.loads(base64.b64decode(after))["id"]
            except (ValueError, KeyError, TypeError):
                raise Rejected(400, f"Invalid cursor: {after}") from None
            start = next((i for i, r in enumerate(rows) if r["id"] > last), len(rows))
        page = rows[start : start + limit]
        cursor = [base64.b64encode(json.dumps({"id": r["id"]}).encode()).decode() for r in page[:1] + page[-1:]]
        info = {"hasNextPage": start + limit < len(rows), "hasPreviousPage": start > 0,
                "startCursor": cursor[0] if cursor else None, "endCursor": cursor[-1] if cursor else None}  # fmt: skip
        return JSONResponse({"data": {PLURAL[obj]: page}, "totalCount": len(rows), "pageInfo": info})

    async def find_one(request: Request) -> Response:
        if failure := await guard(request):
            return failure
        obj = obj_of(request)
        return JSONResponse({"data": {obj: workspace.get(obj, id_of(request))}})

    async def create(request: Request) -> Response:
        if failure := await guard(request):
            return failure
        obj = obj_of(request)
        data = await body_of(request)
        upsert = request.query_params.get("upsert") == "true"
        record = workspace.upsert(obj, data) if upsert else workspace.create(obj, data)
        return JSONResponse({"data": {f"create{obj[0].upper()}{obj[1:]}": record}}, 201)

    async def create_many(request: Request) -> Response:
        if failure := await guard(request):
            return failure
        obj = obj_of(request)
        data = await body_of(request)
        if not isinstance(data, list):
            raise Rejected(400, "Body must be an array of records")
        if len(data) > MAX_RECORDS:
            raise Rejected(400, f"Maximum number of records to upsert is {MAX_RECORDS}.")
        upsert = request.query_params.get("upsert") == "true"
        for item in data:  # the whole batch is one write: one bad record fails it all
            workspace.validate(obj, item)
            if not upsert and item.get("id") in workspace.tables[obj]:
                raise Rejected(400, workspace.duplicate_message("id"))
        emails = [((item.get("emails") or {}).get("primaryEmail") or "").lower() for item in data if obj == "person"]
        if len([e for e in emails if e]) != len({e for e in emails if e}):
            raise Rejected(400, workspace.duplicate_message("emails"))
        saved = [workspace.upsert(obj, item) if upsert else workspace.create(obj, item) for item in data]
        return JSONResponse({"data": {f"create{PLURAL[obj][0].upper()}{PLURAL[obj][1:]}": saved}}, 201)

    async def update(request: Request) -> Response:
        if failure := await guard(request):
            return failure
        obj = obj_of(request)
        record = workspace.update(obj, id_of(request), await body_of(request))
        return JSONResponse({"data": {f"update{obj[0].upper()}{obj[1:]}": record}})

    async def delete(request: Request) -> Response:
        if failure := await guard(request):
            return failure
        obj = obj_of(request)
        soft = request.query_params.get("soft_delete") == "true"  # a plain DELETE destroys
        record = workspace.delete(obj, id_of(request), soft=soft)
        return JSONResponse({"data": {f"delete{obj[0].upper()}{obj[1:]}": {"id": record["id"]}}})

    async def restore(request: Request) -> Response:
        if failure := await guard(request):
            return failure
        obj = obj_of(request)
        record = workspace.restore(obj, id_of(request))
        return JSONResponse({"data": {f"restore{obj[0].upper()}{obj[1:]}": record}})

    async def group_by(request: Request) -> Response:
        if failure := await guard(request):
            return failure
        obj = obj_of(request)
        dimension = group_by_column(obj, request.query_params.get("group_by", "[]"))
        predicate, mentions_deleted = matcher(obj, request.query_params.get("filter"))
        groups = Counter(r.get(dimension) for r in workspace.tables[obj].values()
                         if (mentions_deleted or not r.get("deletedAt")) and predicate(r))  # fmt: skip
        limit = min(int(request.query_params.get("limit", 50)), MAX_RECORDS)
        return JSONResponse([{"groupByDimensionValues": [value], "totalCount": str(count)}
                             for value, count in groups.most_common(limit)])  # fmt: skip

    def group_by_column(obj: str, text: str) -> str:
        """The column of a one-dimension group_by: the relation form `[{"assignee":{"id":true}}]` or the join
        column `[{"assigneeId":true}]`; the 1.16-era server reads the latter as a relation and fails (rest/55)."""
        try:
            [item] = json.loads(text)
            [(name, selection)] = item.items()
        except (ValueError, TypeError, AttributeError):
            raise Rejected(400, "group_by must be a JSON array with one field") from None
        column = f"{name}Id" if isinstance(selection, dict) and selection.get("id") is True else name
        if column not in workspace.fields(obj):
            raise FilterError(f"Field metadata not found for field: {name}")
        if legacy and column == name and name.endswith("Id"):
            raise Rejected(400, f"column {obj}.{name.removesuffix('Id')} does not exist")
        return column

    async def metadata(request: Request) -> Response:
        if failure := await guard(request, record_call=False):
            return failure
        if legacy and request.url.query:  # the query string is read as part of the metadata path (rest/53)
            path = f"objects?{request.url.query}"
            return JSONResponse({"message": f"Query path '/rest/metadata/{path}' invalid. Metadata path \"{path}\" "
                                 "does not exist. Valid examples: /rest/metadata/fields or /rest/metadata/objects",
                                 "error": "Bad Request", "statusCode": 400}, 400)  # fmt: skip
        objects = [{"nameSingular": obj, "namePlural": PLURAL[obj],
                    "fields": [{"name": name.removesuffix("Id")} if name.endswith("Id") and name != "id" else
                               {"name": name} for name in sorted(workspace.fields(obj))]}
                   for obj in ("person", "task", "taskTarget", "workspaceMember")]  # fmt: skip
        info = {"hasNextPage": False, "startCursor": None, "endCursor": None}
        return JSONResponse({"data": {"objects": objects}, "pageInfo": info, "totalCount": None})

    async def webhooks(request: Request) -> Response:
        if failure := await guard(request, record_call=False):  # webhook admin is not throttled
            return failure
        hook_id = request.path_params.get("id")
        if request.method == "GET":
            return JSONResponse([h for h in workspace.webhooks.values()] if hook_id is None else
                                workspace.webhooks.get(hook_id) or {})  # fmt: skip
        if request.method == "DELETE":
            return JSONResponse(workspace.webhooks.pop(hook_id or "", None) is not None)
        data = await body_of(request)
        if request.method == "POST":
            if not data.get("targetUrl") or not isinstance(data.get("operations"), list):
                raise Rejected(400, "targetUrl and operations are required")
            if legacy and not data.get("secret"):  # generated only from 1.17 on (rest/23)
                raise Rejected(400, 'null value in column "secret" of relation "webhook" violates not-null constraint')
            hook = {"id": data.get("id") or secrets.token_hex(16), "workspaceId": "sim", "targetUrl": data["targetUrl"],
                    "operations": data["operations"], "description": data.get("description"),
                    "secret": data.get("secret") or secrets.token_hex(32), "createdAt": now(), "updatedAt": now(),
                    "deletedAt": None}  # fmt: skip
            workspace.webhooks[hook["id"]] = hook
            return JSONResponse(hook, 201)
        existing = workspace.webhooks.get(hook_id or "")
        if existing is None:
            raise Rejected(404, "Webhook not found", "NotFoundException")
        hook = existing
        hook.update({k: v for k, v in data.items() if k in ("targetUrl", "operations", "description", "secret")})
        return JSONResponse(hook)

    async def sim_state(request: Request) -> Response:
        tasks = [t for t in workspace.tables["task"].values() if not t.get("deletedAt")]
        open_by_member = Counter(t["assigneeId"] for t in tasks if t["status"] == "TODO" and t["assigneeId"])
        return JSONResponse({
            "counts": {obj: len(rows) for obj, rows in workspace.tables.items()},
            "open_tasks_by_member": dict(open_by_member),
            "members": list(workspace.tables["workspaceMember"]),
            "calls": dict(calls), "deliveries": dict(request.app.state.deliverer.stats),
            "knobs": asdict(knobs),
        })  # fmt: skip

    async def sim_knobs(request: Request) -> Response:
        data = await body_of(request)
        for name in ("latency_s", "rate_limit", "rate_window_s", "rate_limiter", "error_rate"):
            if name in data:
                setattr(knobs, name, data[name])
        for name in ("drop_rate", "duplicate_rate", "reorder_s"):
            if name in data:
                setattr(knobs.delivery, name, data[name])
        return JSONResponse(asdict(knobs))

    async def sim_people(request: Request) -> Response:
        return JSONResponse(list(workspace.tables[request.path_params["obj"]].values()))

    async def invalid_path(request: Request) -> Response:
        if failure := await guard(request, record_call=False):
            return failure
        return error(400, f"Query path '{request.url.path}' invalid. {INVALID_PATH}")

    async def rejected(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Rejected | FilterError)
        if isinstance(exc, FilterError):
            return error(400, str(exc))
        return error(exc.status, str(exc), exc.error)

    routes = [
        Route("/rest/batch/{objects}", create_many, methods=["POST"]),
        Route("/rest/metadata/objects", metadata, methods=["GET"]),
        Route("/rest/webhooks", webhooks, methods=["GET", "POST"]),
        Route("/rest/webhooks/{id}", webhooks, methods=["GET", "PATCH", "DELETE"]),
        Route("/rest/metadata/webhooks", webhooks, methods=["GET", "POST"]),
        Route("/rest/metadata/webhooks/{id}", webhooks, methods=["GET", "PATCH", "DELETE"]),
        Route("/rest/{objects}/groupBy", group_by, methods=["GET"]),
        Route("/rest/{objects}", find_many, methods=["GET"]),
        Route("/rest/{objects}", create, methods=["POST"]),
        Route("/rest/{objects}/{id}/restore", restore, methods=["PATCH"]),
        Route("/rest/{objects}/{id}", find_one, methods=["GET"]),
        Route("/rest/{objects}/{id}", update, methods=["PATCH", "PUT"]),
        Route("/rest/{objects}/{id}", delete, methods=["DELETE"]),
        Route("/rest/{path:path}", invalid_path, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
        Route("/sim/state", sim_state, methods=["GET"]),
        Route("/sim/knobs", sim_knobs, methods=["PATCH"]),
        Route("/sim/records/{obj}", sim_people, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={Rejected: rejected, FilterError: rejected})  # fmt: skip
    app.state.workspace = workspace
    app.state.knobs = knobs
    app.state.calls = calls
    return app
