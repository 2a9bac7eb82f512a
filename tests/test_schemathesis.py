"""Schemathesis against the real API process: every operation of its ``/openapi.json``, called
with a valid key and generated input (valid and invalid), answers without a server error,
with a documented status and a body its documented response schema accepts.

Schemathesis' own pytest loader (``from_fixture``) does not run under pytest 9, so the
operations are listed from the app's spec at collection and each runs as a hypothesis test.

A stateful run follows OpenAPI links, added here to the served spec: an id one operation
returns (``POST /v1/requests`` → ``id``) is what the next one is called with, so operations on
ids reach real rows instead of a random id's 404.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
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
from core.settings import Settings
from tests.conftest import TEST_CONFIG

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
# Bounds on the run: per operation, this many valid and this many invalid cases.
EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 12}


def operation_cases() -> list[Any]:
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
    def call(case: schemathesis.Case[Any]) -> None:
        response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)
        calls.append(response.status_code)

    call()
    assert calls, f"no case was generated for {label}"


# Producer (operation, status) -> operations on what it produced: {target: {param: value}}.
# ``wait`` is pinned to 0 so a linked poll does not hold the run for the long-poll bound.
LINKS: dict[tuple[str, str, str], dict[tuple[str, str], dict[str, Any]]] = {
    ("post", "/v1/requests", "202"): {
        ("get", "/v1/requests/{request_id}"): {"request_id": "$response.body#/id", "wait": 0},
    },
    ("post", "/v1/jobs", "202"): {
        (method, f"/v1/jobs/{{job_id}}{tail}"): {"job_id": "$response.body#/id"}
        for method, tail in [
            ("get", ""),
            ("post", "/cancel"),
            ("get", "/results"),
            ("get", "/errors"),
        ]
    },
    ("post", "/v1/files", "200"): {
        (method, f"/v1/files/{{file_id}}{tail}"): {"file_id": "$response.body#/id"}
        for method, tail in [("get", ""), ("get", "/content"), ("delete", "")]
    },
    ("post", "/v1/batches", "200"): {
        (method, f"/v1/batches/{{batch_id}}{tail}"): {"batch_id": "$response.body#/id"}
        for method, tail in [("get", ""), ("post", "/cancel")]
    },
    ("post", "/v1/webhook-endpoints", "200"): {
        ("post", "/v1/webhook-endpoints/{endpoint_id}/rotate-secret"): {
            "endpoint_id": "$response.body#/id"
        },
    },
}
# Served by the scripted engine (20 ms a request), so chained submissions cost little.
SUBMISSIONS = [
    {"task": "complete", "input": {"prompt": "hello"}, "model": "scripted"},
    {"task": "classify", "input": {"text": "red shoes", "labels": ["a", "b"]}, "model": "scripted"},
]
JOBS = [
    {
        "task": "classify",
        "input": {"labels": ["a", "b"]},
        "model": "scripted",
        "items": [{"id": "x", "text": "one"}, {"id": "y", "text": "two"}],
    }
]
# The chains a generated body can start here: files are multipart uploads the spec does not
# describe, batches need a file, webhook endpoints a public host. Their links above are
# followed by any run whose producers succeed.
CHAINED = r"^/v1/(requests|jobs)"
# Operations that wait on a worker's answer: covered by the stateless run, too slow to chain.
UNCHAINED = r"^/v1/(chat/completions|requests/\{request_id\}/stream)$"


def with_links(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with ``LINKS`` added to the producers' responses (those the API serves)."""
    spec = copy.deepcopy(spec)
    paths = spec["paths"]
    for (method, path, status), targets in LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        links = response.setdefault("links", {})
        for (target_method, target_path), parameters in targets.items():
            target = paths.get(target_path, {}).get(target_method)
            if target is None:
                continue
            links[target.get("operationId") or f"{target_method} {target_path}"] = {
                "operationId": target["operationId"],
                "parameters": parameters,
            }
    return spec


def with_valid_submissions(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with ``POST /v1/requests`` and ``/v1/jobs`` (its JSON form) narrowed to bodies
    the API accepts: fuzzing bodies is the stateless run's work; here a producer must produce
    for its links to be followed."""
    spec = copy.deepcopy(spec)
    for path, bodies in (("/v1/requests", SUBMISSIONS), ("/v1/jobs", JOBS)):
        content = {"application/json": {"schema": {"enum": bodies}}}
        spec["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
    return spec


def test_linked_operations_reach_the_ids_their_producers_returned(
    api_url: str, api_key: str
) -> None:
    served = httpx.get(f"{api_url}/openapi.json", timeout=30).json()
    spec = with_links(with_valid_submissions(served))
    schema = (
        schemathesis.openapi.from_dict(spec)
        .include(path_regex=CHAINED)
        .exclude(path_regex=UNCHAINED)
    )
    schema.config.update(
        base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}, request_timeout=60
    )
    seen: list[tuple[str, int]] = []

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def after_call(self, response: Any, case: schemathesis.Case[Any]) -> None:
            super().after_call(response, case)
            seen.append((case.operation.label, response.status_code))

        def validate_response(
            self, response: Any, case: schemathesis.Case[Any], *args: Any, **kwargs: Any
        ) -> None:
            case.validate_response(response, checks=CHECKS)

    Machine.run(
        settings=hypothesis.settings(
            max_examples=60,
            stateful_step_count=5,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )
    for target in ("GET /v1/requests/{request_id}", "GET /v1/jobs/{job_id}"):
        codes = [code for label, code in seen if label == target]
        assert 200 in codes, f"{target} never got an id that exists: {sorted(set(seen))}"
