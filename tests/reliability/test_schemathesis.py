"""API fuzzing from the server's own OpenAPI schema with schemathesis (a tool others wrote): every operation of
the live SmolLM2 server, with schema-valid and schema-violating requests that schemathesis generates. Checks:
no 5xx (schemathesis' `not_a_server_error`), every error body OpenAI's error object, and the server still ready
afterwards.

Requests act as tenant `fuzz`, a user with no other use in the suite, so the fuzzer's profiles and adapters touch
no other test; admin-only operations are exercised too (their 403s). Generated generation requests are held to
at most 4 new tokens (the fuzzer hunts input handling, not decoding speed). Examples per operation:
`STEERSERVE_FUZZ_EXAMPLES` (CI: 8, about 2 minutes on 2 cores; `make fuzz`: 200)."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.conftest import auth

EXAMPLES = int(os.environ.get("STEERSERVE_FUZZ_EXAMPLES", "8"))
GENERATION = ("/v1/chat/completions", "/v1/completions")


def openai_error_shape(response) -> None:
    """A 4xx or 5xx answer is exactly OpenAI's error object: {"error": {message, type, param, code}}."""
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an error object: {response.text[:300]}"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, f"error fields {sorted(err)}"
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)


def bounded(case, model: str | None = None) -> None:
    """Hold a generated generation request to a few tokens, leaving invalid values as generated; with `model`,
    a string `model` becomes the served model's name, so requests get past the model check to the engine."""
    if case.path in GENERATION and isinstance(case.body, dict):
        if model is not None and isinstance(case.body.get("model"), str):
            case.body["model"] = model
        for field in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(field)
            if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 4):
                case.body[field] = 4
        if case.path == "/v1/completions" and isinstance(case.body.get("prompt"), list) and \
                len(case.body["prompt"]) > 4:
            case.body["prompt"] = case.body["prompt"][:4]


@dataclass
class Report:
    operations: set[str] = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def examples(self) -> int:
        return sum(self.statuses.values())

    def __str__(self) -> str:
        return (f"{len(self.operations)} operations, {self.examples} examples, {len(self.failures)} failures; "
                f"statuses {dict(sorted(self.statuses.items()))}")


def fuzz(schema, headers: dict[str, str], examples: int, model: str | None = None, **call_kwargs) -> Report:
    """Every operation of `schema`, `examples` schema-valid and `examples` schema-violating requests each
    (hypothesis, derandomized), checked by `not_a_server_error` and `openai_error_shape`. Failures are collected,
    not raised, so one run reports them all."""
    report = Report()
    for result in schema.get_all_operations():
        operation = result.ok()
        report.operations.add(f"{operation.method.upper()} {operation.path}")
        for mode in GenerationMode:
            try:
                _examples(operation, mode, report, headers, examples, model, call_kwargs)
            except Unsatisfiable:  # nothing to violate (an operation without parameters or body)
                pass
    return report


def _examples(operation, mode, report: Report, headers, examples: int, model: str | None, call_kwargs) -> None:
    where = f"{operation.method.upper()} {operation.path} [{mode.value}]"

    @given(operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None, phases=[Phase.explicit, Phase.generate])
    def one(case) -> None:
        bounded(case, model)
        response = case.call(headers=headers, **call_kwargs)
        report.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error])
            openai_error_shape(response)
        except Exception as exc:  # recorded, reported by the caller
            report.failures.append(f"{where} {response.status_code}: {str(exc)[:300]} body={str(case.body)[:200]}")

    one()


def test_fuzzed_requests_get_no_5xx_and_openai_errors(server, api_keys, model_name):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    report = fuzz(schema, auth(api_keys["fuzz"]), EXAMPLES, model_name, timeout=120)
    print(f"\nschemathesis {schemathesis.SCHEMATHESIS_VERSION} against {server.url}: {report}")
    assert len(report.operations) >= 20 and report.examples >= len(report.operations) * 2
    assert report.failures == [], "\n".join(report.failures)
    assert httpx.get(f"{server.url}/ready", timeout=30).status_code == 200
