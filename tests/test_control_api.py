"""The control API over real sockets, against a real gateway: every route, every refusal.

Every response a test receives is checked against spec/v1/api/control.openapi.yaml (its status is
declared for the operation, its media type and required headers are the declared ones, and its
body validates against the declared schema), so the document and the server cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
import trio
import yaml
from e2e_support import Wire
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from gateway import control
from gateway.codec import MAX_DEPTH
from gateway.config import Settings
from gateway.control import build_app, hypercorn_config, serve_control
from gateway.server import serve_runtime
from gateway.service import Gateway, token_digest
from gateway.specfiles import spec_root
from gateway.store.base import Store, StoreError
from gateway.store.sqlite import open_sqlite_store
from statemachine.inputs import RunRegistered
from statemachine.messages import Capability
from statemachine.records import RunGrant, SessionState

ADMIN_TOKEN = "control-test-admin-token-1234"
SECRET = "hunter2-very-secret-value"
ATTACH = "runtime.session.attach.command"
HEARTBEAT = "runtime.session.heartbeat.command"
OUTPUT = "runtime.task.output.event"
SPEC_PATH = spec_root() / "v1" / "api" / "control.openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
IDENTITY: dict[str, Any] = json.loads(
    (spec_root() / "v1" / "schemas" / "common" / "identity.json").read_text(encoding="utf-8"))
OUTPUT_EVENT: dict[str, Any] = json.loads(
    (spec_root() / "v1" / "schemas" / "events" / "output-event.json").read_text(encoding="utf-8"))

RUNS = "/v1/runs"
RUN = "/v1/runs/{runId}"
TOKEN = "/v1/runs/{runId}/token"
INPUTS = "/v1/runs/{runId}/inputs"
OUTPUTS = "/v1/runs/{runId}/outputs"
SESSION = "/v1/runs/{runId}/session"


# --- the spec as the judge ----------------------------------------------------------------------


def resolve(node: Any) -> Any:
    """Follow local `$ref`s of the OpenAPI document."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = SPEC
        for token in node["$ref"].removeprefix("#/").split("/"):
            target = target[token]
        node = target
    return node


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Why `instance` breaks `schema` (whose refs point into the OpenAPI document)."""
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": SPEC["components"],
        "allOf": [schema],
    }
    validator = jsonschema.Draft202012Validator(root)
    return [error.message for error in validator.iter_errors(instance)]


def component(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def conforms(response: httpx.Response, template: str) -> Any:
    """Assert the response is one the spec declares for its operation; return its body."""
    method = response.request.method.lower()
    operation = SPEC["paths"][template][method]
    status = str(response.status_code)
    assert status in operation["responses"], f"{method} {template}: undeclared {status}"
    declared = resolve(operation["responses"][status])
    for name, header in declared.get("headers", {}).items():
        if header.get("required"):
            assert name.lower() in response.headers, f"{status} lacks the header {name}"
            assert not schema_errors(response.headers[name], header["schema"])
    content = declared.get("content")
    if content is None:
        assert response.content == b""
        return None
    media = response.headers["content-type"].partition(";")[0].strip()
    assert media in content, f"{method} {template} {status}: undeclared media type {media}"
    if not media.endswith("json"):
        return response.text
    body = response.json()
    errors = schema_errors(body, content[media]["schema"])
    assert not errors, (method, template, status, errors)
    return body


def problem(response: httpx.Response, status: int, slug: str, template: str | None = None) -> Any:
    """Assert an RFC 9457 problem of this status and type (conforming to the spec if routed)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = conforms(response, template) if template else response.json()
    assert not schema_errors(body, component("Problem"))
    assert body["type"] == control.PROBLEM_BASE + slug
    assert body["status"] == status
    assert body["title"] == control.TITLES[slug]
    return body


# --- a gateway on loopback ----------------------------------------------------------------------


class Env:
    """A served gateway: its service object, the platform's HTTP client, the runtime URL."""

    def __init__(self, gateway: Gateway, http: httpx.AsyncClient, runtime_url: str) -> None:
        self.gateway = gateway
        self.http = http
        self.runtime_url = runtime_url

    async def create_run(self, **body: Any) -> tuple[str, str]:
        body.setdefault("capabilities", ["secrets.read", "kv.read", "kv.write"])
        body.setdefault("secrets", {"API_KEY": SECRET})
        body.setdefault("config", {"model": "m1"})
        created = conforms(await self.http.post("/v1/runs", json=body), RUNS)
        return cast(str, created["runId"]), cast(str, created["runtimeToken"])

    @asynccontextmanager
    async def runtime(self, token: str) -> AsyncIterator[Wire]:
        headers = [(b"authorization", f"Bearer {token}".encode())]
        async with open_websocket_url(self.runtime_url, extra_headers=headers) as ws:
            yield Wire(ws)


@asynccontextmanager
async def serving(gateway: Gateway, settings: Settings) -> AsyncIterator[Env]:
    """Serve a gateway's runtime endpoint (plain ws) and control API on ephemeral ports."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run_timers)
        server = await nursery.start(serve_runtime, gateway, settings, None)
        port = await nursery.start(serve_control, gateway, settings, ADMIN_TOKEN)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        ) as http:
            yield Env(gateway, http, f"ws://127.0.0.1:{server.port}/runtime")
        nursery.cancel_scope.cancel()


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": tmp_path, "port": 0, "control_port": 0,
                              "store_sync": "normal"}
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def real_gateway(tmp_path: Path, **overrides: Any) -> AsyncIterator[Env]:
    """A gateway on a SQLite store in `tmp_path`, served on loopback."""
    settings = settings_for(tmp_path, **overrides)
    async with open_sqlite_store(settings.database, synchronous="normal") as store:
        gateway = Gateway(settings, store)
        await gateway.load()
        async with serving(gateway, settings) as env:
            yield env


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with real_gateway(tmp_path) as served:
        yield served


async def attach(wire: Wire, run_id: str, **extra: Any) -> dict[str, str]:
    reply = await wire.attach(run_id, **extra)
    return {"sessionId": reply["sessionId"], "runId": run_id}


def output(seq: int, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"eventId": f"evt-{seq}", "seq": seq, "type": "log.line",
            "data": data if data is not None else {"n": seq},
            "timestamp": "2026-11-21T12:00:00.123Z"}


async def publish(wire: Wire, ids: dict[str, str], *events: dict[str, Any]) -> None:
    frame = await wire.call(OUTPUT, {**ids, "events": list(events)})
    assert frame["channel"] == "runtime.task.output.reply", frame
    assert frame["payload"] == {"accepted": True}


# --- the document itself ------------------------------------------------------------------------


def test_spec_is_openapi_31_marked_as_ours_and_its_schemas_are_valid() -> None:
    assert SPEC["openapi"] == "3.1.0"
    assert SPEC["x-agent-gateway"]["extension"] is True
    for schema in SPEC["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert SPEC["components"]["securitySchemes"]["adminToken"] == {
        **SPEC["components"]["securitySchemes"]["adminToken"], "type": "http", "scheme": "bearer"}
    assert set(SPEC["x-agent-gateway"]["problemTypes"]) == {
        control.PROBLEM_BASE + slug for slug in control.TITLES}


def test_spec_declares_auth_and_crashes_on_every_operation() -> None:
    for template, item in SPEC["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            statuses = set(operation["responses"])
            assert "500" in statuses, (method, template)
            if template.startswith("/v1/"):
                assert "security" not in operation  # the document-wide bearer scheme applies
                assert {"401", "503"} <= statuses, (method, template)
            else:
                assert operation["security"] == []
            if "requestBody" in operation:
                assert {"400", "413", "415", "422"} <= statuses, (method, template)


def test_spec_bounds_every_string_array_and_map_and_closes_every_object() -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            assert not ("$ref" in node and len(node) > 1), node  # no siblings beside a $ref
            types = node.get("type")
            types = types if isinstance(types, list) else [types]
            if "string" in types:
                assert {"maxLength", "enum", "const"} & set(node), node
            if "array" in types:
                assert "maxItems" in node, node
            if "object" in types and "properties" in node:
                assert node.get("additionalProperties") is False, node
            if "object" in types and "properties" not in node:
                assert "maxProperties" in node, node
            for key, value in node.items():
                if key not in ("enum", "const", "default", "examples"):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(SPEC["components"]["schemas"])


def test_spec_agrees_with_the_protocol_and_the_code() -> None:
    schemas = SPEC["components"]["schemas"]
    assert schemas["Capability"]["enum"] == [c.value for c in Capability]
    assert schemas["SessionView"]["properties"]["state"]["enum"] == [s.value for s in SessionState]
    identity = IDENTITY["$defs"]
    for name, key in [("RunId", "runId"), ("SessionId", "sessionId"), ("EventId", "eventId"),
                      ("Timestamp", "timestamp")]:
        assert schemas[name]["pattern"] == identity[key]["pattern"], name
        assert schemas[name]["maxLength"] == identity[key]["maxLength"], name
    protocol_event = OUTPUT_EVENT["$defs"]["OutputEvent"]["properties"]
    assert schemas["EventType"]["pattern"] == protocol_event["type"]["pattern"]
    assert schemas["EventData"]["maxProperties"] == protocol_event["data"]["maxProperties"]
    assert schemas["Seq"]["maximum"] == protocol_event["seq"]["maximum"] == control.MAX_SEQ
    assert control.RUN_ID.pattern == identity["runId"]["pattern"].strip("^$")
    assert control.EVENT_ID.pattern == identity["eventId"]["pattern"].strip("^$")
    assert control.EVENT_TYPE.pattern == protocol_event["type"]["pattern"].strip("^$")
    outputs = {p["name"]: p["schema"] for p in SPEC["paths"][OUTPUTS]["get"]["parameters"]}
    assert outputs["wait"]["maximum"] == control.MAX_WAIT_S
    assert outputs["limit"]["maximum"] == control.MAX_LIMIT
    # Bodies nest one level less than a frame: an input's data sits as deep in its body as in
    # the delivery frame that carries it (envelope/payload/events/item vs body/events/item).
    assert control.BODY_DEPTH == MAX_DEPTH - 1


# --- authentication -----------------------------------------------------------------------------

EVERY_V1_ROUTE = [
    ("POST", RUNS, RUNS),
    ("DELETE", "/v1/runs/run_abcdefgh", RUN),
    ("POST", "/v1/runs/run_abcdefgh/inputs", INPUTS),
    ("GET", "/v1/runs/run_abcdefgh/outputs", OUTPUTS),
    ("GET", "/v1/runs/run_abcdefgh/session", SESSION),
]


@pytest.mark.parametrize("authorization", [
    None,
    "Bearer wrong-token",
    f"Basic {ADMIN_TOKEN}",
    f"Bearer {ADMIN_TOKEN}x",
    f"Bearer {ADMIN_TOKEN[:-1]}",
    f"{ADMIN_TOKEN}",
    "Bearer",
])
async def test_every_v1_route_needs_the_admin_token(env: Env, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    async with httpx.AsyncClient(base_url=str(env.http.base_url), headers=headers) as anonymous:
        for method, path, template in EVERY_V1_ROUTE:
            # A body the route would refuse: authentication must come first.
            response = await anonymous.request(method, path, content=b"{",
                                               headers={"content-type": "application/json"})
            body = problem(response, 401, "unauthorized", template)
            assert response.headers["www-authenticate"] == 'Bearer realm="agent-gateway"'
            assert ADMIN_TOKEN not in response.text and "wrong-token" not in response.text
            assert body["detail"] == "send Authorization: Bearer <admin token>"
        # Unknown paths under /v1 do not say whether they exist.
        problem(await anonymous.get("/v1/nothing-here"), 401, "unauthorized")
        # The open routes stay open.
        assert conforms(await anonymous.get("/healthz"), "/healthz") == {"status": "ok"}
        assert (await anonymous.get("/metrics")).status_code == 200


async def test_the_bearer_scheme_is_case_insensitive(env: Env) -> None:
    async with httpx.AsyncClient(base_url=str(env.http.base_url),
                                 headers={"authorization": f"bearer {ADMIN_TOKEN}"}) as client:
        response = await client.get("/v1/runs/run_abcdefgh/session")
        problem(response, 404, "unknown-run", SESSION)


async def test_build_app_refuses_an_empty_admin_token(tmp_path: Path) -> None:
    gateway = Gateway(settings_for(tmp_path), cast(Store, BrokenStore(StoreError())))
    with pytest.raises(ValueError, match="admin token"):
        build_app(gateway, "")


# --- routing ------------------------------------------------------------------------------------


async def test_unknown_routes_and_methods_are_problems(env: Env) -> None:
    problem(await env.http.get("/nope"), 404, "not-found")
    problem(await env.http.get("/v1/nothing-here"), 404, "not-found")
    problem(await env.http.get("/v1/runs/run_abcdefgh/session/"), 404, "not-found")  # no redirect
    problem(await env.http.post("/v1/runs/"), 404, "not-found")
    wrong = await env.http.put("/v1/runs", json={})
    problem(wrong, 405, "method-not-allowed")
    assert wrong.headers["allow"] == "POST"
    wrong = await env.http.post("/healthz")
    problem(wrong, 405, "method-not-allowed")
    assert "GET" in wrong.headers["allow"]
    wrong = await env.http.patch("/v1/runs/run_abcdefgh/session")
    problem(wrong, 405, "method-not-allowed")


def test_hypercorn_binds_the_configured_address(tmp_path: Path) -> None:
    v4 = hypercorn_config(settings_for(tmp_path, control_host="127.0.0.1", control_port=9))
    assert v4.bind == ["127.0.0.1:9"]
    v6 = hypercorn_config(settings_for(tmp_path, control_host="::1", control_port=0))
    assert v6.bind == ["[::1]:0"]
    assert v6.accesslog is None


async def test_serve_control_reports_the_port_it_bound(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    gateway = Gateway(settings, cast(Store, BrokenStore(StoreError())))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_control, gateway, settings, ADMIN_TOKEN)
        assert isinstance(port, int) and port > 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
        nursery.cancel_scope.cancel()


# --- POST /v1/runs ------------------------------------------------------------------------------


async def test_create_run_returns_the_token_once_and_the_session_never_shows_secrets(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = await env.http.post("/v1/runs", json={
        "runId": "run_abcdefgh1",
        "capabilities": ["secrets.read", "kv.read"],
        "secrets": {"API_KEY": SECRET},
        "config": {"model": "m1", "nested": {"list": [1, 2.5, None, True]}},
        "configVersion": "cfg-7",
    })
    assert response.status_code == 201
    created = conforms(response, RUNS)
    assert response.headers["cache-control"] == "no-store"
    assert created["runId"] == "run_abcdefgh1"
    assert created["configVersion"] == "cfg-7"
    assert "mainRunId" not in created
    assert re.fullmatch(r"agt_[A-Za-z0-9_-]{43}", created["runtimeToken"])
    grant = await env.gateway.store.get_run("run_abcdefgh1")
    assert grant is not None and grant.secrets == {"API_KEY": SECRET}
    assert grant.capabilities == {Capability.SECRETS_READ, Capability.KV_READ}
    assert grant.config == {"model": "m1", "nested": {"list": [1, 2.5, None, True]}}

    view = conforms(await env.http.get("/v1/runs/run_abcdefgh1/session"), SESSION)
    assert view == {"runId": "run_abcdefgh1", "state": "detached", "sessionId": None,
                    "connectionEpoch": None, "leaseExpiresAt": None, "capabilities": [],
                    "connected": False}

    # Without a runId or configVersion, the gateway makes them up.
    generated = conforms(await env.http.post("/v1/runs", json={
        "capabilities": [], "secrets": {}, "config": {"a": 1}}), RUNS)
    assert control.RUN_ID.fullmatch(generated["runId"])
    assert generated["configVersion"].startswith("cfg_")
    assert generated["runtimeToken"] != created["runtimeToken"]
    assert SECRET not in caplog.text


async def test_sub_runs(env: Env) -> None:
    main_id, _ = await env.create_run(runId="run_mainrun01")
    response = await env.http.post("/v1/runs", json={
        "runId": "run_subrun001", "mainRunId": main_id, "capabilities": [], "secrets": {},
        "config": {}})
    assert conforms(response, RUNS)["mainRunId"] == main_id
    # Sub-runs nest one level only; the main run must exist and be live.
    for main in ("run_subrun001", "run_unknown01"):
        response = await env.http.post("/v1/runs", json={
            "mainRunId": main, "capabilities": [], "secrets": {}, "config": {}})
        problem(response, 404, "unknown-main-run", RUNS)
    # Revoking the main run revokes its sub-runs.
    assert (await env.http.delete(f"/v1/runs/{main_id}")).status_code == 204
    problem(await env.http.get("/v1/runs/run_subrun001/session"), 404, "unknown-run", SESSION)


async def test_a_main_run_revoked_while_its_sub_run_is_created_takes_the_sub_run_along(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The revoke commits after the create, and reaches the core before the create's answer."""
    main_id, _ = await env.create_run(runId="run_mainrun02")
    create_run = env.gateway.store.create_run

    async def revoked_meanwhile(grant: RunGrant, token_hash: bytes) -> None:
        await create_run(grant, token_hash)
        assert await env.gateway.revoke_run(main_id)

    monkeypatch.setattr(env.gateway.store, "create_run", revoked_meanwhile)
    response = await env.http.post("/v1/runs", json={**VALID_CREATE, "runId": "run_subrun002",
                                                     "mainRunId": main_id})
    assert conforms(response, RUNS)["runId"] == "run_subrun002"
    assert not env.gateway.hub.knows_run("run_subrun002")
    problem(await env.http.get("/v1/runs/run_subrun002/session"), 404, "unknown-run", SESSION)


async def test_a_run_id_is_never_reused(env: Env) -> None:
    run_id, _ = await env.create_run(runId="run_taken0001")
    body = {"runId": run_id, "capabilities": [], "secrets": {}, "config": {}}
    problem(await env.http.post("/v1/runs", json=body), 409, "run-exists", RUNS)
    assert (await env.http.delete(f"/v1/runs/{run_id}")).status_code == 204
    problem(await env.http.post("/v1/runs", json=body), 409, "run-exists", RUNS)


VALID_CREATE: dict[str, Any] = {"capabilities": [], "secrets": {}, "config": {}}

INVALID_CREATES: list[tuple[Any, str]] = [
    ([], ""),
    ("text", ""),
    ({}, "/capabilities"),
    ({"capabilities": [], "secrets": {}}, "/config"),
    ({**VALID_CREATE, "extra": 1}, "/extra"),
    ({**VALID_CREATE, "runId": "run_short"}, "/runId"),
    ({**VALID_CREATE, "runId": "job_abcdefgh"}, "/runId"),
    ({**VALID_CREATE, "runId": "run_" + "a" * 65}, "/runId"),
    ({**VALID_CREATE, "runId": 12345678}, "/runId"),
    ({**VALID_CREATE, "mainRunId": "main"}, "/mainRunId"),
    ({**VALID_CREATE, "mainRunId": None}, "/mainRunId"),
    ({**VALID_CREATE, "configVersion": ""}, "/configVersion"),
    ({**VALID_CREATE, "configVersion": "v" * 257}, "/configVersion"),
    ({**VALID_CREATE, "capabilities": "kv.read"}, "/capabilities"),
    ({**VALID_CREATE, "capabilities": ["kv.read", "kv.read"]}, "/capabilities"),
    ({**VALID_CREATE, "capabilities": ["kv.read", "kv.delete"]}, "/capabilities/1"),
    ({**VALID_CREATE, "capabilities": [1]}, "/capabilities/0"),
    ({**VALID_CREATE, "secrets": []}, "/secrets"),
    ({**VALID_CREATE, "secrets": {"API_KEY": 1}}, "/secrets/API_KEY"),
    ({**VALID_CREATE, "secrets": {"API_KEY": None}}, "/secrets/API_KEY"),
    ({**VALID_CREATE, "secrets": {"": SECRET}}, "/secrets/"),
    ({**VALID_CREATE, "secrets": {"a/b~c": 5}}, "/secrets/a~1b~0c"),
    ({**VALID_CREATE, "secrets": {"K" * 257: SECRET}}, "/secrets/" + "K" * 256),
    ({**VALID_CREATE, "secrets": {"API_KEY": SECRET * 3000}}, "/secrets/API_KEY"),
    ({**VALID_CREATE, "secrets": {f"S{i}": SECRET for i in range(257)}}, "/secrets"),
    ({**VALID_CREATE, "config": []}, "/config"),
    ({**VALID_CREATE, "config": None}, "/config"),
    ({**VALID_CREATE, "config": {f"k{i}": i for i in range(1025)}}, "/config"),
]


@pytest.mark.parametrize(("body", "pointer"), INVALID_CREATES)
async def test_create_run_refuses_bodies_that_break_the_schema(
    env: Env, body: Any, pointer: str
) -> None:
    # The spec's schema refuses the body too: the code and the document agree.
    assert schema_errors(body, component("CreateRunRequest"))
    response = await env.http.post("/v1/runs", json=body)
    refused = problem(response, 422, "invalid-request", RUNS)
    assert refused["pointer"] == pointer
    assert SECRET not in response.text


async def test_patterns_anchor_at_the_very_end(env: Env) -> None:
    # ECMA-262's `$` (the spec's) does not match before a final newline; Python's does, which
    # is why the Python `jsonschema` package cannot be the judge of this one.
    body = {**VALID_CREATE, "runId": "run_abcdefgh\n"}
    response = await env.http.post("/v1/runs", json=body)
    assert problem(response, 422, "invalid-request", RUNS)["pointer"] == "/runId"


async def test_create_run_takes_bodies_at_every_bound(env: Env) -> None:
    body = {
        "runId": "run_" + "a" * 64,
        "capabilities": [c.value for c in Capability],
        # 256 secrets of the largest size would pass the schema but not the 4 MiB body limit;
        # together they must fit one runtime frame (1 MiB less 1024 bytes): 1 025 109 bytes here.
        "secrets": {f"{i:0>256}": "s" * (65536 if i == 0 else 3500) for i in range(256)},
        "config": {f"k{i}": i for i in range(1024)},
        "configVersion": "v" * 256,
    }
    assert not schema_errors(body, component("CreateRunRequest"))
    created = conforms(await env.http.post("/v1/runs", json=body), RUNS)
    grant = await env.gateway.store.get_run(created["runId"])
    assert grant is not None and len(grant.secrets) == 256 and len(grant.config) == 1024


def nested(levels: int) -> Any:
    """An object nesting `levels` levels deep (1: {})."""
    value: Any = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


MALFORMED_BODIES = [
    b"",
    b"{",
    b"{} {}",
    b'{"capabilities":[],"secrets":{},"config":{},"config":{}}',
    b'{"capabilities":[],"secrets":{"A":"' + SECRET.encode() + b'","A":"x"},"config":{}}',
    b'{"capabilities":[],"secrets":{},"config":{"x":NaN}}',
    b'{"capabilities":[],"secrets":{},"config":{"x":-Infinity}}',
    b'{"capabilities":[],"secrets":{},"config":{"x":1e400}}',
    b'{"capabilities":[],"secrets":{},"config":{"x":9223372036854775808}}',
    b'{"capabilities":[],"secrets":{},"config":{"x":-9223372036854775809}}',
    b'{"capabilities":[],"secrets":{},"config":{"x":1e19}}',
    b'{"capabilities":[],"secrets":{},"config":{"x":[-1.8446744073709552e+19]}}',
    b'{"capabilities":[],"secrets":{},"config":{"x":"\\ud800"}}',
    b'{"capabilities":[],"secrets":{},"config":{"x":"\xff"}}',
    b'{"capabilities":[],"secrets":{"A":"' + SECRET.encode() + b'"},"config":{"x":"\xff"}}',
    b'{"capabilities":[],"secrets":{},"config":' + json.dumps(nested(31)).encode() + b"}",
    b"[" * 100_000 + b"]" * 100_000,
]


@pytest.mark.parametrize("raw", MALFORMED_BODIES)
async def test_create_run_refuses_json_it_cannot_trust(env: Env, raw: bytes) -> None:
    response = await env.http.post("/v1/runs", content=raw,
                                   headers={"content-type": "application/json"})
    problem(response, 400, "malformed-json", RUNS)
    assert SECRET not in response.text


@pytest.mark.parametrize("number", [
    "0", "-1", "9223372036854775807", "-9223372036854775808", "9223372036854775808",
    "-9223372036854775809", "1.5", "-0.0", "1e3", "1E+18", "1e19", "9.2233720368547758e18",
    "5.3210073872994633e+98", "1.5e-300", "123456789012345678901234567890",
])
async def test_numbers_are_judged_as_the_spec_judges_them(env: Env, number: str) -> None:
    raw = b'{"capabilities":[],"secrets":{},"config":{"x":[' + number.encode() + b"]}}"
    # The schema sees the number's value, whatever its spelling (1e3 is the integer 1000).
    value = json.loads(number, parse_float=float, parse_int=int)
    config_schema = resolve(component("CreateRunRequest"))["properties"]["config"]
    valid = not schema_errors({"x": [value]}, config_schema)
    response = await env.http.post("/v1/runs", content=raw,
                                   headers={"content-type": "application/json"})
    if valid:
        assert conforms(response, RUNS)["runId"]
    else:
        problem(response, 400, "malformed-json", RUNS)


async def test_the_deepest_acceptable_config_is_accepted(env: Env) -> None:
    config = nested(control.BODY_DEPTH - 1)  # the body object itself is one level
    created = conforms(await env.http.post("/v1/runs", json={**VALID_CREATE, "config": config}),
                       RUNS)
    grant = await env.gateway.store.get_run(created["runId"])
    assert grant is not None and grant.config == config


@pytest.mark.parametrize("content_type", [
    None, "text/plain", "application/x-www-form-urlencoded", "application/+json",
])
async def test_bodies_must_be_declared_json(env: Env, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    response = await env.http.post("/v1/runs", content=json.dumps(VALID_CREATE).encode(),
                                   headers=headers)
    problem(response, 415, "unsupported-media-type", RUNS)
    response = await env.http.post("/v1/runs", content=json.dumps(VALID_CREATE).encode(),
                                   headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 201


@pytest.mark.parametrize("encoding", ["gzip", "br", "identity, gzip"])
async def test_encoded_bodies_are_refused_not_misread(env: Env, encoding: str) -> None:
    headers = {"content-type": "application/json", "content-encoding": encoding}
    response = await env.http.post("/v1/runs", content=json.dumps(VALID_CREATE).encode(),
                                   headers=headers)
    assert "content-encoding" in problem(response, 415, "unsupported-media-type", RUNS)["detail"]
    headers = {"content-type": "application/vnd.platform+json", "content-encoding": "Identity"}
    response = await env.http.post("/v1/runs", content=json.dumps(VALID_CREATE).encode(),
                                   headers=headers)
    assert response.status_code == 201


async def test_bodies_over_4_mib_are_refused_before_parsing(env: Env) -> None:
    url = httpx.URL(str(env.http.base_url))
    assert url.port is not None
    # A declared length over the limit is refused before a byte of the body is read.
    stream = await trio.open_tcp_stream("127.0.0.1", url.port)
    async with stream:
        await stream.send_all(
            b"POST /v1/runs HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n"
            b"content-length: " + str(control.MAX_BODY_BYTES + 1).encode() + b"\r\n\r\n")
        received = b""
        with trio.fail_after(10):
            while b"}" not in received:
                chunk = await stream.receive_some()
                assert chunk, received
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"content-type: application/problem+json" in head.lower()
    document = json.loads(body)
    assert not schema_errors(document, component("Problem"))
    assert document["type"] == control.PROBLEM_BASE + "payload-too-large"

    # A chunked body is counted as it arrives.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"config":{"x":"'
        for _ in range(4):
            yield b"a" * (1024 * 1024)
        yield b'"}}'

    response = await env.http.post("/v1/runs", content=chunks(),
                                   headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    problem(response, 413, "payload-too-large", RUNS)


# --- POST /v1/runs/{runId}/inputs ---------------------------------------------------------------


async def test_inputs_are_queued_stamped_and_delivered(env: Env) -> None:
    run_id, token = await env.create_run()
    async with env.runtime(token) as wire:
        ids = await attach(wire, run_id)
        before = env.gateway.clock.now()
        response = await env.http.post(f"/v1/runs/{run_id}/inputs", json={"events": [
            {"type": "user.message", "data": {"text": "hi"}, "eventId": "msg-1"},
            {"type": "user.message", "data": {"text": "again"}},
        ]})
        assert response.status_code == 202
        assert conforms(response, INPUTS) == {"seqs": [0, 1]}
        after = env.gateway.clock.now()
        delivery = await wire.recv()
        assert delivery["channel"] == "service.task.input.event"
        assert delivery["payload"]["sessionId"] == ids["sessionId"]
        delivered = delivery["payload"]["events"]
        assert [(e["seq"], e["type"], e["data"]) for e in delivered] == [
            (0, "user.message", {"text": "hi"}), (1, "user.message", {"text": "again"})]
        assert delivered[0]["eventId"] == "msg-1"
        assert re.fullmatch(r"evt_[0-9a-f]{32}", delivered[1]["eventId"])

    stored = await env.gateway.store.read_inputs(run_id, -1, 10)
    assert [e.event_id for e in stored] == ["msg-1", delivered[1]["eventId"]]
    assert all(before <= e.timestamp <= after for e in stored)
    more = await env.http.post(f"/v1/runs/{run_id}/inputs",
                               json={"events": [{"type": "x", "data": {}}]})
    assert conforms(more, INPUTS) == {"seqs": [2]}


async def test_a_retried_post_is_queued_and_delivered_once(env: Env) -> None:
    """The platform lost a 202 (or got a 503 after the commit) and posts the same body again."""
    run_id, token = await env.create_run()
    body = {"events": [input_event(eventId="msg-1"), input_event(eventId="msg-2")]}
    url = f"/v1/runs/{run_id}/inputs"
    assert conforms(await env.http.post(url, json=body), INPUTS) == {"seqs": [0, 1]}
    assert conforms(await env.http.post(url, json=body), INPUTS) == {"seqs": [0, 1]}
    body["events"].append(input_event(eventId="msg-3"))
    assert conforms(await env.http.post(url, json=body), INPUTS) == {"seqs": [0, 1, 2]}
    async with env.runtime(token) as wire:
        await attach(wire, run_id)
        delivery = await wire.recv()
        assert [e["eventId"] for e in delivery["payload"]["events"]] == ["msg-1", "msg-2", "msg-3"]
        # A retry while the runtime is connected delivers nothing again.
        assert conforms(await env.http.post(url, json=body), INPUTS) == {"seqs": [0, 1, 2]}
        with trio.move_on_after(0.3):
            extra = await wire.recv()
            raise AssertionError(f"delivered again: {extra}")


async def test_an_event_id_queued_with_other_content_is_a_409_and_queues_nothing(
    env: Env,
) -> None:
    run_id, _ = await env.create_run()
    url = f"/v1/runs/{run_id}/inputs"
    await env.http.post(url, json={"events": [input_event(eventId="msg-1")]})
    clash = {"events": [input_event(eventId="msg-2"), input_event(eventId="msg-1", data={})]}
    body = problem(await env.http.post(url, json=clash), 409, "input-conflict", INPUTS)
    assert body["pointer"] == "/events/1/eventId"
    assert [e.event_id for e in await env.gateway.store.read_inputs(run_id, -1, 10)] == ["msg-1"]


async def test_one_post_cannot_name_an_event_id_twice(env: Env) -> None:
    run_id, _ = await env.create_run()
    twice = {"events": [input_event(eventId="a"), input_event(eventId="b"),
                        input_event(eventId="a")]}
    response = await env.http.post(f"/v1/runs/{run_id}/inputs", json=twice)
    assert problem(response, 422, "invalid-request", INPUTS)["pointer"] == "/events/2/eventId"
    assert await env.gateway.store.read_inputs(run_id, -1, 10) == ()


async def test_a_lost_token_is_replaced_and_the_old_one_stops_working(env: Env) -> None:
    """The platform's createRun answer never came, so it retried: 409, and no token to use."""
    body = {**VALID_CREATE, "runId": "run_lostAnswer01"}
    first = conforms(await env.http.post("/v1/runs", json=body), RUNS)
    problem(await env.http.post("/v1/runs", json=body), 409, "run-exists", RUNS)
    async with env.runtime(first["runtimeToken"]) as held:
        ids = await attach(held, "run_lostAnswer01")
        response = await env.http.post("/v1/runs/run_lostAnswer01/token")
        replaced = conforms(response, TOKEN)
        assert response.headers["cache-control"] == "no-store"
        assert replaced["runId"] == "run_lostAnswer01"
        assert replaced["runtimeToken"] != first["runtimeToken"]
        # The connection admitted with the old token keeps its session ...
        beat = await held.call(HEARTBEAT, ids)
        assert beat["payload"]["accepted"] is True, beat
    # ... but new handshakes need the new one.
    with pytest.raises(ConnectionRejected) as refused:
        async with env.runtime(first["runtimeToken"]):
            pass  # pragma: no cover - the handshake must be refused
    assert refused.value.status_code == 401
    async with env.runtime(replaced["runtimeToken"]) as wire:
        await attach(wire, "run_lostAnswer01", reconnect=True)


async def test_only_a_live_run_gets_a_new_token(env: Env) -> None:
    problem(await env.http.post("/v1/runs/run_neverCreated/token"), 404, "unknown-run", TOKEN)
    run_id, _ = await env.create_run()
    assert (await env.http.delete(f"/v1/runs/{run_id}")).status_code == 204
    problem(await env.http.post(f"/v1/runs/{run_id}/token"), 404, "unknown-run", TOKEN)


def input_event(**fields: Any) -> dict[str, Any]:
    return {"type": "user.message", "data": {"text": "hi"}, **fields}


INVALID_INPUTS: list[tuple[Any, str]] = [
    ([], ""),
    ({}, "/events"),
    ({"events": {}}, "/events"),
    ({"events": []}, "/events"),
    ({"events": [input_event()] * 1001}, "/events"),
    ({"events": [input_event()], "extra": True}, "/extra"),
    ({"events": [input_event(), "x"]}, "/events/1"),
    ({"events": [{"data": {}}]}, "/events/0/type"),
    ({"events": [{"type": "x"}]}, "/events/0/data"),
    ({"events": [input_event(seq=3)]}, "/events/0/seq"),
    ({"events": [input_event(type="has space")]}, "/events/0/type"),
    ({"events": [input_event(type="")]}, "/events/0/type"),
    ({"events": [input_event(type="t" * 129)]}, "/events/0/type"),
    ({"events": [input_event(data=[])]}, "/events/0/data"),
    ({"events": [input_event(data={f"k{i}": i for i in range(257)})]}, "/events/0/data"),
    ({"events": [input_event(eventId="")]}, "/events/0/eventId"),
    ({"events": [input_event(eventId="evt 1")]}, "/events/0/eventId"),
    ({"events": [input_event(eventId=7)]}, "/events/0/eventId"),
]


@pytest.mark.parametrize(("body", "pointer"), INVALID_INPUTS)
async def test_inputs_refuse_bodies_that_break_the_schema(
    env: Env, body: Any, pointer: str
) -> None:
    assert schema_errors(body, component("PostInputsRequest"))
    run_id, _ = await env.create_run()
    response = await env.http.post(f"/v1/runs/{run_id}/inputs", json=body)
    assert problem(response, 422, "invalid-request", INPUTS)["pointer"] == pointer
    # Nothing of a refused batch is queued.
    assert await env.gateway.store.read_inputs(run_id, -1, 10) == ()


async def test_inputs_take_a_full_batch(env: Env) -> None:
    run_id, _ = await env.create_run()
    body = {"events": [input_event(eventId=f"e{i}") for i in range(1000)]}
    response = await env.http.post(f"/v1/runs/{run_id}/inputs", json=body)
    assert conforms(response, INPUTS) == {"seqs": list(range(1000))}


async def test_an_input_must_fit_one_runtime_frame(tmp_path: Path) -> None:
    async with real_gateway(tmp_path, max_frame_bytes=4096) as env:
        run_id, _ = await env.create_run()
        fits = {"text": "a" * (4096 - control.FRAME_HEADROOM - 20)}
        too_big = {"text": "a" * (4096 - control.FRAME_HEADROOM)}
        response = await env.http.post(f"/v1/runs/{run_id}/inputs", json={"events": [
            input_event(data=fits), input_event(data=too_big)]})
        assert problem(response, 422, "invalid-request", INPUTS)["pointer"] == "/events/1/data"
        response = await env.http.post(f"/v1/runs/{run_id}/inputs",
                                       json={"events": [input_event(data=fits)]})
        assert conforms(response, INPUTS) == {"seqs": [0]}


async def test_the_smallest_frame_limit_still_takes_runs(tmp_path: Path) -> None:
    """Below 4096 bytes a frame would not even hold its envelope and ids (1024) plus a config."""
    with pytest.raises(ValueError):
        settings_for(tmp_path, max_frame_bytes=4095)
    async with real_gateway(tmp_path, max_frame_bytes=4096) as env:
        body = {**VALID_CREATE, "config": {"model": "m" * 2000}}
        assert conforms(await env.http.post("/v1/runs", json=body), RUNS)["runId"]


@pytest.mark.parametrize("field", ["config", "secrets"])
async def test_config_and_secrets_must_each_fit_the_reply_frame_that_carries_them(
    tmp_path: Path, field: str
) -> None:
    """A runtime reads its config, and all its secrets, in one reply each: bytes, not chars."""
    budget = 4096 - control.FRAME_HEADROOM
    async with real_gateway(tmp_path, max_frame_bytes=4096) as env:
        fits = {"A": "\u00e9" * ((budget - 20) // 2)}  # 2 bytes each in UTF-8
        too_big = {"A": "\u00e9" * (budget // 2)}
        response = await env.http.post("/v1/runs", json={**VALID_CREATE, field: too_big})
        assert problem(response, 422, "invalid-request", RUNS)["pointer"] == f"/{field}"
        assert "\u00e9" not in response.text  # the refusal never quotes a value
        response = await env.http.post("/v1/runs", json={**VALID_CREATE, field: fits})
        assert conforms(response, RUNS)["runId"]


@pytest.mark.parametrize("run_id", ["run_unknown01", "nope", "run_" + "a" * 65])
async def test_inputs_to_an_unknown_run_are_404(env: Env, run_id: str) -> None:
    response = await env.http.post(f"/v1/runs/{run_id}/inputs",
                                   json={"events": [input_event()]})
    problem(response, 404, "unknown-run", INPUTS)


# --- GET /v1/runs/{runId}/outputs ---------------------------------------------------------------


async def test_outputs_page_by_seq(env: Env) -> None:
    run_id, token = await env.create_run()
    async with env.runtime(token) as wire:
        ids = await attach(wire, run_id)
        await publish(wire, ids, *(output(seq) for seq in range(5)))
    url = f"/v1/runs/{run_id}/outputs"
    page = conforms(await env.http.get(url, params={"limit": 2}), OUTPUTS)
    assert page == {"events": [output(0), output(1)], "next": 1}
    page = conforms(await env.http.get(url, params={"after": page["next"]}), OUTPUTS)
    assert [e["seq"] for e in page["events"]] == [2, 3, 4] and page["next"] == 4
    page = conforms(await env.http.get(url, params={"after": 4}), OUTPUTS)
    assert page == {"events": [], "next": 4}
    page = conforms(await env.http.get(url, params={"after": 100, "wait": 0}), OUTPUTS)
    assert page == {"events": [], "next": 100}


async def test_a_page_stops_at_its_byte_budget(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id, token = await env.create_run()
    async with env.runtime(token) as wire:
        ids = await attach(wire, run_id)
        await publish(wire, ids, *(output(seq, {"text": "x" * 500}) for seq in range(4)))
    monkeypatch.setattr(control, "MAX_RESPONSE_BYTES", 1500)
    url = f"/v1/runs/{run_id}/outputs"
    page = conforms(await env.http.get(url), OUTPUTS)
    assert [e["seq"] for e in page["events"]] == [0, 1] and page["next"] == 1
    monkeypatch.setattr(control, "MAX_RESPONSE_BYTES", 10)
    page = conforms(await env.http.get(url, params={"after": 1}), OUTPUTS)
    assert [e["seq"] for e in page["events"]] == [2] and page["next"] == 2  # never empty


class LongPolls:
    """60-second long polls of one run's outputs, and an event set once a poll found nothing."""

    def __init__(self, env: Env, run_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.env, self.run_id = env, run_id
        self.parked = trio.Event()  # a poll found nothing and now waits for a store
        self.got: list[httpx.Response] = []
        read_outputs = env.gateway.store.read_outputs

        async def spy(run: str, after: int, limit: int) -> Any:
            events = await read_outputs(run, after, limit)
            if not events:
                self.parked.set()
            return events

        monkeypatch.setattr(env.gateway.store, "read_outputs", spy)

    async def poll(self) -> None:
        """One poll; its answer goes to `got`."""
        url = f"/v1/runs/{self.run_id}/outputs"
        self.got.append(await self.env.http.get(url, params={"wait": 60}))


async def test_long_poll_returns_as_soon_as_an_output_is_stored(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id, token = await env.create_run()
    polls = LongPolls(env, run_id, monkeypatch)
    async with env.runtime(token) as wire:
        ids = await attach(wire, run_id)
        # Far less than the poll's own 60 s: only the wake-up can end it in time.
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(polls.poll)
                await polls.parked.wait()
                await publish(wire, ids, output(0))
    assert conforms(polls.got[0], OUTPUTS) == {"events": [output(0)], "next": 0}


async def test_a_drain_answers_long_polls_in_flight(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answered when the drain ends, before the control API stops, not dropped unanswered."""
    run_id, _ = await env.create_run()
    polls = LongPolls(env, run_id, monkeypatch)
    with trio.fail_after(30):  # far less than the poll's own 60 s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(polls.poll)
            await polls.parked.wait()
            held = env.gateway._no_links = trio.Event()  # a runtime is still being waited for
            nursery.start_soon(env.gateway.drain)
            nursery.start_soon(polls.poll)  # one that comes during the drain
            await trio.sleep(0.3)
            assert polls.got == []  # they wait out the drain (answering at once, loops spin)
            held.set()
    answers = [conforms(answer, OUTPUTS) for answer in polls.got]
    assert answers == [{"events": [], "next": -1}] * 2


async def test_a_long_poll_sees_an_output_stored_while_its_read_was_answered(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The append commits after the poll's read ran but before its answer came back."""
    run_id, token = await env.create_run()
    read_outputs = env.gateway.store.read_outputs
    read_empty, stored = trio.Event(), trio.Event()

    async def late_answer(run: str, after: int, limit: int) -> Any:
        events = await read_outputs(run, after, limit)
        if not events and not read_empty.is_set():
            read_empty.set()  # the read saw nothing ...
            await stored.wait()  # ... and its answer arrives after the append
        return events

    monkeypatch.setattr(env.gateway.store, "read_outputs", late_answer)
    got: list[httpx.Response] = []

    async def poll() -> None:
        got.append(await env.http.get(f"/v1/runs/{run_id}/outputs", params={"wait": 60}))

    async with env.runtime(token) as wire:
        ids = await attach(wire, run_id)
        with trio.fail_after(30):  # far less than the poll's 60 s
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await read_empty.wait()
                await publish(wire, ids, output(0))
                stored.set()
    assert conforms(got[0], OUTPUTS) == {"events": [output(0)], "next": 0}
    # The poll kept no trace: a gateway polled for every run it ever had holds nothing for them.
    assert not env.gateway._outputs_changed and not env.gateway._output_polls


async def test_polls_of_one_run_wake_together_and_leave_nothing_behind(env: Env) -> None:
    run_id, token = await env.create_run()
    got: list[httpx.Response] = []

    async def poll(wait: float) -> None:
        got.append(await env.http.get(f"/v1/runs/{run_id}/outputs", params={"wait": wait}))

    async with env.runtime(token) as wire:
        ids = await attach(wire, run_id)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll, 0.2)  # times out while the others still wait
                for _ in range(3):
                    nursery.start_soon(poll, 60)
                while len(got) < 1 or env.gateway._output_polls[run_id] < 3:
                    await trio.sleep(0.01)
                await publish(wire, ids, output(0))
    pages = [conforms(response, OUTPUTS) for response in got]
    assert pages[0] == {"events": [], "next": -1}
    assert pages[1:] == [{"events": [output(0)], "next": 0}] * 3
    assert not env.gateway._outputs_changed and not env.gateway._output_polls


async def test_a_long_poll_ends_when_the_platform_hangs_up(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_id, _ = await env.create_run()
    polling, ended = trio.Event(), trio.Event()
    wait_outputs = env.gateway.wait_outputs

    async def watched(*args: Any) -> Any:
        polling.set()
        try:
            return await wait_outputs(*args)
        finally:
            ended.set()

    monkeypatch.setattr(env.gateway, "wait_outputs", watched)
    port = env.http.base_url.port
    assert port is not None
    platform = await trio.open_tcp_stream("127.0.0.1", port)
    await platform.send_all(
        f"GET /v1/runs/{run_id}/outputs?wait=60 HTTP/1.1\r\nhost: gateway\r\n"
        f"authorization: Bearer {ADMIN_TOKEN}\r\n\r\n".encode()
    )
    with trio.fail_after(10):
        await polling.wait()
    await platform.aclose()
    # Far less than the poll's own 60 s: only the hang-up can end it in time.
    with trio.fail_after(10):
        await ended.wait()
    # Nothing failed on the way out, and the next platform request is served as ever.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    response = await env.http.get(f"/v1/runs/{run_id}/outputs", params={"after": 3})
    assert conforms(response, OUTPUTS) == {"events": [], "next": 3}


async def test_a_platform_hanging_up_mid_body_is_not_a_crash(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    port = env.http.base_url.port
    assert port is not None
    platform = await trio.open_tcp_stream("127.0.0.1", port)
    await platform.send_all(
        b"POST /v1/runs HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {ADMIN_TOKEN}\r\n".encode()
        + b"content-length: 1000\r\n\r\n{\"capabilities\":"
    )
    await trio.sleep(0.2)  # the handler is reading the body
    await platform.aclose()
    await trio.sleep(0.3)
    # A client timing out during an upload is not a gateway failure: no error, no alert.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (await env.http.get("/healthz")).status_code == 200
    assert conforms(await env.http.post("/v1/runs", json=VALID_CREATE), RUNS)["runId"]


async def test_long_poll_times_out_empty(env: Env) -> None:
    run_id, _ = await env.create_run()
    started = trio.current_time()
    response = await env.http.get(f"/v1/runs/{run_id}/outputs",
                                  params={"wait": 0.3, "after": 7})
    assert trio.current_time() - started >= 0.3  # it did wait before answering
    assert conforms(response, OUTPUTS) == {"events": [], "next": 7}


AFTER_RULE = "query parameter `after` must be an integer from -1 to 9007199254740991"
LIMIT_RULE = "query parameter `limit` must be an integer from 1 to 1000"
WAIT_RULE = "query parameter `wait` must be a number from 0 to 60"


@pytest.mark.parametrize(("query", "detail"), [
    *[(f"after={value}", AFTER_RULE)
      for value in ["-2", "x", "1.5", "", "9007199254740992", "+5", "1e3", " 1"]],
    ("after=1&after=2", "query parameter `after` is given more than once"),
    *[(f"limit={value}", LIMIT_RULE) for value in ["0", "1001", "-1", "ten", "+5", "5.0"]],
    *[(f"wait={value}", WAIT_RULE)
      for value in ["-1", "60.5", "nan", "inf", "1e9", "0x10", "", "+1"]],
])
async def test_outputs_refuse_bad_query_parameters_naming_the_rule(
    env: Env, query: str, detail: str
) -> None:
    run_id, _ = await env.create_run()
    response = await env.http.get(f"/v1/runs/{run_id}/outputs?{query}")
    assert problem(response, 422, "invalid-request", OUTPUTS)["detail"] == detail


@pytest.mark.parametrize("query", ["wait=0.01", "wait=1e-3", "wait=-0.0", "after=-1&limit=1000"])
async def test_outputs_take_every_valid_parameter_form(env: Env, query: str) -> None:
    run_id, _ = await env.create_run()
    response = await env.http.get(f"/v1/runs/{run_id}/outputs?{query}")
    assert conforms(response, OUTPUTS) == {"events": [], "next": -1}


@pytest.mark.parametrize("run_id", ["run_unknown01", "nope"])
async def test_outputs_of_an_unknown_run_are_404(env: Env, run_id: str) -> None:
    response = await env.http.get(f"/v1/runs/{run_id}/outputs", params={"wait": 5})
    problem(response, 404, "unknown-run", OUTPUTS)


# --- GET /v1/runs/{runId}/session and DELETE /v1/runs/{runId} -----------------------------------


async def test_session_of_an_attached_runtime(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    run_id, token = await env.create_run()
    async with env.runtime(token) as wire:
        ids = await attach(wire, run_id, capabilities=["kv.read", "secrets.read"],
                           connectionEpoch=3)
        response = await env.http.get(f"/v1/runs/{run_id}/session")
        view = conforms(response, SESSION)
        assert view["state"] == "leased" and view["connected"] is True
        assert view["sessionId"] == ids["sessionId"]
        assert view["connectionEpoch"] == 3
        assert view["capabilities"] == ["kv.read", "secrets.read"]
        assert view["leaseExpiresAt"] > "2000-01-01T00:00:00.000Z"
        assert SECRET not in response.text
    # The store keeps the last session once the runtime is gone.
    with trio.fail_after(10):
        while (view := conforms(await env.http.get(f"/v1/runs/{run_id}/session"),
                                SESSION))["connected"]:
            await trio.sleep(0.01)
    assert view["sessionId"] == ids["sessionId"]
    metrics = (await env.http.get("/metrics")).text
    assert SECRET not in metrics and SECRET not in caplog.text


@pytest.mark.parametrize("run_id", ["run_unknown01", "nope"])
async def test_session_of_an_unknown_run_is_404(env: Env, run_id: str) -> None:
    problem(await env.http.get(f"/v1/runs/{run_id}/session"), 404, "unknown-run", SESSION)


async def test_delete_revokes_the_run_and_closes_its_runtime(env: Env) -> None:
    run_id, token = await env.create_run()
    async with env.runtime(token) as wire:
        await attach(wire, run_id)
        response = await env.http.delete(f"/v1/runs/{run_id}")
        assert response.status_code == 204
        conforms(response, RUN)
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
            while True:
                await wire.ws.get_message()
        reason = closed.value.reason
        assert reason is not None and reason.code == 4002
    problem(await env.http.get(f"/v1/runs/{run_id}/session"), 404, "unknown-run", SESSION)
    problem(await env.http.get(f"/v1/runs/{run_id}/outputs"), 404, "unknown-run", OUTPUTS)
    problem(await env.http.post(f"/v1/runs/{run_id}/inputs", json={"events": [input_event()]}),
            404, "unknown-run", INPUTS)
    problem(await env.http.delete(f"/v1/runs/{run_id}"), 404, "unknown-run", RUN)
    problem(await env.http.delete("/v1/runs/nope"), 404, "unknown-run", RUN)


# --- /healthz and /metrics ----------------------------------------------------------------------


async def test_healthz_says_draining_while_the_gateway_drains(env: Env) -> None:
    assert conforms(await env.http.get("/healthz"), "/healthz") == {"status": "ok"}
    async with trio.open_nursery() as nursery:
        held = env.gateway._no_links = trio.Event()  # a runtime is still being waited for
        nursery.start_soon(env.gateway.drain)
        await trio.sleep(0)
        response = await env.http.get("/healthz")
        held.set()
    assert response.status_code == 503
    assert conforms(response, "/healthz") == {"status": "draining"}


async def test_metrics_are_prometheus_text(env: Env) -> None:
    run_id, token = await env.create_run()
    async with env.runtime(token) as wire:
        await attach(wire, run_id)
        async with httpx.AsyncClient(base_url=str(env.http.base_url)) as anonymous:
            response = await anonymous.get("/metrics")
    text = conforms(response, "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert '# TYPE agent_gateway_sessions gauge' in text
    assert 'agent_gateway_frames_in_total{channel="runtime.session.attach.command"} 1.0' in text
    assert 'agent_gateway_sessions{state="leased"} 1.0' in text
    assert "agent_gateway_store_seconds_bucket" in text
    assert SECRET not in text


# --- failures -----------------------------------------------------------------------------------


class BrokenStore:
    """A store whose every call fails (a full disk, a closed database, a bug)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise self.error

        return fail


@asynccontextmanager
async def broken_gateway(tmp_path: Path, error: Exception) -> AsyncIterator[Env]:
    settings = settings_for(tmp_path)
    gateway = Gateway(settings, cast(Store, BrokenStore(error)))
    grant = RunGrant("run_known0001", frozenset(), {"K": SECRET}, {}, "cfg-1")
    gateway.hub.handle(RunRegistered(grant))  # known to the core, so the session is looked up
    async with serving(gateway, settings) as env:
        yield env


async def test_a_failing_store_is_503_with_retry_after(tmp_path: Path) -> None:
    async with broken_gateway(tmp_path, StoreError("disk gone")) as env:
        calls = [
            (env.http.post("/v1/runs", json=VALID_CREATE), RUNS),
            (env.http.delete("/v1/runs/run_known0001"), RUN),
            (env.http.post("/v1/runs/run_known0001/token"), TOKEN),
            (env.http.post("/v1/runs/run_known0001/inputs", json={"events": [input_event()]}),
             INPUTS),
            (env.http.get("/v1/runs/run_known0001/outputs"), OUTPUTS),
            (env.http.get("/v1/runs/run_known0001/session"), SESSION),
        ]
        for call, template in calls:
            response = await call
            problem(response, 503, "store-unavailable", template)
            assert response.headers["retry-after"] == "1"
            assert "disk gone" not in response.text


async def test_a_run_the_store_cannot_look_up_is_retryable_not_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run created through another gateway of the fleet: in the store, not yet in this core."""
    async with real_gateway(tmp_path) as env:
        grant = RunGrant("run_otherGateway1", frozenset(), {}, {}, "cfg-1")
        await env.gateway.store.create_run(grant, token_digest("agt_fromTheOtherGateway"))
        get_run = env.gateway.store.get_run

        async def failing(run_id: str) -> Any:
            raise StoreError("database is locked")

        monkeypatch.setattr(env.gateway.store, "get_run", failing)
        # The run exists; the store could not say so: 503, not 404 (which means "gone").
        response = await env.http.get(f"/v1/runs/{grant.run_id}/session")
        problem(response, 503, "store-unavailable", SESSION)
        async with env.runtime("agt_fromTheOtherGateway") as wire:
            refused = await wire.call(ATTACH, {"runId": grant.run_id, "runtimeInstanceId": "rt",
                                               "protocolVersion": "v1"})
            assert refused["channel"] == "runtime.session.error", refused
            assert refused["payload"]["code"] == "internal"
            assert refused["payload"]["retryable"] is True
            monkeypatch.setattr(env.gateway.store, "get_run", get_run)
            await attach(wire, grant.run_id)  # the retry the error asked for
        response = await env.http.get(f"/v1/runs/{grant.run_id}/session")
        assert conforms(response, SESSION)["runId"] == grant.run_id


async def test_a_sub_run_created_through_another_gateway_masks_its_main_runs_secrets(
    tmp_path: Path,
) -> None:
    """This gateway learns the sub-run (and its main run with it) at the attach: the main run's
    secret echoed into the sub-run's log is masked as on the gateway that created them."""
    async with real_gateway(tmp_path) as env:
        main = RunGrant("run_fleetMain001", frozenset(), {"KEY": SECRET}, {}, "cfg-1")
        sub = RunGrant("run_fleetSub0001", frozenset(), {}, {}, "cfg-1", main.run_id)
        await env.gateway.store.create_run(main, token_digest("agt_mainTokenOfTheFleet"))
        await env.gateway.store.create_run(sub, token_digest("agt_subTokenOfTheFleet0"))
        async with env.runtime("agt_mainTokenOfTheFleet") as wire:
            ids = await attach(wire, sub.run_id)
            await publish(wire, ids, output(0, {"text": f"key={SECRET}"}))
        events = conforms(await env.http.get(f"/v1/runs/{sub.run_id}/outputs"), OUTPUTS)["events"]
        assert events[0]["data"] == {"text": "key=***"}


async def test_a_crash_is_a_500_problem_without_details(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with broken_gateway(tmp_path, RuntimeError(f"boom {SECRET}")) as env:
        response = await env.http.post("/v1/runs", json=VALID_CREATE)
        body = problem(response, 500, "internal", RUNS)
        assert body["detail"] == "the gateway failed; the error is logged"
        assert SECRET not in response.text
        # The server is still up.
        assert (await env.http.get("/healthz")).status_code == 200
    assert "RuntimeError" in caplog.text and "POST /v1/runs" in caplog.text
    assert SECRET not in caplog.text
