"""A real gateway on a background thread with its own trio loop, for synchronous test drivers.

Hypothesis and schemathesis drive tests synchronously, one example at a time; restarting a
gateway per example would cost more than the examples. Here one gateway serves a whole module:
each example runs its client in its own short `trio.run` on the test's thread, while the gateway
keeps running (and keeps its state) on this one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio
from e2e_support import ADMIN_TOKEN, CertificateAuthority, settings_for

from gateway.embedded import RunningGateway, open_gateway

T = TypeVar("T")


class GatewayThread:
    """`with GatewayThread(dir, **settings) as gw:` a started gateway; stopped (drained) on exit."""

    def __init__(self, directory: Path, **overrides: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority(directory)
        self.settings = settings_for(directory, self.ca, **overrides)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="gateway", daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._failure: BaseException | None = None
        self.running: RunningGateway | None = None

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        if not self._ready.wait(timeout=60) or self.running is None:
            raise RuntimeError(f"the gateway did not start: {self._failure!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=60)
        if self._failure is not None:
            raise RuntimeError("the gateway thread failed") from self._failure

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as failure:  # reported to the test on exit, not lost in a thread
            self._failure = failure
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with open_gateway(self.settings) as running:
            self.running = running
            self._ready.set()
            await self._stop.wait()

    @property
    def runtime_url(self) -> str:
        """wss://localhost:PORT/runtime."""
        assert self.running is not None
        return self.running.runtime_url

    @property
    def control_url(self) -> str:
        """http://127.0.0.1:PORT."""
        assert self.running is not None
        return self.running.control_url

    def in_gateway(self, function: Callable[[], T]) -> T:
        """Run `function` on the gateway's thread, so it sees the gateway's state consistently."""
        assert self._token is not None
        return trio.from_thread.run_sync(function, trio_token=self._token)

    def http(self) -> httpx.Client:
        """A synchronous control API client with the admin token."""
        return httpx.Client(
            base_url=self.control_url,
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )

    def create_run(self, **body: Any) -> tuple[str, str]:
        """Register a run; return (runId, runtimeToken)."""
        body.setdefault("capabilities", ["secrets.read", "kv.read", "kv.write"])
        body.setdefault("secrets", {})
        body.setdefault("config", {})
        with self.http() as http:
            response = http.post("/v1/runs", json=body)
        assert response.status_code == 201, response.text
        created = response.json()
        return created["runId"], created["runtimeToken"]
