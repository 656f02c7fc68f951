"""`reactor doctor`: is this configuration one that works? One line per check, ✓ or ✗ with the fix.

It checks the configuration, PostgreSQL, Redis and Twenty (reachable, the token accepted, the workspace's members,
the task-target field shape, the rate limit Twenty really allows), then reactor's webhook subscription (there, with
the operations reactor needs and the configured secret) and whether Twenty can deliver to its URL. It spends at
most four calls of Twenty's budget. `unreachable()` also gives every other command its one-line outage message.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import httpx
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from reactor import subscription
from reactor.settings import Settings
from reactor.twenty import TwentyAuthError, TwentyClient, TwentyError, TwentyUnavailable, Webhook, create_http_client

# What a self-hosted Twenty of the 1.16 era accepts under steady load, although it announces 100 per 60 s
# (its bucket's refill clock restarts on every allowed call); Twenty Cloud has been seen at 50.
STEADY_SELF_HOSTED_PER_MINUTE = 79
SAFE_MODE_FIX = (
    "Twenty's outbound safe mode drops deliveries to private and loopback addresses: on Twenty's server and worker"
    " set OUTBOUND_HTTP_ALLOWED_INTERNAL_HOSTS={host} (newer servers) or OUTBOUND_HTTP_SAFE_MODE_ENABLED=false"
    " (older servers, before that setting), or give a public URL"
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: worth knowing, but nothing is broken
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {True: "✓", False: "✗", None: "!"}[self.ok]
        return f"{mark} {self.name}: {self.detail}" + (f" → {self.fix}" if self.fix else "")


def exit_status(checks: Sequence[Check]) -> int:
    return 1 if any(check.ok is False for check in checks) else 0


def host_port(url: str, default_port: int | None = None) -> str:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or default_port or (443 if parts.scheme in ("https", "rediss") else 80)
    return f"{parts.hostname or '127.0.0.1'}:{port}"


def _why(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, ConnectionRefusedError) or "refused" in text.lower() or "Error 111 " in text:
        return "connection refused"
    if isinstance(exc, socket.gaierror) or "Name or service not known" in text or "Error -2 " in text:
        return "unknown host"
    if isinstance(exc, TimeoutError) or "timeout" in text.lower():
        return "no answer in time"
    return text.splitlines()[0][:160] if text else type(exc).__name__


def diagnose(exc: BaseException, *, postgres_dsn: str, redis_url: str, twenty_url: str | None) -> Check | None:
    """The ✗ for a server that could not be reached: host:port, why, and what to check. None: not an outage."""
    if isinstance(exc, TwentyAuthError):
        return Check("twenty", False, f"Twenty at {host_port(twenty_url or '')} refused the API key ({exc})",
                     "check TWENTY_REST_TOKEN (an API key from Twenty's Settings → APIs & Webhooks)")  # fmt: skip
    if isinstance(exc, TwentyUnavailable):
        return Check("twenty", False, f"cannot reach Twenty at {host_port(twenty_url or '')} ({exc})",
                     "check TWENTY_REST_URL and that Twenty is up")  # fmt: skip
    if isinstance(exc, AuthenticationError):
        return Check("redis", False, f"Redis at {host_port(redis_url, 6379)} refused the password", "check REDIS_URL")
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return Check("redis", False, f"cannot reach Redis at {host_port(redis_url, 6379)} ({_why(exc)})",
                     "is it running? check REDIS_URL")  # fmt: skip
    where = host_port(postgres_dsn, 5432)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return Check("postgres", False, f"PostgreSQL at {where}: {exc}",
                     "create it (createdb) or check DATABASE_URL / DB_NAME")  # fmt: skip
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError):
        return Check("postgres", False, f"PostgreSQL at {where} refused the login ({exc})",
                     "check DATABASE_URL or DB_USER / DB_PASSWORD")  # fmt: skip
    if isinstance(exc, asyncpg.CannotConnectNowError | asyncpg.TooManyConnectionsError):
        return Check("postgres", False, f"PostgreSQL at {where} is not taking connections ({exc})", "check the server")
    if isinstance(exc, OSError | TimeoutError):
        return Check("postgres", False, f"cannot reach PostgreSQL at {where} ({_why(exc)})",
                     "is it running? check DATABASE_URL or DB_HOST / DB_PORT")  # fmt: skip
    return None


def unreachable(exc: BaseException, *, postgres_dsn: str, redis_url: str, twenty_url: str | None) -> str | None:
    """`diagnose` as the one line a command prints before it exits with status 2."""
    check = diagnose(exc, postgres_dsn=postgres_dsn, redis_url=redis_url, twenty_url=twenty_url)
    return f"{check.detail}: {check.fix}" if check else None


# -- the checks ---------------------------------------------------------------------------------------------


async def check_postgres(settings: Settings) -> Check:
    where = host_port(settings.postgres_dsn, 5432)
    try:
        conn = await asyncpg.connect(settings.postgres_dsn, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        found = diagnose(exc, postgres_dsn=settings.postgres_dsn, redis_url="", twenty_url=None)
        return found or Check("postgres", False, f"{where}: {exc}")
    try:
        migrated = await conn.fetchval("SELECT to_regclass('public.leads') IS NOT NULL")
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    if not migrated:
        return Check("postgres", False, f"{where} answers, but has no reactor tables", "run: reactor migrate")
    return Check("postgres", True, f"{where}, PostgreSQL {version}, schema migrated")


async def check_redis(settings: Settings) -> Check:
    client = Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
        version = (await client.info("server")).get("redis_version", "?")
    except RedisError as exc:
        found = diagnose(exc, postgres_dsn="", redis_url=settings.redis_url, twenty_url=None)
        return found or Check("redis", False, f"{host_port(settings.redis_url, 6379)}: {exc}")
    finally:
        await client.aclose()
    return Check("redis", True, f"{host_port(settings.redis_url, 6379)}, Redis {version}")


@dataclass
class _Budget:
    """The rate-limit headers of the last answer from Twenty, when its limiter sends them (newer servers)."""

    limit: str | None = None
    remaining: str | None = None

    async def observe(self, response: httpx.Response) -> None:
        self.limit = response.headers.get("X-RateLimit-Limit", self.limit)
        self.remaining = response.headers.get("X-RateLimit-Remaining", self.remaining)


def _budget_check(settings: Settings, budget: _Budget, simulated: bool) -> Check:
    per_minute = settings.twenty_rate_limit * 60 / settings.twenty_rate_window_s
    configured = f"TWENTY_RATE_LIMIT={settings.twenty_rate_limit} per {settings.twenty_rate_window_s:g} s"
    if simulated:
        return Check("rate limit", True, f"{configured}; the simulator limits only with --rate-limit")
    if budget.limit is not None:
        detail = f"Twenty announces {budget.limit} a window ({budget.remaining} left); {configured}"
        try:
            above = settings.twenty_rate_limit > int(budget.limit)
        except ValueError:
            above = False
        return Check("rate limit", not above, detail, f"set TWENTY_RATE_LIMIT={budget.limit}" if above else "")
    if per_minute > STEADY_SELF_HOSTED_PER_MINUTE:
        return Check("rate limit", None, f"Twenty announces no budget; {configured} is above what a self-hosted "
                     f"server accepts under steady load (about {STEADY_SELF_HOSTED_PER_MINUTE} a minute)",
                     f"set TWENTY_RATE_LIMIT={STEADY_SELF_HOSTED_PER_MINUTE} (Cloud: 50) to avoid 429s")  # fmt: skip
    return Check("rate limit", True, f"{configured} (Twenty announces no budget)")


async def _is_simulator(http: httpx.AsyncClient, rest_url: str) -> bool:
    """reactor's own simulator answers GET /sim/state; it delivers webhooks to any address, private ones too."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = await http.get(rest_url.removesuffix("/rest") + "/sim/state", timeout=2)
        return response.status_code == 200 and "members" in response.json()
    return False


async def check_twenty(
    settings: Settings, webhook_url: str | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> list[Check]:
    if not (settings.twenty_rest_url and settings.twenty_rest_token):
        return [Check("twenty", False, "TWENTY_REST_URL and TWENTY_REST_TOKEN are not both set",
                      "set them to Twenty's URL and an API key from its Settings → APIs & Webhooks")]  # fmt: skip
    url, token = settings.twenty_rest_url, settings.twenty_rest_token.get_secret_value()
    budget = _Budget()
    async with create_http_client(url, token, transport=transport) as http:
        http.event_hooks["response"].append(budget.observe)
        twenty = TwentyClient(http, max_attempts=1)  # a diagnosis never retries, and never into a 429
        try:
            members = await twenty.list_workspace_members()
        except TwentyError as exc:
            return [diagnose(exc, postgres_dsn="", redis_url="", twenty_url=url) or Check("twenty", False, str(exc))]
        simulated = await _is_simulator(http, url)
        checks = [Check("twenty", True, f"{host_port(url)} accepts the token" +
                        (" (reactor's simulator)" if simulated else ""))]  # fmt: skip
        checks.append(_members_check(settings, [m.user_email or m.id for m in members]))
        try:
            field = await twenty.task_target_person_field()
            era = "Twenty 1.17 or later" if field == "targetPersonId" else "Twenty before 1.17"
            checks.append(Check("task targets", True, f"link people by {field} ({era})"))
            hooks = await twenty.list_webhooks()
        except TwentyError as exc:
            checks.append(Check("twenty", False, str(exc)))
            return checks
        checks.append(_budget_check(settings, budget, simulated))
        checks += _webhook_checks(settings, hooks, webhook_url, simulated)
    return checks


def _members_check(settings: Settings, emails: list[str]) -> Check:
    if not emails:
        return Check("members", False, "the workspace has no members", "invite the sales team in Twenty")
    unknown = sorted(settings.routing_emails() - {e.lower() for e in emails})
    shown = ", ".join(sorted(emails)[:5]) + (", …" if len(emails) > 5 else "")
    if unknown:
        return Check("members", False, f"{len(emails)} ({shown}); routing names non-members: {', '.join(unknown)}",
                     "fix ASSIGNEE_EMAILS / ASSIGNEE_WEIGHTS / FALLBACK_ASSIGNEE_EMAIL")  # fmt: skip
    return Check("members", True, f"{len(emails)} ({shown})")


def _webhook_checks(settings: Settings, hooks: list[Webhook], url: str | None, simulated: bool) -> list[Check]:
    ours = [h for h in hooks if (url and h.target_url.rstrip("/") == url.rstrip("/"))
            or (not url and urlsplit(h.target_url).path.rstrip("/").endswith("/webhooks/twenty"))]  # fmt: skip
    if not ours:
        return [Check("webhook", False, f"no subscription sends to {url or 'a /webhooks/twenty URL'}",
                      "run: reactor webhook install --url https://<reactor>/webhooks/twenty")]  # fmt: skip
    checks = []
    configured = settings.twenty_webhook_secret.get_secret_value() if settings.twenty_webhook_secret else None
    for hook in ours:
        missing = subscription.covers(hook)
        install = f"run: reactor webhook install --url {hook.target_url}"
        checks.append(Check("webhook", not missing, f"{hook.target_url}: " + (
            f"missing {', '.join(missing)}" if missing else f"operations {', '.join(hook.operations)}"),
            install if missing else ""))  # fmt: skip
        match = subscription.secret_matches(hook, configured)
        if configured is None:
            checks.append(Check("webhook secret", False, "TWENTY_WEBHOOK_SECRET is not set (webhooks answer 503)",
                                "set it to the secret `reactor webhook install` printed"))  # fmt: skip
        elif match is None:
            checks.append(Check("webhook secret", None, "Twenty does not show the subscription's secret to compare"))
        else:
            checks.append(Check("webhook secret", match, "matches TWENTY_WEBHOOK_SECRET" if match else
                                "differs from TWENTY_WEBHOOK_SECRET", "" if match else
                                "set TWENTY_WEBHOOK_SECRET to the subscription's secret, or delete the subscription "
                                "in Twenty and run install again"))  # fmt: skip
        checks.append(_reachability(hook.target_url, simulated))
    return checks


def _reachability(url: str, simulated: bool) -> Check:
    host = urlsplit(url).hostname or ""
    if not subscription.is_private(url):
        return Check("webhook URL", True, f"{host} is a public address Twenty may call")
    if simulated:
        return Check("webhook URL", True, f"{host} is private; the simulator delivers there (a real Twenty would not)")
    return Check("webhook URL", False, f"{host} is a private or loopback address", SAFE_MODE_FIX.format(host=host))


async def run(
    settings: Settings, *, webhook_url: str | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> list[Check]:
    """Every check, in order; each failure is a ✗ line, never an exception. `transport` reaches Twenty (tests)."""
    checks = [Check("configuration", True, f"valid ({len(settings.lead_api_keys)} lead source(s))")]
    checks.append(await check_postgres(settings))
    checks.append(await check_redis(settings))
    checks += await check_twenty(settings, webhook_url, transport)
    return checks
