"""Schemathesis over reactor's /openapi.json, against a running server: every operation, valid and invalid input,
a bounded number of examples each. Each answer must be no 5xx, a status the document lists, and a body matching
the documented schema and content type.

The suite runs a small, derandomized share (tests/test_fuzz.py). By hand, against `reactor web` on a database of
your own, as many as you like:

    .venv/bin/python -m tests.fuzzing --base-url http://127.0.0.1:PORT --key KEY --examples 300
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import hypothesis.errors
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]  # fmt: skip


@dataclass
class Report:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500 and status != 503)

    def summary(self) -> str:
        by_status = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (f"{self.cases} cases in {self.seconds:.0f} s; {self.server_errors} x 5xx (503 excluded); "
                f"{len(self.failures)} check failures; statuses {by_status}")  # fmt: skip


def fuzz(base_url: str, key: str, *, examples: int, derandomize: bool, timeout_s: float = 20.0) -> Report:
    spec = requests.get(f"{base_url}/openapi.json", timeout=timeout_s).json()
    schema = schemathesis.openapi.from_dict(spec)
    report = Report()
    started = time.monotonic()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            test = _operation_test(report, session, operation.as_strategy(generation_mode=mode),
                                   f"{operation.label} [{mode.value}]", base_url=base_url, key=key,
                                   examples=examples, derandomize=derandomize, timeout_s=timeout_s)  # fmt: skip
            try:
                test()
            except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, operation.label
    report.seconds = time.monotonic() - started
    return report


def _operation_test(report: Report, session: requests.Session, strategy: Any, label: str, *, base_url: str, key: str,
                    examples: int, derandomize: bool, timeout_s: float) -> Any:  # fmt: skip
    @hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                         suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
                         print_blob=False)  # fmt: skip
    @hypothesis.given(case=strategy)
    def run(case: Any) -> None:
        report.cases += 1
        response = case.call(base_url=base_url, session=session, headers={"X-API-Key": key}, timeout=timeout_s)
        report.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as exc:  # collected, not raised: the report counts them all
            first = " | ".join(line for line in str(exc).strip().splitlines()[:8] if line.strip())
            report.failures.append(f"{label} -> {response.status_code}: {first}\n    {case.as_curl_command()}")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--key", required=True, help="a lead source's API key")
    parser.add_argument("--examples", type=int, default=200, help="per operation and mode (valid, invalid)")
    args = parser.parse_args()
    report = fuzz(args.base_url, args.key, examples=args.examples, derandomize=False)
    for failure in report.failures[:50]:
        print(failure)
    print(report.summary())


if __name__ == "__main__":
    main()
