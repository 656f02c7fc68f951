"""Lead routes: POST /leads, GET /leads, GET /leads/search, GET /leads/{lead_id}. All need a source's API key.

GET /leads/{lead_id} takes reactor's id or the calling source's own id for the lead."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from reactor import intake, metrics
from reactor.api.auth import authenticate
from reactor.api.endpoint import Endpoint
from reactor.api.inputs import int_param, read_json, text_param
from reactor.errors import InvalidInput, LeadNotFound, ReactorError
from reactor.models import LeadIn, LeadList, LeadPage
from reactor.normalize import normalize_email, normalize_phone
from reactor.resources import Resources

MAX_PAGE = 200
MAX_SEARCH = 50


def _resources(request: Request) -> Resources:
    resources: Resources = request.scope["state"]["resources"]  # request.state copies the mapping each time
    return resources


def _json(model: Any, status: int = 200) -> Response:
    # Serialised straight from the model by pydantic-core: no second validation, no dict in between.
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


async def create_lead(request: Request) -> Response:
    """POST /leads. The stored lead is pending: the drain pushes it (no job is enqueued)."""
    res = _resources(request)
    api_source = authenticate(request, res.settings.lead_api_keys)
    try:
        payload = await read_json(request)
        if not isinstance(payload, dict):
            raise InvalidInput.field("(body)", "must be a JSON object")
        try:
            lead = LeadIn.model_validate(payload, context={"phone_region": res.settings.default_phone_region})
        except ValidationError as exc:
            raise InvalidInput.from_validation(exc) from None
    except ReactorError:
        metrics.LEADS.labels("rejected", api_source).inc()
        raise
    result = await res.submissions.submit(lead, api_source=api_source, payload=payload)
    status = "created" if result.created else "existing"
    metrics.LEADS.labels(status, api_source).inc()
    answer = {"status": status, "lead_id": result.lead_id, "source_lead_id": lead.lead_id}  # LeadAccepted
    return JSONResponse(answer, 201 if result.created else 200)


async def list_leads(request: Request) -> Response:
    res = _resources(request)
    authenticate(request, res.settings.lead_api_keys)
    limit = int_param(request, "limit", default=50, low=1, high=MAX_PAGE)
    cursor = text_param(request, "cursor")
    try:
        before = intake.decode_cursor(cursor) if cursor else None
    except ValueError as exc:
        raise InvalidInput.field("cursor", str(exc)) from None
    leads, next_cursor = await intake.page(res.db, limit=limit, before=before)
    return _json(LeadPage(leads=leads, next_cursor=next_cursor))


async def search_leads(request: Request) -> Response:
    res = _resources(request)
    authenticate(request, res.settings.lead_api_keys)
    email, phone, name = (text_param(request, key) for key in ("email", "phone", "name"))
    if not (email or phone or name):
        raise InvalidInput.field("(query)", "give at least one of email, phone or name")
    problems = []
    try:
        email = normalize_email(email) if email else None
    except ValueError as exc:
        problems.append({"field": "email", "message": str(exc)})
    try:
        phone = normalize_phone(phone, res.settings.default_phone_region) if phone else None
    except ValueError as exc:
        problems.append({"field": "phone", "message": str(exc)})
    if problems:
        raise InvalidInput(problems)
    limit = int_param(request, "limit", default=MAX_SEARCH, low=1, high=MAX_SEARCH)
    leads = await intake.search(res.db, email=email, phone=phone, name=name, limit=limit)
    return _json(LeadList(leads=leads))


async def get_lead(request: Request) -> Response:
    res = _resources(request)
    api_source = authenticate(request, res.settings.lead_api_keys)
    lead_id = request.path_params["lead_id"]
    lead = await intake.get(res.db, lead_id, api_source=api_source)
    if lead is None:
        raise LeadNotFound(f"no lead with id {lead_id!r}")
    return _json(lead)


routes = [
    Endpoint("/leads", create_lead, methods=["POST"]),
    Endpoint("/leads", list_leads, methods=["GET"]),
    Endpoint("/leads/search", search_leads, methods=["GET"]),
    Endpoint("/leads/{lead_id}", get_lead, methods=["GET"]),
]
