"""`agent-gateway`: `serve` runs the gateway, `demo` shows a runtime's whole life against one.

Every `serve` flag is generated from `Settings`, with its environment variable as the default, so
the flags, the variables and the settings object cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import attrs
import trio

from gateway import logs
from gateway.config import SettingError, Settings
from gateway.gcwatch import settle_heap, watch_collections
from gateway.limits import raise_nofile, session_capacity

ENV_PREFIX = "AGENT_GATEWAY_"

HELP = {
    "data_dir": "directory for the SQLite store and the dev certificate",
    "host": "address of the runtime WebSocket endpoint (wss://HOST:PORT/runtime)",
    "port": "port of the runtime endpoint (0: any free port)",
    "control_host": "address of the platform's control API (keep it on loopback or a private net)",
    "control_port": "port of the control API (0: any free port)",
    "tls_cert": "PEM certificate chain for the runtime endpoint",
    "tls_key": "PEM private key for the runtime endpoint, unencrypted (no passphrase)",
    "dev": "development mode: self-signed localhost certificate and a generated admin token",
    "admin_token": "bearer token of the control API (better given as the environment variable)",
    "heartbeat_interval_ms": "heartbeat interval granted to runtimes (>= 1000)",
    "lease_misses": "a lease lasts this many heartbeat intervals",
    "recovery_window_ms": "how long after expiry a runtime may still recover its session",
    "command_rate": "commands per second allowed per connection (sustained)",
    "command_burst": "commands allowed per connection in a burst",
    "max_frame_bytes": "largest frame accepted (bigger: payload_too_large; twice this: close 1009)",
    "outbound_queue": "frames queued for a connection by other tasks before a non-reading runtime "
    "is closed (4003)",
    "send_timeout_s": "seconds a send may wait on a runtime that is not reading (then: 4003)",
    "max_sessions": "most runtime connections at once; more are refused with HTTP 503",
    "max_connections_per_run": "most runtime connections one run's token may hold at once (never "
    "more than half of --max-sessions); more are refused with HTTP 503",
    "handshake_timeout_s": "seconds a client has to finish the WebSocket handshake",
    "drain_timeout_s": "seconds a drain (SIGTERM/SIGINT) waits for connections before closing them",
    "store_sync": "SQLite synchronous: full (survives power loss) or normal (survives crashes)",
    "mask_secrets": "mask secret values that runtimes echo into output events",
}


class BadSetting(Exception):
    """A flag or environment variable cannot be used (the message names it and its rule)."""


class _FromEnv:
    """A setting's text from its environment variable, so a refusal names the variable."""

    def __init__(self, variable: str, text: str) -> None:
        self.variable = variable
        self.text = text

    def __repr__(self) -> str:
        return f"<value of {self.variable}>"  # never the text: it may be the admin token


def _env_default(field: attrs.Attribute[Any]) -> Any:
    variable = ENV_PREFIX + field.name.upper()
    raw = os.environ.get(variable)
    if raw is None:
        return field.default
    return _FromEnv(variable, raw)


def _add_settings(parser: argparse.ArgumentParser) -> None:
    for field in attrs.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        env = ENV_PREFIX + field.name.upper()
        default = _env_default(field)
        help_text = f"{HELP[field.name]} [env {env}; default {field.default!s}]"
        if field.type in (bool, "bool"):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(flag, default=default, help=help_text, metavar=field.name.upper())


_NUMBERS = {"int": (int, "an integer"), "float": (float, "a number")}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _switch(text: str, source: str) -> bool:
    # Reading every unknown word as "off" would let AGENT_GATEWAY_MASK_SECRETS=enabled turn
    # masking off, and secrets would reach the platform's outputs unmasked.
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise BadSetting(
        f"{source} must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, not {text!r}"
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """Build Settings from parsed flags, or BadSetting naming the flag or variable to fix."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field in attrs.fields(Settings):
        value = getattr(args, field.name)
        source = "--" + field.name.replace("_", "-")
        if isinstance(value, _FromEnv):
            source, value = value.variable, value.text
        sources[field.name] = source
        kind = str(field.type).removeprefix("<class '").removesuffix("'>")
        if value is None or isinstance(value, bool):
            values[field.name] = value
        elif kind == "bool":
            values[field.name] = _switch(value, source)
        elif "Path" in kind:
            values[field.name] = Path(value)
        elif kind in _NUMBERS:
            convert, what = _NUMBERS[kind]
            try:
                values[field.name] = convert(value)
            except ValueError:
                raise BadSetting(f"{source} must be {what}, not {value!r}") from None
        else:
            values[field.name] = value
    try:
        return Settings(**values)
    except SettingError as problem:
        # The value as the operator wrote it: 10, not 10.0, for a float setting given "10".
        typed = getattr(args, problem.name)
        text = typed.text if isinstance(typed, _FromEnv) else typed
        shown = str(text).strip() if isinstance(problem.value, int | float) else repr(text)
        raise BadSetting(f"{sources[problem.name]} must be {problem.rule}, not {shown}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line: `serve` and `demo`."""
    parser = argparse.ArgumentParser(prog="agent-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the gateway until SIGTERM/SIGINT (SIGHUP reloads the certificate)"
    )
    _add_settings(serve)
    serve.add_argument(
        "--log-level",
        default=os.environ.get(ENV_PREFIX + "LOG_LEVEL", "info"),
        help=f"debug, info, warning, error or critical [env {ENV_PREFIX}LOG_LEVEL; default info]",
    )
    serve.add_argument(
        "--log-format",
        default=os.environ.get(ENV_PREFIX + "LOG_FORMAT", "text"),
        help="text lines, or json: one object per line for a log pipeline"
        f" [env {ENV_PREFIX}LOG_FORMAT; default text]",
    )
    demo = commands.add_parser("demo", help="run a gateway and a runtime, narrating each step")
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where to keep state (default: a temporary directory)",
    )
    return parser


async def serve(settings: Settings) -> None:
    """Run until a signal, then drain: answer in-flight work, tell runtimes to reconnect."""
    from gateway.embedded import open_gateway

    nofile = raise_nofile()
    capacity = session_capacity(settings.max_sessions, nofile)
    if capacity < settings.max_sessions:
        print(
            f"agent-gateway: RLIMIT_NOFILE is {nofile}: holding at most {capacity} runtime"
            f" connections, not --max-sessions {settings.max_sessions} (raise the hard limit,"
            " e.g. LimitNOFILE= in systemd or ulimit -Hn, to hold more)",
            flush=True,
        )
        settings = attrs.evolve(settings, max_sessions=capacity)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with open_gateway(settings) as running:
            settle_heap()
            stop_watching = watch_collections(running.service.metrics.gc_seconds)
            print(f"agent-gateway: runtimes connect to {running.runtime_url}", flush=True)
            print(f"agent-gateway: control API at {running.control_url}", flush=True)
            if settings.dev:
                print(f"agent-gateway: dev certificate {running.cert_path}", flush=True)
                if not settings.admin_token:
                    print(f"agent-gateway: admin token {running.admin_token}", flush=True)
            async for signum in signals:
                if signum == signal.SIGHUP:  # certificates were rotated: serve the new ones
                    print(f"agent-gateway: SIGHUP: {running.reload_tls()}", flush=True)
                    continue
                print(f"agent-gateway: {signal.Signals(signum).name}: draining", flush=True)
                break
            stop_watching()
    print("agent-gateway: stopped", flush=True)


def _refused(problem: Exception) -> int:
    print(f"agent-gateway: {problem}", file=sys.stderr)
    return 2  # a usage error, as argparse's own refusals


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `agent-gateway` console script."""
    args = build_parser().parse_args(argv)
    from gateway.embedded import ConfigurationError

    if args.command == "serve":
        try:
            logs.configure(args.log_level, args.log_format)
        except ValueError as problem:
            return _refused(problem)
        try:
            trio.run(serve, settings_from(args))
        except (BadSetting, ConfigurationError) as problem:
            return _refused(problem)
        return 0
    from gateway.demo import run_demo

    try:
        return trio.run(run_demo, args.data_dir)
    except ConfigurationError as problem:
        return _refused(problem)


if __name__ == "__main__":
    raise SystemExit(main())
