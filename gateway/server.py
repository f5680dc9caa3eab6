"""The runtime endpoint: `wss://HOST:PORT/runtime`.

Everything that can be refused is refused before the upgrade, with an HTTP status and a problem
body: a wrong path (404), a draining gateway or a full house (503), a missing, malformed, revoked
or unknown token (401). Only an authenticated runtime reaches the core.
"""

from __future__ import annotations

import logging
import ssl
from collections import Counter

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer, serve_websocket

from gateway.config import Settings
from gateway.service import Gateway
from gateway.store.base import StoreError
from statemachine.messages import CloseCode

log = logging.getLogger("agent_gateway.server")

PROBLEM_BASE = "https://agent-gateway.dev/problems/"


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer ...` header, or None if there is no usable one."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                return None
            try:
                return token.strip().decode("ascii")
            except UnicodeDecodeError:
                return None
    return None


async def _reject(request: WebSocketRequest, status: int, slug: str, detail: str) -> None:
    body = orjson.dumps(
        {
            "type": PROBLEM_BASE + slug,
            "title": slug.replace("-", " "),
            "status": status,
            "detail": detail,
        }
    )
    headers = [(b"content-type", b"application/problem+json")]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="agent-gateway"'))
    await request.reject(status, extra_headers=headers, body=body)
    # trio-websocket (0.12) leaves a refused handshake's TCP stream open until the peer closes it,
    # so anyone without a token could hold sockets (and their reader tasks) open indefinitely.
    # It has no public way to hang up after a refusal; this is the one its own close path uses.
    await request._connection._close_stream()


class RuntimeEndpoint:
    """Admits runtimes at the handshake and hands each accepted connection to the gateway."""

    def __init__(self, gateway: Gateway, settings: Settings) -> None:
        self.gateway = gateway
        self.settings = settings
        # Handshakes past the capacity check but not yet served (their token lookup and upgrade
        # take a while): they count toward --max-sessions, or a burst of them would overshoot it.
        self.admitting = 0
        # Connections each run's token holds, from admission to the end: one token (one runtime,
        # running code it was handed) must not take every slot of --max-sessions from the others.
        self.held: Counter[str] = Counter()
        # Never more than half of --max-sessions either: a small gateway (or one the fd limit
        # shrank) would otherwise have a cap above its capacity, which stops no one.
        self.run_cap = min(settings.max_connections_per_run, max(1, settings.max_sessions // 2))

    async def handle(self, request: WebSocketRequest) -> None:
        """trio-websocket's handler: one call per handshake, for the connection's whole life."""
        # The connection is served from this frame, not from a helper's: every idle session
        # holds its suspended frames, and every send and receive passes through them.
        principal: str | None = None
        try:
            self.admitting += 1
            try:
                principal = await self._admit(request)
                if principal is not None:
                    self.held[principal] += 1  # before the upgrade: a burst cannot overshoot
                ws = await request.accept() if principal is not None else None
            finally:
                self.admitting -= 1  # `serve_connection` counts it as a link before it yields
            if ws is None or principal is None:
                return
            if self.gateway.draining:
                # Admitted just as the drain began, which closes only the links it can see.
                await ws.aclose(CloseCode.SERVICE_RESTART, "the gateway is restarting; reconnect")
                return
            await self.gateway.serve_connection(ws, principal)
        except ConnectionClosed:
            # The runtime hung up before its handshake was answered (accepted or refused): the
            # peer leaving, not the gateway failing. Anyone can cause it, so no traceback either.
            log.debug("a runtime hung up during its handshake")
        except Exception:
            # One connection's failure must never take the server (and every other runtime) down.
            log.exception("runtime connection failed")
        finally:
            if principal is not None:
                self.held[principal] -= 1
                if not self.held[principal]:
                    del self.held[principal]

    async def _admit(self, request: WebSocketRequest) -> str | None:
        """The run this handshake may act for; None once it has been refused with its reason."""
        if request.path.partition("?")[0] != "/runtime":
            await _reject(request, 404, "not-found", "the runtime endpoint is /runtime")
            return None
        if self.gateway.draining:
            await _reject(request, 503, "draining", "the gateway is restarting; retry shortly")
            return None
        if len(self.gateway.links) + self.admitting > self.settings.max_sessions:
            await _reject(request, 503, "too-many-connections", "the gateway is full; retry later")
            return None
        token = bearer_token(request.headers)
        try:
            principal = await self.gateway.authenticate(token) if token else None
        except StoreError as failure:
            log.error("store failed looking up a runtime token: %s", failure)
            await _reject(request, 503, "store-unavailable", "the store failed; retry shortly")
            return None
        if principal is None:
            await _reject(
                request,
                401,
                "unauthorized",
                "send Authorization: Bearer <the runtime token issued for your run>",
            )
        elif self.held[principal] >= self.run_cap:
            await _reject(
                request,
                503,
                "too-many-connections",
                "this run's token holds its most connections at once; close one or retry later",
            )
            return None
        return principal


async def serve_runtime(
    gateway: Gateway,
    settings: Settings,
    ssl_context: ssl.SSLContext | None,
    *,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen for runtimes until cancelled; `task_status` gets the server (for its bound port)."""
    endpoint = RuntimeEndpoint(gateway, settings)
    await serve_websocket(
        endpoint.handle,
        settings.host,
        settings.port,
        ssl_context,
        max_message_size=settings.hard_frame_bytes,
        connect_timeout=settings.handshake_timeout_s,
        disconnect_timeout=2,
        task_status=task_status,
    )
