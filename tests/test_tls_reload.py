"""Rotating the runtime endpoint's certificate without a restart (`RunningGateway.reload_tls`).

A reload must serve the new certificate to every handshake after it, leave open sessions alone,
and, when the files cannot be used, keep serving the previous certificate and say why without
quoting the key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from e2e_support import (
    CertificateAuthority,
    Harness,
    gateway_for_test,
    rotate,
    served_name,
    settings_for,
)

from gateway.embedded import ConfigurationError, open_gateway

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


def _mismatched_key(ca: CertificateAuthority) -> None:
    old_key = rotate(ca, "rotated")
    ca.key.write_bytes(old_key)  # the new certificate with the old key


def _garbage_certificate(ca: CertificateAuthority) -> None:
    ca.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")


def _missing_key(ca: CertificateAuthority) -> None:
    ca.key.unlink()


@pytest.mark.parametrize("damage", [_mismatched_key, _garbage_certificate, _missing_key])
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
