"""A whole gateway in one `async with`: store, core, runtime endpoint, control API, timers.

`agent-gateway serve`, the demo, the tests and the benchmarks all start the gateway this way, so
they all run the same thing.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from attrs import frozen

from gateway.config import Settings, url_host
from gateway.control import serve_control
from gateway.devcert import DevCertificateError, ensure_dev_certificate
from gateway.server import serve_runtime
from gateway.service import Gateway
from gateway.store.base import StoreError
from gateway.store.sqlite import open_sqlite_store
from gateway.tls import ReloadableTls, TlsError, expiry_warning

log = logging.getLogger("agent_gateway.tls")

CONTROL_STOP_S = 5.0
"""How long the control API may take, after a drain, to answer the requests in flight
(Hypercorn's graceful timeout, 3 s, bounds it first)."""


class ConfigurationError(Exception):
    """The settings cannot make a working gateway (the message says which one to fix)."""


@frozen
class RunningGateway:
    """Where a started gateway listens, and what a local client needs to reach it."""

    service: Gateway
    runtime_url: str
    control_url: str
    admin_token: str
    cert_path: Path
    client_ssl_context: ssl.SSLContext
    tls: ReloadableTls

    def reload_tls(self) -> str:
        """Serve the certificate files' current contents to new runtimes (what SIGHUP does).

        Returns what happened, for the operator; a failure keeps the previous certificate.
        """
        try:
            expiry = self.tls.reload()
        except TlsError as problem:
            self.service.metrics.tls_reloads.labels("failed").inc()
            log.error("certificate not reloaded, still serving the previous one: %s", problem)
            return f"certificate not reloaded, still serving the previous one: {problem}"
        self.service.metrics.tls_reloads.labels("ok").inc()
        self.service.metrics.tls_expiry.set(expiry)
        log.info("certificate reloaded from %s", self.tls.cert)
        warning = _warn_if_expiring(self.tls.cert, expiry)
        return f"certificate reloaded from {self.tls.cert}" + (f"; {warning}" if warning else "")


def _warn_if_expiring(cert: Path, expiry: float) -> str | None:
    warning = expiry_warning(cert, expiry, time.time())
    if warning is not None:
        log.warning("%s", warning)
    return warning


def _unusable_data_dir(settings: Settings, problem: OSError | str) -> ConfigurationError:
    if isinstance(problem, OSError):
        reason = problem.strerror or str(problem)
        where = problem.filename
        problem = f"{where}: {reason}" if where and Path(where) != settings.data_dir else reason
    return ConfigurationError(f"cannot use --data-dir {settings.data_dir}: {problem}")


def _data_dir(settings: Settings) -> None:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise _unusable_data_dir(settings, "it is a file, not a directory") from None
    except OSError as problem:
        raise _unusable_data_dir(settings, problem) from None


def _tls(settings: Settings) -> tuple[Path, Path]:
    if settings.tls_cert is not None and settings.tls_key is not None:
        return settings.tls_cert, settings.tls_key
    if settings.tls_cert is not None or settings.tls_key is not None:
        raise ConfigurationError("--tls-cert and --tls-key go together")
    if not settings.dev:
        raise ConfigurationError("give --tls-cert and --tls-key, or --dev for a self-signed one")
    try:
        return ensure_dev_certificate(settings.data_dir)
    except DevCertificateError as problem:
        raise ConfigurationError(str(problem)) from None
    except OSError as problem:
        raise _unusable_data_dir(settings, problem) from None


def _bind_failure(failure: BaseException) -> OSError | None:
    """The OSError a listener's start failed with, if that is all (trio may wrap it in groups)."""
    while isinstance(failure, BaseExceptionGroup) and len(failure.exceptions) == 1:
        failure = failure.exceptions[0]
    return failure if isinstance(failure, OSError) else None


async def _listen(nursery: trio.Nursery, where: str, serve: Callable[..., Awaitable[Any]],
                  *args: object) -> Any:
    """Start a listener; a port in use, a host that is not local or unknown: ConfigurationError."""
    try:
        return await nursery.start(serve, *args)
    except (OSError, BaseExceptionGroup) as failure:
        cause = _bind_failure(failure)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        raise ConfigurationError(f"cannot {where}: {reason}") from None


def _admin_token(settings: Settings) -> str:
    if settings.admin_token:
        return settings.admin_token
    if not settings.dev:
        raise ConfigurationError("set AGENT_GATEWAY_ADMIN_TOKEN (or use --dev to generate one)")
    return secrets.token_urlsafe(32)


@asynccontextmanager
async def open_gateway(settings: Settings) -> AsyncIterator[RunningGateway]:
    """Start a gateway; on leaving the block, drain it and close the store cleanly.

    Settings that cannot work (files, directory, ports) raise ConfigurationError saying which.
    """
    _data_dir(settings)
    cert_path, key_path = _tls(settings)
    admin_token = _admin_token(settings)
    try:
        server_tls = ReloadableTls(cert_path, key_path)
    except TlsError as problem:
        hint = "" if settings.tls_cert else "; delete both to have a new dev certificate made"
        raise ConfigurationError(f"{problem}{hint}") from None
    client_tls = ssl.create_default_context(cafile=str(cert_path))
    # Raised only once the nurseries (ours and the store's) are closed: from inside them, trio
    # would hand the caller an ExceptionGroup instead of the ConfigurationError.
    refused: ConfigurationError | None = None
    async with AsyncExitStack() as stack:
        try:
            store = await stack.enter_async_context(
                open_sqlite_store(settings.database, synchronous=settings.store_sync)
            )
        except (OSError, sqlite3.Error, StoreError) as problem:
            raise _unusable_data_dir(
                settings, f"cannot open the store {settings.database}: {problem}"
            ) from None
        gateway = Gateway(settings, store)
        gateway.metrics.tls_expiry.set(server_tls.expires_at)
        _warn_if_expiring(cert_path, server_tls.expires_at)
        await gateway.load()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gateway.run_timers)
            try:
                server = await _listen(
                    nursery,
                    f"listen for runtimes on --host {settings.host} --port {settings.port}",
                    serve_runtime, gateway, settings, server_tls.listening,
                )
                control_port = await _listen(
                    nursery,
                    f"serve the control API on --control-host {settings.control_host}"
                    f" --control-port {settings.control_port}",
                    serve_control, gateway, settings, admin_token,
                )
            except ConfigurationError as problem:
                refused = problem
                nursery.cancel_scope.cancel()
            else:
                host = (
                    "localhost"
                    if settings.host in ("127.0.0.1", "::1", "localhost")
                    else url_host(settings.host)
                )
                try:
                    yield RunningGateway(
                        service=gateway,
                        runtime_url=f"wss://{host}:{server.port}/runtime",
                        control_url=f"http://{url_host(settings.control_host)}:{control_port}",
                        admin_token=admin_token,
                        cert_path=cert_path,
                        client_ssl_context=client_tls,
                        tls=server_tls,
                    )
                    await gateway.drain()
                    with trio.move_on_after(CONTROL_STOP_S):
                        await gateway.control_stopped.wait()
                finally:
                    nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused
