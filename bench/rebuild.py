"""Benchmark how long a load-cache rebuild blocks Redis when the workspace has a long history: H historical
(closed) tasks and O open ones, the earlier design (one Lua swap over the whole task hash, loaded from a git
revision) beside this tree's (a short script per page of 200, then per chunk of the open set) in the same run, on
a Redis of its own. Redis runs one script at a time, so the longest script is the longest time every other
client — webhooks, picks, the rate limiter — waits. Durations are Redis's own (SLOWLOG, microseconds).

    .venv/bin/python bench/rebuild.py [--historical 1000000] [--open 10000] [--baseline 7f6dbc9] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from bench.write_path import checkout  # noqa: E402
from reactor.devstack import free_port  # noqa: E402
from reactor.loadcache import TOMBSTONE_S, LoadCache, TaskState  # noqa: E402

MEMBERS = 100
FILL_CHUNK = 10_000


def old_module(revision: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("old_loadcache", checkout(revision) / "reactor" / "loadcache.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_loadcache"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def scripts_us(redis: Redis) -> list[int]:
    entries = await redis.slowlog_get(100_000)
    return [int(e["duration"]) for e in entries if b"EVALSHA" in (e["command"] or b"").upper()[:8]]


async def baseline(redis: Redis, revision: str, historical: int, open_: int) -> dict[str, Any]:
    old = old_module(revision)
    cache = old.LoadCache(redis, load_statuses=["TODO"])
    for start in range(0, historical + open_, FILL_CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + FILL_CHUNK, historical + open_)):
                counted = 1 if i >= historical else 0
                pipe.hset("reactor:load:tasks", f"t{i}", f"member-{i % MEMBERS}|{counted}|1000|0")
            await pipe.execute()
    staging = cache.staging("bench", started_ms=2000)
    for start in range(historical, historical + open_, 200):
        await staging.add([old.TaskState(f"t{i}", f"member-{i % MEMBERS}", "TODO", 1000)
                           for i in range(start, min(start + 200, historical + open_))])  # fmt: skip
    await redis.slowlog_reset()
    started = time.perf_counter()
    await staging.swap(built_ms=3000)
    elapsed = time.perf_counter() - started
    durations = await scripts_us(redis)
    return {"design": f"baseline {revision}: one swap", "scripts": len(durations),
            "longest_script_ms": round(max(durations) / 1000, 1), "swap_wall_s": round(elapsed, 2)}  # fmt: skip


async def current(redis: Redis, historical: int, open_: int) -> dict[str, Any]:
    cache = LoadCache(redis, load_statuses=["TODO"], workspace="bench")
    for start in range(0, historical, FILL_CHUNK):  # closed tasks: tombstones that expire
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + FILL_CHUNK, historical)):
                pipe.set(cache.key(f"task:t{i}"), f"member-{i % MEMBERS}|0|1000|1", ex=TOMBSTONE_S)
            await pipe.execute()
    async with redis.pipeline(transaction=False) as pipe:  # the open tasks, as events left them
        for i in range(historical, historical + open_):
            pipe.set(cache.key(f"task:t{i}"), f"member-{i % MEMBERS}|1|1000|0")
            pipe.sadd(cache.key("open"), f"t{i}")
            pipe.hincrby(cache.key("counts"), f"member-{i % MEMBERS}", 1)
        await pipe.execute()
    await redis.slowlog_reset()
    started = time.perf_counter()
    rebuild = cache.rebuild("bench", started_ms=2000)
    for start in range(historical, historical + open_, 200):
        await rebuild.add([TaskState(f"t{i}", f"member-{i % MEMBERS}", "TODO", 1000)
                           for i in range(start, min(start + 200, historical + open_))])  # fmt: skip
    await rebuild.finish()
    elapsed = time.perf_counter() - started
    durations = await scripts_us(redis)
    return {"design": "this tree: a script per page / chunk", "scripts": len(durations),
            "longest_script_ms": round(max(durations) / 1000, 1), "rebuild_wall_s": round(elapsed, 2)}  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        await asyncio.sleep(0.5)
        async with Redis.from_url(f"redis://127.0.0.1:{port}/0") as redis:
            await redis.config_set("slowlog-log-slower-than", 0)
            await redis.config_set("slowlog-max-len", 100_000)
            report: dict[str, Any] = {"machine": machine(), "historical_tasks": args.historical, "open": args.open}
            report["baseline"] = await baseline(redis, args.baseline, args.historical, args.open)
            await redis.flushdb()
            report["current"] = await current(redis, args.historical, args.open)
            report["dataset_mib_current"] = round((await redis.info("memory"))["used_memory_dataset"] / 2**20, 1)
            return report
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--historical", type=int, default=1_000_000)
    parser.add_argument("--open", type=int, default=10_000)
    parser.add_argument("--baseline", default="7f6dbc9")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(run(arguments)), indent=None if arguments.json else 2))
