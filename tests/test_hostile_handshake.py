"""Hostile handshakes on /runtime: refused with an HTTP status before the upgrade, and nothing
reaches the state machine.

Requests are written byte by byte over TLS, so a test can send what no WebSocket library would:
an empty or non-ASCII token, a 64 KiB header, a plain GET, a request that never ends. Each test
watches the core's inputs: a refused handshake must not open a connection in the hub.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import pytest
import reliability_ledger
import trio
from e2e_support import Harness, gateway_for_test
from raw_wire import raw_wire
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, WebSocketRequest

from gateway.config import Settings
from gateway.server import RuntimeEndpoint
from gateway.service import Gateway, token_digest
from gateway.store.base import Store
from statemachine.inputs import CommandReceived, ConnectionOpened

KIND = "hostile handshake"


@dataclass
class Response:
    """What came back for a raw request: the status (0 if none) and whether the server hung up."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes
    hung_up: bool


def upgrade(path: str = "/runtime", *headers: bytes) -> bytes:
    """A well-formed WebSocket upgrade request with these extra header lines."""
    key = base64.b64encode(os.urandom(16))
    lines = [
        f"GET {path} HTTP/1.1".encode(),
        b"Host: localhost",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Version: 13",
        *headers,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def exchange(h: Harness, request: bytes, *, wait_hang_up: float = 0) -> Response:
    """Send raw bytes over TLS to the runtime port; read the HTTP answer (and the hang-up)."""
    parts = urlsplit(h.running.runtime_url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_ssl_over_tcp_stream(
        parts.hostname, parts.port, ssl_context=h.ca.client_context()
    )
    data, hung_up = b"", False
    try:
        # Refused before it was all sent: the answer may still be readable.
        with suppress(trio.BrokenResourceError):
            await stream.send_all(request)
        with trio.move_on_after(10):
            while not _complete(data) or wait_hang_up:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    hung_up = True
                    break
                data += chunk
                if _complete(data) and wait_hang_up:
                    with trio.move_on_after(wait_hang_up):
                        try:
                            hung_up = not await stream.receive_some(65536)
                        except trio.BrokenResourceError:
                            hung_up = True
                    break
    finally:
        with trio.move_on_after(1):
            await stream.aclose()
    return _parse(data, hung_up)


def _complete(data: bytes) -> bool:
    _, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    length = _parse(data, False).headers.get(b"content-length", b"0")
    return len(body) >= int(length)


def _parse(data: bytes, hung_up: bool) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1]) if lines[0].startswith(b"HTTP/1.1 ") else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return Response(status, headers, body, hung_up)


@contextmanager
def core_inputs(h: Harness) -> Iterator[list[Any]]:
    """Every input the hub handles while the block runs."""
    hub = h.running.service.hub
    seen: list[Any] = []
    original = hub.handle

    def recording(event: Any) -> Any:
        seen.append(event)
        return original(event)

    hub.handle = recording  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        hub.handle = original  # type: ignore[method-assign]


def reached_the_core(seen: list[Any]) -> list[Any]:
    """The inputs that only an admitted connection can cause."""
    return [e for e in seen if isinstance(e, ConnectionOpened | CommandReceived)]


def metric(h: Harness, name: str) -> float:
    """A sample's value from the gateway's own registry."""
    value = h.running.service.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def test_refused_before_the_upgrade_and_nothing_reaches_the_core(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        revoked_run, revoked_token = await h.create_run()
        assert (await h.http.delete(f"/v1/runs/{revoked_run}")).status_code == 204
        unknown = "agt_" + "A" * 43  # the form of a token, but nobody's
        cases: list[tuple[str, bytes, set[int]]] = [
            ("no token", upgrade(), {401}),
            ("empty header", upgrade("/runtime", b"Authorization: "), {401}),
            ("scheme only", upgrade("/runtime", b"Authorization: Bearer"), {401}),
            ("scheme and blank", upgrade("/runtime", b"Authorization: Bearer   "), {401}),
            ("other scheme", upgrade("/runtime", f"Authorization: Basic {token}".encode()), {401}),
            ("token scheme", upgrade("/runtime", f"Authorization: Token {token}".encode()), {401}),
            ("two tokens", upgrade("/runtime", f"Authorization: Bearer {token} {token}".encode()),
             {401}),
            ("non-ASCII", upgrade("/runtime", b"Authorization: Bearer \xff\xfe\xc3\xa9agt_"),
             {401}),
            ("non-ASCII in a valid token", upgrade(
                "/runtime", f"Authorization: Bearer {token[:-1]}".encode() + b"\xc3\xa9"), {401}),
            ("8 KiB token", upgrade("/runtime", b"Authorization: Bearer " + b"a" * 8192), {401}),
            ("unknown token", upgrade("/runtime", f"Authorization: Bearer {unknown}".encode()),
             {401}),
            ("revoked token", upgrade(
                "/runtime", f"Authorization: Bearer {revoked_token}".encode()), {401}),
            ("token in the query", upgrade(f"/runtime?token={token}"), {401}),
            ("64 KiB header", upgrade("/runtime", f"Authorization: Bearer {token}".encode(),
                                      b"X-Padding: " + b"a" * 65536), {400, 431}),
            ("5000 headers", upgrade("/runtime", f"Authorization: Bearer {token}".encode(),
                                     *(b"X-H%d: v" % i for i in range(5000))), {400, 431}),
            ("plain GET", f"GET /runtime HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                          f"{token}\r\n\r\n".encode(), {400, 426}),
            ("POST", f"POST /runtime HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                     f"{token}\r\nContent-Length: 2\r\n\r\n{{}}".encode(), {400, 405, 426}),
            ("HTTP/1.0", b"GET /runtime HTTP/1.0\r\n\r\n", {400, 505}),
            ("wrong version", upgrade("/runtime", f"Authorization: Bearer {token}".encode())
             .replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"), {400, 426}),
            ("no key", upgrade("/runtime", f"Authorization: Bearer {token}".encode())
             .replace(b"Sec-WebSocket-Key", b"X-Key"), {400}),
            ("not HTTP", b"\x16\x03\x01garbage\r\n\r\n", {400}),
            ("wrong path", upgrade("/v1/runs", f"Authorization: Bearer {token}".encode()), {404}),
            ("path prefix", upgrade("/runtime/x", f"Authorization: Bearer {token}".encode()),
             {404}),
        ]
        lost: list[str] = []
        connections_before = metric(h, "agent_gateway_connections")
        with core_inputs(h) as seen:
            for name, request, statuses in cases:
                response = await exchange(h, request)
                if response.status not in statuses:
                    lost.append(f"{name}: {response.status}, expected {sorted(statuses)}")
                if response.status == 401:
                    problem = orjson.loads(response.body)
                    if problem["type"] != "https://agent-gateway.dev/problems/unauthorized" or (
                        response.headers.get(b"www-authenticate") != b'Bearer realm="agent-gateway"'
                    ):
                        lost.append(f"{name}: not the documented 401 problem: {response}")
                    if token.encode() in response.body:
                        lost.append(f"{name}: the token is echoed")
            if reached := reached_the_core(seen):
                lost.append(f"the core saw {reached}")
        if h.running.service.hub.connections or h.running.service.links:
            lost.append("a connection is open in the hub")
        if metric(h, "agent_gateway_connections") != connections_before:
            lost.append("the connections gauge moved")
        view = (await h.http.get(f"/v1/runs/{run_id}/session")).json()
        if view["sessionId"] is not None:
            lost.append(f"a session was created: {view}")
        # The gateway still admits a well-behaved runtime afterwards.
        async with h.wire(token) as wire:
            assert (await wire.attach(run_id))["runId"] == run_id
        reliability_ledger.record(KIND, len(cases), len(lost))
        assert not lost, "\n".join(lost)


async def test_a_refused_handshake_is_hung_up(tmp_path: Path) -> None:
    """After refusing, the gateway closes the TCP connection itself: otherwise anyone, without a
    token, can hold sockets (and their tasks and buffers) open for as long as they like."""
    async with gateway_for_test(tmp_path, max_sessions=1) as h:
        run_id, token = await h.create_run()
        lost = []
        for request, status in ((upgrade(), 401),
                                (upgrade("/nope", f"Authorization: Bearer {token}".encode()), 404)):
            response = await exchange(h, request, wait_hang_up=5)
            if response.status != status or not response.hung_up:
                lost.append(f"{status}: got {response.status}, hung up: {response.hung_up}")
        async with h.wire(token) as holder:  # the one connection allowed: the next gets 503
            await holder.attach(run_id)
            full = await exchange(h, upgrade("/runtime", f"Authorization: Bearer {token}".encode()),
                                  wait_hang_up=5)
            if full.status != 503 or not full.hung_up:
                lost.append(f"503: got {full.status}, hung up: {full.hung_up}")
        reliability_ledger.record(KIND, 3, len(lost))
        assert not lost, "\n".join(lost)


async def test_a_request_that_never_ends_is_dropped_at_the_handshake_timeout(
    tmp_path: Path,
) -> None:
    async with gateway_for_test(tmp_path, handshake_timeout_s=0.5) as h:
        _, token = await h.create_run()
        parts = urlsplit(h.running.runtime_url)
        assert parts.hostname is not None and parts.port is not None
        with core_inputs(h) as seen:
            stream = await trio.open_ssl_over_tcp_stream(
                parts.hostname, parts.port, ssl_context=h.ca.client_context()
            )
            # Everything but the blank line that ends the headers, then silence.
            await stream.send_all(upgrade("/runtime", f"Authorization: Bearer {token}".encode())
                                  [:-2])
            with trio.fail_after(5):
                try:
                    ended = not await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    ended = True
            await stream.aclose()
        reliability_ledger.record(KIND, 1, 0 if ended and not reached_the_core(seen) else 1)
        assert ended
        assert not reached_the_core(seen)


async def test_plain_tcp_on_the_tls_port_is_dropped(tmp_path: Path) -> None:
    """No TLS, no upgrade: dropped by the handshake timeout at the latest."""
    async with gateway_for_test(tmp_path, handshake_timeout_s=0.5) as h:
        _, token = await h.create_run()
        parts = urlsplit(h.running.runtime_url)
        assert parts.port is not None
        with core_inputs(h) as seen:
            stream = await trio.open_tcp_stream("127.0.0.1", parts.port)
            await stream.send_all(upgrade("/runtime", f"Authorization: Bearer {token}".encode()))
            answer = b""
            with trio.fail_after(10):
                try:
                    while chunk := await stream.receive_some(65536):
                        answer += chunk
                except trio.BrokenResourceError:
                    pass
            await stream.aclose()
        reliability_ledger.record(KIND, 1, 0 if b"HTTP/1.1 101" not in answer else 1)
        assert b"HTTP/1.1 101" not in answer
        assert not reached_the_core(seen)


async def test_another_runs_token_is_admitted_only_to_its_own_run(tmp_path: Path) -> None:
    """A valid token passes the handshake (it is some run's), and then may act only on that run:
    attaching another run gets `forbidden_run`, and that run's session is untouched."""
    async with gateway_for_test(tmp_path) as h:
        run_a, token_a = await h.create_run()
        run_b, token_b = await h.create_run()
        sub_of_b, _ = await h.create_run(mainRunId=run_b)
        lost: list[str] = []
        async with h.wire(token_b) as owner:
            owned = await owner.attach(run_b)
            async with raw_wire(h.running.runtime_url, h.ca.client_context(), token_a) as wire:
                attempts = [
                    {"runId": run_b, "runtimeInstanceId": "rt-a", "protocolVersion": "v1"},
                    {"runId": run_b, "runtimeInstanceId": "rt-a", "protocolVersion": "v1",
                     "reconnect": True, "connectionEpoch": 2**53 - 1},
                    {"runId": sub_of_b, "runtimeInstanceId": "rt-a", "protocolVersion": "v1"},
                ]
                for number, payload in enumerate(attempts):
                    answer = await wire.call({"channel": "runtime.session.attach.command",
                                              "id": f"x{number}", "payload": payload})
                    if answer["channel"] != "runtime.session.error" or (
                        answer["payload"]["code"] != "forbidden_run"
                        or answer["id"] != f"x{number}"
                    ):
                        lost.append(f"attach {payload}: {answer}")
                recover = await wire.call({"channel": "runtime.session.recover.command",
                                           "id": "x9", "payload": {
                                               "sessionId": owned["sessionId"],
                                               "mainRunId": run_b, "subRunIds": [sub_of_b],
                                               "connectionEpoch": 2**53 - 1}})
                if recover["channel"] != "runtime.session.error" or (
                    recover["payload"]["code"] != "forbidden_run"
                ):
                    lost.append(f"recover: {recover}")
                mine = await wire.call({"channel": "runtime.session.attach.command", "id": "own",
                                        "payload": {"runId": run_a, "runtimeInstanceId": "rt-a",
                                                    "protocolVersion": "v1"}})
                if mine["channel"] != "runtime.session.attach.reply":
                    lost.append(f"its own run: {mine}")
            beat = await owner.call("runtime.session.heartbeat.command",
                                    {"sessionId": owned["sessionId"], "runId": run_b})
            if beat["payload"].get("accepted") is not True:
                lost.append(f"the owner lost its session: {beat}")
            view = (await h.http.get(f"/v1/runs/{run_b}/session")).json()
            if view["sessionId"] != owned["sessionId"] or view["connectionEpoch"] != 0:
                lost.append(f"run B's session changed: {view}")
        reliability_ledger.record(KIND, len(attempts) + 2, len(lost))
        assert not lost, "\n".join(lost)


class _GonePeer:
    """A handshake whose runtime hung up before the gateway answered it (accept or refusal)."""

    def __init__(self, token: str) -> None:
        self.path = "/runtime"
        self.headers = [(b"authorization", f"Bearer {token}".encode())]
        self.answered: list[str] = []

    async def accept(self) -> Any:
        self.answered.append("accept")
        raise ConnectionClosed(CloseReason(1006, None))

    async def reject(self, status: int, **_: Any) -> None:
        self.answered.append(str(status))
        raise ConnectionClosed(CloseReason(1006, None))


class _OneRunStore:
    """A store that knows one runtime token."""

    def __init__(self, token: str) -> None:
        self.digest = token_digest(token)

    async def run_for_token(self, digest: bytes) -> str | None:
        return "run_someone00001" if digest == self.digest else None


async def test_a_runtime_hanging_up_mid_handshake_is_not_a_gateway_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can open a connection, send an upgrade request and hang up before the answer: the
    answer's send then fails (ConnectionClosed). That is the peer leaving, not the gateway
    failing; logged as "runtime connection failed" with a traceback at ERROR, it let anyone,
    without a token, flood the log with stack traces at the rate they can open connections."""
    caplog.set_level(logging.DEBUG)
    token = "agt_" + "T" * 43
    settings = Settings(data_dir=tmp_path)
    gateway = Gateway(settings, cast(Store, _OneRunStore(token)))
    endpoint = RuntimeEndpoint(gateway, settings)
    peers = [_GonePeer("agt_" + "U" * 43), _GonePeer(token)]
    for peer in peers:
        await endpoint.handle(cast(WebSocketRequest, peer))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    answered = [peer.answered for peer in peers]
    reliability_ledger.record(KIND, len(peers), len(errors))
    assert answered == [["401"], ["accept"]]
    assert errors == []
    assert endpoint.admitting == 0 and not gateway.links


@pytest.mark.parametrize(
    "limits",
    [
        {"max_sessions": 4, "max_connections_per_run": 2},
        # The default cap (512) is above this gateway's capacity: half of it applies instead.
        {"max_sessions": 4},
    ],
    ids=["per-run-flag", "half-of-max-sessions"],
)
async def test_one_runs_token_cannot_take_every_connection(
    tmp_path: Path, limits: dict[str, int]
) -> None:
    """A run's token admitted any number of connections, up to --max-sessions: one runtime (which
    runs code it was handed) could hold every slot, and every other run's runtime got 503. Past
    --max-connections-per-run, or half of --max-sessions, its handshakes are refused (503, retry
    later) and other runs' runtimes are still admitted; once its connections close, the token is
    admitted again."""
    async with gateway_for_test(tmp_path, **limits) as h:
        run_a, token_a = await h.create_run()
        run_b, token_b = await h.create_run()
        lost: list[str] = []
        async with h.wire(token_a) as first, h.wire(token_a) as second:
            await first.attach(run_a)
            knock = upgrade("/runtime", f"Authorization: Bearer {token_a}".encode())
            third = await exchange(h, knock)
            problem = orjson.loads(third.body) if third.body else {}
            if third.status != 503 or not problem.get("type", "").endswith("too-many-connections"):
                lost.append(f"a third connection of one token: {third}")
            async with h.wire(token_b) as other:
                if (await other.attach(run_b))["runId"] != run_b:
                    lost.append("another run's runtime was not admitted")
            if (await second.attach(run_a, connectionEpoch=1))["runId"] != run_a:
                lost.append("the token's own connections stopped working")
        with trio.fail_after(10):  # the gateway counts a connection until it has closed it
            while True:
                try:
                    async with h.wire(token_a) as again:
                        await again.attach(run_a, connectionEpoch=2)
                    break
                except ConnectionRejected:
                    await trio.sleep(0.05)
        reliability_ledger.record(KIND, 3, len(lost))
        assert not lost, "\n".join(lost)
