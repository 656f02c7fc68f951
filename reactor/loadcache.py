"""The member-load cache in Redis: open tasks per workspace member, kept current by Twenty's task events, so
picking an assignee costs no CRM call.

Keys (all under `reactor:load:`):
  tasks     hash  task id -> "assignee|counted|version|deleted": the last known state of every task seen
  counts    hash  member id -> open tasks (+ reservations) assigned to them
  reserved  hash  task id -> member: assignments made but not yet confirmed by Twenty
  members   hash  member id -> capacity weight: who may be picked
  last      hash  member id -> sequence of their last assignment (ties go to the least recently assigned)
  seq       counter for `last`
  built     when the cache was last rebuilt from Twenty
  events    how many task events have changed it
  staging:<run>  a rebuild's listing of Twenty's open tasks, merged into `tasks` by one atomic swap

Every change is one Lua script, so concurrent events, picks and rebuilds never interleave inside one. An event
carries the task's new state only, so the old state is read from `tasks`; an event no newer than what is stored
(a duplicate, or one that arrived late) changes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

log = logging.getLogger("reactor.loadcache")

PREFIX = "reactor:load:"
KEYS = [f"{PREFIX}{name}" for name in ("tasks", "counts", "reserved", "members", "last", "seq", "built", "events")]
TERMINAL = 9_000_000_000_000_000  # the version of a destroyed task: nothing after it applies

_LIB = """
local function parse(entry)
  local a, c, v, d = string.match(entry, '^(.-)|(%d)|(%d+)|(%d)$')
  return a, tonumber(c), tonumber(v), tonumber(d)
end
local function bump(member, by)
  if member ~= '' then redis.call('HINCRBY', KEYS[2], member, by) end
end
"""

# ARGV: task id, assignee ('' if none), open (1/0), version (ms), deleted (1/0), mode ('full'|'partial'|'restore')
_APPLY = (
    _LIB
    + """
local id, assignee, open, version, deleted, mode = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5]), ARGV[6]
local entry = redis.call('HGET', KEYS[1], id)
local old_assignee, old_counted, old_version = '', 0, -1
if entry then
  old_assignee, old_counted, old_version = parse(entry)
  if version < old_version or (version == old_version and mode ~= 'restore') then return 0 end
  if mode == 'partial' then assignee = old_assignee end
end
local counted = 0
if open == 1 and deleted == 0 and assignee ~= '' then counted = 1 end
if old_counted == 1 then bump(old_assignee, -1) end
if counted == 1 then bump(assignee, 1) end
redis.call('HSET', KEYS[1], id, assignee .. '|' .. counted .. '|' .. string.format('%d', version) .. '|' .. deleted)
redis.call('INCR', KEYS[8])
return 1
"""
)

# ARGV: reservation (= task) id, then (member, weight, cap) for each candidate (cap 0: none). A capped member is
# skipped. Returns {member or '', loads-json of every candidate, rule}.
_PICK = """
local existing = redis.call('HGET', KEYS[3], ARGV[1])
if existing then return {existing, '{}', 'reserved_before'} end
local best, best_score, best_last = nil, nil, nil
local seen, scores = {}, {}
for i = 2, #ARGV, 3 do
  local member, weight, cap = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local load = tonumber(redis.call('HGET', KEYS[2], member) or '0')
  seen[member] = load
  if cap == 0 or load < cap then
    local last = tonumber(redis.call('HGET', KEYS[5], member) or '0')
    local score = load / weight
    scores[member] = score
    if best == nil or score < best_score or (score == best_score and (last < best_last
        or (last == best_last and member < best))) then
      best, best_score, best_last = member, score, last
    end
  end
end
if best == nil then return {'', cjson.encode(seen), 'all_capped'} end
local tied = 0
for _, score in pairs(scores) do if score == best_score then tied = tied + 1 end end
redis.call('HINCRBY', KEYS[2], best, 1)
redis.call('HSET', KEYS[5], best, redis.call('INCR', KEYS[6]))
redis.call('HSET', KEYS[3], ARGV[1], best)
local rule = 'lowest_weighted_load'
if tied > 1 then rule = 'tie_least_recently_assigned' end
return {best, cjson.encode(seen), rule}
"""

# ARGV: task id, version, assignee. Twenty has the task, at this version, assigned to `assignee`: the reservation
# (if Redis still has it) stops counting and the task counts instead, once, against that assignee. A task event
# that already counted it (perhaps against an earlier assignee) is corrected; one newer than this version wins.
_CONFIRM = (
    _LIB
    + """
local id, version, assignee = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local reserved = redis.call('HGET', KEYS[3], id)
if reserved then
  redis.call('HDEL', KEYS[3], id)
  bump(reserved, -1)
  if assignee == '' then assignee = reserved end
end
local entry = redis.call('HGET', KEYS[1], id)
if entry then
  local old_assignee, old_counted, old_version, old_deleted = parse(entry)
  if old_version > version or (old_assignee == assignee and old_counted == 1) then return 1 end
  if old_counted == 1 then bump(old_assignee, -1) end
end
if assignee ~= '' then
  bump(assignee, 1)
  redis.call('HSET', KEYS[1], id, assignee .. '|1|' .. string.format('%d', version) .. '|0')
end
return 1
"""
)

# ARGV: task id, member. A reservation made by rule rather than by load (the fallback assignee).
_RESERVE = (
    _LIB
    + """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
bump(ARGV[2], 1)
return 1
"""
)

_RELEASE = (
    _LIB
    + """
local member = redis.call('HGET', KEYS[3], ARGV[1])
if not member then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
bump(member, -1)
return 1
"""
)

# KEYS[9]: the staging hash a rebuild filled (task id -> "assignee|version"), page by page, while events flowed.
# ARGV: started (ms) - when the listing began; built-at (ms); apply (1) or only compare (0).
# Live entries newer than the listing win (events that arrived meanwhile); a live open task that was not listed and
# is older than the listing was closed while its event was lost. Counts are recomputed whole, reservations included.
# Returns {before counts, after counts, tasks listed that the cache did not know, live entries corrected}.
_SWAP = (
    _LIB
    + """
local started, apply = tonumber(ARGV[1]), ARGV[3] == '1'
local staged = redis.call('HGETALL', KEYS[9])
local listed, unknown, corrected = {}, 0, 0
local merged = {}
for i = 1, #staged, 2 do
  local id = staged[i]
  local assignee, version = string.match(staged[i + 1], '^(.-)|(%d+)$')
  version = tonumber(version)
  listed[id] = true
  local entry = redis.call('HGET', KEYS[1], id)
  local keep = false
  if entry then
    local old_assignee, old_counted, old_version = parse(entry)
    keep = old_version > version
    if not keep and (old_assignee ~= assignee or old_counted ~= 1) then corrected = corrected + 1 end
  else
    unknown = unknown + 1
  end
  if not keep then
    local counted = 0
    if assignee ~= '' then counted = 1 end
    merged[id] = assignee .. '|' .. counted .. '|' .. string.format('%d', version) .. '|0'
  end
end
local counts = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local id = all[i]
  local value = merged[id] or all[i + 1]
  merged[id] = nil
  local assignee, counted, version, deleted = parse(value)
  if counted == 1 and not listed[id] and version < started then
    counted = 0
    corrected = corrected + 1
    value = assignee .. '|0|' .. string.format('%d', version) .. '|' .. deleted
  end
  if apply then redis.call('HSET', KEYS[1], id, value) end
  if counted == 1 and assignee ~= '' then counts[assignee] = (counts[assignee] or 0) + 1 end
end
for id, value in pairs(merged) do
  local assignee, counted = parse(value)
  if apply then redis.call('HSET', KEYS[1], id, value) end
  if counted == 1 and assignee ~= '' then counts[assignee] = (counts[assignee] or 0) + 1 end
end
local reserved = redis.call('HGETALL', KEYS[3])
for i = 1, #reserved, 2 do counts[reserved[i + 1]] = (counts[reserved[i + 1]] or 0) + 1 end
local before = redis.call('HGETALL', KEYS[2])
local after = {}
for member, n in pairs(counts) do table.insert(after, member); table.insert(after, n) end
if apply then
  redis.call('DEL', KEYS[2])
  for member, n in pairs(counts) do redis.call('HSET', KEYS[2], member, n) end
  redis.call('SET', KEYS[7], ARGV[2])
end
redis.call('DEL', KEYS[9])
return {before, after, unknown, corrected}
"""
)


@dataclass(frozen=True)
class Rebuilt:
    before: dict[str, int]  # member -> load the cache had
    after: dict[str, int]  # member -> load Twenty's tasks give (with events that arrived meanwhile)
    unknown_tasks: int  # open tasks in Twenty the cache had never seen
    corrected: int  # cache entries that were wrong (lost events)

    @property
    def drift(self) -> dict[str, tuple[int, int]]:
        """member -> (cached, true), for the members whose load was wrong."""
        members = self.before.keys() | self.after.keys()
        return {m: (self.before.get(m, 0), self.after.get(m, 0)) for m in sorted(members)
                if self.before.get(m, 0) != self.after.get(m, 0)}  # fmt: skip


class Staging:
    """A rebuild in progress: Twenty's open tasks are staged page by page (memory stays one page), then merged
    with the live cache in one atomic swap."""

    def __init__(self, cache: LoadCache, run_id: str, started_ms: int) -> None:
        self._cache = cache
        self.key = f"{PREFIX}staging:{run_id}"
        self.started_ms = started_ms
        self.staged = 0

    async def add(self, tasks: Iterable[TaskState]) -> None:
        entries = {t.task_id: f"{t.assignee_id or ''}|{t.version_ms}" for t in tasks}
        if entries:
            redis = self._cache._redis
            await redis.hset(self.key, mapping=entries)  # type: ignore[misc]
            await redis.expire(self.key, 3600)
            self.staged += len(entries)

    async def swap(self, *, built_ms: int, apply: bool = True) -> Rebuilt:
        raw = await self._cache._swap(keys=[*KEYS, self.key], args=[self.started_ms, built_ms, 1 if apply else 0])
        before, after, unknown, corrected = raw
        return Rebuilt(_pairs(before), _pairs(after), int(unknown), int(corrected))


def _pairs(flat: list[Any]) -> dict[str, int]:
    items = [item.decode() if isinstance(item, bytes) else item for item in flat]
    return {str(items[i]): int(items[i + 1]) for i in range(0, len(items), 2)}


@dataclass(frozen=True)
class TaskState:
    """A task as an event (or a listing) shows it."""

    task_id: str
    assignee_id: str | None
    status: str | None
    version_ms: int  # updatedAt (or deletedAt when later) in ms: orders events of one task
    deleted: bool = False
    partial: bool = False  # the record held only id/deletedAt (older Twenty): keep the known assignee


@dataclass(frozen=True)
class Pick:
    member_id: str | None  # None: every candidate was capped (or there were none)
    loads_seen: dict[str, int]
    rule: str = "lowest_weighted_load"  # or tie_least_recently_assigned, all_capped, reserved_before


def to_ms(value: str | datetime | None) -> int:
    if value is None:
        return 0
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(moment.timestamp() * 1000)


class LoadCache:
    def __init__(self, redis: Redis, *, load_statuses: Iterable[str]) -> None:
        self._redis = redis
        self._load_statuses = frozenset(load_statuses)
        self._apply = redis.register_script(_APPLY)
        self._pick = redis.register_script(_PICK)
        self._confirm = redis.register_script(_CONFIRM)
        self._release = redis.register_script(_RELEASE)
        self._reserve = redis.register_script(_RESERVE)
        self._swap = redis.register_script(_SWAP)

    def counts_as_load(self, status: str | None) -> bool:
        return status in self._load_statuses

    async def apply(self, state: TaskState, *, restore: bool = False, destroyed: bool = False) -> bool:
        """Apply one task event; False when it was stale or a duplicate."""
        mode = "restore" if restore else "partial" if state.partial else "full"
        version = TERMINAL if destroyed else state.version_ms
        open_ = 1 if self.counts_as_load(state.status) else 0
        deleted = 1 if state.deleted or destroyed else 0
        args: list[str | int] = [state.task_id, state.assignee_id or "", open_, version, deleted, mode]
        return bool(await self._apply(keys=KEYS, args=args))

    async def pick(self, reservation_id: str, candidates: Mapping[str, tuple[float, int]] | None = None) -> Pick:
        """Reserve the candidate (member -> (weight, cap)) with the lowest load / weight, skipping capped ones;
        ties go to the least recently assigned. Without candidates: every member, uncapped. Picking twice with
        one reservation id returns the same member. `member_id` is None when every candidate is capped."""
        if candidates is None:
            candidates = {member: (weight, 0) for member, weight in (await self.members()).items()}
        args: list[str | int | float] = [reservation_id]
        for member, (weight, cap) in sorted(candidates.items()):
            args += [member, weight, cap]
        member, loads, rule = await self._pick(keys=KEYS, args=args)
        chosen = member.decode() if isinstance(member, bytes) else str(member)
        rule_name = rule.decode() if isinstance(rule, bytes) else str(rule)
        return Pick(chosen or None, json.loads(loads) if loads not in (b"[]", "[]") else {}, rule_name)

    async def confirm(self, task_id: str, version_ms: int, assignee_id: str | None = None) -> None:
        """Twenty created the reserved task (its id is the reservation id), assigned to `assignee_id`."""
        await self._confirm(keys=KEYS, args=[task_id, version_ms, assignee_id or ""])

    async def reserve(self, reservation_id: str, member: str) -> None:
        await self._reserve(keys=KEYS, args=[reservation_id, member])

    async def member_ids_by_email(self) -> dict[str, str]:
        raw: dict[bytes, bytes] = await self._redis.hgetall(f"{PREFIX}emails")  # type: ignore[misc]
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def set_emails(self, ids_by_email: Mapping[str, str]) -> None:
        if ids_by_email:
            await self._redis.hset(f"{PREFIX}emails", mapping=dict(ids_by_email))  # type: ignore[misc]

    async def release(self, reservation_id: str) -> bool:
        return bool(await self._release(keys=KEYS, args=[reservation_id]))

    async def set_members(self, weights: Mapping[str, float]) -> None:
        """Replace the eligible members (member id -> capacity weight), atomically."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(f"{PREFIX}members")
            if weights:
                pipe.hset(f"{PREFIX}members", mapping=dict(weights))
            await pipe.execute()

    async def set_names(self, names: Mapping[str, str]) -> None:
        """Display names of members (for the dashboard)."""
        if names:
            await self._redis.hset(f"{PREFIX}names", mapping=dict(names))  # type: ignore[misc]

    async def names(self) -> dict[str, str]:
        raw: dict[bytes, bytes] = await self._redis.hgetall(f"{PREFIX}names")  # type: ignore[misc]
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def members(self) -> dict[str, float]:
        raw: dict[bytes, bytes] = await self._redis.hgetall(f"{PREFIX}members")  # type: ignore[misc]
        return {k.decode(): float(v) for k, v in raw.items()}

    async def loads(self) -> dict[str, int]:
        raw: dict[bytes, bytes] = await self._redis.hgetall(f"{PREFIX}counts")  # type: ignore[misc]
        return {k.decode(): int(v) for k, v in raw.items() if int(v)}

    async def is_built(self) -> bool:
        return bool(await self._redis.exists(f"{PREFIX}built"))

    def staging(self, run_id: str, started_ms: int) -> Staging:
        return Staging(self, run_id, started_ms)

    async def events_applied(self) -> int:
        """How many task events have changed the cache since it was created (to report those during a run)."""
        return int(await self._redis.get(f"{PREFIX}events") or 0)
