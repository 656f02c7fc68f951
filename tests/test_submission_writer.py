"""POST /leads' write path (reactor.intake.SubmissionWriter): what arrives together is written together, in one
statement, yet each submission gets its own answer after its own commit, and a failure stays the failing one's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import asyncpg
import pytest

from reactor import metrics, outages, store
from reactor.devstack import free_port
from reactor.errors import ServiceUnavailable
from reactor.intake import Submission, SubmissionWriter
from reactor.models import LeadIn

pytestmark = pytest.mark.anyio


def _lead(i: int) -> LeadIn:
    return LeadIn.model_validate({"first_name": f"W{i}", "email": f"w{i}@example.com"})


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every write the store is asked for."""
    sizes: list[int] = []
    write = store.upsert_leads

    async def counted(conn: store.Conn, submissions: Sequence[store.LeadSubmission]) -> list[tuple[str, bool]]:
        sizes.append(len(submissions))
        return await write(conn, submissions)

    monkeypatch.setattr(store, "upsert_leads", counted)
    return sizes


async def _submit_all(writer: SubmissionWriter, payloads: Sequence[Mapping[str, Any]]) -> list[Any]:
    return await asyncio.gather(
        *(writer.submit(_lead(i), api_source="webform", payload=p) for i, p in enumerate(payloads)),
        return_exceptions=True,
    )


async def test_submissions_that_arrive_together_are_written_together(db: asyncpg.Pool, batches: list[int]) -> None:
    written_before = metrics.REGISTRY.get_sample_value("reactor_intake_batch_size_sum") or 0.0
    writer = SubmissionWriter(db)
    answers = await _submit_all(writer, [{"email": f"w{i}@example.com", "n": i} for i in range(50)])
    await writer.aclose()
    assert metrics.REGISTRY.get_sample_value("reactor_intake_batch_size_sum") == written_before + 50

    assert all(isinstance(a, Submission) and a.created for a in answers)
    assert sum(batches) == 50
    assert len(batches) < 50  # fewer round trips than submissions
    rows = await db.fetch("SELECT l.lead_id, l.email, s.payload FROM leads l JOIN lead_submissions s USING (lead_id)")
    assert len(rows) == 50
    by_id = {row["lead_id"]: row for row in rows}
    for i, answer in enumerate(answers):  # each answer names its own lead
        assert by_id[answer.lead_id]["email"] == f"w{i}@example.com"
        assert by_id[answer.lead_id]["payload"] == {"email": f"w{i}@example.com", "n": i}


async def test_one_person_many_times_in_one_batch_is_one_lead(db: asyncpg.Pool, batches: list[int]) -> None:
    writer = SubmissionWriter(db)
    answers = await asyncio.gather(*(writer.submit(_lead(7), api_source="webform", payload={"k": i})
                                     for i in range(20)))  # fmt: skip
    await writer.aclose()

    assert max(batches) > 1
    assert [a.created for a in answers].count(True) == 1
    assert len({a.lead_id for a in answers}) == 1
    assert await db.fetchval("SELECT submission_count FROM leads") == 20
    assert await db.fetchval("SELECT count(*) FROM lead_submissions") == 20


async def test_a_submission_postgres_refuses_fails_alone(db: asyncpg.Pool, batches: list[int]) -> None:
    writer = SubmissionWriter(db)
    payloads: list[dict[str, Any]] = [{"email": f"w{i}@example.com"} for i in range(10)]
    refused = {"error": "UntranslatableCharacterError"}
    rewritten_before = metrics.REGISTRY.get_sample_value("reactor_intake_batches_rewritten_total", refused) or 0.0
    payloads[3]["note"] = "\x00"  # jsonb cannot hold a NUL (the edge refuses one first; here the store itself does)
    results = await _submit_all(writer, payloads)
    await writer.aclose()

    assert isinstance(results[3], asyncpg.PostgresError)
    assert all(isinstance(r, Submission) and r.created for i, r in enumerate(results) if i != 3)
    assert batches == [10] + [1] * 10  # the batch failed whole, then each went alone
    assert metrics.REGISTRY.get_sample_value("reactor_intake_batches_rewritten_total", refused) == rewritten_before + 1
    assert await db.fetchval("SELECT count(*) FROM leads") == 9
    assert await db.fetchval("SELECT count(*) FROM lead_submissions") == 9


async def test_a_caller_that_gives_up_still_has_its_submission_written(db: asyncpg.Pool) -> None:
    writer = SubmissionWriter(db)
    gives_up = asyncio.ensure_future(writer.submit(_lead(1), api_source="webform", payload={}))
    waits = asyncio.ensure_future(writer.submit(_lead(2), api_source="webform", payload={}))
    await asyncio.sleep(0)  # a yield, not a wait: both are queued now
    gives_up.cancel()

    assert (await waits).created
    await writer.aclose()
    assert sorted(await db.fetch("SELECT email FROM leads ORDER BY email")) == [
        ("w1@example.com",),
        ("w2@example.com",),
    ]


async def test_two_processes_whose_batches_cross_lose_nothing(
    db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    # Two web processes writing the same people in opposite orders, at once: their transactions can deadlock on
    # the unique indexes; PostgreSQL aborts one batch, whose submissions are then written one by one.
    caplog.set_level(logging.INFO, "reactor.intake")
    one, other = SubmissionWriter(db), SubmissionWriter(db)
    people = range(40)
    answers = await asyncio.gather(
        *(one.submit(_lead(i), api_source="webform", payload={"by": "one"}) for i in people),
        *(other.submit(_lead(i), api_source="webform", payload={"by": "other"}) for i in reversed(people)),
    )
    await asyncio.gather(one.aclose(), other.aclose())

    assert await db.fetchval("SELECT count(*) FROM leads") == 40
    assert await db.fetchval("SELECT count(*) FROM lead_submissions") == 80
    assert await db.fetchval("SELECT count(*) FROM leads WHERE submission_count = 2") == 40
    assert [a.created for a in answers].count(True) == 40
    by_email = {row["email"]: row["lead_id"] for row in await db.fetch("SELECT email, lead_id FROM leads")}
    for i in people:  # both processes' answers for a person name the one lead that person has
        assert answers[i].lead_id == answers[79 - i].lead_id == by_email[f"w{i}@example.com"]
    failed = [r.getMessage() for r in caplog.records if "intake.batch_failed" in r.getMessage()]
    assert all("DeadlockDetectedError" in line for line in failed)  # when they met, it was a deadlock, no worse


async def test_a_submission_right_after_a_write_is_written_too(db: asyncpg.Pool) -> None:
    # The caller resumes before the finished writer's done-callback runs: a writer that counted itself out there
    # left the next lone submission queued with nobody to write it.
    writer = SubmissionWriter(db)
    assert (await writer.submit(_lead(1), api_source="webform", payload={})).created
    with anyio.fail_after(10):
        assert (await writer.submit(_lead(2), api_source="webform", payload={})).created
    await writer.aclose()


async def test_an_outage_fails_the_whole_batch_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "reactor.intake")
    nobody = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/none", min_size=0, max_size=2)
    writer = SubmissionWriter(nobody)
    results = await _submit_all(writer, [{} for _ in range(10)])
    await writer.aclose()
    await nobody.close()

    assert all(outages.unavailable(r) is outages.Dependency.POSTGRES for r in results)  # each answers 503
    assert not [r for r in caplog.records if "intake.batch_failed" in r.getMessage()]  # and no one-by-one retry


async def test_a_writer_cancelled_before_it_starts_strands_nobody(db: asyncpg.Pool) -> None:
    writer = SubmissionWriter(db)
    first = asyncio.ensure_future(writer.submit(_lead(1), api_source="webform", payload={}))
    await asyncio.sleep(0)  # a yield: `first` is queued and has made a writer, which has not run yet
    for task in writer._writers:
        task.cancel()
    with anyio.fail_after(10):
        with pytest.raises(ServiceUnavailable):
            await first
        assert (await writer.submit(_lead(2), api_source="webform", payload={})).created  # the slot came back
    await writer.aclose()


async def test_a_writer_cancelled_mid_write_answers_503_not_cancelled(
    db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, never = asyncio.Event(), asyncio.Event()

    async def stuck(conn: store.Conn, submissions: Sequence[store.LeadSubmission]) -> list[tuple[str, bool]]:
        entered.set()
        await never.wait()
        raise AssertionError

    monkeypatch.setattr(store, "upsert_leads", stuck)
    writer = SubmissionWriter(db)
    waiting = [asyncio.ensure_future(writer.submit(_lead(i), api_source="webform", payload={})) for i in range(3)]
    with anyio.fail_after(10):
        await entered.wait()
        for task in writer._writers:
            task.cancel()
        results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, ServiceUnavailable) for r in results)  # a 503 with Retry-After, not a bare 500
    await writer.aclose()


async def test_each_answer_comes_after_its_commit(db: asyncpg.Pool) -> None:
    writer = SubmissionWriter(db)
    submitting = [writer.submit(_lead(i), api_source="webform", payload={}) for i in range(30)]
    for answered in asyncio.as_completed(submitting):
        answer = await answered  # another connection sees the lead as soon as its answer is out
        assert await db.fetchval("SELECT count(*) FROM leads WHERE lead_id = $1", answer.lead_id) == 1
    await writer.aclose()
