"""Faults (issue 16, cases 1, 2, 7, 8): PostgreSQL or Redis down is a 503 with Retry-After on every route, and the
same app answers again once they are back; a bug is one 500 log line carrying the request id; a client hanging up
is routine; the real server bounds head size, idle and slow connections, slow bodies and slow answers; the worker
outlives a Redis restart.

Outages are made by a TCP proxy of the test's own in front of the suite's PostgreSQL and Redis: cutting it resets
the live connections and refuses new ones, as a crashed server does."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import httpx
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from pydantic import SecretStr
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from reactor import outages, supervisor
from reactor.api.endpoint import Endpoint
from reactor.app import Limits, create_app
from reactor.devstack import free_port
from reactor.loadcache import LoadCache
from reactor.resources import workspace_key
from reactor.server import SERVER_LIMITS, BoundedHttpTools
from reactor.settings import Settings
from reactor.webhooks import signature
from tests import test_e2e, test_hygiene
from tests.conftest import API_KEYS, ROOT
from tests.test_e2e import API_KEY, Stack, all_synced, post_all, until
from tests.test_hygiene import Lines

stack = test_e2e.stack  # fixtures shared with those modules
lines = test_hygiene.lines

pytestmark = pytest.mark.anyio

SECRET = "faults-webhook-secret"
AUTH = {"X-API-Key": API_KEYS["webform"]}


class TcpProxy:
    """127.0.0.1:<port> -> target. `cut()` resets every live connection and refuses new ones; `restore()` listens
    again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._live):
            writer.transport.abort()
        self._live.clear()
        await self._server.wait_closed()

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._live |= {client_w, server_w}

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.transport.abort()
                self._live.discard(sink)

        await asyncio.gather(copy(client_r, server_w), copy(server_r, client_w))


def through(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth + '@' if auth else ''}127.0.0.1:{proxy.port}"))


def target_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 0


@contextlib.asynccontextmanager
async def in_process(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app, raise_app_exceptions=False),
            base_url="http://reactor.test",
            headers=AUTH,
        ) as http,  # fmt: skip
    ):
        yield http


def signed_webhook(event: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps(event).encode()
    ts = str(int(time.time() * 1000))
    return {"content": body, "headers": {"Content-Type": "application/json", "X-Twenty-Webhook-Timestamp": ts,
            "X-Twenty-Webhook-Signature": signature(SECRET, ts, body),
            "X-Twenty-Webhook-Nonce": f"n{time.monotonic_ns()}"}}  # fmt: skip


def done_task() -> dict[str, Any]:
    return {"eventName": "task.updated", "webhookId": "w1",
            "record": {"id": f"t{time.monotonic_ns()}", "status": "DONE", "assigneeId": "m1",
                       "updatedAt": "2026-01-01T00:00:00.000Z"}}  # fmt: skip


# Every route family, each as (name, call). The name is what the expectations below refer to.
CALLS: dict[str, Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]] = {
    "POST /leads": lambda api: api.post("/leads", json={"email": f"o{time.monotonic_ns()}@example.com"}),
    "GET /leads": lambda api: api.get("/leads"),
    "GET /leads/search": lambda api: api.get("/leads/search", params={"email": "a@example.com"}),
    "GET /leads/{id}": lambda api: api.get("/leads/l-1"),
    "GET /members": lambda api: api.get("/members"),
    "GET /members/{id}/availability": lambda api: api.get("/members/m1/availability"),
    "PUT /members/{id}/availability": lambda api: api.put("/members/m1/availability", json={"away": True}),
    "GET /assignments": lambda api: api.get("/assignments"),
    "GET /": lambda api: api.get("/"),
    "POST /sync-crm": lambda api: api.post("/sync-crm"),
    "POST /tasks/auto-assign": lambda api: api.post("/tasks/auto-assign"),
    "POST /reconcile": lambda api: api.post("/reconcile"),
    "GET /reconcile/{id}": lambda api: api.get("/reconcile/r-1"),
    "GET /jobs/{id}": lambda api: api.get("/jobs/j-1"),
    "GET /jobs/failed": lambda api: api.get("/jobs/failed"),
    "POST /webhooks/twenty": lambda api: api.post("/webhooks/twenty", **signed_webhook(done_task())),
    "GET /metrics": lambda api: api.get("/metrics"),
    "GET /readyz": lambda api: api.get("/readyz"),
    "GET /healthz": lambda api: api.get("/healthz"),
}
NEEDS_POSTGRES = {"POST /leads", "GET /leads", "GET /leads/search", "GET /leads/{id}", "GET /members",
                  "GET /members/{id}/availability", "PUT /members/{id}/availability", "GET /assignments", "GET /",
                  "GET /jobs/failed", "POST /webhooks/twenty"}  # fmt: skip
NEEDS_REDIS = {"GET /members", "GET /members/{id}/availability", "PUT /members/{id}/availability", "GET /",
               "POST /sync-crm", "POST /tasks/auto-assign", "POST /reconcile", "GET /reconcile/{id}",
               "GET /jobs/{id}", "POST /webhooks/twenty"}  # fmt: skip
# POST /leads needs Redis only for the sync nudge: it accepts the lead anyway (the sweep syncs it).


@pytest.fixture
async def proxies(settings: Settings, database_url: str, redis_url: str) -> AsyncIterator[dict[str, TcpProxy]]:
    pg, rd = TcpProxy(*target_of(database_url)), TcpProxy(*target_of(redis_url))
    await pg.restore()
    await rd.restore()
    yield {"postgres": pg, "redis": rd}
    with contextlib.suppress(AssertionError):
        await pg.cut()
        await rd.cut()


@pytest.fixture
async def proxied_api(
    settings: Settings, database_url: str, redis_url: str, db: asyncpg.Pool, redis: Redis,
    proxies: dict[str, TcpProxy],
) -> AsyncIterator[httpx.AsyncClient]:  # fmt: skip
    cache = LoadCache(redis, load_statuses=["TODO"], workspace=workspace_key(settings))
    await cache.set_members({}, {"m1": "Ann Lee"})
    proxied = settings.model_copy(update={
        "database_url": through(database_url, proxies["postgres"]), "redis_url": through(redis_url, proxies["redis"]),
        "twenty_webhook_secret": SecretStr(SECRET)})  # fmt: skip
    async with in_process(create_app(proxied)) as http:
        yield http


async def call_all(api: httpx.AsyncClient) -> dict[str, httpx.Response]:
    return {name: await call(api) for name, call in CALLS.items()}


def assert_unavailable(answer: httpx.Response, dependency: str, name: str) -> None:
    assert answer.status_code == 503, f"{name}: {answer.status_code} {answer.text[:300]}"
    if name == "GET /readyz":
        assert answer.json()["checks"][dependency.lower().replace("postgresql", "postgres")] == "unavailable"
        return
    assert answer.json()["error"] == "unavailable", name
    assert answer.json()["detail"].startswith(f"{dependency} is unavailable"), (name, answer.json())
    assert int(answer.headers["Retry-After"]) > 0, name


@pytest.mark.parametrize("down", ["postgres", "redis"])
async def test_every_route_answers_503_while_a_dependency_is_down_then_recovers(
    proxied_api: httpx.AsyncClient, proxies: dict[str, TcpProxy], down: str
) -> None:
    before = await call_all(proxied_api)
    assert all(a.status_code < 500 for a in before.values()), {n: a.text for n, a in before.items()
                                                               if a.status_code >= 500}  # fmt: skip
    await proxies[down].cut()
    dependency, needs = ("PostgreSQL", NEEDS_POSTGRES) if down == "postgres" else ("Redis", NEEDS_REDIS)
    for _ in range(2):  # the first pass meets the reset pooled connections, the second the refused new ones
        during = await call_all(proxied_api)
        assert not [n for n, a in during.items() if a.status_code == 500], "no outage is a 500"
        for name, answer in during.items():
            if name in needs or name == "GET /readyz":
                assert_unavailable(answer, dependency, name)
            else:
                assert answer.status_code < 500, f"{name} does not need {dependency}: {answer.text[:300]}"
    await proxies[down].restore()

    async def recovered() -> bool:
        after = await call_all(proxied_api)
        return all(a.status_code < 500 for a in after.values())

    await eventually(recovered, 30)  # the pools reconnect on their own: nothing restarted


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    with anyio.fail_after(timeout_s):
        for _ in range(int(timeout_s * 10)):
            if await check():
                return
            await anyio.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s")


async def raised(call: Awaitable[Any]) -> BaseException:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("it did not fail")


async def test_outages_are_classified_for_jobs_too() -> None:
    closed = free_port()
    refused_pg = await raised(asyncpg.connect(f"postgresql://postgres@127.0.0.1:{closed}/x", timeout=2))
    assert isinstance(refused_pg, OSError)  # a bare ConnectionRefusedError: only its traceback says "asyncpg"
    assert outages.unavailable(refused_pg) is outages.Dependency.POSTGRES
    client = Redis(port=closed, socket_connect_timeout=2)
    assert outages.unavailable(await raised(client.ping())) is outages.Dependency.REDIS
    await client.aclose()
    async with httpx.AsyncClient() as http:
        assert outages.unavailable(await raised(http.get(f"http://127.0.0.1:{closed}/"))) is None  # Twenty's

    assert outages.unavailable(asyncpg.ConnectionDoesNotExistError("closed")) is outages.Dependency.POSTGRES
    assert outages.unavailable(asyncpg.exceptions.CannotConnectNowError("starting")) is outages.Dependency.POSTGRES
    assert outages.unavailable(asyncpg.exceptions.TooManyConnectionsError("full")) is outages.Dependency.POSTGRES
    from redis import exceptions as redis_errors

    assert outages.unavailable(redis_errors.ConnectionError("gone")) is outages.Dependency.REDIS
    assert outages.unavailable(redis_errors.BusyLoadingError("loading")) is outages.Dependency.REDIS
    assert outages.unavailable(redis_errors.TimeoutError("slow")) is outages.Dependency.REDIS
    wrapped = RuntimeError("job failed")
    wrapped.__cause__ = redis_errors.ConnectionError("gone")
    assert outages.unavailable(wrapped) is outages.Dependency.REDIS
    assert outages.unavailable(ExceptionGroup("g", [ValueError(), asyncpg.ConnectionDoesNotExistError("x")]))
    assert outages.unavailable(ValueError("a bug")) is None
    assert outages.unavailable(asyncpg.UniqueViolationError("dup")) is None
    assert outages.unavailable(asyncpg.InvalidPasswordError("no")) is None
    assert outages.misconfigured(asyncpg.InvalidPasswordError("no"))


# -- case 7: one line per error, with the request id; a client hanging up is info -------------------------------


async def test_a_bug_is_one_500_line_carrying_the_request_id(
    settings: Settings, db: asyncpg.Pool, redis: Redis, lines: Lines
) -> None:
    async def boom(request: Request) -> JSONResponse:
        raise KeyError("a bug")

    app = create_app(settings)
    app.router.routes.append(Route("/boom", boom))
    async with in_process(app) as api:
        answer = await api.get("/boom", headers={"X-Request-ID": "req-boom-1"})
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal_error", "detail": "an unexpected error occurred; it has been logged"}
    assert answer.headers["X-Request-ID"] == "req-boom-1"
    errors = [line for line in lines.lines if line["level"] == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["request_id"] == "req-boom-1"
    assert "KeyError" in errors[0]["exc"]


async def test_a_client_hanging_up_mid_body_is_info_not_an_error(
    settings: Settings, db: asyncpg.Pool, redis: Redis, lines: Lines
) -> None:
    sent: list[dict[str, Any]] = []
    parts = iter([{"type": "http.request", "body": b'{"email": "half', "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> Any:
        return next(parts)

    async def send(message: Any) -> None:
        sent.append(message)

    async with LifespanManager(create_app(settings)) as manager:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/leads", "raw_path": b"/leads", "query_string": b"", "root_path": "",
                 "headers": [(b"x-api-key", API_KEYS["webform"].encode()), (b"content-type", b"application/json"),
                             (b"content-length", b"100"), (b"x-request-id", b"req-gone-1")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip
        await manager.app(scope, receive, send)
    assert not [line for line in lines.lines if line["level"] in ("error", "critical")], lines.lines
    gone = [line for line in lines.lines if "client_disconnected" in line["msg"]]
    assert gone, lines.lines
    assert gone[0]["level"] == "info"
    assert gone[0]["request_id"] == "req-gone-1"
    assert await db.fetchval("SELECT count(*) FROM leads") == 0


# -- case 8: the real server's limits ---------------------------------------------------------------------------


class QuickHead(BoundedHttpTools):
    head_timeout_s = 0.5


@contextlib.asynccontextmanager
async def served(app: Starlette, **overrides: Any) -> AsyncIterator[int]:
    """A real uvicorn on a free port, configured as `reactor web` is (SERVER_LIMITS), with `overrides`."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_config=None,
                            **{**SERVER_LIMITS, **overrides})  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        with anyio.fail_after(20):
            while not server.started:
                assert not task.done(), "the server stopped while starting"
                await anyio.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        await task


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bytes:
    """Everything the server sends until it closes the connection, which it must do within `within_s`."""
    received = b""
    with anyio.fail_after(within_s):
        while chunk := await reader.read(65536):
            received += chunk
    return received


@pytest.fixture
async def limited(settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[int]:
    hung = anyio.Event()

    async def hangs(request: Request) -> JSONResponse:
        await hung.wait()  # never set: a handler stuck on something
        raise AssertionError

    async def slow(request: Request) -> JSONResponse:
        await asyncio.sleep(1.0)  # twice QuickHead's head deadline: a request in progress is not idle
        return JSONResponse({"slow": True})

    async def times_out(request: Request) -> JSONResponse:
        await asyncio.wait_for(hung.wait(), 0.01)  # a timeout of the handler's own, not the answer's deadline
        raise AssertionError

    app = create_app(settings, Limits(body_timeout_s=0.5, request_timeout_s=3.0))  # 3 s: a busy machine
    app.router.routes.append(Route("/hangs", hangs))
    app.router.routes.append(Route("/times-out", times_out))
    app.router.routes.append(Route("/slow", slow))
    async with served(app, http=QuickHead, timeout_keep_alive=1) as port:
        yield port


async def test_a_request_head_over_16_kib_is_refused(limited: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{limited}") as http:
        assert (await http.get("/healthz", headers={"X-Fine": "a" * 8000})).status_code == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", limited)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
    answer: bytes | None = None  # None: the server closed while the client still wrote, and the kernel reset
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        await writer.drain()
        answer = await closed_by_server(reader, 10)
    assert answer is None or answer.startswith(b"HTTP/1.1 400"), answer[:100]
    writer.close()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{limited}") as http:  # and it serves on
        assert (await http.get("/healthz")).status_code == 200


async def test_a_request_head_trickled_past_16_kib_is_refused(limited: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    for _ in range(16):  # a kilobyte at a time, just past 16 KiB in all (no byte after it: no reset to race)
        writer.write(b"a" * 1024)
        await writer.drain()
    answer = await closed_by_server(reader, 10)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    writer.close()


async def test_a_request_head_over_16_kib_in_one_write_is_refused(limited: int) -> None:
    # Counted by the bytes that arrive, a head that came in one read was never counted before it was parsed.
    reader, writer = await asyncio.open_connection("127.0.0.1", limited)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
    answer = await closed_by_server(reader, 10)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    assert answer.endswith(b"Request line or headers too large.")
    writer.close()


async def test_a_small_head_and_a_large_body_in_one_write_are_served(limited: int, db: asyncpg.Pool) -> None:
    body = json.dumps({"email": "one.write@example.com", "notes": "n" * 40_000}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", limited)
    writer.write(b"POST /leads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\nX-API-Key: " + API_KEYS["webform"].encode()
                 + b"\r\n\r\n" + body)  # fmt: skip
    answer = await closed_by_server(reader, 10)
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
    writer.close()
    assert await db.fetchval("SELECT count(*) FROM leads") == 1


async def test_an_idle_keep_alive_connection_is_closed(limited: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await closed_by_server(reader, 10)  # timeout_keep_alive=1 here (5 in production)
    assert answer.startswith(b"HTTP/1.1 200")
    writer.close()


@pytest.mark.parametrize("head", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "])
async def test_a_connection_that_never_finishes_its_head_is_closed(limited: int, head: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited)
    writer.write(head)  # nothing, or a head that stops half way (a slowloris)
    started = time.monotonic()
    assert await closed_by_server(reader, 10) == b""
    assert time.monotonic() - started >= 0.4
    writer.close()


async def test_a_request_that_outlasts_the_head_deadline_is_answered_and_the_next_one_too(limited: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{limited}", timeout=10,
                                 limits=httpx.Limits(max_connections=1)) as http:  # fmt: skip
        assert (await http.get("/slow")).json() == {"slow": True}
        assert (await http.get("/healthz")).status_code == 200  # the same connection: the deadline moved on


def _request_cycles() -> int:
    gc.collect()
    return sum(1 for thing in gc.get_objects() if type(thing) is RequestResponseCycle)


async def test_answered_requests_are_not_kept_alive_by_the_server(settings: Settings, db: asyncpg.Pool) -> None:
    # A head-deadline timer per request used to hold its request for ten seconds: 2,000 requests/s kept 20,000
    # alive, and each full garbage collection scanned them all (a 200 ms pause, the p99 of intake).
    async with (
        served(create_app(settings)) as port,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=10, limits=httpx.Limits(max_connections=2)
        ) as http,
    ):
        before = _request_cycles()
        for _ in range(300):
            assert (await http.get("/healthz")).status_code == 200
        assert _request_cycles() - before <= 2  # at most the last request of each connection


async def test_a_body_that_does_not_arrive_in_time_is_a_408(limited: int, db: asyncpg.Pool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited)
    writer.write(b"POST /leads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60\r\n"
                 b"X-API-Key: " + API_KEYS["webform"].encode() + b'\r\n\r\n{"email": "slow@')  # fmt: skip
    answer = await closed_by_server(reader, 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer
    writer.close()
    assert await db.fetchval("SELECT count(*) FROM leads") == 0


async def test_an_answer_that_takes_too_long_is_a_503(limited: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{limited}", timeout=10) as http:
        answer = await http.get("/hangs")
    assert answer.status_code == 503
    assert answer.json()["error"] == "unavailable"
    assert answer.headers["Retry-After"]


async def test_a_handlers_own_timeout_is_an_error_answer_not_the_deadline(limited: int, lines: Lines) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{limited}", timeout=10) as http:
        answer = await http.get("/times-out", headers={"X-Request-ID": "req-own-timeout"})
    assert answer.status_code == 500
    assert answer.json()["error"] == "internal_error"
    assert answer.headers["X-Request-ID"] == "req-own-timeout"
    assert not [line for line in lines.lines if "request.timeout" in line["msg"]]


async def test_access_lines_carry_the_request_id_and_no_search_terms(limited: int, lines: Lines) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{limited}", headers=AUTH) as http:
        answer = await http.get("/leads/search", params={"name": "Grace Hopper", "phone": "+14155552671"})
        assert answer.status_code == 200
        for url in ("/?%74oken=src.123.deadbeef", "/metrics?api_key=deadbeef", "/?%2574oken=deadbeef"):
            assert (await http.get(url)).status_code < 500
    served = [line for line in lines.lines if line["logger"] != "httpx"]  # httpx: the test's own client
    access = [line for line in served if line["logger"] == "uvicorn.access"]
    assert len(access) == 4
    assert access[0]["request_id"] == answer.headers["X-Request-ID"]
    assert all(line.get("request_id") for line in access), access
    text = json.dumps(served)
    assert "Hopper" not in text
    assert "4155552671" not in text
    assert "deadbeef" not in text


# -- case 1: the worker outlives Redis --------------------------------------------------------------------------


async def test_the_worker_outlives_a_redis_restart(stack: Stack, db: asyncpg.Pool) -> None:
    worker = stack.processes["worker"]
    first = await post_all(stack, [{"first_name": "Before", "email": "before.restart@example.com"}])
    await until(lambda: all_synced(db, first), stack, db=db)

    stack.stop("redis", signal.SIGKILL)
    log = Path(stack.logs / "worker.log")

    async def noticed() -> bool:
        assert worker.poll() is None, f"the worker exited ({worker.returncode}):\n{stack.tail()}"
        return "worker.dependency_down" in await anyio.Path(log).read_text()

    await eventually(noticed, 30)
    stack.start_redis()  # empty: no queue, no cache

    async with httpx.AsyncClient(base_url=stack.web_url, headers={"X-API-Key": API_KEY}, timeout=10) as http:

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await eventually(ready, 30)
    second = await post_all(stack, [{"first_name": "After", "email": "after.restart@example.com"}])
    await until(lambda: all_synced(db, second), stack, db=db)
    assert worker.poll() is None, "the same worker process synced it"
    assert stack.processes["worker"] is worker


async def worker_process(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full = {**os.environ, "LEAD_API_KEYS": f"e2e:{API_KEY}", "TWENTY_REST_URL": f"http://127.0.0.1:{free_port()}/rest",
            "TWENTY_REST_TOKEN": "t", "LOG_LEVEL": "INFO", **env}  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "reactor", "worker"], env=full, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


async def exited(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is not None


async def test_a_worker_waiting_for_redis_stops_on_sigterm(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    worker = await worker_process({"DATABASE_URL": database_url, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
                                  log)  # fmt: skip
    try:

        async def waiting() -> bool:
            assert worker.poll() is None, await anyio.Path(log).read_text()
            return "worker.restart_in" in await anyio.Path(log).read_text()

        await eventually(waiting, 30)  # Redis was never there: it waits, it does not exit
        worker.send_signal(signal.SIGTERM)
        await eventually(lambda: exited(worker), 15)
        assert worker.returncode == 0, await anyio.Path(log).read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


async def test_a_worker_with_a_database_that_does_not_exist_exits_2(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    missing = urlunsplit(urlsplit(database_url)._replace(path="/reactor_no_such_db"))
    worker = await worker_process({"DATABASE_URL": missing, "REDIS_URL": redis_url}, log)
    try:
        await eventually(lambda: exited(worker), 30)
        assert worker.returncode == 2, await anyio.Path(log).read_text()
        assert "invalid configuration" in await anyio.Path(log).read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


async def test_a_stop_that_the_worker_swallowed_is_insisted_on() -> None:
    """arq's stop is one cancel; one that lands in an HTTP connect during startup came out as a handled error and
    the worker ran on after SIGTERM (seen in test_the_procfile_worker_stops_cleanly_on_sigterm on a busy machine)."""
    swallowed = asyncio.Event()

    async def main() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # what the connect turned into an error, and the hook handled
            swallowed.set()
        await asyncio.Event().wait()  # polling on, as arq's main loop does

    worker = types.SimpleNamespace(main_task=asyncio.create_task(main()), tasks={}, _job_completion_wait=20)
    await asyncio.sleep(0)
    worker.main_task.cancel()  # arq's one cancel
    with anyio.fail_after(10):
        await swallowed.wait()
        await supervisor._insist_on_stopping(worker)  # type: ignore[arg-type]
    assert worker.main_task.cancelled()


async def test_the_drain_outlives_a_postgres_outage_and_loses_nothing(
    settings: Settings, database_url: str, redis_url: str, db: asyncpg.Pool, redis: Redis
) -> None:
    """Work that met a PostgreSQL outage is not lost: the rows wait, and the loop pauses and carries on."""
    import respx

    from reactor import drain
    from reactor.resources import open_resources
    from tests.fake_twenty import BASE_URL, FakeTwenty

    proxy = TcpProxy(*target_of(database_url))
    await proxy.restore()
    configured = settings.model_copy(update={
        "database_url": through(database_url, proxy), "twenty_rest_url": BASE_URL,
        "twenty_rest_token": SecretStr("tok"), "twenty_max_attempts": 1, "twenty_rate_limit": 100_000})  # fmt: skip
    twenty = FakeTwenty()
    twenty.add_member("m1", "ann@acme.test")
    await db.execute("INSERT INTO leads (lead_id, email, api_source) VALUES ('pg1', 'pg1@example.com', 't')")
    with respx.mock(assert_all_called=False) as router:
        twenty.install(router)
        async with open_resources(configured) as res:
            await proxy.cut()  # PostgreSQL is away when the loop starts
            loop = asyncio.create_task(drain.run_forever(res))
            try:
                await asyncio.sleep(0)
                assert not loop.done()
                await proxy.restore()
                with anyio.fail_after(60):
                    while await db.fetchval("SELECT state FROM follow_ups") != "open":
                        assert not loop.done(), loop
                        await asyncio.sleep(0.1)
            finally:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
                await proxy.cut()
    assert await db.fetchval("SELECT crm_synced FROM leads WHERE lead_id = 'pg1'") is True
    assert len(twenty.tasks) == 1


async def test_a_long_job_that_meets_an_outage_is_retried(
    settings: Settings, database_url: str, db: asyncpg.Pool, redis: Redis
) -> None:
    from arq import Retry

    from reactor import worker
    from reactor.resources import open_resources

    proxy = TcpProxy(*target_of(database_url))
    await proxy.restore()
    configured = settings.model_copy(update={
        "database_url": through(database_url, proxy), "twenty_rest_url": "http://twenty.invalid/rest",
        "twenty_rest_token": SecretStr("tok")})  # fmt: skip
    async with open_resources(configured) as res:
        await proxy.cut()
        with pytest.raises(Retry):
            await worker.sync_backlog({"resources": res, "job_try": 1, "job_id": "sync_backlog:t"})
        with pytest.raises(Retry):
            await worker.auto_assign({"resources": res, "job_try": 1, "job_id": "auto_assign:t"})


async def test_the_app_refuses_middleware_beside_its_edge(settings: Settings) -> None:
    # Edge answers every error; a middleware or handler added beside it would silently never run.
    app = create_app(settings)
    app.add_middleware(GZipMiddleware)
    with pytest.raises(TypeError, match="one middleware"):
        app.build_middleware_stack()
    with pytest.raises(TypeError, match="async function"):
        Endpoint("/sync", lambda request: JSONResponse({}))
