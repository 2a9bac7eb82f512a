"""Schemathesis against the real API process: every operation of its ``/openapi.json``, called
with a valid key and generated input (valid and invalid), answers without a server error,
with a documented status and a body its documented response schema accepts.

Schemathesis' own pytest loader (``from_fixture``) does not run under pytest 9, so the
operations are listed from the app's spec at collection and each runs as a hypothesis test.
"""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from inferq.settings import Settings
from tests.conftest import TEST_CONFIG

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
# Bounds on the run: per operation, this many valid and this many invalid cases.
EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 12}


def operation_cases() -> list[object]:
    """``METHOD /path`` of every operation in the spec the app serves, with each generation
    mode that can make a case for it (an operation with no input has no invalid one)."""
    spec = create_app(Settings(config=TEST_CONFIG)).openapi()
    found = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            label = f"{method.upper()} {path}"
            for mode in EXAMPLES:
                if mode is GenerationMode.POSITIVE or _can_be_invalid(op):
                    found.append(pytest.param(label, mode, id=f"{label}-{mode.value}"))
    return found


def _can_be_invalid(operation: dict[str, Any]) -> bool:
    """A body or a constrained parameter can be sent invalid; a bare string id cannot."""
    bare = [{"type": "string"}]
    return "requestBody" in operation or any(
        [{k: v for k, v in p["schema"].items() if k != "title"}] != bare
        for p in operation.get("parameters", [])
    )


@pytest.fixture(scope="module")
def api_schema(api_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json")


@pytest.mark.parametrize(("label", "mode"), operation_cases())
def test_operation_conforms_to_its_schema(
    api_schema: schemathesis.BaseSchema, api_key: str, label: str, mode: GenerationMode
) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served /openapi.json"
    headers = {"Authorization": f"Bearer {api_key}"}
    calls: list[int] = []

    @hypothesis.settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)
        calls.append(response.status_code)

    call()
    assert calls, f"no case was generated for {label}"
