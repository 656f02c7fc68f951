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

from reactor.models import LeadAccepted, LeadIn, LeadList, LeadPage
from reactor.routing import Availability

ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {}},
    "required": ["error", "detail"],
}
KEY_SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "malformed JSON",
        401: "missing or invalid API key",
        404: "not found",
        413: "body over 64 KiB",
        415: "not application/json",
        422: "invalid input: every bad field listed",
        503: "not ready",
    }
    return {
        str(s): {"description": reasons[s], "content": _content({"$ref": "#/components/schemas/Error"})}
        for s in statuses
    }


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def build_openapi() -> dict[str, Any]:
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
                    "responses": {"200": {"description": "ready"}, **_errors(503)},
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


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _operations_paths() -> dict[str, Any]:
    """The routes beyond lead intake: jobs, webhooks, reconciliation, routing, metrics, the dashboard."""
    availability = _ref(Availability)
    return {
        "/webhooks/twenty": {"post": _op(
            "Twenty's webhook deliveries, signed (X-Twenty-Webhook-Signature, -Timestamp, -Nonce); 200 for a "
            "duplicate", 400, 401, 503, ok="202", security=False)},
        "/sync-crm": {"post": _op("Sync every unsynced lead now (a backlog job)", 401, ok="202")},
        "/tasks/auto-assign": {"post": _op("A follow-up for every person in Twenty without one (a job)", 401,
                                           ok="202")},
        "/jobs/failed": {"get": _op("Dead letters: jobs that failed for good", 401, 422)},
        "/jobs/{job_id}": {"get": _op("A job's status and result", 401, 404, params=[_path("job_id")])},
        "/reconcile": {"post": _op("Start a reconcile (200 with the running one's id if one runs)", 401, 422,
                                   ok="202", params=[_query("dry_run", "report only", {"type": "boolean"})])},
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
        "/": {"get": _op("The dashboard (HTML); also a sign-in link's ?token=", 401)},
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
        Route("/openapi.json", openapi),
        Route("/docs", docs),
        Mount("/docs/assets", StaticFiles(directory=SWAGGER_UI_ASSETS), name="docs-assets"),
    ]
