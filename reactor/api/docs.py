"""GET /openapi.json, generated from the pydantic models, and GET /docs, Swagger UI served from a package
(swagger-ui-bundle) so it works offline."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from reactor.models import LeadAccepted, LeadIn, LeadList, LeadPage

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
        [(m, "serialization") for m in (LeadAccepted, LeadPage, LeadList)] + [(LeadIn, "validation")],
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
            "/healthz": {"get": {"summary": "Process is up", "responses": {"200": {"description": "up"}}}},
            "/readyz": {
                "get": {
                    "summary": "PostgreSQL and Redis reachable",
                    "responses": {"200": {"description": "ready"}, **_errors(503)},
                }
            },
        },
    }


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>reactor API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
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
        Mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="docs-assets"),
    ]
