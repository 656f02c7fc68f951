"""The member-load cache on the real Redis (tasks reactor did not create), and the pure pick rules."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from redis.asyncio import Redis

from reactor import lifecycle
from reactor.loadcache import TOMBSTONE_S, LoadCache, TaskState

pytestmark = pytest.mark.anyio

MEMBERS = ["m1", "m2", "m3", "m4", "m5"]


@pytest.fixture
async def cache(redis: Redis) -> LoadCache:
    cache = LoadCache(redis, load_statuses=["TODO"], workspace="test")
    await cache.set_members(dict.fromkeys(MEMBERS, 1.0), {}, {})
    return cache


def task(task_id: str, assignee: str | None, status: str = "TODO", version: int = 1000, **kw: bool) -> TaskState:
    return TaskState(task_id=task_id, assignee_id=assignee, status=status, version_ms=version, **kw)


def test_the_lowest_load_wins_and_ties_go_to_the_least_recently_assigned() -> None:
    everyone = dict.fromkeys(MEMBERS, (1.0, 0))
    loads = {"m1": 2, "m2": 1, "m3": 1, "m4": 1}
    assert lifecycle.pick(everyone, loads, {}) == lifecycle.Choice("m5", "lowest_weighted_load")
    tied = lifecycle.pick(everyone, loads | {"m5": 1}, {"m2": 5.0, "m3": 3.0, "m4": 4.0, "m5": 6.0})
    assert tied == lifecycle.Choice("m3", "tie_least_recently_assigned")


def test_fifty_picks_in_a_row_over_five_equal_members_give_each_ten() -> None:
    picks = lifecycle.pick_many(50, dict.fromkeys(MEMBERS, (1.0, 0)), {}, {}, now=time.time())
    assert Counter(choice.member_id for choice, _ in picks) == dict.fromkeys(MEMBERS, 10)


def test_weights_divide_the_load_and_caps_are_skipped() -> None:
    weighted = {"m1": (1.0, 0), "m2": (2.0, 0)}
    picks = lifecycle.pick_many(30, weighted, {}, {}, now=0.0)
    assert Counter(choice.member_id for choice, _ in picks) == {"m1": 10, "m2": 20}
    capped = {"m1": (1.0, 2), "m2": (1.0, 0)}
    assert lifecycle.pick(capped, {"m1": 2, "m2": 9}, {}).member_id == "m2"
    assert lifecycle.pick({"m1": (1.0, 1)}, {"m1": 1}, {}) == lifecycle.Choice(None, "all_capped")
    assert lifecycle.pick({}, {}, {}).member_id is None


async def test_duplicate_and_late_events_change_nothing(cache: LoadCache) -> None:
    assert await cache.apply(task("t1", "m1", version=1000)) is True
    assert await cache.apply(task("t1", "m1", version=1000)) is False  # the same delivery again
    assert await cache.apply(task("t1", "m2", version=3000)) is True  # reassigned
    assert await cache.apply(task("t1", "m3", version=2000)) is False  # an older update, arriving late
    assert await cache.counts() == {"m2": 1}
    await cache.apply(task("t1", "m2", status="DONE", version=4000))
    assert await cache.counts() == {}


async def test_deletes_restores_and_destroys(cache: LoadCache) -> None:
    await cache.apply(task("t1", "m1", version=1000))
    # An older Twenty sends only {id, deletedAt}: the assignee comes from the cache.
    await cache.apply(TaskState("t1", None, None, 2000, deleted=True, partial=True))
    assert await cache.counts() == {}
    await cache.apply(task("t1", "m1", version=2000), restore=True)
    assert await cache.counts() == {"m1": 1}
    await cache.apply(task("t1", "m1", version=2500), destroyed=True)
    assert await cache.counts() == {}
    assert await cache.apply(task("t1", "m1", version=9000)) is False  # nothing revives a destroyed task


async def test_closed_tasks_leave_the_cache_after_a_while(cache: LoadCache, redis: Redis) -> None:
    await cache.apply(task("open", "m1", version=1000))
    await cache.apply(task("done", "m1", version=1000))
    await cache.apply(task("done", "m1", status="DONE", version=2000))
    assert await redis.ttl(cache.key("task:open")) == -1  # open: kept
    assert 0 < await redis.ttl(cache.key("task:done")) <= TOMBSTONE_S  # closed: a tombstone that expires
    members = await redis.smembers(cache.key("open"))  # type: ignore[misc]
    assert members == {b"open"}


async def test_workspaces_do_not_share_members_or_loads(cache: LoadCache, redis: Redis) -> None:
    await cache.apply(task("t1", "m1"))
    other = LoadCache(redis, load_statuses=["TODO"], workspace="another")
    assert (await other.members(), await other.counts()) == ({}, {})


async def test_a_rebuild_keeps_newer_events_and_drops_lost_closings(cache: LoadCache) -> None:
    await cache.apply(task("closed-unseen", "m1", version=500))  # its DONE event was lost
    await cache.apply(task("moved", "m3", version=9000))  # an event newer than the listing
    await cache.apply(task("right", "m4", version=700))
    rebuild = cache.rebuild("run1", started_ms=2000)
    await rebuild.add([task("listed", "m2", version=1000), task("right", "m4", version=700)])
    await rebuild.add([task("moved", "m2", version=1500)])
    await rebuild.finish()
    assert await cache.counts() == {"m2": 1, "m3": 1, "m4": 1}  # m1's lost closing dropped; "moved" stays with m3
    assert (rebuild.unknown, rebuild.corrected, rebuild.listed) == (1, 1, 3)
    assert await cache.is_built()


async def test_a_compare_only_rebuild_changes_nothing(cache: LoadCache) -> None:
    await cache.apply(task("t1", "m1", version=500))
    rebuild = cache.rebuild("dry", started_ms=2000, apply=False)
    await rebuild.add([task("t2", "m2", version=1000)])
    await rebuild.finish()
    assert rebuild.counts_from_listing == {"m2": 1}
    assert (rebuild.unknown, rebuild.corrected) == (1, 1)
    assert await cache.counts() == {"m1": 1}
    assert not await cache.is_built()


async def test_a_rebuild_over_many_open_tasks_works_a_chunk_per_script(cache: LoadCache, redis: Redis) -> None:
    for i in range(1200):
        await cache.apply(task(f"old{i}", MEMBERS[i % 5], version=100))
    rebuild = cache.rebuild("big", started_ms=2000)
    await rebuild.add([task(f"old{i}", MEMBERS[i % 5], version=100) for i in range(600)])
    await rebuild.finish()  # the other 600 were closed while their events were lost
    assert sum((await cache.counts()).values()) == 600
    assert rebuild.corrected == 600
    assert await redis.scard(cache.key("open")) == 600  # type: ignore[misc]
