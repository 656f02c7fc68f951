"""The simulator is not kinder than Twenty: every recorded REST exchange with the real 1.16-era server
(tests/fixtures/twenty/recorded/rest, copied from ../shared/twenty/recorded) is replayed, in the order it was
recorded, against the simulator in legacy mode (`reactor sim --legacy-task-targets`). Each answer must have the
recorded status; a 4xx the same message and body keys; a 2xx the same envelope keys (top level and `data`).

Ids the server chose in a create are mapped to the ones the simulator chose, and later requests use those.
Recordings that cannot be replayed are listed in NOT_REPRODUCED with the reason, and a test keeps that list exact.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from reactor.sim import Knobs, create_sim
from tests.fixtures import TWENTY

pytestmark = pytest.mark.anyio

RECORDED = TWENTY / "recorded" / "rest"
TOKEN = "conformance-token"
NOT_REPRODUCED = {
    "03-auth-current-user": "GraphQL `POST /metadata` (currentUser): reactor speaks only REST to Twenty, and the "
    "simulator has no GraphQL endpoint",
    "04-roles": "GraphQL `POST /metadata` (getRoles): as 03, a GraphQL call reactor never makes",
    "05-apikey-create": "GraphQL createApiKey: API keys are made by a person in Twenty's settings, never by "
    "reactor; the simulator has one fixed token",
}


def recordings() -> list[Path]:
    return sorted(RECORDED.glob("*.json"))


def replayed() -> list[str]:
    return [path.stem for path in recordings() if path.stem not in NOT_REPRODUCED]


@dataclass
class Outcome:
    recorded: dict[str, Any]
    status: int
    body: Any
    ids: dict[str, str]  # recorded id -> the simulator's, as known when this one was replayed


class Clock:
    """The simulator's clock, held still while the rate limit is exhausted (so no token refills meanwhile)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _mapped(text: str, ids: dict[str, str]) -> str:
    for recorded, ours in ids.items():
        text = text.replace(recorded, ours)
    return text


def _records(body: Any) -> list[dict[str, Any]]:
    """The records a create answered with, in order: `data.createX` (one or a list) or a bare webhook DTO."""
    if isinstance(body, dict) and isinstance(body.get("data"), dict):
        [(key, value)] = list(body["data"].items())[:1] or [("", None)]
        if key.startswith("create"):
            return value if isinstance(value, list) else [value]
        return []
    return [body] if isinstance(body, dict) and "id" in body else []


async def _replay(http: httpx.AsyncClient, recorded: dict[str, Any], ids: dict[str, str]) -> httpx.Response:
    request = recorded["request"]
    url = httpx.URL(request["url"])
    target = _mapped(url.raw_path.decode(), ids)
    body = request.get("body")
    content = _mapped(json.dumps(body), ids).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if content is not None else {}
    if recorded["status"] == 401:  # the recording hides the wrong token it sent; this one is not even a JWT
        headers["Authorization"] = "Bearer not-a-valid-token"
    elif request.get("auth"):
        headers["Authorization"] = f"Bearer {TOKEN}"
    return await http.request(request["method"], target, content=content, headers=headers)


async def _exhaust_rate_limit(http: httpx.AsyncClient, app: Any, clock: Clock, recorded: dict[str, Any]) -> int:
    """Set the simulator's limit to the recorded one and spend it with the recorded call, one every 12 ms as in
    the recorded burst (87 in 1.2 s; a burst in no time at all empties the 100-per-second bucket first and is
    refused with that one's message); returns how many calls it accepted."""
    limit = int(re.search(r"\((\d+) tokens per (\d+) ms\)", recorded["response"]["messages"][0]).group(1))  # type: ignore[union-attr]
    app.state.knobs.rate_limit = limit
    clock.now += 3600  # a long quiet spell first: the bucket is full
    accepted = 0
    for _ in range(limit):
        clock.now += 0.012
        if (await _replay(http, recorded, {})).status_code == 429:
            break
        accepted += 1
    return accepted


@pytest.fixture(scope="module")
async def outcomes() -> AsyncIterator[dict[str, Outcome]]:
    clock = Clock()
    delivered = httpx.MockTransport(lambda request: httpx.Response(200))  # the recorded webhooks' targets
    app = create_sim(token=TOKEN, members=3, open_tasks=5, seed=1, legacy_task_targets=True, knobs=Knobs(),
                     clock=clock, delivery_transport=delivered)  # fmt: skip
    ids: dict[str, str] = {}
    results: dict[str, Outcome] = {}
    async with LifespanManager(app) as manager, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=manager.app), base_url="http://sim"
    ) as http:  # fmt: skip
        for path in recordings():
            if path.stem in NOT_REPRODUCED:
                continue
            recorded = json.loads(path.read_text())
            if recorded["status"] == 429:
                accepted = await _exhaust_rate_limit(http, app, clock, recorded)
                assert accepted == app.state.knobs.rate_limit, "a full bucket accepts exactly its limit"
                clock.now += 0.012
            answer = await _replay(http, recorded, ids)
            app.state.knobs.rate_limit = None
            body = answer.json()
            results[path.stem] = Outcome(recorded, answer.status_code, body, dict(ids))
            if answer.status_code < 300:
                for theirs, ours in zip(_records(recorded["response"]), _records(body), strict=False):
                    if theirs.get("id") and ours.get("id") and theirs["id"] != ours["id"]:
                        ids[theirs["id"]] = ours["id"]
        yield results


def _message(body: Any) -> Any:
    return body.get("messages", body.get("message")) if isinstance(body, dict) else body


def _envelope(body: Any) -> tuple[Any, ...]:
    if isinstance(body, list):
        return ("list", sorted(body[0]) if body and isinstance(body[0], dict) else None)
    data = body.get("data") if isinstance(body, dict) else None
    return (sorted(body), sorted(data) if isinstance(data, dict) else None)


@pytest.mark.parametrize("name", replayed())
async def test_the_simulator_answers_as_the_recorded_server(outcomes: dict[str, Outcome], name: str) -> None:
    outcome = outcomes[name]
    recorded = outcome.recorded
    assert outcome.status == recorded["status"], (outcome.body, recorded["response"])
    if 400 <= recorded["status"] < 500:
        expected = json.loads(_mapped(json.dumps(_message(recorded["response"])), outcome.ids))
        assert _message(outcome.body) == expected
        assert sorted(outcome.body) == sorted(recorded["response"])
    else:
        theirs, ours = _envelope(recorded["response"]), _envelope(outcome.body)
        if isinstance(recorded["response"], list) and not (recorded["response"] and outcome.body):
            theirs, ours = theirs[:1], ours[:1]  # an empty list has no element keys to compare
        assert ours == theirs


def test_every_recording_is_replayed_or_listed_with_its_reason() -> None:
    names = {path.stem for path in recordings()}
    assert set(NOT_REPRODUCED) <= names, "a listed recording no longer exists"
    for name in NOT_REPRODUCED:
        url = httpx.URL(json.loads((RECORDED / f"{name}.json").read_text())["request"]["url"])
        assert not url.path.startswith("/rest/"), f"{name} is a REST call: replay it instead of listing it"
    assert len(replayed()) == len(names) - len(NOT_REPRODUCED) >= 58
