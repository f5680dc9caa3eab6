"""Schemathesis against the control API's OpenAPI file, on a live gateway.

Every operation is called with requests generated from the spec, valid ones (positive) and ones
that break it (negative), on run ids that exist and ones that do not. No answer may be a 5xx, and
every answer must be one the spec lists for the operation, with its media type, headers and
body schema. Negative requests must be refused (4xx).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import reliability_ledger
import schemathesis
from e2e_support import ADMIN_TOKEN
from gateway_thread import GatewayThread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

SPEC = Path(__file__).resolve().parent.parent / "spec" / "v1" / "api" / "control.openapi.yaml"
SCHEMA = schemathesis.openapi.from_path(SPEC)
# The admin token is ours to add (below), not a parameter to fuzz: a generated bearer token would
# make nearly every request a 401. Unknown query parameters are ignored, as HTTP APIs do; the
# spec does not promise to refuse them.
SCHEMA.config.generation.update(with_security_parameters=False, allow_extra_parameters=False)
RESULTS = list(SCHEMA.get_all_operations())
OPERATIONS = {
    operation.label: operation
    for result in RESULTS
    if isinstance(result, Ok)  # one schemathesis cannot read fails the test just below
    for operation in [result.ok()]
}
MAX_WAIT_S = 60  # the spec's maximum of `wait` on GET /v1/runs/{runId}/outputs
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    # A small frame limit, so generated input events also reach the "too big for a frame" rule.
    with GatewayThread(tmp_path_factory.mktemp("control-fuzz"), max_frame_bytes=4096) as running:
        yield running


@pytest.fixture(scope="module")
def live_runs(gw: GatewayThread) -> list[str]:
    """Runs that exist, with outputs, so reads and posts reach past the 404 as well."""
    return [gw.create_run(secrets={"S": "fuzz-secret-value"})[0] for _ in range(3)]


def _call(gw: GatewayThread, case: Case[Any], mode: GenerationMode, authorized: bool) -> int:
    """Send one generated request (with or without the admin token) and check the answer."""
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    case.headers.pop("authorization", None)  # case-insensitive
    if authorized:
        case.headers.update(AUTH)
    wait = (case.query or {}).get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 < wait <= MAX_WAIT_S:
        # A valid long poll stays valid but short: the run may never get the output it waits for.
        case.query["wait"] = wait / MAX_WAIT_S * 0.2
    try:
        response = case.call_and_validate(base_url=gw.control_url, checks=checks)
    except BaseException:  # schemathesis reports failures as a (Base)ExceptionGroup
        reliability_ledger.record("control API fuzz", 1, 1, f"{case.method} {case.path}")
        raise
    reliability_ledger.record("control API fuzz", 1, 0)
    return response.status_code


def _strategy(gw: GatewayThread, runs: list[str], label: str, mode: GenerationMode) -> Any:
    operation = OPERATIONS[label]
    generated = operation.as_strategy(mode)
    if "{runId}" not in operation.path:
        return generated
    if label.startswith("DELETE"):
        # Revoking is for good: each example that names a real run gets one of its own.
        fresh = st.builds(lambda: gw.create_run()[0])
        real = fresh.flatmap(lambda run: operation.as_strategy(mode, path_parameters={
            "runId": run}))
    else:
        real = st.sampled_from(runs).flatmap(lambda run: operation.as_strategy(
            mode, path_parameters={"runId": run}))
    return st.one_of(generated, real)


PARAMS = [
    pytest.param(label, mode, id=f"{label}-{mode.value}")
    for label in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
]
_HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much,
           HealthCheck.data_too_large]


def _fuzz(gw: GatewayThread, runs: list[str], label: str, mode: GenerationMode,
          examples: int) -> None:
    operation = OPERATIONS[label]
    if mode is GenerationMode.NEGATIVE and not _can_break(operation):
        mode = GenerationMode.POSITIVE  # nothing in the request to break: fuzz it as it is

    statuses: list[int] = []

    @settings(max_examples=examples, suppress_health_check=_HEALTH, deadline=None)
    @given(case=_strategy(gw, runs, label, mode), authorized=st.sampled_from([True] * 7 + [False]))
    def run(case: Case[Any], authorized: bool) -> None:
        status = _call(gw, case, mode, authorized)
        statuses.append(status)
        if not authorized and label.split(" ")[1].startswith("/v1/"):
            assert status == 401, (case.method, case.path, status)

    run()
    if mode is GenerationMode.POSITIVE:
        # The fuzzing got past the refusals into the handlers, not only into 401s and 404s.
        assert any(200 <= status < 300 for status in statuses), statuses


def _can_break(operation: Any) -> bool:
    """Whether the operation takes anything a negative request could get wrong."""
    definition = operation.definition.raw
    return bool(definition.get("requestBody") or definition.get("parameters")
                or "{runId}" in operation.path)


def test_every_operation_of_the_spec_is_fuzzed() -> None:
    assert len(OPERATIONS) == len(RESULTS)
    raw = SCHEMA.raw_schema["paths"]
    declared = {f"{method.upper()} {path}" for path, item in raw.items() for method in item
                if method in ("get", "post", "put", "patch", "delete")}
    assert set(OPERATIONS) == declared


@pytest.mark.parametrize(("label", "mode"), PARAMS)
def test_control_api_conforms_to_its_spec(gw: GatewayThread, live_runs: list[str], label: str,
                                           mode: GenerationMode) -> None:
    _fuzz(gw, live_runs, label, mode, examples=25)


@pytest.mark.slow
@pytest.mark.parametrize(("label", "mode"), PARAMS)
def test_control_api_conforms_to_its_spec_at_length(gw: GatewayThread, live_runs: list[str],
                                                    label: str, mode: GenerationMode) -> None:
    _fuzz(gw, live_runs, label, mode, examples=500)
