"""Pure decisions of the write path, kept apart from the I/O so they are tested without PostgreSQL or Redis:
what a task event does to reactor's follow-up row, and which member a batch of follow-ups goes to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reactor.loadcache import TERMINAL, TaskState

CLOSING_STATUSES = frozenset({"DONE"})


def transition(row: Mapping[str, Any], state: TaskState, *, restored: bool = False,
               destroyed: bool = False) -> dict[str, Any] | None:  # fmt: skip
    """The columns a task event changes on its follow-up row, or None when the event is stale or a duplicate.

    Events are ordered by the task's version (updatedAt, or deletedAt when later): one no newer than the last
    applied changes nothing, so a late DONE cannot close a row a newer event reopened. A closing (done, deleted,
    destroyed) moves an active row to `closed`; an open status on a closed row reopens it; an assignee changed in
    Twenty moves the row, and with it the load.
    """
    version = TERMINAL if destroyed else state.version_ms
    if version < row["event_version"] or (version == row["event_version"] and not restored):
        return None
    changes: dict[str, Any] = {"event_version": version}
    closing = destroyed or state.deleted or state.status in CLOSING_STATUSES
    if state.status is not None:
        changes["task_status"] = state.status
    elif closing:
        changes["task_status"] = "DELETED"
    if closing:
        if row["state"] in ("pending", "created", "open"):
            changes["state"] = "closed"
        return changes
    if row["state"] == "closed":
        changes["state"] = "open"
    if not state.partial and state.assignee_id != row["assignee_id"] and row["state"] != "failed":
        changes["assignee_id"] = state.assignee_id
    return changes


@dataclass(frozen=True)
class Choice:
    member_id: str | None  # None: every candidate is capped, or there is none
    rule: str  # lowest_weighted_load | tie_least_recently_assigned | all_capped


def pick(candidates: Mapping[str, tuple[float, int]], loads: Mapping[str, int],
         last_assigned: Mapping[str, float]) -> Choice:  # fmt: skip
    """The candidate (member -> (weight, cap; 0 = none)) with the lowest load / weight, skipping any at their cap;
    ties go to the least recently assigned, then to the member id (deterministic)."""
    open_to = [(loads.get(m, 0) / w, last_assigned.get(m, 0.0), m) for m, (w, cap) in candidates.items()
               if cap == 0 or loads.get(m, 0) < cap]  # fmt: skip
    if not open_to:
        return Choice(None, "all_capped")
    best = min(open_to)
    tied = sum(1 for score, _, _ in open_to if score == best[0])
    return Choice(best[2], "tie_least_recently_assigned" if tied > 1 else "lowest_weighted_load")


def pick_many(count: int, candidates: Mapping[str, tuple[float, int]], loads: Mapping[str, int],
              last_assigned: Mapping[str, float], *, now: float) -> list[tuple[Choice, dict[str, int]]]:  # fmt: skip
    """`count` picks in a row, each counting the ones before it: (choice, the loads it saw) per pick."""
    loads, last = dict(loads), dict(last_assigned)
    picks: list[tuple[Choice, dict[str, int]]] = []
    for i in range(count):
        seen = {m: loads.get(m, 0) for m in candidates}
        choice = pick(candidates, loads, last)
        if choice.member_id is not None:
            loads[choice.member_id] = loads.get(choice.member_id, 0) + 1
            last[choice.member_id] = now + i * 1e-6
        picks.append((choice, seen))
    return picks


def retry_delay(attempts: int, retry_after: float | None, *, base_s: float, cap_s: float = 600.0) -> float:
    """How long a row waits after `attempts` failed tries: exponential, capped, never under Retry-After."""
    return float(max(retry_after or 0.0, min(cap_s, base_s * 2 ** max(0, attempts))))


def split(items: Sequence[Any]) -> tuple[Sequence[Any], Sequence[Any]]:
    middle = len(items) // 2
    return items[:middle], items[middle:]
