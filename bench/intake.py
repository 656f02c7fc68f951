"""Benchmark POST /leads: reactor's `web` process beside the bare stack it is built on and older designs, one
web process each, each on a fresh database, driven the same way in one run.

70 % of the requests are new people, 30 % repeat an earlier one (the dedupe path). Prints requests/s and latency
percentiles per server (the median of `--rounds` interleaved rounds), reactor's share of the bare stack's
requests/s, and the outcome of every run: one row per person, every submission recorded.

    .venv/bin/python bench/intake.py --ceiling --baseline [--before main] [--profile] [--json]

Servers: `reactor` (`reactor web` as shipped), `--ceiling` (bench/ceiling_intake.py: Starlette + an asyncpg
pool + one INSERT … ON CONFLICT), `--baseline` (bench/baseline_intake.py: the seed's connection-per-request,
look-then-insert design), `--before REF` (reactor web from git REF, e.g. before a change).

The load comes from wrk (Debian package `wrk`; bench/intake.lua) with `--connections` for `--duration` seconds,
or from a built-in httpx driver when wrk is missing. The load generator shares the machine's CPUs with the
servers and PostgreSQL. `--profile` samples the reactor process with py-spy during its run and prints where the
time goes, stage by stage (docs/intake-performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, percentile, scratch_database, scratch_redis_url, servers  # noqa: E402
from reactor.devstack import free_port  # noqa: E402

# Served as `reactor web` serves (reactor.server: httptools; uvloop; no access log), so the
# ratio measures the app's own work.
UVICORN_LIKE_REACTOR = ["--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning"]


def lead(person: int) -> dict[str, object]:
    return {
        "first_name": f"Bench{person}",
        "last_name": "Person",
        "email": f"bench.0.{person}@example.com",
        **({"phone": f"+1415555{person:04d}"} if person <= 4000 else {}),
        "address": {"city": "San Francisco", "country": "US"},
        "current_credit": 2500,
        "utm_source": "bench",
    }


async def drive_httpx(base_url: str, key: str, duration_s: float, concurrency: int) -> dict[str, object]:
    """The fallback load generator: `concurrency` keep-alive connections for `duration_s` seconds."""
    rng = random.Random(2)
    made = 0
    latencies: list[float] = []
    statuses: collections.Counter[int | str] = collections.Counter()
    deadline = time.perf_counter() + duration_s
    async with httpx.AsyncClient(base_url=base_url, headers={"X-API-Key": key}, timeout=30,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:  # fmt: skip

        async def worker() -> None:
            nonlocal made
            while time.perf_counter() < deadline:
                if made and rng.random() < 0.30:
                    person = rng.randrange(1, made + 1)
                else:
                    made += 1
                    person = made
                started = time.perf_counter()
                try:
                    outcome: int | str = (await http.post("/leads", json=lead(person))).status_code
                except httpx.TransportError as exc:
                    outcome = type(exc).__name__
                latencies.append(time.perf_counter() - started)
                statuses[outcome] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    bad = sum(n for status, n in statuses.items() if not (isinstance(status, int) and status < 300))
    return {"people": made, "requests": len(latencies), "non_2xx": bad, "errors": 0,
            "p50_us": percentile(latencies, 0.5) * 1e6, "p90_us": percentile(latencies, 0.9) * 1e6,
            "p99_us": percentile(latencies, 0.99) * 1e6}  # fmt: skip


async def drive_wrk(base_url: str, key: str, duration_s: float, connections: int) -> dict[str, object]:
    script = Path(__file__).with_name("intake.lua")
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s", "-s", str(script), base_url,
        env={**os.environ, "BENCH_KEY": key}, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    line = next((line for line in out.decode().splitlines() if line.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"wrk gave no result:\n{out.decode()}")
    result: dict[str, object] = json.loads(line.removeprefix("BENCH "))
    return result


async def wait_ready(base_url: str, process: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=1) as http:
        for _ in range(300):
            if process.returncode is not None:
                raise SystemExit(f"server exited with {process.returncode}")
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("server did not become ready")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return round(kib / 1024, 1) if kib else None


def command(kind: str, port: int, before: Path | None) -> tuple[list[str], Path]:
    here = ["--host", "127.0.0.1", "--port", str(port)]
    if kind == "reactor":
        return ["-m", "reactor", "web", *here], ROOT
    if kind == "before":
        assert before is not None
        return ["-m", "reactor", "web", *here], before
    module = {"ceiling": "bench.ceiling_intake:app", "baseline": "bench.baseline_intake:app"}[kind]
    return ["-m", "uvicorn", module, *here, *UVICORN_LIKE_REACTOR], ROOT


async def measure(
    kind: str, args: argparse.Namespace, pg_url: str, redis_url: str, before: Path | None
) -> dict[str, object]:
    """One server on a fresh database, warmed up, then driven for `args.duration` seconds."""
    async with scratch_database(pg_url) as database_url:
        key = secrets.token_urlsafe(16)
        port = free_port()
        env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "LEAD_API_KEYS": f"bench:{key}",
               "LOG_LEVEL": "WARNING", "DB_POOL_SIZE": str(args.pool)}  # fmt: skip
        env.pop("TWENTY_REST_URL", None)
        if kind == "before":
            env["PYTHONPATH"] = str(before)
        argv, cwd = command(kind, port, before)
        process = await asyncio.create_subprocess_exec(sys.executable, *argv, env=env, cwd=cwd)
        drive = drive_wrk if args.driver == "wrk" else drive_httpx
        profile: dict[str, float] = {}
        try:
            base_url = f"http://127.0.0.1:{port}"
            await wait_ready(base_url, process)
            await drive(base_url, key, 2, args.connections)  # warm-up: connections, caches, prepared statements
            async with Redis.from_url(redis_url) as redis:
                await redis.flushdb()
            await _truncate(database_url)
            backends = await _backends(database_url)
            cpu_before = cpu_s(process.pid)
            pg_before = sum(cpu_s(pid) for pid in backends)
            with _profiled(process.pid, args.duration, enabled=args.profile and kind != "ceiling") as profile:
                load = await drive(base_url, key, args.duration, args.connections)
            cpu_used = cpu_s(process.pid) - cpu_before
            pg_used = sum(cpu_s(pid) for pid in backends) - pg_before
            rss = rss_mib(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
            async with Redis.from_url(redis_url) as redis:
                await redis.flushdb()
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetchval("SELECT count(*) FROM leads")
            submissions = await conn.fetchval("SELECT count(*) FROM lead_submissions")
        finally:
            await conn.close()
    requests = int(load["requests"])  # type: ignore[call-overload]
    report: dict[str, object] = {
        "requests_per_s": round(requests / args.duration, 1),
        "p50_ms": round(float(load["p50_us"]) / 1000, 2),  # type: ignore[arg-type]
        "p90_ms": round(float(load["p90_us"]) / 1000, 2),  # type: ignore[arg-type]
        "p99_ms": round(float(load["p99_us"]) / 1000, 2),  # type: ignore[arg-type]
        "web_cpu_ms_per_request": round(1000 * cpu_used / max(requests, 1), 3),
        # The PostgreSQL backends serving the web process's pool (a local server only; a connection opened during
        # the run is not counted): the database's side of each request.
        "pg_cpu_ms_per_request": round(1000 * pg_used / max(requests, 1), 3),
        "requests": requests,
        "non_2xx": load["non_2xx"],
        "socket_errors": load["errors"],
        "people": load["people"],
        "leads_rows": rows,
        "submission_rows": submissions,
        "web_rss_mib": rss,
    }
    if profile:
        report["profile"] = profile
    return report


async def _backends(database_url: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                "AND pid <> pg_backend_pid()")  # fmt: skip
    finally:
        await conn.close()
    return [row["pid"] for row in rows]


async def _truncate(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE leads, lead_submissions CASCADE")
    finally:
        await conn.close()


# -- profile ------------------------------------------------------------------------------------------------

# Each sample goes to the first stage that matches a frame, from the innermost frame out.
STAGES = (
    ("normalise: email", ("email_validator/", "idna/")),
    ("normalise: phone", ("phonenumbers/",)),
    ("pydantic validation", ("pydantic/", "pydantic_core", "model_validate")),
    ("SQL round trip (asyncpg)", ("asyncpg/", "reactor/store.py")),
    ("sync enqueue (arq, Redis)", ("arq/", "redis/", "reactor/jobs.py")),
    ("auth (key check)", ("reactor/api/auth.py",)),
    ("metrics", ("prometheus_client/", "reactor/metrics.py")),
    ("logging", ("logging/", "reactor/logs.py")),
    ("JSON parse", ("json/decoder.py", "json/__init__.py (loads)", "loads (json")),
    ("JSON answer", ("json/encoder.py", "render (starlette/responses.py", "dumps (json")),
    ("body read", ("reactor/api/inputs.py",)),
    ("reactor route", ("reactor/api/leads.py", "reactor/intake.py", "reactor/models.py")),
    ("edge middleware (request id, deadlines, errors)", ("reactor/app.py",)),
    ("Starlette routing, requests, responses", ("starlette/",)),
    ("HTTP protocol (uvicorn, httptools)", ("uvicorn/", "httptools")),
    ("event loop (uvloop, asyncio)", ("uvloop", "asyncio/")),
)


@contextlib.contextmanager
def _profiled(pid: int, duration_s: float, *, enabled: bool) -> Iterator[dict[str, float]]:
    """py-spy over the web process for the measured run; yields the share of samples per stage (filled in at
    the end). Needs py-spy (pip) and ptrace rights."""
    shares: dict[str, float] = {}
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not enabled or not Path(spy).exists():
        yield shares
        return
    out = Path(tempfile.gettempdir()) / f"reactor-intake-profile-{pid}.txt"  # kept: py-spy's raw stacks
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(duration_s)), "--rate", "200",
                             "--format", "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield shares
    finally:
        proc.wait(timeout=duration_s + 30)
        shares.update(_stage_shares(out.read_text() if out.exists() else ""))
        print(f"profile: {out} (py-spy raw: one stack a line, then its samples)", file=sys.stderr)


def _stage_shares(collapsed: str) -> dict[str, float]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        samples = int(number)
        total += samples
        frames = stack.split(";")
        stage = next((name for frame in reversed(frames) for name, marks in STAGES if any(m in frame for m in marks)),
                     "other")  # fmt: skip
        counts[stage] += samples
    return {name: round(100 * n / total, 1) for name, n in counts.most_common()} if total else {}


# -- main ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tree(ref: str | None) -> Iterator[Path | None]:
    """The source tree of git `ref`, extracted to a temporary directory (None when no ref is given)."""
    if ref is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="reactor-before-") as tmp:
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


async def main(args: argparse.Namespace) -> dict[str, object]:
    kinds = ["reactor"]
    if args.before:
        kinds.append("before")
    if args.ceiling:
        kinds.insert(0, "ceiling")
    if args.baseline:
        kinds.append("baseline")
    with servers() as (pg, rd), _tree(args.before) as before:
        redis_url = scratch_redis_url(rd.url)
        report: dict[str, object] = {"machine": machine(), "postgres": pg.origin, "driver": args.driver,
                                     "connections": args.connections, "duration_s": args.duration}  # fmt: skip
        runs: dict[str, list[dict[str, object]]] = {kind: [] for kind in kinds}
        for _ in range(args.rounds):  # interleaved, so a neighbour's load spike hits every server alike
            for kind in kinds:
                runs[kind].append(await measure(kind, args, pg.url, redis_url, before))
        for kind, done in runs.items():
            done.sort(key=lambda run: float(run["requests_per_s"]))  # type: ignore[arg-type]
            median = dict(done[len(done) // 2])
            median["requests_per_s_all_rounds"] = [run["requests_per_s"] for run in done]
            report[kind if kind != "before" else f"before ({args.before})"] = median
    ceiling = report.get("ceiling")
    if isinstance(ceiling, dict):
        mine = report["reactor"]
        assert isinstance(mine, dict)
        report["reactor_share_of_ceiling"] = f"{100 * mine['requests_per_s'] / ceiling['requests_per_s']:.0f} %"
    before_key = f"before ({args.before})"
    if args.before and isinstance(report.get(before_key), dict):
        old, new = report[before_key], report["reactor"]
        assert isinstance(old, dict)
        assert isinstance(new, dict)
        report["reactor_vs_before"] = f"{100 * new['requests_per_s'] / old['requests_per_s']:.0f} %"
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per server")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median round is reported")
    parser.add_argument("--pool", type=int, default=10, help="DB_POOL_SIZE of each web process")
    parser.add_argument("--ceiling", action="store_true", help="also measure the bare stack (bench/ceiling_intake.py)")
    parser.add_argument("--baseline", action="store_true", help="also measure the seed's design (baseline_intake.py)")
    parser.add_argument("--before", metavar="REF", help="also measure `reactor web` from this git ref")
    parser.add_argument("--profile", action="store_true", help="py-spy the reactor processes; print stage shares")
    parser.add_argument("--driver", choices=("wrk", "httpx"), default="wrk" if shutil.which("wrk") else "httpx")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    if arguments.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>26}: {value}")
