"""GET /: a live dashboard, rendered on the server (no JavaScript, no CDN): member loads as a bar chart, the latest
leads with their sync and follow-up state, the queue, dead letters and the last reconcile. It reloads itself.

Leads are personal data, so it needs a lead source's key: X-API-Key, HTTP Basic (any user name, the key as
password; browsers ask for it), or a sign-in link (`reactor dashboard-link`): `/?token=…` carries an expiring token
signed with a source's key, which is swapped at once for an HttpOnly cookie. Emails are masked unless LOG_PII=true.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from html import escape
from typing import Any

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from reactor import assignees, logs, metrics, routing, store
from reactor.api.auth import authenticate
from reactor.api.endpoint import Endpoint
from reactor.errors import Unauthenticated
from reactor.resources import Resources

REFRESH_S = 5
LATEST = 15

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2433;background:#f6f7fb}
h1{font-size:20px;margin:0 0 16px}h2{font-size:15px;margin:0 0 10px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:16px}
.card{background:#fff;border-radius:8px;padding:16px;box-shadow:0 1px 2px #0001}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:4px 6px;border-bottom:1px solid #eef}
.num{font-size:28px;font-weight:600}.muted{color:#6b7385}.ok{color:#147a3d}.warn{color:#a15c00}.bad{color:#b3261e}
"""


COOKIE = "reactor_session"


def sign_token(source: str, key: str, *, expires_at: int) -> str:
    """`source.expiry.signature`: proves the holder was given a link by someone with `source`'s key."""
    mac = hmac.new(key.encode(), f"dashboard:{source}:{expires_at}".encode(), hashlib.sha256).hexdigest()
    return f"{source}.{expires_at}.{mac}"


def token_source(token: str, keys: Mapping[str, SecretStr], *, now: float) -> str | None:
    source, _, rest = token.partition(".")
    expiry, _, mac = rest.partition(".")
    key = keys.get(source)
    if key is None or not expiry.isdigit() or int(expiry) < now:
        return None
    expected = sign_token(source, key.get_secret_value(), expires_at=int(expiry)).rpartition(".")[2]
    return source if hmac.compare_digest(expected, mac) else None


async def dashboard(request: Request) -> Response:
    res: Resources = request.state.resources
    keys = res.settings.lead_api_keys
    link = request.query_params.get("token")
    if link and token_source(link, keys, now=time.time()):
        # Swap the link for a cookie at once, so the token leaves the address bar and the history.
        answer = RedirectResponse("/", status_code=303)
        max_age = int(link.split(".")[1]) - int(time.time())
        answer.set_cookie(COOKIE, link, max_age=max_age, httponly=True, samesite="strict",
                          secure=request.url.scheme == "https")  # fmt: skip
        return answer
    session = request.cookies.get(COOKIE)
    signed_in = session is not None and token_source(session, keys, now=time.time()) is not None
    try:
        if not signed_in:
            authenticate(request, keys, basic=True)
    except Unauthenticated:
        return HTMLResponse("<h1>reactor</h1><p>Sign in with a lead source's API key as the password.</p>", 401,
                            headers={"WWW-Authenticate": 'Basic realm="reactor", charset="UTF-8"'})  # fmt: skip
    data = await _gather(res)
    return HTMLResponse(_page(data, pii=res.settings.log_pii), headers={"Cache-Control": "no-store"})


async def _gather(res: Resources) -> dict[str, Any]:
    members = await res.cache.members()
    loads = await assignees.member_loads(res.db, res.cache, res.settings)
    async with res.db.acquire() as conn:
        leads = await store.latest_leads(conn, limit=LATEST)
        failed = await store.list_failed_jobs(conn, limit=5)
        failed_count = await store.count_failed_jobs(conn)
        unsynced = await store.count_unsynced(conn)
    last = await res.redis.get(metrics.LAST_RECONCILE_KEY)
    now = dt.datetime.now(dt.UTC)
    availability = await routing.read_availability(res.db)
    return {
        "away": {m: reason for m, rules in availability.items() if (reason := rules.unavailable(now))},
        "decisions": await routing.recent_decisions(res.db, person_id=None, limit=8),
        "loads": {m: loads.get(m, 0) for m in sorted(members.keys() | loads.keys())},
        "names": await res.cache.names(),
        "leads": leads,
        "failed": failed,
        "failed_count": failed_count,
        "unsynced": unsynced,
        "queue": await res.redis.zcard("arq:queue"),
        "reconcile": json.loads(last) if last else None,
    }


def _bars(loads: dict[str, int], names: dict[str, str], away: dict[str, str]) -> str:
    if not loads:
        return '<p class="muted">No members yet: the worker reads them from Twenty when it starts.</p>'
    top = max(max(loads.values()), 1)
    rows = []
    for i, (member, load) in enumerate(sorted(loads.items(), key=lambda kv: (-kv[1], kv[0]))):
        width = 4 + 176 * load / top
        label = escape(names.get(member, member[:8])) + (f" · {escape(away[member])}" if member in away else "")
        rows.append(f'<text x="0" y="{i * 28 + 17}" font-size="13">{label}</text>'
                    f'<rect x="160" y="{i * 28 + 4}" width="{width:.0f}" height="18" rx="3" fill="#4f6bed"/>'
                    f'<text x="{166 + width:.0f}" y="{i * 28 + 17}" font-size="13">{load}</text>')  # fmt: skip
    return (f'<svg role="img" aria-label="open tasks per member" width="100%" '
            f'viewBox="0 0 380 {len(loads) * 28}">{"".join(rows)}</svg>')  # fmt: skip


def _decisions(decisions: list[dict[str, Any]], names: dict[str, str]) -> str:
    rows = [f"<tr><td>{escape(names.get(d['chosen_member'] or '', d['chosen_member'] or 'nobody'))}</td>"
            f"<td>{escape(d['rule'])}</td><td class='muted'>{escape(d['decided_at'][11:19])}</td></tr>"
            for d in decisions]  # fmt: skip
    return "".join(rows) or '<tr><td class="muted">No assignments yet.</td></tr>'


def _lead_rows(leads: list[Any], names: dict[str, str], pii: bool) -> str:
    rows = []
    for lead in leads:
        name = " ".join(p for p in (lead["first_name"], lead["last_name"]) if p) or "—"
        email = lead["email"] or ""
        sync = ('<span class="ok">synced</span>' if lead["crm_synced"] else
                '<span class="warn">suppressed</span>' if lead["suppressed"] else
                f'<span class="bad">{lead["sync_attempts"]} failed</span>' if lead["last_sync_error"] else
                '<span class="muted">pending</span>')  # fmt: skip
        follow_up = (f'{escape(lead["fu_state"])} → {escape(names.get(lead["fu_assignee_id"] or "", "unassigned"))}'
                     if lead["fu_state"] else '<span class="muted">—</span>')  # fmt: skip
        rows.append(f"<tr><td>{escape(name)}</td><td>{escape(email if pii else logs.mask(email))}</td>"
                    f"<td>{sync}</td><td>{follow_up}</td>"
                    f'<td class="muted">{lead["created_at"]:%H:%M:%S}</td></tr>')  # fmt: skip
    return "".join(rows) or '<tr><td colspan="5" class="muted">No leads yet.</td></tr>'


def _page(data: dict[str, Any], *, pii: bool) -> str:
    rec = data["reconcile"]
    if rec:
        drift = ", ".join(f"{escape(data['names'].get(m, m[:8]))} {d['cached']}→{d['true']}"
                          for m, d in rec["drift"].items()) or "none"  # fmt: skip
        reconcile = (f"<p>{'dry run' if rec['dry_run'] else 'run'} in {rec['seconds']}s · drift: {drift}</p>"
                     f"<p class='muted'>leads synced {rec['leads_synced']} · follow-ups created "
                     f"{rec['follow_ups_created']} · closed {rec['follow_ups_closed']} · events during the run "
                     f"{rec['events_during_run']}</p>")  # fmt: skip
    else:
        reconcile = '<p class="muted">No reconcile yet (reactor reconcile, or POST /reconcile).</p>'
    failed = "".join(f"<tr><td>{escape(f['job_name'])}</td><td>{escape(str(f['error'])[:80])}</td>"
                     f"<td class='muted'>{f['failed_at']:%m-%d %H:%M}</td></tr>" for f in data["failed"])  # fmt: skip
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width,initial-scale=1"><title>reactor</title><style>{STYLE}</style></head>
<body><h1>reactor</h1>
<div class="grid">
<section class="card"><h2>Open tasks per member</h2>{_bars(data["loads"], data["names"], data["away"])}</section>
<section class="card"><h2>Work waiting</h2>
<p><span class="num" id="queue">{data["queue"]}</span> jobs queued ·
<span class="num" id="unsynced">{data["unsynced"]}</span> leads unsynced ·
<span class="num {"bad" if data["failed_count"] else ""}" id="failed">{data["failed_count"]}</span> dead letters</p>
<table>{failed}</table></section>
<section class="card"><h2>Last reconcile</h2>{reconcile}</section>
<section class="card"><h2>Recent assignments</h2><table>{_decisions(data["decisions"], data["names"])}</table></section>
</div>
<section class="card" style="margin-top:16px"><h2>Latest leads</h2>
<table><tr><th>Name</th><th>Email</th><th>Sync</th><th>Follow-up</th><th>Received</th></tr>
{_lead_rows(data["leads"], data["names"], pii)}</table></section>
<p class="muted">Refreshes every {REFRESH_S} s · <a href="/metrics">/metrics</a> · <a href="/docs">API docs</a></p>
</body></html>"""


routes = [Endpoint("/", dashboard, methods=["GET"])]
