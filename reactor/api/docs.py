"""GET /openapi.json, generated from the pydantic models, and GET /docs, Swagger UI 5 (which reads OpenAPI 3.1)
served from a package (swagger-ui-py) so it works offline."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui.utils import SWAGGER_UI_PY_ROOT

from reactor.api.endpoint import Endpoint
from reactor.models import LeadAccepted, LeadIn, LeadList, LeadPage
from reactor.routing import Availability

ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {}},
    "required": ["error", "detail"],
}
READY_SCHEMA = {
    "type": "object",
    "properties": {"status": {"enum": ["ready", "not_ready"]}, "checks": {"type": "object"}},
    "required": ["status", "checks"],
}
READY_OR_ERROR = {"anyOf": [READY_SCHEMA, {"$ref": "#/components/schemas/Error"}]}
KEY_SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "malformed JSON, or an event of the wrong shape",
        401: "missing or invalid API key (or webhook signature)",
        404: "not found",
        408: "the body did not arrive in time (10 s)",
        413: "body over its limit (64 KiB; webhooks 512 KiB)",
        415: "not application/json",
        422: "invalid input: every bad field listed (a NUL anywhere in the URL included)",
        503: "PostgreSQL or Redis unavailable, or no answer within 30 s: retry after Retry-After seconds",
    }
    return {str(s): _error(reasons[s], s) for s in statuses}


def _error(description: str, status: int) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": _content({"$ref": "#/components/schemas/Error"})}
    if status == 503:
        answer["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
    return answer


# What the edge can answer whatever the route (reactor.app.Edge, reactor.api.inputs), added to every operation so
# the document lists every status each route can give.
_ANY_ROUTE = (422, 503)
_READS_A_BODY = (400, 408, 413, 415, 422)


def _every_status(document: dict[str, Any]) -> dict[str, Any]:
    for path, operations in document["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            statuses: tuple[int, ...] = (422,) if path == "/healthz" else _ANY_ROUTE
            if "requestBody" in operation:
                statuses += _READS_A_BODY
            for status in statuses:
                responses.setdefault(str(status), _errors(status)[str(status)])
    return document


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def build_openapi() -> dict[str, Any]:
    return _with_answers(_every_status(_document()))


def _document() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "serialization") for m in (LeadAccepted, LeadPage, LeadList)]
        + [(LeadIn, "validation"), (Availability, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schemas = defs.get("$defs", {})
    schemas["Error"] = ERROR_SCHEMA
    lead_ref = {"$ref": "#/components/schemas/Lead"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "reactor", "version": "0.1.0", "description": "Lead intake for Twenty CRM."},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "paths": {
            "/leads": {
                "post": {
                    "summary": "Submit a lead (deduplicated by email, then phone, then lead_id)",
                    "security": KEY_SECURITY,
                    "requestBody": {"required": True, "content": _content(_ref(LeadIn))},
                    "responses": {
                        "201": {"description": "a new lead", "content": _content(_ref(LeadAccepted))},
                        "200": {"description": "an existing lead", "content": _content(_ref(LeadAccepted))},
                        **_errors(400, 401, 413, 415, 422),
                    },
                },
                "get": {
                    "summary": "Leads, newest first",
                    "security": KEY_SECURITY,
                    "parameters": [
                        _query("limit", "page size", {"type": "integer", "minimum": 1, "maximum": 200}),
                        _query("cursor", "next_cursor of the previous page", {"type": "string"}),
                    ],
                    "responses": {
                        "200": {"description": "a page", "content": _content(_ref(LeadPage))},
                        **_errors(401, 422),
                    },
                },
            },
            "/leads/search": {
                "get": {
                    "summary": "Find leads by phone (normalised), email or name (first, last or full)",
                    "security": KEY_SECURITY,
                    "parameters": [
                        _query("email", "", {"type": "string"}),
                        _query("phone", "any format; matched as E.164", {"type": "string"}),
                        _query("name", "case-insensitive", {"type": "string"}),
                        _query("limit", "at most 50", {"type": "integer", "minimum": 1, "maximum": 50}),
                    ],
                    "responses": {
                        "200": {"description": "matches, newest first", "content": _content(_ref(LeadList))},
                        **_errors(401, 422),
                    },
                }
            },
            "/leads/{lead_id}": {
                "get": {
                    "summary": "One lead with its CRM state",
                    "security": KEY_SECURITY,
                    "parameters": [{"name": "lead_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {"description": "the lead", "content": _content(lead_ref)},
                        **_errors(401, 404),
                    },
                }
            },
            **_operations_paths(),
            "/healthz": {"get": {"summary": "Process is up", "responses": {"200": {"description": "up"}}}},
            "/readyz": {
                "get": {
                    "summary": "PostgreSQL and Redis reachable",
                    "responses": {
                        "200": {"description": "ready", "content": _content(READY_SCHEMA)},
                        "503": {"description": "not ready", "content": _content(READY_OR_ERROR)},
                    },
                }
            },
        },
    }


def _op(summary: str, *errors: int, ok: str = "200", params: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None, security: bool = True) -> dict[str, Any]:  # fmt: skip
    operation: dict[str, Any] = {"summary": summary, "responses": {ok: {"description": "done"}, **_errors(*errors)}}
    if security:
        operation["security"] = KEY_SECURITY
    if params:
        operation["parameters"] = params
    if body:
        operation["requestBody"] = {"required": True, "content": _content(body)}
    return operation


def _with(operation: dict[str, Any], status: str, description: str) -> dict[str, Any]:
    operation["responses"][status] = {"description": description}
    return operation


def _dashboard() -> dict[str, Any]:
    html = {"text/html": {"schema": {"type": "string"}}}
    return {"summary": "The dashboard (HTML): a key, HTTP Basic (the key as password), or a sign-in link's ?token=",
            "security": [*KEY_SECURITY, {"basic": []}],
            "parameters": [_query("token", "a sign-in link's token (reactor dashboard-link)", {"type": "string"})],
            "responses": {"200": {"description": "the page", "content": html},
                          "303": {"description": "a valid sign-in link: a session cookie, then /"},
                          "401": {"description": "sign in (WWW-Authenticate: Basic)", "content": html}}}  # fmt: skip


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _obj(*required: str, **properties: dict[str, Any]) -> dict[str, Any]:
    props = {name: {"type": "string"} for name in required} | properties
    return {"type": "object", "properties": props, "required": list(required)}


_LIST = {"type": "array", "items": {"type": "object"}}
# The JSON each route answers on success, keyed by path and method (the 2xx answers above have no content yet).
_ANSWERS: dict[tuple[str, str], dict[str, Any]] = {
    ("/webhooks/twenty", "post"): _obj("status", "event_id"),
    ("/sync-crm", "post"): _obj("job_id", "status"),
    ("/tasks/auto-assign", "post"): _obj("job_id", "status"),
    ("/reconcile", "post"): _obj("job_id", "status"),
    ("/jobs/{job_id}", "get"): _obj("job_id", "status"),
    ("/reconcile/{job_id}", "get"): _obj("job_id", "status", progress={}),
    ("/jobs/failed", "get"): _obj(failed=_LIST) | {"required": ["failed"]},
    ("/members", "get"): _obj(members=_LIST) | {"required": ["members"]},
    ("/members/{member_id}/availability", "get"): _obj("member_id"),
    ("/members/{member_id}/availability", "put"): _obj("member_id"),
    ("/assignments", "get"): _obj(assignments=_LIST) | {"required": ["assignments"]},
    ("/healthz", "get"): _obj("status"),
}


def _with_answers(document: dict[str, Any]) -> dict[str, Any]:
    for (path, method), schema in _ANSWERS.items():
        for status, answer in document["paths"][path][method]["responses"].items():
            if status.startswith("2") and "content" not in answer:
                answer["content"] = _content(schema)
    return document


def _operations_paths() -> dict[str, Any]:
    """The routes beyond lead intake: jobs, webhooks, reconciliation, routing, metrics, the dashboard."""
    availability = _ref(Availability)
    return {
        "/webhooks/twenty": {"post": _with(_op(
            "Twenty's webhook deliveries, signed (X-Twenty-Webhook-Signature, -Timestamp, -Nonce); 200 for a "
            "duplicate; 503 also when TWENTY_WEBHOOK_SECRET is not set", 400, 401, 503, ok="202", security=False,
            body={"type": "object"}), "200", "a duplicate delivery")},
        "/sync-crm": {"post": _op("Sync every unsynced lead now (a backlog job)", 401, ok="202")},
        "/tasks/auto-assign": {"post": _op("A follow-up for every person in Twenty without one (a job)", 401,
                                           ok="202")},
        "/jobs/failed": {"get": _op("Dead letters: jobs that failed for good", 401, 422)},
        "/jobs/{job_id}": {"get": _op("A job's status and result", 401, 404, params=[_path("job_id")])},
        "/reconcile": {"post": _with(_op("Start a reconcile (200 with the running one's id if one runs)", 401, 422,
                                   ok="202", params=[_query("dry_run", "report only", {"type": "boolean"})]),
                               "200", "one is already running: its id")},
        "/reconcile/{job_id}": {"get": _op("A reconcile's status, progress and summary", 401, 404,
                                           params=[_path("job_id")])},
        "/members": {"get": _op("Workspace members with load, weight, cap and availability", 401)},
        "/members/{member_id}/availability": {
            "get": _op("A member's availability", 401, 404, params=[_path("member_id")]),
            "put": _op("Set a member's availability (away, working hours, cap)", 401, 404, 422,
                       params=[_path("member_id")], body=availability),
        },
        "/assignments": {"get": _op("Assignment decisions, newest first, with every candidate", 401, 422, params=[
            _query("person_id", "only this person's", {"type": "string"}),
            _query("limit", "at most 500", {"type": "integer", "minimum": 1, "maximum": 500})])},
        "/metrics": {"get": _op("Prometheus metrics", security=False)},
        "/": {"get": _dashboard()},
    }  # fmt: skip


SWAGGER_UI_ASSETS = SWAGGER_UI_PY_ROOT / "static"
DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>reactor API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui", deepLinking: true});</script>
</body></html>"""


def routes() -> list[Route | Mount]:
    spec = build_openapi()

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(spec)

    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(DOCS_PAGE)

    return [
        Endpoint("/openapi.json", openapi),
        Endpoint("/docs", docs),
        Mount("/docs/assets", StaticFiles(directory=SWAGGER_UI_ASSETS), name="docs-assets"),
    ]
