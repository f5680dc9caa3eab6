"""Rotating the runtime endpoint's certificate without a restart (`RunningGateway.reload_tls`).

A reload must serve the new certificate to every handshake after it, leave open sessions alone,
and, when the files cannot be used, keep serving the previous certificate and say why without
quoting the key.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from e2e_support import (
    CertificateAuthority,
    Harness,
    gateway_for_test,
    rotate,
    served_name,
    settings_for,
)

import gateway.tls
from gateway.embedded import ConfigurationError, open_gateway
from gateway.tls import expiry_warning

HEARTBEAT = "runtime.session.heartbeat.command"


async def shown(harness: Harness) -> str:
    """The common name of the certificate a runtime connecting now is shown."""
    return await served_name(harness.running.runtime_url, harness.ca)


def reloads(harness: Harness, outcome: str) -> float | None:
    """The reload counter for one outcome, as /metrics shows it."""
    registry = harness.running.service.metrics.registry
    return registry.get_sample_value("agent_gateway_tls_reloads_total", {"outcome": outcome})


def expiry_gauge(harness: Harness) -> float | None:
    """The certificate expiry the gateway reports."""
    registry = harness.running.service.metrics.registry
    return registry.get_sample_value("agent_gateway_tls_certificate_expiry_timestamp_seconds")


def leaf_expiry(cert: Path) -> float:
    """The expiry of the first certificate in a PEM chain file."""
    return x509.load_pem_x509_certificates(cert.read_bytes())[0].not_valid_after_utc.timestamp()


async def test_a_reload_serves_the_new_certificate_and_open_sessions_keep_going(
    tmp_path: Path,
) -> None:
    async with gateway_for_test(tmp_path) as harness:
        assert expiry_gauge(harness) == leaf_expiry(harness.ca.cert)
        run_id, token = await harness.create_run()
        async with harness.wire(token) as wire:
            session_id = (await wire.attach(run_id))["sessionId"]
            assert await shown(harness) != "rotated"
            rotate(harness.ca, "rotated")
            assert await shown(harness) != "rotated"  # nothing changes before the signal
            assert "certificate reloaded" in harness.running.reload_tls()
            assert await shown(harness) == "rotated"
            # The session attached under the old certificate is still served on its connection.
            beat = await wire.call(HEARTBEAT, {"sessionId": session_id, "runId": run_id})
            assert beat["payload"]["accepted"] is True, beat
        # A runtime connecting now attaches through the new certificate.
        async with harness.wire(token) as wire:
            await wire.attach(run_id, reconnect=True)
        assert reloads(harness, "ok") == 1
        assert expiry_gauge(harness) == leaf_expiry(harness.ca.cert)


def _rotate_to(ca: CertificateAuthority, common_name: str, days: int) -> None:
    """Write a new leaf that expires in `days` over the gateway's files."""
    leaf = ca.ca.issue_cert(
        "localhost", "127.0.0.1", common_name=common_name,
        not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days),
    )
    leaf.private_key_pem.write_to_path(str(ca.key))
    ca.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))


async def test_a_rotation_landing_during_a_reload_reports_the_served_certificates_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL reads the files by name; if they change before the expiry is read, read again."""
    async with gateway_for_test(tmp_path) as harness:
        _rotate_to(harness.ca, "first", days=100)
        built = gateway.tls.server_context
        rotations = iter(["second"])

        def rotation_lands_meanwhile(cert: Path, key: Path) -> ssl.SSLContext:
            context = built(cert, key)
            if (name := next(rotations, None)) is not None:
                _rotate_to(harness.ca, name, days=200)
            return context

        monkeypatch.setattr(gateway.tls, "server_context", rotation_lands_meanwhile)
        assert "certificate reloaded" in harness.running.reload_tls()
        assert await shown(harness) == "second"
        assert expiry_gauge(harness) == leaf_expiry(harness.ca.cert)


async def test_files_that_keep_changing_leave_the_previous_certificate_in_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gateway_for_test(tmp_path) as harness:
        before, expiry = await shown(harness), expiry_gauge(harness)
        built = gateway.tls.server_context
        rotations = itertools.count()

        def rotation_lands_every_time(cert: Path, key: Path) -> ssl.SSLContext:
            context = built(cert, key)
            _rotate_to(harness.ca, f"rotation {next(rotations)}", days=100)
            return context

        monkeypatch.setattr(gateway.tls, "server_context", rotation_lands_every_time)
        message = harness.running.reload_tls()
        assert message.endswith("kept changing while it was loaded; reload once it is written")
        assert next(rotations) == gateway.tls.LOAD_ATTEMPTS
        assert await shown(harness) == before and expiry_gauge(harness) == expiry


def _mismatched_key(ca: CertificateAuthority) -> None:
    old_key = rotate(ca, "rotated")
    ca.key.write_bytes(old_key)  # the new certificate with the old key


def _garbage_certificate(ca: CertificateAuthority) -> None:
    ca.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")


def _missing_key(ca: CertificateAuthority) -> None:
    ca.key.unlink()


PASSPHRASE = b"key-passphrase-0123"


def _encrypt_key(
    ca: CertificateAuthority,
    form: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
) -> None:
    key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    ca.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, form,
                                         serialization.BestAvailableEncryption(PASSPHRASE)))


def _encrypted_key(ca: CertificateAuthority) -> None:
    rotate(ca, "rotated")
    _encrypt_key(ca)


@pytest.mark.parametrize(
    "damage", [_mismatched_key, _garbage_certificate, _missing_key, _encrypted_key]
)
async def test_a_failed_reload_keeps_the_previous_certificate_and_says_why(
    tmp_path: Path, damage: Callable[[CertificateAuthority], None]
) -> None:
    async with gateway_for_test(tmp_path) as harness:
        before = await shown(harness)
        expiry = expiry_gauge(harness)
        key_text = harness.ca.key.read_text()
        damage(harness.ca)
        message = harness.running.reload_tls()
        assert message.startswith("certificate not reloaded, still serving the previous one:")
        assert str(harness.ca.cert) in message
        key_body = "".join(key_text.splitlines()[1:-1])
        assert key_body[:16] not in message  # the reason names the files, never their contents
        assert await shown(harness) == before
        assert reloads(harness, "failed") == 1 and reloads(harness, "ok") is None
        assert expiry_gauge(harness) == expiry
        run_id, token = await harness.create_run()
        async with harness.wire(token) as wire:
            await wire.attach(run_id)  # the gateway still admits runtimes


async def test_a_certificate_that_cannot_be_used_stops_the_start_with_a_clear_error(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority(tmp_path)
    _mismatched_key(ca)
    refused = r"cannot use certificate .* with key .*: KEY_VALUES_MISMATCH"
    with pytest.raises(ConfigurationError, match=refused):
        async with open_gateway(settings_for(tmp_path, ca)):
            pass  # pragma: no cover - the start must fail


def encrypted_key_refusal(ca: CertificateAuthority) -> str:
    """What the gateway says about an encrypted key."""
    return (
        f"cannot use certificate {ca.cert} with key {ca.key}: the key is encrypted"
        " (passphrase-protected) and the gateway takes no passphrase; give it an"
        " unencrypted key (e.g. openssl pkey -in KEY -out PLAIN_KEY)"
    )


# Reports what server_context says, from a process with no controlling terminal whose stdin stays
# open and silent: OpenSSL, asked to prompt for a passphrase, sat reading it (at a terminal, it
# prompted there), and a SIGHUP reload blocked the whole event loop.
PROBE = """
import sys
from pathlib import Path
from gateway.tls import TlsError, server_context
try:
    server_context(Path(sys.argv[1]), Path(sys.argv[2]))
except TlsError as problem:
    print(problem)
"""


@pytest.mark.parametrize(
    "form", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_an_encrypted_key_is_refused_at_once_never_asking_for_its_passphrase(
    tmp_path: Path, form: serialization.PrivateFormat
) -> None:
    ca = CertificateAuthority(tmp_path)
    _encrypt_key(ca, form)
    silent, held_open = os.pipe()
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(ca.cert), str(ca.key)],
            stdin=silent, capture_output=True, text=True, timeout=30, check=False,
            start_new_session=True,
        )
    finally:
        os.close(silent)
        os.close(held_open)
    assert done.returncode == 0, done.stderr
    assert done.stdout == encrypted_key_refusal(ca) + "\n"
    assert "pass phrase" not in done.stderr.lower()


async def test_an_encrypted_key_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    _encrypt_key(ca)
    with pytest.raises(ConfigurationError) as refused:
        async with open_gateway(settings_for(tmp_path, ca)):
            pass  # pragma: no cover - the start must fail
    assert str(refused.value) == encrypted_key_refusal(ca)


def test_a_reload_onto_an_encrypted_key_keeps_the_served_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    tls = gateway.tls.ReloadableTls(ca.cert, ca.key)
    served, expiry = tls.current, tls.expires_at
    _encrypted_key(ca)
    with pytest.raises(gateway.tls.TlsError) as refused:
        tls.reload()
    assert str(refused.value) == encrypted_key_refusal(ca)
    assert tls.current is served and tls.expires_at == expiry


def test_expiry_warnings_start_two_weeks_before_and_go_on_after() -> None:
    cert, day = Path("/etc/gw/cert.pem"), 86_400.0
    assert expiry_warning(cert, 1_000 * day, 900 * day) is None
    assert expiry_warning(cert, 1_000 * day, 986.5 * day) == (
        "certificate /etc/gw/cert.pem expires in 13.5 days: rotate it (then SIGHUP)"
    )
    assert expiry_warning(cert, 1_000 * day, 1_002 * day) == (
        "certificate /etc/gw/cert.pem expired 2.0 days ago: runtimes refuse it"
    )


def _self_signed(cert: Path, key: Path, days: float) -> None:
    """A localhost certificate valid for `days` more (no CA: nothing here shakes hands with it)."""
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    built = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


async def test_a_certificate_close_to_expiry_is_warned_about_at_start_and_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = CertificateAuthority(tmp_path)
    _self_signed(ca.cert, ca.key, days=3)
    async with open_gateway(settings_for(tmp_path, ca)) as running:
        [started] = [r for r in caplog.records if "expires in" in r.getMessage()]
        assert started.levelno == logging.WARNING
        assert f"certificate {ca.cert} expires in 3.0 days" in started.getMessage()
        _self_signed(ca.cert, ca.key, days=1)
        assert "; certificate" in running.reload_tls()  # the operator sees it on stdout too
        assert "expires in 1.0 days" in caplog.records[-1].getMessage()
        _self_signed(ca.cert, ca.key, days=90)
        assert running.reload_tls() == f"certificate reloaded from {ca.cert}"
