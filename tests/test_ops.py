"""Probes, the OpenAPI document and the offline docs page."""

from __future__ import annotations

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.routing import Route

from reactor.app import create_app
from reactor.devstack import free_port
from reactor.settings import Settings

pytestmark = pytest.mark.anyio


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}


async def test_readyz_is_503_when_redis_is_unreachable(settings: Settings) -> None:
    broken = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    app = create_app(broken)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://reactor.test") as http:
            response = await http.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"postgres": "ok", "redis": "unavailable"}


async def test_openapi_is_generated_from_the_models(client: httpx.AsyncClient, settings: Settings) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) >= {"/leads", "/leads/search", "/leads/{lead_id}", "/healthz", "/readyz"}
    lead_in = spec["components"]["schemas"]["LeadIn"]
    assert {"email", "phone", "lead_id", "address", "current_credit"} <= set(lead_in["properties"])
    assert "Lead" in spec["components"]["schemas"]
    # Every route the app serves is documented.
    served = {route.path for route in create_app(settings).routes if isinstance(route, Route)}
    documented = set(spec["paths"]) | {"/openapi.json", "/docs"}
    assert served <= documented, served - documented
    availability = spec["components"]["schemas"]["Availability"]
    assert {"away", "away_until", "working_hours", "max_open_tasks"} <= set(availability["properties"])
    # Every $ref points at a schema that exists.
    refs = {r.split("/")[-1] for r in _refs(spec)}
    assert refs <= set(spec["components"]["schemas"])


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_docs_page_works_offline(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    assert "http" not in page.text.replace('"/openapi.json"', "")  # no CDN: every asset is ours
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        response = await client.get(asset)
        assert response.status_code == 200
        assert len(response.content) > 10_000


async def test_unknown_route_and_method_answer_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nope")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    wrong = await client.delete("/leads")
    assert (wrong.status_code, wrong.json()["error"]) == (405, "method_not_allowed")
