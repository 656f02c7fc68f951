"""Lead intake and lookup: validated leads in, stored once, read back. Explicit dependencies, typed results."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextvars
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from reactor import metrics, outages, store
from reactor.errors import ServiceUnavailable
from reactor.models import Lead, LeadIn

log = logging.getLogger("reactor.intake")


@dataclass(frozen=True)
class Submission:
    lead_id: str
    created: bool


@dataclass
class _Waiting:
    submission: store.LeadSubmission
    answer: asyncio.Future[Submission]


class SubmissionWriter:
    """The write path of POST /leads: each request waits for its own submission's commit, but submissions that
    arrive while earlier ones are being written go together, in one statement and one transaction
    (store.upsert_leads). A request on a quiet service is written at once, alone; under a burst, each write
    carries whatever arrived meanwhile, so PostgreSQL commits once per batch instead of once per lead and the
    process makes one round trip per batch (docs/intake-performance.md: 25 leads a batch at 5,000 requests/s;
    per lead, less than half the PostgreSQL CPU and two thirds of the web CPU of writing each alone).

    Nothing changes for the caller: the answer comes after the commit, the merge rules and the race-freedom are
    the function's, and a failure is the failing submission's own: when a batch fails for any reason but an
    outage (a deadlock with another process's batch, a submission PostgreSQL refuses), its submissions are
    written again one by one, so each gets its own answer.
    """

    def __init__(self, db: asyncpg.Pool, *, max_batch: int = 100, max_in_flight: int = 1) -> None:
        # One batch in flight per process measured best: the next batch grows while this one commits, and a
        # process's batches never wait on each other's rows (bench/intake.py: 5,100-5,400 requests/s against
        # 4,400-5,000 with two).
        self._db = db
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._writers: set[asyncio.Task[None]] = set()  # in flight: each leaves it itself, see _write_queue

    async def submit(self, lead: LeadIn, *, api_source: str, payload: Mapping[str, Any]) -> Submission:
        """Store a lead, deduplicated (email, then phone, then the source's own id within that source)."""
        submission = store.LeadSubmission(
            api_source=api_source,
            source_lead_id=lead.lead_id,
            columns=lead.columns(),
            raw=lead.unknown_fields(),
            payload=payload,
        )
        waiting = _Waiting(submission, asyncio.get_running_loop().create_future())
        self._queue.append(waiting)
        if len(self._writers) < self._max_in_flight:
            self._start_writer()
        return await waiting.answer  # a request cancelled meanwhile still has its submission written

    async def aclose(self) -> None:
        """Wait for what is being written (the pool closes after this)."""
        while self._writers:
            await asyncio.gather(*self._writers, return_exceptions=True)

    def _start_writer(self) -> None:
        # A context of its own: the writer's log lines are not the request's that happened to start it.
        writer = asyncio.create_task(self._write_queue(), context=contextvars.Context())
        self._writers.add(writer)
        writer.add_done_callback(self._writer_ended)

    def _writer_ended(self, writer: asyncio.Task[None]) -> None:
        self._writers.discard(writer)  # a writer cancelled before its first step never reached its own `finally`
        if (writer.cancelled() or writer.exception() is not None) and not self._writers:
            # Ended early (cancelled, or a bug): what is still queued would wait for a writer that never comes.
            while self._queue:
                _answer_failed(self._queue.popleft(), _interrupted())

    async def _write_queue(self) -> None:
        try:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
                try:
                    await self._write(batch)
                except BaseException:
                    for waiting in batch:
                        _answer_failed(waiting, _interrupted())
                    raise
        finally:
            # Here, with no await since the queue was seen empty, not in the done-callback: that runs only after
            # the callers this writer answered have resumed, and one of them may submit again meanwhile.
            self._writers.discard(asyncio.current_task())

    async def _write(self, batch: list[_Waiting]) -> None:
        try:
            async with self._db.acquire() as conn:
                results = await store.upsert_leads(conn, [waiting.submission for waiting in batch])
        except Exception as exc:
            if len(batch) > 1 and outages.unavailable(exc) is None:
                log.info("intake.batch_failed size=%d error=%s; writing each alone", len(batch), type(exc).__name__)
                metrics.INTAKE_REWRITTEN.labels(type(exc).__name__).inc()
                for waiting in batch:
                    await self._write([waiting])
                return
            for waiting in batch:
                _answer_failed(waiting, exc)
            return
        metrics.INTAKE_BATCH.observe(len(batch))
        for waiting, (lead_id, created) in zip(batch, results, strict=True):
            if not waiting.answer.done():
                waiting.answer.set_result(Submission(lead_id, created))


def _interrupted() -> ServiceUnavailable:
    return ServiceUnavailable("the write of this lead was interrupted; retry (intake deduplicates, a retry is safe)")


def _answer_failed(waiting: _Waiting, exc: BaseException) -> None:
    if not waiting.answer.done():
        waiting.answer.set_exception(exc)


async def get(db: asyncpg.Pool, lead_id: str, *, api_source: str | None = None) -> Lead | None:
    """By reactor's id, or by `api_source`'s own id for the lead."""
    async with db.acquire() as conn:
        row = await store.get_lead(conn, lead_id, api_source=api_source)
    return None if row is None else Lead.from_row(row)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Raises ValueError for anything that is not a cursor this service issued."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("not a cursor this service issued") from None
    kind, _, number = text.partition(":")
    if kind != "seq" or not number.isdigit():
        raise ValueError("not a cursor this service issued")
    return int(number)


async def page(db: asyncpg.Pool, *, limit: int, before: int | None) -> tuple[list[Lead], str | None]:
    """A page of leads, newest first, and the cursor of the next page (None at the end). `before`: the decoded
    cursor of this page."""
    async with db.acquire() as conn:
        rows = await store.list_leads(conn, limit=limit + 1, before_seq=before)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["seq"]) if more and rows else None
    return [Lead.from_row(row) for row in rows], next_cursor


async def search(db: asyncpg.Pool, *, email: str | None, phone: str | None, name: str | None, limit: int) -> list[Lead]:
    async with db.acquire() as conn:
        rows = await store.search_leads(conn, email=email, phone=phone, name=name, limit=limit)
    return [Lead.from_row(row) for row in rows]
