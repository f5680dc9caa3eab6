"""The platform's control API: HTTP+JSON on Starlette, served by Hypercorn's trio worker.

The platform registers runs (and gets each run's runtime token, once), posts input events, reads
output events with a long poll, looks at sessions and revokes runs. The contract is
`spec/v1/api/control.openapi.yaml`; every refusal is an RFC 9457 problem body whose `detail`
names the rule that was broken and never a value from the request (a value may be a secret).

Request bodies are parsed as strictly as runtime frames are (no duplicate keys, no NaN, integral
numbers within signed 64 bits, no lone surrogates) and may nest at most `BODY_DEPTH` levels, so
every value the platform stores here still fits in a runtime frame when the gateway passes it on.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import traceback
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Final, cast
from urllib.parse import urlsplit

import orjson
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import strictjson
from gateway.codec import CONVERTER, MAX_DEPTH, format_millis
from gateway.config import Settings, url_host
from gateway.service import Gateway, SessionView
from gateway.store.base import InputConflict, NewInput, RunExists, StoreError, UnknownRun
from statemachine.messages import Capability, Millis, OutputEvent

log = logging.getLogger("agent_gateway.control")

PROBLEM_BASE: Final = "https://agent-gateway.dev/problems/"
"""Prefix of every problem `type` URI (shared with the runtime endpoint's handshake refusals)."""

MAX_BODY_BYTES: Final = 4 * 1024 * 1024
"""Largest request body read; larger ones get 413 before they are parsed."""

MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
"""An outputs page stops adding events past this size (it always holds at least one)."""

BODY_DEPTH: Final = MAX_DEPTH - 1
"""Deepest nesting of a request body. A body's `config` or an input's `data` is then at most as
deep as the runtime frame that carries it allows (the codec's MAX_DEPTH, envelope included)."""

MAX_EVENTS: Final = 1000
MAX_LIMIT: Final = 1000
MAX_WAIT_S: Final = 60.0
MAX_SEQ: Final = 2**53 - 1
MAX_CAPABILITIES: Final = 32
MAX_SECRETS: Final = 256
MAX_NAME_LENGTH: Final = 256
MAX_SECRET_LENGTH: Final = 65536
MAX_CONFIG_KEYS: Final = 1024
MAX_CONFIG_VERSION_LENGTH: Final = 256
MAX_DATA_KEYS: Final = 256
FRAME_HEADROOM: Final = 1024
"""Bytes of a frame that are not its event, config or secrets (envelope, session and run ids)."""

RUN_ID: Final = re.compile(r"run_[A-Za-z0-9]{8,64}")
EVENT_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
EVENT_TYPE: Final = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
_INTEGER: Final = re.compile(r"-?[0-9]{1,20}")
_NUMBER: Final = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{1,40})?(?:[eE][-+]?[0-9]{1,4})?")
_CAPABILITIES: Final = {capability.value: capability for capability in Capability}
_JSON: Final = "application/json"
_PROBLEM_JSON: Final = "application/problem+json"

TITLES: Final[Mapping[str, str]] = {
    "malformed-json": "The body is not acceptable JSON",
    "invalid-request": "The request breaks the API's schema",
    "unauthorized": "Missing or wrong admin token",
    "not-found": "No such route",
    "unknown-run": "No such run",
    "unknown-main-run": "No such main run",
    "method-not-allowed": "Method not allowed on this route",
    "run-exists": "The run id is taken",
    "input-conflict": "The eventId is taken by another input",
    "payload-too-large": "The body is too large",
    "unsupported-media-type": "The body must be JSON",
    "internal": "Internal error",
    "store-unavailable": "The store could not answer",
}
"""Every problem this API answers with, by the slug ending its `type` URI."""


class Problem(Exception):
    """A refusal: handlers raise it, and it becomes an RFC 9457 problem response."""

    def __init__(self, status: int, slug: str, detail: str, *, pointer: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.pointer = pointer
        self.headers = dict(headers or {})

    def response(self) -> Response:
        """The problem as an `application/problem+json` response."""
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.slug,
            "title": TITLES[self.slug],
            "status": self.status,
            "detail": self.detail,
        }
        if self.pointer is not None:
            body["pointer"] = self.pointer
        return Response(orjson.dumps(body), self.status, self.headers, _PROBLEM_JSON)


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, dict(headers or {}), _JSON)


# --- strict JSON bodies --------------------------------------------------------------------------


_DECODER: Final = strictjson.decoder(integers_by_value=True)


def _depth(doc: Any) -> int:
    """How deeply arrays and objects nest in `doc` (a scalar is 0), without recursing."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse_body(raw: bytes) -> Any:
    """Parse a request body as strictly as the runtime protocol parses frames (or raise 400)."""
    try:
        text = raw.decode("utf-8")
        doc = strictjson.fast_object(text, BODY_DEPTH)
        if doc is None:
            doc = _DECODER.decode(text)
    except UnicodeDecodeError:
        raise Problem(400, "malformed-json", "the body is not valid UTF-8") from None
    except strictjson.Refused as refused:
        raise Problem(400, "malformed-json", f"the body is refused: {refused}") from None
    except RecursionError:
        raise Problem(400, "malformed-json", f"the body nests deeper than {BODY_DEPTH} levels") \
            from None
    except ValueError:
        raise Problem(400, "malformed-json", "the body is not JSON") from None
    if _depth(doc) > BODY_DEPTH:
        raise Problem(400, "malformed-json", f"the body nests deeper than {BODY_DEPTH} levels")
    if "\\u" in text:
        try:
            orjson.dumps(doc)  # a lone surrogate escape cannot be stored or sent on
        except orjson.JSONEncodeError:
            raise Problem(400, "malformed-json", "the body has a lone UTF-16 surrogate") from None
    return doc


async def read_json(request: Request) -> Any:
    """The request's JSON body, after checking its media type and size."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    structured = media.startswith("application/") and media.endswith("+json")
    if media != _JSON and not (structured and len(media) > len("application/+json")):
        raise Problem(415, "unsupported-media-type", "send the body as application/json")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        # Read as plain JSON, a compressed body would be "malformed": say what is wrong instead.
        raise Problem(415, "unsupported-media-type", "send the body without content-encoding")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Problem(413, "payload-too-large", f"the body is over {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Problem(413, "payload-too-large", f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return parse_body(b"".join(chunks))


# --- request validation (rules mirror the OpenAPI document's schemas) ----------------------------


def _at(pointer: str, key: str | int) -> str:
    segment = str(key)[:MAX_NAME_LENGTH].replace("~", "~0").replace("/", "~1")
    return f"{pointer}/{segment}"


def _invalid(pointer: str, rule: str) -> Problem:
    where = f"`{pointer}`" if pointer else "the body"
    return Problem(422, "invalid-request", f"{where} {rule}", pointer=pointer)


def _fields(value: Any, pointer: str, required: tuple[str, ...],
            optional: tuple[str, ...]) -> dict[str, Any]:
    if type(value) is not dict:
        raise _invalid(pointer, "must be a JSON object")
    for key in value:
        if key not in required and key not in optional:
            raise _invalid(_at(pointer, key), "is not a field of this object")
    for key in required:
        if key not in value:
            raise _invalid(_at(pointer, key), "is required")
    return value


def _text(value: Any, pointer: str, *, max_length: int, min_length: int = 0,
          pattern: re.Pattern[str] | None = None) -> str:
    if type(value) is not str:
        raise _invalid(pointer, "must be a string")
    if not min_length <= len(value) <= max_length:
        raise _invalid(pointer, f"must be {min_length} to {max_length} characters long")
    if pattern is not None and not pattern.fullmatch(value):
        raise _invalid(pointer, f"must match {pattern.pattern}")
    return value


def _map(value: Any, pointer: str, max_keys: int) -> dict[str, Any]:
    if type(value) is not dict:
        raise _invalid(pointer, "must be a JSON object")
    if len(value) > max_keys:
        raise _invalid(pointer, f"must have at most {max_keys} properties")
    return value


def _create_args(body: Any, max_reply_bytes: int) -> dict[str, Any]:
    """`Gateway.create_run`'s keyword arguments from a `POST /v1/runs` body (or raise 422).

    The runtime reads its config, and all its secrets, in one reply frame each: what could not
    fit `max_reply_bytes` would be a run whose runtime can never read them.
    """
    body = _fields(body, "", ("capabilities", "secrets", "config"),
                   ("runId", "configVersion", "mainRunId"))
    args: dict[str, Any] = {}
    if "runId" in body:
        args["run_id"] = _text(body["runId"], "/runId", max_length=68, pattern=RUN_ID)
    if "mainRunId" in body:
        args["main_run_id"] = _text(body["mainRunId"], "/mainRunId", max_length=68,
                                    pattern=RUN_ID)
    if "configVersion" in body:
        args["config_version"] = _text(body["configVersion"], "/configVersion", min_length=1,
                                       max_length=MAX_CONFIG_VERSION_LENGTH)
    names = body["capabilities"]
    if type(names) is not list:
        raise _invalid("/capabilities", "must be an array")
    if len(names) > MAX_CAPABILITIES:
        raise _invalid("/capabilities", f"must have at most {MAX_CAPABILITIES} items")
    for index, name in enumerate(names):
        if type(name) is not str or name not in _CAPABILITIES:
            raise _invalid(_at("/capabilities", index), "is not a capability of protocol v1")
    if len(set(names)) != len(names):
        raise _invalid("/capabilities", "must not name a capability twice")
    args["capabilities"] = [_CAPABILITIES[name] for name in names]
    granted = _map(body["secrets"], "/secrets", MAX_SECRETS)
    for name, value in granted.items():
        _text(name, _at("/secrets", name), min_length=1, max_length=MAX_NAME_LENGTH)
        if type(value) is not str:
            raise _invalid(_at("/secrets", name), "must be a string")
        if len(value) > MAX_SECRET_LENGTH:
            raise _invalid(_at("/secrets", name), f"must be at most {MAX_SECRET_LENGTH} "
                           "characters long")
    _fits_one_frame(granted, "/secrets", max_reply_bytes)
    args["secrets_"] = granted
    args["config"] = _map(body["config"], "/config", MAX_CONFIG_KEYS)
    _fits_one_frame(args["config"], "/config", max_reply_bytes)
    return args


def _fits_one_frame(value: dict[str, Any], pointer: str, max_bytes: int) -> None:
    if len(orjson.dumps(value)) > max_bytes:
        raise _invalid(pointer, f"must encode to at most {max_bytes} bytes (one runtime frame)")


def _new_inputs(body: Any, now: Millis, max_event_bytes: int) -> list[NewInput]:
    """The input events of a `POST /v1/runs/{runId}/inputs` body (or raise 422)."""
    events = _fields(body, "", ("events",), ())["events"]
    if type(events) is not list:
        raise _invalid("/events", "must be an array")
    if not 1 <= len(events) <= MAX_EVENTS:
        raise _invalid("/events", f"must have 1 to {MAX_EVENTS} items")
    inputs, named = [], set()
    for index, event in enumerate(events):
        at = _at("/events", index)
        _fields(event, at, ("type", "data"), ("eventId",))
        if "eventId" in event:
            event_id = _text(event["eventId"], at + "/eventId", min_length=1, max_length=128,
                             pattern=EVENT_ID)
            if event_id in named:
                raise _invalid(at + "/eventId", "must differ from the other events' eventIds")
            named.add(event_id)
        else:
            event_id = "evt_" + secrets.token_hex(16)
        kind = _text(event["type"], at + "/type", min_length=1, max_length=128,
                     pattern=EVENT_TYPE)
        data = _map(event["data"], at + "/data", MAX_DATA_KEYS)
        if len(orjson.dumps(data)) > max_event_bytes:
            raise _invalid(at + "/data", f"must encode to at most {max_event_bytes} bytes "
                           "(one runtime frame)")
        inputs.append(NewInput(event_id=event_id, type=kind, data=data, timestamp=now))
    return inputs


def _query(request: Request, name: str, syntax: re.Pattern[str], rule: str) -> str | None:
    """The parameter's one value if it is written as `syntax` allows, else a 422 naming `rule`."""
    values = request.query_params.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise Problem(422, "invalid-request", f"query parameter `{name}` is given more than once")
    if len(values[0]) > 64 or not syntax.fullmatch(values[0]):
        # The rule the value is checked against next, so every refusal of it reads the same.
        raise Problem(422, "invalid-request", f"query parameter `{name}` must be {rule}")
    return values[0]


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    rule = f"an integer from {low} to {high}"
    text = _query(request, name, _INTEGER, rule)
    value = default if text is None else int(text)
    if not low <= value <= high:
        raise Problem(422, "invalid-request", f"query parameter `{name}` must be {rule}")
    return value


def _query_seconds(request: Request, name: str, high: float) -> float:
    rule = f"a number from 0 to {high:g}"
    text = _query(request, name, _NUMBER, rule)
    value = 0.0 if text is None else float(text)
    if not 0 <= value <= high:  # also false for NaN, which the syntax cannot produce anyway
        raise Problem(422, "invalid-request", f"query parameter `{name}` must be {rule}")
    return value


def _run_id(request: Request) -> str:
    """The path's run id; one that cannot exist is simply unknown."""
    run_id: str = request.path_params["run_id"]
    if not RUN_ID.fullmatch(run_id):
        raise Problem(404, "unknown-run", "no run has this id")
    return run_id


def _unknown_run() -> Problem:
    """The 404 every route answers for a run that was never created or is revoked."""
    return Problem(404, "unknown-run", "no live run has this id")


def _store_failed(failure: StoreError) -> Problem:
    # The store's own words (SQLite's reason, never a value) tell an operator what to fix.
    log.error("store failed: %s", failure)
    return Problem(503, "store-unavailable", "the store failed; retry after backing off",
                   headers={"retry-after": "1"})


# --- the routes ----------------------------------------------------------------------------------


def session_json(view: SessionView) -> dict[str, Any]:
    """A session view as the API shows it."""
    return {
        "runId": view.run_id,
        "state": view.state.value,
        "sessionId": view.session_id,
        "connectionEpoch": view.connection_epoch,
        "leaseExpiresAt": None if view.lease_expires_at is None
        else format_millis(view.lease_expires_at),
        "capabilities": list(view.capabilities),
        "connected": view.connected,
    }


class _Routes:
    """The handlers, bound to one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def create_run(self, request: Request) -> Response:
        """POST /v1/runs: register a run and hand out its runtime token (once)."""
        max_reply_bytes = self.gateway.settings.max_frame_bytes - FRAME_HEADROOM
        args = _create_args(await read_json(request), max_reply_bytes)
        try:
            grant, token = await self.gateway.create_run(**args)
        except RunExists:
            raise Problem(409, "run-exists", "a run with this runId exists or existed") from None
        except UnknownRun:
            raise Problem(404, "unknown-main-run", "mainRunId names no live main run (unknown, "
                          "revoked, or itself a sub-run)") from None
        except StoreError as failure:
            raise _store_failed(failure) from None
        body = {"runId": grant.run_id, "runtimeToken": token,
                "configVersion": grant.config_version}
        if grant.main_run_id is not None:
            body["mainRunId"] = grant.main_run_id
        return _json(body, 201, {"cache-control": "no-store"})

    async def replace_token(self, request: Request) -> Response:
        """POST /v1/runs/{runId}/token: a new runtime token (once); the old one stops working."""
        run_id = _run_id(request)
        try:
            token = await self.gateway.replace_token(run_id)
        except StoreError as failure:
            raise _store_failed(failure) from None
        if token is None:
            raise _unknown_run()
        return _json({"runId": run_id, "runtimeToken": token}, 200, {"cache-control": "no-store"})

    async def revoke_run(self, request: Request) -> Response:
        """DELETE /v1/runs/{runId}: end a run; its runtime is closed with 4002."""
        run_id = _run_id(request)
        try:
            revoked = await self.gateway.revoke_run(run_id)
        except StoreError as failure:
            raise _store_failed(failure) from None
        if not revoked:
            raise _unknown_run()
        return Response(status_code=204)

    async def post_inputs(self, request: Request) -> Response:
        """POST /v1/runs/{runId}/inputs: queue inputs durably, then push them to the runtime."""
        run_id = _run_id(request)
        max_event_bytes = self.gateway.settings.max_frame_bytes - FRAME_HEADROOM
        inputs = _new_inputs(await read_json(request), self.gateway.clock.now(), max_event_bytes)
        try:
            seqs = await self.gateway.post_inputs(run_id, inputs)
        except UnknownRun:
            raise _unknown_run() from None
        except InputConflict as conflict:
            raise Problem(409, "input-conflict", "an input with this eventId is queued already "
                          "with another type or data; nothing was queued",
                          pointer=f"/events/{conflict.index}/eventId") from None
        except StoreError as failure:
            raise _store_failed(failure) from None
        return _json({"seqs": seqs}, 202)

    async def read_outputs(self, request: Request) -> Response:
        """GET /v1/runs/{runId}/outputs: a page of stored outputs, long-polling for the first."""
        run_id = _run_id(request)
        after = _query_int(request, "after", -1, -1, MAX_SEQ)
        limit = _query_int(request, "limit", MAX_LIMIT, 1, MAX_LIMIT)
        wait_s = _query_seconds(request, "wait", MAX_WAIT_S)
        try:
            if await self.gateway.store.get_run(run_id) is None:
                raise _unknown_run()
            events = await _unless_hung_up(
                request.receive, partial(self.gateway.wait_outputs, run_id, after, limit, wait_s)
            )
        except StoreError as failure:
            raise _store_failed(failure) from None
        # Encoded one by one so a page stops at MAX_RESPONSE_BYTES, and joined without a copy
        # of the events as dicts.
        parts: list[bytes] = []
        size = 0
        for event in events:
            blob = orjson.dumps(CONVERTER.unstructure(event))
            if parts and size + len(blob) > MAX_RESPONSE_BYTES:
                break
            parts.append(blob)
            size += len(blob) + 1
        last = events[len(parts) - 1].seq if parts else after
        body = b'{"events":[' + b",".join(parts) + b'],"next":' + str(last).encode() + b"}"
        return Response(body, 200, media_type=_JSON)

    async def session(self, request: Request) -> Response:
        """GET /v1/runs/{runId}/session: the session without its secrets."""
        run_id = _run_id(request)
        try:
            view = await self.gateway.session_view(run_id)
        except StoreError as failure:
            raise _store_failed(failure) from None
        if view is None:
            raise _unknown_run()
        return _json(session_json(view))

    async def healthz(self, request: Request) -> Response:
        """GET /healthz: lets a load balancer stop sending work to a draining gateway."""
        if self.gateway.draining:
            return _json({"status": "draining"}, 503)
        return _json({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        """GET /metrics: the Prometheus exposition of the gateway's own registry."""
        return Response(generate_latest(self.gateway.metrics.registry), 200,
                        media_type=CONTENT_TYPE_LATEST)


# --- errors, authentication and the app ----------------------------------------------------------


async def _problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response()


_HTTP_SLUGS: Final = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large",
                      415: "unsupported-media-type"}


async def _http_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) as problems too."""
    assert isinstance(exc, HTTPException)
    slug = _HTTP_SLUGS.get(exc.status_code)
    if slug is None:  # pragma: no cover - the routing raises only the statuses above
        slug, detail = "invalid-request", "the request cannot be served"
    elif exc.status_code == 404:
        detail = "there is no route at this path"
    elif exc.status_code == 405:
        detail = f"this route allows {(exc.headers or {}).get('Allow', 'other methods')}"
    else:  # pragma: no cover
        detail = TITLES[slug]
    return Problem(exc.status_code, slug, detail, headers=exc.headers).response()


async def _unless_hung_up(
    receive: Receive, wait: Callable[[], Awaitable[list[OutputEvent]]]
) -> list[OutputEvent]:
    """What `wait` returns, or nothing once the platform hangs up: nobody would read it.

    A long poll may wait a minute; without this, every poll the platform gave up on would hold
    its task and its wake-up that long, however many it abandoned.
    """
    events: list[OutputEvent] = []
    failed: StoreError | None = None

    async def cancel_on_hang_up(scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # the request's (empty) body
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_on_hang_up, nursery.cancel_scope)
        try:
            events = await wait()
        except StoreError as error:
            failed = error  # raised outside: from inside the nursery it would come out grouped
        nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return events


def _authorized(scope: Scope, expected: bytes) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":  # ASGI servers lower-case header names
            scheme, _, token = value.partition(b" ")
            # compare_digest runs whatever the header says, so timing tells nothing of the token
            return hmac.compare_digest(token.strip(), expected) and scheme.lower() == b"bearer"
    return False


class _Guard:
    """Outermost of our layers: the admin token on /v1, and a problem (not a trace) on a crash."""

    def __init__(self, app: ASGIApp, admin_token: str) -> None:
        self.app = app
        self.expected = admin_token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if (path == "/v1" or path.startswith("/v1/")) and not _authorized(scope, self.expected):
            refusal = Problem(401, "unauthorized", "send Authorization: Bearer <admin token>",
                              headers={"www-authenticate": 'Bearer realm="agent-gateway"'})
            await refusal.response()(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            # The platform hung up before its body was whole: nothing was done, nobody to answer.
            log.debug("control API: client left during %s %s", scope["method"], path)
        except Exception as exc:
            # The type and the stack, never the message: it may quote a value from the request.
            log.error("control API failed on %s %s: %s\n%s", scope["method"], path,
                      type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
            if started:
                raise  # too late for a problem body; the server drops the connection
            crash = Problem(500, "internal", "the gateway failed; the error is logged")
            await crash.response()(scope, receive, send)


def build_app(gateway: Gateway, admin_token: str) -> Starlette:
    """The control API as an ASGI app (tests and embedders can serve it however they like)."""
    if not admin_token:
        raise ValueError("the control API needs a non-empty admin token")
    routes = _Routes(gateway)
    app = Starlette(
        routes=[
            Route("/v1/runs", routes.create_run, methods=["POST"]),
            Route("/v1/runs/{run_id}", routes.revoke_run, methods=["DELETE"]),
            Route("/v1/runs/{run_id}/token", routes.replace_token, methods=["POST"]),
            Route("/v1/runs/{run_id}/inputs", routes.post_inputs, methods=["POST"]),
            Route("/v1/runs/{run_id}/outputs", routes.read_outputs, methods=["GET"]),
            Route("/v1/runs/{run_id}/session", routes.session, methods=["GET"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
        ],
        middleware=[Middleware(_Guard, admin_token=admin_token)],
        exception_handlers={Problem: _problem_handler, HTTPException: _http_handler},
    )
    app.router.redirect_slashes = False  # a redirect is not in the spec; a 404 problem is
    return app


def hypercorn_config(settings: Settings) -> Config:
    """Hypercorn's settings for the control API: its bind address, and logs into ours."""
    config = Config()
    config.bind = [f"{url_host(settings.control_host)}:{settings.control_port}"]
    config.accesslog = None
    config.errorlog = log
    config.include_server_header = False
    return config


async def serve_control(
    gateway: Gateway,
    settings: Settings,
    admin_token: str,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API until the gateway has drained; `task_status` gets the bound port.

    Then it stops taking requests and finishes the ones in flight (within Hypercorn's graceful
    timeout), so answers given during the drain (long polls, 503 from /healthz) reach the
    platform instead of being cut off; `gateway.control_stopped` is set once it has.
    """
    # Starlette's ASGI types are looser than Hypercorn's; the protocol is the same.
    app = cast(ASGIFramework, build_app(gateway, admin_token))
    config = hypercorn_config(settings)
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(serve, app, config, shutdown_trigger=gateway.drained.wait)
            )
            port = urlsplit(binds[0]).port
            assert port is not None, "hypercorn reports every bind as scheme://host:port"
            task_status.started(port)
    finally:
        gateway.control_stopped.set()
