"""reactor's web app with POST /leads answering without the per-lead sync enqueue (what intake costs once the
drain loop claims pending rows and the nudge goes): `bench/intake.py` measures it beside the app as shipped.

    uvicorn bench.reactor_no_nudge:app   (the environment reactor web would have)
"""

from __future__ import annotations

import functools

from starlette.routing import Route, request_response

from reactor.api import leads
from reactor.app import create_app
from reactor.settings import load_settings

app = create_app(load_settings(None))
for route in app.router.routes:
    if isinstance(route, Route) and route.path == "/leads" and route.methods and "POST" in route.methods:
        route.app = request_response(functools.partial(leads.accept_lead, nudge_sync=False))
