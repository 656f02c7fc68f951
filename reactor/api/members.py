"""Routing's API: GET /members, GET/PUT /members/{id}/availability, GET /assignments?person_id=."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from reactor import assignees, routing
from reactor.api.auth import authenticate
from reactor.api.endpoint import Endpoint
from reactor.api.inputs import int_param, read_json, text_param
from reactor.errors import InvalidInput, ReactorError
from reactor.resources import Resources


class MemberNotFound(ReactorError):
    status, code = 404, "member_not_found"


def _resources(request: Request) -> Resources:
    resources: Resources = request.state.resources
    authenticate(request, resources.settings.lead_api_keys)
    return resources


async def _known_member(res: Resources, member_id: str) -> None:
    if member_id not in await res.cache.names() and member_id not in await res.cache.members():
        raise MemberNotFound(f"no workspace member {member_id!r} (GET /members lists them)")


async def list_members(request: Request) -> JSONResponse:
    res = _resources(request)
    names, weights, loads = (
        await res.cache.names(),
        await res.cache.members(),
        await assignees.member_loads(res.db, res.cache, res.settings),
    )
    availability = await routing.read_availability(res.db)
    now = dt.datetime.now(dt.UTC)
    members: list[dict[str, Any]] = []
    for member_id in sorted(names.keys() | weights.keys()):
        rules = availability.get(member_id)
        members.append({
            "id": member_id, "name": names.get(member_id), "eligible": member_id in weights,
            "weight": weights.get(member_id), "load": loads.get(member_id, 0),
            "cap": rules.max_open_tasks if rules and rules.max_open_tasks is not None else
            (res.settings.member_max_open_tasks or None),
            "unavailable": rules.unavailable(now) if rules else None,
            "availability": rules.model_dump(mode="json") if rules else None,
        })  # fmt: skip
    return JSONResponse({"members": members})


async def get_availability(request: Request) -> JSONResponse:
    res = _resources(request)
    member_id = request.path_params["member_id"]
    await _known_member(res, member_id)
    rules = (await routing.read_availability(res.db)).get(member_id) or routing.Availability.model_validate({})
    return JSONResponse({"member_id": member_id, **rules.model_dump(mode="json")})


async def put_availability(request: Request) -> JSONResponse:
    res = _resources(request)
    member_id = request.path_params["member_id"]
    await _known_member(res, member_id)
    try:
        rules = routing.Availability.model_validate(await read_json(request))
    except ValidationError as exc:
        raise InvalidInput.from_validation(exc) from None
    await routing.save_availability(res.db, member_id, rules)
    return JSONResponse({"member_id": member_id, **rules.model_dump(mode="json")})


async def list_assignments(request: Request) -> JSONResponse:
    res = _resources(request)
    person_id = text_param(request, "person_id", max_length=100)
    limit = int_param(request, "limit", default=50, low=1, high=500)
    return JSONResponse({"assignments": await routing.recent_decisions(res.db, person_id=person_id, limit=limit)})


routes = [
    Endpoint("/members", list_members, methods=["GET"]),
    Endpoint("/members/{member_id}/availability", get_availability, methods=["GET"]),
    Endpoint("/members/{member_id}/availability", put_availability, methods=["PUT"]),
    Endpoint("/assignments", list_assignments, methods=["GET"]),
]
