"""The member-load cache in Redis: open tasks per workspace member that reactor did not create, kept current by
Twenty's task events, so picking an assignee costs no CRM call.

reactor's own follow-up tasks are not here: their rows in PostgreSQL (`follow_ups`) count them, from the moment a
row is owed to a member (that row is the reservation) until its task is closed. A member's load is this cache's
count plus those rows (`reactor.loads`). So the `task.created` event of reactor's own task, whenever it arrives,
cannot count that task twice, and nothing reserved can leak.

Keys, under `reactor:ws:<workspace>:` (a change of Twenty workspace starts a cache of its own):
  task:<id>   "assignee|counted|version|deleted": the last known state of a task; closed tasks expire (tombstones
              long enough to refuse a late event, far longer than Twenty's webhook tolerance)
  open        set of the task ids counted now (what a rebuild checks for lost closings)
  counts      hash member id -> open tasks
  members     hash member id -> capacity weight: who may be picked
  names       hash member id -> display name; emails: email -> member id
  built       when the cache was last rebuilt from Twenty; events: how many task events changed it
  listed:<run>  the task ids a rebuild has listed so far

Every change is one Lua script over one task or one page, so no call blocks Redis for long however many tasks
the workspace has ever had, and concurrent events and rebuilds never interleave inside one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from redis.asyncio import Redis

log = logging.getLogger("reactor.loadcache")

TERMINAL = 9_000_000_000_000_000  # the version of a destroyed task: nothing after it applies
TOMBSTONE_S = 2 * 24 * 3600  # how long a closed task is remembered (a late event for it is then refused)
SETTLE_CHUNK = 500  # open task ids checked per script call in a rebuild's last pass

_LIB = """
local function parse(entry)
  local a, c, v, d = string.match(entry, '^(.-)|(%d)|(%d+)|(%d)$')
  return a, tonumber(c), tonumber(v), tonumber(d)
end
local function bump(counts, member, by)
  if member ~= '' then
    if redis.call('HINCRBY', counts, member, by) <= 0 then redis.call('HDEL', counts, member) end
  end
end
local function store(key, open_set, id, assignee, counted, version, deleted, ttl)
  redis.call('SET', key, assignee .. '|' .. counted .. '|' .. string.format('%d', version) .. '|' .. deleted)
  if counted == 1 then
    redis.call('SADD', open_set, id)
  else
    redis.call('SREM', open_set, id)
    redis.call('EXPIRE', key, ttl)
  end
end
"""

# KEYS: task key, counts, open, events. ARGV: task id, assignee ('' if none), open (1/0), version (ms),
# deleted (1/0), mode ('full'|'partial'|'restore'), tombstone ttl.
_APPLY = (
    _LIB
    + """
local id, assignee, open, version, deleted, mode, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local entry = redis.call('GET', KEYS[1])
local old_assignee, old_counted, old_version = '', 0, -1
if entry then
  old_assignee, old_counted, old_version = parse(entry)
  if version < old_version or (version == old_version and mode ~= 'restore') then return 0 end
  if mode == 'partial' then assignee = old_assignee end
end
local counted = 0
if open == 1 and deleted == 0 and assignee ~= '' then counted = 1 end
if old_counted == 1 then bump(KEYS[2], old_assignee, -1) end
if counted == 1 then bump(KEYS[2], assignee, 1) end
store(KEYS[1], KEYS[3], id, assignee, counted, version, deleted, ttl)
redis.call('INCR', KEYS[4])
return 1
"""
)

# A page of a rebuild's listing of Twenty's open tasks. KEYS: counts, open, listed. ARGV: task key prefix,
# apply (1/0), then (id, assignee, version) per task. A live entry newer than the listing wins (an event that
# arrived meanwhile). Returns {tasks the cache did not know, entries corrected}.
_STAGE = (
    _LIB
    + """
local prefix, apply = ARGV[1], ARGV[2] == '1'
local unknown, corrected = 0, 0
for i = 3, #ARGV, 3 do
  local id, assignee, version = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  redis.call('SADD', KEYS[3], id)
  local key = prefix .. id
  local entry = redis.call('GET', key)
  local keep = false
  if entry then
    local old_assignee, old_counted, old_version = parse(entry)
    if old_version > version then
      keep = true
    elseif old_assignee == assignee and old_counted == (assignee ~= '' and 1 or 0) then
      keep = true
    else
      corrected = corrected + 1
      if apply and old_counted == 1 then bump(KEYS[1], old_assignee, -1) end
    end
  else
    unknown = unknown + 1
  end
  if apply and not keep then
    local counted = 0
    if assignee ~= '' then counted = 1 end
    if counted == 1 then bump(KEYS[1], assignee, 1) end
    store(key, KEYS[2], id, assignee, counted, version, 0, 0)
  end
end
return {unknown, corrected}
"""
)

# The rebuild's last pass, over a chunk of the open set. KEYS: counts, open, listed. ARGV: task key prefix,
# listing start (ms), apply (1/0), tombstone ttl, then task ids. An open task the listing did not show, and older
# than the listing, was closed while its event was lost. Returns the number of entries corrected.
_SETTLE = (
    _LIB
    + """
local prefix, started, apply, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1', tonumber(ARGV[4])
local corrected = 0
for i = 5, #ARGV do
  local id = ARGV[i]
  if redis.call('SISMEMBER', KEYS[3], id) == 0 then
    local key = prefix .. id
    local entry = redis.call('GET', key)
    if not entry then
      if apply then redis.call('SREM', KEYS[2], id) end
    else
      local assignee, counted, version, deleted = parse(entry)
      if counted == 1 and version < started then
        corrected = corrected + 1
        if apply then
          bump(KEYS[1], assignee, -1)
          store(key, KEYS[2], id, assignee, 0, version, deleted, ttl)
        end
      end
    end
  end
end
return corrected
"""
)


@dataclass(frozen=True)
class TaskState:
    """A task as an event (or a listing) shows it."""

    task_id: str
    assignee_id: str | None
    status: str | None
    version_ms: int  # updatedAt (or deletedAt when later) in ms: orders events of one task
    deleted: bool = False
    partial: bool = False  # the record held only id/deletedAt (older Twenty): keep the known assignee


def to_ms(value: str | datetime | None) -> int:
    """A Twenty timestamp in ms since the epoch; 0 when there is none. Raises ValueError for a non-timestamp."""
    if value is None:
        return 0
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(moment.timestamp() * 1000)


@dataclass
class Rebuild:
    """A rebuild in progress: Twenty's open tasks (not reactor's own) staged page by page, then a pass over the
    open set for closings that were lost. Each step is one short script."""

    cache: LoadCache
    run_id: str
    started_ms: int
    apply: bool = True
    listed: int = 0
    unknown: int = 0
    corrected: int = 0
    counts_from_listing: dict[str, int] | None = None  # a compare-only run's own tally

    def __post_init__(self) -> None:
        if not self.apply:
            self.counts_from_listing = {}

    async def add(self, tasks: Iterable[TaskState]) -> None:
        args: list[str | int] = [self.cache.key("task:"), 1 if self.apply else 0]
        for task in tasks:
            args += [task.task_id, task.assignee_id or "", task.version_ms]
            if self.counts_from_listing is not None and task.assignee_id:
                self.counts_from_listing[task.assignee_id] = self.counts_from_listing.get(task.assignee_id, 0) + 1
        if len(args) == 2:
            return
        keys = [self.cache.key("counts"), self.cache.key("open"), self._listed_key]
        unknown, corrected = await self.cache._stage(keys=keys, args=args)
        await self.cache._redis.expire(self._listed_key, 3600)
        self.listed += (len(args) - 2) // 3
        self.unknown += int(unknown)
        self.corrected += int(corrected)

    async def finish(self) -> None:
        """Close what the listing did not show (chunk by chunk), and mark the cache built."""
        redis, keys = self.cache._redis, [self.cache.key("counts"), self.cache.key("open"), self._listed_key]
        cursor = 0
        while True:
            cursor, chunk = await redis.sscan(self.cache.key("open"), cursor, count=SETTLE_CHUNK)
            if chunk:
                ids = [item.decode() if isinstance(item, bytes) else str(item) for item in chunk]
                args: list[str | int] = [self.cache.key("task:"), self.started_ms, 1 if self.apply else 0,
                                         TOMBSTONE_S, *ids]  # fmt: skip
                self.corrected += int(await self.cache._settle(keys=keys, args=args))
            if cursor == 0:
                break
        await redis.delete(self._listed_key)
        if self.apply:
            await redis.set(self.cache.key("built"), self.started_ms)

    @property
    def _listed_key(self) -> str:
        return self.cache.key(f"listed:{self.run_id}")


class LoadCache:
    def __init__(self, redis: Redis, *, load_statuses: Iterable[str], workspace: str = "default") -> None:
        self._redis = redis
        self._load_statuses = frozenset(load_statuses)
        self.prefix = f"reactor:ws:{workspace}:"
        self._apply = redis.register_script(_APPLY)
        self._stage = redis.register_script(_STAGE)
        self._settle = redis.register_script(_SETTLE)

    def key(self, name: str) -> str:
        return self.prefix + name

    def counts_as_load(self, status: str | None) -> bool:
        return status in self._load_statuses

    async def apply(self, state: TaskState, *, restore: bool = False, destroyed: bool = False) -> bool:
        """Apply one event of a task reactor did not create; False when it was stale or a duplicate."""
        mode = "restore" if restore else "partial" if state.partial else "full"
        version = TERMINAL if destroyed else state.version_ms
        open_ = 1 if self.counts_as_load(state.status) else 0
        deleted = 1 if state.deleted or destroyed else 0
        keys = [self.key(f"task:{state.task_id}"), self.key("counts"), self.key("open"), self.key("events")]
        args: list[str | int] = [state.task_id, state.assignee_id or "", open_, version, deleted, mode, TOMBSTONE_S]
        return bool(await self._apply(keys=keys, args=args))

    async def forget(self, task_ids: Sequence[str]) -> None:
        """Drop tasks from the cache (they turned out to be reactor's own: their rows count them)."""
        for task_id in task_ids:
            await self.apply(TaskState(task_id, None, None, TERMINAL, deleted=True), destroyed=True)

    def rebuild(self, run_id: str, started_ms: int, *, apply: bool = True) -> Rebuild:
        return Rebuild(self, run_id, started_ms, apply)

    async def counts(self) -> dict[str, int]:
        """member -> open tasks reactor did not create."""
        raw: dict[bytes, bytes] = await self._redis.hgetall(self.key("counts"))  # type: ignore[misc]
        return {k.decode(): int(v) for k, v in raw.items() if int(v) > 0}

    async def member_ids_by_email(self) -> dict[str, str]:
        raw: dict[bytes, bytes] = await self._redis.hgetall(self.key("emails"))  # type: ignore[misc]
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def set_members(self, weights: Mapping[str, float], names: Mapping[str, str] | None = None,
                          emails: Mapping[str, str] | None = None) -> None:  # fmt: skip
        """Replace the eligible members (id -> weight), and their names and emails when given, atomically."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for name, mapping in (("members", weights), ("names", names), ("emails", emails)):
                if mapping is None:
                    continue
                pipe.delete(self.key(name))
                if mapping:
                    pipe.hset(self.key(name), mapping=dict(mapping))
            await pipe.execute()

    async def names(self) -> dict[str, str]:
        raw: dict[bytes, bytes] = await self._redis.hgetall(self.key("names"))  # type: ignore[misc]
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def members(self) -> dict[str, float]:
        raw: dict[bytes, bytes] = await self._redis.hgetall(self.key("members"))  # type: ignore[misc]
        return {k.decode(): float(v) for k, v in raw.items()}

    async def is_built(self) -> bool:
        return bool(await self._redis.exists(self.key("built")))

    async def events_applied(self) -> int:
        """How many task events have changed the cache since it was created (to report those during a run)."""
        return int(await self._redis.get(self.key("events")) or 0)
