"""Real gateways for end-to-end tests: TLS from a trustme CA, loopback sockets, a SQLite file.

Tests speak raw JSON through `Wire`, not through our codec or client, so what they check is the
wire contract itself.
"""

from __future__ import annotations

import itertools
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
import trustme
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, open_websocket_url

from gateway.config import Settings
from gateway.embedded import RunningGateway, open_gateway

ADMIN_TOKEN = "test-admin-token-0123456789"
INPUT_CHANNEL = "service.task.input.event"


class CertificateAuthority:
    """A throwaway CA: the gateway's certificate and the clients' trust, per test."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("localhost", "127.0.0.1")
        self.cert = directory / "cert.pem"
        self.key = directory / "key.pem"
        leaf.private_key_pem.write_to_path(str(self.key))
        with self.cert.open("wb") as chain:
            for blob in leaf.cert_chain_pems:
                chain.write(blob.bytes())
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this CA only."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def rotate(ca: CertificateAuthority, common_name: str) -> bytes:
    """Write a new leaf from the same CA over the gateway's files; return the old key's PEM."""
    old_key = ca.key.read_bytes()
    leaf = ca.ca.issue_cert("localhost", "127.0.0.1", common_name=common_name)
    leaf.private_key_pem.write_to_path(str(ca.key))
    ca.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return old_key


async def served_name(runtime_url: str, ca: CertificateAuthority) -> str:
    """The common name ("" if none) of the certificate a new handshake to the endpoint is shown."""
    port = int(runtime_url.rsplit(":", 1)[1].split("/")[0])
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ca.client_context())
    try:
        await stream.do_handshake()
        subject = stream.getpeercert()["subject"]
    finally:
        await trio.aclose_forcefully(stream)
    return next((value for rdn in subject for name, value in rdn if name == "commonName"), "")


def settings_for(directory: Path, ca: CertificateAuthority, **overrides: Any) -> Settings:
    """Settings for a gateway on ephemeral loopback ports with this test's CA."""
    values: dict[str, Any] = {
        "data_dir": directory / "data",
        "port": 0,
        "control_port": 0,
        "tls_cert": ca.cert,
        "tls_key": ca.key,
        "admin_token": ADMIN_TOKEN,
        "store_sync": "normal",
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def gateway_for_test(tmp_path: Path, **overrides: Any) -> AsyncIterator[Harness]:
    """Start a gateway for one test and hand out a harness to talk to it."""
    ca = CertificateAuthority(tmp_path)
    async with (
        open_gateway(settings_for(tmp_path, ca, **overrides)) as running,
        httpx.AsyncClient(
            base_url=running.control_url,
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        ) as http,
    ):
        yield Harness(running, ca, http)


class Harness:
    """A running gateway plus the platform's HTTP client and a way to connect runtimes."""

    def __init__(
        self, running: RunningGateway, ca: CertificateAuthority, http: httpx.AsyncClient
    ) -> None:
        self.running = running
        self.ca = ca
        self.http = http

    async def create_run(self, **body: Any) -> tuple[str, str]:
        """Register a run through the control API; return (runId, runtimeToken)."""
        body.setdefault("capabilities", ["secrets.read", "kv.read", "kv.write"])
        body.setdefault("secrets", {})
        body.setdefault("config", {})
        response = await self.http.post("/v1/runs", json=body)
        assert response.status_code == 201, response.text
        created = response.json()
        return created["runId"], created["runtimeToken"]

    @asynccontextmanager
    async def wire(
        self, token: str | None, *, authorization: str | None = None
    ) -> AsyncIterator[Wire]:
        """A raw WebSocket to /runtime carrying this bearer token (or this raw header value)."""
        if authorization is None and token is not None:
            authorization = f"Bearer {token}"
        headers = [] if authorization is None else [(b"authorization", authorization.encode())]
        async with open_websocket_url(
            self.running.runtime_url, ssl_context=self.ca.client_context(), extra_headers=headers
        ) as ws:
            yield Wire(ws)


class Wire:
    """JSON frames over one WebSocket, with request ids handed out in order."""

    _ids = itertools.count(1)

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.stash: list[dict[str, Any]] = []

    async def send(self, channel: str, payload: Any, request_id: str | None = None) -> str:
        """Send one command frame; return its id."""
        request_id = request_id or f"r{next(self._ids)}"
        await self.ws.send_message(
            json.dumps({"channel": channel, "id": request_id, "payload": payload})
        )
        return request_id

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        """The next frame from the gateway."""
        if self.stash:
            return self.stash.pop(0)
        with trio.fail_after(timeout):
            frame: dict[str, Any] = json.loads(await self.ws.get_message())
        return frame

    async def answer(self, request_id: str, timeout: float = 10) -> dict[str, Any]:
        """The answer to one request; other frames (deliveries) are kept for `recv`."""
        with trio.fail_after(timeout):
            while True:
                frame: dict[str, Any] = json.loads(await self.ws.get_message())
                if frame["id"] == request_id and frame["channel"] != "service.task.input.event":
                    return frame
                self.stash.append(frame)

    async def call(self, channel: str, payload: Any) -> dict[str, Any]:
        """Send a command and wait for its one answer."""
        return await self.answer(await self.send(channel, payload))

    async def attach(self, run_id: str, **extra: Any) -> dict[str, Any]:
        """Attach and return the reply payload (fails the test on an error frame)."""
        payload = {"runId": run_id, "runtimeInstanceId": "rt-1", "protocolVersion": "v1"}
        payload.update(extra)
        frame = await self.call("runtime.session.attach.command", payload)
        assert frame["channel"] == "runtime.session.attach.reply", frame
        reply: dict[str, Any] = frame["payload"]
        return reply


def error_code(frame: dict[str, Any]) -> str:
    """The error code of an error frame (fails if the frame is not an error)."""
    assert frame["channel"] == "runtime.session.error", frame
    code: str = frame["payload"]["code"]
    return code


class PeerReadingLater:
    """A runtime's WebSocket, faked, for `Gateway.serve_connection`: frames in through `inbox`,
    and input deliveries held (the runtime stopped reading) until `reading` is set.

    Sends take turns on a lock, as trio-websocket's do, so frames reach the peer in the order
    their sends got the stream. `torn` if the gateway gave up on a frame midway, which on a real
    TLS stream breaks it: no close frame can follow.
    """

    def __init__(self) -> None:
        self.inbox, self._frames = trio.open_memory_channel[str](16)
        self.sent: list[dict[str, Any]] = []
        self.reading = trio.Event()
        self.stuck = trio.Event()  # a delivery is half sent
        self.torn = False
        self.close_code: int | None = None
        self._stream = trio.Lock()

    async def get_message(self) -> str:
        try:
            return await self._frames.receive()
        except trio.EndOfChannel:
            raise ConnectionClosed(CloseReason(1000, None)) from None

    async def send_message(self, message: str) -> None:
        frame = json.loads(message)
        async with self._stream:
            if frame["channel"] == "service.task.input.event" and not self.reading.is_set():
                self.stuck.set()
                try:
                    await self.reading.wait()
                except trio.Cancelled:
                    self.torn = True
                    raise
            self.sent.append(frame)

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        self.close_code = None if self.torn else code

    def delivered(self) -> list[int]:
        """The seqs of the input deliveries sent so far, in the order they were sent."""
        return [event["seq"] for frame in self.sent if frame["channel"] == INPUT_CHANNEL
                for event in frame["payload"]["events"]]
