"""Load the recorded Twenty exchanges and samples under tests/fixtures/twenty."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TWENTY = Path(__file__).parent / "fixtures" / "twenty"


def recorded_rest(name: str) -> dict[str, Any]:
    """A real REST exchange: {request, status, response_headers, response}."""
    [path] = (TWENTY / "recorded" / "rest").glob(f"{name}*.json")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def sample(name: str) -> Any:
    return json.loads((TWENTY / "samples" / f"{name}.json").read_text())


def webhook_secrets() -> dict[str, str]:
    """Webhook id -> the secret its subscription was created with (the recorded create calls)."""
    creates = ("07-webhook-create", "37-webhook2-create-filtered-ops", "38-webhook3-create-failing-target")
    return {recorded_rest(name)["response"]["id"]: recorded_rest(name)["response"]["secret"] for name in creates}


def recorded_deliveries() -> list[dict[str, Any]]:
    """The 55 real signed deliveries: {headers: [[name, value]...], body_raw, body_json, ...}."""
    lines = (TWENTY / "recorded" / "webhooks" / "all-deliveries.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
