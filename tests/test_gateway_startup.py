"""A start that cannot work (port taken, data directory unusable, dev certificate damaged) stops
with one ConfigurationError naming the flag or file to change, never a traceback."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from e2e_support import ADMIN_TOKEN, CertificateAuthority, settings_for

from gateway.devcert import CERT_NAME, KEY_NAME
from gateway.embedded import ConfigurationError, open_gateway

IN_USE = os.strerror(errno.EADDRINUSE)


@contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def refusal(tmp_path: Path, **overrides: Any) -> str:
    """The message open_gateway refuses these settings with (a bare ConfigurationError)."""
    ca = CertificateAuthority(tmp_path)
    with pytest.raises(ConfigurationError) as refused:
        async with open_gateway(settings_for(tmp_path, ca, **overrides)):
            pass  # pragma: no cover - the start must fail
    return str(refused.value)


def dev(tmp_path: Path, data_dir: Path) -> dict[str, Any]:
    """Overrides for a --dev gateway keeping its certificate in `data_dir`."""
    return {"dev": True, "tls_cert": None, "tls_key": None, "data_dir": data_dir}


async def test_a_runtime_port_in_use_names_host_and_port(tmp_path: Path) -> None:
    with busy_port() as port:
        said = await refusal(tmp_path, port=port)
    assert said == f"cannot listen for runtimes on --host 127.0.0.1 --port {port}: {IN_USE}"


async def test_a_control_port_in_use_names_control_host_and_port(tmp_path: Path) -> None:
    with busy_port() as port:
        said = await refusal(tmp_path, control_port=port)
    assert said == (
        f"cannot serve the control API on --control-host 127.0.0.1 --control-port {port}: {IN_USE}"
    )


async def test_a_host_that_is_not_local_is_refused(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine.
    said = await refusal(tmp_path, host="192.0.2.1")
    assert said == (
        "cannot listen for runtimes on --host 192.0.2.1 --port 0:"
        f" {os.strerror(errno.EADDRNOTAVAIL)}"
    )


@pytest.mark.parametrize("with_dev", [False, True])
async def test_a_data_dir_under_a_file_is_refused(tmp_path: Path, with_dev: bool) -> None:
    (tmp_path / "file").write_text("")
    data_dir = tmp_path / "file" / "data"
    overrides = dev(tmp_path, data_dir) if with_dev else {"data_dir": data_dir}
    said = await refusal(tmp_path, **overrides)
    assert said == f"cannot use --data-dir {data_dir}: {os.strerror(errno.ENOTDIR)}"


async def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    said = await refusal(tmp_path, data_dir=tmp_path / "file")
    assert said == f"cannot use --data-dir {tmp_path / 'file'}: it is a file, not a directory"


@pytest.mark.parametrize("with_dev", [False, True])
async def test_a_data_dir_where_nothing_can_be_written_is_refused(
    tmp_path: Path, with_dev: bool
) -> None:
    # A directory standing where each file goes fails the same way for root as a read-only
    # directory does for anyone else (root may write into a mode 555 directory).
    data_dir = tmp_path / "data"
    (data_dir / "gateway.sqlite3").mkdir(parents=True)
    overrides: dict[str, Any] = {"data_dir": data_dir}
    if with_dev:
        (data_dir / KEY_NAME).mkdir()
        overrides = dev(tmp_path, data_dir)
    said = await refusal(tmp_path, **overrides)
    if with_dev:
        assert said == (
            f"cannot use --data-dir {data_dir}: {data_dir / KEY_NAME}:"
            f" {os.strerror(errno.EISDIR)}"
        )
    else:
        assert said == (
            f"cannot use --data-dir {data_dir}: cannot open the store"
            f" {data_dir / 'gateway.sqlite3'}: unable to open database file"
        )


async def test_a_damaged_dev_certificate_is_named_and_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / CERT_NAME).write_text("not a certificate\n")
    (data_dir / KEY_NAME).write_text("not a key\n")
    said = await refusal(tmp_path, **dev(tmp_path, data_dir))
    assert said == (
        f"the dev certificate {data_dir / CERT_NAME} is not a PEM certificate;"
        " delete it to have a new one made"
    )
    assert (data_dir / CERT_NAME).read_text() == "not a certificate\n"


async def test_a_damaged_dev_key_says_deleting_both_makes_new_ones(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with open_gateway(settings_for(tmp_path, CertificateAuthority(tmp_path),
                                         **dev(tmp_path, data_dir))):
        pass  # the first start writes a good pair
    (data_dir / KEY_NAME).write_text("not a key\n")
    said = await refusal(tmp_path, **dev(tmp_path, data_dir))
    assert said.startswith(f"cannot use certificate {data_dir / CERT_NAME} with key")
    assert said.endswith("; delete both to have a new dev certificate made")


def test_the_command_says_it_in_one_line_and_exits_2(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    with busy_port() as port:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--data-dir", str(tmp_path / "data"),
             "--tls-cert", str(ca.cert), "--tls-key", str(ca.key),
             "--port", "0", "--control-port", str(port)],
            env={**os.environ, "AGENT_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN},
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"agent-gateway: cannot serve the control API on --control-host 127.0.0.1"
        f" --control-port {port}: {IN_USE}\n"
    )
