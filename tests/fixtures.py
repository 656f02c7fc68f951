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
