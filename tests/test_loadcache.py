"""The member-load cache on the real Redis: task events, picks, reservations and rebuilds."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from redis.asyncio import Redis

from reactor.loadcache import LoadCache, TaskState

pytestmark = pytest.mark.anyio

MEMBERS = ["m1", "m2", "m3", "m4", "m5"]


@pytest.fixture
async def cache(redis: Redis) -> LoadCache:
    cache = LoadCache(redis, load_statuses=["TODO"])
    await cache.set_members(dict.fromkeys(MEMBERS, 1.0))
    return cache


def task(task_id: str, assignee: str | None, status: str = "TODO", version: int = 1000, **kw: bool) -> TaskState:
    return TaskState(task_id=task_id, assignee_id=assignee, status=status, version_ms=version, **kw)


async def test_fifty_concurrent_picks_over_five_equal_members_give_each_ten(cache: LoadCache) -> None:
    picks = await asyncio.gather(*(cache.pick(f"r{i}") for i in range(50)))
    per_member = Counter(pick.member_id for pick in picks if pick is not None)
    assert per_member == dict.fromkeys(MEMBERS, 10)
    assert await cache.loads() == dict.fromkeys(MEMBERS, 10)


async def test_the_lowest_load_wins_and_ties_go_to_the_least_recently_assigned(cache: LoadCache) -> None:
    for i, member in enumerate(["m1", "m1", "m2", "m3", "m4"]):
        await cache.apply(task(f"t{i}", member))
    first = await cache.pick("a")
    assert first is not None
    assert first.member_id == "m5"
    assert first.loads_seen == {"m1": 2, "m2": 1, "m3": 1, "m4": 1, "m5": 0}
    second = await cache.pick("b")  # m2, m3, m4, m5 all at 1; m5 was just assigned, m2..m4 never
    assert second is not None
    assert second.member_id == "m2"


async def test_picking_twice_with_one_reservation_is_one_assignment(cache: LoadCache) -> None:
    first, again = await cache.pick("same"), await cache.pick("same")
    assert first is not None
    assert again is not None
    assert first.member_id == again.member_id
    assert sum((await cache.loads()).values()) == 1


async def test_weights_divide_the_load(cache: LoadCache) -> None:
    await cache.set_members({"big": 2.0, "small": 1.0})
    picks = [await cache.pick(f"r{i}") for i in range(9)]
    assert Counter(p.member_id for p in picks if p) == {"big": 6, "small": 3}


async def test_no_eligible_member_is_none(cache: LoadCache) -> None:
    await cache.set_members({})
    assert (await cache.pick("r")).member_id is None


async def test_capped_members_are_skipped(cache: LoadCache) -> None:
    await cache.apply(task("t1", "m1"))
    await cache.apply(task("t2", "m1"))
    pick = await cache.pick("r1", {"m1": (1.0, 2), "m2": (1.0, 1)})
    assert (pick.member_id, pick.rule) == ("m2", "lowest_weighted_load")
    full = await cache.pick("r2", {"m1": (1.0, 2), "m2": (1.0, 1)})  # m1 at its cap of 2, m2 now at 1
    assert (full.member_id, full.rule, full.loads_seen) == (None, "all_capped", {"m1": 2, "m2": 1})


async def test_duplicate_and_late_events_change_nothing(cache: LoadCache) -> None:
    assert await cache.apply(task("t1", "m1", version=1000)) is True
    assert await cache.apply(task("t1", "m1", version=1000)) is False  # the same delivery again
    assert await cache.apply(task("t1", "m2", version=3000)) is True  # reassigned
    assert await cache.apply(task("t1", "m3", version=2000)) is False  # an older update, arriving late
    assert await cache.loads() == {"m2": 1}
    await cache.apply(task("t1", "m2", status="DONE", version=4000))
    assert await cache.loads() == {}


async def test_deletes_restores_and_destroys(cache: LoadCache) -> None:
    await cache.apply(task("t1", "m1", version=1000))
    # An older Twenty sends only {id, deletedAt}: the assignee comes from the cache.
    await cache.apply(TaskState("t1", None, None, 2000, deleted=True, partial=True))
    assert await cache.loads() == {}
    await cache.apply(task("t1", "m1", version=2000), restore=True)
    assert await cache.loads() == {"m1": 1}
    await cache.apply(task("t1", "m1", version=2500), destroyed=True)
    assert await cache.loads() == {}
    assert await cache.apply(task("t1", "m1", version=9000)) is False  # nothing revives a destroyed task


async def test_a_reservation_becomes_the_task_whichever_comes_first(cache: LoadCache) -> None:
    # Our own task's webhook after the confirmation: counted once.
    pick = await cache.pick("t-own")
    assert pick is not None
    await cache.confirm("t-own", 5000)
    await cache.apply(task("t-own", pick.member_id, version=5000))
    # And before it: still counted once.
    early = await cache.pick("t-early")
    assert early is not None
    await cache.apply(task("t-early", early.member_id, version=6000))
    await cache.confirm("t-early", 6000)
    loads = await cache.loads()
    assert sum(loads.values()) == 2
    assert loads[pick.member_id] == 1


async def test_a_failed_creation_releases_its_reservation(cache: LoadCache) -> None:
    pick = await cache.pick("doomed")
    assert pick is not None
    assert await cache.release("doomed") is True
    assert await cache.release("doomed") is False
    assert await cache.loads() == {}


async def test_a_rebuild_keeps_newer_events_and_drops_lost_closings(cache: LoadCache) -> None:
    await cache.apply(task("closed-unseen", "m1", version=500))  # its DONE event was lost
    await cache.apply(task("moved", "m3", version=9000))  # an event newer than the listing
    pending = await cache.pick("pending")  # a reservation in flight survives
    assert pending is not None
    staging = cache.staging("run1", started_ms=2000)
    await staging.add([task("listed", "m2", version=1000)])
    await staging.add([task("moved", "m2", version=1500)])

    rebuilt = await staging.swap(built_ms=2500)

    assert rebuilt.before["m1"] == 1
    expected = Counter({"m2": 1, "m3": 1}) + Counter({pending.member_id: 1})
    assert await cache.loads() == dict(expected)  # m1's lost closing is dropped; "moved" stays with m3
    assert rebuilt.after == dict(expected)
    assert (rebuilt.unknown_tasks, rebuilt.corrected) == (1, 1)
    assert rebuilt.drift["m1"] == (1, 0)
    assert await cache.is_built()


async def test_a_compare_only_rebuild_changes_nothing(cache: LoadCache) -> None:
    await cache.apply(task("t1", "m1", version=500))
    staging = cache.staging("dry", started_ms=2000)
    await staging.add([task("t2", "m2", version=1000)])
    rebuilt = await staging.swap(built_ms=2500, apply=False)
    assert rebuilt.drift == {"m1": (1, 0), "m2": (0, 1)}
    assert await cache.loads() == {"m1": 1}
    assert not await cache.is_built()


async def test_a_confirmation_without_its_reservation_still_counts_the_task(cache: LoadCache) -> None:
    await cache.confirm("lost-reservation", 5000, "m2")  # Redis restarted between the pick and the confirm
    await cache.apply(task("lost-reservation", "m2", version=5000))  # its webhook: already counted
    await cache.confirm("lost-reservation", 5000, "m2")  # a retry: still once
    assert await cache.loads() == {"m2": 1}
